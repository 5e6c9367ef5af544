"""BIG-bench loader on a tiny fake archive shaped like the 1.0.0 source distribution (no download)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hf_less.cli import bigbench
from hf_less.cli.bigbench import (
    BigBenchArchive, BigBenchConfig, BigBenchError, UnknownTaskError, convert_example, load_bigbench,
)

from tests.testing_utils import make_fake_archive


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

    pip_env(monkeypatch, PIP_INDEX_URL="http://127.0.0.1:9/simple", PIP_FIND_LINKS=str(tmp_path / "wheels"))
    monkeypatch.setattr(bigbench, "_fetch", fail)
    monkeypatch.setattr(bigbench, "_pip_download", fail)
    with pytest.raises(BigBenchError) as err:
        bigbench.archive_path(tmp_path / "empty")
    msg = str(err.value)
    assert bigbench.ARCHIVE_SHA256 in msg and bigbench.ARCHIVE_ENV in msg and "pip download --no-deps" in msg
    # one attempt per source pip is configured with, then pip itself
    assert "package index http://127.0.0.1:9/simple: " in msg and f"find-links {tmp_path / 'wheels'}: " in msg
    assert "pip download: OSError: offline" in msg
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


# -- the archive through pip's configured index (issue 15, item 9) -----------------------------------


def pip_env(monkeypatch, **env):
    """Only these PIP_* variables, and no pip configuration file: pip resolves its sources from them."""
    import os

    for name in [k for k in os.environ if k.startswith("PIP_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def simple_index(root, archive, json_api=False):
    """A PEP 503 simple index under root/simple (the file in root/files, linked relatively, with a
    hash fragment and a decoy); returns root."""
    import hashlib
    import shutil

    (root / "files").mkdir(parents=True)
    shutil.copy(archive, root / "files" / bigbench.ARCHIVE_NAME)
    (root / "simple" / "bigbench").mkdir(parents=True)
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    (root / "simple" / "bigbench" / "index.html").write_text(
        "<!DOCTYPE html><html><body>\n"
        '<a href="../../files/bigbench-0.0.1.tar.gz">bigbench-0.0.1.tar.gz</a>\n'
        f'<a href="../../files/{bigbench.ARCHIVE_NAME}#sha256={digest}">{bigbench.ARCHIVE_NAME}</a>\n'
        "</body></html>\n")
    return root


@pytest.fixture
def served(tmp_path):
    """An HTTP server on 127.0.0.1 over tmp_path/site; /json/bigbench/ answers PEP 691 JSON."""
    import functools
    import http.server
    import threading

    site = tmp_path / "site"
    site.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/json/bigbench/":
                body = json.dumps({"meta": {"api-version": "1.0"}, "name": "bigbench", "files": [
                    {"filename": bigbench.ARCHIVE_NAME, "url": f"../../files/{bigbench.ARCHIVE_NAME}",
                     "hashes": {}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/vnd.pypi.simple.v1+json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield site, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_pip_sources_are_what_pip_is_configured_with(monkeypatch, tmp_path):
    # pip's default index, read from pip in a child (pip's internals are kept out of this process: see below)
    default = subprocess.run([sys.executable, "-c", "from pip._internal.models.index import PyPI; print(PyPI.simple_url)"],
                             capture_output=True, text=True, check=True).stdout.strip()
    pip_env(monkeypatch)
    assert bigbench.pip_sources() == ([default], [])
    pip_env(monkeypatch, PIP_INDEX_URL="http://127.0.0.1:9/simple", PIP_EXTRA_INDEX_URL="file:///x/simple",
            PIP_FIND_LINKS="/some/wheels")
    assert bigbench.pip_sources() == (["http://127.0.0.1:9/simple", "file:///x/simple"], ["/some/wheels"])
    config = tmp_path / "pip.conf"
    config.write_text("[global]\nindex-url = http://127.0.0.1:8/simple\n")
    pip_env(monkeypatch, PIP_CONFIG_FILE=str(config))
    assert bigbench.pip_sources() == (["http://127.0.0.1:8/simple"], [])
    pip_env(monkeypatch, PIP_INDEX_URL="http://127.0.0.1:9/simple", PIP_NO_INDEX="1")
    assert bigbench.pip_sources() == ([], [])


def test_download_through_a_file_index(monkeypatch, tmp_path, fake_archive):
    monkeypatch.setattr(bigbench, "ARCHIVE_SHA256", bigbench.file_sha256(fake_archive))
    monkeypatch.setattr(bigbench, "_pip_download", lambda dest: pytest.fail("pip download was not needed"))
    root = simple_index(tmp_path / "index", fake_archive)
    index = (root / "simple").as_uri()
    assert bigbench.archive_url(index) == (root / "files" / bigbench.ARCHIVE_NAME).resolve().as_uri()
    pip_env(monkeypatch, PIP_INDEX_URL=index)
    got = bigbench.archive_path(tmp_path / "cache-a")
    assert got == tmp_path / "cache-a" / bigbench.ARCHIVE_NAME and got.read_bytes() == fake_archive.read_bytes()
    # a find-links directory holding the file, behind an index that does not list it
    empty = tmp_path / "empty-index" / "bigbench"
    empty.mkdir(parents=True)
    (empty / "index.html").write_text("<html></html>")
    pip_env(monkeypatch, PIP_INDEX_URL=(tmp_path / "empty-index").as_uri(), PIP_FIND_LINKS=str(root / "files"))
    with pytest.raises(BigBenchError, match=f"bigbench/ does not list {bigbench.ARCHIVE_NAME}"):
        bigbench.archive_url((tmp_path / "empty-index").as_uri())
    got = bigbench.archive_path(tmp_path / "cache-b")
    assert got.read_bytes() == fake_archive.read_bytes()


@pytest.mark.parametrize("api", ["simple", "json"])
def test_download_through_an_http_index(monkeypatch, tmp_path, fake_archive, served, api):
    site, base = served
    simple_index(site, fake_archive)
    monkeypatch.setattr(bigbench, "ARCHIVE_SHA256", bigbench.file_sha256(fake_archive))
    monkeypatch.setattr(bigbench, "_pip_download", lambda dest: pytest.fail("pip download was not needed"))
    pip_env(monkeypatch, PIP_INDEX_URL=f"{base}/{api}/")
    assert bigbench.archive_url(f"{base}/{api}/") == f"{base}/files/{bigbench.ARCHIVE_NAME}"
    got = bigbench.archive_path(tmp_path / "cache")
    assert got.read_bytes() == fake_archive.read_bytes()


def test_a_file_with_another_checksum_is_refused(monkeypatch, tmp_path, fake_archive):
    root = simple_index(tmp_path / "index", fake_archive)
    pip_env(monkeypatch, PIP_INDEX_URL=(root / "simple").as_uri())
    monkeypatch.setattr(bigbench, "_pip_download", lambda dest: (_ for _ in ()).throw(OSError("no pip")))
    with pytest.raises(BigBenchError, match=f"has SHA-256 {bigbench.file_sha256(fake_archive)}, expected "
                                            f"{bigbench.ARCHIVE_SHA256}"):
        bigbench.archive_path(tmp_path / "cache")
    assert not (tmp_path / "cache" / bigbench.ARCHIVE_NAME).exists()


def test_pip_sources_keep_pip_out_of_this_process():
    """pip's internals load the standard library's distutils; setuptools (torch.compile's C++ builds import it)
    then refuses to load. Reading pip's configuration must leave this process as it was."""
    code = ("import sys; from hf_less.cli import bigbench; bigbench.pip_sources(); "
            "assert 'pip' not in sys.modules and 'distutils' not in sys.modules, sorted(sys.modules); import setuptools")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
