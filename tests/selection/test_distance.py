"""Subset-to-target distances against naive loops and POT on the dense problem."""

import numpy as np
import ot
import pytest

from hf_less.selection import distance

from hf_less.selection import strategies as selectors
from hf_less.selection.cosine import CosineSimilarity


def features(seed=0, n=40, t=6, d=8):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)), rng.normal(size=(t, d))


def naive_cos(x, y):
    return float(x @ y / np.linalg.norm(x) / np.linalg.norm(y))


def test_coverage_matches_naive_on_features_and_sims():
    P, T = features()
    sel = [3, 17, 5, 30]
    ref = np.mean([min(1 - naive_cos(P[j], q) for j in sel) for q in T])
    assert distance.coverage_distance(sel, pool=P, targets=T) == pytest.approx(ref, abs=1e-6)
    S = CosineSimilarity(P, T)[:]
    assert distance.coverage_distance(sel, sims=S) == pytest.approx(ref, abs=1e-6)
    assert distance.coverage_distance(sel, sims=S.tolist()) == pytest.approx(ref, abs=1e-6)


def test_ot_matches_pot_dense():
    P, T = features(1)
    sel = [0, 2, 4, 8, 16, 32]
    M = np.array([[(1 - naive_cos(P[j], q)) / 2 for q in T] for j in sel])
    ref = ot.emd2(np.full(6, 1 / 6), np.full(6, 1 / 6), M)
    assert distance.ot_distance(sel, pool=P, targets=T) == pytest.approx(ref, abs=1e-6)
    approx = distance.ot_distance(sel, pool=P, targets=T, method="sinkhorn", reg=0.02)
    assert approx == pytest.approx(ref, abs=1e-2)


def test_selection_containing_the_targets_has_zero_distance():
    P, T = features(2)
    pool = np.concatenate([P, T])
    sel = np.arange(len(P), len(pool))
    d = distance.subset_distances(sel, pool=pool, targets=T)
    assert d["coverage"] == pytest.approx(0, abs=1e-6) and d["ot"] == pytest.approx(0, abs=1e-6)
    assert d["size"] == len(T)


def test_selected_by_round_robin_is_closer_than_random():
    rng = np.random.default_rng(3)
    centres = np.linalg.qr(rng.normal(size=(16, 4)))[0].T
    pool = np.concatenate([c + 0.1 * rng.normal(size=(50, 16)) for c in centres])
    T = centres[2] + 0.1 * rng.normal(size=(5, 16))
    S = CosineSimilarity(pool, T)[:]
    rr = selectors.order("round_robin", sims=S, k=20)
    rnd = selectors.order("random", sims=S, seed=0, k=20)
    for f in (distance.coverage_distance, distance.ot_distance):
        assert f(rr, sims=S) < f(rnd, sims=S)


def test_errors_name_the_fix():
    P, T = features()
    with pytest.raises(ValueError, match="sims="):
        distance.coverage_distance([1])
    with pytest.raises(ValueError, match="duplicate"):
        distance.ot_distance([1, 1], pool=P, targets=T)
    with pytest.raises(ValueError, match="empty"):
        distance.ot_distance([], pool=P, targets=T)
    with pytest.raises(ValueError, match="lie in"):
        distance.ot_distance([400], pool=P, targets=T)


def test_selection_overlap_hand_computed():
    # 6 pool rows, 3 targets, k = 2. Top 2 per column: t0 -> {0, 1}; t1 -> {1, 2}; t2 -> {4, 5}
    # (rows 4 and 5 tie at 5.0 above row 0's 4.0). Pairs: t0/t1 share {1} = 1/2, t0/t2 share none,
    # t1/t2 share none: mean (0.5 + 0 + 0) / 3 = 1/6.
    scores = np.array([[9.0, 1.0, 4.0],
                       [8.0, 9.0, 3.0],
                       [1.0, 8.0, 2.0],
                       [0.0, 0.0, 1.0],
                       [2.0, 2.0, 5.0],
                       [3.0, 3.0, 5.0]])
    assert distance.selection_overlap(scores, 2) == pytest.approx(1 / 6)
    torch = pytest.importorskip("torch")
    assert distance.selection_overlap(torch.tensor(scores), 2) == pytest.approx(1 / 6)
    # Identical columns overlap fully; k = N always overlaps fully.
    same = np.repeat(scores[:, :1], 3, axis=1)
    assert distance.selection_overlap(same, 3) == 1.0
    assert distance.selection_overlap(scores, 6) == 1.0
    # Ties go to the lower row index: an all-equal column selects rows {0, 1}.
    assert distance.selection_overlap(np.array([[1.0, 5.0], [1.0, 4.0], [1.0, 0.0]]), 2) == 1.0
    # A non-finite score is never selected.
    assert distance.selection_overlap(np.array([[np.nan, 0.0], [1.0, 1.0], [0.5, 2.0]]), 2) == 1.0


def test_selection_overlap_rejects_bad_input():
    with pytest.raises(ValueError, match="two targets"):
        distance.selection_overlap(np.zeros((4, 1)), 2)
    with pytest.raises(ValueError, match="k must"):
        distance.selection_overlap(np.zeros((4, 2)), 5)
    with pytest.raises(ValueError, match="finite"):
        distance.selection_overlap(np.array([[np.nan, 1.0], [np.nan, 0.0], [1.0, 2.0]]), 2)
