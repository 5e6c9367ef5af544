"""``Featurizer``: encoded examples -> projected, L2-normalised gradient features, with the live model.

The one place where examples meet the model. ``LessSelector`` (after the warmup, checkpoint by
checkpoint) and ``LessCallback`` (during the warmup, at each save) both use it, so features
captured during training and features computed afterwards are the same numbers.

Work is cut into *units*. With a dense projection a unit is consecutive length-sorted
micro-batches whose exact gradients fit in ``projection_buffer_bytes`` and are projected together
(generating the random matrix costs P x d whatever the number of rows, so projecting several
batches at once is cheaper); with a matrix-free projection (row-shift, sparse) or exact features, one batch. Units
depend only on the examples, ``batch_size`` and the buffer, never on the number of processes:
under ``torchrun``/``accelerate launch`` unit ``u`` runs on rank ``u % world_size`` and every
feature is bit-identical to a single-process run.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.profiler import record_function
from tqdm.auto import tqdm

from ..data import check_on_empty, collate, detect_format, encode_batch, pad_token_id, padding_side
from ..utils import distributed
from ..utils.identity import weights_digest
from ..utils.tensors import normalize
from .per_example import AdamMoments, PerExampleGradients, batch_order, eval_mode, gradient_features
from .projection import DEFAULT_KIND, SPARSE_NNZ, make_projector

logger = logging.getLogger(__name__)

# batch_size="auto": the batch size on a CPU (batching there barely beats one example at a time), and
# the first size tried on a GPU before halving on out-of-memory errors.
CPU_BATCH_SIZE = 8
AUTO_BATCH_START = 128
# What a pool example's feature is: LESS's Adam direction Gamma (the reference's), or its plain gradient g.
POOL_DIRECTIONS = ("adam", "sgd")

Encoded = tuple[list[int], list[int]]  # (input_ids, labels with -100 on unscored tokens)


class NonFiniteFeatureError(FloatingPointError):
    """NaN or inf in an example's loss or gradient; ``rows`` are the examples, ``context`` where they are."""

    def __init__(self, rows: Sequence[int], context: str = "the examples being featurized", detail: str = ""):
        self.rows, self.context, self.detail = [int(r) for r in rows], context, detail
        super().__init__(
            f"NaN or inf in the loss or gradient of example(s) {self.rows} of {context}{detail}. Check those "
            "examples (labels, extreme lengths) and the model's weights for NaN/inf; on a GPU compute in "
            "float32 or bfloat16 rather than float16. Drop the examples (dataset.filter) to go on without them.")

    def at(self, rows: Sequence[int], context: str) -> "NonFiniteFeatureError":
        """The same error for the same examples, named in the caller's terms."""
        return NonFiniteFeatureError(rows, context, self.detail)


def check_proj_dim(proj_dim: int | None, proj_kind: str = DEFAULT_KIND, name: str = "proj_dim") -> None:
    """Refuse a projection dimension the projection cannot have, naming ``proj_dim`` (``name``), not its internals.

    ``None`` (exact features) is always fine; otherwise an int >= 1, and for the sparse kind at least
    :data:`~hf_less.gradients.projection.SPARSE_NNZ` (each coordinate goes to that many outputs).
    """
    if proj_dim is None:
        return
    if isinstance(proj_dim, bool) or not isinstance(proj_dim, int) or proj_dim < 1:
        raise ValueError(f"{name}={proj_dim!r} must be a positive int (LESS uses 8192), or None/0 for exact features.")
    if proj_kind == "sparse" and proj_dim < SPARSE_NNZ:
        raise ValueError(
            f"{name}={proj_dim} is too small for the sparse projection, which adds each gradient coordinate into "
            f"{SPARSE_NNZ} output coordinates: {name} must be at least {SPARSE_NNZ}. Use {name} >= {SPARSE_NNZ} "
            "(LESS uses 8192; 1024 to 8192 all select well), or another proj_kind.")


