"""Dataset formats: turn any example trl's SFTTrainer accepts into ``input_ids`` + ``labels``.

LESS scores an example by the mean cross-entropy over its *completion* tokens, so every
format is reduced to token ids plus labels where prompt tokens carry ``-100``:

- ``messages`` (conversational): loss on the assistant turns only;
- ``prompt`` + ``completion`` (strings, or lists of messages): loss on the completion;
- ``text``: loss on every token (language modelling);
- ``input_ids`` with optional ``labels`` (``-100`` = not scored) or ``completion_mask``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

IGNORE_INDEX = -100

FORMATS = ("messages", "prompt_completion", "text", "tokenized")

_FORMAT_HELP = (
    "hf-less accepts the formats trl's SFTTrainer accepts: a 'messages' column (list of "
    "{'role', 'content'}), 'prompt' + 'completion' columns (strings or message lists), a 'text' "
    "column, or pre-tokenized 'input_ids' (optionally with 'labels' or 'completion_mask'). "
    "Rename your columns with dataset.rename_column(old, new)."
)


class EmptyCompletionError(ValueError):
    """An example has no scored (completion) token left, e.g. after truncation."""


def detect_format(column_names: Sequence[str]) -> str:
    """Name the dataset format from its columns (``tokenized`` wins over text columns)."""
    cols = set(column_names)
    if "input_ids" in cols:
        return "tokenized"
    if "messages" in cols:
        return "messages"
    if "prompt" in cols and "completion" in cols:
        return "prompt_completion"
    if "text" in cols:
        return "text"
    if "prompt" in cols:
        raise ValueError(f"Dataset has a 'prompt' column but no 'completion' column. {_FORMAT_HELP}")
    raise ValueError(f"Unrecognised dataset format: columns {sorted(cols)}. {_FORMAT_HELP}")


def pad_token_id(tokenizer) -> int:
    """The id used for padding: the tokenizer's pad token, else EOS, else 0."""
    # The pad value never reaches the loss (it is masked), so any valid id is correct.
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def _ids(encoded: Any) -> list[int]:
    """`apply_chat_template(tokenize=True)` returns a list or a BatchEncoding depending on version."""
    if isinstance(encoded, Mapping):
        encoded = encoded["input_ids"]
    if isinstance(encoded, torch.Tensor):
        encoded = encoded.tolist()
    return list(encoded)


def _chat_ids(tokenizer, messages: list, add_generation_prompt: bool = False) -> list[int]:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "Conversational examples need a tokenizer with a chat template; set "
            "tokenizer.chat_template, or give 'prompt'/'completion' strings instead."
        )
    return _ids(
        tokenizer.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
        )
    )


def _with_eos(tokenizer, ids: list[int]) -> list[int]:
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        return ids + [eos]
    return ids


def _prefix_masked(tokenizer, prompt_ids: list[int], full_ids: list[int]) -> tuple[list[int], list[int]]:
    n = len(prompt_ids)
    if full_ids[:n] != prompt_ids:
        raise ValueError(
            "The tokenized prompt is not a prefix of the tokenized prompt + completion (the "
            "tokenizer merges tokens across the boundary or the chat template rewrites earlier "
            "turns). Pre-tokenize the examples and pass 'input_ids' + 'labels' instead."
        )
    return full_ids, [IGNORE_INDEX] * n + full_ids[n:]


