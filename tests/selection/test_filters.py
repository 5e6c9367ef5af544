"""Threshold predicates for dataset.filter over any score column."""

import math

import pytest
from datasets import Dataset

from hf_less.selection.filters import at_least, keep_indices, top_fraction


@pytest.fixture
def scored():
    return Dataset.from_dict({"id": list(range(6)), "ifd": [0.5, 0.9, math.nan, 0.9, 0.1, 0.7]})


def test_at_least_keeps_rows_at_or_above_the_threshold_and_never_nan(scored):
    assert scored.filter(at_least("ifd", 0.7))["id"] == [1, 3, 5]
    with pytest.raises(KeyError, match="No column 'less_score'"):
        scored.filter(at_least("less_score", 0.0))


def test_top_fraction_keeps_the_best_rows_ties_to_the_lower_index(scored):
    assert scored.filter(top_fraction(scored, "ifd", 2), with_indices=True)["id"] == [1, 3]
    assert scored.filter(top_fraction(scored, "ifd", 0.5), with_indices=True)["id"] == [1, 3, 5]
    assert scored.filter(top_fraction(scored, "ifd", 1, descending=False), with_indices=True)["id"] == [4]
    # NaN ranks last: with the whole budget it is kept last, never before a number
    assert scored.filter(top_fraction(scored, "ifd", 6), with_indices=True)["id"] == list(range(6))
    with pytest.raises(ValueError, match="budget=7"):
        top_fraction(scored, "ifd", 7)


def test_keep_indices(scored):
    assert scored.filter(keep_indices([4, 0]), with_indices=True)["id"] == [0, 4]
