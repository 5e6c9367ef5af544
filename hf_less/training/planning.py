"""A plan before the run: projected wall time of each LESS stage and the disk of the feature store.

:func:`plan_run` measures a few real batches on this device (LoRA training steps of the warmup's
trainer, featurization batches, the writing of store shards and the scoring of a store in the
chosen format) and extrapolates them to the pool's size:

- warmup: ``epochs x ceil(warmup rows / batch)`` training steps, plus the trainer's fixed start cost;
- features (captured during the warmup, or ``featurize`` after it): every pool row at every
  checkpoint, the targets likewise, plus the writing of the store's shards;
- scoring: ``score_store`` over the pool's rows (the rate measured on a synthetic store of the same
  format and d, read from the page cache: a store larger than memory is read at the disk's speed,
  which this does not measure);
- final training: ``train epochs x ceil(selected rows / batch)`` steps of the same trainer, the
  selected rows costing the pool's mean (which rows are kept is not known before; if they are
  shorter or longer than the pool's average, so is the training).

Rows are drawn at random from the pool (or a length sample of it), so the measured cost per example
is the pool's mean; only ``measure_steps`` batches of each kind are timed, after untimed ones whose
extra cost (allocations, first calls, new shapes) is added once per stage. ``hf-less plan`` prints it, the demo prints it before it starts, and
``LessSFTTrainer`` logs it at the start of ``train()``.
"""

from __future__ import annotations

import copy
import math
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..gradients.quantize import FLOAT_FORMATS, check_format, store_bytes


@dataclass
class Stage:
    """One stage's projection: its name, wall seconds, and how they were reckoned.

    ``count`` is what the seconds are reckoned per: training steps (warmup, final training), rows
    times checkpoints featurized (pool and targets), rows scored.
    """

    name: str
    seconds: float
    detail: str
    count: int = 0


@dataclass
class RunPlan:
    """The projected stages and disk of a LESS run (see :func:`plan_run`)."""

    stages: list[Stage]
    store_bytes: int
    store_format: str
    pool_size: int
    measured: dict[str, float] = field(default_factory=dict)
    # bytes of the same store in int8 (set for float formats): half of float16, the same selection but one row in
    # 285 on the transfer benchmark (docs/selection_quality.md)
    int8_bytes: int | None = None

    def seconds(self, name: str) -> float:
        """Projected seconds of the stage called ``name``."""
        return next(s.seconds for s in self.stages if s.name == name)

    @property
    def total_seconds(self) -> float:
        return sum(s.seconds for s in self.stages)

    def table(self) -> str:
        """The plan as printed by ``hf-less plan``."""
        lines = [f"plan for a pool of {self.pool_size:,} examples (measured on this device):"]
        for s in self.stages:
            lines.append(f"  {s.name:16s} {_duration(s.seconds):>10s}   {s.detail}")
        lines.append(f"  {'total':16s} {_duration(self.total_seconds):>10s}")
        lines.append(f"  {'feature store':16s} {_size(self.store_bytes):>10s}   {self.store_format} "
                     "(pool features at every checkpoint, content keys)")
        if self.int8_bytes is not None:
            lines.append(f"  {'':16s} {_size(self.int8_bytes):>10s}   in int8 (store dtype 'int8': the same selection "
                         "but one row in 285 on the transfer benchmark, faster scoring)")
        return "\n".join(lines)


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class _StepClock:
    """A TrainerCallback recording ``clock()`` at the start of ``train()`` and at every step's end."""

    def __new__(cls, clock: Callable[[], float] = time.perf_counter):
        from transformers import TrainerCallback

        class Clock(TrainerCallback):
            def __init__(self):
                self.begin, self.ends = 0.0, []

            def on_train_begin(self, args, state, control, **kwargs):
                self.begin = clock()

            def on_step_end(self, args, state, control, **kwargs):
                self.ends.append(clock())

        return Clock()


