"""Featurizer: projected features against the naive loop, precision and batch size options, pool direction,
non-finite gradients and a missing pad token."""

import copy

import pytest
import torch
from datasets import Dataset

from hf_less import LessSelector
from hf_less.data import encode_batch, pad_token_id
from hf_less.gradients.featurizer import Featurizer, NonFiniteFeatureError
from hf_less.gradients.per_example import PerExampleGradients, eval_mode
from hf_less.gradients.projection import make_projector
from hf_less.gradients.store import FeatureStore

from tests.testing_utils import (POOL, SETTINGS, SHARD_ROWS, dense_matrix, encoded_toy_tasks, make_lora_model,
                                 make_model, naive_gradient, needs_cxx, random_moments, stray_files)
from tests.testing_utils import FEW_TARGETS as TARGETS


@pytest.fixture
def encoded(tokenizer):
    return encoded_toy_tasks(tokenizer)


@pytest.mark.parametrize("kind,buffer_rows,compiled", [("rademacher", 1, False), ("rademacher", 100, False),
                                                       ("sparse", 100, False), ("rowshift", 100, False),
                                                       pytest.param("rowshift", 100, True, marks=needs_cxx)])
def test_featurizer_equals_naive_projected_loop(lora_model, tokenizer, encoded, kind, buffer_rows, compiled):
    """Buffered units, one-by-one projection, the compiled row-shift pass and the naive per-example loop agree."""
    from hf_less.gradients.featurizer import Featurizer

    grads = PerExampleGradients(lora_model)
    moments = random_moments(grads)
    m = torch.cat([moments.exp_avg[k].reshape(-1) for k in grads.keys])
    v = torch.cat([moments.exp_avg_sq[k].reshape(-1) for k in grads.keys])
    d = 128
    feat = Featurizer(lora_model, tokenizer, d, proj_kind=kind, batch_size=2, show_progress=False,
                      projection_buffer_bytes=buffer_rows * grads.dim * 4, compile_projection=compiled)
    out = feat(encoded, moments)
    assert feat.projector.identity == make_projector(grads.dim, d, kind).identity  # compiling is not in it
    assert getattr(feat.projector, "compile", False) is compiled  # (a failed compile turns it off, warning)
    R = dense_matrix(grads.dim, d, kind, 0)
    with eval_mode(lora_model):
        g = torch.stack([naive_gradient(lora_model, i, lab) for i, lab in encoded])
    # The Adam formula written out (checked elementwise against the paper in another test).
    ref = ((0.9 * m + 0.1 * g) / torch.sqrt(0.999 * v + 0.001 * g**2 + 1e-8)) @ R
    torch.testing.assert_close(out, torch.nn.functional.normalize(ref, dim=1), rtol=1e-4, atol=1e-5)


# -- precision and batch size options --------------------------------------------------------------

def test_autocast_is_an_explicit_option_off_by_default(lora_model, tokenizer, encoded):
    from hf_less.gradients.featurizer import Featurizer

    assert Featurizer(lora_model, tokenizer, 64, show_progress=False).grads.autocast is False
    exact = Featurizer(lora_model, tokenizer, None, show_progress=False)
    fast = Featurizer(lora_model, tokenizer, None, show_progress=False, autocast=True)
    assert fast.grads.autocast is True and fast.identity["autocast"] is True and exact.identity["autocast"] is False
    a, b = exact(encoded[:4]), fast(encoded[:4])
    assert not torch.equal(a, b)  # the option reaches the forward: bfloat16 rounding changes the numbers ...
    cos = (torch.nn.functional.normalize(a, dim=1) * torch.nn.functional.normalize(b, dim=1)).sum(1)
    assert (cos > 0.99).all(), cos  # ... by rounding only


def test_find_batch_size_halves_on_out_of_memory_only():
    from hf_less.gradients.featurizer import find_batch_size

    tried = []

    def fits(size, limit=20):
        tried.append(size)
        if size > limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    assert find_batch_size(fits, 128) == 16 and tried == [128, 64, 32, 16]
    with pytest.raises(torch.cuda.OutOfMemoryError):
        find_batch_size(lambda size: fits(size, limit=0), 4)  # not even one example fits
    with pytest.raises(ValueError, match="not memory"):
        find_batch_size(lambda size: (_ for _ in ()).throw(ValueError("not memory")), 8)


