"""Feature store formats at scale: size on disk, scoring and selection time, memory, read speed.

For each format (float16, int8, int4, 1bit; float32 on request) it writes a synthetic store of
``--rows`` rows (default 10^5) at d = 8192 with 4 checkpoints through ``FeatureStore.write_shard``
(random unit-norm features, packed as featurize and capture pack them), then measures:

- the size on disk (``du``) and the write time (packing, checksums, fsync);
- a dd-style sequential read of the same files (8 MiB reads), the disk's own speed;
- ``score_store`` (the loop of ``LessSelector.score_store``) for 8 and for 64 targets, and the
  selection after it (``topk`` and ``round_robin`` at 5%), each in a fresh subprocess: wall time,
  read throughput (store bytes / scoring time), and the subprocess's peak resident memory above
  what it held before scoring (``VmHWM`` reset through ``/proc/self/clear_refs``).

Before every read the store's files are dropped from the page cache with
``posix_fadvise(POSIX_FADV_DONTNEED)`` (no root needed; it drops clean pages of those files), so
both the dd read and the scoring read from the disk; the dd figure printed beside it says whether
that worked (a cached read runs at memory speed, many GB/s). ``--million int4 1bit`` also builds
10^6-row stores of those formats by copying the 10^5-row shards ten times (the rows repeat; the
files are distinct, so the reads are real) and measures them the same way. Quantized stores are
scored with the integer matmul kernel ``score_store`` times fastest on this machine (the table's
``product`` column); ``--kernels int_mm float_blocks`` also scores the 10^5-row stores with each
kernel forced, side by side. Stores are deleted after their measurement unless ``--keep``.

    python examples/bench/store_formats.py                                  # 10^5 rows, 4 formats
    python examples/bench/store_formats.py --million int4 1bit              # and 10^6 rows at int4, 1bit
    python examples/bench/store_formats.py --rows 20000 --formats int8 --targets 8   # a quick look
    python examples/bench/store_formats.py --formats int8 int4 1bit --float_path     # integer vs float product
    python examples/bench/store_formats.py --formats int8 --million int8 --kernels int_mm float_blocks
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from hf_less.gradients.quantize import INT_KERNEL_ENV, INT_KERNELS, QUANTIZED_FORMATS

STEPS = (1, 2, 3, 4)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.npy"))


def drop_cache(root: Path) -> None:
    """Drop the store's files from the page cache (their clean pages), so the next read is from the disk."""
    for p in _files(root):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def sequential_read(root: Path, block: int = 8 << 20) -> tuple[int, float]:
    """``(bytes, seconds)`` of reading every shard file once, in order, ``block`` bytes at a time (dd bs=8M)."""
    buf = bytearray(block)
    total, start = 0, time.perf_counter()
    for p in _files(root):
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    return total, time.perf_counter() - start


def du(root: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in root.rglob("*") if p.is_file())


def write_store(root: Path, fmt: str, rows: int, dim: int, shard_rows: int, seed: int = 0) -> float:
    """A synthetic keyed store of ``rows`` random unit-norm rows per checkpoint; returns the write seconds."""
    from hf_less.gradients.store import FeatureStore

    rng = np.random.default_rng(seed)
    blocks = {}
    for step in STEPS:  # one random block per checkpoint, rolled per shard: the packing work is real
        x = rng.standard_normal((shard_rows, dim), dtype=np.float32)
        blocks[step] = x / np.linalg.norm(x, axis=1, keepdims=True)
    meta = {"representation": "synthetic", "model": "synthetic", "dim": dim, "dtype": fmt, "keyed": True,
            "checkpoints": [{"step": s, "weight": 1 / len(STEPS)} for s in STEPS], "projection": None,
            "rows": rows}
    store = FeatureStore.create(root, meta)
    start = time.perf_counter()
    for k, s0 in enumerate(range(0, rows, shard_rows)):
        n = min(shard_rows, rows - s0)
        per_step = {s: np.roll(b, k, axis=0)[:n] for s, b in blocks.items()}
        keys = np.zeros((n, 16), dtype=np.uint8)
        keys[:, :8] = np.arange(s0, s0 + n, dtype="<u8").view(np.uint8).reshape(n, 8)
        store.write_shard(per_step, keys)
    store.finish()
    return time.perf_counter() - start


