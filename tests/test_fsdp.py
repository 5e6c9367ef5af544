"""FSDP and DeepSpeed: full Adam moments gathered under FSDP (1 and 2), capture and DeepSpeed refused.

The sharded runs use torchrun with 2 CPU processes over gloo (tests/scripts/fsdp_warmup.py).
accelerate enables FSDP for accelerator devices only, so on CPU the sharding itself is applied by
hand (``fully_shard`` on a CPU mesh, FSDP1 with ``device_id=cpu``), with LessCallback's hooks called
as the Trainer calls them; a Trainer run with ``fsdp=...`` checks the Trainer-side path.
"""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import TrainerControl, TrainerState

from hf_less import LessCallback
from hf_less.gradients.state import find_checkpoints, load_moments
from hf_less.gradients.per_example import parameter_key
from hf_less.gradients.sharded import DEEPSPEED_REFUSAL, FSDP_CAPTURE_REFUSAL, clean_name, deepspeed_enabled, fsdp_enabled

from tests.testing_utils import example_args, make_lora_model, make_model, toy_tasks, torchrun


def full_shapes(tokenizer) -> dict[str, tuple[int, ...]]:
    return {parameter_key(n): tuple(p.shape) for n, p in make_lora_model(tokenizer).named_parameters()
            if p.requires_grad}


def test_sharded_moments_equal_unsharded_training(tmp_path, tokenizer):
    torchrun("fsdp_warmup.py", "sharded", tmp_path, port=29531)
    shapes = full_shapes(tokenizer)
    assert (tmp_path / "writer-rank0").read_text() == "x" * 6 and not (tmp_path / "writer-rank1").exists()
    for variant, version in (("fsdp2", 2), ("fsdp1", 1), ("fsdp1-flat", 1)):
        for rank in (0, 1):
            seen = json.loads((tmp_path / variant / f"rank{rank}.json").read_text())
            assert seen["fsdp_version"] == version
            # really sharded: each rank holds half of the trainable elements or less
            assert sum(torch.Size(s).numel() for s in seen["local_shapes"].values()) <= \
                sum(torch.Size(s).numel() for s in shapes.values()) // 2
            assert seen["capture"] == FSDP_CAPTURE_REFUSAL
        ckpts = find_checkpoints(tmp_path / variant)
        assert [c.step for c in ckpts] == [2, 4]
        for c in ckpts:
            ref_file = tmp_path / variant / f"reference-step{c.step}.safetensors"
            reference = load_file(ref_file)
            with safe_open(ref_file, "pt") as f:
                order = json.loads(f.metadata()["order"])
            saved = load_moments(c.path)
            state = json.loads((c.path / "less_state.json").read_text())
            # the unwrapped model's keys, in its order, whole shapes
            assert state["parameters"] == order == list(shapes)
            assert state["betas"] == [0.9, 0.999] and state["mean_lr"] == pytest.approx(1e-3)
            for k in order:
                assert tuple(saved.exp_avg[k].shape) == shapes[k] == tuple(saved.exp_avg_sq[k].shape)
                for which, got in (("exp_avg", saved.exp_avg[k]), ("exp_avg_sq", saved.exp_avg_sq[k])):
                    want = reference[f"{which}.{k}"]
                    assert want.abs().max() > 0
                    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * want.abs().max().item())


def test_trainer_with_fsdp_arguments_saves_what_ddp_saves(tmp_path):
    # on CPU accelerate trains an fsdp=... run as DDP; the callback still takes the FSDP path
    torchrun("fsdp_warmup.py", "ddp", tmp_path / "ddp", port=29532)
    torchrun("fsdp_warmup.py", "trainer-fsdp", tmp_path / "fsdp", port=29533)
    assert (tmp_path / "fsdp" / "writer-rank0").read_text() == "xxxx"  # 2 callbacks x 2 saves
    assert not (tmp_path / "fsdp" / "writer-rank1").exists()
    for rank in (0, 1):
        assert (tmp_path / "fsdp" / f"capture-rank{rank}.txt").read_text() == FSDP_CAPTURE_REFUSAL
    ddp, fsdp = find_checkpoints(tmp_path / "ddp"), find_checkpoints(tmp_path / "fsdp")
    assert [c.step for c in ddp] == [c.step for c in fsdp] == [3, 6]
    copies = find_checkpoints(tmp_path / "fsdp" / "copy")
    for a, b, c in zip(ddp, fsdp, copies):
        ma, mb = load_moments(a.path), load_moments(b.path)
        assert list(ma.exp_avg) == list(mb.exp_avg)
        for k in ma.exp_avg:
            torch.testing.assert_close(mb.exp_avg[k], ma.exp_avg[k], rtol=1e-5, atol=1e-8)
            torch.testing.assert_close(mb.exp_avg_sq[k], ma.exp_avg_sq[k], rtol=1e-5, atol=1e-12)
        # the callback with its own output_dir copied the Trainer's adapter and wrote the same moments
        assert (c.path / "adapter_model.safetensors").read_bytes() == (b.path / "adapter_model.safetensors").read_bytes()
        mc = load_moments(c.path)
        assert all(torch.equal(mc.exp_avg[k], mb.exp_avg[k]) for k in mb.exp_avg)


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


def test_less_sft_trainer_with_fsdp_warms_up_then_featurizes(tmp_path, tokenizer):
    """With fsdp=..., LessSFTTrainer's warmup saves gathered moments without capture, and the pool is
    featurized afterwards with an unsharded copy; it selects what the capturing (DDP) path selects."""
    import numpy as np

    from hf_less.selection.record import load_selection
    from hf_less.gradients.store import FeatureStore

    example = Path(__file__).parents[1] / "examples" / "sft_with_less.py"
    config = tmp_path / "fsdp.json"
    config.write_text(json.dumps({"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}))
    warmup = ["--less_warmup_fraction", "0.5", "--less_warmup_epochs", "2", "--less_lora_r", "4",
              "--less_lora_alpha", "8", "--less_warmup_learning_rate", "1e-3"]
    torchrun(example, *example_args(tmp_path, tokenizer, tmp_path / "ddp", *warmup), port=29534)
    torchrun(example, *example_args(tmp_path, tokenizer, tmp_path / "fsdp", *warmup, "--fsdp", "full_shard",
                                    "--fsdp_config", config), port=29535)
    ddp, fsdp = find_checkpoints(tmp_path / "ddp" / "less_warmup"), find_checkpoints(tmp_path / "fsdp" / "less_warmup")
    assert [c.step for c in ddp] == [c.step for c in fsdp] and len(fsdp) == 2
    for a, b in zip(ddp, fsdp):
        assert FeatureStore(a.captured("pool")).complete and not b.captured("pool").exists()
        ma, mb = load_moments(a.path), load_moments(b.path)
        for k in ma.exp_avg:
            torch.testing.assert_close(mb.exp_avg[k], ma.exp_avg[k], rtol=1e-5, atol=1e-8)
    assert FeatureStore(tmp_path / "fsdp" / "less_features" / "pool").num_rows == 13  # featurized after
    one, two = load_selection(tmp_path / "ddp"), load_selection(tmp_path / "fsdp")
    assert len(one.indices) == len(two.indices) == 5
    np.testing.assert_allclose(np.load(tmp_path / "fsdp" / "less_scores.npy"),
                               np.load(tmp_path / "ddp" / "less_scores.npy"), atol=1e-4)
    assert (tmp_path / "fsdp" / "adapter_model.safetensors").exists()  # then it trained on the selection
