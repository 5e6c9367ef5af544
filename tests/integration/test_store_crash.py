"""A featurization killed with SIGKILL, or stopped by a full disk, resumes to the same store byte for byte.

The SIGKILL test runs the featurization in a child process (scripts/featurize_child.py).
"""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from datasets import Dataset

from hf_less.gradients.store import MANIFEST_FILE, FeatureStore

from tests.testing_utils import POOL, SCRIPTS, SHARD_ROWS, STEPS, assert_same_store

pytestmark = pytest.mark.integration


def child(work, *stores, slow=0.0):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": str(Path(__file__).parents[2])}
    cmd = [sys.executable, str(SCRIPTS / "featurize_child.py"), str(work), *map(str, stores), "--slow", str(slow)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_mid_featurize_then_resume_is_byte_identical(work, tmp_path):
    killed, ref = tmp_path / "killed", tmp_path / "ref"
    proc = child(work, killed, slow=0.4)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:  # wait for the first complete shard
        manifest = killed / MANIFEST_FILE
        if manifest.exists() and json.loads(manifest.read_text())["shards"]:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"the child ended before it could be killed: {proc.communicate()[1][-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    partial = FeatureStore(killed)  # read as far as it is complete, and no further
    assert not partial.complete and 1 <= len(partial.manifest["shards"]) < len(POOL) // SHARD_ROWS
    partial.verify()
    first = killed / partial.manifest["shards"][0]["files"][str(STEPS[0])]["name"]
    before = os.stat(first)

    # the same arguments again (after an uninterrupted run in the same process, for reference)
    proc = child(work, ref, killed)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert_same_store(FeatureStore(ref), FeatureStore(killed))
    after = os.stat(first)  # complete shards were kept, not recomputed
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


@pytest.mark.parametrize("fail_at", [1, 3, 5, 10, 19])
def test_disk_full_mid_run_leaves_a_consistent_store_that_resumes(sel, reference, tmp_path, monkeypatch, fail_at):
    # Writes: meta, then per shard one file per checkpoint, the keys, the manifest (4 each); each
    # write fsyncs the file, then (after the rename) the directory: 2 calls, so shard k is listed
    # once call 8k + 1 (its manifest) succeeds. fsync is where a delayed-allocation filesystem
    # reports ENOSPC; from call fail_at on, the disk stays full.
    real_fsync, calls = os.fsync, []

    def full_disk_fsync(fd):
        calls.append(fd)
        if len(calls) >= fail_at:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    pool, root = Dataset.from_list(POOL), tmp_path / "store"
    monkeypatch.setattr(os, "fsync", full_disk_fsync)
    with pytest.raises(OSError, match="No space left.*Free some space.*run the same call again") as err:
        sel.featurize(pool, root, shard_rows=SHARD_ROWS, dtype="float32")
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert err.value.errno == errno.ENOSPC
    if fail_at == 1:  # the store could not even be created: nothing is left behind
        assert not root.exists()
    else:
        store = FeatureStore(root)
        store.verify()
        assert not store.complete and store.num_rows == SHARD_ROWS * ((fail_at - 2) // 8)
        assert [p.name for p in root.rglob("*.tmp")] == []
    assert_same_store(reference, sel.featurize(pool, root, shard_rows=SHARD_ROWS, dtype="float32"))
