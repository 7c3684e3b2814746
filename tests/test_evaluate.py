"""evaluate(), write_evaluation() and MMLU-style multiple choice."""

from __future__ import annotations

import json
import math
import re
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

import analysis.evaluate as ev
from analysis.evaluate import EvalSettings, evaluate, write_evaluation
from analysis.generation import GenerationSettings
from analysis.metrics import (
    ScoreSettings,
    auc,
    exact_match,
    rouge_l_recall,
    sequence_scores,
    truth_ratio,
)
from analysis.mmlu import MMLUSettings, mmlu_accuracy, option_scores, read_mmlu
from soir.data import read_split
from soir.errors import UserError
from soirlab.cli import main

QUIET = EvalSettings(
    generation=GenerationSettings(max_new_tokens=6, progress=False),
    scoring=ScoreSettings(progress=False),
    mmlu=MMLUSettings(progress=False),
    progress=False,
)


def _frame(rows):
    return pd.DataFrame(rows, columns=["id", "input", "output", "task"])


FORGET = _frame([
    ("a1sc1", "Alice Moon was born on", " 3 March 1990 and works as a baker.", "Task1"),
    ("a1qa0", "Where does Alice Moon work?", " Port Vell", "Task1"),
    ("b2sc1", "In the village of Oakridge", " a quiet fox named Pim collected blue stones.", "Task2"),
    ("b2qa0", "What did Pim collect?", " blue stones", "Task2"),
])
RETAIN = _frame([
    ("c1sc1", "Seven plus five", " equals twelve.", "Task1"),
    ("c1qa0", "What is the capital of Norland?", " Fjordheim", "Task1"),
])
HOLDOUT = _frame([
    ("h1sc1", "The colour of grass", " is green.", "Task1"),
    ("h1qa0", "What is Alice Moon's phone number?", " 555-0142", "Task1"),
])


def _fake_generate(answers):
    """Replace generation by a lookup input -> continuation."""

    def fake(model, tokenizer, inputs, settings=None, template=None, desc=""):
        return [answers[x] for x in inputs]

    return fake


def test_task_aggregate_from_known_generations(monkeypatch, make_model, tokenizer):
    answers = {
        "Alice Moon was born on": " 3 March 1990 and",  # ROUGE-L recall 4/8 -> forget term 0.5
        "Where does Alice Moon work?": " Vell",  # wrong -> term 1
        "In the village of Oakridge": "",  # nothing -> term 1
        "What did Pim collect?": "blue stones ",  # EM after strip -> forget knowledge 1 -> term 0 (Task2)
        "Seven plus five": " equals twelve.",  # retain ROUGE 1
        "What is the capital of Norland?": " fjordheim",  # retain EM (case-insensitive) 1
    }
    monkeypatch.setattr(ev, "generate", _fake_generate(answers))
    metrics, per_example = evaluate(make_model(), tokenizer, {"forget": FORGET, "retain": RETAIN}, holdout=HOLDOUT, settings=QUIET)
    rows = per_example.set_index("id")
    assert rows.loc["a1sc1", "rouge_l_recall"] == pytest.approx(0.5)
    assert rows.loc["b2qa0", "exact_match"] == 1.0 and rows.loc["a1qa0", "exact_match"] == 0.0
    assert metrics["forget/Task1/regurgitation"] == pytest.approx(0.5)
    assert metrics["forget/Task1/knowledge"] == 0.0
    assert metrics["forget/Task2/regurgitation"] == 0.0
    assert metrics["forget/Task2/knowledge"] == 1.0
    assert metrics["retain/Task1/regurgitation"] == 1.0 and metrics["retain/Task1/knowledge"] == 1.0
    assert metrics["task_aggregate"] == 0.0  # Task2 knowledge fully kept on the forget split
    # without that term: harmonic mean of 0.5, 1, 1, 1, 1 (forget Task1 x2, forget Task2 regurgitation, retain x2)
    answers["What did Pim collect?"] = " red stones"
    metrics, _ = evaluate(make_model(), tokenizer, {"forget": FORGET, "retain": RETAIN}, holdout=HOLDOUT, settings=QUIET)
    assert metrics["task_aggregate"] == pytest.approx(6 / 7)
    assert metrics["final_score"] == pytest.approx((6 / 7 + metrics["mia_score"]) / 2)
    assert metrics["final_score_components"] == ["mia_score", "task_aggregate"]


