"""LessSelector end to end: map + select against an independent per-example computation."""

import json

import numpy as np
import pytest
import torch
from datasets import Dataset
from datasets.fingerprint import Hasher
from peft import PeftModel
from safetensors.torch import load_file

from hf_less import LessCallback, LessSelector
from hf_less.gradients.projection import DEFAULT_KIND
from hf_less.gradients.store import IncompatibleFeaturesError

from tests.testing_utils import dense_matrix, lora_config, make_model, naive_adam, naive_gradient, toy_tasks


@pytest.fixture(scope="module")
def warmup(tmp_path_factory, tokenizer):
    from trl import SFTConfig, SFTTrainer

    out = tmp_path_factory.mktemp("warmup")
    args = SFTConfig(output_dir=str(out), per_device_train_batch_size=4, num_train_epochs=2, learning_rate=2e-3,
                     lr_scheduler_type="linear", warmup_steps=1, save_strategy="epoch", report_to=[],
                     use_cpu=True, max_length=64, disable_tqdm=True, seed=0)
    SFTTrainer(make_model(len(tokenizer)), args=args, train_dataset=Dataset.from_list(toy_tasks(6, seed=1)),
               processing_class=tokenizer, peft_config=lora_config(dropout=0.1), callbacks=[LessCallback()]).train()
    return out


@pytest.fixture(scope="module")
def pool():
    return Dataset.from_list(toy_tasks(6, seed=2))


@pytest.fixture(scope="module")
def targets():
    rows = [r for r in toy_tasks(4, seed=3) if r["task"] == "math"]
    return Dataset.from_list(rows)


def make_selector(tokenizer, warmup, targets, seed=0, **kw):
    """A selector over a fresh tiny base model (``seed`` picks the base weights)."""
    kw.setdefault("show_progress", False)
    return LessSelector(make_model(len(tokenizer), seed=seed), warmup, targets, tokenizer=tokenizer, **kw)


