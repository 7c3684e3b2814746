"""The statistics the evidence benchmarks report (benchmarks/report.py) and the localization
benchmark's subject split and paired differences (benchmarks/localization.py), on hand-made cases."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from localization import first_seen, halve_by_subject, paired, summary  # noqa: E402
from report import mean_interval, sign_flip_p  # noqa: E402


def test_sign_flip_p_is_exact_on_small_samples():
    # three equal differences: of the 8 sign patterns only all-plus and all-minus reach |mean| = 1
    assert sign_flip_p([1.0, 1.0, 1.0]) == pytest.approx(2 / 8)
    # 0.3 -0.1 0.2 0.5 0.1 (mean 0.2): 6 of the 32 patterns have |mean| >= 0.2
    values = np.array([0.3, -0.1, 0.2, 0.5, 0.1])
    patterns = np.array(np.meshgrid(*[[-1, 1]] * 5)).reshape(5, -1).T
    expected = np.mean(np.abs((patterns * values).mean(1)) >= 0.2 - 1e-12)
    assert sign_flip_p(values) == pytest.approx(expected) == pytest.approx(6 / 32)
    assert np.isnan(sign_flip_p([]))


def test_mean_interval_brackets_the_mean_and_narrows_with_more_data():
    rng = np.random.default_rng(0)
    few, many = rng.normal(1.0, 1.0, 10), rng.normal(1.0, 1.0, 1000)
    lo_few, hi_few = mean_interval(few)
    lo_many, hi_many = mean_interval(many)
    assert lo_few < few.mean() < hi_few and lo_many < many.mean() < hi_many
    assert hi_many - lo_many < (hi_few - lo_few) / 3  # ~ 1/sqrt(n)
    assert mean_interval([0.5, 0.5, 0.5]) == (0.5, 0.5)
    assert all(np.isnan(mean_interval([1.0])))


def test_halves_share_no_subject_and_split_each_kind():
    ids = [f"{kind}{i:04d}{row}" for kind in "pdr" for i in range(4) for row in ("sc1", "qa0", "qa1")]
    halves = halve_by_subject(pd.DataFrame({"id": ids, "input": "x", "output": "y"}))
    first, second = (set(h["id"].str[:5]) for h in (halves["val"], halves["test"]))
    assert not first & second and len(first) == len(second) == 6
    assert {s[0] for s in first} == {s[0] for s in second} == set("pdr")


def test_paired_differences_by_hand():
    # one testbed, two subjects; soir beats the mean of two random masks by 0.1 and 0.3, the full model by 0.2 and 0.2
    rows = []
    for subject, soir, randoms, full in (("p0001", 0.9, (0.7, 0.9), 0.7), ("p0002", 0.8, (0.4, 0.6), 0.6)):
        rows.append({"localizer": "soir", "budget": 0.1, "unlearn_seed": 0, "subject": subject, "correct": soir * 10})
        rows += [{"localizer": "random", "budget": 0.1, "unlearn_seed": i, "subject": subject, "correct": r * 10} for i, r in enumerate(randoms)]
        rows.append({"localizer": "full model", "budget": 1.0, "unlearn_seed": 0, "subject": subject, "correct": full * 10})
    subjects = pd.DataFrame(rows).assign(variant="default", testbed="default-s0", answer_tokens=10)
    diffs = paired(subjects).set_index(["localizer", "against"])
    assert diffs.loc[("soir", "random"), "difference"] == pytest.approx(0.2)
    assert diffs.loc[("soir", "full model"), "difference"] == pytest.approx(0.2)
    assert diffs.loc[("random", "full model"), "difference"] == pytest.approx(0.0)
    assert diffs.loc[("soir", "random"), "units"] == 2
    assert ("random", "random") not in diffs.index
    chosen = pd.DataFrame([{"variant": "default", "localizer": "soir", "budget": 0.1, "reached": True, "runs": 3, "val_forget": 0.5,
                            "test_forget": 0.52, "heldout_retain": 0.85, "unlearn_retain": 0.9, "general": 0.8, "lr": 0.05}])
    table = summary(chosen, subjects)
    assert table.loc[0, "reached"] == 1 and table.loc[0, "held-out retain"] == pytest.approx(0.85)
    assert table.loc[0, "per subject"] == pytest.approx(0.85)  # soir's two subjects: 0.9 and 0.8


def test_revert_selectivity_by_hand(tmp_path):
    from localization import revert_selectivity

    # four groups: one holds only forget knowledge (f 1, r 0), one both alike, two retain-led
    table = pd.DataFrame({"group": list("abcd"), "rank": [1, 2, 3, 4], "forget_rise": [1.0, 0.5, 0.1, 0.2],
                          "retain_rise": [0.0, 0.5, 0.3, 0.6], "testbed": "bed"})
    table.to_parquet(tmp_path / "bed_revert_tensor.parquet")
    row = revert_selectivity(tmp_path).iloc[0]
    assert row["granularity"] == "tensor" and row["groups"] == 4
    assert row["max selectivity"] == pytest.approx(1.0) and row["top 10% selectivity"] == pytest.approx(1.0)
    assert row["median selectivity"] == pytest.approx(np.median([1.0, 0.0, -0.5, -0.5]))
    assert row["share f > r"] == pytest.approx(0.25)


def test_merge_keeps_a_search_only_from_the_first_run_that_has_it():
    def search(localizer, budget, unlearn_seed, lr):
        return {"variant": "default", "testbed": "t0", "localizer": localizer, "budget": budget, "mask_seed": -1,
                "unlearn_seed": unlearn_seed, "lr": lr}
    seen = {("default", "t0", "full model", 1.0, -1, 0)}  # an earlier run searched the full model with unlearning seed 0
    later = pd.DataFrame([search("full model", 1.0, 0, 1e-3), search("full model", 1.0, 0, 1e-2), search("full model", 1.0, 1, 1e-3),
                          search("soir", 0.01, 0, 1e-3)])
    kept = first_seen(later, seen)
    assert kept[["localizer", "unlearn_seed", "lr"]].values.tolist() == [["full model", 1, 1e-3], ["soir", 0, 1e-3]]
