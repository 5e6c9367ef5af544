"""BIG-bench loader on a tiny fake archive shaped like the 1.0.0 source distribution (no download)."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from hf_less import bigbench
from hf_less.bigbench import (
    BigBenchArchive, BigBenchConfig, BigBenchError, UnknownTaskError, convert_example, load_bigbench,
)

ROOT = "bigbench-1.0.0/bigbench/benchmark_tasks"


def _alpha(n=30):  # generative, default prefixes, some list targets
    return {"name": "alpha", "examples": [
        {"input": f"add {i} and {i}", "target": [str(2 * i), "x"] if i % 2 else str(2 * i)} for i in range(n)]}


def _beta(n=30):  # multiple choice with its own prefixes and a task prefix
    return {"name": "beta", "task_prefix": "Pick the larger.\n", "example_input_prefix": "\nPair: ",
            "example_output_prefix": "\nLarger: ", "append_choices_to_input": True,
            "examples": [{"input": f"{i} vs {i + 1}", "target_scores": {str(i): 0, str(i + 1): 1}} for i in range(n)]}


def _gamma_sub(tag, n=12):
    return {"name": tag, "examples": [{"input": f"{tag} word {i}", "target": f"{tag}{i}"} for i in range(n)]}


def make_fake_archive(path, extra=None):
    """A .tar.gz with BIG-bench's layout: top-level tasks, a task with subtasks, and noise."""
    files = {
        f"{ROOT}/alpha/task.json": _alpha(),
        f"{ROOT}/beta/task.json": _beta(),
        f"{ROOT}/gamma/task.json": {"name": "gamma", "examples": []},
        f"{ROOT}/gamma/one/task.json": _gamma_sub("one"),
        f"{ROOT}/gamma/two/task.json": _gamma_sub("two"),
        f"{ROOT}/delta/task.json": {"name": "delta", "examples": [
            {"input": "long " * 200, "target": "y"}] + [{"input": f"d{i}", "target": f"e{i}"} for i in range(20)]},
        **(extra or {}),
    }
    with tarfile.open(path, "w:gz") as tf:
        for name, content in files.items():
            data = json.dumps(content).encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        readme = b"not a task"
        info = tarfile.TarInfo("bigbench-1.0.0/README.md")
        info.size = len(readme)
        tf.addfile(info, io.BytesIO(readme))
    return path


