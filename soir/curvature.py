"""Curvature of a split's loss restricted to parameter groups (docs/design.md §5 'Curvature').

Everything here differentiates the *split loss* of §3: the mean over examples of each
example's mean NLL over its labelled tokens. Only the parameters named in `param_names`
are variables; every other parameter and buffer is held fixed, so `hvp` returns H_SS v.

- `split_loss`: the loss (its gradient is `soir.gradients.mean_gradient`).
- `hvp`, `quadratic_form`: exact Hessian-vector products, forward-over-reverse
  `jvp(grad(L))` with double backward as the fallback (`--curvature hvp`).
- `ggn_terms`, `ggn_quadratic_form`: the Gauss–Newton / true-Fisher quadratic form from
  per-example gradients of labels sampled from the model (`--curvature ggn`). The seam for
  gradient sketches is `ExampleDots`: a function giving two independent estimates of
  g_iᵀu per example; `exact_example_dots` uses exact per-example gradients
  (`soir.gradients.per_example_grads`).
- `gauss_newton_product`: the exact Jᵀ H_logits J v, the reference for the estimator.
- `RecordedForwards`: a list of batches' forwards recorded once, re-run from a group's first
  block with the blocks below replayed (`fd`, and `soir-line` in `soir.linesearch`).
- `hvp_quadratic_forms`, `ggn_quadratic_forms`: the batched forms c_S = v_Sᵀ H_SS v_S of many
  groups at once, as `soir rank` computes them; registered by name in `CURVATURES`
  (`--curvature`). The single-group functions above are their test references.

Vectors and results are dicts {parameter name: tensor shaped like the parameter}.
Batches are dicts of tensors with the examples along dim 0 (`soir.data.collate`); a
custom `loss_fn(model, batch) -> Tensor[B]` of per-example losses replaces the language
model loss (the 'task' of kronfluence), so the code also serves non-LM modules in tests.
Second-order passes need eager attention: SDPA and flash kernels lack forward-mode AD and
double backward. Dropout is switched off (eval mode) for the duration of each call.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp

from soir.data import IGNORE_INDEX, example_losses, n_examples
from soir.errors import UserError
from soir.gradients import (
    Batch,
    LossFn,
    Params,
    flatten_examples,
    frozen_params,
    mean_gradient,
    per_example_grads,
    select_params,
    split_mean,
)
from soir.groups import Group, gather, scatter
from soir.registry import Registry
from soir.runtime import device_of, dtype_of, eval_mode, lm_inputs, lm_logits, to_device
from soir.sketch import SketchPlan, param_names

METHODS = ("jvp", "double-backward", "auto")
FD_STEP = 3e-3  # fd's perturbation, relative to the group's parameter norm


def require_eager(model: nn.Module) -> None:
    """Second-order passes need eager attention; raise a UserError otherwise."""
    implementation = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if implementation not in (None, "eager"):
        raise UserError(
            f"curvature needs eager attention but the model uses {implementation!r} "
            "(SDPA/flash kernels lack double backward and forward-mode AD): load it with eager_attention=True"
        )


def split_loss(model: nn.Module, batches: Iterable[Batch], loss_fn: LossFn = example_losses) -> Tensor:
    """Mean over all examples of the per-example loss, over a list of collated batches."""
    total, count = 0.0, 0
    device = device_of(model)
    with eval_mode(model):
        for batch in batches:
            losses = loss_fn(model, to_device(batch, device))
            total = total + losses.sum()
            count += losses.numel()
    if count == 0:
        raise UserError("an empty split: no examples to compute a loss on")
    return total / count


# ---------------------------------------------------------------- first and second order


def _hvp_jvp(f, params: Params, vector: Params, batch: Batch) -> Params:
    return jvp(lambda p: grad(f)(p, batch), (params,), (vector,))[1]


def _hvp_double_backward(f, params: Params, vector: Params, batch: Batch) -> Params:
    with torch.enable_grad():
        leaves = {n: p.clone().requires_grad_(True) for n, p in params.items()}
        loss = f(leaves, batch)
        grads = torch.autograd.grad(loss, list(leaves.values()), create_graph=True)
        dot = sum((g * vector[n]).sum() for g, n in zip(grads, leaves))
        hv = torch.autograd.grad(dot, list(leaves.values()), allow_unused=True)
    return {n: torch.zeros_like(p) if h is None else h.detach() for (n, p), h in zip(leaves.items(), hv)}


def _forward_ad_unsupported(exc: Exception) -> bool:
    return isinstance(exc, NotImplementedError) and "forward AD" in str(exc)


def hvp(
    model: nn.Module,
    batches: Iterable[Batch],
    param_names: Iterable[str],
    vector: Mapping[str, Tensor],
    method: str = "jvp",
    loss_fn: LossFn = example_losses,
) -> Params:
    """Exact Hessian-vector product H_SS v of the split loss over the named parameters S.

    `method`: "jvp" (forward-over-reverse, `jvp(grad(L))`), "double-backward"
    (`autograd.grad` twice), or "auto" (jvp, falling back to double backward when an
    operation lacks forward-mode AD). Accumulates over batches weighted by batch size.
    """
    if method not in METHODS:
        raise UserError(f"unknown HVP method {method!r}: use one of {', '.join(METHODS)}")
    require_eager(model)
    names = list(dict.fromkeys(param_names))
    params = select_params(model, names)
    _check_vector(params, vector)
    vector = {n: vector[n].to(params[n]) for n in params}
    chosen = [method]

    def per_batch(f, params, batch):
        if chosen[0] == "double-backward":
            return _hvp_double_backward(f, params, vector, batch)
        try:
            return _hvp_jvp(f, params, vector, batch)
        except NotImplementedError as exc:
            if chosen[0] == "jvp" or not _forward_ad_unsupported(exc):
                raise
            chosen[0] = "double-backward"  # for this batch and the rest
            return _hvp_double_backward(f, params, vector, batch)

    return split_mean(model, batches, names, loss_fn, per_batch, what="a Hessian-vector product")


def _check_vector(params: Params, vector: Mapping[str, Tensor]) -> None:
    for n, p in params.items():
        if n not in vector:
            raise ValueError(f"the vector has no entry for parameter {n!r}")
        if tuple(vector[n].shape) != tuple(p.shape):
            raise ValueError(f"the vector's {n!r} has shape {tuple(vector[n].shape)}, the parameter {tuple(p.shape)}")


def dot(x: Mapping[str, Tensor], y: Mapping[str, Tensor]) -> Tensor:
    """Σ over parameters of the elementwise inner product of two parameter dicts."""
    return sum((x[n].double() * y[n].double()).sum() for n in x)


def quadratic_form(model: nn.Module, batches: Iterable[Batch], param_names: Iterable[str], vector: Mapping[str, Tensor], **options) -> float:
    """vᵀ H_SS v of the split loss, via `hvp` (which takes the same `options`: method, loss_fn)."""
    return float(dot(hvp(model, batches, param_names, vector, **options), vector))


def taylor_coefficients(
    model: nn.Module,
    forget: Sequence[Batch],
    retain: Sequence[Batch],
    param_names: Iterable[str],
    method: str = "jvp",
    loss_fn: LossFn = example_losses,
) -> dict[str, float]:
    """The `soir` quantities of one group S (docs/design.md §5), with exact HVPs.

    a = |g_f,S|², b = g_r,Sᵀ g_f,S, c_f = g_f,Sᵀ H_f,SS g_f,S, c_r = g_f,Sᵀ H_r,SS g_f,S.
    """
    names = list(param_names)
    g_f = mean_gradient(model, forget, names, loss_fn)
    g_r = mean_gradient(model, retain, names, loss_fn)
    return {
        "a": float(dot(g_f, g_f)),
        "b": float(dot(g_r, g_f)),
        "c_f": quadratic_form(model, forget, names, g_f, method=method, loss_fn=loss_fn),
        "c_r": quadratic_form(model, retain, names, g_f, method=method, loss_fn=loss_fn),
    }


# ---------------------------------------------------------------- Gauss–Newton


def sample_labels(model: nn.Module, batch: Batch, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Labels drawn from the model's own next-token distribution at the labelled positions.

    Returns the new labels (B, L) (unlabelled positions stay -100) and T_i (B,), the
    number of labelled tokens per example.
    """
    batch = to_device(batch, device_of(model))
    with eval_mode(model, no_grad=True):
        logits = lm_logits(model, batch)
    return draw_labels(logits, batch["labels"], generator)


