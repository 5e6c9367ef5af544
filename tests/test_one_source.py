"""One source of truth per rule: every entry point takes the warmup rows and the run layout from the library."""

from types import SimpleNamespace

import pytest
from datasets import Dataset

from hf_less import LessSFTConfig, LessSFTTrainer, cli
from hf_less.training.layout import RunLayout
from hf_less.training.warmup import warmup_indices, warmup_size, warmup_subset

from .conftest import make_model, toy_tasks


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


def test_a_run_dir_with_the_old_cli_names_is_refused_with_the_rename(tmp_path, capsys):
    (tmp_path / "warmup").mkdir()
    (tmp_path / "features").mkdir()
    with pytest.raises(FileExistsError) as e:
        RunLayout(tmp_path).check_not_old()
    assert "hf-less 0.1" in str(e.value)
    assert f"mv {tmp_path / 'warmup'} {tmp_path / 'less_warmup'}" in str(e.value)
    assert f"mv {tmp_path / 'features'} {tmp_path / 'less_features'}" in str(e.value)
    assert cli.main(["report", "--run_dir", str(tmp_path)]) == 1
    assert "hf-less 0.1" in capsys.readouterr().err
    (tmp_path / "less_warmup").mkdir()
    (tmp_path / "less_features").mkdir()
    RunLayout(tmp_path).check_not_old()  # renamed (or both present): accepted


def test_one_dataset_path_loader_for_the_cli_and_the_examples(tmp_path):
    from datasets import DatasetDict

    from hf_less.data import load_dataset_path

    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]
    (tmp_path / "pool.jsonl").write_text("".join(f'{{"prompt": "{r["prompt"]}", "completion": "{r["completion"]}"}}\n'
                                                 for r in rows))
    assert load_dataset_path(tmp_path / "pool.jsonl").to_list() == rows
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    assert load_dataset_path(str(tmp_path / "saved")).to_list() == rows
    DatasetDict(train=Dataset.from_list(rows)).save_to_disk(str(tmp_path / "dict"))
    assert load_dataset_path(tmp_path / "dict").to_list() == rows
    DatasetDict(test=Dataset.from_list(rows)).save_to_disk(str(tmp_path / "no_train"))
    with pytest.raises(ValueError, match="DatasetDict without a 'train' split"):
        load_dataset_path(tmp_path / "no_train")
    with pytest.raises(FileNotFoundError, match="does not exist; give a JSONL file or a datasets.save_to_disk"):
        load_dataset_path(tmp_path / "missing.jsonl")
    (tmp_path / "pool.csv").write_text("prompt,completion\n")
    with pytest.raises(ValueError, match="expected a .jsonl/.json file or a save_to_disk directory"):
        load_dataset_path(tmp_path / "pool.csv")
    import examples.sft_with_less as example  # the example reads its --pool/--targets with the same function

    assert example.load_dataset_path is load_dataset_path


def test_every_target_scorer_selects_with_one_rule():
    import numpy as np

    from hf_less import LessSelector
    from hf_less.scoring.base import TargetScorer
    from hf_less.scoring.representations import RepresentationSelector

    for cls in (LessSelector, RepresentationSelector):
        assert issubclass(cls, TargetScorer)
        assert all(getattr(cls, m) is getattr(TargetScorer, m) for m in ("order", "select", "filter_fn"))

    class Scorer(TargetScorer):  # the columns map(scorer) leaves, without a model
        score_column, sims_column = "x_score", "x_sims"
        subtask_ids, subtask_names = np.zeros(2, dtype=np.int64), ["only"]

    scored = Dataset.from_dict({"x_score": [0.1, float("-inf"), 0.9, 0.5, float("-inf")],
                                "x_sims": [[0.1, 0.0], [0.0, 0.0], [0.9, 0.2], [0.5, 0.6], [0.0, 0.0]]})
    s = Scorer()
    assert s.select(scored, 2)["x_score"] == [0.9, 0.5]
    assert scored.filter(s.filter_fn(scored, 0.4), with_indices=True)["x_score"] == [0.9, 0.5]  # pool order
    assert s.select(scored, 3, strategy="round_robin")["x_score"] == [0.9, 0.5, 0.1]
    with pytest.warns(UserWarning, match="Only 3 pool rows can be selected .* fewer than the budget of 4"):
        assert len(s.select(scored, 4)) == 3
    with pytest.raises(ValueError, match="no 'x_score' column: score it first"):
        s.order(Dataset.from_dict({"text": ["a"]}))
