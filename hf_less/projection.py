"""Seeded random projection of gradient features (the paper's Pi: R^P -> R^d).

The projection matrix ``R`` (``P x d``) has i.i.d. entries, Rademacher (+-1, the default) or
standard Gaussian, and features are ``x @ R / sqrt(d)`` so that ``E[<Rx, Ry>] = <x, y>``
(Johnson-Lindenstrauss). ``R`` is never materialised whole: it is cut into blocks of
:data:`BLOCK_ROWS` rows, and block ``k`` is drawn from a CPU generator seeded by ``(seed, k)``.
The values therefore depend only on the seed, never on the device, the GPU model or the batch
size, and features from two machines can be compared. Blocks are moved to the compute device
and kept in a bounded LRU cache.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch

KINDS = ("rademacher", "gaussian")
BLOCK_ROWS = 4096


def _block_seed(seed: int, block: int) -> int:
    # A fixed mixing of (seed, block) into one 63-bit generator seed (splitmix64 finaliser).
    z = (seed * 0x9E3779B97F4A7C15 + block + 1) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF


def projection_block(kind: str, seed: int, block: int, rows: int, proj_dim: int) -> torch.Tensor:
    """Rows ``[block * BLOCK_ROWS, block * BLOCK_ROWS + rows)`` of the unscaled matrix R, float32 on CPU."""
    gen = torch.Generator(device="cpu").manual_seed(_block_seed(seed, block))
    if kind == "rademacher":
        signs = torch.randint(0, 2, (BLOCK_ROWS, proj_dim), generator=gen, dtype=torch.int8)
        return (signs[:rows].to(torch.float32) * 2.0) - 1.0
    if kind == "gaussian":
        return torch.randn((BLOCK_ROWS, proj_dim), generator=gen, dtype=torch.float32)[:rows]
    raise ValueError(f"Unknown projection kind {kind!r}; expected one of {KINDS}.")


class RandomProjector:
    """Projects vectors of length ``dim_in`` to ``proj_dim`` with a seeded random matrix.

    Args:
        dim_in: P, the number of gradient coordinates (trainable LoRA parameters).
        proj_dim: d, the output dimension.
        kind: ``"rademacher"`` (default) or ``"gaussian"``.
        seed: the projection seed; equal seeds give equal matrices on every device.
        cache_bytes: bound on the memory kept for cached blocks (per projector).
    """

    def __init__(
        self, dim_in: int, proj_dim: int, kind: str = "rademacher", seed: int = 0, cache_bytes: int = 2**30
    ):
        if kind not in KINDS:
            raise ValueError(f"Unknown projection kind {kind!r}; expected one of {KINDS}.")
        if not isinstance(proj_dim, int) or proj_dim <= 0:
            raise ValueError(f"proj_dim must be a positive int (or None for exact features), got {proj_dim!r}.")
        self.dim_in, self.proj_dim, self.kind, self.seed = int(dim_in), proj_dim, kind, int(seed)
        self.scale = 1.0 / math.sqrt(proj_dim)
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    @property
    def identity(self) -> dict:
        """What determines the matrix; stored with features so mismatches are caught."""
        return {"kind": self.kind, "dim": self.proj_dim, "seed": self.seed, "dim_in": self.dim_in,
                "block_rows": BLOCK_ROWS}

    def _block(self, k: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (k, str(device), dtype)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        rows = min(BLOCK_ROWS, self.dim_in - k * BLOCK_ROWS)
        block = projection_block(self.kind, self.seed, k, rows, self.proj_dim).to(device=device, dtype=dtype)
        nbytes = block.numel() * block.element_size()
        if nbytes <= self.cache_bytes:
            self._cache[key] = block
            while sum(b.numel() * b.element_size() for b in self._cache.values()) > self.cache_bytes:
                self._cache.popitem(last=False)
        return block

    def project(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """``x[:, j] -> R[offset + j]``: the contribution of coordinates ``[offset, offset + n)``.

        Args:
            x: ``(B, n)`` slice of the gradient vectors.
            offset: index of ``x[:, 0]`` among the P coordinates.
        Returns:
            ``(B, proj_dim)`` float32; summing over slices that tile ``[0, P)`` gives ``x_full @ R / sqrt(d)``.
        """
        n = x.shape[1]
        if offset < 0 or offset + n > self.dim_in:
            raise ValueError(f"Coordinates [{offset}, {offset + n}) fall outside [0, {self.dim_in}).")
        out = torch.zeros((x.shape[0], self.proj_dim), device=x.device, dtype=torch.float32)
        pos = offset
        while pos < offset + n:
            k, r0 = divmod(pos, BLOCK_ROWS)
            r1 = min(BLOCK_ROWS, r0 + (offset + n - pos), self.dim_in - k * BLOCK_ROWS)
            block = self._block(k, x.device, torch.float32)
            out += x[:, pos - offset : pos - offset + (r1 - r0)].to(torch.float32) @ block[r0:r1]
            pos += r1 - r0
        return out.mul_(self.scale)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Project whole vectors: ``(B, P) -> (B, proj_dim)``."""
        if x.shape[1] != self.dim_in:
            raise ValueError(f"Expected vectors of length {self.dim_in}, got {x.shape[1]}.")
        return self.project(x, 0)
