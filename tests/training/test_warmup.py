"""The LESS warmup: its LR schedule (every step at a positive LR, checkpoints weighted by the LRs applied) and
its rows (the same seed, the same subset) (issue 15, items 6 and 10)."""

from types import SimpleNamespace

import numpy as np
import pytest
from datasets import Dataset
from safetensors.torch import load_file

from hf_less import LessSFTConfig, LessSFTTrainer
from hf_less.gradients.state import find_checkpoints
from hf_less.selection.record import load_pool_scores
from hf_less import cli
from hf_less.training.layout import RunLayout
from hf_less.training.warmup import warmup_indices, warmup_lr_factor, warmup_size, warmup_subset

from tests.testing_utils import make_model, toy_tasks, trainer_for
from tests.testing_utils import FEW_TARGETS as TARGETS


# -- item 10 and 6: the warmup schedule ----------------------------------------------------------------


def test_warmup_lr_factor_is_positive_at_every_step():
    assert [warmup_lr_factor(s, 1, 1) for s in range(1)] == [0.5]
    assert [warmup_lr_factor(s, 1, 2) for s in range(2)] == [0.5, 1.0]
    factors = [warmup_lr_factor(s, 3, 100) for s in range(100)]  # ceil(3% of 100) warmup steps
    assert factors[:5] == [0.25, 0.5, 0.75, 1.0, 96 / 97]
    assert all(0 < f <= 1 for f in factors) and factors[-1] == pytest.approx(1 / 97)
    assert factors == sorted(factors[:4]) + sorted(factors[4:], reverse=True)


def test_a_one_step_warmup_has_usable_weights(tmp_path, tokenizer):
    """One optimizer step per epoch, one epoch: the only step ran at a positive LR, and that LR is recorded."""
    trainer = trainer_for(tmp_path, tokenizer, less_warmup_epochs=1, less_warmup_fraction=0.25, less_budget=2,
                          less_lora_dropout=0.0)
    assert len(trainer.select_data()) == 2
    (ckpt,) = find_checkpoints(tmp_path / "less_warmup")
    assert ckpt.step == 1 and ckpt.state["lr_steps"] == 1 and ckpt.weight == 1.0
    assert ckpt.mean_lr == pytest.approx(2e-3 * 0.5)  # warmup_lr_factor(0, 1, 1) of the peak LR
    # Independently: one Adam step from zero moments moves every lora_B entry (B starts at 0) by
    # lr * g / (|g| + eps), so the largest |B| is the LR the step actually applied.
    b = [v for k, v in load_file(ckpt.path / "adapter_model.safetensors").items() if "lora_B" in k]
    assert max(float(t.abs().max()) for t in b) == pytest.approx(ckpt.mean_lr, rel=1e-4)
    assert np.isfinite(load_pool_scores(tmp_path)).all()


def test_two_one_step_epochs_weight_by_the_applied_lrs(tmp_path, tokenizer):
    trainer_for(tmp_path, tokenizer, less_warmup_epochs=2, less_warmup_fraction=0.25, less_budget=2).select_data()
    ckpts = find_checkpoints(tmp_path / "less_warmup")
    assert [c.step for c in ckpts] == [1, 2]
    assert [c.mean_lr for c in ckpts] == pytest.approx([1e-3, 2e-3])
    assert [c.weight for c in ckpts] == pytest.approx([1 / 3, 2 / 3])


# -- the warmup's rows ----------------------------------------------------------------------------------


