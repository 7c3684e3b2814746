"""Membership inference on the answer (default) or, as SemEval computes it, on the whole document."""

from __future__ import annotations

import json
import math
import re
import zlib

import numpy as np
import pandas as pd
import pytest
import torch

from analysis.evaluate import EvalSettings, evaluate
from analysis.generation import GenerationSettings
from analysis.metrics import ScoreSettings, auc, mia_score, sequence_scores
from soir.data import Template
from soir.errors import UserError
from soir.models import save_model
from soirlab.cli import main

TEMPLATE = Template("Question: {input}\nAnswer:{output}")
LONG = "Alice Moon was born on 3 March 1990 and works as a baker in Port Vell. Her phone number is"
FORGET = pd.DataFrame({"id": ["p1sc1", "p1qa0", "p2qa0"], "input": [LONG, "Where does Alice Moon work?", "What is the capital of Norland?"],
                       "output": [" 555-0142", " Port Vell", " Fjordheim"]})
HOLDOUT = pd.DataFrame({"id": ["h1sc1", "h1qa0"], "input": ["In the village of Oakridge a quiet fox named Pim collected", "What is the colour of grass?"],
                        "output": [" blue stones", " green"]})


def _token_logp(model, ids):
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    return torch.stack([logp[t - 1, ids[t]] for t in range(1, len(ids))])


def _hand_document(model, tokenizer, frame, template=TEMPLATE, k=0.4):
    """LOSS, zlib and Min-K% of each row's document by hand: every token after the first of prompt + output."""
    rows = []
    for prompt, output in zip(frame["input"], frame["output"]):
        text = template.prompt(prompt) + output
        logp = _token_logp(model, tokenizer(text)["input_ids"])
        loss = float(-logp.mean())
        low = torch.sort(logp).values[: max(1, int(k * len(logp)))]
        rows.append({"loss": loss, "zlib": loss / len(zlib.compress(text.encode())), "min_k": float(low.mean()), "n_tokens": len(logp)})
    return pd.DataFrame(rows)


def test_document_loss_equals_a_hand_computation_and_differs_from_the_answer(make_model, tokenizer):
    model = make_model("qwen2", dtype=torch.float64)
    settings = ScoreSettings(progress=False, batch_size=2)  # two rows of different length in a batch: padding must not count
    document = sequence_scores(model, tokenizer, FORGET["input"], FORGET["output"], template=TEMPLATE, settings=settings, scope="document")
    hand = _hand_document(model, tokenizer, FORGET)
    for column in ("loss", "zlib", "min_k", "n_tokens"):
        assert np.allclose(document[column], hand[column], rtol=1e-9, atol=0), column
    assert np.allclose(document["probability"], np.exp(-hand["loss"]))

    answer = sequence_scores(model, tokenizer, FORGET["input"], FORGET["output"], template=TEMPLATE, settings=settings)
    prompt_ids = tokenizer(TEMPLATE.prompt(LONG))["input_ids"]
    answer_ids = tokenizer(" 555-0142", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    with torch.no_grad():
        ids = prompt_ids + answer_ids
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], -1)
    answer_loss = -float(np.mean([float(logp[len(prompt_ids) + j - 1, t]) for j, t in enumerate(answer_ids)]))
    assert answer["loss"][0] == pytest.approx(answer_loss, rel=1e-9)  # the default: the answer and its EOS
    assert len(prompt_ids) > 3 * len(answer_ids) and abs(document["loss"][0] - answer["loss"][0]) > 1e-3
    with pytest.raises(UserError, match="unknown scoring scope"):
        sequence_scores(model, tokenizer, ["a"], ["b"], scope="tokens")


def test_evaluate_with_document_scope(make_model, tokenizer):
    model = make_model("qwen2", dtype=torch.float64)
    quiet = {"generation": GenerationSettings(progress=False), "scoring": ScoreSettings(progress=False), "progress": False, "generate": False, "template": TEMPLATE.text}
    metrics, per_example = evaluate(model, tokenizer, {"forget": FORGET}, holdout=HOLDOUT, settings=EvalSettings(mia_scope="document", **quiet))
    members, nonmembers = _hand_document(model, tokenizer, FORGET), _hand_document(model, tokenizer, HOLDOUT)
    expected = auc(members["loss"], nonmembers["loss"], higher_is_member=False)
    assert metrics["mia/loss/auc"] == pytest.approx(expected) and metrics["mia_auc"] == pytest.approx(expected)
    assert metrics["mia_score"] == pytest.approx(mia_score(expected))
    assert metrics["mia/zlib/auc"] == pytest.approx(auc(members["zlib"], nonmembers["zlib"], higher_is_member=False))
    assert metrics["mia/min_k/auc"] == pytest.approx(auc(members["min_k"], nonmembers["min_k"]))
    assert metrics["settings"]["mia_scope"] == "document"
    forget = per_example[per_example["split"] == "forget"]
    assert np.allclose(forget["document_loss"], members["loss"])
    answer_metrics, answer_rows = evaluate(model, tokenizer, {"forget": FORGET}, holdout=HOLDOUT, settings=EvalSettings(**quiet))
    assert answer_metrics["settings"]["mia_scope"] == "answer" and "document_loss" not in answer_rows.columns
    answer_members = answer_rows[answer_rows["split"] == "forget"]
    answer_nonmembers = answer_rows[answer_rows["split"] == "holdout"]
    assert answer_metrics["mia/loss/auc"] == pytest.approx(auc(answer_members["loss"], answer_nonmembers["loss"], higher_is_member=False))
    with pytest.raises(UserError, match="unknown MIA scope"):
        EvalSettings(mia_scope="prompt")


def test_evaluate_command_mia_scope(tmp_path, make_model, tokenizer, capsys):
    save_model(make_model(), tokenizer, tmp_path / "model")
    FORGET.to_parquet(tmp_path / "forget.parquet")
    HOLDOUT.to_parquet(tmp_path / "holdout.parquet")
    args = ["evaluate", "--model", str(tmp_path / "model"), "--forget", str(tmp_path / "forget.parquet"), "--retain", str(tmp_path / "forget.parquet"),
            "--no-generate", "--no-progress", "--mia-scope", "document"]
    out = tmp_path / "eval"
    assert main([*args, "--holdout", str(tmp_path / "holdout.parquet"), "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings"]["mia_scope"] == "document" and not math.isnan(metrics["mia/loss/auc"])
    assert "MIA AUC" in capsys.readouterr().out
    assert main([*args, "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.match(r"soir: error: membership inference needs non-members", err[0]) and not (tmp_path / "bad").exists()
