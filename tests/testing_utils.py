"""What the tests share: a character tokenizer and tiny random models built offline, naive references,
fake warmups and archives, and the torchrun launcher.

Test files (and the scripts the integration tests launch) import their helpers from here, never from
another test file or from a conftest; conftest.py files hold fixtures only.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import signal
import string
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

# -- a character tokenizer and tiny models -------------------------------------------------------------

CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def make_tokenizer():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<user>", "<assistant>", "<system>"]
    vocab = {t: i for i, t in enumerate(specials + list(string.printable))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    # Special tokens are kept whole by add_special_tokens below; everything else splits per character
    # (newlines too).
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=["<user>", "<assistant>", "<system>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_model(vocab_size: int, seed: int = 0, layers: int = 2, hidden: int = 32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.config.name_or_path = f"tiny-llama-seed{seed}"
    return model


def lora_config(r: int = 4, dropout: float = 0.0):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])


def make_lora_model(tokenizer, seed: int = 0, r: int = 4, dropout: float = 0.0, random_b: bool = True):
    """A tiny LoRA model; B is randomised (PEFT starts it at 0) so gradients w.r.t. A are non-zero."""
    from peft import get_peft_model

    model = get_peft_model(make_model(len(tokenizer), seed), lora_config(r, dropout))
    if random_b:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


# -- data ------------------------------------------------------------------------------------------------


def toy_tasks(n_per_task: int = 8, seed: int = 0):
    """Two very different synthetic tasks as prompt/completion rows, with a task column."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n_per_task):
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        rows.append({"prompt": f"add {a} {b} =", "completion": f" {a + b}", "task": "math"})
        word = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(3, 6)))
        rows.append({"prompt": f"reverse {word} :", "completion": f" {word[::-1]}", "task": "reverse"})
    return rows


def encoded_toy_tasks(tokenizer, n_per_task: int = 3):
    """``toy_tasks(n_per_task)`` encoded as (input_ids, labels) pairs."""
    from hf_less.data import encode_batch

    rows = toy_tasks(n_per_task)
    batch = {"prompt": [r["prompt"] for r in rows], "completion": [r["completion"] for r in rows]}
    return encode_batch(batch, tokenizer)


def tokenized_dataset(tokenizer, n=8):
    from datasets import Dataset

    from hf_less.data import encode_batch

    rows = toy_tasks(n)
    enc = encode_batch({"prompt": [r["prompt"] for r in rows], "completion": [r["completion"] for r in rows]},
                       tokenizer)
    return Dataset.from_dict({"input_ids": [e[0] for e in enc], "labels": [e[1] for e in enc]})


def collator(features):
    from hf_less.data import collate

    return collate([(f["input_ids"], f["labels"]) for f in features], pad_id=0)


def as_format(rows, fmt):
    from datasets import Dataset

    if fmt == "prompt_completion":
        return Dataset.from_list(rows)
    if fmt == "messages":
        return Dataset.from_list([{"messages": [{"role": "user", "content": r["prompt"]},
                                                {"role": "assistant", "content": r["completion"]}]} for r in rows])
    return Dataset.from_list([{"text": r["prompt"] + r["completion"]} for r in rows])


# torch.compile on a CPU builds C++ (the compiled row-shift pass): where no compiler is at hand it warns and
# projects eagerly, which tests/gradients/test_projection.py checks; the tests of the compiled code itself skip.
needs_cxx = pytest.mark.skipif(not any(shutil.which(c) for c in (os.environ.get("CXX", "c++"), "g++", "clang++")),
                               reason="torch.compile on a CPU needs a C++ compiler")

POOL = toy_tasks(6, seed=2)  # 12 rows, half of them "math"
TARGETS = [r for r in toy_tasks(4, seed=3) if r["task"] == "math"]  # LessSFTTrainer's tests
FEW_TARGETS = [r for r in toy_tasks(3, seed=3) if r["task"] == "math"]  # the fake warmup's tests (make_work)


# -- naive references ------------------------------------------------------------------------------------


def naive_gradient(model, ids, labels):
    """One unpadded example: loss by hand (mean log-likelihood of completion tokens), autograd."""
    params = [p for p in model.parameters() if p.requires_grad]
    inp = torch.tensor([ids])
    logits = model(input_ids=inp).logits[0].float()
    logp = torch.log_softmax(logits[:-1], -1)
    targets = torch.tensor(labels[1:])
    keep = targets != -100
    loss = -logp[keep].gather(1, targets[keep][:, None]).mean()
    grads = torch.autograd.grad(loss, params)
    return torch.cat([g.reshape(-1) for g in grads])