def test_same_seed_same_warmup_subset(tokenizer, tmp_path, monkeypatch):
    import hf_less.training.trainer as trainer_module

    class Stop(Exception):
        pass

    seen = []

    class Recorder:  # stands in for the warmup's SFTTrainer: records its data, trains nothing
        def __init__(self, model, args=None, train_dataset=None, **kw):
            seen.append(train_dataset["prompt"])
            raise Stop

    monkeypatch.setattr(trainer_module, "WarmupSFTTrainer", Recorder)
    pool = Dataset.from_list([{**r, "prompt": f"{i}: {r['prompt']}"} for i, r in enumerate(toy_tasks(10, seed=7))])

    def warmup_rows(seed, batch):
        args = LessSFTConfig(output_dir=str(tmp_path / f"{seed}-{batch}"), less_budget=4, less_warmup_fraction=0.25,
                             less_seed=seed, per_device_train_batch_size=batch, use_cpu=True, report_to=[],
                             max_length=64, disable_tqdm=True, less_proj_dim=32)
        trainer = LessSFTTrainer(make_model(len(tokenizer)), args=args, train_dataset=pool, target_dataset=TARGETS,
                                 processing_class=tokenizer)
        with pytest.raises(Stop):
            trainer.select_data()
        return seen[-1]

    a, b, c, other = warmup_rows(0, 2), warmup_rows(0, 2), warmup_rows(0, 5), warmup_rows(1, 2)
    assert a == b == c and len(a) == 5 and len(set(a)) == 5 and set(a) <= set(pool["prompt"])
    assert other != a
    positions = [pool["prompt"].index(p) for p in a]
    assert positions == sorted(positions)  # kept in pool order


# -- one warmup rule at every entry point (issue 17) ------------------------------------------------------


@pytest.mark.parametrize("n,fraction,seed", [(1, 0.05, 0), (10, 0.25, 0), (10, 0.25, 3), (97, 0.05, 1), (40, 1.0, 2)])
def test_warmup_rows_are_the_seeded_shuffles_first_rows_in_pool_order(n, fraction, seed):
    pool = Dataset.from_dict({"i": list(range(n))})
    size = max(1, round(fraction * n))
    expected = sorted(pool.shuffle(seed=seed).select(range(size))["i"])  # what hf-less 0.1's CLI trained on
    assert warmup_size(n, fraction) == size
    assert warmup_indices(n, fraction, seed) == expected
    assert warmup_subset(pool, fraction, seed)["i"] == expected


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_a_warmup_fraction_outside_0_1_is_refused(fraction):
    with pytest.raises(ValueError, match=r"warmup fraction must be in \(0, 1\]"):
        warmup_size(10, fraction)


def _numbered_pool():
    return Dataset.from_list([{**r, "prompt": f"{i}: {r['prompt']}"} for i, r in enumerate(toy_tasks(10, seed=7))])


class _Stop(Exception):
    pass


def test_the_trainer_warms_up_on_warmup_subset(tokenizer, tmp_path, monkeypatch):
    import hf_less.training.trainer as trainer_module

    seen = []

    def recorder(model, args=None, train_dataset=None, **kw):  # trains nothing: records the warmup rows
        seen.append(train_dataset["prompt"])
        raise _Stop

    monkeypatch.setattr(trainer_module, "WarmupSFTTrainer", recorder)
    pool = _numbered_pool()
    args = LessSFTConfig(output_dir=str(tmp_path), less_budget=4, less_warmup_fraction=0.25, less_seed=5,
                         use_cpu=True, report_to=[], max_length=64, disable_tqdm=True, less_proj_dim=32)
    trainer = LessSFTTrainer(make_model(len(tokenizer)), args=args, train_dataset=pool,
                             target_dataset=[r for r in toy_tasks(2, seed=3)], processing_class=tokenizer)
    with pytest.raises(_Stop):
        trainer.select_data()
    assert seen == [warmup_subset(pool, 0.25, seed=5)["prompt"]]
    assert (tmp_path / "less_warmup").is_dir() and RunLayout(tmp_path).warmup == tmp_path / "less_warmup"


def test_the_cli_warms_up_on_warmup_subset_into_the_same_layout(tmp_path, monkeypatch):
    seen = []

    def recorder(model, tokenizer, dataset, output_dir, *a, **kw):
        seen.append((dataset["prompt"], output_dir))

    monkeypatch.setattr("hf_less.cli.pipeline.sft_train", recorder)
    pool = _numbered_pool()
    rd = cli.RunData(pool, None, None, None, "task")
    layout = RunLayout(tmp_path)
    cli.do_warmup(None, None, rd, layout, SimpleNamespace(lora_r=4), cli.WarmupArguments(warmup_fraction=0.25),
                  cli.RunArguments(run_dir=str(tmp_path), seed=5, quiet=True))
    assert seen == [(warmup_subset(pool, 0.25, seed=5)["prompt"], tmp_path / "less_warmup")]
