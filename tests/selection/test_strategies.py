"""Selectors against naive references (dense, loop-by-loop, straight from the papers) and properties."""

import heapq
import math

import numpy as np
import ot
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_less.selection import strategies as selectors
from hf_less.selection.cosine import CosineSimilarity


def rand_sims(n, t, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, size=(n, t)).astype(np.float32)


# -- naive references ---------------------------------------------------------------------------------


def naive_round_robin(S, k):
    S = np.asarray(S, dtype=np.float64)
    taken, out, t = set(), [], 0
    while len(out) < k:
        best = None
        for j in range(S.shape[0]):  # most similar untaken, smallest index on ties
            if j not in taken and (best is None or S[j, t] > S[best, t]):
                best = j
        taken.add(best)
        out.append(best)
        t = (t + 1) % S.shape[1]
    return out


def naive_rank(values):
    return sorted(range(len(values)), key=lambda j: (-values[j], j))


def naive_knn_uniform_mass(S, alpha, C, L):
    n, t = S.shape
    D = 1.0 - S.astype(np.float64)
    lists = [sorted(range(n), key=lambda j: (D[j, i], j))[:L] for i in range(t)]
    K = 1
    while K < L:
        gap = sum(D[lists[i][K], i] - D[lists[i][k], i] for i in range(t) for k in range(K))
        if alpha / C * gap >= (1 - alpha) * t:
            break
        K += 1
    p = np.zeros(n)
    for i in range(t):
        for j in lists[i][:K]:
            p[j] += 1.0 / (K * t)
    return p


def naive_kde(F, rows, sigma, neighbors):
    X = F[rows].astype(np.float64)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    out = []
    for x in X:
        d2 = sorted(float(((x - y) ** 2).sum()) for y in X)[:neighbors]
        out.append(sum(max(0.0, 1 - v / sigma**2) for v in d2))
    return np.array(out)


def naive_knn_kde_mass(S, rho, alpha, C, L):
    """The water level rising with a heap, one target's neighbourhood at a time (pure Python)."""
    n, t = S.shape
    D = 1.0 - S.astype(np.float64)
    lists = [sorted(range(n), key=lambda j: (D[j, i], j))[:L] for i in range(t)]
    d = [[D[j, i] for j in lists[i]] for i in range(t)]
    w = [[1.0 / rho[j] for j in lists[i]] for i in range(t)]
    accepted, cost, total = [0] * t, [0.0] * t, 0.0
    heap = [(w[i][0], 1, i) for i in range(t)] if L > 1 else []
    heapq.heapify(heap)
    level = None
    while heap:
        lev, nn, i = heapq.heappop(heap)
        level = lev
        c = sum(w[i][k] * (d[i][nn] - d[i][k]) for k in range(nn))
        if alpha / C * (total - cost[i] + c) >= (1 - alpha) * t:
            break
        total += c - cost[i]
        cost[i], accepted[i] = c, nn
        if nn + 1 <= L - 1:
            heapq.heappush(heap, (lev + w[i][nn], nn + 1, i))
    p = np.zeros(n)
    for i in range(t):
        sent = 0.0
        for k in range(accepted[i]):
            p[lists[i][k]] += w[i][k] / (t * level)
            sent += w[i][k] / (t * level)
        p[lists[i][accepted[i]]] += max(1.0 / t - sent, 0.0)
    return p


# -- each selector against its reference ------------------------------------------------------------


def test_round_robin_hand_made():
    # 5 candidates x 2 targets. Target 0 prefers 0 > 1 > 2; target 1 prefers 0 > 3 > 4 > 1.
    S = np.array([[0.9, 0.9],
                  [0.8, 0.1],
                  [0.7, 0.0],
                  [0.2, 0.8],
                  [0.1, 0.5]], dtype=np.float32)
    # t0 takes 0; t1's best (0) is taken, takes 3; t0 takes 1; t1 takes 4; t0 takes 2.
    assert selectors.round_robin(S).tolist() == [0, 3, 1, 4, 2]
    assert selectors.order("round_robin", sims=S, k=3).tolist() == [0, 3, 1]


