"""One writer per store, and a store's files checked when it is opened (issue 23, item 3)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from datasets import Dataset

from hf_less.gradients.store import (
    LOCK_FILE,
    MANIFEST_FILE,
    CorruptStoreError,
    FeatureStore,
    StoreLockedError,
)

from tests.testing_utils import interrupt_store, POOL, SHARD_ROWS, assert_same_store

META = {"representation": "test", "model": "m", "checkpoints": [{"step": 1}], "projection": None, "dim": 4,
        "dtype": "float32", "keyed": True, "rows": 6}


def _shard(seed: int, n: int = 3) -> tuple[dict, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {1: rng.standard_normal((n, 4)).astype(np.float32)}, rng.integers(0, 255, (n, 16), dtype=np.uint8)


def test_a_second_writer_is_refused_and_never_deletes_the_first_ones_files(tmp_path):
    """The old code: a second create() ran recovery over the first writer's in-flight files and deleted them."""
    first = FeatureStore.create(tmp_path / "s", META)
    first.write_shard(*_shard(0))
    in_flight = tmp_path / "s" / "step-1" / ".shard-000001.npy.abc123.tmp"  # the first writer's next shard
    in_flight.write_bytes(b"being written")
    with pytest.raises(StoreLockedError, match=rf"{tmp_path / 's'}.*being written by another process \(pid "
                                               rf"{os.getpid()} on host .*One store has one writer"):
        FeatureStore.create(tmp_path / "s", META)
    assert in_flight.exists()
    in_flight.unlink()
    first.write_shard(*_shard(1))
    first.finish()  # lets go: the lock file is gone, another writer may open the (complete) store
    assert not (tmp_path / "s" / LOCK_FILE).exists()
    again = FeatureStore.create(tmp_path / "s", META)
    assert again.complete and again.num_rows == 6
    again.release()
    with pytest.raises(RuntimeError, match="opened for reading.*FeatureStore.create"):
        FeatureStore(tmp_path / "s").write_shard(*_shard(2))


def test_the_lock_holds_across_processes_and_dies_with_its_holder(tmp_path):
    root = tmp_path / "s"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, json
        from hf_less.gradients.store import FeatureStore
        store = FeatureStore.create({str(root)!r}, json.loads({json.dumps(json.dumps(META))}))
        print("locked", flush=True)
        sys.stdin.readline()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StoreLockedError, match=f"pid {holder.pid} on host"):
            FeatureStore.create(root, META)
    finally:
        holder.kill()  # SIGKILL: the kernel drops the lock, the file stays
        holder.wait()
    assert (root / LOCK_FILE).exists()
    store = FeatureStore.create(root, META)  # resumes
    store.write_shard(*_shard(0))
    store.write_shard(*_shard(1))
    store.finish()
    assert FeatureStore(root).num_rows == 6


def test_featurize_errors_let_go_of_the_store(sel, reference, tmp_path):
    """A featurize that fails (here: another pool than the interrupted one) leaves the store to the next writer."""
    pool = Dataset.from_list(POOL)
    store = sel.featurize(pool, tmp_path / "s", shard_rows=SHARD_ROWS, dtype="float32")
    interrupt_store(store.root, 2)
    with pytest.raises(ValueError, match="row 0 holds another example"):
        sel.featurize(Dataset.from_list(POOL[::-1]), store.root, shard_rows=SHARD_ROWS, dtype="float32")
    assert_same_store(reference, sel.featurize(pool, store.root, shard_rows=SHARD_ROWS, dtype="float32"))


def _complete(root) -> FeatureStore:
    store = FeatureStore.create(root, META)
    store.write_shard(*_shard(0))
    store.write_shard(*_shard(1))
    store.finish()
    return FeatureStore(root)


def test_a_truncated_or_missing_shard_is_found_when_a_complete_store_is_opened(tmp_path):
    store = _complete(tmp_path / "s")
    name = store.manifest["shards"][1]["files"]["1"]["name"]
    data = (store.root / name).read_bytes()
    (store.root / name).write_bytes(data[:-8])
    with pytest.raises(CorruptStoreError, match=rf"{name} has {len(data) - 8} bytes, its manifest says {len(data)}.*"
                                                r"Delete the store and featurize again"):
        FeatureStore(store.root)
    (store.root / name).unlink()
    with pytest.raises(CorruptStoreError, match=f"its file {name} is missing"):
        FeatureStore(store.root)


def test_altered_content_keys_are_found_by_their_checksum(tmp_path):
    store = _complete(tmp_path / "s")
    name = store.manifest["shards"][0]["keys"]["name"]
    keys = np.load(store.root / name)
    keys[0, 0] ^= 0xFF  # another example's key, same size
    np.save(store.root / name, keys)
    with pytest.raises(CorruptStoreError, match=f"content keys {name} .* do not match their checksum"):
        FeatureStore(store.root).keys()


def test_an_old_store_without_sizes_is_checked_by_shape(tmp_path):
    store = _complete(tmp_path / "s")
    manifest = json.loads((store.root / MANIFEST_FILE).read_text())
    for s in manifest["shards"]:
        for f in [*s["files"].values(), s["keys"]]:
            del f["bytes"]
    (store.root / MANIFEST_FILE).write_text(json.dumps(manifest))
    old = FeatureStore(store.root)
    np.testing.assert_array_equal(old.features(1).read(0, 6), store.features(1).read(0, 6))
    name = manifest["shards"][0]["files"]["1"]["name"]
    np.save(store.root / name, np.zeros((2, 4), dtype=np.float32))  # a shard of another size
    with pytest.raises(CorruptStoreError, match=r"holds a \(2, 4\) array; its store's manifest says \(3, 4\)"):
        FeatureStore(store.root).features(1)


@pytest.mark.parametrize("name", ["../../outside.npy", "/etc/passwd", "step-1/../../x.npy", "meta.json"])
def test_a_manifest_naming_a_file_outside_the_store_is_refused(tmp_path, name):
    store = _complete(tmp_path / "s")
    manifest = json.loads((store.root / MANIFEST_FILE).read_text())
    manifest["shards"][0]["files"]["1"]["name"] = name
    (store.root / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(CorruptStoreError, match=f"lists the file {name!r}, which is not a shard of the store"):
        FeatureStore(store.root)