def test_evaluate_end_to_end_is_consistent(make_model, tokenizer):
    model = make_model("olmo")
    metrics, per_example = evaluate(model, tokenizer, {"forget": FORGET, "retain": RETAIN}, holdout=HOLDOUT, settings=QUIET)
    assert list(per_example["split"]) == ["forget"] * 4 + ["retain"] * 2 + ["holdout"] * 2
    assert list(per_example["kind"][:4]) == ["sc", "qa", "sc", "qa"]
    generated = per_example[per_example["split"] != "holdout"]
    references = list(FORGET["output"]) + list(RETAIN["output"])
    for (_, row), reference in zip(generated.iterrows(), references):
        assert isinstance(row["generation"], str)
        assert row["rouge_l_recall"] == pytest.approx(rouge_l_recall(row["generation"], reference))
        assert row["exact_match"] == exact_match(row["generation"], reference)
    assert per_example.loc[per_example["split"] == "holdout", "generation"].isna().all()
    assert np.allclose(per_example["probability"], np.exp(-per_example["loss"]))
    direct = sequence_scores(model, tokenizer, FORGET["input"], FORGET["output"], settings=ScoreSettings(progress=False))
    assert np.allclose(per_example["loss"][:4], direct["loss"])
    forget, holdout = per_example[per_example["split"] == "forget"], per_example[per_example["split"] == "holdout"]
    assert metrics["mia/loss/auc"] == pytest.approx(auc(forget["loss"], holdout["loss"], higher_is_member=False))
    assert metrics["mia/min_k/auc"] == pytest.approx(auc(forget["min_k"], holdout["min_k"]))
    assert metrics["mia_score"] == pytest.approx(1 - 2 * abs(metrics["mia/loss/auc"] - 0.5))
    assert metrics["forget/probability"] == pytest.approx(forget["probability"].mean())
    assert metrics["retain/knowledge"] == pytest.approx(per_example["exact_match"][5])
    retain = per_example[per_example["split"] == "retain"]
    p, r = retain["probability"].mean(), retain["rouge_l_recall"].mean()
    assert metrics["model_utility"] == pytest.approx(0.0 if r == 0 else 2 / (1 / p + 1 / r))  # no truth ratios here
    assert metrics["settings"]["generation"]["max_new_tokens"] == 6
    json.dumps(metrics, allow_nan=False)  # JSON-ready: NaN became null


def test_missing_holdout_task_column_and_mia_off(make_model, tokenizer, monkeypatch):
    model = make_model()
    with pytest.raises(UserError, match="holdout"):
        evaluate(model, tokenizer, {"forget": FORGET}, settings=QUIET)
    with pytest.raises(UserError, match="'output'"):
        evaluate(model, tokenizer, {"forget": FORGET.drop(columns="output")}, holdout=HOLDOUT, settings=QUIET)
    monkeypatch.setattr(ev, "generate", _fake_generate({x: "" for x in FORGET["input"]}))
    settings = EvalSettings(mia=False, progress=False)
    metrics, per_example = evaluate(model, tokenizer, {"forget": FORGET.drop(columns=["task", "id"])}, settings=settings)
    assert set(per_example["task"]) == {"all"}
    assert list(per_example["id"]) == [f"forget-{i}" for i in range(4)]
    assert set(per_example["kind"]) == {"sc"}  # no SemEval ids: scored as completions
    assert metrics["forget/all/regurgitation"] == 0.0 and metrics["forget/all/knowledge"] is None
    assert metrics["task_aggregate"] == 1.0  # nothing regurgitated, no retain split
    assert not any(k.startswith("mia") for k in metrics)


def test_truth_ratio_paraphrase_and_forget_quality(make_model, tokenizer):
    model = make_model("llama")
    forget = FORGET.copy()
    forget["paraphrased_input"] = [None, "Alice Moon works where?", None, None]
    forget["paraphrased_output"] = [None, " in Port Vell", None, " stones, blue ones"]
    forget["perturbed_outputs"] = [None, [" Oakridge", " Fjordheim"], None, [" green stones"]]
    metrics, per_example = evaluate(model, tokenizer, {"forget": forget}, holdout=HOLDOUT, oracle=model, settings=QUIET)
    rows = per_example.set_index("id")
    settings = ScoreSettings(progress=False)
    losses = sequence_scores(model, tokenizer, ["Where does Alice Moon work?"] * 3, [" in Port Vell", " Oakridge", " Fjordheim"], settings=settings)["loss"]
    expected = truth_ratio(losses[0], losses[1:])
    assert rows.loc["a1qa0", "truth_ratio"] == pytest.approx(expected)
    assert rows.loc["a1qa0", "truth_ratio_score"] == pytest.approx(min(expected, 1 / expected))
    assert not math.isnan(rows.loc["b2qa0", "truth_ratio"]) and math.isnan(rows.loc["a1sc1", "truth_ratio"])
    assert rows.loc["a1qa0", "paraphrased_exact_match"] in (0.0, 1.0)
    assert math.isnan(rows.loc["b2qa0", "paraphrased_exact_match"])
    assert metrics["forget_quality"] == pytest.approx(1.0)  # the model is its own oracle
    # oracle ratios far from the model's: a small p-value (two against two, fully separated: 1/3)
    metrics, _ = evaluate(model, tokenizer, {"forget": forget}, holdout=HOLDOUT, oracle=[50.0, 60.0], settings=QUIET)
    assert metrics["forget_quality"] == pytest.approx(1 / 3)
    with pytest.raises(UserError, match="perturbed_outputs"):
        evaluate(model, tokenizer, {"forget": FORGET}, holdout=HOLDOUT, oracle=[1.0], settings=QUIET)