def measure_training(model: torch.nn.Module, tokenizer, rows: list[dict], lora, batch_size: int, max_length: int,
                     steps: int, learning_rate: float = 2e-4, use_cpu: bool | None = None,
                     sft_kwargs: dict | None = None, clock: Callable[[], float] = time.perf_counter,
                     ) -> tuple[float, float, torch.nn.Module]:
    """``(seconds per step, fixed seconds, trained LoRA model)`` of the warmup's trainer on a copy of ``model``.

    Runs ``2 * steps`` optimizer steps of :class:`hf_less.training.warmup.WarmupSFTTrainer` (the
    trainer of every warmup) on ``steps`` batches of ``rows`` seen twice; the second pass is timed
    (the first pays once for allocations and for each new batch shape, as a run's first steps do).
    ``fixed`` is what ``train()`` costs beyond its steps at that rate (start, first steps, end).
    ``model`` itself is not changed.
    """
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import SFTConfig

    from .warmup import WarmupSFTTrainer

    work = copy.deepcopy(model)
    n = batch_size * steps * 2
    data = Dataset.from_list([rows[i % len(rows)] for i in range(n)])
    if use_cpu is None:
        use_cpu = next(model.parameters()).device.type == "cpu"
    with tempfile.TemporaryDirectory(prefix="hf-less-plan-") as out:
        config = SFTConfig(output_dir=out, max_steps=2 * steps, per_device_train_batch_size=batch_size,
                           learning_rate=learning_rate, lr_scheduler_type="linear", warmup_steps=0,
                           max_length=max_length, save_strategy="no", report_to=[], logging_steps=10**9,
                           use_cpu=use_cpu, dataloader_num_workers=0, disable_tqdm=True, optim="adamw_torch",
                           **(sft_kwargs or {}))
        steps_clock = _StepClock(clock)
        trainer = WarmupSFTTrainer(work, args=config, train_dataset=data, processing_class=tokenizer,
                                   peft_config=lora, callbacks=[steps_clock])
        trainer.remove_callback(ProgressCallback)
        trainer.remove_callback(PrinterCallback)
        start = clock()
        trainer.train()
        total = clock() - start
    ends = steps_clock.ends[steps - 1 :]  # the second pass over the rows: shapes seen, caches warm
    per_step = (ends[-1] - ends[0]) / max(1, len(ends) - 1)
    fixed = max(0.0, total - len(steps_clock.ends) * per_step)
    return per_step, fixed, trainer.model


def measure_features(model: torch.nn.Module, tokenizer, rows: list[dict], batch_size: int, max_length: int,
                     proj_dim: int | None, proj_kind: str, batches: int,
                     clock: Callable[[], float] = time.perf_counter) -> tuple[float, float, float, torch.Tensor]:
    """``(seconds per pool example, per example to tokenize, fixed seconds, features (n, d))`` at one checkpoint.

    ``model`` is a LoRA model (a ``PeftModel``); the Adam moments are stand-ins of the right shapes
    (the cost does not depend on their values). The first batch is timed apart: what it costs beyond
    a later batch (allocations, first calls) is paid once per stage.
    """
    from ..data import n_scored
    from ..gradients.featurizer import Featurizer
    from ..gradients.per_example import AdamMoments

    feat = Featurizer(model, tokenizer, proj_dim, proj_kind=proj_kind, max_length=max_length, batch_size=batch_size,
                      show_progress=False, on_empty_completion="skip")
    moments = AdamMoments({k: torch.zeros_like(p) for k, (_, p) in zip(feat.grads.keys, feat.grads.params)},
                          {k: torch.ones_like(p) for k, (_, p) in zip(feat.grads.keys, feat.grads.params)},
                          (0.9, 0.999), 1e-8)
    n = batch_size * (batches + 1)
    sample = [rows[i % len(rows)] for i in range(n)]
    columns = {k: [r[k] for r in sample] for k in sample[0]}
    t0 = clock()
    encoded = [e for e in feat.encode(columns, "the plan's sample") if n_scored(e[1])]
    encode_s = (clock() - t0) / n
    if len(encoded) <= batch_size:
        raise ValueError("The plan's sample has too few examples with a completion token to time featurization.")
    t0 = clock()
    feat(encoded[:batch_size], moments)  # the first call: its extra cost is the stage's fixed cost
    first_s = clock() - t0
    timed = encoded[batch_size:]
    t0 = clock()
    features = feat(timed, moments)
    per_example = (clock() - t0) / len(timed)
    return per_example, encode_s, max(0.0, first_s - batch_size * per_example), features


