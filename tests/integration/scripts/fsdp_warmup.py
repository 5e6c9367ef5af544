"""LoRA warmups under torchrun (gloo, CPU) with LessCallback, sharded and not; run by tests/integration/test_fsdp.py.

``fsdp_warmup.py MODE OUT``:

- ``ddp``: a Trainer under plain DDP, the reference.
- ``trainer-fsdp``: the same Trainer run with ``fsdp="full_shard"`` (FSDP2 config). On CPU accelerate
  does not shard (it enables FSDP for accelerator devices only) and trains as DDP, so this checks the
  Trainer-side path: FSDP detected from the arguments, moments gathered collectively, adapter copied.
- ``sharded``: real sharding on CPU, which the Trainer cannot give here: the same LoRA model trained
  by hand under FSDP2 (``fully_shard`` on a CPU mesh), FSDP1 with ``use_orig_params=True`` and FSDP1
  with flat parameters, calling LessCallback's hooks as the Trainer does. Beside each, every rank trains
  an unsharded copy on the same global batches (the mean of the per-rank losses, as FSDP averages
  gradients), whose moments rank 0 saves as ``reference-stepN.safetensors``.
"""

import json
import os
import sys

import torch
from datasets import Dataset
from transformers import Trainer, TrainerControl, TrainingArguments

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))
from hf_less import LessCallback  # noqa: E402
from hf_less.data import collate, encode_batch  # noqa: E402
from tests.testing_utils import make_lora_model, make_tokenizer, toy_tasks  # noqa: E402
from teardown import finish  # noqa: E402
from writes import spy_on_writes  # noqa: E402


def main(mode, out):
    rank = int(os.environ.get("RANK", 0))
    spy_on_writes(out)
    tok = make_tokenizer()
    rows = toy_tasks(6)
    enc = encode_batch({"prompt": [r["prompt"] for r in rows], "completion": [r["completion"] for r in rows]}, tok)
    ds = Dataset.from_dict({"input_ids": [e[0] for e in enc], "labels": [e[1] for e in enc]})
    fsdp = {} if mode == "ddp" else {  # trainer-fsdp
        "fsdp": "full_shard", "fsdp_config": {"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}}
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=2, num_train_epochs=2, learning_rate=1e-3,
                             save_strategy="epoch", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
                             ddp_backend="gloo", **fsdp)
    torch.manual_seed(0)
    # the second callback writes elsewhere: under FSDP it copies the Trainer's (gathered) adapter there
    trainer = Trainer(model=make_lora_model(tok), args=args, train_dataset=ds,
                      data_collator=lambda f: collate([(x["input_ids"], x["labels"]) for x in f], 0),
                      callbacks=[LessCallback(), LessCallback(output_dir=os.path.join(out, "copy"))])
    trainer.train()
    if mode == "trainer-fsdp":
        # what the Trainer did with the model on CPU (not sharded: see the module docstring) that the run was sharded: each rank's local piece of each trainable parameter
        from hf_less.gradients.sharded import fsdp_version

        local = {n: list(getattr(q, "_local_tensor", q).shape) for n, q in trainer.model.named_parameters()
                 if q.requires_grad}
        with open(os.path.join(out, f"shards-rank{rank}.json"), "w") as f:
            json.dump({"fsdp_version": fsdp_version(trainer.model), "local_shapes": local}, f)
        capturing = LessCallback(pool=rows[:2], tokenizer=tok)
        try:
            capturing.on_train_begin(args, trainer.state, TrainerControl(), model=trainer.model,
                                     optimizer=trainer.optimizer)
            message = "accepted"
        except ValueError as e:
            message = str(e)
        with open(os.path.join(out, f"capture-rank{rank}.txt"), "w") as f:
            f.write(message)
    finish()


STEPS, SAVE_EVERY, LR = 4, 2, 1e-3


def shard(model, variant: str):
    """``model`` sharded across the 2 processes by ``variant``: fsdp2, fsdp1 or fsdp1-flat."""
    if variant == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (2,))
        for layer in model.base_model.model.model.layers:
            fully_shard(layer, mesh=mesh)
        return fully_shard(model, mesh=mesh)
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import FullyShardedDataParallel

    # peft's policy gives the LoRA layers their own units: a flat parameter cannot mix frozen and trained ones
    return FullyShardedDataParallel(model, device_id=torch.device("cpu"), use_orig_params=variant == "fsdp1",
                                    auto_wrap_policy=fsdp_auto_wrap_policy(model))


