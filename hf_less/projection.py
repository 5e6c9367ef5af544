"""Seeded random projection of gradient features (the paper's Pi: R^P -> R^d).

The projection matrix ``R`` (``P x d``) has i.i.d. entries, Rademacher (+-1, the default) or
standard Gaussian, and features are ``x @ R / sqrt(d)`` so that ``E[<Rx, Ry>] = <x, y>``
(Johnson-Lindenstrauss). ``R`` is never materialised whole: it is cut into blocks of
:data:`BLOCK_ROWS` rows, and block ``k`` is drawn from a CPU generator seeded by ``(seed, k)``.
The values therefore depend only on ``(kind, seed, block)``, never on the device, the GPU model
or the batch size, and features from two machines can be compared.

Speed (the projection costs ``2 P d`` flops per example, and generating ``R`` costs ``P d``
draws whatever the number of rows projected):

- Rademacher signs are drawn as packed 32-bit words (one draw per 32 entries) on the CPU and
  expanded on the compute device byte by byte through a ``(256, 8)`` table of +-1 rows: a
  gather, not ``P d`` random draws. Only the packed words cross to a GPU.
- +-1 is exact in bfloat16, so the Rademacher matmul runs in bfloat16 with float32 accumulation
  across blocks where the matrix is large (``precision="auto"``); the gradient side is then
  rounded to bfloat16 (relative error about ``2^-9`` per coordinate, which averages out in the
  projected coordinates: about ``1e-3`` relative per feature, ``1e-5`` on cosines; see the tests).
  Small projections, and every Gaussian one, stay in float32.
- Blocks are cached in the compute dtype up to ``cache_bytes``; the cache keeps the first blocks
  it sees rather than the most recent ones, because projections sweep the blocks in order (an
  LRU cache smaller than the sweep would never hit).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

KINDS = ("rademacher", "gaussian")
PRECISIONS = ("auto", "float32", "bfloat16")
BLOCK_ROWS = 4096
# Version of the matrix generation, stored in the identity so features of another version are refused.
# 1: one int8 draw per Rademacher entry; 2: packed 32-bit words expanded bytewise through a sign table.
MATRIX_VERSION = 2
WORD_BITS = 32
# precision="auto" multiplies in bfloat16 from this many matrix entries (P * d) on: below it the
# projection is cheap anyway and stays float32-exact.
AUTO_BF16_ENTRIES = 2**26

_SIGN_TABLES: dict[tuple[str, torch.dtype], torch.Tensor] = {}


def _block_seed(seed: int, block: int) -> int:
    # A fixed mixing of (seed, block) into one 63-bit generator seed (splitmix64 finaliser).
    z = (seed * 0x9E3779B97F4A7C15 + block + 1) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF


def sign_table(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(256, 8)`` table: row ``b`` holds ``+1`` where bit ``j`` of the byte ``b`` is set, else ``-1``."""
    key = (str(device), dtype)
    if key not in _SIGN_TABLES:
        byte = torch.arange(256, dtype=torch.int32)[:, None]
        bits = (byte >> torch.arange(8, dtype=torch.int32)) & 1
        _SIGN_TABLES[key] = (bits * 2 - 1).to(device=device, dtype=dtype)
    return _SIGN_TABLES[key]


