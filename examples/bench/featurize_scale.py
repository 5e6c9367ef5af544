"""Featurization cost as the model grows: per example, against a LoRA training step, per projection kind.

For Llama-shaped models of growing depth (random weights from a config: nothing is downloaded),
LoRA on q/k/v/o, the same pre-tokenized examples everywhere, it prints per example:

- ``train``: a LoRA training step (forward + backward + AdamW) on batches of ``--batch-size``;
- ``featurize``: ``Featurizer`` on the whole pool (Adam directions at one checkpoint, projected,
  normalised), warm (the projector's caches filled by an earlier pass, as over a pool);
- ``cold``: the same pool through a fresh featurizer (first call: hashes, caches or matrix blocks
  built; the process itself already warmed up, as the training step is);
- ``map``: the pool in ``datasets.map``-sized batches (one featurizer call per batch, as
  ``pool.map(selector, batched=True, batch_size=8)`` makes them without captured features);
- ``noproj``: the same featurization with the projection replaced by nothing (zeros): the floor
  that the forward, the backward, the per-example gradients and the Adam direction cost;
- ``proj``: the projection's share of ``featurize``, ``1 - noproj / featurize``; ``peak``: peak
  memory (CUDA: allocated; CPU: the process's peak RSS so far); ``batch``: the featurizer's batch
  size (``--feat-batch-size auto`` lets it choose on CUDA).

and the ratios ``featurize / train`` against the targets (issue 22: the default kind <= 1.0x a
training step with the projection <= 10% of featurization, the dense kind <= 3x; a pool of several
units no dearer per example than the small pool; issue 14: growing by at most 1.3x from the
shallowest to the deepest model). Times are CUDA events on a GPU, wall time on a CPU. Training and
featurization alternate in rounds so a shared, noisy machine affects both alike: compare ratios,
not absolute figures across runs.

    # CPU, the issue's setting: hidden 2048, intermediate 5632, r=64, 1 and 8 layers, 32 x 64 tokens, d=8192
    .venv/bin/python examples/bench/featurize_scale.py
    .venv/bin/python examples/bench/featurize_scale.py --layers 1 --kinds sparse --quick   # a smoke run
    # CUDA: the Llama-2-7B shape (32 layers, hidden 4096, r=128, d=8192), 371-token examples
    python examples/bench/featurize_scale.py --preset llama2-7b
    # where the time goes: phases and top operators (torch.profiler) of one featurization of 16 examples
    .venv/bin/python examples/bench/featurize_scale.py --layers 1 --kinds rowshift --profile 16
    # any local model directory (LoRA added on q/k/v/o)
    .venv/bin/python examples/bench/featurize_scale.py --model /path/to/model
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from featurize_speed import make_examples, rss_mb  # noqa: E402 - the same examples and RSS reading

from hf_less.gradients.projection import DEFAULT_KIND, KINDS  # noqa: E402

# The row-shift kind with its torch.compile'd pass (Featurizer(compile_projection=True)), measured as a kind.
COMPILED = "rowshift-compiled"
# featurize / train per kind (issue 22: the default kind 1.0, the dense kind 3.0; others as issue 14 had them).
RATIO_TARGETS = {DEFAULT_KIND: 1.0, COMPILED: 1.0, "rademacher": 3.0}
TARGETS = {"ratio": 1.5, "growth": 1.3, "big_pool": 1.0, "projection_share": 0.10}
PRESETS = {
    # name: (layers, hidden, intermediate, heads, rank, tokens, examples)
    "issue14-cpu": ([1, 8], 2048, 5632, 32, 64, 64, 32),
    "llama2-7b": ([32], 4096, 11008, 32, 128, 371, 64),
    # SmolLM2-135M's shape (vocabulary 49,152; 9 heads, 3 key/value heads in the real model) with random
    # weights, LoRA r=8 as in featurize_speed.py: where the model itself is not at hand (a GPU machine).
    "smollm2-135m": ([30], 576, 1536, 9, 8, 128, 64),
}
PRESET_VOCAB = {"smollm2-135m": 49152}


def featurizer_for(model, kind: str, dim: int | None, batch_size):
    """A ``Featurizer`` of ``kind`` (one of KINDS, or COMPILED)."""
    from hf_less.gradients.featurizer import Featurizer

    compiled = kind == COMPILED
    return Featurizer(model, None, dim, proj_kind="rowshift" if compiled else kind, batch_size=batch_size,
                      show_progress=False, compile_projection=compiled)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="a model shape (default: issue14-cpu on a CPU, llama2-7b on CUDA)")
    p.add_argument("--layers", type=int, nargs="+", help="depths to measure (overrides the preset)")
    p.add_argument("--hidden", type=int)
    p.add_argument("--intermediate", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--rank", type=int, help="LoRA r (alpha = 2r) on q/k/v/o")
    p.add_argument("--tokens", type=int, help="tokens per example (half prompt, half completion)")
    p.add_argument("--examples", type=int, help="pool examples per round")
    p.add_argument("--big-pool", type=int, default=256,
                   help="rows of the several-unit pool measured at the deepest model (0: skip)")
    p.add_argument("--dim", type=int, default=8192)
    p.add_argument("--kinds", nargs="+", default=["rowshift", "sparse", "rademacher"], choices=[*KINDS, COMPILED],
                   help=f"projection kinds; {COMPILED!r}: the row-shift kind with compile_projection=True")
    p.add_argument("--batch-size", type=int, default=8, help="training batch (and featurization batch by default)")
    p.add_argument("--feat-batch-size", default=None,
                   help="featurization batch: an int, or 'auto' (the largest that fits, on CUDA); default --batch-size")
    p.add_argument("--rounds", type=int, default=2, help="alternating train / featurize rounds")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary size (default 32,000, or the preset's)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="model weights (default: float32 on a CPU, bfloat16 on CUDA)")
    p.add_argument("--model", default=None, help="a local model directory instead of random Llama shapes")
    p.add_argument("--agreement", action="store_true",
                   help="at the shallowest depth, also compare each kind's cosines and top-25%% with exact features")
    p.add_argument("--quick", action="store_true", help="8 examples, 1 round, no big pool: a smoke run")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after the first kind's timings, profile one featurization of N examples (torch.profiler): "
                        "seconds per phase (forward, backward, per-example gradients, Adam direction and projection) "
                        "and the top operators")
    p.add_argument("--json", type=Path, default=None, help="write the figures here as JSON")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    preset = PRESETS[args.preset or ("llama2-7b" if cuda else "issue14-cpu")]
    for name, value in zip(("layers", "hidden", "intermediate", "heads", "rank", "tokens", "examples"), preset):
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.vocab is None:
        args.vocab = PRESET_VOCAB.get(args.preset, 32000)
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    if args.quick:
        args.examples, args.rounds, args.big_pool = 8, 1, 0
    fb = args.feat_batch_size
    args.feat_batch_size = args.batch_size if fb is None else (fb if fb == "auto" else int(fb))
    return args


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: CUDA allocations, or the process's peak RSS on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return rss_mb()


def build_model(args, layers: int, device: torch.device):
    """A LoRA model: random Llama weights of the given depth (or ``--model``), B randomised."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    if args.model:
        base = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    else:
        config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                             num_hidden_layers=layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                             max_position_embeddings=4096, tie_word_embeddings=False)
        with torch.device(device):
            base = LlamaForCausalLM(config).to(dtype)
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = get_peft_model(base.to(device), lora)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a warmed-up adapter: B != 0, so gradients w.r.t. A are non-zero too
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_((torch.randn(p.shape, generator=g) * 0.01).to(p.device, p.dtype))
    return model


