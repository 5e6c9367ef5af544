import json

import numpy as np
import pytest

from hf_less.selection.record import SCORES_FILE, SELECTION_FILE, Selection, load_pool_scores, load_selection, save_selection


def test_round_trip_keeps_every_field(tmp_path):
    sel = Selection(indices=[4, 0, 2], strategy="topk", budget=0.3, pool_size=10, seed=3,
                    scores=[0.9, 0.5, 0.1], checkpoints=[{"step": 5, "weight": 1.0, "digest": "ab"}],
                    projection={"kind": "rademacher", "dim": 8, "seed": 0}, extra={"note": "x"})
    scores = np.arange(10, dtype=np.float32)
    save_selection(tmp_path, sel, scores)
    assert json.loads((tmp_path / SELECTION_FILE).read_text())["k"] == 3
    assert load_selection(tmp_path) == sel
    assert load_selection(tmp_path / SELECTION_FILE) == sel
    np.testing.assert_array_equal(load_pool_scores(tmp_path), scores)
    assert not list(tmp_path.glob(".*.tmp"))


def test_pool_scores_must_cover_the_pool(tmp_path):
    sel = Selection(indices=[0], strategy="random", budget=1, pool_size=3)
    with pytest.raises(ValueError, match="pool has 3 rows"):
        save_selection(tmp_path, sel, np.zeros(2))
    assert not (tmp_path / SELECTION_FILE).exists() and not (tmp_path / SCORES_FILE).exists()


def test_missing_selection_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="LessSFTTrainer"):
        load_selection(tmp_path)
    assert load_pool_scores(tmp_path) is None
