"""A reproduction of the reference LESS featurizer's behaviour, for benchmarking hf-less against it.

Written from a reading of how princeton-nlp/LESS computes gradient features (no code copied):

- one example per forward/backward (batch size 1), the Hugging Face model's own mean loss
  over the example's scored tokens, ``loss.backward()`` into ``param.grad``;
- the LoRA gradients flattened in ``named_parameters`` order and turned into the Adam
  direction with fixed betas (0.9, 0.999) and eps 1e-8 inside the square root, no bias
  correction: ``Gamma = m' / sqrt(v' + eps)``;
- every 16 examples, the stacked directions cast to float16 and projected by traker's
  ``BasicProjector`` (Rademacher, seed 0, block size 128, in the model's dtype), which
  regenerates its whole ``P x d`` random matrix, 128 columns at a time, on every call;
- the projected rows L2-normalised at the end.

``traker`` (``pip install traker``) is an optional benchmark dependency.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

BLOCK_SIZE = 128  # columns of the random matrix generated at a time, as the reference sets it
PROJECT_EVERY = 16  # gradients per projector call, as the reference sets it
BETAS = (0.9, 0.999)
EPS = 1e-8


def _basic_projector(grad_dim: int, proj_dim: int, device: torch.device, dtype: torch.dtype):
    try:
        from trak.projectors import BasicProjector, ProjectionType
    except ImportError as e:  # pragma: no cover - optional dependency
        raise ImportError("The reference featurizer needs traker's projector: pip install traker") from e
    return BasicProjector(grad_dim=grad_dim, proj_dim=proj_dim, seed=0, proj_type=ProjectionType.rademacher,
                          device=device, dtype=dtype, block_size=BLOCK_SIZE, max_batch_size=PROJECT_EVERY)


def flat_moments(model: nn.Module, exp_avg: dict[str, torch.Tensor], exp_avg_sq: dict[str, torch.Tensor],
                 key=lambda name: name) -> tuple[torch.Tensor, torch.Tensor]:
    """``(m, v)``: the checkpoint's moments flattened in the model's trainable-parameter order, ``(P,)`` each."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    m = torch.cat([exp_avg[key(n)].reshape(-1).float() for n in names])
    v = torch.cat([exp_avg_sq[key(n)].reshape(-1).float() for n in names])
    return m, v


class ReferenceFeaturizer:
    """Batch-size-1 LESS features as the reference computes them.

    Args:
        model: a PEFT LoRA model (trainable parameters = the LoRA weights).
        m, v: ``(P,)`` Adam moments (see :func:`flat_moments`); ``None`` for plain gradients.
        proj_dim: d.
    """

    def __init__(self, model: nn.Module, m: torch.Tensor | None, v: torch.Tensor | None, proj_dim: int = 8192):
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.dim = sum(p.numel() for p in self.params)
        device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype  # the reference projects in the model's dtype
        self.m = None if m is None else m.to(device)
        self.v = None if v is None else v.to(device)
        self.projector = _basic_projector(self.dim, proj_dim, device, dtype)

    def _direction(self, ids: list[int], labels: list[int]) -> torch.Tensor:
        device = self.params[0].device
        inp = torch.tensor([ids], device=device)
        out = self.model(input_ids=inp, attention_mask=torch.ones_like(inp),
                         labels=torch.tensor([labels], device=device))
        out.loss.backward()
        g = torch.cat([p.grad.reshape(-1) for p in self.params if p.grad is not None]).float()
        self.model.zero_grad()
        if self.m is None:
            return g
        b1, b2 = BETAS
        m = b1 * self.m + (1 - b1) * g
        v = b2 * self.v + (1 - b2) * g**2
        return m / torch.sqrt(v + EPS)

    def __call__(self, encoded: Sequence[tuple[list[int], list[int]]]) -> torch.Tensor:
        """``(N, d)`` L2-normalised float32 features of ``(input_ids, labels)`` pairs, in order."""
        was_training = self.model.training
        self.model.eval()
        pending, out = [], []
        try:
            for ids, labels in encoded:
                pending.append(self._direction(ids, labels))
                if len(pending) == PROJECT_EVERY:
                    out.append(self._project(pending))
                    pending = []
            if pending:
                out.append(self._project(pending))
        finally:
            self.model.train(was_training)
        return torch.nn.functional.normalize(torch.cat(out).float(), dim=1)

    def _project(self, grads: list[torch.Tensor]) -> torch.Tensor:
        stacked = torch.stack(grads).to(torch.float16)
        return self.projector.project(stacked, model_id=0).cpu()
