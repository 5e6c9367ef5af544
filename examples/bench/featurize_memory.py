"""Peak memory of ``LessSelector.featurize`` as the pool grows: 10^4 vs 10^5 rows, Dataset vs stream.

Each (source, rows) cell runs in a fresh Python process, so the figures are independent: the
child builds a tiny random Llama (1 layer, hidden 16, LoRA r=4 on q/v, a char-level tokenizer),
one warmup checkpoint with random Adam moments, a ``LessSelector`` (proj_dim=64), then featurizes
a pool of short prompt/completion rows (about 16-32 tokens) into a feature store, and reports

- ``peak_rss_mb``: the process's peak resident memory over its whole life
  (``getrusage(RUSAGE_SELF).ru_maxrss``): imports, model, pool and featurization;
- ``featurize_peak_mb``: the peak while featurizing (Linux ``VmHWM`` after ``clear_refs``), minus
  the resident memory just before it;

for two sources of the same rows:

- ``dataset``: an in-memory ``datasets.Dataset`` (Arrow; built in chunks so that no Python list of
  the whole pool exists);
- ``stream``: a ``datasets.IterableDataset.from_generator`` that makes the rows as they are read,
  as ``load_dataset(..., streaming=True)`` would;

and a reference cell, ``tokenized``, that only tokenizes the whole pool into one list, as
``LessCallback`` capture used to hold it for the whole warmup (no gradients).

The model is tiny on purpose: the point is memory, which should not grow with the pool (the
target: peak RSS within 10% from 10^4 to 10^5 rows).

    .venv/bin/python examples/bench/featurize_memory.py                       # 10^4 and 10^5 rows
    .venv/bin/python examples/bench/featurize_memory.py --rows 1000 10000     # a quicker look
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TARGET_GROWTH = 0.10
SOURCES = ("dataset", "stream", "tokenized")


def char_tokenizer():
    """A character-level fast tokenizer built offline (no download)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + list(string.printable))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def rows(n: int, seed: int = 0):
    """``n`` prompt/completion rows of about 16-32 characters (one token per character), made lazily."""
    rng = random.Random(seed)
    letters = string.ascii_lowercase
    for i in range(n):
        prompt = f"{i}: " + "".join(rng.choice(letters) for _ in range(rng.randint(6, 14)))
        yield {"prompt": prompt, "completion": " " + "".join(rng.choice(letters) for _ in range(rng.randint(4, 10)))}


def in_memory_dataset(n: int, chunk: int = 10_000):
    """An in-memory Arrow ``Dataset`` of the rows, built ``chunk`` rows at a time."""
    from datasets import Dataset, concatenate_datasets

    it, parts = rows(n), []
    while True:
        part = [r for _, r in zip(range(chunk), it)]
        if not part:
            break
        parts.append(Dataset.from_dict({k: [r[k] for r in part] for k in part[0]}))
    return concatenate_datasets(parts)


