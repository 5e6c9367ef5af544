"""``LessSFTTrainer``: trl's ``SFTTrainer`` that first selects its training data with LESS.

``train()`` runs, in one call and under ``accelerate launch`` / ``torchrun`` as well as alone:

1. warmup: a LoRA SFT on a random ``less_warmup_fraction`` of the pool for ``less_warmup_epochs``
   epochs, one checkpoint per epoch, with :class:`~hf_less.LessCallback` capturing the pool's and
   the targets' gradient features at each checkpoint (skipped with ``less_warmup_dir``);
2. scoring from the captured features (or, for a reused warmup without them, a featurization
   split across the processes), and selection with ``less_strategy`` under ``less_budget``;
3. the ordinary ``SFTTrainer`` training on the selected rows, with the user's own arguments.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import hashlib
import json
import logging
import math
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

from ..gradients import sharded
from ..gradients.featurizer import rows_of
from ..gradients.state import RUN_FILE, find_checkpoints, run_differences
from ..scoring.less import LessSelector
from ..selection import strategies as selectors
from ..selection.record import Selection, load_pool_scores, load_selection, save_selection
from ..utils import distributed
from ..utils.identity import model_digest, rows_digest, tokenizer_identity
from ..utils.io import atomic_write_json
from .callback import LessCallback
from .config import LessSFTConfig
from .layout import RunLayout
from .warmup import WARMUP_SCHEDULE, WarmupSFTTrainer, warmup_subset

logger = logging.getLogger(__name__)

# The LessSFTConfig fields that change the warmup run (recorded in its identity).
WARMUP_SETTINGS = ("less_warmup_fraction", "less_warmup_epochs", "less_warmup_learning_rate", "less_warmup_batch_size",
                   "less_lora_r", "less_lora_alpha", "less_lora_dropout", "less_lora_target_modules", "less_seed")


class LessSFTTrainer(SFTTrainer):
    """A drop-in ``SFTTrainer`` that trains on the part of ``train_dataset`` LESS selects.

    Args:
        model, args, data_collator, train_dataset, eval_dataset, processing_class, ...: as for
            ``trl.SFTTrainer``; ``args`` is a :class:`~hf_less.LessSFTConfig` and
            ``train_dataset`` is the candidate pool (messages, prompt/completion or text).
        target_dataset: a few examples of the target task, in any format the pool may have.

    After ``train()`` (or ``select_data()``), ``selected_indices`` holds the chosen rows of
    ``train_dataset`` in selection order, and ``output_dir`` holds ``less_selection.json``
    (indices, scores, strategy, budget, warmup checkpoints) and ``less_scores.npy``.

    Example:
        >>> trainer = LessSFTTrainer(model, args=LessSFTConfig(output_dir="out", less_budget=0.05),
        ...                          train_dataset=pool, target_dataset=targets, peft_config=lora,
        ...                          processing_class=tok)
        >>> trainer.train()            # warmup -> featurize -> select -> train on the subset
        >>> trainer.selected_indices   # indices into train_dataset, in selection order
    """

    def __init__(self, model, args: LessSFTConfig | None = None, data_collator=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, *pargs, target_dataset: Any = None, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
            args = LessSFTConfig(output_dir=f"{str(name).rstrip('/').split('/')[-1]}-LESS-SFT")
        if not isinstance(args, LessSFTConfig):
            raise TypeError(f"LessSFTTrainer needs args=LessSFTConfig(...), got {type(args).__name__}; "
                            "LessSFTConfig takes every SFTConfig argument plus the less_* ones.")
        if train_dataset is None:
            raise ValueError("LessSFTTrainer needs train_dataset: the candidate pool to select from.")
        columns = rows_of(target_dataset) if target_dataset is not None else {}
        if not columns or not next(iter(columns.values())):
            raise ValueError("LessSFTTrainer needs target_dataset: a few examples of the task to select for.")
        if not hasattr(train_dataset, "select"):
            raise TypeError("train_dataset must be a datasets.Dataset (an IterableDataset cannot be scored row by row).")
        if len(train_dataset) == 0:
            raise ValueError("train_dataset is empty: LessSFTTrainer needs the candidate pool to select from.")
        # Fail now, not after the warmup: a count budget larger than the pool.
        selectors.resolve_budget(args.less_budget_value, len(train_dataset))
        self.pool = train_dataset
        self.target_dataset = target_dataset
        self.selected_indices: list[int] | None = None
        self.selection: Selection | None = None
        self.plan = None  # hf_less.training.planning.RunPlan, when less_plan measured one
        # The selection model, taken before SFTTrainer prepares (and patches the forward of) the
        # model it trains: a copy of that one would still run the original through closures.
        self._selection_source = None if args.less_selection_model else _pristine_copy(model)
        super().__init__(model, args, data_collator, train_dataset, eval_dataset, processing_class, *pargs, **kwargs)

    # -- the one call ----------------------------------------------------------------------------

    def train(self, *args, **kwargs):
        """Select the training data (unless already selected), then train on it as ``SFTTrainer`` does."""
        if self.selected_indices is None:
            self.select_data()
        return super().train(*args, **kwargs)

    def select_data(self) -> list[int]:
        """Warmup, featurize, score and select; sets ``selected_indices`` and the training set."""
        a: LessSFTConfig = self.args
        start = time.perf_counter()
        # Several nodes: the warmup, the stores and the selection are written by the main process and read by all,
        # so every process must see output_dir (and less_warmup_dir): refused at once otherwise, not after the warmup.
        distributed.check_shared_directory(a.output_dir, "output_dir")
        if a.less_warmup_dir:
            distributed.check_same(_warmup_view(a.less_warmup_dir), f"the warmup checkpoints in {a.less_warmup_dir!r}")
        # The selection model first: a reused selection must have been made with the same weights and tokenizer.
        model, tokenizer = self._selection_model()
        settings = self._settings(model, tokenizer)
        selection = self._reusable_selection(settings)
        pool_scores = None
        if selection is None:
            self.plan = self._plan(model, tokenizer) if a.less_plan else None
            if a.less_warmup_dir:
                warmup_dir = a.less_warmup_dir
            else:
                warmup_dir, model = self._warmup(model, tokenizer, settings)
            selection, pool_scores = self._select(model, tokenizer, warmup_dir, settings)
        else:
            pool_scores = load_pool_scores(a.output_dir)
        del model
        self._selection_source = None  # the copy is not needed any more: free it before training
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.selection = selection
        self.selected_indices = list(selection.indices)
        seconds = time.perf_counter() - start
        stats = {"less/pool_size": float(len(self.pool)), "less/selected": float(selection.k),
                 "less/selection_seconds": round(seconds, 2)}
        if selection.scores:
            stats["less/score_mean_selected"] = float(np.mean(selection.scores))
            stats["less/score_min_selected"] = float(np.min(selection.scores))
        if pool_scores is not None:
            finite = pool_scores[np.isfinite(pool_scores)]  # skipped rows score -inf
            stats["less/score_mean_pool"] = float(np.mean(finite)) if len(finite) else float("nan")
        self.add_callback(_LogOnTrainBegin(self, stats))
        self.train_dataset = self._prepare_dataset(
            self.pool.select(self.selected_indices), self.processing_class, self.args, self.args.packing,
            getattr(self, "_formatting_func", None), "train")
        return self.selected_indices

    # -- steps -----------------------------------------------------------------------------------

    def _plan(self, model, tokenizer):
        """Measure a few batches and log the projected stages (:func:`hf_less.training.planning.plan_run`); one process only."""
        from peft import LoraConfig

        from .planning import plan_run

        a: LessSFTConfig = self.args
        if a.world_size > 1 or sharded.fsdp_enabled(a) or sharded.deepspeed_enabled(a):
            logger.info("LESS plan skipped: it measures on one process (less_plan=False hides this line).")
            return None
        lora = LoraConfig(r=a.less_lora_r, lora_alpha=a.less_lora_alpha, lora_dropout=a.less_lora_dropout,
                          target_modules=list(a.less_lora_target_modules), task_type="CAUSAL_LM")
        plan = plan_run(model, tokenizer, self.pool, targets=len(next(iter(rows_of(self.target_dataset).values()))),
                        max_length=self._max_length(), lora=lora, proj_dim=a.less_projection_dim,
                        proj_kind=a.less_proj_kind, warmup_fraction=a.less_warmup_fraction,
                        warmup_epochs=a.less_warmup_epochs, budget=a.less_budget_value,
                        train_epochs=math.ceil(a.num_train_epochs),
                        batch_size=a.less_warmup_batch_size or a.per_device_train_batch_size,
                        store_dtype=a.less_store_dtype, shard_rows=1024, learning_rate=a.less_warmup_learning_rate,
                        seed=a.less_seed, capture=not a.less_warmup_dir,
                        store_dir=a.output_dir if os.path.isdir(a.output_dir) else None,
                        # the warmup's SFTConfig is this one's: the same precision and activation checkpointing
                        sft_kwargs={k: getattr(a, k) for k in ("bf16", "fp16", "gradient_checkpointing",
                                                                "activation_checkpointing") if hasattr(a, k)})
        logger.info("LESS %s", plan.table())
        return plan

    def _selection_model(self):
        """The model features are computed with, and its tokenizer (never the model that is trained)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        a: LessSFTConfig = self.args
        source, self._selection_source = a.less_selection_model or self._selection_source, None
        if not isinstance(source, str):
            return source, self.processing_class
        model = AutoModelForCausalLM.from_pretrained(source, **(a.model_init_kwargs or {}))
        tokenizer = self.processing_class
        if a.less_selection_model:
            try:
                tokenizer = AutoTokenizer.from_pretrained(source)
            except (OSError, ValueError):
                pass
        return model.to(a.device), tokenizer

    def _warmup(self, model, tokenizer, settings: dict):
        """LoRA SFT on a random ``less_warmup_fraction`` of the pool, capturing features per epoch.

        The run's identity (warmup settings, subset digest, model, tokenizer) goes into
        ``less_run.json`` beside the checkpoints, and from there into every checkpoint's LESS state;
        checkpoints an earlier run left in the directory are removed first (see :meth:`_fresh_warmup_dir`).
        """
        from peft import LoraConfig

        a: LessSFTConfig = self.args
        if sharded.deepspeed_enabled(a):
            raise ValueError(
                "LessSFTTrainer cannot run its LESS warmup under DeepSpeed: ZeRO keeps the Adam moments in its own "
                "partitioned buffers, which LessCallback does not read. Run the warmup (a small LoRA run) without "
                "DeepSpeed, under DDP or FSDP (for example this same script with LessSFTConfig and no DeepSpeed "
                "config, or a Trainer with LessCallback()), then pass its output directory as less_warmup_dir: "
                "selection and the final training then run under DeepSpeed.")
        # Under FSDP the warmup shards `model` in place and cannot capture features (FSDP's forwards are
        # collective): it saves the gathered moments only, and the pool is featurized afterwards with an
        # unsharded copy, kept on the CPU meanwhile.
        fsdp = sharded.fsdp_enabled(a)
        unsharded = copy.deepcopy(model).to("cpu") if fsdp else None
        out = str(RunLayout(a.output_dir).warmup)
        n = len(self.pool)
        warmup_set = warmup_subset(self.pool, a.less_warmup_fraction, a.less_seed)
        size = len(warmup_set)
        fields = {f.name for f in dataclasses.fields(SFTConfig) if f.init}
        config = {k: v for k, v in a.to_dict().items() if k in fields}
        # to_dict() masks every *_token field (hub_token, but also eos_token, pad_token): take the real ones.
        config.update({k: getattr(a, k) for k in config if k.endswith("_token")})
        config.update(
            output_dir=out, num_train_epochs=a.less_warmup_epochs, max_steps=-1, save_strategy="epoch",
            save_total_limit=None, save_only_model=True, eval_strategy="no", load_best_model_at_end=False,
            # The schedule is _WarmupSFTTrainer's (WARMUP_SCHEDULE): warmup_steps=0, an int, means "none" in
            # every supported transformers (a float is a ratio from 5.0 on, refused before), so it is inert.
            learning_rate=a.less_warmup_learning_rate, lr_scheduler_type="linear", warmup_steps=0,
            per_device_train_batch_size=a.less_warmup_batch_size or a.per_device_train_batch_size,
            report_to="none", push_to_hub=False, seed=a.less_seed, packing=False,
            run_name=f"{a.run_name or 'less'}-warmup", resume_from_checkpoint=None,
            optim=a.optim if str(a.optim) in ("adamw_torch", "adamw_torch_fused") else "adamw_torch",
        )
        lora = LoraConfig(r=a.less_lora_r, lora_alpha=a.less_lora_alpha, lora_dropout=a.less_lora_dropout,
                          target_modules=list(a.less_lora_target_modules), task_type="CAUSAL_LM")
        capture = LessCallback() if fsdp else LessCallback(
            pool=self.pool, targets=self._targets_without_subtasks(), proj_dim=a.less_projection_dim,
            proj_kind=a.less_proj_kind, proj_seed=a.less_proj_seed, max_length=self._max_length(),
            batch_size=a.less_featurize_batch_size, autocast=a.less_autocast,
            compile_projection=a.less_compile_projection, pool_direction=a.less_pool_direction, tokenizer=tokenizer,
            dtype=a.less_store_dtype,
            show_progress=not a.disable_tqdm, on_empty_completion=a.less_on_empty_completion)
        run = {
            "settings": {k: settings[k] for k in sorted(settings) if k in WARMUP_SETTINGS},
            "batch_size": config["per_device_train_batch_size"],
            "gradient_accumulation_steps": a.gradient_accumulation_steps, "world_size": a.world_size,
            "optim": config["optim"], "schedule": WARMUP_SCHEDULE, "max_length": a.max_length,
            "subset": rows_digest(rows_of(warmup_set)), "subset_size": size,
            "model": settings["model"], "tokenizer": settings["tokenizer"],
        }
        distributed.on_main(lambda: _fresh_warmup_dir(Path(out), json.loads(json.dumps(run, default=str))))
        logger.info("LESS warmup: LoRA r=%d on %d of %d pool examples for %d epochs, in %s",
                    a.less_lora_r, size, n, a.less_warmup_epochs, out)
        trainer = WarmupSFTTrainer(model, args=SFTConfig(**config), train_dataset=warmup_set,
                                    processing_class=tokenizer, peft_config=lora, callbacks=[capture])
        trainer.train()
        if fsdp:
            del trainer
            return out, unsharded.to(a.device)  # LessSelector puts each checkpoint's adapter into it
        from accelerate.utils import extract_model_from_parallel

        # Without the mixed-precision forward wrapper: scoring computes at full precision.
        warm = extract_model_from_parallel(trainer.model, keep_fp32_wrapper=False)
        del trainer
        return out, warm

    def _select(self, model, tokenizer, warmup_dir, settings) -> tuple[Selection, np.ndarray | None]:
        """Score the pool (main process), order it, keep the budget; every process gets the result."""
        a: LessSFTConfig = self.args
        selector = LessSelector(
            model, warmup_dir, self.target_dataset, tokenizer=tokenizer, proj_dim=a.less_projection_dim,
            proj_kind=a.less_proj_kind, proj_seed=a.less_proj_seed, max_length=self._max_length(),
            batch_size=a.less_featurize_batch_size, autocast=a.less_autocast,
            compile_projection=a.less_compile_projection, pool_direction=a.less_pool_direction,
            subtask_column=a.less_subtask_column,
            show_progress=not a.disable_tqdm, on_empty_completion=a.less_on_empty_completion,
            hub_correction=a.less_hub_correction, hub_pca_components=a.less_hub_pca_components,
            hub_csls_k=a.less_hub_csls_k)
        store = None
        if not selector.has_captured_pool:  # every process featurizes its share; the main one writes the store
            store = selector.featurize(self.pool, RunLayout(a.output_dir).store,
                                       dtype=a.less_store_dtype)
        return distributed.on_main(lambda: self._order(selector, store, warmup_dir, settings))

    def _order(self, selector: LessSelector, store, warmup_dir, settings) -> tuple[Selection, np.ndarray]:
        a: LessSFTConfig = self.args
        scores, sims = selector.score_store(store, self.pool) if store is not None else selector.score(self.pool)
        k = selectors.resolve_budget(a.less_budget_value, len(self.pool))
        extra = {} if a.less_strategy in ("topk", "random") else {"sims": sims, "subtask_ids": selector.subtask_ids}
        order = selectors.order(a.less_strategy, scores, a.less_seed, **extra)[:k]
        if 0 < len(order) < k:
            message = (f"Only {len(order)} of the {len(self.pool)} pool rows can be selected (the others were skipped: "
                       f"no completion token left after truncation to max_length={self._max_length()}), fewer than "
                       f"the budget of {k} (less_budget={a.less_budget_value}): training on {len(order)} examples. "
                       "Raise less_max_length / max_length, fix those rows, or lower less_budget.")
            warnings.warn(message, UserWarning, stacklevel=2)
            logger.warning(message)
        if len(order) == 0:
            raise ValueError("No pool example can be selected: every one was skipped (no completion token left "
                             "after truncation). Raise max_length / less_max_length, or check the pool's format.")
        selection = Selection(
            indices=order.tolist(), strategy=a.less_strategy, budget=a.less_budget_value,
            pool_size=len(self.pool), seed=a.less_seed, scores=scores[order].astype(float).tolist(),
            checkpoints=selector.identity["checkpoints"], projection=selector.identity["projection"],
            extra={"settings": settings, "warmup_dir": os.fspath(warmup_dir)})
        save_selection(a.output_dir, selection, scores)
        return selection, scores

    # -- reuse -----------------------------------------------------------------------------------

    def _settings(self, model, tokenizer) -> dict:
        """What the selection depends on: a reused selection must match all of it (and its warmup checkpoints).

        ``model`` and ``tokenizer`` are the selection model (before any warmup adapter) and its
        tokenizer: their weights and chat template count, not only the model's name.
        """
        a: LessSFTConfig = self.args
        targets = rows_of(self.target_dataset)
        return {
            "pool": getattr(self.pool, "_fingerprint", None), "pool_size": len(self.pool),
            "targets": hashlib.sha256(json.dumps(targets, sort_keys=True, default=str).encode()).hexdigest()[:16],
            **{k: v for k, v in a.to_dict().items() if k.startswith("less_") and k != "less_reuse_selection"},
            "max_length": self._max_length(),
            "selection_model": a.less_selection_model or getattr(getattr(self.model, "config", None),
                                                                 "_name_or_path", None),
            "model": model_digest(model),
            "tokenizer": tokenizer_identity(tokenizer),
        }

    def _reusable_selection(self, settings: dict) -> Selection | None:
        """The selection in ``output_dir`` if every input it was made from is unchanged, else ``None``.

        Unchanged: the settings (pool, targets, LESS settings, selection model's weights, tokenizer
        and chat template) and the warmup checkpoints it was scored with (step, weight, content digest).
        """
        if not self.args.less_reuse_selection:
            return None
        try:
            previous = load_selection(self.args.output_dir)
        except (FileNotFoundError, ValueError):
            return None
        before = previous.extra.get("settings") or {}
        differences = run_differences(before, json.loads(json.dumps(settings, default=str)))
        if differences:
            logger.info("Not reusing the selection in %s: %s.", self.args.output_dir, "; ".join(differences))
            return None
        warmup_dir = previous.extra.get("warmup_dir")
        try:
            now = [{"step": c.step, "weight": c.weight, "digest": c.digest} for c in find_checkpoints(warmup_dir)]
        except (TypeError, OSError, ValueError) as e:  # gone, or no longer a warmup directory
            logger.info("Not reusing the selection in %s: its warmup checkpoints cannot be read (%s).",
                        self.args.output_dir, e)
            return None
        if now != previous.checkpoints:
            logger.info("Not reusing the selection in %s: the warmup checkpoints in %s changed since (%s, now %s).",
                        self.args.output_dir, warmup_dir, previous.checkpoints, now)
            return None
        logger.info("Reusing the selection in %s (same pool, targets, model, tokenizer, LESS settings and warmup "
                    "checkpoints).", self.args.output_dir)
        return previous

    # -- small helpers ---------------------------------------------------------------------------

    def _max_length(self) -> int | None:
        return self.args.less_max_length or self.args.max_length

    def _targets_without_subtasks(self):
        column = self.args.less_subtask_column
        if column is None:
            return self.target_dataset
        return {k: v for k, v in rows_of(self.target_dataset).items() if k != column}


