"""benchmarks/report.py, the writer every benchmark shares: what NAME.{csv,json,md,png} hold, how its
markdown tables show numbers, the markdown of results written before it, and a command's peak memory."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from report import markdown_table, peak_rss_mb, write_markdown, write_results  # noqa: E402


def test_write_results_writes_rows_command_meta_tables_and_figure(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["benchmarks/example.py", "--steps", "3"])
    rows = pd.DataFrame({"method": ["a", "b"], "lr": [1e-3, 1e-2], "forget": [0.5, math.nan]})
    summary = rows.set_index("method")[["forget"]]
    drawn = []
    paths = write_results(tmp_path, "example", rows, {"settings": {"steps": 3}}, started=time.perf_counter(),
                          tables={"Forget": summary}, figure=lambda path: (drawn.append(path), path.write_bytes(b"png")), notes="A note.")

    assert {k: p.name for k, p in paths.items()} == {"csv": "example.csv", "json": "example.json", "md": "example.md", "png": "example.png"}
    assert drawn == [tmp_path / "example.png"]
    pd.testing.assert_frame_equal(pd.read_csv(paths["csv"]), rows)
    record = json.loads(paths["json"].read_text())
    assert record["command"] == ".venv/bin/python benchmarks/example.py --steps 3"
    assert record["settings"] == {"steps": 3} and record["seconds"] >= 0 and "torch" in record["versions"]
    assert record["tables"] == {"Forget": [{"method": "a", "forget": 0.5}, {"method": "b", "forget": None}]}
    text = paths["md"].read_text()
    assert "Made by `.venv/bin/python benchmarks/example.py --steps 3`" in text and "A note." in text and "## Forget" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["example.csv", "example.json", "example.md", "example.png"]  # no temporaries left


def test_without_figure_there_is_no_png(tmp_path):
    paths = write_results(tmp_path, "plain", pd.DataFrame({"x": [1]}), {}, started=time.perf_counter())
    assert "png" not in paths and not (tmp_path / "plain.png").exists()


def lines(text: str) -> list[list[str]]:
    """The cells of a pipe table, row by row, without the separator line."""
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if not set(line) <= set("|:- ")]


def test_markdown_table_shows_whole_numbers_as_integers_and_missing_values_blank():
    frame = pd.DataFrame({"params": [786432.0, math.nan], "share": [0.25, 1.0], "name": ["x", None]},
                         index=pd.Index(["a", "b"], name="size"))
    assert lines(markdown_table(frame)) == [["size", "params", "share", "name"], ["a", "786432", "0.250", "x"], ["b", "", "1.000", ""]]


def test_markdown_table_spreads_a_multi_level_index_into_columns():
    frame = pd.DataFrame({"size": ["1b", "1b"], "mask": ["full", "tensor"], "mib": [5046.5, 2892.25]}).set_index(["size", "mask"])
    assert lines(markdown_table(frame)) == [["size", "mask", "mib"], ["1b", "full", "5046.500"], ["1b", "tensor", "2892.250"]]


def test_write_markdown_heads_existing_results_with_their_recorded_commands(tmp_path):
    (tmp_path / "old.json").write_text(json.dumps({"commands": ["python old.py --a", "python old.py --b"]}))
    path = write_markdown(tmp_path, "old", {"Rows": pd.DataFrame({"x": [1, 2]})})
    text = path.read_text()
    assert "Made by `python old.py --a; python old.py --b`." in text and "## Rows" in text


def test_peak_rss_mb_sees_what_the_command_allocates_and_a_failure_raises():
    small, _ = peak_rss_mb([sys.executable, "-c", "pass"])
    large, seconds = peak_rss_mb([sys.executable, "-c", "b = bytearray(200 * 2**20); b[::4096] = b'x' * len(b[::4096])"])
    assert large - small >= 190 and seconds > 0
    with pytest.raises(RuntimeError, match="exit status 3"):
        peak_rss_mb([sys.executable, "-c", "import sys; sys.exit(3)"])
