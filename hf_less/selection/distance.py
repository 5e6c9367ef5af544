"""How close is a selection to the targets? Subset-to-target distances for any selection.

Nayak et al. (2026) read every selector as approximately minimising a distance between the
selected subset ``S`` and the target set ``Q``, and find that only for LESS features does a
larger distance mean a higher target loss. Two such distances, each from the ``(N, T)``
pool-by-target cosine ``sims`` or from features:

- coverage (nearest neighbour): ``D_nn(S, Q) = 1/T sum_{q in Q} min_{z in S} (1 - cos(z, q))``,
  how far each target is from its closest selected example (what round-robin drives down);
- optimal transport: ``D_ot(S, Q) = min_{P in U(1/|S|, 1/T)} <P, (1 - cos) / 2>``, the exact
  (EMD) Wasserstein-1 cost between the uniform measures on ``S`` and on ``Q``, or its entropic
  approximation for large selections (what uot and the knn selectors drive down).

Both are 0 when the selection contains the targets and at most 2 (coverage) or 1 (OT).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import ot

from .cosine import CosineSimilarity
from . import strategies as selectors

# Above this many selected x target pairs, "auto" uses entropic OT instead of the exact network simplex.
EXACT_OT_MAX_PAIRS = 4_000_000


def selected_sims(selected: Sequence[int] | np.ndarray, *, sims: Any = None, pool: Any = None,
                  targets: Any = None) -> np.ndarray:
    """``(k, T)`` float64 cosine of the selected rows to the targets, in sorted pool order.

    Give either ``sims`` (``(N, T)``: array, memmap, tensor, chunkable, or a ``less_sims``
    column) or ``pool`` (``(N, d)``) and ``targets`` (``(T, d)``) features.
    """
    idx = np.asarray(selected, dtype=np.int64).reshape(-1)
    if idx.size == 0:
        raise ValueError("The selection is empty: a distance needs at least one selected example.")
    rows = np.unique(idx)
    if len(rows) != len(idx):
        raise ValueError("The selection has duplicate indices; pass each pool row once.")
    if sims is None:
        if pool is None or targets is None:
            raise ValueError("Pass sims= (the (N, T) pool-by-target cosine, e.g. the less_sims column) or "
                             "pool= and targets= features.")
        sims = CosineSimilarity(pool, targets)
    sims = selectors.as_sims(sims)
    n, _ = selectors.sims_shape(sims)
    if rows[0] < 0 or rows[-1] >= n:
        raise ValueError(f"Selected indices must lie in [0, {n}); got {rows[0]}..{rows[-1]}.")
    return selectors.gather_rows(sims, rows).astype(np.float64)


def coverage_distance(selected: Sequence[int] | np.ndarray, *, sims: Any = None, pool: Any = None,
                      targets: Any = None) -> float:
    """Mean over targets of the cosine distance ``1 - cos`` to the nearest selected example."""
    s = selected_sims(selected, sims=sims, pool=pool, targets=targets)
    return float((1.0 - s.max(0)).mean())


def ot_distance(selected: Sequence[int] | np.ndarray, *, sims: Any = None, pool: Any = None, targets: Any = None,
                method: str = "auto", reg: float = 0.02, num_iter: int = 10_000) -> float:
    """OT cost between the uniform measures on the selection and on the targets, cost ``(1 - cos) / 2``.

    Args:
        method: ``"exact"`` (network simplex, ``ot.emd2``), ``"sinkhorn"`` (entropic, log domain,
            ``reg``; reports the transport cost ``<P, M>`` of the entropic plan), or ``"auto"``
            (exact up to :data:`EXACT_OT_MAX_PAIRS` pairs).
    """
    s = selected_sims(selected, sims=sims, pool=pool, targets=targets)
    cost = (1.0 - s) / 2.0  # (k, T)
    a = np.full(cost.shape[0], 1.0 / cost.shape[0])
    b = np.full(cost.shape[1], 1.0 / cost.shape[1])
    if method == "auto":
        method = "exact" if cost.size <= EXACT_OT_MAX_PAIRS else "sinkhorn"
    if method == "exact":
        return float(ot.emd2(a, b, cost, numItermax=num_iter))
    if method == "sinkhorn":
        plan = ot.sinkhorn(a, b, cost, reg, method="sinkhorn_log", numItermax=num_iter, stopThr=1e-7)
        return float((plan * cost).sum())
    raise ValueError(f"Unknown OT method {method!r}; use 'exact', 'sinkhorn' or 'auto'.")


def subset_distances(selected: Sequence[int] | np.ndarray, *, sims: Any = None, pool: Any = None,
                     targets: Any = None, method: str = "auto") -> dict[str, float]:
    """Both distances of a selection: ``{"coverage": D_nn, "ot": D_ot, "size": k}``."""
    s = selected_sims(selected, sims=sims, pool=pool, targets=targets)
    rows = np.arange(len(s))
    return {"coverage": coverage_distance(rows, sims=s), "ot": ot_distance(rows, sims=s, method=method),
            "size": float(len(s))}


def selection_overlap(scores: Any, k: int) -> float:
    """Mean pairwise overlap of the top-``k`` selections that different targets make from one pool.

    A target-independence diagnostic: ``scores`` is ``(N, M)``, one column of pool scores per
    target (array, tensor or nested list); each column's top ``k`` rows (highest score first, ties
    to the lower row index) form a selection ``A_j``, and the result is the mean over the
    ``M (M - 1) / 2`` pairs ``j < l`` of ``|A_j ∩ A_l| / k``. 0 when the targets select disjoint
    subsets, 1 when every target selects the same subset; random selections overlap by about
    ``k / N``. Rows whose score is not finite are never selected.

    Example:
        >>> selection_overlap([[3, 0], [2, 1], [1, 3], [0, 2]], k=2)   # {0, 1} and {2, 3}
        0.0
    """
    s = np.asarray(scores.detach().cpu().numpy() if hasattr(scores, "detach") else scores, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"scores must be (N, M): one column per target; got shape {s.shape}.")
    n, m = s.shape
    if m < 2:
        raise ValueError("The overlap needs at least two targets (columns).")
    if not 1 <= k <= n:
        raise ValueError(f"k must lie in [1, {n}]; got {k}.")
    s = np.where(np.isfinite(s), s, -np.inf)
    chosen = []
    for j in range(m):
        order = np.argsort(-s[:, j], kind="stable")[:k]
        if not np.isfinite(s[order, j]).all():
            raise ValueError(f"Target {j} has fewer than k={k} finite scores.")
        chosen.append(set(order.tolist()))
    pairs = [len(chosen[a] & chosen[b]) / k for a in range(m) for b in range(a + 1, m)]
    return float(np.mean(pairs))