def repeat_store(src: Path, dst: Path, times: int) -> float:
    """A store of ``times`` copies of ``src``'s shards (distinct files, rows repeating); returns the seconds."""
    from hf_less.gradients.store import MANIFEST_FILE, META_FILE

    start = time.perf_counter()
    meta = json.loads((src / META_FILE).read_text())
    manifest = json.loads((src / MANIFEST_FILE).read_text())
    dst.mkdir(parents=True)
    shards = []
    for r in range(times):
        for s in manifest["shards"]:
            k = len(shards)
            new = {**s, "files": {}}
            for step, f in s["files"].items():
                name = f"step-{step}/shard-{k:06d}.npy"
                (dst / name).parent.mkdir(exist_ok=True)
                shutil.copyfile(src / f["name"], dst / name)
                new["files"][step] = {**f, "name": name}
            name = f"keys/shard-{k:06d}.npy"
            (dst / name).parent.mkdir(exist_ok=True)
            shutil.copyfile(src / s["keys"]["name"], dst / name)
            new["keys"] = {**s["keys"], "name": name}
            shards.append(new)
    (dst / META_FILE).write_text(json.dumps({**meta, "rows": meta["rows"] * times}))
    (dst / MANIFEST_FILE).write_text(json.dumps({"shards": shards, "complete": True}))
    os.sync()
    return time.perf_counter() - start


def child_score(root: str, targets: int, budget: float, chunk_rows: int, integer: bool | None = None) -> dict:
    """In a fresh process: score the store against ``targets`` random targets, then select; time and memory."""
    import torch

    from hf_less.gradients.quantize import int_kernel
    from hf_less.gradients.store import FeatureStore
    from hf_less.scoring.less import score_store
    from hf_less.selection import strategies

    store = FeatureStore(root)
    kernel = int_kernel() if integer is not False and store.format in QUANTIZED_FORMATS else "float"
    dim = store.meta["dim"]
    g = torch.Generator().manual_seed(1)
    feats = [torch.randn(targets, dim, generator=g) for _ in STEPS]
    weights = [1 / len(STEPS)] * len(STEPS)
    base = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM
    start = time.perf_counter()
    scores, sims = score_store(store, feats, STEPS, weights, chunk_rows=chunk_rows, integer=integer)
    scored = time.perf_counter() - start
    k = int(budget * len(scores))
    t0 = time.perf_counter()
    strategies.order("topk", scores, 0)[:k]
    topk = time.perf_counter() - t0
    t0 = time.perf_counter()
    strategies.order("round_robin", scores, 0, sims=sims)[:k]
    rr = time.perf_counter() - t0
    return {"score_s": scored, "topk_s": topk, "round_robin_s": rr, "kernel": kernel,
            "extra_rss_mb": (_status_kib("VmHWM") - base) / 1024, "rss_before_mb": base / 1024}


