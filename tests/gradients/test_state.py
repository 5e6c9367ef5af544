"""LESS state on disk: find_checkpoints refuses checkpoints of different warmup runs, names deleted ones,
and says how to make a warmup where there is none."""

import shutil

import pytest
from datasets import Dataset
from transformers import Trainer, TrainingArguments

from hf_less import LessCallback, LessSelector
from hf_less.gradients.state import find_checkpoints

from tests.testing_utils import TARGETS, collator, make_lora_model, make_model, tokenized_dataset, trainer_for


@pytest.fixture(scope="module")
def warm(tmp_path_factory, tokenizer):
    """One LessSFTTrainer selection with a 2-epoch warmup (2 steps per epoch: checkpoint-2, checkpoint-4)."""
    out = tmp_path_factory.mktemp("warm")
    trainer_for(out, tokenizer).select_data()
    return out


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


def test_warmup_without_less_state_says_how_to_make_one(tmp_path):
    (tmp_path / "checkpoint-5").mkdir()
    with pytest.raises(FileNotFoundError, match="no LESS state.*LessCallback"):
        find_checkpoints(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_checkpoints(tmp_path / "nope")