def packed_signs(seed: int, block: int, proj_dim: int) -> torch.Tensor:
    """The random words of Rademacher block ``block``: ``(BLOCK_ROWS, ceil(d / 32))`` int64 in ``[0, 2^32)``.

    Always drawn on the CPU (one 32-bit draw per 32 entries), and always for all
    :data:`BLOCK_ROWS` rows, so a block's values depend neither on the device nor on how many
    of its rows are used.
    """
    gen = torch.Generator(device="cpu").manual_seed(_block_seed(seed, block))
    return torch.randint(0, 2**WORD_BITS, (BLOCK_ROWS, -(-proj_dim // WORD_BITS)), generator=gen,
                         dtype=torch.int64)


def expand_signs(words: torch.Tensor, proj_dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(rows, ceil(d / 32))`` words -> ``(rows, d)`` +-1 in ``dtype`` on ``words.device``.

    Entry ``32 c + j`` of a row is ``+1`` iff bit ``j`` of word ``c`` is set. The words are cut
    into bytes and each byte is looked up in :func:`sign_table` (a gather, no per-entry draw).
    """
    shifts = torch.arange(0, WORD_BITS, 8, device=words.device, dtype=words.dtype)
    byte = (words[..., None] >> shifts) & 255  # (rows, ceil(d / 32), 4), low byte first
    table = sign_table(words.device, dtype)
    return F.embedding(byte, table).reshape(words.shape[0], -1)[:, :proj_dim]


def projection_block(kind: str, seed: int, block: int, rows: int, proj_dim: int,
                     device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows ``[block * BLOCK_ROWS, block * BLOCK_ROWS + rows)`` of the unscaled matrix R.

    Returns ``(rows, d)`` in ``dtype`` on ``device``; the values are the same for every device.
    """
    if kind == "rademacher":
        words = packed_signs(seed, block, proj_dim)[:rows]
        return expand_signs(words.to(device, non_blocking=True), proj_dim, dtype)
    if kind == "gaussian":
        gen = torch.Generator(device="cpu").manual_seed(_block_seed(seed, block))
        r = torch.randn((BLOCK_ROWS, proj_dim), generator=gen, dtype=torch.float32)[:rows]
        return r.to(device=device, dtype=dtype)
    raise ValueError(f"Unknown projection kind {kind!r}; expected one of {KINDS}.")


def _mm_float32_out(x: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """``x @ block`` with a float32 result; on CUDA low-precision inputs keep a float32 output."""
    if x.dtype != torch.float32 and x.is_cuda:
        try:
            return torch.mm(x, block, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):  # older torch: no out_dtype
            pass
    return (x @ block).float()


class RandomProjector:
    """Projects vectors of length ``dim_in`` to ``proj_dim`` with a seeded random matrix.

    Args:
        dim_in: P, the number of gradient coordinates (trainable LoRA parameters).
        proj_dim: d, the output dimension.
        kind: ``"rademacher"`` (default) or ``"gaussian"``.
        seed: the projection seed; equal seeds give equal matrices on every device.
        cache_bytes: bound on the memory kept for cached blocks (per projector).
        precision: ``"auto"`` (bfloat16 matmul for a Rademacher matrix of at least
            :data:`AUTO_BF16_ENTRIES` entries, float32 otherwise), ``"float32"`` or
            ``"bfloat16"`` (Rademacher only: a Gaussian matrix is not exact in bfloat16).
    """

    def __init__(self, dim_in: int, proj_dim: int, kind: str = "rademacher", seed: int = 0,
                 cache_bytes: int = 2**30, *, precision: str = "auto"):
        if kind not in KINDS:
            raise ValueError(f"Unknown projection kind {kind!r}; expected one of {KINDS}.")
        if not isinstance(proj_dim, int) or proj_dim <= 0:
            raise ValueError(f"proj_dim must be a positive int (or None for exact features), got {proj_dim!r}.")
        if precision not in PRECISIONS:
            raise ValueError(f"Unknown precision {precision!r}; expected one of {PRECISIONS}.")
        if precision == "bfloat16" and kind != "rademacher":
            raise ValueError("precision='bfloat16' needs kind='rademacher' (+-1 is exact in bfloat16).")
        self.dim_in, self.proj_dim, self.kind, self.seed = int(dim_in), proj_dim, kind, int(seed)
        self.scale = 1.0 / math.sqrt(proj_dim)
        self.cache_bytes = cache_bytes
        if precision == "auto":
            big = self.dim_in * proj_dim >= AUTO_BF16_ENTRIES
            precision = "bfloat16" if kind == "rademacher" and big else "float32"
        self.precision = precision
        self.compute_dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32
        self._cache: dict[tuple, torch.Tensor] = {}
        self._cached_bytes = 0

    @property
    def identity(self) -> dict:
        """What determines the matrix; stored with features so mismatches are caught."""
        return {"kind": self.kind, "dim": self.proj_dim, "seed": self.seed, "dim_in": self.dim_in,
                "block_rows": BLOCK_ROWS, "version": MATRIX_VERSION}

    @property
    def num_blocks(self) -> int:
        return -(-self.dim_in // BLOCK_ROWS)

    def block(self, k: int, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
        """Block ``k`` of the unscaled matrix, ``(rows_k, d)`` on ``device`` in ``dtype`` (cached)."""
        dtype = dtype or self.compute_dtype
        key = (k, str(device), dtype)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        rows = min(BLOCK_ROWS, self.dim_in - k * BLOCK_ROWS)
        block = projection_block(self.kind, self.seed, k, rows, self.proj_dim, device, dtype)
        nbytes = block.numel() * block.element_size()
        # Keep the first blocks that fit: sweeps visit blocks in order, so these hit on every sweep.
        if self._cached_bytes + nbytes <= self.cache_bytes:
            self._cache[key] = block
            self._cached_bytes += nbytes
        return block

    def clear_cache(self) -> None:
        self._cache.clear()
        self._cached_bytes = 0

    def project(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """``x[:, j] -> R[offset + j]``: the contribution of coordinates ``[offset, offset + n)``.

        Args:
            x: ``(B, n)`` slice of the gradient vectors (any float dtype, any device).
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
            block = self.block(k, x.device)
            xs = x[:, pos - offset : pos - offset + (r1 - r0)].to(self.compute_dtype)
            # Per-block results are summed in float32, whatever the matmul's dtype.
            out += _mm_float32_out(xs, block[r0:r1])
            pos += r1 - r0
        return out.mul_(self.scale)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Project whole vectors: ``(B, P) -> (B, proj_dim)``."""
        if x.shape[1] != self.dim_in:
            raise ValueError(f"Expected vectors of length {self.dim_in}, got {x.shape[1]}.")
        return self.project(x, 0)
