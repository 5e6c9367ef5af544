"""Errors and warnings that name what the user set (issue 23, item 6)."""

from __future__ import annotations

import pytest
from datasets import Dataset

from hf_less import LessCallback, LessSFTConfig, LessSFTTrainer

from tests.testing_utils import FEW_TARGETS, POOL, make_model, work_config, work_selector


@pytest.mark.parametrize("proj_dim", [1, 2, 3])
def test_a_proj_dim_below_the_sparse_nnz_names_proj_dim(tokenizer, work, tmp_path, proj_dim):
    """The old error was about nnz, which the user never set."""
    with pytest.raises(ValueError, match=rf"^proj_dim={proj_dim} is too small for the sparse projection.*proj_dim must "
                                         r"be at least 4.*Use proj_dim >= 4"):
        work_selector(tokenizer, work, proj_dim=proj_dim, proj_kind="sparse")
    with pytest.raises(ValueError, match=rf"less_proj_dim={proj_dim} is too small.*less_proj_dim must be at least 4"):
        LessSFTConfig(output_dir=str(tmp_path), less_proj_dim=proj_dim, less_proj_kind="sparse", use_cpu=True,
                      report_to=[])
    with pytest.raises(ValueError, match=rf"proj_dim={proj_dim} is too small"):  # at construction, not at the first save
        LessCallback(pool=POOL, proj_dim=proj_dim, proj_kind="sparse")


def test_small_proj_dims_that_work_are_accepted(tokenizer, work, tmp_path):
    assert work_selector(tokenizer, work, proj_dim=4, proj_kind="sparse").featurizer.dim == 4
    assert work_selector(tokenizer, work, proj_dim=2, proj_kind="rademacher").featurizer.dim == 2
    assert work_selector(tokenizer, work, proj_dim=2).featurizer.dim == 2  # the row-shift default: any d >= 1
    LessSFTConfig(output_dir=str(tmp_path), less_proj_dim=0, use_cpu=True, report_to=[])  # exact features
    with pytest.raises(ValueError, match="proj_dim=-1 must be a positive int"):
        work_selector(tokenizer, work, proj_dim=-1)


def test_trainer_warns_when_skipped_rows_leave_fewer_than_the_budget(tokenizer, work, tmp_path):
    long_prompt = [{"prompt": "x" * 80 + str(i), "completion": " 1", "task": "math"} for i in range(2)]  # cut at 64
    pool = Dataset.from_list(POOL + long_prompt)
    trainer = LessSFTTrainer(
        make_model(len(tokenizer)), processing_class=tokenizer, train_dataset=pool, target_dataset=FEW_TARGETS,
        args=work_config(tmp_path, less_warmup_dir=str(work / "warmup"), less_budget=13, less_proj_dim=64,
                         less_on_empty_completion="skip"))
    with pytest.warns(UserWarning, match=r"Only 12 of the 14 pool rows can be selected \(the others were skipped: no "
                                         r"completion token left after truncation to max_length=64\), fewer than the "
                                         r"budget of 13.*training on 12 examples"):
        chosen = trainer.select_data()
    assert sorted(chosen) == list(range(12))
