"""Dataset formats: turn any example trl's SFTTrainer accepts into ``input_ids`` + ``labels``.

LESS scores an example by the mean cross-entropy over its *completion* tokens, so every
format is reduced to token ids plus labels where prompt tokens carry ``-100``:

- ``messages`` (conversational): loss on the assistant turns only;
- ``prompt`` + ``completion`` (strings, or lists of messages): loss on the completion, located
  exactly as the installed trl's SFTTrainer locates it (:func:`trl_completion_rules`);
- ``text``: loss on every token (language modelling);
- ``input_ids`` with optional ``labels`` (``-100`` = not scored) or ``completion_mask``.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

IGNORE_INDEX = -100

FORMATS = ("messages", "prompt_completion", "text", "tokenized")

_FORMAT_HELP = (
    "hf-less accepts the formats trl's SFTTrainer accepts: a 'messages' column (list of "
    "{'role', 'content'}), 'prompt' + 'completion' columns (strings or message lists), a 'text' "
    "column, or pre-tokenized 'input_ids' (optionally with 'labels' or 'completion_mask'). "
    "Rename your columns with dataset.rename_column(old, new)."
)


ON_EMPTY_COMPLETION = ("error", "skip")


class EmptyCompletionError(ValueError):
    """An example has no scored (completion) token left, e.g. after truncation."""


class DatasetFormatError(ValueError):
    """An example's columns hold values of the wrong type or shape for its format."""


class PromptBoundaryWarning(UserWarning):
    """A tokenized prompt is not a prefix of the tokenized prompt + completion (tokens merge across
    the boundary, or the chat template renders the prompt alone differently)."""


class TrlCompletionRules(NamedTuple):
    """How the installed trl's SFTTrainer locates the completion of a ``prompt`` + ``completion`` example."""

    generation_prompt: bool  # a conversational prompt is rendered with add_generation_prompt=True (trl >= 0.24)
    common_prefix: bool  # the completion starts where the two tokenizations diverge (trl >= 1.15),
    #                      else after as many tokens as the tokenized prompt has


@functools.cache
def trl_completion_rules() -> TrlCompletionRules:
    """The rules of the installed trl, so hf-less scores exactly the tokens SFTTrainer trains on.

    Read from trl's source of each release: 0.20-0.23 render a conversational prompt without the
    generation prompt; from 0.24 with it. Up to 1.14 the completion mask starts after
    ``len(prompt_ids)`` tokens; from 1.15 after the common prefix of the prompt's and the
    prompt + completion's token ids. Every version only warns when they disagree.
    """
    from importlib.metadata import version

    from packaging.version import Version

    release = Version(version("trl")).release  # (1, 15, 0) for "1.15.0.dev0" too: pre-releases have the change
    return TrlCompletionRules(generation_prompt=release >= (0, 24), common_prefix=release >= (1, 15))


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
    """The id used for padding: the tokenizer's pad token, else EOS, else 0 (a documented fallback).

    A tokenizer without a pad token is not an error here: padded positions are masked out of
    attention and carry label -100, so the pad id never reaches a loss, a gradient or a feature
    (``tests/gradients/test_featurizer.py`` checks that features are bit-identical whatever the pad id).
    ``None`` (pre-tokenized data, no tokenizer) pads with 0 for the same reason.
    """
    for tid in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if tid is not None:
            return int(tid)
    return 0


def padding_side(tokenizer) -> str:
    """The tokenizer's padding side; ``"right"`` when it sets none or there is no tokenizer."""
    return getattr(tokenizer, "padding_side", None) or "right"


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


def _with_eos_text(tokenizer, text: str) -> str:
    """``text`` ending with the EOS token's text, as trl's SFTTrainer appends it before tokenizing."""
    eos = getattr(tokenizer, "eos_token", None)
    return text + eos if eos and not text.endswith(eos) else text


def _completion_masked(prompt_ids: list[int], full_ids: list[int]) -> tuple[list[int], list[int]]:
    """``full_ids`` with the prompt masked where the installed trl masks it (:func:`trl_completion_rules`)."""
    common = 0
    for a, b in zip(prompt_ids, full_ids):
        if a != b:
            break
        common += 1
    if common < len(prompt_ids):
        # A fixed message: Python's default filter shows it once per process, not once per example.
        warnings.warn(
            "The tokenized prompt is not a prefix of the tokenized prompt + completion (tokens merge across "
            "the boundary, e.g. a completion that does not start with a space, or the chat template renders "
            "the prompt alone differently). As the installed trl's SFTTrainer does, the completion is scored "
            + ("from where the two tokenizations diverge" if trl_completion_rules().common_prefix
               else "after as many tokens as the tokenized prompt has")
            + ", so hf-less scores the tokens SFTTrainer trains on. To avoid it, end the prompt on a token "
            "boundary (e.g. start completions with a space), or pre-tokenize and pass 'input_ids' + 'labels'.",
            PromptBoundaryWarning, stacklevel=2)
    start = min(common if trl_completion_rules().common_prefix else len(prompt_ids), len(full_ids))
    return full_ids, [IGNORE_INDEX] * start + full_ids[start:]