def naive_adam(g, m, v, b1, b2, eps):
    out = torch.empty_like(g)
    for j in range(g.numel()):  # elementwise, as written in the paper
        mj = b1 * m[j] + (1 - b1) * g[j]
        vj = b2 * v[j] + (1 - b2) * g[j] ** 2
        out[j] = mj / (vj + eps) ** 0.5
    return out


def random_moments(grads, seed=0):
    """Random Adam moments for the parameters of a ``PerExampleGradients``."""
    from hf_less.gradients.per_example import AdamMoments

    g = torch.Generator().manual_seed(seed)
    m = {k: torch.randn(p.shape, generator=g) * 1e-3 for k, (_, p) in zip(grads.keys, grads.params)}
    v = {k: torch.rand(p.shape, generator=g) * 1e-6 for k, (_, p) in zip(grads.keys, grads.params)}
    return AdamMoments(m, v, (0.9, 0.999), 1e-8)


# An independent reference of the projections: the generators written with Python integers (no overflow
# possible).

M32 = 0xFFFFFFFF


def py_mix32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x21F0AAAD) & M32
    x ^= x >> 15
    x = (x * 0x735A2D97) & M32
    return x ^ (x >> 15)


def py_splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & (2**64 - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return z ^ (z >> 31)


def py_key(seed: int, stream: int) -> int:
    return py_splitmix64(py_splitmix64(seed) ^ stream) & M32


def py_hashed(counter: int, key: int) -> int:
    return py_mix32(py_mix32(counter ^ key) ^ (key >> 1))


def py_rademacher(seed: int, row: int, col: int, stream: int = 0) -> float:
    """Entry (row, col) of the unscaled Rademacher matrix, from the documented hash (``stream`` 0)."""
    row_hash = py_hashed(row, py_key(seed, stream))
    word = py_mix32(((row_hash + (col // 32) * 0x9E3779B9) & M32) ^ py_key(seed, stream + 1))
    return 1.0 if (word >> (col % 32)) & 1 else -1.0


def py_rowshift_matrix(P: int, d: int, seed: int) -> torch.Tensor:
    """The row-shift sketch as a dense ``(P, d)`` matrix, built coordinate by coordinate from the documented hash.

    Coordinate ``j`` is column ``c = j mod d`` of row ``k = j div d``; it goes to output ``(c + h_k) mod d``
    with sign ``s_{k,c}``: ``h_k`` the row's hash (stream 2^32) mod d, the signs the Rademacher generator
    on streams 2^32 + 1 and 2^32 + 2.
    """
    S = torch.zeros(P, d, dtype=torch.float64)
    for j in range(P):
        k, c = divmod(j, d)
        h = py_hashed(k, py_key(seed, 2**32)) % d
        S[j, (c + h) % d] = py_rademacher(seed, k, c, stream=2**32 + 1)
    return S


def py_sparse_matrix(P: int, d: int, seed: int, nnz: int) -> torch.Tensor:
    """The sparse projection as a dense ``(P, d)`` matrix, built coordinate by coordinate."""
    S = torch.zeros(P, d, dtype=torch.float64)
    bounds = [k * d // nnz for k in range(nnz + 1)]
    for k in range(nnz):
        key, width = py_key(seed, 2 + k), bounds[k + 1] - bounds[k]
        for j in range(P):
            h = py_hashed(j, key)
            S[j, bounds[k] + (h >> 1) % width] += -1.0 if h & 1 else 1.0
    return S / math.sqrt(nnz)


def dense_matrix(P, d, kind, seed, nnz=4):
    """The whole projection as a ``(P, d)`` matrix (scaled): ``proj(x) == x @ dense_matrix``."""
    from hf_less.gradients.projection import BLOCK_ROWS, projection_block

    if kind == "sparse":
        return py_sparse_matrix(P, d, seed, nnz).float()
    if kind == "rowshift":
        return py_rowshift_matrix(P, d, seed).float()
    blocks = []
    for k in range(math.ceil(P / BLOCK_ROWS)):
        rows = min(BLOCK_ROWS, P - k * BLOCK_ROWS)
        blocks.append(projection_block(kind, seed, k, rows, d))
    return torch.cat(blocks) / math.sqrt(d)


def naive_dequantized(x, fmt: str):
    """What a store of format ``fmt`` should decode ``(n, d)`` float rows to, row by row in float64.

    int8 / int4: codes ``round(x / s)`` (float32, ties to even) with ``s = max|x| / qmax`` (qmax 127 / 7), times ``s``;
    1bit: ``+1 / sqrt(d)`` where ``x > 0``, else ``-1 / sqrt(d)``; float formats: a cast.
    """
    import numpy as np

    if fmt in ("float32", "float16"):
        return np.asarray(x, dtype=fmt)
    out = np.zeros(x.shape, dtype=np.float64)
    for i, row in enumerate(np.asarray(x, dtype=np.float32)):
        if fmt == "1bit":
            out[i] = np.where(row > 0, 1.0, -1.0) / math.sqrt(len(row))
            continue
        qmax = {"int8": 127, "int4": 7}[fmt]
        s = np.float32(np.abs(row).max()) / np.float32(qmax)  # the scale is a float32, the division too
        if s > 0:
            out[i] = np.clip(np.round(row / s), -qmax, qmax).astype(np.float64) * float(s)
    return out.astype(np.float32)


# -- warmups ---------------------------------------------------------------------------------------------


def write_fake_warmup(root, tokenizer, steps=(3, 6)):
    """LESS checkpoints ``root/checkpoint-S`` with distinct adapters and random Adam moments; returns ``root``."""
    from hf_less.gradients.state import save_less_state
    from hf_less.gradients.per_example import AdamMoments, parameter_key

    for i, step in enumerate(steps):
        lora = make_lora_model(tokenizer, seed=i)
        ckpt = root / f"checkpoint-{step}"
        lora.save_pretrained(ckpt)
        g = torch.Generator().manual_seed(10 + i)
        named = [(parameter_key(n), p) for n, p in lora.named_parameters() if p.requires_grad]
        m = {k: torch.randn(p.shape, generator=g) * 1e-3 for k, p in named}
        v = {k: torch.rand(p.shape, generator=g) * 1e-6 for k, p in named}
        save_less_state(ckpt, AdamMoments(m, v, (0.9, 0.999), 1e-8), [k for k, _ in named],
                        mean_lr=1e-3 / (i + 1), global_step=step, lr_steps=3, optimizer="AdamW")
    return root


def run_warmup(out, tokenizer, callback):
    """A 2-epoch LoRA warmup (dropout 0.1) of a tiny model, with ``callback``; same seed every time."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=str(out), per_device_train_batch_size=4, num_train_epochs=2, learning_rate=2e-3,
                     lr_scheduler_type="linear", warmup_steps=1, save_strategy="epoch", report_to=[],
                     use_cpu=True, max_length=64, disable_tqdm=True, seed=0)
    SFTTrainer(make_model(len(tokenizer)), args=args, train_dataset=Dataset.from_list(toy_tasks(6, seed=1)),
               processing_class=tokenizer, peft_config=lora_config(dropout=0.1), callbacks=[callback]).train()
    return out


# -- LessSFTTrainer runs ---------------------------------------------------------------------------------


def trainer_config(out, **kw):
    from hf_less import LessSFTConfig

    base = dict(output_dir=str(out), less_budget=4, less_warmup_fraction=0.5, less_warmup_epochs=2,
                less_warmup_learning_rate=2e-3, less_lora_r=4, less_lora_alpha=8, less_lora_dropout=0.1,
                less_proj_dim=64, less_batch_size=4, less_store_dtype="float32", less_plan=False,
                per_device_train_batch_size=4,
                num_train_epochs=1, learning_rate=1e-3, use_cpu=True, bf16=False, report_to=[], max_length=64,
                disable_tqdm=True, save_strategy="no", seed=0)
    return LessSFTConfig(**{**base, **kw})


def trainer_for(out, tokenizer, model=None, pool=None, **kw):
    """A ``LessSFTTrainer`` on ``POOL`` and ``TARGETS`` with ``trainer_config(out, **kw)``."""
    from datasets import Dataset

    from hf_less import LessSFTTrainer

    return LessSFTTrainer(model if model is not None else make_model(len(tokenizer)), args=trainer_config(out, **kw),
                          train_dataset=pool if pool is not None else Dataset.from_list(POOL),
                          target_dataset=Dataset.from_list(TARGETS), processing_class=tokenizer,
                          peft_config=lora_config())


# -- a fake warmup with a saved model: featurize, resume, refuse -----------------------------------------
# (tests/integration/scripts/featurize_child.py reads the same directory, with the same settings)

STEPS = (3, 6)
SHARD_ROWS = 3  # as in integration/scripts/featurize_child.py: 4 shards of the 12-row pool
SETTINGS = dict(proj_dim=64, batch_size=2, max_length=64, show_progress=False)


def make_work(root, tokenizer):
    """A warmup with two LESS checkpoints (distinct adapters, random Adam moments), saved model, data."""
    make_model(len(tokenizer)).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    write_fake_warmup(root / "warmup", tokenizer, STEPS)
    (root / "pool.json").write_text(json.dumps(POOL))
    (root / "targets.json").write_text(json.dumps(FEW_TARGETS))
    return root


def work_selector(tokenizer, work, targets=FEW_TARGETS, seed=0, **kw):
    from hf_less import LessSelector

    return LessSelector(make_model(len(tokenizer), seed=seed), work / "warmup", targets, tokenizer=tokenizer,
                        **{**SETTINGS, **kw})


def work_config(tmp_path, **kw):
    from hf_less import LessSFTConfig

    return LessSFTConfig(**{**dict(output_dir=str(tmp_path / "out"), less_budget=4, less_proj_dim=32, use_cpu=True,
                                   less_plan=False,
                                   report_to=[], max_length=64, disable_tqdm=True), **kw})


def shard_digests(store) -> list:
    return [({k: f["sha256"] for k, f in s["files"].items()}, s["keys"]["sha256"], s["rows"])
            for s in store.manifest["shards"]]


def interrupt_store(root, keep: int) -> dict:
    """Rewrite the store's manifest as a crash leaves it: the first ``keep`` shards listed, not complete.

    Returns the manifest written."""
    import json

    from hf_less.gradients.store import MANIFEST_FILE

    manifest = json.loads((Path(root) / MANIFEST_FILE).read_text())
    manifest["shards"], manifest["complete"] = manifest["shards"][:keep], False
    (Path(root) / MANIFEST_FILE).write_text(json.dumps(manifest))
    return manifest


def assert_same_store(a, b) -> None:
    """Byte-identical shards (same checksums, same arrays) and nothing else on disk."""
    import numpy as np

    assert a.complete and b.complete and a.num_rows == b.num_rows == len(POOL)
    b.verify()
    assert shard_digests(a) == shard_digests(b)
    for step in a.steps:
        assert np.array_equal(a.features(step).read(0, a.num_rows), b.features(step).read(0, b.num_rows))
    assert np.array_equal(a.keys(), b.keys())
    assert stray_files(b) == []


def stray_files(store) -> list[str]:
    from hf_less.gradients.store import MANIFEST_FILE

    listed = {f["name"] for s in store.manifest["shards"] for f in [*s["files"].values(), s["keys"]]}
    listed |= {"meta.json", MANIFEST_FILE}
    return sorted(p.relative_to(store.root).as_posix() for p in store.root.rglob("*")
                  if p.is_file() and p.relative_to(store.root).as_posix() not in listed)


# -- several processes -----------------------------------------------------------------------------------

SCRIPTS = Path(__file__).parent / "integration" / "scripts"


def torchrun(script, *args, nproc=2, port=29517, timeout=420):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(port), str(SCRIPTS / script), *map(str, args)]  # SCRIPTS / an absolute path is that path
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # the scripts dump every thread's stack on SIGUSR1 (integration/scripts/teardown.py): show where it hangs
        os.killpg(proc.pid, signal.SIGUSR1)
        time.sleep(5)
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{script} did not finish in {timeout} s; stacks and stderr:\n{err[-6000:]}")
    assert proc.returncode == 0, err[-3000:]


def torchrun_nodes(script, node_args, port=29531, timeout=300, expect_success=True) -> list[tuple[int, str]]:
    """Several nodes simulated on this machine: one ``torchrun --nnodes N --node_rank i --rdzv_backend c10d``
    launch per entry of ``node_args`` (that node's script arguments), one process each, gloo on localhost.

    Returns ``(returncode, stderr)`` per node; with ``expect_success`` fails the test unless every node exits 0.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    procs = []
    for rank, args in enumerate(node_args):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(len(node_args)), "--node_rank",
               str(rank), "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"localhost:{port}",
               "--rdzv_id", f"hf-less-{port}", str(SCRIPTS / script), *map(str, args)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      start_new_session=True))
    results = []
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            _, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in procs:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGUSR1)
            time.sleep(5)
            for p in procs:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
            errs = [p.communicate()[1] for p in procs]
            pytest.fail(f"{script} on {len(procs)} nodes did not finish in {timeout} s; stderr:\n"
                        + "\n----\n".join(e[-4000:] for e in errs))
        results.append((proc.returncode, err))
    if expect_success:
        for rank, (rc, err) in enumerate(results):
            assert rc == 0, f"node {rank}: {err[-3000:]}"
    return results


def example_args(tmp_path, tokenizer, out, *extra):
    """Arguments of examples/sft_with_less.py for a tiny model and a 13-row pool (odd: 7 + 6 per process)."""
    from datasets import Dataset

    model_dir = tmp_path / "model"
    if not model_dir.exists():
        make_model(len(tokenizer)).save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        Dataset.from_list(toy_tasks(7, seed=4)[:13]).to_json(tmp_path / "pool.jsonl")
        Dataset.from_list([r for r in toy_tasks(3, seed=5) if r["task"] == "math"]).to_json(tmp_path / "targets.jsonl")
    return ["--model_name_or_path", model_dir, "--pool", tmp_path / "pool.jsonl", "--targets",
            tmp_path / "targets.jsonl", "--output_dir", out, "--less_budget", "5", "--less_proj_dim", "32",
            "--less_batch_size", "2", "--less_store_dtype", "float32", "--per_device_train_batch_size", "2",
            "--num_train_epochs", "1", "--max_length", "64", "--use_cpu", "true", "--bf16", "false",
            "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true", "--use_peft",
            "--lora_r", "4", "--lora_target_modules", "q_proj", "v_proj", *extra]


# -- a fake BIG-bench archive ----------------------------------------------------------------------------

BIGBENCH_ROOT = "bigbench-1.0.0/bigbench/benchmark_tasks"


def _alpha(n=30):  # generative, default prefixes, some list targets
    return {"name": "alpha", "examples": [
        {"input": f"add {i} and {i}", "target": [str(2 * i), "x"] if i % 2 else str(2 * i)} for i in range(n)]}


def _beta(n=30):  # multiple choice with its own prefixes and a task prefix
    return {"name": "beta", "task_prefix": "Pick the larger.\n", "example_input_prefix": "\nPair: ",
            "example_output_prefix": "\nLarger: ", "append_choices_to_input": True,
            "examples": [{"input": f"{i} vs {i + 1}", "target_scores": {str(i): 0, str(i + 1): 1}} for i in range(n)]}


def _gamma_sub(tag, n=12):
    return {"name": tag, "examples": [{"input": f"{tag} word {i}", "target": f"{tag}{i}"} for i in range(n)]}


def make_fake_archive(path, extra=None):
    """A .tar.gz with BIG-bench's layout: top-level tasks, a task with subtasks, and noise."""
    files = {
        f"{BIGBENCH_ROOT}/alpha/task.json": _alpha(),
        f"{BIGBENCH_ROOT}/beta/task.json": _beta(),
        f"{BIGBENCH_ROOT}/gamma/task.json": {"name": "gamma", "examples": []},
        f"{BIGBENCH_ROOT}/gamma/one/task.json": _gamma_sub("one"),
        f"{BIGBENCH_ROOT}/gamma/two/task.json": _gamma_sub("two"),
        f"{BIGBENCH_ROOT}/delta/task.json": {"name": "delta", "examples": [
            {"input": "long " * 200, "target": "y"}] + [{"input": f"d{i}", "target": f"e{i}"} for i in range(20)]},
        **(extra or {}),
    }
    with tarfile.open(path, "w:gz") as tf:
        for name, content in files.items():
            data = json.dumps(content).encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        readme = b"not a task"
        info = tarfile.TarInfo("bigbench-1.0.0/README.md")
        info.size = len(readme)
        tf.addfile(info, io.BytesIO(readme))
    return path
