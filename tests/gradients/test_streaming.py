"""Pools larger than memory (issue 14.3): featurize a stream shard by shard, resume it, capture per shard."""

import json

import numpy as np
import pytest
from datasets import Dataset, IterableDataset

from hf_less import LessCallback, LessSelector
from hf_less.gradients.state import find_checkpoints
from hf_less.data import EmptyCompletionError
from hf_less.gradients.featurizer import Featurizer, content_key
from hf_less.gradients.store import FeatureStore, IncompatibleFeaturesError

from tests.testing_utils import interrupt_store, make_model, run_warmup, toy_tasks, write_fake_warmup

POOL = toy_tasks(6, seed=2)  # 12 rows
TARGETS = [r for r in toy_tasks(3, seed=3) if r["task"] == "math"]
STEPS = (3, 6)
SHARD_ROWS = 5  # shards of 5, 5 and 2 rows: the last one partial
SETTINGS = dict(proj_dim=64, batch_size=2, max_length=64, show_progress=False)


@pytest.fixture(scope="module")
def warmup(tmp_path_factory, tokenizer):
    """Two LESS checkpoints with distinct adapters and random Adam moments."""
    return write_fake_warmup(tmp_path_factory.mktemp("streaming") / "warmup", tokenizer, STEPS)


@pytest.fixture(scope="module")
def sel(tokenizer, warmup):
    return LessSelector(make_model(len(tokenizer)), warmup, TARGETS, tokenizer=tokenizer, **SETTINGS)


@pytest.fixture(scope="module")
def reference(sel, tmp_path_factory):
    """The pool featurized from an in-memory Dataset, uninterrupted."""
    return sel.featurize(Dataset.from_list(POOL), tmp_path_factory.mktemp("ref") / "store", shard_rows=SHARD_ROWS,
                         dtype="float32")


def rows_generator(rows, fail_after=None):
    def gen():
        for i, row in enumerate(rows):
            if fail_after is not None and i == fail_after:
                raise ConnectionError("the stream broke")
            yield dict(row)
    return gen


def stream(rows=POOL, fail_after=None) -> IterableDataset:
    return IterableDataset.from_generator(rows_generator(rows, fail_after))


SOURCES = {
    "to_iterable_dataset": lambda: Dataset.from_list(POOL).to_iterable_dataset(num_shards=3),
    "from_generator": stream,
    "generator of rows": lambda: rows_generator(POOL)(),
    "list of rows": lambda: list(POOL),
    "dict of columns": lambda: {k: [r[k] for r in POOL] for k in POOL[0]},
}


def assert_same_store(a: FeatureStore, b: FeatureStore) -> None:
    """The same shards byte for byte, the same keys, the same meta but the dataset fingerprint."""
    assert a.complete and b.complete and a.num_rows == b.num_rows == len(POOL)
    b.verify()
    digests = [[(s["rows"], s["keys"]["sha256"], {k: f["sha256"] for k, f in s["files"].items()})
                for s in st.manifest["shards"]] for st in (a, b)]
    assert digests[0] == digests[1]
    for step in a.steps:
        assert np.array_equal(a.features(step).read(0, len(POOL)), b.features(step).read(0, len(POOL)))
    assert np.array_equal(a.keys(), b.keys())
    strip = lambda m: {k: v for k, v in m.items() if k != "fingerprint"}  # noqa: E731
    assert strip(a.meta) == strip(b.meta) and b.meta["rows"] == len(POOL)


class CountRows:
    """Featurizer.__call__ spy: how many rows are featurized; optionally fails at call ``fail_at``."""

    def __init__(self, monkeypatch, fail_at=None):
        self.rows, self.calls, self.fail_at = [], 0, fail_at
        real = Featurizer.__call__

        def spy(featurizer, encoded, *a, **kw):
            self.calls += 1
            if self.calls == self.fail_at:
                raise KeyboardInterrupt  # what Ctrl-C does mid-run
            self.rows.append(len(encoded))
            return real(featurizer, encoded, *a, **kw)

        monkeypatch.setattr(Featurizer, "__call__", spy)


@pytest.mark.parametrize("source", list(SOURCES))
def test_a_streamed_pool_gives_the_store_of_the_same_pool_as_a_dataset(sel, reference, tmp_path, source):
    store = sel.featurize(SOURCES[source](), tmp_path / "store", shard_rows=SHARD_ROWS, dtype="float32")
    assert [s["rows"] for s in store.manifest["shards"]] == [5, 5, 2]
    assert_same_store(reference, store)
    assert json.loads((store.root / "meta.json").read_text())["rows"] == len(POOL)  # filled at finish