def measure_store(features: torch.Tensor, fmt: str, checkpoints: int, shard_rows: int, targets: int,
                  directory: str | None = None, rows: int = 8192,
                  clock: Callable[[], float] = time.perf_counter) -> tuple[float, float]:
    """``(seconds to write one shard of shard_rows rows, seconds to score one row)`` of a ``fmt`` store.

    Writes two shards (the rows repeat ``features``) with every checkpoint into a temporary store in
    ``directory`` (the disk the real store goes to; default the system's temporary directory), then
    scores a synthetic ``rows``-row store of the same format and d against ``targets`` targets.
    """
    from ..gradients.store import FeatureStore
    from ..scoring.less import score_store

    dim = features.shape[1]
    f = features.numpy()
    steps = list(range(1, checkpoints + 1))
    meta = {"dim": dim, "dtype": fmt, "checkpoints": [{"step": s} for s in steps], "model": "plan"}
    with tempfile.TemporaryDirectory(prefix="hf-less-plan-", dir=directory) as tmp:
        store = FeatureStore.create(Path(tmp) / "write", meta)
        block = np.resize(f, (shard_rows, dim))
        store.write_shard({s: block for s in steps})  # untimed: first-call costs
        t0 = clock()
        store.write_shard({s: block for s in steps})
        shard_s = clock() - t0
        store = FeatureStore.create(Path(tmp) / "score", meta)
        big = np.resize(f, (min(rows, 4096), dim))
        for _ in range(0, rows, len(big)):
            store.write_shard({s: big for s in steps})
        store.finish()
        g = torch.Generator().manual_seed(0)
        t = [torch.randn(targets, dim, generator=g) for _ in steps]
        score_store(store, t, steps, [1 / len(steps)] * len(steps), chunk_rows=4096)  # untimed
        t0 = clock()
        score_store(store, t, steps, [1 / len(steps)] * len(steps))
        score_row = (clock() - t0) / store.num_rows
    return shard_s, score_row


