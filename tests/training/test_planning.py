"""hf_less.training.planning: the projected stages of a run, checked against the same run done for real."""

import copy
import time

import numpy as np
import pytest
import torch
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


# CPU seconds of this process (one torch thread): on this shared 2-core machine the wall time of the same
# 40 training steps, run twice back to back, differed by up to 2x (other jobs' load); the CPU time the
# run itself takes does not depend on them. The plan measures with the same clock.
CLOCK = time.process_time


@pytest.fixture
def one_thread():
    """One torch thread: on a shared 2-core machine, timings with two threads swing with the other load."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _actual_run(base, tokenizer, pool, targets, layout, model_args, run) -> dict[str, float]:
    """The stages the plan projects, done for real as the CLI does them: CPU seconds per stage."""
    actual = {}
    t0 = CLOCK()
    sft_train(copy.deepcopy(base), tokenizer, warmup_subset(pool, 0.5, 0), layout.warmup, model_args, run, 2, 1e-3,
              save_each_epoch=True, callbacks=[LessCallback()], desc="warmup")
    actual["warmup"] = CLOCK() - t0
    t0 = CLOCK()
    selector = LessSelector(copy.deepcopy(base), layout.warmup, text_only(targets), tokenizer=tokenizer, proj_dim=64,
                            max_length=64, batch_size=4, show_progress=False)
    store = selector.featurize(text_only(pool), layout.store, shard_rows=_shard_rows(selector), dtype="int8")
    actual["featurize"] = CLOCK() - t0
    t0 = CLOCK()
    selector.score_store(store)
    actual["scoring"] = CLOCK() - t0
    # k rows drawn at random: the plan costs the pool's mean row (which rows LESS keeps is not known before;
    # here it keeps the short additions, whose steps are faster)
    k = resolve_budget(0.5, len(pool))
    rows = np.random.default_rng(0).permutation(len(pool))[:k].tolist()
    t0 = CLOCK()
    sft_train(copy.deepcopy(base), tokenizer, pool.select(rows), layout.train / "x", model_args, run, 2, 1e-3,
              save_each_epoch=False)
    actual["final training"] = CLOCK() - t0
    return actual


def test_plan_predicts_a_small_run_within_30_percent(tmp_path, tokenizer, one_thread):
    pool = Dataset.from_list(toy_tasks(80, seed=4))  # 160 rows: 40 steps per training, enough to time
    targets = Dataset.from_list([r for r in toy_tasks(4, seed=5) if r["task"] == "math"])
    base = make_model(len(tokenizer), hidden=64)
    model_args = ModelArguments(model="tiny", max_length=64, lora_r=4, lora_alpha=8, lora_dropout=0.0, batch_size=4)
    warm = WarmupArguments(warmup_fraction=0.5, warmup_epochs=2, warmup_learning_rate=1e-3)
    feat = FeaturizeArguments(proj_dim=64, store_dtype="int8")
    sel = SelectArguments(budget=0.5)
    tr = TrainArguments(train_epochs=2, train_learning_rate=1e-3)
    # Plan, run, plan, run: the faster of each pair is compared (what is left of other jobs' effect on
    # this process's CPU time: shared caches).
    plans, actuals = [], []
    for i in range(2):
        layout = RunLayout(tmp_path / f"run{i}")
        layout.root.mkdir()
        run = RunArguments(run_dir=str(layout.root), device="cpu", quiet=True)
        plans.append(do_plan(copy.deepcopy(base), tokenizer, RunData(pool, targets, None, None, "task"), layout,
                             model_args, warm, feat, sel, tr, measure_steps=16, sample_size=160, clock=CLOCK))
        actuals.append(_actual_run(base, tokenizer, pool, targets, layout, model_args, run))
    report = {}
    for name in actuals[0]:
        planned, actual = min(p.seconds(name) for p in plans), min(a[name] for a in actuals)
        report[name] = (round(planned, 2), round(actual, 2))
    for name, (planned, actual) in report.items():
        slack = 0.25 if name == "scoring" else 0.0  # milliseconds here: timer noise, not the model
        assert abs(planned - actual) <= 0.3 * actual + slack, report
    print("plan vs actual CPU seconds:", report)
    plan = plans[0]
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