def check_compile_projection(compile_projection: bool, proj_dim: int | None, proj_kind: str,
                             prefix: str = "") -> None:
    """Refuse ``compile_projection`` where there is no row-shift projection to compile (``prefix``: "less_" in a config)."""
    if compile_projection and (proj_dim is None or proj_kind != "rowshift"):
        raise ValueError(f"{prefix}compile_projection compiles the row-shift projection: it needs "
                         f"{prefix}proj_kind='rowshift' and a {prefix}proj_dim (got {prefix}proj_kind={proj_kind!r}, "
                         f"{prefix}proj_dim={proj_dim!r}). Turn {prefix}compile_projection off for this kind.")


def find_batch_size(fits: Callable[[int], Any], start: int) -> int:
    """The largest of ``start, start / 2, ..., 1`` for which ``fits(size)`` runs without running out of memory.

    Out-of-memory errors are recognised as accelerate recognises them
    (:func:`accelerate.utils.memory.should_reduce_batch_size`); any other error is raised.
    """
    from accelerate.utils.memory import clear_device_cache, should_reduce_batch_size

    size = int(start)
    while True:
        try:
            fits(size)
            return size
        except Exception as e:  # noqa: BLE001 - re-raised below unless it is an out-of-memory error
            if size == 1 or not should_reduce_batch_size(e):
                raise
        clear_device_cache(garbage_collection=True)
        size //= 2


def adapter_name_of(model) -> str | None:
    """The active PEFT adapter's name (``"default"`` usually), or ``None`` for a plain model."""
    name = getattr(model, "active_adapter", None)
    if isinstance(name, (list, tuple)):
        name = name[0] if name else None
    return name if isinstance(name, str) else None


def content_key(example: Encoded) -> bytes:
    """16 bytes identifying an encoded example by content (its token ids and labels).

    Captured features are matched to pool rows by this key, so a shuffled, filtered or
    re-batched pool still finds its features.
    """
    ids, labels = example
    h = hashlib.blake2b(digest_size=16)
    h.update(np.asarray(ids, dtype=np.int64).tobytes())
    h.update(b"|")
    h.update(np.asarray(labels, dtype=np.int64).tobytes())
    return h.digest()


def content_keys(examples: Sequence[Encoded]) -> np.ndarray:
    """The :func:`content_key` of every example, packed as the store keeps them: ``(N, 16)`` uint8."""
    return np.frombuffer(b"".join(content_key(e) for e in examples), dtype=np.uint8).reshape(-1, 16)


