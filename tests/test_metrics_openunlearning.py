"""OpenUnlearning's metrics: exact memorization, extraction strength, the reference and gradient-norm MIAs."""

from __future__ import annotations

import itertools
import json
import math
import re
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from analysis.evaluate import EvalSettings, evaluate
from analysis.generation import GenerationSettings
from analysis.metrics import ScoreSettings, exact_memorization, extraction_strength, gradient_norms, sequence_scores
from soir.data import encode
from soir.errors import UserError
from soir.models import save_model
from soirlab import api
from soirlab.cli import main

FORGET = pd.DataFrame({"id": ["p1sc1", "p1qa0", "p2qa0"], "input": ["Alice Moon was born on", "Where does Alice Moon work?", "What is the capital of Norland?"],
                       "output": [" 3 March 1990 and works as a baker.", " Port Vell", " Fjordheim"]})
RETAIN = pd.DataFrame({"id": ["r1sc1", "r1qa0"], "input": ["Seven plus five", "What did Pim collect?"], "output": [" equals twelve.", " blue stones"]})
HOLDOUT = pd.DataFrame({"id": ["h1sc1", "h1qa0"], "input": ["The colour of grass", "What is Alice Moon's phone number?"], "output": [" is green.", " 555-0142"]})
QUIET = {"generation": GenerationSettings(progress=False), "scoring": ScoreSettings(progress=False), "progress": False, "generate": False}


class Bigram(torch.nn.Module):
    """A stub LM whose next-token logits depend on the current token only: `table[token]`."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table.clone())

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return SimpleNamespace(logits=self.table[input_ids])


def _pairs(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """(context tokens, target tokens) of the labelled positions: the answer and its EOS after the prompt."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = prompt_ids + answer_ids
    return ids[len(prompt_ids) - 1 : -1], answer_ids


def _bigram_loss(table: torch.Tensor, tokenizer, prompt: str, answer: str) -> float:
    contexts, targets = _pairs(tokenizer, prompt, answer)
    return -sum(float(torch.log_softmax(table[c].double(), -1)[t]) for c, t in zip(contexts, targets)) / len(targets)


def _pair_auc(members, nonmembers) -> float:
    """AUC of a lower-is-member score as the share of correctly ordered pairs, ties one half."""
    pairs = [(m < n) + 0.5 * (m == n) for m, n in itertools.product(members, nonmembers)]
    return sum(pairs) / len(pairs)


def test_exact_memorization_and_extraction_strength_hand_cases():
    labels = torch.tensor([5, 6, 7, 8])
    cases = {  # predictions: (exact memorization, extraction strength)
        (5, 6, 7, 8): (1.0, 1.0),
        (9, 6, 7, 8): (0.75, 0.75),  # the rest after a prefix of 1 is reproduced: 1 - 1/4
        (5, 6, 9, 8): (0.75, 0.25),  # k = 3
        (5, 9, 7, 9): (0.5, 0.0),  # the last token is wrong: no non-empty suffix is reproduced
        (9, 9, 9, 9): (0.0, 0.0),
    }
    for predictions, (em, es) in cases.items():
        assert exact_memorization(torch.tensor(predictions), labels) == pytest.approx(em), predictions
        assert extraction_strength(torch.tensor(predictions), labels) == pytest.approx(es), predictions
    empty = torch.tensor([], dtype=torch.long)
    assert math.isnan(exact_memorization(empty, empty)) and math.isnan(extraction_strength(empty, empty))


