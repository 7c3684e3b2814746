"""`soir evaluate --semeval-out`: the generations in the layout the official SemEval scorer reads."""

from __future__ import annotations

import re

import pandas as pd
import pytest

from soir.models import save_model
from soirlab.cli import main

OFFICIAL_COLUMNS = ["id", "task", "input", "expected_output", "model_output"]  # the official scorer's forget_0.csv / retain_0.csv


def read_official(path) -> pd.DataFrame:
    """Read a generations CSV as the official scorer does (pandas), and check it has exactly its columns."""
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    assert list(frame.columns) == OFFICIAL_COLUMNS
    return frame


@pytest.fixture
def files(tmp_path, make_model, tokenizer, qa_frame):
    save_model(make_model(), tokenizer, tmp_path / "model")
    qa_frame.to_parquet(tmp_path / "forget.parquet")
    retain = pd.DataFrame({"id": ["r1qa0", "r1sc1"], "input": ["What is seven plus five?", "In the village of Oakridge"],
                           "output": [" twelve", " a quiet fox named Pim collected blue stones, \"quoted\",\nand more."]})  # no task column
    retain.to_parquet(tmp_path / "retain.parquet")
    return tmp_path


def _args(files, out, *extra):
    return ["evaluate", "--model", str(files / "model"), "--forget", str(files / "forget.parquet"), "--retain", str(files / "retain.parquet"),
            "--max-new-tokens", "6", "--no-progress", "--out", str(out), *extra]


def test_semeval_out_writes_the_official_layout(files, qa_frame, capsys):
    out, official = files / "eval", files / "semeval"
    assert main(_args(files, out, "--semeval-out", str(official))) == 0
    assert sorted(p.name for p in official.iterdir()) == ["forget_0.csv", "retain_0.csv"]
    per_example = pd.read_parquet(out / "per_example.parquet")
    retain = pd.read_parquet(files / "retain.parquet")
    for name, split in (("forget", qa_frame), ("retain", retain)):
        table = read_official(official / f"{name}_0.csv")
        rows = per_example[per_example["split"] == name].set_index("id")
        assert table["id"].tolist() == split["id"].tolist() == rows.index.tolist()
        assert table["input"].tolist() == split["input"].tolist()
        assert table["expected_output"].tolist() == split["output"].tolist()
        assert table["model_output"].tolist() == rows.loc[table["id"], "generation"].tolist()
        assert table["task"].tolist() == (split["task"].tolist() if "task" in split.columns else ["all"] * len(split))
    assert str(official / "forget_0.csv") in capsys.readouterr().out


def test_semeval_out_without_generations_is_an_error(files, capsys):
    out, official = files / "eval", files / "semeval"
    code = main(_args(files, out, "--semeval-out", str(official), "--no-generate"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("soir: error:") and re.search(r"--semeval-out writes the generations: drop --no-generate", err[0])
    assert not out.exists() and not official.exists()
    (files / "a_file").write_text("x")
    assert main(_args(files, out, "--semeval-out", str(files / "a_file"))) == 2
    assert "is a file" in capsys.readouterr().err and not out.exists()
