"""BIG-bench 1.0.0 as the embedded default data: a multi-task candidate pool, a target set, a held-out split.

BIG-bench's JSON tasks ship inside its source distribution on PyPI (``bigbench-1.0.0.tar.gz``,
358 MB). The archive is downloaded once into ``$HF_LESS_CACHE/bigbench`` (default
``~/.cache/hf_less/bigbench``) and task files are read straight from it: no extraction of the whole
archive, no dataset hub. A first scan writes a small index (task -> example counts); the task files
a run asks for are copied out once, so later loads read a few small files.

Every example becomes a ``prompt`` / ``completion`` pair (the ``target`` string, or the best option of
``target_scores``) with its source ``task`` kept as a column::

    from hf_less.cli.bigbench import BigBenchConfig, load_bigbench
    splits = load_bigbench(BigBenchConfig(target_task="word_sorting", examples_per_task=32))
    splits.pool       # many tasks mixed, column `task` names each row's source
    splits.targets    # a few examples of the target task (LESS's target set)
    splits.eval       # held-out examples of the target task, disjoint from both; `options` and
                      # `option_scores` keep target_scores for multiple-choice accuracy

Task names are BIG-bench's directory names (``arithmetic``), optionally with a subtask
(``arithmetic:1_digit_addition``); a task with subtasks means all of them.
"""

from __future__ import annotations

import difflib
import hashlib
import html.parser
import json
import logging
import os
import random
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..utils.io import atomic_write_bytes, file_sha256
from .models import cache_dir

logger = logging.getLogger(__name__)

VERSION = "1.0.0"
ARCHIVE_NAME = f"bigbench-{VERSION}.tar.gz"
ARCHIVE_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
PROJECT = "bigbench"  # the project name on the package index
ARCHIVE_ENV = "HF_LESS_BIGBENCH_ARCHIVE"
TASKS_DIR = "bigbench/benchmark_tasks/"
INDEX_VERSION = 1
PIP_COMMAND = f"pip download --no-deps --no-binary :all: bigbench=={VERSION}"

# A mix of short generative and multiple-choice tasks of different kinds (arithmetic, word games,
# commonsense, logic, language): inputs fit in about 100 tokens, so a 2-core CPU can featurize them.
DEFAULT_POOL_TASKS = (
    "anachronisms", "arithmetic", "auto_categorization", "date_understanding", "disambiguation_qa",
    "emoji_movie", "epistemic_reasoning", "general_knowledge", "hindu_knowledge", "hyperbaton",
    "implicatures", "intent_recognition", "logical_fallacy_detection", "metaphor_boolean",
    "misconceptions", "navigate", "object_counting", "operators", "periodic_elements", "qa_wikidata",
    "ruin_names", "snarks", "social_iqa", "sports_understanding", "strategyqa", "tense",
    "unit_conversion", "winowhy", "word_sorting", "word_unscrambling",
)
DEFAULT_TARGET_TASK = "word_sorting"


class BigBenchError(RuntimeError):
    """BIG-bench data could not be found, downloaded or read."""


class UnknownTaskError(KeyError):
    """A task name that is not in BIG-bench 1.0.0's JSON tasks."""

    def __str__(self) -> str:  # KeyError quotes its message; show it as written
        return str(self.args[0])


# -- the archive -----------------------------------------------------------------------------------


def data_dir(root: str | os.PathLike | None = None) -> Path:
    """Where the archive, its index and the extracted task files live."""
    return Path(root) if root is not None else cache_dir() / "bigbench"


def _fetch(url: str, dest: Path, sha256: str) -> None:
    """Stream ``url`` to ``dest`` with a progress bar, checking the SHA-256 before the file appears."""
    part = dest.with_name(dest.name + f".part{os.getpid()}")
    h = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=60) as resp, open(part, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                      desc=f"downloading {ARCHIVE_NAME}") as bar:
                for block in iter(lambda: resp.read(1 << 20), b""):
                    out.write(block)
                    h.update(block)
                    bar.update(len(block))
        if h.hexdigest() != sha256:
            raise BigBenchError(f"{url} has SHA-256 {h.hexdigest()}, expected {sha256}.")
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)


# Run by pip_sources in a child python: pip's internals import the standard library's distutils, and a process
# holding that one can no longer import setuptools (which torch.compile's C++ builds do): setuptools refuses it.
_PIP_SOURCES = """
import json
from pip._internal.commands import create_command
options, _ = create_command("download").parse_args([])
indexes = [] if options.no_index else [options.index_url, *options.extra_index_urls]
print(json.dumps([[u for u in indexes if u], [u for u in options.find_links or [] if u]]))
"""


