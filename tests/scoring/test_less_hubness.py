"""LessSelector(hub_correction=...) against dense computations on the store's own features."""

import numpy as np
import pytest
import torch

from tests.scoring.test_less import make_selector, pool, targets, warmup  # noqa: F401 - fixtures
from tests.testing_utils import toy_tasks


def store_features(selector, store):
    """Per checkpoint the store's (N, d) features as float64, and the rows that have features."""
    feats = [torch.from_numpy(store.features(c.step).read(0, store.num_rows).astype(np.float64))
             for c in selector.checkpoints]
    keep = np.ones(store.num_rows, dtype=bool)
    keep[store.skipped_rows()] = False
    return feats, torch.from_numpy(keep)


def unit(x):
    return x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(1e-12)


def dense_sims(selector, store, components=0, center=True):
    """sum_i w_i cos(p_i', t_i): p' = unit(p) - mean, minus its top-component part (SVD), written densely
    (``center=False``: p' = p, LESS's own similarities)."""
    feats, keep = store_features(selector, store)
    out = 0
    for f, t, c in zip(feats, selector.target_features, selector.checkpoints):
        u = unit(f)
        x = u - u[keep].mean(0) if center else u
        if components:
            _, _, vh = torch.linalg.svd(x[keep], full_matrices=False)
            top = vh[:components].T
            x = x - x @ top @ top.T
        out = out + c.weight * unit(x) @ unit(t.double()).T
    return out.numpy()


@pytest.fixture(scope="module")
def store(tokenizer, warmup, pool, targets, tmp_path_factory):  # noqa: F811
    selector = make_selector(tokenizer, warmup, targets, proj_dim=128)
    return selector.featurize(pool, tmp_path_factory.mktemp("hub") / "store", shard_rows=5)


@pytest.mark.parametrize("correction,components", [("center", 0), ("pca", 2)])
def test_store_scores_equal_dense_centered_or_pca_removed_cosines(tokenizer, warmup, targets, store,  # noqa: F811
                                                                  correction, components):
    selector = make_selector(tokenizer, warmup, targets, proj_dim=128, hub_correction=correction,
                             hub_pca_components=max(components, 1), hub_pca_method="covariance")
    scores, sims = selector.score_store(store, chunk_rows=4)  # chunks cross the 5-row shards
    want = dense_sims(selector, store, components)
    np.testing.assert_allclose(sims, want, atol=2e-4)
    np.testing.assert_allclose(scores, want.mean(1), atol=2e-4)
    plain = make_selector(tokenizer, warmup, targets, proj_dim=128).score_store(store)[1]
    assert np.abs(plain - sims).max() > 1e-2  # the correction changes the scores


def test_map_needs_the_pool_statistics_and_then_equals_the_store(tokenizer, warmup, pool, targets, store):  # noqa: F811
    selector = make_selector(tokenizer, warmup, targets, proj_dim=128, hub_correction="center")
    with pytest.raises(ValueError, match="needs the whole pool's mean feature.*fit_hub_statistics"):
        selector(pool[:3])
    before = selector.fingerprint
    selector.fit_hub_statistics(store)
    assert selector.fingerprint != before  # the statistics are part of the identity
    scored = pool.map(selector, batched=True, batch_size=4)
    _, sims = selector.score_store(store)
    np.testing.assert_allclose(np.asarray(scored["less_sims"]), sims, atol=3e-3)  # float16 store vs exact


def test_csls_subtracts_the_mean_of_the_k_nearest_reference_targets(tokenizer, warmup, targets, store):  # noqa: F811
    plain = make_selector(tokenizer, warmup, targets, proj_dim=128).score_store(store)[1]
    got = make_selector(tokenizer, warmup, targets, proj_dim=128, hub_correction="csls",
                        hub_csls_k=2).score_store(store)[1]
    np.testing.assert_allclose(got, plain - np.sort(plain, 1)[:, ::-1][:, :2].mean(1, keepdims=True), atol=1e-5)
    reference = [r for r in toy_tasks(4, seed=5) if r["task"] != "math"]
    ref_sims = make_selector(tokenizer, warmup, reference, proj_dim=128).score_store(store)[1]
    got = make_selector(tokenizer, warmup, targets, proj_dim=128, hub_correction="csls", hub_csls_k=3,
                        hub_csls_reference=reference).score_store(store)[1]
    np.testing.assert_allclose(got, plain - np.sort(ref_sims, 1)[:, ::-1][:, :3].mean(1, keepdims=True), atol=1e-5)