def save_adapter(model, reference, ckpt, rank):
    """What the Trainer does before ``on_save`` (with a full state dict): the gathered adapter, on rank 0."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from hf_less.gradients.per_example import parameter_key
    from hf_less.gradients.sharded import clean_name

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))  # a collective
    if rank == 0:
        os.makedirs(ckpt, exist_ok=True)
        save_file({parameter_key(clean_name(k)): v.contiguous() for k, v in full.items() if "lora_" in k},
                  os.path.join(ckpt, "adapter_model.safetensors"))
        reference.peft_config["default"].save_pretrained(ckpt)


def sharded(out):
    import copy
    from types import SimpleNamespace

    import torch.distributed as dist
    from safetensors.torch import save_file
    from transformers import TrainerState

    from hf_less.gradients.per_example import parameter_key
    from hf_less.gradients.sharded import fsdp_version

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    spy_on_writes(out)
    tok = make_tokenizer()
    rows = toy_tasks(8)
    enc = encode_batch({"prompt": [r["prompt"] for r in rows], "completion": [r["completion"] for r in rows]}, tok)

    def batch(step, r):  # the global batch of a step is rows 4*step..4*step+3; rank r takes 2 of them
        return collate([enc[(4 * step + 2 * r + i) % len(enc)] for i in range(2)], 0)

    def loss(model, b):
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss

    for variant in ("fsdp2", "fsdp1", "fsdp1-flat"):
        vout = os.path.join(out, variant)
        os.makedirs(vout, exist_ok=True)
        torch.manual_seed(0)
        reference = make_lora_model(tok)
        model = shard(copy.deepcopy(reference), variant)
        opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=LR)
        ref_opt = torch.optim.AdamW([q for q in reference.parameters() if q.requires_grad], lr=LR)
        args, control = SimpleNamespace(output_dir=vout, fsdp=None), None
        state = TrainerState(is_world_process_zero=rank == 0, is_local_process_zero=rank == 0)
        callback = LessCallback()
        callback.on_train_begin(args, state, control, model=model, optimizer=opt)
        try:
            LessCallback(pool=rows[:2], tokenizer=tok).on_train_begin(args, state, control, model=model, optimizer=opt)
            refusal = "accepted"
        except ValueError as e:
            refusal = str(e)
        local = {n: list(getattr(q, "_local_tensor", q).shape) for n, q in model.named_parameters() if q.requires_grad}
        with open(os.path.join(vout, f"rank{rank}.json"), "w") as f:
            json.dump({"fsdp_version": fsdp_version(model), "local_shapes": local, "capture": refusal}, f)
        for step in range(STEPS):
            loss(model, batch(step, rank)).backward()
            opt.step()
            opt.zero_grad()
            ref_loss = (loss(reference, batch(step, 0)) + loss(reference, batch(step, 1))) / 2
            ref_loss.backward()
            ref_opt.step()
            ref_opt.zero_grad()
            callback.on_optimizer_step(args, state, control, optimizer=opt)
            state.global_step = step + 1
            if state.global_step % SAVE_EVERY == 0:
                save_adapter(model, reference, os.path.join(vout, f"checkpoint-{state.global_step}"), rank)
                callback.on_save(args, state, control, model=model, optimizer=opt)
                if rank == 0:
                    ref = {}
                    for n, q in reference.named_parameters():
                        if q.requires_grad:
                            ref[f"exp_avg.{parameter_key(n)}"] = ref_opt.state[q]["exp_avg"].contiguous()
                            ref[f"exp_avg_sq.{parameter_key(n)}"] = ref_opt.state[q]["exp_avg_sq"].contiguous()
                    save_file(ref, os.path.join(vout, f"reference-step{state.global_step}.safetensors"),
                              metadata={"order": json.dumps([parameter_key(n) for n, q in
                                                             reference.named_parameters() if q.requires_grad])})
    finish()


if __name__ == "__main__":
    if sys.argv[1] == "sharded":
        sharded(sys.argv[2])
    else:
        main(sys.argv[1], sys.argv[2])
