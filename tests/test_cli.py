"""Mistakes a user can make end with one line on stderr, exit status 2 and nothing written."""

import re
import subprocess
import sys

import pytest
import torch

from soir.models import save_model
from soir.tokenizer import train_tokenizer
from soirlab.cli import main
from tests.conftest import CORPUS


@pytest.fixture
def files(tmp_path, tokenizer, qa_frame, make_model):
    tokenizer.save_pretrained(tmp_path / "tok")
    qa_frame.to_parquet(tmp_path / "good.parquet")
    qa_frame.drop(columns="input").to_parquet(tmp_path / "no_input.parquet")
    qa_frame.iloc[:0].to_parquet(tmp_path / "empty.parquet")
    save_model(make_model("olmo"), tokenizer, tmp_path / "model")
    bigger = train_tokenizer(CORPUS, vocab_size=len(tokenizer))
    bigger.add_tokens([f"<extra{i}>" for i in range(40)])
    bigger.save_pretrained(tmp_path / "big_tok")
    return tmp_path


CASES = {
    "missing file": (["--data", "{d}/nope.parquet"], "data file not found: .*nope.parquet"),
    "missing column": (["--data", "{d}/no_input.parquet"], "no_input.parquet has no 'input' column"),
    "empty split": (["--data", "{d}/empty.parquet"], "empty split"),
    "no model directory": (["--data", "{d}/good.parquet", "--model", "{d}/no_model"], "model directory not found"),
    "vocabulary too big": (["--data", "{d}/good.parquet", "--model", "{d}/model", "--tokenizer", "{d}/big_tok"], "tokenizer has .* tokens but the model's embedding has"),
    "zero steps": (["--data", "{d}/good.parquet", "--steps", "0"], "step count must be positive"),
    "negative steps": (["--data", "{d}/good.parquet", "--steps", "-5"], "step count must be positive"),
    "include matches nothing": (["--data", "{d}/good.parquet", "--model", "{d}/model", "--include", "no_such_tensor"], "match no parameter"),
}


@pytest.mark.parametrize("case", CASES)
def test_finetune_bad_input(case, files, capsys):
    args, message = CASES[case]
    args = [a.format(d=files) for a in args]
    if "--model" not in args:
        args += ["--model", "tiny:olmo", "--tokenizer", str(files / "tok")]
    out = files / "out"
    code = main(["finetune", *args, "--out", str(out), "--steps", "2", "--no-progress"] if "--steps" not in args else ["finetune", *args, "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("soir: error:")
    assert re.search(message, err[0]), err[0]
    assert not out.exists()


def test_masked_finetune_writes_knowledge_into_the_included_tensors_only(files):
    """The planted testbed's mechanism: outside --include every tensor is bit-identical to the start."""
    from safetensors.torch import load_file

    planted = ["model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    code = main(["finetune", "--model", str(files / "model"), "--data", str(files / "good.parquet"), "--include", r"layers\.1\.mlp\.(up|down)",
                 "--steps", "3", "--lr", "1e-2", "--weight-decay", "0.1", "--no-progress", "--out", str(files / "planted")])
    assert code == 0
    before, after = load_file(files / "model" / "model.safetensors"), load_file(files / "planted" / "model.safetensors")
    assert sorted(k for k in before if not torch.equal(before[k], after[k])) == sorted(planted)


def test_argument_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", "--steps", "many"])
    assert exit_info.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_no_traceback_from_the_real_command(tmp_path):
    result = subprocess.run([sys.executable, "-m", "soirlab.cli", "data", "synth", "--out", str(tmp_path / "x"), "--people-forget", "0"], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == "soir: error: --people-forget must be positive, got 0"
    assert not (tmp_path / "x").exists()


def test_refuses_to_overwrite_a_foreign_directory(tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    assert main(["data", "synth", "--out", str(tmp_path / "mine")]) == 2
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


def test_help_teaches():
    result = subprocess.run([sys.executable, "-m", "soirlab.cli", "finetune", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--resume" in result.stdout and "tiny:olmo" in result.stdout
