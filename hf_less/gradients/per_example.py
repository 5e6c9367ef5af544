"""Per-example LoRA gradient features (the paper's g and Gamma).

For each example z the loss is the mean cross-entropy over z's completion tokens (never a
padded-batch mean), and the gradient is taken w.r.t. the trainable (LoRA) parameters only.
Pool examples get the Adam direction ``Gamma = m' / sqrt(v' + eps)`` built from a
checkpoint's moments; target examples keep the plain gradient ``g``.

Per-example gradients come from one batched forward/backward: forward hooks on the trainable
``nn.Linear`` / ``nn.Embedding`` layers keep each call's input ``x`` and output ``y``;
``autograd.grad`` of the summed per-example losses w.r.t. the outputs gives ``delta = dL/dy``, and
since example b's loss depends on example b's tokens only, ``grad W_b = sum_t delta_{b,t} x_{b,t}^T``
(an embedding adds ``delta_{b,t}`` at row ``x_{b,t}``). A tied weight sums every module's use.
Before the backward, a walk of the autograd graph checks that every use of a trainable parameter is
one of those recorded calls and that each call's input keeps example b at row b; otherwise (a
weight read directly, tokens of several examples routed together as in mixture-of-experts layers)
and for parameters held by other modules, gradients come from an exact one-example-at-a-time loop,
with a warning. Nothing is written to ``param.grad``.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from ..data import IGNORE_INDEX

logger = logging.getLogger(__name__)


def parameter_key(name: str, adapter_name: str | None = "default") -> str:
    """A trainable parameter's name without the PEFT adapter segment.

    ``...q_proj.lora_A.default.weight`` -> ``...q_proj.lora_A.weight``: the key format of
    ``adapter_model.safetensors``, used for the saved Adam moments too.
    """
    if adapter_name:
        name = name.replace(f".{adapter_name}.", ".")
    return name


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, param)`` of every parameter with ``requires_grad``, in ``named_parameters`` order."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError(
            "The model has no trainable parameters, so it has no LoRA gradients to featurize. "
            "Wrap it with peft.get_peft_model(model, LoraConfig(...)) (or load a LoRA adapter "
            "with is_trainable=True)."
        )
    return params


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of each row's scored targets, and their count.

    Args:
        logits: ``(B, K, V)``, position k predicting ``targets[:, k]`` (already shifted).
        targets: ``(B, K)``, ``-100`` = not scored.
    Returns:
        ``(nll_sum (B,), n_tokens (B,))`` in float32 / int64.
    """
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                         ignore_index=IGNORE_INDEX, reduction="none").view(targets.shape)
    return ce.sum(1), (targets != IGNORE_INDEX).sum(1)


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over each example's scored tokens.

    Args:
        logits: ``(B, T, V)``.
        labels: ``(B, T)``, aligned with the inputs (shifted here), ``-100`` = not scored.
    Returns:
        ``(B,)`` float32 losses. An example without scored tokens gives NaN (callers refuse it).
    """
    total, count = token_nll(logits[:, :-1], labels[:, 1:])
    return total / count


def adam_direction(
    grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
    betas: tuple[float, float], eps: float,
) -> torch.Tensor:
    """The Adam update direction of one more step with gradient ``grad`` (LESS's Gamma).

    ``m' = b1 m + (1 - b1) g``, ``v' = b2 v + (1 - b2) g^2``, ``Gamma = m' / sqrt(v' + eps)``,
    eps inside the square root and no bias correction, as the reference does.

    Args:
        grad: ``(B, n)`` per-example gradients.
        exp_avg, exp_avg_sq: ``(n,)`` the checkpoint's first and second moments.
    """
    b1, b2 = betas
    # Four temporaries fewer than the formula as written: this runs over B x P values per checkpoint.
    denom = torch.addcmul(exp_avg_sq * b2, grad, grad, value=1.0 - b2).add_(eps).sqrt_()
    return torch.add(exp_avg * b1, grad, alpha=1.0 - b1).div_(denom)


@dataclass
class AdamMoments:
    """One checkpoint's Adam state: moments keyed by :func:`parameter_key`, betas, eps."""

    exp_avg: Mapping[str, torch.Tensor]
    exp_avg_sq: Mapping[str, torch.Tensor]
    betas: tuple[float, float]
    eps: float


