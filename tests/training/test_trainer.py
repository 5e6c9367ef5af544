"""LessSFTTrainer: warmup -> capture -> select -> train, in one call, with real SFTTrainer runs."""

import json
import logging
import shutil
import warnings

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback

from hf_less import LessSelector, LessSFTTrainer
from hf_less.gradients.state import RUN_FILE, find_checkpoints
from hf_less.selection.record import load_pool_scores, load_selection

from tests.testing_utils import POOL, TARGETS, as_format, lora_config, make_model, needs_cxx, trainer_for
from tests.testing_utils import trainer_config as config


class Logs(TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kw):
        self.logs.append(dict(logs))


def dataloader_texts(trainer, tokenizer):
    """What the Trainer's train dataloader actually serves, decoded (padding and specials dropped)."""
    specials = set(tokenizer.all_special_ids)
    texts = []
    for batch in trainer.get_train_dataloader():
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
            toks = tokenizer.convert_ids_to_tokens([int(i) for i, m in zip(ids, mask) if m and int(i) not in specials])
            texts.append("".join(toks))
    return texts


@pytest.fixture(scope="module")
def run(tmp_path_factory, tokenizer):
    """One full train() on prompt/completion data: the run the other tests look at."""
    out = tmp_path_factory.mktemp("less_sft")
    logs = Logs()
    trainer = LessSFTTrainer(make_model(len(tokenizer)), args=config(out), train_dataset=Dataset.from_list(POOL),
                             target_dataset=Dataset.from_list(TARGETS), processing_class=tokenizer,
                             peft_config=lora_config(), callbacks=[logs])
    trainer.train()
    return trainer, logs, out


def test_train_selects_then_trains_on_the_selection_only(run, tokenizer):
    trainer, logs, out = run
    sel = trainer.selected_indices
    assert len(sel) == 4 and len(set(sel)) == 4 and all(0 <= i < len(POOL) for i in sel)
    # the dataloader serves exactly the selected rows (prompt + completion), nothing else
    expected = sorted(POOL[i]["prompt"] + POOL[i]["completion"] for i in sel)
    assert sorted(dataloader_texts(trainer, tokenizer)) == expected
    # the selection is on disk, auditable, with every pool score
    saved = load_selection(out)
    assert saved.indices == sel and saved.strategy == "topk" and saved.budget == 4 and saved.pool_size == 12
    assert [c["step"] for c in saved.checkpoints] == [c.step for c in find_checkpoints(out / "less_warmup")]
    scores = load_pool_scores(out)
    np.testing.assert_allclose(saved.scores, scores[sel])
    assert list(np.argsort(-scores, kind="stable")[:4]) == sel
    # the statistics went through Trainer.log
    stats = [entry for entry in logs.logs if "less/selected" in entry]
    assert stats and stats[0]["less/selected"] == 4 and stats[0]["less/pool_size"] == 12


def test_selection_equals_a_post_hoc_selector_on_the_same_warmup(run, tokenizer):
    trainer, _, out = run
    selector = LessSelector(make_model(len(tokenizer)), out / "less_warmup", Dataset.from_list(TARGETS),
                            tokenizer=tokenizer, proj_dim=64, max_length=64, use_captured=False, show_progress=False)
    scored = Dataset.from_list(POOL).map(selector, batched=True)
    np.testing.assert_allclose(load_pool_scores(out), scored["less_score"], atol=1e-5)
    assert [int(i) for i in selector.order(scored)[:4]] == trainer.selected_indices


def test_the_trained_model_is_the_users_and_the_warmup_a_copy(run, tokenizer):
    trainer, _, _ = run
    lora = {n: p for n, p in trainer.model.named_parameters() if "lora_B" in n}
    assert lora and any(p.abs().sum() > 0 for p in lora.values())  # B starts at 0: training moved it
    assert all(p.shape[1] == 4 for n, p in lora.items())  # the user's r=4 adapter, alone
    assert len(trainer.model.peft_config) == 1


def test_a_second_call_reuses_the_selection_file(run, tokenizer, monkeypatch):
    _, _, out = run

    def no_warmup(*a, **k):
        raise AssertionError("the warmup ran again")

    monkeypatch.setattr(LessSFTTrainer, "_warmup", no_warmup)
    again = LessSFTTrainer(make_model(len(tokenizer)), args=config(out), train_dataset=Dataset.from_list(POOL),
                           target_dataset=Dataset.from_list(TARGETS), processing_class=tokenizer,
                           peft_config=lora_config())
    assert again.select_data() == run[0].selected_indices


