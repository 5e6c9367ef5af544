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


# -- one helper for every file hf-less writes (issue 23, item 5) -------------------------------------------

# The only writes outside hf_less/utils/io.py: a plot rendered into a buffer (then written by the helper),
# and the BIG-bench download streamed to a private part file that is renamed once its SHA-256 is checked.
ALLOWED_DIRECT_WRITES = {("hf_less/cli/report.py", 'fig.savefig(buf, format="png", dpi=90)'),
                         ("hf_less/cli/bigbench.py", 'open(part, "wb")')}
DIRECT_WRITE = r"""\.write_text\(|\.write_bytes\(|np\.save\(|save_file\(|json\.dump\(|savefig\(|\.to_json\(|open\([^)]*["'][wa]"""


def test_every_file_is_written_through_the_atomic_helper():
    """The CLI wrote data.json, run.json, featurize.json, targets.safetensors, less_scores.npy, less_sims.npy and
    the demo's outputs in place: a kill left truncated JSON. Every write now goes through hf_less.utils.io."""
    import re

    root = Path(__file__).resolve().parents[2]
    found = []
    for path in sorted((root / "hf_less").rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel == "hf_less/utils/io.py":
            continue
        for line in path.read_text().splitlines():
            if re.search(DIRECT_WRITE, line) and not any(rel == f and s in line for f, s in ALLOWED_DIRECT_WRITES):
                found.append(f"{rel}: {line.strip()}")
    assert found == []


def test_a_kill_while_the_cli_writes_its_json_leaves_the_old_file(tmp_path, monkeypatch):
    """The write dies after the temporary file is written, before the rename: the old content stays whole."""
    from hf_less.cli.pipeline import _write_run_info
    from hf_less.training.layout import RunLayout
    from hf_less.utils import io

    layout = RunLayout(tmp_path / "run")
    _write_run_info(layout, target_task="math")

    def killed(*_):
        raise KeyboardInterrupt  # what a signal raises between the two steps

    monkeypatch.setattr(io.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        _write_run_info(layout, timings={"warmup": 1.0})
    assert json.loads(layout.run_info.read_text()) == {"target_task": "math"}
    assert sorted(p.name for p in layout.root.iterdir()) == [layout.run_info.name]
