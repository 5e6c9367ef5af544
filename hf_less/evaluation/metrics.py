"""Evaluation on held-out target examples: the target loss LESS is judged by.

``target_loss`` is the mean, over examples, of each example's mean cross-entropy on its completion
tokens (prompt tokens are not scored): the same per-example loss LESS featurizes, so a lower
target loss after training on a selection means the selection helped the target task.

Beside it: the task metric (:func:`mc_accuracy`, multiple-choice accuracy by option log-likelihood for
BIG-bench ``target_scores`` tasks; :func:`exact_match` of greedy answers for generative tasks), the
survey's :func:`sdf` and :func:`pir`, :func:`beside_baselines` (zero-shot and random at the same
budget), and :func:`distance_loss_analysis` (rank correlation of subset distance with target loss).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from ..data import collate, detect_format, encode_batch, pad_token_id, padding_side
from ..gradients.featurizer import Encoded, rows_of
from ..gradients.per_example import eval_mode, per_example_loss, token_nll


def _columns(dataset: Any, start: int, stop: int) -> dict[str, list]:
    """Rows ``[start, stop)`` of a ``datasets.Dataset`` or a list of rows as a dict of columns."""
    if hasattr(dataset, "select") and hasattr(dataset, "column_names"):
        return rows_of(dataset.select(range(start, stop)))
    return rows_of(list(dataset[start:stop]))


def batch_logits(model, tokenizer, encoded: Sequence[Encoded]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits (B, T, V), labels (B, T))`` of one batch, padded as ``tokenizer`` pads, on the model's device."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in collate(encoded, pad_token_id(tokenizer), padding_side(tokenizer)).items()}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"], use_cache=False).logits
    return logits, batch["labels"]


@torch.no_grad()
def per_example_losses(model, tokenizer, dataset, max_length: int | None = 2048, batch_size: int = 8,
                       show_progress: bool = True, desc: str = "target loss") -> torch.Tensor:
    """``(N,)`` per-example completion-token cross-entropy of ``dataset`` (any supported format).

    Examples are batched in their order (padding per batch); positions count real tokens only,
    so padding never changes an example's loss.
    """
    n = len(dataset)
    if n == 0:
        raise ValueError("The evaluation dataset is empty.")
    names = dataset.column_names if hasattr(dataset, "column_names") else list(dataset[0])
    fmt = detect_format(names)
    out = torch.empty(n, dtype=torch.float32)
    bar = tqdm(total=n, desc=desc, unit="ex", disable=not show_progress)
    with eval_mode(model):
        for start in range(0, n, batch_size):
            stop = min(n, start + batch_size)
            encoded = encode_batch(_columns(dataset, start, stop), tokenizer, max_length, fmt)
            out[start:stop] = per_example_loss(*batch_logits(model, tokenizer, encoded)).cpu()
            bar.update(stop - start)
    bar.close()
    return out


def target_loss(model, tokenizer, dataset, max_length: int | None = 2048, batch_size: int = 8,
                show_progress: bool = True) -> float:
    """Mean over examples of the per-example completion-token cross-entropy (nats per token).

    Args:
        model: a causal LM (a base model or a ``PeftModel`` with the trained adapter).
        tokenizer: its tokenizer (``None`` only for pre-tokenized data).
        dataset: held-out target examples in any format hf-less accepts (``prompt`` + ``completion``,
            ``messages``, ``text``, ``input_ids`` + ``labels``).
        max_length: truncation length in tokens; an example left without completion tokens is an error.
        batch_size: examples per forward pass.
    """
    losses = per_example_losses(model, tokenizer, dataset, max_length, batch_size, show_progress)
    value = float(losses.mean())
    if not math.isfinite(value):
        raise ValueError(f"The target loss is not finite ({value}); check the model and the examples.")
    return value


# -- task metrics: multiple-choice accuracy by option log-likelihood, exact match -------------------

def sequence_logprob(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token log-probabilities over each row's scored tokens, and their count.

    Args:
        logits: ``(B, T, V)``.
        labels: ``(B, T)`` aligned with the inputs (shifted here), ``-100`` = not scored.
    Returns:
        ``(sum_logprob (B,), n_tokens (B,))`` in float32 / int64.
    """
    nll, count = token_nll(logits[:, :-1], labels[:, 1:])
    return -nll, count


