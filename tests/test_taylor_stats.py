"""benchmarks/taylor.py's statistics on hand-made cases: Spearman with its stratified bootstrap,
one truth per group from several unlearning seeds, and the seeds' agreement."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from taylor import per_group, reliability, spearman, spearman_with_interval  # noqa: E402


def test_spearman_matches_scipy_with_ties_and_is_nan_when_constant():
    x, y = np.array([1, 2, 2, 3, 5, 4.0]), np.array([0.1, 0.3, 0.2, 0.2, 0.9, 0.4])
    assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic)
    assert np.isnan(spearman(x, np.ones(6)))


def test_interval_of_a_perfect_and_of_a_reversed_ranking():
    truth = np.arange(10.0)
    point, lo, hi = spearman_with_interval([np.arange(1, 11)[None, :]], [truth], draws=200)
    assert (point, lo, hi) == pytest.approx((1.0, 1.0, 1.0))  # every resample is still perfectly ordered
    point, lo, hi = spearman_with_interval([np.arange(10, 0, -1)[None, :], np.arange(1, 11)[None, :]], [truth, truth], draws=200)
    assert (point, lo, hi) == pytest.approx((0.0, 0.0, 0.0))  # the mean over two testbeds: -1 and +1


def test_interval_over_draws_brackets_their_mean():
    rng = np.random.default_rng(0)
    truth = np.arange(20.0)
    draws = np.array([rng.permutation(20) + 1 for _ in range(50)])
    point, lo, hi = spearman_with_interval([draws], [truth], draws=500)
    assert point == pytest.approx(np.mean([spearmanr(d, truth).statistic for d in draws]))
    assert lo < point < hi and lo < 0 < hi


def searches() -> pd.DataFrame:
    rows = []
    for seed, (a, b, c) in enumerate(((0.1, 0.2, 0.3), (0.3, 0.4, 0.2))):
        for group, damage, reached in (("a", a, True), ("b", b, True), ("c", c, seed == 0)):
            rows.append({"testbed": "bed", "seed": seed, "group": group, "n_params": 4, "target": 0.5, "reached": reached, "runs": 3,
                         "lr": 0.01 * (seed + 1), "heldout_forget_accuracy": 0.5, "retain_accuracy_drop": damage,
                         "retain_loss_rise": 10 * damage, "why_not": "" if reached else "short"})
    return pd.DataFrame(rows)


def test_per_group_averages_seeds_and_a_group_missed_by_one_seed_is_unreachable():
    table = per_group(searches()).set_index("group")
    assert table.loc["a", "retain_accuracy_drop"] == pytest.approx(0.2) and table.loc["b", "retain_loss_rise"] == pytest.approx(3.0)
    assert table.loc["a", "lr"] == pytest.approx(np.sqrt(0.01 * 0.02)) and table.loc["a", "runs"] == 6
    assert not table.loc["c", "reached"] and table.loc["c", "seeds_reached"] == "1/2" and table.loc["c", "why_not"] == "short"
    assert table.loc["a", "reached"] and table.loc["a", "why_not"] == ""


def test_reliability_uses_the_groups_both_seeds_reached():
    row = reliability(searches()).loc[("bed", 1)]
    assert row["groups"] == 2  # c was missed by seed 1
    assert np.isnan(row.iloc[1])  # two groups: too few for a rank correlation
    more = pd.concat([searches(), searches().assign(testbed="x")])
    more.loc[more.group == "c", "reached"] = True
    agreement = reliability(more).loc[("bed", 1)]
    assert agreement["groups"] == 3
    assert agreement.iloc[1] == pytest.approx(spearmanr([0.1, 0.2, 0.3], [0.3, 0.4, 0.2]).statistic)
