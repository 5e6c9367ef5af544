"""A streamed pool featurized under torchrun (gloo, CPU); run by tests/integration/test_streaming.py.

    ddp_stream.py OUT WARMUP

Every rank reads the same ``IterableDataset`` and computes its share of each shard. Writes
(rank 0) ``OUT/dataset`` from the pool as a ``Dataset``, ``OUT/stream`` from the stream,
``OUT/resumed`` (a copy of the stream store cut to its first shard, then resumed from the
stream), and ``OUT/refused-rank<r>`` on every rank that refused to resume against a changed stream.
"""

import json
import os
import shutil
import sys

import torch
import torch.distributed as dist
from datasets import Dataset, IterableDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))
from hf_less import LessSelector  # noqa: E402
from hf_less.gradients.store import MANIFEST_FILE, IncompatibleFeaturesError  # noqa: E402
from tests.testing_utils import make_model, make_tokenizer, toy_tasks  # noqa: E402
from teardown import finish  # noqa: E402

POOL = toy_tasks(7, seed=4)[:13]  # 13 rows: shards of 5, 5, 3
TARGETS = [r for r in toy_tasks(3, seed=5) if r["task"] == "math"]


def stream_of(pool) -> IterableDataset:
    def rows():
        for r in pool:
            yield dict(r)
    return IterableDataset.from_generator(rows)


def cut_to_first_shard(src: str, dst: str) -> None:
    """What an interruption after the first shard leaves (rank 0 only; the others wait)."""
    if dist.get_rank() == 0:
        shutil.copytree(src, dst)
        manifest = json.loads(open(os.path.join(dst, MANIFEST_FILE)).read())
        manifest["shards"], manifest["complete"] = manifest["shards"][:1], False
        with open(os.path.join(dst, MANIFEST_FILE), "w") as f:
            json.dump(manifest, f)
    dist.barrier()


def main(out: str, warmup: str) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    tok = make_tokenizer()
    selector = LessSelector(make_model(len(tok)), warmup, TARGETS, tokenizer=tok, proj_dim=32, batch_size=2,
                            show_progress=False)
    kw = dict(shard_rows=5, dtype="float32")
    selector.featurize(Dataset.from_list(POOL), os.path.join(out, "dataset"), **kw)
    stream = os.path.join(out, "stream")
    store = selector.featurize(stream_of(POOL), stream, **kw)
    assert (store is not None) == (rank == 0)

    cut_to_first_shard(stream, os.path.join(out, "resumed"))
    selector.featurize(stream_of(POOL), os.path.join(out, "resumed"), **kw)

    cut_to_first_shard(stream, os.path.join(out, "changed"))
    changed = [dict(r) for r in POOL]
    changed[2]["completion"] += "0"
    try:  # raised on every rank (the main one checks), so none waits for the others
        selector.featurize(stream_of(changed),
                           os.path.join(out, "changed"), **kw)
    except IncompatibleFeaturesError as e:
        with open(os.path.join(out, f"refused-rank{rank}"), "w") as f:
            f.write(str(e))
    finish()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
