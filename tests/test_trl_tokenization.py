"""hf-less scores exactly the tokens trl's SFTTrainer trains on, format by format (issue 15, item 8).

The reference is trl itself: a real ``SFTTrainer`` prepares each tiny dataset, and its
``input_ids`` and trained positions (``labels != -100``, or the ``completion_mask`` /
``assistant_masks`` columns on trl versions that build labels in the collator) are compared with
:func:`hf_less.data.encode_batch`. The word-level tokenizer merges a prompt's last word with a
completion that does not start with a space, the case where the tokenized prompt is not a prefix.
"""

from __future__ import annotations

import warnings

import pytest
from datasets import Dataset

from hf_less.data import IGNORE_INDEX, PromptBoundaryWarning, encode_batch, trl_completion_rules

from tests.testing_utils import CHAT_TEMPLATE, make_model, make_tokenizer

# CHAT_TEMPLATE with the assistant turns in a generation block, so trl can return assistant masks;
# it renders exactly the same text.
GENERATION_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{% if m['role'] == 'assistant' %}{% generation %}"
    "{{ m['content'] }}</s>{% endgeneration %}{% else %}{{ m['content'] }}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
# A template whose generation prompt ends with a token the rendered reply does not have (as
# templates that open an empty thinking block do): the conversational prompt is not a prefix.
THINKING_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<assistant> think {% endif %}"
)
WORDS = ["what", "is", "3", "+", "4", "=", "7", "seven", "done", "ok", "say", "hi", "think", ":"]


def word_tokenizer():
    """Whitespace-split words; anything else (e.g. "=7", a prompt's last word merged with the
    completion's first) is <unk>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<user>", "<assistant>", "<system>"]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=["<user>", "<assistant>", "<system>"])
    fast.chat_template = THINKING_TEMPLATE
    return fast


def trl_tokenization(rows, tokenizer, tmp_path, **config):
    """``(input_ids, trained)`` per row as trl's SFTTrainer prepares them (trained: 0/1 per token)."""
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False, max_length=None,
                     disable_tqdm=True, **config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = SFTTrainer(make_model(len(tokenizer)), args=args, train_dataset=Dataset.from_list(rows),
                              processing_class=tokenizer).train_dataset
    out = []
    for row in prepared:
        ids = list(row["input_ids"])
        if "labels" in row:  # trl >= 1.15 builds labels while preparing
            trained = [int(t != IGNORE_INDEX) for t in row["labels"]]
        else:  # older trl: the collator masks with these columns
            trained = [1] * len(ids)
            for column in ("completion_mask", "assistant_masks"):
                if column in row:
                    trained = [a * int(b) for a, b in zip(trained, row[column])]
        out.append((ids, trained))
    return out


def hf_less_tokenization(rows, tokenizer):
    columns = {k: [r[k] for r in rows] for k in rows[0]}
    return [(ids, [int(t != IGNORE_INDEX) for t in labels]) for ids, labels in encode_batch(columns, tokenizer)]


