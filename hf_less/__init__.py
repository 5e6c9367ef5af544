"""hf-less: targeted instruction-data selection (LESS) for Hugging Face Trainer users."""

from .callback import LessCallback

__version__ = "0.1.0.dev0"

__all__ = ["LessCallback"]
