"""The ``hf-less`` subcommands: each reads its dataclasses and calls the pipeline; ``COMMANDS`` lists them."""

from __future__ import annotations

import json
from typing import Any

from ..training.layout import RunLayout
from .arguments import (
    DataArguments,
    DemoArguments,
    EvaluateArguments,
    FeaturizeArguments,
    ModelArguments,
    PlanArguments,
    ReportArguments,
    RunArguments,
    SelectArguments,
    TrainArguments,
    WarmupArguments,
)
from .demo import run_demo
from .pipeline import (
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
    text_only,
)
from .progress import _say

# -- subcommands -----------------------------------------------------------------------------------


def _task_column(layout: RunLayout) -> str:
    meta = layout.data / "data.json"
    return json.loads(meta.read_text()).get("task_column", "task") if meta.exists() else "task"


def cmd_warmup(run, data, model_args, warm):
    layout = run_layout(run)
    model, tokenizer = load_model(model_args, run)
    rd = prepare_data(run, data, model_args, tokenizer)
    _write_run_info(layout, target_task=rd.target_task)
    do_warmup(model, tokenizer, rd, layout, model_args, warm, run)


def cmd_featurize(run, data, model_args, feat):
    layout = run_layout(run)
    model, tokenizer = load_model(model_args, run)
    rd = prepare_data(run, data, model_args, tokenizer)
    selector = make_selector(model, tokenizer, rd, layout, model_args, feat, run)
    scores, _ = do_featurize(selector, rd, layout, feat.store_dtype)
    _say(f"featurize: {len(scores)} pool examples -> {layout.store}")


def cmd_select(run, data, model_args, feat, sel):
    import numpy as np

    layout = run_layout(run)
    model, tokenizer = load_model(model_args, run)
    rd = prepare_data(run, data, model_args, tokenizer)
    if not layout.store.exists():
        raise FileNotFoundError(f"No feature store at {layout.store}; run `hf-less featurize` first.")
    saved = layout.features / "featurize.json"
    if saved.exists():  # score with the projection and checkpoints the store was written with
        stored = json.loads(saved.read_text())
        feat = FeaturizeArguments(proj_dim=stored["proj_dim"], proj_kind=stored.get("proj_kind", "rademacher"),
                                  pool_direction=stored.get("pool_direction", "adam"),
                                  checkpoints=stored["checkpoints"], store_dtype=stored.get("store_dtype", "float16"),
                                  # scoring options: this command's own, not the store's
                                  hub_correction=feat.hub_correction, hub_pca_components=feat.hub_pca_components,
                                  hub_csls_k=feat.hub_csls_k)
    selector = make_selector(model, tokenizer, rd, layout, model_args, feat, run)
    scores, sims = selector.score_store(layout.store, text_only(rd.pool))
    do_select(selector, np.asarray(scores), np.asarray(sims), rd, layout, sel, run)


def cmd_train(run, data, model_args, tr):
    layout = run_layout(run)
    model, tokenizer = load_model(model_args, run)
    rd = prepare_data(run, data, model_args, tokenizer)
    do_train(model, tokenizer, rd, layout, model_args, tr, run)


def cmd_evaluate(run, data, model_args, ev):
    layout = run_layout(run)
    model, tokenizer = load_model(model_args, run)
    rd = prepare_data(run, data, model_args, tokenizer)
    do_evaluate(model, tokenizer, rd, layout, model_args, ev, run, show_baselines=True)


def cmd_plan(run, data, model_args, warm, feat, sel, tr, plan_args):
    layout = run_layout(run)
    model, tokenizer = load_model(model_args, run)
    rd = prepare_data(run, data, model_args, tokenizer)
    plan = do_plan(model, tokenizer, rd, layout, model_args, warm, feat, sel, tr, plan_args.pool_size,
                   plan_args.measure_steps, plan_args.sample_size)
    print(plan.table())


def cmd_report(run, rep):
    layout = run_layout(run)
    path = do_report(layout, rep, _task_column(layout))
    print(path.read_text())


COMMANDS: dict[str, tuple[str, tuple[type, ...], Any]] = {
    "demo": ("The whole pipeline on BIG-bench with SmolLM2-135M, scaled to finish in minutes on a CPU.",
             (RunArguments, DataArguments, ModelArguments, WarmupArguments, FeaturizeArguments, SelectArguments,
              TrainArguments, DemoArguments), lambda *a: run_demo(*a)),
    "plan": ("Measure a few real training and featurization batches on this device and print the projected wall "
             "time of each stage (warmup, featurize, scoring, final training) and the feature store's disk.",
             (RunArguments, DataArguments, ModelArguments, WarmupArguments, FeaturizeArguments, SelectArguments,
              TrainArguments, PlanArguments), cmd_plan),
    "warmup": ("LoRA SFT with LessCallback on a random fraction of the pool -> RUN_DIR/less_warmup.",
               (RunArguments, DataArguments, ModelArguments, WarmupArguments), cmd_warmup),
    "featurize": ("Pool gradient features at every warmup checkpoint -> RUN_DIR/less_features.",
                  (RunArguments, DataArguments, ModelArguments, FeaturizeArguments), cmd_featurize),
    "select": ("Score the feature store and select under a budget -> RUN_DIR/selections/NAME.",
               (RunArguments, DataArguments, ModelArguments, FeaturizeArguments, SelectArguments), cmd_select),
    "train": ("LoRA SFT on a selection -> RUN_DIR/train/NAME.",
              (RunArguments, DataArguments, ModelArguments, TrainArguments), cmd_train),
    "evaluate": ("Held-out target loss and, with --task_metric, MC accuracy or exact match (zero-shot or an "
                 "adapter), beside the zero-shot and random results -> RUN_DIR/evaluation.json.",
                 (RunArguments, DataArguments, ModelArguments, EvaluateArguments), cmd_evaluate),
    "report": ("Markdown report and PNG plots of a run -> RUN_DIR/report.", (RunArguments, ReportArguments), cmd_report),
}
