"""Feature store formats: float rows, or rows quantized and packed into bytes (int8, int4, 1bit).

LESS features are L2-normalised rows of ``d`` values; the score is their cosine with the target
features. A store keeps each row in one of these formats (``FeatureStore`` meta ``"dtype"``):

========== ============================ ==================================== ====================
format     bytes per row (d = 8192)     stored row                           decoded row
========== ============================ ==================================== ====================
float32    4 d       (32,768)           the features                         the features
float16    2 d       (16,384)           the features, rounded                the features
int8       d + 8     ( 8,200)           codes q in [-127, 127], scale, |q|^2  q * scale
int4       ceil(d/2) + 8   (4,104)      two codes in [-7, 7] per byte, ditto  q * scale
1bit       ceil(d/8)       (1,024)      sign bits, 8 per byte                 +-1 / sqrt(d)
========== ============================ ==================================== ====================

Scaling: int8 and int4 use per-row absmax scaling, ``scale = max_j |x_j| / qmax`` (qmax = 127 or
7) and ``q = round(x / scale)`` (float32 division, ties to even); the row ends with the scale
(little-endian float32) and the codes' squared norm ``sum_j q_j^2`` (little-endian int32, exact:
what a cosine divides by). A zero row (a skipped example) has scale 0 and codes 0. 1bit keeps ``x_j > 0`` (a zero counts as
negative) and decodes to the unit vector of signs, ``+-1 / sqrt(d)``: the features are unit
vectors, and a cosine does not depend on a row's scale anyway. int4 codes are stored offset by 8
(nibbles 1..15), the even column in the low nibble; 1bit packs column ``8 j + k`` into bit ``k``
of byte ``j`` (``np.packbits(..., bitorder="little")``). Padding nibbles / bits are zero codes.

Scoring (``LessSelector.score_store``) reads the packed rows a chunk at a time, unpacks them to
int8 codes (int4 nibbles and 1bit signs through a byte lookup table) and multiplies them with the
target features in integers (:func:`int_matmul`, exact int32 sums): each unit-norm target row is
written as ``s * (128 h + l)`` with int8 ``h`` and ``l`` (15 bits, relative error below 2^-14 of
its largest value), so the product is one int8 matmul against ``[h | l]``, and the cosine divides
by the stored code norm (a row's scale cancels in a cosine). The integer matmul has two kernels that
give the same integers, ``torch._int_mm`` and float32 matmuls on blocks of 1024 columns (exact: see
:func:`int_matmul`); the faster one on this machine is timed once per process (:func:`int_kernel`;
figures in docs/performance.md). Rows wider than :data:`INT_MATMUL_MAX_DIM` (int32 could overflow)
take the float path. Only the pool is quantized: the few target features are computed by the
selector in float (QLESS, arXiv 2502.01703, quantizes both sides and scores 1bit stores with the
cosine of two sign vectors).
"""

from __future__ import annotations

import logging
import math
import os
import time

import numpy as np
import torch

logger = logging.getLogger(__name__)

FLOAT_FORMATS = ("float32", "float16")
QUANTIZED_FORMATS = ("int8", "int4", "1bit")
STORE_FORMATS = FLOAT_FORMATS + QUANTIZED_FORMATS
# Largest code of the integer formats (symmetric: codes in [-QMAX, QMAX]).
QMAX = {"int8": 127, "int4": 7}
TAIL_BYTES = 8  # the float32 scale and the int32 squared code norm at the end of an int8 / int4 row
# Widest row the integer product takes: |q . h| <= 127 * 127 * d must fit an int32.
INT_MATMUL_MAX_DIM = (2**31 - 1) // (127 * 127)


def check_format(dtype) -> str:
    """The store format named by ``dtype`` (one of :data:`STORE_FORMATS`), or a ``ValueError`` naming them.

    ``np.float16`` / ``np.float32`` (or their ``np.dtype``) are accepted for the float formats.
    """
    name = dtype
    if not isinstance(dtype, str):
        try:
            name = np.dtype(dtype).name
        except TypeError:
            name = repr(dtype)
    if name not in STORE_FORMATS:
        raise ValueError(
            f"Unknown feature store dtype {dtype!r}. Choose one of {', '.join(STORE_FORMATS)}: float32 and float16 "
            "store the features, int8 and int4 quantize each row with its own scale (4x and 8x smaller than "
            "float32), 1bit keeps their signs (32x smaller). See docs/usage.md, 'Feature store formats'.")
    return name


def row_bytes(fmt: str, dim: int) -> int:
    """Bytes one stored row of ``dim`` features takes in format ``fmt`` (the ``.npy`` header aside)."""
    fmt = check_format(fmt)
    if fmt in FLOAT_FORMATS:
        return dim * np.dtype(fmt).itemsize
    return _code_bytes(fmt, dim) + (TAIL_BYTES if fmt in QMAX else 0)


