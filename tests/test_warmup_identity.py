"""Warmup run identity, selection reuse, and the warmup's LR schedule (issue 15, items 3, 4, 6, 10)."""

import json
import logging
import shutil

import numpy as np
import pytest
import torch
from datasets import Dataset, load_from_disk
from datasets.fingerprint import Hasher
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

from hf_less import LessCallback, LessSelector, LessSFTTrainer
from hf_less.scoring.representations import RepresentationSelector
from hf_less.gradients.state import RUN_FILE, find_checkpoints
from hf_less.selection.record import load_pool_scores, load_selection
from hf_less.training.warmup import warmup_lr_factor

from tests.testing_utils import (POOL, TARGETS, as_format, collator, make_lora_model, make_model, make_tokenizer,
                                 tokenized_dataset, trainer_for)


class Recomputed(Exception):
    """Raised by a patched step: the selection was computed again instead of reused."""


@pytest.fixture(scope="module")
def warm(tmp_path_factory, tokenizer):
    """One LessSFTTrainer selection with a 2-epoch warmup (2 steps per epoch: checkpoint-2, checkpoint-4)."""
    out = tmp_path_factory.mktemp("warm")
    trainer_for(out, tokenizer).select_data()
    return out


def other_template_tokenizer():
    tok = make_tokenizer()
    tok.chat_template = tok.chat_template.replace("</s>{% endfor %}", "</s>\n{% endfor %}")
    return tok


# -- item 10 and 6: the warmup schedule ----------------------------------------------------------------


def test_warmup_lr_factor_is_positive_at_every_step():
    assert [warmup_lr_factor(s, 1, 1) for s in range(1)] == [0.5]
    assert [warmup_lr_factor(s, 1, 2) for s in range(2)] == [0.5, 1.0]
    factors = [warmup_lr_factor(s, 3, 100) for s in range(100)]  # ceil(3% of 100) warmup steps
    assert factors[:5] == [0.25, 0.5, 0.75, 1.0, 96 / 97]
    assert all(0 < f <= 1 for f in factors) and factors[-1] == pytest.approx(1 / 97)
    assert factors == sorted(factors[:4]) + sorted(factors[4:], reverse=True)


def test_a_one_step_warmup_has_usable_weights(tmp_path, tokenizer):
    """One optimizer step per epoch, one epoch: the only step ran at a positive LR, and that LR is recorded."""
    trainer = trainer_for(tmp_path, tokenizer, less_warmup_epochs=1, less_warmup_fraction=0.25, less_budget=2,
                          less_lora_dropout=0.0)
    assert len(trainer.select_data()) == 2
    (ckpt,) = find_checkpoints(tmp_path / "less_warmup")
    assert ckpt.step == 1 and ckpt.state["lr_steps"] == 1 and ckpt.weight == 1.0
    assert ckpt.mean_lr == pytest.approx(2e-3 * 0.5)  # warmup_lr_factor(0, 1, 1) of the peak LR
    # Independently: one Adam step from zero moments moves every lora_B entry (B starts at 0) by
    # lr * g / (|g| + eps), so the largest |B| is the LR the step actually applied.
    b = [v for k, v in load_file(ckpt.path / "adapter_model.safetensors").items() if "lora_B" in k]
    assert max(float(t.abs().max()) for t in b) == pytest.approx(ckpt.mean_lr, rel=1e-4)
    assert np.isfinite(load_pool_scores(tmp_path)).all()


def test_two_one_step_epochs_weight_by_the_applied_lrs(tmp_path, tokenizer):
    trainer_for(tmp_path, tokenizer, less_warmup_epochs=2, less_warmup_fraction=0.25, less_budget=2).select_data()
    ckpts = find_checkpoints(tmp_path / "less_warmup")
    assert [c.step for c in ckpts] == [1, 2]
    assert [c.mean_lr for c in ckpts] == pytest.approx([1e-3, 2e-3])
    assert [c.weight for c in ckpts] == pytest.approx([1 / 3, 2 / 3])


# -- item 3: stale warmup checkpoints --------------------------------------------------------------------


