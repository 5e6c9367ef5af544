"""SFT on the part of a pool that LESS selects for a target task, in one call.

Run it alone, or across processes (featurization is split between them):

    accelerate launch examples/sft_with_less.py \\
        --pool pool.jsonl --targets targets.jsonl --output_dir out \\
        --less_budget 0.05 --less_strategy topk --use_peft --lora_r 16 --num_train_epochs 2
    torchrun --nproc_per_node 2 examples/sft_with_less.py ...      # the same, with torchrun

Every ``LessSFTConfig`` option (all of ``SFTConfig`` plus the ``less_*`` ones) and trl's
``ModelConfig`` options (``--use_peft``, ``--lora_r``, ...) are read from the command line;
``--help`` lists them. ``--pool`` and ``--targets`` take a JSONL/JSON file or a directory written
by ``Dataset.save_to_disk``, in any format SFTTrainer accepts (messages, prompt/completion, text).
Without ``--model_name_or_path`` the embedded SmolLM2-135M-Instruct is used.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser
from trl import ModelConfig, get_peft_config

from hf_less import LessSFTConfig, LessSFTTrainer
from hf_less.cli.models import DEFAULT_MODEL, load_model_and_tokenizer
from hf_less.data import load_dataset_path


@dataclass
class DataArguments:
    pool: str = field(metadata={"help": "The candidate pool: a JSONL/JSON file or a save_to_disk directory."})
    targets: str = field(metadata={"help": "A few examples of the target task, same kinds of path."})


def main():
    parser = HfArgumentParser((DataArguments, LessSFTConfig, ModelConfig))
    data, args, model_args = parser.parse_args_into_dataclasses()
    name = model_args.model_name_or_path or DEFAULT_MODEL
    if name == DEFAULT_MODEL:
        model, tokenizer = load_model_and_tokenizer()
    else:
        model = AutoModelForCausalLM.from_pretrained(name, revision=model_args.model_revision)
        tokenizer = AutoTokenizer.from_pretrained(name, revision=model_args.model_revision)
    trainer = LessSFTTrainer(model, args=args, train_dataset=load_dataset_path(data.pool), target_dataset=load_dataset_path(data.targets),
                             processing_class=tokenizer, peft_config=get_peft_config(model_args))
    trainer.train()
    trainer.save_model()
    if trainer.is_world_process_zero():
        print(json.dumps({"selected": len(trainer.selected_indices), "pool": len(trainer.pool),
                          "first": trainer.selected_indices[:10], "output_dir": args.output_dir}))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # nobody tears down while another process still talks
        if torch.distributed.get_backend() == "gloo":
            # gloo's teardown can hang (pytorch/pytorch#75097) or abort in interpreter finalization
            # ("terminate called without an active exception") after every result is saved: leave
            # without finalization, as the torchrun test scripts do (tests/integration/scripts/teardown.py).
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
