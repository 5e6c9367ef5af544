"""Selectors: each turns scores or pool-by-target similarities into an ordering of pool indices.

A budget ``k`` keeps the first ``k`` of the ordering. Orderings are ``np.int64`` arrays
without duplicates; ties are broken by pool index so results are deterministic.

Shapes and symbols used throughout (as in LESS, Nayak et al. 2026 and TSDS, arXiv 2410.11303):

- ``N`` candidates (the pool), ``T`` target examples (TSDS calls them queries, ``M``);
- ``sims``: the ``(N, T)`` cosine similarity ``cos(z_j, t_i)`` of candidate ``j`` to target ``i``
  (LessSelector's ``less_sims`` column, or any representation's cosine). It may be a numpy
  array, a ``np.memmap``, a torch tensor (any device), an object with ``read(start, stop)``
  (e.g. :class:`hf_less.gradients.store.ShardedArray`) or anything sliceable by rows with a ``shape``
  (e.g. :class:`hf_less.scoring.representations.CosineSimilarity`): it is only ever read in row chunks,
  so no dense matrix larger than one chunk is built;
- cosine distance ``d = 1 - cos`` (TSDS), OT cost ``(1 - cos) / 2`` in ``[0, 1]`` (UOT).
"""

from __future__ import annotations

import argparse
import inspect
import logging
import math
import numbers
import re
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

# Elements of one (rows, T) chunk read at a time: 4M float32 = 16 MiB, a few copies of which are live.
CHUNK_ELEMENTS = 1 << 22


def parse_budget(budget: int | float | str) -> int | float:
    """A budget checked against the one convention every entry point shares, without a pool size.

    An ``int`` is a count of examples (>= 1); a ``float`` is a fraction of the pool in (0, 1], so
    ``1`` is one example and ``1.0`` the whole pool. Text (a command-line value) follows the same
    rule by its spelling: digits only (``"1"``, ``"500"``) is a count, a number with a decimal point
    or an exponent (``"1.0"``, ``"0.05"``, ``"5e-2"``) is a fraction.

    Returns the budget as an ``int`` count or a ``float`` fraction; raises ``TypeError`` for any
    other type (``bool`` included) and ``ValueError`` for a value outside the ranges above.
    """
    if isinstance(budget, str):
        text = budget.strip()
        if re.fullmatch(r"[+-]?\d+", text):
            budget = int(text)
        else:
            try:
                budget = float(text)
            except ValueError:
                raise ValueError(f"budget={budget!r} is not a number: give a count (e.g. 500) or a fraction "
                                 "of the pool (e.g. 0.05).") from None
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise TypeError(f"budget must be an int count or a float fraction, got {budget!r}.")
    if isinstance(budget, numbers.Integral):
        if budget < 1:
            raise ValueError(f"budget={budget} must be a count >= 1 (or a fraction in (0, 1], e.g. budget=0.05).")
        return int(budget)
    if not 0.0 < budget <= 1.0:
        # A whole-valued float above 1 (300.0) is a count spelt as a float: say how to write it.
        hint = f" For a count of {int(budget)} examples give the int {int(budget)}." if (
            budget > 1 and float(budget).is_integer()) else " Give an int for a count."
        raise ValueError(f"budget={budget} as a fraction must be in (0, 1] (1.0 is the whole pool).{hint}")
    return float(budget)


class Budget:
    """The command-line type of a budget option (``HfArgumentParser`` and ``argparse`` call it on the text).

    ``Budget("1")`` is the count ``1`` and ``Budget("1.0")`` the fraction ``1.0``: the value returned
    is :func:`parse_budget`'s, an ``int`` or a ``float``, never a ``Budget``. A float-typed option
    would read ``"1"`` as ``1.0`` and lose the difference.
    """

    def __new__(cls, value: int | float | str) -> int | float:  # type: ignore[misc]
        try:
            return parse_budget(value)
        except (TypeError, ValueError) as e:  # argparse shows this message instead of "invalid Budget value"
            raise argparse.ArgumentTypeError(str(e)) from None


def resolve_budget(budget: int | float | str, pool_size: int) -> int:
    """The number of examples ``budget`` keeps from a pool of ``pool_size``: the one conversion.

    The convention is :func:`parse_budget`'s (an int is a count, a float in (0, 1] a fraction; text
    by its spelling). A count must not exceed the pool. A fraction is rounded to the nearest count
    and keeps at least one example, so a fraction too small to round to a row still selects one.
    """
    if pool_size <= 0:
        raise ValueError("The pool is empty: there is nothing to select from.")
    budget = parse_budget(budget)
    if isinstance(budget, int):
        if budget > pool_size:
            raise ValueError(f"budget={budget} must be between 1 and the pool size {pool_size} "
                             "(or a fraction in (0, 1], e.g. budget=0.05).")
        return budget
    return max(1, int(round(budget * pool_size)))


