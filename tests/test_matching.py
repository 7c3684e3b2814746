"""The operating-point search (analysis.matching) on hand-made monotone curves."""

from __future__ import annotations

import math

import pytest

from analysis.matching import find_operating_point


def forget_curve(rate: float) -> float:
    """A monotone forget accuracy: 0.9 at tiny rates, falling to 0.1 around rate 1e-2 (a logistic in log rate)."""
    return 0.1 + 0.8 / (1.0 + math.exp(3.0 * (math.log10(rate) + 2.0)))


def recorder(curve):
    def run(rate):
        return curve(rate), {"rate": rate}
    return run


@pytest.mark.parametrize("target", [0.2, 0.5, 0.8])
def test_stops_within_the_tolerance(target):
    point = find_operating_point(recorder(forget_curve), target, 1e-3, 1e-1, tol=0.01, max_runs=8)
    assert point.reached and point.reason == ""
    assert abs(point.value - target) <= 0.01
    assert point.value == forget_curve(point.lr) and point.result == {"rate": point.lr}
    assert point.n_runs <= 8 and point.runs[-1] == (point.lr, point.value)


def test_moves_the_bracket_when_the_target_lies_outside_it():
    point = find_operating_point(recorder(forget_curve), 0.5, 1e-6, 1e-5, tol=0.01, max_runs=8)
    assert point.reached and min(r for r, _ in point.runs) == 1e-6 and point.lr > 1e-5


def test_increasing_metrics():
    point = find_operating_point(recorder(lambda r: 1.0 - forget_curve(r)), 0.6, 1e-3, 1e-1, decreasing=False)
    assert point.reached and abs(point.value - 0.6) <= 0.01


def test_says_so_when_the_target_cannot_be_reached():
    point = find_operating_point(recorder(forget_curve), 0.05, 1e-3, 1e-1, tol=0.01, max_runs=5)  # the curve never falls below 0.1
    assert not point.reached and point.n_runs == 5
    assert "short of the target even at the highest rate" in point.reason
    assert point.value == min(v for _, v in point.runs)  # the closest run is still returned, to be counted
    past = find_operating_point(recorder(lambda r: 0.0), 0.5, 1e-3, 1e-1, max_runs=4)
    assert not past.reached and "past the target even at the lowest rate" in past.reason


def test_a_step_curve_runs_out_of_runs_and_says_so():
    point = find_operating_point(recorder(lambda r: 0.9 if r < 1e-2 else 0.1), 0.5, 1e-3, 1e-1, tol=0.01, max_runs=6)
    assert not point.reached and "after 6 runs" in point.reason and point.n_runs == 6


def test_rejects_a_bad_bracket():
    with pytest.raises(ValueError):
        find_operating_point(recorder(forget_curve), 0.5, 1e-1, 1e-3)