def draw_labels(logits: Tensor, labels: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """`sample_labels` from logits (B, L, V) at hand: (new labels, labelled tokens per example)."""
    mask = labels[:, 1:] != IGNORE_INDEX
    with torch.no_grad():
        probs = torch.softmax(logits[:, :-1][mask].double(), dim=-1)
        drawn = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    labels = labels.clone()
    labels[:, 1:][mask] = drawn.to(labels.dtype)
    return labels, mask.sum(1)


# An ExampleDots function returns two independent unbiased estimates of g_iᵀu per example
# (each (B,)), g_i the gradient of example i's loss under `labels`. With exact gradients
# both are g_iᵀu; with gradient sketches they are (P g_i)ᵀ(P u) and (P' g_i)ᵀ(P' u) for
# two independent maps, so that their product is unbiased for (g_iᵀu)².
ExampleDots = Callable[[nn.Module, Batch, Sequence[str], Mapping[str, Tensor], Tensor], tuple[Tensor, Tensor]]


def exact_example_dots(model: nn.Module, batch: Batch, param_names: Sequence[str], vector: Mapping[str, Tensor], labels: Tensor) -> tuple[Tensor, Tensor]:
    """g_iᵀu from exact per-example gradients (`--sketch none`); both estimates are the same."""
    grads = flatten_examples(per_example_grads(model, batch, param_names, labels=labels)).double()
    u = torch.cat([vector[n].reshape(-1) for n in param_names]).to(grads)
    dots = grads @ u
    return dots, dots


def ggn_estimate(dots_a: Tensor, dots_b: Tensor, n_tokens: Tensor) -> Tensor:
    """Per-example Gauss–Newton terms T_i (s_iᵀu)(s'_iᵀu'), given dots of sampled-label gradients.

    With one sampled label per position, the square of the gradient of an example's mean
    token loss estimates its Gauss–Newton term divided by T_i (cross-position terms vanish
    in expectation), hence the factor T_i. Their mean over examples estimates uᵀGu.
    """
    return n_tokens.to(dots_a) * dots_a * dots_b


def ggn_terms(
    model: nn.Module,
    batches: Sequence[Batch],
    param_names: Iterable[str],
    vector: Mapping[str, Tensor],
    samples: int = 1,
    seed: int = 0,
    example_dots: ExampleDots = exact_example_dots,
) -> Tensor:
    """Estimates of the Gauss–Newton quadratic form, one per (label draw, example): (samples, n).

    The labels of every labelled position are drawn from the model (the true Fisher);
    the mean of the result estimates uᵀ G u without bias (`gauss_newton_product`).
    """
    require_eager(model)
    names = list(param_names)
    params = select_params(model, names)
    _check_vector(params, vector)
    batches = list(batches)
    generator = torch.Generator(device=device_of(model)).manual_seed(seed)
    draws = []
    for _ in range(samples):
        terms = []
        for batch in batches:
            labels, n_tokens = sample_labels(model, batch, generator)
            dots_a, dots_b = example_dots(model, batch, names, vector, labels)
            terms.append(ggn_estimate(dots_a, dots_b, n_tokens))
        draws.append(torch.cat(terms))
    return torch.stack(draws)


def ggn_quadratic_form(model: nn.Module, batches: Sequence[Batch], param_names: Iterable[str], vector: Mapping[str, Tensor], **options) -> float:
    """uᵀ G_SS u of the split loss (Gauss–Newton = true Fisher), estimated with sampled labels
    (the mean of `ggn_terms`, which takes the same `options`: samples, seed, example_dots)."""
    return float(ggn_terms(model, batches, param_names, vector, **options).mean())


def gauss_newton_product(model: nn.Module, batches: Iterable[Batch], param_names: Iterable[str], vector: Mapping[str, Tensor]) -> Params:
    """Exact G_SS v = (1/n) Σ_i (1/T_i) Σ_t J_itᵀ (diag p_it − p_it p_itᵀ) J_it v.

    J_it is the Jacobian of the logits at labelled position t of example i w.r.t. the
    named parameters: J v by a JVP through the logits, the softmax Hessian on the
    labelled positions, then a VJP back.
    """
    require_eager(model)
    names = list(dict.fromkeys(param_names))
    params = select_params(model, names)
    _check_vector(params, vector)
    vector = {n: vector[n].to(params[n]) for n in params}
    frozen = frozen_params(model, params)

    def per_batch(f, params, batch):
        def logits_of(p: Params) -> Tensor:
            return functional_call(model, {**frozen, **p}, (), lm_inputs(batch)).logits

        logits, jv = jvp(logits_of, (params,), (vector,))
        _, pullback = vjp(logits_of, params)
        mask = batch["labels"][:, 1:] != IGNORE_INDEX
        weight = mask / mask.sum(1, keepdim=True).clamp_min(1)
        probs = torch.softmax(logits[:, :-1], dim=-1)
        w = jv[:, :-1]
        hw = probs * (w - (probs * w).sum(-1, keepdim=True))
        cotangent = torch.zeros_like(logits)
        cotangent[:, :-1] = hw * weight[..., None].to(hw)
        return pullback(cotangent)[0]

    return split_mean(model, batches, names, example_losses, per_batch, what="a Gauss–Newton product")


# ---------------------------------------------------------------- batched forms of many groups (soir rank)


def _require_grad(model: nn.Module, names: Iterable[str]):
    params = dict(model.named_parameters())
    flags = {n: params[n].requires_grad for n in names}
    for n in names:
        params[n].requires_grad_(True)
    return params, flags


def group_direction(group: Group, vectors: Mapping[str, Tensor], params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """v restricted to the group, as full tensors of its parameters: the vectors themselves for
    whole-tensor groups, zero outside the slices for neuron groups (which restricts H to them)."""
    members = group.param_names
    if all(s.dim is None for s in group.slices):
        return {m: vectors[m].to(params[m]) for m in members}
    return scatter(group, gather(group, vectors).to(params[members[0]]), params)


def hvp_quadratic_forms(model: nn.Module, batches: Sequence[Batch], groups: Sequence[Group], vectors: Mapping[str, Tensor],
                        bar=None, loss_fn: LossFn = example_losses) -> dict[str, float]:
    """Exact v_Sᵀ H_SS v_S of the split loss for every group S, with v = `vectors` (full-size tensors).

    Per batch, one forward and one backward with create_graph (shared by all groups), then per
    group a second backward restricted to the group's parameters: ∂(g_Sᵀ v_S)/∂θ_S = H_SS v_S.
    Neuron groups use v zeroed outside the group's slices, which restricts H to the slices.
    """
    require_eager(model)
    names = param_names(groups)
    n = n_examples(batches)
    device = device_of(model)
    params, flags = _require_grad(model, names)
    c = {g.name: 0.0 for g in groups}
    try:
        with eval_mode(model), torch.enable_grad():
            for batch in batches:
                batch = to_device(batch, device)
                loss = loss_fn(model, batch).sum() / n
                grads = dict(zip(names, torch.autograd.grad(loss, [params[x] for x in names], create_graph=True, allow_unused=True)))
                for g in groups:
                    members = g.param_names
                    v = group_direction(g, vectors, params)
                    dot = sum((grads[m] * v[m]).sum() for m in members if grads[m] is not None and grads[m].requires_grad)
                    if isinstance(dot, Tensor):
                        hv = torch.autograd.grad(dot, [params[m] for m in members], retain_graph=True, allow_unused=True)
                        c[g.name] += sum(float((h.double() * v[m].double()).sum()) for h, m in zip(hv, members) if h is not None)
                    if bar is not None:
                        bar.update(1)
                del grads, loss
    finally:
        for name, flag in flags.items():
            params[name].requires_grad_(flag)
    return c


def ggn_quadratic_forms(model: nn.Module, batches: Sequence[Batch], groups: Sequence[Group], vectors: Mapping[str, Tensor],
                        sketch: str = "none", k: int = 1024, seed: int = 0, samples: int = 1, bar=None,
                        plans: tuple | None = None) -> dict[str, float]:
    """Gauss–Newton / true-Fisher u_Sᵀ G_SS u_S for every group, from per-example gradients of
    model-sampled labels: mean_i T_i (s_iᵀ u)(s'_iᵀ u') with two independent sketches s, s'
    (exact gradients, s = s', with `sketch none`). See `ggn_estimate`."""
    require_eager(model)
    if plans is None:
        first = SketchPlan(model, groups, sketch, k, seed)
        plans = (first, first if sketch == "none" else SketchPlan(model, groups, sketch, k, seed + GGN_SECOND_MAP))
    u = [p.project_mean(vectors) for p in plans]
    generator = torch.Generator(device=device_of(model)).manual_seed(seed)
    total = {g.name: 0.0 for g in groups}
    count = 0
    for _ in range(samples):
        for batch in batches:
            batch = to_device(batch, device_of(model))
            labels, n_tokens = sample_labels(model, batch, generator)
            sa = plans[0].per_example(batch, labels)
            sb = sa if plans[1] is plans[0] else plans[1].per_example(batch, labels)
            for g in groups:
                da = sa[g.name].double() @ u[0][g.name].double()
                db = sb[g.name].double() @ u[1][g.name].double()
                total[g.name] += float(ggn_estimate(da, db, n_tokens).sum())
            count += len(labels)
            if bar is not None:
                bar.update(1)
    return {name: t / count for name, t in total.items()}


GGN_SECOND_MAP = 7919  # seed offset of ggn's second, independent sketch


def decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The model's stack of transformer blocks (the longest `layers`/`h`/`blocks` ModuleList), if any."""
    stacks = [m for name, m in model.named_modules()
              if isinstance(m, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "h", "blocks", "block", "layer") and len(m)]
    return max(stacks, key=len, default=None)


class LayerCache:
    """Runs a model's forward from block `start` upward, the blocks below returning the outputs
    they gave in the last recorded forward of the same batch (their inputs have not changed).

    `record()` is a context for the unperturbed forward; `skip_below(start)` one for the perturbed
    ones. The cached outputs are the hidden states of one batch, one tensor per block."""

    def __init__(self, model: nn.Module):
        self.blocks = decoder_layers(model)
        self.outputs: list = []

    @property
    def depth(self) -> int:
        return 0 if self.blocks is None else len(self.blocks)

    @contextlib.contextmanager
    def record(self):
        self.outputs = [None] * self.depth

        def keeper(i: int):
            def keep(module, args, output):
                self.outputs[i] = output
            return keep

        hooks = [block.register_forward_hook(keeper(i)) for i, block in enumerate(self.blocks or ())]
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()

    @contextlib.contextmanager
    def skip_below(self, start: int, outputs: list | None = None):
        """Blocks below `start` return `outputs` (default: the last recorded ones)."""
        patched = list(self.blocks[: min(start, self.depth)]) if self.blocks is not None else []
        for block, output in zip(patched, self.outputs if outputs is None else outputs):
            block.forward = (lambda out: (lambda *args, **kwargs: out))(output)
        try:
            yield
        finally:
            for block in patched:
                del block.forward


def first_block(model: nn.Module, cache: LayerCache, groups: Sequence[Group], forward: Callable[[], Tensor]) -> tuple[dict[str, int], Tensor]:
    """Per group, the first block whose input its parameters can change (its own block; the top
    of the stack for modules that run after every block, such as the final norm and an untied
    head; 0 for those that run before, such as embeddings and a tied head), read from the order
    in which modules run in `forward()`; and what `forward()` returned."""
    order: dict[str, int] = {}
    blocks_done = [0]

    def seen(name: str):
        def pre_hook(module, args):
            order.setdefault(name, blocks_done[0])
        return pre_hook

    def block_done(module, args, output):
        blocks_done[0] += 1

    hooks = [m.register_forward_pre_hook(seen(name)) for name, m in model.named_modules() if not isinstance(m, nn.ModuleList)]
    hooks += [b.register_forward_hook(block_done) for b in cache.blocks or ()]
    try:
        output = forward()
    finally:
        for hook in hooks:
            hook.remove()
    owners = {g.name: [name.rsplit(".", 1)[0] if "." in name else "" for name in g.param_names] for g in groups}
    starts = {g.name: g.layer if g.layer is not None else min(order.get(owner, 0) for owner in owners[g.name]) for g in groups}
    return starts, output


class RecordedForwards:
    """The forwards of a fixed list of batches, recorded once and then re-run under changed weights
    of one group from the group's first block upward, the blocks below returning their recorded
    outputs (their inputs cannot change). Shared by `fd` and `soir-line` (`soir.linesearch`).

    Keeps one hidden state per block and batch (`LayerCache`): depth × tokens × hidden elements.
    `starts` maps each group to its first block (`first_block`; computed on the first batch when
    not given); `base` is Σ of the per-example losses at the recorded weights (float64)."""

    def __init__(self, model: nn.Module, batches: Sequence[Batch], groups: Sequence[Group], loss_fn: LossFn = example_losses,
                 starts: Mapping[str, int] | None = None):
        self.model, self.loss_fn = model, loss_fn
        self.named = dict(model.named_parameters())
        device = device_of(model)
        self.batches = [to_device(b, device) for b in batches]
        self.cache = LayerCache(model)
        self.outputs: list[list] = []
        self.starts = None if starts is None else dict(starts)
        self.base = 0.0
        with eval_mode(model, no_grad=True):
            for batch in self.batches:
                with self.cache.record():
                    if self.starts is None:
                        self.starts, losses = first_block(model, self.cache, groups, lambda: loss_fn(model, batch))
                    else:
                        losses = loss_fn(model, batch)
                self.outputs.append(self.cache.outputs)
                self.base += float(losses.double().sum())

    def total(self, start: int) -> float:
        """Σ over all rows of the per-example loss under the model's current weights, run from block
        `start` upward: exact when only parameters at or above `start` have changed."""
        total = 0.0
        with eval_mode(self.model, no_grad=True):
            for batch, outputs in zip(self.batches, self.outputs):
                with self.cache.skip_below(start, outputs):
                    total += float(self.loss_fn(self.model, batch).double().sum())
        return total

    def totals(self, start: int, steps: Sequence[tuple[Mapping[str, Tensor], float]]) -> list[float]:
        """`total` at θ + η_k v_k for each step (v_k, η_k), every v_k changing only parameters inside
        block `start` or above. One step: changed in place and restored bit for bit. Several: one
        forward of each batch repeated once per step (the replicas of block `start` share its
        recorded input), in which each replica's rows run the modules holding its parameters with
        them changed (`replicated`); the blocks above run on all replicas at once."""
        if len(steps) == 1:
            (direction, eta), = steps
            with changed(self.named, direction, eta):
                return [self.total(start)]
        sums = torch.zeros(len(steps), dtype=torch.float64)
        with eval_mode(self.model, no_grad=True):
            for batch, outputs in zip(self.batches, self.outputs):
                rows = batch["input_ids"].shape[0]
                below = [repeat_rows(out, len(steps), rows) if i == start - 1 else out for i, out in enumerate(outputs)]
                with self.cache.skip_below(start, below), replicated(self.model, self.named, steps, rows):
                    losses = self.loss_fn(self.model, {k: repeat_rows(t, len(steps), rows) for k, t in batch.items()})
                sums += losses.double().view(len(steps), rows).sum(1).cpu()
        return sums.tolist()


@contextlib.contextmanager
def changed(named: Mapping[str, Tensor], direction: Mapping[str, Tensor], eta: float):
    """Parameters at θ + η v within the context, restored bit for bit after it."""
    kept = {n: named[n].detach().clone() for n in direction}
    try:
        with torch.no_grad():
            for n, v in direction.items():
                named[n].add_(v, alpha=eta)
        yield
    finally:
        with torch.no_grad():
            for n in direction:
                named[n].copy_(kept[n])


def repeat_rows(value, times: int, rows: int):
    """`value` (a tensor, or a tuple or list of them) with every tensor of `rows` rows along dim 0
    repeated `times` times, replica after replica; anything else as it is."""
    if isinstance(value, (tuple, list)):
        return type(value)(repeat_rows(v, times, rows) for v in value)
    if isinstance(value, Tensor) and value.dim() and value.shape[0] == rows:
        return value.repeat(times, *([1] * (value.dim() - 1)))
    return value


@contextlib.contextmanager
def replicated(model: nn.Module, named: Mapping[str, Tensor], steps: Sequence[tuple[Mapping[str, Tensor], float]], rows: int):
    """Within the context, a forward of len(steps) × `rows` rows runs replica k's rows (the k-th
    block of `rows`) through every module that holds a parameter of step k at θ + η_k v_k (in
    place, one replica at a time, restored bit for bit). Those modules must take the rows along dim
    0 of their first input, as the linear layers and norms inside a transformer block do."""
    by_id = {id(named[n]): n for direction, _ in steps for n in direction}
    owners = [m for m in model.modules() if any(id(p) in by_id for p in m.parameters(recurse=False))]

    def forward_of(module: nn.Module, original: Callable):
        mine = {by_id[id(p)] for p in module.parameters(recurse=False) if id(p) in by_id}

        def forward(x: Tensor, *args, **kwargs):
            if x.shape[0] != rows * len(steps):
                raise RuntimeError(f"{type(module).__name__} got {x.shape[0]} rows along dim 0, not {len(steps)} replicas × {rows}: "
                                   "its group cannot share a batched forward")
            outs = []
            for (direction, eta), chunk in zip(steps, x.split(rows)):
                with changed(named, {n: v for n, v in direction.items() if n in mine}, eta):
                    outs.append(original(chunk, *args, **kwargs))
            return torch.cat(outs)
        return forward

    patched = {module: module.__dict__.get("forward") for module in owners}  # an instance's own forward, if it has one
    for module in owners:
        module.forward = forward_of(module, module.forward)
    try:
        yield
    finally:
        for module, own in patched.items():
            if own is None:
                del module.forward
            else:
                module.forward = own


def fd_quadratic_forms(model: nn.Module, batches: Sequence[Batch], groups: Sequence[Group], vectors: Mapping[str, Tensor],
                       step: float = FD_STEP, bar=None, loss_fn: LossFn = example_losses) -> dict[str, float]:
    """v_Sᵀ H_SS v_S of the split loss from forward passes only: the central second difference
    (L(θ + h v_S) − 2 L(θ) + L(θ − h v_S)) / h², with h v_S scaled to `step` × ‖θ_S‖ (relative).

    No graph is kept (inference memory). Per batch one recorded forward, then two forwards per
    group that start at the group's block, the blocks below replaying their recorded outputs
    (`RecordedForwards`, one batch at a time).
    The group's parameters are restored bit for bit after each perturbation. The truncation
    error is O(h²); float32 rounding bounds how small `step` can usefully be.
    """
    if dtype_of(model).itemsize < 4:
        raise UserError(f"--curvature fd needs float32 weights ({dtype_of(model)} rounds away its small perturbations): "
                        "load the model with --dtype float32, or use --curvature hvp or ggn")
    n = n_examples(batches)
    named = dict(model.named_parameters())
    scales = {}
    for g in groups:
        v_norm = float(torch.sqrt(sum((x.double() ** 2).sum() for x in group_direction(g, vectors, named).values())))
        theta_norm = float(torch.sqrt(sum((named[m].detach().double() ** 2).sum() for m in g.param_names)))
        scales[g.name] = step * max(theta_norm, 1.0) / v_norm if v_norm > 0 else 0.0
    c = {g.name: 0.0 for g in groups}
    starts = None
    with eval_mode(model), torch.no_grad():
        for batch in batches:
            recorded = RecordedForwards(model, [batch], groups, loss_fn, starts)
            starts, centre = recorded.starts, recorded.base
            for g in groups:
                if bar is not None:
                    bar.update(1)
                h = scales[g.name]
                if h == 0.0:
                    continue
                v = group_direction(g, vectors, named)
                kept = {m: named[m].detach().clone() for m in v}
                sides = []
                for sign in (1.0, -1.0):
                    for m, x in v.items():
                        named[m].copy_(kept[m]).add_(x, alpha=sign * h)
                    sides.append(recorded.total(starts[g.name]))
                for m in v:
                    named[m].copy_(kept[m])
                c[g.name] += (sides[0] + sides[1] - 2.0 * centre) / (h * h * n)
    return c


# ---------------------------------------------------------------- which curvature fits


def activation_bytes(model: nn.Module, tokens: int, length: int) -> int:
    """A forward's saved activations for `tokens` tokens in sequences of `length`: per block
    (34 h + 5 a T) bytes per token at 2-byte precision (Korthikanti et al. 2022), scaled to the
    model's element size, plus the logits and their softmax."""
    config = getattr(model, "config", None)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0)
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 0)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 0)
    vocab = getattr(config, "vocab_size", 0)
    element = dtype_of(model).itemsize
    per_token = layers * (34 * hidden + 5 * heads * length) * element / 2 + 2 * vocab * element
    return int(tokens * per_token)


