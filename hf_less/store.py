"""On-disk feature store: per checkpoint, row shards of L2-normalised features, memory-mapped.

Layout of a store directory::

    meta.json              what the features are: representation, model, checkpoints, projection, dtype
    manifest.json          the complete shards: rows and sha256 of every file (rewritten atomically)
    step-<N>/shard-<k>.npy (rows_k, d) array for checkpoint step N

A shard is listed in the manifest only after its files are fsynced and renamed into place, so
a store interrupted at any point is read (and resumed) up to its last complete shard. Reading is
lazy: shards are ``np.load(mmap_mode="r")``-ed, so a pool larger than memory works.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .checkpoints import atomic_write_bytes, atomic_write_json

META_FILE = "meta.json"
MANIFEST_FILE = "manifest.json"
STORE_VERSION = 1
# What must agree between pool and target features for their cosines to mean anything.
COMPATIBILITY_KEYS = ("model", "checkpoints", "projection", "dim")


class IncompatibleFeaturesError(ValueError):
    """Two feature sets come from different models, checkpoints or projections."""


def check_compatible(a: dict, b: dict, what: str = "pool and target features") -> None:
    """Raise :class:`IncompatibleFeaturesError` naming every field where ``a`` and ``b`` differ."""
    diffs = [k for k in COMPATIBILITY_KEYS if a.get(k) != b.get(k)]
    if diffs:
        detail = "; ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in diffs)
        raise IncompatibleFeaturesError(
            f"The {what} were computed differently ({detail}). Recompute both with the same model, "
            "warmup checkpoints and projection (kind, dimension, seed)."
        )


class ShardedArray:
    """A read-only ``(rows, d)`` array over memory-mapped shards."""

    def __init__(self, paths: list[Path]):
        self._parts = [np.load(p, mmap_mode="r") for p in paths]
        self._starts = np.cumsum([0] + [len(p) for p in self._parts])
        dim = self._parts[0].shape[1] if self._parts else 0
        self.shape = (int(self._starts[-1]), dim)

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` as an in-memory array."""
        out = []
        for part, s0 in zip(self._parts, self._starts[:-1]):
            a, b = max(start, s0), min(stop, s0 + len(part))
            if a < b:
                out.append(np.asarray(part[a - s0 : b - s0]))
        if not out:
            return np.zeros((0, self.shape[1]), dtype=self._parts[0].dtype if self._parts else np.float32)
        return np.concatenate(out)

    def chunks(self, rows: int = 65536) -> Iterator[tuple[int, np.ndarray]]:
        for start in range(0, len(self), rows):
            yield start, self.read(start, min(len(self), start + rows))


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FeatureStore:
    """A directory of features for one dataset under one warmup (see module docstring)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        meta = self.root / META_FILE
        if not meta.exists():
            raise FileNotFoundError(f"{str(self.root)!r} is not a feature store (no {META_FILE}).")
        self.meta = json.loads(meta.read_text())
        manifest = self.root / MANIFEST_FILE
        self.manifest = json.loads(manifest.read_text()) if manifest.exists() else {"shards": [], "complete": False}

    @classmethod
    def create(cls, root: str | os.PathLike, meta: dict) -> "FeatureStore":
        """Create a store, or reopen one with the same ``meta`` to resume it."""
        root = Path(root)
        meta = {"store_version": STORE_VERSION, **meta}
        if (root / META_FILE).exists():
            existing = json.loads((root / META_FILE).read_text())
            if existing != json.loads(json.dumps(meta)):
                raise IncompatibleFeaturesError(
                    f"{str(root)!r} already holds features computed with other settings; use another "
                    "directory or delete it to recompute.")
            return cls(root)
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(root / META_FILE, meta)
        return cls(root)

    @property
    def steps(self) -> list[int]:
        return [int(c["step"]) for c in self.meta["checkpoints"]]

    @property
    def num_rows(self) -> int:
        return sum(s["rows"] for s in self.manifest["shards"])

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    def write_shard(self, per_step: dict[int, np.ndarray]) -> None:
        """Append one shard: ``{step: (rows, d) array}`` for every checkpoint of the store."""
        if set(per_step) != set(self.steps):
            raise ValueError(f"A shard needs features for steps {self.steps}, got {sorted(per_step)}.")
        rows = {len(a) for a in per_step.values()}
        if len(rows) != 1:
            raise ValueError("Every checkpoint's features in a shard must have the same number of rows.")
        k = len(self.manifest["shards"])
        dtype = np.dtype(self.meta["dtype"])
        files = {}
        for step, arr in per_step.items():
            if arr.ndim != 2 or arr.shape[1] != self.meta["dim"]:
                raise ValueError(f"Expected (rows, {self.meta['dim']}) features, got {arr.shape}.")
            buf = io.BytesIO()
            np.save(buf, np.ascontiguousarray(arr, dtype=dtype))
            data = buf.getvalue()
            name = f"step-{step}/shard-{k:06d}.npy"
            (self.root / name).parent.mkdir(exist_ok=True)
            atomic_write_bytes(self.root / name, data)
            files[str(step)] = {"name": name, "sha256": _digest(data)}
        self.manifest["shards"].append({"rows": rows.pop(), "files": files})
        atomic_write_json(self.root / MANIFEST_FILE, self.manifest)

    def finish(self) -> None:
        """Mark the store complete (every row written)."""
        self.manifest["complete"] = True
        atomic_write_json(self.root / MANIFEST_FILE, self.manifest)

    def features(self, step: int) -> ShardedArray:
        """The ``(rows, d)`` features of checkpoint ``step``, memory-mapped."""
        if step not in self.steps:
            raise KeyError(f"No features for checkpoint step {step}; the store has {self.steps}.")
        return ShardedArray([self.root / s["files"][str(step)]["name"] for s in self.manifest["shards"]])

    def verify(self) -> None:
        """Check every shard against its recorded checksum."""
        for s in self.manifest["shards"]:
            for f in s["files"].values():
                if _digest((self.root / f["name"]).read_bytes()) != f["sha256"]:
                    raise IOError(f"Shard {f['name']} in {str(self.root)!r} is corrupt (checksum mismatch).")