def reference_sims(tokenizer, warmup, pool_rows, target_rows, proj_dim, pool_direction="adam"):
    """Naive LESS: one example at a time, checkpoint by checkpoint, straight from the paper.

    ``pool_direction="sgd"``: pool examples keep their plain gradient (the moments unused).
    """
    from hf_less.data import encode_batch

    enc = lambda rows: encode_batch({"prompt": [r["prompt"] for r in rows],
                                     "completion": [r["completion"] for r in rows]}, tokenizer)
    P_enc, T_enc = enc(pool_rows), enc(target_rows)
    ckpts = sorted(warmup.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    lrs = [json.loads((c / "less_state.json").read_text())["mean_lr"] for c in ckpts]
    S = torch.zeros(len(P_enc), len(T_enc))
    for c, lr in zip(ckpts, lrs):
        model = PeftModel.from_pretrained(make_model(len(tokenizer)), str(c), is_trainable=True).eval()
        names = [n.replace(".default.", ".") for n, p in model.named_parameters() if p.requires_grad]
        mom = load_file(str(c / "less_moments.safetensors"))
        st = json.loads((c / "less_state.json").read_text())
        m = torch.cat([mom[f"exp_avg.{n}"].reshape(-1) for n in names])
        v = torch.cat([mom[f"exp_avg_sq.{n}"].reshape(-1) for n in names])
        b1, b2 = st["betas"]
        pool_f = torch.stack([naive_gradient(model, i, l) if pool_direction == "sgd" else
                              naive_adam(naive_gradient(model, i, l), m, v, b1, b2, st["eps"]) for i, l in P_enc])
        targ_f = torch.stack([naive_gradient(model, i, l) for i, l in T_enc])
        if proj_dim is not None:
            R = dense_matrix(pool_f.shape[1], proj_dim, DEFAULT_KIND, 0)  # the selector's default projection
            pool_f, targ_f = pool_f @ R, targ_f @ R
        cos = torch.nn.functional.normalize(pool_f, dim=1) @ torch.nn.functional.normalize(targ_f, dim=1).T
        S += lr / sum(lrs) * cos
    return S


@pytest.mark.parametrize("proj_dim", [None, 256])
def test_map_equals_naive_less(tokenizer, warmup, pool, targets, proj_dim):
    selector = make_selector(tokenizer, warmup, targets, proj_dim=proj_dim, batch_size=4)
    scored = pool.map(selector, batched=True, batch_size=5)
    ref = reference_sims(tokenizer, warmup, list(pool), list(targets), proj_dim)
    sims = torch.tensor(scored["less_sims"])
    assert sims.shape == (len(pool), len(targets))
    torch.testing.assert_close(sims, ref, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(torch.tensor(scored["less_score"]), ref.mean(1), rtol=1e-3, atol=1e-4)


def test_pool_direction_sgd_equals_naive_plain_gradients(tokenizer, warmup, pool, targets):
    selector = make_selector(tokenizer, warmup, targets, proj_dim=256, batch_size=4, pool_direction="sgd")
    assert selector.identity["pool_direction"] == "sgd"
    sims = torch.tensor(pool.map(selector, batched=True, batch_size=5)["less_sims"])
    ref = reference_sims(tokenizer, warmup, list(pool), list(targets), 256, pool_direction="sgd")
    torch.testing.assert_close(sims, ref, rtol=1e-3, atol=1e-4)
    adam = reference_sims(tokenizer, warmup, list(pool), list(targets), 256)
    assert (ref - adam).abs().max() > 1e-2  # the option changes the scores: the test can tell them apart


def test_map_does_not_depend_on_batch_size(tokenizer, warmup, pool, targets):
    selector = make_selector(tokenizer, warmup, targets, proj_dim=128)
    a = np.array(pool.map(selector, batched=True, batch_size=1)["less_sims"])
    b = np.array(pool.map(selector, batched=True, batch_size=7)["less_sims"])
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_target_task_ranks_first(tokenizer, warmup, pool, targets):
    selector = make_selector(tokenizer, warmup, targets, proj_dim=512)
    scored = pool.map(selector, batched=True, batch_size=4)
    n_math = sum(t == "math" for t in pool["task"])
    chosen = selector.select(scored, budget=n_math)
    precision = np.mean([t == "math" for t in chosen["task"]])
    assert precision >= 0.8, precision
    rand = selector.select(scored, budget=0.5, strategy="random", seed=1)
    assert len(rand) == len(pool) // 2
    # filter_fn keeps exactly the rows select keeps, in pool order
    kept = scored.filter(selector.filter_fn(scored, budget=n_math), with_indices=True)
    assert sorted(kept["prompt"]) == sorted(chosen["prompt"])


def test_subtasks_take_max_of_means(tokenizer, warmup, pool):
    rows = toy_tasks(2, seed=5)
    targets = Dataset.from_list(rows)
    selector = make_selector(tokenizer, warmup, targets, proj_dim=64, subtask_column="task")
    scored = pool.map(selector, batched=True, batch_size=6)
    sims = np.array(scored["less_sims"])
    tasks = np.array(targets["task"])
    expected = np.maximum(sims[:, tasks == "math"].mean(1), sims[:, tasks == "reverse"].mean(1))
    np.testing.assert_allclose(scored["less_score"], expected, rtol=1e-5, atol=1e-6)


def test_datasets_fingerprint_tracks_targets_and_warmup(tokenizer, warmup, pool, targets, tmp_path):
    mk = lambda t, **kw: make_selector(tokenizer, warmup, t, proj_dim=64, **kw)
    a, b = mk(targets), mk(targets)
    other_targets = mk(Dataset.from_list([r for r in toy_tasks(3, seed=9) if r["task"] == "reverse"]))
    other_ckpts = mk(targets, checkpoints=[min(int(p.name.split("-")[1]) for p in warmup.glob("checkpoint-*"))])
    other_seed = mk(targets, proj_seed=1)
    assert Hasher.hash(a) == Hasher.hash(b)
    assert len({Hasher.hash(s) for s in (a, other_targets, other_ckpts, other_seed)}) == 4
    # a cached map is reused for the same selector and recomputed for another
    path = tmp_path / "pool"
    pool.save_to_disk(str(path))
    from datasets import load_from_disk
    on_disk = load_from_disk(str(path))
    s1 = on_disk.map(a, batched=True)
    s2 = on_disk.map(b, batched=True)
    s3 = on_disk.map(other_targets, batched=True)
    assert s1._fingerprint == s2._fingerprint != s3._fingerprint
    assert s1["less_score"] != s3["less_score"]


def test_store_scores_equal_map(tokenizer, warmup, pool, targets, tmp_path):
    selector = make_selector(tokenizer, warmup, targets, proj_dim=128)
    store = selector.featurize(pool, tmp_path / "store", shard_rows=5)
    assert store.complete and store.num_rows == len(pool) and len(store.manifest["shards"]) == 3
    store.verify()
    scores, sims = selector.score_store(store)
    scored = pool.map(selector, batched=True)
    np.testing.assert_allclose(sims, np.array(scored["less_sims"]), atol=2e-3)  # float16 store
    np.testing.assert_allclose(scores, scored["less_score"], atol=2e-3)
    fast_scores, fast_sims = selector.score_store(store, chunk_rows=4, precision="bfloat16")  # chunks cross shards
    assert (np.abs(fast_sims - sims) <= np.abs(sims) * 2**-8 + 1e-4).all()
    assert (np.abs(fast_scores - scores) <= np.abs(sims).mean(1) * 2**-8 + 1e-4).all()  # a mean of the sims
    other = make_selector(tokenizer, warmup, targets, proj_dim=64)
    with pytest.raises(IncompatibleFeaturesError, match="projection"):
        other.score_store(store)
    with pytest.raises(IncompatibleFeaturesError, match="model"):  # refused at once: not the warmup's base model
        make_selector(tokenizer, warmup, targets, seed=7, proj_dim=128)


def test_bad_inputs(tokenizer, warmup, pool, targets):
    with pytest.raises(ValueError, match="targets is empty"):
        make_selector(tokenizer, warmup, [])
    with pytest.raises(ValueError, match="Unrecognised dataset format"):
        make_selector(tokenizer, warmup, [{"question": "q"}])
    with pytest.raises(ValueError, match="subtask_column='nope'"):
        make_selector(tokenizer, warmup, targets, subtask_column="nope")
    selector = make_selector(tokenizer, warmup, targets, proj_dim=32)
    with pytest.raises(ValueError, match="no 'less_score' column.*map"):
        selector.select(pool, 3)
    scored = pool.map(selector, batched=True)
    for bad in (0, -1, len(pool) + 1, 0.0, 1.5):
        with pytest.raises(ValueError, match="budget"):
            selector.select(scored, bad)
    with pytest.raises(ValueError, match="Unknown selection strategy"):
        selector.select(scored, 2, strategy="nope")


@pytest.mark.parametrize("budget,k", [(1, 1), (1.0, 12), ("1", 1), ("1.0", 12), (0.25, 3), (0.01, 1), (12, 12)])
def test_select_budget_is_a_count_or_a_fraction(tokenizer, warmup, pool, targets, budget, k):
    """One convention (selectors.resolve_budget): an int counts rows, a float is a share of the pool."""
    selector = make_selector(tokenizer, warmup, targets, proj_dim=32)
    scored = pool.map(selector, batched=True)
    order = np.argsort(-np.array(scored["less_score"]), kind="stable")  # topk, independently
    assert len(pool) == 12 and selector.select(scored, budget)["prompt"] == [scored["prompt"][i] for i in order[:k]]
    assert len(scored.filter(selector.filter_fn(scored, budget), with_indices=True)) == k
    with pytest.raises(ValueError, match=r"budget=13 must be between 1 and the pool size 12"):
        selector.select(scored, 13)


def test_buffered_and_per_parameter_projection_agree(tokenizer, warmup, pool, targets):
    mk = lambda nbytes: make_selector(tokenizer, warmup, targets, proj_dim=128, batch_size=3,
                                      projection_buffer_bytes=nbytes)
    buffered, streamed = mk(2**30), mk(1)
    a = np.array(pool.map(buffered, batched=True, batch_size=12)["less_sims"])
    b = np.array(pool.map(streamed, batched=True, batch_size=12)["less_sims"])
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_every_dataset_format_scores(tokenizer, warmup, pool, targets):
    from hf_less.data import encode_batch

    selector = make_selector(tokenizer, warmup, targets, proj_dim=64)
    base = np.array(pool.map(selector, batched=True)["less_sims"])
    enc = encode_batch(pool.to_dict(), tokenizer)
    tokenized = Dataset.from_dict({"input_ids": [e[0] for e in enc], "labels": [e[1] for e in enc]})
    np.testing.assert_allclose(np.array(tokenized.map(selector, batched=True)["less_sims"]), base,
                               rtol=1e-4, atol=1e-5)
    messages = Dataset.from_dict({"messages": [[{"role": "user", "content": p}, {"role": "assistant", "content": c}]
                                               for p, c in zip(pool["prompt"], pool["completion"])]})
    text = Dataset.from_dict({"text": [p + c for p, c in zip(pool["prompt"], pool["completion"])]})
    for ds in (messages, text):
        sims = np.array(ds.map(selector, batched=True)["less_sims"])
        assert sims.shape == base.shape and np.isfinite(sims).all() and np.abs(sims).max() <= 1 + 1e-5


@pytest.mark.parametrize("strategy", __import__("hf_less.selection.strategies", fromlist=["STRATEGIES"]).STRATEGIES)
def test_filter_fn_keeps_the_rows_select_keeps(tokenizer, warmup, pool, targets, strategy):
    selector = make_selector(tokenizer, warmup, targets, proj_dim=64)
    scored = pool.map(selector, batched=True, batch_size=6)
    chosen = selector.select(scored, budget=5, strategy=strategy, seed=3)
    kept = scored.filter(selector.filter_fn(scored, budget=5, strategy=strategy, seed=3), with_indices=True)
    assert len(chosen) == len(kept) == 5
    assert sorted(chosen["prompt"]) == sorted(kept["prompt"])
    positions = [scored["prompt"].index(p) for p in kept["prompt"]]
    assert positions == sorted(positions)  # filter keeps pool order