def test_round_robin_ties_by_index():
    S = np.zeros((4, 2), dtype=np.float32)
    assert selectors.round_robin(S).tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("n,t,neighbors", [(40, 3, None), (40, 7, 1), (33, 5, 2), (12, 12, None)])
def test_round_robin_matches_naive_with_refills(n, t, neighbors):
    S = np.round(rand_sims(n, t, seed=n + t), 1)  # rounding makes many ties
    got = selectors.round_robin(S, neighbors=neighbors, chunk_rows=7)
    assert got.tolist() == naive_round_robin(S, n)


def test_doubly_greedy_and_topk_match_naive():
    S = np.round(rand_sims(50, 4, seed=1), 1)
    assert selectors.doubly_greedy(S, chunk_rows=9).tolist() == naive_rank(S.max(1).tolist())
    ids = [0, 1, 1, 0]
    ref = [max(S[j, [0, 3]].astype(np.float64).mean(), S[j, [1, 2]].astype(np.float64).mean()) for j in range(50)]
    got = selectors.order("topk", sims=S, subtask_ids=ids, chunk_rows=8)
    np.testing.assert_allclose(selectors.aggregate_scores(S, ids), ref, rtol=1e-12)
    assert got.tolist() == naive_rank(ref)
    scores = S.mean(1)
    assert selectors.order("topk", scores).tolist() == naive_rank(scores.astype(np.float64).tolist())


def test_top_neighbors_exact_with_ties_and_exclusion():
    S = np.round(rand_sims(100, 6, seed=3), 1)
    excl = np.zeros(100, dtype=bool)
    excl[::3] = True
    vals, idx = selectors.top_neighbors(S, 17, exclude=excl, chunk_rows=11)
    for i in range(6):
        ref = [j for j in sorted(range(100), key=lambda j: (-S[j, i], j)) if not excl[j]][:17]
        assert idx[i].tolist() == ref
        np.testing.assert_array_equal(vals[i], S[ref, i])


def uot_dense_pot(S, reg=0.01, reg_m=(float("inf"), 1e-4)):
    M = (1.0 - S.astype(np.float64).T) / 2.0  # (T, N): targets are POT's source a
    a = np.full(M.shape[0], 1.0 / M.shape[0])
    b = np.full(M.shape[1], 1.0 / M.shape[1])
    plan = ot.unbalanced.sinkhorn_unbalanced(a, b, M, reg, reg_m, reg_type="kl", numItermax=5000, stopThr=1e-14)
    return plan.sum(0)


def test_uot_agrees_with_pot_float64():
    S = rand_sims(60, 5, seed=4) * 0.3 + 0.2  # cos in [-0.1, 0.5]: kernel exp(-M/reg) stays > 0 in float64
    mass_ref = uot_dense_pot(S)
    # float32, log domain, streamed in chunks of 7 candidates
    log_mass = selectors.uot_mass(S, chunk_rows=7).numpy()
    np.testing.assert_allclose(np.exp(log_mass), mass_ref, rtol=2e-3, atol=1e-30)
    assert selectors.uot(S).tolist() == naive_rank(mass_ref.tolist())
    # float64 agrees to round-off
    log64 = selectors.uot_mass(S, dtype=torch.float64, tol=1e-12).numpy()
    np.testing.assert_allclose(np.exp(log64), mass_ref, rtol=1e-8)


def test_uot_float32_is_safe_where_the_plain_kernel_underflows():
    S = rand_sims(40, 3, seed=5)
    S[0] = -1.0  # cost 1: POT's kernel exp(-M / reg) a b^T = exp(-100) / 120 is 0 in float32
    kernel = torch.exp(-torch.from_numpy((1 - S) / 2) / 0.01) / (40 * 3)
    assert (kernel == 0).any()
    log_mass = selectors.uot_mass(S)
    assert torch.isfinite(log_mass).all()
    mass_ref = uot_dense_pot(S)
    top = np.argsort(-mass_ref)[:10]
    np.testing.assert_allclose(np.exp(log_mass.numpy()[top]), mass_ref[top], rtol=5e-3)


