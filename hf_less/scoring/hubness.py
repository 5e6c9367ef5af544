"""Hubness in the pool-by-target cosine: remedies and statistics (issue 25).

In a high-dimensional cosine space some points are near everything ("hubs"). LESS's pool side makes
them likely: the Adam direction ``(b1 m + (1 - b1) g) / sqrt(v')`` carries the same ``b1 m`` for every
pool example, so examples whose own gradient is small point along the shared momentum and score
alike against every target. The remedies here change the LESS similarity of a pool row ``x`` to a
target ``t``; every one of them is computed from the store chunk by chunk (a mean or a few principal
components from one streaming pass over each checkpoint's pool features), never by featurizing again:

- ``"center"``: ``cos(p_i(x) - mu_i, g_i(t))`` with ``mu_i`` the mean of checkpoint i's unit-norm pool
  features (the shared direction removed; the centred row is renormalised by the cosine).
- ``"pca"`` ("all-but-the-top", Mu & Viswanath 2018): centre as above, then remove the projection on
  the top ``c`` principal components ``U_i`` of the centred pool features:
  ``p' = (p - mu) - U U^T (p - mu)``, then the cosine. The target side is left as it is: the pool rows
  are orthogonal to ``U`` after the removal, so removing ``U`` from a target too would only rescale it.
- ``"csls"`` (cross-domain similarity local scaling, Lample et al. 2018, pool side only):
  ``S'(x, t) = S(x, t) - r(x)``, where ``r(x)`` is the mean of ``x``'s ``k`` largest similarities to a
  reference set of targets (the selector's own targets, or other tasks' targets when given). A row
  close to everything pays for it. No pool statistics are needed.

The pool features are taken at unit norm before any statistic (a store's rows already are);
all-zero rows (examples a featurization skipped) are left out of the statistics.

Statistics of a selection: :func:`k_occurrence` (how often each pool row is in some target's top k)
and its :func:`skewness` (large and positive: a few rows are near every target), and
:func:`top_group_share` (the share of a selection taken by its most-selected groups, e.g. source tasks).

Cost of the principal components at dimension ``d`` over ``N`` rows (per checkpoint):

- ``method="covariance"`` (exact): accumulates ``X^T X`` in a ``(d, d)`` float64 matrix: ``N d^2``
  multiply-adds (float32 products per chunk), ``8 d^2`` bytes (512 MiB at d = 8192) and one
  ``(d, d)`` symmetric eigendecomposition, ``~d^3``. Measured on the shared 2-core development
  machine (other jobs running): the eigendecomposition took 9 s at d = 1024 and 30 s at d = 2048,
  so about half an hour at d = 8192; the accumulation 24 s for 4,096 rows at d = 2048.
- ``method="randomized"`` (single-pass Nystrom sketch, Tropp et al. 2017): accumulates
  ``X^T (X Omega)`` for a fixed Gaussian ``(d, l)`` test matrix, ``l = c + oversample``: ``2 N d l``
  multiply-adds and ``8 d l`` bytes, then a ``(d, l)`` SVD. Same machine, d = 8192, c = 10: 2.3 s for
  4,096 rows (0.56 ms per row; the mean alone, 0.34 ms). Exact when the centred features have rank
  <= ``l``; otherwise it finds the top components well when they stand out from the rest of the
  spectrum (the case hubness is about) and approximately when they do not.
- ``method="auto"`` (default): ``"covariance"`` for d <= :data:`EXACT_PCA_MAX_DIM`, else ``"randomized"``.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..utils.tensors import normalize

HUB_CORRECTIONS = ("center", "pca", "csls")
PCA_METHODS = ("auto", "covariance", "randomized")
# Largest d for which method="auto" accumulates the exact (d, d) covariance (32 MiB in float64; its
# eigendecomposition took 30 s on a loaded 2-core machine, and the cost grows as d^3).
EXACT_PCA_MAX_DIM = 2048


# -- pool statistics: one streaming pass per checkpoint ----------------------------------------------


@dataclass
class PoolStatistics:
    """What the ``"center"`` and ``"pca"`` corrections need of one checkpoint's pool features.

    Attributes:
        mean: ``(d,)`` float32 mean of the unit-norm, nonzero pool rows.
        components: ``(d, c)`` float32 orthonormal top principal components of the centred rows
            (``c = 0`` for centering alone), largest first.
        variances: ``(c,)`` float32 variance of the centred rows along each component.
        rows: how many rows the statistics are over.
    """

    mean: torch.Tensor
    components: torch.Tensor
    variances: torch.Tensor
    rows: int

    def digest(self) -> str:
        """16 hex characters naming these statistics (part of a scorer's cache key)."""
        h = hashlib.sha256()
        for t in (self.mean, self.components, self.variances):
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        h.update(str(self.rows).encode())
        return h.hexdigest()[:16]


def pool_statistics(chunks: Iterable[torch.Tensor | np.ndarray], components: int = 0, *,
                    method: str = "auto", oversample: int = 10, seed: int = 0) -> PoolStatistics:
    """Mean and top principal components of pool features, in one pass over ``chunks``.

    Args:
        chunks: ``(B, d)`` row blocks of one checkpoint's pool features (any float dtype, any norm;
            each row is taken at unit norm, all-zero rows are left out). Read once, in order; never
            held together.
        components: ``c``, how many top principal components to find (0: the mean only).
        method: ``"covariance"``, ``"randomized"`` or ``"auto"``; see the module docstring for the cost.
        oversample: ``"randomized"``: extra sketch columns beyond ``c``.
        seed: ``"randomized"``: the seed of the Gaussian test matrix (the result depends on it only
            through rounding when the centred rows have rank <= ``c + oversample``).
    Returns:
        :class:`PoolStatistics`.
    """
    if method not in PCA_METHODS:
        raise ValueError(f"method={method!r} is not one of {PCA_METHODS}.")
    if int(components) < 0:
        raise ValueError(f"components={components} must be >= 0.")
    if int(oversample) < 0:
        raise ValueError(f"oversample={oversample} must be >= 0.")
    components = int(components)
    total = None  # (d,) float64 sum of the unit rows
    second = None  # (d, d) X^T X, or (d, l) X^T X Omega, float64
    omega = None
    rows, dim = 0, None
    for chunk in chunks:
        x = torch.as_tensor(chunk).float()
        if x.ndim != 2:
            raise ValueError(f"Expected (rows, d) pool features, got a chunk of shape {tuple(x.shape)}.")
        if dim is None:
            dim = x.shape[1]
            if components > dim:
                raise ValueError(f"components={components} is more than the feature dimension d = {dim}: "
                                 "remove fewer principal components.")
            if method == "auto":
                method = "covariance" if dim <= EXACT_PCA_MAX_DIM else "randomized"
            if components and method == "randomized":
                width = min(dim, components + int(oversample))
                g = torch.Generator().manual_seed(int(seed))
                omega = torch.linalg.qr(torch.randn(dim, width, generator=g, dtype=torch.float64))[0]
        elif x.shape[1] != dim:
            raise ValueError(f"A chunk of {x.shape[1]} columns after chunks of {dim}: every chunk must be "
                             "the same checkpoint's features.")
        x = x[x.abs().amax(1) > 0] if len(x) else x
        if not len(x):
            continue
        x = normalize(x)
        rows += len(x)
        s = x.sum(0, dtype=torch.float64)
        total = s if total is None else total.add_(s)
        if components:
            if method == "covariance":
                part = (x.T @ x).double()
            else:
                part = (x.T @ (x @ omega.to(x.dtype))).double()
            second = part if second is None else second.add_(part)
    if dim is None or rows == 0:
        raise ValueError("The pool has no nonzero feature rows: there is nothing to centre on (was every "
                         "example skipped, or is the store empty?).")
    mean = total / rows
    if components == 0:
        empty = torch.zeros((dim, 0), dtype=torch.float32)
        return PoolStatistics(mean.float(), empty, torch.zeros(0), rows)
    if method == "covariance":
        cov = second / rows - torch.outer(mean, mean)
        values, vectors = torch.linalg.eigh((cov + cov.T) / 2)
        top = torch.argsort(values, descending=True)[:components]
        values, vectors = values[top], vectors[:, top]
    else:
        raw = second / rows
        values, vectors = _nystrom_top(raw - torch.outer(mean, mean @ omega), omega, components,
                                       scale=float(torch.linalg.matrix_norm(raw)))
    return PoolStatistics(mean.float(), vectors.float().contiguous(), values.clamp_min(0).float(), rows)


def _nystrom_top(y: torch.Tensor, omega: torch.Tensor, c: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``c`` eigenpairs of a PSD ``A`` from its sketch ``y = A omega`` (stable single-pass Nystrom).

    ``A ~ y (omega^T y)^+ y^T``; a small shift ``nu`` keeps the Cholesky factor defined (Tropp et al. 2017).
    ``scale``: the norm of what ``y`` was computed from (the uncentred sketch), the size of its rounding.
    """
    nu = max(scale, float(torch.linalg.matrix_norm(y)), 1e-30) * 2.2e-16 * math.sqrt(y.shape[0])
    for _ in range(8):  # rounding can leave omega^T y a hair indefinite: a larger shift then
        y_nu = y + nu * omega
        core = omega.T @ y_nu
        chol, info = torch.linalg.cholesky_ex((core + core.T) / 2, upper=True)
        if int(info) == 0:
            break
        nu *= 100
    else:
        raise ValueError("The randomized principal components failed (the sketch is not positive definite); "
                         "use hub_pca_method='covariance'.")
    b = torch.linalg.solve_triangular(chol, y_nu, upper=True, left=False)  # y_nu chol^{-1}
    u, s, _ = torch.linalg.svd(b, full_matrices=False)
    return (s[:c] ** 2 - nu), u[:, :c]


def chunks_of(read: Callable[[int, int], np.ndarray], rows: int, chunk_rows: int,
              skipped: Sequence[int] | np.ndarray = ()) -> Iterable[torch.Tensor]:
    """``(B, d)`` float32 row blocks ``read(start, stop)`` of an array of ``rows`` rows, ``skipped`` rows zeroed.

    ``read`` is e.g. ``ShardedArray.read`` of a feature store: the blocks are read one at a time.
    """
    if int(chunk_rows) < 1:
        raise ValueError(f"chunk_rows={chunk_rows} must be >= 1.")
    skipped = np.asarray(skipped, dtype=np.int64)
    for start in range(0, rows, int(chunk_rows)):
        stop = min(rows, start + int(chunk_rows))
        block = torch.from_numpy(np.asarray(read(start, stop))).float()
        drop = skipped[(skipped >= start) & (skipped < stop)] - start
        if len(drop):
            block[torch.from_numpy(drop)] = 0
        yield block


# -- the corrections ---------------------------------------------------------------------------------


def centered(pool: torch.Tensor, stats: PoolStatistics) -> torch.Tensor:
    """``(B, d) -> (B, d)`` float32: unit-norm rows minus the pool mean, minus their top-component part.

    With ``stats.components`` of width 0 this is centering alone. The result is not renormalised: a
    cosine of it (e.g. :func:`hf_less.scoring.similarity.weighted_sims`) divides by its norm. A zero
    row (a skipped example) becomes ``-mean``, projected: callers give such rows no score (a store's
    skipped rows score ``-inf``).
    """
    if pool.ndim != 2 or pool.shape[1] != stats.mean.shape[0]:
        raise ValueError(f"Expected (rows, {stats.mean.shape[0]}) pool features, got {tuple(pool.shape)}: "
                         "the statistics belong to features of another dimension.")
    x = normalize(pool.float()) - stats.mean.to(pool.device)
    if stats.components.shape[1]:
        u = stats.components.to(pool.device)
        x = x - (x @ u) @ u.T
    return x


def csls_penalty(reference_sims: torch.Tensor, k: int) -> torch.Tensor:
    """``(B, R) -> (B,)``: the mean of each row's ``k`` largest similarities to the ``R`` reference targets.

    Raises if ``k`` is not in ``[1, R]`` (name the fix: a smaller ``k`` or more reference targets).
    """
    if reference_sims.ndim != 2:
        raise ValueError(f"Expected (rows, reference targets) similarities, got shape {tuple(reference_sims.shape)}.")
    r = reference_sims.shape[1]
    if r == 0:
        raise ValueError("The CSLS reference set is empty: give at least one reference target.")
    if not 1 <= int(k) <= r:
        raise ValueError(f"hub_csls_k={k} must be between 1 and the {r} reference target(s): lower it, or give "
                         "a larger reference set (e.g. other tasks' target examples).")
    return reference_sims.float().topk(int(k), dim=1).values.mean(1)


def csls(sims: torch.Tensor, k: int, reference_sims: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, T) -> (B, T)``: ``sims[x, t] - csls_penalty(reference_sims, k)[x]``.

    ``reference_sims`` ``(B, R)``: each row's similarity to the reference targets; default ``sims``
    itself (the reference is the targets). With one subtask and ``k = T`` the corrected mean over the
    targets is 0 for every row: a reference of the targets needs ``k`` well below ``T``.
    """
    ref = sims if reference_sims is None else reference_sims
    if ref.shape[0] != sims.shape[0]:
        raise ValueError(f"reference_sims has {ref.shape[0]} rows, sims {sims.shape[0]}: they must be the same rows.")
    return sims.float() - csls_penalty(ref, k).unsqueeze(1)


@dataclass
class HubCorrection:
    """A hubness correction of LESS similarities: what :class:`hf_less.LessSelector` applies.

    Args:
        kind: ``None`` (none), ``"center"``, ``"pca"`` or ``"csls"`` (see the module docstring).
        pca_components: ``"pca"``: how many top principal components to remove.
        pca_method: ``"pca"``: ``"auto"``, ``"covariance"`` or ``"randomized"``.
        csls_k: ``"csls"``: how many nearest reference targets make a row's penalty.
    """

    kind: str | None = None
    pca_components: int = 1
    pca_method: str = "auto"
    csls_k: int = 10
    statistics: list[PoolStatistics] | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.kind not in (None, *HUB_CORRECTIONS):
            names = ", ".join(map(repr, HUB_CORRECTIONS))
            raise ValueError(f"hub_correction={self.kind!r} is not one of None, {names}.")
        if self.pca_method not in PCA_METHODS:
            raise ValueError(f"hub_pca_method={self.pca_method!r} is not one of {PCA_METHODS}.")
        if self.kind == "pca" and int(self.pca_components) < 1:
            raise ValueError(f"hub_pca_components={self.pca_components} must be >= 1 with hub_correction='pca' "
                             "(0 components is hub_correction='center').")
        if self.kind == "csls" and int(self.csls_k) < 1:
            raise ValueError(f"hub_csls_k={self.csls_k} must be >= 1.")

    @property
    def needs_statistics(self) -> bool:
        return self.kind in ("center", "pca")

    @property
    def components(self) -> int:
        return int(self.pca_components) if self.kind == "pca" else 0

    def identity(self) -> dict | None:
        """What the corrected scores depend on (``None`` without a correction)."""
        if self.kind is None:
            return None
        out: dict = {"kind": self.kind}
        if self.kind == "pca":
            out.update(components=int(self.pca_components), method=self.pca_method)
        if self.kind == "csls":
            out["k"] = int(self.csls_k)
        if self.statistics is not None:
            out["statistics"] = [s.digest() for s in self.statistics]
        return out

    def fit(self, chunk_streams: Sequence[Iterable[torch.Tensor]]) -> None:
        """Compute the statistics, one pass over each checkpoint's stream of ``(B, d)`` pool features."""
        self.statistics = [pool_statistics(s, self.components, method=self.pca_method) for s in chunk_streams]

    def pool(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per checkpoint ``(B, d)`` pool features -> the features the cosine is taken of."""
        if self.needs_statistics and self.statistics is not None and len(self.statistics) != len(features):
            raise RuntimeError(f"The pool's statistics are of {len(self.statistics)} checkpoints, the features of "
                               f"{len(features)}: fit them on the same checkpoints (HubCorrection.fit).")
        return [self.checkpoint_pool(f, i) for i, f in enumerate(features)]

    def checkpoint_pool(self, features: torch.Tensor, i: int) -> torch.Tensor:
        """Checkpoint ``i``'s ``(B, d)`` pool features (any positive multiple of each row) -> the features
        the cosine is taken of: :meth:`pool` one checkpoint at a time, as a store is scored."""
        if not self.needs_statistics:
            return features
        if self.statistics is None or not 0 <= i < len(self.statistics):
            raise RuntimeError(f"hub_correction={self.kind!r} needs the pool's statistics first (checkpoint {i} has "
                               "none: HubCorrection.fit).")
        return centered(features, self.statistics[i])

    def sims(self, sims: torch.Tensor, reference_sims: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, T)`` LESS similarities -> corrected ones (only ``"csls"`` changes them here)."""
        return csls(sims, self.csls_k, reference_sims) if self.kind == "csls" else sims


# -- statistics of a representation and of a selection -----------------------------------------------


def k_occurrence(sims: torch.Tensor | np.ndarray | Iterable[torch.Tensor | np.ndarray], k: int,
                 rows: int | None = None) -> np.ndarray:
    """``N_k(x)``: for every pool row, how many targets have it among their ``k`` most similar rows.

    Args:
        sims: the ``(N, T)`` pool-by-target similarity, or an iterable of its ``(B, T)`` row chunks in
            order (a running top-k per target is kept: memory ``O(T k)`` beyond one chunk).
        k: the neighbourhood size, ``1 <= k <= N``.
        rows: ``N`` when ``sims`` is an iterable and its length is wanted checked up front (optional).
    Returns:
        ``(N,)`` int64 counts, summing to ``T k``. Ties at the k-th value go to the lower row.
    """
    if int(k) < 1:
        raise ValueError(f"k={k} must be >= 1.")
    k = int(k)
    if isinstance(sims, (torch.Tensor, np.ndarray)):
        if sims.ndim != 2:
            raise ValueError(f"Expected (rows, targets) similarities, got shape {tuple(sims.shape)}.")
        sims = [sims]
        rows = rows if rows is not None else len(sims[0])
    if rows is not None and k > rows:
        raise ValueError(f"k={k} is more than the {rows} pool rows: every row would be in every top k.")
    best_v = best_i = None
    n = 0
    for chunk in sims:
        c = torch.as_tensor(np.asarray(chunk) if not isinstance(chunk, torch.Tensor) else chunk).double()
        if c.ndim != 2 or (best_v is not None and c.shape[1] != best_v.shape[1]):
            raise ValueError(f"Every chunk must be (rows, targets) with the same targets; got {tuple(c.shape)}.")
        idx = torch.arange(n, n + len(c), dtype=torch.long).unsqueeze(1).expand(-1, c.shape[1])
        n += len(c)
        v, i = (c, idx) if best_v is None else (torch.cat([best_v, c]), torch.cat([best_i, idx]))
        # a stable sort: equal values keep their order, so ties go to the lower row
        order = torch.sort(v, dim=0, descending=True, stable=True).indices[:k]
        best_v, best_i = torch.gather(v, 0, order), torch.gather(i, 0, order)
    if best_v is None:
        raise ValueError("No similarities: the pool is empty.")
    if k > n:
        raise ValueError(f"k={k} is more than the {n} pool rows: every row would be in every top k.")
    return np.bincount(best_i.reshape(-1).numpy(), minlength=n).astype(np.int64)


def skewness(values: np.ndarray | Sequence[float]) -> float:
    """The standardised third moment ``E[(X - mu)^3] / sigma^3`` (population form); ``nan`` when sigma = 0.

    Of a k-occurrence distribution: about 0 without hubs (no row stands out), large and positive
    with them (a few rows are in nearly every target's top k).
    """
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if x.size == 0:
        raise ValueError("skewness of no values.")
    d = x - x.mean()
    sd = math.sqrt(float((d * d).mean()))
    if sd == 0:
        return float("nan")
    return float((d ** 3).mean() / sd ** 3)


def top_groups(groups: Sequence[Hashable], selected: Iterable[int], top: int = 5) -> list[tuple[Hashable, int]]:
    """The ``top`` most-selected groups of a selection and their counts, most first (ties: first seen).

    ``groups[i]`` is pool row i's group (e.g. its source task); ``selected`` the selected rows (repeats
    count: pass several selections concatenated to pool them).
    """
    if int(top) < 1:
        raise ValueError(f"top={top} must be >= 1.")
    counts = Counter(groups[int(i)] for i in selected)
    return counts.most_common(int(top))


def top_group_share(groups: Sequence[Hashable], selected: Sequence[int], top: int = 5) -> float:
    """The share of a selection taken by its ``top`` most-selected groups, in ``[0, 1]``."""
    selected = list(selected)
    if not selected:
        raise ValueError("The selection is empty: there is no share to take.")
    return sum(c for _, c in top_groups(groups, selected, top)) / len(selected)
