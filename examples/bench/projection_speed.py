"""The projection alone: seconds per batch of each kind on LoRA-shaped parameter slices, side by side.

Featurization projects each LoRA matrix's per-example Adam directions as they are formed: a
``(B, n)`` slice at its offset among the P coordinates. This times exactly that call
(``projector.project``) for every kind on the slices of a Llama-shaped LoRA (``2 x layers x 4``
matrices of ``hidden x r``), warm (each projector's per-slice cache filled first, as over a pool),
the kinds interleaved in rounds, the fastest round of each kept: a shared, noisy machine slows the
rounds, not the comparison. CUDA events on a GPU, wall time on a CPU. With ``--adam`` it times the
call pool examples make instead, ``projector.project_adam``: the Adam direction of the slice and its
projection, which the row-shift kind's compiled pass (``rowshift/compiled``) fuses into one.

    .venv/bin/python examples/bench/projection_speed.py                       # 1 layer, hidden 2048, r = 64, B = 8
    .venv/bin/python examples/bench/projection_speed.py --layers 32 --hidden 4096 --rank 128 --batch 64   # 7B (GPU)
    .venv/bin/python examples/bench/projection_speed.py --methods             # also the row-shift kind's methods
    .venv/bin/python examples/bench/projection_speed.py --methods --adam      # with the Adam direction (pool rows)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from featurize_scale import Timer  # noqa: E402 - CUDA events on a GPU, wall time on a CPU

from hf_less.gradients.projection import KINDS, make_projector  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dim", type=int, default=8192)
    p.add_argument("--kinds", nargs="+", default=["rowshift", "sparse"], choices=list(KINDS))
    p.add_argument("--methods", action="store_true",
                   help="time the row-shift kind's gather and scatter methods and its compiled pass too")
    p.add_argument("--adam", action="store_true",
                   help="time project_adam (the Adam direction and its projection: a pool example's call)")
    p.add_argument("--rounds", type=int, default=10)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n = args.hidden * args.rank
    slices = 2 * 4 * args.layers
    P = n * slices
    x = torch.randn(args.batch, n, device=device)
    m, v = torch.randn(n, device=device) * 1e-3, torch.rand(n, device=device) * 1e-5  # one moment pair serves all
    variants = {kind: make_projector(P, args.dim, kind, seed=0) for kind in args.kinds}
    if args.methods:
        for method in ("gather", "scatter"):
            variants[f"rowshift/{method}"] = make_projector(P, args.dim, "rowshift", seed=0, method=method)
        variants["rowshift/compiled"] = make_projector(P, args.dim, "rowshift", seed=0, compile=True)

    def sweep(projector) -> None:
        for i in range(slices):
            if args.adam:
                projector.project_adam(x, m, v, (0.9, 0.999), 1e-8, i * n)
            else:
                projector.project(x, i * n)

    for projector in variants.values():  # warm: caches filled, kernels loaded
        sweep(projector)
    best = {name: float("inf") for name in variants}
    for _ in range(args.rounds):
        for name, projector in variants.items():
            timer = Timer(device).start()
            sweep(projector)
            best[name] = min(best[name], timer.stop())
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{where}; P = {P:,} ({slices} slices of {n:,}); d = {args.dim}; batch {args.batch}; "
          f"{'project_adam (Adam direction and projection)' if args.adam else 'project'}; "
          f"fastest of {args.rounds} interleaved rounds")
    base = best[args.kinds[0]]
    for name, sec in best.items():
        print(f"{name:>18}: {sec * 1e3:9.2f} ms per batch, {sec / args.batch * 1e3:8.3f} ms per example, "
              f"{sec / (args.batch * P) * 1e9:7.3f} ns per coordinate, {sec / base:5.2f}x {args.kinds[0]}")
    return best


if __name__ == "__main__":
    main()
