"""The few collective operations hf-less needs, over whatever process group is running.

``accelerate launch``, ``torchrun`` and the Trainer all initialise ``torch.distributed``; hf-less
only asks it who it is and exchanges Python objects. With no process group every function is
the single-process identity, so the same code runs everywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


def all_gather(obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order, on every process."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj: Any) -> Any:
    """The main process's ``obj`` on every process."""
    if not is_distributed():
        return obj
    box = [obj if is_main_process() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


T = TypeVar("T")


def on_main(fn: Callable[[], T]) -> T:
    """``fn()`` run by the main process only; its result, or the exception it raised, on every process.

    The exception is raised everywhere, so no process waits forever for a main process that failed.
    """
    out: Any = None
    if is_main_process():
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001 - re-raised on every process below
            out = e
    out = broadcast(out)
    if isinstance(out, Exception):
        raise out
    return out


def barrier() -> None:
    if is_distributed():
        dist.barrier()
