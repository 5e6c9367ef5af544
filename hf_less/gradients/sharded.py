"""Sharded training (FSDP, DeepSpeed ZeRO): detect it, and gather the full Adam moments under FSDP.

Under FSDP each process holds only its shard of every parameter and of its Adam moments (FSDP2:
``DTensor`` shards; FSDP1: slices of a flattened ``FlatParameter``), and module names gain wrapper
segments (``_fsdp_wrapped_module.``). LESS needs the whole ``exp_avg``/``exp_avg_sq`` of each LoRA
parameter, keyed by its plain name, so :func:`gather_full_moments` asks torch's distributed
checkpoint helpers for the full, unflattened optimizer state, a collective every process must join.

DeepSpeed keeps its optimizer state in its own flattened, partitioned buffers; hf-less does not read
them (see :data:`DEEPSPEED_REFUSAL`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .per_example import AdamMoments, parameter_key

# Wrapper segments that FSDP1, activation checkpointing and torch.compile insert into parameter names.
WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")

DEEPSPEED_REFUSAL = (
    "LessCallback does not support DeepSpeed: ZeRO keeps the Adam moments in its own flattened, partitioned "
    "buffers, so the per-parameter moments LESS needs are not in the optimizer's state (switching `optim` does "
    "not change that under DeepSpeed). Run the LESS warmup (a small LoRA run) without DeepSpeed: with DDP "
    "(`torchrun` or `accelerate launch` without a DeepSpeed config), or with FSDP (accelerate's FSDP plugin; "
    "LessCallback gathers the sharded moments). The warmup's checkpoints can then score the pool "
    "(LessSelector), and the final training can use DeepSpeed (LessSFTConfig(less_warmup_dir=...)).")

FSDP_CAPTURE_REFUSAL = (
    "LessCallback cannot capture pool/targets features under FSDP: capture splits the examples across the "
    "processes, so each one would run a different number of forward passes, and FSDP's forwards are "
    "collective (all-gathers of the sharded weights), which would hang. Create LessCallback() without pool "
    "and targets (the full Adam moments are still gathered and saved at every checkpoint), then score after "
    "the warmup with LessSelector(base_model, warmup_dir, targets) on an unsharded copy of the model "
    "(LessSelector.featurize splits the pool across the processes).")


def clean_name(name: str) -> str:
    """A parameter name without FSDP1/checkpointing/compile wrapper segments.

    ``base_model.model._fsdp_wrapped_module.layers.0...`` -> ``base_model.model.layers.0...``: the
    name the unwrapped model gives the same parameter.
    """
    for segment in WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name


def fsdp_version(model: nn.Module | None) -> int | None:
    """1 for a model (or a submodule) wrapped in FSDP1's ``FullyShardedDataParallel``, 2 for FSDP2's
    ``fully_shard``, ``None`` for an unsharded model."""
    if model is None:
        return None
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:  # a torch built without distributed support cannot shard
        return None
    for module in model.modules():
        if isinstance(module, FullyShardedDataParallel):
            return 1
        if isinstance(module, FSDPModule):
            return 2
    return None


def _accelerator_state() -> Mapping[str, Any]:
    """accelerate's shared ``AcceleratorState`` fields, without creating the state (empty if none)."""
    try:
        from accelerate.state import AcceleratorState
    except ImportError:
        return {}
    return AcceleratorState._shared_state or {}


def fsdp_enabled(args: Any = None, model: nn.Module | None = None) -> bool:
    """Whether this training shards the model with FSDP: the model itself, the TrainingArguments
    (``fsdp``), or accelerate's state (``accelerate launch`` with an FSDP config) says so.

    Conservative on purpose: on CPU accelerate trains an ``fsdp=...`` run unsharded (DDP), which
    this still counts as FSDP, so a run behaves the same on CPU as on the GPUs it is meant for.
    """
    if fsdp_version(model) is not None:
        return True
    if args is not None and getattr(args, "fsdp", None):  # TrainingArguments: None / [] when off
        return True
    return _accelerator_state().get("fsdp_plugin") is not None


