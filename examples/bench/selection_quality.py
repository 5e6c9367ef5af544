"""Does the selection help? LoRA fine-tune SmolLM2-135M on each method's selection from the BIG-bench pool.

For each target task and budget, every method selects from the same pool; a LoRA adapter is trained
on the selection (one run per seed) and evaluated on the target task's held-out split: target loss
(completion cross-entropy) and the task metric (multiple-choice accuracy by option log-likelihood for
``target_scores`` tasks, exact match otherwise). Rows: zero-shot, random, full pool, LESS-topk,
LESS-round_robin, LESS-uot, rds-round_robin, embedding-round_robin, IFD.

Transfer mode (``--transfer``): the target task is absent from the pool, as for a user whose capability has
no examples in their data. ONE pool is built from about 100 BIG-bench tasks (up to ``--examples_per_task``
each, only examples that fit ``--max_length`` tokens) with every target task excluded; targets and the
held-out split come from each target task. The pool does not depend on the target, so the LESS warmup,
the captured pool features and the rds / embedding / IFD scores are computed once and reused for every
target, and the target-independent selections (full pool, random, IFD) are trained once and evaluated on
every target. Beside the table it writes a win table (beats random beyond the seed spread; LESS-RR
against the best cheap representation), the target-independence overlap of each representation's top-k
selections (:func:`hf_less.selection.distance.selection_overlap`) and each representation's scoring cost.
``--quick`` is a small configuration (3 targets, 5%, one training seed, 2 random seeds, 4 examples per
task, a 1-epoch warmup: about 30 minutes on 2 CPU cores). See docs/selection_quality.md.

``--transfer --distance`` adds seed 000's analysis: for LESS, rds and embedding, the round-robin ordering of
each target is cut into bins at ranks [0, k), [k, 2k), [3k, 4k), [7k, 8k); each bin is trained on and its
target loss set against its distance to the targets in that representation (coverage and OT), with the
Spearman correlation per representation and target and OUT/distance.png (``--distance_targets``: some
targets only). ``--transfer --ablate NAME=V1,V2`` reruns the LESS selections of ``--ablation_methods`` with one
setting changed (warmup epochs, fraction or LoRA rank: a new warmup; projection dimension or kind, pool
direction: the base warmup featurized anew), a table per value. ``--report_only`` writes the tables from the
cells already in OUT and trains nothing.

Hubness (issue 25): every transfer report has a hubness table (per targeted method, the overlap of its selections
across targets and the share of them taken by the five most-selected source tasks; per representation, the skew
of the k-occurrence, ``--hub_k``). ``--target_set hubs`` is a second target set (five tasks of other kinds) that
keeps date_understanding in the pool. ``--hub_corrections center pca csls sgd`` adds LESS-topk under each remedy
(per target and training seed, first budget) and a table of their target loss against LESS-topk.

Store formats (issue 24): ``--store_formats int8 int4 1bit`` scores the pool from the captured float16 features
re-encoded in each format (no second featurization), reports the top-k overlap and the Spearman correlation of
its LESS scores with float16's, and trains LESS-topk on its selection (per target and training seed, first budget).

Resumable: finished cells are kept in OUT/cells.json (and each target's scores in OUT/scores_*.npz);
run the same command again to continue. Writes OUT/results.md (the table) and OUT/results.png.

    python examples/bench/selection_quality.py --out out/selection_quality          # small CPU configuration
    python examples/bench/selection_quality.py --targets sports_understanding object_counting \\
        --budgets 0.01 0.05 0.1 --seeds 0 1 2 --examples_per_task 64 --epochs 4      # larger
    python examples/bench/selection_quality.py --transfer --quick     # transfer, about 30 min on 2 CPU cores
    python examples/bench/selection_quality.py --transfer             # transfer, 6 targets, a few CPU hours
    python examples/bench/selection_quality.py --transfer --store_dtype int4   # the same from int4 features
    python examples/bench/selection_quality.py --transfer --store_formats int8 int4 1bit   # formats vs float16
    python examples/bench/selection_quality.py --transfer --distance --ablate warmup_epochs=1,4 proj_dim=2048,8192
    python examples/bench/selection_quality.py --transfer --target_set hubs --hub_corrections center pca csls sgd
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from hf_less.selection import strategies as selectors
from hf_less.cli.bigbench import BigBenchConfig, load_bigbench
from hf_less.utils.io import atomic_write_json
from hf_less.cli import text_only
from hf_less.data import collate, encode_batch, pad_token_id
from hf_less.evaluation.metrics import evaluate_model, sdf
from hf_less.cli.models import load_model_and_tokenizer

METHODS = ("zero-shot", "random", "full pool", "LESS-topk", "LESS-round_robin", "LESS-uot", "rds-round_robin",
           "embedding-round_robin", "IFD")
LORA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]


def capture_warmup(base, tokenizer, pool, targets, warm_dir: Path, args, capture: bool = True) -> Path:
    """The LESS warmup: LoRA SFT on a seeded ``warmup_fraction`` of ``pool``, capturing pool and target features
    (``capture=False``: only the checkpoints' LESS state, for featurizing afterwards)."""
    from peft import LoraConfig
    from trl import SFTConfig

    from hf_less import LessCallback
    from hf_less.training.warmup import WarmupSFTTrainer, warmup_subset

    r = getattr(args, "warmup_lora_r", 8)
    lora = LoraConfig(r=r, lora_alpha=4 * r, lora_dropout=0.1, target_modules=LORA_MODULES, task_type="CAUSAL_LM")
    config = SFTConfig(output_dir=str(warm_dir), num_train_epochs=args.warmup_epochs, save_strategy="epoch",
                       per_device_train_batch_size=args.batch_size, learning_rate=2e-4, lr_scheduler_type="linear",
                       max_length=args.max_length, report_to=[], use_cpu=not torch.cuda.is_available(),
                       logging_steps=50, save_only_model=True, seed=0, disable_tqdm=True)
    capture = LessCallback(pool=pool if capture else None, targets=targets if capture else None,
                           proj_dim=args.proj_dim, max_length=args.max_length,
                           batch_size=args.batch_size, proj_kind=getattr(args, "proj_kind", "sparse"),
                           pool_direction=getattr(args, "pool_direction", "adam"),
                           dtype=getattr(args, "store_dtype", "float16"))
    WarmupSFTTrainer(copy.deepcopy(base), args=config, train_dataset=warmup_subset(pool, args.warmup_fraction, seed=0),
                     processing_class=tokenizer, peft_config=lora, callbacks=[capture]).train()
    return warm_dir


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

    from hf_less import LessSelector
    from hf_less.scoring.representations import RepresentationSelector
    from hf_less.evaluation.quality import IFDScorer

    target = splits.config.target_task.replace(":", "_")
    cache = out / f"scores_{target}.npz"
    if cache.exists():
        return dict(np.load(cache))
    pool, targets = text_only(splits.pool), text_only(splits.targets)
    warm_dir = capture_warmup(base, tokenizer, pool, targets, out / f"warmup_{target}", args)
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
        from hf_less.evaluation.quality import ifd_order

        return ifd_order(scores["ifd"].tolist())[:k]
    rep, strategy = method.split("-", 1)
    key = {"LESS": "less", "rds": "rds", "embedding": "embedding"}[rep]
    return selectors.order(strategy, scores[f"{key}_score"], seed, sims=scores[f"{key}_sims"], k=k).tolist()


def summarize(cells: dict, args, prefix: str = "") -> list[dict]:
    """Mean and sd over seeds of every (target, budget, method) cell whose key starts with ``prefix``."""
    rows = []
    for target in args.targets:
        for b, method in [("-", "zero-shot"), ("-", "full pool")] + [
                (budget, m) for budget in args.budgets for m in METHODS if m not in ("zero-shot", "full pool")]:
            if True:
                vals = [c for key, c in cells.items() if key.startswith(f"{prefix}{target}|{b}|{method}|")]
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


# -- transfer mode: the target tasks are absent from the pool ---------------------------------------

# Target tasks of the transfer mode, one or more of each kind; docs/selection_quality.md says why each.
TRANSFER_TARGETS = ("date_understanding", "navigate", "hindu_knowledge", "word_unscrambling", "social_iqa",
                    "sports_understanding")
QUICK_TARGETS = ("hindu_knowledge", "word_unscrambling", "social_iqa")
# The second target set (--target_set hubs, issue 25): five tasks of different kinds, none a target of the first
# set, with date_understanding kept IN the pool (placed first among its tasks): LESS drew on it for every target.
HUB_TARGETS = ("object_counting", "general_knowledge", "implicatures", "word_sorting", "cause_and_effect")
HUB_QUICK_TARGETS = ("object_counting", "general_knowledge", "implicatures")
TARGET_SETS = {
    "base": {"targets": TRANSFER_TARGETS, "quick": QUICK_TARGETS, "pool_include": ()},
    "hubs": {"targets": HUB_TARGETS, "quick": HUB_QUICK_TARGETS, "pool_include": ("date_understanding",)},
}
REPRESENTATIONS = ("less", "rds", "embedding", "random")


def fitting(tokenizer, rows: list[dict], max_length: int, want: int | None = None) -> list[dict]:
    """The first ``want`` (default all) rows, in order, whose prompt + completion fit in ``max_length``
    tokens (so no completion is truncated away); tokenizes only as far as needed."""
    out = []
    for start in range(0, len(rows), 256):
        chunk = rows[start:start + 256]
        ids = tokenizer([r["prompt"] + r["completion"] for r in chunk], add_special_tokens=True)["input_ids"]
        out += [r for r, i in zip(chunk, ids) if len(i) <= max_length]
        if want is not None and len(out) >= want:
            return out[:want]
    return out


def pool_digest(pool) -> str:
    """A short hash of the pool's example ids, in order (the cached scores belong to one pool)."""
    import hashlib

    return hashlib.sha256("\n".join(pool["id"]).encode()).hexdigest()[:16]


def transfer_splits(tokenizer, args):
    """ONE pool from up to ``--pool_tasks`` BIG-bench tasks, every target task excluded, and per target
    task its ``num_targets`` targets and ``num_eval`` held-out examples. Deterministic (seed 0).

    Every task's examples are shuffled once, then the first ones that fit ``max_length`` are taken; the
    pool's tasks are the first ``--pool_tasks`` of a fixed shuffle of ALL task names that are neither
    excluded nor too small, so pools that exclude different targets share most of their tasks.
    ``--pool_include`` tasks come first in that order (always in the pool: the hubs target set keeps
    date_understanding there).
    """
    from hf_less.cli.bigbench import BigBenchArchive, as_dataset, shuffled, task_examples

    bb = BigBenchArchive()
    targets = list(args.targets)
    excluded = {t.split(":")[0] for t in targets} | set(args.exclude_tasks)
    include = list(getattr(args, "pool_include", ()) or ())
    if set(include) & excluded:
        raise SystemExit(f"--pool_include {sorted(set(include) & excluded)} are also targets or excluded tasks: a task "
                         "is either in the pool or held out.")
    bb.extract(bb.task_names())  # one archive pass for every file not yet copied out
    per_target = {}
    need = args.num_targets + args.num_eval
    for t in targets:
        rows = fitting(tokenizer, shuffled(task_examples(bb, t, args.max_chars), 0, t), args.max_length, need)
        if len(rows) < need:
            raise SystemExit(f"Target task {t!r} has {len(rows)} usable examples; {need} are needed.")
        per_target[t] = (as_dataset(rows[:args.num_targets]), as_dataset(rows[args.num_targets:need]))
    pool, used = [], []
    for t in include + [t for t in shuffled(bb.task_names(), 0, "tasks") if t not in include]:
        if len(used) == args.pool_tasks:
            break
        if t in excluded:
            continue
        rows = fitting(tokenizer, shuffled(task_examples(bb, t, args.max_chars), 0, t), args.max_length,
                       max(args.examples_per_task, args.min_task_examples))
        if len(rows) < args.min_task_examples:
            if t in include:
                raise SystemExit(f"--pool_include task {t!r} has {len(rows)} examples that fit; "
                                 f"--min_task_examples is {args.min_task_examples}.")
            continue
        used.append(t)
        pool += rows[:args.examples_per_task]
    return as_dataset(shuffled(pool, 0, "pool")), per_target, sorted(used)


def transfer_features(base, tokenizer, pool, per_target, out: Path, args) -> dict[str, np.ndarray]:
    """The pool-by-target cosine of every representation for ALL target tasks at once, and IFD.

    One LESS warmup on the shared pool; its callback captures the pool's and every target's gradient
    features at each checkpoint, so the pool is featurized once whatever the number of targets. rds,
    embedding and random features of the pool are likewise computed once. Cached in OUT/transfer_scores.npz.
    """

    from hf_less.evaluation.quality import IFDScorer
    from hf_less.scoring.representations import RepresentationSelector

    cache = out / "transfer_scores.npz"
    digest = pool_digest(pool)
    if cache.exists():
        cached = dict(np.load(cache))
        if (str(cached.get("pool_digest")) != digest or list(dict.fromkeys(cached["target_task"])) != list(per_target)
                or str(cached.get("store_dtype", "float16")) != getattr(args, "store_dtype", "float16")):
            raise SystemExit(f"{cache} was computed for another pool, other targets or another --store_dtype; "
                             "use another --out or delete that directory.")
        return cached
    from datasets import concatenate_datasets

    names = list(per_target)
    all_targets = text_only(concatenate_datasets([per_target[t][0] for t in names]))
    pool_text = text_only(pool)
    result, seconds = {}, {}
    t = time.time()
    warm_dir = capture_warmup(base, tokenizer, pool_text, all_targets, out / "warmup", args)
    _, result["less_sims"] = run_selector(base, tokenizer, warm_dir, all_targets, args).score(pool_text)
    seconds["less"] = time.time() - t
    for rep, model in (("rds", base), ("embedding", None), ("random", None)):
        t = time.time()
        sel = RepresentationSelector(all_targets, rep, model=model, tokenizer=tokenizer, max_length=args.max_length,
                                     batch_size=args.batch_size)
        pool_f = torch.cat([sel.features(rows_of_range(pool_text, s, min(len(pool_text), s + 64)))
                            for s in range(0, len(pool_text), 64)])
        result[f"{rep}_sims"] = (pool_f @ sel.target_features.T).numpy()
        seconds[rep] = time.time() - t
    t = time.time()
    scored = pool_text.map(IFDScorer(base, tokenizer, max_length=args.max_length, batch_size=args.batch_size),
                           batched=True, batch_size=64, desc="IFD")
    result["ifd"] = np.asarray(scored["ifd"], dtype=np.float64)
    seconds["ifd"] = time.time() - t
    result["target_task"] = np.asarray([t for t in names for _ in range(len(per_target[t][0]))])
    result["pool_digest"] = np.asarray(digest)
    result["store_dtype"] = np.asarray(getattr(args, "store_dtype", "float16"))
    result["seconds"] = np.asarray([seconds[k] for k in (*REPRESENTATIONS, "ifd")])
    np.savez(cache, **result)
    return result


def rows_of_range(dataset, start: int, stop: int) -> dict[str, list]:
    return dataset.select(range(start, stop)).to_dict()


def target_scores(features: dict[str, np.ndarray], target: str) -> dict[str, np.ndarray]:
    """The columns of one target task: ``{rep}_sims`` (N, T_target), ``{rep}_score`` (their mean), ``ifd``."""
    cols = np.flatnonzero(features["target_task"] == target)
    out = {"ifd": features["ifd"]}
    for rep in REPRESENTATIONS:
        sims = np.asarray(features[f"{rep}_sims"], dtype=np.float32)[:, cols]
        out[f"{rep}_sims"], out[f"{rep}_score"] = sims, sims.mean(1)
    return out


def transfer_overlap(features: dict, targets: list[str], budget: float, n: int, rep: str = "less") -> float | None:
    """Target independence of one representation: mean pairwise overlap of its top-k selections for the targets."""
    from hf_less.selection.distance import selection_overlap

    if len(targets) < 2:
        return None
    scores = np.stack([target_scores(features, t)[f"{rep}_score"] for t in targets], axis=1)
    return selection_overlap(scores, selectors.resolve_budget(budget, n))


def ablation_diagnostics(features: dict, sub: dict | None, targets: list[str], budget: float, n: int) -> dict:
    """LESS-topk under an ablation (``sub``: the features with its ``less_sims``; None for the base): its target
    independence, and the share of the base's top-k it keeps (mean over targets)."""
    out = {"overlap": transfer_overlap(sub or features, targets, budget, n)}
    if sub is not None:
        k = selectors.resolve_budget(budget, n)
        out["shared"] = statistics.mean(
            len(set(select("LESS-topk", k, 0, target_scores(features, t), n))
                & set(select("LESS-topk", k, 0, target_scores(sub, t), n))) / k for t in targets)
    return out


def overlap_table(features: dict[str, np.ndarray], targets: list[str], budgets: list[float], n: int) -> str:
    """Target-independence: mean pairwise overlap of the top-k (by score) selections of the target tasks."""
    if len(targets) < 2:
        return "Target independence: needs two targets or more.\n"
    lines = ["Target independence: mean pairwise overlap |A ∩ B| / k of the top-k selections made for "
             f"different targets ({len(targets)} targets, {len(targets) * (len(targets) - 1) // 2} pairs) from "
             f"the same pool of {n}; a random selection overlaps by about k / N.", "",
             "| representation | " + " | ".join(f"top {b:.0%} (k = {selectors.resolve_budget(b, n)})"
                                                for b in budgets) + " |",
             "|---|" + "---|" * len(budgets)]
    for rep in REPRESENTATIONS:
        cells = [f"{transfer_overlap(features, targets, b, n, rep):.1%}" for b in budgets]
        lines.append(f"| {rep} | " + " | ".join(cells) + " |")
    lines.append("| (k / N, expected of random selections) | " + " | ".join(
        f"{selectors.resolve_budget(b, n) / n:.1%}" for b in budgets) + " |")
    return "\n".join(lines) + "\n"


def win_table(rows: list[dict], targets: list[str], budgets: list[float]) -> str:
    """Per method and budget: on how many targets it beats random beyond the seed spread, and LESS-RR
    against the best cheap representation (the better of rds- and embedding-round_robin by mean loss)."""
    def get(target, budget, method):
        return next((r for r in rows if r["target"] == target and r["budget"] == budget and r["method"] == method),
                    None)

    lines = ["Wins over random beyond the seed spread: on loss, mean + sd of the method below mean - sd of "
             "random; on the metric, mean - sd above random's mean + sd (one training seed: sd 0 for the "
             "method). Counted over the targets that have both cells.", "",
             "| budget | method | loss: beats random | metric: beats random | loss: worse than random |",
             "|---|---|---|---|---|"]
    for budget in budgets:
        for method in [m for m in METHODS if m not in ("zero-shot", "random")]:
            win = lose = mwin = total = 0
            for t in targets:
                r = get(t, budget, "random")
                m = get(t, "-" if method == "full pool" else budget, method)
                if r is None or m is None:
                    continue
                total += 1
                win += m["loss"] + m["loss_sd"] < r["loss"] - r["loss_sd"]
                lose += m["loss"] - m["loss_sd"] > r["loss"] + r["loss_sd"]
                mwin += m["value"] - m["value_sd"] > r["value"] + r["value_sd"]
            if total:
                lines.append(f"| {budget:.0%} | {method} | {win}/{total} | {mwin}/{total} | {lose}/{total} |")
    lines += ["", "LESS-round_robin against the best cheap representation (rds- or embedding-round_robin, "
              "whichever has the lower mean loss on that target):", "",
              "| budget | LESS-RR lower mean loss | beyond the seed spread | cheap lower beyond the spread |",
              "|---|---|---|---|"]
    for budget in budgets:
        lower = beyond = worse = total = 0
        for t in targets:
            less = get(t, budget, "LESS-round_robin")
            cheap = [c for c in (get(t, budget, "rds-round_robin"), get(t, budget, "embedding-round_robin")) if c]
            if less is None or not cheap:
                continue
            best = min(cheap, key=lambda c: c["loss"])
            total += 1
            lower += less["loss"] < best["loss"]
            beyond += less["loss"] + less["loss_sd"] < best["loss"] - best["loss_sd"]
            worse += best["loss"] + best["loss_sd"] < less["loss"] - less["loss_sd"]
        if total:
            lines.append(f"| {budget:.0%} | {lower}/{total} | {beyond}/{total} | {worse}/{total} |")
    return "\n".join(lines) + "\n"


# Distance versus loss (Nayak et al.): consecutive bins of each representation's round-robin ordering,
# at ranks [s k, (s + 1) k) for these s: the head (the selection itself), then ever farther subsets.
DISTANCE_BIN_STARTS = (0, 1, 3, 7)
DISTANCE_REPRESENTATIONS = ("less", "rds", "embedding")


def distance_bins_of(scores: dict[str, np.ndarray], rep: str, k: int) -> list[list[int]]:
    """Rows of each bin of ``rep``'s round-robin ordering: ranks ``[s k, (s + 1) k)`` for ``DISTANCE_BIN_STARTS``."""
    ordering = selectors.order("round_robin", scores[f"{rep}_score"], 0, sims=scores[f"{rep}_sims"]).tolist()
    if (DISTANCE_BIN_STARTS[-1] + 1) * k > len(ordering):
        raise SystemExit(f"--distance needs {(DISTANCE_BIN_STARTS[-1] + 1) * k} ordered pool rows for k = {k}; "
                         f"the pool has {len(ordering)}: use a smaller --distance_budget.")
    return [ordering[s * k:(s + 1) * k] for s in DISTANCE_BIN_STARTS]


def distance_table(cells: dict, targets: list[str], budget: float) -> tuple[str, list[dict]]:
    """Per target and representation: each bin's distances and mean target loss, and Spearman(distance, loss)."""
    from hf_less.evaluation.metrics import spearman

    rows = []
    for target in targets:
        for rep in DISTANCE_REPRESENTATIONS:
            bins = []
            for i in range(len(DISTANCE_BIN_STARTS)):
                got = [c for key, c in cells.items() if key.startswith(f"distance|{target}|{budget}|{rep}|{i}|")]
                if got:
                    bins.append({"coverage": got[0]["coverage"], "ot": got[0]["ot"],
                                 "loss": statistics.mean(c["target_loss"] for c in got)})
            if len(bins) == len(DISTANCE_BIN_STARTS):
                rows.append({"target": target, "rep": rep, "bins": bins,
                             "rho_coverage": spearman([b["coverage"] for b in bins], [b["loss"] for b in bins]),
                             "rho_ot": spearman([b["ot"] for b in bins], [b["loss"] for b in bins])})
    def rank(s: int) -> str:
        return {0: "0", 1: "k"}.get(s, f"{s}k")

    starts = ", ".join(f"[{rank(s)}, {rank(s + 1)})" for s in DISTANCE_BIN_STARTS)
    lines = [f"Distance versus loss: each representation's round-robin ordering cut into bins of k = {budget:.0%} of "
             f"the pool at ranks {starts}; each bin trained on and evaluated on the target; distances in that "
             "representation (coverage: mean over targets of 1 - cos to the nearest selected example; OT: "
             "Wasserstein cost with (1 - cos) / 2). Spearman > 0: a farther subset trains to a higher loss.", "",
             "| target | representation | coverage per bin | OT per bin | target loss per bin | "
             "Spearman (coverage, loss) | Spearman (OT, loss) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['target']} | {r['rep']} | " + " / ".join(f"{b['coverage']:.3f}" for b in r["bins"])
                     + " | " + " / ".join(f"{b['ot']:.3f}" for b in r["bins"]) + " | "
                     + " / ".join(f"{b['loss']:.3f}" for b in r["bins"])
                     + f" | {r['rho_coverage']:+.2f} | {r['rho_ot']:+.2f} |")
    lines += ["", "| representation | mean Spearman (coverage, loss) | mean Spearman (OT, loss) | targets with "
              "Spearman (coverage) > 0 |", "|---|---|---|---|"]
    for rep in DISTANCE_REPRESENTATIONS:
        mine = [r for r in rows if r["rep"] == rep]
        if mine:
            lines.append(f"| {rep} | {statistics.mean(r['rho_coverage'] for r in mine):+.2f} | "
                         f"{statistics.mean(r['rho_ot'] for r in mine):+.2f} | "
                         f"{sum(r['rho_coverage'] > 0 for r in mine)}/{len(mine)} |")
    return "\n".join(lines) + "\n", rows


def distance_plot(rows: list[dict], targets: list[str], path: Path) -> None:
    """One panel per target: coverage distance (x) against target loss (y), one line per representation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [t for t in targets if any(r["target"] == t for r in rows)]
    if not shown:
        return
    cols = min(3, len(shown))
    fig, axes = plt.subplots(math.ceil(len(shown) / cols), cols, figsize=(4.2 * cols, 3.4 * math.ceil(len(shown) / cols)),
                             squeeze=False)
    for ax, target in zip(axes.flat, shown):
        for r in [r for r in rows if r["target"] == target]:
            ax.plot([b["coverage"] for b in r["bins"]], [b["loss"] for b in r["bins"]], marker="o",
                    label=f"{r['rep']} (rho {r['rho_coverage']:+.2f})")
        ax.set_title(target, fontsize=9)
        ax.set_xlabel("coverage distance to the targets", fontsize=8)
        ax.set_ylabel("target loss after training", fontsize=8)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# Ablations of the LESS settings (issue: defaults from evidence). The base value of each is the run's own.
ABLATIONS = {
    "warmup_epochs": int, "warmup_fraction": float, "warmup_lora_r": int,  # a new warmup per value
    "proj_dim": int, "proj_kind": str, "pool_direction": str,  # the base warmup's checkpoints, featurized anew
}
ABLATION_METHODS = ("LESS-topk", "LESS-round_robin")


def parse_ablation(spec: str) -> tuple[str, list]:
    """``"proj_dim=2048,8192"`` -> ``("proj_dim", [2048, 8192])``."""
    name, _, values = spec.partition("=")
    if name not in ABLATIONS or not values:
        raise SystemExit(f"--ablate {spec!r}: expected NAME=V1,V2 with NAME one of {sorted(ABLATIONS)}.")
    return name, [ABLATIONS[name](v) for v in values.split(",")]


def ablation_cache(out: Path, name: str, value) -> Path:
    """Where LESS's similarities under ``name=value`` are cached (its warmup, if any, beside them)."""
    return out / "ablation" / f"{name}={value}" / "less_sims.npz"


def run_selector(base, tokenizer, warm_dir: Path, targets, args, **kw):
    """A LessSelector over ``warm_dir`` with the run's LESS settings in ``args``; ``kw`` adds or overrides."""
    from hf_less import LessSelector

    settings = dict(tokenizer=tokenizer, proj_dim=args.proj_dim, proj_kind=args.proj_kind,
                    pool_direction=args.pool_direction, max_length=args.max_length, batch_size=args.batch_size)
    return LessSelector(copy.deepcopy(base), warm_dir, targets, **{**settings, **kw})


def load_sims(cache: Path) -> np.ndarray | None:
    """LESS's cached ``(N, T)`` similarities (an ablation, remedy or format), or None when not cached."""
    return np.load(cache)["less_sims"] if cache.exists() else None


def save_sims(cache: Path, sims: np.ndarray, t0: float) -> None:
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, less_sims=sims, seconds=time.time() - t0)


