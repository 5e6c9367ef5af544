"""``LessSelector``: score a pool against target examples with ``dataset.map``, then select."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from . import selectors
from .callback import adapter_name_of
from .checkpoints import LessCheckpoint, find_checkpoints
from .data import EmptyCompletionError, collate, detect_format, encode_batch, pad_token_id
from .features import PerExampleGradients, batch_order, eval_mode, gradient_features
from .projection import RandomProjector
from .scores import less_score, normalize, subtask_index, weighted_sims
from .store import FeatureStore, check_compatible

logger = logging.getLogger(__name__)


def _columns(data: Any) -> dict[str, list]:
    """A ``datasets.Dataset``, a list of rows or a dict of columns -> a dict of columns."""
    if hasattr(data, "column_names") and hasattr(data, "to_dict"):
        return data.to_dict()
    if isinstance(data, Mapping):
        return {k: list(v) for k, v in data.items()}
    if isinstance(data, Sequence) and not isinstance(data, str):
        rows = list(data)
        if not rows:
            return {}
        return {k: [r[k] for r in rows] for k in rows[0]}
    raise TypeError(f"Expected a datasets.Dataset, a list of rows or a dict of columns, got {type(data)}.")


def model_identity(model: torch.nn.Module) -> dict:
    """Name, config hash and a weight checksum of the base model: features from two models never mix."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    h = hashlib.sha256()
    for name, p in base.named_parameters():
        if p.requires_grad:  # the adapter: identified by the checkpoints instead
            continue
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].float().cpu().numpy()
        h.update(name.encode() + str(tuple(p.shape)).encode() + sample.tobytes())
        h.update(np.float64(flat.double().sum().item()).tobytes())
    config = getattr(base, "config", None)
    return {
        "name_or_path": getattr(config, "_name_or_path", "") or type(base).__name__,
        "weights": h.hexdigest()[:16],
    }


