"""hf_less.training.planning: the projected stages of a run, checked against the same run done for real."""

import copy

import numpy as np
import pytest
from datasets import Dataset

from hf_less import LessCallback, LessSelector
from hf_less.cli import parse
from hf_less.cli.arguments import (
    FeaturizeArguments, ModelArguments, PlanArguments, RunArguments, SelectArguments, TrainArguments,
    WarmupArguments,
)
from hf_less.cli.pipeline import RunData, _shard_rows, do_plan, sft_train, text_only
from hf_less.gradients.quantize import store_bytes
from hf_less.selection.strategies import resolve_budget
from hf_less.training.layout import RunLayout
from hf_less.training.warmup import warmup_subset

from tests.testing_utils import make_model, toy_tasks


def _actual_run(base, tokenizer, pool, targets, layout, model_args, run) -> dict[str, int]:
    """The stages the plan projects, done for real as the CLI does them: what each stage's cost is a multiple of."""
    actual = {}
    trainer = sft_train(copy.deepcopy(base), tokenizer, warmup_subset(pool, 0.5, 0), layout.warmup, model_args, run,
                        2, 1e-3, save_each_epoch=True, callbacks=[LessCallback()], desc="warmup")
    actual["warmup"] = trainer.state.global_step
    selector = LessSelector(copy.deepcopy(base), layout.warmup, text_only(targets), tokenizer=tokenizer, proj_dim=64,
                            max_length=64, batch_size=4, show_progress=False)
    store = selector.featurize(text_only(pool), layout.store, shard_rows=_shard_rows(selector), dtype="int8")
    checkpoints = len(store.steps)
    actual["featurize"] = (store.num_rows + len(targets)) * checkpoints
    actual["scoring"] = len(selector.score_store(store)[0])  # less_score (N,)
    k = resolve_budget(0.5, len(pool))
    rows = np.random.default_rng(0).permutation(len(pool))[:k].tolist()
    trainer = sft_train(copy.deepcopy(base), tokenizer, pool.select(rows), layout.train / "x", model_args, run, 2,
                        1e-3, save_each_epoch=False)
    actual["final training"] = trainer.state.global_step
    return actual


def test_plan_counts_the_steps_and_rows_of_the_run_it_plans(tmp_path, tokenizer):
    """Each stage's projection is a measured rate times what the real run does: its steps, rows, checkpoints.

    How close the measured rates come to the run's own is a timing, measured by
    ``examples/bench/plan_accuracy.py`` (docs/performance.md), not asserted here.
    """
    pool = Dataset.from_list(toy_tasks(80, seed=4))  # 160 rows
    targets = Dataset.from_list([r for r in toy_tasks(4, seed=5) if r["task"] == "math"])
    base = make_model(len(tokenizer), hidden=64)
    model_args = ModelArguments(model="tiny", max_length=64, lora_r=4, lora_alpha=8, lora_dropout=0.0, batch_size=4)
    warm = WarmupArguments(warmup_fraction=0.5, warmup_epochs=2, warmup_learning_rate=1e-3)
    feat = FeaturizeArguments(proj_dim=64, store_dtype="int8")
    sel = SelectArguments(budget=0.5)
    tr = TrainArguments(train_epochs=2, train_learning_rate=1e-3)
    layout = RunLayout(tmp_path / "run")
    layout.root.mkdir()
    run = RunArguments(run_dir=str(layout.root), device="cpu", quiet=True)
    plan = do_plan(copy.deepcopy(base), tokenizer, RunData(pool, targets, None, None, "task"), layout,
                   model_args, warm, feat, sel, tr, measure_steps=2, sample_size=32)
    actual = _actual_run(base, tokenizer, pool, targets, layout, model_args, run)
    assert {s.name: s.count for s in plan.stages} == actual
    assert actual == {"warmup": 2 * 20, "featurize": (160 + len(targets)) * 2, "scoring": 160,
                      "final training": 2 * 20}
    m = plan.measured
    assert plan.seconds("warmup") == pytest.approx(m["train_fixed_s"] + 40 * m["step_s"])
    assert plan.seconds("final training") == plan.seconds("warmup")  # same steps, same trainer
    assert plan.seconds("scoring") == pytest.approx(160 * m["score_row_s"])
    assert plan.store_bytes == store_bytes("int8", 64, len(pool), 2)
    assert [s.name for s in plan.stages] == ["warmup", "featurize", "scoring", "final training"]
    assert "feature store" in plan.table() and "int8" in plan.table() and plan.int8_bytes is None


def test_a_float_store_plan_gives_the_int8_size_beside_it():
    from hf_less.training.planning import RunPlan, Stage

    plan = RunPlan([Stage("scoring", 90.0, "")], store_bytes("float16", 8192, 10**6, 4), "float16", 10**6,
                   int8_bytes=store_bytes("int8", 8192, 10**6, 4))
    lines = plan.table().splitlines()
    assert lines[-2].split()[:4] == ["feature", "store", "65.55", "GB"]
    assert lines[-1].split()[:4] == ["32.82", "GB", "in", "int8"] and "store dtype 'int8'" in lines[-1]


def test_plan_command_reads_its_options():
    command, args = parse(["plan", "--pool_size", "1000000", "--store_dtype", "int4", "--measure_steps", "6"])
    assert command == "plan"
    plan_args = next(a for a in args if isinstance(a, PlanArguments))
    feat = next(a for a in args if isinstance(a, FeaturizeArguments))
    assert plan_args.pool_size == 10**6 and plan_args.measure_steps == 6 and feat.store_dtype == "int4"
    with pytest.raises(ValueError, match="Unknown feature store dtype 'int2'"):
        parse(["plan", "--store_dtype", "int2"])


def test_less_sft_trainer_logs_the_plan_at_the_start(tmp_path, tokenizer, caplog):
    import logging

    from tests.testing_utils import trainer_for

    trainer = trainer_for(tmp_path / "out", tokenizer, less_plan=True, less_store_dtype="int4")
    with caplog.at_level(logging.INFO, logger="hf_less.training.trainer"):
        trainer.select_data()
    plan = trainer.plan
    assert [s.name for s in plan.stages] == ["warmup", "capture", "scoring", "final training"]
    assert plan.store_format == "int4" and plan.pool_size == len(trainer.pool)
    assert all(s.seconds > 0 for s in plan.stages)
    assert "LESS plan for a pool of" in caplog.text and "int4" in caplog.text
