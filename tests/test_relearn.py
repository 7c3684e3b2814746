"""The relearning attack: split by person, finetune on some, measure what comes back on the others."""

from __future__ import annotations

import json
import tempfile

import pandas as pd
import pytest

from analysis.relearn import (
    RelearnSettings,
    relearn_attack,
    split_by_subject,
    subject_of,
)
from soir.data import BatchStream, encode, pad_id, read_split
from soir.errors import UserError
from soir.models import load_model, load_tokenizer
from soirlab.cli import main
from unlearn.loop import Trainer, TrainSettings
from unlearn.objectives import get_objective


def test_split_keeps_each_person_on_one_side():
    ids = [f"p{p}{kind}" for p in range(4) for kind in ("sc1", "qa0", "qa1")] + ["d9sc1", "loose-row"]
    frame = pd.DataFrame({"id": ids, "input": "q", "output": " a"})
    assert subject_of("p0003qa2") == "p0003" and subject_of("d0001sc1") == "d0001" and subject_of("loose-row") == "loose-row"
    attack, held = split_by_subject(frame, 0.5, seed=1)
    assert len(attack) + len(held) == len(frame)
    attacked, kept = set(attack["id"].map(subject_of)), set(held["id"].map(subject_of))
    assert not attacked & kept and len(attacked) == 3 and len(kept) == 3  # 6 subjects, half each
    assert split_by_subject(frame, 0.5, seed=1)[0]["id"].tolist() == attack["id"].tolist()  # deterministic
    assert len(set(split_by_subject(frame, 0.01, seed=0)[0]["id"].map(subject_of))) == 1  # at least one attacked
    assert len(set(split_by_subject(frame, 0.99, seed=0)[1]["id"].map(subject_of))) == 1  # at least one held back
    with pytest.raises(UserError, match="at least two people"):
        split_by_subject(frame[frame["id"].str.startswith("p1")], 0.5, seed=0)
    with pytest.raises(UserError, match="--fraction"):
        RelearnSettings(fraction=1.0)


def _gradient_ascent(model, tokenizer, forget: pd.DataFrame, steps: int = 5, lr: float = 1e-3):
    stream = BatchStream(encode(forget, tokenizer), 32, pad_id(tokenizer))
    with tempfile.TemporaryDirectory() as tmp:
        Trainer(model, get_objective("ga"), {"forget": stream}, TrainSettings(steps=steps, lr=lr, warmup=0, schedule="constant", progress=False), tmp).train()
    return model


def test_relearning_restores_forget_accuracy_on_held_back_people(quick_testbed):
    """After gradient ascent on the whole forget set, 10 finetuning steps on one forget person (and the
    document) bring teacher-forced accuracy back on the OTHER forget person, whom the attack never saw;
    on the attacked rows themselves it comes back almost fully."""
    tokenizer = load_tokenizer(quick_testbed["finetuned"])
    forget = read_split(quick_testbed["data"] / "forget.parquet")
    model = _gradient_ascent(load_model(quick_testbed["finetuned"], tokenizer), tokenizer, forget, steps=8, lr=1.5e-3)
    settings = RelearnSettings(fraction=0.5, steps=10, lr=1e-3, generate=False, progress=False)  # teacher-forced metrics suffice
    result = relearn_attack(model, tokenizer, forget, settings=settings)
    held, attacked = result["held_out"], result["attacked"]
    assert result["split"]["held_out_rows"] + result["split"]["attacked_rows"] == len(forget)
    assert not set(result["split"]["held_out_subjects"]) & set(result["split"]["attacked_subjects"])
    assert attacked["before"]["accuracy"] < 0.8  # gradient ascent degraded the memorised answers (finetuned: ~0.99)
    assert attacked["after"]["accuracy"] > attacked["before"]["accuracy"] + 0.3
    assert held["after"]["accuracy"] > held["before"]["accuracy"] + 0.05  # knowledge about people the attack never saw
    assert held["recovered"]["accuracy"] == pytest.approx(held["after"]["accuracy"] - held["before"]["accuracy"])
    assert result["train"]["steps"] == 10 and len(result["train"]["loss"]) == 10
    assert held["before"]["knowledge"] is None  # nothing generated
    json.dumps(result, allow_nan=False)


def test_attack_relearn_command(quick_testbed, tmp_path, capsys):
    out = tmp_path / "attack"
    data = quick_testbed["data"]
    args = ["attack", "relearn", "--model", str(quick_testbed["finetuned"]), "--forget", str(data / "forget.parquet"),
            "--steps", "2", "--max-new-tokens", "4", "--no-progress", "--out", str(out)]
    assert main(args) == 0
    result = json.loads((out / "relearn.json").read_text())
    assert set(result) >= {"settings", "split", "held_out", "attacked", "train", "inputs"}
    assert set(result["held_out"]["before"]) == {"accuracy", "probability", "knowledge", "regurgitation", "rouge_l_recall", "paraphrased_exact_match"}
    assert "held_out" in capsys.readouterr().out
    assert main([*args[:-1], str(tmp_path / "bad"), "--fraction", "1.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--fraction must lie strictly between 0 and 1" in err[0]
    assert not (tmp_path / "bad").exists()
