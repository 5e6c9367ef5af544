"""Shared fixtures: a character-level tokenizer and tiny random Llama models, built offline."""

from __future__ import annotations

import os
import string

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

try:  # property tests draw the same examples on every run: CI failures reproduce, nothing flickers
    from hypothesis import settings as _hypothesis_settings

    _hypothesis_settings.register_profile("hf_less", derandomize=True, deadline=None, print_blob=True)
    _hypothesis_settings.load_profile("hf_less")
except ImportError:
    pass

CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def make_tokenizer():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<user>", "<assistant>", "<system>"]
    vocab = {t: i for i, t in enumerate(specials + list(string.printable))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    # Special tokens are kept whole by add_special_tokens below; everything else splits per character
    # (newlines too).
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=["<user>", "<assistant>", "<system>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


def make_model(vocab_size: int, seed: int = 0, layers: int = 2, hidden: int = 32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.config.name_or_path = f"tiny-llama-seed{seed}"
    return model


def lora_config(r: int = 4, dropout: float = 0.0):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])


def make_lora_model(tokenizer, seed: int = 0, r: int = 4, dropout: float = 0.0, random_b: bool = True):
    """A tiny LoRA model; B is randomised (PEFT starts it at 0) so gradients w.r.t. A are non-zero."""
    from peft import get_peft_model

    model = get_peft_model(make_model(len(tokenizer), seed), lora_config(r, dropout))
    if random_b:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


@pytest.fixture
def lora_model(tokenizer):
    return make_lora_model(tokenizer)


def toy_tasks(n_per_task: int = 8, seed: int = 0):
    """Two very different synthetic tasks as prompt/completion rows, with a task column."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n_per_task):
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        rows.append({"prompt": f"add {a} {b} =", "completion": f" {a + b}", "task": "math"})
        word = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(3, 6)))
        rows.append({"prompt": f"reverse {word} :", "completion": f" {word[::-1]}", "task": "reverse"})
    return rows


def write_fake_warmup(root, tokenizer, steps=(3, 6)):
    """LESS checkpoints ``root/checkpoint-S`` with distinct adapters and random Adam moments; returns ``root``."""
    from hf_less.gradients.state import save_less_state
    from hf_less.gradients.per_example import AdamMoments, parameter_key

    for i, step in enumerate(steps):
        lora = make_lora_model(tokenizer, seed=i)
        ckpt = root / f"checkpoint-{step}"
        lora.save_pretrained(ckpt)
        g = torch.Generator().manual_seed(10 + i)
        named = [(parameter_key(n), p) for n, p in lora.named_parameters() if p.requires_grad]
        m = {k: torch.randn(p.shape, generator=g) * 1e-3 for k, p in named}
        v = {k: torch.rand(p.shape, generator=g) * 1e-6 for k, p in named}
        save_less_state(ckpt, AdamMoments(m, v, (0.9, 0.999), 1e-8), [k for k, _ in named],
                        mean_lr=1e-3 / (i + 1), global_step=step, lr_steps=3, optimizer="AdamW")
    return root


def run_warmup(out, tokenizer, callback):
    """A 2-epoch LoRA warmup (dropout 0.1) of a tiny model, with ``callback``; same seed every time."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=str(out), per_device_train_batch_size=4, num_train_epochs=2, learning_rate=2e-3,
                     lr_scheduler_type="linear", warmup_steps=1, save_strategy="epoch", report_to=[],
                     use_cpu=True, max_length=64, disable_tqdm=True, seed=0)
    SFTTrainer(make_model(len(tokenizer)), args=args, train_dataset=Dataset.from_list(toy_tasks(6, seed=1)),
               processing_class=tokenizer, peft_config=lora_config(dropout=0.1), callbacks=[callback]).train()
    return out
