"""Reliability (issue 8): resumable, atomic, deterministic, and a clear error for every bad input.

One test per guarantee; docs/failure_modes.md lists them with the tests of other files that
already cover a guarantee (referenced there, not repeated here).
"""

import copy
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset

from hf_less import LessSelector, LessSFTConfig, LessSFTTrainer, selectors
from hf_less.data import DatasetFormatError, EmptyCompletionError, encode_batch, pad_token_id
from hf_less.gradients.featurizer import Featurizer, NonFiniteFeatureError
from hf_less.gradients.store import MANIFEST_FILE, FeatureStore, IncompatibleFeaturesError

from tests.testing_utils import (POOL, SETTINGS, SHARD_ROWS, STEPS, assert_same_store, make_lora_model, make_model,
                                 make_work, stray_files, toy_tasks)
from tests.testing_utils import FEW_TARGETS as TARGETS
from tests.testing_utils import work_config as _config
from tests.testing_utils import work_selector as selector

SCRIPTS = Path(__file__).parent / "scripts"


@pytest.fixture(scope="module")
def work(tmp_path_factory, tokenizer):
    """A warmup with two LESS checkpoints (distinct adapters, random Adam moments), saved model, data."""
    return make_work(tmp_path_factory.mktemp("reliability"), tokenizer)


@pytest.fixture(scope="module")
def sel(tokenizer, work):
    return selector(tokenizer, work)


@pytest.fixture(scope="module")
def reference(sel, tmp_path_factory):
    """An uninterrupted in-process featurization (float32 store) to compare resumed ones with."""
    return sel.featurize(Dataset.from_list(POOL), tmp_path_factory.mktemp("ref") / "store", shard_rows=SHARD_ROWS,
                         dtype="float32")


# -- 1. resume -----------------------------------------------------------------------------------------


def child(work, *stores, slow=0.0):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": str(Path(__file__).parents[1])}
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


def test_resume_ignores_tmp_files_unlisted_and_corrupt_shards(sel, reference, tmp_path):
    pool = Dataset.from_list(POOL)
    store = sel.featurize(pool, tmp_path / "s", shard_rows=SHARD_ROWS, dtype="float32")
    # What a crash can leave: the manifest lists 2 shards; shard 2 was renamed into place but never
    # listed, shard 3's features died as temporary files, and a listed shard rotted on disk.
    manifest = json.loads((store.root / MANIFEST_FILE).read_text())
    manifest["shards"], manifest["complete"] = manifest["shards"][:2], False
    (store.root / MANIFEST_FILE).write_text(json.dumps(manifest))
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
    manifest = json.loads((store.root / MANIFEST_FILE).read_text())
    manifest["shards"], manifest["complete"] = manifest["shards"][:2], False
    (store.root / MANIFEST_FILE).write_text(json.dumps(manifest))
    shuffled = Dataset.from_list(POOL[::-1])  # same size and settings, other rows first
    with pytest.raises(IncompatibleFeaturesError, match="row 0 holds another example.*another store_dir"):
        sel.featurize(shuffled, store.root, shard_rows=SHARD_ROWS, dtype="float32")
    other = selector(tokenizer, work, proj_dim=32)
    with pytest.raises(IncompatibleFeaturesError, match="differ in dim, projection.*another directory"):
        other.featurize(pool, store.root, shard_rows=SHARD_ROWS, dtype="float32")


# -- 3. a full disk ------------------------------------------------------------------------------------


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


# -- 2. determinism ------------------------------------------------------------------------------------


