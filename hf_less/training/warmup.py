"""The one LESS warmup recipe: which pool rows it trains on, and its learning-rate schedule.

Every entry point (``LessSFTTrainer``, ``hf-less warmup`` and the demo, the quality benchmark, a user's
own ``SFTTrainer`` run) takes the warmup rows from :func:`warmup_subset`, so the same seed picks the
same rows, in the same order, everywhere; and trains with :class:`WarmupSFTTrainer`, whose schedule
gives every optimizer step a positive learning rate (LESS weights checkpoints by it).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from trl import SFTTrainer

# The LESS paper's warmup: linear, over 3% of the steps (Xia et al. 2024), shifted so no step runs at LR 0.
WARMUP_SCHEDULE = {"kind": "linear, warmup 3% of the steps, first step > 0", "warmup_ratio": 0.03}


def warmup_size(pool_size: int, fraction: float) -> int:
    """The number of warmup rows: ``round(fraction * pool_size)``, at least one."""
    if not 0 < fraction <= 1:
        raise ValueError(f"The warmup fraction must be in (0, 1], got {fraction}: LESS warms up on 0.05 of the pool.")
    return max(1, int(round(fraction * pool_size)))


def warmup_indices(pool_size: int, fraction: float, seed: int) -> list[int]:
    """The pool rows of the warmup, in pool order: the first :func:`warmup_size` of a seeded permutation.

    ``np.random.default_rng(seed).permutation(pool_size)``, the permutation ``Dataset.shuffle(seed=seed)``
    also draws, so the rows are those of ``pool.shuffle(seed=seed).select(range(size))``, sorted.
    """
    size = warmup_size(pool_size, fraction)
    return np.sort(np.random.default_rng(seed).permutation(pool_size)[:size]).tolist()


def warmup_subset(dataset, fraction: float, seed: int = 0):
    """The warmup rows of ``dataset`` (a ``datasets.Dataset``): :func:`warmup_indices`, in pool order."""
    return dataset.select(warmup_indices(len(dataset), fraction, seed))


def warmup_lr_factor(step: int, warmup: int, total: int) -> float:
    """The LR factor of optimizer step ``step`` (0-based) of ``total``: linear warmup, then linear decay to 0.

    The warmup's step ``s < warmup`` uses ``(s + 1) / (warmup + 1)``, not transformers' ``s / warmup``,
    whose first step runs at LR 0: LESS weights each checkpoint by the mean LR of its steps, and a
    warmup of one optimizer step would then have no positive weight at all. Every step's factor
    is in (0, 1].
    """
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return max(0.0, (total - step) / max(1, total - warmup))


class WarmupSFTTrainer(SFTTrainer):
    """The warmup's ``SFTTrainer``: its LR schedule is :func:`warmup_lr_factor` over 3% of the steps.

    Set here, not through ``TrainingArguments``, because ``warmup_steps``/``warmup_ratio`` mean
    different things across the supported transformers versions, and because their schedule runs
    the first step at LR 0.
    """

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            warmup = math.ceil(WARMUP_SCHEDULE["warmup_ratio"] * num_training_steps)
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                self.optimizer if optimizer is None else optimizer,
                functools.partial(warmup_lr_factor, warmup=warmup, total=num_training_steps))
            self._created_lr_scheduler = True
        return self.lr_scheduler