@pytest.mark.parametrize("interrupt", ["featurizer", "stream", "dataset then stream"])
def test_an_interrupted_stream_resumes_to_the_same_store(sel, reference, tmp_path, monkeypatch, interrupt):
    root = tmp_path / "store"
    first = stream()
    if interrupt == "featurizer":  # stopped in the second shard's first checkpoint
        CountRows(monkeypatch, fail_at=len(STEPS) + 1)
        with pytest.raises(KeyboardInterrupt):
            sel.featurize(first, root, shard_rows=SHARD_ROWS, dtype="float32")
    elif interrupt == "stream":  # the source itself fails in the second shard
        with pytest.raises(ConnectionError):
            sel.featurize(stream(fail_after=7), root, shard_rows=SHARD_ROWS, dtype="float32")
    else:  # begun from the Dataset (row count known), finished from a stream of the same rows
        CountRows(monkeypatch, fail_at=len(STEPS) + 1)
        with pytest.raises(KeyboardInterrupt):
            sel.featurize(Dataset.from_list(POOL), root, shard_rows=SHARD_ROWS, dtype="float32")
    monkeypatch.undo()
    partial = FeatureStore(root)
    assert not partial.complete and partial.num_rows == SHARD_ROWS
    assert partial.meta["rows"] == (len(POOL) if interrupt == "dataset then stream" else None)

    counter = CountRows(monkeypatch)
    resumed = sel.featurize(stream(), root, shard_rows=SHARD_ROWS, dtype="float32")
    assert_same_store(reference, resumed)
    # only the rows after the complete shard were computed, at each checkpoint
    assert sum(counter.rows) == (len(POOL) - SHARD_ROWS) * len(STEPS)

    counter.rows.clear()  # a complete store: read through, nothing computed, nothing changed
    again = sel.featurize(stream(), root, shard_rows=SHARD_ROWS, dtype="float32")
    assert counter.rows == [] and again.manifest == resumed.manifest


def interrupted(sel, root, shards=2):
    """A store of the pool with its first ``shards`` shards only, as an interrupted run leaves it."""
    store = sel.featurize(stream(), root, shard_rows=SHARD_ROWS, dtype="float32")
    interrupt_store(store.root, shards)
    return FeatureStore(root)


def test_resume_against_a_changed_stream_is_refused(sel, tmp_path, monkeypatch):
    store = interrupted(sel, tmp_path / "s")
    before = store.manifest
    changed = [dict(r) for r in POOL]
    changed[7]["completion"] += "0"  # a row inside the second stored shard
    counter = CountRows(monkeypatch)
    with pytest.raises(IncompatibleFeaturesError, match="row 7 holds another example than row 7.*another store_dir"):
        sel.featurize(stream(changed), store.root, shard_rows=SHARD_ROWS, dtype="float32")
    with pytest.raises(IncompatibleFeaturesError, match="holds 10 rows and this pool has only 8"):
        sel.featurize(stream(POOL[:8]), store.root, shard_rows=SHARD_ROWS, dtype="float32")
    assert counter.rows == [] and FeatureStore(store.root).manifest == before  # nothing computed or written

    # a store begun for 12 rows (a Dataset, or a finished stream) refuses a longer stream of the same first rows
    done = sel.featurize(stream(), store.root, shard_rows=SHARD_ROWS, dtype="float32")
    longer = POOL + [{"prompt": "add 1 1 =", "completion": " 2", "task": "math"}]
    # (a complete store: its rows must cover the pool's, issue 23)
    with pytest.raises(IncompatibleFeaturesError, match=r"another pool: 1 of the 13 rows of this pool \(the first: "
                                                        r"row 12\).*The store is complete: delete"):
        sel.featurize(stream(longer), done.root, shard_rows=SHARD_ROWS, dtype="float32")
    with pytest.raises(IncompatibleFeaturesError, match="differ in rows"):  # both lengths known: refused at once
        sel.featurize(Dataset.from_list(longer), done.root, shard_rows=SHARD_ROWS, dtype="float32")
    assert FeatureStore(done.root).num_rows == len(POOL)


def test_an_empty_or_unrecognised_stream_is_refused_before_anything_is_written(sel, tmp_path):
    with pytest.raises(ValueError, match="pool is empty"):
        sel.featurize(stream([]), tmp_path / "empty")
    with pytest.raises(ValueError, match="pool is empty"):
        sel.featurize(iter([]), tmp_path / "empty")
    odd = [{"question": "q", "answer": "a"}] * 3
    with pytest.raises(ValueError, match=r"Unrecognised dataset format: columns \['answer', 'question'\]"):
        sel.featurize(stream(odd), tmp_path / "odd")
    with pytest.raises(TypeError, match="rows as dicts"):
        sel.featurize([("prompt", "completion")], tmp_path / "tuples")
    assert not any(tmp_path.iterdir())


