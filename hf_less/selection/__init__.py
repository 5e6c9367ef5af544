"""Selection: from scores or similarities to a subset of the pool.

- :mod:`hf_less.selection.strategies`: the selection strategies (top-k, round-robin, UOT, kNN,
  random, ...) and the one budget rule (:func:`resolve_budget`);
- :mod:`hf_less.selection.record`: the selection record on disk (:class:`Selection`);
- :mod:`hf_less.selection.filters`: ``datasets.filter`` predicates; :mod:`hf_less.selection.distance`:
  subset-to-target distances and the target-independence diagnostic.

The names of the 0.1 module ``hf_less.selection`` (the record) are re-exported here.
"""

from .record import (
    SCORES_FILE,
    SELECTION_FILE,
    SELECTION_VERSION,
    Selection,
    load_pool_scores,
    load_selection,
    save_selection,
)
from .strategies import STRATEGIES, Budget, order, parse_budget, resolve_budget

__all__ = [
    "SCORES_FILE", "SELECTION_FILE", "SELECTION_VERSION", "Selection", "load_pool_scores", "load_selection",
    "save_selection", "STRATEGIES", "Budget", "order", "parse_budget", "resolve_budget",
]
