"""The CLI never selects with stale or foreign features (issue 23): a pool changed after `featurize`,
a base model other than the warmup's."""

from __future__ import annotations

import json

import pytest

from hf_less import cli
from hf_less.cli.report import RunLayout
from hf_less.selection.record import load_selection
from tests.testing_utils import make_model, make_tokenizer, toy_tasks


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama + char tokenizer saved with save_pretrained, a second model, and JSONL pool / targets."""
    root = tmp_path_factory.mktemp("tiny")
    tokenizer = make_tokenizer()
    for name, seed in (("model", 0), ("other", 1)):
        make_model(len(tokenizer), seed=seed).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    rows = toy_tasks(8, seed=0)  # 16 rows: 8 math, 8 reverse
    held = [r for r in toy_tasks(6, seed=1) if r["task"] == "math"]
    for name, data in (("pool", rows), ("targets", held[:3])):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    return root


def common(tiny, run_dir, model="model"):
    return ["--run_dir", str(run_dir), "--model", str(tiny / model), "--dataset", str(tiny / "pool.jsonl"),
            "--targets", str(tiny / "targets.jsonl"), "--max_length", "64", "--batch_size", "4", "--lora_r", "4",
            "--quiet"]


@pytest.fixture(scope="module")
def run(tiny, tmp_path_factory):
    """warmup + featurize (proj_dim 32) + `select --name a`, once for the module."""
    run_dir = tmp_path_factory.mktemp("run") / "run"
    args = common(tiny, run_dir)
    assert cli.main(["warmup", *args, "--warmup_fraction", "0.5", "--warmup_epochs", "2"]) == 0
    assert cli.main(["featurize", *args, "--proj_dim", "32"]) == 0
    assert cli.main(["select", *args, "--budget", "4", "--name", "a"]) == 0
    return run_dir


def _prompts(tiny_pool, selection) -> list[str]:
    rows = [json.loads(line) for line in tiny_pool.read_text().splitlines()]
    return [rows[i]["prompt"] for i in selection.indices]


def test_a_reversed_pool_selects_the_same_examples(tiny, run, tmp_path, capsys):
    """The issue's reproduction: the pool file reversed, `select --rebuild_data` kept the old scores by position."""
    layout = RunLayout(run)
    a = load_selection(layout.selection("a"))
    want = _prompts(tiny / "pool.jsonl", a)
    rows = (tiny / "pool.jsonl").read_text().splitlines()
    reversed_pool = tmp_path / "reversed.jsonl"
    reversed_pool.write_text("\n".join(rows[::-1]) + "\n")
    args = common(tiny, run)
    args[args.index("--dataset") + 1] = str(reversed_pool)
    assert cli.main(["select", *args, "--budget", "4", "--name", "b", "--rebuild_data"]) == 0
    b = load_selection(layout.selection("b"))
    assert _prompts(reversed_pool, b) == want  # the same examples, in the same order
    assert b.scores == pytest.approx(a.scores)
    # an edited pool is refused, naming the fix
    edited = tmp_path / "edited.jsonl"
    first = json.loads(rows[0])
    edited.write_text("\n".join([json.dumps({**first, "completion": first["completion"] + "9"}), *rows[1:]]) + "\n")
    args[args.index("--dataset") + 1] = str(edited)
    assert cli.main(["select", *args, "--budget", "4", "--name", "c", "--rebuild_data"]) == 1
    err = capsys.readouterr().err
    assert "holds features of another pool: 1 of the 16 rows of this pool (the first: row 0)" in err
    assert "hf-less featurize" in err and not layout.selection("c").exists()
    # the data is now the edited pool (rebuilt before select c failed): selection a indexes other rows there
    assert cli.main(["train", *common(tiny, run)[:4], "--dataset", str(reversed_pool),
                     *common(tiny, run)[6:], "--selection", "a", "--train_epochs", "1"]) == 1
    assert "indexes another pool than this run's" in capsys.readouterr().err
    # put the run's data back for the other tests of the module
    assert cli.main(["select", *common(tiny, run), "--budget", "4", "--name", "a", "--rebuild_data"]) == 0


def test_featurize_with_another_model_than_the_warmup_is_refused(tiny, tmp_path, capsys):
    """`hf-less warmup --model X` then `featurize` with the default model mixed two models silently."""
    run_dir = tmp_path / "run"
    assert cli.main(["warmup", *common(tiny, run_dir, "other"), "--warmup_fraction", "0.25",
                     "--warmup_epochs", "1"]) == 0
    capsys.readouterr()
    assert cli.main(["featurize", *common(tiny, run_dir), "--proj_dim", "32"]) == 1
    err = capsys.readouterr().err
    assert "was trained on the base model" in err and "has other weights" in err and "--model of `hf-less warmup`" in err
    assert not RunLayout(run_dir).store.exists()
    assert cli.main(["featurize", *common(tiny, run_dir, "other"), "--proj_dim", "32"]) == 0
