"""Matched operating points: the learning rate at which a run reaches a target (docs/design.md §9).

Comparing two selections at one learning rate compares two different amounts of forgetting.
`find_operating_point` searches the rate (in log space) at which a run's validation forget
metric is within `tol` of a target, so selections are compared at equal forget: it brackets
the target (moving the bracket by `expand`× while it is not), then narrows it by
interpolation in log rate, at most `max_runs` runs in all. A search that cannot get there
says so and why, and still returns its closest run: such a run is counted, never dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class OperatingPoint:
    """The outcome of a search: the chosen run and every run it took."""

    target: float
    tol: float
    lr: float  # the chosen run's rate (the closest one when the target was not reached)
    value: float  # its metric
    reached: bool
    reason: str  # why the target was not reached ('' when it was)
    runs: list[tuple[float, float]] = field(default_factory=list)  # (rate, metric), in the order they ran
    result: Any = None  # what the chosen run returned

    @property
    def n_runs(self) -> int:
        return len(self.runs)


def find_operating_point(run: Callable[[float], tuple[float, Any]], target: float, lo: float, hi: float, *, tol: float = 0.01,
                         max_runs: int = 8, expand: float = 10.0, decreasing: bool = True) -> OperatingPoint:
    """Search the rate in [lo, hi] (moved outward as needed) at which `run(rate)`'s metric is within `tol` of `target`.

    `run(rate)` returns (metric, anything to keep); the metric must move monotonically with the
    rate, down when `decreasing` (forget accuracy falls as the rate grows) and up otherwise.
    """
    if not 0 < lo < hi:
        raise ValueError(f"the rate bracket must satisfy 0 < lo < hi, got {lo}, {hi}")
    sign = 1.0 if decreasing else -1.0
    runs: list[tuple[float, float]] = []
    results: dict[float, Any] = {}

    def measure(rate: float) -> float:
        value, results[rate] = run(rate)
        runs.append((rate, float(value)))
        return sign * (float(value) - target)  # > 0: not yet forgotten enough (for decreasing metrics)

    def done(reached: bool, reason: str = "") -> OperatingPoint:
        rate, value = min(runs, key=lambda r: abs(r[1] - target))
        return OperatingPoint(target, tol, rate, value, reached, reason, runs, results[rate])

    low, high = math.log(lo), math.log(hi)
    f_low = measure(lo)
    if abs(f_low) <= tol:
        return done(True)
    f_high = measure(hi)
    if abs(f_high) <= tol:
        return done(True)
    # bracket: f(low) > 0 (short of the target) and f(high) < 0 (past it)
    while not (f_low > 0 > f_high):
        if len(runs) >= max_runs:
            side = "past the target even at the lowest rate tried" if f_low < 0 else "short of the target even at the highest rate tried"
            return done(False, f"{side} ({min(r for r, _ in runs):.3g}…{max(r for r, _ in runs):.3g}, {len(runs)} runs)")
        if f_low <= 0:  # already past the target: lower the rates
            high, f_high = low, f_low
            low -= math.log(expand)
            f_low = measure(math.exp(low))
        else:  # still short at the highest rate: raise them
            low, f_low = high, f_high
            high += math.log(expand)
            f_high = measure(math.exp(high))
        if abs(runs[-1][1] - target) <= tol:
            return done(True)
    while len(runs) < max_runs:
        # interpolate in log rate, kept inside the middle 80% of the bracket so a flat side cannot stall it
        t = min(max(f_low / (f_low - f_high), 0.1), 0.9)
        middle = low + t * (high - low)
        f_middle = measure(math.exp(middle))
        if abs(f_middle) <= tol:
            return done(True)
        if f_middle > 0:
            low, f_low = middle, f_middle
        else:
            high, f_high = middle, f_middle
    return done(False, f"not within ±{tol:g} of {target:g} after {max_runs} runs (closest {min(abs(v - target) for _, v in runs):.3f} away)")
