"""Per-example LoRA gradients, loss masking, Adam direction: the fast path against a naive loop."""

import pytest
import torch

from hf_less.data import collate
from hf_less.gradients.per_example import (PerExampleGradients, adam_direction, eval_mode,
                              gradient_features, parameter_key, per_example_loss)
from hf_less.gradients.projection import make_projector

from tests.testing_utils import (dense_matrix, encoded_toy_tasks, make_lora_model, make_model, naive_adam,
                                 naive_gradient, random_moments)


@pytest.fixture
def encoded(tokenizer):
    return encoded_toy_tasks(tokenizer)


def test_parameter_key_drops_adapter_name():
    assert parameter_key("a.q_proj.lora_A.default.weight") == "a.q_proj.lora_A.weight"
    assert parameter_key("a.q_proj.lora_A.other.weight", "other") == "a.q_proj.lora_A.weight"


def test_per_example_loss_masks_prompt_and_padding():
    logits = torch.randn(2, 4, 7)
    labels = torch.tensor([[-100, 3, 4, -100], [-100, -100, 5, 6]])
    loss = per_example_loss(logits, labels)
    lp = torch.log_softmax(logits, -1)
    ref0 = -(lp[0, 0, 3] + lp[0, 1, 4]) / 2
    ref1 = -(lp[1, 1, 5] + lp[1, 2, 6]) / 2
    torch.testing.assert_close(loss, torch.stack([ref0, ref1]))


@pytest.mark.parametrize("batch_size", [1, 3, 6])
@pytest.mark.parametrize("side", ["right", "left"])
def test_batched_gradients_equal_naive_loop(lora_model, tokenizer, encoded, batch_size, side):
    grads = PerExampleGradients(lora_model)
    assert grads.batched
    with eval_mode(lora_model):
        ref = torch.stack([naive_gradient(lora_model, ids, lab) for ids, lab in encoded])
        out = []
        for s in range(0, len(encoded), batch_size):
            batch = collate(encoded[s : s + batch_size], tokenizer.pad_token_id, side)
            out.append(gradient_features(grads, batch))
    out = torch.cat(out)
    assert out.shape == (len(encoded), grads.dim)
    assert ref.abs().max() > 0
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-6)


def test_adam_direction_equals_elementwise_formula():
    g = torch.randn(2, 50)
    m, v = torch.randn(50) * 1e-3, torch.rand(50) * 1e-5
    out = adam_direction(g, m, v, (0.9, 0.999), 1e-8)
    for b in range(2):
        torch.testing.assert_close(out[b], naive_adam(g[b], m, v, 0.9, 0.999, 1e-8))


def test_pool_features_are_adam_directions(lora_model, tokenizer, encoded):
    grads = PerExampleGradients(lora_model)
    moments = random_moments(grads)
    m = torch.cat([moments.exp_avg[k].reshape(-1) for k in grads.keys])
    v = torch.cat([moments.exp_avg_sq[k].reshape(-1) for k in grads.keys])
    with eval_mode(lora_model):
        out = gradient_features(grads, collate(encoded, tokenizer.pad_token_id), moments=moments)
        for b, (ids, lab) in enumerate(encoded[:2]):
            ref = naive_adam(naive_gradient(lora_model, ids, lab), m, v, 0.9, 0.999, 1e-8)
            torch.testing.assert_close(out[b], ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["sparse", "rademacher"])
def test_projected_features_equal_projection_of_exact(lora_model, tokenizer, encoded, kind):
    grads = PerExampleGradients(lora_model)
    proj = make_projector(grads.dim, 256, kind, seed=0)
    batch = collate(encoded, tokenizer.pad_token_id)
    with eval_mode(lora_model):
        exact = gradient_features(grads, batch)
        projected = gradient_features(grads, batch, projector=proj)
    torch.testing.assert_close(projected, proj(exact), rtol=1e-4, atol=1e-6)


