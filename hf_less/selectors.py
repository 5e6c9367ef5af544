"""Selectors: each turns scores or similarities into an ordering of pool indices.

A budget ``k`` keeps the first ``k`` of the ordering. Orderings are ``np.int64`` arrays
without duplicates; ties are broken by pool index so results are deterministic.
"""

from __future__ import annotations

import numbers

import numpy as np


def resolve_budget(budget: int | float, pool_size: int) -> int:
    """A count (int >= 1) or a fraction of the pool (float in (0, 1]) -> a count."""
    if pool_size <= 0:
        raise ValueError("The pool is empty: there is nothing to select from.")
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise TypeError(f"budget must be an int count or a float fraction, got {budget!r}.")
    if isinstance(budget, numbers.Integral):
        if not 1 <= budget <= pool_size:
            raise ValueError(f"budget={budget} must be between 1 and the pool size {pool_size} "
                             "(or a fraction in (0, 1], e.g. budget=0.05).")
        return int(budget)
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"budget={budget} as a fraction must be in (0, 1]; give an int for a count.")
    return max(1, int(round(budget * pool_size)))


def topk(scores: np.ndarray) -> np.ndarray:
    """LESS's selector: highest ``less_score`` first."""
    scores = np.asarray(scores, dtype=np.float64)
    return np.lexsort((np.arange(len(scores)), -scores)).astype(np.int64)


def random(n: int, seed: int = 0) -> np.ndarray:
    """A seeded random permutation: the baseline every selection is compared with."""
    return np.random.default_rng(seed).permutation(n).astype(np.int64)


STRATEGIES = ("topk", "random")


def order(strategy: str, scores: np.ndarray, seed: int = 0) -> np.ndarray:
    """The ordering of ``strategy`` for a pool with ``scores`` (its ``less_score`` column)."""
    if strategy == "topk":
        return topk(scores)
    if strategy == "random":
        return random(len(scores), seed)
    raise ValueError(f"Unknown selection strategy {strategy!r}; available: {STRATEGIES}.")