def _code_bytes(fmt: str, dim: int) -> int:
    return {"int8": dim, "int4": (dim + 1) // 2, "1bit": (dim + 7) // 8}[fmt]


def encode(x: np.ndarray, fmt: str) -> np.ndarray:
    """Rows as stored: ``(n, d)`` float features -> ``(n, d)`` float16/32, or ``(n, row_bytes)`` uint8 packed rows."""
    fmt = check_format(fmt)
    if x.ndim != 2:
        raise ValueError(f"Expected (rows, d) features, got shape {x.shape}.")
    if fmt in FLOAT_FORMATS:
        return np.ascontiguousarray(x, dtype=fmt)
    n, d = x.shape
    x = np.asarray(x, dtype=np.float32)
    out = np.zeros((n, row_bytes(fmt, d)), dtype=np.uint8)
    if fmt == "1bit":
        out[:] = np.packbits(x > 0, axis=1, bitorder="little")
        return out
    qmax = QMAX[fmt]
    absmax = np.abs(x).max(axis=1) if d else np.zeros(n, dtype=np.float32)
    scale = (absmax / qmax).astype(np.float32)
    safe = np.where(scale > 0, scale, np.float32(1))[:, None]  # a zero row: codes 0
    q = np.clip(np.rint(x / safe), -qmax, qmax).astype(np.int8)
    width = _code_bytes(fmt, d)
    if fmt == "int8":
        out[:, :width] = q.view(np.uint8)
    else:
        nib = np.full((n, 2 * width), 8, dtype=np.uint8)  # padding column: code 0
        nib[:, :d] = (q + 8).astype(np.uint8)
        out[:, :width] = nib[:, 0::2] | (nib[:, 1::2] << 4)
    out[:, width : width + 4] = scale.astype("<f4").view(np.uint8).reshape(n, 4)
    sumsq = np.einsum("ij,ij->i", q.astype(np.int32), q.astype(np.int32))
    out[:, width + 4 :] = sumsq.astype("<i4").view(np.uint8).reshape(n, 4)
    return out


def scales(rows: np.ndarray, fmt: str, dim: int) -> np.ndarray:
    """``(n,)`` float32 factor turning :func:`cosine_rows` into the decoded rows (1.0 for float formats)."""
    fmt = check_format(fmt)
    n = len(rows)
    if fmt in FLOAT_FORMATS:
        return np.ones(n, dtype=np.float32)
    if fmt == "1bit":
        return np.full(n, 1 / math.sqrt(dim) if dim else 0.0, dtype=np.float32)
    width = _code_bytes(fmt, dim)
    return np.ascontiguousarray(rows[:, width : width + 4]).view("<f4").reshape(n).astype(np.float32)


def code_norms(rows: np.ndarray, fmt: str, dim: int) -> np.ndarray:
    """``(n,)`` float64 norms of the :func:`int_codes` rows of packed ``rows`` (stored, or sqrt(d) for 1bit)."""
    n = len(rows)
    if fmt == "1bit":
        return np.full(n, math.sqrt(dim), dtype=np.float64)
    width = _code_bytes(fmt, dim)
    return np.sqrt(np.ascontiguousarray(rows[:, width + 4 : width + 8]).view("<i4").reshape(n).astype(np.float64))


# Byte -> its 8 signs as int8 (bit k is column k), packed in one int64; byte -> its 2 int4 codes in one int16.
_SIGNS = np.array([[1 if (b >> k) & 1 else -1 for k in range(8)] for b in range(256)], dtype=np.int8).view(np.int64).reshape(256)
_NIBBLES = np.array([[(b & 15) - 8, (b >> 4) - 8] for b in range(256)], dtype=np.int8).view(np.int16).reshape(256)


def int_codes(rows: np.ndarray, fmt: str, dim: int) -> np.ndarray:
    """``(n, dim)`` int8 codes of packed ``rows`` of a quantized format: int8 / int4 codes, or 1bit signs (+-1).

    int8: a view of ``rows`` (rows strided by the row's bytes; a copy was 18% of a profiled scoring).
    """
    n = len(rows)
    width = _code_bytes(fmt, dim)
    codes = rows[:, :width]
    if fmt == "int8":
        return codes.view(np.int8)
    # one table lookup per byte gives its 8 signs or 2 codes at once
    out = np.take(_SIGNS if fmt == "1bit" else _NIBBLES, codes).view(np.int8).reshape(n, -1)
    return out if out.shape[1] == dim else np.ascontiguousarray(out[:, :dim])


def cosine_rows(rows: np.ndarray, fmt: str, dim: int) -> torch.Tensor:
    """``(n, dim)`` float32 rows, each a positive multiple of its decoded row: enough for a cosine.

    Float formats: the features; int8 / int4: the integer codes; 1bit: the signs (+-1). ``rows``
    are the stored rows (``(n, row_bytes)`` uint8 for a quantized format).
    """
    fmt = check_format(fmt)
    if fmt in FLOAT_FORMATS:
        return torch.from_numpy(np.asarray(rows)).float()
    return torch.from_numpy(int_codes(rows, fmt, dim)).float()


class IntTargets:
    """Target features prepared for the integer product with packed pool rows (see the module docstring).

    Args:
        targets: ``(T, d)`` float target features (any norm; a zero row gives zero cosines).
    """

    def __init__(self, targets: torch.Tensor):
        t = targets.double()
        t = t / t.norm(dim=1, keepdim=True).clamp_min(1e-300)
        absmax = t.abs().amax(dim=1)
        self.scale = torch.where(absmax > 0, absmax / (127 * 128), torch.ones_like(absmax))  # (T,)
        u = torch.round(t / self.scale[:, None])  # |u| <= 16256
        hi = torch.round(u / 128)
        # (d, 2T): the high halves h, then the low halves l (|l| <= 64), one int8 matmul for both
        self.halves = _row_major(torch.cat([hi, u - 128 * hi]).to(torch.int8).T)
        self.dim, self.count = t.shape[1], t.shape[0]
        self._scale = self.scale.float()

    def cosines(self, rows: np.ndarray, fmt: str) -> torch.Tensor:
        """``(n, T)`` float32 cosines of the decoded packed ``rows`` with the targets."""
        q = torch.from_numpy(int_codes(rows, fmt, self.dim))
        sums = int_matmul(q, self.halves)  # exact int32 sums
        # their float32 combination keeps 24 bits, far below the targets' rounding
        dots = sums[:, : self.count].float().mul_(128).add_(sums[:, self.count :].float())
        norms = torch.from_numpy(code_norms(rows, fmt, self.dim).astype(np.float32)).clamp_min(1e-30)
        return dots.mul_(self._scale[None, :]).div_(norms[:, None])


def _row_major(t: torch.Tensor) -> torch.Tensor:
    """``t`` with strides ``(columns, 1)``: ``torch._int_mm`` on a CPU misreads the strides ``contiguous()``
    leaves on a dimension of size 1 (measured with torch 2.13: a (2, 1) operand gave garbage)."""
    if t.stride() == (t.shape[1], 1):
        return t
    return torch.empty(t.shape, dtype=t.dtype).copy_(t)


# Columns of one block of the float32 kernel: every partial sum of a block is an integer of magnitude at most
# 127 * 127 * 1024 < 2**24, which float32 holds exactly, whatever order the matmul sums in.
FLOAT_BLOCK = 1024
_FLOAT_ROWS = 256  # rows converted to float32 at a time (256-512 fastest measured with 8 and 64 targets)
INT_KERNELS = ("int_mm", "float_blocks")
INT_KERNEL_ENV = "HF_LESS_INT_KERNEL"
_chosen_kernel: str | None = None


def int_matmul(q: torch.Tensor, w: torch.Tensor, kernel: str | None = None) -> torch.Tensor:
    """Exact ``q @ w`` of int8 matrices: ``(n, d) x (d, c) -> (n, c)`` int32, for ``d <= INT_MATMUL_MAX_DIM``.

    Kernels (they return the same integers):

    - ``"int_mm"``: ``torch._int_mm`` (int32 accumulation). Fast where the CPU has int8 dot-product
      instructions (AVX512-VNNI, AMX); on an AVX2-only CPU it was 3-27x slower than ``"float_blocks"``
      (docs/performance.md).
    - ``"float_blocks"``: the codes converted to float32 a few hundred rows at a time and multiplied
      in blocks of :data:`FLOAT_BLOCK` columns. Each block's sums are exact integers (below 2^24),
      added in float64 (exact below 2^53). Needs ``torch.get_float32_matmul_precision() == "highest"``
      (the default): a lower precision lets the matmul round its inputs.

    ``kernel=None``: :func:`int_kernel`, the faster of the two on this machine.
    """
    kernel = kernel or int_kernel()
    if kernel == "int_mm":
        return torch._int_mm(_row_major(q), _row_major(w))
    if kernel != "float_blocks":
        raise ValueError(f"Unknown integer matmul kernel {kernel!r}; choose one of {', '.join(INT_KERNELS)}.")
    n, d = q.shape
    c = w.shape[1]
    blocks = -(-d // FLOAT_BLOCK)
    wf = torch.zeros(blocks * FLOAT_BLOCK, c)
    wf[:d] = w
    wf = wf.view(blocks, FLOAT_BLOCK, c)
    rows = min(n, _FLOAT_ROWS)
    buf = torch.zeros(rows, blocks * FLOAT_BLOCK)  # padding columns stay zero
    part = torch.empty(blocks, rows, c)
    out = torch.empty(n, c, dtype=torch.int32)
    for start in range(0, n, _FLOAT_ROWS):
        m = min(_FLOAT_ROWS, n - start)
        x = buf[:m]
        x[:, :d].copy_(q[start : start + m])
        # all column blocks in one call: one parallel region per row block (many small calls stall when other
        # processes hold the cores)
        torch.bmm(x.view(m, blocks, FLOAT_BLOCK).transpose(0, 1), wf, out=part[:, :m])
        out[start : start + m] = part[:, :m].sum(0, dtype=torch.float64)  # exact integers
    return out


def _exact_kernels() -> list[str]:
    """The kernels that are exact here: ``float_blocks`` at the highest float32 matmul precision, ``int_mm``."""
    kernels = ["float_blocks"] if torch.get_float32_matmul_precision() == "highest" else []
    return kernels + (["int_mm"] if hasattr(torch, "_int_mm") else [])


def int_kernel() -> str:
    """The :func:`int_matmul` kernel used on this machine.

    ``HF_LESS_INT_KERNEL`` (``int_mm`` or ``float_blocks``) chooses it; otherwise the first call times
    both on a ``(2048, 4096) x (4096, 32)`` product, the best of three (about 0.5 s), and keeps the
    faster for the process. Both give the same integers, so the choice changes the speed, never a score; a kernel
    whose integers differ from the other's there is not used.
    """
    global _chosen_kernel
    forced = os.environ.get(INT_KERNEL_ENV)
    if forced:
        if forced not in INT_KERNELS:
            raise ValueError(f"{INT_KERNEL_ENV}={forced!r} is not a kernel; set it to one of "
                             f"{', '.join(INT_KERNELS)}, or unset it to time both.")
        return forced
    exact = _exact_kernels()
    if not exact:
        raise RuntimeError("No exact integer matmul here: torch has no _int_mm and the float32 matmul precision is "
                           f"{torch.get_float32_matmul_precision()!r}; set torch.set_float32_matmul_precision('highest').")
    if _chosen_kernel in exact:
        return _chosen_kernel
    if len(exact) == 1:
        _chosen_kernel = exact[0]
        return _chosen_kernel
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (2048, 4096), generator=g, dtype=torch.int8)
    w = torch.randint(-127, 128, (4096, 32), generator=g, dtype=torch.int8)
    results, seconds = {}, dict.fromkeys(exact, math.inf)
    for kernel in exact:
        int_matmul(q[:64], w, kernel)  # warm up (allocations, library initialisation)
    for _ in range(3):  # the best of three, alternating: other processes' load hits both alike
        for kernel in exact:
            start = time.perf_counter()
            results[kernel] = int_matmul(q, w, kernel)
            seconds[kernel] = min(seconds[kernel], time.perf_counter() - start)
    if not torch.equal(results["float_blocks"], results["int_mm"]):
        logger.warning("The float_blocks integer matmul differs from torch._int_mm on this machine; using int_mm.")
        _chosen_kernel = "int_mm"
    else:
        _chosen_kernel = min(seconds, key=seconds.get)
    logger.info("Integer matmul kernel: %s (timed %s)", _chosen_kernel,
                ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in seconds.items()))
    return _chosen_kernel