def hvp_peak_bytes(model: nn.Module, batches: Sequence[Batch]) -> int:
    """Estimated peak of the exact path: the weights, their gradients with graph and the products
    (3 copies), and the retained graph of the backward (5× the forward's activations; measured
    3.6× on CPU, `benchmarks/scale.py`) for the largest batch."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    largest = max(batches, key=lambda b: b["input_ids"].numel(), default=None)
    if largest is None:
        return 3 * weights
    return 3 * weights + 5 * activation_bytes(model, largest["input_ids"].numel(), largest["input_ids"].shape[1])


def free_memory_bytes(device: torch.device) -> int:
    """What the device has free now: CUDA's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as info:
            fields = dict(line.split(":", 1) for line in info)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 1 << 62  # unknown: no budget


def kfac_peak_bytes(model: nn.Module, batches: Sequence[Batch]) -> int:
    """Estimated peak of `kfac`: the weights, the groups' directions (a copy of the matrix weights
    in float32 or wider), a backward's activations (2 × a forward's: the graph without weight
    gradients, plus the hooks' inputs) of the largest batch, and at most two min(out, in)² factors
    per matrix module."""
    from soir.kfac import matrix_modules  # soir.kfac builds on this module

    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    element = torch.promote_types(dtype_of(model), torch.float32).itemsize
    matrices = [m.weight for _, m, layout in matrix_modules(model)]
    factors = sum(2 * min(w.shape) ** 2 * element + w.numel() * element for w in matrices)
    largest = max(batches, key=lambda b: b["input_ids"].numel(), default=None)
    active = 0 if largest is None else 2 * activation_bytes(model, largest["input_ids"].numel(), largest["input_ids"].shape[1])
    return weights + active + factors


