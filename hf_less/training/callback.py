"""``LessCallback``: save the LESS state of every warmup checkpoint, and capture features there."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback

from ..data import n_scored
from ..gradients import sharded
from ..gradients.featurizer import (
    Encoded, Featurizer, adapter_name_of, base_model_record, check_compile_projection, check_proj_dim,
)
from ..gradients.per_example import AdamMoments, parameter_key, trainable_parameters
from ..gradients.projection import DEFAULT_KIND
from ..gradients.quantize import check_format
from ..gradients.state import LessCheckpoint, captured_dir, save_less_state
from ..gradients.store import FeatureStore, IncompatibleFeaturesError, StoreWriter
from ..gradients.streaming import RowReader, is_one_shot, known_rows, num_rows
from ..utils import distributed

logger = logging.getLogger(__name__)

ADAM_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW)


def unwrap_optimizer(optimizer):
    """The torch optimizer under accelerate's ``AcceleratedOptimizer`` (and similar) wrappers."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def check_adam(optimizer) -> torch.optim.Optimizer:
    """Refuse optimizers whose state is not plain Adam moments (LESS's Gamma needs m and v)."""
    opt = unwrap_optimizer(optimizer)
    if not isinstance(opt, ADAM_OPTIMIZERS):
        raise ValueError(
            f"LessCallback needs an Adam optimizer (TrainingArguments optim='adamw_torch' or "
            f"'adamw_torch_fused'); this Trainer uses {type(opt).__module__}.{type(opt).__name__}, whose "
            "state has no Adam moments to build LESS's Adam-preconditioned gradients from."
        )
    if any(g.get("amsgrad", False) for g in opt.param_groups):
        raise ValueError("LessCallback does not support amsgrad=True: LESS's Adam direction uses exp_avg_sq.")
    return opt


