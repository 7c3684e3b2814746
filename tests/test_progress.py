"""Progress bars: a bar on a terminal; off a terminal (a file, a pipe, captured output) a few plain
lines, at the start, at each tenth of the total and at the end, and never a carriage return."""

from __future__ import annotations

import io
import math
import os
import re
import subprocess
import sys

import pytest

from soir.runtime import ProgressBar, tqdm


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def counts(text: str, total: int) -> list[int]:
    """The `n` of each plain line (`desc: 40% 20/50 [...]`)."""
    return [int(n) for n in re.findall(rf"(\d+)/{total} ", text)]


def tenths(total: int, start: int = 0) -> list[int]:
    """Where the lines fall: the start, the first count reaching each further tenth, the end."""
    marks = [math.ceil(k * total / 10) for k in range(1, 10)]
    return [start] + [m for m in marks if m > start] + [total]


def test_stages_import_the_log_friendly_bar():
    assert tqdm is ProgressBar


@pytest.mark.parametrize("total", [50, 23])
def test_off_a_terminal_a_bar_writes_a_line_at_the_start_each_tenth_and_the_end(total):
    stream = io.StringIO()
    bar = tqdm(total=total, desc="train", unit="step", file=stream)
    for step in range(total):
        bar.set_postfix(loss=f"{1 / (step + 1):.4f}", refresh=False)
        bar.update(1)
    bar.close()
    text = stream.getvalue()
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    assert all(line.startswith("train: ") for line in lines)
    assert counts(text, total) == tenths(total)  # 0, 3, 5, 7, 10, 12, 14, 17, 19, 21, 23 for 23 steps
    assert lines[-1].startswith("train: 100% ") and f"loss={1 / total:.4f}" in lines[-1]


def test_iterating_fewer_items_than_tenths_writes_one_line_per_item_and_one_end_line():
    stream = io.StringIO()
    assert list(tqdm(range(7), desc="items", file=stream)) == list(range(7))
    assert counts(stream.getvalue(), 7) == [0, 1, 2, 3, 4, 5, 6, 7]


def test_a_resumed_bar_starts_where_it_resumed():
    stream = io.StringIO()
    with tqdm(total=50, initial=23, file=stream) as bar:
        for _ in range(27):
            bar.update(1)
    assert counts(stream.getvalue(), 50) == tenths(50, start=23) == [23, 25, 30, 35, 40, 45, 50]


def test_a_bar_closed_early_ends_with_where_it_stopped():
    stream = io.StringIO()
    bar = tqdm(total=40, file=stream)
    bar.update(13)
    bar.close()
    assert counts(stream.getvalue(), 40) == [0, 13]


def test_without_a_total_a_bar_writes_its_start_and_its_end():
    stream = io.StringIO()
    for _ in tqdm(iter(range(30)), desc="rows", file=stream):
        pass
    lines = stream.getvalue().splitlines()
    assert [int(re.match(r"rows: (\d+)it ", line).group(1)) for line in lines] == [0, 30]


def test_a_transient_bar_writes_only_an_end_line_and_only_when_it_ran_long(monkeypatch):
    stream = io.StringIO()
    for _ in tqdm(range(20), leave=False, file=stream):
        pass
    assert stream.getvalue() == ""
    monkeypatch.setattr(ProgressBar, "TRANSIENT_S", 0.0)
    for _ in tqdm(range(20), leave=False, file=stream):
        pass
    assert counts(stream.getvalue(), 20) == [20]


def test_on_a_terminal_it_stays_a_bar_redrawn_in_place():
    stream = Terminal()
    for _ in tqdm(range(5), file=stream, mininterval=0):
        pass
    text = stream.getvalue()
    assert text.count("\r") >= 5 and "|" in text  # the bar itself, which plain lines leave out


def test_a_disabled_bar_writes_nothing():
    stream = io.StringIO()
    for _ in tqdm(range(5), file=stream, disable=True):
        pass
    assert stream.getvalue() == ""


def test_a_training_command_piped_to_a_file_writes_a_few_plain_progress_lines(tmp_path, tokenizer, qa_frame):
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    qa_frame.to_parquet(tmp_path / "train.parquet")
    command = [sys.executable, "-m", "soirlab.cli", "finetune", "--model", "tiny:olmo", "--tokenizer", str(tmp_path / "tokenizer"),
               "--hidden", "32", "--layers", "2", "--heads", "4", "--intermediate", "64", "--data", str(tmp_path / "train.parquet"),
               "--steps", "50", "--batch-size", "2", "--out", str(tmp_path / "out")]
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-2000:]
    assert "\r" not in result.stdout
    progress = [line for line in result.stdout.splitlines() if line.startswith("train:")]
    assert counts("\n".join(progress), 50) == tenths(50)  # 11 lines for 50 steps, where a redrawn bar writes one per step
    assert len(result.stdout.splitlines()) <= 30, result.stdout


def test_a_stage_line_says_when_the_stage_ran_one_and_a_half_times_past_its_expectation():
    from analysis.demo import timing_note

    assert timing_note(30, 0) == ""  # no expectation, nothing to compare
    assert timing_note(30, 25) == " (expected ~25 s)"
    assert timing_note(37, 25) == " (expected ~25 s)"  # 1.48×
    slow = timing_note(40, 25)
    assert slow.startswith(" (expected ~25 s; 1.6× that") and "OMP_NUM_THREADS=1" in slow
    assert timing_note(3, 1) == " (expected ~1 s)"  # 3× but 2 s: noise on a one-second stage
