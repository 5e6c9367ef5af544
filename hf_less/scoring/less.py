"""``LessSelector``: score a pool against target examples with ``dataset.map``, then select."""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from ..data import detect_format, empty_rows
from ..gradients.featurizer import (
    Featurizer,
    NonFiniteFeatureError,
    adapter_name_of,
    base_model_record,
    content_key,
    content_keys,
)
from ..gradients.projection import DEFAULT_KIND
from ..gradients.quantize import QUANTIZED_FORMATS, IntTargets, check_format, cosine_rows, integer_product
from ..gradients.state import LessCheckpoint, check_base_model, find_checkpoints
from ..gradients.store import META_FILE, FeatureStore, IncompatibleFeaturesError, StoreWriter, check_compatible
from ..gradients.streaming import RowReader, expected_rows, known_rows, num_rows
from ..utils import distributed
from ..utils.identity import tokenizer_identity
from .base import TargetScorer, check_batched, fingerprint_of, load_causal_lm, register_datasets_hash, target_columns
from .hubness import HubCorrection, chunks_of
from .similarity import less_score, subtask_index, weighted_sims

logger = logging.getLogger(__name__)

# What captured features must share with the selector that reuses them.
CAPTURE_KEYS = ("model", "checkpoints", "projection", "dim", "max_length", "pool_direction")
NO_CAPTURE_FIX = ("A selector with the capture's settings (proj_dim, proj_kind, proj_seed, max_length, "
                  "pool_direction, the same base model) reuses them.")


