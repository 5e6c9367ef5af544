"""MC accuracy, exact match, SDF/PIR, baselines and the distance-versus-loss analysis, against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset

from hf_less.evaluation.metrics import (
    beside_baselines, distance_bins, distance_loss_analysis, evaluate_model, exact_match, mc_accuracy, mc_grade,
    normalize_answer, option_logliks, pir, sdf, spearman, target_loss,
)
from tests.testing_utils import make_model

MC_ROWS = [
    {"prompt": "Q: 1+1?\n  choice: 2\n  choice: 3\nA:", "completion": " 2", "options": ["2", "3"],
     "option_scores": [1.0, 0.0]},
    {"prompt": "Q: sky?\n  choice: blue\n  choice: green\n  choice: red\nA:", "completion": " blue",
     "options": ["blue", "green", "red"], "option_scores": [1.0, 0.0, 0.0]},
    {"prompt": "Q: odd one?\nA:", "completion": " cat", "options": ["dog", "cat"], "option_scores": [0.0, 1.0]},
    {"prompt": "Q: x\nA:", "completion": " ab", "options": ["ab", "abc", "b"], "option_scores": [1.0, 0.0, 0.5]},
]


@pytest.fixture(scope="module")
def model(tokenizer):
    return make_model(len(tokenizer), seed=2).eval()


def hand_loglik(model, tokenizer, prompt: str, option: str) -> float:
    """Sum of log p(option tokens + EOS | prompt), one unpadded forward, torch's cross-entropy."""
    p = tokenizer(prompt)["input_ids"]
    full = tokenizer(prompt + " " + option)["input_ids"] + [tokenizer.eos_token_id]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([full])).logits[0]
    return -F.cross_entropy(logits[len(p) - 1:-1], torch.tensor(full[len(p):]), reduction="sum").item()


@pytest.mark.parametrize("batch_size,side", [(1, "right"), (4, "left")])
def test_option_logliks_and_mc_accuracy_match_hand_computation(model, tokenizer, batch_size, side):
    tokenizer.padding_side = side
    try:
        got = option_logliks(model, tokenizer, [r["prompt"] for r in MC_ROWS], [r["options"] for r in MC_ROWS],
                             max_length=256, batch_size=batch_size, show_progress=False)
        acc = mc_accuracy(model, tokenizer, Dataset.from_list(MC_ROWS), max_length=256, batch_size=batch_size,
                          show_progress=False)
    finally:
        tokenizer.padding_side = "right"
    expected = [[hand_loglik(model, tokenizer, r["prompt"], o) for o in r["options"]] for r in MC_ROWS]
    for g, e in zip(got, expected):
        assert g == pytest.approx(e, abs=1e-4)
    grades = [r["option_scores"][int(np.argmax(e))] for r, e in zip(MC_ROWS, expected)]
    assert acc == pytest.approx(sum(grades) / len(grades))


def test_mean_normalization_divides_by_token_count(model, tokenizer):
    total = option_logliks(model, tokenizer, ["Q: x\nA:"], [["abc"]], show_progress=False)[0][0]
    mean = option_logliks(model, tokenizer, ["Q: x\nA:"], [["abc"]], normalize="mean", show_progress=False)[0][0]
    n = len(tokenizer("Q: x\nA: abc")["input_ids"]) + 1 - len(tokenizer("Q: x\nA:")["input_ids"])  # + EOS
    assert n == 5  # " ", "a", "b", "c", EOS with the character tokenizer
    assert mean == pytest.approx(total / n, rel=1e-5)


def test_mc_grade_ties_and_partial_credit():
    assert mc_grade([-1.0, -1.0], [0.0, 1.0]) == 0.0  # a tie goes to the first option
    assert mc_grade([-3.0, -2.0, -1.0], [1.0, 0.0, 0.5]) == 0.5
    with pytest.raises(ValueError, match="must match"):
        mc_grade([-1.0], [1.0, 0.0])


def test_mc_accuracy_refuses_a_generative_split(model, tokenizer):
    with pytest.raises(ValueError, match="exact_match"):
        mc_accuracy(model, tokenizer, Dataset.from_list([{"prompt": "a", "completion": " b"}]), show_progress=False)


