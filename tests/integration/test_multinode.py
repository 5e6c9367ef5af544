"""Two nodes simulated on this machine (issue 23): two ``torchrun --nnodes 2 --node_rank {0,1} --rdzv_backend
c10d`` launches on localhost, one process each, gloo. With a shared run directory (a cluster's shared
filesystem) capture, featurization, selection and LessSFTTrainer give what one process gives; with
per-node directories (node-local disks) LessSFTTrainer stops at once, saying to use a shared path.

docs/trainer.md has the multi-node recipe these tests check.
"""

import time
from pathlib import Path

import numpy as np
import pytest

from hf_less.gradients.state import find_checkpoints
from hf_less.gradients.store import FeatureStore
from hf_less.selection.record import load_selection

from tests.testing_utils import example_args, torchrun, torchrun_nodes

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).parents[2] / "examples" / "sft_with_less.py"


def test_two_nodes_capture_equals_one_process(tmp_path):
    """A Trainer warmup with LessCallback(pool, targets) on two nodes writing one shared directory."""
    torchrun("ddp_featurize.py", "capture", tmp_path / "one", nproc=1, port=29541)
    torchrun_nodes("ddp_featurize.py", [["capture", tmp_path / "two"]] * 2, port=29542)
    one, two = find_checkpoints(tmp_path / "one"), find_checkpoints(tmp_path / "two")
    assert [c.step for c in one] == [c.step for c in two] and len(one) == 2
    for a, b in zip(one, two):
        assert a.state["base_model"] == b.state["base_model"]
        for which in ("pool", "targets"):
            sa, sb = FeatureStore(a.captured(which)), FeatureStore(b.captured(which))
            assert sa.complete and sb.complete and np.array_equal(sa.keys(), sb.keys())
            # the warmups' gradients are all-reduced in another order: float noise, no more
            np.testing.assert_allclose(sa.features(a.step).read(0, sa.num_rows),
                                       sb.features(b.step).read(0, sb.num_rows), atol=1e-4)
        assert not list(a.path.parent.rglob(".hf_less_shared.*")) and not list(b.path.rglob("*.lock"))


def test_two_nodes_featurize_select_and_train_as_one_process(tmp_path, tokenizer):
    """LessSFTTrainer on two nodes with a shared output_dir: the pool featurized across the nodes (a reused warmup
    without captured features), one store, the same selection as one process, then trained."""
    torchrun("ddp_warmup.py", tmp_path / "warmup", nproc=1, port=29543)
    reuse = ["--less_warmup_dir", tmp_path / "warmup"]
    torchrun(EXAMPLE, *example_args(tmp_path, tokenizer, tmp_path / "one", *reuse), nproc=1, port=29544)
    torchrun_nodes(EXAMPLE, [example_args(tmp_path, tokenizer, tmp_path / "two", *reuse)] * 2, port=29545)
    one, two = load_selection(tmp_path / "one"), load_selection(tmp_path / "two")
    assert one.indices == two.indices and len(one.indices) == 5 and one.scores == two.scores
    s1, s2 = (FeatureStore(tmp_path / d / "less_features" / "pool") for d in ("one", "two"))
    assert s1.num_rows == s2.num_rows == 13 and np.array_equal(s1.keys(), s2.keys())
    for step in s1.steps:
        assert np.array_equal(s1.features(step).read(0, 13), s2.features(step).read(0, 13))
    assert (tmp_path / "two" / "adapter_model.safetensors").exists()


def test_per_node_directories_stop_at_once_naming_the_fix(tmp_path, tokenizer):
    """Node-local output directories: LessSFTTrainer refuses on both nodes before its warmup."""
    args = [example_args(tmp_path, tokenizer, tmp_path / f"node{i}", "--less_warmup_fraction", "0.5",
                         "--less_warmup_epochs", "2") for i in range(2)]
    start = time.monotonic()
    results = torchrun_nodes(EXAMPLE, args, port=29546, expect_success=False)
    elapsed = time.monotonic() - start
    for rc, err in results:
        assert rc != 0
        assert "is not shared between the processes: process 1 on" in err
        assert "shared filesystem" in err
    assert not (tmp_path / "node0" / "less_warmup").exists() and not (tmp_path / "node1" / "less_warmup").exists()
    assert elapsed < 120, elapsed