# -- reading similarities in chunks ----------------------------------------------------------------


def sims_shape(sims: Any) -> tuple[int, int]:
    """``(N, T)`` of a similarity matrix in any supported container."""
    shape = getattr(sims, "shape", None)
    if shape is None:
        raise TypeError(f"sims must be an (N, T) array, memmap, tensor or chunkable object with a .shape, "
                        f"got {type(sims).__name__}.")
    if len(shape) != 2:
        raise ValueError(f"sims must be 2-D (pool rows x target columns), got shape {tuple(shape)}.")
    return int(shape[0]), int(shape[1])


def as_sims(sims: Any) -> Any:
    """Lists (e.g. a ``less_sims`` column) become a float32 array; other containers pass through."""
    if isinstance(sims, (list, tuple)):
        return np.asarray(sims, dtype=np.float32).reshape(len(sims), -1)
    return sims


def read_rows(sims: Any, start: int, stop: int) -> np.ndarray:
    """Rows ``[start, stop)`` of ``sims`` as an in-memory float32 ``(stop - start, T)`` array."""
    if isinstance(sims, torch.Tensor):
        out = sims[start:stop].detach().to("cpu", torch.float32).numpy()
    elif hasattr(sims, "read"):
        out = np.asarray(sims.read(start, stop), dtype=np.float32)
    else:
        out = np.asarray(sims[start:stop], dtype=np.float32)
    if not out.flags.writeable:  # a read-only memmap view: copy the chunk (torch wants writable memory)
        out = out.copy()
    if np.isnan(out).any():
        raise ValueError(f"sims rows {start}..{stop} contain NaN: recompute the similarities (a zero "
                         "feature vector has no cosine) or drop those rows.")
    return out


def default_chunk_rows(num_targets: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, num_targets))


