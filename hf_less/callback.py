"""``LessCallback``: save the LESS state of every warmup checkpoint the Trainer writes."""

from __future__ import annotations

import logging
import os

import torch
from transformers import TrainerCallback

from .checkpoints import save_less_state
from .features import AdamMoments, parameter_key, trainable_parameters

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


def adapter_name_of(model) -> str | None:
    name = getattr(model, "active_adapter", None)
    if isinstance(name, (list, tuple)):
        name = name[0] if name else None
    return name if isinstance(name, str) else None


class LessCallback(TrainerCallback):
    """Writes LESS's per-checkpoint state beside the Trainer's own checkpoint files.

    At every save it writes ``less_moments.safetensors`` (``exp_avg``/``exp_avg_sq`` of every
    trainable parameter, keyed by parameter name) and ``less_state.json`` (betas, eps, the mean
    learning rate over the optimizer steps since the previous checkpoint, the global step) into
    ``checkpoint-N/``. Only the main process writes. Works with ``transformers.Trainer`` and
    ``trl.SFTTrainer`` training a PEFT LoRA model with ``optim="adamw_torch"`` or
    ``"adamw_torch_fused"``, any gradient accumulation and ``save_strategy``.

    Args:
        output_dir: where to write ``checkpoint-N/`` with the LESS state. Defaults to the
            Trainer's ``output_dir`` (beside its own files). When set elsewhere, the adapter is
            saved there too so the directory is a complete warmup.

    Example:
        >>> trainer = SFTTrainer(model, args=SFTConfig(output_dir="warmup", save_strategy="epoch"),
        ...                      train_dataset=warm, peft_config=lora, callbacks=[LessCallback()])
        >>> trainer.train()  # warmup/checkpoint-N/ now also holds the LESS state
    """

    def __init__(self, output_dir: str | os.PathLike | None = None):
        self.output_dir = None if output_dir is None else os.fspath(output_dir)
        self._lrs: list[tuple[int, float]] = []
        self._last_save_step = 0
        self._keys: dict[int, str] = {}

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if optimizer is None:
            raise ValueError("LessCallback found no optimizer at train begin; it needs the Trainer's Adam.")
        check_adam(optimizer)
        adapter = adapter_name_of(model)
        self._keys = {id(p): parameter_key(n, adapter) for n, p in trainable_parameters(model)}
        self._lrs = []
        # On resume, LRs are averaged from the resumed step on.
        self._last_save_step = int(state.global_step)

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        # Called after optimizer.step() and before the scheduler steps: group 0's lr is the one used.
        opt = unwrap_optimizer(optimizer)
        self._lrs.append((int(state.global_step) + 1, float(opt.param_groups[0]["lr"])))

    def on_save(self, args, state, control, model=None, optimizer=None, **kwargs):
        step = int(state.global_step)
        interval = [lr for s, lr in self._lrs if self._last_save_step < s <= step]
        if state.is_world_process_zero:
            if not interval:
                raise RuntimeError(f"LessCallback recorded no optimizer step before the save at step {step}.")
            opt = check_adam(optimizer)
            self._write(args, step, interval, opt, model)
        self._lrs = [(s, lr) for s, lr in self._lrs if s > step]
        self._last_save_step = step

    def _write(self, args, step, interval, opt, model):
        base = self.output_dir or args.output_dir
        ckpt = os.path.join(base, f"checkpoint-{step}")
        exp_avg, exp_avg_sq = {}, {}
        group = opt.param_groups[0]
        if any(tuple(g["betas"]) != tuple(group["betas"]) or g["eps"] != group["eps"] for g in opt.param_groups):
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
        moments = AdamMoments(exp_avg, exp_avg_sq, tuple(group["betas"]), float(group["eps"]))
        if self.output_dir is not None and model is not None and hasattr(model, "save_pretrained"):
            model.save_pretrained(ckpt)
        save_less_state(ckpt, moments, keys, mean_lr=sum(interval) / len(interval), global_step=step,
                        lr_steps=len(interval), optimizer=type(opt).__name__)
        logger.info("LESS state for step %d written to %s", step, ckpt)