def base_warmup(base, tokenizer, pool, all_targets, out: Path, args, sample: int = 32, tol: float = 1e-2) -> Path:
    """The run's own LESS warmup, ``OUT/warmup``; trained again, without the capture, where only its scores were kept.

    A run copied from docs/results keeps its cached scores but not its warmup (31 MB of checkpoints). The
    warmup is seeded, so its training (a minute, against an hour for the capture) is repeated, and checked:
    the first ``sample`` pool rows featurized from the new checkpoints must give the cached LESS cosines to
    ``tol`` (the cached ones came from float16 features).
    """
    warm_dir = out / "warmup"
    if warm_dir.exists():
        return warm_dir
    t = time.time()
    fresh = out / "warmup.partial"
    shutil.rmtree(fresh, ignore_errors=True)  # an interrupted earlier attempt
    capture_warmup(base, tokenizer, pool, all_targets, fresh, args, capture=False)
    rows = pool.select(range(min(sample, len(pool))))
    _, sims = run_selector(base, tokenizer, fresh, all_targets, args, use_captured=False,
                           show_progress=False).score(rows)
    cached = np.load(out / "transfer_scores.npz")["less_sims"][:len(rows)]
    diff = float(np.abs(sims - cached).max())
    if not diff <= tol:
        raise SystemExit(f"The LESS warmup trained again in {fresh} does not reproduce the cached scores in "
                         f"{out / 'transfer_scores.npz'} (max |cosine difference| {diff:.3g} > {tol} over {len(rows)} "
                         "pool rows): another torch, transformers or trl version trains it differently. Run the "
                         "benchmark on a fresh --out to recompute every score with this one.")
    fresh.rename(warm_dir)
    print(f"LESS warmup trained again in {time.time() - t:.0f} s; {len(rows)} pool rows reproduce the cached "
          f"cosines to {diff:.2g}", flush=True)
    return warm_dir


