"""LessCallback(pool=..., targets=...): features captured during the warmup, reused by LessSelector."""

import numpy as np
import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file

from hf_less import LessCallback, LessSelector
from hf_less.gradients.state import find_checkpoints
from hf_less.gradients.store import FeatureStore, IncompatibleFeaturesError

from tests.testing_utils import make_model, run_warmup, toy_tasks

POOL = toy_tasks(6, seed=2)
TARGETS = [r for r in toy_tasks(4, seed=3) if r["task"] == "math"]


@pytest.fixture(scope="module")
def plain(tmp_path_factory, tokenizer):
    return run_warmup(tmp_path_factory.mktemp("plain"), tokenizer, LessCallback())


@pytest.fixture(scope="module")
def captured(tmp_path_factory, tokenizer):
    """Captured with a projection (float16 store, the default)."""
    cb = LessCallback(pool=Dataset.from_list(POOL), targets=Dataset.from_list(TARGETS), proj_dim=64,
                      batch_size=3, shard_rows=5, show_progress=False)
    return run_warmup(tmp_path_factory.mktemp("captured"), tokenizer, cb)


@pytest.fixture(scope="module")
def captured_exact(tmp_path_factory, tokenizer):
    cb = LessCallback(pool=POOL, targets=TARGETS, proj_dim=None, dtype="float32", show_progress=False)
    return run_warmup(tmp_path_factory.mktemp("exact"), tokenizer, cb)


def selector(tokenizer, warmup, **kw):
    kw.setdefault("show_progress", False)
    return LessSelector(make_model(len(tokenizer)), warmup, Dataset.from_list(TARGETS), tokenizer=tokenizer, **kw)


def count_forwards(model):
    calls = []
    handle = model.get_base_model().register_forward_pre_hook(lambda *a: calls.append(1))
    return calls, handle


def test_capture_leaves_training_bit_identical(plain, captured):
    a, b = find_checkpoints(plain), find_checkpoints(captured)
    assert [c.step for c in a] == [c.step for c in b] and len(a) == 2
    for ca, cb in zip(a, b):
        wa, wb = load_file(ca.path / "adapter_model.safetensors"), load_file(cb.path / "adapter_model.safetensors")
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.equal(wa[k], wb[k]), k
        ma, mb = ca.moments(), cb.moments()
        for k in ma.exp_avg:
            assert torch.equal(ma.exp_avg[k], mb.exp_avg[k]) and torch.equal(ma.exp_avg_sq[k], mb.exp_avg_sq[k])
        assert ca.mean_lr == cb.mean_lr


def test_capture_writes_complete_keyed_stores(captured):
    for c in find_checkpoints(captured):
        for which, n in (("pool", len(POOL)), ("targets", len(TARGETS))):
            store = FeatureStore(c.captured(which))
            assert store.complete and store.num_rows == n and store.keyed
            assert store.meta["checkpoints"] == [{"step": c.step, "digest": c.digest}]
            store.verify()
        # shard_rows=5 cut the pool of 12 into 3 shards
        assert len(FeatureStore(c.captured("pool")).manifest["shards"]) == 3


@pytest.mark.parametrize("which,kw,tol", [("captured", {"proj_dim": 64, "batch_size": 3}, 2e-3),
                                          ("captured_exact", {"proj_dim": None}, 1e-5)])
def test_captured_scores_equal_post_hoc_scores(request, tokenizer, plain, which, kw, tol):
    warm = request.getfixturevalue(which)
    pool = Dataset.from_list(POOL)
    posthoc = pool.map(selector(tokenizer, plain, **kw), batched=True, batch_size=5)
    reuse = selector(tokenizer, warm, **kw)
    calls, handle = count_forwards(reuse.model)
    scored = pool.map(reuse, batched=True, batch_size=5)
    handle.remove()
    assert calls == []  # neither targets nor pool needed a forward pass
    np.testing.assert_allclose(np.array(scored["less_sims"]), np.array(posthoc["less_sims"]), atol=tol, rtol=0)
    np.testing.assert_allclose(scored["less_score"], posthoc["less_score"], atol=tol, rtol=0)