def test_same_seed_same_warmup_subset(tokenizer, tmp_path, monkeypatch):
    import hf_less.training.trainer as trainer_module

    class Stop(Exception):
        pass

    seen = []

    class Recorder:  # stands in for the warmup's SFTTrainer: records its data, trains nothing
        def __init__(self, model, args=None, train_dataset=None, **kw):
            seen.append(train_dataset["prompt"])
            raise Stop

    monkeypatch.setattr(trainer_module, "WarmupSFTTrainer", Recorder)
    pool = Dataset.from_list([{**r, "prompt": f"{i}: {r['prompt']}"} for i, r in enumerate(toy_tasks(10, seed=7))])

    def warmup_rows(seed, batch):
        args = LessSFTConfig(output_dir=str(tmp_path / f"{seed}-{batch}"), less_budget=4, less_warmup_fraction=0.25,
                             less_seed=seed, per_device_train_batch_size=batch, use_cpu=True, report_to=[],
                             max_length=64, disable_tqdm=True, less_proj_dim=32)
        trainer = LessSFTTrainer(make_model(len(tokenizer)), args=args, train_dataset=pool, target_dataset=TARGETS,
                                 processing_class=tokenizer)
        with pytest.raises(Stop):
            trainer.select_data()
        return seen[-1]

    a, b, c, other = warmup_rows(0, 2), warmup_rows(0, 2), warmup_rows(0, 5), warmup_rows(1, 2)
    assert a == b == c and len(a) == 5 and len(set(a)) == 5 and set(a) <= set(pool["prompt"])
    assert other != a
    positions = [pool["prompt"].index(p) for p in a]
    assert positions == sorted(positions)  # kept in pool order


def test_same_seed_same_projection_features_and_selection(tokenizer, work, sel):
    pool = Dataset.from_list(POOL)
    again = selector(tokenizer, work, batch_size=5)  # another selector, another forward batch size
    assert again.identity == sel.identity
    for a, b in zip(sel.target_features, again.target_features):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    one = pool.map(sel, batched=True, batch_size=1)
    twice = pool.map(sel, batched=True, batch_size=1, load_from_cache_file=False)
    other = pool.map(again, batched=True, batch_size=7)
    assert one["less_sims"] == twice["less_sims"]  # repeated: bit for bit
    np.testing.assert_allclose(np.array(one["less_sims"]), np.array(other["less_sims"]), rtol=1e-4, atol=1e-5)
    masses = {"uot": selectors.uot_mass, "knn_uniform": selectors.knn_uniform_mass, "knn_kde": selectors.knn_kde_mass}
    for strategy in selectors.STRATEGIES:
        orders = [s.order(d, strategy, seed=3).tolist() for s, d in ((sel, one), (sel, twice), (again, other))]
        assert orders[0] == orders[1], strategy  # repeated: the same order
        assert sorted(orders[0]) == list(range(len(pool)))
        if orders[0] != orders[2] and strategy in masses:
            # Another batch size moves features by float rounding (~1e-7): candidates whose masses tie
            # to that precision may swap, nothing else. In the first run's masses the second order is
            # still descending, to within that precision.
            mass = masses[strategy](np.array(one["less_sims"], dtype=np.float32))
            steps = np.diff(mass[orders[2]])
            assert (steps <= 1e-6 * mass.max()).all(), (strategy, orders[0], orders[2])
        else:
            assert orders[0] == orders[2], strategy


# -- 3. bad input --------------------------------------------------------------------------------------


def test_empty_pool_or_targets_are_refused_and_nothing_is_written(tokenizer, work, sel, tmp_path):
    empty = Dataset.from_dict({"prompt": [], "completion": []})
    with pytest.raises(ValueError, match="pool is empty.*Pass the candidate"):
        sel.featurize(empty, tmp_path / "store")
    assert not (tmp_path / "store").exists()
    with pytest.raises(ValueError, match="pool is empty"):
        sel.select(empty.add_column("less_score", []), 1)
    with pytest.raises(ValueError, match="targets is empty"):
        selector(tokenizer, work, targets=[])
    with pytest.raises(ValueError, match="train_dataset is empty"):
        LessSFTTrainer(make_model(len(tokenizer)), args=_config(tmp_path), train_dataset=empty,
                       target_dataset=TARGETS, processing_class=tokenizer)
    with pytest.raises(ValueError, match="target_dataset"):
        LessSFTTrainer(make_model(len(tokenizer)), args=_config(tmp_path), train_dataset=Dataset.from_list(POOL),
                       target_dataset=[], processing_class=tokenizer)
    assert not (tmp_path / "out").exists()


