"""target_loss against a naive per-example loop with torch's cross-entropy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset

from hf_less.evaluation.metrics import per_example_losses, target_loss
from tests.testing_utils import make_lora_model, make_model, toy_tasks


def naive_loss(model, tokenizer, rows):
    """Each example alone, unpadded: cross-entropy of the completion tokens given everything before."""
    losses = []
    model.eval()
    with torch.no_grad():
        for row in rows:
            prompt = tokenizer(row["prompt"])["input_ids"]
            full = tokenizer(row["prompt"] + row["completion"])["input_ids"] + [tokenizer.eos_token_id]
            logits = model(input_ids=torch.tensor([full])).logits[0]
            n = len(prompt)
            losses.append(F.cross_entropy(logits[n - 1:-1], torch.tensor(full[n:])).item())
    return sum(losses) / len(losses), losses


@pytest.fixture(scope="module")
def rows():
    # Different lengths, so batches are padded.
    return [{k: r[k] for k in ("prompt", "completion")} for r in toy_tasks(4, seed=3)]


@pytest.mark.parametrize("batch_size,side", [(1, "right"), (3, "right"), (8, "left")])
def test_matches_naive_loop(tokenizer, rows, batch_size, side):
    model = make_model(len(tokenizer), seed=1)
    expected, per_example = naive_loss(model, tokenizer, rows)
    tokenizer.padding_side = side
    try:
        got = target_loss(model, tokenizer, Dataset.from_list(rows), max_length=128, batch_size=batch_size,
                          show_progress=False)
        each = per_example_losses(model, tokenizer, Dataset.from_list(rows), 128, batch_size, show_progress=False)
    finally:
        tokenizer.padding_side = "right"
    assert got == pytest.approx(expected, abs=1e-5)
    assert each.tolist() == pytest.approx(per_example, abs=1e-5)


def test_mean_over_examples_not_tokens(tokenizer):
    """A long completion does not weigh more than a short one."""
    model = make_model(len(tokenizer), seed=2)
    rows = [{"prompt": "a:", "completion": " b"}, {"prompt": "a:", "completion": " bbbbbbbbbbbbbbbbbbbb"}]
    _, each = naive_loss(model, tokenizer, rows)
    got = target_loss(model, tokenizer, Dataset.from_list(rows), max_length=64, batch_size=2, show_progress=False)
    assert got == pytest.approx(sum(each) / 2, abs=1e-5)


def test_peft_model_and_mode_restored(tokenizer, rows):
    model = make_lora_model(tokenizer, seed=4, dropout=0.5)
    model.train()
    expected, _ = naive_loss(model, tokenizer, rows)  # eval mode: dropout off
    model.train()
    got = target_loss(model, tokenizer, Dataset.from_list(rows), max_length=128, batch_size=4, show_progress=False)
    assert got == pytest.approx(expected, abs=1e-5)
    assert model.training


def test_errors(tokenizer):
    model = make_model(len(tokenizer), seed=0)
    with pytest.raises(ValueError, match="empty"):
        target_loss(model, tokenizer, Dataset.from_list([]), show_progress=False)
    with pytest.raises(ValueError, match="no completion token"):
        target_loss(model, tokenizer, Dataset.from_list([{"prompt": "x" * 40, "completion": " y"}]), max_length=10,
                    show_progress=False)
