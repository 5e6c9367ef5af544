"""Chunked cosine similarity of pool features to target features: the ``sims`` every selector consumes."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..utils.tensors import normalize
from . import strategies


def _as_tensor(x: Any, start: int | None = None, stop: int | None = None) -> torch.Tensor:
    if start is not None:
        x = x.read(start, stop) if hasattr(x, "read") and not isinstance(x, torch.Tensor) else x[start:stop]
    if isinstance(x, torch.Tensor):
        return x.detach()
    return torch.from_numpy(np.asarray(x, dtype=np.float32))


class CosineSimilarity:
    """The ``(N, T)`` cosine similarity of pool features to target features, computed lazily by rows.

    Holds only the (normalised) target features; pool rows are read and normalised one chunk at
    a time, so a memory-mapped ``(N, d)`` pool never becomes a dense ``(N, T)`` matrix. Every
    selector accepts it as ``sims``; ``np.asarray(cs)`` or ``cs[:]`` gives the dense matrix.

    Args:
        pool: ``(N, d)`` features: array, memmap, tensor, or an object with ``read(start, stop)``.
        targets: ``(T, d)`` features.
        device: where the products run (default: the targets' device, or CPU).
    """

    def __init__(self, pool: Any, targets: Any, chunk_rows: int | None = None,
                 device: str | torch.device | None = None):
        t = _as_tensor(targets).float()
        if t.ndim != 2 or len(getattr(pool, "shape", ())) != 2 or pool.shape[1] != t.shape[1]:
            raise ValueError(f"pool {tuple(getattr(pool, 'shape', ()))} and targets {tuple(t.shape)} must be "
                             "(N, d) and (T, d) features of the same dimension d.")
        self.device = torch.device(device) if device is not None else t.device
        self.pool = pool
        self.targets = normalize(t.to(self.device))
        self.shape = (int(pool.shape[0]), int(t.shape[0]))
        self.chunk_rows = chunk_rows or strategies.default_chunk_rows(max(self.shape[1], 64))

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` as a float32 ``(stop - start, T)`` array."""
        stop = min(stop, self.shape[0])
        out = np.empty((max(0, stop - start), self.shape[1]), dtype=np.float32)
        for a in range(start, stop, self.chunk_rows):
            b = min(stop, a + self.chunk_rows)
            p = normalize(_as_tensor(self.pool, a, b).float().to(self.device))
            out[a - start : b - start] = (p @ self.targets.T).cpu().numpy()
        return out

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, slice):
            start, stop, step = key.indices(self.shape[0])
            rows = self.read(start, stop) if step == 1 else self.read(0, self.shape[0])[key]
            return rows
        if isinstance(key, (int, np.integer)):
            return self.read(int(key), int(key) + 1)[0]
        idx = np.asarray(key)
        return strategies.gather_rows(self, idx)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self.read(0, self.shape[0])
        return out if dtype is None else out.astype(dtype)


def pairwise_cosine(pool: Any, targets: Any, out: np.ndarray | None = None, chunk_rows: int | None = None,
                    device: str | torch.device | None = None) -> np.ndarray:
    """Dense ``(N, T)`` float32 cosine of ``pool`` ``(N, d)`` to ``targets`` ``(T, d)``, in row chunks.

    Pass ``out`` (e.g. ``np.lib.format.open_memmap(path, "w+", np.float32, (N, T))``) to write a
    matrix larger than memory straight to disk.
    """
    cs = CosineSimilarity(pool, targets, chunk_rows, device)
    if out is None:
        out = np.empty(cs.shape, dtype=np.float32)
    elif tuple(out.shape) != cs.shape:
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {cs.shape}.")
    step = cs.chunk_rows
    for start in tqdm(range(0, cs.shape[0], step), desc="cosine", unit="chunk",
                      disable=cs.shape[0] < 64 * step, leave=False):
        out[start : start + step] = cs.read(start, start + step)
    return out