def pip_sources() -> tuple[list[str], list[str]]:
    """``(index URLs, find-links locations)`` as pip itself resolves them, in pip's order.

    pip's own option parser reads its configuration files and ``PIP_INDEX_URL`` /
    ``PIP_EXTRA_INDEX_URL`` / ``PIP_FIND_LINKS`` / ``PIP_NO_INDEX``, with pip's default index when
    nothing is configured: no host name is written in hf-less. It runs in a child python (see
    ``_PIP_SOURCES``). Without a usable pip (not installed, or its internals moved) only the
    environment variables are read.
    """
    try:
        done = subprocess.run([sys.executable, "-c", _PIP_SOURCES], capture_output=True, text=True, timeout=120)
        if done.returncode:
            raise RuntimeError((done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1])
        indexes, links = json.loads(done.stdout.strip().splitlines()[-1])
        return indexes, links
    except Exception as e:  # noqa: BLE001 - any failure (a timeout too): the environment's word
        logger.info("pip's configuration could not be read (%s); using PIP_* environment variables only", e)
        env = os.environ
        no_index = env.get("PIP_NO_INDEX", "").lower() in ("1", "true", "yes", "on")
        indexes = [] if no_index else [*env.get("PIP_INDEX_URL", "").split(), *env.get("PIP_EXTRA_INDEX_URL", "").split()]
        return indexes, env.get("PIP_FIND_LINKS", "").split()


class _Anchors(html.parser.HTMLParser):
    """The ``href`` of every ``<a>`` of a PEP 503 simple-index page (or a find-links page)."""

    def __init__(self):
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self.hrefs += [v for k, v in attrs if k == "href" and v]


def _local_path(location: str) -> Path | None:
    """The directory or file a ``file:`` URL or a plain path names; None for a remote URL."""
    parsed = urllib.parse.urlparse(location)
    if parsed.scheme == "file":
        return Path(urllib.request.url2pathname(parsed.path))
    if len(parsed.scheme) <= 1:  # a path (no scheme, or one letter: a Windows drive)
        return Path(location)
    return None