def model_identity(model: torch.nn.Module) -> dict:
    """Name and a weight checksum of the frozen base model: features from two models never mix.

    Trainable parameters (the adapter) are left out: checkpoints identify those.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    return {
        "name_or_path": getattr(config, "_name_or_path", "") or type(base).__name__,
        "weights": weights_digest(base, frozen_only=True),
    }


def base_model_record(model: torch.nn.Module) -> dict:
    """What a warmup records of its base model (``less_state.json``'s ``"base_model"``).

    :func:`model_identity` plus the digest of the weights rounded to bfloat16 (``"weights_bf16"``)
    and their dtype, so a selector loading the same weights at another precision is recognised.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    frozen = [p for p in base.parameters() if not p.requires_grad]
    return {**model_identity(model), "weights_bf16": weights_digest(base, frozen_only=True, rounded=True),
            "dtype": str(frozen[0].dtype).replace("torch.", "") if frozen else None}


def rows_of(data: Any) -> dict[str, list]:
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


class Featurizer:
    """Per-example LESS features of a (PEFT LoRA) model in its current state.

    Args:
        model: the model whose trainable parameters are featurized (usually a ``PeftModel``).
        tokenizer: turns text formats into ids; ``None`` for pre-tokenized data.
        proj_dim: d of the random projection; ``None`` keeps the exact P-dimensional gradients.
        proj_kind, proj_seed: the projection (see :mod:`hf_less.gradients.projection`; :data:`DEFAULT_KIND`
            by default, ``"rademacher"`` is the reference's dense matrix).
        max_length: truncation length in tokens.
        batch_size: examples per forward/backward pass, or ``"auto"``: on CUDA the largest size from
            :data:`AUTO_BATCH_START` down that runs the longest examples without running out of memory
            (found once, on the first call; the smallest over all processes), on a CPU :data:`CPU_BATCH_SIZE`.
        projection_buffer_bytes: memory for exact gradients projected together.
        show_progress: tqdm bars (on the main process only).
        on_empty_completion: ``"error"`` (default) or ``"skip"``: what :meth:`encode` does with an
            example that has no completion token (see :func:`hf_less.data.encode_batch`).
        autocast: run the forward/backward under bfloat16 autocast (default off: the precision of
            the model's weights, so float32 weights give exact float32 gradients; on a GPU, on is faster).
        pool_direction: what a call with a checkpoint's ``moments`` computes: ``"adam"`` (default,
            the reference's) the Adam direction ``Gamma = m' / sqrt(v' + eps)``, ``"sgd"`` the plain
            gradient ``g``, as for targets (an ablation: ``b1 m`` is the same for every pool example).
        compile_projection: project each slice with the row-shift kind's ``torch.compile``'d pass
            (the Adam direction and the gather fused: see :class:`~hf_less.gradients.projection.RowShiftProjector`).
            The same features to float32 rounding, not part of their identity; compiling costs
            seconds to a minute once per process. Off by default until a GPU measurement says it pays
            (docs/performance.md).
    """

    def __init__(self, model: torch.nn.Module, tokenizer=None, proj_dim: int | None = 8192, *,
                 proj_kind: str = DEFAULT_KIND, proj_seed: int = 0, max_length: int | None = 2048,
                 batch_size: int | str = 8, projection_buffer_bytes: int = 2**30, show_progress: bool = True,
                 on_empty_completion: str = "error", autocast: bool = False, pool_direction: str = "adam",
                 compile_projection: bool = False):
        if pool_direction not in POOL_DIRECTIONS:
            raise ValueError(f"pool_direction must be one of {POOL_DIRECTIONS}, got {pool_direction!r}.")
        check_proj_dim(proj_dim, proj_kind)
        check_compile_projection(compile_projection, proj_dim, proj_kind)
        self.pool_direction = pool_direction
        self.auto_batch_size = batch_size == "auto"
        if not self.auto_batch_size and (isinstance(batch_size, str) or int(batch_size) < 1):
            raise ValueError(f"batch_size must be an int >= 1 or 'auto', got {batch_size!r}.")
        self.on_empty_completion = check_on_empty(on_empty_completion)
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = CPU_BATCH_SIZE if self.auto_batch_size else int(batch_size)
        self.projection_buffer_bytes = int(projection_buffer_bytes)
        self.show_progress = show_progress
        self.autocast = bool(autocast)
        self.grads = PerExampleGradients(model, adapter_name_of(model), autocast=self.autocast)
        self.projector = None if proj_dim is None else make_projector(
            self.grads.dim, proj_dim, proj_kind, proj_seed, **({"compile": True} if compile_projection else {}))
        self.dim = self.grads.dim if proj_dim is None else int(proj_dim)
        self._device_moments: tuple[AdamMoments, AdamMoments] | None = None  # (caller's, on the device)

    @property
    def identity(self) -> dict:
        """What the features depend on besides the checkpoint: stored with them, checked on reuse."""
        return {
            "model": model_identity(self.model),
            "projection": None if self.projector is None else self.projector.identity,
            "dim": self.dim,
            "max_length": self.max_length,
            # Informational (not compared on reuse): bfloat16 autocast changes features by rounding only.
            "autocast": self.autocast,
            # Only when not the default, so stores written before the option keep their identity.
            **({"pool_direction": self.pool_direction} if self.pool_direction != "adam" else {}),
        }

    @property
    def pool_representation(self) -> str:
        """The store label of this featurizer's pool features: ``"less-adam"`` or ``"less-sgd"``."""
        return f"less-{self.pool_direction}"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, data: Any, what: str) -> list[Encoded]:
        """Examples in any supported format -> ``(input_ids, labels)``; ``what`` names them in errors."""
        columns = rows_of(data)
        if not columns or not next(iter(columns.values())):
            return []
        try:
            fmt = detect_format(list(columns))
            return encode_batch(columns, self.tokenizer, self.max_length, fmt, self.on_empty_completion)
        except ValueError as e:  # EmptyCompletionError, DatasetFormatError, an unknown format
            raise type(e)(f"In the {what}: {e}") from None

    def units(self, encoded: Sequence[Encoded]) -> list[list[list[int]]]:
        """Length-sorted micro-batches grouped into units projected together (see module doc)."""
        batches = batch_order([len(ids) for ids, _ in encoded], self.batch_size)
        if self.projector is None or not self.projector.buffered:  # nothing to amortise over rows
            return [[b] for b in batches]
        per_row = self._row_bytes()
        units: list[list[list[int]]] = []
        rows = 0
        for b in batches:
            if units and (rows + len(b)) * per_row <= self.projection_buffer_bytes:
                units[-1].append(b)
                rows += len(b)
            else:
                units.append([b])
                rows = len(b)
        return units

    def _row_bytes(self) -> int:
        """Bytes of one buffered exact feature: P coordinates in the projection's compute dtype."""
        return self.grads.dim * self.projector.compute_dtype.itemsize

    def _unit(self, encoded: Sequence[Encoded], unit: list[list[int]], moments: AdamMoments | None) -> torch.Tensor:
        """``(rows, d)`` normalised features of one unit, rows in the unit's order.

        Exact features of the unit's batches go into one ``(rows, P)`` buffer (in the projection's
        compute dtype) that is projected at once: every block of the random matrix is generated
        once per unit, not once per batch. Memory is the buffer, whatever the pool size.
        """
        pad = pad_token_id(self.tokenizer)
        side = padding_side(self.tokenizer)
        device = self.device
        rows = sum(len(b) for b in unit)
        # Project each parameter as it is formed when there is no matrix to amortise (sparse) or when
        # one batch's exact gradients exceed the buffer.
        one_by_one = self.projector is not None and (
            not self.projector.buffered or len(unit[0]) * self._row_bytes() > self.projection_buffer_bytes)
        buffered = self.projector is not None and not one_by_one
        parts: list[torch.Tensor] = []
        buf = (torch.empty((rows, self.grads.dim), dtype=self.projector.compute_dtype, device=device)
               if buffered else None)
        pos = 0
        for idx in unit:
            batch = {k: v.to(device, non_blocking=True)
                     for k, v in collate([encoded[j] for j in idx], pad, side).items()}
            try:
                feats = gradient_features(self.grads, batch, self.projector if one_by_one else None, moments)
            except FloatingPointError:
                raise self._non_finite(encoded, idx, moments) from None
            if buffered:
                buf[pos : pos + len(idx)] = feats
                pos += len(idx)
            else:
                parts.append(feats)
            del feats
        if buffered:
            with record_function("hf_less.projection"):
                feats = self.projector(buf)
        else:
            feats = torch.cat(parts)
        return normalize(feats).cpu()

    def _on_device(self, moments: AdamMoments | None) -> AdamMoments | None:
        """The moments as float32 on the compute device, moved once per checkpoint rather than per batch."""
        if moments is None or self.device.type == "cpu":
            return moments
        held = self._device_moments
        if held is None or held[0] is not moments:
            move = lambda d: {k: t.to(self.device, torch.float32) for k, t in d.items()}  # noqa: E731
            held = (moments, AdamMoments(move(moments.exp_avg), move(moments.exp_avg_sq), moments.betas, moments.eps))
            self._device_moments = held
        return held[1]

    def _resolve_batch_size(self, encoded: Sequence[Encoded], moments: AdamMoments | None, split: bool) -> None:
        """``batch_size="auto"``: fix the batch size once, on the first call (see the class doc)."""
        self.auto_batch_size = False
        if self.device.type != "cuda":
            return  # CPU_BATCH_SIZE, set at construction
        longest = sorted(encoded, key=lambda e: -len(e[0]))
        pad, side = pad_token_id(self.tokenizer), padding_side(self.tokenizer)

        def fits(size: int) -> None:  # the longest examples, repeated to fill the batch: the worst case
            rows = [longest[i % len(longest)] for i in range(size)]
            batch = {k: v.to(self.device) for k, v in collate(rows, pad, side).items()}
            with eval_mode(self.model):
                gradient_features(self.grads, batch, self.projector, moments)

        size = find_batch_size(fits, AUTO_BATCH_START)
        if split:  # every process must cut the same units
            size = min(distributed.all_gather(size))
        self.batch_size = size
        logger.info("batch_size='auto': %d examples per batch on %s.", size, self.device)

    def _non_finite(self, encoded: Sequence[Encoded], idx: list[int], moments) -> NonFiniteFeatureError:
        """Find which examples of a failed batch are non-finite: each alone (only on this error path)."""
        pad = pad_token_id(self.tokenizer)
        bad = []
        for j in idx:
            batch = {k: v.to(self.device) for k, v in collate([encoded[j]], pad).items()}
            try:
                gradient_features(self.grads, batch, self.projector, moments)
            except FloatingPointError:
                bad.append(j)
        bad = sorted(bad) or sorted(idx)
        detail = ""
        if self.tokenizer is not None and hasattr(self.tokenizer, "decode"):
            try:
                detail = f" (the first starts {self.tokenizer.decode(encoded[bad[0]][0][:40])!r})"
            except Exception:  # noqa: BLE001 - the preview is a courtesy
                pass
        return NonFiniteFeatureError(bad, detail=detail)

    def __call__(self, encoded: Sequence[Encoded], moments: AdamMoments | None = None,
                 desc: str | None = None, split: bool = False, progress: tqdm | None = None) -> torch.Tensor:
        """``(N, d)`` float32 L2-normalised features of ``encoded``, in input order.

        With ``moments`` (a checkpoint's Adam state) the features are Adam directions (pool
        examples, LESS's Gamma); without, plain gradients (target examples). With ``split``,
        a collective call: under several processes each computes its share of the units and
        every process gets all rows (every process must call it, with the same examples).
        ``progress``: a caller's bar to advance (per unit) instead of a bar of its own.
        """
        split = split and distributed.is_distributed()
        rank, world = (distributed.rank(), distributed.world_size()) if split else (0, 1)
        out = torch.empty((len(encoded), self.dim), dtype=torch.float32)
        if self.pool_direction == "sgd":  # the plain gradient: the moments are not used
            moments = None
        moments = self._on_device(moments)
        if self.auto_batch_size and encoded:
            self._resolve_batch_size(encoded, moments, split)
        units = self.units(encoded)
        bar = progress if progress is not None else tqdm(
            total=len(encoded), desc=desc, unit="ex", disable=not (self.show_progress and desc and rank == 0))
        done: list[tuple[int, torch.Tensor]] = []
        error = None
        try:
            with eval_mode(self.model):
                for u in range(rank, len(units), world):
                    done.append((u, self._unit(encoded, units[u], moments)))
                    # Every process advances alike, so the main one's share times world tracks the whole.
                    bar.update(min(sum(len(b) for b in units[u]) * world, bar.total - bar.n))
        except Exception as e:  # noqa: BLE001 - raised on every process below, so none waits forever
            if not split:
                raise
            error = e
        finally:
            if progress is None:
                bar.close()
        gathered = distributed.all_gather((done, None if error is None else repr(error))) if split else [(done, None)]
        if error is not None:
            raise error
        failed = [(r, msg) for r, (_, msg) in enumerate(gathered) if msg is not None]
        if failed:
            raise RuntimeError(f"Featurization failed on process {failed[0][0]}: {failed[0][1]}")
        for part, _ in gathered:
            for u, feats in part:
                out[[j for b in units[u] for j in b]] = feats
        return out
