"""Property tests (hypothesis): dataset adapters, budgets, filters and selectors on random input.

The character tokenizer of testing_utils.py gives one token per character (unicode outside
``string.printable`` becomes ``<unk>``), so exact token counts are known without tokenizing: a
prompt of n characters is n masked tokens, a completion of m characters m + 1 scored ones (EOS).
Texts without ``<`` cannot spell a special token. The ordering properties of every strategy
(permutation, budget prefix, determinism per seed) are in tests/selection/test_strategies.py
(``test_orderings_are_permutations_budget_and_determinism``); here they are checked again with
unscorable (``-inf``) rows mixed in.
"""

import numpy as np
import pytest
from datasets import Dataset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_less.selection import strategies as selectors
from hf_less.data import (IGNORE_INDEX, DatasetFormatError, EmptyCompletionError, collate, encode_batch,
                          empty_rows, n_scored, tokenize_example)
from hf_less.selection.filters import at_least, keep_indices, top_fraction

from tests.testing_utils import make_tokenizer

TOK = make_tokenizer()
EOS = TOK.eos_token_id
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Any unicode but surrogates and '<' (which could spell a special token): empty, short and long.
texts = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="<"), max_size=40) | \
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="<"), min_size=200, max_size=600)
roles = st.sampled_from(["user", "assistant", "system"])
conversations = st.lists(st.fixed_dictionaries({"role": roles, "content": texts}), min_size=1, max_size=5)


def ids_of(text: str) -> list[int]:
    return TOK(text)["input_ids"]


# -- dataset adapters ----------------------------------------------------------------------------------


@FUZZ
@given(prompt=texts, completion=texts, max_length=st.none() | st.integers(1, 80))
def test_prompt_completion_masks_exactly_the_prompt(prompt, completion, max_length):
    ids, labels = tokenize_example({"prompt": prompt, "completion": completion}, TOK, "prompt_completion")
    assert len(ids) == len(labels) == len(prompt) + len(completion) + 1
    assert labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert labels[len(prompt):] == ids[len(prompt):] == ids_of(completion) + [EOS]
    batch = {"prompt": [prompt], "completion": [completion]}
    kept = min(len(ids), max_length or len(ids))
    scored = sum(1 for t in labels[1:kept] if t != IGNORE_INDEX)
    if scored == 0:
        with pytest.raises(EmptyCompletionError, match="Example 0 of this batch has no completion token"):
            encode_batch(batch, TOK, max_length)
        ((ids2, labels2),) = encode_batch(batch, TOK, max_length, on_empty="skip")
        assert empty_rows([(ids2, labels2)]) == [0]
    else:
        ((ids2, labels2),) = encode_batch(batch, TOK, max_length)
        assert n_scored(labels2) == scored
    assert (ids2, labels2) == (ids[:kept], labels[:kept])


@FUZZ
@given(messages=conversations)
def test_messages_score_every_assistant_turn_and_nothing_else(messages):
    if messages[0]["role"] == "assistant":  # no prompt before the reply: refused, with the fix
        with pytest.raises(DatasetFormatError, match="starts with an assistant turn.*Add the turn that prompts it"):
            tokenize_example({"messages": messages}, TOK, "messages")
        return
    ids, labels = tokenize_example({"messages": messages}, TOK, "messages")
    rendered = "".join(f"<{m['role']}>{m['content']}</s>" for m in messages)
    assert ids == ids_of(rendered) and len(labels) == len(ids)
    expected = [t for m in messages if m["role"] == "assistant" for t in ids_of(m["content"]) + [EOS]]
    assert [t for t in labels if t != IGNORE_INDEX] == expected
    assert all(lab in (IGNORE_INDEX, t) for t, lab in zip(ids, labels))


@FUZZ
@given(prompt=conversations, completion=conversations)
def test_conversational_prompt_completion(prompt, completion):
    if completion[0]["role"] != "assistant":
        with pytest.raises(DatasetFormatError, match="'completion' must start with an assistant message"):
            tokenize_example({"prompt": prompt, "completion": completion}, TOK, "prompt_completion")
        completion = [{"role": "assistant", "content": completion[0]["content"]}, *completion[1:]]
    ids, labels = tokenize_example({"prompt": prompt, "completion": completion}, TOK, "prompt_completion")
    opening = "".join(f"<{m['role']}>{m['content']}</s>" for m in prompt) + "<assistant>"
    n_prompt = len(ids_of(opening))
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt and labels[n_prompt:] == ids[n_prompt:]


