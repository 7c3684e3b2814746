"""The `soir-line` quantity: the real cost of forgetting Δ with one group (docs/design.md §5).

`soir` extrapolates a quadratic model to a step η_S g_f,S that is often far outside where the
model holds (η up to 10⁴ on the testbed; benchmarks/taylor.py). The line search measures
instead: along g_f,S it evaluates the real forget loss until it has risen by Δ (a geometric
bracket from the first-order step Δ / |g_f,S|², then bisection in log η), and measures the
retain loss there. Forward passes only, no graph (inference memory): about `evaluations`
forwards of the forget split and one of the retain split per group.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from soir.curvature import group_direction, split_loss
from soir.data import example_losses, n_examples
from soir.groups import Group

GROWTH = 4.0  # bracket growth per evaluation
REACH = 1e6  # give up beyond REACH × the first-order step


def loss_along(model: nn.Module, direction: Mapping[str, Tensor], eta: float, batches, loss_fn,
               reduce: Callable[[float, int], float] | None = None) -> float:
    """The split loss at θ_S + η v_S (through `reduce(mean, rows)` when given: the global mean
    under torchrun); the group's parameters are restored bit for bit."""
    named = dict(model.named_parameters())
    kept = {n: named[n].detach().clone() for n in direction}
    try:
        for n, v in direction.items():
            named[n].add_(v, alpha=eta)
        return _mean(model, batches, loss_fn, reduce)
    finally:
        for n in direction:
            named[n].copy_(kept[n])


def _mean(model, batches, loss_fn, reduce) -> float:
    value = float(split_loss(model, batches, loss_fn))
    return value if reduce is None else reduce(value, n_examples(batches))


def search(loss: Callable[[float], float], base: float, delta: float, start: float, evaluations: int) -> tuple[float, float]:
    """(η, gain) with gain = loss(η) − base closest to `delta` among the points tried: a bracket
    [lo, hi] with gain(hi) ≥ Δ > gain(lo) grown or shrunk geometrically from `start`, then
    bisected in log η. (inf, the largest gain seen) when no η ≤ REACH × start reaches Δ."""
    tried: dict[float, float] = {}

    def gain(eta: float) -> float:
        tried[eta] = loss(eta) - base
        return tried[eta]

    hi = start
    if gain(hi) >= delta:  # shrink until the lower end falls short
        lo = hi / GROWTH
        while gain(lo) >= delta and len(tried) < evaluations:
            hi, lo = lo, lo / GROWTH
    else:  # grow until the upper end gets there
        lo = hi
        while True:
            if len(tried) >= evaluations or lo * GROWTH > REACH * start:
                return math.inf, max(tried.values())
            hi = lo * GROWTH
            if gain(hi) >= delta:
                break
            lo = hi
    while len(tried) < evaluations:
        mid = math.sqrt(lo * hi)
        if gain(mid) >= delta:
            hi = mid
        else:
            lo = mid
    eta = min(tried, key=lambda e: abs(tried[e] - delta))
    return eta, tried[eta]


@torch.no_grad()
def line_quantities(model: nn.Module, forget: Sequence[Mapping[str, Tensor]], retain: Sequence[Mapping[str, Tensor]],
                    groups: Sequence[Group], direction: Mapping[str, Tensor], delta: float, evaluations: int = 12,
                    bar=None, loss_fn: Callable = example_losses, reduce: Callable[[float, int], float] | None = None) -> dict[str, Tensor]:
    """{group: tensor([η, measured forget gain, measured retain damage])} (float64), the step
    along the mean forget gradient `direction` that raises the forget loss by `delta`; η = inf
    and damage = nan for a group that cannot get there."""
    named = dict(model.named_parameters())
    base_forget = _mean(model, forget, loss_fn, reduce)
    base_retain = _mean(model, retain, loss_fn, reduce)
    out = {}
    for g in groups:
        v = group_direction(g, direction, named)
        a = float(sum((x.double() ** 2).sum() for x in v.values()))
        if a > 0:
            eta, gain = search(lambda e: loss_along(model, v, e, forget, loss_fn, reduce), base_forget, delta, delta / a, evaluations)
        else:
            eta, gain = math.inf, 0.0
        damage = loss_along(model, v, eta, retain, loss_fn, reduce) - base_retain if math.isfinite(eta) else math.nan
        out[g.name] = torch.tensor([eta, gain, damage], dtype=torch.float64)
        if bar is not None:
            bar.update(1)
    return out
