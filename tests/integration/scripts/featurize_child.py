"""Run ``LessSelector.featurize`` in a child process; tests/integration/test_store_crash.py kills it mid-run.

    featurize_child.py WORK STORE [STORE ...] [--slow SECONDS]

WORK holds ``model/`` (base model and tokenizer), ``warmup/`` (LESS checkpoints), ``pool.json`` and
``targets.json`` (lists of rows). Every STORE is featurized in turn with the same arguments
(``featurize(pool, STORE, shard_rows=SHARD_ROWS)``), so a second run of this script on a killed
store resumes it. ``--slow`` sleeps that long before each gradient pass, so that a kill lands
in the middle of the run rather than after it.
"""

import argparse
import json
import os
import sys
import time

import torch

SHARD_ROWS = 3
SETTINGS = dict(proj_dim=64, batch_size=2, max_length=64, show_progress=False)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("work")
    parser.add_argument("stores", nargs="+")
    parser.add_argument("--slow", type=float, default=0.0)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the same BLAS threading in every process: bitwise-equal features

    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_less import LessSelector
    from hf_less.gradients.featurizer import Featurizer

    if args.slow:
        call = Featurizer.__call__

        def slow_call(self, *a, **kw):
            time.sleep(args.slow)
            return call(self, *a, **kw)

        Featurizer.__call__ = slow_call
    work = args.work
    tok = AutoTokenizer.from_pretrained(os.path.join(work, "model"))
    model = AutoModelForCausalLM.from_pretrained(os.path.join(work, "model"))
    with open(os.path.join(work, "pool.json")) as f:
        pool = Dataset.from_list(json.load(f))
    with open(os.path.join(work, "targets.json")) as f:
        targets = json.load(f)
    selector = LessSelector(model, os.path.join(work, "warmup"), targets, tokenizer=tok, **SETTINGS)
    for store in args.stores:
        selector.featurize(pool, store, shard_rows=SHARD_ROWS, dtype="float32")
        print(f"featurized {store}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
