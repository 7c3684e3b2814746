"""What every benchmark writes, written once: NAME.csv (the rows), NAME.json (the command that made
them, its settings, seconds, library versions and whatever the benchmark adds), NAME.md (the
generated tables, headed by the command) and NAME.png (its figure)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Callable, Mapping

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from soir.runtime import versions  # noqa: E402


def command_line() -> str:
    """The command that is running, as a person would type it from the repository root."""
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(ROOT)
    except ValueError:
        pass
    return " ".join([".venv/bin/python", str(script), *sys.argv[1:]])


def markdown_table(frame: pd.DataFrame, floats: str = ".3f") -> str:
    return frame.to_markdown(floatfmt=floats)


def write_results(out: str | Path, name: str, rows: pd.DataFrame, meta: Mapping, *, started: float,
                  tables: Mapping[str, pd.DataFrame] | None = None, figure: Callable[[Path], None] | None = None,
                  notes: str = "") -> dict[str, Path]:
    """Write NAME.{csv,json,md,png} under `out` and return their paths.

    `tables` are the generated summaries (title -> frame) that go into the markdown and, as
    records, into the JSON; `figure(path)` draws the PNG; `notes` is markdown put under the
    command.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {kind: out / f"{name}.{kind}" for kind in ("csv", "json", "md", "png")}
    command = command_line()
    rows.to_csv(paths["csv"], index=False)
    tables = dict(tables or {})
    record = {"command": command, "seconds": round(time.perf_counter() - started, 1), **meta, "versions": versions(),
              "tables": {title: json.loads(t.reset_index().to_json(orient="records")) for title, t in tables.items()}}
    paths["json"].write_text(json.dumps(record, indent=2, default=str) + "\n")
    text = [f"# {name}", "", f"Made by `{command}` in {record['seconds']:.0f} s.", ""]
    if notes:
        text += [notes.strip(), ""]
    for title, table in tables.items():
        text += [f"## {title}", "", markdown_table(table), ""]
    paths["md"].write_text("\n".join(text))
    if figure is not None:
        figure(paths["png"])
    else:
        del paths["png"]
    return paths
