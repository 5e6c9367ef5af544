"""``hf-less demo``: the whole pipeline on BIG-bench with the default model, scaled to a time budget."""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Sequence
from typing import Any

from ..selection.strategies import resolve_budget
from ..training.layout import RunLayout
from ..utils.io import atomic_write_json
from .arguments import (
    DEMO_SCALING,
    DataArguments,
    DemoArguments,
    EvaluateArguments,
    FeaturizeArguments,
    ModelArguments,
    ReportArguments,
    RunArguments,
    SelectArguments,
    TrainArguments,
    WarmupArguments,
)
from .pipeline import (
    RunData,
    _device,
    _write_run_info,
    do_evaluate,
    do_featurize,
    do_plan,
    do_report,
    do_select,
    do_train,
    do_warmup,
    load_model,
    make_selector,
    prepare_data,
    run_layout,
)
from .progress import _say
from .report import load_evaluation, precision

# -- demo ----------------------------------------------------------------------------------------


def _apply_demo_scaling(args: Sequence[Any]) -> list[str]:
    """Scale options left at their defaults to the demo's values; returns lines saying what changed."""
    from dataclasses import fields

    by_name = {type(a).__name__: a for a in args}
    lines = []
    for cls_name, name, value, reference in DEMO_SCALING:
        obj = by_name[cls_name]
        default = next(f for f in fields(obj) if f.name == name).default
        if getattr(obj, name) == default:
            setattr(obj, name, value)
            lines.append(f"  --{name} {value} (default {default}; LESS reference: {reference})")
    return lines


def _list_tasks() -> None:
    from .bigbench import BigBenchArchive

    bb = BigBenchArchive()
    for name in bb.task_names():
        print(f"{name:48s} {bb.count(name):8d}")


class _Clock:
    """Wall time per stage, for the printed summary and the report."""

    def __init__(self):
        self.start = time.time()
        self.stages: dict[str, float] = {}

    def stage(self, name: str):
        clock = self

        class _Stage:
            def __enter__(self):
                self.t = time.time()

            def __exit__(self, *exc):
                clock.stages[name] = time.time() - self.t

        return _Stage()

    @property
    def elapsed(self) -> float:
        return time.time() - self.start


def _prepare_demo_dir(layout: RunLayout) -> None:
    """A fresh run: clear what an earlier demo wrote there; refuse a directory hf-less did not write."""
    import shutil

    if layout.root.exists() and any(layout.root.iterdir()):
        if not layout.run_info.exists():
            raise FileExistsError(f"{layout.root} exists and is not an hf-less run directory; pick another --run_dir.")
        for p in (layout.data, layout.warmup, layout.features, layout.selections, layout.train, layout.report):
            shutil.rmtree(p, ignore_errors=True)
        for p in (layout.evaluation, layout.run_info):
            p.unlink(missing_ok=True)
    layout.root.mkdir(parents=True, exist_ok=True)


