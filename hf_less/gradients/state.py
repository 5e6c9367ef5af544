"""The LESS state of a warmup checkpoint, on disk: Adam moments (safetensors) + JSON.

``checkpoint-N/`` keeps the Trainer's own files (adapter, optimizer.pt, ...) and, written by
:class:`hf_less.LessCallback`:

- ``less_moments.safetensors``: ``exp_avg.<key>`` and ``exp_avg_sq.<key>`` for every trainable
  parameter, ``<key>`` the parameter's name without the adapter segment (the key format of
  ``adapter_model.safetensors``), so the state does not depend on optimizer indices;
- ``less_state.json``: betas, eps, the mean learning rate over the optimizer steps since the
  previous checkpoint, the global step, the parameter keys in order, and the warmup's ``run``
  identity (see :func:`run_identity`);
- ``less_features/pool`` and ``less_features/targets``: feature stores (see
  :mod:`hf_less.gradients.store`) captured by ``LessCallback(pool=..., targets=...)`` at this checkpoint.

``less_run.json``, beside the checkpoints, is the identity of the run that writes them
(``LessSFTTrainer`` writes its warmup settings, subset digest and model there).

The checkpoint weight of LESS is ``w_i = mean_lr_i / sum_j mean_lr_j``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from ..utils.io import atomic_write_bytes, atomic_write_json, file_sha256  # noqa: F401 (re-exported)
from .per_example import AdamMoments
from .store import IncompatibleFeaturesError

STATE_FILE = "less_state.json"
MOMENTS_FILE = "less_moments.safetensors"
CAPTURE_DIR = "less_features"
RUN_FILE = "less_run.json"
# The fields of the Trainer's trainer_state.json that differ between runs of other lengths or batch sizes.
TRAINER_RUN_FIELDS = ("max_steps", "num_train_epochs", "train_batch_size")
FORMAT_VERSION = 1
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")

HOW_TO_WARMUP = (
    "Train the warmup with hf_less.LessCallback() in the Trainer's callbacks (it writes "
    f"{STATE_FILE} and {MOMENTS_FILE} into every checkpoint-N/ the Trainer saves), or use "
    "LessSFTTrainer, which runs the warmup itself."
)


def save_less_state(
    checkpoint_dir: str | os.PathLike,
    moments: AdamMoments,
    keys: list[str],
    mean_lr: float,
    global_step: int,
    lr_steps: int,
    optimizer: str,
    base_model: dict | None = None,
) -> None:
    """Write the moments and the JSON state into ``checkpoint_dir`` (atomically, moments first).

    ``base_model``: the identity of the frozen base model the adapter was trained on
    (:func:`hf_less.gradients.featurizer.base_model_record`), checked by every consumer
    (:func:`check_base_model`); ``None`` when it cannot be known (a sharded model).
    """
    d = Path(checkpoint_dir)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for k in keys:
        tensors[f"exp_avg.{k}"] = moments.exp_avg[k].detach().to("cpu", torch.float32).contiguous()
        tensors[f"exp_avg_sq.{k}"] = moments.exp_avg_sq[k].detach().to("cpu", torch.float32).contiguous()
    atomic_write_bytes(d / MOMENTS_FILE, safetensors_bytes(tensors))
    atomic_write_json(d / STATE_FILE, {
        "format_version": FORMAT_VERSION,
        "global_step": int(global_step),
        "mean_lr": float(mean_lr),
        "lr_steps": int(lr_steps),
        "betas": [float(b) for b in moments.betas],
        "eps": float(moments.eps),
        "optimizer": optimizer,
        "parameters": list(keys),
        "run": run_identity(d),
        "base_model": base_model,
    })


def run_identity(checkpoint_dir: str | os.PathLike) -> dict:
    """The identity of the run that wrote ``checkpoint_dir``, as recorded in its ``less_state.json``.

    ``warmup``: the content of ``less_run.json`` beside the checkpoints (``LessSFTTrainer`` writes
    its warmup settings, subset and model digests there before training); ``trainer``: the run
    length and batch size from the Trainer's ``trainer_state.json`` in the checkpoint (written
    before ``on_save``), which tell a rerun with other epochs apart in any Trainer. Either is left
    out when its file is absent. Checkpoints of one warmup directory must all have the same.
    """
    d = Path(checkpoint_dir)
    run: dict = {}
    if (d.parent / RUN_FILE).exists():
        run["warmup"] = json.loads((d.parent / RUN_FILE).read_text())
    if (d / "trainer_state.json").exists():
        trainer_state = json.loads((d / "trainer_state.json").read_text())
        run["trainer"] = {k: trainer_state.get(k) for k in TRAINER_RUN_FIELDS}
    return run


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def run_differences(a: dict, b: dict) -> list[str]:
    """``"key: a -> b"`` for every field in which two run identities differ (nested keys dotted)."""
    fa, fb = _flat(a), _flat(b)
    return [f"{k}: {fa.get(k, '(absent)')!r} -> {fb.get(k, '(absent)')!r}"
            for k in sorted(set(fa) | set(fb)) if fa.get(k, "(absent)") != fb.get(k, "(absent)")]


class ForeignBaseModelError(IncompatibleFeaturesError):
    """The model given to score with is not the base model the warmup was trained on."""


def check_base_model(checkpoints: list["LessCheckpoint"], identity: dict, rounded: Callable[[], str],
                     fix: str = "") -> None:
    """Refuse a model whose frozen weights differ from those the warmup checkpoints were trained on.

    ``identity`` is the model's :func:`hf_less.gradients.featurizer.model_identity`; ``rounded()``
    its weights' bfloat16-rounded digest (computed only when the exact digests differ, to recognise
    the same weights loaded at another precision). Checkpoints that record no base model (written
    by hf-less before it recorded one) are accepted with a warning; ``"base_model": null`` (a
    sharded warmup) is accepted silently.
    """
    old = [c.path.name for c in checkpoints if "base_model" not in c.state]
    if old:
        warnings.warn(
            f"The warmup checkpoints {old} in {str(checkpoints[0].path.parent)!r} record no base model identity "
            "(written by an older hf-less): hf-less cannot check that the model given is the one the warmup "
            "trained its adapter on. Features of another base model would be meaningless; re-run the warmup to "
            "have this checked.", UserWarning, stacklevel=3)
    bf16 = None
    for c in checkpoints:
        record = c.state.get("base_model")
        if not record or record.get("weights") in (None, identity.get("weights")):
            continue
        if bf16 is None:
            bf16 = rounded()
        if record.get("weights_bf16") == bf16:
            continue  # the same weights at another precision
        raise ForeignBaseModelError(
            f"The warmup checkpoint {str(c.path)!r} was trained on the base model {record.get('name_or_path')!r} "
            f"(weights digest {record.get('weights')}, {record.get('dtype')}); the model given "
            f"({identity.get('name_or_path')!r}, weights digest {identity.get('weights')}) has other weights. Its "
            "gradients would be mixed with the warmup's adapter and Adam state of another model, and the scores "
            "would mean nothing. Pass the warmup's base model" + (f" ({fix})" if fix else "")
            + ", or re-run the warmup with this one.")


def load_moments(checkpoint_dir: str | os.PathLike) -> AdamMoments:
    """Read a checkpoint's Adam moments (float32, CPU)."""
    d = Path(checkpoint_dir)
    state = json.loads((d / STATE_FILE).read_text())
    tensors = load_file(str(d / MOMENTS_FILE))
    m = {k: tensors[f"exp_avg.{k}"] for k in state["parameters"]}
    v = {k: tensors[f"exp_avg_sq.{k}"] for k in state["parameters"]}
    return AdamMoments(m, v, tuple(state["betas"]), float(state["eps"]))