def test_auto_batch_size_on_a_cpu_is_the_cpu_default(lora_model, tokenizer, encoded):
    from hf_less.gradients.featurizer import CPU_BATCH_SIZE, Featurizer

    auto = Featurizer(lora_model, tokenizer, 64, batch_size="auto", show_progress=False)
    fixed = Featurizer(lora_model, tokenizer, 64, batch_size=CPU_BATCH_SIZE, show_progress=False)
    torch.testing.assert_close(auto(encoded), fixed(encoded), rtol=0, atol=0)
    assert auto.batch_size == CPU_BATCH_SIZE and not auto.auto_batch_size
    with pytest.raises(ValueError, match="batch_size must be an int >= 1 or 'auto', got 'big'"):
        Featurizer(lora_model, tokenizer, 64, batch_size="big")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_features_match_the_cpu_with_auto_batch_size(tokenizer, encoded):
    from hf_less.gradients.featurizer import Featurizer

    model = make_lora_model(tokenizer)
    grads = PerExampleGradients(model)
    moments = random_moments(grads)
    cpu = Featurizer(model, tokenizer, 256, show_progress=False)(encoded, moments)
    model.cuda()
    gpu = Featurizer(model, tokenizer, 256, batch_size="auto", show_progress=False)
    out = gpu(encoded, moments)
    assert gpu.batch_size >= 1 and not gpu.auto_batch_size
    torch.testing.assert_close(out, cpu, rtol=1e-3, atol=1e-4)  # TF32 off by default: float32 on both
    bf16 = Featurizer(model, tokenizer, 256, show_progress=False, autocast=True)(encoded, moments)
    assert ((bf16 * cpu).sum(1) > 0.99).all()


def deterministic_runs(model, tokenizer, encoded, moments, kind, dim, batch_size, runs=2, compiled=False):
    """Features of ``runs`` fresh featurizers (fresh caches) under ``torch.use_deterministic_algorithms(True)``."""
    from hf_less.gradients.featurizer import Featurizer

    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        return [Featurizer(model, tokenizer, dim, proj_kind=kind, batch_size=batch_size, show_progress=False,
                           compile_projection=compiled)(encoded, moments) for _ in range(runs)]
    finally:
        torch.use_deterministic_algorithms(before)


@pytest.mark.parametrize("kind,compiled", [("rowshift", False), ("sparse", False), ("rademacher", False),
                                           pytest.param("rowshift", True, marks=needs_cxx)])