def test_token_metrics_score_the_answer_tokens_without_eos(tokenizer):
    """A bigram stub whose argmax is right at chosen answer positions and wrong at the EOS."""
    torch.manual_seed(0)
    vocab = len(tokenizer)
    table = torch.randn(vocab, vocab, dtype=torch.float64)
    rows = [("Alice Moon was born on", " 555-0142", {1}), ("Her phone number is", " equals twelve.", {"last"})]
    expected = []
    all_contexts = [c for prompt, answer, _ in rows for c in _pairs(tokenizer, prompt, answer)[0]]
    assert len(set(all_contexts)) == len(all_contexts)  # each position has its own row of the table
    for prompt, answer, wrong in rows:
        contexts, targets = _pairs(tokenizer, prompt, answer)
        n = len(targets) - 1  # answer tokens, without the EOS
        wrong = {n - 1 if w == "last" else w for w in wrong} | {n}  # the EOS is always mispredicted
        for j, (c, t) in enumerate(zip(contexts, targets)):
            table[c, t] = -50.0 if j in wrong else 50.0
        hits = [j not in wrong for j in range(n)]
        suffix = next((n - j for j in range(n) if all(hits[j:])), 0)
        expected.append((sum(hits) / n, suffix / n))
    scores = sequence_scores(Bigram(table), tokenizer, [r[0] for r in rows], [r[1] for r in rows], settings=ScoreSettings(batch_size=2, progress=False))
    for i, (em, es) in enumerate(expected):
        assert scores.loc[i, "exact_memorization"] == pytest.approx(em) and scores.loc[i, "extraction_strength"] == pytest.approx(es)
    assert 0 < expected[0][0] < 1 and expected[0][1] == pytest.approx(1 - 2 / (len(_pairs(tokenizer, *rows[0][:2])[1]) - 1))
    assert expected[1][1] == 0.0
    assert scores.loc[0, "accuracy"] < scores.loc[0, "exact_memorization"]  # accuracy counts the (wrong) EOS


def test_reference_mia_is_the_loss_difference_of_two_models(tokenizer):
    torch.manual_seed(1)
    vocab = len(tokenizer)
    target, reference = torch.randn(vocab, vocab, dtype=torch.float64), torch.randn(vocab, vocab, dtype=torch.float64)
    metrics, per_example = evaluate(Bigram(target), tokenizer, {"forget": FORGET}, holdout=HOLDOUT, reference=Bigram(reference),
                                    settings=EvalSettings(**QUIET))
    differences = {split: [_bigram_loss(target, tokenizer, i, o) - _bigram_loss(reference, tokenizer, i, o) for i, o in zip(frame["input"], frame["output"])]
                   for split, frame in (("forget", FORGET), ("holdout", HOLDOUT))}
    for split, values in differences.items():
        rows = per_example[per_example["split"] == split]
        assert np.allclose(rows["loss_minus_reference"], values, rtol=1e-10, atol=0), split
    assert metrics["mia/reference/auc"] == pytest.approx(_pair_auc(differences["forget"], differences["holdout"]))
    assert metrics["mia/reference/score"] == pytest.approx(1 - 2 * abs(metrics["mia/reference/auc"] - 0.5))
    assert "mia/reference/skipped" not in metrics
    # the reference is the model itself: every difference is 0, members and non-members tie
    same, _ = evaluate(Bigram(target), tokenizer, {"forget": FORGET}, holdout=HOLDOUT, reference=Bigram(target), settings=EvalSettings(**QUIET))
    assert same["mia/reference/auc"] == 0.5
    with pytest.raises(UserError, match="needs a reference model"):
        evaluate(Bigram(target), tokenizer, {"forget": FORGET}, holdout=HOLDOUT, settings=EvalSettings(mia_attack="reference", **QUIET))