def _file_digest(path: Path) -> str:
    return file_sha256(path)[:16]


@dataclass
class LessCheckpoint:
    """One warmup checkpoint: its directory, step, mean LR and LESS weight ``w_i``."""

    path: Path
    step: int
    mean_lr: float
    weight: float = 0.0
    state: dict = field(default_factory=dict, repr=False)

    @property
    def digest(self) -> str:
        """A content hash of the adapter weights and the LESS state (identifies the checkpoint)."""
        parts = [_file_digest(self.path / MOMENTS_FILE), _file_digest(self.path / STATE_FILE)]
        adapter = self.path / "adapter_model.safetensors"
        if adapter.exists():
            parts.append(_file_digest(adapter))
        return hashlib.sha256("/".join(parts).encode()).hexdigest()[:16]

    def moments(self) -> AdamMoments:
        return load_moments(self.path)

    def captured(self, which: str) -> Path:
        """Where ``LessCallback`` captures this checkpoint's ``"pool"`` or ``"targets"`` features."""
        return captured_dir(self.path, which)


def captured_dir(checkpoint_dir: str | os.PathLike, which: str) -> Path:
    if which not in ("pool", "targets"):
        raise ValueError(f"Captured features are 'pool' or 'targets', not {which!r}.")
    return Path(checkpoint_dir) / CAPTURE_DIR / which


