"""Per-example gradients on configurations people use, against the naive per-example autograd loop.

Each model here is built from a tiny config (nothing is downloaded). For every configuration the
features of a padded batch (right and left padding) must equal ``naive_gradient``: one unpadded
example at a time through ``torch.autograd``. Where the batched hooks cannot be exact (a trainable
parameter used outside the layers they handle, a layer that sees tokens of several examples mixed
together), ``PerExampleGradients`` must say so and use the exact loop instead.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from hf_less.data import collate, encode_batch
from hf_less.gradients.per_example import PerExampleGradients, eval_mode, gradient_features

from tests.testing_utils import make_tokenizer, naive_gradient, toy_tasks

LOGGER = "hf_less.gradients.per_example"


@pytest.fixture(scope="module")
def encoded():
    tok = make_tokenizer()
    rows = toy_tasks(3)
    return encode_batch({"prompt": [r["prompt"] for r in rows], "completion": [r["completion"] for r in rows]}, tok)


def tiny_llama(vocab: int, tied: bool, seed: int = 0) -> nn.Module:
    """SmolLM2-like: a small Llama whose LM head shares the input embedding when ``tied``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=tied,
    ))


def tiny_gpt2(vocab: int, seed: int = 0) -> nn.Module:
    """GPT-2: ``Conv1D`` projections (weight stored ``(in, out)``), LM head tied to ``wte``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=256,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0))


def randomise_lora_b(model: nn.Module, seed: int = 1) -> nn.Module:
    """PEFT starts B at 0 (then grad A = 0); random B makes every LoRA gradient informative."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def needs_lora_argument(name: str):
    """Skip where the installed peft's LoraConfig has no ``name`` (older peft versions)."""
    import inspect

    from peft import LoraConfig

    return pytest.mark.skipif(name not in inspect.signature(LoraConfig).parameters,
                              reason=f"this peft's LoraConfig has no {name}")


def peft(model: nn.Module, **kwargs) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    kwargs.setdefault("target_modules", ["q_proj", "v_proj"])
    return randomise_lora_b(get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, **kwargs)))


def assert_exact(model: nn.Module, encoded, pad_id: int = 0) -> PerExampleGradients:
    """Features of padded batches (right and left, two batch sizes) equal the naive loop; returns the grads."""
    grads = PerExampleGradients(model)
    with eval_mode(model):
        ref = torch.stack([naive_gradient(model, ids, lab) for ids, lab in encoded])
        assert ref.abs().max() > 0
        for side, size in (("right", len(encoded)), ("left", 4)):
            out = torch.cat([gradient_features(grads, collate(encoded[s : s + size], pad_id, side))
                             for s in range(0, len(encoded), size)])
            assert out.shape == ref.shape
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-6)
    return grads


# -- tied, trainable weights ---------------------------------------------------------------------------

@needs_lora_argument("ensure_weight_tying")
def test_tied_modules_to_save_is_exact_and_batched(tokenizer, encoded, caplog):
    """LoRA + ``modules_to_save=[embed_tokens, lm_head]`` with weight tying: one Parameter, two uses."""
    model = peft(tiny_llama(len(tokenizer), tied=True), modules_to_save=["embed_tokens", "lm_head"],
                 ensure_weight_tying=True)
    base = model.base_model.model
    shared = base.model.embed_tokens.modules_to_save["default"].weight
    assert shared is base.lm_head.modules_to_save["default"].weight and shared.requires_grad
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        grads = assert_exact(model, encoded)
    assert grads.batched  # both uses summed by the hooks, no fallback
    assert not caplog.records


def test_tied_modules_to_save_without_tying_is_exact(tokenizer, encoded):
    """peft's default: ``modules_to_save`` gives the embedding and the LM head separate trainable copies."""
    model = peft(tiny_llama(len(tokenizer), tied=True), modules_to_save=["embed_tokens", "lm_head"])
    base = model.base_model.model
    assert base.model.embed_tokens.modules_to_save["default"].weight.requires_grad
    grads = assert_exact(model, encoded)
    assert grads.batched