class LessCallback(TrainerCallback):
    """Writes LESS's per-checkpoint state beside the Trainer's own checkpoint files, and can
    capture the pool's and the targets' gradient features with the model already in memory.

    At every save it writes ``less_moments.safetensors`` (``exp_avg``/``exp_avg_sq`` of every
    trainable parameter, keyed by parameter name) and ``less_state.json`` (betas, eps, the mean
    learning rate over the optimizer steps since the previous checkpoint, the global step) into
    ``checkpoint-N/``. Only the main process writes. Works with ``transformers.Trainer`` and
    ``trl.SFTTrainer`` training a PEFT LoRA model with ``optim="adamw_torch"`` or
    ``"adamw_torch_fused"``, any gradient accumulation and ``save_strategy``.

    Under FSDP (1 or 2) the moments are gathered from the shards at every save (a collective on
    every process) and saved whole, keyed by the unwrapped model's parameter names; capture is
    refused there. DeepSpeed is refused at train begin (ZeRO's moments are not in the optimizer's
    state): run the warmup under DDP or FSDP.

    Given ``pool`` and/or ``targets``, at every save it also computes, with the live model and
    the moments just saved, the pool's Adam-direction features and the targets' gradient
    features, projected exactly as :class:`~hf_less.LessSelector` would, into
    ``checkpoint-N/less_features/{pool,targets}``. A ``LessSelector`` with the same settings
    then scores from them with no pass over the pool. Capture leaves training untouched:
    dropout off and the train mode restored, RNG states (torch, CUDA, Python, numpy) and
    parameter ``.grad`` restored, nothing written to the optimizer. Under several processes
    each computes its share and the main process writes.

    Args:
        output_dir: where to write ``checkpoint-N/`` with the LESS state. Defaults to the
            Trainer's ``output_dir`` (beside its own files). When set elsewhere, the adapter is
            saved there too so the directory is a complete warmup.
        pool: candidate examples to capture (any format ``LessSelector`` accepts), or ``None``.
        targets: target examples to capture, or ``None``.
        proj_dim, proj_kind, proj_seed, max_length, batch_size, projection_buffer_bytes, autocast,
            pool_direction, compile_projection: as for ``LessSelector`` (the projection, ``max_length`` and
            ``pool_direction`` must match the selector that reuses the features). Capture runs at the model's own precision unless ``autocast``, whatever
            mixed precision the training uses.
        tokenizer: defaults to the Trainer's ``processing_class``.
        shard_rows: pool rows per store shard (the unit of resumption and of the progress bar).
        dtype: the captured stores' format: float16, float32, int8, int4 or 1bit (packed as captured; see
            :mod:`hf_less.gradients.quantize`).
        show_progress: a progress bar on the main process while capturing.
        on_empty_completion: ``"error"`` or ``"skip"`` for examples with no completion token, as for
            ``LessSelector`` (skipped examples are not captured; the selector scores them ``-inf``).

    Example:
        >>> trainer = SFTTrainer(model, args=SFTConfig(output_dir="warmup", save_strategy="epoch"),
        ...                      train_dataset=warm, peft_config=lora,
        ...                      callbacks=[LessCallback(pool=pool, targets=targets)])
        >>> trainer.train()  # warmup/checkpoint-N/ holds the LESS state and the captured features
    """

    def __init__(self, output_dir: str | os.PathLike | None = None, pool: Any = None, targets: Any = None,
                 proj_dim: int | None = 8192, *, proj_kind: str = DEFAULT_KIND, proj_seed: int = 0,
                 max_length: int | None = 2048, batch_size: int | str = 8, projection_buffer_bytes: int = 2**30,
                 tokenizer=None, shard_rows: int = 1024, dtype: str = "float16", show_progress: bool = True,
                 on_empty_completion: str = "error", autocast: bool = False, pool_direction: str = "adam",
                 compile_projection: bool = False):
        self.output_dir = None if output_dir is None else os.fspath(output_dir)
        self.pool, self.targets = pool, targets
        if self.captures:  # before training starts, not at the first save
            check_proj_dim(proj_dim, proj_kind)
            check_compile_projection(compile_projection, proj_dim, proj_kind)
        self.capture_settings = dict(proj_dim=proj_dim, proj_kind=proj_kind, proj_seed=proj_seed,
                                     max_length=max_length, batch_size=batch_size,
                                     projection_buffer_bytes=projection_buffer_bytes, show_progress=show_progress,
                                     on_empty_completion=on_empty_completion, autocast=autocast,
                                     pool_direction=pool_direction, compile_projection=compile_projection)
        self.tokenizer = tokenizer
        self.shard_rows = int(shard_rows)
        self.dtype = check_format(dtype)  # an unknown format fails now, not at the first checkpoint
        self.capture_seconds = 0.0
        self._featurizer: Featurizer | None = None
        self._encoded: dict[str, list] = {}  # the targets only (few): the pool is encoded shard by shard
        self._pool_rows: int | None = None  # pool rows to capture, when counted at train begin
        self._lrs: list[tuple[int, float]] = []
        self._last_save_step = 0
        self._keys: dict[int, str] = {}
        self._fsdp = False  # set at train begin: moments are then gathered from the shards at every save
        self._base_model: dict | None = None  # the frozen base model's identity, recorded in every LESS state

    @property
    def captures(self) -> bool:
        return self.pool is not None or self.targets is not None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        # Before check_adam: its advice (optim=adamw_torch) does not help under DeepSpeed.
        if sharded.deepspeed_enabled(args, optimizer):
            raise ValueError(sharded.DEEPSPEED_REFUSAL)
        if optimizer is None:
            raise ValueError("LessCallback found no optimizer at train begin; it needs the Trainer's Adam.")
        check_adam(optimizer)
        self._fsdp = sharded.fsdp_enabled(args, model)
        # The frozen base weights do not change during the warmup: identified once (a sharded model cannot be).
        self._base_model = None if self._fsdp or model is None else base_model_record(model)
        if self._fsdp and self.captures:
            raise ValueError(sharded.FSDP_CAPTURE_REFUSAL)
        adapter = adapter_name_of(model)
        # clean_name: FSDP1 inserts `_fsdp_wrapped_module.` segments; keys are the unwrapped model's names.
        self._keys = {id(p): parameter_key(sharded.clean_name(n), adapter) for n, p in trainable_parameters(model)}
        self._lrs = []
        # On resume, LRs are averaged from the resumed step on.
        self._last_save_step = int(state.global_step)
        if self.captures:
            tokenizer = self.tokenizer if self.tokenizer is not None else kwargs.get("processing_class")
            self._featurizer = Featurizer(model, tokenizer, **self.capture_settings)
            self._encoded = {}
            if self.pool is not None:
                self._pool_rows = self._check_pool()
            if self.targets is not None:
                # The targets are few: tokenized once, every checkpoint featurizes the same examples.
                self._encoded["targets"] = [e for e in self._featurizer.encode(self.targets, "targets")
                                            if n_scored(e[1])]
                if not self._encoded["targets"]:
                    raise ValueError("LessCallback was given an empty targets dataset to capture.")
            self._identity = self._featurizer.identity

    def _check_pool(self) -> int | None:
        """Check the pool's format and completions at train begin, holding one shard at a time.

        A pool with a length (a ``Dataset``, rows, columns) is read through once: a bad row fails
        here, not at the first save, and the rows to capture are counted. A streaming
        ``IterableDataset`` is checked on its first shard only (reading it all would download it
        before training); its count stays ``None``.
        """
        if is_one_shot(self.pool):
            raise TypeError("LessCallback reads the pool again at every checkpoint: pass a datasets.Dataset, a "
                            "datasets.IterableDataset, a list of rows or a dict of columns, not a one-shot "
                            f"{type(self.pool).__name__}.")
        whole = known_rows(self.pool) is not None
        reader, kept, start = RowReader(self.pool, self.shard_rows), 0, 0
        while batch := reader.take(self.shard_rows):
            kept += sum(1 for e in self._featurizer.encode(batch, f"pool rows {start}..") if n_scored(e[1]))
            start += num_rows(batch)
            if not whole:
                break
        if start == 0 or (whole and kept == 0):
            raise ValueError("LessCallback was given an empty pool dataset to capture (no example with a "
                             "completion token to score).")
        return kept if whole else None

    def _shards(self, which: str, skip: int) -> Iterator[list[Encoded]]:
        """The examples to capture, about ``shard_rows`` at a time, after the first ``skip`` (already stored).

        The pool is read and tokenized one shard at a time at every capture (tokenizing costs little
        next to the gradients), so no process holds the tokenized pool through the run.
        """
        if which == "targets":
            encoded = self._encoded["targets"]
            for s0 in range(skip, len(encoded), self.shard_rows):
                yield encoded[s0 : s0 + self.shard_rows]
            return
        reader, start = RowReader(self.pool, self.shard_rows), 0
        while batch := reader.take(self.shard_rows):
            chunk = [e for e in self._featurizer.encode(batch, f"pool rows {start}..") if n_scored(e[1])]
            start += num_rows(batch)
            del batch
            if skip >= len(chunk):  # stored by an interrupted capture of this checkpoint
                skip -= len(chunk)
                continue
            chunk, skip = chunk[skip:], 0
            yield chunk

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        # Called after optimizer.step() and before the scheduler steps: group 0's lr is the one used.
        opt = unwrap_optimizer(optimizer)
        self._lrs.append((int(state.global_step) + 1, float(opt.param_groups[0]["lr"])))

    def on_save(self, args, state, control, model=None, optimizer=None, **kwargs):
        step = int(state.global_step)
        interval = [lr for s, lr in self._lrs if self._last_save_step < s <= step]
        ckpt = os.path.join(self.output_dir or args.output_dir, f"checkpoint-{step}")
        opt = check_adam(optimizer)
        if self._fsdp:  # a collective: every process gathers, the main process gets the full moments
            moments, keys = self._gathered_moments(model, opt, step)
        else:
            moments, keys = self._moments(opt, step)
        if state.is_world_process_zero:
            if not interval:
                raise RuntimeError(f"LessCallback recorded no optimizer step before the save at step {step}.")
            if self._fsdp:  # LessSelector needs the full adapter, which only the Trainer can gather
                _copy_adapter(os.path.join(args.output_dir, f"checkpoint-{step}"),
                              ckpt if self.output_dir is not None else None)
            elif self.output_dir is not None and model is not None and hasattr(model, "save_pretrained"):
                model.save_pretrained(ckpt)
            save_less_state(ckpt, moments, keys, mean_lr=sum(interval) / len(interval), global_step=step,
                            lr_steps=len(interval), optimizer=type(opt).__name__, base_model=self._base_model)
            logger.info("LESS state for step %d written to %s", step, ckpt)
        self._lrs = [(s, lr) for s, lr in self._lrs if s > step]
        self._last_save_step = step
        if self.captures:
            self._capture(state, model, ckpt, step, moments, interval)

    def on_train_end(self, args, state, control, **kwargs):
        if self.captures and state.is_world_process_zero:
            logger.info("LESS feature capture added %.1f s to the warmup.", self.capture_seconds)

    # -- Adam state ------------------------------------------------------------------------------

    def _moments(self, opt, step: int) -> tuple[AdamMoments, list[str]]:
        """The live optimizer's moments keyed by parameter name (read only, never copied into)."""
        exp_avg, exp_avg_sq = {}, {}
        group = opt.param_groups[0]
        if any(tuple(g["betas"]) != tuple(group["betas"]) or g["eps"] != group["eps"]
               for g in opt.param_groups):
            raise ValueError("LessCallback needs the same Adam betas and eps in every parameter group.")
        for g in opt.param_groups:
            for p in g["params"]:
                key = self._keys.get(id(p))
                if key is None:
                    continue
                st = opt.state.get(p, {})
                if "exp_avg" not in st:
                    raise RuntimeError(f"The optimizer has no Adam state for {key!r} at step {step}.")
                exp_avg[key], exp_avg_sq[key] = st["exp_avg"], st["exp_avg_sq"]
        # Keys in model order, so stored features have one fixed coordinate order.
        keys = [k for k in self._keys.values() if k in exp_avg]
        missing = [k for k in self._keys.values() if k not in exp_avg]
        if missing:
            raise RuntimeError(f"Trainable parameters {missing[:3]} are not in the optimizer.")
        return AdamMoments(exp_avg, exp_avg_sq, tuple(group["betas"]), float(group["eps"])), keys

    def _gathered_moments(self, model, opt, step: int) -> tuple[AdamMoments | None, list[str]]:
        """Under FSDP: the full moments keyed by parameter name on the main process, ``(None, [])`` elsewhere."""
        # FSDP1 without use_orig_params names flat parameters (`..._flat_param`): their original names
        # come from the gathered state only.
        expected = [k for k in self._keys.values() if not k.endswith("_flat_param")]
        moments, keys = sharded.gather_full_moments(model, opt, adapter_name_of(model), expected)
        if moments is not None:
            missing = [k for k in expected if k not in moments.exp_avg]
            if missing:
                raise RuntimeError(f"Trainable parameters {missing[:3]} have no gathered Adam state at step {step}.")
            if not keys:
                raise RuntimeError(f"The gathered optimizer state holds no Adam moments at step {step}.")
        return moments, keys

    # -- capture ---------------------------------------------------------------------------------

    def _capture(self, state, model, ckpt: str, step: int, moments: AdamMoments, interval: list[float]) -> None:
        main = state.is_world_process_zero
        digest = None
        if main:
            digest = LessCheckpoint(Path(ckpt), step, sum(interval) / len(interval)).digest
        start = time.perf_counter()
        captured = 0  # rows in the stores, pool and targets
        with training_state_preserved(model):
            for which in [w for w, data in (("pool", self.pool), ("targets", self.targets)) if data is not None]:
                # None for a streaming pool: the store counts its rows when it is finished.
                rows = self._pool_rows if which == "pool" else len(self._encoded["targets"])
                meta = {**self._identity, "representation": (self._featurizer.pool_representation if which == "pool"
                                                              else "less-grad"),
                        "checkpoints": [{"step": step, "digest": digest}], "dtype": self.dtype,
                        "keyed": True, "rows": rows}
                writer = StoreWriter(lambda: _fresh_store(captured_dir(ckpt, which), meta),
                                     f"LESS capture {which} (step {step})", self.capture_settings["show_progress"])
                with writer:  # an error lets go of the store (its lock), keeping what is written
                    for chunk in self._shards(which, writer.done):
                        # The featurizer advances a bar with a total only (it clips at the total).
                        feats = self._featurizer(chunk, moments if which == "pool" else None, split=True,
                                                 progress=writer.bar if rows is not None else None)
                        writer.write({step: feats.numpy()}, chunk)
                    writer.close()
                captured += writer.written
        seconds = time.perf_counter() - start
        self.capture_seconds += seconds
        if main:
            logger.info("LESS capture at step %d: %d examples in %.1f s", step, captured, seconds)
            state.log_history.append({"less_capture_seconds": round(seconds, 3), "less_capture_examples": captured,
                                      "step": step})
        distributed.barrier()


