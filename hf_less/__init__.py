"""hf-less: targeted instruction-data selection (LESS) for Hugging Face Trainer users."""

__version__ = "0.1.0.dev0"