def test_featurize_holds_one_shard_of_the_stream_at_a_time(sel, tmp_path):
    """The source is read as the shards are computed, never ahead by more than one read."""
    read, computed = [], []
    real = Featurizer.encode

    def source():
        for i, row in enumerate(POOL):
            read.append(i)
            yield row

    def encode(featurizer, data, what):
        computed.append(len(read))
        return real(featurizer, data, what)

    Featurizer.encode = encode
    try:
        sel.featurize(source(), tmp_path / "store", shard_rows=SHARD_ROWS, dtype="float32")
    finally:
        Featurizer.encode = real
    # shard k is encoded when at most k + 1 shards of rows have been read (the first read ahead for the format)
    assert computed == [5, 10, 12]


# -- capture during the warmup -----------------------------------------------------------------------------


CAPTURE = dict(proj_dim=64, batch_size=3, shard_rows=SHARD_ROWS, show_progress=False)


@pytest.fixture(scope="module")
def capture_encodes(tmp_path_factory, tokenizer):
    """A warmup capturing a Dataset pool, with the size of every pool encode recorded."""
    sizes = []
    real = Featurizer.encode

    def encode(featurizer, data, what):
        out = real(featurizer, data, what)
        if what.startswith("pool"):
            sizes.append(len(out))
        return out

    Featurizer.encode = encode
    try:
        out = run_warmup(tmp_path_factory.mktemp("captured"), tokenizer,
                         LessCallback(pool=Dataset.from_list(POOL), targets=TARGETS, **CAPTURE))
    finally:
        Featurizer.encode = real
    return out, sizes


def test_capture_encodes_the_pool_one_shard_at_a_time(capture_encodes):
    _, sizes = capture_encodes
    # train begin checks the whole pool, then each of the 2 saves encodes it again: shard by shard each time
    assert sizes == [5, 5, 2] * 3


def test_capture_per_shard_equals_the_selectors_features(tokenizer, capture_encodes):
    warm, _ = capture_encodes
    fresh = LessSelector(make_model(len(tokenizer)), warm, TARGETS, tokenizer=tokenizer, proj_dim=64, batch_size=3,
                         use_captured=False, show_progress=False)
    encoded = fresh.featurizer.encode(Dataset.from_list(POOL), "pool")
    for i, ckpt in enumerate(find_checkpoints(warm)):
        store = FeatureStore(ckpt.captured("pool"))
        assert store.complete and store.num_rows == len(POOL) and store.meta["rows"] == len(POOL)
        assert [s["rows"] for s in store.manifest["shards"]] == [5, 5, 2]
        index = store.key_index()
        rows = [index[content_key(e)] for e in encoded]
        captured = store.features(ckpt.step).take(rows).astype(np.float32)
        computed = fresh._pool_features(encoded, i).numpy()
        np.testing.assert_allclose(captured, computed, atol=2e-3, rtol=0)  # float16 store


def test_capture_of_a_streamed_pool_equals_the_dataset_capture(tmp_path, tokenizer, capture_encodes):
    warm, _ = capture_encodes
    out = run_warmup(tmp_path / "stream", tokenizer, LessCallback(pool=stream(), targets=TARGETS, **CAPTURE))
    for a, b in zip(find_checkpoints(warm), find_checkpoints(out), strict=True):
        sa, sb = FeatureStore(a.captured("pool")), FeatureStore(b.captured("pool"))
        assert sb.complete and sb.meta["rows"] == len(POOL)  # unknown at the start, counted at the finish
        assert np.array_equal(sa.keys(), sb.keys())
        assert np.array_equal(sa.features(a.step).read(0, len(POOL)), sb.features(b.step).read(0, len(POOL)))


def test_capture_refuses_a_one_shot_pool_and_checks_every_row_at_train_begin(tmp_path, tokenizer):
    with pytest.raises(TypeError, match="again at every checkpoint.*not a one-shot generator"):
        run_warmup(tmp_path / "gen", tokenizer, LessCallback(pool=rows_generator(POOL)(), **CAPTURE))
    # a row past the first shard with nothing to score fails before the first training step
    bad = POOL[:8] + [{"prompt": "x" * 80, "completion": " 1", "task": "math"}] + POOL[8:]
    with pytest.raises(EmptyCompletionError, match="pool rows 5..: Example 3 of this batch"):
        run_warmup(tmp_path / "bad", tokenizer, LessCallback(pool=Dataset.from_list(bad), max_length=64,
                                                              **CAPTURE))
    assert not list((tmp_path / "bad").glob("checkpoint-*"))
