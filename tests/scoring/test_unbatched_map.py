"""``pool.map(selector)`` without ``batched=True`` is refused with the fix (issue 23, item 4).

The old code failed with an ``IndexError``, or, when a completion was at least as long as its
prompt, took the characters of one example for examples and wrote a list-valued score column.
"""

from __future__ import annotations

import pytest
from datasets import Dataset

from hf_less.scoring.representations import RepresentationSelector

from tests.testing_utils import POOL

FIX = r"got one example .*pass batched=True: dataset.map\(selector, batched=True"


@pytest.mark.parametrize("rows", [
    [{"prompt": "q", "completion": "a long answer"}],  # completion longer than the prompt: scored characters
    [{"prompt": r["prompt"], "completion": r["completion"]} for r in POOL[:2]],
    [{"text": "a whole sequence"}],
    [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}],
    [{"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]}],
], ids=["long_completion", "prompt_completion", "text", "messages", "tokenized"])
def test_unbatched_map_is_refused(sel, rows):
    with pytest.raises(TypeError, match=FIX):
        Dataset.from_list(rows).map(sel)
    scored = Dataset.from_list(rows).map(sel, batched=True)  # the fix works
    assert all(isinstance(s, float) for s in scored["less_score"])
    assert [len(s) for s in scored["less_sims"]] == [sel.num_targets] * len(rows)


def test_representation_selector_too():
    sel = RepresentationSelector(POOL[:2], "random", dim=8, seed=1)
    with pytest.raises(TypeError, match=FIX):
        Dataset.from_list(POOL[:3]).map(sel)
    assert len(Dataset.from_list(POOL[:3]).map(sel, batched=True)["random_score"]) == 3