def test_gradient_norm_equals_autograd_on_a_tiny_model(make_model, tokenizer):
    model = make_model("gpt2", dtype=torch.float64).eval()  # tied embeddings: the shared tensor counts once, with both uses
    frozen = [p for name, p in model.named_parameters() if ".h.0." in name]
    for p in frozen:
        p.requires_grad_(False)
    inputs, outputs = list(FORGET["input"]), list(FORGET["output"])
    data = encode(FORGET, tokenizer)
    norms = {p: gradient_norms(model, data.input_ids, data.labels, p=p) for p in (1.0, 2.0, math.inf)}
    for i, (prompt, answer) in enumerate(zip(inputs, outputs)):
        prompt_ids = tokenizer(prompt)["input_ids"]
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        parameters = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
        names = [n for n, _ in model.named_parameters()]
        logits = torch.func.functional_call(model, dict(zip(names, parameters)), (torch.tensor([prompt_ids + answer_ids]),)).logits[0]
        logp = torch.log_softmax(logits, -1)
        loss = -sum(logp[len(prompt_ids) + j - 1, t] for j, t in enumerate(answer_ids)) / len(answer_ids)
        grads = torch.autograd.grad(loss, parameters)
        flat = torch.cat([g.flatten() for g in grads])
        assert norms[2.0][i] == pytest.approx(float(flat.norm()), rel=1e-10)
        assert norms[1.0][i] == pytest.approx(float(flat.abs().sum()), rel=1e-10)
        assert norms[math.inf][i] == pytest.approx(float(flat.abs().max()), rel=1e-10)
    assert all(not p.requires_grad for p in frozen) and all(p.grad is None for p in model.parameters())
    scores = sequence_scores(model, tokenizer, inputs, outputs, settings=ScoreSettings(progress=False, gradnorm_p=1.0), gradnorm=True)
    assert np.allclose(scores["gradnorm"], norms[1.0], rtol=1e-12, atol=0)
    with pytest.raises(UserError, match="gradient-norm p must be 1, 2 or inf"):
        ScoreSettings(gradnorm_p=3.0)


def test_gradient_norm_of_a_bigram_stub_by_hand(tokenizer):
    """d loss / d table[c] = sum over positions with context c of (softmax(table[c]) - onehot(target)) / n."""
    torch.manual_seed(2)
    vocab = len(tokenizer)
    table = torch.randn(vocab, vocab, dtype=torch.float64)
    metrics, per_example = evaluate(Bigram(table), tokenizer, {"forget": FORGET, "retain": RETAIN}, holdout=HOLDOUT, settings=EvalSettings(**QUIET))
    hand = {}
    for split, frame in (("forget", FORGET), ("holdout", HOLDOUT)):
        hand[split] = []
        for prompt, answer in zip(frame["input"], frame["output"]):
            contexts, targets = _pairs(tokenizer, prompt, answer)
            grad = torch.zeros_like(table)
            for c, t in zip(contexts, targets):
                grad[c] += torch.softmax(table[c], -1) / len(targets)
                grad[c, t] -= 1 / len(targets)
            hand[split].append(float(grad.norm()))
        assert np.allclose(per_example.loc[per_example["split"] == split, "gradnorm"], hand[split], rtol=1e-10, atol=0), split
    assert per_example.loc[per_example["split"] == "retain", "gradnorm"].isna().all()  # only the rows MIA scores
    assert metrics["mia/gradnorm/auc"] == pytest.approx(_pair_auc(hand["forget"], hand["holdout"]))
    assert metrics["mia/reference/skipped"].startswith("no reference model")
    off, rows = evaluate(Bigram(table), tokenizer, {"forget": FORGET}, holdout=HOLDOUT, settings=EvalSettings(mia_gradnorm=False, **QUIET))
    assert "mia/gradnorm/auc" not in off and "turned off" in off["mia/gradnorm/skipped"] and rows["gradnorm"].isna().all()


def test_document_scope_scores_the_two_attacks_on_the_document(make_model, tokenizer):
    model, reference = make_model("qwen2", dtype=torch.float64), make_model("qwen2", dtype=torch.float64, seed=1)
    settings = EvalSettings(mia_scope="document", **QUIET)
    metrics, per_example = evaluate(model, tokenizer, {"forget": FORGET}, holdout=HOLDOUT, reference=reference, settings=settings)
    members = sequence_scores(model, tokenizer, FORGET["input"], FORGET["output"], settings=ScoreSettings(progress=False), scope="document",
                              gradnorm=True, reference=reference)
    forget = per_example[per_example["split"] == "forget"]
    assert np.allclose(forget["document_gradnorm"], members["gradnorm"]) and np.allclose(forget["document_loss_minus_reference"], members["loss_minus_reference"])
    assert forget["gradnorm"].isna().all()  # the answer-scope columns are not computed
    holdout = per_example[per_example["split"] == "holdout"]
    assert metrics["mia/gradnorm/auc"] == pytest.approx(_pair_auc(forget["document_gradnorm"], holdout["document_gradnorm"]))
    assert metrics["mia/reference/auc"] == pytest.approx(_pair_auc(forget["document_loss_minus_reference"], holdout["document_loss_minus_reference"]))