def test_looped_fallback_matches_batched(tokenizer, encoded):
    model = make_lora_model(tokenizer)
    fast = PerExampleGradients(model)
    # A trainable non-Linear parameter (a norm weight) forces the exact loop.
    norm = model.base_model.model.model.norm.weight
    norm.requires_grad_(True)
    slow = PerExampleGradients(model)
    assert fast.batched and not slow.batched
    batch = collate(encoded[:4], tokenizer.pad_token_id)
    with eval_mode(model):
        a = gradient_features(fast, batch)
        b = gradient_features(slow, batch)
        ref = torch.stack([naive_gradient(model, ids, lab) for ids, lab in encoded[:4]])
    keep = [i for i, k in enumerate(slow.keys) if "norm" not in k]
    sizes = slow.sizes
    offs = [sum(sizes[:i]) for i in range(len(sizes))]
    b_lora = torch.cat([b[:, offs[i] : offs[i] + sizes[i]] for i in keep], 1)
    torch.testing.assert_close(b_lora, a, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(b, ref, rtol=1e-4, atol=1e-6)


def test_no_trainable_parameters_is_an_error(tokenizer):
    with pytest.raises(ValueError, match="no trainable parameters.*get_peft_model"):
        PerExampleGradients(make_model(len(tokenizer)).requires_grad_(False))


def test_missing_moment_is_an_error(lora_model, tokenizer, encoded):
    grads = PerExampleGradients(lora_model)
    moments = random_moments(grads)
    del moments.exp_avg[grads.keys[0]]
    with pytest.raises(KeyError, match="different LoRA configuration"):
        gradient_features(grads, collate(encoded, 0), moments=moments)


def test_no_param_grad_is_written(lora_model, tokenizer, encoded):
    grads = PerExampleGradients(lora_model)
    gradient_features(grads, collate(encoded, 0))
    assert all(p.grad is None for p in lora_model.parameters())


def test_lm_head_at_scored_positions_only_changes_nothing(lora_model, tokenizer, encoded):
    from hf_less.gradients.per_example import scored_positions

    labels = torch.tensor([[-100, -100, 5, 6], [-100, 3, -100, -100]])
    assert scored_positions(labels).tolist() == [0, 1, 2]
    grads = PerExampleGradients(lora_model)
    assert grads._with_keep  # Llama accepts logits_to_keep
    batch = collate(encoded[:4], tokenizer.pad_token_id)
    with eval_mode(lora_model):
        fast = gradient_features(grads, batch)
        grads._with_keep = False
        full = gradient_features(grads, batch)
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-7)


def test_autocast_is_off_on_cpu():
    import contextlib

    from hf_less.gradients.per_example import autocast_context

    assert isinstance(autocast_context(torch.device("cpu")), contextlib.nullcontext)


@pytest.mark.parametrize("kind,buffer_rows", [("rademacher", 1), ("rademacher", 100), ("sparse", 100)])
def test_featurizer_equals_naive_projected_loop(lora_model, tokenizer, encoded, kind, buffer_rows):
    """Buffered units, one-by-one projection and the naive per-example loop agree, for each kind."""
    from hf_less.gradients.featurizer import Featurizer

    grads = PerExampleGradients(lora_model)
    moments = random_moments(grads)
    m = torch.cat([moments.exp_avg[k].reshape(-1) for k in grads.keys])
    v = torch.cat([moments.exp_avg_sq[k].reshape(-1) for k in grads.keys])
    d = 128
    feat = Featurizer(lora_model, tokenizer, d, proj_kind=kind, batch_size=2, show_progress=False,
                      projection_buffer_bytes=buffer_rows * grads.dim * 4)
    out = feat(encoded, moments)
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


def test_config_options_reach_the_featurizer_arguments(tmp_path):
    from hf_less import LessSFTConfig

    a = LessSFTConfig(output_dir=str(tmp_path), less_autocast=True, less_auto_batch_size=True, use_cpu=True)
    assert a.less_featurize_batch_size == "auto" and a.less_autocast is True
    b = LessSFTConfig(output_dir=str(tmp_path), less_batch_size=3, use_cpu=True)
    assert b.less_featurize_batch_size == 3 and b.less_autocast is False


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


def test_config_refuses_an_unknown_pool_direction(tmp_path):
    from hf_less import LessSFTConfig

    assert LessSFTConfig(output_dir=str(tmp_path), use_cpu=True, less_pool_direction="sgd").less_pool_direction == "sgd"
    with pytest.raises(ValueError, match="less_pool_direction='plain' must be one of"):
        LessSFTConfig(output_dir=str(tmp_path), use_cpu=True, less_pool_direction="plain")
