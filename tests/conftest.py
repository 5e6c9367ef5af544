"""Fixtures: a character-level tokenizer and a tiny LoRA model, built offline. Helpers are in testing_utils.py."""

from __future__ import annotations

import os

import pytest

from .testing_utils import make_lora_model, make_tokenizer

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


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def lora_model(tokenizer):
    return make_lora_model(tokenizer)
