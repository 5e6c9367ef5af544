"""Atomic writes: the file is synced, then the rename; a failed write keeps the old content."""

import json
import os
from pathlib import Path

import pytest


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="reads fd paths from /proc")
def test_atomic_write_syncs_the_file_then_the_rename(tmp_path, monkeypatch):
    from hf_less.utils import io

    synced, real = [], os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(io.os, "fsync", spy)
    target = tmp_path / "manifest.json"
    io.atomic_write_json(target, {"shards": 1})
    assert json.loads(target.read_text()) == {"shards": 1}
    # the data under its temporary name first, then the directory that records the rename
    assert len(synced) == 2 and Path(synced[0]).name.startswith(".manifest.json.") and synced[1] == str(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_a_failed_atomic_write_keeps_the_old_content_and_no_temporary_file(tmp_path, monkeypatch):
    from hf_less.utils import io

    target = tmp_path / "manifest.json"
    io.atomic_write_json(target, {"shards": 1})

    def full_disk(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io.os, "replace", full_disk)
    with pytest.raises(OSError, match="No space left"):
        io.atomic_write_json(target, {"shards": 2})
    assert json.loads(target.read_text()) == {"shards": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]
