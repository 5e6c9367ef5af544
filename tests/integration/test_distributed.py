"""Several processes for real (torchrun, 2 CPU processes, gloo): one writer, and the same numbers as one."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_less.gradients.state import find_checkpoints, load_moments
from hf_less.gradients.store import FeatureStore

from tests.testing_utils import example_args, torchrun

pytestmark = pytest.mark.integration


def test_two_process_warmup_writes_once(tmp_path):
    torchrun("ddp_warmup.py", tmp_path)
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


def test_split_featurization_is_bit_identical_to_one_process(tmp_path):
    # both runs under torchrun with one thread each: bitwise equality needs the same BLAS threading
    warmup = tmp_path / "warmup"
    torchrun("ddp_warmup.py", warmup, port=29518)
    torchrun("ddp_featurize.py", "split", tmp_path / "one", warmup, nproc=1, port=29519)
    torchrun("ddp_featurize.py", "split", tmp_path / "two", warmup, port=29520)
    one, two = torch.load(tmp_path / "one" / "split.pt"), torch.load(tmp_path / "two" / "split.pt")
    assert two["units"] == 7  # 13 rows in batches of 2, one batch per unit: 4 units on rank 0, 3 on rank 1
    assert torch.equal(one["features"], two["features"])

    single, double = FeatureStore(tmp_path / "one" / "store"), FeatureStore(tmp_path / "two" / "store")
    assert single.complete and double.complete and double.num_rows == single.num_rows == 13
    assert len(double.manifest["shards"]) == 3  # shard_rows=5
    for step in single.steps:
        assert np.array_equal(single.features(step).read(0, 13), double.features(step).read(0, 13))
    assert np.array_equal(single.keys(), double.keys())


def test_two_process_capture_equals_one_process(tmp_path):
    torchrun("ddp_featurize.py", "capture", tmp_path / "one", nproc=1, port=29521)
    torchrun("ddp_featurize.py", "capture", tmp_path / "two", port=29522)
    one, two = find_checkpoints(tmp_path / "one"), find_checkpoints(tmp_path / "two")
    assert [c.step for c in one] == [c.step for c in two]
    for a, b in zip(one, two):
        for which in ("pool", "targets"):
            sa, sb = FeatureStore(a.captured(which)), FeatureStore(b.captured(which))
            assert sa.complete and sb.complete and np.array_equal(sa.keys(), sb.keys())
            # the two warmups' gradients are all-reduced in another order: float noise, no more
            np.testing.assert_allclose(sa.features(a.step).read(0, sa.num_rows),
                                       sb.features(b.step).read(0, sb.num_rows), atol=1e-4)


def test_example_under_torchrun_selects_as_one_process(tmp_path, tokenizer):
    from hf_less.selection.record import load_selection

    example = Path(__file__).parents[2] / "examples" / "sft_with_less.py"
    # a warmup without captured features: the pool is featurized across the processes
    torchrun("ddp_warmup.py", tmp_path / "warmup", port=29523)
    reuse = ["--less_warmup_dir", tmp_path / "warmup"]
    torchrun(example, *example_args(tmp_path, tokenizer, tmp_path / "one", *reuse), nproc=1, port=29524)
    torchrun(example, *example_args(tmp_path, tokenizer, tmp_path / "two", *reuse), port=29525)
    one, two = load_selection(tmp_path / "one"), load_selection(tmp_path / "two")
    assert one.indices == two.indices and len(one.indices) == 5 and one.scores == two.scores
    s1, s2 = FeatureStore(tmp_path / "one" / "less_features" / "pool"), FeatureStore(tmp_path / "two" / "less_features" / "pool")
    assert s1.num_rows == s2.num_rows == 13
    for step in s1.steps:
        assert np.array_equal(s1.features(step).read(0, 13), s2.features(step).read(0, 13))
    assert (tmp_path / "two" / "adapter_model.safetensors").exists()  # then it trained, and saved once


def test_example_under_torchrun_runs_its_own_warmup(tmp_path, tokenizer):
    from hf_less.selection.record import load_selection

    example = Path(__file__).parents[2] / "examples" / "sft_with_less.py"
    torchrun(example, *example_args(tmp_path, tokenizer, tmp_path / "out", "--less_warmup_fraction", "0.5",
                                    "--less_warmup_epochs", "2", "--less_lora_r", "4", "--less_lora_alpha", "8",
                                    "--less_warmup_learning_rate", "1e-3"), port=29526)
    ckpts = find_checkpoints(tmp_path / "out" / "less_warmup")
    assert len(ckpts) == 2
    for c in ckpts:  # captured during the warmup, complete, by the main process only
        assert FeatureStore(c.captured("pool")).complete and FeatureStore(c.captured("pool")).num_rows == 13
    assert len(load_selection(tmp_path / "out").indices) == 5
    assert not (tmp_path / "out" / "less_features").exists()  # no second pass over the pool