class LessSelector:
    """Scores pool examples by LESS against target examples; a ``datasets.map`` callable.

    Args:
        model: the base model (a ``PreTrainedModel``, a name or path), or a ``PeftModel``
            carrying the warmup's LoRA adapter. A base model is wrapped in place with the
            adapter of the first warmup checkpoint.
        warmup_dir: the warmup's ``output_dir`` (with ``checkpoint-N/`` written by
            :class:`LessCallback`), or one checkpoint directory.
        targets: the few target-task examples, in any supported format (Dataset, rows, columns).
        tokenizer: needed unless the data is pre-tokenized; loaded from ``model`` when it is a path.
        proj_dim: d of the random projection; ``None`` keeps exact, unprojected gradients.
        proj_kind: ``"rademacher"`` (default) or ``"gaussian"``.
        proj_seed: the projection seed.
        max_length: truncation length in tokens.
        batch_size: examples per forward/backward pass while featurizing.
        subtask_column: a column of ``targets`` naming each example's subtask; ``less_score``
            is then the max over subtasks of the mean similarity within the subtask.
        checkpoints: warmup steps to use (default: all).
        device: where to compute (default: the model's device).
        projection_buffer_bytes: memory for exact features buffered before one projection
            (the random matrix is generated once per buffer, so larger is faster).

    Example:
        >>> selector = LessSelector(base_model, "warmup", targets, tokenizer=tok, proj_dim=8192)
        >>> scored = pool.map(selector, batched=True, batch_size=16)   # adds less_score, less_sims
        >>> subset = selector.select(scored, budget=0.05)
    """

    def __init__(
        self,
        model: torch.nn.Module | str,
        warmup_dir: str | os.PathLike,
        targets: Any,
        tokenizer=None,
        proj_dim: int | None = 8192,
        *,
        proj_kind: str = "rademacher",
        proj_seed: int = 0,
        max_length: int | None = 2048,
        batch_size: int = 8,
        subtask_column: str | None = None,
        checkpoints: Sequence[int] | None = None,
        device: str | torch.device | None = None,
        show_progress: bool = True,
        projection_buffer_bytes: int = 2**30,
    ):
        self.projection_buffer_bytes = int(projection_buffer_bytes)
        self.checkpoints: list[LessCheckpoint] = find_checkpoints(warmup_dir, checkpoints)
        self.warmup_dir = Path(warmup_dir)
        if isinstance(model, (str, os.PathLike)):
            from transformers import AutoModelForCausalLM, AutoTokenizer

            if tokenizer is None:
                tokenizer = AutoTokenizer.from_pretrained(model)
            model = AutoModelForCausalLM.from_pretrained(model)
        self.model = self._with_adapter(model)
        if device is not None:
            self.model.to(device)
        self.device = next(self.model.parameters()).device
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = int(batch_size)
        self.show_progress = show_progress
        self.grads = PerExampleGradients(self.model, self._adapter_name)
        self._adapter_states = [self._adapter_state(c) for c in self.checkpoints]
        self._moments = [c.moments() for c in self.checkpoints]
        for c, m in zip(self.checkpoints, self._moments):
            if set(m.exp_avg) != set(self.grads.keys):
                raise ValueError(
                    f"{c.path} holds Adam moments for {len(m.exp_avg)} parameters, the model has "
                    f"{len(self.grads.keys)} trainable ones: the model's adapter is not the warmup's.")
        self.projector = None if proj_dim is None else RandomProjector(self.grads.dim, proj_dim, proj_kind, proj_seed)
        self.identity = {
            "model": model_identity(self.model),
            "checkpoints": [{"step": c.step, "weight": c.weight, "digest": c.digest} for c in self.checkpoints],
            "projection": None if self.projector is None else self.projector.identity,
            "dim": self.grads.dim if proj_dim is None else proj_dim,
            "max_length": max_length,
        }
        columns = _columns(targets)
        if not columns or not next(iter(columns.values())):
            raise ValueError("targets is empty: LESS needs a few examples of the target task.")
        if subtask_column is not None and subtask_column not in columns:
            raise ValueError(f"subtask_column={subtask_column!r} is not a column of targets {sorted(columns)}.")
        self.subtask_ids, self.subtask_names = subtask_index(
            columns.pop(subtask_column) if subtask_column else None, len(next(iter(columns.values()))))
        encoded = self._encode(columns, "targets")
        self.num_targets = len(encoded)
        self.target_features = [self._features(encoded, i, adam=False, desc="target features")
                                for i in range(len(self.checkpoints))]
        self.fingerprint = hashlib.sha256(json.dumps({
            **self.identity,
            "targets": [hashlib.sha256(f.numpy().tobytes()).hexdigest() for f in self.target_features],
            "subtasks": self.subtask_ids.tolist(),
        }, sort_keys=True).encode()).hexdigest()[:16]

    # -- model and checkpoints -------------------------------------------------------------------

    def _with_adapter(self, model):
        from peft import PeftModel

        if isinstance(model, PeftModel):
            return model
        return PeftModel.from_pretrained(model, str(self.checkpoints[0].path), is_trainable=True)

    @property
    def _adapter_name(self) -> str | None:
        return adapter_name_of(self.model)

    def _adapter_state(self, ckpt: LessCheckpoint) -> dict[str, torch.Tensor]:
        path = ckpt.path / "adapter_model.safetensors"
        if not path.exists():
            raise FileNotFoundError(f"{ckpt.path} has no adapter_model.safetensors: is the warmup a LoRA run?")
        return load_file(str(path), device=str(self.device))

    def _load_checkpoint(self, i: int) -> None:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.model, self._adapter_states[i], adapter_name=self._adapter_name)
        missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
        if missing:
            raise ValueError(f"Checkpoint {self.checkpoints[i].path} lacks adapter weights {missing[:3]}.")

    # -- features --------------------------------------------------------------------------------

    def _encode(self, columns: Mapping[str, list], what: str) -> list[tuple[list[int], list[int]]]:
        fmt = detect_format(list(columns))
        try:
            return encode_batch(columns, self.tokenizer, self.max_length, fmt)
        except EmptyCompletionError as e:
            raise EmptyCompletionError(f"In the {what}: {e}") from None

    def _features(self, encoded, i: int, adam: bool, desc: str | None = None) -> torch.Tensor:
        """``(N, d)`` L2-normalised features of ``encoded`` at checkpoint ``i``, in input order."""
        self._load_checkpoint(i)
        out = torch.empty((len(encoded), self.identity["dim"]), dtype=torch.float32)
        groups = batch_order([len(ids) for ids, _ in encoded], self.batch_size)
        pad = pad_token_id(self.tokenizer) if self.tokenizer is not None else 0
        side = getattr(self.tokenizer, "padding_side", "right") or "right"
        bar = tqdm(total=len(encoded), desc=f"{desc} (step {self.checkpoints[i].step})", unit="ex",
                   disable=not (self.show_progress and desc))
        moments = self._moments[i] if adam else None
        # Generating the random matrix costs P x d whatever the batch, so exact features of
        # several micro-batches are buffered (within projection_buffer_bytes) and projected at
        # once; when not even one micro-batch fits, each parameter is projected as it is formed.
        per_row = 4 * self.grads.dim
        buffered = self.projector is not None and self.batch_size * per_row <= self.projection_buffer_bytes
        pending: list[tuple[list[int], torch.Tensor]] = []

        def flush():
            if pending:
                rows = [j for idx, _ in pending for j in idx]
                out[rows] = normalize(self.projector(torch.cat([f for _, f in pending]))).cpu()
                pending.clear()

        with eval_mode(self.model):
            for idx in groups:
                batch = {k: v.to(self.device) for k, v in collate([encoded[j] for j in idx], pad, side).items()}
                if buffered:
                    if (sum(len(g) for g, _ in pending) + len(idx)) * per_row > self.projection_buffer_bytes:
                        flush()
                    pending.append((idx, gradient_features(self.grads, batch, None, moments)))
                else:
                    out[idx] = normalize(gradient_features(self.grads, batch, self.projector, moments)).cpu()
                bar.update(len(idx))
            flush()
        bar.close()
        return out

    # -- datasets.map protocol -------------------------------------------------------------------

    def __call__(self, batch: Mapping[str, list]) -> dict[str, list]:
        """Score a batch of pool examples: returns ``less_score`` and ``less_sims``."""
        columns = {k: v for k, v in batch.items() if k not in ("less_score", "less_sims")}
        if not columns or not next(iter(columns.values())):
            return {"less_score": [], "less_sims": []}
        encoded = self._encode(columns, "pool batch")
        pool = [self._features(encoded, i, adam=True) for i in range(len(self.checkpoints))]
        sims = weighted_sims(pool, self.target_features, [c.weight for c in self.checkpoints])
        scores = less_score(sims, self.subtask_ids if len(self.subtask_names) > 1 else None)
        return {"less_score": scores.tolist(), "less_sims": sims.tolist()}

    # -- selection -------------------------------------------------------------------------------

    def order(self, scored, strategy: str = "topk", seed: int = 0) -> np.ndarray:
        """The full ordering of ``scored`` (a pool with ``less_score``) under ``strategy``."""
        if "less_score" not in scored.column_names:
            raise ValueError("The dataset has no 'less_score' column: score it first with "
                             "dataset.map(selector, batched=True).")
        return selectors.order(strategy, np.asarray(scored["less_score"], dtype=np.float64), seed)

    def select(self, scored, budget: int | float, strategy: str = "topk", seed: int = 0):
        """The selected rows of ``scored`` as a ``Dataset``, in selection order.

        Args:
            scored: the pool after ``map(selector, batched=True)``.
            budget: a count (int) or a fraction of the pool (float in (0, 1]).
            strategy: ``"topk"`` (LESS) or ``"random"``.
            seed: for seeded strategies.
        """
        k = selectors.resolve_budget(budget, len(scored))
        return scored.select(self.order(scored, strategy, seed)[:k].tolist())

    def filter_fn(self, scored, budget: int | float, strategy: str = "topk", seed: int = 0):
        """A predicate for ``scored.filter(fn, with_indices=True)`` keeping the rows ``select`` keeps."""
        k = selectors.resolve_budget(budget, len(scored))
        keep = frozenset(self.order(scored, strategy, seed)[:k].tolist())

        def keep_row(example, idx):
            return idx in keep

        return keep_row

    # -- feature store ---------------------------------------------------------------------------

    def featurize(self, dataset, store_dir: str | os.PathLike, shard_rows: int = 4096,
                  dtype: str = "float16") -> FeatureStore:
        """Write the pool's Adam-direction features at every checkpoint into a feature store.

        Resumes an interrupted run in the same ``store_dir`` from its last complete shard.
        """
        meta = {**self.identity, "representation": "less-adam", "dtype": dtype,
                "rows": len(dataset), "fingerprint": getattr(dataset, "_fingerprint", None)}
        store = FeatureStore.create(store_dir, meta)
        done = store.num_rows
        bar = tqdm(total=len(dataset), initial=done, desc="pool features", unit="ex", disable=not self.show_progress)
        for start in range(done, len(dataset), shard_rows):
            rows = dataset.select(range(start, min(len(dataset), start + shard_rows)))
            encoded = self._encode(rows.to_dict(), f"pool rows {start}..")
            store.write_shard({c.step: self._features(encoded, i, adam=True).numpy()
                               for i, c in enumerate(self.checkpoints)})
            bar.update(len(encoded))
        bar.close()
        store.finish()
        return store

    def score_store(self, store: FeatureStore | str | os.PathLike, chunk_rows: int = 65536) -> tuple[np.ndarray, np.ndarray]:
        """``(less_score (N,), less_sims (N, T))`` of a pool feature store against these targets."""
        store = store if isinstance(store, FeatureStore) else FeatureStore(store)
        check_compatible(store.meta, self.identity)
        if not store.complete:
            raise ValueError(f"The feature store {str(store.root)!r} is incomplete; finish featurize() first.")
        arrays = [store.features(c.step) for c in self.checkpoints]
        n = len(arrays[0])
        scores = np.empty(n, dtype=np.float32)
        sims = np.empty((n, self.num_targets), dtype=np.float32)
        weights = [c.weight for c in self.checkpoints]
        multi = self.subtask_ids if len(self.subtask_names) > 1 else None
        for start in range(0, n, chunk_rows):
            stop = min(n, start + chunk_rows)
            pool = [torch.from_numpy(a.read(start, stop).astype(np.float32)) for a in arrays]
            s = weighted_sims(pool, self.target_features, weights)
            sims[start:stop] = s.numpy()
            scores[start:stop] = less_score(s, multi).numpy()
        return scores, sims


def _register_datasets_hash() -> None:
    """Make ``datasets`` fingerprint a selector by its identity (model, warmup, projection, targets).

    Without this, ``map`` would hash the whole model (slow) and could not tell two selectors
    apart only by their state; with it, a map against other targets or another warmup never
    reuses cached scores, and an identical selector reuses them.
    """
    try:
        from datasets.utils._dill import pklregister
    except ImportError:  # datasets changed its internals: fall back to hashing the whole object
        return

    @pklregister(LessSelector)
    def _save(pickler, obj):
        pickler.save(("hf_less.LessSelector", obj.fingerprint))


_register_datasets_hash()