def assert_no_boundary_warning(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("error", PromptBoundaryWarning)
        return fn(*args)


def test_prompt_completion_strings_char_tokenizer(tmp_path):
    tok = make_tokenizer()
    rows = [{"prompt": "what is 3+4 =", "completion": " 7"}, {"prompt": "say hi:", "completion": "hi"},
            {"prompt": "x", "completion": "done</s>"}]  # already ends with EOS: not appended twice
    ours = assert_no_boundary_warning(hf_less_tokenization, rows, tok)
    assert ours == trl_tokenization(rows, tok, tmp_path)
    # independently: the prompt's characters unscored, the completion's characters + one EOS scored
    assert ours[1] == (tok("say hi:hi")["input_ids"] + [tok.eos_token_id], [0] * 7 + [1] * 3)
    assert ours[2][0].count(tok.eos_token_id) == 1


def test_prompt_completion_strings_word_tokenizer_across_the_boundary(tmp_path):
    tok = word_tokenizer()
    rows = [{"prompt": "what is 3 + 4 =", "completion": " 7"},          # a prefix: no warning needed
            {"prompt": "what is 3 + 4 =", "completion": "7"},           # "=7" is one (unknown) word
            {"prompt": "what is 3 + 4 =", "completion": "7 done"},
            {"prompt": "say", "completion": "hi ok"}]                    # "sayhi": <unk>
    assert_no_boundary_warning(hf_less_tokenization, rows[:1], tok)
    with pytest.warns(PromptBoundaryWarning, match="not a prefix.*installed trl's SFTTrainer"):
        ours = hf_less_tokenization(rows, tok)
    assert ours == trl_tokenization(rows, tok, tmp_path)
    # independently, from the words: "what is 3 + 4 =7 </s>" has 7 tokens, the prompt 6, 5 in common
    ids = tok.convert_tokens_to_ids(["what", "is", "3", "+", "4", "<unk>", "</s>"])
    common_prefix = trl_completion_rules().common_prefix
    assert ours[1] == (ids, [0] * 5 + [1, 1] if common_prefix else [0] * 6 + [1])
    assert ours[3][1] == ([1, 1, 1] if common_prefix else [0, 1, 1])  # "sayhi ok </s>": prompt 1 token, 0 in common


def test_conversational_prompt_completion(tmp_path):
    tok = make_tokenizer()
    rows = [{"prompt": [{"role": "user", "content": "3+4"}], "completion": [{"role": "assistant", "content": "7"}]},
            {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
             "completion": [{"role": "assistant", "content": "ok"}]}]
    ours = assert_no_boundary_warning(hf_less_tokenization, rows, tok)
    assert ours == trl_tokenization(rows, tok, tmp_path)
    opener = 1 if trl_completion_rules().generation_prompt else 0  # "<assistant>": prompt from trl 0.24
    assert [t for t, m in zip(*ours[0]) if m] == tok.convert_tokens_to_ids(["<assistant>"][opener:] + ["7", "</s>"])


def test_conversational_prompt_rendered_differently_alone(tmp_path):
    tok = word_tokenizer()  # its generation prompt adds "think", which the rendered reply lacks
    rows = [{"prompt": [{"role": "user", "content": "what is 3 + 4"}],
             "completion": [{"role": "assistant", "content": "seven done"}]}]
    rules = trl_completion_rules()
    if rules.generation_prompt:
        with pytest.warns(PromptBoundaryWarning, match="not a prefix"):
            ours = hf_less_tokenization(rows, tok)
    else:  # trl < 0.24 renders the prompt without the generation prompt: a prefix
        ours = assert_no_boundary_warning(hf_less_tokenization, rows, tok)
    assert ours == trl_tokenization(rows, tok, tmp_path)
    # "<user> what is 3 + 4 </s> <assistant> seven done </s>": the prompt alone ends "<assistant> think"
    scored = tok.convert_ids_to_tokens([t for t, m in zip(*ours[0]) if m])
    expected = {(True, True): ["seven", "done", "</s>"], (True, False): ["done", "</s>"]}
    assert scored == expected.get((rules.generation_prompt, rules.common_prefix),
                                  ["<assistant>", "seven", "done", "</s>"])


def test_messages_score_what_assistant_only_loss_trains(tmp_path):
    tok = make_tokenizer()
    tok.chat_template = GENERATION_TEMPLATE
    assert tok.apply_chat_template([{"role": "user", "content": "q"}], tokenize=False) == \
        make_tokenizer().apply_chat_template([{"role": "user", "content": "q"}], tokenize=False) == "<user>q</s>"
    assert CHAT_TEMPLATE != GENERATION_TEMPLATE
    rows = [{"messages": [{"role": "user", "content": "3+4"}, {"role": "assistant", "content": "7"},
                          {"role": "user", "content": "and 1+1"}, {"role": "assistant", "content": "2"}]},
            {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"},
                          {"role": "assistant", "content": "yo"}]}]
    ours = assert_no_boundary_warning(hf_less_tokenization, rows, tok)
    assert ours == trl_tokenization(rows, tok, tmp_path, assistant_only_loss=True)
    assert tok.convert_ids_to_tokens([t for t, m in zip(*ours[0]) if m]) == ["7", "</s>", "2", "</s>"]


def test_text_scores_every_token_as_trl_trains_them(tmp_path):
    tok = word_tokenizer()
    rows = [{"text": "what is 3 + 4 = 7"}, {"text": "say hi </s>"}, {"text": "ok"}]
    ours = assert_no_boundary_warning(hf_less_tokenization, rows, tok)
    assert ours == trl_tokenization(rows, tok, tmp_path)
    assert ours[2] == (tok.convert_tokens_to_ids(["ok", "</s>"]), [1, 1])


def test_pretokenized_completion_mask_as_trl_trains_it(tmp_path):
    """A 'completion_mask' column is what is scored; trl applies it with completion_only_loss=True
    (its default, None, applies it only to prompt + completion datasets)."""
    tok = word_tokenizer()
    rows = [{"input_ids": [7, 8, 9, 10, 2], "completion_mask": [0, 0, 1, 1, 1]},
            {"input_ids": [11, 12, 2], "completion_mask": [0, 1, 1]}]
    ours = hf_less_tokenization(rows, tok)
    assert ours == trl_tokenization(rows, tok, tmp_path, completion_only_loss=True)
    assert [m for _, m in ours] == [r["completion_mask"] for r in rows]


@pytest.mark.parametrize("version,rules", [("0.20.0", (False, False)), ("0.23.1", (False, False)),
                                           ("0.24.0", (True, False)), ("1.14.2", (True, False)),
                                           ("1.15.0.dev0", (True, True)), ("1.16.0", (True, True))])
def test_rules_follow_the_trl_release(monkeypatch, version, rules):
    """The release boundaries read from trl's sources (generation prompt from 0.24, common prefix from 1.15)."""
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "version", lambda name: version if name == "trl" else None)
    assert tuple(trl_completion_rules.__wrapped__()) == rules
