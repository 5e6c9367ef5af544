"""Feature store formats: float rows, or rows quantized and packed into bytes (int8, int4, 1bit).

LESS features are L2-normalised rows of ``d`` values; the score is their cosine with the target
features. A store keeps each row in one of these formats (``FeatureStore`` meta ``"dtype"``):

========== ============================ ==================================== ====================
format     bytes per row (d = 8192)     stored row                           decoded row
========== ============================ ==================================== ====================
float32    4 d       (32,768)           the features                         the features
float16    2 d       (16,384)           the features, rounded                the features
int8       d + 4     ( 8,196)           codes q in [-127, 127], then scale    q * scale
int4       ceil(d/2) + 4   (4,100)      two codes in [-7, 7] per byte, scale  q * scale
1bit       ceil(d/8)       (1,024)      sign bits, 8 per byte                 +-1 / sqrt(d)
========== ============================ ==================================== ====================

Scaling: int8 and int4 use per-row absmax scaling, ``scale = max_j |x_j| / qmax`` (qmax = 127 or
7) and ``q = round(x / scale)``; the scale is a little-endian float32 at the end of the row. A
zero row (a skipped example) has scale 0 and codes 0. 1bit keeps ``x_j > 0`` (a zero counts as
negative) and decodes to the unit vector of signs, ``+-1 / sqrt(d)``: the features are unit
vectors, and a cosine does not depend on a row's scale anyway. int4 codes are stored offset by 8
(nibbles 1..15), the even column in the low nibble; 1bit packs column ``8 j + k`` into bit ``k``
of byte ``j`` (``np.packbits(..., bitorder="little")``). Padding nibbles / bits are zero codes.

Scoring (``LessSelector.score_store``) reads the packed rows a chunk at a time and multiplies
:func:`cosine_rows` (a float32 copy of the chunk proportional, row by row, to the decoded rows:
the integer codes or the signs; the row's positive factor cancels in the cosine) with the
full-precision target features. Only the pool is quantized: target features are computed by the
selector in float (QLESS, arXiv 2502.01703, quantizes both sides and scores 1bit stores with the
cosine of two sign vectors; keeping the few targets exact loses nothing and costs nothing).
"""

from __future__ import annotations

import math

import numpy as np
import torch

FLOAT_FORMATS = ("float32", "float16")
QUANTIZED_FORMATS = ("int8", "int4", "1bit")
STORE_FORMATS = FLOAT_FORMATS + QUANTIZED_FORMATS
# Largest code of the integer formats (symmetric: codes in [-QMAX, QMAX]).
QMAX = {"int8": 127, "int4": 7}
SCALE_BYTES = 4  # the float32 scale at the end of an int8 / int4 row


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
    return _code_bytes(fmt, dim) + (SCALE_BYTES if fmt in QMAX else 0)


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
    inv = np.divide(qmax, absmax, out=np.zeros_like(absmax), where=absmax > 0)
    q = np.clip(np.rint(x * inv[:, None]), -qmax, qmax).astype(np.int8)
    width = _code_bytes(fmt, d)
    if fmt == "int8":
        out[:, :width] = q.view(np.uint8)
    else:
        nib = np.full((n, 2 * width), 8, dtype=np.uint8)  # padding column: code 0
        nib[:, :d] = (q + 8).astype(np.uint8)
        out[:, :width] = nib[:, 0::2] | (nib[:, 1::2] << 4)
    out[:, width:] = scale.astype("<f4").view(np.uint8).reshape(n, SCALE_BYTES)
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
    return np.ascontiguousarray(rows[:, width : width + SCALE_BYTES]).view("<f4").reshape(n).astype(np.float32)


# Byte -> its 8 sign values (bit k of the byte is column k) and -> its 2 int4 codes (low nibble first).
_SIGNS = torch.tensor([[1.0 if (b >> k) & 1 else -1.0 for k in range(8)] for b in range(256)])
_NIBBLES = torch.tensor([[float((b & 15) - 8), float((b >> 4) - 8)] for b in range(256)])


def cosine_rows(rows: np.ndarray, fmt: str, dim: int) -> torch.Tensor:
    """``(n, dim)`` float32 rows, each a positive multiple of its decoded row: enough for a cosine.

    Float formats: the features; int8 / int4: the integer codes; 1bit: the signs (+-1). Unpacks
    ``rows`` (the stored ``(n, row_bytes)`` uint8 rows) without their scales.
    """
    fmt = check_format(fmt)
    t = torch.from_numpy(np.ascontiguousarray(rows))
    if fmt in FLOAT_FORMATS:
        return t.float()
    n = len(rows)
    width = _code_bytes(fmt, dim)
    codes = t[:, :width]
    if fmt == "int8":
        return codes.view(torch.int8).float()
    table = _SIGNS if fmt == "1bit" else _NIBBLES
    # one gather per byte: (n, width) bytes -> (n, width, 8 or 2) values -> (n, dim)
    out = torch.nn.functional.embedding(codes.long(), table).reshape(n, -1)
    return out[:, :dim]


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
