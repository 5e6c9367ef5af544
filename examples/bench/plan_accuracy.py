"""How close ``hf-less plan`` comes: the plan of a small run, then the run itself, stage by stage.

The run is the demo's pipeline (``hf_less.cli.pipeline``: warmup with ``LessCallback``, featurize into
a store of ``--store_dtype``, score, final LoRA training on the selection) on a synthetic pool of
four small tasks, with the default model (SmolLM2-135M-Instruct) or ``--model``. Each stage is timed
as its own call (model loading and data preparation are not stages of the plan); the table gives the
plan, the actual time and their ratio.

    python examples/bench/plan_accuracy.py                        # SmolLM2-135M, 160-example pool
    python examples/bench/plan_accuracy.py --pool 80 --measure_steps 3 --cpu_time   # CPU seconds, one thread
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import tempfile
import time
from pathlib import Path


def toy_pool(n: int, seed: int = 0) -> list[dict]:
    """``n`` prompt/completion rows of four tasks (addition, reversal, upper-casing, letter counts)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        word = "".join(rng.choice("abcdefghij") for _ in range(rng.randint(3, 8)))
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        task = ("add", "reverse", "upper", "count")[i % 4]
        prompt, completion = {
            "add": (f"What is {a} + {b}?", f" {a + b}"),
            "reverse": (f"Reverse the word {word}.", f" {word[::-1]}"),
            "upper": (f"Write {word} in capitals.", f" {word.upper()}"),
            "count": (f"How many letters has {word}?", f" {len(word)}"),
        }[task]
        rows.append({"prompt": prompt, "completion": completion, "task": task})
    return rows


def main(argv=None) -> dict:
    import numpy as np
    from datasets import Dataset

    from hf_less import LessCallback
    from hf_less.cli.arguments import (
        FeaturizeArguments, ModelArguments, RunArguments, SelectArguments, TrainArguments, WarmupArguments,
    )
    from hf_less.cli.pipeline import (
        RunData, _shard_rows, do_plan, load_model, make_selector, sft_train, text_only,
    )
    from hf_less.selection.strategies import resolve_budget
    from hf_less.training.layout import RunLayout
    from hf_less.training.warmup import warmup_subset

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--pool", type=int, default=160)
    p.add_argument("--max_length", type=int, default=128)
    p.add_argument("--proj_dim", type=int, default=512)
    p.add_argument("--store_dtype", default="int8")
    p.add_argument("--measure_steps", type=int, default=4)
    p.add_argument("--cpu_time", action="store_true",
                   help="one torch thread, and CPU seconds of this process for the plan and the run alike (wall "
                        "time on a machine shared with other jobs swings with their load)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    import torch

    clock = time.process_time if args.cpu_time else time.perf_counter
    if args.cpu_time:
        torch.set_num_threads(1)

    model_args = ModelArguments(max_length=args.max_length, **({"model": args.model} if args.model else {}))
    with tempfile.TemporaryDirectory(prefix="hf-less-plan-accuracy-") as tmp:
        run = RunArguments(run_dir=tmp, quiet=True)
        warm = WarmupArguments(warmup_fraction=0.1, warmup_epochs=2)
        feat = FeaturizeArguments(proj_dim=args.proj_dim, store_dtype=args.store_dtype)
        sel = SelectArguments(budget=0.1)
        tr = TrainArguments(train_epochs=2)
        layout = RunLayout(tmp)
        base, tokenizer = load_model(model_args, run)
        pool = Dataset.from_list(toy_pool(args.pool))
        targets = Dataset.from_list([r for r in toy_pool(16, seed=1) if r["task"] == "add"])
        rd = RunData(pool, targets, None, "add", "task")
        t0 = clock()
        plan = do_plan(base, tokenizer, rd, layout, model_args, warm, feat, sel, tr, measure_steps=args.measure_steps,
                       clock=clock)
        plan_s = clock() - t0
        print(plan.table(), f"\n(the plan took {plan_s:.0f} s)", flush=True)

        actual = {}
        t0 = clock()
        sft_train(copy.deepcopy(base), tokenizer, warmup_subset(pool, warm.warmup_fraction, run.seed), layout.warmup,
                  model_args, run, warm.warmup_epochs, warm.warmup_learning_rate, save_each_epoch=True,
                  callbacks=[LessCallback()], desc="warmup")
        actual["warmup"] = clock() - t0
        t0 = clock()
        selector = make_selector(copy.deepcopy(base), tokenizer, rd, layout, model_args, feat, run)
        store = selector.featurize(text_only(pool), layout.store, shard_rows=_shard_rows(selector),
                                   dtype=feat.store_dtype)
        actual["featurize"] = clock() - t0
        t0 = clock()
        scores, _ = selector.score_store(store)
        actual["scoring"] = clock() - t0
        k = resolve_budget(sel.budget, len(pool))
        t0 = clock()
        sft_train(copy.deepcopy(base), tokenizer, pool.select(np.argsort(-scores)[:k].tolist()), layout.train / "x",
                  model_args, run, tr.train_epochs, tr.train_learning_rate, save_each_epoch=False)
        actual["final training"] = clock() - t0

    print("\n| stage | plan s | actual s | plan / actual |\n|---|---|---|---|")
    for name, t in actual.items():
        print(f"| {name} | {plan.seconds(name):.1f} | {t:.1f} | {plan.seconds(name) / t:.2f} |")
    result = {"plan": {s.name: s.seconds for s in plan.stages}, "actual": actual, "plan_seconds": plan_s,
              "clock": "process_time, 1 thread" if args.cpu_time else "wall",
              "pool": len(pool), "store_dtype": args.store_dtype}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
