"""hf-less in three steps on SmolLM2-135M-Instruct and a synthetic four-task pool (CPU, minutes).

1. warmup: trl's SFTTrainer trains a LoRA on a random slice of the pool, with LessCallback;
2. score: ``pool.map(selector, batched=True)`` adds ``less_score`` and ``less_sims``;
3. select: the top 10% by LESS, beside a random 10%, and their share of the target task.

    python examples/quickstart.py --output_dir out/quickstart
"""

import argparse
import random
import time

from datasets import Dataset
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

from hf_less import LessCallback, LessSelector
from hf_less.cli.models import load_model_and_tokenizer
from hf_less.training.warmup import warmup_subset

TASKS = {
    "add": lambda r: (f"What is {(a := r.randint(10, 99))} plus {(b := r.randint(10, 99))}?", f"{a + b}"),
    "reverse": lambda r: (f"Reverse the word '{(w := ''.join(r.sample('abcdefghijklmnop', 6)))}'.", w[::-1]),
    "upper": lambda r: (f"Write '{(w := ' '.join(r.sample(['red', 'blue', 'cat', 'sun', 'tree', 'map'], 3)))}' "
                        "in capital letters.", w.upper()),
    "count": lambda r: (f"How many letters are in '{(w := ''.join(r.sample('qrstuvwxyz', r.randint(3, 9))))}'?",
                        f"{len(w)}"),
}


def make_rows(n_per_task, seed):
    rng = random.Random(seed)
    rows = []
    for _ in range(n_per_task):
        for task, make in TASKS.items():
            prompt, answer = make(rng)
            rows.append({"prompt": [{"role": "user", "content": prompt}],
                         "completion": [{"role": "assistant", "content": answer}], "task": task})
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="out/quickstart")
    p.add_argument("--target_task", default="add", choices=sorted(TASKS))
    p.add_argument("--pool_per_task", type=int, default=20)
    p.add_argument("--proj_dim", type=int, default=1024)
    args = p.parse_args()
    t0 = time.time()

    model, tokenizer = load_model_and_tokenizer()
    pool = Dataset.from_list(make_rows(args.pool_per_task, seed=0))
    targets = Dataset.from_list([r for r in make_rows(4, seed=1) if r["task"] == args.target_task])
    warm = warmup_subset(pool, 0.25, seed=0)  # the one warmup rule: a seeded 25% here (LESS: 5%)

    # 1. warmup with the callback: every checkpoint-N/ also gets the LESS state and, with
    #    pool/targets given, their gradient features computed with the model already in memory.
    lora = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      task_type="CAUSAL_LM")
    config = SFTConfig(output_dir=f"{args.output_dir}/warmup", num_train_epochs=2, save_strategy="epoch",
                       per_device_train_batch_size=4, learning_rate=2e-4, lr_scheduler_type="linear",
                       warmup_steps=1, max_length=128, report_to=[], use_cpu=True, logging_steps=5)
    capture = LessCallback(pool=pool.remove_columns("task"), targets=targets.remove_columns("task"),
                           proj_dim=args.proj_dim, max_length=128, batch_size=8)
    SFTTrainer(model, args=config, train_dataset=warm.remove_columns("task"), processing_class=tokenizer,
               peft_config=lora, callbacks=[capture]).train()

    # 2. score the pool with datasets.map: the captured features are found by content, no second pass.
    base, _ = load_model_and_tokenizer()
    selector = LessSelector(base, f"{args.output_dir}/warmup", targets.remove_columns("task"), tokenizer=tokenizer,
                            proj_dim=args.proj_dim, max_length=128, batch_size=8)
    scored = pool.map(selector, batched=True, batch_size=40, desc="LESS scores")

    # 3. select 10% by LESS and at random; compare the target task's share.
    less = selector.select(scored, budget=0.1, strategy="topk")
    rand = selector.select(scored, budget=0.1, strategy="random", seed=0)
    share = lambda d: sum(t == args.target_task for t in d["task"]) / len(d)
    print(f"\ntarget task {args.target_task!r}: {share(pool):.0%} of the pool of {len(pool)}")
    print(f"LESS top-10% ({len(less)} examples): {share(less):.0%} target task")
    print(f"random 10%   ({len(rand)} examples): {share(rand):.0%} target task")
    print("LESS picks:", [t for t in less["task"]])
    print(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
