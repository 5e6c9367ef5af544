"""A feature store is bound to the pool it describes (issue 23, item 1).

Scores read from a store are attached to a pool's rows by content key, never by position: a
reordered or filtered pool finds its own features, an edited pool is refused with the fix.
"""

import numpy as np
import pytest
from datasets import Dataset

from hf_less.gradients.store import IncompatibleFeaturesError

from tests.testing_utils import POOL, SHARD_ROWS


@pytest.fixture(scope="module")
def store(sel, tmp_path_factory):
    return sel.featurize(Dataset.from_list(POOL), tmp_path_factory.mktemp("bind") / "store", shard_rows=SHARD_ROWS,
                         dtype="float32")


def test_a_reversed_pool_gets_its_own_scores(sel, store):
    """The issue's case: the pool reversed after featurize; each row must keep its own score."""
    pool = Dataset.from_list(POOL)
    # the independent reference: map() computes every row's features from the row itself
    mapped = pool.map(sel, batched=True, batch_size=4)
    want_scores, want_sims = np.array(mapped["less_score"]), np.array(mapped["less_sims"])
    scores, sims = sel.score_store(store, pool)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-4, atol=1e-5)
    reversed_pool = Dataset.from_list(POOL[::-1])
    r_scores, r_sims = sel.score_store(store, reversed_pool)
    np.testing.assert_allclose(r_scores, want_scores[::-1], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(r_sims, want_sims[::-1], rtol=1e-4, atol=1e-5)
    # a top-k selection over the reversed pool picks the same examples as over the original
    top = [POOL[i]["prompt"] for i in np.argsort(-scores, kind="stable")[:4]]
    r_top = [POOL[::-1][i]["prompt"] for i in np.argsort(-r_scores, kind="stable")[:4]]
    assert sorted(top) == sorted(r_top)


def test_a_filtered_pool_is_matched_and_an_edited_one_refused(sel, store):
    pool = Dataset.from_list(POOL)
    scores, _ = sel.score_store(store, pool)
    keep = [1, 4, 7, 10]
    sub, _ = sel.score_store(store, pool.select(keep))
    np.testing.assert_array_equal(sub, scores[keep])
    edited = [dict(r) for r in POOL]
    edited[5]["completion"] += " edited"
    with pytest.raises(IncompatibleFeaturesError, match=r"1 of the 12 rows of this pool \(the first: row 5\) have no "
                                                         r"features in .*featurize this pool"):
        sel.score_store(store, Dataset.from_list(edited))


def test_featurize_again_on_a_reordered_pool_reuses_the_store(sel, store):
    """A complete store whose rows are this pool's in another order is reused, not refused nor recomputed."""
    digests = [s["keys"]["sha256"] for s in store.manifest["shards"]]
    again = sel.featurize(Dataset.from_list(POOL[::-1]), store.root, shard_rows=SHARD_ROWS, dtype="float32")
    assert [s["keys"]["sha256"] for s in again.manifest["shards"]] == digests
    edited = [dict(r) for r in POOL]
    edited[0]["prompt"] = "add 1 1 ="
    with pytest.raises(IncompatibleFeaturesError, match="holds features of another pool.*delete"):
        sel.featurize(Dataset.from_list(edited), store.root, shard_rows=SHARD_ROWS, dtype="float32")
