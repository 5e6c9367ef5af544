"""hf-less: targeted instruction-data selection (LESS) for Hugging Face Trainer users.

The library, by stage (the CLI, demo, report, BIG-bench and default model live in :mod:`hf_less.cli`,
installed with ``pip install "hf-less[cli]"``; the library never imports it):

- :mod:`hf_less.gradients`: per-example LoRA gradients, the Adam direction, random projections,
  the featurizer, the LESS state of warmup checkpoints and the feature store;
- :mod:`hf_less.scoring`: target scorers (LESS, cheap representations) and the similarity maths;
- :mod:`hf_less.selection`: selection strategies with the one budget rule, the selection record,
  filters and distances;
- :mod:`hf_less.training`: the Trainer callback, ``LessSFTConfig``, ``LessSFTTrainer``, the warmup;
- :mod:`hf_less.evaluation`: target loss, task metrics and quality scorers (IFD, AlpaGasus);
- :mod:`hf_less.data`: the dataset formats and tokenization; :mod:`hf_less.utils`: atomic I/O,
  processes, identities.
"""

from . import _moved
from .scoring.less import LessSelector
from .training.callback import LessCallback

__version__ = "0.2.0.dev0"

__all__ = ["LessCallback", "LessSelector", "LessSFTConfig", "LessSFTTrainer"]

_moved.install()


def __getattr__(name: str):
    # trl is imported only by those who use the trainer: it is slow to import.
    if name == "LessSFTConfig":
        from .training.config import LessSFTConfig

        return LessSFTConfig
    if name == "LessSFTTrainer":
        from .training.trainer import LessSFTTrainer

        return LessSFTTrainer
    raise AttributeError(f"module 'hf_less' has no attribute {name!r}")