def _int_list(value: Any, column: str) -> list[int]:
    if isinstance(value, (str, bytes)) or not (isinstance(value, Sequence) or hasattr(value, "tolist")):
        raise DatasetFormatError(f"'{column}' must be a list of token ids, got {type(value).__name__}.")
    value = value.tolist() if hasattr(value, "tolist") else list(value)
    try:
        ids = [int(t) for t in value]
    except (TypeError, ValueError, OverflowError):
        raise DatasetFormatError(f"'{column}' must hold integer token ids, got {value[:5]!r}...") from None
    if column == "input_ids" and any(t < 0 for t in ids):
        raise DatasetFormatError(f"'input_ids' holds negative ids {[t for t in ids if t < 0][:5]}: token ids "
                                 "are >= 0 (use -100 in 'labels', not in 'input_ids', to leave a token unscored).")
    return ids


def _messages(value: Any, column: str) -> list:
    """Check a conversational column: a list of ``{"role": str, "content": str}``."""
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        raise DatasetFormatError(f"'{column}' must be a list of {{'role', 'content'}} messages, got "
                                 f"{type(value).__name__}.")
    for j, msg in enumerate(value):
        if not isinstance(msg, Mapping) or not isinstance(msg.get("role"), str) or not isinstance(msg.get("content"), str):
            raise DatasetFormatError(
                f"Message {j} of '{column}' must be a dict with string 'role' and 'content' keys, got {msg!r}. "
                "Map your messages to [{'role': 'user'|'assistant'|'system', 'content': '...'}, ...].")
    return list(value)


def _text(value: Any, column: str) -> str:
    if not isinstance(value, str):
        raise DatasetFormatError(f"'{column}' must be a string, got {type(value).__name__} ({value!r:.60}); "
                                 "fill or drop missing values (dataset.filter) before scoring.")
    return value


