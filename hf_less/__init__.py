"""hf-less: targeted instruction-data selection (LESS) for Hugging Face Trainer users."""

from .callback import LessCallback
from .selector import LessSelector

__version__ = "0.1.0.dev0"

__all__ = ["LessCallback", "LessSelector"]
