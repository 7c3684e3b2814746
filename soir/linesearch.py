"""The `soir-line` quantity: the real cost of forgetting Δ with one group (docs/design.md §5).

`soir` extrapolates a quadratic model to a step η_S g_f,S that is often far outside where the
model holds (η up to 10⁴ on the testbed; benchmarks/taylor.py). The line search measures
instead: along g_f,S it evaluates the real forget loss until it has risen by Δ, and measures the
retain loss there. Forward passes only, no graph (inference memory).

- `line_quantities` (what `soir rank` runs): each split's forward is recorded once and a group's
  forwards start at its first block (`soir.curvature.RecordedForwards`, as `fd`'s); `solve`
  finds η by secant and Brent steps on √(gain/Δ) − 1 over log η from the median step of the
  last groups of the same role, to 10⁻⁶ in log η: 3–7 partial forwards of the forget split for
  a group that reaches Δ on the testbed, one of the retain split. With `replicas` K > 1, up to K
  groups of one block search side by side (`Search`, stepped from outside), each round of their
  evaluations one forward of K replicas (`RecordedForwards.totals`; `--line-batch`, default from
  `replica_count`).
- `reference_line_quantities`, `search`: the first way and the tests' reference, full forwards
  and a geometric bracket (×4) from the first-order step Δ / |g_f,S|², then bisection in
  log η, `evaluations` (12) forwards of the forget split per group.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Callable, Mapping, Sequence

import torch
from scipy.optimize import brentq
from torch import Tensor, nn

from soir.curvature import RecordedForwards, changed, free_memory_bytes, group_direction, split_loss
from soir.data import example_losses, n_examples
from soir.groups import Group
from soir.runtime import device_of, dtype_of

GROWTH = 4.0  # bracket growth per evaluation
REACH = 1e6  # give up beyond REACH × the first-order step


def loss_along(model: nn.Module, direction: Mapping[str, Tensor], eta: float, batches, loss_fn,
               reduce: Callable[[float, int], float] | None = None) -> float:
    """The split loss at θ_S + η v_S (through `reduce(mean, rows)` when given: the global mean
    under torchrun); the group's parameters are restored bit for bit."""
    with changed(dict(model.named_parameters()), direction, eta):
        return _mean(model, batches, loss_fn, reduce)


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
        if mid in tried:  # converged to the float spacing
            break
        if gain(mid) >= delta:
            hi = mid
        else:
            lo = mid
    eta = min(tried, key=lambda e: abs(tried[e] - delta))
    return eta, tried[eta]


FARTHEST = GROWTH ** math.floor(math.log(REACH) / math.log(GROWTH))  # the last point `search` tries, in first-order steps
TOLERANCE = 1e-6  # the width of η's final bracket in log η (relative in η)
PRIOR = 9  # the first guess: the median step, in first-order steps Δ/a, of the last PRIOR groups of the same role


class _Spent(Exception):
    """The line search has used its evaluations."""


class _Found(Exception):
    """The line search has its answer to the tolerance."""