def ablation_sims(base, tokenizer, pool, all_targets, out: Path, args, name: str, value) -> np.ndarray:
    """LESS's (N, T) pool-by-target cosine with ``name=value`` (all other settings the run's), cached."""
    cache = ablation_cache(out, name, value)
    if (sims := load_sims(cache)) is not None:
        return sims
    cache.parent.mkdir(parents=True, exist_ok=True)
    sub = argparse.Namespace(**{**vars(args), name: value})
    t = time.time()
    if name in ("warmup_epochs", "warmup_fraction", "warmup_lora_r"):
        warm_dir, captured = capture_warmup(base, tokenizer, pool, all_targets, cache.parent / "warmup", sub), True
    else:  # the same warmup, featurized with another projection or pool direction
        warm_dir, captured = base_warmup(base, tokenizer, pool, all_targets, out, args), False
    _, sims = run_selector(base, tokenizer, warm_dir, all_targets, sub, use_captured=captured).score(pool)
    save_sims(cache, sims, t)
    return sims


def ablation_table(cells: dict, targets: list[str], budget: float, ablations: list[tuple[str, list]], args,
                   diagnostics: dict) -> str:
    """Per setting, value and LESS method, over the targets that have the cell: the mean target loss, the mean of
    loss / random's loss (targets weigh alike), wins over random beyond the spread, and targets below the base."""
    def mean_of(prefix: str, target: str, method: str, seeds=None):
        got = [c["target_loss"] for key, c in cells.items() if key.startswith(f"{prefix}|{target}|{budget}|{method}|")
               and (seeds is None or int(key.rsplit("|", 1)[1]) in seeds)]
        return (statistics.mean(got), statistics.stdev(got) if len(got) > 1 else 0.0) if got else None

    lines = [f"Ablations of the LESS settings at budget {budget:.0%}, one setting changed at a time (every other "
             "setting the run's; the base row is the main table's cells on the same training seeds). Over the "
             "targets that have the cell: mean target loss; mean of loss / random's mean loss (each target weighs "
             "alike); beats random = method's mean + sd below random's mean - sd; below base = targets where this "
             "value's loss is lower than the base value's; overlap = target independence of LESS's top-k; "
             "shared = the part of the base's LESS top-k that this value's top-k keeps (mean over targets).", "",
             "| setting | value | method | targets | mean loss | loss / random | beats random | below base | overlap "
             "| shared |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, values in ablations:
        base_value = getattr(args, name)
        for value in [base_value] + [v for v in values if v != base_value]:
            prefix = "transfer" if value == base_value else f"ablation|{name}={value}"
            diag = diagnostics.get((name, value), {})
            ov = "-" if diag.get("overlap") is None else f"{diag['overlap']:.1%}"
            shared = "-" if diag.get("shared") is None else f"{diag['shared']:.0%}"
            label = f"{value} (base)" if value == base_value else str(value)
            for method in args.ablation_methods:
                losses, ratios, wins, below = [], [], 0, 0
                for target in targets:
                    # the base value on the ablations' seeds too, so every row compares the same trainings
                    m, r = mean_of(prefix, target, method, args.analysis_seeds), mean_of("transfer", target, "random")
                    b = mean_of("transfer", target, method, args.analysis_seeds)
                    if m is None:
                        continue
                    losses.append(m[0])
                    if r is not None:
                        ratios.append(m[0] / r[0])
                        wins += m[0] + m[1] < r[0] - r[1]
                    below += b is not None and m[0] < b[0]
                if not losses:
                    lines.append(f"| {name} | {label} | {method} | 0 | - | - | - | - | {ov} | {shared} |")
                    continue
                lines.append(f"| {name} | {label} | {method} | {len(losses)} | {statistics.mean(losses):.3f} | "
                             f"{statistics.mean(ratios):.3f} | {wins}/{len(losses)} | "
                             f"{'-' if value == base_value else f'{below}/{len(losses)}'} | {ov} | {shared} |")
    return "\n".join(lines) + "\n"


# Hubness (issue 25): a few pool rows near every target. Remedies of LESS's similarities, each a LESS-topk row.
HUB_REMEDIES = ("center", "pca", "csls", "sgd")
HUB_METHODS = ("LESS-topk", "LESS-round_robin", "LESS-uot", "rds-topk", "rds-round_robin", "embedding-topk",
               "embedding-round_robin")
TOP_GROUPS = 5


def remedy_name(remedy: str, args) -> str:
    """The remedy with its parameter, as cells and caches name it: center, pca1, csls10, sgd."""
    if remedy not in HUB_REMEDIES:
        raise SystemExit(f"--hub_corrections {remedy!r}: expected some of {', '.join(HUB_REMEDIES)}.")
    return {"pca": f"pca{args.hub_pca_components}", "csls": f"csls{args.hub_csls_k}"}.get(remedy, remedy)


def hub_cache(out: Path, name: str) -> Path:
    return out / "hub" / name / "less_sims.npz"


def hub_sims(base, tokenizer, pool, all_targets, out: Path, args, remedy: str, compute: bool = True):
    """LESS's (N, T) similarities under a remedy (cached; None when not cached and not ``compute``).

    center / pca / csls: LessSelector(hub_correction=...) over the base warmup's captured features (the pool
    statistics in one pass over them, nothing featurized again); sgd: the pool featurized with its plain
    gradient (the ``--ablate pool_direction=sgd`` similarities, shared with it).
    """
    if remedy == "sgd":
        if args.pool_direction == "sgd":
            raise SystemExit("--hub_corrections sgd with --pool_direction sgd: the base is already sgd.")
        cache = ablation_cache(out, "pool_direction", "sgd")
        if cache.exists() or compute:
            return ablation_sims(base, tokenizer, pool, all_targets, out, args, "pool_direction", "sgd")
        return None
    cache = hub_cache(out, remedy_name(remedy, args))
    if (sims := load_sims(cache)) is not None or not compute:
        return sims
    t = time.time()
    less = run_selector(base, tokenizer, out / "warmup", all_targets, args, hub_correction=remedy,
                        hub_pca_components=args.hub_pca_components, hub_csls_k=args.hub_csls_k)
    _, sims = less.score(pool)
    save_sims(cache, sims, t)
    return sims


def pairwise_overlap(selections: dict[str, list[int]]) -> float | None:
    """Mean over target pairs of ``|A ∩ B| / k`` of their selections (``k`` the selection size); None under 2."""
    names = list(selections)
    if len(names) < 2:
        return None
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    return statistics.mean(len(set(selections[a]) & set(selections[b])) / max(1, len(selections[a]))
                           for a, b in pairs)


def hub_selection_row(label: str, selections: dict[str, list[int]], groups: list[str]) -> dict:
    """One method's hubness figures: overlap across targets, and the share of all its selections (pooled over the
    targets) taken by the ``TOP_GROUPS`` most-selected source tasks, with those tasks and their counts."""
    from hf_less.scoring.hubness import top_group_share, top_groups

    pooled = [i for rows in selections.values() for i in rows]
    return {"method": label, "overlap": pairwise_overlap(selections),
            "top_share": top_group_share(groups, pooled, TOP_GROUPS) if pooled else None,
            "top_groups": top_groups(groups, pooled, TOP_GROUPS) if pooled else []}


def hub_skew_row(label: str, sims: np.ndarray, k: int) -> dict:
    """A representation's k-occurrence (how many target examples have each pool row in their top k) and its skew."""
    from hf_less.scoring.hubness import k_occurrence, skewness

    occ = k_occurrence(np.asarray(sims, dtype=np.float32), k)
    return {"representation": label, "skew": skewness(occ), "max": int(occ.max()), "queries": int(np.shape(sims)[1]),
            "never": float((occ == 0).mean())}


def hub_diagnostics(features: dict, remedies: dict[str, np.ndarray], targets: list[str], budget: float, n: int,
                    groups: list[str], k: int) -> tuple[list[dict], list[dict]]:
    """(selection rows, skew rows): every targeted method's figures and every representation's k-occurrence skew.

    ``remedies``: a remedy's name -> its LESS ``(N, T)`` similarities (rows ``LESS[name]-topk``, ``less[name]``).
    """
    size = selectors.resolve_budget(budget, n)
    variants = [("", features, HUB_METHODS)] + [
        (name, {**features, "less_sims": sims}, ("LESS-topk",)) for name, sims in remedies.items()]
    selection_rows = []
    for name, feats, methods in variants:
        for method in methods:
            label = method.replace("LESS-", f"LESS[{name}]-") if name else method
            chosen = {t: select(method, size, 0, target_scores(feats, t), n) for t in targets}
            selection_rows.append(hub_selection_row(label, chosen, groups))
    cols = np.isin(features["target_task"], targets)
    skew_rows = [hub_skew_row(rep, np.asarray(features[f"{rep}_sims"])[:, cols], k) for rep in REPRESENTATIONS]
    skew_rows += [hub_skew_row(f"less[{name}]", np.asarray(sims)[:, cols], k) for name, sims in remedies.items()]
    return selection_rows, skew_rows


def hub_table(selection_rows: list[dict], skew_rows: list[dict], budget: float, n: int, k: int) -> str:
    """The hubness figures as Markdown (see :func:`hub_diagnostics`)."""
    size = selectors.resolve_budget(budget, n)
    lines = [f"Hubness at {budget:.0%} (k = {size} of {n}): overlap = mean pairwise |A ∩ B| / k of the selections "
             f"made for different targets (random: about {size / n:.1%}); top-{TOP_GROUPS} share = the share of all the "
             f"targets' selections together taken by the {TOP_GROUPS} most-selected source tasks.", "",
             f"| method | overlap | top-{TOP_GROUPS} share | most-selected source tasks (rows) |", "|---|---|---|---|"]
    for r in selection_rows:
        ov = "-" if r["overlap"] is None else f"{r['overlap']:.1%}"
        share = "-" if r["top_share"] is None else f"{r['top_share']:.1%}"
        top = ", ".join(f"{g} {c}" for g, c in r["top_groups"]) or "-"
        lines.append(f"| {r['method']} | {ov} | {share} | {top} |")
    lines += ["", f"k-occurrence N_{k}(x): for each pool row, how many target examples have it among their {k} most "
              "similar rows; its skewness is near 0 without hubs and large with them.", "",
              f"| representation | skew of N_{k} | max N_{k} (of the target examples) | rows in no top {k} |",
              "|---|---|---|---|"]
    for r in skew_rows:
        skew = "-" if r["skew"] != r["skew"] else f"{r['skew']:.2f}"
        lines.append(f"| {r['representation']} | {skew} | {r['max']} of {r['queries']} | {r['never']:.0%} |")
    return "\n".join(lines) + "\n"


def _seed_losses(cells: dict, prefix: str, seeds=None) -> dict[int, float]:
    """The target loss per training seed of the cells whose key starts with ``prefix`` (keys end ``|SEED``)."""
    return {int(key.rsplit("|", 1)[1]): c["target_loss"] for key, c in cells.items()
            if key.startswith(prefix) and (seeds is None or int(key.rsplit("|", 1)[1]) in seeds)}


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _loss_stats(cells: dict, prefix: str, seeds=None) -> tuple[float, float] | None:
    """(mean, sd) of the target loss over the cells whose key starts with ``prefix`` (one per seed)."""
    got = list(_seed_losses(cells, prefix, seeds).values())
    return _mean_sd(got) if got else None


def variant_loss_table(cells: dict, targets: list[str], budget: float, names: list[str], seeds: list[int],
                       prefix: str = "hub", what: str = "remedy", extra: dict[str, str] | None = None) -> str:
    """Per variant (cells ``PREFIX|NAME|TARGET|BUDGET|LESS-topk|SEED``: a hub remedy, a store format) against
    LESS-topk as run (cells ``transfer|...``), per target on the training seeds both have (paired).

    seeds = paired seeds per target (min-max); lower = targets where the variant's mean loss is below LESS-topk's;
    beyond the spread = its mean + sd below LESS-topk's mean - sd; raised = LESS-topk's mean + sd below the
    variant's mean - sd (the adoption rule of issue 25: lower on two thirds of the targets of both sets, never
    raised beyond the spread). With one paired seed each side's sd is LESS-topk's over all of its seeds at that
    target (the training-seed noise there), not 0: one seed has no spread of its own. ``extra``: more columns,
    a header -> per name its cell text (e.g. the agreement of a format's scores with float16's).
    """
    extra = extra or {}
    head = "".join(f" {h} |" for h in extra)
    lines = ["| " + what + " | targets | seeds | mean loss | LESS-topk mean loss | loss / random | lower "
             "| lower beyond the spread | raised beyond the spread |" + head,
             "|---|---|---|---|---|---|---|---|---|" + "---|" * len(extra)]
    for name in names:
        more = "".join(f" {col.get(name, '-')} |" for col in extra.values())
        losses, bases, ratios, paired_counts, lower, beyond, raised = [], [], [], [], 0, 0, 0
        for target in targets:
            mv = _seed_losses(cells, f"{prefix}|{name}|{target}|{budget}|LESS-topk|", seeds)
            bv = _seed_losses(cells, f"transfer|{target}|{budget}|LESS-topk|", seeds)
            paired = sorted(mv.keys() & bv.keys())  # the same training seeds on both sides
            r = _loss_stats(cells, f"transfer|{target}|{budget}|random|")
            if not paired:
                continue
            m, b = _mean_sd([mv[s] for s in paired]), _mean_sd([bv[s] for s in paired])
            if len(paired) == 1:  # no spread of its own: LESS-topk's over all its seeds at this target
                noise = _loss_stats(cells, f"transfer|{target}|{budget}|LESS-topk|")[1]
                m, b = (m[0], noise), (b[0], noise)
            paired_counts.append(len(paired))
            losses.append(m[0])
            bases.append(b[0])
            if r is not None:
                ratios.append(m[0] / r[0])
            lower += m[0] < b[0]
            beyond += m[0] + m[1] < b[0] - b[1]
            raised += b[0] + b[1] < m[0] - m[1]
        if not losses:
            lines.append(f"| {name} | 0 | - | - | - | - | - | - | - |{more}")
            continue
        ratio = f"{statistics.mean(ratios):.3f}" if ratios else "-"
        lo, hi = min(paired_counts), max(paired_counts)
        lines.append(f"| {name} | {len(losses)} | {lo if lo == hi else f'{lo}-{hi}'} | {statistics.mean(losses):.3f} | "
                     f"{statistics.mean(bases):.3f} | {ratio} | {lower}/{len(losses)} | {beyond}/{len(losses)} | "
                     f"{raised}/{len(losses)} |{more}")
    return "\n".join(lines) + "\n"


def hub_loss_table(cells: dict, targets: list[str], budget: float, names: list[str], seeds: list[int]) -> str:
    """Per remedy (cells ``hub|NAME|...``) against LESS-topk without it: :func:`variant_loss_table`."""
    return (f"Hubness remedies at {budget:.0%}, LESS-topk with each remedy against LESS-topk without it (training "
            f"seeds {seeds}); loss / random = mean over targets of the loss over random's mean loss.\n\n"
            + variant_loss_table(cells, targets, budget, names, seeds))


# Store formats (issue 24): LESS from the float16 capture re-encoded in a quantized format, each a LESS-topk row.
STORE_FORMATS = ("int8", "int4", "1bit")


def format_cache(out: Path, fmt: str) -> Path:
    return out / "format" / fmt / "less_sims.npz"


def format_sims(base, tokenizer, pool, all_targets, out: Path, args, fmt: str, compute: bool = True):
    """LESS's ``(N, T)`` similarities from a ``fmt`` store (cached; None when not cached and not ``compute``).

    The warmup's captured float16 pool features, per checkpoint, packed in ``fmt`` as ``featurize(dtype=fmt)``
    packs its rows (:func:`hf_less.gradients.quantize.encode`) and decoded, against the captured target
    features: what scoring a ``fmt`` store gives (within 1e-4, tests/gradients/test_store_formats.py), without a
    second featurization. The one difference from a store written in ``fmt``: the values were rounded to
    float16 first.
    """
    cache = format_cache(out, fmt)
    if (sims := load_sims(cache)) is not None or not compute:
        return sims
    from hf_less.gradients.quantize import decode, encode
    from hf_less.gradients.store import FeatureStore
    from hf_less.scoring.similarity import weighted_sims

    t = time.time()
    less = run_selector(base, tokenizer, out / "warmup", all_targets, args)
    rows, skipped = [], np.zeros(len(pool), dtype=bool)
    for c in less.checkpoints:
        store = FeatureStore(c.captured("pool"))
        order = less.store_rows(store, pool)  # pool row i -> its store row (None: the same order)
        order = np.arange(store.num_rows) if order is None else order
        skipped |= np.isin(order, store.skipped_rows())
        stored = store.features(c.step)
        x = stored.take(order).astype(np.float32)
        rows.append(torch.from_numpy(decode(encode(x, fmt), fmt, stored.dim)))
    sims = weighted_sims(rows, less.target_features, [c.weight for c in less.checkpoints]).numpy()
    sims[skipped] = -np.inf  # no completion token: never selected, as a store scores them
    save_sims(cache, sims, t)
    return sims


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho of two score vectors over their finite entries (ranks by argsort; ties are rare here)."""
    keep = np.isfinite(a) & np.isfinite(b)
    ra, rb = (np.argsort(np.argsort(v[keep])).astype(np.float64) for v in (a, b))
    return float(np.corrcoef(ra, rb)[0, 1])


def format_agreement(features: dict, sims: np.ndarray, targets: list[str], budget: float, n: int) -> dict[str, float]:
    """A format's agreement with the float16 scores, mean over targets: the top-k overlap of LESS-topk and the
    Spearman correlation of the LESS scores (each target's mean similarity)."""
    k = selectors.resolve_budget(budget, n)
    overlaps, rhos = [], []
    for target in targets:
        ref, got = target_scores(features, target), target_scores({**features, "less_sims": sims}, target)
        overlaps.append(len(set(select("LESS-topk", k, 0, ref, n)) & set(select("LESS-topk", k, 0, got, n))) / k)
        rhos.append(rank_correlation(ref["less_score"], got["less_score"]))
    return {"overlap": statistics.mean(overlaps), "spearman": statistics.mean(rhos), "min_spearman": min(rhos)}


def format_table(cells: dict, targets: list[str], budget: float, formats: dict[str, dict], seeds: list[int]) -> str:
    """Per store format: its agreement with float16 (:func:`format_agreement`) and LESS-topk's target loss on
    its selection against float16's (:func:`variant_loss_table`)."""
    names = list(formats)
    extra = {f"top-{budget:.0%} overlap with float16": {f: f"{a['overlap']:.1%}" for f, a in formats.items()},
             "Spearman with float16 (min over targets)": {
                 f: f"{a['spearman']:.4f} ({a['min_spearman']:.4f})" for f, a in formats.items()}}
    return (f"Store formats at {budget:.0%}: LESS-topk on the selection of each format's scores against float16's "
            f"(the captured features re-encoded; training seeds {seeds}).\n\n"
            + variant_loss_table(cells, targets, budget, names, seeds, prefix="format", what="format", extra=extra))


def methods_to_train(chosen: list[str] | None) -> tuple[list[str], list[str]]:
    """``--methods`` -> (every method to train, in METHODS order; those trained per target). ``None``: all."""
    trained = [m for m in METHODS if m != "zero-shot" and (chosen is None or m in chosen)]
    return trained, [m for m in trained if m not in ("random", "full pool", "IFD")]


def merge_cells(cells: dict, out: Path, others: list[Path]) -> int:
    """Add to ``cells`` (those of ``out``) the cells of other runs' directories, keeping ``out``'s where both have one;
    returns how many were added. Every directory must hold cells of the same pool and targets (its
    ``pool_tasks.json``), so a cell means the same training wherever it was run."""
    mine = out / "pool_tasks.json"
    added = 0
    for other in others:
        theirs = other / "pool_tasks.json"
        if not (other / "cells.json").exists() or not theirs.exists():
            raise SystemExit(f"--merge_cells {other}: no cells.json and pool_tasks.json there (not a --transfer --out).")
        if mine.exists() and json.loads(mine.read_text())["splits"] != json.loads(theirs.read_text())["splits"]:
            raise SystemExit(f"--merge_cells {other}: its cells are of another pool or other targets than {out}'s.")
        for key, cell in json.loads((other / "cells.json").read_text()).items():
            if key not in cells:
                cells[key] = cell
                added += 1
    return added


def run_transfer(args, base, tokenizer, out: Path, cells: dict, cells_path: Path, t0: float, ev: dict) -> str:
    """The transfer benchmark: one shared pool without the target tasks, every target scored against it.

    Selections that do not depend on the target (full pool, random, IFD) are trained once per budget
    and seed and evaluated on every target. Cell keys start with ``transfer|``.
    """
    pool, per_target, used = transfer_splits(tokenizer, args)
    n, targets = len(pool), list(args.targets)
    print(f"transfer: pool {n} from {len(used)} tasks (targets excluded: {', '.join(targets)}); "
          f"per target {args.num_targets} targets, {args.num_eval} eval", flush=True)
    splits_id = pool_digest(pool) + ":" + ",".join(
        pool_digest(per_target[t][0]) + "/" + pool_digest(per_target[t][1]) for t in targets)
    info = out / "pool_tasks.json"
    if cells and any(k.startswith("transfer|") for k in cells) and (
            not info.exists() or json.loads(info.read_text()).get("splits") != splits_id):
        raise SystemExit(f"{out} holds cells of another pool or other targets (different options); use another "
                         "--out or delete it.")
    info.write_text(json.dumps({"pool": n, "splits": splits_id, "tasks": used, "targets": targets}, indent=1))
    key_of = lambda target, budget, method, seed: f"transfer|{target}|{budget}|{method}|{seed}"  # noqa: E731
    ablations = [parse_ablation(spec) for spec in args.ablate]
    diagnostics: dict = {}
    hub_names = [remedy_name(r, args) for r in args.hub_corrections]
    remedies: dict[str, np.ndarray] = {}  # remedy name -> LESS's (N, T) similarities under it
    formats: dict[str, np.ndarray] = {}  # store format -> LESS's (N, T) similarities from a store in it
    agreement: dict[str, dict] = {}  # store format -> its agreement with the float16 scores
    hub_text = ""

    def header(elapsed: float) -> str:
        return (f"selection_quality --transfer{' --quick' if args.quick else ''}: SmolLM2-135M-Instruct; pool {n} "
                f"examples, up to {args.examples_per_task} from each of {len(used)} BIG-bench tasks (fit in "
                f"{args.max_length} tokens), the {len(targets)} target tasks excluded; {args.num_targets} targets and "
                f"{args.num_eval} eval examples per target task; LESS warmup {args.warmup_epochs} epoch(s) on "
                f"{args.warmup_fraction:.0%} of the pool, d = {args.proj_dim}; LoRA r=8, {args.epochs} epochs on each "
                f"selection ({args.full_epochs} on the full pool), lr {args.lr}; training seeds {args.seeds}, random "
                f"seeds {args.random_seeds}; {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}; "
                f"this invocation {elapsed / 60:.1f} min")

    features = None

    def finish() -> str:
        text = report()
        plot(summarize(cells, args, prefix="transfer|"), out / "results.png", args)
        if args.distance:
            distance_plot(distance_table(cells, targets, args.distance_budget)[1], targets, out / "distance.png")
        return text

    def report() -> str:
        rows = summarize(cells, args, prefix="transfer|")
        text = markdown(rows, header(time.time() - t0)) + "\n" + win_table(rows, targets, args.budgets)
        if features is not None:
            text += "\n" + overlap_table(features, targets, args.budgets, n)
            sec = dict(zip((*REPRESENTATIONS, "ifd"), features["seconds"].tolist()))
            text += ("\nSelection cost on this machine (scores of the whole pool for all targets at once; LESS "
                     "includes its warmup and the capture): " + ", ".join(
                         f"{k} {v:.0f} s ({v / n * 1000:.0f} s per 1,000 pool examples)" for k, v in sec.items()) + "\n")
        if args.distance:
            text += "\n" + distance_table(cells, targets, args.distance_budget)[0]
        if ablations:
            text += "\n" + ablation_table(cells, targets, args.budgets[0], ablations, args, diagnostics)
        if hub_text:
            text += "\n" + hub_text
        if hub_names:
            text += "\n" + hub_loss_table(cells, targets, args.budgets[0], hub_names, args.seeds)
        if agreement:
            text += "\n" + format_table(cells, targets, args.budgets[0], agreement, args.seeds)
        (out / "results.md").write_text(text)
        return text

    def evaluate(model, targets_now: list[str], method: str, budget, seed: int, size: int, t: float) -> None:
        for target in targets_now:
            key = key_of(target, budget, method, seed)
            result = evaluate_model(model, tokenizer, per_target[target][1], **ev)
            cells[key] = {**result, "n": size, "sdf": sdf(size, n), "seconds": round(time.time() - t, 1)}
            atomic_write_json(cells_path, cells)
            print(f"[{time.time() - t0:7.0f}s] {key}: loss {result['target_loss']:.3f} "
                  f"{result['metric']} {result['value']:.3f} (n={size}, {cells[key]['seconds']}s)", flush=True)
        report()

    def train(rows: list[int], seed: int, epochs: int):
        return lora_train(base, tokenizer, pool.select(rows), epochs=epochs, lr=args.lr, batch_size=args.batch_size,
                          max_length=args.max_length, seed=seed)

    def analysis_cell(key: str, rows: list[int], target: str, seed: int, **extra: float) -> None:
        """Train on ``rows``, evaluate on ``target`` and keep the cell (a distance bin or an ablation)."""
        t = time.time()
        result = evaluate_model(train(rows, seed, args.epochs), tokenizer, per_target[target][1], **ev)
        cells[key] = {**result, "n": len(rows), **extra, "seconds": round(time.time() - t, 1)}
        atomic_write_json(cells_path, cells)
        print(f"[{time.time() - t0:7.0f}s] {key}: " + "".join(f"{k} {v:.3f} " for k, v in extra.items())
              + f"loss {result['target_loss']:.3f} ({cells[key]['seconds']}s)", flush=True)
        report()

    missing = [t for t in targets if key_of(t, "-", "zero-shot", 0) not in cells]
    if missing and not args.report_only:
        evaluate(base, missing, "zero-shot", "-", 0, 0, time.time())
    features = transfer_features(base, tokenizer, pool, per_target, out, args)
    print(f"[{time.time() - t0:7.0f}s] scores of every representation ready", flush=True)
    if hub_names or args.store_formats:
        from datasets import concatenate_datasets

        hub_targets = text_only(concatenate_datasets([per_target[t][0] for t in targets]))
    for fmt in args.store_formats:
        formats[fmt] = format_sims(base, tokenizer, text_only(pool), hub_targets, out, args, fmt)
        agreement[fmt] = format_agreement(features, formats[fmt], targets, args.budgets[0], n)
        print(f"[{time.time() - t0:7.0f}s] {fmt}: " + ", ".join(f"{k} {v:.4f}" for k, v in agreement[fmt].items()),
              flush=True)
    if hub_names:
        for remedy, name in zip(args.hub_corrections, hub_names):
            # --report_only computes the cheap remedies (captured features) but featurizes nothing (sgd: cached only)
            sims = hub_sims(base, tokenizer, text_only(pool), hub_targets, out, args, remedy,
                            compute=not (args.report_only and remedy == "sgd"))
            if sims is not None:
                remedies[name] = sims
        print(f"[{time.time() - t0:7.0f}s] hubness remedies ready: {', '.join(remedies) or 'none'}", flush=True)
    hub_text = hub_table(*hub_diagnostics(features, remedies, targets, args.budgets[0], n, list(pool["task"]),
                                          args.hub_k), args.budgets[0], n, args.hub_k)
    report()
    if args.report_only:  # the tables of the cells present; the ablations' diagnostics where their scores are cached
        for name, values in ablations:
            diagnostics[(name, getattr(args, name))] = ablation_diagnostics(features, None, targets, args.budgets[0], n)
            for value in values:
                cache = ablation_cache(out, name, value)
                if value != getattr(args, name) and cache.exists():
                    diagnostics[(name, value)] = ablation_diagnostics(
                        features, {**features, "less_sims": np.load(cache)["less_sims"]}, targets, args.budgets[0], n)
        return finish()
    trained, per_target_methods = methods_to_train(args.methods)
    for seed in args.seeds if "full pool" in trained else []:
        missing = [t for t in targets if key_of(t, "-", "full pool", seed) not in cells]
        if missing:
            t = time.time()
            evaluate(train(list(range(n)), seed, args.full_epochs), missing, "full pool", "-", seed, n, t)
    for budget in args.budgets:
        k = selectors.resolve_budget(budget, n)
        # Target-independent selections: one training, evaluated on every target.
        for method, seeds in (("random", args.random_seeds), ("IFD", args.seeds)):
            for seed in seeds if method in trained else []:
                missing = [t for t in targets if key_of(t, budget, method, seed) not in cells]
                if missing:
                    t = time.time()
                    evaluate(train(select(method, k, seed, features, n), seed, args.epochs), missing, method, budget,
                             seed, k, t)
        for target in targets:
            scores = target_scores(features, target)
            for method in per_target_methods:
                for seed in args.seeds:
                    if key_of(target, budget, method, seed) in cells:
                        continue
                    t = time.time()
                    rows = select(method, k, seed, scores, n)
                    evaluate(train(rows, seed, args.epochs), [target], method, budget, seed, len(rows), t)
    # LESS-topk under each hub remedy and from each store format, per target, on the training seeds (first budget)
    variants = [("hub", name, sims) for name, sims in remedies.items()] + [
        ("format", fmt, sims) for fmt, sims in formats.items()]
    budget = args.budgets[0]
    k = selectors.resolve_budget(budget, n)
    for prefix, name, sims in variants:
        sub = {**features, "less_sims": sims}
        for target in targets:
            for seed in args.seeds:
                key = f"{prefix}|{name}|{target}|{budget}|LESS-topk|{seed}"
                if key not in cells:
                    analysis_cell(key, select("LESS-topk", k, seed, target_scores(sub, target), n), target, seed)
    if args.distance:
        from hf_less.selection.distance import subset_distances

        budget = args.distance_budget
        k = selectors.resolve_budget(budget, n)
        for target in args.distance_targets or targets:
            scores = target_scores(features, target)
            for rep in DISTANCE_REPRESENTATIONS:
                for i, rows in enumerate(distance_bins_of(scores, rep, k)):
                    d = subset_distances(rows, sims=scores[f"{rep}_sims"])
                    for seed in args.analysis_seeds:
                        key = f"distance|{target}|{budget}|{rep}|{i}|{seed}"
                        if key not in cells:
                            analysis_cell(key, rows, target, seed, coverage=d["coverage"], ot=d["ot"])
    if ablations:
        from datasets import concatenate_datasets

        all_targets = text_only(concatenate_datasets([per_target[t][0] for t in targets]))
        budget = args.budgets[0]
        k = selectors.resolve_budget(budget, n)
        for name, values in ablations:
            diagnostics[(name, getattr(args, name))] = ablation_diagnostics(features, None, targets, budget, n)
            for value in [v for v in values if v != getattr(args, name)]:
                sims = ablation_sims(base, tokenizer, text_only(pool), all_targets, out, args, name, value)
                sub = {**features, "less_sims": sims}
                diagnostics[(name, value)] = ablation_diagnostics(features, sub, targets, budget, n)
                for target in targets:
                    scores = target_scores(sub, target)
                    for method in args.ablation_methods:
                        for seed in args.analysis_seeds:
                            key = f"ablation|{name}={value}|{target}|{budget}|{method}|{seed}"
                            if key not in cells:
                                analysis_cell(key, select(method, k, seed, scores, n), target, seed)
    return finish()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--transfer", action="store_true",
                   help="Transfer mode: one pool from about 100 BIG-bench tasks with every target task excluded.")
    p.add_argument("--quick", action="store_true", help="With --transfer: a smaller configuration (about 30 min on "
                   "2 CPU cores): 3 targets, one budget, one training seed, 2 random seeds, 4 examples per task.")
    p.add_argument("--distance", action="store_true",
                   help="With --transfer: also distance versus loss (Nayak et al.): for less, rds and embedding, train "
                        "on bins of the round-robin ordering at ranks [0, k), [k, 2k), [3k, 4k), [7k, 8k) and report "
                        "each bin's distance to the targets against its target loss (Spearman per representation and "
                        "target, OUT/distance.png).")
    p.add_argument("--distance_targets", nargs="+", default=None,
                   help="--distance: the targets to train the bins of (default all; 12 trainings per target).")
    p.add_argument("--ablate", nargs="*", default=[], metavar="NAME=V1,V2",
                   help="With --transfer: the --ablation_methods again with one setting changed, for each "
                        "value, at the first budget: " + ", ".join(ABLATIONS) + " (e.g. --ablate warmup_epochs=1,4 "
                        "proj_dim=2048,8192 pool_direction=sgd). A table of the mean target loss per value.")
    p.add_argument("--ablation_methods", nargs="+", default=list(ABLATION_METHODS), choices=ABLATION_METHODS,
                   help="--ablate: the LESS selections trained per setting (each adds a training per target).")
    p.add_argument("--analysis_seeds", nargs="+", type=int, default=None,
                   help="Training seeds of the --distance bins and the --ablate cells (default: the first of --seeds).")
    p.add_argument("--target_set", choices=sorted(TARGET_SETS), default="base",
                   help="With --transfer: the default targets. base: " + " ".join(TRANSFER_TARGETS)
                        + "; hubs (issue 25): " + " ".join(HUB_TARGETS) + ", with date_understanding kept in the pool (--pool_include).")
    p.add_argument("--pool_include", nargs="*", default=None,
                   help="--transfer: tasks always in the pool, placed first (default: the target set's; hubs: "
                        "date_understanding).")
    p.add_argument("--hub_corrections", nargs="*", default=[], choices=HUB_REMEDIES,
                   help="With --transfer: LESS-topk again under each hubness remedy (center, pca, csls: "
                        "LessSelector(hub_correction=...) on the captured features; sgd: pool_direction=sgd, "
                        "featurized anew), per target and training seed at the first budget, with a table against "
                        "LESS-topk. The hubness figures of each remedy join the report's hubness table.")
    p.add_argument("--store_formats", nargs="*", default=[], choices=STORE_FORMATS,
                   help="Transfer mode (issue 24): LESS-topk from the captured float16 features re-encoded in each "
                        "store format, per target and training seed at the first budget, with the top-k overlap and "
                        "the Spearman correlation of its scores with float16's.")
    p.add_argument("--hub_pca_components", type=int, default=1, help="--hub_corrections pca: components removed.")
    p.add_argument("--hub_csls_k", type=int, default=10,
                   help="--hub_corrections csls: nearest target examples (of all the targets) in a row's penalty.")
    p.add_argument("--hub_k", type=int, default=10,
                   help="--transfer: the k of the k-occurrence (hubness) statistic in the report.")
    p.add_argument("--warmup_lora_r", type=int, default=8, help="The LESS warmup's LoRA rank (alpha = 4 r).")
    p.add_argument("--proj_kind", default="sparse", help="LESS projection: sparse (default) or rademacher.")
    p.add_argument("--pool_direction", default="adam", help="LESS pool-side direction: adam (default) or sgd.")
    p.add_argument("--store_dtype", default="float16",
                   help="--transfer: format of the captured feature stores (float16, float32, int8, int4, 1bit; the "
                        "capture stores pool and target features in it). Not float16: the default --out gets a "
                        "_DTYPE suffix, so each format's cells are kept apart.")
    p.add_argument("--distance_budget", type=float, default=None,
                   help="--distance: the bin size k as a fraction of the pool (default: the first budget).")
    p.add_argument("--out", default=None, help="Default: out/selection_quality (in-pool), "
                   "out/selection_quality_transfer, out/selection_quality_transfer_quick.")
    p.add_argument("--targets", nargs="+", default=None,
                   help="BIG-bench target tasks (multiple-choice ones get MC accuracy, others exact match). Default: "
                        "sports_understanding object_counting; --transfer: " + " ".join(TRANSFER_TARGETS) +
                        "; --transfer --quick: " + " ".join(QUICK_TARGETS) + ".")
    p.add_argument("--methods", nargs="*", default=None, choices=[m for m in METHODS if m != "zero-shot"],
                   help="--transfer: train only these methods' selections (default: all); the other cells are kept "
                        "and reported. E.g. --methods LESS-topk random with --hub_corrections trains what the remedy "
                        "table needs first; --methods alone trains none of them, only the remedies, formats and "
                        "ablations.")
    p.add_argument("--merge_cells", nargs="+", default=[], metavar="DIR",
                   help="--transfer: first add the cells of other --out directories of the same pool and targets "
                        "(invocations run side by side, each on its own copy), those already here kept.")
    p.add_argument("--budgets", nargs="+", type=float, default=None,
                   help="Fractions of the pool (default 0.05 0.1; --quick: 0.05).")
    p.add_argument("--seeds", nargs="+", type=int, default=None,
                   help="Training (and, in-pool, random selection) seeds (default 0 1; --quick: 0).")
    p.add_argument("--random_seeds", nargs="+", type=int, default=None,
                   help="--transfer: seeds of the random selections (default 0 1 2; --quick: 0 1).")
    p.add_argument("--examples_per_task", type=int, default=None,
                   help="Pool examples per task (default 8 in-pool, about 30 tasks; --transfer 12; --quick 4).")
    p.add_argument("--pool_tasks", type=int, default=100, help="--transfer: tasks in the pool.")
    p.add_argument("--min_task_examples", type=int, default=4,
                   help="--transfer: a pool task needs at least this many examples that fit max_length.")
    p.add_argument("--exclude_tasks", nargs="*", default=[], help="--transfer: more tasks kept out of the pool.")
    p.add_argument("--num_eval", type=int, default=24, help="Held-out target examples per task.")
    p.add_argument("--num_targets", type=int, default=8)
    p.add_argument("--max_chars", type=int, default=300)
    p.add_argument("--max_length", type=int, default=128)
    p.add_argument("--epochs", type=int, default=3, help="Training epochs on each selection.")
    p.add_argument("--full_epochs", type=int, default=1, help="Training epochs on the full pool.")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--warmup_fraction", type=float, default=None,
                   help="LESS warmup share of the pool (default 0.1 in-pool, 0.05 with --transfer).")
    p.add_argument("--warmup_epochs", type=int, default=None, help="Default 2; --quick: 1.")
    p.add_argument("--proj_dim", type=int, default=512)
    p.add_argument("--max_new_tokens", type=int, default=12)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--report_only", action="store_true",
                   help="--transfer: train nothing; write the tables and plots from the cells already in --out "
                        "(the scores are computed if they are not cached: a way to time the selection alone).")
    args = p.parse_args()
    if args.quick and not args.transfer:
        p.error("--quick is a configuration of --transfer; add --transfer.")
    if args.ablate and not args.transfer:
        p.error("--ablate is a study of the transfer mode; add --transfer.")
    if args.distance and not args.transfer:
        p.error("--distance is an analysis of the transfer mode; add --transfer.")
    if (args.hub_corrections or args.target_set != "base" or args.pool_include) and not args.transfer:
        p.error("--target_set, --pool_include and --hub_corrections are options of the transfer mode; add --transfer.")
    if (args.methods is not None or args.merge_cells) and not args.transfer:
        p.error("--methods and --merge_cells are options of the transfer mode; add --transfer.")
    if args.store_formats and (not args.transfer or args.store_dtype != "float16"):
        p.error("--store_formats compares quantized stores with the float16 capture of the transfer mode: add "
                "--transfer, without --store_dtype.")
    if args.store_dtype != "float16" and not args.transfer:
        p.error("--store_dtype applies to the transfer mode's captured features; add --transfer.")
    quick = args.quick
    target_set = TARGET_SETS[args.target_set]
    defaults = {
        "out": "out/selection_quality" + ("_transfer" if args.transfer else "")
               + ("" if args.target_set == "base" else f"_{args.target_set}") + ("_quick" if quick else "")
               + ("" if args.store_dtype == "float16" else f"_{args.store_dtype}"),
        "targets": list(target_set["quick"] if quick else target_set["targets"]) if args.transfer
        else ["sports_understanding", "object_counting"],
        "pool_include": list(target_set["pool_include"]),
        "budgets": [0.05] if quick else [0.05, 0.1],
        "seeds": [0] if quick else [0, 1],
        "random_seeds": [0, 1] if quick else [0, 1, 2],
        "examples_per_task": 4 if quick else 12 if args.transfer else 8,
        "warmup_fraction": 0.05 if args.transfer else 0.1,
        "warmup_epochs": 1 if quick else 2,
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.distance_targets and not set(args.distance_targets) <= set(args.targets):
        p.error(f"--distance_targets must be among --targets {args.targets}.")
    if args.distance_budget is None:
        args.distance_budget = args.budgets[0]
    if args.analysis_seeds is None:
        args.analysis_seeds = args.seeds[:1]
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cells_path = out / "cells.json"
    cells = json.loads(cells_path.read_text()) if cells_path.exists() else {}
    if args.merge_cells:
        added = merge_cells(cells, out, [Path(d) for d in args.merge_cells])
        atomic_write_json(cells_path, cells)
        print(f"--merge_cells: {added} cells added to {cells_path}", flush=True)
    t0 = time.time()
    base, tokenizer = load_model_and_tokenizer()
    base.eval()
    ev = {"max_length": args.max_length, "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
          "show_progress": False}
    if args.transfer:
        print(run_transfer(args, base, tokenizer, out, cells, cells_path, t0, ev))
        return

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