def integer_product(fmt: str, dim: int) -> bool:
    """Whether rows of ``fmt`` and width ``dim`` are scored with :class:`IntTargets` (exact int32 products)."""
    return fmt in QUANTIZED_FORMATS and dim <= INT_MATMUL_MAX_DIM and bool(_exact_kernels())


def decode(rows: np.ndarray, fmt: str, dim: int) -> np.ndarray:
    """The stored rows as ``(n, dim)`` features: float formats as stored, quantized ones dequantized (float32)."""
    fmt = check_format(fmt)
    if fmt in FLOAT_FORMATS:
        return np.asarray(rows)
    return (cosine_rows(rows, fmt, dim).numpy() * scales(rows, fmt, dim)[:, None]).astype(np.float32, copy=False)


def storage_dtype(fmt: str) -> np.dtype:
    """The numpy dtype of a stored ``.npy`` row array in format ``fmt``."""
    fmt = check_format(fmt)
    return np.dtype(fmt) if fmt in FLOAT_FORMATS else np.dtype(np.uint8)


def store_bytes(fmt: str, dim: int, rows: int, checkpoints: int) -> int:
    """Bytes of a keyed store's features and content keys (shard headers and metadata aside)."""
    return rows * (checkpoints * row_bytes(fmt, dim) + 16)