def test_tied_weight_trainable_without_peft_is_exact(tokenizer, encoded):
    """A plain model, everything frozen but the tied embedding / LM head weight."""
    model = tiny_llama(len(tokenizer), tied=True).requires_grad_(False)
    model.model.embed_tokens.weight.requires_grad_(True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.embed_tokens.padding_idx == 0  # the pad row gets no gradient, as in autograd
    grads = assert_exact(model, encoded)
    assert grads.batched


def test_each_use_of_a_tied_weight_is_needed(tokenizer, encoded):
    """Both the embedding's and the LM head's share are non-zero: dropping either is detectable."""
    model = tiny_llama(len(tokenizer), tied=True).requires_grad_(False)
    emb = model.model.embed_tokens.weight
    emb.requires_grad_(True)
    ids, lab = encoded[0]
    with eval_mode(model):
        full = naive_gradient(model, ids, lab)
        model.lm_head.weight = nn.Parameter(emb.detach().clone(), requires_grad=False)  # untie: embedding share only
        embedding_only = naive_gradient(model, ids, lab)
    head_only = full - embedding_only
    assert embedding_only.norm() > 0.05 * full.norm() and head_only.norm() > 0.05 * full.norm()


def test_untied_lm_head_modules_to_save_is_exact(tokenizer, encoded):
    """A trainable LM head sees ``(B, K, hidden)``: only the K scored positions (``logits_to_keep``)."""
    model = peft(tiny_llama(len(tokenizer), tied=False), modules_to_save=["lm_head"])
    grads = assert_exact(model, encoded)
    assert grads.batched and grads._with_keep


@needs_lora_argument("trainable_token_indices")
def test_trainable_token_indices_is_exact(tokenizer, encoded, caplog):
    """``trainable_token_indices`` on a tied model: a delta applied functionally, so the exact loop."""
    ids = tokenizer.convert_tokens_to_ids(list("0123456789 abcdefgh"))
    model = peft(tiny_llama(len(tokenizer), tied=True), trainable_token_indices=ids)
    with torch.no_grad():  # a non-zero delta, as after some training
        for n, p in model.named_parameters():
            if "trainable_tokens_delta" in n:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.1)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        grads = assert_exact(model, encoded)
    assert not grads.batched
    assert any("trainable_tokens_delta" in r.getMessage() for r in caplog.records)


# -- LoRA variants --------------------------------------------------------------------------------------

def test_gpt2_conv1d_lora_fan_in_fan_out_is_exact(tokenizer, encoded):
    model = peft(tiny_gpt2(len(tokenizer)), target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    grads = assert_exact(model, encoded)
    assert grads.batched


@needs_lora_argument("ensure_weight_tying")
def test_gpt2_tied_modules_to_save_is_exact(tokenizer, encoded):
    model = peft(tiny_gpt2(len(tokenizer)), target_modules=["c_attn"], fan_in_fan_out=True,
                 modules_to_save=["wte", "lm_head"], ensure_weight_tying=True)
    grads = assert_exact(model, encoded)
    assert grads.batched


def test_gpt2_trainable_conv1d_falls_back_exactly(tokenizer, encoded, caplog):
    """A trainable ``Conv1D`` (not a layer type the hooks handle): the exact loop, with a warning."""
    model = peft(tiny_gpt2(len(tokenizer)), target_modules=["c_attn"], fan_in_fan_out=True,
                 modules_to_save=["mlp.c_fc"])
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        grads = assert_exact(model, encoded)
    assert not grads.batched and any("c_fc" in r.getMessage() for r in caplog.records)


def test_rslora_is_exact(tokenizer, encoded):
    grads = assert_exact(peft(tiny_llama(len(tokenizer), tied=True), use_rslora=True), encoded)
    assert grads.batched


def test_dora_is_exact(tokenizer, encoded, caplog):
    model = peft(tiny_llama(len(tokenizer), tied=True), use_dora=True)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        grads = assert_exact(model, encoded)
    assert not grads.batched  # the magnitude vector scales the layer output outside any nn.Linear
    assert any("lora_magnitude_vector" in r.getMessage() for r in caplog.records)


def test_dora_with_frozen_magnitude_is_exact(tokenizer, encoded):
    """Only A and B trainable: the magnitude still scales their use, outside the hooked lora_B output."""
    model = peft(tiny_llama(len(tokenizer), tied=True), use_dora=True)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1.5)  # magnitude != weight norm, so the scale is not 1
                p.requires_grad_(False)
    assert_exact(model, encoded)


