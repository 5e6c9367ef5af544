"""Small pure functions on tensors that several stages share."""

from __future__ import annotations

import torch


def normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Row-wise L2 normalisation ``(N, d) -> (N, d)`` (removes LESS's short-sequence bias)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)