def test_map_matches_rows_by_content_and_computes_the_rest(tokenizer, captured):
    pool = Dataset.from_list(POOL)
    reuse = selector(tokenizer, captured, proj_dim=64, batch_size=3)
    ordered = pool.map(reuse, batched=True, batch_size=4)
    shuffled = pool.shuffle(seed=3)
    calls, handle = count_forwards(reuse.model)
    out = shuffled.map(reuse, batched=True, batch_size=5)
    assert calls == []
    by_prompt = dict(zip(ordered["prompt"], ordered["less_score"]))
    assert out["less_score"] == [by_prompt[p] for p in out["prompt"]]
    # a row that was not captured is computed as usual, and scores like a fresh selector says
    new = Dataset.from_list([{"prompt": "add 7 9 =", "completion": " 16", "task": "math"}, POOL[0]])
    got = new.map(reuse, batched=True)
    assert calls  # forward passes, for the new row only
    fresh = new.map(selector(tokenizer, captured, proj_dim=64, batch_size=3, use_captured=False), batched=True)
    # (the captured target features are float16: the tolerance is theirs)
    np.testing.assert_allclose(got["less_score"][0], fresh["less_score"][0], atol=1e-3)
    assert got["less_score"][1] == by_prompt[POOL[0]["prompt"]]


def test_other_settings_set_the_capture_aside_never_mix(tokenizer, captured, caplog):
    """A capture made with other settings is set aside with a message and recomputed (it raised before, issue 23)."""
    with caplog.at_level("WARNING", logger="hf_less.scoring.less"):
        other = selector(tokenizer, captured, proj_dim=32)
    assert not other.has_captured_pool
    assert "Setting aside the captured pool features of checkpoint" in caplog.text and "dim: 64 vs 32" in caplog.text
    assert "computed anew" in caplog.text
    fresh = selector(tokenizer, captured, proj_dim=32, use_captured=False)
    pool = Dataset.from_list(POOL[:4])
    assert pool.map(other, batched=True)["less_sims"] == pool.map(fresh, batched=True)["less_sims"]
    for a, b in zip(other.target_features, fresh.target_features):
        torch.testing.assert_close(a, b)
    assert all(FeatureStore(c.captured("pool")).complete for c in find_checkpoints(captured))  # left in place
    with pytest.raises(IncompatibleFeaturesError, match="model"):  # another base model is still refused
        LessSelector(make_model(len(tokenizer), seed=5), captured, Dataset.from_list(TARGETS), tokenizer=tokenizer,
                     proj_dim=64, show_progress=False)


def test_empty_capture_dataset_is_refused(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="empty pool"):
        run_warmup(tmp_path, tokenizer, LessCallback(pool=Dataset.from_list([]).add_column("text", []),
                                                     show_progress=False))


def test_capture_packs_a_quantized_store_and_the_selector_reads_it(tmp_path, tokenizer, plain):
    from hf_less.gradients.quantize import row_bytes

    cb = LessCallback(pool=Dataset.from_list(POOL), targets=Dataset.from_list(TARGETS), proj_dim=64, batch_size=3,
                      shard_rows=5, dtype="int4", show_progress=False)
    warm = run_warmup(tmp_path / "int4", tokenizer, cb)
    for c in find_checkpoints(warm):
        for which in ("pool", "targets"):
            store = FeatureStore(c.captured(which))
            assert store.complete and store.format == "int4"
            shard = np.load(store.root / store.manifest["shards"][0]["files"][str(c.step)]["name"])
            assert shard.dtype == np.uint8 and shard.shape[1] == row_bytes("int4", 64)  # packed when captured
    reuse = selector(tokenizer, warm, proj_dim=64, batch_size=3)
    calls, handle = count_forwards(reuse.model)
    scored = Dataset.from_list(POOL).map(reuse, batched=True, batch_size=5)
    handle.remove()
    assert calls == []  # read from the packed stores, nothing recomputed
    posthoc = Dataset.from_list(POOL).map(selector(tokenizer, plain, proj_dim=64, batch_size=3), batched=True)
    # int4 on both sides (pool and captured targets): near the float scores, not equal to them
    diff = np.abs(np.array(scored["less_sims"]) - np.array(posthoc["less_sims"]))
    assert 1e-4 < diff.max() < 0.1