@FUZZ
@given(text=texts)
def test_text_scores_every_token(text):
    ids, labels = tokenize_example({"text": text}, TOK, "text")
    assert ids == labels == ids_of(text) + [EOS]


@FUZZ
@given(data=st.data(), n=st.integers(0, 50))
def test_tokenized_rows_with_labels_or_mask(data, n):
    ids = data.draw(st.lists(st.integers(0, 99), min_size=n, max_size=n))
    which = data.draw(st.sampled_from(["labels", "completion_mask", "none"]))
    length = data.draw(st.sampled_from([n, n + 1, max(0, n - 1)]))
    row = {"input_ids": ids}
    if which == "labels":
        row["labels"] = data.draw(st.lists(st.sampled_from([IGNORE_INDEX, 5]), min_size=length, max_size=length))
    elif which == "completion_mask":
        row["completion_mask"] = data.draw(st.lists(st.sampled_from([0, 1]), min_size=length, max_size=length))
    if which != "none" and length != n:
        with pytest.raises(DatasetFormatError, match=f"has length {length}, 'input_ids' {n}"):
            tokenize_example(row, None, "tokenized")
        return
    out_ids, labels = tokenize_example(row, None, "tokenized")
    assert out_ids == ids
    if which == "labels":
        assert labels == row["labels"]
    elif which == "completion_mask":
        assert labels == [t if m else IGNORE_INDEX for t, m in zip(ids, row["completion_mask"])]
    else:
        assert labels == ids


junk = st.none() | st.integers() | st.floats(allow_nan=True) | st.booleans() | texts | \
    st.lists(st.integers(-5, 5), max_size=3) | st.dictionaries(st.sampled_from(["role", "content", "x"]), texts,
                                                               max_size=2) | \
    st.lists(st.dictionaries(st.sampled_from(["role", "content"]), st.none() | texts | st.integers(), max_size=2),
             max_size=2)


@FUZZ
@given(fmt=st.sampled_from([("prompt", "completion"), ("messages",), ("text",), ("input_ids",),
                            ("input_ids", "labels"), ("input_ids", "completion_mask")]),
       data=st.data(), max_length=st.none() | st.integers(1, 30))
def test_any_value_is_encoded_or_refused_with_a_named_error(fmt, data, max_length):
    """Whatever the values, the adapters succeed or raise a ValueError naming the row; never another error."""
    rows = data.draw(st.integers(1, 3))
    batch = {c: [data.draw(junk) for _ in range(rows)] for c in fmt}
    try:
        out = encode_batch(batch, TOK, max_length, on_empty="skip")
    except DatasetFormatError as e:
        assert str(e).startswith("Example ") and "of this batch" in str(e)
        return
    except ValueError as e:  # a dataset-level problem (e.g. no chat template): must say what to do
        assert "prefix" in str(e) or "chat template" in str(e), e
        return
    assert len(out) == rows
    for ids, labels in out:
        assert len(ids) == len(labels) and (max_length is None or len(ids) <= max_length)


@FUZZ
@given(lengths=st.lists(st.integers(1, 12), min_size=1, max_size=6), side=st.sampled_from(["left", "right"]))
def test_collate_keeps_every_row_and_counts_positions_over_real_tokens(lengths, side):
    encoded = [([i + 1] * n, [IGNORE_INDEX] + [i + 1] * (n - 1)) for i, n in enumerate(lengths)]
    batch = collate(encoded, pad_id=0, padding_side=side)
    assert batch["input_ids"].shape == (len(lengths), max(lengths))
    for row, (ids, labels) in enumerate(encoded):
        real = batch["attention_mask"][row].bool()
        assert batch["input_ids"][row][real].tolist() == ids and batch["labels"][row][real].tolist() == labels
        assert batch["position_ids"][row][real].tolist() == list(range(len(ids)))
        assert (batch["labels"][row][~real] == IGNORE_INDEX).all()


