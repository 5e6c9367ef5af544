"""Per-example LoRA gradients, loss masking, Adam direction: the fast path against a naive loop."""

import pytest
import torch

from hf_less.data import collate
from hf_less.gradients.per_example import (PerExampleGradients, adam_direction, eval_mode, gradient_features,
                                           parameter_key, per_example_loss)
from hf_less.gradients.projection import make_projector

from tests.testing_utils import (encoded_toy_tasks, make_lora_model, make_model, naive_adam, naive_gradient,
                                 random_moments)


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


@pytest.mark.parametrize("kind", ["rowshift", "sparse", "rademacher"])
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


def _bmm_cases(device):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 5, 371, generator=g)  # (B, out, tokens): a LoRA layer's output gradients, transposed
    b = torch.randn(3, 371, 64, generator=g)  # (B, tokens, in): its inputs
    return a.to(device), b.to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bmm_float32_is_the_float32_product_of_the_same_values(dtype):
    """Per-example weight gradients: float32 results whatever the activations' dtype, products of the
    values as given (a bfloat16 activation is exact in float32), sums in float32."""
    from hf_less.gradients.per_example import bmm_float32

    a, b = (t.to(dtype) for t in _bmm_cases("cpu"))
    out = bmm_float32(a, b)
    ref = torch.bmm(a.double(), b.double())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bmm_float32_on_cuda_multiplies_low_precision_in_float32(dtype):
    """On CUDA bfloat16/float16 inputs go to the tensor cores with a float32 result (out_dtype): the same values'
    float32 product to float32 rounding (no rounding of the result to the inputs' precision)."""
    from hf_less.gradients.per_example import bmm_float32

    a, b = (t.to(dtype) for t in _bmm_cases("cuda"))
    out = bmm_float32(a, b)
    ref = torch.bmm(a.double(), b.double())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-4)