def run_demo(run: RunArguments, data: DataArguments, model_args: ModelArguments, warm: WarmupArguments,
             feat: FeaturizeArguments, sel: SelectArguments, tr: TrainArguments, demo: DemoArguments) -> dict:
    """warmup -> features -> LESS and random selections -> (LoRA training -> target loss) -> report."""
    if demo.list_tasks:
        _list_tasks()
        return {}
    import platform

    import torch

    clock = _Clock()
    layout = run_layout(run)
    scaled = _apply_demo_scaling([run, data, model_args, warm, feat, sel, tr])
    _say(f"hf-less demo: {data.dataset} + {model_args.model} on {_device(run)} "
         f"({os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} thread(s)), "
         f"time budget {demo.time_budget:g} min")
    if scaled:
        _say("scaled to fit a small CPU (pass an option to override it):\n" + "\n".join(scaled))
    _prepare_demo_dir(layout)
    data.rebuild_data = True
    with clock.stage("load model"):
        model, tokenizer = load_model(model_args, run)
        base = copy.deepcopy(model)  # a pristine copy: SFTTrainer and LessSelector wrap models in place
    with clock.stage("data"):
        rd = prepare_data(run, data, model_args, tokenizer)
    settings = {
        "model": model_args.model, "device": _device(run), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "pool": f"{len(rd.pool)} examples", "max_length": model_args.max_length, "LoRA": f"r={model_args.lora_r}, "
        f"alpha={model_args.lora_alpha}, {'/'.join(model_args.lora_target_modules)}",
        "warmup": f"{warm.warmup_fraction:.0%} of the pool, {warm.warmup_epochs} epochs",
        "proj_dim": feat.proj_dim, "budget": sel.budget, "targets": len(rd.targets),
        "eval": 0 if rd.eval is None else len(rd.eval),
    }
    _write_run_info(layout, target_task=rd.target_task, settings=settings,
                    title=f"hf-less demo: selecting for {rd.target_task!r}")
    with clock.stage("plan"):  # a few measured batches: what each stage should take here
        plan = do_plan(base, tokenizer, rd, layout, model_args, warm, feat, sel, tr, measure_steps=2, sample_size=64)
    _say(plan.table())
    _write_run_info(layout, plan={s.name: round(s.seconds, 1) for s in plan.stages})

    with clock.stage("warmup"):
        do_warmup(model, tokenizer, rd, layout, model_args, warm, run)
    from ..training.warmup import warmup_size

    n_warm = warmup_size(len(rd.pool), warm.warmup_fraction)
    train_rate = n_warm * warm.warmup_epochs / max(clock.stages["warmup"], 1e-6)  # examples per second
    del model
    with clock.stage("target features"):
        selector = make_selector(copy.deepcopy(base), tokenizer, rd, layout, model_args, feat, run)
    if not demo.no_scaling:
        _fit_pool_to_time(rd, layout, demo, sel, tr, clock, train_rate, len(selector.checkpoints))
    with clock.stage("pool features"):
        scores, sims = do_featurize(selector, rd, layout, feat.store_dtype)
    with clock.stage("select"):
        sel.name = sel.name or "LESS"
        less_name, less_idx = do_select(selector, scores, sims, rd, layout, sel, run)
        rand_args = SelectArguments(strategy="random", budget=sel.budget, name="random")
        _, rand_idx = do_select(selector, scores, sims, rd, layout, rand_args, run)
    del selector

    # Training two adapters plus three evaluations, estimated from the warmup's measured speed.
    estimate = _training_seconds(len(less_idx), tr, rd, train_rate)
    left = demo.time_budget * 60 - clock.elapsed
    trained = False
    if demo.skip_training or rd.eval is None:
        _say("training skipped: " + ("--skip_training" if demo.skip_training else "no held-out split"))
    elif estimate > left:
        _say(f"training skipped: about {estimate:.0f} s needed at the warmup's {train_rate:.2f} examples/s, "
             f"{max(0, left):.0f} s left of the {demo.time_budget:g} min budget")
    else:
        ev = EvaluateArguments()
        with clock.stage("evaluate zero-shot"):
            do_evaluate(copy.deepcopy(base), tokenizer, rd, layout, model_args, ev, run)
        for name in ("random", less_name):
            with clock.stage(f"train {name}"):
                do_train(copy.deepcopy(base), tokenizer, rd, layout, model_args,
                         TrainArguments(selection=name, train_epochs=tr.train_epochs,
                                        train_learning_rate=tr.train_learning_rate), run)
            with clock.stage(f"evaluate {name}"):
                do_evaluate(copy.deepcopy(base), tokenizer, rd, layout, model_args,
                            EvaluateArguments(adapter=name), run)
        trained = True
    clock.stages["total"] = clock.elapsed
    _write_run_info(layout, timings=clock.stages)
    do_report(layout, ReportArguments(), rd.task_column)
    summary = _demo_summary(rd, less_name, less_idx, rand_idx, layout, clock, trained, sel.strategy)
    _write_run_info(layout, summary=summary)
    return summary


# Measured here (SmolLM2-135M, LoRA r=8, 2-core CPU): featurizing one example at one checkpoint costs
# 0.25-0.55 of a warmup training step per example (no optimizer; proj_dim 512-1024), an evaluation
# forward about 0.45. The demo plans with the pessimistic end.
FEATURE_COST = 0.45
EVAL_COST = 0.45


def _training_seconds(k: int, tr: TrainArguments, rd: RunData, train_rate: float) -> float:
    """Two LoRA trainings on k examples and three evaluations, at the warmup's examples per second."""
    n_eval = 0 if rd.eval is None else len(rd.eval)
    return (2 * k * tr.train_epochs + 3 * n_eval * EVAL_COST) / train_rate + 20