def solve(gain: Callable[[float], float], a: float, delta: float, guess: float | None = None, evaluations: int = 12,
          tolerance: float = TOLERANCE) -> tuple[float, float, int]:
    """(η, gain(η), evaluations used): the η > 0 where gain(η) reaches Δ along a direction whose
    slope at 0 is a > 0, to `tolerance` in log η: `search`'s answer (its bisection run to the end)
    in fewer evaluations.

    It works on y(x) = √(gain / Δ) − 1 over x = log η: smooth, with slope ≈ 1 at the root where
    the quadratic term rules (√gain ∝ η), flat where the loss saturates (measured on the testbed:
    fewer evaluations than with log(gain / Δ) or gain / Δ − 1). From `guess` (default the
    first-order step Δ/a) secant steps on y, the first with slope 1 and none beyond 16× where y is
    flat, bracket the root. Upward, secant steps go on below Δ/a while the gain rises at least as
    √η; beyond, or where it flattens, the points are `search`'s grid Δ/a · 4^k, so a group that
    cannot reach Δ (its gain flattening below it) gets `search`'s verdict from the same points:
    (inf, the largest gain seen) when none up to the last, 4⁹ Δ/a, reaches Δ, or the evaluations
    run out first. Brent's method (`scipy.optimize.brentq`) then closes the bracket, and stops
    once it is narrower than `tolerance` or a point's |y| over the bracket's secant slope is below
    half of it. The answer is the point tried whose gain is closest to Δ, as in `search`."""
    first = math.log(delta / a)
    top = first + math.log(FARTHEST)
    tried: dict[float, float] = {}  # log η → gain

    def sides() -> tuple[float | None, float | None]:
        above = [k for k in tried if tried[k] >= delta]  # a nan gain falls short, as in `search`
        below = [k for k in tried if not tried[k] >= delta and (not above or k < min(above))]
        return (max(below) if below else None), (min(above) if above else None)

    def ratio(x: float) -> float:
        return math.sqrt(tried[x] / delta if tried[x] > 0 else 0.0) - 1.0

    def y(x: float) -> float:
        if x not in tried:
            if len(tried) >= evaluations:
                raise _Spent
            tried[x] = gain(math.exp(x))
            lo, hi = sides()
            if lo is not None and hi is not None:
                slope = (ratio(hi) - ratio(lo)) / (hi - lo)
                if hi - lo <= tolerance or abs(ratio(x)) <= 0.5 * tolerance * slope:
                    raise _Found
        return ratio(x)

    def rising(x: float, other: float | None) -> bool:  # d log gain / d log η ≥ ½ between two points
        if other is None:
            return True
        g, h = tried[x], tried[other]
        return g > 0 and h > 0 and (math.log(g) - math.log(h)) / (x - other) >= 0.5

    x = min(math.log(guess) if guess is not None and math.isfinite(guess) and guess > 0 else first, top)
    previous = None
    try:
        while True:  # bracket: lo with gain < Δ, hi with gain ≥ Δ
            y(x)
            lo, hi = sides()
            if lo is not None and hi is not None:
                break
            base = lo if hi is None else hi  # up from the highest point short of Δ, or down from the lowest past it
            if hi is None and base >= top:
                return math.inf, max(tried.values()), len(tried)
            slope = 1.0 if previous is None or previous == base else (ratio(base) - ratio(previous)) / (base - previous)
            step = -ratio(base) / slope if slope > 1e-3 else math.copysign(math.log(GROWTH), -ratio(base))
            step = max(-2 * math.log(GROWTH), min(step, 2 * math.log(GROWTH)))  # where y is flat the secant says little
            if hi is None:  # up: secant steps below Δ/a while the gain rises at least as √η, else search's grid
                k = max(0, math.floor((base - first) / math.log(GROWTH) + 1e-9) + 1)
                grid = min(first + k * math.log(GROWTH), top)
                x = min(base + max(step * 1.001, tolerance), grid) if base < first and rising(base, previous) else grid
            else:
                x = base + min(step * 1.001, -tolerance)
            if x in tried:  # no new point to try (rounding at the ends of the float range)
                raise _Spent
            previous = base
        brentq(y, lo, hi, xtol=tolerance, maxiter=evaluations, disp=False)
    except _Spent:
        if not any(g >= delta for g in tried.values()):
            return math.inf, max(tried.values()), len(tried)
    except _Found:
        pass
    x = min(tried, key=lambda k: abs(tried[k] - delta))
    return math.exp(x), tried[x], len(tried)


class _Need(Exception):
    """`solve` needs the gain at η, not known yet."""

    def __init__(self, eta: float):
        self.eta = eta


