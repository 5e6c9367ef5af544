"""The few collective operations hf-less needs, over whatever process group is running.

``accelerate launch``, ``torchrun`` and the Trainer all initialise ``torch.distributed``; hf-less
only asks it who it is and exchanges Python objects. With no process group every function is
the single-process identity, so the same code runs everywhere.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
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


SHARED_PATH_FIX = ("Under several nodes every process must see the same files: give every node the same path on a "
                   "shared filesystem (NFS, Lustre, a mounted bucket...), not a node-local disk.")


def check_shared_directory(path: str | os.PathLike, what: str, wait: float = 5.0) -> None:
    """Collective: refuse, on every process at once, a directory that not every process sees.

    The main process writes a token file into ``path``; every process looks for it (for up to
    ``wait`` seconds: a network filesystem may show a new file late); if one does not find it
    (per-node directories on node-local disks), every process raises ``RuntimeError`` naming
    the processes, their hosts and the fix. A no-op in a single process.
    """
    if not is_distributed():
        return
    path = Path(path)
    token = None
    if is_main_process():
        try:
            from .io import atomic_write_text

            path.mkdir(parents=True, exist_ok=True)
            token = f".hf_less_shared.{uuid.uuid4().hex}"
            atomic_write_text(path / token, token)
        except OSError as e:
            token = RuntimeError(f"Cannot write to {what} {str(path)!r}: {e}")
    token = broadcast(token)
    if isinstance(token, Exception):
        raise token
    deadline = time.monotonic() + wait
    while not (seen := _reads(path / token, token)) and time.monotonic() < deadline:
        time.sleep(0.2)
    views = all_gather((seen, socket.gethostname()))
    barrier()  # every process has looked before the token goes
    if is_main_process():
        (path / token).unlink(missing_ok=True)
    blind = [f"process {r} on {host}" for r, (ok, host) in enumerate(views) if not ok]
    if blind:
        raise RuntimeError(f"{what} {str(path)!r} is not shared between the processes: {', '.join(blind)} cannot see "
                           f"the files the main process writes there. {SHARED_PATH_FIX}")


def _reads(path: Path, token: str) -> bool:
    try:
        with open(path) as f:  # an open, not a stat: NFS revalidates on open
            return f.read() == token
    except OSError:
        return False


def check_same(value: Any, what: str) -> None:
    """Collective: refuse, on every process at once, a ``value`` that is not the same on every process."""
    if not is_distributed():
        return
    values = all_gather(value)
    odd = [r for r, v in enumerate(values) if v != values[0]]
    if odd:
        raise RuntimeError(f"The processes disagree on {what}: process(es) {odd} differ from process 0 "
                           f"({values[odd[0]]!r} vs {values[0]!r}). {SHARED_PATH_FIX}")
