"""The run report: Markdown plus PNG plots (matplotlib, Agg backend, no display needed).

What it shows, for a pool whose rows know their source task:

- ``scores.png``: the distribution of LESS scores over the pool, target-task rows against the
  rest, with the score of the last selected example as the cut-off;
- ``composition.png``: the selected subsets' composition by source task (LESS against random);
- ``precision.png``: the target task's share of the pool against its share of each selection
  (the precision of the selection; random's expected value is the pool share);
- ``loss.png``: target loss on the held-out split for zero-shot, random and LESS, when training ran;
- ``summary.png``: the four panels together (the picture for a README).

``write_report(ReportInputs(...), out_dir)`` writes them; ``report_from_run(run_dir)`` reads a run
directory written by ``hf-less`` (see :class:`hf_less.training.layout.RunLayout`).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..training.layout import RunLayout
from ..utils.io import atomic_write_bytes, atomic_write_text

REPORT_FILE = "report.md"
PLOTS = ("summary.png", "scores.png", "composition.png", "precision.png", "loss.png")
LESS_COLOR, RANDOM_COLOR, POOL_COLOR, TARGET_COLOR = "#d62728", "#7f7f7f", "#1f77b4", "#ff7f0e"


@dataclass
class ReportInputs:
    """Everything a report shows. Indices index the pool; ``pool_tasks[i]`` is row i's source task."""

    target_task: str
    pool_tasks: Sequence[str] | None
    selections: dict[str, Sequence[int]]
    scores: Sequence[float] | None = None
    losses: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # model -> {mc_accuracy: ..}
    settings: dict = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    less_name: str | None = None
    title: str = "hf-less report"


def precision(pool_tasks: Sequence[str], indices: Sequence[int], target_task: str) -> float:
    """Share of ``indices`` whose source task is ``target_task``."""
    if len(indices) == 0:
        return float("nan")
    return sum(pool_tasks[i] == target_task for i in indices) / len(indices)


def composition(pool_tasks: Sequence[str], indices: Sequence[int]) -> Counter:
    """Source-task counts of the rows ``indices``."""
    return Counter(pool_tasks[i] for i in indices)


def _less_name(inputs: ReportInputs) -> str | None:
    if inputs.less_name is not None:
        return inputs.less_name
    others = [n for n in inputs.selections if n != "random"]
    return others[0] if others else None


def _pct(x: float) -> str:
    return "n/a" if x != x else f"{100 * x:.1f}%"


# -- plots -----------------------------------------------------------------------------------------


def _plot_scores(ax, inputs: ReportInputs) -> bool:
    if inputs.scores is None:
        return False
    scores = np.asarray(inputs.scores, dtype=np.float64)
    bins = np.linspace(scores.min(), scores.max(), 31) if scores.max() > scores.min() else 10
    if inputs.pool_tasks is not None:
        is_target = np.array([t == inputs.target_task for t in inputs.pool_tasks])
        ax.hist(scores[~is_target], bins=bins, color=POOL_COLOR, alpha=0.7, label="other tasks")
        ax.hist(scores[is_target], bins=bins, color=TARGET_COLOR, alpha=0.8, label=f"{inputs.target_task}")
    else:
        ax.hist(scores, bins=bins, color=POOL_COLOR, alpha=0.7, label="pool")
    name = _less_name(inputs)
    if name is not None and len(inputs.selections[name]):
        cut = float(np.min(scores[np.asarray(inputs.selections[name], dtype=np.int64)]))
        ax.axvline(cut, color=LESS_COLOR, linestyle="--", label=f"{name} cut-off")
    ax.set_xlabel("LESS score (checkpoint-weighted cosine)")
    ax.set_ylabel("pool examples")
    ax.set_title("Score distribution over the pool")
    ax.legend(fontsize=8)
    return True