@needs_cxx
def test_compile_projection_selects_what_the_eager_projection_selects(run, tokenizer, tmp_path):
    """``less_compile_projection=True``: the capture and the scoring run the compiled row-shift pass; the
    scores are the eager run's to float32 rounding, hence the same selection."""
    trainer, _, out = run
    compiled = trainer_for(tmp_path, tokenizer, less_compile_projection=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="torch.compile of the row-shift projection failed")
        assert compiled.select_data() == trainer.selected_indices
    np.testing.assert_allclose(load_pool_scores(tmp_path), load_pool_scores(out), rtol=0, atol=1e-5)


def test_warmup_dir_is_reused_without_a_new_warmup(run, tokenizer, tmp_path, monkeypatch):
    trainer, _, out = run
    monkeypatch.setattr(LessSFTTrainer, "_warmup", lambda *a, **k: pytest.fail("the warmup ran"))
    reuse = LessSFTTrainer(make_model(len(tokenizer)), args=config(tmp_path, less_warmup_dir=str(out / "less_warmup")),
                           train_dataset=Dataset.from_list(POOL), target_dataset=Dataset.from_list(TARGETS),
                           processing_class=tokenizer, peft_config=lora_config())
    assert reuse.select_data() == trainer.selected_indices
    assert not (tmp_path / "less_warmup").exists()


@pytest.mark.parametrize("fmt", ["messages", "text"])
def test_every_sft_format_runs_end_to_end(tmp_path, tokenizer, fmt):
    trainer = LessSFTTrainer(make_model(len(tokenizer)), args=config(tmp_path, less_budget=0.25),
                             train_dataset=as_format(POOL, fmt), target_dataset=as_format(TARGETS, fmt),
                             processing_class=tokenizer, peft_config=lora_config())
    trainer.train()
    assert len(trainer.selected_indices) == 3
    texts = sorted(dataloader_texts(trainer, tokenizer))
    pool = as_format(POOL, fmt)
    if fmt == "text":
        assert texts == sorted(pool[i]["text"] for i in trainer.selected_indices)
    else:  # the chat template wraps the turns; each selected example's content is there
        for i in trainer.selected_indices:
            user, bot = (m["content"] for m in pool[i]["messages"])
            assert sum(user in t and bot in t for t in texts) == 1


def test_selection_model_selects_and_another_model_trains(tmp_path, tokenizer, run):
    small = tmp_path / "small"
    make_model(len(tokenizer)).save_pretrained(small)
    tokenizer.save_pretrained(small)
    big = make_model(len(tokenizer), seed=7, layers=3, hidden=48)
    before = {n: p.detach().clone() for n, p in big.named_parameters()}
    trainer = LessSFTTrainer(big, args=config(tmp_path / "out", less_selection_model=str(small)),
                             train_dataset=Dataset.from_list(POOL), target_dataset=Dataset.from_list(TARGETS),
                             processing_class=tokenizer, peft_config=lora_config())
    trainer.train()
    # the warmup adapters are the small model's (hidden 32), and its selection is the small model's own
    ckpt = find_checkpoints(tmp_path / "out" / "less_warmup")[0]
    from safetensors.torch import load_file

    shapes = {tuple(v.shape) for k, v in load_file(ckpt.path / "adapter_model.safetensors").items() if "lora_A" in k}
    assert shapes == {(4, 32)}
    assert trainer.selected_indices == run[0].selected_indices  # run[0] selected with the same small model
    after = dict(trainer.model.named_parameters())
    assert any("lora_B" in n and not torch.equal(p, torch.zeros_like(p)) for n, p in after.items())
    assert all(torch.equal(before[n.replace("base_model.model.", "").replace(".base_layer", "")], p)
               for n, p in after.items() if not p.requires_grad and "lora" not in n)


def test_bad_inputs_name_the_fix(tmp_path, tokenizer):
    from trl import SFTConfig

    with pytest.raises(TypeError, match="LessSFTConfig"):
        LessSFTTrainer(make_model(len(tokenizer)), args=SFTConfig(output_dir=str(tmp_path), use_cpu=True),
                       train_dataset=Dataset.from_list(POOL), target_dataset=TARGETS, processing_class=tokenizer)
    with pytest.raises(ValueError, match="target_dataset"):
        LessSFTTrainer(make_model(len(tokenizer)), args=config(tmp_path), train_dataset=Dataset.from_list(POOL),
                       processing_class=tokenizer)


