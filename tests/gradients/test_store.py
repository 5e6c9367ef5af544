"""FeatureStore: resuming an interrupted store, and refusing features that do not belong together."""


import pytest
from datasets import Dataset

from hf_less.gradients.store import FeatureStore, IncompatibleFeaturesError

from tests.testing_utils import interrupt_store, POOL, SHARD_ROWS, STEPS, assert_same_store
from tests.testing_utils import work_selector as selector


def test_resume_ignores_tmp_files_unlisted_and_corrupt_shards(sel, reference, tmp_path):
    pool = Dataset.from_list(POOL)
    store = sel.featurize(pool, tmp_path / "s", shard_rows=SHARD_ROWS, dtype="float32")
    # What a crash can leave: the manifest lists 2 shards; shard 2 was renamed into place but never
    # listed, shard 3's features died as temporary files, and a listed shard rotted on disk.
    manifest = interrupt_store(store.root, 2)
    for step in STEPS:
        (store.root / f"step-{step}" / "shard-000002.npy").write_bytes(b"garbage, never listed")
        (store.root / f"step-{step}" / ".shard-000003.npy.x1y2.tmp").write_bytes(b"half a shard")
    (store.root / "keys" / "shard-000003.npy").unlink()
    rotten = store.root / manifest["shards"][1]["files"][str(STEPS[1])]["name"]
    data = bytearray(rotten.read_bytes())
    data[-1] ^= 0xFF
    rotten.write_bytes(bytes(data))

    reopened = FeatureStore(store.root)  # a reader sees the listed shards only
    assert not reopened.complete and reopened.num_rows == 2 * SHARD_ROWS
    with pytest.raises(IOError, match="corrupt"):
        reopened.verify()
    with pytest.raises(ValueError, match="incomplete; finish featurize"):
        sel.score_store(reopened)

    resumed = sel.featurize(pool, store.root, shard_rows=SHARD_ROWS, dtype="float32")
    assert_same_store(reference, resumed)


def test_resume_refuses_another_pool_or_other_settings(sel, tokenizer, work, tmp_path):
    pool = Dataset.from_list(POOL)
    store = sel.featurize(pool, tmp_path / "s", shard_rows=SHARD_ROWS, dtype="float32")
    interrupt_store(store.root, 2)
    shuffled = Dataset.from_list(POOL[::-1])  # same size and settings, other rows first
    with pytest.raises(IncompatibleFeaturesError, match="row 0 holds another example.*another store_dir"):
        sel.featurize(shuffled, store.root, shard_rows=SHARD_ROWS, dtype="float32")
    other = selector(tokenizer, work, proj_dim=32)
    with pytest.raises(IncompatibleFeaturesError, match="differ in dim, projection.*another directory"):
        other.featurize(pool, store.root, shard_rows=SHARD_ROWS, dtype="float32")


def test_features_from_other_checkpoints_are_refused(tokenizer, work, reference):
    one_checkpoint = selector(tokenizer, work, checkpoints=[STEPS[0]])
    with pytest.raises(IncompatibleFeaturesError, match="checkpoints: .*Recompute both with the same model, warmup"):
        one_checkpoint.score_store(reference)
    with pytest.raises(IncompatibleFeaturesError, match="projection"):
        selector(tokenizer, work, proj_seed=1).score_store(reference)
    with pytest.raises(IncompatibleFeaturesError, match="model"):
        selector(tokenizer, work, seed=3).score_store(reference)