def measure(root: Path, fmt: str, rows: int, targets: list[int], budget: float, chunk_rows: int,
            float_path: bool = False, kernels: list[str] = ()) -> list[dict]:
    """The store's size and dd read, then one scoring child per target count and variant: the product as
    ``score_store`` chooses it, each of ``kernels`` forced (quantized formats), the float path."""
    size = du(root)
    drop_cache(root)
    nbytes, secs = sequential_read(root)
    cold = nbytes / secs / 1e6
    _, warm_secs = sequential_read(root)  # now cached: what a warm page cache gives
    out = []
    quantized = fmt in QUANTIZED_FORMATS
    variants = [None] + (list(kernels) if quantized else []) + (["float path"] if float_path and quantized else [])
    for t, variant in [(t, v) for t in targets for v in variants]:
        drop_cache(root)
        cmd = [sys.executable, __file__, "--_child", str(root), str(t), str(budget), str(chunk_rows)]
        env = {**os.environ, **({INT_KERNEL_ENV: variant} if variant in INT_KERNELS else {})}
        res = json.loads(subprocess.run(cmd + (["--_float"] if variant == "float path" else []), check=True,
                                        capture_output=True, text=True, env=env).stdout.splitlines()[-1])
        out.append({"format": fmt + (f" ({variant})" if variant else ""), "rows": rows, "targets": t,
                    "size_gb": size / 1e9,
                    "dd_cold_mb_s": cold, "dd_cached_mb_s": nbytes / warm_secs / 1e6,
                    "score_mb_s": nbytes / res["score_s"] / 1e6, "load_avg_1min": os.getloadavg()[0], **res})
        print(json.dumps(out[-1]), flush=True)
    return out


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=8192)
    p.add_argument("--formats", nargs="+", default=["float16", "int8", "int4", "1bit"])
    p.add_argument("--million", nargs="*", default=[], help="formats also measured at 10 x --rows rows")
    p.add_argument("--targets", nargs="+", type=int, default=[8, 64])
    p.add_argument("--budget", type=float, default=0.05)
    p.add_argument("--shard_rows", type=int, default=4096)
    p.add_argument("--chunk_rows", type=int, default=16384)
    p.add_argument("--dir", default="/tmp/hf-less-store-bench")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--float_path", action="store_true",
                   help="also score the quantized stores with their codes unpacked to float32 (integer=False)")
    p.add_argument("--kernels", nargs="*", default=[], choices=INT_KERNELS,
                   help="also score the quantized stores with each of these integer matmul kernels forced "
                        "(HF_LESS_INT_KERNEL); the plain rows use the kernel timed fastest")
    p.add_argument("--_child", nargs=4, default=None, help=argparse.SUPPRESS)
    p.add_argument("--_float", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child:
        root, t, budget, chunk = args._child
        print(json.dumps(child_score(root, int(t), float(budget), int(chunk), False if args._float else None)))
        return []
    base = Path(args.dir)
    if base.exists():
        shutil.rmtree(base)
    results = []
    for fmt in args.formats:
        root = base / f"{fmt}-{args.rows}"
        secs = write_store(root, fmt, args.rows, args.dim, args.shard_rows)
        print(f"# {fmt}: wrote {args.rows} rows x {len(STEPS)} checkpoints in {secs:.1f} s "
              f"({args.rows * len(STEPS) / secs:.0f} rows/s packed and written)", flush=True)
        for r in measure(root, fmt, args.rows, args.targets, args.budget, args.chunk_rows, args.float_path,
                         args.kernels):
            results.append({**r, "write_s": secs})
        if fmt in args.million:
            big = base / f"{fmt}-{10 * args.rows}"
            copy = repeat_store(root, big, 10)
            print(f"# {fmt}: copied to {10 * args.rows} rows in {copy:.1f} s", flush=True)
            results += measure(big, fmt, 10 * args.rows, args.targets, args.budget, args.chunk_rows)
            if not args.keep:
                shutil.rmtree(big)
        if not args.keep:
            shutil.rmtree(root)
    print()
    print("| format | rows | size GB | targets | product | score_store s | topk s | round_robin s | extra RSS MB "
          "| scoring MB/s | dd MB/s (cold) | scoring / dd | load avg |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['format']} | {r['rows']:,} | {r['size_gb']:.2f} | {r['targets']} | {r['kernel']} | "
              f"{r['score_s']:.1f} | {r['topk_s']:.2f} | {r['round_robin_s']:.2f} | {r['extra_rss_mb']:.0f} | {r['score_mb_s']:.0f} | "
              f"{r['dd_cold_mb_s']:.0f} | {r['score_mb_s'] / r['dd_cold_mb_s']:.0%} | {r['load_avg_1min']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
