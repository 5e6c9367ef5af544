"""Featurization and capture under torchrun (gloo, CPU); run by tests/integration/test_distributed.py.

    ddp_featurize.py split OUT      Featurizer(split=True) and LessSelector.featurize on every rank
    ddp_featurize.py capture OUT    a Trainer warmup with LessCallback(pool=..., targets=...)
"""

import os
import sys

import torch
from datasets import Dataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))
from hf_less import LessCallback, LessSelector  # noqa: E402
from hf_less.gradients.featurizer import Featurizer  # noqa: E402
from tests.testing_utils import make_lora_model, make_model, make_tokenizer, toy_tasks  # noqa: E402
from teardown import finish  # noqa: E402

POOL = toy_tasks(7, seed=4)[:13]  # 13 rows: does not divide between 2 processes
TARGETS = [r for r in toy_tasks(3, seed=5) if r["task"] == "math"]


def random_moments(grads, seed=0):
    from hf_less.gradients.per_example import AdamMoments

    g = torch.Generator().manual_seed(seed)
    m = {k: torch.randn(p.shape, generator=g) * 1e-3 for k, (_, p) in zip(grads.keys, grads.params)}
    v = {k: torch.rand(p.shape, generator=g) * 1e-6 for k, (_, p) in zip(grads.keys, grads.params)}
    return AdamMoments(m, v, (0.9, 0.999), 1e-8)


def split(out, warmup):
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    os.makedirs(out, exist_ok=True)
    tok = make_tokenizer()
    model = make_lora_model(tok)
    f = Featurizer(model, tok, 64, batch_size=2, projection_buffer_bytes=2 * 4 * sum(
        p.numel() for p in model.parameters() if p.requires_grad), show_progress=False)
    encoded = f.encode(POOL, "pool")
    feats = f(encoded, random_moments(f.grads), split=True)
    if rank == 0:
        torch.save({"features": feats, "units": len(f.units(encoded))}, os.path.join(out, "split.pt"))
    selector = LessSelector(make_model(len(tok)), warmup, TARGETS, tokenizer=tok, proj_dim=32, batch_size=2,
                            projection_buffer_bytes=1, show_progress=False)
    store = selector.featurize(Dataset.from_list(POOL), os.path.join(out, "store"), shard_rows=5)
    assert (store is not None) == (rank == 0)
    finish()


def capture(out):
    from trl import SFTConfig, SFTTrainer

    tok = make_tokenizer()
    world = int(os.environ.get("WORLD_SIZE", 1))
    args = SFTConfig(output_dir=out, per_device_train_batch_size=4 // world, num_train_epochs=2, learning_rate=2e-3,
                     save_strategy="epoch", report_to=[], use_cpu=True, max_length=64, disable_tqdm=True, seed=0,
                     ddp_backend="gloo" if world > 1 else None, bf16=False)
    cb = LessCallback(pool=POOL, targets=TARGETS, proj_dim=32, batch_size=2, shard_rows=4,
                      projection_buffer_bytes=1, dtype="float32", show_progress=False)
    torch.manual_seed(0)
    from tests.testing_utils import lora_config
    SFTTrainer(make_model(len(tok)), args=args, train_dataset=Dataset.from_list(toy_tasks(4, seed=1)),
               processing_class=tok, peft_config=lora_config(), callbacks=[cb]).train()
    finish()


if __name__ == "__main__":
    if sys.argv[1] == "split":
        split(sys.argv[2], sys.argv[3])
    else:
        capture(sys.argv[2])
