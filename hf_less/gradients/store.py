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

A store has one writer at a time: :meth:`FeatureStore.create` takes an exclusive lock
(``fcntl.flock`` on ``.writer.lock`` in the store, which names its holder) and keeps it until
:meth:`FeatureStore.finish` or :meth:`FeatureStore.release`; a second writer is refused with the
store and the holder named, so it never runs the recovery above over another writer's in-flight
files. The kernel drops the lock of a killed process, so a crash never leaves a store locked.
Opening a complete store checks every listed file against the manifest (present, inside the
store, of the recorded size); reading the content keys checks their checksums (16 bytes a row).

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
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; one writer per store is then the user's to ensure
    fcntl = None

from ..utils import distributed
from ..utils.io import atomic_write_bytes, atomic_write_json, file_sha256, npy_bytes
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
LOCK_FILE = ".writer.lock"
_SHARD_RE = re.compile(r"^shard-\d+\.npy$")
# Every file a manifest may list: a read never leaves the store's directory.
_LISTED_RE = re.compile(r"(step-\d+|keys)/shard-\d+\.npy")
# The row layout of each quantized format (meta["quantization"]; see hf_less.gradients.quantize):
# part of the store's identity, so a reader or a resume never mixes layouts.
QUANTIZATION = {"int8": "row-absmax-int8+f32scale/v1", "int4": "row-absmax-int4x2+f32scale/v1",
                "1bit": "sign-bits-lsb-first/v1"}


class IncompatibleFeaturesError(ValueError):
    """Two feature sets come from different models, checkpoints or projections."""


class StoreLockedError(RuntimeError):
    """Another writer holds the store (a second featurization or capture into the same directory)."""


class CorruptStoreError(IOError):
    """A store's files do not match its manifest (truncated, missing, altered, or outside the store)."""


