"""The front door (`import soirlab`): every stage on loaded objects or paths, equal to the command line."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

import soirlab as sl
from soirlab.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def loaded(quick_testbed):
    model, tokenizer = sl.load_model(quick_testbed["finetuned"])
    return model, tokenizer, sl.load_splits(quick_testbed["data"])


def test_load_splits_reads_a_testbed_directory(loaded):
    _, _, splits = loaded
    assert set(splits) == {"forget", "retain", "holdout", "general"} and all(len(f) > 0 for f in splits.values())


def test_rank_from_data_frames_equals_the_command(loaded, quick_testbed, tmp_path):
    model, tokenizer, splits = loaded
    ranking = sl.rank(model, splits["forget"], splits["retain"], tokenizer=tokenizer, include=(r"layers\.1\.",), batch_size=8, progress=False)
    assert isinstance(ranking, sl.Ranking) and ranking.settings.batch_size == 8
    data = quick_testbed["data"]
    assert main(["rank", "--model", str(quick_testbed["finetuned"]), "--forget", str(data / "forget.parquet"), "--retain",
                 str(data / "retain.parquet"), "--include", r"layers\.1\.", "--batch-size", "8", "--out", str(tmp_path), "--no-progress"]) == 0
    pd.testing.assert_frame_equal(ranking.table, sl.load_ranking(tmp_path).table, check_dtype=False)
    with pytest.raises(TypeError, match="unknown options"):
        sl.rank(model, splits["forget"], splits["retain"], tokenizer=tokenizer, scor="soir")


def test_unlearn_a_loaded_model_without_reading_it_again_equals_the_command(loaded, quick_testbed, tmp_path, monkeypatch):
    _, tokenizer, splits = loaded
    model, _ = sl.load_model(quick_testbed["finetuned"], eager_attention=False)  # as `soir unlearn` loads it
    ranking = sl.rank(model, splits["forget"], splits["retain"], tokenizer=tokenizer, score="grad-magnitude", progress=False)
    mask = sl.select(ranking, model, top=0.2, by="params")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    import transformers

    def no_reload(*args, **kwargs):
        raise AssertionError("unlearn read the model from disk again")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_reload)
    unlearned, result = sl.unlearn(model, splits["forget"], splits["retain"], tokenizer=tokenizer, mask=mask, copy=True,
                                   objective="npo", lr=1e-2, steps=4, eval_every=2, w_retain=2, progress=False)
    monkeypatch.undo()
    assert unlearned is not model and all(torch.equal(before[n], p) for n, p in model.named_parameters())  # copy=True
    assert [row["step"] for row in result.evals] == [0, 2, 4] and result.reference == "SwapReference"
    mask.save(tmp_path / "mask")
    data = quick_testbed["data"]
    assert main(["unlearn", "--model", str(quick_testbed["finetuned"]), "--forget", str(data / "forget.parquet"), "--retain",
                 str(data / "retain.parquet"), "--mask", str(tmp_path / "mask"), "--objective", "npo", "--lr", "1e-2", "--steps", "4",
                 "--eval-every", "2", "--w-retain", "2", "--out", str(tmp_path / "cli"), "--no-progress"]) == 0
    written = load_file(tmp_path / "cli" / "model.safetensors")
    assert all(torch.equal(written[n], p) for n, p in unlearned.named_parameters() if n in written)
    cli_evals = [json.loads(line) for line in (tmp_path / "cli" / "eval.jsonl").read_text().splitlines()]
    assert cli_evals == result.evals


def test_evaluate_compare_shift_and_curves_through_the_front_door(loaded, quick_testbed):
    model, tokenizer, splits = loaded
    metrics, per_example = sl.evaluate(model, tokenizer, splits, generate=False)
    assert metrics["forget/accuracy"] > 0.9 and "mia_auc" in metrics and set(per_example["split"]) == {"forget", "retain", "holdout"}
    a = sl.rank(model, splits["forget"], splits["retain"], tokenizer=tokenizer, score="random", progress=False)
    b = sl.rank(model, splits["forget"], splits["retain"], tokenizer=tokenizer, score="random", seed=1, progress=False)
    assert len(sl.compare({"random": a, "random-1": b})) == 1
    shift = sl.shift(quick_testbed["base"], model, progress=False)
    assert (shift.loc[shift["level"] == "tensor", "l2"] > 0).all()
    curves = sl.curves(model, splits["forget"], splits["retain"], tokenizer=tokenizer, by="layer", include=(r"layers\.0",),
                       steps=2, eval_every=1, lr=1e-2, progress=False)
    assert isinstance(curves, sl.Curves) and list(curves.summary["group"]) == ["model.layers.0"] and len(curves.table) == 3
