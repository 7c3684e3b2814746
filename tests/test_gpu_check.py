"""benchmarks/gpu_check.py at tiny shapes on CPU: every planned stage runs and is recorded, and a
stage that outruns its time budget stops, says so, and the next stage starts from a fresh model."""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_check", module)  # its dataclasses look their module up while it runs
    spec.loader.exec_module(module)
    return module


def run_check(out: Path, *options: str) -> tuple[pd.DataFrame, dict]:
    done = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--out", str(out), *options], capture_output=True, text=True,
                          timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return pd.read_csv(out / "gpu_check.csv"), json.loads((out / "gpu_check.json").read_text())


def test_tiny_check_records_every_stage(tmp_path, check):
    table, meta = run_check(tmp_path)
    plans = [check.parse_run(spec) for spec in check.TINY_RUNS]
    planned = [(p.name, stage) for p in plans for stage in ("build", *(s.name for s in p.stages))]
    assert list(zip(table["run"], table["stage"])) == planned
    assert set(table["stage"]) == {"build", *check.STAGES}
    assert (table["status"] == "ok").all(), table[["run", "stage", "status"]].to_string()
    assert (table["wall_s"] > 0).all()
    assert meta["device"]["device"] == "cpu" and meta["device"]["device_name"] == "cpu"
    assert (table["device"] == "cpu").all() and table["torch"].notna().all() and table["transformers"].notna().all()
    assert len(meta["rows"]) == len(planned)
    assert (tmp_path / "gpu_check.png").stat().st_size > 0

    ranks = table[table["stage"].str.startswith("rank-")]
    # ggn ranks every group, and so does soir-line through --shortlist (its line search on a shortlist only)
    whole = ranks["method"].isin(["ggn", "soir-line", "soir-line-k1"])
    assert (ranks.loc[whole, "n_groups"] == ranks.loc[whole, "n_groups_total"]).all()
    line = ranks["method"].str.startswith("soir-line")
    assert ranks.loc[line, "note"].str.contains("--shortlist").all()
    # on CPU the default --line-batch is 1, and the k1 row says it set 1 itself
    assert (ranks.loc[line, "line_batch"] == 1).all()
    assert ranks.loc[ranks["method"] == "soir-line-k1", "note"].str.contains("--line-batch 1").all()
    # hvp and fd rank the 7 tensors of the first and of the last block
    assert (ranks.loc[~whole, "n_groups"] == 14).all() and (ranks.loc[~whole, "n_groups_total"] > 14).all()
    # the extrapolation to every group adds the per-group cost of the groups left out
    rows = {(r["run"], r["stage"]): r for r in meta["rows"]}
    for (run, stage), row in rows.items():
        if stage.startswith("rank-"):
            timings = row["timings_s"]
            assert row["extrapolated_all_groups_s"] >= timings["total"] - 0.01
    unlearned = [r for r in meta["rows"] if r["stage"] == "unlearn"]
    assert all(r["steps"] == check.TINY_WORKLOAD.unlearn_steps for r in unlearned)
    assert all(0 < r["mask_fraction"] <= check.TINY_WORKLOAD.mask_fraction for r in unlearned)
    assert all("rank-ggn ranking" in r["note"] or "rank-fd ranking" in r["note"] for r in unlearned)


def test_stage_stops_at_its_time_budget(check, tmp_path, one_thread):
    import torch

    plan = check.parse_run("tiny-1b:float32:rank-hvp=0.001,unlearn=120")
    results = tmp_path / "rows.jsonl"
    try:
        check.ModelCheck(plan, check.TINY_WORKLOAD, torch.device("cpu"), time.time() + 300, results, {"device": "cpu"}, False).execute()
    finally:
        gc.unfreeze()  # execute() freezes what exists for its worker process; this is pytest's
    rows = {r["stage"]: r for r in map(json.loads, results.read_text().splitlines())}
    assert list(rows) == ["build", "rank-hvp", "unlearn"]
    assert rows["rank-hvp"]["status"].startswith("stopped at time budget") and rows["rank-hvp"]["wall_s"] < 5
    assert rows["unlearn"]["status"] == "ok"
    note = rows["unlearn"]["note"]
    assert "built again" in note and "--score random" in note  # no ranking finished, so the mask came from a random one


def test_time_budget_interrupts_and_disarms(check):
    started = time.perf_counter()
    with pytest.raises(check.StageStopped, match="stopped at time budget"):
        with check.time_budget(0.05):
            while time.perf_counter() - started < 5:
                pass
    assert time.perf_counter() - started < 2
    with check.time_budget(0.05):
        pass
    time.sleep(0.1)  # the timer is off once the stage is over: nothing is raised here


def test_unreported_stages_of_a_killed_worker(check):
    plan = check.parse_run("tiny-7b:bfloat16:rank-ggn,unlearn,evaluate")
    rows = check.missing_rows(plan, {(plan.name, "build"), (plan.name, "rank-ggn")}, "stopped at time budget (killed)")
    assert [r["stage"] for r in rows] == ["unlearn", "evaluate"]
    assert all(r["status"] == "stopped at time budget (killed)" and r["layers"] == 3 for r in rows)


def test_evaluate_without_rouge_times_generation_and_says_why(check, monkeypatch, tmp_path, one_thread):
    import torch

    monkeypatch.setattr(check, "rouge_missing", lambda: "rouge_score cannot be imported (test)")
    plan = check.parse_run("tiny-1b:float32:evaluate")
    model = check.ModelCheck(plan, check.TINY_WORKLOAD, torch.device("cpu"), time.time() + 120, tmp_path / "rows.jsonl", {}, False)
    model.prepare()
    model.build()
    extras = model.evaluate("")
    assert "ROUGE skipped: rouge_score cannot be imported (test)" in extras["note"]
    assert extras["metrics"]["forget/rouge_l_recall"] is None and extras["metrics"]["forget/loss"] > 0
