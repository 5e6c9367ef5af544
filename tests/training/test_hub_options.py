"""The hub correction as an option: LessSFTConfig.less_hub_*, the CLI's --hub_*, and the trainer passing them on."""

import numpy as np
import pytest
from datasets import Dataset
from transformers import HfArgumentParser

from hf_less import LessSelector, LessSFTConfig, LessSFTTrainer
from hf_less.cli.arguments import FeaturizeArguments
from hf_less.selection.record import load_pool_scores, load_selection

from tests.testing_utils import POOL, TARGETS, lora_config, make_model, trainer_config, write_fake_warmup


def test_config_reads_the_hub_options_and_refuses_bad_ones(tmp_path):
    (a,) = HfArgumentParser(LessSFTConfig).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--use_cpu", "--less_hub_correction", "csls", "--less_hub_csls_k", "3"])
    assert (a.less_hub_correction, a.less_hub_csls_k, a.less_hub_pca_components) == ("csls", 3, 1)
    assert LessSFTConfig(output_dir=str(tmp_path), use_cpu=True).less_hub_correction is None  # LESS as published
    with pytest.raises(ValueError, match="less_hub_correction='whiten' is not one of None, 'center', 'pca', 'csls'"):
        LessSFTConfig(output_dir=str(tmp_path), use_cpu=True, less_hub_correction="whiten")
    with pytest.raises(ValueError, match="less_hub_pca_components=0 must be >= 1"):
        LessSFTConfig(output_dir=str(tmp_path), use_cpu=True, less_hub_correction="pca", less_hub_pca_components=0)


def test_cli_reads_the_hub_options_and_refuses_bad_ones():
    (f,) = HfArgumentParser(FeaturizeArguments).parse_args_into_dataclasses(
        ["--hub_correction", "pca", "--hub_pca_components", "2"])
    assert (f.hub_correction, f.hub_pca_components) == ("pca", 2)
    assert FeaturizeArguments().hub_correction is None
    with pytest.raises(ValueError, match="hub_correction='whiten' is not one of"):
        FeaturizeArguments(hub_correction="whiten")


def test_trainer_scores_with_the_correction_and_records_it(tmp_path, tokenizer):
    warm = write_fake_warmup(tmp_path / "warm", tokenizer)
    common = dict(less_warmup_dir=str(warm), less_lora_r=4, less_lora_alpha=8)

    def run(out, **kw):
        trainer = LessSFTTrainer(make_model(len(tokenizer)), args=trainer_config(tmp_path / out, **common, **kw),
                                 train_dataset=Dataset.from_list(POOL), target_dataset=Dataset.from_list(TARGETS),
                                 processing_class=tokenizer, peft_config=lora_config())
        trainer.select_data()
        return load_selection(tmp_path / out), load_pool_scores(tmp_path / out)

    plain, plain_scores = run("plain")
    hub, hub_scores = run("csls", less_hub_correction="csls", less_hub_csls_k=1)
    assert hub.extra["settings"]["less_hub_correction"] == "csls"  # part of what a reused selection must match
    assert plain.extra["settings"]["less_hub_correction"] is None
    # csls with k = 1: each row's score minus its largest similarity to a target
    selector = LessSelector(make_model(len(tokenizer)), warm, TARGETS, tokenizer=tokenizer, proj_dim=64,
                            max_length=64, show_progress=False)
    sims = selector.score(Dataset.from_list(POOL))[1]
    np.testing.assert_allclose(plain_scores, sims.mean(1), atol=1e-5)
    np.testing.assert_allclose(hub_scores, sims.mean(1) - sims.max(1), atol=1e-5)