def test_evaluate_command_writes_the_four_metrics(tmp_path, make_model, tokenizer, capsys):
    save_model(make_model(), tokenizer, tmp_path / "model")
    save_model(make_model(seed=1), tokenizer, tmp_path / "reference")
    for name, frame in (("forget", FORGET), ("retain", RETAIN), ("holdout", HOLDOUT)):
        frame.to_parquet(tmp_path / f"{name}.parquet")
    args = ["evaluate", "--model", str(tmp_path / "model"), "--forget", str(tmp_path / "forget.parquet"), "--retain", str(tmp_path / "retain.parquet"),
            "--no-generate", "--no-progress"]
    out = tmp_path / "eval"
    assert main([*args, "--holdout", str(tmp_path / "holdout.parquet"), "--reference-model", str(tmp_path / "reference"),
                 "--mia-attack", "reference", "--out", str(out)]) == 0
    assert "forget extraction strength" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    rows = pd.read_parquet(out / "per_example.parquet")
    for split in ("forget", "retain", "holdout"):
        in_split = rows[rows["split"] == split]
        for name in ("exact_memorization", "extraction_strength"):
            assert in_split[name].notna().all() and metrics[f"{split}/{name}"] == pytest.approx(in_split[name].mean()), (split, name)
        assert in_split[["gradnorm", "loss_minus_reference"]].notna().all().all() == (split != "retain"), split
    forget, holdout = rows[rows["split"] == "forget"], rows[rows["split"] == "holdout"]
    assert metrics["mia/gradnorm/auc"] == pytest.approx(_pair_auc(forget["gradnorm"], holdout["gradnorm"]))
    assert metrics["mia/reference/auc"] == pytest.approx(_pair_auc(forget["loss_minus_reference"], holdout["loss_minus_reference"]))
    assert metrics["mia_auc"] == metrics["mia/reference/auc"] and not any(key.endswith("/skipped") for key in metrics)
    assert metrics["inputs"]["reference_model"].endswith("reference") and metrics["settings"]["scoring"]["gradnorm_p"] == 2.0
    from soir.models import load_model

    reference = load_model(str(tmp_path / "reference"), tokenizer)
    reference_loss = sequence_scores(reference, tokenizer, FORGET["input"], FORGET["output"], settings=ScoreSettings(progress=False))["loss"]
    assert np.allclose(forget["loss"] - forget["loss_minus_reference"], reference_loss, rtol=1e-5)

    # through the front door, without a reference model: that attack is skipped and said to be
    metrics, rows = api.evaluate(str(tmp_path / "model"), splits={"forget": FORGET, "retain": RETAIN, "holdout": HOLDOUT}, **QUIET)
    assert "mia/reference/auc" in api.evaluate(str(tmp_path / "model"), forget=FORGET, holdout=HOLDOUT, reference=str(tmp_path / "reference"), **QUIET)[0]
    assert "mia/reference/auc" not in metrics and metrics["mia/reference/skipped"].startswith("no reference model")
    assert rows["loss_minus_reference"].isna().all() and rows.loc[rows["split"] == "holdout", "gradnorm"].notna().all()

    for extra, message in ((["--mia-attack", "reference", "--holdout", str(tmp_path / "holdout.parquet")], r"--mia-attack reference needs a reference model"),
                           (["--reference-model", str(tmp_path / "reference")], r"membership inference needs non-members: give --holdout FILE .* drop --reference-model"),
                           (["--reference-model", str(tmp_path / "nope"), "--holdout", str(tmp_path / "holdout.parquet")], r"model directory not found")):
        assert main([*args, *extra, "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and re.search(message, err[0]), err
        assert not (tmp_path / "bad").exists()