def listed_files(page: str) -> dict[str, str]:
    """``{file name: URL}`` of the files a project page of a simple index, or a find-links location, lists.

    Reads PEP 691 JSON or PEP 503 HTML over http(s), and ``file:`` URLs or paths (a directory's
    ``index.html``, else the files in it), as pip does. Relative links are resolved against the page.
    """
    local = _local_path(page)
    if local is not None:
        if local.is_dir() and not (local / "index.html").is_file():
            return {p.name: p.resolve().as_uri() for p in local.iterdir() if p.is_file()}
        target = local / "index.html" if local.is_dir() else local
        base, body, is_json = target.resolve().as_uri(), target.read_bytes(), False
    else:
        req = urllib.request.Request(page, headers={
            "Accept": "application/vnd.pypi.simple.v1+json, text/html;q=0.1"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            base, body = resp.geturl(), resp.read()
            is_json = "json" in (resp.headers.get("Content-Type") or "")
    if is_json:
        links = [f["url"] for f in json.loads(body).get("files", []) if f.get("url")]
    else:
        parser = _Anchors()
        parser.feed(body.decode("utf-8", errors="replace"))
        links = parser.hrefs
    out = {}
    for link in links:
        url = urllib.parse.urldefrag(urllib.parse.urljoin(base, link)).url  # drop "#sha256=...": checked anyway
        out.setdefault(urllib.parse.unquote(url.rstrip("/").rsplit("/", 1)[-1]), url)
    return out


def archive_url(location: str, index: bool = True) -> str:
    """The URL of the sdist that an index (its project page ``<index>/bigbench/``) or a find-links
    location lists; :class:`BigBenchError` when it lists none."""
    page = f"{location.rstrip('/')}/{PROJECT}/" if index else location
    url = listed_files(page).get(ARCHIVE_NAME)
    if url is None:
        raise BigBenchError(f"{page} does not list {ARCHIVE_NAME}.")
    return url


def _pip_download(dest: Path) -> None:
    """``pip download`` of the sdist. Recent pip builds its metadata and then refuses its direct-URL
    dependency (bleurt), discarding the file; older pip keeps it. Tried last for that reason."""
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               f"bigbench=={VERSION}", "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / ARCHIVE_NAME
        if not got.exists():
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise BigBenchError(f"`{' '.join(cmd[2:])}` exited {done.returncode}: {tail[0]}")
        if file_sha256(got) != ARCHIVE_SHA256:
            raise BigBenchError(f"pip downloaded a {ARCHIVE_NAME} whose SHA-256 does not match.")
        os.replace(got, dest)


def download_archive(root: str | os.PathLike | None = None) -> Path:
    """Download ``bigbench-1.0.0.tar.gz`` (358 MB) into the cache once; return its path."""
    dest = data_dir(root) / ARCHIVE_NAME
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    # Every source pip is configured with (what `pip config list` / PIP_INDEX_URL say, else pip's
    # default index), then pip itself; the SHA-256 is checked whichever serves the file.
    try:
        indexes, find_links = pip_sources()
    except Exception as e:  # noqa: BLE001 - reported with the other failures
        indexes, find_links = [], []
        errors.append(f"pip's configuration: {type(e).__name__}: {e}")
    fetch = lambda location, index: _fetch(archive_url(location, index), dest, ARCHIVE_SHA256)  # noqa: E731
    attempts = [(f"package index {u}", lambda u=u: fetch(u, True)) for u in indexes]
    attempts += [(f"find-links {u}", lambda u=u: fetch(u, False)) for u in find_links]
    attempts.append(("pip download", lambda: _pip_download(dest)))
    for name, attempt in attempts:
        try:
            attempt()
            return dest
        except Exception as e:  # noqa: BLE001 - every failure is reported together below
            errors.append(f"{name}: {type(e).__name__}: {e}")
            logger.info("BIG-bench download via %s failed: %s", name, e)
    raise BigBenchError(
        f"Could not download BIG-bench {VERSION} ({ARCHIVE_NAME}, 358 MB):\n  " + "\n  ".join(errors) +
        f"\nDownload {ARCHIVE_NAME} yourself (the '{PROJECT}' project's files on your package index, "
        f"SHA-256 {ARCHIVE_SHA256}) to {dest},\n"
        f"or `{PIP_COMMAND} -d DIR` (pip < 23 keeps the file), or set {ARCHIVE_ENV}=/path/to/{ARCHIVE_NAME}.")


def archive_path(root: str | os.PathLike | None = None, download: bool = True) -> Path:
    """The archive: ``$HF_LESS_BIGBENCH_ARCHIVE``, else the cached copy (downloaded if missing)."""
    env = os.environ.get(ARCHIVE_ENV)
    if env:
        if not Path(env).is_file():
            raise BigBenchError(f"{ARCHIVE_ENV}={env} is not a file; point it at {ARCHIVE_NAME} or unset it.")
        return Path(env)
    path = data_dir(root) / ARCHIVE_NAME
    if path.exists():
        return path
    if not download:
        raise BigBenchError(f"{path} is missing; run `hf-less demo` once online, or `{PIP_COMMAND}`.")
    return download_archive(root)


class _ProgressReader:
    """A file wrapper advancing a byte progress bar as tarfile reads the compressed archive."""

    def __init__(self, f, bar):
        self.f, self.bar = f, bar

    def read(self, n=-1):
        data = self.f.read(n)
        self.bar.update(len(data))
        return data

    def __getattr__(self, name):
        return getattr(self.f, name)


def _task_name(member: str) -> str | None:
    """``.../benchmark_tasks/arithmetic/1_digit_addition/task.json`` -> ``arithmetic:1_digit_addition``."""
    if TASKS_DIR not in member or not member.endswith("/task.json"):
        return None
    parts = member.split(TASKS_DIR, 1)[1].split("/")[:-1]
    if len(parts) not in (1, 2) or not all(parts):
        return None
    return ":".join(parts)


def _file_key(name: str) -> str:
    return name.replace(":", "__") + ".json"


class BigBenchArchive:
    """Task files of a BIG-bench source archive, with a cached index and cached extracted files.

    Args:
        archive: the ``.tar.gz`` (default: the cached download, fetched if missing).
        cache: where the index and extracted task files go (default: beside the archive's cache).
    """

    def __init__(self, archive: str | os.PathLike | None = None, cache: str | os.PathLike | None = None):
        self.archive = Path(archive) if archive is not None else archive_path()
        stat = self.archive.stat()
        # The index and extracted files belong to this archive (name + size + mtime), so a
        # different archive (or a test's fake one) never reads another's cache.
        tag = hashlib.sha256(f"{self.archive.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
        self.cache = Path(cache) if cache is not None else data_dir() / f"cache-{tag}"
        self.cache.mkdir(parents=True, exist_ok=True)
        self._index: dict[str, dict] | None = None

    # -- index -------------------------------------------------------------------------------------

    @property
    def index(self) -> dict[str, dict]:
        """``{task file name: {"member", "examples", "generative", "multiple_choice"}}``."""
        if self._index is None:
            path = self.cache / "index.json"
            if path.exists():
                data = json.loads(path.read_text())
                if data.get("version") == INDEX_VERSION:
                    self._index = data["tasks"]
            if self._index is None:
                self._index = self._scan(extract=set(DEFAULT_POOL_TASKS))
        return self._index

    def _scan(self, extract: set[str] | None = None, index: bool = True) -> dict[str, dict]:
        """One pass over the archive: index every task file, copy out the files of ``extract`` tasks."""
        extract = extract or set()
        tasks: dict[str, dict] = {}
        desc = "indexing BIG-bench tasks" if index else "reading BIG-bench tasks"
        with open(self.archive, "rb") as raw, tqdm(total=self.archive.stat().st_size, unit="B", unit_scale=True,
                                                   unit_divisor=1024, desc=desc) as bar:
            try:
                with tarfile.open(fileobj=_ProgressReader(raw, bar), mode="r:gz") as tf:
                    for member in tf:
                        name = _task_name(member.name)
                        if name is None or not member.isfile():
                            continue
                        wanted = name.split(":")[0] in extract or name in extract
                        if not index and not wanted:
                            continue
                        data = tf.extractfile(member).read()
                        if wanted:
                            self._write(name, data)
                        if index:
                            tasks[name] = self._describe(name, member.name, data)
            except (tarfile.TarError, OSError, EOFError) as e:
                raise BigBenchError(f"{self.archive} is not a readable BIG-bench archive ({e}); delete it "
                                    "and run again to download it afresh.") from e
        if index:
            if not tasks:
                raise BigBenchError(f"{self.archive} holds no {TASKS_DIR}*/task.json files: not a BIG-bench archive.")
            atomic_write_bytes(self.cache / "index.json", json.dumps(
                {"version": INDEX_VERSION, "archive": self.archive.name, "tasks": tasks}).encode())
        return tasks

    @staticmethod
    def _describe(name: str, member: str, data: bytes) -> dict:
        try:
            examples = json.loads(data).get("examples") or []
        except (json.JSONDecodeError, AttributeError):
            examples = []
        return {
            "member": member,
            "examples": len(examples),
            "generative": sum(1 for e in examples if isinstance(e, dict) and "target" in e),
            "multiple_choice": sum(1 for e in examples if isinstance(e, dict) and e.get("target_scores")),
        }

    def _write(self, name: str, data: bytes) -> None:
        files = self.cache / "tasks"
        files.mkdir(exist_ok=True)
        atomic_write_bytes(files / _file_key(name), data)

    # -- tasks -------------------------------------------------------------------------------------

    def task_names(self) -> list[str]:
        """Top-level tasks that have examples (in any of their subtask files), sorted."""
        return sorted({n.split(":")[0] for n, info in self.index.items() if info["examples"]})

    def files_of(self, task: str) -> list[str]:
        """The task files making up ``task`` (a task, or ``task:subtask``); raises on unknown names."""
        index = self.index
        if ":" in task:
            files = [task] if task in index and index[task]["examples"] else []
        else:
            files = sorted(n for n in index if (n == task or n.startswith(task + ":")) and index[n]["examples"])
        if not files:
            known = self.task_names() + [n for n in index if ":" in n]
            close = difflib.get_close_matches(task, known, n=6, cutoff=0.6)
            close += [n for n in self.task_names() if task.lower() in n and n not in close][:6]
            hint = f" Close names: {', '.join(close)}." if close else ""
            raise UnknownTaskError(
                f"Unknown BIG-bench task {task!r} (or it has no JSON examples; programmatic tasks are not "
                f"supported).{hint} All {len(self.task_names())} tasks: `hf-less demo --list_tasks`.")
        return files

    def count(self, task: str) -> int:
        """Examples in ``task`` (all its subtask files)."""
        return sum(self.index[f]["examples"] for f in self.files_of(task))

    def extract(self, tasks: Sequence[str]) -> list[str]:
        """Copy the task files of ``tasks`` out of the archive (one pass for all not yet copied)."""
        files = [f for t in tasks for f in self.files_of(t)]
        missing = {f for f in files if not (self.cache / "tasks" / _file_key(f)).exists()}
        if missing:
            self._scan(extract=missing, index=False)
        return files

    def read(self, tasks: Sequence[str]) -> dict[str, dict]:
        """The parsed JSON of every task file of ``tasks``."""
        files = self.extract(tasks)
        cached = self.cache / "tasks"
        out = {}
        for f in files:
            try:
                out[f] = json.loads((cached / _file_key(f)).read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise BigBenchError(f"Could not read BIG-bench task file {f!r} ({e}).") from e
        return out


# -- examples -> prompt / completion ---------------------------------------------------------------


def _best_option(scores: dict[str, Any]) -> str | None:
    """The first option with the highest score (BIG-bench's correct answer)."""
    best, best_score = None, None
    for option, score in scores.items():
        try:
            s = float(score)
        except (TypeError, ValueError):
            continue
        if best_score is None or s > best_score:
            best, best_score = option, s
    return best


def convert_example(example: dict, task: dict) -> dict | None:
    """One BIG-bench example -> ``prompt``, ``completion``, ``options``, ``option_scores`` (or None).

    The prompt follows the task's own formatting: ``task_prefix``, ``example_input_prefix``
    (default ``"Q: "``), the input, the choices when ``append_choices_to_input`` (default true),
    ``example_output_prefix`` (default ``"A: "``). The completion is the first ``target`` or the
    best option of ``target_scores``, after one space so BPE tokenizers keep the prompt a prefix.
    """
    if not isinstance(example, dict):
        return None
    scores = example.get("target_scores") or {}
    if not isinstance(scores, dict):
        scores = {}
    target = example.get("target")
    if isinstance(target, list):
        target = next((t for t in target if isinstance(t, str) and t.strip()), None)
    if not isinstance(target, str) or not target.strip():
        target = _best_option(scores)
    if not isinstance(target, str) or not target.strip():
        return None
    text = example.get("input", "")
    if not isinstance(text, str):
        return None
    prompt = str(task.get("task_prefix") or "")
    prompt += str(task.get("example_input_prefix", "\nQ: ")) + text
    if scores and task.get("append_choices_to_input", True):
        prefix = str(task.get("choice_prefix", "\n  choice: "))
        prompt += "".join(prefix + option for option in scores)
    prompt = (prompt + str(task.get("example_output_prefix", "\nA: "))).strip(" ").lstrip("\n")
    if not prompt:
        return None
    completion = target.strip() if prompt.endswith("\n") else " " + target.strip()
    options = [str(o) for o in scores]
    option_scores = []
    for o in scores.values():
        try:
            option_scores.append(float(o))
        except (TypeError, ValueError):
            option_scores.append(0.0)
    return {"prompt": prompt, "completion": completion, "options": options, "option_scores": option_scores}


def task_examples(archive: BigBenchArchive, task: str, max_chars: int | None = None) -> list[dict]:
    """Every usable example of ``task`` as rows (``task``, ``subtask``, ``id``, prompt, completion, ...).

    Examples whose prompt + completion exceed ``max_chars`` are dropped; duplicate prompts keep their
    first occurrence, so the splits built from them are disjoint by content.
    """
    rows, seen = [], set()
    for name, data in archive.read([task]).items():
        subtask = name.split(":", 1)[1] if ":" in name else ""
        for i, example in enumerate(data.get("examples") or []):
            row = convert_example(example, data)
            if row is None or row["prompt"] in seen:
                continue
            if max_chars is not None and len(row["prompt"]) + len(row["completion"]) > max_chars:
                continue
            seen.add(row["prompt"])
            rows.append({"task": task.split(":")[0], "subtask": subtask, "id": f"{name}/{i}", **row})
    return rows


# -- the splits ------------------------------------------------------------------------------------


@dataclass
class BigBenchConfig:
    """What to build from BIG-bench. Deterministic given ``seed``."""

    target_task: str = field(default=DEFAULT_TARGET_TASK, metadata={
        "help": "The BIG-bench task to select data for (targets and eval come from it); `task` or `task:subtask`."})
    tasks: list[str] | None = field(default=None, metadata={
        "help": "Tasks mixed into the candidate pool (default: 30 short generative and multiple-choice tasks). "
                "The target task is always added."})
    examples_per_task: int = field(default=32, metadata={"help": "At most this many pool examples per task."})
    num_targets: int = field(default=8, metadata={"help": "Target-task examples given to LESS as the target set."})
    num_eval: int = field(default=32, metadata={"help": "Held-out target-task examples for evaluation."})
    max_chars: int | None = field(default=500, metadata={
        "help": "Drop examples whose prompt + completion is longer than this many characters."})
    seed: int = field(default=0, metadata={"help": "Seed of the sampling and of the pool's order."})


@dataclass
class BigBenchSplits:
    """``pool``, ``targets`` and ``eval`` as ``datasets.Dataset``s with the same columns."""

    pool: Any
    targets: Any
    eval: Any
    config: BigBenchConfig

    def summary(self) -> dict:
        tasks = self.pool["task"]
        return {"pool": len(self.pool), "targets": len(self.targets), "eval": len(self.eval),
                "tasks": len(set(tasks)), "target_task": self.config.target_task,
                "target_in_pool": sum(t == self.config.target_task.split(":")[0] for t in tasks)}


def shuffled(rows: list[dict], seed: int, salt: str) -> list[dict]:
    """``rows`` in a seeded order that depends on ``salt`` too (e.g. the task name), stable across processes."""
    rows = list(rows)
    random.Random(f"{seed}:{salt}").shuffle(rows)  # str seeds are stable across processes
    return rows


def as_dataset(rows: list[dict]):
    """BIG-bench example rows as a ``Dataset`` with fixed features (prompt, completion, task, subtask, id, options)."""
    from datasets import Dataset, Features, Value
    from datasets import Sequence as Seq

    features = Features({
        "prompt": Value("string"), "completion": Value("string"), "task": Value("string"),
        "subtask": Value("string"), "id": Value("string"), "options": Seq(Value("string")),
        "option_scores": Seq(Value("float32")),
    })
    columns = {k: [r[k] for r in rows] for k in features}
    return Dataset.from_dict(columns, features=features)


def load_bigbench(config: BigBenchConfig | None = None, archive: str | os.PathLike | BigBenchArchive | None = None,
                  ) -> BigBenchSplits:
    """Build the pool, target set and held-out split described by ``config``.

    The target task's examples are shuffled once and cut into ``num_targets`` targets, then
    ``num_eval`` held-out examples, then up to ``examples_per_task`` pool examples; every other task
    gives up to ``examples_per_task`` pool examples. The pool is shuffled.
    """
    config = config or BigBenchConfig()
    bb = archive if isinstance(archive, BigBenchArchive) else BigBenchArchive(archive)
    target = config.target_task
    tasks = list(config.tasks) if config.tasks else list(DEFAULT_POOL_TASKS)
    target_top = target.split(":")[0]
    # The target task takes the place of its parent task in the pool (no duplicate source).
    tasks = [t for t in tasks if t.split(":")[0] != target_top] + [target]
    bb.extract(tasks)  # fails early on an unknown task; one archive pass for every file not yet copied
    need = config.num_targets + config.num_eval + 1
    target_rows = shuffled(task_examples(bb, target, config.max_chars), config.seed, target)
    if len(target_rows) < need:
        raise ValueError(
            f"Task {target!r} has {len(target_rows)} usable examples (max_chars={config.max_chars}); "
            f"num_targets={config.num_targets} + num_eval={config.num_eval} + at least one for the pool "
            "need more. Lower them, raise max_chars, or pick a larger task.")
    targets = target_rows[: config.num_targets]
    held_out = target_rows[config.num_targets: config.num_targets + config.num_eval]
    pool = target_rows[config.num_targets + config.num_eval:][: config.examples_per_task]
    for t in tasks[:-1]:
        rows = task_examples(bb, t, config.max_chars)
        if not rows:
            logger.warning("BIG-bench task %r has no example within max_chars=%s; skipped.", t, config.max_chars)
        pool += shuffled(rows, config.seed, t)[: config.examples_per_task]
    pool = shuffled(pool, config.seed, "pool")
    return BigBenchSplits(as_dataset(pool), as_dataset(targets), as_dataset(held_out), config)


def config_dict(config: BigBenchConfig) -> dict:
    return asdict(config)
