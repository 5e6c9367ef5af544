"""LessCallback under real DDP (torchrun, 2 CPU processes, gloo): one writer, the shared state."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hf_less.checkpoints import find_checkpoints, load_moments

SCRIPT = Path(__file__).parent / "scripts" / "ddp_warmup.py"


def test_two_process_warmup_writes_once(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           str(SCRIPT), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpts = find_checkpoints(tmp_path)
    assert len(ckpts) == 2
    assert (tmp_path / "writer-rank0").read_text() == "xx" and not (tmp_path / "writer-rank1").exists()
    for c in ckpts:
        # both ranks hold the same (all-reduced) optimizer state; rank 0 wrote it, nobody left temp files
        r0 = json.loads((tmp_path / f"rank0-step{c.step}.json").read_text())
        r1 = json.loads((tmp_path / f"rank1-step{c.step}.json").read_text())
        assert r0 == pytest.approx(r1, rel=1e-5)
        saved = load_moments(c.path)
        assert {k: v.sum().item() for k, v in saved.exp_avg.items()} == pytest.approx(r0, rel=1e-5)
        assert not [p for p in c.path.iterdir() if p.name.endswith(".tmp")]
