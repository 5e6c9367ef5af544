"""LessSelector's reliability: deterministic, and a clear error (or warning) for every bad input.

docs/failure_modes.md lists the guarantees with the tests that check them.
"""

import copy

import numpy as np
import pytest
import torch
from datasets import Dataset

from hf_less import LessSFTTrainer, selectors
from hf_less.data import DatasetFormatError, EmptyCompletionError, encode_batch
from hf_less.gradients.store import FeatureStore

from tests.testing_utils import POOL, SHARD_ROWS, make_model
from tests.testing_utils import FEW_TARGETS as TARGETS
from tests.testing_utils import work_config as _config
from tests.testing_utils import work_selector as selector

# -- determinism ---------------------------------------------------------------------------------------


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


# -- bad input -----------------------------------------------------------------------------------------


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
