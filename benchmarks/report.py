"""What every benchmark writes, written once: NAME.csv (the rows), NAME.json (the command that made
them, its settings, seconds, library versions and whatever the benchmark adds), NAME.md (the
generated tables, headed by the command) and NAME.png (its figure); and what several benchmarks
measure the same way (a command's peak memory)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from soir.io import atomic_path  # noqa: E402

if TYPE_CHECKING:  # importing this module stays light (no torch, no pandas): peak_rss_mb's parent process is small
    import pandas as pd


def command_line() -> str:
    """The command that is running, as a person would type it from the repository root."""
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(ROOT)
    except ValueError:
        pass
    return " ".join([".venv/bin/python", str(script), *sys.argv[1:]])


def mean_interval(values, confidence: float = 0.95, resamples: int = 4000, seed: int = 0) -> tuple[float, float]:
    """A percentile bootstrap interval of the mean of `values` (NaNs left out; NaN, NaN below two values)."""
    import numpy as np
    from scipy import stats

    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    if len(values) < 2:
        return (float("nan"), float("nan"))
    if np.ptp(values) == 0:
        return (float(values[0]), float(values[0]))
    interval = stats.bootstrap((values,), np.mean, confidence_level=confidence, method="percentile", n_resamples=resamples,
                               random_state=seed).confidence_interval
    return float(interval.low), float(interval.high)


def sign_flip_p(differences, resamples: int = 20000, seed: int = 0) -> float:
    """Two-sided p-value of "the mean paired difference is 0", by flipping signs at random (a paired
    permutation test; exact when 2^n ≤ `resamples`)."""
    import numpy as np
    from scipy import stats

    differences = np.asarray(differences, dtype=float)
    differences = differences[~np.isnan(differences)]
    if len(differences) == 0:
        return float("nan")
    return float(stats.permutation_test((differences,), np.mean, permutation_type="samples", alternative="two-sided",
                                        n_resamples=resamples, random_state=seed).pvalue)


def markdown_table(frame: pd.DataFrame, floats: str = ".3f") -> str:
    """`frame` as a pipe table: the levels of a multi-level index as columns, whole-number columns
    (integers that a missing value made floats) as integers, missing values blank."""
    import pandas as pd

    flat = frame.index.nlevels > 1
    if flat:
        frame = frame.reset_index()

    def cell(value, whole: bool):
        return None if pd.isna(value) else int(value) if whole else value

    columns = {}
    for i, (_, values) in enumerate(frame.items()):
        whole = pd.api.types.is_float_dtype(values) and values.notna().any() and bool((values.dropna() % 1 == 0).all())
        columns[i] = [cell(v, whole) for v in values]
    cells = pd.DataFrame(columns, dtype=object)
    cells.columns, cells.index = frame.columns, frame.index
    return cells.to_markdown(floatfmt=floats, missingval="", index=not flat)


def markdown(name: str, command: str, seconds: float | None, tables: Mapping[str, pd.DataFrame], notes: str = "") -> str:
    """NAME.md's text: the command that made the results, `notes`, then each table under its title."""
    took = f" in {seconds:.0f} s" if seconds is not None else ""
    text = [f"# {name}", "", f"Made by `{command}`{took}.", ""]
    if notes:
        text += [notes.strip(), ""]
    for title, table in tables.items():
        text += [f"## {title}", "", markdown_table(table), ""]
    return "\n".join(text)


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_results(out: str | Path, name: str, rows: pd.DataFrame, meta: Mapping, *, started: float,
                  tables: Mapping[str, pd.DataFrame] | None = None, figure: Callable[[Path], None] | None = None,
                  notes: str = "") -> dict[str, Path]:
    """Write NAME.{csv,json,md,png} under `out`, each atomically, and return their paths.

    `tables` are the generated summaries (title -> frame) that go into the markdown and, as
    records, into the JSON; `figure(path)` draws the PNG; `notes` is markdown put under the
    command.
    """
    from soir.runtime import versions

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {kind: out / f"{name}.{kind}" for kind in ("csv", "json", "md", "png")}
    command = command_line()
    with atomic_path(paths["csv"]) as tmp:
        rows.to_csv(tmp, index=False)
    tables = dict(tables or {})
    record = {"command": command, "seconds": round(time.perf_counter() - started, 1), **meta, "versions": versions(),
              "tables": {title: json.loads(t.reset_index().to_json(orient="records")) for title, t in tables.items()}}
    write_text(paths["json"], json.dumps(record, indent=2, default=str) + "\n")
    write_text(paths["md"], markdown(name, command, record["seconds"], tables, notes))
    if figure is not None:
        figure(paths["png"])
    else:
        del paths["png"]
    return paths


def write_markdown(out: str | Path, name: str, tables: Mapping[str, pd.DataFrame], notes: str = "") -> Path:
    """NAME.md for results already under `out`, headed by the command (and seconds) NAME.json records:
    the markdown of results written before this writer, without running them again."""
    record = json.loads((Path(out) / f"{name}.json").read_text())
    command = record.get("command") or "; ".join(record.get("commands", []))
    path = Path(out) / f"{name}.md"
    write_text(path, markdown(name, command, record.get("seconds"), tables, notes))
    return path


# Runs the command given as its arguments (stdout to /dev/null) and prints its peak RSS (KiB) and exit status.
# A process's ru_maxrss counts the memory of the process it was forked from (Linux keeps the old
# mm's high-water mark across fork and exec), so the command is forked from this small launcher,
# never from the caller, whose RSS (torch imported, a model built) would be a floor under every reading.
LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(usage.ru_maxrss, os.waitstatus_to_exitcode(status))
"""


def peak_rss_mb(command: list[str], threads: int = 2) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of a command run in a fresh process with `threads` OpenMP threads
    (its own rusage, from wait4, whatever the caller's memory); RuntimeError when it fails."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", LAUNCHER, *command], stdout=subprocess.PIPE, text=True, check=True,
                          env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    seconds = time.perf_counter() - start
    maxrss_kib, status = (int(x) for x in done.stdout.split())
    if status:
        raise RuntimeError(f"{' '.join(command)} failed with exit status {status}")
    return maxrss_kib / 1024, seconds