def test_exact_match_against_greedy_decoding_by_hand(model, tokenizer):
    prompts = ["add 1 2 =", "reverse abc :", "Q: hi\nA:"]
    by_hand = []
    for p in prompts:  # greedy, one token at a time, no cache
        ids = tokenizer(p)["input_ids"]
        with torch.no_grad():
            for _ in range(6):
                nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
                if nxt == tokenizer.eos_token_id:
                    break
                ids.append(nxt)
        by_hand.append(tokenizer.decode(ids[len(tokenizer(p)["input_ids"]):], skip_special_tokens=True))
    # One reference equals the model's own answer, one does not: exact match must be 1/3 or 2/3 accordingly.
    refs = [by_hand[0], by_hand[1] + "zz", "\n" + by_hand[2] + "  \nmore"]
    rows = [{"prompt": p, "completion": r} for p, r in zip(prompts, refs)]
    got = exact_match(model, tokenizer, Dataset.from_list(rows), max_new_tokens=6, batch_size=2, show_progress=False)
    expected = sum(normalize_answer(h) == normalize_answer(r) for h, r in zip(by_hand, refs)) / 3
    assert got == pytest.approx(expected)


def test_normalize_answer():
    assert normalize_answer("  three \n four") == "three"
    assert normalize_answer("\n\n a   b \n") == "a b"
    assert normalize_answer("") == ""


def test_evaluate_model_reports_loss_and_the_right_metric(model, tokenizer):
    ds = Dataset.from_list(MC_ROWS)
    out = evaluate_model(model, tokenizer, ds, max_length=256, show_progress=False)
    assert out["metric"] == "mc_accuracy"
    assert out["target_loss"] == pytest.approx(target_loss(model, tokenizer, ds, max_length=256, show_progress=False))
    gen = evaluate_model(model, tokenizer, Dataset.from_list([{"prompt": "a", "completion": " b"}]),
                         max_new_tokens=2, show_progress=False)
    assert gen["metric"] == "exact_match"


def test_sdf_and_pir():
    assert sdf(5, 100) == 0.05
    assert sdf([1, 2, 3], 12) == 0.25
    with pytest.raises(ValueError):
        sdf(5, 0)
    assert pir(0.6, 0.5) == pytest.approx(1.2)
    assert pir(2.0, 2.5, higher_is_better=False) == pytest.approx(1.25)  # a lower loss: PIR > 1
    with pytest.raises(ValueError, match="undefined"):
        pir(0.5, 0.0)


def test_beside_baselines():
    loss = beside_baselines(2.0, zero_shot=3.0, random=2.5)
    assert loss["beats_zero_shot"] and loss["beats_random"] and loss["vs_random"] == -0.5
    acc = beside_baselines(0.4, zero_shot=0.3, random=0.5, higher_is_better=True)
    assert acc["beats_zero_shot"] and not acc["beats_random"]


def naive_spearman(x, y):
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for t in range(i, j + 1):
                r[order[t]] = (i + j) / 2 + 1
            i = j + 1
        return r

    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    num = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    return num / math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))


def test_spearman_against_naive_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(5):
        x = rng.integers(0, 4, 12).tolist()
        y = rng.integers(0, 5, 12).tolist()
        assert spearman(x, y) == pytest.approx(naive_spearman(x, y))
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_distance_bins():
    assert distance_bins(range(10), 3) == [[0, 1, 2], [3, 4, 5, 6], [7, 8, 9]]
    assert distance_bins(range(10), 3, bin_size=2) == [[0, 1], [4, 5], [8, 9]]
    with pytest.raises(ValueError):
        distance_bins(range(3), 5)


def test_distance_loss_analysis_with_a_stub_trainer():
    sims = np.linspace(1, 0, 20)[:, None] * np.ones((1, 3))  # row i farther as i grows
    ordering = list(range(20))
    trained = []

    def train(rows):
        trained.append(rows)
        return 1.0 + 0.1 * float(np.mean(rows))  # farther rows -> higher loss

    out = distance_loss_analysis(ordering, lambda rows: float((1 - sims[rows].max(0)).mean()), train, n_bins=4,
                                 show_progress=False)
    assert len(trained) == 4 and trained[0] == [0, 1, 2, 3, 4]
    assert out["spearman"] == pytest.approx(1.0)
    assert out["distances"] == sorted(out["distances"])
