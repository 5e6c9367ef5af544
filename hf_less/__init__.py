"""hf-less: targeted instruction-data selection (LESS) for Hugging Face Trainer users."""

from .callback import LessCallback
from .selector import LessSelector

__version__ = "0.1.0.dev0"

__all__ = ["LessCallback", "LessSelector", "LessSFTConfig", "LessSFTTrainer"]


def __getattr__(name: str):
    # trl is imported only by those who use the trainer: it is slow to import.
    if name == "LessSFTConfig":
        from .config import LessSFTConfig

        return LessSFTConfig
    if name == "LessSFTTrainer":
        from .trainer import LessSFTTrainer

        return LessSFTTrainer
    raise AttributeError(f"module 'hf_less' has no attribute {name!r}")
