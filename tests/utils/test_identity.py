"""Identities of weights, tokenizers and warmups: a selection is reused only when every input is the same,
and selectors' fingerprints include the chat template (issue 15, item 4)."""

import shutil

import numpy as np
import pytest
import torch
from datasets import Dataset, load_from_disk
from datasets.fingerprint import Hasher

from hf_less import LessSelector, LessSFTTrainer
from hf_less.scoring.representations import RepresentationSelector

from tests.testing_utils import POOL, TARGETS, as_format, make_model, make_tokenizer, trainer_for


@pytest.fixture(scope="module")
def warm(tmp_path_factory, tokenizer):
    """One LessSFTTrainer selection with a 2-epoch warmup (2 steps per epoch: checkpoint-2, checkpoint-4)."""
    out = tmp_path_factory.mktemp("warm")
    trainer_for(out, tokenizer).select_data()
    return out


class Recomputed(Exception):
    """Raised by a patched step: the selection was computed again instead of reused."""


def other_template_tokenizer():
    tok = make_tokenizer()
    tok.chat_template = tok.chat_template.replace("</s>{% endfor %}", "</s>\n{% endfor %}")
    return tok


@pytest.fixture
def selected(warm, tmp_path, tokenizer):
    """A selection made from a copy of the warmup (less_warmup_dir), in its own output_dir."""
    warmup = tmp_path / "warmup"
    shutil.copytree(warm / "less_warmup", warmup)
    out = tmp_path / "out"
    first = trainer_for(out, tokenizer, less_warmup_dir=str(warmup)).select_data()
    return out, warmup, first


def recompute_raises(monkeypatch):
    def no(*a, **k):
        raise Recomputed

    monkeypatch.setattr(LessSFTTrainer, "_select", no)
    monkeypatch.setattr(LessSFTTrainer, "_warmup", no)


def test_reuse_when_every_input_matches(selected, tokenizer, monkeypatch):
    out, warmup, first = selected
    recompute_raises(monkeypatch)
    # another tokenizer and model object with the same content are the same inputs
    again = trainer_for(out, make_tokenizer(), model=make_model(len(tokenizer)), less_warmup_dir=str(warmup))
    assert again.select_data() == first


def test_other_weights_under_the_same_name_recompute(selected, tokenizer, monkeypatch):
    out, warmup, _ = selected
    recompute_raises(monkeypatch)
    model = make_model(len(tokenizer), seed=1)
    model.config.name_or_path = make_model(len(tokenizer)).config.name_or_path
    with pytest.raises(Recomputed):
        trainer_for(out, tokenizer, model=model, less_warmup_dir=str(warmup)).select_data()


def test_another_chat_template_recomputes(selected, tokenizer, monkeypatch):
    out, warmup, _ = selected
    recompute_raises(monkeypatch)
    with pytest.raises(Recomputed):
        trainer_for(out, other_template_tokenizer(), less_warmup_dir=str(warmup)).select_data()


def test_changed_warmup_checkpoints_recompute(selected, tokenizer, monkeypatch):
    out, warmup, first = selected
    recompute_raises(monkeypatch)
    # checkpoint-4's adapter replaced (another warmup's files copied in): same path and settings, other content
    shutil.copyfile(warmup / "checkpoint-2" / "adapter_model.safetensors",
                    warmup / "checkpoint-4" / "adapter_model.safetensors")
    with pytest.raises(Recomputed):
        trainer_for(out, tokenizer, less_warmup_dir=str(warmup)).select_data()
    shutil.rmtree(warmup)  # and a warmup that is gone
    with pytest.raises(Recomputed):
        trainer_for(out, tokenizer, less_warmup_dir=str(warmup)).select_data()


def test_selector_fingerprints_include_the_chat_template(warm, tmp_path, tokenizer):
    """A messages pool mapped again after a chat-template change is scored anew, not read from the cache."""
    pool = as_format(POOL, "messages")
    pool.save_to_disk(tmp_path / "pool")
    on_disk = load_from_disk(tmp_path / "pool")  # a dataset with cache files: map caches by fingerprint

    def selector(tok):
        return LessSelector(make_model(len(tokenizer)), warm / "less_warmup", Dataset.from_list(TARGETS),
                            tokenizer=tok, proj_dim=64, max_length=64, use_captured=False, show_progress=False)

    old, same, new = selector(tokenizer), selector(make_tokenizer()), selector(other_template_tokenizer())
    assert old.fingerprint == same.fingerprint and Hasher.hash(old) == Hasher.hash(same)
    assert old.fingerprint != new.fingerprint and Hasher.hash(old) != Hasher.hash(new)
    cached = on_disk.map(old, batched=True)["less_score"]
    remapped = on_disk.map(new, batched=True)["less_score"]
    fresh = pool.map(new, batched=True)["less_score"]  # in memory: never cached
    np.testing.assert_allclose(remapped, fresh, atol=1e-6)
    assert not np.allclose(remapped, cached, atol=1e-6)

    def rds(tok):
        return RepresentationSelector(Dataset.from_list(TARGETS), "rds", model=make_model(len(tokenizer)),
                                      tokenizer=tok, max_length=64, show_progress=False)

    assert rds(tokenizer).fingerprint == rds(make_tokenizer()).fingerprint
    assert rds(tokenizer).fingerprint != rds(other_template_tokenizer()).fingerprint
    torch.testing.assert_close(rds(tokenizer).target_features, rds(other_template_tokenizer()).target_features)
