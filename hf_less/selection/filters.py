"""Predicates for ``dataset.filter``: keep a selection's rows, or rows by a score column.

``LessSelector.filter_fn`` keeps exactly the rows ``select`` keeps; the threshold forms work on
any score column a ``map`` added (``less_score``, or a quality score such as IFD)::

    subset = scored.filter(at_least("less_score", 0.2))
    subset = scored.filter(top_fraction(scored, "ifd", 0.1), with_indices=True)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from . import strategies as selectors


def keep_indices(indices: Iterable[int]) -> Callable[[dict, int], bool]:
    """A predicate for ``filter(fn, with_indices=True)`` that keeps the rows at ``indices``."""
    keep = frozenset(int(i) for i in indices)

    def keep_row(example, idx):
        return idx in keep

    return keep_row


def at_least(column: str, threshold: float) -> Callable[[dict], bool]:
    """A predicate for ``filter(fn)`` keeping rows whose ``column`` is ``>= threshold`` (NaN never)."""

    def keep_row(example):
        if column not in example:
            raise KeyError(f"No column {column!r} in the dataset (columns: {sorted(example)}).")
        value = example[column]
        return value is not None and bool(value >= threshold)

    return keep_row


def top_fraction(dataset, column: str, budget: int | float, descending: bool = True) -> Callable[[dict, int], bool]:
    """A predicate for ``filter(fn, with_indices=True)`` keeping the best ``budget`` rows by ``column``.

    ``budget`` is a count or a fraction, as for ``select``; ties go to the lower row index, NaN
    scores rank last. ``descending=False`` keeps the lowest values instead.
    """
    if column not in dataset.column_names:
        raise KeyError(f"No column {column!r} in the dataset (columns: {dataset.column_names}).")
    values = np.asarray(dataset[column], dtype=np.float64)
    k = selectors.resolve_budget(budget, len(values))
    key = -values if descending else values
    key = np.where(np.isnan(key), np.inf, key)
    return keep_indices(np.lexsort((np.arange(len(values)), key))[:k])
