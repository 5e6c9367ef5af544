"""Seeded random projections of gradient features (the paper's Pi: R^P -> R^d).

Four kinds, all with ``E[<Pi x, Pi y>] = <x, y>`` (Johnson-Lindenstrauss):

- ``"rowshift"`` (the default): a structured CountSketch. The P coordinates are cut into rows of
  ``d`` (coordinate ``j`` is column ``j mod d`` of row ``j div d``); row ``k`` gets a hashed shift
  ``h_k`` in ``[0, d)`` and a hashed sign per coordinate, and column ``c`` of row ``k`` is added
  with its sign to output coordinate ``(c + h_k) mod d``. Two coordinates of one row never share
  an output; two of different rows share one with probability exactly ``1/d`` (CountSketch's rate),
  and the per-coordinate signs make those collisions cancel in expectation. The randomness is
  ``P / d`` shifts and the sign bits, generated from a hash on the compute device (no stored
  index tensor). On CUDA the sum is a gather followed by an ordered reduction: no atomics, so the
  result is bitwise reproducible there; on a CPU one ``index_add_`` (sequential, deterministic).
  The two agree to float32 rounding.
- ``"sparse"``: a sparse JL transform (Kane & Nelson 2014; GraSS, arXiv 2505.18976).
  Coordinate ``j`` of the gradient is added to :data:`SPARSE_NNZ` output coordinates, one in each
  of ``s`` equal slices of ``[0, d)``, with a random sign each, scaled by ``1/sqrt(s)``. Buckets
  and signs come from an integer hash of ``(seed, slice, j)``: there is no matrix, the cost is
  ``O(P s)`` per example whatever ``d`` is, and the result is the same on every device.
- ``"rademacher"``: the reference's dense +-1 matrix ``R`` (``P x d``), features ``x R / sqrt(d)``.
  Entry ``(j, c)`` is bit ``c mod 32`` of a 32-bit hash of ``(seed, j, c div 32)``, computed on the
  compute device (a counter-based generator: nothing is drawn on the host or copied, and the bits
  are the same on a CPU and on every GPU by construction). It costs ``2 P d`` flops per example
  plus ``P d / 32`` hashes per generated block; blocks are cached up to ``cache_bytes``, and a
  matrix larger than that is generated tile by tile and used at once (never held whole).
- ``"gaussian"``: a dense standard Gaussian matrix drawn on the host from a CPU generator per
  block of :data:`BLOCK_ROWS` rows (floating-point transforms are not bit-identical across
  devices, so it is not generated on the device); for comparison with the reference only.

Every hash is evaluated in int64 arithmetic whose products stay below 2^63 (a value below 2^32
times a constant below 2^31), so no operation overflows and every device computes the same bits.

Dense speed: +-1 is exact in bfloat16, so the Rademacher matmul runs in bfloat16 with float32
accumulation across blocks where the matrix is large (``precision="auto"``); the gradient side is
then rounded to bfloat16 (relative error about ``2^-9`` per coordinate, which averages out in the
projected coordinates: about ``1e-3`` relative per feature, ``1e-5`` on cosines; see the tests).
The cache keeps the first blocks it sees rather than the most recent ones, because projections
sweep the blocks in order (an LRU cache smaller than the sweep would never hit).
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

from .per_example import adam_direction

KINDS = ("rowshift", "sparse", "rademacher", "gaussian")
DEFAULT_KIND = "rowshift"
# Kinds with no matrix to generate: each parameter slice is projected as it is formed, at any batch size.
MATRIX_FREE_KINDS = ("rowshift", "sparse")
# One line on each kind, for command-line and config help.
KIND_HELP = ("rowshift (a hashed shift per row of d coordinates, a hashed sign per coordinate: no atomics, "
             "deterministic on a GPU), sparse (sparse JL with s = 4), rademacher (the reference's dense +-1 "
             "matrix) or gaussian")
PRECISIONS = ("auto", "float32", "bfloat16")
BLOCK_ROWS = 4096
# Version of each kind's generation, stored in the identity so features of another version are refused.
# rademacher 1: one int8 draw per entry; 2: packed words drawn on the host; 3: counter-based hash on the device.
MATRIX_VERSIONS = {"rowshift": 1, "sparse": 1, "rademacher": 3, "gaussian": 2}
# Output coordinates per input coordinate of the sparse projection (s). 4 keeps the cosine error of
# dense JL at d = 8192 on gradients whose mass sits in few coordinates (see docs/performance.md).
SPARSE_NNZ = 4
WORD_BITS = 32
# precision="auto" multiplies in bfloat16 from this many matrix entries (P * d) on: below it the
# projection is cheap anyway and stays float32-exact.
AUTO_BF16_ENTRIES = 2**26
# Rows of the Rademacher matrix generated at once on CUDA when the matrix does not fit the cache: 16,384 rows
# at d = 8192 in bfloat16 is a 256 MiB tile (fewer, larger kernels than one per 4,096-row block).
CUDA_TILE_ENTRIES = 2**27
# Counters (coordinate indices) must fit the 32-bit hash.
MAX_DIM_IN = 2**32
# Hash streams of the row-shift kind: far above the sparse kind's streams 2 .. 2 + s.
ROWSHIFT_STREAM = 2**32

_M32 = 0xFFFFFFFF
_SIGN_TABLES: dict[tuple[str, torch.dtype], torch.Tensor] = {}


def _fmix64(z: int) -> int:
    """splitmix64's 64-bit finaliser of a Python int."""
    z &= 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return z ^ (z >> 31)


