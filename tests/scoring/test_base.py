"""What every target scorer shares (hf_less.scoring.base): one selection rule, model loading, target
validation and fingerprint (issue 17)."""

import numpy as np
import pytest
from datasets import Dataset

from hf_less import LessSelector
from hf_less.scoring.base import TargetScorer, fingerprint_of, load_causal_lm, target_columns
from hf_less.scoring.representations import RepresentationSelector

from tests.testing_utils import make_model, make_tokenizer


def test_every_target_scorer_selects_with_one_rule():
    for cls in (LessSelector, RepresentationSelector):
        assert issubclass(cls, TargetScorer)
        assert all(getattr(cls, m) is getattr(TargetScorer, m) for m in ("order", "select", "filter_fn"))

    class Scorer(TargetScorer):  # the columns map(scorer) leaves, without a model
        score_column, sims_column = "x_score", "x_sims"
        subtask_ids, subtask_names = np.zeros(2, dtype=np.int64), ["only"]

    scored = Dataset.from_dict({"x_score": [0.1, float("-inf"), 0.9, 0.5, float("-inf")],
                                "x_sims": [[0.1, 0.0], [0.0, 0.0], [0.9, 0.2], [0.5, 0.6], [0.0, 0.0]]})
    s = Scorer()
    assert s.select(scored, 2)["x_score"] == [0.9, 0.5]
    assert scored.filter(s.filter_fn(scored, 0.4), with_indices=True)["x_score"] == [0.9, 0.5]  # pool order
    assert s.select(scored, 3, strategy="round_robin")["x_score"] == [0.9, 0.5, 0.1]
    with pytest.warns(UserWarning, match="Only 3 pool rows can be selected .* fewer than the budget of 4"):
        assert len(s.select(scored, 4)) == 3
    with pytest.raises(ValueError, match="no 'x_score' column: score it first"):
        s.order(Dataset.from_dict({"text": ["a"]}))


def test_a_model_path_is_loaded_with_its_tokenizer(tmp_path):
    tokenizer = make_tokenizer()
    model = make_model(len(tokenizer))
    assert load_causal_lm(model, tokenizer) == (model, tokenizer)  # objects pass through
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, tok = load_causal_lm(str(tmp_path))
    assert type(loaded) is type(model) and tok.get_vocab() == tokenizer.get_vocab()
    assert all(torch_equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def torch_equal(a, b) -> bool:
    return bool((a == b).all())


def test_target_columns_refuses_no_targets_and_a_missing_subtask_column():
    rows = [{"prompt": "a", "completion": "b", "sub": "x"}, {"prompt": "c", "completion": "d", "sub": "y"}]
    columns, labels = target_columns(rows, "sub")
    assert columns == {"prompt": ["a", "c"], "completion": ["b", "d"]} and labels == ["x", "y"]
    assert target_columns(rows, None) == ({"prompt": ["a", "c"], "completion": ["b", "d"], "sub": ["x", "y"]}, None)
    with pytest.raises(ValueError, match="targets is empty: selection needs a few examples"):
        target_columns([], None)
    with pytest.raises(ValueError, match=r"subtask_column='task' is not a column of targets \['completion', 'prompt', 'sub'\]"):
        target_columns(rows, "task")


def test_the_fingerprint_names_the_identity_whatever_its_key_order():
    a = fingerprint_of({"model": "m", "targets": [1, 2], "proj": {"dim": 8, "seed": 0}})
    assert a == fingerprint_of({"proj": {"seed": 0, "dim": 8}, "targets": [1, 2], "model": "m"})
    assert len(a) == 16 and int(a, 16) >= 0
    assert a != fingerprint_of({"model": "m", "targets": [2, 1], "proj": {"dim": 8, "seed": 0}})