def _plot_composition(ax, inputs: ReportInputs, top: int = 10) -> bool:
    if inputs.pool_tasks is None or not inputs.selections:
        return False
    counts = {n: composition(inputs.pool_tasks, idx) for n, idx in inputs.selections.items()}
    total = Counter()
    for c in counts.values():
        total.update(c)
    tasks = [t for t, _ in total.most_common(top)]
    y = np.arange(len(tasks))
    height = 0.8 / max(1, len(counts))
    for j, (name, c) in enumerate(counts.items()):
        color = RANDOM_COLOR if name == "random" else (LESS_COLOR if j == 0 or name == _less_name(inputs) else None)
        ax.barh(y + j * height, [c.get(t, 0) for t in tasks], height=height, label=name, color=color)
    ax.set_yticks(y + height * (len(counts) - 1) / 2, [f"{t} *" if t == inputs.target_task else t for t in tasks],
                  fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("selected examples")
    ax.set_title("Selected subset by source task (* = target)")
    ax.legend(fontsize=8)
    return True


def _plot_precision(ax, inputs: ReportInputs) -> bool:
    if inputs.pool_tasks is None:
        return False
    names = ["pool"] + list(inputs.selections)
    values = [precision(inputs.pool_tasks, range(len(inputs.pool_tasks)), inputs.target_task)]
    values += [precision(inputs.pool_tasks, idx, inputs.target_task) for idx in inputs.selections.values()]
    colors = [POOL_COLOR] + [RANDOM_COLOR if n == "random" else LESS_COLOR for n in inputs.selections]
    bars = ax.bar(names, [100 * v for v in values], color=colors)
    for bar, v in zip(bars, values):
        ax.annotate(_pct(v), (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                    fontsize=8)
    ax.set_ylabel(f"share of '{inputs.target_task}' (%)")
    ax.set_ylim(0, 105)
    ax.set_title("Target-task precision")
    return True


def _plot_loss(ax, inputs: ReportInputs) -> bool:
    if not inputs.losses:
        return False
    names = list(inputs.losses)
    colors = [RANDOM_COLOR if n == "random" else POOL_COLOR if n == "zero-shot" else LESS_COLOR for n in names]
    bars = ax.bar(names, [inputs.losses[n] for n in names], color=colors)
    for bar, n in zip(bars, names):
        ax.annotate(f"{inputs.losses[n]:.3f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("target loss (nats / completion token)")
    ax.set_title("Held-out target loss (lower is better)")
    return True


PANELS = {"scores.png": _plot_scores, "composition.png": _plot_composition,
          "precision.png": _plot_precision, "loss.png": _plot_loss}


def _save_figure(fig, path: Path) -> None:
    """A PNG of ``fig``, written atomically (a killed report leaves the old plot or the new one)."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    atomic_write_bytes(path, buf.getvalue())


def write_plots(inputs: ReportInputs, out_dir: str | os.PathLike) -> list[Path]:
    """Write every plot the inputs allow; returns the written paths (``summary.png`` first)."""
    try:
        import matplotlib
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError('The report plots need matplotlib: pip install "hf-less[cli]"') from e

    matplotlib.use("Agg", force=True)  # files only: works without a display
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    drawn = [draw(ax, inputs) for draw, ax in zip(PANELS.values(), axes.flat)]
    for ok, ax in zip(drawn, axes.flat):
        if not ok:
            ax.axis("off")
    if any(drawn):
        fig.suptitle(inputs.title)
        fig.tight_layout()
        _save_figure(fig, out_dir / "summary.png")
        written.append(out_dir / "summary.png")
    plt.close(fig)
    for name, draw in PANELS.items():
        fig, ax = plt.subplots(figsize=(7, 4.5))
        if draw(ax, inputs):
            fig.tight_layout()
            _save_figure(fig, out_dir / name)
            written.append(out_dir / name)
        plt.close(fig)
    return written


# -- Markdown --------------------------------------------------------------------------------------


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |",
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows), ""]


def markdown(inputs: ReportInputs, plots: Sequence[str] = ()) -> str:
    """The report's Markdown text (plots referenced by file name)."""
    lines = [f"# {inputs.title}", ""]
    n = len(inputs.pool_tasks) if inputs.pool_tasks is not None else (
        len(inputs.scores) if inputs.scores is not None else None)
    lines += [f"Target task: **{inputs.target_task}**" + (f"; pool: {n} examples" if n is not None else "")
              + (f" from {len(set(inputs.pool_tasks))} tasks." if inputs.pool_tasks is not None else "."), ""]
    if "summary.png" in plots:
        lines += ["![summary](summary.png)", ""]
    if inputs.pool_tasks is not None:
        lines += ["## Target-task precision", ""]
        in_pool = sum(t == inputs.target_task for t in inputs.pool_tasks)
        rows = [["pool", len(inputs.pool_tasks), in_pool, _pct(in_pool / len(inputs.pool_tasks))]]
        for name, idx in inputs.selections.items():
            hits = sum(inputs.pool_tasks[i] == inputs.target_task for i in idx)
            rows.append([name, len(idx), hits, _pct(precision(inputs.pool_tasks, idx, inputs.target_task))])
        lines += _table(["set", "examples", f"from {inputs.target_task}", "precision"], rows)
        lines += ["## Composition by source task", ""]
        counts = {name: composition(inputs.pool_tasks, idx) for name, idx in inputs.selections.items()}
        tasks = sorted(set().union(*[set(c) for c in counts.values()]) if counts else set(),
                       key=lambda t: (-sum(c.get(t, 0) for c in counts.values()), t))
        lines += _table(["task", *counts], [[f"**{t}**" if t == inputs.target_task else t,
                                            *(c.get(t, 0) for c in counts.values())] for t in tasks])
    else:
        lines += ["The pool has no task column, so precision and composition are not shown.", ""]
    if inputs.scores is not None:
        s = np.asarray(inputs.scores, dtype=np.float64)
        lines += ["## Scores", "", *_table(["min", "median", "mean", "max"],
                                           [[f"{s.min():.4f}", f"{np.median(s):.4f}", f"{s.mean():.4f}",
                                             f"{s.max():.4f}"]])]
        if inputs.pool_tasks is not None:
            by_task: dict[str, list[float]] = {}
            for t, v in zip(inputs.pool_tasks, s):
                by_task.setdefault(t, []).append(float(v))
            ranked = sorted(by_task.items(), key=lambda kv: -np.mean(kv[1]))[:8]
            lines += ["Highest mean score by task:", "",
                      *_table(["task", "mean score", "examples"],
                              [[f"**{t}**" if t == inputs.target_task else t, f"{np.mean(v):.4f}", len(v)]
                               for t, v in ranked])]
    if inputs.losses:
        names = list(dict.fromkeys(m for v in inputs.metrics.values() for m in v))
        lines += ["## Target loss on the held-out split", "",
                  *_table(["model", "target loss", *names],
                          [[k, f"{v:.4f}", *(f"{inputs.metrics.get(k, {})[m]:.4f}" if m in inputs.metrics.get(k, {})
                                              else "" for m in names)] for k, v in inputs.losses.items()])]
    if inputs.settings:
        lines += ["## Settings", "", *_table(["setting", "value"], [[k, v] for k, v in inputs.settings.items()])]
    if inputs.timings:
        lines += ["## Time", "", *_table(["stage", "seconds"], [[k, f"{v:.0f}"] for k, v in inputs.timings.items()])]
    for p in plots:
        if p != "summary.png":
            lines += [f"![{p[:-4]}]({p})", ""]
    return "\n".join(lines)


def write_report(inputs: ReportInputs, out_dir: str | os.PathLike) -> Path:
    """Write ``report.md`` and the PNG plots into ``out_dir``; returns the Markdown's path."""
    out_dir = Path(out_dir)
    plots = write_plots(inputs, out_dir)
    path = out_dir / REPORT_FILE
    atomic_write_text(path, markdown(inputs, [p.name for p in plots]))
    return path


# -- from a run directory --------------------------------------------------------------------------


def load_evaluation(path: str | os.PathLike) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """``(losses, metrics)`` from a run's ``evaluation.json``, zero-shot first, then random, then the rest.

    Each entry is ``{target_loss, and a task metric if measured}``; a bare number is a loss (the
    format before task metrics).
    """
    path = Path(path)
    results = json.loads(path.read_text()) if path.exists() else {}
    order = {"zero-shot": 0, "random": 1}
    results = dict(sorted(results.items(), key=lambda kv: (order.get(kv[0], 2), kv[0])))
    losses = {k: v["target_loss"] if isinstance(v, dict) else v for k, v in results.items()}
    metrics = {k: {m: x for m, x in v.items() if m != "target_loss"} for k, v in results.items() if isinstance(v, dict)}
    return losses, metrics


def report_from_run(run_dir: str | os.PathLike, task_column: str = "task") -> ReportInputs:
    """Gather a run's pool, selections, scores, losses, settings and timings into :class:`ReportInputs`."""
    from datasets import load_from_disk

    from ..selection.record import load_pool_scores, load_selection

    layout = RunLayout(run_dir)
    info = json.loads(layout.run_info.read_text()) if layout.run_info.exists() else {}
    pool_dir = layout.data / "pool"
    if not pool_dir.exists():
        raise FileNotFoundError(f"{pool_dir} is missing: is {str(run_dir)!r} a run directory written by hf-less?")
    pool = load_from_disk(str(pool_dir))
    tasks = pool[task_column] if task_column in pool.column_names else None
    selections, scores, less_name = {}, None, None
    if layout.selections.exists():
        for d in sorted(p for p in layout.selections.iterdir() if p.is_dir()):
            try:
                sel = load_selection(d)
            except FileNotFoundError:
                continue
            selections[d.name] = sel.indices
            pool_scores = load_pool_scores(d)
            if pool_scores is not None and sel.strategy != "random":
                scores, less_name = pool_scores, less_name or d.name
            elif pool_scores is not None and scores is None:
                scores = pool_scores
    # LESS's selection first, random last: the order the plots and tables read best in.
    selections = dict(sorted(selections.items(), key=lambda kv: (kv[0] == "random", kv[0] != less_name, kv[0])))
    losses, metrics = load_evaluation(layout.evaluation)
    target = info.get("target_task") or "target"
    return ReportInputs(target_task=target, pool_tasks=tasks, selections=selections, scores=scores,
                        losses=losses, metrics=metrics, settings=info.get("settings", {}), timings=info.get("timings", {}),
                        less_name=less_name, title=info.get("title", f"hf-less report: {target}"))
