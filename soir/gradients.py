"""Gradients of a split's loss: mean gradients (one batched pass) and exact per-example gradients.

The split loss is the contract's (docs/design.md §3): the mean over examples of each example's
mean NLL over its labelled tokens, so the split gradient is the mean of the per-example
gradients. Only the parameters named in `param_names` are variables; every other parameter
and buffer is held fixed. Results are dicts {parameter name: tensor}; names are those of
`model.named_parameters()` (a tied weight appears once, under its first name, and gets its
gradient from all its roles).

A custom `loss_fn(model, batch) -> Tensor[B]` of per-example losses replaces the language
model loss (the 'task' of kronfluence); loss i must depend on row i of the batch only.
Dropout is switched off (eval mode) for the duration of each call.

This module is the bottom of the gradient stack: `soir.curvature` (HVPs, Gauss–Newton),
`soir.sketch` (the `factored` fallback) and `soir.ranking` build on it, through its public
helpers `select_params`, `frozen_params` and `functional_loss`.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, Sequence

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from soir.data import example_losses
from soir.errors import UserError
from soir.runtime import device_of, eval_mode, to_device

Params = dict[str, Tensor]
Batch = Mapping[str, Tensor]
LossFn = Callable[[nn.Module, Batch], Tensor]


class _Task(nn.Module):
    """Wraps model and loss so `functional_call` can swap parameters under any loss_fn."""

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Batch) -> Tensor:
        return self.loss_fn(self.model, batch)


def batch_size_of(batch: Batch) -> int:
    """The number of rows of a collated batch."""
    return len(next(v for v in batch.values() if isinstance(v, Tensor)))


def select_params(model: nn.Module, param_names: Iterable[str]) -> Params:
    """Detached references to the named parameters, in the order given."""
    named = dict(model.named_parameters())
    param_names = list(dict.fromkeys(param_names))
    missing = [n for n in param_names if n not in named]
    if missing:
        raise UserError(f"no parameter named {missing[0]!r} in the model (e.g. {next(iter(named))!r})")
    if not param_names:
        raise UserError("an empty parameter group: name at least one parameter")
    return {n: named[n].detach() for n in param_names}


def frozen_params(model: nn.Module, variable: Iterable[str]) -> Params:
    """Detached references to every parameter not named in `variable` (held fixed)."""
    variable = set(variable)
    return {n: p.detach() for n, p in model.named_parameters() if n not in variable}


def functional_loss(model: nn.Module, loss_fn: LossFn, names: Sequence[str]) -> Callable[[Params, Batch], Tensor]:
    """f(params, batch) = Σ_i loss_i with `params` swapped in and every other parameter fixed."""
    task = _Task(model, loss_fn)
    frozen = {f"model.{n}": p for n, p in frozen_params(model, names).items()}

    def f(params: Params, batch: Batch) -> Tensor:
        swapped = {**frozen, **{f"model.{n}": p for n, p in params.items()}}
        return functional_call(task, swapped, (batch,)).sum()

    return f


# ---------------------------------------------------------------- mean gradients


def split_mean(model: nn.Module, batches: Iterable[Batch], param_names: Iterable[str], loss_fn: LossFn,
               per_batch: Callable[[Callable, Params, Batch], Params], what: str = "a gradient") -> Params:
    """(1/n) Σ over batches of `per_batch(f, params, batch)`, each a sum over its rows, n the number of rows.

    `f(params, batch)` is the batch's summed loss with `params` (the named parameters) swapped
    in; the model runs in eval mode. The split mean of any per-example quantity that is linear
    in the summed loss, such as a Hessian-vector product (`soir.curvature.hvp`).
    """
    params = select_params(model, param_names)
    f = functional_loss(model, loss_fn, list(params))
    total, count = {n: torch.zeros_like(p) for n, p in params.items()}, 0
    device = device_of(model)
    with eval_mode(model):
        for batch in batches:
            batch = to_device(batch, device)
            for n, g in per_batch(f, params, batch).items():
                total[n] += g
            count += batch_size_of(batch)
    if count == 0:
        raise UserError(f"an empty split: no examples to compute {what} on")
    return {n: g / count for n, g in total.items()}


def mean_gradient(model: nn.Module, batches: Iterable[Batch], param_names: Iterable[str], loss_fn: LossFn = example_losses) -> Params:
    """Gradient of the split loss w.r.t. the named parameters (the mean of per-example gradients),
    accumulated in float32 (or the parameters' dtype if wider).

    One forward and backward per batch with plain autograd (only the named parameters require
    grad meanwhile), which keeps the memory of one training step; batches of any sizes are
    weighted by their size. The model's `.grad` and requires_grad flags are left as they were.
    """
    params = select_params(model, param_names)
    named = dict(model.named_parameters())
    flags = {n: p.requires_grad for n, p in named.items()}
    total = {n: torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32)) for n, p in params.items()}
    count = 0
    device = device_of(model)
    try:
        for n, p in named.items():
            p.requires_grad_(n in params)
        with eval_mode(model), torch.enable_grad():
            for batch in batches:
                batch = to_device(batch, device)
                losses = loss_fn(model, batch)
                grads = torch.autograd.grad(losses.sum(), [named[n] for n in params], allow_unused=True)
                for n, g in zip(params, grads):
                    if g is not None:
                        total[n] += g
                count += batch_size_of(batch)
    finally:
        for n, p in named.items():
            p.requires_grad_(flags[n])
    if count == 0:
        raise UserError("an empty split: no examples to compute a gradient on")
    return {n: g / count for n, g in total.items()}


# ---------------------------------------------------------------- per-example gradients


def _check_right_padded(batch: Batch) -> None:
    mask = batch.get("attention_mask")
    if mask is not None and not torch.equal(mask, mask.cumprod(1)):
        raise UserError("per-example gradients need right-padded batches (soir.data.collate(..., side='right'))")


def per_example_grads(
    model: nn.Module,
    batch: Batch,
    param_names: Iterable[str],
    loss_fn: LossFn = example_losses,
    labels: Tensor | None = None,
    chunk_size: int | None = None,
) -> Params:
    """Exact gradients of each example's loss w.r.t. the named parameters, {name: (B, *shape)}.

    `vmap(grad)` over the rows of one batch: `loss_fn` is called on one example at a time
    (every tensor of the batch sliced to a batch of 1; non-tensor entries passed as is), so
    it must not use `.item()`, data-dependent Python control flow or random ops.

    Right padding is required (a UserError otherwise): each example runs under an all-ones,
    unbatched attention mask, which with causal attention equals the padded computation at
    every labelled position (pads come after them and carry label -100) and keeps
    data-dependent mask code out of `vmap`. Second-order-capable (eager) attention is not
    needed here, but HF models must not use a kernel without vmap support.

    `labels` replaces the batch's labels (the model-sampled labels of `ggn`).
    `chunk_size` bounds how many examples vmap handles at once (memory).
    """
    params = select_params(model, param_names)
    batch = to_device(batch, device_of(model))
    _check_right_padded(batch)
    if labels is not None:
        batch = {**batch, "labels": labels.to(device_of(model))}
    task = _Task(model, loss_fn)
    frozen = {f"model.{n}": p for n, p in frozen_params(model, params).items()}
    tensors = {key: value for key, value in batch.items() if isinstance(value, Tensor) and key != "attention_mask"}
    static = {key: value for key, value in batch.items() if not isinstance(value, Tensor)}
    if "attention_mask" in batch:
        mask = batch["attention_mask"]
        static["attention_mask"] = torch.ones(1, mask.shape[1], dtype=mask.dtype, device=mask.device)

    def one(p: Params, example: Mapping[str, Tensor]) -> Tensor:
        rows = {key: value.unsqueeze(0) for key, value in example.items()}
        swapped = {**frozen, **{f"model.{n}": v for n, v in p.items()}}
        return functional_call(task, swapped, ({**rows, **static},)).reshape(())

    with eval_mode(model):
        return vmap(grad(one), in_dims=(None, 0), chunk_size=chunk_size)(params, tensors)


def flatten_examples(grads: Mapping[str, Tensor]) -> Tensor:
    """Concatenate per-example gradients {name: (B, *shape)} into (B, D) in dict order."""
    return torch.cat([rearrange(g, "n ... -> n (...)") for g in grads.values()], dim=1)
