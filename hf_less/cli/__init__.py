"""``hf-less``: the command line. Every option comes from a dataclass read by ``HfArgumentParser``.

    hf-less demo                         # BIG-bench + SmolLM2-135M: the whole pipeline and a report
    hf-less plan      --run_dir R        # measured batches -> projected time of each stage, disk of the store
    hf-less warmup    --run_dir R        # LoRA SFT with LessCallback on a random fraction of the pool
    hf-less featurize --run_dir R        # pool gradient features -> feature store (+ target features, scores)
    hf-less select    --run_dir R --strategy topk --budget 0.05   # -> R/selections/topk/less_selection.json
    hf-less train     --run_dir R --selection topk               # LoRA SFT on a selection -> R/train/topk
    hf-less evaluate  --run_dir R [--adapter topk] [--task_metric] # target loss (+ task metric) -> R/evaluation.json
    hf-less report    --run_dir R                                # R/report/report.md + PNG plots

All subcommands share a run directory (see :class:`hf_less.training.layout.RunLayout`). The first one to
need data builds it (BIG-bench by default, or ``--dataset pool.jsonl --targets t.jsonl --eval e.jsonl``)
into ``R/data``; later ones reuse it. ``hf-less <command> --help`` documents every option.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Sequence

# The application's modules, by role; the names below are the command line's public surface.
from .arguments import (
    DataArguments, DemoArguments, EvaluateArguments, FeaturizeArguments, ModelArguments, PlanArguments,
    ReportArguments, RunArguments, SelectArguments, TrainArguments, WarmupArguments,
)
from .commands import COMMANDS
from .pipeline import RunData, do_warmup, prepare_data, run_layout, sft_train, text_only
from .progress import _library_bars_off, _say, examples_progress

__all__ = [
    "COMMANDS", "DataArguments", "DemoArguments", "EvaluateArguments", "FeaturizeArguments", "ModelArguments",
    "PlanArguments",
    "ReportArguments", "RunArguments", "RunData", "SelectArguments", "TrainArguments", "WarmupArguments",
    "do_warmup", "examples_progress", "main", "parse", "prepare_data", "run_layout", "sft_train", "text_only",
]


def _usage() -> str:
    lines = ["usage: hf-less <command> [options]   (hf-less <command> --help lists every option)", "", "commands:"]
    lines += [f"  {name:10s} {desc}" for name, (desc, _, _) in COMMANDS.items()]
    return "\n".join(lines)


def parse(argv: Sequence[str]) -> tuple[str, tuple]:
    """``(command, dataclass instances)`` for ``argv`` (without the program name)."""
    from transformers import HfArgumentParser

    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        raise SystemExit(0 if argv else 2)
    command, rest = argv[0], list(argv[1:])
    if command not in COMMANDS:
        print(f"hf-less: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        raise SystemExit(2)
    desc, classes, _ = COMMANDS[command]
    parser = HfArgumentParser(classes, prog=f"hf-less {command}", description=desc)
    return command, tuple(parser.parse_args_into_dataclasses(args=rest))


def main(argv: Sequence[str] | None = None) -> int:
    """The ``hf-less`` entry point: a usage error prints its message (and the fix) without a traceback.

    ``HF_LESS_TRACEBACK=1`` re-raises instead.
    """
    from .bigbench import BigBenchError, UnknownTaskError

    try:
        return _main(argv)
    except (BigBenchError, UnknownTaskError, FileNotFoundError, FileExistsError, ValueError) as e:
        if os.environ.get("HF_LESS_TRACEBACK"):
            raise
        print(f"hf-less: error: {e}", file=sys.stderr)
        return 1


def _main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Library deprecation notices and the many short per-step bars of datasets/transformers would bury
    # the progress that matters (warmup, features, training, evaluation: our own bars, in examples/s).
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|trl|peft)(\.|$)")
    _library_bars_off()
    command, args = parse(argv)
    if args and isinstance(args[0], RunArguments):
        if command != "report":
            _set_threads(args[0])
    COMMANDS[command][2](*args)
    return 0


def _set_threads(run: RunArguments) -> None:
    import torch

    threads = run.threads
    if threads is None and hasattr(os, "getloadavg"):
        cores = os.cpu_count() or 1
        if cores > 1 and os.getloadavg()[0] > cores:
            threads = 1
            _say(f"the machine is busy (load average {os.getloadavg()[0]:.1f} on {cores} cores): using 1 torch "
                 "thread (--threads to override); timings will be slower than on an idle machine")
    if threads:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    raise SystemExit(main())
