"""IFD against a naive two-pass computation; the AlpaGasus judge with a tiny local model and a stub HTTP server."""

from __future__ import annotations

import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset

from hf_less.evaluation.quality import (
    JUDGE_SYSTEM, RATINGS, AlpaGasusScorer, IFDScorer, JudgeRequestError, JudgeResponseError, LocalJudge, OpenAIJudge,
    SuperfilteringScorer, expected_rating, ifd_order, judge_prompt, parse_score, select_by_ifd, select_by_rating,
)
from tests.testing_utils import make_model, toy_tasks


@pytest.fixture(scope="module")
def model(tokenizer):
    return make_model(len(tokenizer), seed=4).eval()


@pytest.fixture(scope="module")
def rows():
    return [{"prompt": r["prompt"], "completion": r["completion"]} for r in toy_tasks(3, seed=5)]


def naive_ifd(model, tokenizer, prompt: str, answer: str) -> float:
    """Two unpadded forwards: the answer after its prompt, and the answer alone after the start token."""
    eos = tokenizer.eos_token_id
    with torch.no_grad():
        p = tokenizer(prompt)["input_ids"]
        full = tokenizer(prompt + answer)["input_ids"] + [eos]
        logits = model(input_ids=torch.tensor([full])).logits[0]
        cond = F.cross_entropy(logits[len(p) - 1:-1], torch.tensor(full[len(p):])).item()
        start = tokenizer("")["input_ids"]
        alone = tokenizer(answer.lstrip())["input_ids"] + [eos]
        logits = model(input_ids=torch.tensor([alone])).logits[0]
        first = max(len(start), 1)  # no start token: the first answer token has nothing to be predicted from
        uncond = F.cross_entropy(logits[first - 1:-1], torch.tensor(alone[first:])).item()
    return cond / uncond


@pytest.mark.parametrize("batch_size,side", [(1, "right"), (5, "left")])
def test_ifd_matches_naive_two_pass(model, tokenizer, rows, batch_size, side):
    tokenizer.padding_side = side
    try:
        scorer = IFDScorer(model, tokenizer, max_length=128, batch_size=batch_size, keep_losses=True)
        scored = Dataset.from_list(rows).map(scorer, batched=True, batch_size=4)
    finally:
        tokenizer.padding_side = "right"
    expected = [naive_ifd(model, tokenizer, r["prompt"], r["completion"]) for r in rows]
    assert scored["ifd"] == pytest.approx(expected, rel=1e-4)
    assert [c / a for c, a in zip(scored["ifd_conditioned"], scored["ifd_answer"])] == pytest.approx(expected, rel=1e-6)


def test_select_by_ifd_drops_above_one_and_keeps_highest():
    ds = Dataset.from_dict({"ifd": [0.5, 1.2, 0.9, float("nan"), 0.7, 1.0], "i": list(range(6))})
    assert ifd_order(ds["ifd"]) == [5, 2, 4, 0]
    assert select_by_ifd(ds, budget=2)["i"] == [5, 2]
    assert select_by_ifd(ds, budget=1.0)["i"] == [5, 2, 4, 0]  # fewer pass the filter than the budget
    with pytest.raises(ValueError, match="IFDScorer"):
        select_by_ifd(ds.remove_columns("ifd"), budget=2)


def test_superfiltering_is_ifd_from_another_model(tokenizer, rows):
    small = make_model(len(tokenizer), seed=7, layers=1, hidden=16).eval()
    got = Dataset.from_list(rows[:3]).map(SuperfilteringScorer(small, tokenizer, max_length=128), batched=True)
    expected = [naive_ifd(small, tokenizer, r["prompt"], r["completion"]) for r in rows[:3]]
    assert got["superfilter_ifd"] == pytest.approx(expected, rel=1e-4)


def test_ifd_refuses_missing_columns(model, tokenizer):
    with pytest.raises(ValueError, match="prompt_column"):
        IFDScorer(model, tokenizer)({"instruction": ["a"], "output": ["b"]})


# -- the judge ------------------------------------------------------------------------------------


def test_parse_score():
    assert parse_score("4.5") == 4.5
    assert parse_score("Rating: 3") == 3.0
    assert parse_score("5/5, excellent") == 5.0
    for bad in ("excellent!", "", "7", "-"):
        with pytest.raises(JudgeResponseError, match="rating|outside"):
            parse_score(bad)


def test_expected_rating():
    lp = torch.log(torch.tensor([[0.0, 0, 0, 0, 0.5, 0.5], [1.0, 0, 0, 0, 0, 0]]) + 1e-30)
    assert expected_rating(lp).tolist() == pytest.approx([4.5, 0.0])
    assert expected_rating(lp, "argmax").tolist() == [4.0, 0.0]


