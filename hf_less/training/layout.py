"""The on-disk layout of a LESS run: one rule for ``LessSFTTrainer(output_dir=R)`` and ``hf-less --run_dir R``.

::

    R/less_warmup/checkpoint-N/     the warmup's checkpoints with their LESS state (and captured features)
    R/less_features/pool/           the pool's feature store when it was not captured (sharded, resumable)
    R/less_selection.json           LessSFTTrainer's selection record (with less_scores.npy)
    R/data/ R/selections/NAME/ R/train/NAME/ R/evaluation.json R/run.json R/report/   hf-less's other stages

The ``less_`` prefix keeps hf-less's directories apart from the Trainer's own files in ``output_dir``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

WARMUP_SUBDIR = "less_warmup"
FEATURES_SUBDIR = "less_features"
# hf-less 0.1's command line used these names; a run directory that has them is refused with a rename hint.
OLD_CLI_SUBDIRS = {"warmup": WARMUP_SUBDIR, "features": FEATURES_SUBDIR}


@dataclass
class RunLayout:
    """Where a run's stages live inside its directory ``root``."""

    root: Path

    def __post_init__(self):
        self.root = Path(self.root)

    warmup = property(lambda self: self.root / WARMUP_SUBDIR)
    features = property(lambda self: self.root / FEATURES_SUBDIR)
    store = property(lambda self: self.root / FEATURES_SUBDIR / "pool")
    # the hf-less command line's other stages
    data = property(lambda self: self.root / "data")
    selections = property(lambda self: self.root / "selections")
    train = property(lambda self: self.root / "train")
    evaluation = property(lambda self: self.root / "evaluation.json")
    run_info = property(lambda self: self.root / "run.json")
    report = property(lambda self: self.root / "report")

    def selection(self, name: str) -> Path:
        return self.selections / name

    def check_not_old(self) -> None:
        """Refuse a run directory written with hf-less 0.1's names, saying how to rename it."""
        old = [(o, n) for o, n in OLD_CLI_SUBDIRS.items() if (self.root / o).is_dir() and not (self.root / n).exists()]
        if old:
            moves = " && ".join(f"mv {os.path.join(self.root, o)} {os.path.join(self.root, n)}" for o, n in old)
            raise FileExistsError(
                f"{self.root} was written by hf-less 0.1 ({', '.join(o + '/' for o, _ in old)}); hf-less 0.2 keeps "
                f"these stages in {', '.join(n + '/' for _, n in old)}. Rename them to reuse the run: {moves}")