def _splitmix64(z: int) -> int:
    """One splitmix64 step: the golden-ratio increment, then the finaliser."""
    return _fmix64(z + 0x9E3779B97F4A7C15)


def _block_seed(seed: int, block: int) -> int:
    # A fixed mixing of (seed, block) into one 63-bit CPU generator seed (the Gaussian kind).
    return _fmix64(seed * 0x9E3779B97F4A7C15 + block + 1) & 0x7FFFFFFFFFFFFFFF


def hash_key(seed: int, stream: int) -> int:
    """A 32-bit key for one stream of hashes (``stream``: a row stream, a slice of the sparse kind)."""
    return _splitmix64(_splitmix64(int(seed) & 0xFFFFFFFFFFFFFFFF) ^ int(stream)) & _M32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash, elementwise, of int64 ``x`` in ``[0, 2^32)``; the result is in ``[0, 2^32)``.

    Three xor-shift rounds and two multiplications by odd constants below 2^31, so every product is
    below 2^63: exact int64 arithmetic, the same bits on every device. Works in place on ``x``
    (a fresh tensor of the caller's): the dense generator hashes ``P d / 32`` words, and on a CPU
    each pass over them costs as much as the arithmetic.
    """
    x ^= x >> 16
    x.mul_(0x21F0AAAD).bitwise_and_(_M32)
    x ^= x >> 15
    x.mul_(0x735A2D97).bitwise_and_(_M32)
    x ^= x >> 15
    return x


def hashed(counters: torch.Tensor, key: int) -> torch.Tensor:
    """``mix32(mix32(counter ^ key) ^ key')``: two rounds, so nearby counters give unrelated values."""
    x = mix32(counters ^ key)
    x ^= key >> 1
    return mix32(x)


def sign_table(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(256, 8)`` table: row ``b`` holds ``+1`` where bit ``j`` of the byte ``b`` is set, else ``-1``."""
    key = (str(device), dtype)
    if key not in _SIGN_TABLES:
        byte = torch.arange(256, dtype=torch.int32)[:, None]
        bits = (byte >> torch.arange(8, dtype=torch.int32)) & 1
        _SIGN_TABLES[key] = (bits * 2 - 1).to(device=device, dtype=dtype)
    return _SIGN_TABLES[key]


def rademacher_words(seed: int, row0: int, rows: int, proj_dim: int,
                     device: torch.device | str = "cpu", stream: int = 0) -> torch.Tensor:
    """The sign words of rows ``[row0, row0 + rows)`` of R: ``(rows, ceil(d / 32))`` int64 in ``[0, 2^32)``.

    Word ``c`` of row ``j`` is a hash of ``(seed, j, c)`` computed on ``device``: its value depends
    on nothing else (not the device, the block, nor how many rows are asked for). ``stream`` picks
    the pair of hash streams ``(stream, stream + 1)``: 0 for the Rademacher matrix, another for
    another kind's signs.
    """
    if row0 < 0 or row0 + rows > MAX_DIM_IN:
        raise ValueError(f"Rows [{row0}, {row0 + rows}) fall outside the hash's range [0, 2^32).")
    j = torch.arange(row0, row0 + rows, device=device, dtype=torch.int64)
    row_hash = hashed(j, hash_key(seed, stream))  # (rows,): unrelated values for neighbouring rows
    words = -(-proj_dim // WORD_BITS)
    # Word c of row j: one more round over (row hash + golden-ratio step * c) ^ key; the row hash is
    # already random, so one round per word suffices (c * step < 2^26 * 2^32 < 2^63: no overflow).
    c = torch.arange(words, device=device, dtype=torch.int64) * 0x9E3779B9
    x = row_hash[:, None] + c
    x.bitwise_and_(_M32).bitwise_xor_(hash_key(seed, stream + 1))
    return mix32(x)


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
    """Rows ``[block * BLOCK_ROWS, block * BLOCK_ROWS + rows)`` of the unscaled dense matrix R.

    Returns ``(rows, d)`` in ``dtype`` on ``device``; the values are the same for every device.
    """
    if kind == "rademacher":
        return expand_signs(rademacher_words(seed, block * BLOCK_ROWS, rows, proj_dim, device), proj_dim, dtype)
    if kind == "gaussian":
        gen = torch.Generator(device="cpu").manual_seed(_block_seed(seed, block))
        r = torch.randn((BLOCK_ROWS, proj_dim), generator=gen, dtype=torch.float32)[:rows]
        return r.to(device=device, dtype=dtype)
    raise ValueError(f"Unknown dense projection kind {kind!r}; expected 'rademacher' or 'gaussian'.")


def sparse_slices(proj_dim: int, nnz: int) -> list[tuple[int, int]]:
    """``(start, width)`` of the ``s`` slices of ``[0, d)`` that each take one copy of every coordinate."""
    bounds = [k * proj_dim // nnz for k in range(nnz + 1)]
    return [(bounds[k], bounds[k + 1] - bounds[k]) for k in range(nnz)]


def sparse_targets(seed: int, offset: int, n: int, proj_dim: int, nnz: int,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Where coordinates ``[offset, offset + n)`` go: ``(s, n)`` int64 in ``[0, 2d)``.

    Entry ``(k, j)`` is ``bucket + d * negative``: the output coordinate ``bucket`` in slice ``k`` and
    whether the coordinate enters it with sign -1 (an index into a ``2d`` accumulator whose halves
    are subtracted). Buckets and signs are hashes of ``(seed, k, j)``.
    """
    if offset < 0 or offset + n > MAX_DIM_IN:
        raise ValueError(f"Coordinates [{offset}, {offset + n}) fall outside the hash's range [0, 2^32).")
    j = torch.arange(offset, offset + n, device=device, dtype=torch.int64)
    out = torch.empty((nnz, n), device=device, dtype=torch.int64)
    for k, (start, width) in enumerate(sparse_slices(proj_dim, nnz)):
        h = hashed(j, hash_key(seed, 2 + k))
        out[k] = start + (h >> 1) % width + proj_dim * (h & 1)
    return out


def _mm_float32_out(x: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """``x @ block`` with a float32 result; on CUDA low-precision inputs keep a float32 output."""
    if x.dtype != torch.float32 and x.is_cuda:
        try:
            return torch.mm(x, block, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):  # older torch: no out_dtype
            pass
    return (x @ block).float()


class _ProjectsAdam:
    """``project_adam``, which every kind has: the projection of LESS's Adam direction of a slice."""

    def project_adam(self, g: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                     betas: tuple[float, float], eps: float, offset: int = 0) -> torch.Tensor:
        """``project(adam_direction(g, exp_avg, exp_avg_sq, betas, eps), offset)``: ``(B, n) -> (B, d)``."""
        return self.project(adam_direction(g, exp_avg, exp_avg_sq, betas, eps), offset)


class _Cache:
    """Tensors kept up to ``cache_bytes``: the first ones that fit (projections sweep in order)."""

    def __init__(self, cache_bytes: int):
        self.cache_bytes = int(cache_bytes)
        self._items: dict[tuple, torch.Tensor] = {}
        self.nbytes = 0

    def get(self, key: tuple, make):
        """The value cached under ``key``, else ``make()`` (a tensor or a tuple of tensors), kept if it fits."""
        hit = self._items.get(key)
        if hit is not None:
            return hit
        value = make()
        size = sum(t.numel() * t.element_size() for t in (value if isinstance(value, tuple) else (value,)))
        if self.nbytes + size <= self.cache_bytes:
            self._items[key] = value
            self.nbytes += size
        return value

    def keys(self) -> list[tuple]:
        return list(self._items)

    def clear(self) -> None:
        self._items.clear()
        self.nbytes = 0


def _check_dims(dim_in: int, proj_dim) -> None:
    if not isinstance(proj_dim, int) or isinstance(proj_dim, bool) or proj_dim <= 0:
        raise ValueError(f"proj_dim must be a positive int (or None for exact features), got {proj_dim!r}.")
    if not 0 < int(dim_in) <= MAX_DIM_IN:
        raise ValueError(f"Cannot project {dim_in} coordinates: the generators count them in 32 bits.")


class RandomProjector(_ProjectsAdam):
    """Projects vectors of length ``dim_in`` to ``proj_dim`` with a seeded dense random matrix.

    Args:
        dim_in: P, the number of gradient coordinates (trainable LoRA parameters).
        proj_dim: d, the output dimension.
        kind: ``"rademacher"`` (the reference's) or ``"gaussian"``.
        seed: the projection seed; equal seeds give equal matrices on every device.
        cache_bytes: bound on the memory kept for cached blocks (per projector).
        precision: ``"auto"`` (bfloat16 matmul for a Rademacher matrix of at least
            :data:`AUTO_BF16_ENTRIES` entries, float32 otherwise), ``"float32"`` or
            ``"bfloat16"`` (Rademacher only: a Gaussian matrix is not exact in bfloat16).
    """

    # Generating the matrix costs P x d per call whatever the rows: callers project many rows at once.
    buffered = True

    def __init__(self, dim_in: int, proj_dim: int, kind: str = "rademacher", seed: int = 0,
                 cache_bytes: int = 2**30, *, precision: str = "auto"):
        if kind not in ("rademacher", "gaussian"):
            hint = " (use make_projector for 'sparse' or 'rowshift')" if kind in KINDS else ""
            raise ValueError(f"Unknown dense projection kind {kind!r}; expected 'rademacher' or 'gaussian'{hint}.")
        _check_dims(dim_in, proj_dim)
        if precision not in PRECISIONS:
            raise ValueError(f"Unknown precision {precision!r}; expected one of {PRECISIONS}.")
        if precision == "bfloat16" and kind != "rademacher":
            raise ValueError("precision='bfloat16' needs kind='rademacher' (+-1 is exact in bfloat16).")
        self.dim_in, self.proj_dim, self.kind, self.seed = int(dim_in), proj_dim, kind, int(seed)
        self.scale = 1.0 / math.sqrt(proj_dim)
        if precision == "auto":
            big = self.dim_in * proj_dim >= AUTO_BF16_ENTRIES
            precision = "bfloat16" if kind == "rademacher" and big else "float32"
        self.precision = precision
        self.compute_dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32
        self._cache = _Cache(cache_bytes)

    @property
    def cache_bytes(self) -> int:
        return self._cache.cache_bytes

    @property
    def identity(self) -> dict:
        """What determines the matrix; stored with features so mismatches are caught."""
        return {"kind": self.kind, "dim": self.proj_dim, "seed": self.seed, "dim_in": self.dim_in,
                "block_rows": BLOCK_ROWS, "version": MATRIX_VERSIONS[self.kind]}

    @property
    def num_blocks(self) -> int:
        return -(-self.dim_in // BLOCK_ROWS)

    def block(self, k: int, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
        """Block ``k`` of the unscaled matrix, ``(rows_k, d)`` on ``device`` in ``dtype`` (cached)."""
        dtype = dtype or self.compute_dtype
        rows = min(BLOCK_ROWS, self.dim_in - k * BLOCK_ROWS)
        return self._cache.get((k, str(device), dtype), lambda: projection_block(
            self.kind, self.seed, k, rows, self.proj_dim, device, dtype))

    def clear_cache(self) -> None:
        self._cache.clear()

    @property
    def streams(self) -> bool:
        """Whether rows are generated tile by tile and used at once rather than cached by block.

        True for a Rademacher matrix larger than the cache. Its entries depend on (seed, row, column)
        only, so any tiling gives the same matrix, and nothing the size of ``P x d`` is ever held.
        """
        return self.kind == "rademacher" and self.dim_in * self.proj_dim * self.compute_dtype.itemsize > self.cache_bytes

    def tile_rows(self, device: torch.device | str) -> int:
        """Rows per generated tile when streaming: :data:`BLOCK_ROWS` on a CPU, larger tiles on CUDA."""
        if torch.device(device).type == "cuda":
            return max(BLOCK_ROWS, CUDA_TILE_ENTRIES // self.proj_dim)
        return BLOCK_ROWS

    def project(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """``x[:, j] -> R[offset + j]``: the contribution of coordinates ``[offset, offset + n)``.

        Args:
            x: ``(B, n)`` slice of the gradient vectors (any float dtype, any device).
            offset: index of ``x[:, 0]`` among the P coordinates.
        Returns:
            ``(B, proj_dim)`` float32; summing over slices that tile ``[0, P)`` gives ``x_full @ R / sqrt(d)``.
        """
        n = x.shape[1]
        _check_slice(offset, n, self.dim_in)
        out = torch.zeros((x.shape[0], self.proj_dim), device=x.device, dtype=torch.float32)
        if self.streams:
            step = self.tile_rows(x.device)
            for r0 in range(0, n, step):
                rows = min(step, n - r0)
                words = rademacher_words(self.seed, offset + r0, rows, self.proj_dim, x.device)
                tile = expand_signs(words, self.proj_dim, self.compute_dtype)
                del words
                out += _mm_float32_out(x[:, r0 : r0 + rows].to(self.compute_dtype), tile)
                del tile
            return out.mul_(self.scale)
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
        return _project_whole(self, x)


class _MatrixFreeProjector(_ProjectsAdam):
    """What the matrix-free kinds share: each parameter slice projected as it is formed, in float32,
    with the per-slice hashes cached up to ``cache_bytes``."""

    # No matrix to amortise over rows: nothing to buffer.
    buffered = False
    compute_dtype = torch.float32
    precision = "float32"

    def clear_cache(self) -> None:
        self._cache.clear()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Project whole vectors: ``(B, P) -> (B, proj_dim)``."""
        return _project_whole(self, x)


class SparseProjector(_MatrixFreeProjector):
    """The sparse JL projection: each coordinate added to ``nnz`` output coordinates with random signs.

    ``y = S x / sqrt(s)`` where column ``j`` of ``S`` (``d x P``) has one ``+-1`` in each of the ``s``
    slices of :func:`sparse_slices`, at hashed rows with hashed signs. Inner products are preserved
    in expectation and, for vectors whose mass is spread over many coordinates, with the error of a
    dense projection of the same ``d``; mass concentrated in a few coordinates collides more, which
    ``s > 1`` averages out. Exact in float32 (no reduced precision: the work is ``B P s`` additions).

    Args:
        dim_in: P.
        proj_dim: d.
        seed: the projection seed.
        nnz: s, output coordinates per input coordinate (1 <= s <= d).
        cache_bytes: bound on the memory kept for the hashed targets of each parameter slice.
    """

    kind = "sparse"

    def __init__(self, dim_in: int, proj_dim: int, seed: int = 0, nnz: int = SPARSE_NNZ,
                 cache_bytes: int = 2**30):
        _check_dims(dim_in, proj_dim)
        if not isinstance(nnz, int) or not 1 <= nnz <= proj_dim:
            raise ValueError(f"nnz (s) must be an int in [1, proj_dim={proj_dim}], got {nnz!r}.")
        self.dim_in, self.proj_dim, self.seed, self.nnz = int(dim_in), proj_dim, int(seed), nnz
        self.scale = 1.0 / math.sqrt(nnz)
        self._cache = _Cache(cache_bytes)

    @property
    def identity(self) -> dict:
        return {"kind": "sparse", "dim": self.proj_dim, "seed": self.seed, "dim_in": self.dim_in,
                "nnz": self.nnz, "version": MATRIX_VERSIONS["sparse"]}

    def targets(self, offset: int, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """``(s, n)`` accumulator indices of coordinates ``[offset, offset + n)`` (cached per slice)."""
        return self._cache.get((offset, n, str(device)), lambda: sparse_targets(
            self.seed, offset, n, self.proj_dim, self.nnz, device))

    def project(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """The contribution of coordinates ``[offset, offset + n)``: ``(B, n) -> (B, d)`` float32.

        Summing over slices that tile ``[0, P)`` gives the projection of the whole vectors.
        """
        n = x.shape[1]
        _check_slice(offset, n, self.dim_in)
        # Accumulate in a (B, 2d) buffer: columns [0, d) take the + signs, [d, 2d) the - signs, so
        # the signs cost no multiplication. (Along dim 1 measured 2x faster on a CPU than a transposed copy.)
        acc = torch.zeros((x.shape[0], 2 * self.proj_dim), device=x.device, dtype=torch.float32)
        xs = x.detach().to(torch.float32)
        for idx in self.targets(offset, n, x.device):
            acc.index_add_(1, idx, xs)
        return (acc[:, : self.proj_dim] - acc[:, self.proj_dim :]).mul_(self.scale)


def rowshift_shifts(seed: int, row0: int, rows: int, proj_dim: int,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """The shifts ``h_k`` of rows ``[row0, row0 + rows)`` of the row-shift sketch: ``(rows,)`` int64 in ``[0, d)``."""
    k = torch.arange(row0, row0 + rows, device=device, dtype=torch.int64)
    return hashed(k, hash_key(seed, ROWSHIFT_STREAM)) % proj_dim


def rowshift_signs(seed: int, row0: int, rows: int, proj_dim: int, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The signs of rows ``[row0, row0 + rows)`` of the row-shift sketch: ``(rows, d)`` +-1.

    Sign ``c`` of row ``k`` is bit ``c mod 32`` of word ``c div 32`` of :func:`rademacher_words` on
    the row-shift kind's own streams: the Rademacher generator, so equally cheap and device-independent.
    """
    words = rademacher_words(seed, row0, rows, proj_dim, device, stream=ROWSHIFT_STREAM + 1)
    return expand_signs(words, proj_dim, dtype)


class RowShiftProjector(_MatrixFreeProjector):
    """The row-shift sketch (see the module doc): ``y[(c + h_k) mod d] += s_{k,c} x[k d + c]``.

    As a matrix, column ``j = k d + c`` of ``S`` (``d x P``) has a single ``+-1`` at row
    ``(c + h_k) mod d``: unit norm per coordinate, no scaling. Exact in float32.

    Two computations of the same sum, chosen by ``method``:

    - ``"gather"`` (``"auto"`` on CUDA): the slice ``x`` (``(B, n)``, coordinates
      ``[offset, offset + n)``) is laid into the ``K`` rows it touches (``(B, K, d)``, zeros outside it),
      multiplied by the signs, row ``k`` read at ``(p - h_k) mod d`` for output ``p`` (one ``gather``),
      and the rows summed in order. No atomics: bitwise reproducible on a GPU, a few passes over ``B x n``.
    - ``"scatter"`` (``"auto"`` on a CPU): ``index_add_`` of each coordinate into a ``(B, 2d)``
      accumulator (the second half takes the negative signs), which a CPU runs in index order
      (deterministic) at the cost of one pass; CUDA's ``index_add_`` uses float atomics, hence not there.

    They differ by float32 rounding only (the order of the sums).

    Args:
        dim_in: P.
        proj_dim: d.
        seed: the projection seed.
        cache_bytes: bound on the memory kept per parameter slice: signs and gather indices (12
            bytes per coordinate) or scatter indices (8); slices beyond it regenerate theirs per call.
        method: ``"auto"``, ``"gather"`` or ``"scatter"`` (see above).
        compile: run the gather, and for pool examples the Adam direction before it
            (:meth:`project_adam`), as one ``torch.compile``'d pass on every device: the direction
            and the laid-out rows are never written out. The same sum to float32 rounding, in a
            fixed order (deterministic); the first call of each new slice shape compiles (seconds
            to a minute). Where compilation fails it warns once and computes the same sum eagerly.
    """

    kind = "rowshift"
    METHODS = ("auto", "gather", "scatter")

    def __init__(self, dim_in: int, proj_dim: int, seed: int = 0, cache_bytes: int = 2**30, *,
                 method: str = "auto", compile: bool = False):
        _check_dims(dim_in, proj_dim)
        if method not in self.METHODS:
            raise ValueError(f"Unknown row-shift method {method!r}; expected one of {self.METHODS}.")
        self.dim_in, self.proj_dim, self.seed, self.method = int(dim_in), proj_dim, int(seed), method
        self.compile = bool(compile)
        self._cache = _Cache(cache_bytes)

    @property
    def identity(self) -> dict:
        # The method is not part of it: both compute the same matrix.
        return {"kind": self.kind, "dim": self.proj_dim, "seed": self.seed, "dim_in": self.dim_in,
                "version": MATRIX_VERSIONS[self.kind]}

    def _rows(self, offset: int, n: int) -> tuple[int, int]:
        """``(k0, K)``: the first row and the number of rows that ``[offset, offset + n)`` touches."""
        d = self.proj_dim
        return offset // d, -(-(offset % d + n) // d)

    def gather_plan(self, offset: int, n: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """``(signs (K, d) float32, index (K, d) int64)`` of the rows that ``[offset, offset + n)`` touches.

        ``index[k, p] = (p - h_k) mod d``: where output ``p`` reads row ``k``. Cached per slice.
        """
        d = self.proj_dim
        k0, rows = self._rows(offset, n)

        def make():
            p = torch.arange(d, device=device, dtype=torch.int64)
            index = (p[None, :] - rowshift_shifts(self.seed, k0, rows, d, device)[:, None]).remainder_(d)
            return rowshift_signs(self.seed, k0, rows, d, device), index

        return self._cache.get(("gather", offset, n, str(device)), make)

    def targets(self, offset: int, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """``(n,)`` int64 in ``[0, 2d)``: coordinate ``j``'s output plus ``d`` if its sign is -1. Cached per slice."""
        d = self.proj_dim

        def make():
            k0, rows = self._rows(offset, n)
            lead = offset % d
            out = (torch.arange(d, device=device, dtype=torch.int64)[None, :]
                   + rowshift_shifts(self.seed, k0, rows, d, device)[:, None]).remainder_(d)
            negative = rowshift_signs(self.seed, k0, rows, d, device) < 0
            out += d * negative
            return out.reshape(-1)[lead : lead + n].contiguous()

        return self._cache.get(("scatter", offset, n, str(device)), make)

    def project(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """The contribution of coordinates ``[offset, offset + n)``: ``(B, n) -> (B, d)`` float32.

        Summing over slices that tile ``[0, P)`` gives the projection of the whole vectors.
        """
        n = x.shape[1]
        _check_slice(offset, n, self.dim_in)
        d, B = self.proj_dim, x.shape[0]
        xs = x.detach().to(torch.float32)
        if self.compile:
            return self._compiled("gather", xs, offset)
        method = self.method if self.method != "auto" else ("gather" if x.is_cuda else "scatter")
        if method == "scatter":
            acc = torch.zeros((B, 2 * d), device=x.device, dtype=torch.float32)
            acc.index_add_(1, self.targets(offset, n, x.device), xs)
            return acc[:, :d] - acc[:, d:]
        signs, index = self.gather_plan(offset, n, x.device)
        return rowshift_gather(xs, signs, index, offset % d)

    def project_adam(self, g: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                     betas: tuple[float, float], eps: float, offset: int = 0) -> torch.Tensor:
        """The projection of LESS's Adam direction: ``project(adam_direction(g, m, v, betas, eps), offset)``.

        ``g``: ``(B, n)`` per-example gradients of coordinates ``[offset, offset + n)``; ``exp_avg``,
        ``exp_avg_sq``: their ``(n,)`` moments. With ``compile`` one fused pass reads ``g``, ``m``
        and ``v`` once; otherwise the direction is formed, then projected.
        """
        if not self.compile:
            return super().project_adam(g, exp_avg, exp_avg_sq, betas, eps, offset)
        _check_slice(offset, g.shape[1], self.dim_in)
        return self._compiled("adam", g.detach().to(torch.float32), offset, exp_avg, exp_avg_sq,
                              float(betas[0]), float(betas[1]), float(eps))

    def _compiled(self, which: str, x: torch.Tensor, offset: int, *adam) -> torch.Tensor:
        """The compiled gather (``"gather"``) or Adam direction and gather (``"adam"``) of one slice."""
        signs, index = self.gather_plan(offset, x.shape[1], x.device)
        args = (x, *adam, signs, index, offset % self.proj_dim)
        try:
            return _compiled_rowshift(which)(*args)
        except Exception as e:  # no C++/Triton toolchain, an unsupported torch: the same sum, eagerly
            warnings.warn(f"torch.compile of the row-shift projection failed ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); projecting without it.", stacklevel=3)
            self.compile = False
            eager = rowshift_gather if which == "gather" else adam_rowshift_gather
            return eager(*args)


def rowshift_gather(x: torch.Tensor, signs: torch.Tensor, index: torch.Tensor, lead: int) -> torch.Tensor:
    """The row-shift sum of one slice by a gather: ``(B, n) -> (B, d)`` float32.

    ``x`` holds coordinates ``[offset, offset + n)`` with ``lead = offset mod d``; ``signs`` and
    ``index`` (``(K, d)``) are :meth:`RowShiftProjector.gather_plan`'s for the ``K`` rows it touches.
    """
    B, n = x.shape
    rows, d = signs.shape
    if lead or n != rows * d:  # lay the slice into whole rows (the rows' other coordinates are 0)
        x = F.pad(x, (lead, rows * d - lead - n))
    # out[b, p] = sum_k s_k[p'] x[b, k, p'] at p' = (p - h_k) mod d; the sum over k runs in a fixed order.
    return torch.gather(x.view(B, rows, d) * signs, 2, index.expand(B, rows, d)).sum(1)


def adam_rowshift_gather(g: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, b1: float, b2: float,
                         eps: float, signs: torch.Tensor, index: torch.Tensor, lead: int) -> torch.Tensor:
    """:func:`rowshift_gather` of the Adam direction :func:`~hf_less.gradients.per_example.adam_direction`
    of ``g`` (``(B, n)``) with moments ``exp_avg``, ``exp_avg_sq`` (``(n,)``): what is compiled into one pass."""
    return rowshift_gather(adam_direction(g, exp_avg, exp_avg_sq, (b1, b2), eps), signs, index, lead)


_COMPILED: dict[str, object] = {}


def _compiled_rowshift(which: str):
    """``torch.compile`` of :func:`rowshift_gather` or :func:`adam_rowshift_gather`, made once per process.

    ``dynamic=True``: the slices of a model have many shapes, and one graph serves them all.
    """
    if which not in _COMPILED:
        fn = rowshift_gather if which == "gather" else adam_rowshift_gather
        _COMPILED[which] = torch.compile(fn, dynamic=True)
    return _COMPILED[which]


def _check_slice(offset: int, n: int, dim_in: int) -> None:
    if offset < 0 or offset + n > dim_in:
        raise ValueError(f"Coordinates [{offset}, {offset + n}) fall outside [0, {dim_in}).")


def _project_whole(projector, x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] != projector.dim_in:
        raise ValueError(f"Expected vectors of length {projector.dim_in}, got {x.shape[1]}.")
    return projector.project(x, 0)


Projector = RandomProjector | SparseProjector | RowShiftProjector


def make_projector(dim_in: int, proj_dim: int, kind: str = DEFAULT_KIND, seed: int = 0, **kwargs) -> Projector:
    """The projector of ``kind`` (one of :data:`KINDS`); ``kwargs`` go to its class."""
    if kind == "rowshift":
        return RowShiftProjector(dim_in, proj_dim, seed, **kwargs)
    if kind == "sparse":
        return SparseProjector(dim_in, proj_dim, seed, **kwargs)
    if kind in ("rademacher", "gaussian"):
        return RandomProjector(dim_in, proj_dim, kind, seed, **kwargs)
    raise ValueError(f"Unknown projection kind {kind!r}; expected one of {KINDS}.")