# The cost model of the default choice, in gradient passes of both splits, fit to benchmarks/scale.py
# (CPU, 1 thread): hvp's curvature stage costs HVP_FIXED_PASSES (its create-graph pass) plus a second
# backward per group, HVP_PASSES_PER_GROUP each on average (13.1 passes at 16 groups, 35.8 at 58);
# kfac's costs about one pass (0.7–1.1) whatever the groups. hvp is exact, so it is kept while its
# per-group backwards do not dominate its fixed cost: up to 9 groups.
HVP_FIXED_PASSES = 4.5
HVP_PASSES_PER_GROUP = 0.5


def choose_curvature(model: nn.Module, batches: Sequence[Batch], budget_gib: float | None, n_groups: int) -> tuple[str, str]:
    """The default curvature and why (for ranking.json): hvp while its per-group second backwards do
    not dominate its cost (HVP_PASSES_PER_GROUP × groups ≤ HVP_FIXED_PASSES) and its estimated peak
    fits the budget (default 90% of the free memory); else kfac, whose cost does not grow with the
    groups, when its peak fits; else fd (float32 weights only: in bf16/fp16 fd's perturbation is
    below the rounding), else kfac, the smaller of the two peaks that remain."""
    budget = budget_gib * 2**30 if budget_gib is not None else 0.9 * free_memory_bytes(device_of(model))
    need = hvp_peak_bytes(model, batches)
    per_group = HVP_PASSES_PER_GROUP * n_groups
    cheap = per_group <= HVP_FIXED_PASSES
    cost = (f"{n_groups} groups: hvp's second backwards (about {per_group:g} gradient passes) {'do not dominate' if cheap else 'dominate'} "
            f"its fixed {HVP_FIXED_PASSES:g} (kfac: about one pass whatever the groups)")
    memory = f"hvp's estimated peak {need / 2**30:.2f} GiB {'fits' if need <= budget else 'exceeds'} the budget {budget / 2**30:.2f} GiB"
    if cheap and need <= budget:
        return "hvp", f"{cost} and {memory}: hvp"
    kfac_need = kfac_peak_bytes(model, batches)
    kfac_memory = f"kfac's estimated peak {kfac_need / 2**30:.2f} GiB {'fits' if kfac_need <= budget else 'exceeds'} it"
    reason = f"{cost}, {memory}, {kfac_memory}"
    if kfac_need <= budget:
        return "kfac", f"{reason}: kfac"
    if dtype_of(model).itemsize < 4:
        return "kfac", f"{reason}, and fd needs float32 weights: kfac (or give --dtype float32)"
    return "fd", f"{reason}: fd"


