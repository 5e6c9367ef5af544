"""LESS scores: checkpoint-weighted cosine similarity, aggregated over target subtasks.

With ``Gamma_i(z)`` the pool features and ``g_i(t)`` the target features at checkpoint i::

    sim_i(z, t) = cos(Gamma_i(z), g_i(t))
    S(z, t)     = sum_i w_i * sim_i(z, t)                       ("less_sims")
    score(z)    = max_j mean_{t in subtask j} S(z, t)             ("less_score")
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..utils.tensors import normalize  # noqa: F401 - part of this module's API


PRECISIONS = ("float32", "bfloat16")


def weighted_sims(pool: Sequence[torch.Tensor], targets: Sequence[torch.Tensor], weights: Sequence[float],
                  precision: str = "float32") -> torch.Tensor:
    """``S = sum_i w_i cos(pool_i, targets_i)``.

    Args:
        pool: per checkpoint, ``(B, d)`` features of pool examples (any norm, any float dtype).
        targets: per checkpoint, ``(T, d)`` features of target examples (any norm).
        weights: per checkpoint, ``w_i``.
        precision: ``"float32"`` (exact to float rounding) or ``"bfloat16"``: the product in
            bfloat16 (about 3x faster on CPUs with bf16 units); each cosine within 2^-8 of its
            value plus 1e-4 (tested at d = 8192); norms are always float32.
    Returns:
        ``(B, T)`` float32 ``less_sims``.
    """
    if not (len(pool) == len(targets) == len(weights)) or not pool:
        raise ValueError("pool, targets and weights need one entry per checkpoint.")
    if precision not in PRECISIONS:
        raise ValueError(f"Unknown precision {precision!r}; expected one of {PRECISIONS}.")
    dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32
    out = None
    for p, t, w in zip(pool, targets, weights):
        t = normalize(t.float().to(p.device)).to(dtype)
        # Normalise the pool side after the product: a (B, T) division instead of a normalised
        # (B, d) copy (d = 8192 >> T), the same numbers to float rounding.
        norms = torch.linalg.vector_norm(p, dim=-1, keepdim=True, dtype=torch.float32).clamp_min(1e-12)
        s = (p.to(dtype) @ t.T).float().div_(norms).mul_(float(w))
        out = s if out is None else out.add_(s)
    return out


def subtask_index(subtasks: Sequence | None, n_targets: int) -> tuple[torch.Tensor, list]:
    """Map per-target subtask labels to ``(ids (T,), names)``; ``None`` means one subtask."""
    if subtasks is None:
        return torch.zeros(n_targets, dtype=torch.long), ["all"]
    if len(subtasks) != n_targets:
        raise ValueError(f"{len(subtasks)} subtask labels for {n_targets} target examples.")
    names = list(dict.fromkeys(subtasks))
    pos = {n: i for i, n in enumerate(names)}
    return torch.tensor([pos[s] for s in subtasks], dtype=torch.long), names


def less_score(sims: torch.Tensor, subtask_ids: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, T) -> (B,)``: mean over each subtask's targets, then max over subtasks."""
    if subtask_ids is None:
        return sims.mean(1)
    subtask_ids = subtask_ids.to(sims.device)
    k = int(subtask_ids.max()) + 1
    sums = torch.zeros((sims.shape[0], k), dtype=sims.dtype, device=sims.device)
    sums.index_add_(1, subtask_ids, sims)
    counts = torch.bincount(subtask_ids, minlength=k).to(sims.dtype)
    return (sums / counts).max(1).values