def test_unrecognised_format_or_bad_values_name_the_row_and_the_fix(sel, tmp_path):
    with pytest.raises(ValueError, match=r"Unrecognised dataset format: columns \['answer', 'question'\].*rename_column"):
        sel.featurize(Dataset.from_dict({"question": ["q"], "answer": ["a"]}), tmp_path / "store")
    assert not (tmp_path / "store").exists()
    with pytest.raises(ValueError, match="'prompt' column but no 'completion'"):
        Dataset.from_dict({"prompt": ["q"]}).map(sel, batched=True)
    bad = Dataset.from_dict({"prompt": ["ok", None], "completion": ["fine", "x"]})
    with pytest.raises(DatasetFormatError, match="pool batch: Example 1 of this batch: 'prompt' and 'completion' "
                                                 "must both be strings"):
        bad.map(sel, batched=True)
    msgs = Dataset.from_dict({"messages": [[{"role": "user", "text": "hi"}]]})
    with pytest.raises(DatasetFormatError, match="Example 0.*Message 0 of 'messages' must be a dict with string "
                                                 "'role' and 'content'"):
        msgs.map(sel, batched=True)
    with pytest.raises(DatasetFormatError, match="'completion_mask' has length 2, 'input_ids' 3"):
        encode_batch({"input_ids": [[1, 2, 3]], "completion_mask": [[0, 1]]}, None)


def test_no_completion_token_errors_or_scores_minus_inf(tokenizer, work, sel, tmp_path):
    long_prompt = {"prompt": "x" * 80, "completion": " 1", "task": "math"}  # max_length=64 cuts the completion
    pool = Dataset.from_list(POOL[:5] + [long_prompt] + POOL[5:])
    with pytest.raises(EmptyCompletionError, match="Example 5 of this batch has no completion token left to score "
                                                   "after truncation to max_length=64.*on_empty_completion='skip'"):
        pool.map(sel, batched=True)
    with pytest.raises(EmptyCompletionError, match="pool rows 3..: Example 2"):
        sel.featurize(pool, tmp_path / "err", shard_rows=SHARD_ROWS)
    assert FeatureStore(tmp_path / "err").num_rows == 3  # the shards before it, complete

    skip = selector(tokenizer, work, on_empty_completion="skip")
    scored = pool.map(skip, batched=True, batch_size=4)
    assert scored["less_score"][5] == -np.inf and scored["less_sims"][5] == [-np.inf] * len(TARGETS)
    others = np.delete(np.array(scored["less_score"]), 5)
    assert np.isfinite(others).all()
    np.testing.assert_allclose(others, Dataset.from_list(POOL).map(sel, batched=True)["less_score"], rtol=1e-5)
    for strategy in selectors.STRATEGIES:  # never selected, even with the whole pool as budget
        full = skip.order(scored, strategy, seed=1)
        assert sorted(full.tolist()) == [i for i in range(len(pool)) if i != 5], strategy
        with pytest.warns(UserWarning, match="Only 12 pool rows can be selected.*fewer than the budget of 13"):
            chosen = skip.select(scored, len(pool), strategy)
        assert len(chosen) == 12 and long_prompt["prompt"] not in chosen["prompt"]
    store = skip.featurize(pool, tmp_path / "skip", shard_rows=SHARD_ROWS, dtype="float32")
    assert store.skipped_rows().tolist() == [5]
    scores, sims = skip.score_store(store)
    assert scores[5] == -np.inf and (sims[5] == -np.inf).all() and not np.isnan(scores).any()
    np.testing.assert_allclose(np.delete(scores, 5), others, atol=1e-5)

    targets = TARGETS[:2] + [long_prompt]
    with pytest.warns(UserWarning, match=r"Target examples \[2\] have no completion token"):
        dropped = selector(tokenizer, work, targets=targets, on_empty_completion="skip")
    assert dropped.num_targets == 2 and dropped.target_rows == [0, 1]
    with pytest.raises(ValueError, match="on_empty_completion='maybe'"):
        selector(tokenizer, work, on_empty_completion="maybe")


def poisoned_model(tokenizer):
    model = make_model(len(tokenizer))
    with torch.no_grad():  # every example with a '~' gets a NaN loss
        model.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids("~")] = float("nan")
    return model