class Timer:
    """Seconds between ``start()`` and ``stop()``: CUDA events on a GPU (the device's own clock), else wall time."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def start(self) -> "Timer":
        if self.cuda:
            self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            self._events[0].record()
        else:
            self._t = time.perf_counter()
        return self

    def stop(self) -> float:
        if self.cuda:
            self._events[1].record()
            self._events[1].synchronize()
            return self._events[0].elapsed_time(self._events[1]) / 1000
        return time.perf_counter() - self._t


def train_seconds(model, examples, batch_size: int, optimizer) -> float:
    """Seconds of LoRA training steps (forward, backward, AdamW) over ``examples``."""
    device = next(model.parameters()).device
    model.train()
    sync(device)
    timer = Timer(device).start()
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        ids = torch.tensor([e[0] for e in chunk], device=device)
        labels = torch.tensor([e[1] for e in chunk], device=device)
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return timer.stop()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def adam_moments(model, optimizer, keys):
    """The optimizer's moments keyed as the featurizer keys parameters (after one training pass)."""
    from hf_less.gradients.per_example import AdamMoments

    params = [p for p in model.parameters() if p.requires_grad]
    m = {k: optimizer.state[p]["exp_avg"].detach().clone() for k, p in zip(keys, params)}
    v = {k: optimizer.state[p]["exp_avg_sq"].detach().clone() for k, p in zip(keys, params)}
    return AdamMoments(m, v, (0.9, 0.999), 1e-8)


