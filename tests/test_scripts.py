"""scripts/test_gpu.sh's steps, in order, without a GPU: ``$PYTHON`` is a stand-in that records each call.

The script is run rarely, on a GPU machine borrowed for a few minutes, so a step it skips by mistake costs
that run's figures; here every step's command line is checked on the CPU.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(tmp_path: Path, *args: str) -> tuple[int, list[str]]:
    """Run a copy of scripts/test_gpu.sh (in a copy of its folder layout, no .whl/) with a recording PYTHON."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "test_gpu.sh", repo / "scripts" / "test_gpu.sh")
    log = tmp_path / "calls.txt"
    fake = tmp_path / "python"
    fake.write_text(f'#!/usr/bin/env bash\necho "$*" >> {log}\necho ok\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "PYTHON": str(fake), "OUT": str(tmp_path / "out")}
    proc = subprocess.run(["bash", str(repo / "scripts" / "test_gpu.sh"), *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    return proc.returncode, log.read_text().splitlines()


@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils' timeout")
def test_test_gpu_sh_runs_the_tests_then_every_benchmark(tmp_path):
    rc, calls = run_script(tmp_path)
    assert rc == 0
    tests = [i for i, c in enumerate(calls) if c.startswith("-m pytest -q -m gpu")]
    benches = [c for c in calls if c.startswith("examples/bench/featurize_scale.py")]
    assert len(tests) == 1
    assert [c.split("--kinds ")[1].split(" --")[0] for c in benches] == [
        "rowshift rowshift-compiled", "sparse", "rademacher", "rowshift sparse rademacher"]
    assert all("--preset llama2-7b" in c for c in benches[:3]) and "--preset smollm2-135m" in benches[3]
    assert "--profile 64" in benches[0]  # the default kind's phases and kernels at the 7B shape
    assert calls[-1].startswith("examples/bench/projection_speed.py --layers 32 --hidden 4096")
    assert tests[0] < calls.index(benches[0])  # the tests first: a failure shows before the timings


@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils' timeout")
def test_test_gpu_sh_tests_only(tmp_path):
    rc, calls = run_script(tmp_path, "--tests")
    assert rc == 0
    assert not any("examples/bench/" in c for c in calls)
    assert sum(c.startswith("-m pytest -q -m gpu") for c in calls) == 1


def test_test_gpu_sh_limits_add_up_to_under_eight_minutes():
    """Each step has its own time limit; together they must fit one device call (8 minutes, the start aside)."""
    import re

    text = (ROOT / "scripts" / "test_gpu.sh").read_text()
    limits = [int(n) for n in re.findall(r"^(?:timeout|bench \w+) (\d+) ", text, flags=re.M)]
    assert len(limits) == 6  # the tests, four featurization benchmarks, the projection call
    assert sum(limits) < 8 * 60, limits
    assert f"at most {sum(limits) / 60:.1f} minutes" in text  # the header states it