def test_nan_in_a_gradient_names_the_example(tokenizer, work, tmp_path):
    rows = [dict(r) for r in POOL]
    rows[7]["completion"] += "~"
    sel = LessSelector(poisoned_model(tokenizer), work / "warmup", TARGETS, tokenizer=tokenizer, **SETTINGS)
    pool = Dataset.from_list(rows)
    with pytest.raises(NonFiniteFeatureError, match=r"example\(s\) \[7\] of this map batch.*starts"):
        pool.map(sel, batched=True, batch_size=12)
    with pytest.raises(NonFiniteFeatureError, match=r"example\(s\) \[7\] of the pool \(dataset row indices\)"):
        sel.featurize(pool, tmp_path / "store", shard_rows=SHARD_ROWS)
    store = FeatureStore(tmp_path / "store")
    assert store.num_rows == 6 and not store.complete and stray_files(store) == []
    with pytest.raises(NonFiniteFeatureError, match=r"example\(s\) \[1\] of the targets"):
        LessSelector(poisoned_model(tokenizer), work / "warmup", [TARGETS[0], {**TARGETS[1], "completion": "~"}],
                     tokenizer=tokenizer, **SETTINGS)


def test_budget_outside_the_pool_fails_before_any_work(tokenizer, tmp_path):
    pool = Dataset.from_list(POOL)
    with pytest.raises(ValueError, match="budget=13 must be between 1 and the pool size 12.*fraction"):
        LessSFTTrainer(make_model(len(tokenizer)), args=_config(tmp_path, less_budget=13), train_dataset=pool,
                       target_dataset=TARGETS, processing_class=tokenizer)
    with pytest.raises(ValueError, match="less_budget=0 must be a count >= 1"):
        _config(tmp_path, less_budget=0)
    assert not (tmp_path / "out").exists()


def test_features_from_other_checkpoints_are_refused(tokenizer, work, reference):
    one_checkpoint = selector(tokenizer, work, checkpoints=[STEPS[0]])
    with pytest.raises(IncompatibleFeaturesError, match="checkpoints: .*Recompute both with the same model, warmup"):
        one_checkpoint.score_store(reference)
    with pytest.raises(IncompatibleFeaturesError, match="projection"):
        selector(tokenizer, work, proj_seed=1).score_store(reference)
    with pytest.raises(IncompatibleFeaturesError, match="model"):
        selector(tokenizer, work, seed=3).score_store(reference)


def test_missing_pad_token_falls_back_without_changing_features(tokenizer):
    no_pad = copy.deepcopy(tokenizer)
    no_pad.pad_token = None
    neither = copy.deepcopy(no_pad)
    neither.eos_token = None
    assert pad_token_id(tokenizer) == tokenizer.pad_token_id == 0
    assert pad_token_id(no_pad) == tokenizer.eos_token_id and pad_token_id(neither) == 0
    model = make_lora_model(tokenizer)
    encoded = encode_batch({"prompt": [r["prompt"] for r in POOL], "completion": [r["completion"] for r in POOL]},
                           tokenizer)
    features = {}
    for name, tok in (("pad", tokenizer), ("eos", no_pad), ("zero", neither)):
        for side in ("right", "left"):
            tok = copy.deepcopy(tok)
            tok.padding_side = side
            features[name, side] = Featurizer(model, tok, 64, batch_size=4, show_progress=False)(encoded)
    for side in ("right", "left"):  # bit-identical whatever the pad id
        assert torch.equal(features["pad", side], features["eos", side])
        assert torch.equal(features["pad", side], features["zero", side])
    torch.testing.assert_close(features["pad", "right"], features["pad", "left"], rtol=1e-4, atol=1e-5)


def test_targets_in_the_pool_warn(sel, tmp_path):
    pool = Dataset.from_list(POOL + [TARGETS[1]])
    fresh = copy.copy(sel)
    fresh._warned_overlap = False
    with pytest.warns(UserWarning, match=r"1 pool example\(s\) \(this map batch: rows \[12\]\) are also target "
                                         "examples.*inflates their scores"):
        pool.map(fresh, batched=True, batch_size=13)
    fresh._warned_overlap = False
    with pytest.warns(UserWarning, match=r"pool rows 12..: rows \[0\]"):
        fresh.featurize(pool, tmp_path / "store", shard_rows=SHARD_ROWS)


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