def tokenize_example(example: Mapping[str, Any], tokenizer, fmt: str) -> tuple[list[int], list[int]]:
    """One example to ``(input_ids, labels)`` (labels aligned with ids, not shifted).

    No truncation here: :func:`truncate` applies ``max_length`` afterwards.
    """
    if fmt == "tokenized":
        ids = [int(t) for t in example["input_ids"]]
        if example.get("labels") is not None:
            labels = [int(t) for t in example["labels"]]
        elif example.get("completion_mask") is not None:
            labels = [t if m else IGNORE_INDEX for t, m in zip(ids, example["completion_mask"])]
        else:
            labels = list(ids)
        if len(labels) != len(ids):
            raise ValueError(f"'labels'/'completion_mask' has length {len(labels)}, 'input_ids' {len(ids)}.")
        return ids, labels
    if tokenizer is None:
        raise ValueError(f"A tokenizer is needed for {fmt!r} examples; pass tokenizer=... .")
    if fmt == "text":
        ids = _ids(tokenizer(example["text"], add_special_tokens=True)["input_ids"])
        ids = _with_eos(tokenizer, ids)
        return ids, list(ids)
    if fmt == "prompt_completion":
        prompt, completion = example["prompt"], example["completion"]
        if isinstance(prompt, str) != isinstance(completion, str):
            raise ValueError("'prompt' and 'completion' must both be strings or both be message lists.")
        if isinstance(prompt, str):
            prompt_ids = _ids(tokenizer(prompt, add_special_tokens=True)["input_ids"])
            full_ids = _ids(tokenizer(prompt + completion, add_special_tokens=True)["input_ids"])
            return _prefix_masked(tokenizer, prompt_ids, _with_eos(tokenizer, full_ids))
        prompt_ids = _chat_ids(tokenizer, list(prompt), add_generation_prompt=True)
        full_ids = _chat_ids(tokenizer, list(prompt) + list(completion))
        return _prefix_masked(tokenizer, prompt_ids, full_ids)
    if fmt == "messages":
        messages = list(example["messages"])
        full_ids = _chat_ids(tokenizer, messages)
        labels = [IGNORE_INDEX] * len(full_ids)
        # Score every assistant turn: the tokens between the generation prompt that opens it
        # and the rendering of the conversation up to and including it.
        for i, msg in enumerate(messages):
            if msg["role"] != "assistant":
                continue
            opening = _chat_ids(tokenizer, messages[:i], add_generation_prompt=True)
            start, end = len(opening), len(_chat_ids(tokenizer, messages[: i + 1]))
            if full_ids[:start] != opening:
                raise ValueError(
                    "The chat template does not render conversations prefix-consistently, so "
                    "assistant turns cannot be located; pre-tokenize and pass 'input_ids' + 'labels'."
                )
            labels[start:end] = full_ids[start:end]
        return full_ids, labels
    raise ValueError(f"Unknown format {fmt!r}; expected one of {FORMATS}.")


def truncate(ids: list[int], labels: list[int], max_length: int | None) -> tuple[list[int], list[int]]:
    """Keep the first ``max_length`` tokens (as trl's SFTTrainer truncates)."""
    if max_length is not None and len(ids) > max_length:
        return ids[:max_length], labels[:max_length]
    return ids, labels


def n_scored(labels: Sequence[int]) -> int:
    """Tokens that enter the loss: label != -100, excluding position 0 (nothing predicts it)."""
    return sum(1 for t in labels[1:] if t != IGNORE_INDEX)


def encode_batch(
    batch: Mapping[str, Sequence[Any]],
    tokenizer,
    max_length: int | None = None,
    fmt: str | None = None,
) -> list[tuple[list[int], list[int]]]:
    """Tokenize a ``datasets`` batch (dict of columns) to a list of ``(input_ids, labels)``.

    Raises :class:`EmptyCompletionError` naming the row if an example has no scored token.
    """
    fmt = fmt or detect_format(list(batch.keys()))
    n = len(next(iter(batch.values())))
    out = []
    for i in range(n):
        example = {k: v[i] for k, v in batch.items()}
        ids, labels = truncate(*tokenize_example(example, tokenizer, fmt), max_length)
        if n_scored(labels) == 0:
            raise EmptyCompletionError(
                f"Example {i} of this batch has no completion token left to score "
                f"({len(ids)} tokens after truncation to max_length={max_length}). Raise max_length, "
                "shorten the prompt, or drop the example (dataset.filter) before scoring."
            )
        out.append((ids, labels))
    return out


def collate(
    encoded: Sequence[tuple[list[int], list[int]]], pad_id: int, padding_side: str = "right"
) -> dict[str, torch.Tensor]:
    """Pad ``(input_ids, labels)`` pairs into a batch with ``attention_mask`` and ``position_ids``.

    ``position_ids`` count real tokens only, so left padding gives the same positions (and
    the same per-example loss) as right padding or no padding.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}.")
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, (ids, lab) in enumerate(encoded):
        n = len(ids)
        sl = slice(0, n) if padding_side == "right" else slice(width - n, width)
        input_ids[row, sl] = torch.tensor(ids, dtype=torch.long)
        labels[row, sl] = torch.tensor(lab, dtype=torch.long)
        mask[row, sl] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask, "position_ids": position_ids}

