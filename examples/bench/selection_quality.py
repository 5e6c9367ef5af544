"""Does the selection help? LoRA fine-tune SmolLM2-135M on each method's selection from the BIG-bench pool.

For each target task and budget, every method selects from the same pool; a LoRA adapter is trained
on the selection (one run per seed) and evaluated on the target task's held-out split: target loss
(completion cross-entropy) and the task metric (multiple-choice accuracy by option log-likelihood for
``target_scores`` tasks, exact match otherwise). Rows: zero-shot, random, full pool, LESS-topk,
LESS-round_robin, LESS-uot, rds-round_robin, embedding-round_robin, IFD.

Resumable: finished cells are kept in OUT/cells.json (and each target's scores in OUT/scores_*.npz);
run the same command again to continue. Writes OUT/results.md (the table) and OUT/results.png.

    python examples/bench/selection_quality.py --out out/selection_quality          # small CPU configuration
    python examples/bench/selection_quality.py --targets sports_understanding object_counting \\
        --budgets 0.01 0.05 0.1 --seeds 0 1 2 --examples_per_task 64 --epochs 4      # larger
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from hf_less import selectors
from hf_less.bigbench import BigBenchConfig, load_bigbench
from hf_less.checkpoints import atomic_write_json
from hf_less.cli import text_only
from hf_less.data import collate, encode_batch, pad_token_id
from hf_less.evaluation import evaluate_model, sdf
from hf_less.models import load_model_and_tokenizer

METHODS = ("zero-shot", "random", "full pool", "LESS-topk", "LESS-round_robin", "LESS-uot", "rds-round_robin",
           "embedding-round_robin", "IFD")
LORA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]


def lora_train(base, tokenizer, rows, *, epochs: int, lr: float, batch_size: int, max_length: int, seed: int,
               r: int = 8):
    """A plain LoRA SFT loop (AdamW, linear decay) on prompt/completion rows; returns the trained PeftModel."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=4 * r, lora_dropout=0.0,
                                                           target_modules=LORA_MODULES, task_type="CAUSAL_LM"))
    encoded = encode_batch({"prompt": rows["prompt"], "completion": rows["completion"]}, tokenizer, max_length,
                           "prompt_completion")
    rng = np.random.default_rng(seed)
    steps = epochs * math.ceil(len(encoded) / batch_size)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / max(1, steps)))
    pad = pad_token_id(tokenizer)
    model.train()
    for _ in range(epochs):
        perm = rng.permutation(len(encoded))
        for start in range(0, len(perm), batch_size):
            batch = collate([encoded[i] for i in perm[start:start + batch_size]], pad, "right")
            loss = model(**batch, use_cache=False).loss
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
    model.eval()
    return model


def compute_scores(base, tokenizer, splits, out: Path, args) -> dict[str, np.ndarray]:
    """LESS (warmup + gradient features), rds, embedding and IFD scores of the pool, cached in OUT."""
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from hf_less import LessCallback, LessSelector
    from hf_less.representations import RepresentationSelector
    from hf_less.quality import IFDScorer

    target = splits.config.target_task.replace(":", "_")
    cache = out / f"scores_{target}.npz"
    if cache.exists():
        return dict(np.load(cache))
    pool, targets = text_only(splits.pool), text_only(splits.targets)
    warm_dir = out / f"warmup_{target}"
    n_warm = max(1, round(args.warmup_fraction * len(pool)))
    lora = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1, target_modules=LORA_MODULES, task_type="CAUSAL_LM")
    config = SFTConfig(output_dir=str(warm_dir), num_train_epochs=args.warmup_epochs, save_strategy="epoch",
                       per_device_train_batch_size=args.batch_size, learning_rate=2e-4, lr_scheduler_type="linear",
                       max_length=args.max_length, report_to=[], use_cpu=not torch.cuda.is_available(),
                       logging_steps=50, save_only_model=True, seed=0, disable_tqdm=True)
    capture = LessCallback(pool=pool, targets=targets, proj_dim=args.proj_dim, max_length=args.max_length,
                           batch_size=args.batch_size)
    SFTTrainer(copy.deepcopy(base), args=config, train_dataset=pool.shuffle(seed=0).select(range(n_warm)),
               processing_class=tokenizer, peft_config=lora, callbacks=[capture]).train()
    less = LessSelector(copy.deepcopy(base), warm_dir, targets, tokenizer=tokenizer, proj_dim=args.proj_dim,
                        max_length=args.max_length, batch_size=args.batch_size)
    scored = pool.map(less, batched=True, batch_size=64, desc="LESS")
    result = {"less_score": np.asarray(scored["less_score"]), "less_sims": np.asarray(scored["less_sims"])}
    for rep, model in (("rds", base), ("embedding", None)):
        sel = RepresentationSelector(targets, rep, model=model, tokenizer=tokenizer, max_length=args.max_length,
                                     batch_size=args.batch_size)
        scored = pool.map(sel, batched=True, batch_size=64, desc=rep)
        result[f"{rep}_score"], result[f"{rep}_sims"] = np.asarray(scored[sel.score_column]), np.asarray(
            scored[sel.sims_column])
    scored = pool.map(IFDScorer(base, tokenizer, max_length=args.max_length, batch_size=args.batch_size),
                      batched=True, batch_size=64, desc="IFD")
    result["ifd"] = np.asarray(scored["ifd"], dtype=np.float64)
    np.savez(cache, **result)
    return result


