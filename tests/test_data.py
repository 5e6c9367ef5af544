"""Dataset formats -> (input_ids, labels) with prompt tokens masked."""

import pytest

from hf_less.data import (IGNORE_INDEX, EmptyCompletionError, collate, detect_format, encode_batch,
                          n_scored, tokenize_example, trl_completion_rules)


def test_detect_format():
    assert detect_format(["messages"]) == "messages"
    assert detect_format(["prompt", "completion", "x"]) == "prompt_completion"
    assert detect_format(["text"]) == "text"
    assert detect_format(["input_ids", "labels", "text"]) == "tokenized"
    with pytest.raises(ValueError, match="no 'completion' column"):
        detect_format(["prompt"])
    with pytest.raises(ValueError, match="Unrecognised dataset format.*rename_column"):
        detect_format(["question", "answer"])


def test_prompt_completion_masks_prompt(tokenizer):
    ids, labels = tokenize_example({"prompt": "ab", "completion": "cd"}, tokenizer, "prompt_completion")
    prompt_ids = tokenizer("ab")["input_ids"]
    assert ids[: len(prompt_ids)] == prompt_ids
    assert labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    # completion "cd" then EOS are scored
    assert labels[len(prompt_ids):] == tokenizer.convert_tokens_to_ids(["c", "d"]) + [tokenizer.eos_token_id]


def test_messages_scores_assistant_turns_only(tokenizer):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "x"}, {"role": "assistant", "content": "zz"}]
    ids, labels = tokenize_example({"messages": msgs}, tokenizer, "messages")
    scored = tokenizer.convert_ids_to_tokens([t for t in labels if t != IGNORE_INDEX])
    # each assistant turn: content + end-of-turn; the "<assistant>" opener belongs to the prompt
    assert scored == ["y", "o", "</s>", "z", "z", "</s>"]
    assert len(ids) == len(labels)


def test_conversational_prompt_completion(tokenizer):
    ex = {"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": "a"}]}
    ids, labels = tokenize_example(ex, tokenizer, "prompt_completion")
    # trl < 0.24 renders the prompt without the generation prompt: "<assistant>" is then trained on (and scored)
    opener = [] if trl_completion_rules().generation_prompt else ["<assistant>"]
    assert tokenizer.convert_ids_to_tokens([t for t in labels if t != IGNORE_INDEX]) == opener + ["a", "</s>"]


def test_text_scores_everything(tokenizer):
    ids, labels = tokenize_example({"text": "abc"}, tokenizer, "text")
    assert ids == labels and ids[-1] == tokenizer.eos_token_id


def test_tokenized_with_labels_or_mask():
    ids, labels = tokenize_example({"input_ids": [5, 6, 7], "completion_mask": [0, 1, 1]}, None, "tokenized")
    assert labels == [IGNORE_INDEX, 6, 7]
    ids, labels = tokenize_example({"input_ids": [5, 6, 7], "labels": [-100, -100, 7]}, None, "tokenized")
    assert labels == [-100, -100, 7]
    with pytest.raises(ValueError, match="length"):
        tokenize_example({"input_ids": [5, 6, 7], "labels": [1]}, None, "tokenized")


def test_truncation_that_removes_completion_is_an_error(tokenizer):
    batch = {"prompt": ["a long prompt here", "p"], "completion": ["answer", "q"]}
    assert len(encode_batch(batch, tokenizer, max_length=64)) == 2
    with pytest.raises(EmptyCompletionError, match="Example 0 .*max_length=5"):
        encode_batch(batch, tokenizer, max_length=5)


def test_n_scored_ignores_first_position():
    assert n_scored([3, -100, 4]) == 1


@pytest.mark.parametrize("side", ["left", "right"])
def test_collate_positions_ignore_padding(side):
    batch = collate([([1, 2, 3], [-100, 2, 3]), ([4], [4])], pad_id=0, padding_side=side)
    assert batch["input_ids"].shape == (2, 3)
    row = 1
    real = batch["attention_mask"][row].bool()
    assert batch["input_ids"][row][real].tolist() == [4]
    assert batch["position_ids"][row][real].tolist() == [0]
    assert (batch["labels"][row][~real] == IGNORE_INDEX).all()
    assert batch["position_ids"][0].tolist() == [0, 1, 2]


def test_one_dataset_path_loader_for_the_cli_and_the_examples(tmp_path):
    from datasets import Dataset, DatasetDict

    from hf_less.data import load_dataset_path

    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]
    (tmp_path / "pool.jsonl").write_text("".join(f'{{"prompt": "{r["prompt"]}", "completion": "{r["completion"]}"}}\n'
                                                 for r in rows))
    assert load_dataset_path(tmp_path / "pool.jsonl").to_list() == rows
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    assert load_dataset_path(str(tmp_path / "saved")).to_list() == rows
    DatasetDict(train=Dataset.from_list(rows)).save_to_disk(str(tmp_path / "dict"))
    assert load_dataset_path(tmp_path / "dict").to_list() == rows
    DatasetDict(test=Dataset.from_list(rows)).save_to_disk(str(tmp_path / "no_train"))
    with pytest.raises(ValueError, match="DatasetDict without a 'train' split"):
        load_dataset_path(tmp_path / "no_train")
    with pytest.raises(FileNotFoundError, match="does not exist; give a JSONL file or a datasets.save_to_disk"):
        load_dataset_path(tmp_path / "missing.jsonl")
    (tmp_path / "pool.csv").write_text("prompt,completion\n")
    with pytest.raises(ValueError, match="expected a .jsonl/.json file or a save_to_disk directory"):
        load_dataset_path(tmp_path / "pool.csv")
    import examples.sft_with_less as example  # the example reads its --pool/--targets with the same function

    assert example.load_dataset_path is load_dataset_path