@pytest.mark.parametrize("strategy", ["round_robin", "uot"])
def test_similarity_strategies_select_as_the_selector_does(run, tokenizer, tmp_path, strategy):
    _, _, out = run
    trainer = LessSFTTrainer(make_model(len(tokenizer)),
                             args=config(tmp_path, less_warmup_dir=str(out / "less_warmup"), less_strategy=strategy),
                             train_dataset=Dataset.from_list(POOL), target_dataset=Dataset.from_list(TARGETS),
                             processing_class=tokenizer, peft_config=lora_config())
    chosen = trainer.select_data()
    selector = LessSelector(make_model(len(tokenizer)), out / "less_warmup", Dataset.from_list(TARGETS),
                            tokenizer=tokenizer, proj_dim=64, max_length=64, show_progress=False)
    scored = Dataset.from_list(POOL).map(selector, batched=True)
    assert chosen == [int(i) for i in selector.order(scored, strategy)[:4]]
    assert load_selection(tmp_path).strategy == strategy


def test_a_pool_with_nothing_selectable_is_a_clear_error(run, tokenizer, tmp_path):
    _, _, out = run
    long = [{"prompt": "say " + "x" * 90 + " =", "completion": " ok"} for _ in range(3)]  # cut at 64 tokens
    trainer = LessSFTTrainer(make_model(len(tokenizer)),
                             args=config(tmp_path, less_warmup_dir=str(out / "less_warmup"), less_budget=2,
                                         less_on_empty_completion="skip"),
                             train_dataset=Dataset.from_list(long), target_dataset=Dataset.from_list(TARGETS),
                             processing_class=tokenizer, peft_config=lora_config())
    with pytest.raises(ValueError, match="every one was skipped.*max_length"):
        trainer.select_data()
    assert not (tmp_path / "less_selection.json").exists()


@pytest.mark.parametrize("budget,k", [(1, 1), (1.0, len(POOL)), (0.25, 3)])
def test_trainer_budget_is_a_count_or_a_fraction(run, tokenizer, tmp_path, budget, k):
    """less_budget=1 keeps one example, 1.0 the whole pool: the order is the run's topk order, cut at k."""
    trainer, _, out = run
    again = LessSFTTrainer(make_model(len(tokenizer)),
                           args=config(tmp_path, less_warmup_dir=str(out / "less_warmup"), less_budget=budget),
                           train_dataset=Dataset.from_list(POOL), target_dataset=Dataset.from_list(TARGETS),
                           processing_class=tokenizer, peft_config=lora_config())
    chosen = again.select_data()
    full_order = list(np.argsort(-load_pool_scores(out), kind="stable"))
    assert chosen == full_order[:k]
    assert load_selection(tmp_path).budget == budget and type(load_selection(tmp_path).budget) is type(budget)


# -- stale warmup checkpoints (issue 15, item 3) ---------------------------------------------------------


@pytest.fixture(scope="module")
def warm(tmp_path_factory, tokenizer):
    """One LessSFTTrainer selection with a 2-epoch warmup (2 steps per epoch: checkpoint-2, checkpoint-4)."""
    out = tmp_path_factory.mktemp("warm")
    trainer_for(out, tokenizer).select_data()
    return out


def test_a_rerun_with_fewer_epochs_restarts_the_warmup(warm, tmp_path, tokenizer, caplog):
    out = tmp_path / "out"
    shutil.copytree(warm, out)
    assert [c.step for c in find_checkpoints(out / "less_warmup")] == [2, 4]
    with caplog.at_level(logging.WARNING, logger="hf_less.training.trainer"):
        rerun = trainer_for(out, tokenizer, less_warmup_epochs=1)
        rerun.select_data()
    restart = [r.getMessage() for r in caplog.records if "Restarting the LESS warmup" in r.getMessage()]
    assert len(restart) == 1
    assert "['checkpoint-2', 'checkpoint-4']" in restart[0] and "settings.less_warmup_epochs: 2 -> 1" in restart[0]
    # only the new run's checkpoint is left, and the scores are those of a warmup in a clean directory
    assert [c.step for c in find_checkpoints(out / "less_warmup")] == [2]
    assert json.loads((out / "less_warmup" / RUN_FILE).read_text())["settings"]["less_warmup_epochs"] == 1
    clean = tmp_path / "clean"
    trainer_for(clean, tokenizer, less_warmup_epochs=1).select_data()
    np.testing.assert_allclose(load_pool_scores(out), load_pool_scores(clean), atol=1e-6)
    assert rerun.selected_indices == load_selection(clean).indices