@pytest.fixture
def fake_archive(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_LESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(bigbench.ARCHIVE_ENV, raising=False)
    return make_fake_archive(tmp_path / "bigbench-1.0.0.tar.gz")


def config(**kw):
    base = dict(target_task="alpha", tasks=["beta", "gamma", "delta"], examples_per_task=6, num_targets=4,
                num_eval=5, max_chars=200, seed=0)
    return BigBenchConfig(**{**base, **kw})


def test_index_counts_and_is_cached(fake_archive, monkeypatch):
    bb = BigBenchArchive(fake_archive)
    assert bb.task_names() == ["alpha", "beta", "delta", "gamma"]
    assert bb.index["alpha"]["examples"] == 30 and bb.index["alpha"]["generative"] == 30
    assert bb.index["beta"]["multiple_choice"] == 30
    assert bb.count("gamma") == 24 and bb.count("gamma:one") == 12
    assert bb.files_of("gamma") == ["gamma:one", "gamma:two"]
    assert (bb.cache / "index.json").exists()
    assert bb.read(["alpha"])["alpha"]["name"] == "alpha"  # one more pass copies alpha out

    def no_scan(*a, **k):
        raise AssertionError("the cached index should be read, not rebuilt")

    monkeypatch.setattr(BigBenchArchive, "_scan", no_scan)
    again = BigBenchArchive(fake_archive)
    assert again.count("beta") == 30
    assert len(again.read(["alpha"])["alpha"]["examples"]) == 30  # from the extracted copy


def test_splits_are_disjoint_sized_and_labelled(fake_archive):
    splits = load_bigbench(config(), fake_archive)
    assert len(splits.targets) == 4 and len(splits.eval) == 5
    assert set(splits.targets["task"]) == {"alpha"} and set(splits.eval["task"]) == {"alpha"}
    tasks = list(splits.pool["task"])
    counts = {t: tasks.count(t) for t in set(tasks)}
    # delta's over-long example is dropped by max_chars; gamma mixes both subtasks
    assert counts == {"alpha": 6, "beta": 6, "gamma": 6, "delta": 6}
    assert set(splits.pool.filter(lambda r: r["task"] == "gamma")["subtask"]) <= {"one", "two"}
    prompts = [set(d["prompt"]) for d in (splits.pool, splits.targets, splits.eval)]
    assert not (prompts[0] & prompts[1]) and not (prompts[0] & prompts[2]) and not (prompts[1] & prompts[2])
    ids = list(splits.pool["id"]) + list(splits.targets["id"]) + list(splits.eval["id"])
    assert len(ids) == len(set(ids))
    assert splits.summary()["target_in_pool"] == 6


def test_deterministic_given_seed(fake_archive):
    a = load_bigbench(config(), fake_archive)
    b = load_bigbench(config(), fake_archive)
    c = load_bigbench(config(seed=1), fake_archive)
    for split in ("pool", "targets", "eval"):
        assert list(getattr(a, split)["id"]) == list(getattr(b, split)["id"])
    assert list(a.pool["id"]) != list(c.pool["id"])


def test_multiple_choice_keeps_options_and_best_answer(fake_archive):
    splits = load_bigbench(config(target_task="beta", tasks=["alpha"]), fake_archive)
    row = splits.eval[0]
    i = int(row["id"].split("/")[1])
    assert row["options"] == [str(i), str(i + 1)] and row["option_scores"] == [0.0, 1.0]
    assert row["completion"] == f" {i + 1}"
    assert row["prompt"] == f"Pick the larger.\n\nPair: {i} vs {i + 1}\n  choice: {i}\n  choice: {i + 1}\nLarger:"
    gen = splits.pool.filter(lambda r: r["task"] == "alpha")[0]
    assert gen["options"] == [] and gen["prompt"].startswith("Q: add ") and gen["prompt"].endswith("\nA:")
    j = int(gen["id"].split("/")[1])
    assert gen["completion"] == f" {2 * j}"  # first of a list target


def test_subtask_target_replaces_its_parent(fake_archive):
    splits = load_bigbench(config(target_task="gamma:one", tasks=["alpha", "gamma"], num_eval=3), fake_archive)
    assert set(splits.targets["subtask"]) == {"one"}
    assert set(splits.pool.filter(lambda r: r["task"] == "gamma")["subtask"]) == {"one"}


def test_convert_example_edge_cases():
    assert convert_example({"input": "x"}, {}) is None  # no target at all
    assert convert_example({"input": "x", "target": "  "}, {}) is None
    row = convert_example({"input": "x", "target_scores": {"a": 0.2, "b": 0.9, "c": 0.9}}, {})
    assert row["completion"] == " b"  # the first of the best options
    row = convert_example({"input": "x", "target": "y"}, {"example_output_prefix": "\nOut:\n"})
    assert row["prompt"].endswith("Out:\n") and row["completion"] == "y"


def test_unknown_task_lists_close_names(fake_archive):
    with pytest.raises(UnknownTaskError, match="Close names: alpha"):
        load_bigbench(config(target_task="alpah"), fake_archive)
    with pytest.raises(UnknownTaskError, match="'gamma:three'"):
        BigBenchArchive(fake_archive).files_of("gamma:three")


def test_too_few_examples_is_a_clear_error(fake_archive):
    with pytest.raises(ValueError, match="num_targets=20 \\+ num_eval=20"):
        load_bigbench(config(num_targets=20, num_eval=20), fake_archive)


def test_not_an_archive(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_LESS_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"not gzip at all")
    with pytest.raises(BigBenchError, match="not a readable BIG-bench archive"):
        BigBenchArchive(bad).index


def test_env_archive_and_download_failure_message(tmp_path, monkeypatch, fake_archive):
    monkeypatch.setenv(bigbench.ARCHIVE_ENV, str(fake_archive))
    assert bigbench.archive_path() == fake_archive
    monkeypatch.setenv(bigbench.ARCHIVE_ENV, str(tmp_path / "missing.tar.gz"))
    with pytest.raises(BigBenchError, match="is not a file"):
        bigbench.archive_path()
    monkeypatch.delenv(bigbench.ARCHIVE_ENV)

    def fail(*a, **k):
        raise OSError("offline")

    monkeypatch.setattr(bigbench, "_fetch", fail)
    monkeypatch.setattr(bigbench, "_pip_download", fail)
    with pytest.raises(BigBenchError) as err:
        bigbench.archive_path(tmp_path / "empty")
    msg = str(err.value)
    assert "curl -L -o" in msg and bigbench.ARCHIVE_ENV in msg and "pip download --no-deps" in msg
    assert msg.count("offline") == 3
    with pytest.raises(BigBenchError, match="is missing"):
        bigbench.archive_path(tmp_path / "empty", download=False)


def test_fetch_checks_the_checksum(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"payload")
    dest = tmp_path / "dest.bin"
    with pytest.raises(BigBenchError, match="SHA-256"):
        bigbench._fetch(src.as_uri(), dest, "0" * 64)
    assert not dest.exists() and not list(tmp_path.glob("dest.bin.part*"))
    import hashlib

    bigbench._fetch(src.as_uri(), dest, hashlib.sha256(b"payload").hexdigest())
    assert dest.read_bytes() == b"payload"