def deepspeed_enabled(args: Any = None, optimizer: Any = None) -> bool:
    """Whether this training runs under DeepSpeed: TrainingArguments ``deepspeed``, accelerate's
    DeepSpeed plugin (``accelerate launch`` with a DeepSpeed config), or a DeepSpeed optimizer (or
    accelerate's wrapper of one)."""
    if args is not None and (getattr(args, "deepspeed", None) or getattr(args, "hf_deepspeed_config", None)):
        return True
    if _accelerator_state().get("deepspeed_plugins"):
        return True
    opt = optimizer
    for _ in range(8):  # the wrapper chain: AcceleratedOptimizer / DeepSpeedOptimizerWrapper / ZeRO / Adam
        if opt is None:
            break
        cls = type(opt)
        if cls.__module__.split(".")[0] == "deepspeed" or "DeepSpeed" in cls.__name__:
            return True
        opt = getattr(opt, "optimizer", None)
    return False


def gather_full_moments(model: nn.Module, optimizer: torch.optim.Optimizer, adapter: str | None,
                        order: Iterable[str] = ()) -> tuple[AdamMoments | None, list[str]]:
    """The full, unsharded Adam moments of an FSDP (1 or 2) model, keyed by :func:`parameter_key`.

    A collective: every process must call it, at the same point. On an accelerator the state is
    gathered to CPU on the main process only (``cpu_offload=True`` keeps it off the device and off
    the other ranks).

    Args:
        model: the model the optimizer trains, as the Trainer holds it (the FSDP1 wrapper, or the
            module ``fully_shard`` was applied to).
        optimizer: the torch Adam/AdamW (already unwrapped from accelerate's wrapper).
        adapter: the PEFT adapter name dropped from keys (``...lora_A.default.weight`` -> ``...lora_A.weight``).
        order: the expected keys in model order; keys found are returned in this order, the rest
            after them in the gathered order.
    Returns:
        ``(moments, keys)`` on the main process, each moment shaped like the unsharded parameter
        (e.g. ``(r, in_features)`` for ``lora_A``) in float32 on CPU; ``(None, [])`` on the others.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    from ..utils import distributed

    group = optimizer.param_groups[0]
    if any(tuple(g["betas"]) != tuple(group["betas"]) or g["eps"] != group["eps"] for g in optimizer.param_groups):
        raise ValueError("LessCallback needs the same Adam betas and eps in every parameter group.")
    # On an accelerator, cpu_offload gathers to CPU on rank 0 only. Under gloo the state is on the CPU
    # already, and there torch 2.13's FSDP1 (use_orig_params=True) offload returns exp_avg and exp_avg_sq
    # as one aliased buffer (both hold exp_avg_sq): gather without it (every rank then gets the full state).
    offload = not (torch.distributed.is_initialized() and torch.distributed.get_backend() == "gloo")
    full = get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=offload))
    if not distributed.is_main_process():
        return None, []
    exp_avg, exp_avg_sq = {}, {}
    for fqn, st in full.get("state", {}).items():
        if "exp_avg" not in st:
            raise RuntimeError(f"The optimizer has no Adam state for {fqn!r}.")
        if st["exp_avg"].untyped_storage().data_ptr() == st["exp_avg_sq"].untyped_storage().data_ptr():
            raise RuntimeError(f"The gathered exp_avg and exp_avg_sq of {fqn!r} share one buffer (a torch "
                               "full-state-dict gathering bug): the saved moments would be wrong.")
        key = parameter_key(clean_name(fqn), adapter)
        # Gathered shards can be views of one buffer: own copies, float32 as save_less_state stores them.
        exp_avg[key] = st["exp_avg"].detach().to("cpu", torch.float32).clone()
        exp_avg_sq[key] = st["exp_avg_sq"].detach().to("cpu", torch.float32).clone()
    expected = list(order)
    keys = [k for k in expected if k in exp_avg] + [k for k in exp_avg if k not in set(expected)]
    return AdamMoments(exp_avg, exp_avg_sq, tuple(group["betas"]), float(group["eps"])), keys