def test_uot_on_tensor_and_balanced_reg_m():
    S = rand_sims(30, 4, seed=6) * 0.2
    a = selectors.uot(torch.from_numpy(S))
    b = selectors.uot(S)
    assert a.tolist() == b.tolist()
    log_mass = selectors.uot_mass(S, reg=0.05, reg_m=0.5, dtype=torch.float64, tol=1e-13)
    ref = uot_dense_pot(S, reg=0.05, reg_m=0.5)
    np.testing.assert_allclose(np.exp(log_mass.numpy()), ref, rtol=1e-7)


@pytest.mark.parametrize("alpha,C,L", [(0.01, 5.0, 30), (0.5, 0.5, 30), (0.9, 0.05, 8), (0.2, 1.0, 1)])
def test_knn_uniform_matches_naive(alpha, C, L):
    S = rand_sims(45, 4, seed=7)
    p, _ = selectors.knn_uniform_mass(S, alpha=alpha, C=C, max_neighbors=L, chunk_rows=10)
    ref = naive_knn_uniform_mass(S, alpha, C, L)
    np.testing.assert_allclose(p, ref, rtol=1e-12)
    assert selectors.knn_uniform(S, alpha=alpha, C=C, max_neighbors=L).tolist() == naive_rank(ref.tolist())


def test_kde_densities_match_naive():
    F = np.random.default_rng(8).normal(size=(30, 5))
    F[5] = F[4] * 2.0  # an exact duplicate direction
    rows = np.arange(30)
    got = selectors.kde_densities(F, rows, sigma=0.9, neighbors=6, chunk_rows=7)
    np.testing.assert_allclose(got, naive_kde(F, rows, 0.9, 6), rtol=1e-5)
    assert got[4] >= 2.0 - 1e-6  # itself and its duplicate
    assert (selectors.kde_densities(F, rows, sigma=0) == 1).all()


@pytest.mark.parametrize("alpha,C,L", [(0.01, 5.0, 20), (0.6, 0.3, 20), (0.9, 0.02, 6)])
def test_knn_kde_matches_naive(alpha, C, L):
    S = rand_sims(40, 5, seed=9)
    F = np.random.default_rng(10).normal(size=(40, 3))
    p = selectors.knn_kde_mass(S, features=F, alpha=alpha, C=C, sigma=1.0, max_neighbors=L, kde_neighbors=8)
    vals, idx = selectors.top_neighbors(S, L)
    uniq = np.unique(idx)
    rho = np.ones(40)
    rho[uniq] = selectors.kde_densities(F, uniq, sigma=1.0, neighbors=8)  # float32 products, checked below
    np.testing.assert_allclose(rho[uniq], naive_kde(F, uniq, 1.0, 8), rtol=1e-5)
    ref = naive_knn_kde_mass(S, rho, alpha, C, L)
    np.testing.assert_allclose(p, ref, rtol=1e-9, atol=1e-15)
    assert abs(p.sum() - 1) < 1e-9


def test_knn_kde_discounts_duplicates():
    # Target near two places: a cluster of exact duplicates, and singles a bit farther away.
    rng = np.random.default_rng(11)
    target = np.array([1.0, 0.0, 0.0])
    dup = np.array([0.98, 0.2, 0.0])
    singles = [np.array([0.95, 0.0, s]) + rng.normal(scale=1e-3, size=3) for s in (0.3, -0.3)]
    singles += [np.array([0.93, -0.2, s]) for s in (0.35, -0.35)]
    F = np.stack([dup] * 6 + singles)
    S = CosineSimilarity(F, target[None])[:]
    dens = selectors.kde_densities(F, np.arange(len(F)), sigma=0.1, neighbors=100)
    assert dens[0] == pytest.approx(6.0, rel=1e-4) and dens[6] == pytest.approx(1.0, rel=1e-3)
    kde = selectors.knn_kde(S, features=F, sigma=0.1, max_neighbors=10, k=3)
    uni = selectors.knn_uniform(S, max_neighbors=10, k=3)
    assert set(uni.tolist()) <= set(range(6))  # plain nearest neighbours: three copies
    assert len(set(kde.tolist()) & set(range(6))) <= 1  # KDE: the copies share one example's mass
    p = selectors.knn_kde_mass(S, features=F, sigma=0.1, max_neighbors=10)
    np.testing.assert_allclose(p[:6], p[0])
    assert p[:6].sum() < 2 * p[6:].max()


