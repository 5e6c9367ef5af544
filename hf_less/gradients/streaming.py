"""Read a pool a few rows at a time, whatever holds it: a pool larger than memory is never held whole.

``LessSelector.featurize`` and ``LessCallback``'s capture read their pool through
:class:`RowReader`: a ``datasets.Dataset`` (memory-mapped Arrow, read by slices), a
``datasets.IterableDataset`` (``load_dataset(..., streaming=True)``, read batch by batch), a dict
of columns, a list of rows, or any other iterable of row dicts (a generator). Only the rows asked
for, plus at most one batch read ahead, are in memory at a time.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from .featurizer import rows_of

Columns = dict[str, list]


def is_map_style(data: Any) -> bool:
    """A ``datasets.Dataset`` (random access by row; a ``datasets.IterableDataset`` is not)."""
    return hasattr(data, "column_names") and hasattr(data, "select") and hasattr(data, "__len__")


def is_one_shot(data: Any) -> bool:
    """An iterator or generator: it can be read once only (``iter(x) is x``)."""
    try:
        return iter(data) is data
    except TypeError:
        return False


def known_rows(data: Any) -> int | None:
    """The number of rows when the container knows it without reading them, else ``None``."""
    if isinstance(data, Mapping):
        return len(next(iter(data.values()))) if data else 0
    if is_map_style(data) or isinstance(data, Sequence):
        return len(data)
    return None


def expected_rows(data: Any) -> int | None:
    """:func:`known_rows`, else what a streaming dataset's split info says (for a progress bar only:
    a filtered stream yields fewer)."""
    n = known_rows(data)
    if n is not None:
        return n
    splits = getattr(getattr(data, "info", None), "splits", None)
    split = getattr(data, "split", None)
    try:
        return int(splits[str(split)].num_examples) if splits and split is not None else None
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def num_rows(columns: Mapping[str, list]) -> int:
    return len(next(iter(columns.values()))) if columns else 0


def _batches(data: Any, rows: int) -> Iterator[Columns]:
    """Consecutive column batches of ``rows`` rows (the last may be shorter), read lazily."""
    if isinstance(data, (str, bytes)):
        raise TypeError(f"Expected a dataset or an iterable of rows, got {type(data).__name__}.")
    if is_map_style(data):
        for start in range(0, len(data), rows):  # Arrow slices: nothing but these rows is read
            yield data.select(range(start, min(len(data), start + rows))).to_dict()
    elif isinstance(data, Mapping):
        n = known_rows(data)
        for start in range(0, n, rows):
            yield {k: list(v[start : start + rows]) for k, v in data.items()}
    elif hasattr(data, "iter") and hasattr(data, "column_names"):  # datasets.IterableDataset
        for batch in data.iter(batch_size=rows):
            yield {k: list(v) for k, v in batch.items()}
    else:
        try:
            it = iter(data)
        except TypeError:
            raise TypeError(f"Expected a datasets.Dataset or IterableDataset, a dict of columns or an iterable "
                            f"of rows (dicts), got {type(data).__name__}.") from None
        while chunk := list(itertools.islice(it, rows)):
            if not all(isinstance(r, Mapping) for r in chunk):
                bad = next(r for r in chunk if not isinstance(r, Mapping))
                raise TypeError(f"Expected rows as dicts of column -> value, got a {type(bad).__name__}.")
            yield rows_of(chunk)


class RowReader:
    """Hands out a pool's rows in order as dicts of columns, ``take(n)`` rows at a time.

    ``batch_rows`` is how many rows one read from the source fetches; at most that many rows
    beyond those asked for are held.
    """

    def __init__(self, data: Any, batch_rows: int):
        self._source = _batches(data, max(1, int(batch_rows)))
        self._buffer: Columns | None = None
        self._pos = 0
        self.rows_read = 0  # rows handed out so far

    def _fill(self) -> bool:
        """A batch with rows left in the buffer; ``False`` at the end of the pool."""
        while self._buffer is None or self._pos >= num_rows(self._buffer):
            self._buffer, self._pos = next(self._source, None), 0
            if self._buffer is None:
                return False
        return True

    def columns(self) -> list[str] | None:
        """The column names of the next rows (read ahead, not consumed), ``None`` if there are none."""
        return list(self._buffer) if self._fill() else None

    def take(self, n: int) -> Columns:
        """The next ``n`` rows as a dict of columns (fewer at the end of the pool, ``{}`` after it)."""
        parts: list[Columns] = []
        need = n
        while need > 0 and self._fill():
            m = min(need, num_rows(self._buffer) - self._pos)
            parts.append({k: v[self._pos : self._pos + m] for k, v in self._buffer.items()})
            self._pos += m
            need -= m
        if not parts:
            return {}
        out = parts[0] if len(parts) == 1 else {k: [x for p in parts for x in p[k]] for k in parts[0]}
        self.rows_read += num_rows(out)
        return out