def test_pool_of_unicode_long_and_empty_examples_round_trips_through_datasets():
    rows = [{"prompt": "", "completion": ""}, {"prompt": "😀" * 300, "completion": ""},
            {"prompt": "q", "completion": ""}, {"prompt": "\x00\n\t", "completion": "ok"},
            {"prompt": "", "completion": "é"}]
    ds = Dataset.from_list(rows)
    out = encode_batch(ds.to_dict(), TOK, max_length=100, on_empty="skip")
    # "" + "": EOS alone, at position 0, which nothing predicts; the long prompt is cut before its EOS;
    # "q" + "" scores EOS; "" + "é" scores EOS after <unk>
    assert empty_rows(out) == [0, 1]
    assert out[2][1] == [IGNORE_INDEX, EOS] and len(out[1][0]) == 100 and n_scored(out[3][1]) == 3
    assert out[4] == ([TOK.unk_token_id, EOS], [TOK.unk_token_id, EOS]) and n_scored(out[4][1]) == 1


# -- budgets, filters, selectors -------------------------------------------------------------------------


@FUZZ
@given(n=st.integers(0, 1000), budget=st.integers(-5, 1100) | st.floats(-1.0, 2.0, allow_nan=False) | st.booleans())
def test_resolve_budget(n, budget):
    if n == 0:
        with pytest.raises(ValueError, match="pool is empty"):
            selectors.resolve_budget(budget, n)
    elif isinstance(budget, bool):
        with pytest.raises(TypeError, match="budget must be"):
            selectors.resolve_budget(budget, n)
    elif isinstance(budget, int) and not 1 <= budget <= n or isinstance(budget, float) and not 0 < budget <= 1:
        with pytest.raises(ValueError, match=f"budget={budget}"):
            selectors.resolve_budget(budget, n)
    else:
        k = selectors.resolve_budget(budget, n)
        assert k == (budget if isinstance(budget, int) else max(1, round(budget * n)))
        assert 1 <= k <= n


values = st.lists(st.floats(-1.0, 1.0, allow_nan=False) | st.sampled_from([0.5, float("nan")]),
                  min_size=1, max_size=40)


@FUZZ
@given(vals=values, data=st.data(), descending=st.booleans())
def test_filters_keep_the_rows_they_promise(vals, data, descending):
    ds = Dataset.from_dict({"s": vals})
    n = len(vals)
    k = data.draw(st.integers(1, n))
    # top_fraction: the best k by value, ties to the lower index, NaN last
    key = lambda i: (1, 0.0, i) if np.isnan(vals[i]) else (0, -vals[i] if descending else vals[i], i)
    expected = sorted(sorted(range(n), key=key)[:k])
    assert ds.filter(top_fraction(ds, "s", k, descending), with_indices=True)["s"] == \
        pytest.approx([vals[i] for i in expected], nan_ok=True)
    threshold = data.draw(st.floats(-1.0, 1.0))
    assert ds.filter(at_least("s", threshold))["s"] == [v for v in vals if v >= threshold]
    chosen = data.draw(st.lists(st.integers(0, n - 1), unique=True))
    assert [i for i in range(n) if keep_indices(chosen)(None, i)] == sorted(chosen)


@FUZZ
@given(n=st.integers(1, 25), t=st.integers(1, 5), seed=st.integers(0, 2**16), strategy=st.sampled_from(selectors.STRATEGIES),
       data=st.data())
def test_unscorable_rows_are_never_ordered_and_the_rest_is_ordered_as_without_them(n, t, seed, strategy, data):
    rng = np.random.default_rng(seed)
    sims = np.round(rng.uniform(-1, 1, size=(n, t)), 2).astype(np.float32)  # rounding makes ties
    skipped = sorted(data.draw(st.sets(st.integers(0, n - 1), max_size=n)))
    keep = np.array([i for i in range(n) if i not in skipped], dtype=np.int64)
    scores = sims.mean(1).astype(np.float64)
    scores[skipped] = -np.inf
    sims[skipped] = -np.inf
    full = selectors.order(strategy, scores, seed % 7, sims=sims)
    assert sorted(full.tolist()) == keep.tolist()  # a permutation of the scorable rows, no duplicates
    if len(keep):
        alone = selectors.order(strategy, scores[keep], seed % 7, sims=sims[keep].copy())
        assert full.tolist() == keep[alone].tolist()
        k = data.draw(st.integers(1, len(keep)))
        assert selectors.order(strategy, scores, seed % 7, sims=sims, k=k).tolist() == full[:k].tolist()
    assert selectors.order(strategy, scores, seed % 7, sims=sims).tolist() == full.tolist()  # per seed


def test_nan_scores_are_refused():
    with pytest.raises(ValueError, match=r"scores are NaN at rows \[1\].*never NaN"):
        selectors.order("topk", np.array([0.1, np.nan, 0.3]))