@dataclass(frozen=True)
class CurvatureOptions:
    """What a curvature method (and the line search) may use besides the model and the data (from `soir rank`'s settings)."""

    sketch: str = "none"
    dim: int = 1024
    seed: int = 0
    ggn_samples: int = 1
    delta: float = 1.0
    replicas: int = 1  # groups whose line searches share one forward (soir.linesearch)


@dataclass(frozen=True)
class CurvatureMethod:
    """A registered way to get c_S = v_Sᵀ H_SS v_S of one split for every group S.

    `forms(model, batches, groups, vectors, options, bar, loss_fn) -> {group: c}`;
    `steps(n_groups, n_batches, options)` is the progress-bar length of one split.
    """

    forms: Callable[..., dict[str, float]]
    steps: Callable[[int, int, CurvatureOptions], int]
    unit: str = "step"


CURVATURES: Registry[CurvatureMethod] = Registry("curvature", "--curvature")
CURVATURES.register("hvp", CurvatureMethod(
    lambda model, batches, groups, vectors, options, bar, loss_fn: hvp_quadratic_forms(model, batches, groups, vectors, bar, loss_fn),
    lambda n_groups, n_batches, options: n_groups * n_batches, "group × batch"),
    help="exact Hessian-vector products by double backward; one second backward per group and batch")