def _warmup_view(warmup_dir: str | os.PathLike) -> list[tuple[int, str]] | str:
    """What this process sees of a warmup: its checkpoints' steps and digests, or why it cannot read them."""
    try:
        return [(c.step, c.digest) for c in find_checkpoints(warmup_dir)]
    except (OSError, ValueError) as e:
        return f"cannot read it ({type(e).__name__})"


def _fresh_warmup_dir(out: Path, run: dict) -> None:
    """Make ``out`` ready for the warmup ``run``: earlier checkpoints removed, ``less_run.json`` written.

    The warmup is trained anew every time, so checkpoints already there are stale: left in place
    (a rerun with fewer epochs saves fewer), they would be scored with the new ones. A directory
    from a run with another identity is restarted with a warning that says what differs.
    """
    stale = [p for p in out.glob("checkpoint-*") if p.is_dir()] if out.is_dir() else []
    stale.sort(key=lambda p: (len(p.name), p.name))  # checkpoint-2 before checkpoint-10
    previous = None
    if (out / RUN_FILE).exists():
        try:
            previous = json.loads((out / RUN_FILE).read_text())
        except ValueError:
            previous = None
    if stale:
        if previous != run:
            why = ("; ".join(run_differences(previous, run)) if previous is not None
                   else f"it has no {RUN_FILE} (written by another tool or an older hf-less)")
            logger.warning("Restarting the LESS warmup in %s: its checkpoints %s come from another warmup run (%s); "
                           "they are removed.", out, [p.name for p in stale], why)
        else:
            logger.info("Re-running the LESS warmup in %s (same run identity): removing its checkpoints %s.",
                        out, [p.name for p in stale])
        for p in stale:
            shutil.rmtree(p)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / RUN_FILE, run)


class _LogOnTrainBegin(TrainerCallback):
    """Logs the selection statistics through ``Trainer.log`` once training has begun (so
    ``report_to`` integrations and ``log_history`` both get them), once."""

    def __init__(self, trainer: LessSFTTrainer, stats: dict[str, float]):
        self.trainer, self.stats = trainer, stats

    def on_train_begin(self, args, state, control, **kwargs):
        if self.stats is not None:
            stats, self.stats = self.stats, None
            self.trainer.log(stats)


def _pristine_copy(model):
    """A model to select with: the same weights as ``model``, none of its adapters or wrappers.

    A name or path is kept as is (loaded when needed). A ``PeftModel``'s adapter is dropped:
    the warmup trains its own.
    """
    if isinstance(model, str):
        return model
    from peft import PeftModel

    clone = copy.deepcopy(model)
    for module in clone.modules():  # instance-level forward overrides belong to the original's wrappers
        module.__dict__.pop("forward", None)
    return clone.unload() if isinstance(clone, PeftModel) else clone