def option_completion(prompt: str, option: str) -> str:
    """An option as a completion, joined to the prompt the way :mod:`hf_less.cli.bigbench` joins its targets."""
    option = str(option).strip()
    return option if prompt.endswith((" ", "\n")) else " " + option


def mc_grade(option_loglik: Sequence[float], option_scores: Sequence[float]) -> float:
    """BIG-bench's multiple-choice grade of one example: the target score of the most likely option.

    With 0/1 ``target_scores`` this is accuracy (1 when the model's most likely option is a correct one).
    Ties go to the first option, as ``argmax`` does.
    """
    if len(option_loglik) != len(option_scores) or not option_scores:
        raise ValueError(f"{len(option_loglik)} log-likelihoods for {len(option_scores)} options; they must match "
                         "and not be empty.")
    best = max(range(len(option_loglik)), key=lambda i: (option_loglik[i], -i))
    return float(option_scores[best])


@torch.no_grad()
def option_logliks(model, tokenizer, prompts: Sequence[str], options: Sequence[Sequence[str]],
                   max_length: int | None = 2048, batch_size: int = 8, normalize: str = "sum",
                   show_progress: bool = True) -> list[list[float]]:
    """Log-likelihood of every option of every prompt, as the completion after the prompt.

    Each (prompt, option) pair is tokenized exactly like a ``prompt`` / ``completion`` example
    (:func:`hf_less.data.tokenize_example`, end-of-sequence token included), so an option's score is
    minus the loss ``target_loss`` would give it times its token count. ``normalize="mean"`` divides
    by the token count instead (length-normalized).
    """
    if normalize not in ("sum", "mean"):
        raise ValueError(f"normalize={normalize!r}: use 'sum' (BIG-bench's choice) or 'mean' (per token).")
    pairs = [(i, p, option_completion(p, o)) for i, (p, opts) in enumerate(zip(prompts, options)) for o in opts]
    if not pairs:
        raise ValueError("No options to score: the examples have no 'options' (is this a multiple-choice task?).")
    scores: list[float] = []
    bar = tqdm(total=len(pairs), desc="option log-likelihood", unit="opt", disable=not show_progress)
    with eval_mode(model):
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            encoded = encode_batch({"prompt": [c[1] for c in chunk], "completion": [c[2] for c in chunk]},
                                   tokenizer, max_length, "prompt_completion")
            total, count = sequence_logprob(*batch_logits(model, tokenizer, encoded))
            value = total / count if normalize == "mean" else total
            scores.extend(value.cpu().tolist())
            bar.update(len(chunk))
    bar.close()
    out: list[list[float]] = [[] for _ in prompts]
    for (i, _, _), s in zip(pairs, scores):
        out[i].append(float(s))
    return out


def mc_accuracy(model, tokenizer, dataset, max_length: int | None = 2048, batch_size: int = 8,
                normalize: str = "sum", show_progress: bool = True) -> float:
    """Mean multiple-choice grade over ``dataset`` (``prompt``, ``options``, ``option_scores`` columns).

    The model "answers" with the option of highest log-likelihood after the prompt (no generation);
    the example scores that option's BIG-bench ``target_scores`` value (1/0 for most tasks).
    """
    cols = _columns(dataset, 0, len(dataset))
    for c in ("prompt", "options", "option_scores"):
        if c not in cols:
            raise ValueError(f"Multiple-choice accuracy needs a {c!r} column (BIG-bench eval splits have "
                             f"prompt/options/option_scores); got {sorted(cols)}. Use exact_match for generative tasks.")
    empty = [i for i, o in enumerate(cols["options"]) if not o]
    if empty:
        raise ValueError(f"Examples {empty[:10]} have no options: this is not a multiple-choice split; use exact_match.")
    lls = option_logliks(model, tokenizer, cols["prompt"], cols["options"], max_length, batch_size, normalize,
                         show_progress)
    grades = [mc_grade(ll, s) for ll, s in zip(lls, cols["option_scores"])]
    return sum(grades) / len(grades)


