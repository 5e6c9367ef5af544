"""What every target scorer shares: selection from its score columns, and its ``datasets`` fingerprint.

A target scorer (:class:`hf_less.LessSelector`, :class:`hf_less.scoring.representations.RepresentationSelector`)
is a ``map`` function that adds a score column (``(N,)``, higher is better) and a per-target similarity
column (``(N, T)``) to a pool. :class:`TargetScorer` turns those columns into an ordering, a selection
or a ``filter`` predicate with one budget rule (:func:`hf_less.selection.strategies.resolve_budget`).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..selection import strategies
from ..gradients.featurizer import rows_of
from ..selection.filters import keep_indices


def load_causal_lm(model: Any, tokenizer=None):
    """``(model, tokenizer)``: ``model`` as given, or loaded from a local path / hub name with its tokenizer
    (unless ``tokenizer`` is given)."""
    if isinstance(model, (str, os.PathLike)):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(model)
        model = AutoModelForCausalLM.from_pretrained(model)
    return model, tokenizer


def target_columns(targets: Any, subtask_column: str | None) -> tuple[dict[str, list], list | None]:
    """``(columns, subtask labels or None)`` of the target examples, refusing none or a missing subtask column."""
    columns = rows_of(targets)
    if not columns or not next(iter(columns.values())):
        raise ValueError("targets is empty: selection needs a few examples of the target task.")
    if subtask_column is not None and subtask_column not in columns:
        raise ValueError(f"subtask_column={subtask_column!r} is not a column of targets {sorted(columns)}.")
    labels = columns.pop(subtask_column) if subtask_column else None
    return columns, labels


def check_batched(batch: Mapping[str, Any], who: str) -> None:
    """Refuse one example where a batch is expected (``dataset.map(scorer)`` without ``batched=True``).

    In a batch every column is a list with one value per example; an example's own values are a
    string, a number, a list of messages (dicts) or a list of token ids (ints).
    """
    for name, value in batch.items():
        if isinstance(value, (list, tuple)):
            first = next((v for v in value if v is not None), None)
            one = isinstance(first, (dict, int))  # an example's messages, or its token ids
            what = f"a list of {type(first).__name__}"
        elif hasattr(value, "ndim"):  # a numpy/torch-formatted dataset: a batch column has a row axis
            one, what = value.ndim == 0, f"a 0-d {type(value).__name__}"
        else:  # a string, a number, a dict, None: one example's value
            one, what = True, type(value).__name__
        if one:
            raise TypeError(f"{who} scores a batch of examples, and got one example (its {name!r} is {what}): "
                            "pass batched=True: dataset.map(selector, batched=True, batch_size=16).")


def fingerprint_of(identity: dict) -> str:
    """16 hex characters naming a scorer's identity (the ``datasets`` cache key of its ``map``)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


class TargetScorer:
    """Selection for a scorer with ``score_column``, ``sims_column``, ``subtask_ids`` ``(T,)`` and ``subtask_names``."""

    score_column: str = "less_score"
    sims_column: str = "less_sims"

    def _subtask_ids(self) -> np.ndarray | None:
        """``(T,)`` subtask of each target, or None with a single subtask."""
        if len(self.subtask_names) <= 1:
            return None
        return np.asarray(self.subtask_ids)

    def order(self, scored, strategy: str = "topk", seed: int = 0, **params) -> np.ndarray:
        """The ordering of ``scored`` (a pool after ``dataset.map(scorer, batched=True)``) under ``strategy``.

        ``params`` go to the strategy (see :mod:`hf_less.selection.strategies`), ``k`` included.
        Rows scored ``-inf`` (unscorable) are never in the ordering.
        """
        if self.score_column not in scored.column_names:
            raise ValueError(f"The dataset has no {self.score_column!r} column: score it first with "
                             "dataset.map(selector, batched=True).")
        scores = np.asarray(scored[self.score_column], dtype=np.float64)
        sims = None
        if strategy in strategies.NEEDS_SIMS:
            if self.sims_column not in scored.column_names:
                raise ValueError(f"strategy={strategy!r} needs the {self.sims_column!r} column that "
                                 "map(selector) adds.")
            sims = np.asarray(scored[self.sims_column], dtype=np.float32).reshape(len(scored), -1)
        return strategies.order(strategy, scores, seed, sims=sims, subtask_ids=self._subtask_ids(), **params)

    def _selected(self, scored, budget: int | float | str, strategy: str, seed: int, params: dict) -> np.ndarray:
        k = strategies.resolve_budget(budget, len(scored))
        ordering = self.order(scored, strategy, seed, k=k, **params)
        if len(ordering) < k:
            warnings.warn(f"Only {len(ordering)} pool rows can be selected (the others were skipped: no "
                          f"completion token, score -inf), fewer than the budget of {k}.", stacklevel=3)
        return ordering[:k]

    def select(self, scored, budget: int | float | str, strategy: str = "topk", seed: int = 0, **params):
        """The selected rows of ``scored`` as a ``Dataset``, in selection order.

        Args:
            scored: the pool after ``map(selector, batched=True)``.
            budget: a count (int) or a fraction of the pool (float in (0, 1]); see
                :func:`hf_less.selection.strategies.resolve_budget`.
            strategy: a name from :data:`hf_less.selection.strategies.STRATEGIES` (``"topk"`` is LESS's own).
            seed: for seeded strategies.
            params: the strategy's own settings.
        """
        return scored.select(self._selected(scored, budget, strategy, seed, params).tolist())

    def filter_fn(self, scored, budget: int | float | str, strategy: str = "topk", seed: int = 0, **params):
        """A predicate for ``scored.filter(fn, with_indices=True)`` keeping the rows ``select`` keeps.

        The rows come out in pool order (``select`` returns them in selection order).
        """
        return keep_indices(self._selected(scored, budget, strategy, seed, params))


def register_datasets_hash(cls: type, name: str) -> None:
    """Make ``datasets`` fingerprint instances of ``cls`` by their ``fingerprint`` (their identity: model,
    warmup, projection, targets, tokenizer), not by pickling their model.

    Without this, ``map`` would hash the whole model (slow) and could not tell two scorers apart
    only by their state; with it, a map against other targets or another warmup never reuses
    cached scores, and an identical scorer reuses them.
    """
    try:
        from datasets.utils._dill import pklregister
    except ImportError:  # datasets changed its internals: fall back to hashing the whole object
        return

    @pklregister(cls)
    def _save(pickler, obj):
        pickler.save((name, obj.fingerprint))
