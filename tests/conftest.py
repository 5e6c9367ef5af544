"""Fixtures: a character-level tokenizer and a tiny LoRA model, built offline. Helpers are in testing_utils.py."""

from __future__ import annotations

import os

import pytest

from datasets import Dataset

from .testing_utils import POOL, SHARD_ROWS, make_lora_model, make_tokenizer, make_work, work_selector

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


# The fake warmup of the store, featurizer and reliability tests (one per test module that uses it).
@pytest.fixture(scope="module")
def work(tmp_path_factory, tokenizer):
    """A warmup with two LESS checkpoints (distinct adapters, random Adam moments), saved model, data."""
    return make_work(tmp_path_factory.mktemp("reliability"), tokenizer)


@pytest.fixture(scope="module")
def sel(tokenizer, work):
    return work_selector(tokenizer, work)


@pytest.fixture(scope="module")
def reference(sel, tmp_path_factory):
    """An uninterrupted in-process featurization (float32 store) to compare resumed ones with."""
    return sel.featurize(Dataset.from_list(POOL), tmp_path_factory.mktemp("ref") / "store", shard_rows=SHARD_ROWS,
                         dtype="float32")