def normalize_answer(text: str) -> str:
    """What exact match compares: the first non-empty line, stripped, whitespace collapsed, case kept."""
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    return " ".join(lines[0].split()) if lines else ""


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 32, batch_size: int = 8,
                     show_progress: bool = True) -> list[str]:
    """Greedy completions of ``prompts`` (left-padded batches), decoded without special tokens."""
    device = next(model.parameters()).device
    pad = pad_token_id(tokenizer)
    out: list[str] = []
    bar = tqdm(total=len(prompts), desc="generate", unit="ex", disable=not show_progress)
    with eval_mode(model):
        for start in range(0, len(prompts), batch_size):
            ids = [list(tokenizer(p, add_special_tokens=True)["input_ids"]) for p in prompts[start:start + batch_size]]
            width = max(len(x) for x in ids)
            input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=device)
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
            gen = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
            out.extend(tokenizer.decode(g[width:], skip_special_tokens=True) for g in gen)
            bar.update(len(ids))
    bar.close()
    return out


def exact_match(model, tokenizer, dataset, max_new_tokens: int = 32, batch_size: int = 8,
                show_progress: bool = True) -> float:
    """Share of examples whose greedy answer equals the reference ``completion`` after :func:`normalize_answer`."""
    cols = _columns(dataset, 0, len(dataset))
    if "prompt" not in cols or "completion" not in cols:
        raise ValueError(f"Exact match needs string 'prompt' and 'completion' columns; got {sorted(cols)}.")
    answers = generate_answers(model, tokenizer, cols["prompt"], max_new_tokens, batch_size, show_progress)
    hits = [normalize_answer(a) == normalize_answer(r) for a, r in zip(answers, cols["completion"])]
    return sum(hits) / len(hits)


def is_multiple_choice(dataset) -> bool:
    """True when every example has a non-empty ``options`` list (BIG-bench ``target_scores`` tasks)."""
    names = dataset.column_names if hasattr(dataset, "column_names") else list(dataset[0])
    return "options" in names and all(len(o) > 0 for o in dataset["options"])


def task_metric(model, tokenizer, dataset, max_length: int | None = 2048, batch_size: int = 8,
                max_new_tokens: int = 32, show_progress: bool = True) -> tuple[str, float]:
    """``("mc_accuracy", value)`` for a multiple-choice split, else ``("exact_match", value)``."""
    if is_multiple_choice(dataset):
        return "mc_accuracy", mc_accuracy(model, tokenizer, dataset, max_length, batch_size, show_progress=show_progress)
    return "exact_match", exact_match(model, tokenizer, dataset, max_new_tokens, batch_size, show_progress)


def evaluate_model(model, tokenizer, dataset, max_length: int | None = 2048, batch_size: int = 8,
                   max_new_tokens: int = 32, show_progress: bool = True) -> dict[str, float | str]:
    """Target loss and the task metric of one model on a held-out split: ``{target_loss, metric, value}``."""
    loss = target_loss(model, tokenizer, dataset, max_length, batch_size, show_progress)
    name, value = task_metric(model, tokenizer, dataset, max_length, batch_size, max_new_tokens, show_progress)
    return {"target_loss": loss, "metric": name, "value": value}


# -- survey metrics and baselines -----------------------------------------------------------------


def sdf(selected: int | Sequence[int], pool_size: int) -> float:
    """Selected Dataset Fraction: selected size / pool size (a count or the selected indices)."""
    n = selected if isinstance(selected, int) else len(selected)
    if pool_size <= 0 or not 0 <= n <= pool_size:
        raise ValueError(f"SDF needs 0 <= selected ({n}) <= pool_size ({pool_size}) and a non-empty pool.")
    return n / pool_size


def pir(selected_score: float, full_score: float, higher_is_better: bool = True) -> float:
    """Performance Improvement Ratio: score after training on the selection / score after the full pool.

    For a metric where lower is better (a loss), pass ``higher_is_better=False``: the ratio is
    inverted (full / selected) so that PIR > 1 always means the selection did better than the pool.
    """
    num, den = (selected_score, full_score) if higher_is_better else (full_score, selected_score)
    if den == 0:
        raise ValueError("PIR is undefined: the denominator score is 0 (the full-pool model scored 0, or a 0 loss).")
    return float(num / den)


