"""The warmup records its base model, and every consumer refuses another one (issue 23, item 2)."""

from __future__ import annotations

import json

import pytest
import torch

from hf_less import LessCallback, LessSelector
from hf_less.gradients.state import STATE_FILE, ForeignBaseModelError, find_checkpoints
from hf_less.gradients.featurizer import model_identity

from tests.testing_utils import FEW_TARGETS, lora_config, make_model, run_warmup


@pytest.fixture(scope="module")
def warmup(tmp_path_factory, tokenizer):
    return run_warmup(tmp_path_factory.mktemp("warm") / "warmup", tokenizer, LessCallback())


def _selector(tokenizer, warmup, model, **kw):
    return LessSelector(model, warmup, FEW_TARGETS, tokenizer=tokenizer, proj_dim=32, max_length=64,
                        show_progress=False, use_captured=False, **kw)


def test_state_records_the_base_model(warmup, tokenizer):
    from peft import get_peft_model

    # run_warmup trains make_model(len(tokenizer)) (seed 0) under lora_config(): the same frozen weights
    base = get_peft_model(make_model(len(tokenizer)), lora_config())
    for c in find_checkpoints(warmup):
        record = c.state["base_model"]
        assert record["weights"] == model_identity(base)["weights"] and record["dtype"] == "float32"
        assert record["name_or_path"] == "tiny-llama-seed0"


def test_another_base_model_is_refused(warmup, tokenizer):
    """Same architecture, other weights: refused before any feature is computed (the old code scored)."""
    with pytest.raises(ForeignBaseModelError, match=r"trained on the base model 'tiny-llama-seed0'.*has other "
                                                    r"weights.*Pass the warmup's base model"):
        _selector(tokenizer, warmup, make_model(len(tokenizer), seed=1))
    sel = _selector(tokenizer, warmup, make_model(len(tokenizer), seed=0))  # the right one is accepted
    assert sel.num_targets == len(FEW_TARGETS)


def test_the_same_weights_in_bfloat16_are_accepted(warmup, tokenizer):
    _selector(tokenizer, warmup, make_model(len(tokenizer), seed=0).to(torch.bfloat16))
    with pytest.raises(ForeignBaseModelError):
        _selector(tokenizer, warmup, make_model(len(tokenizer), seed=1).to(torch.bfloat16))


def test_an_old_warmup_without_the_record_warns(warmup, tokenizer, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(warmup, old)
    for state_file in old.glob(f"checkpoint-*/{STATE_FILE}"):
        state = json.loads(state_file.read_text())
        del state["base_model"]
        state_file.write_text(json.dumps(state))
    with pytest.warns(UserWarning, match="record no base model identity.*older hf-less"):
        _selector(tokenizer, old, make_model(len(tokenizer), seed=1))