class Search:
    """One group's `solve`, stepped from outside: `ask()` gives the next η whose gain it needs (None
    once solved, with `result` then set) and `tell(η, gain)` gives it, so the searches of several
    groups can share each forward. It re-runs `solve` on the gains told so far: the same points
    and answer as `solve` on the gain function, with its cheap logic run ≤ `evaluations` times."""

    def __init__(self, a: float, delta: float, guess: float | None, evaluations: int, tolerance: float):
        self.args = (a, delta, guess, evaluations, tolerance)
        self.known: dict[float, float] = {}
        self.result: tuple[float, float, int] | None = None

    def _gain(self, eta: float) -> float:
        if eta not in self.known:
            raise _Need(eta)
        return self.known[eta]

    def ask(self) -> float | None:
        a, delta, guess, evaluations, tolerance = self.args
        try:
            self.result = solve(self._gain, a, delta, guess, evaluations, tolerance)
        except _Need as need:
            return need.eta
        return None

    def tell(self, eta: float, gain: float) -> None:
        self.known[eta] = gain


def replica_count(model: nn.Module, batches: Sequence[Mapping[str, Tensor]], budget_gib: float | None, at_most: int = 8) -> int:
    """How many groups' line searches share a forward by default (`--line-batch`): 1 on CPU, where a
    forward's cost per token does not fall with its batch (46.8–57.5 µs per token from 32 to 512
    rows on the testbed, issue 20); on an accelerator as many as the budget (default 90% of the free
    memory) holds beside the recorded block outputs, at most `at_most`, counting per replica the
    largest batch's float32 logits three times (logits, their float copy, the log-softmax) and
    eight hidden states."""
    device = device_of(model)
    if device.type == "cpu" or not batches:
        return 1
    budget = budget_gib * 2**30 if budget_gib is not None else 0.9 * free_memory_bytes(device)
    config = getattr(model, "config", None)
    vocab, hidden = getattr(config, "vocab_size", 0) or 0, getattr(config, "hidden_size", 0) or 0
    size = dtype_of(model).itemsize
    recorded = sum(b["input_ids"].numel() for b in batches) * hidden * size * (getattr(config, "num_hidden_layers", 0) or 0)
    per_replica = max(b["input_ids"].numel() for b in batches) * (3 * 4 * vocab + 8 * size * hidden)
    return max(1, min(at_most, int((budget - recorded) // max(per_replica, 1))))


@torch.no_grad()
def line_quantities(model: nn.Module, forget: Sequence[Mapping[str, Tensor]], retain: Sequence[Mapping[str, Tensor]],
                    groups: Sequence[Group], direction: Mapping[str, Tensor], delta: float, evaluations: int = 12,
                    bar=None, loss_fn: Callable = example_losses, reduce: Callable[[float, int], float] | None = None,
                    tolerance: float = TOLERANCE, guesses: Mapping[str, float] | None = None,
                    counts: dict[str, int] | None = None, replicas: int = 1) -> dict[str, Tensor]:
    """{group: tensor([η, measured forget gain, measured retain damage])} (float64): the
    step along the mean forget gradient `direction` that raises the forget loss by `delta`; η = inf
    and damage = nan for a group that cannot get there.

    Each split is run once with its block outputs recorded (`soir.curvature.RecordedForwards`); a
    group's forwards start at its first block. η is found by `solve` from `guesses[group]` (e.g.
    the `soir` η of the quadratic model, when c_f is at hand), else from the median η, in units of
    the first-order step Δ/a, of the last groups of the same role (`PRIOR`; neighbouring neurons,
    the same projection in other blocks), else of the last group. With `replicas` K > 1 the
    searches of up to K consecutive groups of one block run side by side (`Search`), each round of
    their evaluations one forward of K replicas (`RecordedForwards.totals`); a group's prior is
    then that of the groups finished when it starts, so η may differ from K = 1 within the
    tolerance. Groups outside the blocks (embeddings, head) run alone.
    `reference_line_quantities` is the full-forward path it is tested against. `counts`, when
    given, receives the forget evaluations per group."""
    named = dict(model.named_parameters())
    recorded = {"forget": RecordedForwards(model, forget, groups, loss_fn)}
    recorded["retain"] = RecordedForwards(model, retain, groups, loss_fn, recorded["forget"].starts)
    rows = {s: n_examples(batches) for s, batches in (("forget", forget), ("retain", retain))}
    starts = recorded["forget"].starts

    def mean(split: str, total: float) -> float:  # the split's mean loss from its sum (the global mean under torchrun)
        return total / rows[split] if reduce is None else reduce(total / rows[split], rows[split])

    def means(split: str, start: int, steps) -> list[float]:
        return [mean(split, t) for t in recorded[split].totals(start, steps)]

    base = {s: mean(s, recorded[s].base) for s in recorded}
    multipliers: dict[str, deque] = {}  # per role, η a / Δ of the last groups that reached Δ
    last = [1.0]  # the multiplier of the last group of any role
    out: dict[str, Tensor] = {}

    def begin(g: Group):
        v = group_direction(g, direction, named)
        a = float(sum((x.double() ** 2).sum() for x in v.values()))
        if not a > 0:
            return finish(g, (math.inf, 0.0, 0))
        guess = (guesses or {}).get(g.name)
        if not (guess is not None and math.isfinite(guess) and guess > 0):
            guess = (statistics.median(multipliers[g.role]) if multipliers.get(g.role) else last[0]) * delta / a
        return g, v, a, Search(a, delta, guess, evaluations, tolerance)

    def finish(g: Group, result: tuple[float, float, int], a: float = math.nan) -> None:
        eta, gain, used = result
        if math.isfinite(eta):
            last[0] = eta * a / delta
            multipliers.setdefault(g.role, deque(maxlen=PRIOR)).append(last[0])
        out[g.name] = torch.tensor([eta, gain, math.nan], dtype=torch.float64)
        if counts is not None:
            counts[g.name] = used
        if bar is not None:
            bar.update(1)

    for start, run in _runs(groups, starts, replicas):
        pending, active, damages = deque(run), [], []
        while pending or active:
            asks = []
            i = 0
            while i < len(active) or (pending and len(active) < replicas):
                if i == len(active):
                    slot = begin(pending.popleft())
                    if slot is None:
                        continue
                    active.append(slot)
                g, v, a, search = active[i]
                eta = search.ask()
                if eta is None:  # solved: its retain damage is measured with the others' below
                    finish(g, search.result, a)
                    if math.isfinite(float(out[g.name][0])):
                        damages.append((g, v))
                    active.pop(i)
                    continue
                asks.append((search, v, eta))
                i += 1
            if asks:
                for (search, _, eta), value in zip(asks, means("forget", start, [(v, eta) for _, v, eta in asks])):
                    search.tell(eta, value - base["forget"])
            while damages and (len(damages) >= replicas or not (pending or active)):
                chunk, damages = damages[:replicas], damages[replicas:]
                for (g, _), value in zip(chunk, means("retain", start, [(v, float(out[g.name][0])) for g, v in chunk])):
                    out[g.name][2] = value - base["retain"]
    return {g.name: out[g.name] for g in groups}


def _runs(groups: Sequence[Group], starts: Mapping[str, int], replicas: int):
    """(start, groups): consecutive groups of one block, which may share forwards; a group outside
    the blocks, or every group when `replicas` is 1, alone."""
    run: list[Group] = []
    for g in groups:
        if run and (replicas == 1 or g.layer is None or run[0].layer is None or starts[g.name] != starts[run[0].name]):
            yield starts[run[0].name], run
            run = []
        run.append(g)
    if run:
        yield starts[run[0].name], run


@torch.no_grad()
def reference_line_quantities(model: nn.Module, forget: Sequence[Mapping[str, Tensor]], retain: Sequence[Mapping[str, Tensor]],
                              groups: Sequence[Group], direction: Mapping[str, Tensor], delta: float, evaluations: int = 12,
                              bar=None, loss_fn: Callable = example_losses, reduce: Callable[[float, int], float] | None = None) -> dict[str, Tensor]:
    """`line_quantities` the first way, the reference it is tested against: full forwards of both
    splits per evaluation, `search` from the first-order step Δ/a for `evaluations` points."""
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