def test_a_rerun_with_fewer_epochs_restarts_the_warmup(warm, tmp_path, tokenizer, caplog):
    out = tmp_path / "out"
    shutil.copytree(warm, out)
    assert [c.step for c in find_checkpoints(out / "less_warmup")] == [2, 4]
    with caplog.at_level(logging.WARNING, logger="hf_less.training.trainer"):
        rerun = trainer_for(out, tokenizer, less_warmup_epochs=1)
        rerun.select_data()
    restart = [r.getMessage() for r in caplog.records if "Restarting the LESS warmup" in r.getMessage()]
    assert len(restart) == 1
    assert "['checkpoint-2', 'checkpoint-4']" in restart[0] and "settings.less_warmup_epochs: 2 -> 1" in restart[0]
    # only the new run's checkpoint is left, and the scores are those of a warmup in a clean directory
    assert [c.step for c in find_checkpoints(out / "less_warmup")] == [2]
    assert json.loads((out / "less_warmup" / RUN_FILE).read_text())["settings"]["less_warmup_epochs"] == 1
    clean = tmp_path / "clean"
    trainer_for(clean, tokenizer, less_warmup_epochs=1).select_data()
    np.testing.assert_allclose(load_pool_scores(out), load_pool_scores(clean), atol=1e-6)
    assert rerun.selected_indices == load_selection(clean).indices


def test_a_directory_mixing_two_runs_is_refused(warm, tmp_path, tokenizer):
    """checkpoint-4 of a 2-epoch run copied beside checkpoint-2 of a 1-epoch run at another LR."""
    other = tmp_path / "other"
    trainer_for(other, tokenizer, less_warmup_epochs=1, less_warmup_learning_rate=1e-3).select_data()
    mixed = other / "less_warmup"
    shutil.copytree(warm / "less_warmup" / "checkpoint-4", mixed / "checkpoint-4")
    pattern = (r"come from 2 different warmup runs.*\['checkpoint-4'\] differ from \['checkpoint-2'\] in .*"
               r"settings\.less_warmup_epochs: 1 -> 2.*settings\.less_warmup_learning_rate: 0\.001 -> 0\.002")
    with pytest.raises(ValueError, match=pattern):
        find_checkpoints(mixed)
    with pytest.raises(ValueError, match="different warmup runs"):
        LessSelector(make_model(len(tokenizer)), mixed, Dataset.from_list(TARGETS), tokenizer=tokenizer,
                     proj_dim=64, max_length=64, show_progress=False)
    # one run's steps alone are accepted
    assert [c.step for c in find_checkpoints(mixed, steps=[2])] == [2]


def plain_warmup(out, tokenizer, epochs, **kw):
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=4, num_train_epochs=epochs,
                             learning_rate=1e-3, save_strategy="epoch", report_to=[], use_cpu=True, seed=0,
                             disable_tqdm=True, **kw)
    Trainer(model=make_lora_model(tokenizer, random_b=False), args=args, train_dataset=tokenized_dataset(tokenizer),
            data_collator=collator, callbacks=[LessCallback()]).train()


def test_a_plain_trainer_rerun_with_fewer_epochs_is_refused(tmp_path, tokenizer):
    """A Trainer + LessCallback warmup rerun into its own output_dir: the Trainer's run length tells them apart."""
    plain_warmup(tmp_path, tokenizer, epochs=2)  # 16 rows, 4 steps per epoch: checkpoint-4, checkpoint-8
    plain_warmup(tmp_path, tokenizer, epochs=1)  # rewrites checkpoint-4 only
    with pytest.raises(ValueError, match=r"\['checkpoint-8'\] differ from \['checkpoint-4'\] in "
                                         r"trainer\.max_steps: 4 -> 8; trainer\.num_train_epochs: 1 -> 2"):
        find_checkpoints(tmp_path)


def test_checkpoints_deleted_by_save_total_limit_are_named(tmp_path, tokenizer):
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=4,
                             learning_rate=1e-3, save_strategy="steps", save_steps=1, save_total_limit=2,
                             report_to=[], use_cpu=True, seed=0, disable_tqdm=True)
    Trainer(model=make_lora_model(tokenizer, random_b=False), args=args, train_dataset=tokenized_dataset(tokenizer),
            data_collator=collator, callbacks=[LessCallback()]).train()
    with pytest.warns(UserWarning, match=r"no longer there.*at least those of steps \[2\].*renormalised over the "
                                         r"surviving checkpoints \['checkpoint-3', 'checkpoint-4'\]"):
        ckpts = find_checkpoints(tmp_path)
    assert [c.weight for c in ckpts] == pytest.approx([c.mean_lr / sum(d.mean_lr for d in ckpts) for c in ckpts])


def test_a_complete_warmup_gives_no_deletion_warning(warm, recwarn):
    find_checkpoints(warm / "less_warmup")
    assert not [w for w in recwarn if "no longer there" in str(w.message)]


# -- item 4: selection reuse -----------------------------------------------------------------------------


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