def tokenize_example(example: Mapping[str, Any], tokenizer, fmt: str) -> tuple[list[int], list[int]]:
    """One example to ``(input_ids, labels)`` (labels aligned with ids, not shifted).

    No truncation here: :func:`truncate` applies ``max_length`` afterwards. A value of the wrong
    type or shape raises :class:`DatasetFormatError` naming the column.
    """
    if fmt == "tokenized":
        ids = _int_list(example["input_ids"], "input_ids")
        if example.get("labels") is not None:
            labels = _int_list(example["labels"], "labels")
        elif example.get("completion_mask") is not None:
            mask = _int_list(example["completion_mask"], "completion_mask")
            if len(mask) != len(ids):
                raise DatasetFormatError(f"'completion_mask' has length {len(mask)}, 'input_ids' {len(ids)}: "
                                         "they must be aligned token by token.")
            labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
        else:
            labels = list(ids)
        if len(labels) != len(ids):
            raise DatasetFormatError(f"'labels'/'completion_mask' has length {len(labels)}, 'input_ids' {len(ids)}: "
                                     "they must be aligned token by token.")
        return ids, labels
    if tokenizer is None:
        raise ValueError(f"A tokenizer is needed for {fmt!r} examples; pass tokenizer=... .")
    if fmt == "text":
        ids = _ids(tokenizer(_with_eos_text(tokenizer, _text(example["text"], "text")))["input_ids"])
        return ids, list(ids)
    if fmt == "prompt_completion":
        prompt, completion = example["prompt"], example["completion"]
        if isinstance(prompt, str) != isinstance(completion, str):
            raise DatasetFormatError("'prompt' and 'completion' must both be strings or both be message lists, "
                                     f"got {type(prompt).__name__} and {type(completion).__name__}.")
        if not isinstance(prompt, str):
            prompt, completion = _messages(prompt, "prompt"), _messages(completion, "completion")
            if not completion or completion[0]["role"] != "assistant":
                raise DatasetFormatError(
                    "A conversational 'completion' must start with an assistant message (it is the reply to "
                    f"'prompt'), got {completion[:1]!r}. Move other turns into 'prompt', or use a 'messages' column.")
        # Tokenized as trl's SFTTrainer does: EOS text appended to a string completion, prompt and
        # prompt + completion tokenized separately, the completion located by trl_completion_rules.
        if isinstance(prompt, str):
            prompt_ids = _ids(tokenizer(prompt)["input_ids"])
            full_ids = _ids(tokenizer(prompt + _with_eos_text(tokenizer, completion))["input_ids"])
            return _completion_masked(prompt_ids, full_ids)
        prompt_ids = _chat_ids(tokenizer, list(prompt), add_generation_prompt=trl_completion_rules().generation_prompt)
        full_ids = _chat_ids(tokenizer, list(prompt) + list(completion))
        return _completion_masked(prompt_ids, full_ids)
    if fmt == "messages":
        messages = _messages(example["messages"], "messages")
        full_ids = _chat_ids(tokenizer, messages)
        labels = [IGNORE_INDEX] * len(full_ids)
        # Score every assistant turn: the tokens between the generation prompt that opens it
        # and the rendering of the conversation up to and including it.
        for i, msg in enumerate(messages):
            if msg["role"] != "assistant":
                continue
            if i == 0:  # transformers cannot render the generation prompt of an empty conversation
                raise DatasetFormatError(
                    "'messages' starts with an assistant turn, so there is no prompt to locate its reply "
                    "after. Add the turn that prompts it (a user or system message), or pre-tokenize and pass "
                    "'input_ids' + 'labels'.")
            opening = _chat_ids(tokenizer, messages[:i], add_generation_prompt=True)
            start, end = len(opening), len(_chat_ids(tokenizer, messages[: i + 1]))
            if full_ids[:start] != opening:
                raise DatasetFormatError(
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


def check_on_empty(on_empty: str) -> str:
    if on_empty not in ON_EMPTY_COMPLETION:
        raise ValueError(f"on_empty_completion={on_empty!r}: use 'error' (stop and name the example) or "
                         "'skip' (score it -inf: never selected).")
    return on_empty


def encode_batch(
    batch: Mapping[str, Sequence[Any]],
    tokenizer,
    max_length: int | None = None,
    fmt: str | None = None,
    on_empty: str = "error",
) -> list[tuple[list[int], list[int]]]:
    """Tokenize a ``datasets`` batch (dict of columns) to a list of ``(input_ids, labels)``.

    An example with no scored token (no completion, or none left after truncation to
    ``max_length``) raises :class:`EmptyCompletionError` naming the row, or with
    ``on_empty="skip"`` is returned as it is: callers find it with :func:`n_scored` and give it
    no features (``LessSelector`` scores it ``-inf``, never selected). A value of the wrong
    type raises :class:`DatasetFormatError` naming the row and the column.
    """
    check_on_empty(on_empty)
    fmt = fmt or detect_format(list(batch.keys()))
    if fmt not in FORMATS:
        raise ValueError(f"Unknown format {fmt!r}; expected one of {FORMATS}.")
    n = len(next(iter(batch.values()))) if batch else 0
    out = []
    for i in range(n):
        example = {k: v[i] for k, v in batch.items()}
        try:
            full = tokenize_example(example, tokenizer, fmt)
        except DatasetFormatError as e:
            raise DatasetFormatError(f"Example {i} of this batch: {e}") from None
        ids, labels = truncate(*full, max_length)
        if n_scored(labels) == 0 and on_empty == "error":
            if n_scored(full[1]) == 0:
                why = (f"has no completion token to score at all ({len(ids)} tokens; an empty completion, "
                       "no assistant turn, or labels all -100)")
            else:
                why = (f"has no completion token left to score after truncation to max_length={max_length} "
                       f"(its prompt fills all {len(ids)} tokens)")
            raise EmptyCompletionError(
                f"Example {i} of this batch {why}. Raise max_length, shorten the prompt, drop the example "
                "(dataset.filter) before scoring, or pass on_empty_completion='skip' to score such examples "
                "-inf (never selected)."
            )
        out.append((ids, labels))
    return out


def empty_rows(encoded: Sequence[tuple[list[int], list[int]]]) -> list[int]:
    """Indices of encoded examples without any scored token (kept by ``on_empty="skip"``)."""
    return [i for i, (_, labels) in enumerate(encoded) if n_scored(labels) == 0]


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


def load_dataset_path(path: str | os.PathLike):
    """A JSONL/JSON file or a ``save_to_disk`` directory as a ``datasets.Dataset`` (a DatasetDict's ``train``).

    The one way hf-less's command line and examples read a dataset path; errors name the accepted kinds.
    """
    from datasets import DatasetDict, load_dataset, load_from_disk

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{path!r} does not exist; give a JSONL file or a datasets.save_to_disk directory.")
    if p.is_dir():
        ds = load_from_disk(str(p))
        if isinstance(ds, DatasetDict):
            if "train" not in ds:
                raise ValueError(f"{path!r} is a DatasetDict without a 'train' split; save one Dataset instead.")
            ds = ds["train"]
        return ds
    if p.suffix in (".jsonl", ".json"):
        return load_dataset("json", data_files=str(p), split="train")
    raise ValueError(f"{path!r}: expected a .jsonl/.json file or a save_to_disk directory.")