def test_order_errors_name_the_fix():
    with pytest.raises(ValueError, match="sims="):
        selectors.order("uot", np.zeros(3))
    with pytest.raises(ValueError, match="available"):
        selectors.order("nope", np.zeros(3))
    with pytest.raises(ValueError, match="accepts"):
        selectors.order("round_robin", sims=np.zeros((3, 2)), reg=0.1)
    with pytest.raises(ValueError, match="NaN"):
        selectors.order("doubly_greedy", sims=np.full((3, 2), np.nan))
    with pytest.raises(ValueError, match="scores= or sims="):
        selectors.order("random")
    assert selectors.order("topk", [0.1, 0.3, 0.2]).tolist() == [1, 2, 0]  # the old positional call
    assert selectors.order("random", [0, 0, 0], 1).tolist() == selectors.random(3, 1).tolist()


def test_sims_as_list_memmap_and_lazy(tmp_path):
    rng = np.random.default_rng(12)
    P, T = rng.normal(size=(64, 8)), rng.normal(size=(5, 8))
    lazy = CosineSimilarity(P, T, chunk_rows=9)
    dense = lazy[:]
    mm = np.lib.format.open_memmap(tmp_path / "s.npy", mode="w+", dtype=np.float32, shape=dense.shape)
    mm[:] = dense
    mm.flush()
    for strategy in selectors.NEEDS_SIMS:
        ref = selectors.order(strategy, sims=dense)
        assert selectors.order(strategy, sims=lazy).tolist() == ref.tolist()
        assert selectors.order(strategy, sims=np.load(tmp_path / "s.npy", mmap_mode="r")).tolist() == ref.tolist()
        assert selectors.order(strategy, sims=dense.tolist()).tolist() == ref.tolist()


# -- properties -------------------------------------------------------------------------------------------

sims_arrays = st.tuples(st.integers(1, 30), st.integers(1, 6), st.integers(0, 2**16), st.booleans()).map(
    lambda a: np.round(rand_sims(a[0], a[1], a[2]), 1 if a[3] else 6))


@settings(max_examples=25, deadline=None)
@given(S=sims_arrays, strategy=st.sampled_from(selectors.STRATEGIES), seed=st.integers(0, 5),
       frac=st.floats(0.01, 1.0))
def test_orderings_are_permutations_budget_and_determinism(S, strategy, seed, frac):
    n = S.shape[0]
    full = selectors.order(strategy, S.mean(1), seed, sims=S)
    assert full.dtype == np.int64 and sorted(full.tolist()) == list(range(n))
    k = selectors.resolve_budget(frac, n)
    pre = selectors.order(strategy, S.mean(1), seed, sims=S, k=k)
    assert len(pre) == k == len(set(pre.tolist()))
    assert pre.tolist() == full[:k].tolist()  # a budget keeps the first k
    again = selectors.order(strategy, S.mean(1), seed, sims=S)
    assert again.tolist() == full.tolist()


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), strategy=st.sampled_from(selectors.NEEDS_SIMS + ("topk",)))
def test_clustered_pool_nearest_cluster_first(seed, strategy):
    rng = np.random.default_rng(seed)
    centres = np.linalg.qr(rng.normal(size=(16, 3)))[0].T  # 3 orthonormal directions
    size = 20
    pool = np.concatenate([c + 0.05 * rng.normal(size=(size, 16)) for c in centres])
    targets = centres[1] + 0.05 * rng.normal(size=(4, 16))
    S = CosineSimilarity(pool, targets)[:]
    params = {"max_neighbors": size} if strategy.startswith("knn") else {}
    first = selectors.order(strategy, sims=S, k=size, **params)
    assert set(first.tolist()) == set(range(size, 2 * size))


