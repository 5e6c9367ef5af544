"""FSDP under torchrun: full Adam moments gathered under FSDP (1 and 2), as a Trainer and LessSFTTrainer run them.

The sharded runs use torchrun with 2 CPU processes over gloo (tests/integration/scripts/fsdp_warmup.py).
accelerate enables FSDP for accelerator devices only, so on CPU the sharding itself is applied by
hand (``fully_shard`` on a CPU mesh, FSDP1 with ``device_id=cpu``), with LessCallback's hooks called
as the Trainer calls them; a Trainer run with ``fsdp=...`` checks the Trainer-side path. Detection, and
DeepSpeed and capture refused, without processes: tests/gradients/test_sharded.py.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from hf_less.gradients.state import find_checkpoints, load_moments
from hf_less.gradients.per_example import parameter_key
from hf_less.gradients.sharded import FSDP_CAPTURE_REFUSAL

from tests.testing_utils import example_args, make_lora_model, torchrun

pytestmark = pytest.mark.integration


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


def test_less_sft_trainer_with_fsdp_warms_up_then_featurizes(tmp_path, tokenizer):
    """With fsdp=..., LessSFTTrainer's warmup saves gathered moments without capture, and the pool is
    featurized afterwards with an unsharded copy; it selects what the capturing (DDP) path selects."""
    import numpy as np

    from hf_less.selection.record import load_selection
    from hf_less.gradients.store import FeatureStore

    example = Path(__file__).parents[2] / "examples" / "sft_with_less.py"
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