def test_local_judge_scores_ratings_by_loglik(model, tokenizer):
    judge = LocalJudge(model, tokenizer, batch_size=4)
    prompts = [judge_prompt("add 1 2", "3"), judge_prompt("reverse ab", "ba", "extra")]
    lp = judge.option_logprobs(prompts)
    # By hand: the rendered chat prompt, then the rating's single character token.
    for i, p in enumerate(prompts):
        rendered = tokenizer.apply_chat_template(
            [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": p}], tokenize=False,
            add_generation_prompt=True)
        ids = tokenizer(rendered)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1], -1)
        expected = [logp[tokenizer.convert_tokens_to_ids(r)].item() for r in RATINGS]
        assert lp[i].tolist() == pytest.approx(expected, abs=1e-4), rendered
    ratings = Dataset.from_dict({"prompt": ["add 1 2", "reverse ab"], "completion": ["3", "ba"]}).map(
        AlpaGasusScorer(judge), batched=True)["alpagasus_score"]
    assert all(0.0 <= r <= 5.0 for r in ratings)


class _Stub:
    """An OpenAI-compatible /v1/chat/completions stub: answers from a script, counts requests."""

    def __init__(self, script):
        self.script, self.requests, self.bodies = list(script), 0, []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                stub.requests += 1
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.bodies.append((self.path, self.headers.get("Authorization"), body))
                action = stub.script.pop(0) if stub.script else ("ok", "5")
                kind, value = action
                if kind == "sleep":
                    time.sleep(value)
                    kind, value = "ok", "5"
                if kind == "status":
                    self.send_response(value)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    self.wfile.write(b'{"error": "nope"}')
                    return
                reply = {"choices": [{"message": {"role": "assistant", "content": value}}]}
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub():
    made = []

    def make(*script):
        made.append(_Stub(script))
        return made[-1]

    yield make
    for s in made:
        s.close()


def test_openai_judge_good_answers(stub):
    s = stub(("ok", "4.5"), ("ok", "Rating: 2"), ("ok", "5"))
    judge = OpenAIJudge(s.url, "judge-model", api_key="k", backoff=0.0)
    rated = Dataset.from_dict({"prompt": ["a", "b", "c"], "completion": ["x", "y", "z"]}).map(
        AlpaGasusScorer(judge), batched=True)
    assert rated["alpagasus_score"] == [4.5, 2.0, 5.0]
    assert select_by_rating(rated)["prompt"] == ["a", "c"]
    path, auth, body = s.bodies[0]
    assert path == "/v1/chat/completions" and auth == "Bearer k" and body["model"] == "judge-model"
    assert body["messages"][1]["content"] == judge_prompt("a", "x")
    assert s.requests == 3


def test_openai_judge_bad_answer_is_a_clear_error_or_nan(stub):
    s = stub(("ok", "This answer is great!"), ("ok", "I would say 9"))
    judge = OpenAIJudge(s.url, "m", backoff=0.0)
    with pytest.raises(JudgeResponseError, match="no rating"):
        judge(["p"])
    lenient = OpenAIJudge(s.url, "m", backoff=0.0, on_invalid="nan")
    assert math.isnan(lenient(["p"])[0])
    assert s.requests == 2  # a bad answer is not retried


def test_openai_judge_retries_server_errors_then_succeeds(stub):
    s = stub(("status", 500), ("status", 429), ("ok", "3"))
    slept = []
    judge = OpenAIJudge(s.url, "m", max_retries=3, backoff=0.5, sleep=slept.append)
    assert judge(["p"]) == [3.0]
    assert s.requests == 3 and slept == [0.5, 1.0]  # exponential backoff


def test_openai_judge_gives_up_after_retries(stub):
    s = stub(*[("status", 503)] * 10)
    judge = OpenAIJudge(s.url, "m", max_retries=2, backoff=0.0)
    with pytest.raises(JudgeRequestError, match="failed 3 times"):
        judge(["p"])
    assert s.requests == 3


def test_openai_judge_client_errors_are_not_retried(stub):
    s = stub(("status", 401))
    with pytest.raises(JudgeRequestError, match="HTTP 401.*api_key"):
        OpenAIJudge(s.url, "m", max_retries=3, backoff=0.0)(["p"])
    assert s.requests == 1


def test_openai_judge_timeout_is_retried(stub):
    s = stub(("sleep", 1.0), ("ok", "4"))
    judge = OpenAIJudge(s.url, "m", timeout=0.2, max_retries=1, backoff=0.0)
    assert judge(["p"]) == [4.0]
    assert s.requests == 2


def test_openai_judge_rate_limit(stub):
    s = stub()
    judge = OpenAIJudge(s.url, "m", requests_per_minute=300)  # one request every 0.2 s
    start = time.monotonic()
    judge(["a", "b", "c"])
    assert s.requests == 3
    assert time.monotonic() - start >= 0.4 - 0.01  # the 2nd and 3rd request each waited for their slot


def test_openai_judge_unreachable(stub):
    judge = OpenAIJudge("http://127.0.0.1:9/v1", "m", timeout=0.5, max_retries=1, backoff=0.0)
    with pytest.raises(JudgeRequestError, match="failed 2 times"):
        judge(["p"])
