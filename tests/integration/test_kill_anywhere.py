"""A kill anywhere loses nothing (issue 23): every CLI step, and ``LessSFTTrainer.train()``, killed with SIGKILL
at a seeded random point and run again with the same arguments, ends with the selection of an uninterrupted run.

The killed runs are child processes; the reference and the reruns run in this process (no start-up cost).
"""

from __future__ import annotations

import json
import os
import random
import runpy
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from hf_less import cli
from hf_less.gradients.store import FeatureStore
from hf_less.selection.record import load_selection
from hf_less.training.layout import RunLayout

from tests.testing_utils import example_args, make_model, make_tokenizer, toy_tasks

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[2]
EXAMPLE = ROOT / "examples" / "sft_with_less.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}


def _kill_during(cmd: list[str], started, seconds: float) -> bool:
    """Run ``cmd`` in a child; once ``started()`` is true, wait ``seconds`` more and SIGKILL it (if still running).

    Returns whether it was killed (a child that finished first is a kill after the end: also allowed)."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 180
    while proc.poll() is None and not started() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(seconds)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode in (0, -signal.SIGKILL), err[-3000:]
    return proc.returncode == -signal.SIGKILL


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    tokenizer = make_tokenizer()
    make_model(len(tokenizer), seed=0).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    rows = toy_tasks(8, seed=0)
    held = [r for r in toy_tasks(6, seed=1) if r["task"] == "math"]
    for name, data in (("pool", rows), ("targets", held[:3])):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    return root


STEPS = [("warmup", ["--warmup_fraction", "0.5", "--warmup_epochs", "2"]), ("featurize", ["--proj_dim", "32"]),
         ("select", ["--budget", "4", "--name", "a"])]


def test_every_cli_step_killed_anywhere_then_rerun_selects_as_an_uninterrupted_run(tiny, tmp_path):
    def args(run_dir):
        return ["--run_dir", str(run_dir), "--model", str(tiny / "model"), "--dataset", str(tiny / "pool.jsonl"),
                "--targets", str(tiny / "targets.jsonl"), "--max_length", "64", "--batch_size", "4", "--lora_r", "4",
                "--quiet"]

    seconds = {}
    for step, extra in STEPS:  # the uninterrupted reference, timed per step
        start = time.monotonic()
        assert cli.main([step, *args(tmp_path / "ref"), *extra]) == 0
        seconds[step] = time.monotonic() - start
    start = time.monotonic()  # what a child spends importing before it begins a step
    subprocess.run([sys.executable, "-c", "import hf_less.cli.commands, hf_less.scoring.less, trl, peft"], env=ENV,
                   check=True)
    boot = time.monotonic() - start
    rng = random.Random(23)
    run = tmp_path / "killed"
    layout = RunLayout(run)
    # When the child has begun each step: the warmup once run.json is written (the data is built), featurize once it
    # holds the store's writer lock, select (which writes only its result) after the imports.
    begun = {"warmup": lambda: layout.run_info.exists(), "featurize": lambda: (layout.store / ".writer.lock").exists(),
             "select": lambda: True}
    killed = []
    for step, extra in STEPS:
        cmd = [sys.executable, "-c", "import sys; from hf_less.cli import main; sys.exit(main(sys.argv[1:]))",
               step, *args(run), *extra]
        if _kill_during(cmd, begun[step], rng.uniform(0, 1.2) * seconds[step] + (boot if step == "select" else 0)):
            killed.append(step)
        assert cli.main([step, *args(run), *extra]) == 0  # the same command again
    assert killed, "no step was killed before it ended: the test checked nothing"
    ref, got = load_selection(RunLayout(tmp_path / "ref").selection("a")), load_selection(RunLayout(run).selection("a"))
    assert got.indices == ref.indices and got.scores == pytest.approx(ref.scores, rel=1e-5)
    a, b = FeatureStore(RunLayout(tmp_path / "ref").store), FeatureStore(RunLayout(run).store)
    assert b.complete and np.array_equal(a.keys(), b.keys())
    for name in ("less_scores.npy", "less_sims.npy"):
        np.testing.assert_allclose(np.load(RunLayout(run).features / name),
                                   np.load(RunLayout(tmp_path / "ref").features / name), rtol=1e-5)


def _run_example(argv: list[str]) -> None:
    old = sys.argv
    sys.argv = [str(EXAMPLE), *map(str, argv)]
    try:
        runpy.run_path(str(EXAMPLE), run_name="__main__")
    finally:
        sys.argv = old


def test_less_sft_trainer_killed_anywhere_then_rerun_selects_as_an_uninterrupted_run(tmp_path, tokenizer):
    extra = ["--less_warmup_fraction", "0.5", "--less_warmup_epochs", "2", "--less_lora_r", "4", "--less_lora_alpha",
             "8", "--less_warmup_learning_rate", "1e-3"]
    start = time.monotonic()
    _run_example(example_args(tmp_path, tokenizer, tmp_path / "ref", *extra))
    seconds = time.monotonic() - start
    out = tmp_path / "killed"
    argv = example_args(tmp_path, tokenizer, out, *extra)
    rng = random.Random(23)
    # A child that finished before its kill (a loaded machine's timings differ from the reference's) is run
    # again from nothing with half the delay: a kill must land inside the run, or the test checks nothing.
    for attempt in range(4):
        if _kill_during([sys.executable, str(EXAMPLE), *map(str, argv)], lambda: out.exists(),
                        rng.uniform(0, 1.0) * seconds / 2**attempt):
            break
        shutil.rmtree(out)
    else:
        pytest.fail("the child finished before every kill: the test checked nothing")
    _run_example(argv)
    ref, got = load_selection(tmp_path / "ref"), load_selection(out)
    assert got.indices == ref.indices and got.scores == pytest.approx(ref.scores, rel=1e-5)
    assert (out / "adapter_model.safetensors").exists()