def _copy_adapter(src: str, dst: str | None) -> None:
    """Under FSDP: check that the Trainer's checkpoint ``src`` holds the full adapter, and copy it to ``dst``.

    A rank-0 ``save_pretrained`` of a sharded model would write its own shard only (or wait forever
    on the other ranks), so the callback's own ``output_dir`` gets the Trainer's (gathered) files.
    """
    names = ("adapter_model.safetensors", "adapter_config.json")
    if not all(os.path.exists(os.path.join(src, n)) for n in names):
        raise FileNotFoundError(
            f"The Trainer's checkpoint {src} has no {names[0]}: under FSDP it writes the adapter only with a full "
            "state dict. Set fsdp_config={'state_dict_type': 'FULL_STATE_DICT'} (accelerate: "
            "fsdp_state_dict_type: FULL_STATE_DICT) so that LessSelector can load every warmup checkpoint.")
    if dst is None:
        return
    os.makedirs(dst, exist_ok=True)
    for n in names:
        shutil.copyfile(os.path.join(src, n), os.path.join(dst, n))


def _fresh_store(root: Path, meta: dict) -> FeatureStore:
    """The capture store of a checkpoint just saved: resumed if it is this capture's, else replaced.

    The Trainer has just (re)written the checkpoint, so features in it from other settings or an
    earlier run are stale by construction.
    """
    try:
        return FeatureStore.create(root, meta)
    except IncompatibleFeaturesError:
        logger.warning("Replacing stale captured features in %s (another run or other settings).", root)
        shutil.rmtree(root)
        return FeatureStore.create(root, meta)


@contextlib.contextmanager
def training_state_preserved(model):
    """Featurize mid-training without changing it: RNG states, ``.grad`` and train mode restored.

    Also lifts accelerate's mixed-precision wrapper off ``model.forward`` meanwhile (bf16/fp16
    training runs the forward under autocast), so captured features are computed at the same
    precision as ``LessSelector`` computes them afterwards.
    """
    amp_forward = model.__dict__.get("forward") if "_original_forward" in model.__dict__ else None
    if amp_forward is not None:
        model.forward = model.__dict__["_original_forward"]
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    py, np_state = random.getstate(), np.random.get_state()
    grads = {p: p.grad for p in model.parameters() if p.requires_grad}
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        random.setstate(py)
        np.random.set_state(np_state)
        for p, g in grads.items():
            p.grad = g
        if amp_forward is not None:
            model.forward = amp_forward
