"""FSDP and DeepSpeed detection: FSDP1 names map to adapter keys, DeepSpeed and capture under FSDP refused.

The sharded runs themselves (torchrun, 2 CPU processes) are in tests/integration/test_fsdp.py.
"""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import TrainerControl, TrainerState

from hf_less import LessCallback
from hf_less.gradients.per_example import parameter_key
from hf_less.gradients.sharded import DEEPSPEED_REFUSAL, FSDP_CAPTURE_REFUSAL, clean_name, deepspeed_enabled, fsdp_enabled

from tests.testing_utils import make_model, toy_tasks


def test_fsdp1_names_map_to_adapter_keys():
    wrapped = ("_fsdp_wrapped_module.base_model.model.model.layers.0._fsdp_wrapped_module.self_attn.q_proj."
               "lora_A.default._fsdp_wrapped_module.weight")
    assert parameter_key(clean_name(wrapped)) == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    checkpointed = "base_model.model.model.layers.1._checkpoint_wrapped_module.mlp.up_proj.lora_B.default.weight"
    assert parameter_key(clean_name(checkpointed)) == "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    assert clean_name("model.layers.0.weight") == "model.layers.0.weight"


class ZeroOptimizer:
    """Stands for DeepSpeed's ZeRO optimizer (deepspeed is not installed here): only its type is read."""

    def __init__(self, inner):
        self.optimizer, self.param_groups, self.state = inner, inner.param_groups, {}


ZeroOptimizer.__module__ = "deepspeed.runtime.zero.stage_1_and_2"


def begin(callback, model, optimizer, **args):
    args = SimpleNamespace(output_dir="unused", **args)
    callback.on_train_begin(args, TrainerState(), TrainerControl(), model=model, optimizer=optimizer)


@pytest.mark.parametrize("how", ["arguments", "optimizer", "accelerate"])
def test_deepspeed_is_refused_with_a_working_alternative(how, lora_model, monkeypatch):
    adam = torch.optim.AdamW([p for p in lora_model.parameters() if p.requires_grad])
    optimizer, args = adam, {}
    if how == "arguments":
        args = {"deepspeed": "ds_config.json"}
    elif how == "optimizer":
        optimizer = ZeroOptimizer(adam)
    else:  # accelerate launch with a DeepSpeed config: the plugin is in accelerate's shared state
        from accelerate.state import AcceleratorState

        monkeypatch.setitem(AcceleratorState._shared_state, "deepspeed_plugins", {"default": object()})
    with pytest.raises(ValueError) as e:
        begin(LessCallback(), lora_model, optimizer, **args)
    message = str(e.value)
    assert message == DEEPSPEED_REFUSAL
    assert "adamw_torch" not in message and "DDP" in message and "FSDP" in message
    assert "less_warmup_dir" in message


def test_plain_adam_runs_are_neither_fsdp_nor_deepspeed(lora_model):
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir="unused", use_cpu=True)
    adam = torch.optim.AdamW([p for p in lora_model.parameters() if p.requires_grad])
    assert not fsdp_enabled(args, lora_model) and not deepspeed_enabled(args, adam)
    callback = LessCallback()
    begin(callback, lora_model, adam)
    assert not callback._fsdp
    # a non-Adam optimizer outside DeepSpeed keeps the optim= advice, which does help there
    with pytest.raises(ValueError, match="adamw_torch"):
        begin(LessCallback(), lora_model, torch.optim.SGD(lora_model.parameters(), lr=0.1))


def test_capture_is_refused_when_the_arguments_ask_for_fsdp(lora_model, tokenizer):
    adam = torch.optim.AdamW([p for p in lora_model.parameters() if p.requires_grad])
    capturing = LessCallback(targets=[{"prompt": "add 1 2 =", "completion": " 3"}], tokenizer=tokenizer)
    with pytest.raises(ValueError) as e:
        begin(capturing, lora_model, adam, fsdp="full_shard")
    assert str(e.value) == FSDP_CAPTURE_REFUSAL and "LessSelector" in str(e.value)
    plain = LessCallback()
    begin(plain, lora_model, adam, fsdp="full_shard")  # moments only: accepted, gathered at each save
    assert plain._fsdp


def test_less_sft_trainer_refuses_a_deepspeed_warmup_before_training(tmp_path, tokenizer):
    from datasets import Dataset

    from hf_less import LessSFTConfig, LessSFTTrainer

    rows = toy_tasks(4)
    trainer = LessSFTTrainer(
        make_model(len(tokenizer)), args=LessSFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none",
                                                       less_budget=2, max_length=64),
        train_dataset=Dataset.from_list(rows), target_dataset=rows[:2], processing_class=tokenizer)
    trainer.args.deepspeed = "ds_config.json"  # as if launched with one (deepspeed is not installed here)
    with pytest.raises(ValueError, match="less_warmup_dir"):
        trainer.select_data()
    assert not (Path(tmp_path) / "less_warmup").exists()  # refused before any training