def checkpoint_weights(mean_lrs: list[float]) -> list[float]:
    """``w_i = lr_i / sum_j lr_j`` (LESS weights checkpoints by their mean learning rate)."""
    total = float(sum(mean_lrs))
    if not total > 0:
        raise ValueError(
            f"Checkpoint learning rates {mean_lrs} do not sum to a positive number: every optimizer step of "
            "the warmup ran at learning rate 0 (e.g. a schedule whose warmup starts at 0, in a run of a single "
            "step), so no checkpoint can be weighted. Train the warmup for more steps or with a schedule "
            "whose first step has a positive learning rate (LessSFTTrainer's warmup has one).")
    return [float(lr) / total for lr in mean_lrs]


def _check_one_run(root: Path, ckpts: list[LessCheckpoint]) -> None:
    """Refuse checkpoints written by different runs (a rerun into the same directory, a copied checkpoint)."""
    runs: list[tuple[dict, list[str]]] = []
    for c in ckpts:
        run = c.state.get("run", {})
        for known, names in runs:
            if known == run:
                names.append(c.path.name)
                break
        else:
            runs.append((run, [c.path.name]))
    if len(runs) < 2:
        return
    (first, first_names), groups = runs[0], []
    for run, names in runs[1:]:
        groups.append(f"{names} differ from {first_names} in " + "; ".join(run_differences(first, run)))
    raise ValueError(
        f"The checkpoints in {str(root)!r} come from {len(runs)} different warmup runs (an earlier run's "
        f"checkpoints left in the directory, or a checkpoint copied in): " + " | ".join(groups)
        + ". Mixing them would weight features of unrelated models. Re-run the warmup into an empty directory, "
        "or choose one run's steps (checkpoints=[...], --checkpoints).")


def _warn_deleted(root: Path, ckpts: list[LessCheckpoint], used: list[LessCheckpoint]) -> None:
    """Warn when checkpoints of the run are gone (``save_total_limit``): the weights cover the survivors only.

    Each state records the optimizer steps since the previous save (``lr_steps``), so the
    previous checkpoint's step is known; a previous step that is not on disk was deleted.
    """
    steps = {c.step for c in ckpts}
    deleted = sorted({c.step - int(c.state.get("lr_steps", 0)) for c in ckpts} - steps - {0})
    deleted = [s for s in deleted if s > 0]
    if deleted:
        warnings.warn(
            f"The warmup in {str(root)!r} saved checkpoints that are no longer there (deleted by save_total_limit?): "
            f"at least those of steps {deleted}, the ones before a survivor. The LESS weights are renormalised over "
            f"the surviving checkpoints "
            f"{[c.path.name for c in used]} only. Train the warmup with save_total_limit=None to keep every one.",
            UserWarning, stacklevel=3)


def find_checkpoints(warmup_dir: str | os.PathLike, steps: list[int] | None = None) -> list[LessCheckpoint]:
    """The LESS checkpoints under ``warmup_dir`` (``checkpoint-N/``), by step, with weights.

    ``warmup_dir`` may also be a single checkpoint directory. ``steps`` keeps only those steps.
    """
    root = Path(warmup_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"Warmup directory {str(root)!r} does not exist. {HOW_TO_WARMUP}")
    if (root / STATE_FILE).exists():
        dirs = [root]
    else:
        dirs = sorted((p for p in root.iterdir() if p.is_dir() and _CKPT_RE.match(p.name)),
                      key=lambda p: int(_CKPT_RE.match(p.name).group(1)))
    if not dirs:
        raise FileNotFoundError(f"No checkpoint-N/ directories in {str(root)!r}. {HOW_TO_WARMUP}")
    missing = [p.name for p in dirs if not (p / STATE_FILE).exists() or not (p / MOMENTS_FILE).exists()]
    if missing:
        raise FileNotFoundError(
            f"Checkpoints {missing} in {str(root)!r} have no LESS state ({STATE_FILE}, {MOMENTS_FILE}). "
            + HOW_TO_WARMUP)
    ckpts = []
    for p in dirs:
        state = json.loads((p / STATE_FILE).read_text())
        if state.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{p / STATE_FILE} has format_version {state.get('format_version')}, "
                             f"this hf-less reads {FORMAT_VERSION}; re-run the warmup.")
        ckpts.append(LessCheckpoint(p, int(state["global_step"]), float(state["mean_lr"]), state=state))
    found = ckpts
    if steps is not None:
        have = {c.step for c in ckpts}
        if set(steps) - have:
            raise ValueError(f"Checkpoint steps {sorted(set(steps) - have)} not found; available: {sorted(have)}.")
        ckpts = [c for c in ckpts if c.step in set(steps)]
    _check_one_run(root, ckpts)
    if len(dirs) > 1 or dirs[0] != root:  # a single checkpoint given alone is its user's choice
        _warn_deleted(root, found, ckpts)
    for c, w in zip(ckpts, checkpoint_weights([c.mean_lr for c in ckpts])):
        c.weight = w
    return ckpts
