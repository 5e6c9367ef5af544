"""LessCallback in real Trainer and SFTTrainer runs: moments, LR weights, errors."""

import json

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments, get_linear_schedule_with_warmup

from hf_less import LessCallback
from hf_less.gradients.state import find_checkpoints, load_moments
from hf_less.gradients.per_example import parameter_key

from tests.testing_utils import collator, lora_config, make_lora_model, make_model, tokenized_dataset, toy_tasks


class Snapshot(TrainerCallback):
    """Independent record of the optimizer state by parameter name at every save."""

    def __init__(self):
        self.saved = {}

    def on_save(self, args, state, control, model=None, optimizer=None, **kw):
        opt = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
        by_id = {id(p): n for n, p in model.named_parameters()}
        snap = {}
        for g in opt.param_groups:
            for p in g["params"]:
                st = opt.state[p]
                snap[parameter_key(by_id[id(p)])] = (st["exp_avg"].clone(), st["exp_avg_sq"].clone())
        self.saved[state.global_step] = snap


def expected_mean_lrs(lr, warmup, total, save_steps):
    """Mean LR per interval from the scheduler itself (step s uses the LR before its scheduler step)."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=lr)
    sched = get_linear_schedule_with_warmup(opt, warmup, total)
    used = []
    for _ in range(total):
        used.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    out, prev = [], 0
    for s in save_steps:
        out.append(sum(used[prev:s]) / (s - prev))
        prev = s
    return out


@pytest.mark.parametrize("optim,strategy,accum", [
    ("adamw_torch", "steps", 1),
    ("adamw_torch_fused", "epoch", 2),
])
def test_trainer_saves_moments_and_lr(tmp_path, tokenizer, optim, strategy, accum):
    model = make_lora_model(tokenizer, random_b=False)
    snap = Snapshot()
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=accum,
        num_train_epochs=2, learning_rate=1e-3, lr_scheduler_type="linear", warmup_steps=2,
        save_strategy=strategy, save_steps=3, optim=optim, report_to=[], use_cpu=True, seed=0,
        logging_steps=1, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=tokenized_dataset(tokenizer),
                      data_collator=collator, callbacks=[LessCallback(), snap])
    trainer.train()
    total = trainer.state.global_step
    ckpts = find_checkpoints(tmp_path)
    steps = [c.step for c in ckpts]
    assert steps == sorted(snap.saved) and len(steps) >= 2
    for c in ckpts:
        moments = load_moments(c.path)
        ref = snap.saved[c.step]
        assert set(moments.exp_avg) == set(ref)
        for k, (m, v) in ref.items():
            torch.testing.assert_close(moments.exp_avg[k], m, rtol=0, atol=0)
            torch.testing.assert_close(moments.exp_avg_sq[k], v, rtol=0, atol=0)
        assert moments.betas == (0.9, 0.999) and moments.eps == 1e-8
        state = json.loads((c.path / "less_state.json").read_text())
        assert state["global_step"] == c.step
        # the Trainer's own files are still there
        assert (c.path / "adapter_model.safetensors").exists() and (c.path / "optimizer.pt").exists()
    mean = expected_mean_lrs(1e-3, 2, total, steps)
    for c, m in zip(ckpts, mean):
        assert c.mean_lr == pytest.approx(m, rel=1e-9)
    assert sum(c.weight for c in ckpts) == pytest.approx(1.0)
    assert [c.weight for c in ckpts] == pytest.approx([m / sum(mean) for m in mean])


def test_sft_trainer_with_peft_config(tmp_path, tokenizer):
    from trl import SFTConfig, SFTTrainer

    rows = toy_tasks(6)
    snap = Snapshot()
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_train_epochs=2,
                     learning_rate=1e-3, save_strategy="epoch", report_to=[], use_cpu=True,
                     max_length=64, disable_tqdm=True, logging_steps=1)
    trainer = SFTTrainer(make_model(len(tokenizer)), args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer, peft_config=lora_config(),
                         callbacks=[LessCallback(), snap])
    trainer.train()
    ckpts = find_checkpoints(tmp_path)
    assert len(ckpts) == 2
    for c in ckpts:
        moments = load_moments(c.path)
        assert moments.exp_avg.keys() == snap.saved[c.step].keys()
        assert all("lora_" in k for k in moments.exp_avg)
        for k, (m, v) in snap.saved[c.step].items():
            assert torch.equal(moments.exp_avg[k], m) and torch.equal(moments.exp_avg_sq[k], v)


def test_non_adam_optimizer_is_refused(tmp_path, tokenizer):
    args = TrainingArguments(output_dir=str(tmp_path), optim="sgd", report_to=[], use_cpu=True,
                             max_steps=1, disable_tqdm=True)
    trainer = Trainer(model=make_lora_model(tokenizer), args=args, train_dataset=tokenized_dataset(tokenizer, 2),
                      data_collator=collator, callbacks=[LessCallback()])
    with pytest.raises(ValueError, match="needs an Adam optimizer.*adamw_torch"):
        trainer.train()


def test_no_trainable_parameters_is_refused(tmp_path, tokenizer):
    model = make_lora_model(tokenizer)
    for p in model.parameters():
        p.requires_grad_(False)
    # The Trainer builds an (empty-group) optimizer; the callback must refuse before training.
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=1, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=tokenized_dataset(tokenizer, 2),
                      data_collator=collator, callbacks=[LessCallback()])
    with pytest.raises(ValueError, match="no trainable parameters"):
        trainer.train()


def test_separate_output_dir_is_a_complete_warmup(tmp_path, tokenizer):
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), report_to=[], use_cpu=True, max_steps=2,
                             save_steps=1, save_strategy="steps", disable_tqdm=True, per_device_train_batch_size=2)
    trainer = Trainer(model=make_lora_model(tokenizer), args=args, train_dataset=tokenized_dataset(tokenizer, 2),
                      data_collator=collator, callbacks=[LessCallback(output_dir=tmp_path / "less")])
    trainer.train()
    ckpts = find_checkpoints(tmp_path / "less")
    assert [c.step for c in ckpts] == [1, 2]
    assert all((c.path / "adapter_model.safetensors").exists() for c in ckpts)
