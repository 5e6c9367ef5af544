"""A selection record on disk: which pool rows were chosen, how, and from which warmup.

``LessSFTTrainer`` and ``hf-less select`` write one so that a run can be audited and reused::

    less_selection.json   indices (selection order), their scores, strategy, budget, k, seed,
                          pool size, the warmup checkpoints used (step, weight, digest), the
                          representation and projection, and any free-form ``extra``
    less_scores.npy       the score of every pool row (float32, pool order), when known
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..utils.io import atomic_save_npy, atomic_write_json

SELECTION_FILE = "less_selection.json"
SCORES_FILE = "less_scores.npy"
SELECTION_VERSION = 1


@dataclass
class Selection:
    """What was selected. ``indices`` index the pool, best first; ``scores[j]`` is ``indices[j]``'s."""

    indices: list[int]
    strategy: str
    budget: int | float
    pool_size: int
    seed: int = 0
    scores: list[float] | None = None
    checkpoints: list[dict] = field(default_factory=list)
    representation: str = "less"
    projection: dict | None = None
    extra: dict = field(default_factory=dict)

    @property
    def k(self) -> int:
        return len(self.indices)

    def to_dict(self) -> dict:
        return {"version": SELECTION_VERSION, "k": self.k, **asdict(self)}


def save_selection(directory: str | os.PathLike, selection: Selection,
                   pool_scores: np.ndarray | None = None) -> Path:
    """Write ``less_selection.json`` (and ``less_scores.npy``) into ``directory``, atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if pool_scores is not None:
        pool_scores = np.asarray(pool_scores, dtype=np.float32)
        if pool_scores.shape != (selection.pool_size,):
            raise ValueError(f"pool_scores has shape {pool_scores.shape}, the pool has {selection.pool_size} rows.")
        atomic_save_npy(directory / SCORES_FILE, pool_scores)
    path = directory / SELECTION_FILE
    atomic_write_json(path, selection.to_dict())
    return path


def load_selection(path: str | os.PathLike) -> Selection:
    """Read a selection from ``less_selection.json`` or the directory holding it."""
    path = Path(path)
    if path.is_dir():
        path = path / SELECTION_FILE
    if not path.exists():
        raise FileNotFoundError(f"No selection at {str(path)!r}; write one with LessSFTTrainer or `hf-less select`.")
    data = json.loads(path.read_text())
    if data.pop("version", None) != SELECTION_VERSION:
        raise ValueError(f"{str(path)!r} is not a version-{SELECTION_VERSION} selection file.")
    data.pop("k", None)
    return Selection(**data)


def load_pool_scores(directory: str | os.PathLike) -> np.ndarray | None:
    """The per-row pool scores saved beside a selection, or ``None``."""
    path = Path(directory) / SCORES_FILE
    return np.load(path) if path.exists() else None
