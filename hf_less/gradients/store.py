"""On-disk feature store: per checkpoint, row shards of L2-normalised features, memory-mapped.

Layout of a store directory::

    meta.json              what the features are: representation, model, checkpoints, projection, dtype
                           (the row format: float32, float16, int8, int4 or 1bit; see
                           :mod:`hf_less.gradients.quantize`), rows (null while a streamed pool's
                           length is unknown; set by finish())
    manifest.json          the complete shards: rows and sha256 of every file (rewritten atomically)
    step-<N>/shard-<k>.npy (rows_k, d) float array for checkpoint step N, or for a quantized format
                           (rows_k, row_bytes) uint8 packed rows (codes, then the row's scale)
    keys/shard-<k>.npy     (rows_k, 16) uint8 content keys of the rows (when meta["keyed"])

A shard is listed in the manifest only after its files are fsynced and renamed into place, so
a store interrupted at any point (SIGKILL, power loss, a full disk) is read (and resumed) up to
its last complete shard. Reopening an incomplete store to resume it (:meth:`FeatureStore.create`)
also checks every listed shard against its checksum (a bad one and those after it are
recomputed) and deletes what no manifest lists: leftover ``.*.tmp`` files and shard files
renamed into place before the crash but never recorded. Reading is lazy: shards are
``np.load(mmap_mode="r")``-ed, so a pool larger than memory works.

Formats: features are packed into the store's format as they are written (by
``LessSelector.featurize`` and by ``LessCallback``'s capture alike); one store holds one format.
:meth:`ShardedArray.read` and :meth:`ShardedArray.take` return decoded (dequantized) rows,
:meth:`ShardedArray.read_raw` the stored (packed) rows that scoring unpacks, read with plain file
reads (memory bounded by the chunk, not by the store).

Rows a featurization skipped (no completion token, ``on_empty_completion="skip"``) keep their
place with zero features and are listed in their shard's ``"skipped"`` (row offsets in the shard).
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..utils import distributed
from ..utils.io import atomic_write_bytes, atomic_write_json, file_sha256
from .featurizer import content_keys
from .quantize import QUANTIZED_FORMATS, check_format, decode, encode, row_bytes, storage_dtype

logger = logging.getLogger(__name__)

META_FILE = "meta.json"
MANIFEST_FILE = "manifest.json"
STORE_VERSION = 1
# What must agree between pool and target features for their cosines to mean anything.
COMPATIBILITY_KEYS = ("model", "checkpoints", "projection", "dim", "pool_direction")
# Recorded in meta.json but not required to match on resume (a dataset's fingerprint may be random
# in a new process: resumed rows are matched by their content keys instead).
INFORMATIONAL_META = ("fingerprint",)
# Known only once every row is written when the pool is a stream: ``None`` until :meth:`FeatureStore.finish`
# fills it, and ``None`` on either side matches any value on resume (rows are checked by content key).
FILLED_AT_FINISH = ("rows",)
_SHARD_RE = re.compile(r"^shard-\d+\.npy$")
# The row layout of each quantized format (meta["quantization"]; see hf_less.gradients.quantize):
# part of the store's identity, so a reader or a resume never mixes layouts.
QUANTIZATION = {"int8": "row-absmax-int8+f32scale/v1", "int4": "row-absmax-int4x2+f32scale/v1",
                "1bit": "sign-bits-lsb-first/v1"}


class IncompatibleFeaturesError(ValueError):
    """Two feature sets come from different models, checkpoints or projections."""


def check_compatible(a: dict, b: dict, what: str = "pool and target features",
                     keys: tuple[str, ...] = COMPATIBILITY_KEYS,
                     fix: str = "Recompute both with the same model, warmup checkpoints and projection "
                                "(kind, dimension, seed).") -> None:
    """Raise :class:`IncompatibleFeaturesError` naming every field where ``a`` and ``b`` differ."""
    diffs = [k for k in keys if a.get(k) != b.get(k)]
    pa, pb = a.get("projection") or {}, b.get("projection") or {}
    if "projection" in diffs and pa.get("kind") == pb.get("kind") and pa.get("version") != pb.get("version"):
        # Same settings, another generator: no choice of arguments reproduces the old matrix.
        fix = (f"The {pa.get('kind')!r} projection's generator changed between hf-less versions "
               f"(version {pa.get('version')} vs {pb.get('version')}): features from the older one cannot be "
               "compared with new ones. Recompute them: delete the old store (or use another directory) and "
               "featurize again.")
    if diffs:
        detail = "; ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in diffs)
        raise IncompatibleFeaturesError(f"The {what} were computed differently ({detail}). {fix}")


class ShardedArray:
    """A read-only ``(rows, d)`` array of features over memory-mapped shards in one store format.

    ``fmt`` is the store format (:mod:`hf_less.gradients.quantize`); ``None`` reads the shards'
    arrays as they are. ``dim`` is ``d`` (needed for packed formats, whose rows are bytes).
    """

    def __init__(self, paths: list[Path], fmt: str | None = None, dim: int | None = None):
        self.paths = list(paths)
        self._parts = [np.load(p, mmap_mode="r") for p in self.paths]
        self._starts = np.cumsum([0] + [len(p) for p in self._parts])
        self.format = None if fmt is None else check_format(fmt)
        width = self._parts[0].shape[1] if self._parts else 0
        self.dim = int(dim) if dim is not None else width
        for part, path in zip(self._parts, self.paths):
            if fmt is not None and (part.dtype != storage_dtype(self.format)
                                    or part.shape[1] * part.itemsize != row_bytes(self.format, self.dim)):
                raise ValueError(f"Shard {path} holds {part.dtype} rows of {part.shape[1] * part.itemsize} bytes; "
                                 f"a {self.format} store of d={self.dim} has {storage_dtype(self.format)} rows of "
                                 f"{row_bytes(self.format, self.dim)}: the store is damaged.")
        self.shape = (int(self._starts[-1]), self.dim)

    def __len__(self) -> int:
        return self.shape[0]

    def _decode(self, raw: np.ndarray) -> np.ndarray:
        return raw if self.format is None else decode(raw, self.format, self.dim)

    def read_raw(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` as stored (packed for quantized formats), read with plain file reads.

        Unlike slicing the memory map, the file pages read do not stay mapped in this process:
        its memory is the returned array's, however large the store.
        """
        out = []
        for part, path, s0 in zip(self._parts, self.paths, self._starts[:-1]):
            a, b = max(start, s0), min(stop, s0 + len(part))
            if a < b:
                buf = np.empty((b - a, *part.shape[1:]), dtype=part.dtype)
                with open(path, "rb", buffering=0) as f:
                    f.seek(part.offset + (a - s0) * buf[:1].nbytes)
                    view, got = memoryview(buf).cast("B"), 0
                    while got < buf.nbytes:
                        n = f.readinto(view[got:])
                        if not n:
                            raise IOError(f"{path} ended early: the store is damaged (run verify()).")
                        got += n
                out.append(buf)
        if not out:
            shape = (0, *self._parts[0].shape[1:]) if self._parts else (0, self.dim)
            return np.zeros(shape, dtype=self._parts[0].dtype if self._parts else np.float32)
        return out[0] if len(out) == 1 else np.concatenate(out)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` as an in-memory ``(n, d)`` array (quantized formats: dequantized float32)."""
        return self._decode(self.read_raw(start, stop))

    def take(self, rows: np.ndarray | list[int]) -> np.ndarray:
        """The given rows (any order, repeats allowed) as an in-memory ``(n, d)`` array (decoded)."""
        rows = np.asarray(rows, dtype=np.int64)
        dtype = self._parts[0].dtype if self._parts else np.float32
        out = np.empty((len(rows), *(self._parts[0].shape[1:] if self._parts else (self.dim,))), dtype=dtype)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"Rows out of range for a store of {len(self)} rows.")
        part_of = np.searchsorted(self._starts, rows, side="right") - 1
        for p in np.unique(part_of):
            sel = part_of == p
            out[sel] = self._parts[p][rows[sel] - self._starts[p]]
        return self._decode(out)

    def chunks(self, rows: int = 65536) -> Iterator[tuple[int, np.ndarray]]:
        for start in range(0, len(self), rows):
            yield start, self.read(start, min(len(self), start + rows))


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()




def _disk_full_hint(write, *args, where: str, store: "FeatureStore | None" = None, **kwargs):
    """Call ``write``; a full disk becomes an ``OSError(ENOSPC)`` that says what is kept and what to do."""
    try:
        return write(*args, **kwargs)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        kept = "" if store is None else (f" The store keeps its {store.num_rows} rows in complete shards; "
                                          "nothing half-written is listed.")
        raise OSError(e.errno, f"No space left on the device while {where}.{kept} Free some space (or "
                               "choose another directory) and run the same call again: it resumes from the "
                               "last complete shard.") from e


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
        """Create a store, or reopen one with the same ``meta`` to resume it.

        A reopened incomplete store is first made consistent (see the module docstring), so
        writing continues after its last complete, checksum-verified shard.
        """
        root = Path(root)
        meta = {"store_version": STORE_VERSION, **meta}
        meta["dtype"] = check_format(meta.get("dtype", "float16"))  # an unknown format fails before any write
        if meta["dtype"] in QUANTIZED_FORMATS:
            meta["quantization"] = QUANTIZATION[meta["dtype"]]
        if (root / META_FILE).exists():
            existing = json.loads((root / META_FILE).read_text())
            wanted = json.loads(json.dumps(meta))
            diffs = sorted(k for k in set(existing) | set(wanted)
                           if k not in INFORMATIONAL_META and existing.get(k) != wanted.get(k)
                           and not (k in FILLED_AT_FINISH and None in (existing.get(k), wanted.get(k))))
            if diffs:
                fix = "Use another directory, or delete this one to recompute."
                if "dtype" in diffs:  # one store holds one format
                    fix = (f"It is a {existing.get('dtype')} store and this run writes {wanted.get('dtype')}: resume "
                           f"with dtype={existing.get('dtype')!r}, use another directory, or delete this one to "
                           "recompute.")
                raise IncompatibleFeaturesError(
                    f"{str(root)!r} already holds features computed with other settings (they differ in "
                    f"{', '.join(diffs)}). {fix}")
            store = cls(root)
            if not store.complete:
                store._recover()
            return store
        created = not root.exists()
        root.mkdir(parents=True, exist_ok=True)
        try:
            _disk_full_hint(atomic_write_json, root / META_FILE, meta, where=f"creating the store {str(root)!r}")
        except BaseException:
            if created and not any(root.iterdir()):
                root.rmdir()  # leave nothing behind
            raise
        return cls(root)

    def _recover(self) -> None:
        """Keep the manifest's shards up to the first missing or corrupt one; delete unlisted files."""
        good = []
        for i, s in enumerate(self.manifest["shards"]):
            files = [*s["files"].values(), *([s["keys"]] if "keys" in s else [])]
            bad = [f["name"] for f in files
                   if not (self.root / f["name"]).is_file() or file_sha256(self.root / f["name"]) != f["sha256"]]
            if bad:
                logger.warning("Feature store %s: shard %d (%s) is missing or corrupt; it and the %d after it "
                               "will be recomputed.", self.root, i, bad[0], len(self.manifest["shards"]) - i - 1)
                break
            good.append(s)
        if len(good) != len(self.manifest["shards"]):
            self.manifest["shards"] = good
            atomic_write_json(self.root / MANIFEST_FILE, self.manifest)
        listed = {f["name"] for s in good for f in [*s["files"].values(), *([s["keys"]] if "keys" in s else [])]}
        for path in sorted(self.root.rglob("*")):
            if not path.is_file():
                continue
            name = path.relative_to(self.root).as_posix()
            stray_tmp = path.name.startswith(".") and path.name.endswith(".tmp")
            unlisted_shard = path.parent != self.root and _SHARD_RE.match(path.name) and name not in listed
            if stray_tmp or unlisted_shard:
                logger.info("Feature store %s: removing %s left by an interrupted run.", self.root, name)
                path.unlink()

    @property
    def steps(self) -> list[int]:
        return [int(c["step"]) for c in self.meta["checkpoints"]]

    @property
    def num_rows(self) -> int:
        return sum(s["rows"] for s in self.manifest["shards"])

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    @property
    def format(self) -> str:
        """The row format (``meta["dtype"]``): float32, float16, int8, int4 or 1bit."""
        return check_format(self.meta.get("dtype", "float16"))

    @property
    def keyed(self) -> bool:
        return bool(self.meta.get("keyed"))

    def _save(self, name: str, arr: np.ndarray) -> dict:
        buf = io.BytesIO()
        np.save(buf, arr)
        data = buf.getvalue()
        (self.root / name).parent.mkdir(exist_ok=True)
        atomic_write_bytes(self.root / name, data)
        return {"name": name, "sha256": _digest(data)}

    def write_shard(self, per_step: dict[int, np.ndarray], keys: np.ndarray | None = None,
                    skipped: list[int] | None = None) -> None:
        """Append one shard: ``{step: (rows, d) array}`` for every checkpoint of the store.

        A keyed store (``meta["keyed"]``) also takes the rows' ``(rows, 16)`` uint8 content keys.
        ``skipped`` lists the shard's rows that have no features (their rows hold zeros).
        A full disk raises ``OSError(ENOSPC)`` naming the fix; the store stays consistent.
        """
        if self.keyed != (keys is not None):
            raise ValueError("A keyed store needs the rows' content keys with every shard, and only a keyed one.")
        if set(per_step) != set(self.steps):
            raise ValueError(f"A shard needs features for steps {self.steps}, got {sorted(per_step)}.")
        rows = {len(a) for a in per_step.values()}
        if len(rows) != 1:
            raise ValueError("Every checkpoint's features in a shard must have the same number of rows.")
        k = len(self.manifest["shards"])
        fmt = self.format
        n = rows.pop()
        for arr in per_step.values():
            if arr.ndim != 2 or arr.shape[1] != self.meta["dim"]:
                raise ValueError(f"Expected (rows, {self.meta['dim']}) features, got {arr.shape}.")
        if keys is not None:
            keys = np.ascontiguousarray(keys, dtype=np.uint8)
            if keys.shape != (n, 16):
                raise ValueError(f"Expected ({n}, 16) uint8 content keys, got {keys.shape}.")
        skipped = sorted(int(j) for j in (skipped or []))
        if skipped and not 0 <= skipped[0] <= skipped[-1] < n:
            raise ValueError(f"Skipped rows {skipped} are outside the shard's {n} rows.")
        where = f"writing shard {k} of {str(self.root)!r}"
        files = {}
        for step, arr in per_step.items():
            files[str(step)] = _disk_full_hint(self._save, f"step-{step}/shard-{k:06d}.npy", encode(arr, fmt),
                                               where=where, store=self)
        shard = {"rows": n, "files": files}
        if keys is not None:
            shard["keys"] = _disk_full_hint(self._save, f"keys/shard-{k:06d}.npy", keys, where=where, store=self)
        if skipped:
            shard["skipped"] = skipped
        # The shard exists once the manifest lists it: written last, atomically.
        manifest = {**self.manifest, "shards": [*self.manifest["shards"], shard]}
        _disk_full_hint(atomic_write_json, self.root / MANIFEST_FILE, manifest, where=where, store=self)
        self.manifest = manifest

    def finish(self) -> None:
        """Mark the store complete (every row written); fills ``meta["rows"]`` when it was unknown (a stream).

        ``meta.json`` is rewritten (atomically) before the manifest says complete, so a complete
        store always has its row count.
        """
        rows = self.meta.get("rows")
        if rows is None:
            meta = {**self.meta, "rows": self.num_rows}
            _disk_full_hint(atomic_write_json, self.root / META_FILE, meta,
                            where=f"finishing {str(self.root)!r}", store=self)
            self.meta = meta
        elif rows != self.num_rows:
            raise ValueError(f"The feature store {str(self.root)!r} holds {self.num_rows} rows, its pool "
                             f"has {rows}: it cannot be finished.")
        manifest = {**self.manifest, "complete": True}
        _disk_full_hint(atomic_write_json, self.root / MANIFEST_FILE, manifest,
                        where=f"finishing {str(self.root)!r}", store=self)
        self.manifest = manifest

    def skipped_rows(self) -> np.ndarray:
        """Store rows without features (skipped examples), ascending."""
        out, start = [], 0
        for s in self.manifest["shards"]:
            out.extend(start + j for j in s.get("skipped", []))
            start += s["rows"]
        return np.asarray(out, dtype=np.int64)

    def features(self, step: int) -> ShardedArray:
        """The ``(rows, d)`` features of checkpoint ``step``, memory-mapped, decoded from the store's format."""
        if step not in self.steps:
            raise KeyError(f"No features for checkpoint step {step}; the store has {self.steps}.")
        return ShardedArray([self.root / s["files"][str(step)]["name"] for s in self.manifest["shards"]],
                            fmt=self.format, dim=self.meta.get("dim"))

    def keys(self) -> np.ndarray:
        """``(rows, 16)`` uint8 content keys of a keyed store, in row order."""
        if not self.keyed:
            raise ValueError(f"The feature store {str(self.root)!r} has no content keys.")
        parts = [np.load(self.root / s["keys"]["name"]) for s in self.manifest["shards"]]
        return np.concatenate(parts) if parts else np.zeros((0, 16), dtype=np.uint8)

    def key_index(self) -> dict[bytes, int]:
        """Content key -> row (the first row with that content)."""
        index: dict[bytes, int] = {}
        for row, key in enumerate(self.keys()):
            index.setdefault(key.tobytes(), row)
        return index

    def verify(self) -> None:
        """Check every shard against its recorded checksum."""
        for s in self.manifest["shards"]:
            for f in [*s["files"].values(), *([s["keys"]] if "keys" in s else [])]:
                if file_sha256(self.root / f["name"]) != f["sha256"]:
                    raise IOError(f"Shard {f['name']} in {str(self.root)!r} is corrupt (checksum mismatch).")


class StoreWriter:
    """The one shard-writing loop of a keyed store, for the capture and for ``LessSelector.featurize``.

    Every process computes the features of the same shards (the featurizer shares each shard's
    work out across processes); the main process alone creates or resumes the store (``create``)
    and writes. ``done`` (rows already stored by an interrupted run, where to resume) and ``rows``
    (the store's row count, None for a stream) are the same on every process. The progress bar
    starts at ``done`` and counts ``rows`` rows (``unknown_total`` when the store does not know them).

    >>> writer = StoreWriter(lambda: FeatureStore.create(root, meta), "pool features", show_progress=True)
    >>> for encoded, per_step in shards_after(writer.done):
    ...     writer.write(per_step, encoded)
    >>> writer.close()          # the store marked complete; callers add their own barrier
    """

    def __init__(self, create, desc: str, show_progress: bool = True, unknown_total: int | None = None):
        self.main = distributed.is_main_process()
        self.store: FeatureStore | None = None

        def open_store() -> tuple[int, int | None]:
            self.store = create()
            return self.store.num_rows, self.store.meta.get("rows")

        self.done, self.rows = distributed.on_main(open_store)
        self.written = self.done
        self.bar = tqdm(total=self.rows if self.rows is not None else unknown_total, initial=self.done, unit="ex", desc=desc,
                        disable=not (show_progress and self.main))

    def write(self, per_step: dict[int, np.ndarray], encoded, skipped: list[int] | None = None,
              rows_read: int | None = None) -> None:
        """Append the shard of ``encoded`` examples (their content keys go with it; see :meth:`FeatureStore.write_shard`).

        ``rows_read``: the dataset rows the shard stands for (default ``len(encoded)``); the bar is
        set to the rows written so far, whatever the featurizer advanced it by meanwhile.
        """
        if self.main:
            self.store.write_shard(per_step, content_keys(encoded), skipped=skipped)
        self.written += len(encoded) if rows_read is None else rows_read
        self.bar.update(self.written - self.bar.n)

    def close(self) -> None:
        """Close the bar and mark the store complete (main process)."""
        self.bar.close()
        if self.main:
            self.store.finish()
