"""Selection time and peak memory of every strategy on synthetic pools (10^5 and 10^6 candidates x 500 targets).

The pool-by-target cosine is never materialised: it is a lazy
:class:`hf_less.scoring.representations.CosineSimilarity` over synthetic ``(N, d)`` features (a mixture
of clusters; the targets sit around a few of them, as a task's examples do), read in row chunks
by every selector, exactly as a memory-mapped ``less_sims`` matrix would be. Each (pool size,
strategy) runs in a fresh subprocess; "extra" memory is the peak resident memory of the
selection above the resident memory just before it (the features and the interpreter).

    python examples/bench/selectors_scale.py                       # 10^5 and 10^6, 500 targets, budget 5%
    python examples/bench/selectors_scale.py --sizes 100000 --targets 100 --strategies uot round_robin
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

STRATEGIES = ("topk", "round_robin", "doubly_greedy", "uot", "knn_uniform", "knn_kde", "random")


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:  # Linux: writing 5 to clear_refs resets VmHWM, the peak resident set size
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def synthetic(n: int, t: int, dim: int, clusters: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    pool = np.empty((n, dim), dtype=np.float32)
    step = 1 << 18
    for start in range(0, n, step):  # generated in pieces: no float64 copy of the whole pool
        m = min(step, n - start)
        pool[start : start + m] = centres[rng.integers(0, clusters, m)]
        pool[start : start + m] += 0.6 * rng.standard_normal((m, dim), dtype=np.float32)
    near = rng.choice(clusters, 3, replace=False)  # the target task resembles three clusters
    targets = centres[rng.choice(near, t)] + 0.6 * rng.standard_normal((t, dim), dtype=np.float32)
    return pool, targets


def run_one(n: int, t: int, strategy: str, budget: float, dim: int, clusters: int) -> dict:
    import numpy as np
    import torch

    from hf_less.selection import strategies as selectors
    from hf_less.scoring.representations import CosineSimilarity

    torch.set_num_threads(os.cpu_count() or 1)
    pool, targets = synthetic(n, t, dim, clusters)
    sims = CosineSimilarity(pool, targets)
    scores = selectors.aggregate_scores(sims) if strategy == "topk" else None
    k = selectors.resolve_budget(budget, n)
    base = _rss_kib("VmRSS")
    exact_peak = _reset_peak()
    start = time.perf_counter()
    # knn_kde's density is over the pool features (as over a LESS feature store), not the sims rows.
    # Its cost is O(U^2 d) for the U candidates in the union of the neighbour lists, hence
    # 1000 neighbours per target here (the reference 5000 makes U most of a 10^5 pool).
    params = {"features": pool, "max_neighbors": 1000} if strategy == "knn_kde" else {}
    out = selectors.order(strategy, scores, 0, sims=sims, k=k, **params)
    seconds = time.perf_counter() - start
    peak = _rss_kib("VmHWM")
    assert len(out) == k == len(np.unique(out))
    return {"n": n, "targets": t, "strategy": strategy, "k": k, "seconds": round(seconds, 2),
            "peak_rss_mib": round(peak / 1024), "extra_mib": round(max(0, peak - base) / 1024),
            "peak_is_exact": exact_peak}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--targets", type=int, default=500)
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    p.add_argument("--budget", type=float, default=0.05, help="fraction of the pool selected (default 0.05)")
    p.add_argument("--dim", type=int, default=32, help="feature dimension of the synthetic pool")
    p.add_argument("--clusters", type=int, default=100)
    p.add_argument("--one", nargs=2, metavar=("N", "STRATEGY"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(int(args.one[0]), args.targets, args.one[1], args.budget, args.dim, args.clusters)))
        return
    print("| candidates | targets | strategy | k | time (s) | peak RSS (MiB) | selection extra (MiB) |")
    print("|---:|---:|---|---:|---:|---:|---:|")
    for n in args.sizes:
        for strategy in args.strategies:
            cmd = [sys.executable, __file__, "--one", str(n), strategy, "--targets", str(args.targets),
                   "--budget", str(args.budget), "--dim", str(args.dim), "--clusters", str(args.clusters)]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode:
                print(f"| {n} | {args.targets} | {strategy} | - | failed: {res.stderr.strip()[-200:]} | | |")
                continue
            r = json.loads(res.stdout.strip().splitlines()[-1])
            print(f"| {r['n']:,} | {r['targets']} | {r['strategy']} | {r['k']:,} | {r['seconds']} | "
                  f"{r['peak_rss_mib']} | {r['extra_mib']} |", flush=True)


if __name__ == "__main__":
    main()