@contextlib.contextmanager
def without_projection(projector):
    """Replace the projection by zeros of the right shape: featurization's cost without it.

    Pool examples still get their Adam direction (eagerly, also for the compiled kind): what is
    left out is the projection alone.
    """
    from hf_less.gradients.per_example import adam_direction

    def project(x, offset=0):
        return torch.zeros((x.shape[0], projector.proj_dim), device=x.device, dtype=torch.float32)

    def project_adam(g, exp_avg, exp_avg_sq, betas, eps, offset=0):
        return project(adam_direction(g, exp_avg, exp_avg_sq, betas, eps))

    projector.project, projector.project_adam = project, project_adam
    try:
        yield
    finally:
        del projector.project, projector.project_adam  # the class's methods again


# The featurizer's phases as it names them for torch.profiler (hf_less.gradients.per_example / featurizer).
PHASES = ("hf_less.forward", "hf_less.backward", "hf_less.per_example_gradient", "hf_less.adam_and_projection",
          "hf_less.adam_direction", "hf_less.projection")


def profile_phases(featurizer, examples, moments, device: torch.device, top: int = 15) -> dict:
    """One featurization of ``examples`` under ``torch.profiler``: seconds per phase and the top operators.

    ``{"phases": {name: {"cpu_s", "device_s"}}, "table": str}``: CPU time of each phase's range, and on CUDA
    the time of the kernels launched inside it; the table lists the operators of most self time.
    """
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    featurizer(examples, moments)  # warm: the profiled call is a steady one
    sync(device)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        featurizer(examples, moments)
        sync(device)
    events = prof.key_averages()

    def device_s(e) -> float:
        return (getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)) / 1e6

    phases = {e.key: {"cpu_s": e.cpu_time_total / 1e6, "device_s": device_s(e) if cuda else None}
              for e in events if e.key in PHASES}
    table = ""
    for sort in (("self_device_time_total", "self_cuda_time_total") if cuda else ("self_cpu_time_total",)):
        try:
            table = events.table(sort_by=sort, row_limit=top)
            break
        except (AttributeError, KeyError, ValueError):  # the key's name in older/newer torch
            continue
    return {"examples": len(examples), "phases": phases, "table": table}


def format_profile(kind: str, p: dict) -> str:
    lines = [f"profile of {kind}, one featurization of {p['examples']} examples (seconds; device: the kernels "
             "launched inside the phase):"]
    for name in PHASES:
        if name in p["phases"]:
            t = p["phases"][name]
            dev = "" if t["device_s"] is None else f", device {t['device_s']:.4f}"
            lines.append(f"  {name:32s} cpu {t['cpu_s']:.4f}{dev}")
    return "\n".join(lines + [p["table"]])


def featurize_seconds(featurizer, examples, moments, batch: int | None = None) -> float:
    """Seconds of featurizing ``examples`` (in calls of ``batch`` rows when given, as map does)."""
    device = featurizer.device
    sync(device)
    timer = Timer(device).start()
    step = batch or len(examples)
    for i in range(0, len(examples), step):
        featurizer(examples[i : i + step], moments)
    return timer.stop()