CURVATURES.register("fd", CurvatureMethod(
    lambda model, batches, groups, vectors, options, bar, loss_fn: fd_quadratic_forms(model, batches, groups, vectors, bar=bar, loss_fn=loss_fn),
    lambda n_groups, n_batches, options: n_groups * n_batches, "group × batch"),
    help="forward passes only: a central second difference of the loss along each group's direction, "
         "from the group's block upward (inference memory; an approximation of hvp)")
CURVATURES.register("ggn", CurvatureMethod(
    lambda model, batches, groups, vectors, options, bar, loss_fn: ggn_quadratic_forms(
        model, batches, groups, vectors, sketch=options.sketch, k=options.dim, seed=options.seed, samples=options.ggn_samples, bar=bar),
    lambda n_groups, n_batches, options: options.ggn_samples * n_batches, "batch"),
    help="Gauss–Newton / true Fisher from gradients of model-sampled labels (sketched with --sketch)")


def _kfac_forms(model, batches, groups, vectors, options, bar, loss_fn):
    from soir.kfac import kfac_quadratic_forms  # soir.kfac builds on this module

    return kfac_quadratic_forms(model, batches, groups, vectors, samples=options.ggn_samples, seed=options.seed, bar=bar)


CURVATURES.register("kfac", CurvatureMethod(_kfac_forms, lambda n_groups, n_batches, options: options.ggn_samples * n_batches, "batch"),
                    help="Kronecker-factored Gauss–Newton (KFAC, sampled labels): per linear module input and output-gradient "
                         "second moments from one forward and backward per batch, every group's form in closed form; "
                         "the cost does not grow with the number of groups")