def plan_run(model: torch.nn.Module, tokenizer, pool: Any, *, pool_size: int | None = None, targets: int = 8,
             max_length: int = 2048, lora=None, proj_dim: int | None = 8192, proj_kind: str | None = None,
             warmup_fraction: float = 0.05, warmup_epochs: int = 4, budget: int | float = 0.05,
             train_epochs: int = 3, batch_size: int = 8, store_dtype: str = "float16", shard_rows: int = 4096,
             learning_rate: float = 2e-4, measure_steps: int = 4, sample_size: int = 256, seed: int = 0,
             store_dir: str | None = None, capture: bool = False, sft_kwargs: dict | None = None,
             clock: Callable[[], float] = time.perf_counter) -> RunPlan:
    """Measure a few real batches of each stage on this device and project the run's time and disk.

    Args:
        model: the base model the run trains and featurizes with, on its device (not changed).
        tokenizer: its tokenizer.
        pool: the candidate pool (any format the pipeline accepts: a ``Dataset``, a list of rows),
            or a sample of it whose lengths represent the pool (then give ``pool_size``).
        pool_size: the pool's size (default ``len(pool)``).
        targets: the number of target examples.
        max_length, lora (a ``peft.LoraConfig``), proj_dim, proj_kind, warmup_fraction, warmup_epochs
            (= checkpoints), budget, train_epochs, batch_size, store_dtype, shard_rows, learning_rate:
            the run's settings.
        measure_steps: batches timed per measurement: training steps (after as many untimed ones) and
            featurization batches (after one untimed); more is steadier.
        sample_size: pool rows drawn at random to take the batches from.
        store_dir: a directory on the disk the store will be written to (the shard writes are timed there).
        capture: features captured during the warmup (``LessSFTTrainer``) rather than featurized after it.
        sft_kwargs: further ``SFTConfig`` fields of the run's training (``bf16``, ``gradient_checkpointing`` ...):
            give the run's own, since trl's ``SFTConfig`` turns activation checkpointing on by default
            (a third more compute per step).
        clock: what is measured: wall seconds (default), or e.g. ``time.process_time`` (CPU seconds of this
            process, steadier on a machine shared with other jobs; the projection is then in CPU seconds).
    """
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    from ..gradients.featurizer import rows_of
    from ..gradients.projection import DEFAULT_KIND
    from ..selection.strategies import resolve_budget
    from .warmup import warmup_size

    store_dtype = check_format(store_dtype)
    columns = rows_of(pool)
    n_rows = len(next(iter(columns.values())))
    if n_rows == 0:
        raise ValueError("The pool is empty: the plan needs its examples (or a sample of them) to time batches.")
    names = list(columns)
    pick = random.Random(seed).sample(range(n_rows), min(sample_size, n_rows))
    rows = [{k: columns[k][i] for k in names} for i in pick]
    n = int(pool_size if pool_size is not None else n_rows)
    lora = lora or LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1, task_type="CAUSAL_LM",
                              target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    proj_kind = proj_kind or DEFAULT_KIND
    states = (torch.get_rng_state(), random.getstate(), np.random.get_state())
    try:
        step_s, fixed_s, trained = measure_training(model, tokenizer, rows, lora, batch_size, max_length,
                                                    measure_steps, learning_rate, sft_kwargs=sft_kwargs, clock=clock)
        # Featurized as LessSelector does it: the base model with the trained adapter put in, without the
        # trainer's wrappers (they would slow the per-example gradients down).
        fresh = get_peft_model(copy.deepcopy(model), lora)
        set_peft_model_state_dict(fresh, get_peft_model_state_dict(trained))
        del trained
        ex_s, encode_s, feat_fixed_s, feats = measure_features(fresh.eval(), tokenizer, rows, batch_size, max_length,
                                                               proj_dim, proj_kind, measure_steps, clock)
        del fresh
        shard_s, score_row_s = measure_store(feats, store_dtype, warmup_epochs, shard_rows, targets, store_dir,
                                             clock=clock)
    finally:
        torch.set_rng_state(states[0])
        random.setstate(states[1])
        np.random.set_state(states[2])
    ckpts = warmup_epochs
    n_warm = warmup_size(n, warmup_fraction)
    warm_steps = warmup_epochs * math.ceil(n_warm / batch_size)
    k = resolve_budget(budget, n)
    train_steps = train_epochs * math.ceil(k / batch_size)
    shards = math.ceil(n / shard_rows)  # each writes every checkpoint's rows (a capture: one store per checkpoint)
    encodes = n * (ckpts if capture else 1)  # the capture tokenizes the pool again at every checkpoint
    feature_s = feat_fixed_s + (n + targets) * ckpts * ex_s + shards * shard_s + encodes * encode_s
    d = feats.shape[1]
    stages = [
        Stage("warmup", fixed_s + warm_steps * step_s,
              f"{warm_steps} steps x {step_s:.3g} s ({n_warm} rows, {warmup_epochs} epochs, batch {batch_size})",
              warm_steps),
        Stage("capture" if capture else "featurize", feature_s,
              f"{n + targets} rows x {ckpts} checkpoints x {ex_s:.3g} s, {shards} shard writes x {shard_s:.3g} s",
              (n + targets) * ckpts),
        Stage("scoring", n * score_row_s, f"{n} rows x {score_row_s:.3g} s ({store_dtype}, d={d}, {targets} targets)",
              n),
        Stage("final training", fixed_s + train_steps * step_s,
              f"{train_steps} steps x {step_s:.3g} s ({k} selected rows, {train_epochs} epochs)", train_steps),
    ]
    return RunPlan(stages, store_bytes(store_dtype, d, n, ckpts), store_dtype, n,
                   {"step_s": step_s, "train_fixed_s": fixed_s, "feature_example_s": ex_s,
                    "feature_fixed_s": feat_fixed_s, "encode_example_s": encode_s,
                    "shard_write_s": shard_s, "score_row_s": score_row_s, "dim": d},
                   store_bytes("int8", d, n, ckpts) if store_dtype in FLOAT_FORMATS else None)
