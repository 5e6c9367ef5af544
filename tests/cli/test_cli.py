"""``hf-less`` subcommands end to end on a tiny random model saved to disk and a tiny JSONL pool."""

from __future__ import annotations

import json
import re
from dataclasses import fields

import pytest

from hf_less import cli
from hf_less.cli.report import RunLayout
from hf_less.selection.record import load_selection
from tests.testing_utils import make_fake_archive, make_model, make_tokenizer, toy_tasks


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama + char tokenizer saved with save_pretrained, and JSONL pool / targets / eval files."""
    root = tmp_path_factory.mktemp("tiny")
    tokenizer = make_tokenizer()
    model = make_model(len(tokenizer), seed=0)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    rows = toy_tasks(10, seed=0)  # 20 rows: 10 math, 10 reverse
    held = [r for r in toy_tasks(6, seed=1) if r["task"] == "math"]
    for name, data in (("pool", rows), ("targets", held[:3]), ("eval", held[3:])):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    return root


def common(tiny, run_dir):
    return ["--run_dir", str(run_dir), "--model", str(tiny / "model"), "--dataset", str(tiny / "pool.jsonl"),
            "--targets", str(tiny / "targets.jsonl"), "--eval", str(tiny / "eval.jsonl"), "--max_length", "64",
            "--batch_size", "4", "--lora_r", "4", "--quiet"]


def test_plan_prints_each_stage_and_the_store_size(tiny, tmp_path, capsys):
    from hf_less.gradients.quantize import store_bytes

    run_dir = tmp_path / "run"
    assert cli.main(["plan", *common(tiny, run_dir), "--pool_size", "1000000", "--store_dtype", "int4",
                     "--proj_dim", "8192", "--warmup_epochs", "4", "--measure_steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "plan for a pool of 1,000,000 examples" in out
    for stage in ("warmup", "featurize", "scoring", "final training", "total"):
        assert re.search(rf"^  {stage} +[\d.]+ (s|min|h)", out, re.M), stage
    assert f"{store_bytes('int4', 8192, 10**6, 4) / 1e9:.2f} GB   int4" in out  # 16.43 GB
    assert "50000 rows, 4 epochs" in out  # 5% of the million


def test_subcommands_end_to_end(tiny, tmp_path, capsys):
    run_dir = tmp_path / "run"
    layout = RunLayout(run_dir)
    args = common(tiny, run_dir)
    assert cli.main(["warmup", *args, "--warmup_fraction", "0.4", "--warmup_epochs", "2"]) == 0
    ckpts = sorted(p.name for p in layout.warmup.glob("checkpoint-*"))
    assert len(ckpts) == 2 and all((layout.warmup / c / "less_state.json").exists() for c in ckpts)
    meta = json.loads((layout.data / "data.json").read_text())
    assert meta["pool"] == 20 and meta["target_task"] == "math"  # inferred from the targets' task column

    assert cli.main(["featurize", *args, "--proj_dim", "32"]) == 0
    assert (layout.features / "less_scores.npy").exists() and (layout.features / "targets.safetensors").exists()

    assert cli.main(["select", *args, "--budget", "5"]) == 0  # proj_dim and checkpoints: the store's
    assert cli.main(["select", *args, "--budget", "0.25", "--strategy", "random"]) == 0
    topk, rand = load_selection(layout.selection("topk")), load_selection(layout.selection("random"))
    assert topk.k == 5 and rand.k == 5 and topk.pool_size == 20 and topk.strategy == "topk"
    assert topk.scores == sorted(topk.scores, reverse=True)
    assert topk.extra["target_task"] == "math" and len(topk.checkpoints) == 2
    out = capsys.readouterr().out
    assert "select: topk (topk) kept 5 of 20" in out and "from 'math'" in out
    # "1" is one example and "1.0" the whole pool, as LessSFTConfig(less_budget=1 / 1.0) (issue 15)
    assert cli.main(["select", *args, "--budget", "1", "--name", "one"]) == 0
    assert cli.main(["select", *args, "--budget", "1.0", "--name", "all"]) == 0
    one, whole = load_selection(layout.selection("one")), load_selection(layout.selection("all"))
    assert (one.k, one.budget, type(one.budget)) == (1, 1, int) and one.indices == topk.indices[:1]
    assert (whole.k, whole.budget, type(whole.budget)) == (20, 1.0, float) and whole.indices[:5] == topk.indices
    capsys.readouterr()

    assert cli.main(["train", *args, "--selection", "topk", "--train_epochs", "1"]) == 0
    assert (layout.train / "topk" / "adapter_config.json").exists()
    assert cli.main(["evaluate", *args]) == 0
    capsys.readouterr()
    assert cli.main(["evaluate", *args, "--adapter", "topk", "--task_metric", "--max_new_tokens", "4"]) == 0
    results = json.loads(layout.evaluation.read_text())
    assert set(results) == {"zero-shot", "topk"} and set(results["zero-shot"]) == {"target_loss"}
    losses = {k: v["target_loss"] for k, v in results.items()}
    assert all(v > 0 for v in losses.values()) and losses["zero-shot"] != losses["topk"]
    # the eval rows have no options: exact match, the same as hf_less.evaluation.metrics computes it directly
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_less.evaluation.metrics import exact_match

    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny / "model"), layout.train / "topk")
    rows = [json.loads(line) for line in (tiny / "eval.jsonl").read_text().splitlines()]
    want = exact_match(tuned, AutoTokenizer.from_pretrained(tiny / "model"),
                       [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows], max_new_tokens=4,
                       batch_size=4, show_progress=False)
    assert results["topk"]["exact_match"] == want
    out = capsys.readouterr().out
    assert f"evaluate: topk: target loss {losses['topk']:.4f}, exact match {want:.4f}" in out
    assert f"beside zero-shot: target loss {losses['zero-shot']:.4f}" in out

    assert cli.main(["report", "--run_dir", str(run_dir)]) == 0
    md = (layout.report / "report.md").read_text()
    assert (layout.report / "summary.png").exists() and (layout.report / "loss.png").exists()
    assert f"| zero-shot | {losses['zero-shot']:.4f} |" in md
    assert "| pool | 20 | 10 | 50.0% |" in md
    hits = sum(1 for i in topk.indices if json.loads((tiny / "pool.jsonl").read_text().splitlines()[i])["task"] == "math")
    assert f"| topk | 5 | {hits} | {100 * hits / 5:.1f}% |" in md


def test_errors_name_the_fix(tiny, tmp_path, capsys, monkeypatch):
    args = common(tiny, tmp_path / "run")
    assert cli.main(["evaluate", *args, "--adapter", "nothing"]) == 1
    assert "hf-less train" in capsys.readouterr().err
    assert cli.main(["train", *args, "--selection", "nothing"]) == 1
    assert "hf-less select" in capsys.readouterr().err
    no_targets = [a for a in args if a not in ("--targets", str(tiny / "targets.jsonl"))]
    assert cli.main(["warmup", *no_targets, "--rebuild_data"]) == 1
    assert "hf-less: error: With --dataset PATH, give the target examples too: --targets" in capsys.readouterr().err
    monkeypatch.setenv("HF_LESS_TRACEBACK", "1")
    with pytest.raises(FileNotFoundError, match="hf-less select"):
        cli.main(["train", *args, "--selection", "nothing"])


@pytest.mark.parametrize("text,budget", [("1", 1), ("1.0", 1.0), ("0.05", 0.05), ("500", 500), ("5e-2", 0.05)])
def test_budget_text_is_a_count_or_a_fraction(text, budget):
    """Digits only is a count; a decimal point or an exponent makes a fraction (selectors.parse_budget)."""
    _, parsed = cli.parse(["select", "--budget", text])
    (sel,) = [a for a in parsed if isinstance(a, cli.SelectArguments)]
    assert sel.budget == budget and type(sel.budget) is type(budget)


@pytest.mark.parametrize("text,message", [("0", "budget=0 must be a count >= 1"),
                                          ("-1", "budget=-1 must be a count >= 1"),
                                          ("2.5", "budget=2.5 as a fraction must be in (0, 1]"),
                                          ("20.0", "budget=20.0 as a fraction must be in (0, 1] (1.0 is the whole "
                                                   "pool). For a count of 20 examples give the int 20."),
                                          ("all", "budget='all' is not a number")])
def test_bad_budget_text_is_refused_with_the_rule(text, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.parse(["select", "--budget", text])
    assert exit_.value.code == 2 and f"argument --budget: {message}" in capsys.readouterr().err
    with pytest.raises(ValueError, match=re.escape(message)):  # built in Python: the same rule
        cli.SelectArguments(budget=text)


def test_help_documents_every_option(capsys):
    for command, (_, classes, _) in cli.COMMANDS.items():
        with pytest.raises(SystemExit) as exit_:
            cli.main([command, "--help"])
        assert exit_.value.code == 0
        text = capsys.readouterr().out
        for cls in classes:
            for f in fields(cls):
                assert f"--{f.name}" in text, (command, f.name)
    with pytest.raises(SystemExit):
        cli.main(["nonsense"])
    assert "unknown command" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    usage = capsys.readouterr().out
    assert all(c in usage for c in cli.COMMANDS)


def test_demo_on_a_fake_bigbench(tiny, tmp_path, monkeypatch, capsys):
    from hf_less.cli import bigbench

    monkeypatch.setenv("HF_LESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(bigbench.ARCHIVE_ENV, str(make_fake_archive(tmp_path / "bb.tar.gz")))
    run_dir = tmp_path / "demo"
    assert cli.main(["demo", "--run_dir", str(run_dir), "--model", str(tiny / "model"), "--target_task", "alpha",
                     "--tasks", "beta", "gamma", "delta", "--examples_per_task", "8", "--num_targets", "3",
                     "--num_eval", "4", "--budget", "4", "--warmup_fraction", "0.25", "--lora_r", "4",
                     "--batch_size", "4", "--train_epochs", "1", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "scaled to fit a small CPU" in out and "--proj_dim 512" in out and "--max_length 128" in out
    # the plan, measured before the warmup starts
    assert out.index("plan for a pool of 32 examples") < out.index("warmup: LoRA")
    assert re.search(r"LESS \(topk\) +4 examples: \d+% from the target task", out)
    assert re.search(r"random +4 examples: \d+% from the target task", out) and "done in" in out
    info = json.loads((run_dir / "run.json").read_text())
    summary = info["summary"]
    assert set(info["plan"]) == {"warmup", "featurize", "scoring", "final training"}
    assert summary["pool"] == 32 and summary["pool_share"] == 0.25
    assert set(summary["losses"]) == {"zero-shot", "random", "LESS"}
    md = (run_dir / "report" / "report.md").read_text()
    assert f"| LESS | 4 | {round(4 * summary['precision_less'])} | {100 * summary['precision_less']:.1f}% |" in md
    # A second demo in the same directory starts afresh; a foreign directory is refused.
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "x").write_text("mine")
    assert cli.main(["demo", "--run_dir", str(tmp_path / "foreign"), "--model", str(tiny / "model")]) == 1
    assert "not an hf-less run directory" in capsys.readouterr().err
    assert (tmp_path / "foreign" / "x").read_text() == "mine"


def test_training_bar_counts_examples():
    """10 examples, batch 4, 3 epochs: steps of 4, 4, 2 examples; the bar ends at exactly 30."""
    from types import SimpleNamespace

    cb = cli.examples_progress("train", disable=False)
    args = SimpleNamespace(per_device_train_batch_size=4, gradient_accumulation_steps=1, world_size=1,
                           num_train_epochs=3)
    state = SimpleNamespace(max_steps=9, global_step=0, is_world_process_zero=True)
    cb.on_train_begin(args, state, None, train_dataloader=SimpleNamespace(dataset=list(range(10))))
    seen = []
    for step in range(1, 10):
        state.global_step = step
        cb.on_step_end(args, state, None)
        seen.append(cb.bar.n)
    cb.on_train_end(args, state, None)
    assert seen == [4, 8, 10, 14, 18, 20, 24, 28, 30] and cb.bar.total == 30


def test_compile_projection_is_read_and_refused_for_another_kind():
    _, parsed = cli.parse(["featurize", "--compile_projection", "true"])
    (feat,) = [a for a in parsed if isinstance(a, cli.FeaturizeArguments)]
    assert feat.compile_projection is True and feat.proj_kind == "rowshift"
    with pytest.raises(ValueError, match=re.escape("--compile_projection compiles the row-shift projection: it needs "
                                                   "--proj_kind='rowshift' and a --proj_dim (got --proj_kind='sparse'")):
        cli.parse(["featurize", "--compile_projection", "true", "--proj_kind", "sparse"])