def agreement(model, pool, moments, args) -> list[dict]:
    """Each kind's LESS similarities against the exact (unprojected) ones on the same examples.

    Pool features are Adam directions, targets (8 other examples) plain gradients, as in LESS; the
    score is the mean similarity over the targets and the selection its top 25%.
    """
    targets = make_examples(8, args.tokens, args.vocab, seed=2)
    k = max(1, len(pool) // 4)

    def sims(kind, dim):
        f = featurizer_for(model, kind, dim, args.batch_size)
        return f(pool, moments) @ f(targets).T  # rows are L2-normalised: cosines

    exact = sims("sparse", None)
    top = set(exact.mean(1).topk(k).indices.tolist())
    out = []
    for kind in args.kinds:
        s = sims(kind, args.dim)
        row = {"kind": kind, "max_abs_cos_error": float((s - exact).abs().max()),
               "top25_overlap_with_exact": len(top & set(s.mean(1).topk(k).indices.tolist())) / k,
               "score_spearman": spearman(s.mean(1), exact.mean(1))}
        print(f"agreement {kind:>10}: max |cos - exact| {row['max_abs_cos_error']:.4f} (1/sqrt(d) = "
              f"{args.dim ** -0.5:.4f}); top-25% overlap with exact {row['top25_overlap_with_exact']:.0%}; "
              f"score Spearman {row['score_spearman']:.3f}", flush=True)
        out.append(row)
    return out


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def measure_depth(args, layers: int, device: torch.device) -> list[dict]:
    from hf_less.gradients.featurizer import Featurizer

    model = build_model(args, layers, device)
    pool = make_examples(args.examples, args.tokens, args.vocab)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    train_seconds(model, pool[: args.batch_size], args.batch_size, optimizer)  # warm-up; creates the moments
    probe = Featurizer(model, None, None, batch_size=args.batch_size, show_progress=False)
    P = probe.grads.dim
    moments = adam_moments(model, optimizer, probe.grads.keys)
    # The process's own warm-up (allocator, kernels), as the training warm-up step above: a first
    # featurization pays it whatever the featurizer, so "cold" below measures the featurizer's alone.
    probe(pool[: args.batch_size], moments)
    del probe
    rows = []
    if args.agreement and layers == min(args.layers):
        args.agreement_rows = agreement(model, pool, moments, args)
    for kind in args.kinds:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        featurizer = featurizer_for(model, kind, args.dim, args.feat_batch_size)
        t_cold = featurize_seconds(featurizer, pool, moments)
        train_s = feat_s = map_s = bare_s = 0.0
        for _ in range(args.rounds):
            train_s += train_seconds(model, pool, args.batch_size, optimizer)
            feat_s += featurize_seconds(featurizer, pool, moments)
            with without_projection(featurizer.projector):
                bare_s += featurize_seconds(featurizer, pool, moments)
            map_s += featurize_seconds(featurizer, pool, moments, batch=args.batch_size)
        n = args.examples * args.rounds
        row = {"layers": layers, "P": P, "kind": kind, "train_s_ex": train_s / n, "featurize_s_ex": feat_s / n,
               "noproj_s_ex": bare_s / n, "cold_s_ex": t_cold / args.examples, "map_s_ex": map_s / n,
               "projection_share": max(0.0, 1 - bare_s / feat_s), "peak_mb": peak_memory_mb(device),
               "feat_batch_size": featurizer.batch_size}
        row["ratio"] = row["featurize_s_ex"] / row["train_s_ex"]
        row["cold_ratio"] = row["cold_s_ex"] / row["train_s_ex"]
        row["map_ratio"] = row["map_s_ex"] / row["train_s_ex"]
        if args.big_pool and layers == max(args.layers):
            big = make_examples(args.big_pool, args.tokens, args.vocab, seed=1)
            fresh = featurizer_for(model, kind, args.dim, args.feat_batch_size)
            row["big_pool_rows"] = args.big_pool
            row["big_pool_s_ex"] = featurize_seconds(fresh, big, moments) / args.big_pool
            row["big_pool_vs_small"] = row["big_pool_s_ex"] / row["featurize_s_ex"]
        print(format_row(row), flush=True)
        if args.profile and kind == args.kinds[0]:
            try:
                profiled = profile_phases(featurizer, pool[: args.profile], moments, device)
                print(format_profile(kind, profiled), flush=True)
                row["profile"] = {k: v for k, v in profiled.items() if k != "table"}
            except Exception as e:  # noqa: BLE001 - a profiler that cannot run (no CUPTI) must not cost the timings
                print(f"profile of {kind} failed: {type(e).__name__}: {e}", flush=True)
        rows.append(row)
        del featurizer
    del model, optimizer, moments
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


HEADER = (f"{'layers':>6} {'P':>11} {'kind':>17} {'train s/ex':>10} {'feat s/ex':>9} {'noproj':>9} {'ratio':>6} "
          f"{'cold':>6} {'map':>6} {'proj':>5} {'peak MB':>8} {'batch':>5}  several units")


def format_row(r: dict) -> str:
    big = (f"{r['big_pool_rows']} rows, fresh featurizer: {r['big_pool_s_ex']:.3f} s/ex ({r['big_pool_vs_small']:.2f}x "
           f"the small pool's)") if "big_pool_rows" in r else ""
    return (f"{r['layers']:>6} {r['P']:>11,} {r['kind']:>17} {r['train_s_ex']:>10.3f} {r['featurize_s_ex']:>9.3f} "
            f"{r['noproj_s_ex']:>9.3f} {r['ratio']:>6.2f} {r['cold_ratio']:>6.2f} {r['map_ratio']:>6.2f} "
            f"{r['projection_share']:>5.0%} {r['peak_mb']:>8.0f} {r['feat_batch_size']:>5}  {big}")


def verdict(rows: list[dict], args) -> list[str]:
    """The issue's targets, per projection kind."""
    lines = []
    for kind in args.kinds:
        mine = sorted((r for r in rows if r["kind"] == kind), key=lambda r: r["layers"])
        worst = max(r["ratio"] for r in mine)
        target = RATIO_TARGETS.get(kind, TARGETS["ratio"])
        line = f"{kind}: featurize / train at most {worst:.2f} [target <= {target}] {'met' if worst <= target else 'MISSED'}"
        share = max(r["projection_share"] for r in mine)
        if kind in (DEFAULT_KIND, COMPILED):
            line += (f"; projection share at most {share:.0%} [target <= {TARGETS['projection_share']:.0%}] "
                     f"{'met' if share <= TARGETS['projection_share'] else 'MISSED'}")
        if len(mine) > 1:
            growth = mine[-1]["ratio"] / mine[0]["ratio"]
            line += (f"; growth {mine[0]['layers']} -> {mine[-1]['layers']} layers {growth:.2f}x "
                     f"[target <= {TARGETS['growth']}] {'met' if growth <= TARGETS['growth'] else 'MISSED'}")
        big = [r for r in mine if "big_pool_vs_small" in r]
        if big:
            b = big[-1]["big_pool_vs_small"]
            line += f"; several units {b:.2f}x the small pool [target <= {TARGETS['big_pool']}, 5% noise] " \
                    f"{'met' if b <= TARGETS['big_pool'] * 1.05 else 'MISSED'}"
        lines.append(line)
    return lines


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    print(f"{card}; {args.dtype} weights; Llama hidden {args.hidden}, intermediate {args.intermediate}, "
          f"LoRA r={args.rank} q/k/v/o; {args.examples} x {args.tokens} tokens; d={args.dim}; batch {args.batch_size}; "
          f"{args.rounds} rounds")
    print("ratio = featurize / train per example (warm); cold = first pass of a fresh featurizer; "
          f"map = calls of {args.batch_size} rows")
    print(HEADER)
    rows = []
    for layers in args.layers:
        rows += measure_depth(args, layers, device)
    lines = verdict(rows, args)
    print("\n".join(lines))
    res = {"device": card, "date": datetime.date.today().isoformat(), "command": " ".join(["python", *sys.argv]),
           "settings": {k: v for k, v in vars(args).items() if k not in ("json", "agreement_rows")}, "rows": rows,
           "agreement": getattr(args, "agreement_rows", None), "verdict": lines}
    if args.json:
        args.json.write_text(json.dumps(res, indent=2, default=str))
    return res


if __name__ == "__main__":
    main()
