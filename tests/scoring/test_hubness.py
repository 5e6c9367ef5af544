"""Hubness remedies and statistics (hf_less.scoring.hubness) against dense computations written here."""

import numpy as np
import pytest
import torch

from hf_less.scoring import hubness
from hf_less.scoring.hubness import HubCorrection, PoolStatistics
from hf_less.scoring.similarity import weighted_sims


def planted(n=60, d=24, seed=0, directions=(6.0, 3.0), noise=0.3, shared=2.0):
    """Pool rows: a shared direction (a hub's cause) + strong planted directions + noise; some all-zero rows."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d, len(directions) + 1, generator=g, dtype=torch.float64))[0]
    coef = torch.randn(n, len(directions), generator=g, dtype=torch.float64) * torch.tensor(directions,
                                                                                               dtype=torch.float64)
    x = shared * basis[:, -1] + coef @ basis[:, :-1].T + noise * torch.randn(n, d, generator=g, dtype=torch.float64)
    x[[3, 17]] = 0  # skipped examples: no features
    return x.float()


def dense_unit_nonzero(x):
    keep = x.abs().amax(1) > 0
    u = x.double()[keep]
    return u / torch.linalg.vector_norm(u, dim=1, keepdim=True)


def dense_center_cos(pool, targets):
    """cos(unit(p) - mean of the unit nonzero pool rows, t), written densely."""
    mu = dense_unit_nonzero(pool).mean(0)
    p = pool.double() / torch.linalg.vector_norm(pool.double(), dim=1, keepdim=True).clamp_min(1e-12) - mu
    p = p / torch.linalg.vector_norm(p, dim=1, keepdim=True)
    t = targets.double() / torch.linalg.vector_norm(targets.double(), dim=1, keepdim=True)
    return p @ t.T


def dense_abtt_cos(pool, targets, c):
    """All-but-the-top: centre, remove the top c right singular vectors of the centred unit rows, cosine."""
    unit = dense_unit_nonzero(pool)
    mu = unit.mean(0)
    _, _, vh = torch.linalg.svd(unit - mu, full_matrices=False)
    u = vh[:c].T
    p = pool.double() / torch.linalg.vector_norm(pool.double(), dim=1, keepdim=True).clamp_min(1e-12) - mu
    p = p - p @ u @ u.T
    p = p / torch.linalg.vector_norm(p, dim=1, keepdim=True)
    t = targets.double() / torch.linalg.vector_norm(targets.double(), dim=1, keepdim=True)
    return p @ t.T, u


def chunks(x, rows):
    return [x[i:i + rows] for i in range(0, len(x), rows)]


def test_centered_cosine_equals_dense():
    pool, targets = planted(), torch.randn(5, 24, generator=torch.Generator().manual_seed(1))
    stats = hubness.pool_statistics(chunks(pool, 7))
    assert stats.rows == 58 and stats.components.shape == (24, 0)
    got = weighted_sims([hubness.centered(pool, stats)], [targets], [1.0])
    keep = pool.abs().amax(1) > 0
    torch.testing.assert_close(got[keep].double(), dense_center_cos(pool, targets)[keep], atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["covariance", "randomized"])
def test_pca_removed_cosine_equals_dense(method):
    pool, targets = planted(), torch.randn(5, 24, generator=torch.Generator().manual_seed(1))
    want, u = dense_abtt_cos(pool, targets, 2)
    # randomized: a sketch of 2 + 22 = 24 = d columns sees the whole space, so it is exact here
    stats = hubness.pool_statistics(chunks(pool, 9), 2, method=method, oversample=22)
    proj = stats.components.double() @ stats.components.double().T
    torch.testing.assert_close(proj, u @ u.T, atol=1e-4, rtol=0)
    got = weighted_sims([hubness.centered(pool, stats)], [targets], [1.0])
    keep = pool.abs().amax(1) > 0
    torch.testing.assert_close(got[keep].double(), want[keep], atol=1e-4, rtol=0)


def test_randomized_finds_standing_out_components_with_a_small_sketch():
    pool = planted(n=400, d=64, directions=(8.0, 5.0), noise=0.2)
    _, u = dense_abtt_cos(pool, torch.ones(1, 64), 2)
    stats = hubness.pool_statistics(chunks(pool, 50), 2, method="randomized", oversample=10)
    err = torch.linalg.matrix_norm(stats.components.double() @ stats.components.double().T - u @ u.T, ord=2)
    assert err < 0.05
    exact = hubness.pool_statistics(chunks(pool, 50), 2, method="covariance")
    torch.testing.assert_close(stats.variances, exact.variances, rtol=0.05, atol=0)


def test_statistics_do_not_depend_on_the_chunk_size_or_zero_rows():
    pool = planted()
    ref = hubness.pool_statistics([pool], 2, method="covariance")
    for rows in (1, 5, 13):
        s = hubness.pool_statistics(chunks(pool, rows), 2, method="covariance")
        torch.testing.assert_close(s.mean, ref.mean, atol=1e-6, rtol=0)
        torch.testing.assert_close(s.components @ s.components.T, ref.components @ ref.components.T, atol=1e-5, rtol=0)
        assert s.rows == ref.rows
    more = torch.cat([pool, torch.zeros(4, 24)])
    torch.testing.assert_close(hubness.pool_statistics([more]).mean, ref.mean, atol=1e-6, rtol=0)
    scaled = pool * torch.linspace(0.1, 10, len(pool)).unsqueeze(1)  # rows are taken at unit norm
    torch.testing.assert_close(hubness.pool_statistics([scaled]).mean, ref.mean, atol=1e-6, rtol=0)
    x = pool.numpy()  # numpy chunks and a reader with skipped rows give the same
    via = hubness.pool_statistics(hubness.chunks_of(lambda a, b: x[a:b], len(x), 8, skipped=[0, 1]))
    torch.testing.assert_close(via.mean, hubness.pool_statistics([pool[2:]]).mean, atol=1e-6, rtol=0)


def test_statistics_refuse_bad_inputs():
    with pytest.raises(ValueError, match="no nonzero feature rows"):
        hubness.pool_statistics([torch.zeros(3, 4)])
    with pytest.raises(ValueError, match="no nonzero feature rows"):
        hubness.pool_statistics([])
    with pytest.raises(ValueError, match="more than the feature dimension d = 4"):
        hubness.pool_statistics([torch.ones(3, 4)], 5)
    with pytest.raises(ValueError, match="every chunk must be the same checkpoint"):
        hubness.pool_statistics([torch.ones(3, 4), torch.ones(3, 5)])
    with pytest.raises(ValueError, match="method='svd' is not one of"):
        hubness.pool_statistics([torch.ones(3, 4)], method="svd")
    stats = hubness.pool_statistics([torch.eye(4)])
    with pytest.raises(ValueError, match="another dimension"):
        hubness.centered(torch.ones(2, 5), stats)


def test_a_zero_row_and_a_row_equal_to_the_mean_score_zero_not_nan():
    stats = PoolStatistics(torch.tensor([1.0, 0.0]), torch.zeros(2, 0), torch.zeros(0), 1)
    x = hubness.centered(torch.tensor([[2.0, 0.0], [0.0, 0.0]]), stats)
    s = weighted_sims([x], [torch.tensor([[1.0, 1.0]])], [1.0])
    assert torch.isfinite(s).all() and s[0, 0] == 0


def test_csls_equals_a_loop():
    rng = np.random.default_rng(0)
    sims = torch.from_numpy(rng.uniform(-1, 1, (7, 5)).astype(np.float32))
    ref = torch.from_numpy(rng.uniform(-1, 1, (7, 9)).astype(np.float32))
    for reference, k in ((None, 2), (ref, 3), (ref, 9), (None, 5)):
        r = (sims if reference is None else reference).numpy()
        want = np.array([[sims[i, t].item() - np.sort(r[i])[::-1][:k].mean() for t in range(5)] for i in range(7)])
        np.testing.assert_allclose(hubness.csls(sims, k, reference).numpy(), want, atol=1e-6)
    # one target: k = 1 takes the row's own similarity away from itself
    assert torch.equal(hubness.csls(sims[:, :1], 1), torch.zeros(7, 1))


def test_csls_refuses_k_beyond_the_reference():
    sims = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="hub_csls_k=5 must be between 1 and the 4 reference target"):
        hubness.csls(sims, 5)
    with pytest.raises(ValueError, match="hub_csls_k=0"):
        hubness.csls(sims, 0)
    with pytest.raises(ValueError, match="reference set is empty"):
        hubness.csls(sims, 1, torch.zeros(3, 0))
    with pytest.raises(ValueError, match="same rows"):
        hubness.csls(sims, 1, torch.zeros(2, 4))


def naive_k_occurrence(sims, k):
    n, t = sims.shape
    counts = np.zeros(n, dtype=np.int64)
    for j in range(t):
        ranked = sorted(range(n), key=lambda i: (-sims[i, j], i))
        for i in ranked[:k]:
            counts[i] += 1
    return counts


def test_k_occurrence_equals_a_loop_in_any_chunking():
    rng = np.random.default_rng(1)
    sims = rng.integers(0, 6, (30, 4)).astype(np.float32)  # many ties: they go to the lower row
    for k in (1, 3, 30):
        want = naive_k_occurrence(sims, k)
        np.testing.assert_array_equal(hubness.k_occurrence(sims, k), want)
        np.testing.assert_array_equal(hubness.k_occurrence(torch.from_numpy(sims), k), want)
        for rows in (1, 4, 7):
            np.testing.assert_array_equal(hubness.k_occurrence(chunks(sims, rows), k), want)
        assert hubness.k_occurrence(sims, k).sum() == 4 * k
    with pytest.raises(ValueError, match="k=31 is more than the 30 pool rows"):
        hubness.k_occurrence(sims, 31)
    with pytest.raises(ValueError, match="k=31 is more than the 30 pool rows"):
        hubness.k_occurrence(chunks(sims, 7), 31)
    with pytest.raises(ValueError, match="k=0"):
        hubness.k_occurrence(sims, 0)
    with pytest.raises(ValueError, match="pool is empty"):
        hubness.k_occurrence([], 1)


def test_a_hub_gives_a_skewed_k_occurrence():
    rng = np.random.default_rng(2)
    sims = rng.uniform(0, 0.5, (200, 40))
    flat = hubness.skewness(hubness.k_occurrence(sims, 5))
    sims[7] = 0.9  # near every target
    sims[8] = 0.8
    hubbed = hubness.k_occurrence(sims, 5)
    assert hubbed[7] == hubbed[8] == 40
    assert hubness.skewness(hubbed) > flat + 3


def test_skewness_equals_the_moment_formula():
    x = np.array([0, 0, 0, 1, 1, 2, 9], dtype=float)
    m = x.mean()
    want = ((x - m) ** 3).mean() / ((x - m) ** 2).mean() ** 1.5
    assert hubness.skewness(x) == pytest.approx(want)
    assert hubness.skewness([1, 2, 3]) == pytest.approx(0.0)
    assert np.isnan(hubness.skewness([4, 4, 4]))
    with pytest.raises(ValueError, match="no values"):
        hubness.skewness([])


def test_top_group_share_counts_the_most_selected_groups():
    groups = ["a", "a", "b", "c", "d", "e", "f", "g", "a", "b"]
    assert hubness.top_groups(groups, [0, 1, 8, 2, 9, 3], top=2) == [("a", 3), ("b", 2)]
    assert hubness.top_group_share(groups, [0, 1, 8, 2, 9, 3], top=2) == pytest.approx(5 / 6)
    # six groups, one row each: the five most selected take 5 of 6
    assert hubness.top_group_share(groups, [0, 2, 3, 4, 5, 6]) == pytest.approx(5 / 6)
    with pytest.raises(ValueError, match="selection is empty"):
        hubness.top_group_share(groups, [])


def test_hub_correction_validates_and_names_itself():
    with pytest.raises(ValueError, match="hub_correction='whiten' is not one of None, 'center', 'pca', 'csls'"):
        HubCorrection("whiten")
    with pytest.raises(ValueError, match="hub_pca_components=0 must be >= 1"):
        HubCorrection("pca", pca_components=0)
    with pytest.raises(ValueError, match="hub_csls_k=0"):
        HubCorrection("csls", csls_k=0)
    assert HubCorrection().identity() is None
    assert HubCorrection("csls", csls_k=3).identity() == {"kind": "csls", "k": 3}
    pca = HubCorrection("pca", pca_components=2)
    with pytest.raises(RuntimeError, match="needs the pool's statistics first"):
        pca.pool([torch.ones(2, 4)])
    pool = planted()
    pca.fit([chunks(pool, 10)])
    before = pca.identity()
    assert before["kind"] == "pca" and before["components"] == 2 and len(before["statistics"]) == 1
    pca.fit([chunks(pool[:40], 10)])
    assert pca.identity() != before  # other pool statistics, another identity


def test_randomized_components_of_identical_rows_have_zero_variance():
    stats = hubness.pool_statistics([torch.ones(6, 8)], 2, method="randomized", oversample=3)
    assert stats.components.shape == (8, 2) and torch.isfinite(stats.components).all()
    torch.testing.assert_close(stats.variances, torch.zeros(2), atol=1e-6, rtol=0)  # float32 products per chunk
    x = hubness.centered(torch.ones(3, 8), stats)
    torch.testing.assert_close(x, torch.zeros(3, 8), atol=1e-6, rtol=0)