class _WriterLock:
    """An exclusive ``flock`` on ``root/.writer.lock``, holding the writer's pid, host and start time."""

    def __init__(self, root: Path):
        self.path = root / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> None:
        if fcntl is None:
            return
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                raise StoreLockedError(
                    f"The feature store {str(self.path.parent)!r} is being written by another process "
                    f"({self.holder()}). One store has one writer: wait for that one to finish (this call then "
                    "resumes or reuses its work), stop it, or write to another directory.") from None
            # The previous holder removes the file as it lets go: a lock on a file no longer at the path is no lock.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, info, 0)
        self.fd = fd

    def holder(self) -> str:
        """Who holds the lock, in words, as the holder wrote it."""
        try:
            info = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            info = {}
        if not info:
            return "holder unknown"
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("since", 0)))
        return f"pid {info.get('pid')} on host {info.get('host')}, since {since}"

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink()  # under the lock: the next writer finds no file, or a new one
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None

    def __del__(self):
        try:
            self.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


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
    ``rows``: each shard's row count as its manifest records it (checked: a damaged store is refused).
    """

    def __init__(self, paths: list[Path], fmt: str | None = None, dim: int | None = None,
                 rows: list[int] | None = None):
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
        for path, part, n in zip(self.paths, self._parts, rows or []):  # the format's width checked above
            if len(part) != n:
                raise CorruptStoreError(f"{str(path)!r} holds a {part.shape} array; its store's manifest says "
                                        f"{(n, part.shape[1])}. The store is damaged: delete it and featurize again.")
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
        dtype = self._parts[0].dtype if self._parts else np.float32
        shape = self._parts[0].shape[1:] if self._parts else (self.dim,)
        start = max(0, start)
        stop = max(start, min(stop, len(self)))
        out = np.empty((stop - start, *shape), dtype=dtype)  # each shard's rows read straight into place
        for part, path, s0 in zip(self._parts, self.paths, self._starts[:-1]):
            a, b = max(start, s0), min(stop, s0 + len(part))
            if a < b:
                view, got = memoryview(out[a - start : b - start]).cast("B"), 0
                with open(path, "rb", buffering=0) as f:
                    f.seek(part.offset + (a - s0) * (view.nbytes // (b - a)))
                    while got < view.nbytes:
                        n = f.readinto(view[got:])
                        if not n:
                            raise IOError(f"{path} ended early: the store is damaged (run verify()).")
                        got += n
        return out

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
        self._lock: _WriterLock | None = None
        for f in self._listed():
            if not isinstance(f.get("name"), str) or not _LISTED_RE.fullmatch(f["name"]):
                raise CorruptStoreError(
                    f"The manifest of {str(self.root)!r} lists the file {f.get('name')!r}, which is not a shard of "
                    "the store (a store lists step-N/shard-K.npy and keys/shard-K.npy only): it was altered. "
                    "Delete the store and featurize again.")
        if self.complete:
            self._check_sizes()

    def _listed(self) -> list[dict]:
        """Every file entry of the manifest (features and keys of every shard)."""
        return [f for s in self.manifest["shards"] for f in [*s["files"].values(), *([s["keys"]] if "keys" in s else [])]]

    def _check_sizes(self) -> None:
        """Every listed file present, with the size the manifest records (stores written before sizes
        were recorded: present). Cheap: one ``stat`` per file."""
        for f in self._listed():
            path = self.root / f["name"]
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                raise CorruptStoreError(f"The feature store {str(self.root)!r} is complete but its file "
                                        f"{f['name']} is missing. Delete the store and featurize again.") from None
            if "bytes" in f and size != f["bytes"]:
                raise CorruptStoreError(
                    f"The feature store {str(self.root)!r} is damaged: {f['name']} has {size} bytes, its manifest "
                    f"says {f['bytes']} (truncated or overwritten). Delete the store and featurize again.")

    @classmethod
    def create(cls, root: str | os.PathLike, meta: dict) -> "FeatureStore":
        """Create a store, or reopen one with the same ``meta`` to resume it.

        A reopened incomplete store is first made consistent (see the module docstring), so
        writing continues after its last complete, checksum-verified shard.

        The store returned holds the writer's lock (see the module docstring) until :meth:`finish`
        or :meth:`release`; a store another process is writing raises :class:`StoreLockedError`.
        """
        root = Path(root)
        meta = {"store_version": STORE_VERSION, **meta}
        meta["dtype"] = check_format(meta.get("dtype", "float16"))  # an unknown format fails before any write
        if meta["dtype"] in QUANTIZED_FORMATS:
            meta["quantization"] = QUANTIZATION[meta["dtype"]]
        created = not root.exists()
        root.mkdir(parents=True, exist_ok=True)
        lock = _WriterLock(root)
        try:
            lock.acquire()
        except BaseException:
            if created and not any(root.iterdir()):
                root.rmdir()
            raise
        try:
            if (root / META_FILE).exists():
                existing = json.loads((root / META_FILE).read_text())
                wanted = json.loads(json.dumps(meta))
                diffs = sorted(k for k in set(existing) | set(wanted)
                               if k not in INFORMATIONAL_META and existing.get(k) != wanted.get(k)
                               and not (k in FILLED_AT_FINISH and None in (existing.get(k), wanted.get(k))))
                if diffs:
                    fix = "Use another directory, or delete this one to recompute."
                    if "dtype" in diffs:  # one store holds one format
                        fix = (f"It is a {existing.get('dtype')} store and this run writes {wanted.get('dtype')}: "
                               f"resume with dtype={existing.get('dtype')!r}, use another directory, or delete this "
                               "one to recompute.")
                    raise IncompatibleFeaturesError(
                        f"{str(root)!r} already holds features computed with other settings (they differ in "
                        f"{', '.join(diffs)}). {fix}")
                store = cls(root)
                store._lock = lock
                if not store.complete:
                    store._recover()
                return store
            _disk_full_hint(atomic_write_json, root / META_FILE, meta, where=f"creating the store {str(root)!r}")
            store = cls(root)
            store._lock = lock
            return store
        except BaseException:
            lock.release()
            if created and root.exists() and not any(root.iterdir()):
                root.rmdir()  # leave nothing behind
            raise

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
        data = npy_bytes(arr)
        (self.root / name).parent.mkdir(exist_ok=True)
        atomic_write_bytes(self.root / name, data)
        return {"name": name, "sha256": _digest(data), "bytes": len(data)}

    def write_shard(self, per_step: dict[int, np.ndarray], keys: np.ndarray | None = None,
                    skipped: list[int] | None = None) -> None:
        """Append one shard: ``{step: (rows, d) array}`` for every checkpoint of the store.

        A keyed store (``meta["keyed"]``) also takes the rows' ``(rows, 16)`` uint8 content keys.
        ``skipped`` lists the shard's rows that have no features (their rows hold zeros).
        A full disk raises ``OSError(ENOSPC)`` naming the fix; the store stays consistent.
        """
        self._check_writer()
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
        store always has its row count. Releases the writer's lock.
        """
        self._check_writer()
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
        self.release()

    def _check_writer(self) -> None:
        if self._lock is None or (fcntl is not None and self._lock.fd is None):
            raise RuntimeError(f"This FeatureStore of {str(self.root)!r} was opened for reading (or has finished): "
                               "open it with FeatureStore.create(root, meta) to write.")

    def release(self) -> None:
        """Let go of the writer's lock without changing the store (a writer that stops before :meth:`finish`)."""
        if self._lock is not None:
            self._lock.release()

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
        shards = self.manifest["shards"]
        return ShardedArray([self.root / s["files"][str(step)]["name"] for s in shards], fmt=self.format,
                            dim=self.meta.get("dim"), rows=[s["rows"] for s in shards])

    def keys(self) -> np.ndarray:
        """``(rows, 16)`` uint8 content keys of a keyed store, in row order."""
        if not self.keyed:
            raise ValueError(f"The feature store {str(self.root)!r} has no content keys.")
        parts = []
        for s in self.manifest["shards"]:
            data = (self.root / s["keys"]["name"]).read_bytes()
            if _digest(data) != s["keys"]["sha256"]:
                raise CorruptStoreError(
                    f"The content keys {s['keys']['name']} of {str(self.root)!r} do not match their checksum (the "
                    "file was altered or overwritten): its rows cannot be trusted. Delete the store and featurize "
                    "again.")
            part = np.load(io.BytesIO(data))
            if part.shape != (s["rows"], 16):
                raise CorruptStoreError(f"The content keys {s['keys']['name']} of {str(self.root)!r} hold "
                                        f"{part.shape}, not ({s['rows']}, 16). Delete the store and featurize again.")
            parts.append(part)
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

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abandon()

    def abandon(self) -> None:
        """Close the bar and let go of the store without marking it complete (main process)."""
        self.bar.close()
        if self.main and self.store is not None:
            self.store.release()

    def close(self) -> None:
        """Close the bar and mark the store complete (main process)."""
        self.bar.close()
        if self.main:
            self.store.finish()
