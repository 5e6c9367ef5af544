"""Content digests of what a warmup, a selection or cached scores depend on.

Reuse (``less_reuse_selection``, a ``datasets.map`` cache, a warmup directory) is safe only when
everything the result depends on is the same: these digests make the inputs that a name does not
identify (weights, a tokenizer and its chat template, a data subset) comparable.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch


def _sha(text: str | bytes) -> str:
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()[:16]


def tokenizer_identity(tokenizer: Any) -> str | None:
    """A digest of everything that decides how a tokenizer turns an example into token ids.

    The vocabulary and pre/post-processing (the whole ``tokenizers`` JSON of a fast tokenizer, the
    vocabulary of a slow one), the special tokens, the padding and truncation sides, and the chat
    template: a ``messages`` example rendered under another template is another token sequence.
    A processor (multimodal) is identified by its tokenizer and its own chat template.
    ``None`` for no tokenizer.
    """
    if tokenizer is None:
        return None
    inner = getattr(tokenizer, "tokenizer", None)
    tok = inner if inner is not None and hasattr(inner, "convert_tokens_to_ids") else tokenizer
    parts: dict[str, Any] = {
        "class": type(tok).__name__,
        "chat_template": getattr(tokenizer, "chat_template", None) or getattr(tok, "chat_template", None),
        "special_tokens": {k: str(v) for k, v in (getattr(tok, "special_tokens_map", None) or {}).items()},
        "padding_side": getattr(tok, "padding_side", None),
        "truncation_side": getattr(tok, "truncation_side", None),
    }
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        parts["backend"] = _sha(backend.to_str())
    elif hasattr(tok, "get_vocab"):
        parts["vocab"] = _sha(json.dumps(sorted(tok.get_vocab().items()), default=str))
    return _sha(json.dumps(parts, sort_keys=True, default=str))


def weights_digest(model: torch.nn.Module, frozen_only: bool = False, rounded: bool = False) -> str:
    """A checksum of the parameters of ``model`` (names, shapes, a strided sample and the sum).

    Every parameter by default: the model a selection is made with is often a plain, fully
    trainable base model. ``frozen_only``: the parameters without ``requires_grad`` (the base
    model under an adapter, as :func:`hf_less.gradients.featurizer.model_identity` identifies it).
    ``rounded``: the sample rounded to bfloat16 and no sum, so the same weights loaded in float32
    or bfloat16 have the same digest (other weights still differ, unless they differ below
    bfloat16's precision only at every sampled coordinate).
    """
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if frozen_only and p.requires_grad:
            continue
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)]
        sample = (sample.to(torch.bfloat16) if rounded else sample).float().cpu().numpy()
        h.update(name.encode() + str(tuple(p.shape)).encode() + sample.tobytes())
        if not rounded:
            h.update(np.float64(flat.double().sum().item()).tobytes())
    return h.hexdigest()[:16]


def model_digest(model: Any) -> dict:
    """``{"name_or_path", "weights"}`` of a model, or of a name or path not loaded yet (weights ``None``)."""
    if isinstance(model, str):
        return {"name_or_path": model, "weights": None}
    config = getattr(model, "config", None)
    return {"name_or_path": getattr(config, "_name_or_path", "") or type(model).__name__,
            "weights": weights_digest(model)}


def rows_digest(columns: Mapping[str, list]) -> str:
    """A digest of a dataset's content (a dict of columns), row order included."""
    h = hashlib.sha256()
    for name in sorted(columns):
        h.update(name.encode() + b"\0")
        for value in columns[name]:
            h.update(json.dumps(value, sort_keys=True, default=str).encode() + b"\0")
    return h.hexdigest()[:16]