def iter_chunks(sims: Any, chunk_rows: int | None = None, desc: str | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(start, rows)`` over ``sims`` in float32 row chunks, with a progress bar on large inputs."""
    n, t = sims_shape(sims)
    chunk_rows = chunk_rows or default_chunk_rows(t)
    starts = range(0, n, chunk_rows)
    bar = tqdm(starts, desc=desc, unit="chunk", disable=desc is None or len(starts) < 8, leave=False)
    for start in bar:
        yield start, read_rows(sims, start, min(n, start + chunk_rows))


def gather_rows(sims: Any, rows: np.ndarray, chunk_rows: int | None = None) -> np.ndarray:
    """``sims[rows]`` for sorted unique ``rows``, read chunk by chunk (works on any container)."""
    n, t = sims_shape(sims)
    out = np.empty((len(rows), t), dtype=np.float32)
    chunk_rows = chunk_rows or default_chunk_rows(t)
    for start in range(0, n, chunk_rows):
        lo, hi = np.searchsorted(rows, [start, start + chunk_rows])
        if lo < hi:
            out[lo:hi] = read_rows(sims, start, min(n, start + chunk_rows))[rows[lo:hi] - start]
    return out


class _RowSubset:
    """The sorted rows ``rows`` of ``sims``, read in row chunks like any other sims container."""

    def __init__(self, sims: Any, rows: np.ndarray):
        self.sims, self.rows = sims, np.asarray(rows, dtype=np.int64)
        self.shape = (len(self.rows), sims_shape(sims)[1])

    def read(self, start: int, stop: int) -> np.ndarray:
        r = self.rows[start:stop]
        if not len(r):
            return np.zeros((0, self.shape[1]), dtype=np.float32)
        return read_rows(self.sims, int(r[0]), int(r[-1]) + 1)[r - r[0]]


def rank_desc(values: np.ndarray) -> np.ndarray:
    """Indices by ``values`` descending, ties by index ascending (``np.int64``)."""
    values = np.asarray(values, dtype=np.float64)
    return np.lexsort((np.arange(len(values)), -values)).astype(np.int64)


def _prefix(ordering: np.ndarray, k: int | None) -> np.ndarray:
    return ordering if k is None else ordering[: int(k)]


# -- nearest neighbours of every target, streamed ----------------------------------------------------


def _keep_top(vals: np.ndarray, idx: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the ``m`` largest of ``vals`` sorted descending, ties by position (= by pool index).

    ``vals``/``idx`` are ``(T, W)``; returns ``(T, m)`` each. Exact: no tie is broken arbitrarily.
    """
    t, w = vals.shape
    if w > m:
        thr = np.partition(vals, w - m, axis=1)[:, w - m : w - m + 1]  # the m-th largest per row
        above = vals > thr
        tied = vals == thr
        need = m - above.sum(1, keepdims=True)
        keep = above | (tied & (np.cumsum(tied, 1) <= need))  # earliest tied positions first
        cols = np.nonzero(keep)[1].reshape(t, m)
        vals = np.take_along_axis(vals, cols, 1)
        idx = np.take_along_axis(idx, cols, 1)
    order = np.argsort(-vals, axis=1, kind="stable")
    return np.take_along_axis(vals, order, 1), np.take_along_axis(idx, order, 1)


def top_neighbors(sims: Any, m: int, *, exclude: np.ndarray | None = None, chunk_rows: int | None = None,
                  desc: str | None = "nearest candidates") -> tuple[np.ndarray, np.ndarray]:
    """The ``m`` most similar candidates of every target, in one streaming pass over ``sims``.

    Args:
        sims: ``(N, T)`` similarities.
        m: neighbours per target (capped at the number of candidates not excluded).
        exclude: optional ``(N,)`` bool mask of candidates to skip.
    Returns:
        ``(vals, idx)``, each ``(T, m)``: per target, similarities descending and the pool
        indices, ties by pool index. Memory ``O(T * (m + chunk))``, never ``O(N * T)``.
    """
    n, t = sims_shape(sims)
    avail = n - (int(exclude.sum()) if exclude is not None else 0)
    m = int(min(m, avail))
    best_v = np.empty((t, 0), dtype=np.float32)
    best_i = np.empty((t, 0), dtype=np.int64)
    if m <= 0:
        return best_v, best_i
    # Chunks arrive in pool order and the kept rows precede new columns, so "earlier position"
    # means "smaller pool index" among equal values: that is what makes the ties exact.
    for start, chunk in iter_chunks(sims, chunk_rows, desc):
        ids = np.arange(start, start + len(chunk), dtype=np.int64)
        if exclude is not None:
            keep = ~exclude[start : start + len(chunk)]
            chunk, ids = chunk[keep], ids[keep]
            if not len(ids):
                continue
        new_v = np.ascontiguousarray(chunk.T)  # (T, B)
        new_i = np.broadcast_to(ids, new_v.shape)
        if best_v.shape[1] == m:
            # Only values above a target's current m-th best can enter its list (an equal value
            # has a larger pool index and loses the tie): compact those, padded with -inf.
            hit = new_v > best_v[:, -1:]
            counts = hit.sum(1)
            width = int(counts.max())
            if width == 0:
                continue
            r, c = np.nonzero(hit)  # row-major: pool order kept within a row
            slot = np.arange(len(r)) - np.repeat(np.cumsum(counts) - counts, counts)
            pv = np.full((t, width), -np.inf, dtype=np.float32)
            pi = np.full((t, width), np.iinfo(np.int64).max, dtype=np.int64)
            pv[r, slot], pi[r, slot] = new_v[r, c], new_i[r, c]
            new_v, new_i = pv, pi
        vals = np.concatenate([best_v, new_v], 1)
        idx = np.concatenate([best_i, new_i], 1)
        best_v, best_i = _keep_top(vals, idx, m)
    return best_v, best_i


# -- the selectors -------------------------------------------------------------------------------------


def topk(scores: np.ndarray, k: int | None = None) -> np.ndarray:
    """LESS's selector: highest ``less_score`` first (mean over each subtask's targets, max over subtasks)."""
    return _prefix(rank_desc(scores), k)


def random(n: int, seed: int = 0, k: int | None = None) -> np.ndarray:
    """A seeded random permutation: the baseline every selection is compared with."""
    return _prefix(np.random.default_rng(seed).permutation(n).astype(np.int64), k)


def aggregate_scores(sims: Any, subtask_ids: Sequence[int] | np.ndarray | None = None,
                     chunk_rows: int | None = None) -> np.ndarray:
    """``(N, T) -> (N,)`` LESS score from similarities: mean over each subtask's targets, max over subtasks.

    ``subtask_ids`` (``(T,)`` ints, or any labels) groups the targets; ``None`` is one subtask.
    """
    n, t = sims_shape(sims)
    if subtask_ids is None:
        ids = np.zeros(t, dtype=np.int64)
    else:
        labels = list(np.asarray(subtask_ids).tolist())
        if len(labels) != t:
            raise ValueError(f"{len(labels)} subtask ids for {t} target columns of sims.")
        pos = {lab: i for i, lab in enumerate(dict.fromkeys(labels))}
        ids = np.asarray([pos[lab] for lab in labels], dtype=np.int64)
    groups = int(ids.max()) + 1
    onehot = np.zeros((t, groups), dtype=np.float64)
    onehot[np.arange(t), ids] = 1.0
    onehot /= onehot.sum(0, keepdims=True)  # a (T, J) averaging matrix
    out = np.empty(n, dtype=np.float64)
    for start, chunk in iter_chunks(sims, chunk_rows, "subtask scores"):
        out[start : start + len(chunk)] = (chunk.astype(np.float64) @ onehot).max(1)
    return out


def doubly_greedy(sims: Any, k: int | None = None, *, chunk_rows: int | None = None) -> np.ndarray:
    """Top-k by ``max_i sims[j, i]``: every candidate is as good as its best-matched target."""
    n, _ = sims_shape(sims)
    best = np.empty(n, dtype=np.float32)
    for start, chunk in iter_chunks(sims, chunk_rows, "doubly greedy"):
        best[start : start + len(chunk)] = chunk.max(1)
    return _prefix(rank_desc(best), k)


def round_robin(sims: Any, k: int | None = None, *, neighbors: int | None = None,
                chunk_rows: int | None = None) -> np.ndarray:
    """Cycle through the targets ``i = 0, 1, ..., T-1, 0, ...``; each takes its most similar untaken candidate.

    The small-budget selector of Nayak et al. (with LESS features). Each target's ranking
    (similarity descending, ties by pool index) is prefetched ``neighbors`` deep in one streaming
    pass; when a target has taken its whole list, every list is refilled with the next best
    untaken candidates (four times as deep), so a full ordering of ``N`` costs ``O(log N)`` passes.

    Args:
        sims: ``(N, T)`` similarities.
        k: stop after ``k`` picks (default: order the whole pool).
        neighbors: initial list depth per target (default ``4 * ceil(k / T)``, at least 64).
    Returns:
        ``(k,)`` or ``(N,)`` ``np.int64`` pool indices in pick order.
    """
    n, t = sims_shape(sims)
    k = n if k is None else int(k)
    depth = int(neighbors or max(64, 4 * math.ceil(k / t)))
    taken = np.zeros(n, dtype=bool)
    out = np.empty(k, dtype=np.int64)
    lists = top_neighbors(sims, depth, chunk_rows=chunk_rows, desc="round robin")[1]
    ptr = np.zeros(t, dtype=np.int64)
    picked, target = 0, 0
    bar = tqdm(total=k, desc="round robin", unit="pick", disable=k < 100_000, leave=False)
    while picked < k:
        row = lists[target]
        p = int(ptr[target])
        while p < row.shape[0] and taken[row[p]]:
            p += 1
        if p == row.shape[0]:
            # This target's whole list is taken: refill every list below the taken set.
            # Twice as deep (a list of all remaining candidates never runs out again), within
            # 2^25 list entries of memory unless that is less than one more than before.
            depth = min(n - picked, max(row.shape[0] + 1, min(4 * row.shape[0], (1 << 25) // t)))
            lists = top_neighbors(sims, depth, exclude=taken, chunk_rows=chunk_rows, desc=None)[1]
            ptr[:] = 0
            continue
        j = int(row[p])
        taken[j] = True
        ptr[target] = p + 1
        out[picked] = j
        picked += 1
        bar.update(1)
        target = (target + 1) % t
    bar.close()
    return out


def _torch_rows(sims: Any, start: int, stop: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(sims, torch.Tensor):
        out = sims[start:stop].to(device=device, dtype=dtype)
        if torch.isnan(out).any():
            raise ValueError(f"sims rows {start}..{stop} contain NaN: recompute the similarities.")
        return out
    return torch.from_numpy(read_rows(sims, start, stop)).to(device=device, dtype=dtype)


def uot_mass(sims: Any, *, reg: float = 0.01, reg_m: float | tuple[float, float] = (float("inf"), 1e-4),
             num_iter: int = 1000, tol: float = 1e-6, device: str | torch.device | None = None,
             dtype: torch.dtype = torch.float32, chunk_rows: int | None = None) -> torch.Tensor:
    """Log of the mass each candidate receives in unbalanced entropic OT from the targets.

    Solves, as POT's ``ot.unbalanced.sinkhorn_unbalanced(a, b, M, reg, reg_m, reg_type="kl")``
    does, but in the log domain and streaming over candidate chunks::

        min_P  <P, M> + reg KL(P | a b^T) + reg_m1 KL(P 1 | a) + reg_m2 KL(P^T 1 | b)
        M_ji = (1 - sims_ji) / 2,  a = 1/T (targets),  b = 1/N (candidates)

    With ``reg_m1 = inf`` the target marginal is exact; a tiny ``reg_m2`` leaves the candidate
    marginal nearly free, so mass flows to the candidates closest to the targets. The kernel
    ``exp(-M / reg)`` underflows float32 for ``reg = 0.01`` (``exp(-100)``), hence log-domain
    scalings ``log u`` (``(T,)``) and ``log v`` (``(N,)``) with the generalised Sinkhorn updates::

        log u = fi1 * (log a - LSE_j(log K_ij + log v_j)),   fi1 = reg_m1 / (reg_m1 + reg)
        log v = fi2 * (log b - LSE_i(log K_ij + log u_i)),   fi2 = reg_m2 / (reg_m2 + reg)

    Every iteration is one pass over ``sims``; it runs on ``device`` (default: the tensor's own
    device for a torch ``sims``, else CPU), so CUDA tensors stay on the GPU.

    Returns:
        ``(N,)`` float64 CPU tensor of ``log sum_i P_ji``.
    """
    n, t = sims_shape(sims)
    if isinstance(reg_m, numbers.Real):
        reg_m = (float(reg_m), float(reg_m))
    reg_m1, reg_m2 = (float(x) for x in reg_m)
    if reg <= 0 or reg_m1 <= 0 or reg_m2 <= 0:
        raise ValueError(f"uot needs reg > 0 and reg_m > 0, got reg={reg}, reg_m={reg_m}.")
    fi1 = 1.0 if math.isinf(reg_m1) else reg_m1 / (reg_m1 + reg)
    fi2 = 1.0 if math.isinf(reg_m2) else reg_m2 / (reg_m2 + reg)
    if device is None:
        device = sims.device if isinstance(sims, torch.Tensor) else torch.device("cpu")
    device = torch.device(device)
    chunk_rows = chunk_rows or default_chunk_rows(t)
    log_a, log_b = -math.log(t), -math.log(n)
    starts = list(range(0, n, chunk_rows))

    def log_kernel(start: int) -> torch.Tensor:
        s = _torch_rows(sims, start, min(n, start + chunk_rows), device, dtype)
        return (s - 1.0) / (2.0 * reg) + (log_a + log_b)  # log K_ji = -M_ji / reg + log a_i + log b_j

    log_v = torch.zeros(n, device=device, dtype=dtype)
    log_u = torch.zeros(t, device=device, dtype=dtype)

    def update_u(log_v: torch.Tensor) -> torch.Tensor:
        acc = torch.full((t,), -math.inf, device=device, dtype=dtype)
        for start in starts:
            lk = log_kernel(start)
            acc = torch.logaddexp(acc, torch.logsumexp(lk + log_v[start : start + lk.shape[0], None], 0))
        return fi1 * (log_a - acc)

    log_u = update_u(log_v)
    bar = tqdm(range(num_iter), desc="uot sinkhorn", unit="it", disable=n * t < 10**8, leave=False)
    for _ in bar:
        # One fused pass: v from the current u, chunk by chunk, and the sums the next u needs.
        acc = torch.full((t,), -math.inf, device=device, dtype=dtype)
        new_v = torch.empty_like(log_v)
        for start in starts:
            lk = log_kernel(start)
            lv = fi2 * (log_b - torch.logsumexp(lk + log_u[None, :], 1))
            new_v[start : start + lk.shape[0]] = lv
            acc = torch.logaddexp(acc, torch.logsumexp(lk + lv[:, None], 0))
        new_u = fi1 * (log_a - acc)
        # Stop on the change of the dual potentials f = reg log u, g = reg log v (units of cost).
        err = reg * max(float((new_u - log_u).abs().max()), float((new_v - log_v).abs().max()))
        log_u, log_v = new_u, new_v
        if err < tol:
            break
    bar.close()
    mass = torch.empty(n, dtype=torch.float64)
    for start in starts:
        lk = log_kernel(start)
        lm = log_v[start : start + lk.shape[0]] + torch.logsumexp(lk + log_u[None, :], 1)
        mass[start : start + lk.shape[0]] = lm.double().cpu()
    return mass


def uot(sims: Any, k: int | None = None, *, reg: float = 0.01,
        reg_m: float | tuple[float, float] = (float("inf"), 1e-4), num_iter: int = 1000, tol: float = 1e-6,
        device: str | torch.device | None = None, dtype: torch.dtype = torch.float32,
        chunk_rows: int | None = None) -> np.ndarray:
    """Candidates by the mass they receive in unbalanced OT from the targets (see :func:`uot_mass`).

    Reference settings (Nayak et al.): ``reg=0.01, reg_m=(inf, 1e-4)``, KL. Competitive at larger budgets.
    """
    log_mass = uot_mass(sims, reg=reg, reg_m=reg_m, num_iter=num_iter, tol=tol, device=device, dtype=dtype,
                        chunk_rows=chunk_rows)
    return _prefix(rank_desc(log_mass.numpy()), k)


def _knn_stop(alpha: float, C: float, t: int) -> float:
    """TSDS's stopping level: neighbourhoods grow while ``(alpha / C) * cost < (1 - alpha) * M``."""
    if not 0.0 < alpha < 1.0 or C <= 0:
        raise ValueError(f"knn selectors need 0 < alpha < 1 and C > 0, got alpha={alpha}, C={C}.")
    return (1.0 - alpha) * t * C / alpha


def knn_uniform_mass(sims: Any, *, alpha: float = 0.01, C: float = 5.0, max_neighbors: int = 5000,
                     chunk_rows: int | None = None) -> tuple[np.ndarray, int]:
    """TSDS's KNN-Uniform probability ``p`` over candidates, and the neighbourhood size ``K``.

    Each target ``i`` (of ``M = T``) sends mass ``1 / (K M)`` to each of its ``K`` nearest
    candidates under cosine distance ``d = 1 - cos``. ``K`` is the first ``K`` (in
    ``1 .. max_neighbors``) with ``(alpha / C) * sum_i sum_{k <= K} (d_{i,K+1} - d_{i,k}) >=
    (1 - alpha) * M``: the transport cost (weight ``alpha``) against the diversity term (``C``).

    Returns:
        ``(p, K)`` with ``p`` ``(N,)`` float64 summing to 1.
    """
    n, t = sims_shape(sims)
    vals, idx = top_neighbors(sims, max(1, int(max_neighbors)), chunk_rows=chunk_rows, desc="knn neighbours")
    d = 1.0 - vals.astype(np.float64)  # (T, L) ascending per target
    depth = d.shape[1]
    stop = _knn_stop(alpha, C, t)
    if depth > 1:
        ks = np.arange(1, depth)  # gap sum for K neighbours uses d_{i,K+1} = d[:, K]
        gaps = (ks * d[:, 1:] - np.cumsum(d, 1)[:, :-1]).sum(0)  # non-decreasing in K
        over = np.flatnonzero(gaps >= stop)
        kk = int(over[0] + 1) if len(over) else depth
    else:
        kk = 1
    p = np.bincount(idx[:, :kk].ravel(), minlength=n).astype(np.float64) / (kk * t)
    return p, kk


def knn_uniform(sims: Any, k: int | None = None, *, alpha: float = 0.01, C: float = 5.0,
                max_neighbors: int = 5000, chunk_rows: int | None = None) -> np.ndarray:
    """Candidates by their KNN-Uniform probability (TSDS), ties (and the zero-mass tail) by pool index."""
    p, kk = knn_uniform_mass(sims, alpha=alpha, C=C, max_neighbors=max_neighbors, chunk_rows=chunk_rows)
    logger.info("knn_uniform: %d neighbours per target, %d candidates with mass.", kk, int((p > 0).sum()))
    return _prefix(rank_desc(p), k)


def kde_densities(features: Any, rows: np.ndarray, *, sigma: float = 0.75, neighbors: int = 1000,
                  chunk_rows: int = 2048, device: str | torch.device | None = None) -> np.ndarray:
    """Kernel density of each of ``rows`` among ``rows`` (TSDS's near-duplicate penalty).

    ``rho(x) = sum over the `neighbors` nearest y of max(0, 1 - |x - y|^2 / sigma^2)`` on
    L2-normalised features, where ``|x - y|^2 = 2 (1 - cos(x, y))``; ``x`` itself counts, so
    ``rho >= 1`` and a point with ``m`` exact duplicates has ``rho = m + 1``.

    Args:
        features: ``(N, d)`` features (array, memmap, tensor or chunkable); only ``rows`` are read.
        rows: sorted unique pool indices ``(U,)``.
    Returns:
        ``(U,)`` float64 densities.
    """
    if sigma == 0:
        return np.ones(len(rows), dtype=np.float64)
    dev = torch.device(device) if device is not None else (
        features.device if isinstance(features, torch.Tensor) else torch.device("cpu"))
    x = torch.from_numpy(gather_rows(features, rows)).to(dev)
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    m = min(int(neighbors), len(rows))
    out = np.empty(len(rows), dtype=np.float64)
    chunk_rows = max(1, min(chunk_rows, (1 << 24) // max(1, len(rows))))  # a (B, U) block of <= 64 MiB
    for start in tqdm(range(0, len(rows), chunk_rows), desc="kde", unit="chunk",
                      disable=len(rows) < 32 * chunk_rows, leave=False):
        kern = ((x[start : start + chunk_rows] @ x.T - 1.0) * (2.0 / sigma**2) + 1.0).clamp_min_(0.0)  # (B, U)
        # The kernel is 0 outside the radius: only rows with more than m points inside need a top-m.
        crowded = ((kern > 0).sum(1) > m).cpu().numpy()
        dens = kern.double().sum(1).cpu().numpy()
        if crowded.any():  # sum of the m largest: a linear-time partition, not a sort
            rows_k = kern[torch.from_numpy(crowded).to(kern.device)].cpu().numpy()
            dens[crowded] = np.partition(rows_k, rows_k.shape[1] - m, axis=1)[:, -m:].sum(1, dtype=np.float64)
        out[start : start + kern.shape[0]] = np.maximum(dens, 1.0)  # a zero vector still counts itself
    return out


def knn_kde_mass(sims: Any, *, features: Any = None, densities: np.ndarray | None = None, alpha: float = 0.01,
                 C: float = 5.0, sigma: float = 0.75, max_neighbors: int = 5000, kde_neighbors: int = 1000,
                 chunk_rows: int | None = None) -> np.ndarray:
    """TSDS's KNN-KDE probability over candidates: nearest-neighbour transport, near-duplicates discounted.

    Each target ``i`` sends its mass ``1 / M`` to its nearest candidates in order, candidate
    ``(i, k)`` weighted by ``w_ik = 1 / rho_ik`` (inverse kernel density, so a cluster of
    near-duplicates counts about once). With ``W_i(n) = sum_{k < n} w_ik`` a common water level
    ``s`` rises through the breakpoints ``W_i(n)`` (ascending; ties by ``n``, then ``i``); at each,
    target ``i`` would take its ``n`` first neighbours, which costs
    ``cost_i = sum_{k < n} w_ik (d_{i,n} - d_{ik})``. The level stops at the first breakpoint where
    ``(alpha / C) * sum_i cost_i >= (1 - alpha) * M``. Then target ``i`` with ``n_i`` accepted
    neighbours gives ``w_ik / (M s)`` to each and the rest of its ``1 / M`` to neighbour ``n_i``.
    With all ``rho = 1`` this is KNN-Uniform's rule, one neighbourhood at a time.

    Densities (:func:`kde_densities`) are computed among the prefetched neighbours on ``features``
    (``(N, d)``); without ``features``, each candidate's row of ``sims`` stands in for it (near
    duplicates have near-identical similarity profiles). ``densities`` (``(N,)``) skips the KDE.

    Returns:
        ``(N,)`` float64 probability summing to 1.
    """
    n, t = sims_shape(sims)
    vals, idx = top_neighbors(sims, max(1, int(max_neighbors)), chunk_rows=chunk_rows, desc="knn neighbours")
    d = 1.0 - vals.astype(np.float64)
    depth = d.shape[1]
    uniq = np.unique(idx)
    if densities is not None:
        dens = np.asarray(densities, dtype=np.float64)
        if dens.shape != (n,):
            raise ValueError(f"densities has shape {dens.shape}, expected ({n},): one per candidate.")
        rho_u = dens[uniq]
    else:
        rho_u = kde_densities(sims if features is None else features, uniq, sigma=sigma, neighbors=kde_neighbors)
    if (rho_u <= 0).any():
        raise ValueError("Kernel densities must be positive (each point counts itself).")
    w = 1.0 / rho_u[np.searchsorted(uniq, idx)]  # (T, L)
    p = np.zeros(n, dtype=np.float64)
    if depth == 1:
        np.add.at(p, idx[:, 0], 1.0 / t)
        return p
    big_w = np.cumsum(w, 1)  # W_i(n) = big_w[:, n - 1]
    dw = np.cumsum(d * w, 1)
    # Events (target i takes n neighbours) for n = 1 .. L-1, in the order the level reaches them.
    nn = np.arange(1, depth)
    ev_level = big_w[:, :-1]  # (T, L-1)
    ev_cost = d[:, 1:] * ev_level - dw[:, :-1]  # cost_i with n neighbours
    delta = np.diff(ev_cost, axis=1, prepend=0.0)  # change of the total when i goes n-1 -> n
    ti, ni = np.meshgrid(np.arange(t), nn, indexing="ij")
    order_ev = np.lexsort((ti.ravel(), ni.ravel(), ev_level.ravel()))
    total = np.cumsum(delta.ravel()[order_ev])
    _knn_stop(alpha, C, t)  # validates alpha and C
    over = np.flatnonzero((alpha / C) * total >= (1.0 - alpha) * t)
    stop_at = int(over[0]) if len(over) else len(order_ev)
    level = ev_level.ravel()[order_ev[min(stop_at, len(order_ev) - 1)]]
    accepted = np.zeros(t, dtype=np.int64)
    if stop_at:
        acc = order_ev[:stop_at]
        np.maximum.at(accepted, ti.ravel()[acc], ni.ravel()[acc])
    rows = np.arange(t)
    taken_mask = np.arange(depth)[None, :] < accepted[:, None]
    np.add.at(p, idx[taken_mask], (w / (t * level))[taken_mask])
    sent = np.where(accepted > 0, big_w[rows, np.maximum(accepted - 1, 0)] / (t * level), 0.0)
    np.add.at(p, idx[rows, accepted], np.maximum(1.0 / t - sent, 0.0))
    return p


def knn_kde(sims: Any, k: int | None = None, *, features: Any = None, densities: np.ndarray | None = None,
            alpha: float = 0.01, C: float = 5.0, sigma: float = 0.75, max_neighbors: int = 5000,
            kde_neighbors: int = 1000, chunk_rows: int | None = None) -> np.ndarray:
    """Candidates by their KNN-KDE probability (TSDS, :func:`knn_kde_mass`), ties by pool index."""
    p = knn_kde_mass(sims, features=features, densities=densities, alpha=alpha, C=C, sigma=sigma,
                     max_neighbors=max_neighbors, kde_neighbors=kde_neighbors, chunk_rows=chunk_rows)
    logger.info("knn_kde: %d candidates with mass.", int((p > 0).sum()))
    return _prefix(rank_desc(p), k)


# -- one entry point -------------------------------------------------------------------------------

STRATEGIES = ("topk", "round_robin", "doubly_greedy", "uot", "knn_uniform", "knn_kde", "random")
NEEDS_SIMS = ("round_robin", "doubly_greedy", "uot", "knn_uniform", "knn_kde")
_FUNCTIONS = {"round_robin": round_robin, "doubly_greedy": doubly_greedy, "uot": uot,
              "knn_uniform": knn_uniform, "knn_kde": knn_kde}


def strategy_params(strategy: str) -> tuple[str, ...]:
    """The keyword parameters ``strategy`` accepts through :func:`order`'s ``**params``."""
    if strategy in ("topk", "random"):
        return ("k", "chunk_rows") if strategy == "topk" else ("k",)
    fn = _FUNCTIONS[strategy]
    return tuple(p for p in inspect.signature(fn).parameters if p != "sims")


def order(strategy: str, scores: np.ndarray | None = None, seed: int = 0, *, sims: Any = None,
          subtask_ids: Sequence[int] | np.ndarray | None = None, **params: Any) -> np.ndarray:
    """The ordering of ``strategy`` over a pool.

    Args:
        strategy: one of :data:`STRATEGIES`.
        scores: ``(N,)`` per-candidate scores (the ``less_score`` column); ``topk`` ranks by them
            (when absent it derives them from ``sims`` and ``subtask_ids``).
        seed: for ``random``.
        sims: ``(N, T)`` pool-by-target cosine similarity (the ``less_sims`` column, a memmap, a
            tensor, or any chunkable); needed by every strategy but ``topk`` and ``random``.
        subtask_ids: ``(T,)`` subtask of each target, for ``topk`` from ``sims``.
        **params: the strategy's own parameters, e.g. ``k`` (stop after ``k``), ``reg`` and
            ``reg_m`` (uot), ``alpha``, ``C``, ``sigma``, ``max_neighbors``, ``kde_neighbors``,
            ``features`` (knn_kde), ``neighbors`` (round_robin).
    Returns:
        ``np.int64`` pool indices, best first, without duplicates (all ``N`` unless ``k`` is given).
        Rows whose score is ``-inf`` (examples skipped as unscorable, e.g. no completion token)
        are left out of every ordering: they are never selected.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"Unknown selection strategy {strategy!r}; available: {STRATEGIES}.")
    unknown = sorted(set(params) - set(strategy_params(strategy)))
    if unknown:
        raise ValueError(f"Strategy {strategy!r} takes no parameter {unknown}; it accepts "
                         f"{list(strategy_params(strategy))}.")
    if sims is not None:
        sims = as_sims(sims)
    if scores is not None:
        scores = np.asarray(scores, dtype=np.float64)
        if np.isnan(scores).any():
            raise ValueError(f"scores are NaN at rows {np.flatnonzero(np.isnan(scores))[:5].tolist()}: recompute "
                             "them (hf-less scores an unscorable example -inf, never NaN).")
        if np.isneginf(scores).any():  # skipped examples: order the others, never select these
            keep = np.flatnonzero(~np.isneginf(scores))
            if sims is not None and len(scores) != sims_shape(sims)[0]:
                raise ValueError(f"scores has {len(scores)} rows but sims has {sims_shape(sims)[0]}.")
            sub = {name: (np.asarray(v)[keep] if name in ("features", "densities") and v is not None else v)
                   for name, v in params.items()}
            if sub.get("k") is not None:
                sub["k"] = min(int(sub["k"]), len(keep))
            if not len(keep):
                return np.zeros(0, dtype=np.int64)
            inner = order(strategy, scores[keep], seed, sims=None if sims is None else _RowSubset(sims, keep),
                          subtask_ids=subtask_ids, **sub)
            return keep[inner]
    if strategy == "random":
        if scores is not None:
            n = len(scores)
        elif sims is not None:
            n = sims_shape(sims)[0]
        else:
            raise ValueError("strategy='random' needs the pool size: pass scores= or sims=.")
        return random(n, seed, params.get("k"))
    if strategy == "topk":
        if scores is None:
            if sims is None:
                raise ValueError("strategy='topk' needs scores= (the less_score column) or sims= "
                                 "(the less_sims column) to rank the pool.")
            scores = aggregate_scores(sims, subtask_ids, params.get("chunk_rows"))
        return topk(np.asarray(scores, dtype=np.float64), params.get("k"))
    if sims is None:
        raise ValueError(f"strategy={strategy!r} needs the pool-by-target similarities: pass "
                         "sims=np.asarray(scored['less_sims']) (or any (N, T) array, memmap or "
                         "CosineSimilarity), or use strategy='topk'.")
    if scores is not None and len(scores) != sims_shape(sims)[0]:
        raise ValueError(f"scores has {len(scores)} rows but sims has {sims_shape(sims)[0]}.")
    return _FUNCTIONS[strategy](sims, **params)