def test_random_seeded():
    assert selectors.random(10, 3).tolist() == selectors.random(10, 3).tolist()
    assert selectors.random(10, 3).tolist() != selectors.random(10, 4).tolist()


def test_resolve_budget_unchanged():
    assert selectors.resolve_budget(0.05, 1000) == 50
    assert selectors.resolve_budget(7, 10) == 7
    with pytest.raises(ValueError):
        selectors.resolve_budget(11, 10)
    assert math.isclose(selectors.resolve_budget(1.0, 3), 3)


# One budget convention (issue 15, item 7): an int is a count, a float in (0, 1] a fraction, text by its spelling.
@pytest.mark.parametrize("budget,pool,k", [
    (1, 10, 1), (1.0, 10, 10), ("1", 10, 1), ("1.0", 10, 10), (" 7 ", 10, 7), (10, 10, 10),
    (np.int64(3), 10, 3), (np.float64(0.5), 10, 5), ("0.05", 100, 5), ("5e-2", 100, 5), (0.3, 10, 3),
    (0.001, 100, 1),  # round(0.1) = 0 rows: a fraction keeps at least one example
    ("0.001", 100, 1),
])
def test_budget_convention(budget, pool, k):
    assert selectors.resolve_budget(budget, pool) == k
    assert isinstance(selectors.resolve_budget(budget, pool), int)


@pytest.mark.parametrize("budget,error,message", [
    (0, ValueError, r"budget=0 must be a count >= 1"),
    (-3, ValueError, r"budget=-3 must be a count >= 1"),
    ("0", ValueError, r"budget=0 must be a count >= 1"),
    (11, ValueError, r"budget=11 must be between 1 and the pool size 10"),
    ("11", ValueError, r"budget=11 must be between 1 and the pool size 10"),
    (0.0, ValueError, r"budget=0.0 as a fraction must be in \(0, 1\] \(1.0 is the whole pool\). Give an int"),
    (-0.5, ValueError, r"budget=-0.5 as a fraction must be in \(0, 1\]"),
    (1.5, ValueError, r"budget=1.5 as a fraction must be in \(0, 1\] .*Give an int for a count"),
    (300.0, ValueError, r"budget=300.0 as a fraction .* For a count of 300 examples give the int 300\."),
    ("2.0", ValueError, r"budget=2.0 as a fraction .* give the int 2\."),
    (float("nan"), ValueError, r"budget=nan as a fraction"),
    ("five", ValueError, r"budget='five' is not a number"),
    ("", ValueError, r"budget='' is not a number"),
    (True, TypeError, r"budget must be an int count or a float fraction, got True"),
    (None, TypeError, r"budget must be an int count or a float fraction, got None"),
])
def test_budget_convention_errors(budget, error, message):
    with pytest.raises(error, match=message):
        selectors.resolve_budget(budget, 10)
    if "pool size" not in message:  # the same check without a pool, as the config makes it
        with pytest.raises(error, match=message):
            selectors.parse_budget(budget)


def test_budget_argument_type_keeps_count_and_fraction_apart():
    import argparse

    parser = argparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--budget", type=selectors.Budget, default=0.05)
    parsed = {text: parser.parse_args(["--budget", text]).budget for text in ("1", "1.0", "0.05", "500")}
    assert parsed == {"1": 1, "1.0": 1.0, "0.05": 0.05, "500": 500}
    assert [type(v) for v in parsed.values()] == [int, float, float, int]
    with pytest.raises(argparse.ArgumentError, match=r"budget=1.5 as a fraction must be in \(0, 1\]"):
        parser.parse_args(["--budget", "1.5"])