class LessSelector(TargetScorer):
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
        proj_kind: ``"rowshift"``, ``"sparse"`` (both matrix-free, cost independent of d), ``"rademacher"``
            (the reference's dense matrix) or ``"gaussian"``; the default is
            :data:`hf_less.gradients.projection.DEFAULT_KIND`; see :mod:`hf_less.gradients.projection`.
        proj_seed: the projection seed.
        max_length: truncation length in tokens.
        batch_size: examples per forward/backward pass while featurizing, or ``"auto"`` (on CUDA the
            largest that fits; see :class:`hf_less.gradients.featurizer.Featurizer`).
        autocast: featurize under bfloat16 autocast (default off: the precision of the model's weights).
        pool_direction: ``"adam"`` (default: LESS's Adam direction for pool examples) or ``"sgd"`` (their
            plain gradient, an ablation); see :class:`hf_less.gradients.featurizer.Featurizer`.
        compile_projection: the row-shift projection (and the Adam direction before it) as one
            ``torch.compile``'d pass; the same features to float32 rounding (see
            :class:`hf_less.gradients.featurizer.Featurizer`).
        subtask_column: a column of ``targets`` naming each example's subtask; ``less_score``
            is then the max over subtasks of the mean similarity within the subtask.
        checkpoints: warmup steps to use (default: all).
        device: where to compute (default: the model's device).
        projection_buffer_bytes: memory for exact features buffered before one projection
            (the random matrix is generated once per buffer, so larger is faster).
        on_empty_completion: what to do with an example that has no completion token (none at
            all, or none left after truncation to ``max_length``): ``"error"`` (default) stops and
            names it; ``"skip"`` scores a pool example ``-inf`` (``less_sims`` all ``-inf``; never
            selected by any strategy) and drops a target example with a warning.
        hub_correction: ``None`` (default: LESS as published), ``"center"``, ``"pca"`` or ``"csls"``: a
            correction of hubness (a few pool rows near every target), see :mod:`hf_less.scoring.hubness`.
            ``"center"`` and ``"pca"`` need the pool's statistics: they are taken from the pool features
            captured during the warmup, or from the store :meth:`score_store` scores (or
            :meth:`fit_hub_statistics`), in one pass over each checkpoint's features.
        hub_pca_components, hub_pca_method: ``"pca"``: how many top principal components to remove, and
            how to find them (``"auto"``, ``"covariance"``, ``"randomized"``; costs in :mod:`hf_less.scoring.hubness`).
        hub_csls_k: ``"csls"``: a pool row's penalty is its mean similarity to its ``k`` nearest reference targets.
        hub_csls_reference: ``"csls"``: the reference targets (e.g. other tasks' target examples, in any
            target format); default the targets themselves.

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
        proj_kind: str = DEFAULT_KIND,
        proj_seed: int = 0,
        max_length: int | None = 2048,
        batch_size: int | str = 8,
        autocast: bool = False,
        pool_direction: str = "adam",
        compile_projection: bool = False,
        subtask_column: str | None = None,
        checkpoints: Sequence[int] | None = None,
        device: str | torch.device | None = None,
        show_progress: bool = True,
        projection_buffer_bytes: int = 2**30,
        use_captured: bool = True,
        on_empty_completion: str = "error",
        hub_correction: str | None = None,
        hub_pca_components: int = 1,
        hub_pca_method: str = "auto",
        hub_csls_k: int = 10,
        hub_csls_reference: Any = None,
    ):
        self.hub = HubCorrection(hub_correction, hub_pca_components, hub_pca_method, hub_csls_k)
        if hub_csls_reference is not None and hub_correction != "csls":
            raise ValueError(f"hub_csls_reference is the reference set of hub_correction='csls'; it was given with "
                             f"hub_correction={hub_correction!r}. Drop it, or set hub_correction='csls'.")
        self.checkpoints: list[LessCheckpoint] = find_checkpoints(warmup_dir, checkpoints)
        self.warmup_dir = Path(warmup_dir)
        model, tokenizer = load_causal_lm(model, tokenizer)
        self.model = self._with_adapter(model)
        if device is not None:
            self.model.to(device)
        self.device = next(self.model.parameters()).device
        self.tokenizer = tokenizer
        self.show_progress = show_progress
        self.featurizer = Featurizer(
            self.model, tokenizer, proj_dim, proj_kind=proj_kind, proj_seed=proj_seed, max_length=max_length,
            batch_size=batch_size, projection_buffer_bytes=projection_buffer_bytes, show_progress=show_progress,
            on_empty_completion=on_empty_completion, autocast=autocast, pool_direction=pool_direction,
            compile_projection=compile_projection)
        self.grads = self.featurizer.grads
        check_base_model(self.checkpoints, self.featurizer.identity["model"],
                         lambda: base_model_record(self.model)["weights_bf16"],
                         fix="the CLI: the --model of `hf-less warmup`; the API: the model the warmup's Trainer trained")
        self._adapter_states: dict[int, dict[str, torch.Tensor]] = {}
        self._loaded: int | None = None
        self._moments = [c.moments() for c in self.checkpoints]
        for c, m in zip(self.checkpoints, self._moments):
            if set(m.exp_avg) != set(self.grads.keys):
                raise ValueError(
                    f"{c.path} holds Adam moments for {len(m.exp_avg)} parameters, the model has "
                    f"{len(self.grads.keys)} trainable ones: the model's adapter is not the warmup's.")
        self.identity = {
            **self.featurizer.identity,
            "checkpoints": [{"step": c.step, "weight": c.weight, "digest": c.digest} for c in self.checkpoints],
        }
        self.use_captured = use_captured
        self._captured_pool = [self._captured(c, "pool") for c in self.checkpoints]
        columns, labels = target_columns(targets, subtask_column)
        encoded = self.featurizer.encode(columns, "targets")
        # The target rows kept (on_empty_completion="skip" drops those with no completion token).
        empty = set(empty_rows(encoded))
        if empty:
            if len(empty) == len(encoded):
                raise ValueError(f"None of the {len(encoded)} target examples has a completion token left to "
                                 f"score (max_length={max_length}); raise max_length or fix the targets.")
            warnings.warn(f"Target examples {sorted(empty)} have no completion token to score and are left out "
                          "(on_empty_completion='skip'); less_sims has one column per remaining target.",
                          stacklevel=2)
        self.target_rows = [j for j in range(len(encoded)) if j not in empty]
        encoded = [encoded[j] for j in self.target_rows]
        self.subtask_ids, self.subtask_names = subtask_index(
            None if labels is None else [labels[j] for j in self.target_rows], len(encoded))
        self._target_keys = {content_key(e) for e in encoded}
        self._warned_overlap = False
        self.num_targets = len(encoded)
        self.target_features = [self._target_features(encoded, i) for i in range(len(self.checkpoints))]
        self.hub_reference = None  # per checkpoint (R, d) features of the CSLS reference targets
        if hub_csls_reference is not None:
            ref = self.featurizer.encode(target_columns(hub_csls_reference, None)[0], "hub_csls_reference")
            self.hub_reference = [self._target_features(ref, i) for i in range(len(self.checkpoints))]
        if self.hub.kind == "csls":
            n_ref = len((self.hub_reference or self.target_features)[0])
            if self.hub.csls_k > n_ref:
                raise ValueError(
                    f"hub_csls_k={self.hub.csls_k} is more than the {n_ref} CSLS reference target(s) "
                    f"({'hub_csls_reference' if self.hub_reference else 'the targets'}): lower hub_csls_k, or pass "
                    "more reference targets (e.g. other tasks' target examples) as hub_csls_reference.")
        # The tokenizer too: a pool mapped after a chat-template change is tokenized differently, so
        # scores cached under the old template must not be reused.
        self._fingerprint_identity = {
            **self.identity,
            "targets": [hashlib.sha256(f.numpy().tobytes()).hexdigest() for f in self.target_features],
            "subtasks": self.subtask_ids.tolist(),
            "tokenizer": tokenizer_identity(tokenizer),
        }
        if self.hub_reference is not None:
            self._fingerprint_identity["hub_reference"] = [
                hashlib.sha256(f.numpy().tobytes()).hexdigest() for f in self.hub_reference]
        if self.hub.needs_statistics and self.has_captured_pool:
            self._fit_hub([(store, c.step) for (store, _), c in zip(self._captured_pool, self.checkpoints)])
        self._set_fingerprint()

    def _set_fingerprint(self) -> None:
        # the hub correction and its pool statistics are part of the scores' identity (no key without one)
        hub = self.hub.identity()
        self.fingerprint = fingerprint_of({**self._fingerprint_identity, **({"hub": hub} if hub else {})})

    def _fit_hub(self, stores: Sequence[tuple[FeatureStore, int]], chunk_rows: int = 16384) -> None:
        """The hub correction's pool statistics: one pass over each checkpoint's ``(store, step)`` features."""
        streams = []
        for store, step in stores:
            a = store.features(step)
            streams.append(chunks_of(a.read, len(a), chunk_rows, store.skipped_rows()))
        self.hub.fit(streams)
        self._set_fingerprint()

    def fit_hub_statistics(self, store: FeatureStore | str | os.PathLike, chunk_rows: int = 16384) -> None:
        """Take the pool statistics of ``hub_correction="center"``/``"pca"`` from a pool feature store (one
        pass over each checkpoint's features); ``map`` then applies them. :meth:`score_store` does this itself."""
        store = store if isinstance(store, FeatureStore) else FeatureStore(store)
        check_compatible(store.meta, self.identity)
        if not store.complete:
            raise ValueError(f"The feature store {str(store.root)!r} is incomplete; finish featurize() first.")
        self._fit_hub([(store, c.step) for c in self.checkpoints], chunk_rows)

    def _hub_sims(self, pool: list[torch.Tensor], precision: str = "float32") -> torch.Tensor:
        """``(B, T)`` less_sims of per-checkpoint ``(B, d)`` pool features, with the hub correction."""
        if self.hub.needs_statistics and self.hub.statistics is None:
            what = "mean feature and top components" if self.hub.kind == "pca" else "mean feature"
            raise ValueError(
                f"hub_correction={self.hub.kind!r} needs the whole pool's {what}, and this selector has no "
                "captured pool features to take them from. Featurize the pool into a "
                "store and score it with score_store(store), or call fit_hub_statistics(store) before map.")
        weights = [c.weight for c in self.checkpoints]
        pool = self.hub.pool(pool)
        s = weighted_sims(pool, self.target_features, weights, precision)
        ref = None if self.hub_reference is None else weighted_sims(pool, self.hub_reference, weights, precision)
        return self.hub.sims(s, ref)

    @property
    def has_captured_pool(self) -> bool:
        """Whether every checkpoint has pool features captured during the warmup with these settings."""
        return all(c is not None for c in self._captured_pool)

    @property
    def batch_size(self) -> int:
        return self.featurizer.batch_size

    @property
    def projector(self):
        return self.featurizer.projector

    # -- model and checkpoints -------------------------------------------------------------------

    def _with_adapter(self, model):
        from peft import PeftModel

        if isinstance(model, PeftModel):
            return model
        return PeftModel.from_pretrained(model, str(self.checkpoints[0].path), is_trainable=True)

    def _load_checkpoint(self, i: int) -> None:
        """Put checkpoint ``i``'s adapter weights into the model (loaded from disk once)."""
        from peft import set_peft_model_state_dict

        if self._loaded == i:
            return
        if i not in self._adapter_states:
            path = self.checkpoints[i].path / "adapter_model.safetensors"
            if not path.exists():
                raise FileNotFoundError(f"{self.checkpoints[i].path} has no adapter_model.safetensors: "
                                        "is the warmup a LoRA run?")
            self._adapter_states[i] = load_file(str(path), device=str(self.device))
        result = set_peft_model_state_dict(self.model, self._adapter_states[i], adapter_name=adapter_name_of(self.model))
        missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
        if missing:
            raise ValueError(f"Checkpoint {self.checkpoints[i].path} lacks adapter weights {missing[:3]}.")
        self._loaded = i

    # -- features --------------------------------------------------------------------------------

    def _captured(self, ckpt: LessCheckpoint, which: str) -> tuple[FeatureStore, dict[bytes, int]] | None:
        """The features ``LessCallback`` captured at ``ckpt`` with these settings, or ``None``."""
        root = ckpt.captured(which)
        if not self.use_captured or not (root / META_FILE).exists():
            return None
        store = FeatureStore(root)
        if not store.complete:
            logger.warning("Ignoring the incomplete captured features in %s (the capture was interrupted).", root)
            return None
        expected = {**self.featurizer.identity, "checkpoints": [{"step": ckpt.step, "digest": ckpt.digest}]}
        try:
            check_compatible(store.meta, expected, what=f"captured {which} features in {str(root)!r} and this selector",
                             keys=CAPTURE_KEYS, fix=NO_CAPTURE_FIX)
        except IncompatibleFeaturesError as e:
            # Another projection, max_length, pool direction...: not these features. Left in place (a selector
            # with the capture's settings still reads them) and computed anew.
            logger.warning("Setting aside the captured %s features of checkpoint %s: %s They are computed anew "
                           "with this selector's settings.", which, ckpt.path.name, e)
            return None
        return store, store.key_index()

    def _target_features(self, encoded, i: int) -> torch.Tensor:
        captured = self._captured(self.checkpoints[i], "targets")
        if captured is not None:
            store, index = captured
            rows = [index.get(content_key(e)) for e in encoded]
            if all(r is not None for r in rows):
                return torch.from_numpy(store.features(self.checkpoints[i].step).take(rows).astype(np.float32))
        self._load_checkpoint(i)
        try:
            return self.featurizer(encoded, None, desc=f"target features (step {self.checkpoints[i].step})")
        except NonFiniteFeatureError as e:
            raise e.at([self.target_rows[r] for r in e.rows], "the targets") from None

    def _pool_features(self, encoded, i: int, desc: str | None = None, split: bool = False) -> torch.Tensor:
        """``(N, d)`` Adam-direction features at checkpoint ``i``: captured rows read, the rest computed."""
        out = torch.empty((len(encoded), self.featurizer.dim), dtype=torch.float32)
        todo = list(range(len(encoded)))
        captured = self._captured_pool[i]
        if captured is not None:
            store, index = captured
            rows = [index.get(content_key(e)) for e in encoded]
            found = [j for j, r in enumerate(rows) if r is not None]
            if found:
                arr = store.features(self.checkpoints[i].step).take([rows[j] for j in found])
                out[found] = torch.from_numpy(arr.astype(np.float32))
            todo = [j for j, r in enumerate(rows) if r is None]
        if todo or split:  # under split every process must take part, even with nothing to do
            self._load_checkpoint(i)
            try:
                out[todo] = self.featurizer([encoded[j] for j in todo], self._moments[i], desc=desc, split=split)
            except NonFiniteFeatureError as e:
                raise e.at([todo[r] for r in e.rows], e.context) from None
        return out

    def _scorable(self, encoded, where: str) -> list[int]:
        """Rows of ``encoded`` with a completion token; warns once if target examples are in the pool."""
        if not self._warned_overlap:
            dup = [j for j, e in enumerate(encoded) if content_key(e) in self._target_keys]
            if dup:
                self._warned_overlap = True
                warnings.warn(
                    f"{len(dup)} pool example(s) ({where}: rows {dup[:5]}) are also target examples: their "
                    "similarity to themselves inflates their scores, and selecting them trains on the targets. "
                    "Remove the targets from the pool (e.g. pool.filter on a held-out id) to select fairly.",
                    stacklevel=3)
        empty = set(empty_rows(encoded))
        return [j for j in range(len(encoded)) if j not in empty]

    # -- datasets.map protocol -------------------------------------------------------------------

    def __call__(self, batch: Mapping[str, list]) -> dict[str, list]:
        """Score a batch of pool examples: returns ``less_score`` and ``less_sims``."""
        columns = {k: v for k, v in batch.items() if k not in ("less_score", "less_sims")}
        check_batched(columns, "LessSelector")
        if not columns or not next(iter(columns.values())):
            return {"less_score": [], "less_sims": []}
        encoded = self.featurizer.encode(columns, "pool batch")
        ok = self._scorable(encoded, "this map batch")
        sims = torch.full((len(encoded), self.num_targets), float("-inf"))
        scores = torch.full((len(encoded),), float("-inf"))
        if ok:
            try:
                pool = [self._pool_features([encoded[j] for j in ok], i) for i in range(len(self.checkpoints))]
            except NonFiniteFeatureError as e:
                raise e.at([ok[r] for r in e.rows], "this map batch of the pool (rows counted from the "
                           "batch's first)") from None
            s = self._hub_sims(pool)
            sims[ok] = s
            scores[ok] = less_score(s, self.subtask_ids if len(self.subtask_names) > 1 else None)
        return {"less_score": scores.tolist(), "less_sims": sims.tolist()}

    def score(self, dataset, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """``(less_score (N,), less_sims (N, T))`` of a whole pool, without writing a dataset."""
        n = len(dataset)
        scores = np.empty(n, dtype=np.float32)
        sims = np.empty((n, self.num_targets), dtype=np.float32)
        bar = tqdm(total=n, desc="scoring pool", unit="ex", disable=not self.show_progress)
        for start in range(0, n, batch_size):
            stop = min(n, start + batch_size)
            out = self(dataset[start:stop])
            scores[start:stop], sims[start:stop] = out["less_score"], out["less_sims"]
            bar.update(stop - start)
        bar.close()
        return scores, sims

    # -- feature store ---------------------------------------------------------------------------

    def featurize(self, dataset, store_dir: str | os.PathLike, shard_rows: int = 4096,
                  dtype: str = "float16") -> FeatureStore | None:
        """Write the pool's Adam-direction features at every checkpoint into a feature store.

        ``dataset`` is a ``datasets.Dataset``, a ``datasets.IterableDataset`` (``load_dataset(...,
        streaming=True)``), a dict of columns, or any iterable of rows: it is read ``shard_rows``
        rows at a time and only the current shard is tokenized and held, so a pool larger than
        memory works (a stream's row count goes into the store when it ends).

        Resumes an interrupted run in the same ``store_dir`` from its last complete shard (a
        stream is read again from its start: the rows already stored are skipped after their
        content is checked). Under ``torchrun`` / ``accelerate launch`` call it on every process
        with the same pool: each reads it, computes its share of every shard and the main process
        writes the store (and returns it; others return ``None``). Rows carry content keys, so a
        selector with the same settings reuses them by content.

        ``dtype`` is the store format: ``"float16"`` (default), ``"float32"``, or a quantized one
        packed as it is written, ``"int8"``, ``"int4"`` (per-row absmax scale) or ``"1bit"`` (signs);
        see :mod:`hf_less.gradients.quantize`. A store is resumed only in its own format.
        """
        if int(shard_rows) < 1:
            raise ValueError(f"shard_rows must be >= 1, got {shard_rows}.")
        dtype = check_format(dtype)  # an unknown format fails before any example is featurized
        shard_rows = int(shard_rows)
        # Several nodes: every process computes with the warmup checkpoints it read; they must be the same ones.
        distributed.check_same([(c.step, c.digest) for c in self.checkpoints], "the warmup checkpoints")
        reader = RowReader(dataset, shard_rows)
        columns = reader.columns()  # reads the first rows ahead: nothing is written before they are checked
        if columns is None:
            raise ValueError("The pool is empty: there is nothing to featurize. Pass the candidate examples.")
        detect_format(columns)  # an unrecognised format fails before anything is written
        meta = {**self.identity, "representation": self.featurizer.pool_representation, "dtype": dtype, "keyed": True,
                "rows": known_rows(dataset), "fingerprint": getattr(dataset, "_fingerprint", None)}
        writer = StoreWriter(lambda: FeatureStore.create(store_dir, meta), "pool features", self.show_progress,
                             unknown_total=expected_rows(dataset))
        with writer:  # an error lets go of the store (its lock), keeping what is written
            done, rows = writer.done, writer.rows
            if done and distributed.on_main(lambda: writer.store.complete):
                # Featurized already: reused if it holds this pool's rows (in any order; score_store matches
                # them by content key), refused otherwise.
                try:
                    distributed.on_main(lambda: self._check_complete_store(writer.store, dataset))
                finally:
                    writer.abandon()
                distributed.barrier()
                return writer.store
            if done:
                self._check_resumed_rows(reader, writer.store, done, shard_rows)
            start = done
            while batch := reader.take(shard_rows):
                n = num_rows(batch)
                if rows is not None and start + n > rows:  # a store begun for a shorter pool
                    raise IncompatibleFeaturesError(
                        f"Cannot resume {str(store_dir)!r}: it holds features of a pool of {rows} rows and this pool "
                        f"has more (the pool changed since the interrupted run). Use another store_dir, or delete "
                        "this one to recompute.")
                where = f"pool rows {start}.."
                encoded = self.featurizer.encode(batch, where)
                del batch  # only the encoded shard is needed from here
                ok = self._scorable(encoded, where)
                try:
                    per_step = {c.step: self._pool_features([encoded[j] for j in ok], i, split=True).numpy()
                                for i, c in enumerate(self.checkpoints)}
                except NonFiniteFeatureError as e:
                    raise e.at([start + ok[r] for r in e.rows], "the pool (dataset row indices)") from None
                if len(ok) < len(encoded):  # skipped rows keep their place, with zero features
                    for step, feats in per_step.items():
                        full = np.zeros((len(encoded), feats.shape[1]), dtype=feats.dtype)
                        full[ok] = feats
                        per_step[step] = full
                writer.write(per_step, encoded, skipped=sorted(set(range(len(encoded))) - set(ok)), rows_read=n)
                start += n
            if rows is not None and start < rows:
                raise IncompatibleFeaturesError(
                    f"Cannot finish {str(store_dir)!r}: it was begun for a pool of {rows} rows and this pool has "
                    f"{start} (the pool changed since the interrupted run). Use another store_dir, or delete this one "
                    "to recompute.")
            if done:
                logger.info("Resumed %s: %d rows kept from the interrupted run, %d computed.", store_dir, done,
                            start - done)
            writer.close()
        distributed.barrier()
        return writer.store

    def _check_complete_store(self, store: FeatureStore, dataset) -> None:
        """Refuse a complete store that lacks features for some row of ``dataset``, naming the fix."""
        try:
            self.store_rows(store, dataset)
        except IncompatibleFeaturesError as e:
            raise IncompatibleFeaturesError(
                f"{e} The store is complete: delete {str(store.root)!r} (or choose another store_dir) and featurize "
                "again.") from None

    def _check_resumed_rows(self, reader: RowReader, store: FeatureStore | None, done: int, chunk: int) -> None:
        """Read past the pool's first ``done`` rows, ``chunk`` at a time, refusing to resume a store
        whose rows are other examples. Collective: the main process (which has ``store``) checks."""
        keys = store.keys() if store is not None else None
        for start in range(0, done, chunk):
            stop = min(done, start + chunk)
            batch = reader.take(stop - start)

            def check() -> None:
                if num_rows(batch) < stop - start:
                    raise IncompatibleFeaturesError(
                        f"Cannot resume {str(store.root)!r}: it holds {done} rows and this pool has only "
                        f"{start + num_rows(batch)} (the pool changed since the interrupted run). Use another "
                        "store_dir, or delete this one to recompute.")
                encoded = self.featurizer.encode(batch, f"pool rows {start}..")
                mine = content_keys(encoded)
                bad = np.flatnonzero((mine != keys[start:stop]).any(1))
                if len(bad):
                    raise IncompatibleFeaturesError(
                        f"Cannot resume {str(store.root)!r}: its row {start + int(bad[0])} holds another example "
                        f"than row {start + int(bad[0])} of this pool (the pool changed since the interrupted run). "
                        "Use another store_dir, or delete this one to recompute.")

            distributed.on_main(check)

    def store_rows(self, store: FeatureStore, pool: Any, chunk_rows: int = 4096) -> np.ndarray | None:
        """The store row that holds each row of ``pool`` (matched by content key), or ``None`` when
        the store's rows are the pool's rows in the same order.

        Raises :class:`IncompatibleFeaturesError` naming the first row of ``pool`` that has no
        features in ``store`` (the pool was edited, or the store is another pool's). Tokenizes the
        pool, ``chunk_rows`` rows at a time (a small cost next to featurizing it).
        """
        if not store.keyed:
            rows = known_rows(pool)
            if rows is not None and rows != store.num_rows:
                raise IncompatibleFeaturesError(
                    f"The feature store {str(store.root)!r} holds {store.num_rows} rows and this pool has {rows}: "
                    "they describe different pools. Featurize this pool into a new store.")
            warnings.warn(f"The feature store {str(store.root)!r} has no content keys (written by an older hf-less): "
                          "its rows cannot be checked against the pool and are taken in order. Featurize the pool "
                          "again to have them checked.", stacklevel=3)
            return None
        stored = store.keys()
        reader, start, parts = RowReader(pool, chunk_rows), 0, []
        while batch := reader.take(chunk_rows):
            parts.append(content_keys(self.featurizer.encode(batch, f"pool rows {start}..")))
            start += num_rows(batch)
        mine = np.concatenate(parts) if parts else np.zeros((0, 16), dtype=np.uint8)
        if mine.shape == stored.shape and np.array_equal(mine, stored):
            return None
        index = store.key_index()
        rows = np.array([index.get(k.tobytes(), -1) for k in mine], dtype=np.int64)
        missing = np.flatnonzero(rows < 0)
        if len(missing):
            raise IncompatibleFeaturesError(
                f"The feature store {str(store.root)!r} holds features of another pool: {len(missing)} of the "
                f"{len(mine)} rows of this pool (the first: row {int(missing[0])}) have no features in it (the pool "
                "was edited or replaced after it was featurized). Scores are never attached by position: featurize "
                "this pool (LessSelector.featurize into a new store_dir, or `hf-less featurize` after deleting "
                "the store), or score the pool the store was made from.")
        if len(mine) == len(stored):
            logger.info("The pool's rows are the feature store's in another order: scores follow the pool's order.")
        return rows

    def score_store(self, store: FeatureStore | str | os.PathLike, pool: Any = None, chunk_rows: int = 16384,
                    precision: str = "float32") -> tuple[np.ndarray, np.ndarray]:
        """``(less_score (N,), less_sims (N, T))`` of a pool feature store against these targets.

        With ``pool`` (the dataset the scores are for; any format ``featurize`` takes) the rows are
        matched by content key: row ``i`` of the result is row ``i`` of ``pool``, whatever order the
        store was written in, and a pool row without features in the store raises
        :class:`IncompatibleFeaturesError` (see :meth:`store_rows`). Without ``pool``, rows are in
        the store's order (those of ``store.keys()``).

        ``precision="bfloat16"`` multiplies in bfloat16 (about 3x faster on a CPU with bf16 units;
        each cosine within 2^-8 of its value plus 1e-4): see :func:`hf_less.scoring.similarity.weighted_sims`.

        The store is read ``chunk_rows`` rows at a time (memory: about ``chunk_rows * d * 4`` bytes
        plus the result, whatever the pool size). A quantized store (int8, int4, 1bit) is scored
        from its packed rows, unpacked to int8 codes one chunk at a time and multiplied with the
        targets in integers (``precision`` does not apply): the cosine of each decoded pool row with
        the target features, within 1e-4 (see :mod:`hf_less.gradients.quantize`).
        """
        store = store if isinstance(store, FeatureStore) else FeatureStore(store)
        check_compatible(store.meta, self.identity)
        if not store.complete:
            raise ValueError(f"The feature store {str(store.root)!r} is incomplete; finish featurize() first.")
        rows = None if pool is None else self.store_rows(store, pool)
        if self.hub.needs_statistics:  # the statistics of the pool scored
            self._fit_hub([(store, c.step) for c in self.checkpoints], chunk_rows)
        scores, sims = score_store(store, self.target_features, [c.step for c in self.checkpoints],
                                   [c.weight for c in self.checkpoints],
                                   self.subtask_ids if len(self.subtask_names) > 1 else None, chunk_rows, precision,
                                   hub=self.hub if self.hub.kind is not None else None,
                                   reference_features=self.hub_reference)
        return (scores, sims) if rows is None else (scores[rows], sims[rows])


def score_store(store: FeatureStore, target_features: Sequence[torch.Tensor], steps: Sequence[int],
                weights: Sequence[float], subtask_ids: torch.Tensor | None = None, chunk_rows: int = 16384,
                precision: str = "float32", integer: bool | None = None, hub: HubCorrection | None = None,
                reference_features: Sequence[torch.Tensor] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The scoring loop of :meth:`LessSelector.score_store`, without the checks of the store's identity.

    Args:
        store: a complete pool feature store.
        target_features: per checkpoint, ``(T, d)`` float target features.
        steps, weights: per checkpoint, its step in the store and its weight ``w_i``.
        subtask_ids: ``(T,)`` subtask of each target (``None``: one subtask).
        integer: multiply a quantized store's codes in integers (``None``: whenever
            :func:`hf_less.gradients.quantize.integer_product` allows), or unpack them to float32 (``False``).
            ``"center"``/``"pca"`` corrections always take the float path (they change the pool rows).
        hub: a hubness correction (its pool statistics fitted for ``"center"``/``"pca"``), applied to
            each checkpoint's pool rows, then to the summed similarities (``"csls"``).
        reference_features: ``"csls"``: per checkpoint, ``(R, d)`` reference target features
            (``None``: the targets themselves).
    Returns:
        ``(less_score (N,), less_sims (N, T))`` float32; skipped rows ``-inf``.
    """
    arrays = [store.features(step) for step in steps]
    n = len(arrays[0])
    scores = np.empty(n, dtype=np.float32)
    sims = np.empty((n, len(target_features[0])), dtype=np.float32)
    reshape = hub is not None and hub.needs_statistics
    ints = not reshape and (integer_product(store.format, arrays[0].dim) if integer is None
                            else bool(integer) and store.format in QUANTIZED_FORMATS)
    refs = reference_features if hub is not None and hub.kind == "csls" else None
    targets = [IntTargets(t) for t in target_features] if ints else list(target_features)
    references = None if refs is None else [IntTargets(t) for t in refs] if ints else list(refs)
    fmt, dim = store.format, arrays[0].dim

    # (chunk, checkpoint) pairs in reading order; the next pair's rows are read by a thread while this one's
    # are multiplied (file reads release the GIL): scoring takes about the longer of the two, not their sum,
    # and holds two checkpoints' chunks of stored rows at most.
    units = [(start, i) for start in range(0, n, chunk_rows) for i in range(len(arrays))]

    def read(u: int) -> np.ndarray:
        start, i = units[u]
        return arrays[i].read_raw(start, min(n, start + chunk_rows))

    with ThreadPoolExecutor(1) as reader:
        ahead = reader.submit(read, 0) if units else None
        s: torch.Tensor | None = None
        r: torch.Tensor | None = None  # the same sums against the csls reference targets
        for u, (start, i) in enumerate(units):
            raw = ahead.result()
            if u + 1 < len(units):
                ahead = reader.submit(read, u + 1)
            # A quantized store: its packed rows as int8 codes times the targets in integers; a float one: a
            # float product (see hf_less.gradients.quantize).
            if ints:
                part = targets[i].cosines(raw, fmt).mul_(float(weights[i]))
                ref = None if references is None else references[i].cosines(raw, fmt).mul_(float(weights[i]))
            else:
                rows = cosine_rows(raw, fmt, dim)
                if reshape:
                    rows = hub.checkpoint_pool(rows, i)  # scale-free: codes are multiples of the decoded rows
                part = weighted_sims([rows], [targets[i]], [weights[i]], precision)
                ref = None if references is None else weighted_sims([rows], [references[i]], [weights[i]], precision)
            del raw
            s = part if i == 0 else s.add_(part)
            if ref is not None:
                r = ref if i == 0 else r.add_(ref)
            if i == len(arrays) - 1:
                stop = min(n, start + chunk_rows)
                if hub is not None:
                    s = hub.sims(s, r)
                sims[start:stop] = s.numpy()
                scores[start:stop] = less_score(s, subtask_ids).numpy()
    skipped = store.skipped_rows()
    scores[skipped], sims[skipped] = -np.inf, -np.inf  # no completion token: never selected
    return scores, sims


register_datasets_hash(LessSelector, "hf_less.LessSelector")
