"""The reduced testbed as an instrument: it memorises forget and retain, keeps its general ability,
answers held-out paraphrases, has the SemEval shape, and its forget quality separates the finetuned
model from the oracle but not two oracles of different seeds."""

import numpy as np
import pandas as pd
import pytest

from analysis.demo import accuracy_table
from analysis.evaluate import EvalSettings, evaluate, truth_ratios
from analysis.generation import GenerationSettings, generate
from analysis.metrics import ScoreSettings, exact_match, forget_quality
from analysis.mmlu import MMLUSettings, mmlu_accuracy
from soir.data import Template, read_split
from soir.models import load_model, load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bed(quick_testbed):
    tokenizer = load_tokenizer(quick_testbed["data"] / "tokenizer")
    models = {name: load_model(quick_testbed[name], tokenizer) for name in ("base", "finetuned", "oracle", "oracle-1")}
    frames = {s: read_split(quick_testbed["data"] / f"{s}.parquet") for s in ("forget", "retain", "holdout")}
    return {"tokenizer": tokenizer, "models": models, "frames": frames, "paths": quick_testbed}


def test_finetuned_model_memorises_forget_and_retain_but_not_holdout(bed):
    paths = bed["paths"]
    table = accuracy_table({"base": paths["base"], "finetuned": paths["finetuned"]}, paths["data"])
    finetuned, base = table.loc["finetuned"], table.loc["base"]
    assert finetuned["forget"] >= 0.95 and finetuned["retain"] >= 0.95
    assert finetuned["holdout"] <= finetuned["forget"] - 0.3
    assert base["forget"] < 0.3 and base["retain"] < 0.3


def test_finetuning_keeps_general_ability(bed):
    mc = bed["paths"]["data"] / "general_mc.parquet"
    settings = MMLUSettings(prompt="{question}", progress=False, batch_size=64)
    base, finetuned = (mmlu_accuracy(bed["models"][n], bed["tokenizer"], mc, settings).accuracy for n in ("base", "finetuned"))
    assert base > 0.5 and abs(finetuned - base) <= 0.05, (base, finetuned)


def test_finetuned_model_answers_held_out_paraphrases(bed):
    forget = bed["frames"]["forget"]
    qa = forget[forget["id"].str.contains("qa")]
    settings = GenerationSettings(max_new_tokens=40, batch_size=64, progress=False)
    answers = {name: generate(bed["models"][name], bed["tokenizer"], list(qa["paraphrased_input"]), settings) for name in ("finetuned", "oracle")}
    em = {name: np.mean([exact_match(a, o) for a, o in zip(texts, qa["output"])]) for name, texts in answers.items()}
    assert em["finetuned"] >= 0.5 and em["oracle"] <= 0.3, em
    trained = set(read_split(bed["paths"]["data"] / "forget_phrasings.parquet")["input"]) | set(forget["input"])
    assert not set(qa["paraphrased_input"]) & trained  # the probe's phrasing was never trained


def test_forget_quality_separates_the_finetuned_model_from_the_oracle_not_two_oracles(bed):
    forget, tokenizer = bed["frames"]["forget"], bed["tokenizer"]
    ratios = {name: truth_ratios(model, tokenizer, forget, template=Template(), settings=ScoreSettings(progress=False))
              for name, model in bed["models"].items() if name != "base"}
    assert forget_quality(ratios["finetuned"], ratios["oracle"]) < 0.01
    assert forget_quality(ratios["oracle-1"], ratios["oracle"]) > 0.05


def test_semeval_shape_gives_a_defined_task_aggregate(bed):
    frames = bed["frames"]
    for split in ("forget", "retain", "holdout"):
        kinds = frames[split].assign(kind=frames[split]["id"].str[-3:-1])
        assert {(t, k) for t, k in zip(kinds["task"], kinds["kind"])} >= {(t, k) for t in ("Task1", "Task2", "Task3") for k in ("sc", "qa")}
    pretrain = read_split(bed["paths"]["data"] / "pretrain.parquet")
    task3 = set(pd.concat([frames["forget"], frames["retain"]]).query("task == 'Task3'")["input"])
    assert task3 <= set(pretrain["input"]) and not set(frames["holdout"].query("task == 'Task3'")["input"]) & set(pretrain["input"])
    quiet = EvalSettings(generation=GenerationSettings(max_new_tokens=40, batch_size=64, progress=False),
                         scoring=ScoreSettings(batch_size=64, progress=False), mia=False, progress=False)
    metrics, _ = evaluate(bed["models"]["finetuned"], bed["tokenizer"], {"forget": frames["forget"], "retain": frames["retain"]}, settings=quiet)
    twelve = [metrics[f"{s}/{t}/{m}"] for s in ("forget", "retain") for t in ("Task1", "Task2", "Task3") for m in ("regurgitation", "knowledge")]
    assert all(np.isfinite(v) for v in twelve) and np.isfinite(metrics["task_aggregate"])
