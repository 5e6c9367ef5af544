"""LessSFTConfig: read from the command line, every value checked, the budget convention, featurizer options."""

import pytest
from datasets import Dataset
from transformers import HfArgumentParser

from hf_less import LessSFTConfig, LessSFTTrainer

from tests.testing_utils import POOL, make_model
from tests.testing_utils import FEW_TARGETS as TARGETS
from tests.testing_utils import trainer_config as config
from tests.testing_utils import work_config as _config


def test_config_is_read_from_the_command_line(tmp_path):
    (c,) = HfArgumentParser(LessSFTConfig).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--less_budget", "0.25", "--less_strategy", "random",
         "--less_lora_target_modules", "q_proj", "v_proj", "--less_proj_dim", "0", "--less_warmup_dir", "w",
         "--learning_rate", "1e-4", "--use_cpu", "true"])
    assert (c.less_budget_value, c.less_strategy, c.less_lora_target_modules) == (0.25, "random", ["q_proj", "v_proj"])
    assert c.less_projection_dim is None and c.less_warmup_dir == "w" and c.learning_rate == 1e-4
    assert (c.less_warmup_fraction, c.less_warmup_epochs) == (0.05, 4)  # the paper's defaults
    assert config(tmp_path, less_budget=300).less_budget_value == 300


@pytest.mark.parametrize("kw,message", [({"less_budget": 0}, r"less_budget=0 must be a count >= 1"),
                                        ({"less_budget": -2}, r"less_budget=-2 must be a count >= 1"),
                                        ({"less_budget": 2.5}, r"less_budget=2.5 as a fraction must be in \(0, 1\]"),
                                        ({"less_budget": 300.0}, r"less_budget=300.0 .*give the int 300"),
                                        ({"less_budget": "1.5"}, r"less_budget=1.5 as a fraction"),
                                        ({"less_strategy": "best"}, "less_strategy"),
                                        ({"less_warmup_fraction": 0}, "less_warmup_fraction"),
                                        ({"less_compile_projection": True, "less_proj_kind": "sparse"},
                                         r"less_compile_projection compiles the row-shift projection: it needs "
                                         r"less_proj_kind='rowshift' and a less_proj_dim \(got less_proj_kind='sparse'"),
                                        ({"less_compile_projection": True, "less_proj_dim": 0},
                                         r"less_proj_dim=None\). Turn less_compile_projection off")])
def test_config_refuses_bad_values(tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        config(tmp_path, **kw)


def test_config_budget_is_the_selectors_convention(tmp_path):
    """1 is one example and 1.0 the whole pool, from Python and from the command line alike (issue 15)."""
    from hf_less.selection import strategies as selectors

    parse = lambda text: HfArgumentParser(LessSFTConfig).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--use_cpu", "true", "--less_budget", text])[0].less_budget_value
    for given, want in ((1, 1), (1.0, 12), ("1", 1), ("1.0", 12), (0.25, 3), (12, 12), (0.001, 1)):
        budget = config(tmp_path, less_budget=given).less_budget_value
        assert selectors.resolve_budget(budget, len(POOL)) == want, given
        if isinstance(given, str):
            assert parse(given) == budget and type(parse(given)) is type(budget)
    assert (type(parse("1")), type(parse("1.0"))) == (int, float)
    with pytest.raises(SystemExit):  # argparse reports the convention's message and exits
        parse("0")


def test_config_options_reach_the_featurizer_arguments(tmp_path):
    from hf_less import LessSFTConfig

    a = LessSFTConfig(output_dir=str(tmp_path), less_autocast=True, less_auto_batch_size=True, use_cpu=True)
    assert a.less_featurize_batch_size == "auto" and a.less_autocast is True
    b = LessSFTConfig(output_dir=str(tmp_path), less_batch_size=3, use_cpu=True)
    assert b.less_featurize_batch_size == 3 and b.less_autocast is False


def test_config_refuses_an_unknown_pool_direction(tmp_path):
    from hf_less import LessSFTConfig

    assert LessSFTConfig(output_dir=str(tmp_path), use_cpu=True, less_pool_direction="sgd").less_pool_direction == "sgd"
    with pytest.raises(ValueError, match="less_pool_direction='plain' must be one of"):
        LessSFTConfig(output_dir=str(tmp_path), use_cpu=True, less_pool_direction="plain")


def test_budget_outside_the_pool_fails_before_any_work(tokenizer, tmp_path):
    pool = Dataset.from_list(POOL)
    with pytest.raises(ValueError, match="budget=13 must be between 1 and the pool size 12.*fraction"):
        LessSFTTrainer(make_model(len(tokenizer)), args=_config(tmp_path, less_budget=13), train_dataset=pool,
                       target_dataset=TARGETS, processing_class=tokenizer)
    with pytest.raises(ValueError, match="less_budget=0 must be a count >= 1"):
        _config(tmp_path, less_budget=0)
    assert not (tmp_path / "out").exists()