def beside_baselines(value: float, zero_shot: float, random: float, higher_is_better: bool = False) -> dict[str, Any]:
    """A result beside zero-shot and random-at-the-same-budget: deltas and whether it beat each.

    ``higher_is_better=False`` for losses (the default), ``True`` for accuracy / exact match.
    """
    sign = 1.0 if higher_is_better else -1.0
    return {"value": value, "zero_shot": zero_shot, "random": random,
            "vs_zero_shot": value - zero_shot, "vs_random": value - random,
            "beats_zero_shot": sign * (value - zero_shot) > 0, "beats_random": sign * (value - random) > 0}


# -- distance versus loss -------------------------------------------------------------------------


def rankdata(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks of a 1-D tensor, ties given their average rank (float64)."""
    x = torch.as_tensor(x, dtype=torch.float64).flatten()
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(1, len(x) + 1, dtype=torch.float64)
    for v in torch.unique(x):  # average the ranks of tied values
        tied = x == v
        if int(tied.sum()) > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(x: Sequence[float] | torch.Tensor, y: Sequence[float] | torch.Tensor) -> float:
    """Spearman rank correlation (Pearson correlation of average ranks); NaN when either side is constant."""
    rx, ry = rankdata(torch.as_tensor(x)), rankdata(torch.as_tensor(y))
    if len(rx) != len(ry) or len(rx) < 2:
        raise ValueError(f"Spearman needs two sequences of the same length >= 2, got {len(rx)} and {len(ry)}.")
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = float(rx.norm() * ry.norm())
    return float((rx * ry).sum() / den) if den > 0 else float("nan")


def distance_bins(ordering: Sequence[int], n_bins: int, bin_size: int | None = None) -> list[list[int]]:
    """Cut a selector's ordering (closest to the targets first) into ``n_bins`` consecutive bins.

    With ``bin_size`` each bin has that many rows (bins are spread evenly over the ordering, from
    its head to its tail); without it the whole ordering is split into near-equal parts.
    """
    ordering = [int(i) for i in ordering]
    n = len(ordering)
    if n_bins < 2 or n_bins > n:
        raise ValueError(f"n_bins={n_bins} must be in [2, {n}] (the ordering's length) for a rank correlation.")
    if bin_size is None:
        edges = [round(b * n / n_bins) for b in range(n_bins + 1)]
        return [ordering[edges[b]:edges[b + 1]] for b in range(n_bins)]
    if not 1 <= bin_size <= n // n_bins:
        raise ValueError(f"bin_size={bin_size} must be in [1, {n // n_bins}] so {n_bins} bins fit in {n} rows.")
    starts = [round(b * (n - bin_size) / (n_bins - 1)) for b in range(n_bins)]
    return [ordering[s:s + bin_size] for s in starts]


def distance_loss_analysis(ordering: Sequence[int], distance: Callable[[list[int]], float],
                           train_and_evaluate: Callable[[list[int]], float], n_bins: int = 5,
                           bin_size: int | None = None, show_progress: bool = True) -> dict[str, Any]:
    """Does a subset's distance to the targets predict the target loss after training on it?

    Splits ``ordering`` into bins (:func:`distance_bins`), measures each bin's ``distance`` (e.g.
    ``lambda rows: hf_less.selection.distance.coverage_distance(rows, sims=sims)``), trains on each bin with
    ``train_and_evaluate(rows) -> target loss``, and returns the per-bin values and the Spearman
    correlation of distance with loss (positive: farther subsets give higher loss, as LESS assumes).
    """
    bins = distance_bins(ordering, n_bins, bin_size)
    distances, losses = [], []
    for rows in tqdm(bins, desc="distance bins", disable=not show_progress):
        distances.append(float(distance(rows)))
        losses.append(float(train_and_evaluate(rows)))
    return {"bins": bins, "distances": distances, "losses": losses, "spearman": spearman(distances, losses)}
