"""The stages of an hf-less run, each a function on the run layout: data, warmup, features, selection,
training, evaluation, report. The subcommands and the demo call them."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..data import load_dataset_path
from ..gradients.projection import DEFAULT_KIND, MATRIX_FREE_KINDS
from ..selection.strategies import parse_budget
from ..training.layout import RunLayout
from ..utils.identity import rows_digest
from ..utils.io import atomic_save_npy, atomic_save_safetensors, atomic_write_json
from .arguments import (
    TEXT_COLUMNS,
    DataArguments,
    EvaluateArguments,
    FeaturizeArguments,
    ModelArguments,
    ReportArguments,
    RunArguments,
    SelectArguments,
    TrainArguments,
    WarmupArguments,
)
from .models import DEFAULT_MODEL
from .progress import _say, examples_progress
from .report import precision, report_from_run, write_report

# -- helpers ---------------------------------------------------------------------------------------


def run_layout(run: RunArguments) -> RunLayout:
    """The layout of ``--run_dir`` (hf_less.training.layout), refusing one written with hf-less 0.1's names."""
    layout = RunLayout(run.run_dir)
    layout.check_not_old()
    return layout


def _device(run: RunArguments) -> str:
    if run.device:
        return run.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(model_args: ModelArguments, run: RunArguments):
    """``(model, tokenizer)`` on the run's device; the embedded default or any path / name."""
    from .models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(model_args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(_device(run)), tokenizer


def _format_columns(dataset) -> list[str]:
    from ..data import detect_format

    fmt = detect_format(dataset.column_names)
    return [c for c in TEXT_COLUMNS[fmt] if c in dataset.column_names]


def text_only(dataset):
    """Only the columns trl and LESS read (task names, options ... are dropped)."""
    return dataset.select_columns(_format_columns(dataset))


def _fits(dataset, tokenizer, max_length: int, what: str):
    """Drop examples that do not fit ``max_length`` tokens whole (truncation would cut the completion)."""
    from ..data import detect_format, n_scored, tokenize_example

    fmt = detect_format(dataset.column_names)
    keep = []
    for i, example in enumerate(dataset):
        try:
            ids, labels = tokenize_example(example, tokenizer, fmt)
        except ValueError:
            continue
        if len(ids) <= max_length and n_scored(labels) > 0:
            keep.append(i)
    dropped = len(dataset) - len(keep)
    if dropped:
        _say(f"  {what}: dropped {dropped} of {len(dataset)} examples longer than max_length={max_length} tokens")
    if not keep:
        raise ValueError(f"No {what} example fits max_length={max_length} tokens; raise --max_length.")
    return dataset.select(keep) if dropped else dataset


@dataclass
class RunData:
    pool: Any
    targets: Any
    eval: Any | None
    target_task: str | None
    task_column: str


def prepare_data(run: RunArguments, data: DataArguments, model_args: ModelArguments, tokenizer=None) -> RunData:
    """Build (once) or load RUN_DIR/data: pool, targets, eval, and data.json describing them."""
    from datasets import load_from_disk

    layout = run_layout(run)
    meta_path = layout.data / "data.json"
    if meta_path.exists() and not data.rebuild_data:
        meta = json.loads(meta_path.read_text())
        _say(f"data: reusing {layout.data} ({meta['pool']} pool examples, target task {meta.get('target_task')!r}; "
             "--rebuild_data to build it again from the options)")
        ev = layout.data / "eval"
        return RunData(load_from_disk(str(layout.data / "pool")), load_from_disk(str(layout.data / "targets")),
                       load_from_disk(str(ev)) if ev.exists() else None, meta.get("target_task"), meta["task_column"])
    if tokenizer is None:
        from transformers import AutoTokenizer

        from .models import load_model_and_tokenizer

        tokenizer = (load_model_and_tokenizer(DEFAULT_MODEL)[1] if model_args.model == DEFAULT_MODEL
                     else AutoTokenizer.from_pretrained(model_args.model))
    t0 = time.time()
    if data.dataset == "bigbench":
        from .bigbench import DEFAULT_TARGET_TASK, BigBenchConfig, load_bigbench

        target = data.target_task or DEFAULT_TARGET_TASK
        config = BigBenchConfig(target_task=target, tasks=data.tasks, examples_per_task=data.examples_per_task,
                                num_targets=data.num_targets, num_eval=data.num_eval, max_chars=data.max_chars,
                                seed=run.seed)
        splits = load_bigbench(config)
        pool, targets, eval_set, task_column = splits.pool, splits.targets, splits.eval, "task"
        target = target.split(":")[0]
        source = {"dataset": "bigbench", **asdict(config)}
    else:
        if data.targets is None:
            raise ValueError("With --dataset PATH, give the target examples too: --targets PATH (JSONL or directory).")
        pool, targets = load_dataset_path(data.dataset), load_dataset_path(data.targets)
        eval_set = load_dataset_path(data.eval) if data.eval else None
        task_column = data.task_column
        target = data.target_task
        if target is None and task_column in targets.column_names and len(set(targets[task_column])) == 1:
            target = targets[task_column][0]
        source = {"dataset": data.dataset, "targets": data.targets, "eval": data.eval}
    pool = _fits(pool, tokenizer, model_args.max_length, "pool")
    targets = _fits(targets, tokenizer, model_args.max_length, "targets")
    if eval_set is not None:
        eval_set = _fits(eval_set, tokenizer, model_args.max_length, "eval")
    layout.data.mkdir(parents=True, exist_ok=True)
    # data.json is written last and marks the data complete: gone while the datasets are rewritten, so a
    # run killed meanwhile is rebuilt by the next command instead of read half-written.
    meta_path.unlink(missing_ok=True)
    pool.save_to_disk(str(layout.data / "pool"))
    targets.save_to_disk(str(layout.data / "targets"))
    if eval_set is not None:
        eval_set.save_to_disk(str(layout.data / "eval"))
    meta = {"source": source, "target_task": target, "task_column": task_column, "max_length": model_args.max_length,
            "pool": len(pool), "targets": len(targets), "eval": None if eval_set is None else len(eval_set)}
    atomic_write_json(meta_path, meta)  # last: data.json marks the data complete
    tasks = pool[task_column] if task_column in pool.column_names else None
    share = f", {sum(t == target for t in tasks)} from {target!r}" if tasks and target else ""
    _say(f"data: pool {len(pool)} examples{share}; targets {len(targets)}; "
         f"eval {0 if eval_set is None else len(eval_set)} ({time.time() - t0:.0f} s) -> {layout.data}")
    return RunData(pool, targets, eval_set, target, task_column)


def _checkpointing_kwargs(config_cls, enabled: bool) -> dict:
    """transformers 5 renamed gradient_checkpointing to activation_checkpointing; trl defaults the old one on."""
    from dataclasses import fields

    names = {f.name for f in fields(config_cls)}
    if "activation_checkpointing" in names:
        return {"activation_checkpointing": enabled, "gradient_checkpointing": None}
    return {"gradient_checkpointing": enabled}


def lora_config(model_args: ModelArguments):
    """The run's LoRA adapter (``peft.LoraConfig``) from the model options."""
    from peft import LoraConfig

    return LoraConfig(r=model_args.lora_r, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,
                      target_modules=list(model_args.lora_target_modules), task_type="CAUSAL_LM")


def sft_train(model, tokenizer, dataset, output_dir: str | os.PathLike, model_args: ModelArguments, run: RunArguments,
              epochs: int, learning_rate: float, save_each_epoch: bool, callbacks=(), desc: str = "training"):
    """trl SFTTrainer with a LoRA adapter; returns the trainer (the model holds the trained adapter)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import SFTConfig

    # The warmup schedule of LessSFTTrainer (3% linear warmup whose first step has a positive LR, then linear
    # decay), the same on every supported transformers: warmup_steps=0.03 is refused before transformers 5.
    from ..training.warmup import WarmupSFTTrainer

    steps_per_epoch = math.ceil(len(dataset) / model_args.batch_size)
    config = SFTConfig(
        output_dir=str(output_dir), num_train_epochs=epochs, per_device_train_batch_size=model_args.batch_size,
        learning_rate=learning_rate, lr_scheduler_type="linear", warmup_steps=0, max_length=model_args.max_length,
        save_strategy="epoch" if save_each_epoch else "no", save_only_model=True, report_to=[],
        logging_steps=max(1, steps_per_epoch // 2), seed=run.seed, data_seed=run.seed,
        use_cpu=_device(run) == "cpu", dataloader_num_workers=0, disable_tqdm=True, optim="adamw_torch",
        **_checkpointing_kwargs(SFTConfig, model_args.gradient_checkpointing),
    )
    trainer = WarmupSFTTrainer(model, args=config, train_dataset=text_only(dataset), processing_class=tokenizer,
                                peft_config=lora_config(model_args), callbacks=list(callbacks))
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)  # the examples/s bar shows the loss instead
    trainer.add_callback(examples_progress(desc, disable=run.quiet))
    trainer.train()
    return trainer


def _write_run_info(layout: RunLayout, **updates) -> dict:
    info = json.loads(layout.run_info.read_text()) if layout.run_info.exists() else {}
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(info.get(key), dict):
            info[key].update(value)
        else:
            info[key] = value
    layout.root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(layout.run_info, info, default=str)
    return info


# -- stages ----------------------------------------------------------------------------------------


def do_warmup(model, tokenizer, rd: RunData, layout: RunLayout, model_args, warm_args: WarmupArguments, run) -> Path:
    """LoRA SFT with LessCallback on a random ``warmup_fraction`` of the pool -> RUN_DIR/less_warmup."""
    from ..training.callback import LessCallback
    from ..training.warmup import warmup_subset

    warm = warmup_subset(rd.pool, warm_args.warmup_fraction, run.seed)
    n = len(warm)
    _say(f"warmup: LoRA r={model_args.lora_r} on {n} random pool examples ({warm_args.warmup_fraction:.0%}), "
         f"{warm_args.warmup_epochs} epochs -> {layout.warmup}")
    sft_train(model, tokenizer, warm, layout.warmup, model_args, run, warm_args.warmup_epochs,
              warm_args.warmup_learning_rate, save_each_epoch=True, callbacks=[LessCallback()], desc="warmup")
    return layout.warmup


def make_selector(base_model, tokenizer, rd: RunData, layout: RunLayout, model_args, feat: FeaturizeArguments, run):
    from ..scoring.less import LessSelector

    return LessSelector(base_model, layout.warmup, text_only(rd.targets), tokenizer=tokenizer,
                        proj_dim=feat.proj_dim or None, proj_kind=feat.proj_kind, pool_direction=feat.pool_direction,
                        compile_projection=feat.compile_projection, max_length=model_args.max_length,
                        batch_size=model_args.batch_size, checkpoints=feat.checkpoints, show_progress=not run.quiet,
                        hub_correction=feat.hub_correction, hub_pca_components=feat.hub_pca_components,
                        hub_csls_k=feat.hub_csls_k)


def _shard_rows(selector) -> int:
    """Small shards (a moving progress bar, cheap resumes) when there is no dense matrix (row-shift, sparse
    or exact features) or it stays cached between shards; large ones otherwise, since each shard would
    regenerate the whole matrix."""
    projection = (getattr(selector, "identity", None) or {}).get("projection") or {}
    params = sum(p.numel() for p in selector.model.parameters() if p.requires_grad)
    return shard_rows_for(projection.get("kind"), projection.get("dim") or 0, params)


def shard_rows_for(kind: str | None, proj_dim: int, lora_params: int) -> int:
    """The featurize shard size of :func:`_shard_rows` for a projection ``kind`` (None: exact) of ``proj_dim``."""
    if kind in (None, *MATRIX_FREE_KINDS):
        return 32
    return 32 if lora_params * proj_dim * 2 <= 2**30 else 4096


def do_plan(model, tokenizer, rd: RunData, layout: RunLayout, model_args: ModelArguments, warm: WarmupArguments,
            feat: FeaturizeArguments, sel: SelectArguments, tr: TrainArguments, pool_size: int | None = None,
            measure_steps: int = 4, sample_size: int = 256, clock=None):
    """The run's :class:`hf_less.training.planning.RunPlan`: a few real batches measured, extrapolated to the pool.

    ``clock``: as for :func:`hf_less.training.planning.plan_run` (default: wall seconds)."""
    from trl import SFTConfig

    from ..training.planning import plan_run

    kind = feat.proj_kind if feat.proj_dim else None
    lora_params = _lora_params(model, model_args)
    return plan_run(model, tokenizer, text_only(rd.pool), pool_size=pool_size, targets=len(rd.targets),
                    max_length=model_args.max_length, lora=lora_config(model_args), proj_dim=feat.proj_dim or None,
                    proj_kind=feat.proj_kind, warmup_fraction=warm.warmup_fraction,
                    warmup_epochs=len(feat.checkpoints) if feat.checkpoints else warm.warmup_epochs,
                    budget=sel.budget, train_epochs=tr.train_epochs, batch_size=model_args.batch_size,
                    store_dtype=feat.store_dtype, shard_rows=shard_rows_for(kind, feat.proj_dim, lora_params),
                    learning_rate=warm.warmup_learning_rate, measure_steps=measure_steps, sample_size=sample_size,
                    store_dir=str(layout.root) if layout.root.exists() else None,
                    sft_kwargs=_checkpointing_kwargs(SFTConfig, model_args.gradient_checkpointing),
                    **({} if clock is None else {"clock": clock}))


def _lora_params(model, model_args: ModelArguments) -> int:
    """Trainable parameters of the run's LoRA on ``model``: r x (in + out) per adapted linear layer."""
    import torch

    total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.split(".")[-1] in model_args.lora_target_modules:
            total += model_args.lora_r * (module.in_features + module.out_features)
    return total


def do_featurize(selector, rd: RunData, layout: RunLayout, dtype: str = "float16"):
    """Pool features -> RUN_DIR/less_features/pool (store format ``dtype``); target features and pool scores beside them."""
    import numpy as np

    selector.featurize(text_only(rd.pool), layout.store, shard_rows=_shard_rows(selector), dtype=dtype)
    identity = getattr(selector, "identity", {})
    atomic_write_json(layout.features / "featurize.json", {
        "proj_dim": identity.get("dim") if identity.get("projection") else 0,
        "proj_kind": (identity.get("projection") or {}).get("kind", DEFAULT_KIND),
        "pool_direction": identity.get("pool_direction", "adam"), "store_dtype": dtype,
        "checkpoints": [c.step for c in selector.checkpoints]})
    targets = getattr(selector, "target_features", None)
    if targets is not None:
        steps = [c.step for c in selector.checkpoints]
        atomic_save_safetensors(layout.features / "targets.safetensors",
                                {f"step_{s}": t.contiguous() for s, t in zip(steps, targets)})
    scores, sims = selector.score_store(layout.store, text_only(rd.pool))
    atomic_save_npy(layout.features / "less_scores.npy", np.asarray(scores, dtype=np.float32))
    atomic_save_npy(layout.features / "less_sims.npy", np.asarray(sims, dtype=np.float32))
    return scores, sims


def do_select(selector, scores, sims, rd: RunData, layout: RunLayout, sel: SelectArguments, run) -> tuple[str, list[int]]:
    """Scores + strategy + budget -> RUN_DIR/selections/NAME/less_selection.json (hf_less.selection.record)."""
    import numpy as np

    from ..selection.record import Selection, save_selection

    budget = parse_budget(sel.budget)
    scored = text_only(rd.pool).add_column("pool_index", list(range(len(rd.pool))))
    scored = scored.add_column("less_score", [float(s) for s in scores])
    scored = scored.add_column("less_sims", np.asarray(sims, dtype=np.float32).tolist())
    subset = selector.select(scored, budget=budget, strategy=sel.strategy, seed=run.seed)
    indices = [int(i) for i in subset["pool_index"]]
    name = sel.name or sel.strategy
    identity = getattr(selector, "identity", {})
    record = Selection(indices=indices, strategy=sel.strategy, budget=budget, pool_size=len(rd.pool), seed=run.seed,
                       scores=[float(scores[i]) for i in indices], checkpoints=identity.get("checkpoints", []),
                       projection=identity.get("projection"),
                       extra={"target_task": rd.target_task, "run_dir": str(layout.root),
                              "pool_digest": pool_digest(rd.pool)})
    path = save_selection(layout.selection(name), record, pool_scores=np.asarray(scores, dtype=np.float32))
    prec = ""
    if rd.target_task and rd.task_column in rd.pool.column_names:
        p = precision(rd.pool[rd.task_column], indices, rd.target_task)
        prec = f"; {p:.0%} from {rd.target_task!r}"
    _say(f"select: {name} ({sel.strategy}) kept {len(indices)} of {len(rd.pool)}{prec} -> {path}")
    return name, indices


def pool_digest(pool) -> str:
    """A digest of the pool's text columns, row order included: what a selection's indices point into."""
    return rows_digest(text_only(pool).to_dict())


def _resolve_selection(layout: RunLayout, selection: str) -> tuple[str, Path]:
    p = Path(selection)
    if p.exists():
        return (p.parent.name if p.is_file() else p.name), p
    candidate = layout.selection(selection)
    if not candidate.exists():
        known = sorted(d.name for d in layout.selections.iterdir()) if layout.selections.exists() else []
        raise FileNotFoundError(f"No selection {selection!r} in {layout.selections} (have: {known or 'none'}); "
                                "run `hf-less select` first or give a path to less_selection.json.")
    return selection, candidate


def do_train(base_model, tokenizer, rd: RunData, layout: RunLayout, model_args, tr: TrainArguments, run) -> Path:
    """LoRA SFT on a selection's rows -> RUN_DIR/train/NAME (the adapter)."""
    from ..selection.record import load_selection

    name, path = _resolve_selection(layout, tr.selection)
    record = load_selection(path)
    if record.pool_size != len(rd.pool):
        raise ValueError(f"The selection {path} indexes a pool of {record.pool_size} rows; this run's pool has "
                         f"{len(rd.pool)}. Train in the run directory it was selected in.")
    made_on = record.extra.get("pool_digest")
    if made_on is not None and made_on != pool_digest(rd.pool):
        raise ValueError(f"The selection {path} indexes another pool than this run's (the data was rebuilt since it "
                         "was selected: other rows, or the same rows in another order), so its indices would pick "
                         "other examples. Select again on this pool (`hf-less select`), or rebuild the data it was "
                         "selected from.")
    subset = rd.pool.select(record.indices)
    out = layout.train / name
    _say(f"train: LoRA on the {len(subset)} examples of selection {name!r}, {tr.train_epochs} epochs -> {out}")
    trainer = sft_train(base_model, tokenizer, subset, out, model_args, run, tr.train_epochs, tr.train_learning_rate,
                        save_each_epoch=False, desc=f"train {name}")
    trainer.save_model(str(out))
    return out


def do_evaluate(base_model, tokenizer, rd: RunData, layout: RunLayout, model_args, ev: EvaluateArguments, run,
                show_baselines: bool = False) -> float:
    """Held-out target loss (and the task metric) of the base model or an adapter -> RUN_DIR/evaluation.json.

    ``show_baselines`` prints the result beside the zero-shot and random results already in the
    file, the two baselines every selection is judged against (the demo prints its own summary).
    """
    from ..evaluation.metrics import target_loss, task_metric

    if rd.eval is None:
        raise ValueError("This run has no held-out split: give --eval PATH when the data is built (or use bigbench).")
    model, label = base_model, ev.label or "zero-shot"
    if ev.adapter:
        from peft import PeftModel

        adapter = Path(ev.adapter) if Path(ev.adapter).exists() else layout.train / ev.adapter
        if not (adapter / "adapter_config.json").exists():
            raise FileNotFoundError(f"No LoRA adapter at {adapter}; run `hf-less train` first or give its directory.")
        model = PeftModel.from_pretrained(base_model, str(adapter))
        label = ev.label or adapter.name
    result = {"target_loss": target_loss(model, tokenizer, text_only(rd.eval), model_args.max_length,
                                         model_args.batch_size, show_progress=not run.quiet)}
    if ev.task_metric:
        name, value = task_metric(model, tokenizer, rd.eval, model_args.max_length, model_args.batch_size,
                                  ev.max_new_tokens, show_progress=not run.quiet)
        result[name] = value
    results = json.loads(layout.evaluation.read_text()) if layout.evaluation.exists() else {}
    results[label] = result
    atomic_write_json(layout.evaluation, results)

    def show(r) -> str:
        r = r if isinstance(r, dict) else {"target_loss": r}
        return ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in r.items())

    _say(f"evaluate: {label}: {show(result)} on {len(rd.eval)} held-out examples -> {layout.evaluation}")
    for baseline in ("zero-shot", "random") if show_baselines else ():
        if baseline != label and baseline in results:
            _say(f"evaluate:   beside {baseline}: {show(results[baseline])}")
    return result["target_loss"]


def do_report(layout: RunLayout, rep: ReportArguments, task_column: str = "task") -> Path:
    inputs = report_from_run(layout.root, task_column=task_column)
    path = write_report(inputs, rep.report_dir or layout.report)
    _say(f"report: {path}")
    return path