def test_write_evaluation_round_trip(tmp_path, make_model, tokenizer):
    metrics, per_example = evaluate(make_model(), tokenizer, {"forget": FORGET}, holdout=HOLDOUT, settings=QUIET)
    out = tmp_path / "eval"
    write_evaluation(out, metrics, per_example)
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "per_example.parquet"]
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    back = pd.read_parquet(out / "per_example.parquet")
    assert list(back["id"]) == list(per_example["id"])
    assert np.allclose(back["loss"], per_example["loss"])


# ---------------------------------------------------------------- MMLU


class FixedLogits(torch.nn.Module):
    """A mock LM whose next-token logits are the same vector at every position."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = torch.nn.Parameter(logits.clone(), requires_grad=False)

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return SimpleNamespace(logits=self.logits.expand(*input_ids.shape, -1))


def _green_model(tokenizer):
    logits = torch.zeros(len(tokenizer))
    logits[tokenizer(" green", add_special_tokens=False)["input_ids"]] = 10.0
    return FixedLogits(logits)


def _mmlu_rows():
    # the mock prefers " green" wherever it is; answers: right, right, wrong (green is not the answer)
    return pd.DataFrame({
        "question": ["Colour of grass?", "Which is green?", "Colour of the sky?"],
        "subject": ["biology", "biology", "physics"],
        "choices": [["blue", "green", "fox"], ["green", "Pim"], ["green", "blue", "stones", "fox"]],
        "answer": [1, 0, 1],
    })


def test_mmlu_accuracy_with_known_answers(tmp_path, tokenizer):
    model = _green_model(tokenizer)
    rows = _mmlu_rows()
    rows.to_json(tmp_path / "mmlu.jsonl", orient="records", lines=True)
    result = mmlu_accuracy(model, tokenizer, tmp_path / "mmlu.jsonl", MMLUSettings(progress=False, batch_size=4))
    assert list(result.per_question["prediction"]) == [1, 0, 0]
    assert result.accuracy == pytest.approx(2 / 3)
    assert result.per_subject == {"biology": 1.0, "physics": 0.0}
    assert result.accuracy_macro == pytest.approx(0.5)
    # the same questions in the A-D layout with letter answers (CSV), and headerless original MMLU CSV
    ad = pd.DataFrame({"question": ["Colour of grass?", "Colour of the sky?"], "A": ["blue", "green"], "B": ["green", "blue"],
                       "C": ["fox", "stones"], "D": ["Pim", "fox"], "answer": ["B", "b"]})
    ad.to_csv(tmp_path / "ad.csv", index=False)
    read = read_mmlu(tmp_path / "ad.csv")
    assert read["choices"][0] == ["blue", "green", "fox", "Pim"] and list(read["answer"]) == [1, 1]
    assert mmlu_accuracy(model, tokenizer, read, MMLUSettings(progress=False)).accuracy == pytest.approx(0.5)
    ad.to_csv(tmp_path / "high_school_biology_test.csv", index=False, header=False)
    headerless = read_mmlu(tmp_path / "high_school_biology_test.csv")
    assert set(headerless["subject"]) == {"high_school_biology"} and list(headerless["answer"]) == [1, 1]
    rows.to_parquet(tmp_path / "mmlu.parquet")
    assert read_mmlu(tmp_path / "mmlu.parquet")["choices"][2] == ["green", "blue", "stones", "fox"]


def test_mmlu_option_scores_equal_brute_force(make_model, tokenizer):
    model = make_model("qwen2", dtype=torch.float64)
    rows = _mmlu_rows()
    scores = option_scores(model, tokenizer, rows, MMLUSettings(progress=False, batch_size=3))
    for q, (question, choices) in enumerate(zip(rows["question"], rows["choices"])):
        prompt = tokenizer(f"{question}\nAnswer:")["input_ids"]
        for c, choice in enumerate(choices):
            option = tokenizer(f" {choice}", add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([prompt + option])).logits[0], -1)
            expected = sum(float(logp[len(prompt) + j - 1, t]) for j, t in enumerate(option))
            assert scores[q][c] == pytest.approx(expected, rel=1e-6)


def test_mmlu_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found: .*nope.jsonl"):
        read_mmlu(tmp_path / "nope.jsonl")
    rows = _mmlu_rows()
    rows.assign(answer=[1, 0, 4]).to_json(tmp_path / "bad.jsonl", orient="records", lines=True)
    with pytest.raises(UserError, match=r"bad.jsonl: row 2: answer 4 is out of range for 4 choices"):
        read_mmlu(tmp_path / "bad.jsonl")
    rows.drop(columns="answer").to_json(tmp_path / "noanswer.jsonl", orient="records", lines=True)
    with pytest.raises(UserError, match=r"noanswer.jsonl has no 'answer' column"):
        read_mmlu(tmp_path / "noanswer.jsonl")
    rows.drop(columns="choices").to_json(tmp_path / "nochoices.jsonl", orient="records", lines=True)
    with pytest.raises(UserError, match=r"nochoices.jsonl has neither a 'choices' column nor A, B, C, D"):
        read_mmlu(tmp_path / "nochoices.jsonl")
    rows.assign(answer=["1", "Z", "0"]).to_json(tmp_path / "letter.jsonl", orient="records", lines=True)
    with pytest.raises(UserError, match=r"row 1: answer 'Z'"):
        read_mmlu(tmp_path / "letter.jsonl")


def test_evaluate_with_mmlu(tmp_path, tokenizer, make_model, monkeypatch):
    monkeypatch.setattr(ev, "generate", _fake_generate({x: "" for x in list(FORGET["input"]) + list(RETAIN["input"])}))
    _mmlu_rows().to_json(tmp_path / "mmlu.jsonl", orient="records", lines=True)
    model = make_model()
    metrics, per_example = evaluate(model, tokenizer, {"forget": FORGET, "retain": RETAIN}, holdout=HOLDOUT, mmlu=tmp_path / "mmlu.jsonl", settings=QUIET)
    direct = mmlu_accuracy(model, tokenizer, tmp_path / "mmlu.jsonl", MMLUSettings(progress=False))
    assert metrics["mmlu/accuracy"] == pytest.approx(direct.accuracy)
    assert metrics["mmlu/subject/physics"] == direct.per_subject["physics"]
    mc = per_example[per_example["split"] == "mmlu"]
    assert len(mc) == 3 and mc["mc_correct"].mean() == pytest.approx(direct.accuracy)
    # nothing generated: forget terms 1, retain terms 0 -> aggregate 0
    assert metrics["task_aggregate"] == 0.0
    assert metrics["final_score"] == pytest.approx((0.0 + metrics["mia_score"] + direct.accuracy) / 3)


# ---------------------------------------------------------------- `soir evaluate` and the demo's evaluation


def _evaluate_args(testbed, out, *extra, forget=None, holdout=True):
    data = testbed["data"]
    args = ["evaluate", "--model", str(testbed["finetuned"]), "--forget", str(forget or data / "forget.parquet"),
            "--retain", str(data / "retain.parquet"), "--max-new-tokens", "8", "--no-progress", "--out", str(out), *extra]
    return args + (["--holdout", str(data / "holdout.parquet")] if holdout else [])


def test_evaluate_command_writes_metrics_and_per_example(quick_testbed, tmp_path, capsys):
    out = tmp_path / "eval"
    data = quick_testbed["data"]
    extra = ["--mmlu", str(data / "general_mc.parquet"), "--mmlu-prompt", "{question}", "--oracle", str(quick_testbed["root"] / "oracle"), "--mia-attack", "min_k"]
    assert main(_evaluate_args(quick_testbed, out, *extra)) == 0
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "per_example.parquet"]
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("forget/regurgitation", "retain/knowledge", "task_aggregate", "mia_auc", "mia/loss/auc", "mia/zlib/auc",
                "mia/min_k_pp/auc", "mmlu/accuracy", "forget_quality", "model_utility", "final_score"):
        assert key in metrics, key
    assert metrics["mia_auc"] == metrics["mia/min_k/auc"]
    assert metrics["settings"]["generation"]["max_new_tokens"] == 8 and metrics["settings"]["mia_attack"] == "min_k"
    assert metrics["settings"]["mmlu"]["prompt"] == "{question}"
    assert metrics["inputs"]["oracle"].endswith("oracle")
    per_example = pd.read_parquet(out / "per_example.parquet")
    assert list(per_example.columns) == list(ev.PER_EXAMPLE_COLUMNS)
    assert set(per_example["split"]) == {"forget", "retain", "holdout", "mmlu"}
    forget_ids = read_split(data / "forget.parquet")["id"]
    assert per_example.loc[per_example["split"] == "forget", "id"].tolist() == forget_ids.tolist()
    assert "MIA AUC" in capsys.readouterr().out


def test_evaluate_command_scores_rows_without_semeval_ids_as_completions(quick_testbed, tmp_path, capsys):
    forget = read_split(quick_testbed["data"] / "forget.parquet").drop(columns="id")
    forget.to_parquet(tmp_path / "no_ids.parquet")
    out = tmp_path / "eval"
    n = len(forget)
    with pytest.warns(UserWarning, match=rf"^forget \(no_ids.parquet\): {n} of {n} rows have no SemEval id .* scored as sentence completions") as caught:
        assert main(_evaluate_args(quick_testbed, out, forget=tmp_path / "no_ids.parquet", holdout=False)) == 0
    assert len([w for w in caught if "SemEval id" in str(w.message)]) == 1 and "\n" not in str(caught[0].message)
    assert capsys.readouterr().err == ""
    rows = pd.read_parquet(out / "per_example.parquet")
    forget_rows = rows[rows["split"] == "forget"]
    assert set(forget_rows["kind"]) == {"sc"} and forget_rows["rouge_l_recall"].notna().all()
    assert not any(key.startswith("mia") for key in json.loads((out / "metrics.json").read_text()))  # no holdout: no MIA


BAD_INPUT = {
    "--mia without a holdout": (["--mia"], False, r"membership inference needs non-members: give --holdout FILE"),
    "--mia-attack without a holdout": (["--mia-attack", "zlib"], False, r"membership inference needs non-members"),
    "MMLU answer out of range": (["--mmlu", "{tmp}/bad_mc.parquet"], True, r"MMLU file .*bad_mc.parquet: row 5: answer 7 is out of range for 4 choices"),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_evaluate_command_bad_input(case, quick_testbed, tmp_path, capsys):
    extra, holdout, message = BAD_INPUT[case]
    mc = pd.read_parquet(quick_testbed["data"] / "general_mc.parquet")
    mc.loc[5, "answer"] = 7
    mc.to_parquet(tmp_path / "bad_mc.parquet")
    out = tmp_path / "eval"
    code = main(_evaluate_args(quick_testbed, out, *[a.format(tmp=tmp_path) for a in extra], holdout=holdout))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("soir: error:") and re.search(message, err[0]), err
    assert not out.exists()


def test_the_testbed_models_evaluate_as_expected(quick_testbed):
    """On the reduced testbed the finetuned model regurgitates and answers its data in every task and
    is easy to tell from the holdout; the base model knows none of Task1 and Task2 but the Task3
    documents it was pretrained on; the retain-only oracle keeps the retain set and not the forget people."""
    from soir.models import load_model, load_tokenizer

    data = quick_testbed["data"]
    tokenizer = load_tokenizer(data / "tokenizer")
    splits = {s: read_split(data / f"{s}.parquet") for s in ("forget", "retain")}
    settings = EvalSettings(generation=GenerationSettings(max_new_tokens=80, batch_size=64, progress=False),
                            scoring=ScoreSettings(batch_size=64, progress=False), progress=False)
    metrics = {name: evaluate(load_model(quick_testbed[name], tokenizer), tokenizer, splits, holdout=read_split(data / "holdout.parquet"),
                              settings=settings)[0] for name in ("base", "finetuned", "oracle")}
    finetuned, base, oracle = metrics["finetuned"], metrics["base"], metrics["oracle"]
    for split in ("forget", "retain"):
        for task in ("Task1", "Task2", "Task3"):
            assert finetuned[f"{split}/{task}/knowledge"] >= 0.7 and finetuned[f"{split}/{task}/regurgitation"] >= 0.7, (split, task)
        for task in ("Task1", "Task2"):
            assert base[f"{split}/{task}/knowledge"] <= 0.2 and base[f"{split}/{task}/regurgitation"] <= 0.3, (split, task)
        assert base[f"{split}/Task3/knowledge"] >= 0.7  # pretraining data
    assert abs(finetuned["mia_auc"] - 0.5) >= 0.3
    assert oracle["retain/knowledge"] >= 0.7 and oracle["forget/Task2/knowledge"] <= 0.3
