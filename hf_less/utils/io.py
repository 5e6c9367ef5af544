"""Atomic, durable file writes and file digests: the one way hf-less writes a file.

Every file of a run (feature shards, metadata, selections, LESS state, downloads) is written to a
temporary file in the same directory, fsynced and renamed over the target, so an interrupted job
leaves the old content or the new one, never a torn file.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file in the same directory, fsync, rename over ``path``, fsync the directory.

    The last fsync makes the rename itself durable: after a power loss ``path`` holds the old or
    the new content, never a missing entry.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    if not hasattr(os, "O_DIRECTORY"):  # Windows: directories cannot be opened; NTFS journals renames
        return
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_json(path: str | os.PathLike, obj, default=None) -> None:
    """``obj`` as indented JSON with sorted keys, atomically; ``default`` as for :func:`json.dumps`."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=default) + "\n").encode())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """``text`` as UTF-8, atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def npy_bytes(array) -> bytes:
    """The bytes of ``array`` as a ``.npy`` file (what :func:`numpy.save` writes)."""
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.asarray(array))
    return buf.getvalue()


def atomic_save_npy(path: str | os.PathLike, array) -> None:
    """:func:`numpy.save`, atomically."""
    atomic_write_bytes(path, npy_bytes(array))


def atomic_save_safetensors(path: str | os.PathLike, tensors: dict) -> None:
    """:func:`safetensors.torch.save_file`, atomically."""
    from safetensors.torch import save

    atomic_write_bytes(path, save(tensors))


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 hex digest of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