def test_two_runs_give_bitwise_equal_features_under_deterministic_algorithms(tokenizer, encoded, kind, compiled):
    """Determinism: fresh featurizers (fresh caches) on the same model give the same bits, and the path
    runs under ``torch.use_deterministic_algorithms(True)`` (nothing on it is flagged non-deterministic)."""
    model = make_lora_model(tokenizer)
    runs = deterministic_runs(model, tokenizer, encoded, random_moments(PerExampleGradients(model)), kind, 256, 3,
                              compiled=compiled)
    assert torch.equal(runs[0], runs[1])
    assert torch.isfinite(runs[0]).all() and torch.allclose(runs[0].norm(dim=1), torch.ones(len(encoded)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("kind,compiled", [("rowshift", False), ("rademacher", False), ("rowshift", True)])
def test_cuda_features_are_bitwise_reproducible_and_match_the_cpu(tokenizer, encoded, kind, compiled):
    """Two runs on one GPU give equal bits (the row-shift gather has no atomics); the CPU agrees to float32
    rounding. The store fingerprint rests on this."""
    from hf_less.gradients.featurizer import Featurizer

    model = make_lora_model(tokenizer)
    moments = random_moments(PerExampleGradients(model))
    cpu = Featurizer(model, tokenizer, 4096, proj_kind=kind, show_progress=False)(encoded, moments)
    runs = deterministic_runs(model.cuda(), tokenizer, encoded, moments, kind, 4096, 4, compiled=compiled)
    assert torch.equal(runs[0], runs[1])
    # Unit-norm features: float32 rounding of the gradients and of the sums, differently ordered.
    assert (runs[0] - cpu).abs().max() < 1e-4


def test_pool_direction_sgd_is_the_plain_gradient(lora_model, tokenizer, encoded):
    from hf_less.gradients.featurizer import Featurizer
    from hf_less.gradients.store import IncompatibleFeaturesError, check_compatible

    grads = PerExampleGradients(lora_model)
    moments = random_moments(grads)
    adam = Featurizer(lora_model, tokenizer, 64, show_progress=False)
    sgd = Featurizer(lora_model, tokenizer, 64, show_progress=False, pool_direction="sgd")
    torch.testing.assert_close(sgd(encoded, moments), adam(encoded), rtol=0, atol=0)  # moments unused
    assert not torch.allclose(adam(encoded, moments), adam(encoded))
    assert "pool_direction" not in adam.identity and sgd.identity["pool_direction"] == "sgd"
    assert (adam.pool_representation, sgd.pool_representation) == ("less-adam", "less-sgd")
    with pytest.raises(IncompatibleFeaturesError, match="pool_direction: None vs 'sgd'"):
        check_compatible(adam.identity, sgd.identity)
    with pytest.raises(ValueError, match=r"pool_direction must be one of \('adam', 'sgd'\), got 'momentum'"):
        Featurizer(lora_model, tokenizer, 64, pool_direction="momentum")


def poisoned_model(tokenizer):
    model = make_model(len(tokenizer))
    with torch.no_grad():  # every example with a '~' gets a NaN loss
        model.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids("~")] = float("nan")
    return model


def test_nan_in_a_gradient_names_the_example(tokenizer, work, tmp_path):
    rows = [dict(r) for r in POOL]
    rows[7]["completion"] += "~"
    sel = LessSelector(poisoned_model(tokenizer), work / "warmup", TARGETS, tokenizer=tokenizer, **SETTINGS)
    pool = Dataset.from_list(rows)
    with pytest.raises(NonFiniteFeatureError, match=r"example\(s\) \[7\] of this map batch.*starts"):
        pool.map(sel, batched=True, batch_size=12)
    with pytest.raises(NonFiniteFeatureError, match=r"example\(s\) \[7\] of the pool \(dataset row indices\)"):
        sel.featurize(pool, tmp_path / "store", shard_rows=SHARD_ROWS)
    store = FeatureStore(tmp_path / "store")
    assert store.num_rows == 6 and not store.complete and stray_files(store) == []
    with pytest.raises(NonFiniteFeatureError, match=r"example\(s\) \[1\] of the targets"):
        LessSelector(poisoned_model(tokenizer), work / "warmup", [TARGETS[0], {**TARGETS[1], "completion": "~"}],
                     tokenizer=tokenizer, **SETTINGS)


def test_missing_pad_token_falls_back_without_changing_features(tokenizer):
    no_pad = copy.deepcopy(tokenizer)
    no_pad.pad_token = None
    neither = copy.deepcopy(no_pad)
    neither.eos_token = None
    assert pad_token_id(tokenizer) == tokenizer.pad_token_id == 0
    assert pad_token_id(no_pad) == tokenizer.eos_token_id and pad_token_id(neither) == 0
    model = make_lora_model(tokenizer)
    encoded = encode_batch({"prompt": [r["prompt"] for r in POOL], "completion": [r["completion"] for r in POOL]},
                           tokenizer)
    features = {}
    for name, tok in (("pad", tokenizer), ("eos", no_pad), ("zero", neither)):
        for side in ("right", "left"):
            tok = copy.deepcopy(tok)
            tok.padding_side = side
            features[name, side] = Featurizer(model, tok, 64, batch_size=4, show_progress=False)(encoded)
    for side in ("right", "left"):  # bit-identical whatever the pad id
        assert torch.equal(features["pad", side], features["eos", side])
        assert torch.equal(features["pad", side], features["zero", side])
    torch.testing.assert_close(features["pad", "right"], features["pad", "left"], rtol=1e-4, atol=1e-5)


def test_compile_projection_needs_the_rowshift_kind(lora_model, tokenizer):
    for kind, dim in (("sparse", 64), ("rademacher", 64), ("rowshift", None)):
        with pytest.raises(ValueError, match="compile_projection compiles the row-shift projection: it needs "
                                             "proj_kind='rowshift' and a proj_dim"):
            Featurizer(lora_model, tokenizer, dim, proj_kind=kind, compile_projection=True)
