"""The report writes its plots and Markdown, and the Markdown's numbers are the inputs'."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from datasets import Dataset

from hf_less.cli.report import ReportInputs, RunLayout, composition, markdown, precision, report_from_run, write_report
from hf_less.selection.record import Selection, save_selection

PNG = b"\x89PNG\r\n\x1a\n"


def make_inputs(losses=True):
    # 20-row pool: 5 'target' rows (indices 0..4), 15 rows from three other tasks.
    tasks = ["target"] * 5 + ["a"] * 5 + ["b"] * 5 + ["c"] * 5
    scores = np.linspace(1.0, 0.0, 20)  # the target rows score highest
    return ReportInputs(
        target_task="target", pool_tasks=tasks, scores=scores,
        selections={"topk": [0, 1, 2, 3, 5], "random": [4, 7, 11, 16, 19]},
        losses={"zero-shot": 2.5, "random": 2.25, "topk": 1.875} if losses else {},
        settings={"proj_dim": 64}, timings={"warmup": 12.4}, title="test report")


def test_precision_and_composition():
    inputs = make_inputs()
    assert precision(inputs.pool_tasks, inputs.selections["topk"], "target") == 0.8
    assert precision(inputs.pool_tasks, inputs.selections["random"], "target") == 0.2
    assert composition(inputs.pool_tasks, inputs.selections["random"]) == {"target": 1, "a": 1, "b": 1, "c": 2}
    assert np.isnan(precision(inputs.pool_tasks, [], "target"))


def test_writes_plots_and_markdown_numbers(tmp_path):
    path = write_report(make_inputs(), tmp_path / "rep")
    for name in ("summary.png", "scores.png", "composition.png", "precision.png", "loss.png"):
        assert (tmp_path / "rep" / name).read_bytes()[:8] == PNG, name
    md = path.read_text()
    assert path.name == "report.md" and md.startswith("# test report")
    assert "pool: 20 examples from 4 tasks" in md
    assert "| pool | 20 | 5 | 25.0% |" in md
    assert "| topk | 5 | 4 | 80.0% |" in md
    assert "| random | 5 | 1 | 20.0% |" in md
    # composition rows: task | topk | random
    assert "| **target** | 4 | 1 |" in md and "| c | 0 | 2 |" in md and "| a | 1 | 1 |" in md
    assert "| zero-shot | 2.5000 |" in md and "| random | 2.2500 |" in md and "| topk | 1.8750 |" in md
    assert "| 0.0000 | 0.5000 | 0.5000 | 1.0000 |" in md  # min, median, mean, max of the scores
    assert "| warmup | 12 |" in md and "| proj_dim | 64 |" in md
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (tmp_path / "rep" / image).exists()


def test_without_training_or_tasks(tmp_path):
    write_report(make_inputs(losses=False), tmp_path / "a")
    assert not (tmp_path / "a" / "loss.png").exists() and "Target loss" not in (tmp_path / "a" / "report.md").read_text()
    inputs = make_inputs(losses=False)
    inputs.pool_tasks = None
    md = write_report(inputs, tmp_path / "b").read_text()
    assert "no task column" in md and (tmp_path / "b" / "scores.png").exists()
    assert not (tmp_path / "b" / "precision.png").exists()


def test_markdown_without_plots_references_none():
    assert "![" not in markdown(make_inputs(), plots=[])


def test_report_from_run_directory(tmp_path):
    layout = RunLayout(tmp_path / "run")
    inputs = make_inputs()
    Dataset.from_dict({"prompt": ["p"] * 20, "completion": [" c"] * 20, "task": inputs.pool_tasks}).save_to_disk(
        str(layout.data / "pool"))
    for name, idx in inputs.selections.items():
        save_selection(layout.selection(name), Selection(indices=idx, strategy=name, budget=5, pool_size=20),
                       pool_scores=inputs.scores)
    layout.evaluation.write_text(json.dumps({"topk": 1.875, "zero-shot": 2.5, "random": 2.25}))
    layout.run_info.write_text(json.dumps({"target_task": "target", "settings": {"proj_dim": 64},
                                           "timings": {"warmup": 12.4}, "title": "test report"}))
    got = report_from_run(layout.root)
    assert list(got.selections) == ["topk", "random"] and got.less_name == "topk"
    assert list(got.losses) == ["zero-shot", "random", "topk"]
    assert np.allclose(got.scores, inputs.scores)
    assert markdown(got) == markdown(inputs)
    with pytest.raises(FileNotFoundError, match="run directory"):
        report_from_run(tmp_path / "nothing")


def test_task_metrics_from_evaluate_get_their_own_column(tmp_path):
    layout = RunLayout(tmp_path / "run")
    inputs = make_inputs()
    Dataset.from_dict({"prompt": ["p"] * 20, "completion": [" c"] * 20, "task": inputs.pool_tasks}).save_to_disk(
        str(layout.data / "pool"))
    layout.evaluation.write_text(json.dumps({"zero-shot": {"target_loss": 2.5, "mc_accuracy": 0.25},
                                             "topk": {"target_loss": 1.875, "mc_accuracy": 0.625}, "random": 2.25}))
    got = report_from_run(layout.root)
    assert got.losses == {"zero-shot": 2.5, "random": 2.25, "topk": 1.875}
    assert got.metrics == {"zero-shot": {"mc_accuracy": 0.25}, "topk": {"mc_accuracy": 0.625}}
    md = markdown(got, plots=[])
    assert "| model | target loss | mc_accuracy |" in md
    assert "| topk | 1.8750 | 0.6250 |" in md and "| random | 2.2500 |  |" in md