def _accepts(model: nn.Module, arg: str) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        params = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False
    return arg in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def scored_positions(labels: torch.Tensor) -> torch.Tensor:
    """``(K,)`` positions t whose next token is scored in at least one example of the batch.

    Args:
        labels: ``(B, T)`` with ``-100`` on unscored tokens.
    Returns:
        Sorted indices into ``[0, T - 1)``: only the logits there enter any example's loss.
    """
    return (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero().flatten()


def _forward_loss(model: nn.Module, batch: Mapping[str, torch.Tensor], with_positions: bool,
                  with_keep: bool = False) -> torch.Tensor:
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    if with_positions:
        kwargs["position_ids"] = batch["position_ids"]
    labels = batch["labels"]
    if not with_keep:
        return per_example_loss(model(**kwargs).logits, labels)
    # The LM head and the softmax only where a completion token is predicted: prompt positions
    # carry no loss, and the vocabulary projection is a large share of a small model's flops.
    keep = scored_positions(labels)
    logits = model(**kwargs, logits_to_keep=keep).logits  # (B, K, V)
    total, count = token_nll(logits, labels[:, 1:][:, keep])
    return total / count


def autocast_context(device: torch.device, enabled: bool = False):
    """bfloat16 autocast on ``device`` when ``enabled``, else a no-op (the model's own precision).

    Off by default everywhere: features are then computed at the precision of the model's weights
    (float32 weights give exact float32 gradients, equal to the naive loop). On a GPU with bfloat16
    units, turning it on runs the forward and backward matmuls in bfloat16: faster, with the
    rounding of mixed-precision training.
    """
    if not enabled:
        return contextlib.nullcontext()
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("autocast=True needs a GPU with bfloat16 support; leave it off on this device.")
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _hookable(module: nn.Module, pname: str) -> bool:
    """Whether the hooks give this parameter's per-example gradient exactly from the module's calls.

    Only the stock forwards qualify (a subclass or a patched ``forward`` may do anything with the
    weight), and for ``nn.Embedding`` only the plain lookup: ``max_norm`` renormalises the weight in
    place and ``scale_grad_by_freq`` rescales by batch-wide counts.
    """
    if "forward" in vars(module):
        return False
    if type(module).forward is nn.Linear.forward:
        return pname in ("weight", "bias")
    if type(module).forward is nn.Embedding.forward:
        return pname == "weight" and module.max_norm is None and not module.scale_grad_by_freq
    return False


@dataclass
class _Call:
    """One recorded call of a hooked module during the batched forward."""

    x: torch.Tensor  # detached input: (B, T|K, in) for nn.Linear, token ids (B, T) for nn.Embedding
    out: torch.Tensor  # the output, still in the graph
    node: object  # out.grad_fn at call time: the entry of the call's own autograd nodes
    version: int  # out._version at call time: an in-place change after the call is detected
    src: object  # the input's grad_fn: where the graph continues below the call's own nodes
    leaf: torch.Tensor | None  # the input itself when it is a leaf that requires grad


class PerExampleGradients:
    """Per-example gradients of the trainable parameters of ``model``.

    The batched path (LoRA ``nn.Linear`` layers, trainable ``nn.Linear`` / ``nn.Embedding`` weights,
    tied ones included) costs one forward and one backward of the batch; per-example weight
    gradients are then ``grad W_b = sum_t delta_{b,t} x_{b,t}^T`` summed over every call of every
    module holding ``W``
    (for LoRA: ``grad B = s sum_t delta_t (A x_t)^T`` and ``grad A = s sum_t (B^T delta_t) x_t^T``,
    the scale ``s`` and the ``B^T`` already inside the recorded output gradients), formed one
    parameter at a time so memory is ``B x numel`` of the largest parameter, at any LoRA size.
    ``batched`` turns False (for good, with one warning) when the graph audit finds the hooks
    would not be exact; that batch is then recomputed by the loop.

    Args:
        model: a model (usually a ``peft.PeftModel``) whose trainable parameters are featurized.
        adapter_name: the PEFT adapter segment removed from parameter names to form keys.
        autocast: bfloat16 autocast for the forward/backward (default off: the model's own
            precision; see :func:`autocast_context`).
    """

    def __init__(self, model: nn.Module, adapter_name: str | None = "default", *, autocast: bool = False):
        self.model = model
        self.params = trainable_parameters(model)
        self.keys = [parameter_key(n, adapter_name) for n, _ in self.params]
        self.sizes = [p.numel() for _, p in self.params]
        self.dim = sum(self.sizes)
        # Every module that holds each trainable Parameter: a tied weight (embedding and LM head) has
        # two, and each use contributes to its gradient.
        owners: dict[int, list[tuple[nn.Module, str]]] = {}
        self._module_names: dict[nn.Module, str] = {}
        for mname, module in model.named_modules(remove_duplicate=False):
            self._module_names.setdefault(module, mname)
            for pname, p in module.named_parameters(recurse=False):
                if (module, pname) not in owners.setdefault(id(p), []):
                    owners[id(p)].append((module, pname))
        self._owners = [owners[id(p)] for _, p in self.params]
        self._index_of = {id(p): i for i, (_, p) in enumerate(self.params)}
        odd = [n for (n, _), uses in zip(self.params, self._owners)
               if not all(_hookable(m, pn) for m, pn in uses)]
        self.batched = not odd
        if odd:
            logger.warning(
                "Trainable parameters the batched hooks cannot handle exactly (held by a module other "
                "than a plain nn.Linear / nn.Embedding: %s%s): per-example gradients use the exact but "
                "slower one-example-at-a-time loop.", ", ".join(odd[:3]), ", ..." if len(odd) > 3 else "")
        self._with_positions = _accepts(model, "position_ids")
        self._with_keep = _accepts(model, "logits_to_keep")
        self.autocast = autocast

    def __call__(self, batch: Mapping[str, torch.Tensor]) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(i, grad_i)`` for each trainable parameter i, ``grad_i`` of shape ``(B, numel_i)``.

        Gradients are yielded one parameter at a time so a caller can transform and project
        each before the next is formed.
        """
        if self.batched:
            yield from self._hooked(batch)
        else:
            yield from self._looped(batch)

    def _hooked(self, batch):
        modules = list(dict.fromkeys(m for uses in self._owners for m, _ in uses))
        records: dict[nn.Module, list[_Call]] = {m: [] for m in modules}

        def hook(module, inputs, output):
            x = inputs[0]
            leaf = x if x.requires_grad and x.grad_fn is None else None
            records[module].append(_Call(x.detach(), output, output.grad_fn, output._version, x.grad_fn, leaf))

        handles = [m.register_forward_hook(hook) for m in modules]
        device = batch["input_ids"].device
        B, T = batch["input_ids"].shape
        lengths = {T}  # a layer sees (B, T, in), or (B, K, in) after the LM-head slice to scored positions
        if self._with_keep:
            lengths.add(len(scored_positions(batch["labels"])))
        try:
            with torch.enable_grad(), autocast_context(device, self.autocast):
                with record_function("hf_less.forward"):  # the phases' names in a torch.profiler trace
                    losses = _forward_loss(self.model, batch, self._with_positions, self._with_keep)
                    _check_losses(losses)
                    total = losses.sum()
                used, problems = self._audit(total, records, B, lengths)
                if not problems:  # no recorded call in the graph: no parameter touches the loss
                    with record_function("hf_less.backward"):
                        deltas = torch.autograd.grad(total, [c.out for _, c in used], allow_unused=True) if used else ()
        finally:
            for h in handles:
                h.remove()
        if problems:  # checked before any backward: nothing is computed twice but the forward
            del losses, total, used
            records.clear()
            self._fall_back(problems)
            yield from self._looped(batch)
            return
        # Keep inputs and output gradients only: the outputs (and their graph) can go now.
        calls: dict[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]] = {m: [] for m in modules}
        for (m, c), delta in zip(used, deltas):
            if delta is not None:
                calls[m].append((c.x, delta))
        del losses, total, used, deltas
        records.clear()
        last_use = {m: i for i, uses in enumerate(self._owners) for m, _ in uses}
        for i, uses in enumerate(self._owners):
            grad = None
            for module, pname in uses:  # every use of the parameter (a tied weight has two)
                for x, delta in calls[module]:
                    with record_function("hf_less.per_example_gradient"):
                        g = _call_gradient(module, pname, x, delta, B)
                        grad = g if grad is None else grad.add_(g)
            if grad is None:  # the parameter does not touch the loss
                grad = torch.zeros((B, *self.params[i][1].shape), device=device)
            for module, _ in uses:  # free a module's activations once its last parameter is formed
                if last_use[module] == i:
                    calls.pop(module, None)
            yield i, grad.reshape(B, -1)

    def _audit(self, total: torch.Tensor, records: Mapping[nn.Module, list[_Call]], B: int,
               lengths: set[int]) -> tuple[list[tuple[nn.Module, _Call]], list[str]]:
        """The recorded calls the loss depends on, and why the hooks would not be exact (none: exact).

        Walks the autograd graph from the loss. A recorded call's own nodes (the layer's matmul or
        lookup) are skipped, going straight to its input's history; any trainable parameter still
        reached was used outside the recorded calls, so the hooks would miss that share of its
        gradient. Each used call's input must keep example b's rows at index b.
        """
        at = {c.node: (m, c) for m, cs in records.items() for c in cs if c.node is not None}
        used: list[tuple[nn.Module, _Call]] = []
        outside: set[int] = set()
        seen, stack = set(), [total.grad_fn]
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            hit = at.get(node)
            if hit is not None:
                used.append(hit)
                leaf = hit[1].leaf
                if leaf is not None and id(leaf) in self._index_of:
                    outside.add(self._index_of[id(leaf)])
                stack.append(hit[1].src)
                continue
            var = getattr(node, "variable", None)  # an AccumulateGrad node: a leaf's gradient sink
            if var is not None and id(var) in self._index_of:
                outside.add(self._index_of[id(var)])
            stack.extend(n for n, _ in node.next_functions)
        del seen

        def names(items: list[str]) -> str:
            return ", ".join(items[:3]) + (f" and {len(items) - 3} more" if len(items) > 3 else "")

        problems = []
        if outside:
            problems.append(
                "trainable parameters used outside the nn.Linear / nn.Embedding calls the hooks record "
                "(a weight read directly, e.g. by a parametrized adapter or a functional use of a tied "
                f"weight): {names([self.params[i][0] for i in sorted(outside)])}")
        mixed = [self._module_names[m] for m in dict.fromkeys(
            m for m, c in used if not _rows_are_examples(m, c.x, B, lengths))]
        if mixed:
            problems.append(
                "layers whose input is not shaped (batch, tokens, features), so example b's tokens are "
                "not row b (tokens of several examples routed together, as in mixture-of-experts "
                f"layers): {names(mixed)}")
        changed = [self._module_names[m] for m in dict.fromkeys(
            m for m, c in used if c.out._version != c.version or c.out.grad_fn is not c.node)]
        if changed:
            problems.append(f"layer outputs modified in place after the call: {names(changed)}")
        return used, problems

    def _fall_back(self, problems: list[str]) -> None:
        """Switch to the exact loop for this and every later batch (the model's structure is fixed)."""
        self.batched = False
        logger.warning(
            "Per-example gradients: the batched hooks would not be exact for this model (%s). This "
            "batch and all later ones use the exact but slower one-example-at-a-time loop.",
            "; ".join(problems))

    def _looped(self, batch):
        B = batch["input_ids"].shape[0]
        per_param: list[list[torch.Tensor]] = [[] for _ in self.params]
        tensors = [p for _, p in self.params]
        for b in range(B):
            keep = batch["attention_mask"][b].bool()
            one = {k: v[b : b + 1, keep] for k, v in batch.items()}
            with torch.enable_grad(), autocast_context(one["input_ids"].device, self.autocast):
                loss = _forward_loss(self.model, one, self._with_positions, self._with_keep)
                _check_losses(loss, offset=b)
                grads = torch.autograd.grad(loss.sum(), tensors, allow_unused=True)
            for i, g in enumerate(grads):
                per_param[i].append(torch.zeros_like(tensors[i]) if g is None else g.float())
        for i, gs in enumerate(per_param):
            yield i, torch.stack(gs).reshape(B, -1)


def _rows_are_examples(module: nn.Module, x: torch.Tensor, B: int, lengths: set[int]) -> bool:
    """Whether row b of a hooked call's input belongs to example b alone.

    Token ids of an embedding must be ``(B, T)``; a linear layer's input ``(B, L, in)`` with ``L``
    the padded length T (or the K scored positions the LM head is sliced to). Flattened or routed
    tokens (``(N, in)``, as a mixture-of-experts expert sees them) fail.
    """
    if isinstance(module, nn.Embedding):
        return x.dim() == 2 and x.shape[0] == B and x.shape[1] in lengths
    return x.dim() == 3 and x.shape[0] == B and x.shape[1] in lengths


def _call_gradient(module: nn.Module, pname: str, x: torch.Tensor, delta: torch.Tensor, B: int) -> torch.Tensor:
    """Per-example gradient of ``module.<pname>`` from one call: ``(B, *param.shape)`` float32.

    Args:
        x: the call's input: ``(B, L, in)`` for ``nn.Linear``, token ids ``(B, L)`` for ``nn.Embedding``.
        delta: ``(B, L, out)`` the gradient of the summed per-example losses w.r.t. the call's output;
            example b's loss depends on example b's rows only, so row b is example b's own gradient.
    """
    d = delta.reshape(B, -1, delta.shape[-1])
    if pname == "weight" and not isinstance(module, nn.Embedding):
        # (B, out, in): one bmm per module call; padded tokens have delta = 0.
        return bmm_float32(d.transpose(1, 2), x.reshape(B, -1, x.shape[-1]))
    d = d.float()
    if isinstance(module, nn.Embedding):
        # Row v of example b's gradient sums the output gradients at the positions holding token v.
        ids = x.reshape(B, -1)
        if module.padding_idx is not None:  # autograd gives the padding row no gradient
            d = d.masked_fill((ids == module.padding_idx)[..., None], 0.0)
        V = module.num_embeddings
        rows = (ids + V * torch.arange(B, device=ids.device)[:, None]).reshape(-1)
        out = torch.zeros((B * V, d.shape[-1]), device=d.device)
        return out.index_add_(0, rows, d.reshape(-1, d.shape[-1])).view(B, V, -1)
    return d.sum(1)


def bmm_float32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` (``(B, n, k) @ (B, k, m)``) in float32, with the products of float32 arithmetic.

    bfloat16 / float16 inputs on CUDA multiply on the tensor cores into a float32 result
    (``out_dtype``): their products are exact in float32 (8- or 11-bit mantissas) and the sums
    float32, so the result is the float32 product of the same values up to the order of the sums,
    without float32 copies of the inputs. Anything else (a CPU, mixed dtypes, a torch without
    ``out_dtype``) is cast to float32 first.
    """
    if a.is_cuda and a.dtype == b.dtype and a.dtype in (torch.bfloat16, torch.float16):
        try:
            return torch.bmm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):  # older torch: no out_dtype
            pass
    return torch.bmm(a.float(), b.float())


def _check_losses(losses: torch.Tensor, offset: int = 0) -> None:
    bad = (~torch.isfinite(losses.detach())).nonzero().flatten().tolist()
    if bad:
        raise FloatingPointError(
            f"Non-finite loss for example(s) {[offset + b for b in bad]} of this batch (no scored "
            "token, or an overflow in the forward pass). Check the example's labels, or compute in "
            "float32 rather than float16."
        )


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Dropout off while featurizing; the caller's train/eval mode restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def gradient_features(
    grads: PerExampleGradients,
    batch: Mapping[str, torch.Tensor],
    projector=None,
    moments: AdamMoments | None = None,
) -> torch.Tensor:
    """Per-example features of a batch: ``(B, d)`` float32 (``d = P`` when ``projector`` is None).

    With ``moments`` the features are Adam directions (pool examples), otherwise plain
    gradients (target examples). Not normalised: see :func:`hf_less.scoring.similarity.normalize`.
    """
    B = batch["input_ids"].shape[0]
    device = batch["input_ids"].device
    offsets = [0]
    for n in grads.sizes:
        offsets.append(offsets[-1] + n)
    out = None if projector is None else torch.zeros((B, projector.proj_dim), device=device)
    parts: list[torch.Tensor] = []
    for i, g in grads(batch):
        if moments is not None:
            key = grads.keys[i]
            if key not in moments.exp_avg:
                raise KeyError(
                    f"The checkpoint's Adam moments have no entry for parameter {key!r}: the warmup "
                    "was trained with a different LoRA configuration than this model."
                )
            m = moments.exp_avg[key].to(device=device, dtype=torch.float32).reshape(-1)
            v = moments.exp_avg_sq[key].to(device=device, dtype=torch.float32).reshape(-1)
            if projector is not None:  # the direction and its projection in one call (fused where it can be)
                with record_function("hf_less.adam_and_projection"):
                    out += projector.project_adam(g, m, v, moments.betas, moments.eps, offsets[i])
                continue
            with record_function("hf_less.adam_direction"):
                g = adam_direction(g, m, v, moments.betas, moments.eps)
        if projector is None:
            parts.append(g)
        else:
            with record_function("hf_less.projection"):
                out += projector.project(g, offsets[i])
    feats = torch.cat(parts, dim=1) if projector is None else out
    bad = (~torch.isfinite(feats)).any(1).nonzero().flatten().tolist()
    if bad:
        raise FloatingPointError(f"Non-finite gradient feature for example(s) {bad} of this batch.")
    return feats


def batch_order(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Group row indices into batches of similar length (longest first) to waste little padding."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
