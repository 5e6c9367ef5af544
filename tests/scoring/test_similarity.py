"""LESS scores: checkpoint-weighted cosines and subtask aggregation, against per-pair loops."""

import math

import pytest
import torch

from hf_less.scoring.similarity import less_score, normalize, subtask_index, weighted_sims


def naive_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(a @ b / (a.norm() * b.norm()))


def test_weighted_sims_equals_a_per_pair_loop_over_checkpoints():
    g = torch.Generator().manual_seed(0)
    pool = [torch.randn(7, 16, generator=g) * s for s in (0.1, 3.0, 50.0)]  # any norm
    targets = [torch.randn(4, 16, generator=g) for _ in range(3)]
    weights = [0.2, 0.5, 0.3]
    got = weighted_sims(pool, targets, weights)
    assert got.shape == (7, 4) and got.dtype == torch.float32
    for i in range(7):
        for j in range(4):
            want = sum(w * naive_cos(p[i], t[j]) for p, t, w in zip(pool, targets, weights))
            assert got[i, j].item() == pytest.approx(want, abs=1e-6)


def test_weighted_sims_reads_half_precision_features_in_float32():
    g = torch.Generator().manual_seed(1)
    pool, targets = torch.randn(5, 32, generator=g).half(), torch.randn(3, 32, generator=g)
    got = weighted_sims([pool], [targets], [1.0])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, normalize(pool.float()) @ normalize(targets).T, atol=1e-6, rtol=0)


def test_a_zero_feature_scores_zero_not_nan():
    pool = torch.zeros(2, 8)
    pool[1, 0] = 1.0
    sims = weighted_sims([pool], [torch.ones(3, 8)], [1.0])
    assert torch.isfinite(sims).all() and (sims[0] == 0).all()
    assert sims[1, 0].item() == pytest.approx(1 / math.sqrt(8))


def test_weighted_sims_needs_one_entry_per_checkpoint():
    with pytest.raises(ValueError, match="one entry per checkpoint"):
        weighted_sims([torch.ones(1, 2)], [torch.ones(1, 2)] * 2, [1.0])
    with pytest.raises(ValueError, match="one entry per checkpoint"):
        weighted_sims([], [], [])


def test_less_score_is_the_max_over_subtasks_of_the_mean_over_their_targets():
    g = torch.Generator().manual_seed(2)
    sims = torch.rand(6, 5, generator=g)
    labels = ["b", "a", "b", "c", "a"]
    ids, names = subtask_index(labels, 5)
    assert names == ["b", "a", "c"] and ids.tolist() == [0, 1, 0, 2, 1]
    got = less_score(sims, ids)
    for i in range(6):
        means = [sum(sims[i, j].item() for j in range(5) if labels[j] == n) / labels.count(n) for n in names]
        assert got[i].item() == pytest.approx(max(means), abs=1e-6)
    torch.testing.assert_close(less_score(sims), sims.mean(1))  # one subtask: the plain mean


def test_subtask_labels_must_match_the_targets():
    with pytest.raises(ValueError, match="3 subtask labels for 4 target examples"):
        subtask_index(["a", "b", "a"], 4)


def test_bfloat16_products_stay_within_the_documented_tolerance():
    g = torch.Generator().manual_seed(3)
    d = 8192
    targets = torch.randn(20, d, generator=g)
    # pool rows from unrelated to nearly parallel to a target, stored as float16 like a feature store
    mix = torch.linspace(0, 1, 64).unsqueeze(1)
    pool = (mix * targets[torch.arange(64) % 20] + (1 - mix) * torch.randn(64, d, generator=g)).half()
    exact = weighted_sims([pool, pool], [targets, targets * 2], [0.25, 0.75])
    fast = weighted_sims([pool, pool], [targets, targets * 2], [0.25, 0.75], precision="bfloat16")
    assert fast.dtype == torch.float32 and exact.abs().max() > 0.9  # the range includes cosines near 1
    assert ((fast - exact).abs() <= exact.abs() * 2**-8 + 1e-4).all()
    with pytest.raises(ValueError, match="Unknown precision 'float16'"):
        weighted_sims([pool], [targets], [1.0], precision="float16")