def tiny_warmup(root: Path, tok):
    """A tiny LoRA model and one LESS checkpoint (its adapter, random Adam moments) under ``root``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_less.gradients.state import save_less_state
    from hf_less.gradients.per_example import AdamMoments, parameter_key

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2)
    base = LlamaForCausalLM(config)
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                                           target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # PEFT starts B at 0: randomise it so the gradients w.r.t. A are not all zero
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    ckpt = root / "checkpoint-1"
    lora.save_pretrained(ckpt)
    named = [(parameter_key(n), p) for n, p in lora.named_parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(1)
    m = {k: torch.randn(p.shape, generator=g) * 1e-3 for k, p in named}
    v = {k: torch.rand(p.shape, generator=g) * 1e-6 for k, p in named}
    save_less_state(ckpt, AdamMoments(m, v, (0.9, 0.999), 1e-8), [k for k, _ in named], mean_lr=1e-3,
                    global_step=1, lr_steps=1, optimizer="AdamW")
    return lora


def current_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_since_reset_mb() -> float:
    """``VmHWM``: the peak RSS since the last :func:`reset_peak` (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def child(source: str, n: int, shard_rows: int) -> dict:
    import torch

    torch.set_num_threads(1)  # a shared CPU: one thread, comparable timings
    from datasets import IterableDataset

    from hf_less import LessSelector

    tok = char_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        model = tiny_warmup(Path(tmp) / "warmup", tok)
        targets = list(rows(4, seed=1))
        selector = LessSelector(model, Path(tmp) / "warmup", targets, tokenizer=tok, proj_dim=64, max_length=48,
                                batch_size=64, show_progress=False)
        if source == "dataset":
            pool = in_memory_dataset(n)
        elif source == "stream":
            pool = IterableDataset.from_generator(rows, gen_kwargs={"n": n})
        else:
            pool = None
        resettable = reset_peak()
        before = current_rss_mb()
        t = time.perf_counter()
        if source == "tokenized":  # what capture held before: the whole pool tokenized, for the whole run
            held = selector.featurizer.encode({k: [r[k] for r in rows(n)] for k in ("prompt", "completion")}, "pool")
            assert len(held) == n
            stored = n
        else:
            store = selector.featurize(pool, Path(tmp) / "store", shard_rows=shard_rows)
            stored = store.num_rows
            assert stored == n and store.meta["rows"] == n
        seconds = time.perf_counter() - t
        featurize_peak = peak_since_reset_mb() - before if resettable else float("nan")
    return {"source": source, "rows": n, "seconds": round(seconds, 1), "rows_per_s": round(stored / seconds),
            "rss_before_mb": round(before, 1), "featurize_peak_mb": round(featurize_peak, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def run_cell(source: str, n: int, shard_rows: int) -> dict:
    """One cell in a fresh interpreter: nothing allocated by an earlier cell is counted."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    cmd = [sys.executable, __file__, "--_child", source, str(n), "--shard-rows", str(shard_rows)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{source} x {n} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs=2, default=[10_000, 100_000], metavar=("SMALL", "LARGE"))
    p.add_argument("--sources", nargs="+", default=list(SOURCES), choices=SOURCES)
    p.add_argument("--shard-rows", type=int, default=4096, help="featurize's shard_rows (its default)")
    p.add_argument("--_child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child is not None:
        print(json.dumps(child(args._child[0], int(args._child[1]), args.shard_rows)), flush=True)
        return {}

    small, large = args.rows
    print(f"{'source':<10} {'rows':>8} {'seconds':>8} {'rows/s':>7} {'RSS before':>11} {'featurize peak':>15} "
          f"{'process peak RSS':>17}", flush=True)
    results = {}
    for source in args.sources:
        for n in (small, large):
            r = results[source, n] = run_cell(source, n, args.shard_rows)
            print(f"{source:<10} {n:>8} {r['seconds']:>8} {r['rows_per_s']:>7} {r['rss_before_mb']:>8} MB "
                  f"{r['featurize_peak_mb']:>+12} MB {r['peak_rss_mb']:>14} MB", flush=True)
    print()
    summary = {}
    for source in args.sources:
        a, b = results[source, small], results[source, large]
        growth = b["peak_rss_mb"] / a["peak_rss_mb"] - 1
        verdict = "" if source == "tokenized" else (
            "  [target within 10%: " + ("met" if growth <= TARGET_GROWTH else "MISSED") + "]")
        print(f"{source:<10} process peak RSS {a['peak_rss_mb']} MB -> {b['peak_rss_mb']} MB from {small} to {large} "
              f"rows: {growth:+.1%} (featurize's own peak {a['featurize_peak_mb']:+} -> {b['featurize_peak_mb']:+} MB)"
              f"{verdict}", flush=True)
        summary[source] = {"growth": growth, "small": a, "large": b}
    return summary


if __name__ == "__main__":
    main()
