"""A warmup under torchrun (gloo, CPU) with LessCallback; run by tests/integration/test_distributed.py."""

import json
import os
import sys

import torch
from datasets import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))
from hf_less import LessCallback  # noqa: E402
from hf_less.data import collate, encode_batch  # noqa: E402
from hf_less.gradients.per_example import parameter_key  # noqa: E402
from tests.testing_utils import make_lora_model, make_tokenizer, toy_tasks  # noqa: E402
from teardown import finish  # noqa: E402
from writes import spy_on_writes  # noqa: E402


class RankSnapshot(TrainerCallback):
    """Each rank writes its own view of the optimizer state, to compare with what rank 0 saved."""

    def on_save(self, args, state, control, model=None, optimizer=None, **kw):
        opt = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
        by_id = {id(p): n for n, p in model.named_parameters()}
        snap = {parameter_key(by_id[id(p)]): opt.state[p]["exp_avg"].sum().item()
                for g in opt.param_groups for p in g["params"]}
        rank = int(os.environ.get("RANK", 0))
        with open(os.path.join(args.output_dir, f"rank{rank}-step{state.global_step}.json"), "w") as f:
            json.dump(snap, f)


def main(out):
    spy_on_writes(out)
    tok = make_tokenizer()
    rows = toy_tasks(6)
    enc = encode_batch({"prompt": [r["prompt"] for r in rows], "completion": [r["completion"] for r in rows]}, tok)
    ds = Dataset.from_dict({"input_ids": [e[0] for e in enc], "labels": [e[1] for e in enc]})
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=2, num_train_epochs=2, learning_rate=1e-3,
                             save_strategy="epoch", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
                             ddp_backend="gloo")
    torch.manual_seed(0)
    trainer = Trainer(model=make_lora_model(tok), args=args, train_dataset=ds,
                      data_collator=lambda f: collate([(x["input_ids"], x["labels"]) for x in f], 0),
                      callbacks=[LessCallback(), RankSnapshot()])
    trainer.train()
    finish()


if __name__ == "__main__":
    main(sys.argv[1])