def test_functional_use_of_a_trainable_weight_falls_back(tokenizer, encoded, caplog):
    """A weight also used by a plain function call (no module the hooks see) forces the exact loop."""
    model = peft(tiny_llama(len(tokenizer), tied=False), modules_to_save=["lm_head"])
    head = model.base_model.model.lm_head.modules_to_save["default"]
    norm = model.base_model.model.model.norm

    norm_forward = norm.forward

    def forward(hidden):  # the final norm adds a term through the head's own weight
        return norm_forward(hidden) + 0.1 * hidden @ head.weight[: hidden.shape[-1]]

    norm.forward = forward
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        grads = assert_exact(model, encoded)
    assert not grads.batched
    assert any("outside" in r.getMessage() and "lm_head" in r.getMessage() for r in caplog.records)


# -- mixture of experts ---------------------------------------------------------------------------------

def test_mixtral_all_linear_falls_back_exactly(tokenizer, encoded, caplog):
    """transformers' Mixtral experts are fused 3-D parameters; PEFT's "all-linear" wraps them (and the
    router) with LoRA factors held in ``nn.Linear`` modules but read as weights, never called on tokens."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    ))
    model = peft(model, target_modules="all-linear")
    assert any("experts" in n for n, p in model.named_parameters() if p.requires_grad)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        grads = assert_exact(model, encoded)
    assert not grads.batched
    # transformers 5 holds experts as fused parameters that PEFT's LoRA reads as weights ("used outside");
    # transformers 4 as nn.Linear experts that see routed tokens ("(batch, tokens"): either is detected.
    assert any("experts" in r.getMessage() and "exact" in r.getMessage() for r in caplog.records)


def test_mixtral_attention_lora_is_exact_and_batched(tokenizer, encoded):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    ))
    grads = assert_exact(peft(model, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]), encoded)
    assert grads.batched


def test_qwen2_moe_all_linear_falls_back_exactly(tokenizer, encoded, caplog):
    """Qwen2-MoE's shared expert is ``nn.Linear`` on flattened ``(B*T, hidden)`` tokens: detected, looped."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(0)
    model = Qwen2MoeForCausalLM(Qwen2MoeConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=32, moe_intermediate_size=16,
        shared_expert_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_experts=4, num_experts_per_tok=2, max_position_embeddings=256, pad_token_id=0,
    ))
    model = peft(model, target_modules="all-linear")
    assert any("shared_expert" in n for n, p in model.named_parameters() if p.requires_grad)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        grads = assert_exact(model, encoded)
    assert not grads.batched  # switched to the loop for good after the first batch
    msgs = [r.getMessage() for r in caplog.records if "(batch, tokens" in r.getMessage()]
    assert len(msgs) == 1 and "expert" in msgs[0]  # warned once, naming the layer


class RoutedMLP(nn.Module):
    """Top-1 routing of the batch's flattened tokens to ``nn.Linear`` experts: each expert's input
    mixes tokens of several examples, in an order that is not example-major rows."""

    def __init__(self, hidden: int, n_experts: int = 3):
        super().__init__()
        self.router = nn.Linear(hidden, n_experts, bias=False)
        self.experts = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(n_experts))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        flat = h.reshape(-1, h.shape[-1])  # (B*T, hidden)
        choice = self.router(flat).argmax(-1)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            rows = (choice == e).nonzero().flatten()
            out = out.index_add(0, rows, expert(flat[rows]))
        return out.view_as(h)


def test_routed_linear_experts_fall_back_exactly(tokenizer, encoded, caplog):
    model = tiny_llama(len(tokenizer), tied=False)
    for layer in model.model.layers:
        layer.mlp = RoutedMLP(32)
    model = peft(model, target_modules=r".*\.(q_proj|experts\.\d)")
    assert any("experts" in n for n, p in model.named_parameters() if p.requires_grad)
    with eval_mode(model):  # the experts really see tokens of different examples together
        seen = []
        hook = model.base_model.model.model.layers[0].mlp.experts[0].lora_A["default"].register_forward_hook(
            lambda m, i, o: seen.append(i[0].shape))
        gradient_features(PerExampleGradients(model), collate(encoded, 0))
        hook.remove()
    assert seen and len(seen[0]) == 2
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        grads = assert_exact(model, encoded)
    assert not grads.batched
    assert any("experts" in r.getMessage() for r in caplog.records)
