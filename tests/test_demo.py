"""`soir demo` as the whole study: every stage's artifacts and every report section, on the smallest
configuration; a run killed mid-way continues without redoing finished stages; a damaged output is redone."""

from __future__ import annotations

import pandas as pd
import pytest

import analysis.demo as demo
from analysis.demo import StudyRecipe, study

pytestmark = pytest.mark.usefixtures("one_thread")

STAGES = ["data", "base", "finetuned", "oracle", "shift", "rankings", "unlearning", "evaluation", "curves", "probes", "report"]
SECTIONS = ["## The testbed", "## Where finetuning moved the weights", "## Rankings", "## Unlearning", "## Layer robustness",
            "## Robustness probes", "## Reading the results"]


def stage_of(line: str) -> str:
    return line.split("]", 1)[1].split()[0]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    lines = []
    study(out, StudyRecipe.smallest(), progress=False, echo=lines.append)
    return out, lines


def test_every_stage_runs_once_and_writes_its_artifacts(first_run):
    out, lines = first_run
    assert [stage_of(line) for line in lines] == STAGES and not any("reused" in line for line in lines)
    for path in ("data/forget.parquet", "data/pretrain.parquet", "base/model.safetensors", "finetuned/model.safetensors",
                 "oracle/model.safetensors", "shift/shift.parquet", "rankings/soir/ranking.parquet", "rankings/random/ranking.parquet",
                 "rankings/selections.json", "compare/compare.parquet", "unlearned/graddiff-soir/model.safetensors",
                 "unlearned/graddiff-random/model.safetensors", "unlearned/graddiff-full/model.safetensors", "eval/summary.parquet",
                 "eval/oracle/metrics.json", "eval/graddiff-soir/per_example.parquet", "curves/curves.parquet", "curves/summary.parquet",
                 "probes/summary.parquet", "report.md"):
        assert (out / path).is_file(), path
    for figure in ("shift.png", "compare.png", "unlearning.png", "curves.png", "pareto.png"):
        assert (out / "figures" / figure).stat().st_size > 5_000, figure
    report = (out / "report.md").read_text()
    assert all(section in report for section in SECTIONS)
    assert all(f"(figures/{figure})" in report for figure in ("shift.png", "compare.png", "unlearning.png", "curves.png", "pareto.png"))
    # the table shows every model's forget quality, p-values below 1e-3 in scientific notation (never 0.000)
    summary = pd.read_parquet(out / "eval" / "summary.parquet")
    row = next(line for line in report.splitlines() if line.startswith("| forget quality"))
    cells = [cell.strip() for cell in row.strip("|").split("|")][1:]
    assert len(cells) == len(summary)
    for value, cell in zip(summary["forget quality"], cells):
        assert float(cell) == pytest.approx(value, rel=0.06, abs=5e-4) and ("e-" in cell) == (0 < value < 1e-3), (value, cell)


def test_a_killed_run_continues_without_redoing_finished_stages(first_run, tmp_path, monkeypatch):
    out, _ = first_run
    import shutil

    copy = tmp_path / "demo"
    shutil.copytree(out, copy)
    for stage in ("evaluation", "curves", "probes", "report"):  # as if killed during `evaluation`
        (copy / ".stages" / f"{stage}.json").unlink()
    shutil.rmtree(copy / "eval" / "graddiff-full")

    calls = []
    real = demo.evaluation_stage

    def counting(*args, **kwargs):
        calls.append("evaluation")
        return real(*args, **kwargs)

    monkeypatch.setattr(demo, "evaluation_stage", counting)
    lines = []
    study(copy, StudyRecipe.smallest(), progress=False, echo=lines.append)
    reused = [stage_of(line) for line in lines if "reused" in line]
    assert reused == STAGES[:7] and calls == ["evaluation"]
    assert (copy / "eval" / "graddiff-full" / "metrics.json").is_file()


def test_a_damaged_output_is_redone(first_run, tmp_path):
    out, _ = first_run
    import shutil

    copy = tmp_path / "demo"
    shutil.copytree(out, copy)
    weights = copy / "oracle" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a copy cut short
    lines = []
    study(copy, StudyRecipe.smallest(), progress=False, echo=lines.append)
    redone = [stage_of(line) for line in lines if "reused" not in line]
    assert redone == ["oracle"]
    assert demo.intact(copy / "oracle")