def _fit_pool_to_time(rd: RunData, layout: RunLayout, demo: DemoArguments, sel: SelectArguments,
                      tr: TrainArguments, clock: _Clock, train_rate: float, checkpoints: int) -> None:
    """Shrink the pool (same share per task) so featurizing it fits the time left, at the measured speed."""
    per_example = FEATURE_COST * checkpoints / train_rate
    n = len(rd.pool)
    reserve = 0.0 if demo.skip_training else _training_seconds(
        resolve_budget(sel.budget, n), tr, rd, train_rate)
    left = demo.time_budget * 60 - clock.elapsed - 30  # 30 s: selection, report, margins
    fits = int((left - reserve) / per_example)
    tasks = rd.pool[rd.task_column] if rd.task_column in rd.pool.column_names else None
    n_tasks = len(set(tasks)) if tasks is not None else 1
    floor = 4 * n_tasks
    if fits >= n:
        _say(f"time: about {n * per_example:.0f} s to featurize the {n}-example pool "
             f"({1 / per_example:.2f} examples/s estimated from the warmup's {train_rate:.2f}); it fits")
        return
    # Never fewer than 4 examples per task; whether training still fits is decided after featurizing,
    # from the time actually left.
    keep_n = max(floor, fits)
    if tasks is None:
        keep = list(range(min(n, keep_n)))
    else:  # the first rows of every task in pool order: the task mix (and the target's share) is kept
        per_task = max(1, keep_n // n_tasks)
        seen: dict[str, int] = {}
        keep = []
        for i, t in enumerate(tasks):
            if seen.get(t, 0) < per_task:
                seen[t] = seen.get(t, 0) + 1
                keep.append(i)
    if len(keep) >= n:
        return
    _say(f"time: scaled the pool from {n} to {len(keep)} examples to fit {demo.time_budget:g} min at the measured "
         f"speed (about {1 / per_example:.2f} examples/s featurized; --no_scaling keeps the whole pool)")
    rd.pool = rd.pool.select(keep).flatten_indices()
    import shutil

    tmp = layout.data / "pool.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    rd.pool.save_to_disk(str(tmp))
    shutil.rmtree(layout.data / "pool")
    os.replace(tmp, layout.data / "pool")
    meta_path = layout.data / "data.json"
    meta = json.loads(meta_path.read_text())
    meta.update(pool=len(rd.pool), scaled_from=n)
    atomic_write_json(meta_path, meta)
    _write_run_info(layout, settings={"pool": f"{len(rd.pool)} examples (scaled from {n} to fit the time budget)"})


def _demo_summary(rd: RunData, less_name, less_idx, rand_idx, layout: RunLayout, clock: _Clock, trained: bool,
                  sel_strategy: str = "topk") -> dict:
    tasks = rd.pool[rd.task_column] if rd.task_column in rd.pool.column_names else None
    summary: dict[str, Any] = {"target_task": rd.target_task, "pool": len(rd.pool), "k": len(less_idx),
                               "seconds": round(clock.elapsed)}
    lines = ["", "=" * 72]
    if tasks is not None and rd.target_task:
        in_pool = sum(t == rd.target_task for t in tasks)
        p_less = precision(tasks, less_idx, rd.target_task)
        p_rand = precision(tasks, rand_idx, rd.target_task)
        summary.update(pool_share=in_pool / len(tasks), precision_less=p_less, precision_random=p_rand)
        lines += [f"target task {rd.target_task!r}: {in_pool} of {len(tasks)} pool examples "
                  f"({in_pool / len(tasks):.1%})",
                  f"{less_name + ' (' + sel_strategy + ')':16s} {len(less_idx):3d} examples: {p_less:.0%} from the target task",
                  f"{'random':16s} {len(rand_idx):3d} examples: {p_rand:.0%} from the target task"]
    if trained and layout.evaluation.exists():
        losses, _ = load_evaluation(layout.evaluation)
        summary["losses"] = losses
        lines += ["held-out target loss: " + ", ".join(f"{k} {v:.3f}" for k, v in losses.items())]
    lines += ["time: " + ", ".join(f"{k} {v:.0f} s" for k, v in clock.stages.items() if k != "total"),
              f"done in {clock.elapsed:.0f} s; report: {layout.report / 'report.md'}", "=" * 72]
    _say("\n".join(lines))
    return summary