def select(method: str, k: int, seed: int, scores: dict[str, np.ndarray], n: int) -> list[int]:
    if method == "random":
        return selectors.order("random", scores=np.zeros(n), seed=seed, k=k).tolist()
    if method == "full pool":
        return list(range(n))
    if method == "IFD":
        from hf_less.quality import ifd_order

        return ifd_order(scores["ifd"].tolist())[:k]
    rep, strategy = method.split("-", 1)
    key = {"LESS": "less", "rds": "rds", "embedding": "embedding"}[rep]
    return selectors.order(strategy, scores[f"{key}_score"], seed, sims=scores[f"{key}_sims"], k=k).tolist()


def summarize(cells: dict, args) -> list[dict]:
    rows = []
    for target in args.targets:
        for b, method in [("-", "zero-shot"), ("-", "full pool")] + [
                (budget, m) for budget in args.budgets for m in METHODS if m not in ("zero-shot", "full pool")]:
            if True:
                vals = [c for key, c in cells.items() if key.startswith(f"{target}|{b}|{method}|")]
                if not vals:
                    continue
                loss = [v["target_loss"] for v in vals]
                metric = [v["value"] for v in vals]
                rows.append({"target": target, "budget": b, "method": method, "n": vals[0]["n"],
                             "sdf": vals[0]["sdf"], "metric": vals[0]["metric"], "seeds": len(vals),
                             "loss": statistics.mean(loss), "loss_sd": statistics.stdev(loss) if len(loss) > 1 else 0,
                             "value": statistics.mean(metric),
                             "value_sd": statistics.stdev(metric) if len(metric) > 1 else 0})
    # Mark, per (target, budget), whether each method beat random on loss / metric.
    for r in rows:
        rand = next((x for x in rows if x["target"] == r["target"] and x["budget"] == (
            r["budget"] if r["budget"] != "-" else None) and x["method"] == "random"), None)
        r["beats_random"] = "" if rand is None or r["method"] == "random" else (
            ("loss " if r["loss"] < rand["loss"] else "") + ("metric" if r["value"] > rand["value"] else "")).strip() \
            or "no"
    return rows


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "", "| target | budget | method | n (SDF) | target loss (mean ± sd) | task metric (mean ± sd) "
             "| seeds | beats random on |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        budget = r["budget"] if r["budget"] == "-" else f"{float(r['budget']):.0%}"
        lines.append(f"| {r['target']} | {budget} | {r['method']} | {r['n']} ({r['sdf']:.1%}) | "
                     f"{r['loss']:.3f} ± {r['loss_sd']:.3f} | {r['metric']} {r['value']:.3f} ± {r['value_sd']:.3f} "
                     f"| {r['seeds']} | {r['beats_random'] or '-'} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(args.targets), 2, figsize=(12, 3.2 * len(args.targets)), squeeze=False)
    methods = [m for m in METHODS if m not in ("zero-shot", "full pool")]
    for i, target in enumerate(args.targets):
        for j, (key, label) in enumerate((("loss", "target loss (lower is better)"), ("value", "task metric"))):
            ax = axes[i][j]
            width = 0.8 / max(1, len(args.budgets))
            for b_i, budget in enumerate(args.budgets):
                got = [next((r for r in rows if r["target"] == target and r["budget"] == budget and r["method"] == m),
                            None) for m in methods]
                xs = [x + b_i * width for x, g in enumerate(got) if g]
                ax.bar(xs, [g[key] for g in got if g], width, yerr=[g[key + "_sd"] for g in got if g],
                       label=f"budget {float(budget):.0%}")
            for m, style in (("zero-shot", "--"), ("full pool", ":")):
                ref = next((r for r in rows if r["target"] == target and r["method"] == m), None)
                if ref:
                    ax.axhline(ref[key], linestyle=style, color="k", label=m)
            ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right", fontsize=7)
            ax.set_title(f"{target}: {label}", fontsize=9)
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/selection_quality")
    p.add_argument("--targets", nargs="+", default=["sports_understanding", "object_counting"],
                   help="BIG-bench target tasks (multiple-choice ones get MC accuracy, others exact match).")
    p.add_argument("--budgets", nargs="+", type=float, default=[0.05, 0.1], help="Fractions of the pool.")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="Training (and random selection) seeds.")
    p.add_argument("--examples_per_task", type=int, default=8, help="Pool size = about 30 tasks x this.")
    p.add_argument("--num_eval", type=int, default=24, help="Held-out target examples per task.")
    p.add_argument("--num_targets", type=int, default=8)
    p.add_argument("--max_chars", type=int, default=300)
    p.add_argument("--max_length", type=int, default=128)
    p.add_argument("--epochs", type=int, default=3, help="Training epochs on each selection.")
    p.add_argument("--full_epochs", type=int, default=1, help="Training epochs on the full pool.")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--warmup_fraction", type=float, default=0.1)
    p.add_argument("--warmup_epochs", type=int, default=2)
    p.add_argument("--proj_dim", type=int, default=512)
    p.add_argument("--max_new_tokens", type=int, default=12)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cells_path = out / "cells.json"
    cells = json.loads(cells_path.read_text()) if cells_path.exists() else {}
    t0 = time.time()
    base, tokenizer = load_model_and_tokenizer()
    base.eval()
    ev = {"max_length": args.max_length, "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
          "show_progress": False}

    def header(elapsed: float) -> str:
        return (f"selection_quality: SmolLM2-135M-Instruct, LoRA r=8, {args.epochs} epochs on each selection "
                f"({args.full_epochs} on the full pool), seeds {args.seeds}, {args.examples_per_task} pool examples per "
                f"task, {args.num_eval} eval examples; {platform.machine()} {os.cpu_count()} cores, "
                f"torch {torch.__version__}; this invocation {elapsed / 60:.1f} min")

    def record(key: str, model, n: int, pool_size: int, splits, t: float) -> None:
        result = evaluate_model(model, tokenizer, splits.eval, **ev)
        cells[key] = {**result, "n": n, "sdf": sdf(n, pool_size), "seconds": round(time.time() - t, 1)}
        atomic_write_json(cells_path, cells)
        (out / "results.md").write_text(markdown(summarize(cells, args), header(time.time() - t0)))
        print(f"[{time.time() - t0:7.0f}s] {key}: loss {result['target_loss']:.3f} "
              f"{result['metric']} {result['value']:.3f} (n={n}, {cells[key]['seconds']}s)", flush=True)

    for target in args.targets:
        splits = load_bigbench(BigBenchConfig(target_task=target, examples_per_task=args.examples_per_task,
                                              num_targets=args.num_targets, num_eval=args.num_eval,
                                              max_chars=args.max_chars, seed=0))
        pool, n = splits.pool, len(splits.pool)
        print(f"{target}: pool {n}, targets {len(splits.targets)}, eval {len(splits.eval)}", flush=True)
        key = f"{target}|-|zero-shot|0"
        if key not in cells:
            record(key, base, 0, n, splits, time.time())
        needed = [f"{target}|{b}|{m}|{s}" for b in args.budgets for m in METHODS[3:] for s in args.seeds]
        scores = None
        if any(key not in cells for key in needed):  # scores first: a failure shows before hours of training
            scores = compute_scores(base, tokenizer, splits, out, args)
            print(f"[{time.time() - t0:7.0f}s] {target}: scores ready", flush=True)
        for seed in args.seeds:
            key = f"{target}|-|full pool|{seed}"
            if key not in cells:
                t = time.time()
                record(key, lora_train(base, tokenizer, pool, epochs=args.full_epochs, lr=args.lr,
                                       batch_size=args.batch_size, max_length=args.max_length, seed=seed),
                       n, n, splits, t)
        for budget in args.budgets:
            k = selectors.resolve_budget(budget, n)
            for method in ("random",) + METHODS[3:]:
                for seed in args.seeds:
                    key = f"{target}|{budget}|{method}|{seed}"
                    if key in cells:
                        continue
                    t = time.time()
                    rows = select(method, k, seed, scores or {}, n)
                    model = lora_train(base, tokenizer, pool.select(rows), epochs=args.epochs, lr=args.lr,
                                       batch_size=args.batch_size, max_length=args.max_length, seed=seed)
                    record(key, model, len(rows), n, splits, t)
    rows = summarize(cells, args)
    text = markdown(rows, header(time.time() - t0))
    (out / "results.md").write_text(text)
    plot(rows, out / "results.png", args)
    print(text)


if __name__ == "__main__":
    main()