def test_the_correction_is_part_of_the_fingerprint(tokenizer, warmup, targets):  # noqa: F811
    prints = {make_selector(tokenizer, warmup, targets, proj_dim=64, **kw).fingerprint
              for kw in ({}, {"hub_correction": "csls", "hub_csls_k": 1}, {"hub_correction": "csls", "hub_csls_k": 2})}
    assert len(prints) == 3
    again = make_selector(tokenizer, warmup, targets, proj_dim=64, hub_correction="csls", hub_csls_k=2)
    assert again.fingerprint in prints


def test_bad_hub_settings_name_the_fix(tokenizer, warmup, targets):  # noqa: F811
    with pytest.raises(ValueError, match="hub_correction='whiten' is not one of"):
        make_selector(tokenizer, warmup, targets, proj_dim=64, hub_correction="whiten")
    with pytest.raises(ValueError, match=f"hub_csls_k=99 is more than the {len(targets)} CSLS reference"):
        make_selector(tokenizer, warmup, targets, proj_dim=64, hub_correction="csls", hub_csls_k=99)
    with pytest.raises(ValueError, match="hub_csls_reference is the reference set of hub_correction='csls'"):
        make_selector(tokenizer, warmup, targets, proj_dim=64, hub_correction="center", hub_csls_reference=targets)


def test_statistics_come_from_the_captured_pool_without_featurizing(
        tokenizer, pool, targets, tmp_path_factory, monkeypatch):  # noqa: F811 - pytest fixtures
    from hf_less import LessCallback
    from hf_less.gradients.store import FeatureStore
    from tests.testing_utils import run_warmup

    cb = LessCallback(pool=pool, targets=targets, proj_dim=64, batch_size=3, shard_rows=5, show_progress=False)
    warm = run_warmup(tmp_path_factory.mktemp("captured"), tokenizer, cb)
    selector = make_selector(tokenizer, warm, targets, proj_dim=64, hub_correction="pca", hub_pca_components=1)
    assert selector.hub.statistics is not None and selector.hub.statistics[0].rows == len(pool)
    calls = []
    featurize = type(selector.featurizer).__call__
    monkeypatch.setattr(type(selector.featurizer), "__call__", lambda *a, **k: calls.append(1) or featurize(*a, **k))
    sims = np.asarray(pool.map(selector, batched=True, batch_size=4)["less_sims"])
    assert not calls  # every pool row read from the capture
    want = 0
    for c, t in zip(selector.checkpoints, selector.target_features):
        store = FeatureStore(c.captured("pool"))
        f = torch.from_numpy(store.features(c.step).read(0, store.num_rows).astype(np.float64))
        x = unit(f) - unit(f).mean(0)
        _, _, vh = torch.linalg.svd(x, full_matrices=False)
        x = x - x @ vh[:1].T @ vh[:1]
        want = want + c.weight * unit(x) @ unit(t.double()).T
    np.testing.assert_allclose(sims, want.numpy(), atol=2e-4)


@pytest.mark.parametrize("fmt", ["int8", "1bit"])
def test_corrections_of_a_quantized_store_equal_dense_ones_of_its_decoded_rows(tokenizer, warmup, pool, targets,  # noqa: F811
                                                                               tmp_path, fmt):
    store = make_selector(tokenizer, warmup, targets, proj_dim=128).featurize(pool, tmp_path / fmt, shard_rows=5,
                                                                              dtype=fmt)
    centered = make_selector(tokenizer, warmup, targets, proj_dim=128, hub_correction="center")
    np.testing.assert_allclose(centered.score_store(store, chunk_rows=4)[1], dense_sims(centered, store), atol=2e-4)
    # csls on the integer path (int8 codes times the targets and the reference targets): the same as on decoded rows
    plain = dense_sims(centered, store, center=False)
    got = make_selector(tokenizer, warmup, targets, proj_dim=128, hub_correction="csls",
                        hub_csls_k=2).score_store(store, chunk_rows=4)[1]
    keep = ~np.isin(np.arange(store.num_rows), store.skipped_rows())
    want = plain - np.sort(plain, 1)[:, ::-1][:, :2].mean(1, keepdims=True)
    np.testing.assert_allclose(got[keep], want[keep], atol=2e-4)
