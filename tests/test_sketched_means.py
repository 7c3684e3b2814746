"""Mean gradients under `--sketch` (docs/design.md §6): they are computed exactly, so the scores that
use only them and the curvature (`soir`, `soir-slope`, `cancel`) are the unsketched ones under any
sketch, and what `--save-sketches` stores ranks them again exactly."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from soir.data import encode, pad_id
from soir.errors import UserError
from soir.groups import Group, ParamSlice, gather
from soir.quantities import load_quantities, mean_form
from soir.ranking import RankSettings, rank, rerank
from soir.sketch import SKETCHES, gram_factor, span_coordinates

pytestmark = pytest.mark.usefixtures("one_thread")

SKETCHED = [k for k in SKETCHES if k != "none"]


def test_span_coordinates_keep_every_inner_product():
    gen = torch.Generator().manual_seed(0)
    shapes = {"w": (6, 5), "b": (6,)}
    forget = {n: torch.randn(s, generator=gen, dtype=torch.float64) for n, s in shapes.items()}
    retain = {n: 1e-3 * forget[n] + torch.randn(s, generator=gen, dtype=torch.float64) for n, s in shapes.items()}
    groups = [Group("whole", (ParamSlice("w"), ParamSlice("b")), 0, "mlp", "up", 36),
              Group("row 2", (ParamSlice("w", 0, 2), ParamSlice("b", 0, 2)), 0, "mlp", "neuron", 6)]
    for group in groups:
        f, r = gather(group, forget), gather(group, retain)
        cf, cr = span_coordinates(group, [forget, retain])
        assert cf.shape == cr.shape == (2,) and cf[1] == 0 and cf[0] == pytest.approx(float(f.norm()), rel=1e-14)
        for x, y, cx, cy in ((f, f, cf, cf), (r, f, cr, cf), (r, r, cr, cr)):
            assert float(cx @ cy) == pytest.approx(float(x @ y), rel=1e-12, abs=1e-14)
        (alone,) = span_coordinates(group, [forget])
        assert alone.shape == (1,) and float(alone[0]) == pytest.approx(float(f.norm()), rel=1e-14)
    # a zero vector and one parallel to the first get no new axis
    factor = gram_factor(torch.tensor([[0.0, 0.0, 0.0], [0.0, 4.0, -2.0], [0.0, -2.0, 1.0]], dtype=torch.float64))
    assert torch.allclose(factor.T @ factor, torch.tensor([[0.0, 0.0, 0.0], [0.0, 4.0, -2.0], [0.0, -2.0, 1.0]], dtype=torch.float64))
    assert factor[2, 2] == 0 and torch.equal(factor, torch.triu(factor))


def test_mean_form():
    assert mean_form("none", ["mean_forget", "mean_retain"]) == "exact"
    assert mean_form("sjlt", ["mean_forget", "mean_retain", "c_f", "c_r"]) == "span"
    assert mean_form("sjlt", ["per_example_retain", "mean_forget"]) == "sketched"  # soir-datainf: one sketch space


@pytest.fixture(scope="module")
def tiny(make_model, tokenizer):
    """A tiny float64 OLMo and two splits of different rows."""
    frame = pd.DataFrame({"id": [f"r{i}" for i in range(6)],
                          "input": ["What is Alice Moon's phone number?", "Where does Alice Moon work?", "Alice Moon was born on",
                                    "What is the capital of Norland?", "Seven plus five equals", "Who wrote the Fjord saga?"],
                          "output": [" 555-0142", " Port Vell", " 3 March 1990.", " Fjordheim", " twelve.", " Ivar Lund"]})
    return {"model": make_model("olmo", dtype=torch.float64), "forget": encode(frame.iloc[:3], tokenizer),
            "retain": encode(frame.iloc[3:], tokenizer), "pad": pad_id(tokenizer)}


def _rank(tiny, **settings):
    return rank(tiny["model"], tiny["forget"], tiny["retain"], tiny["pad"], RankSettings(batch_size=3, curvature="hvp", **settings),
                progress=False, keep_quantities=True)


@pytest.mark.parametrize("score", ["soir", "soir-slope", "cancel"])
def test_scores_of_mean_gradients_are_the_unsketched_ones_under_every_sketch(tiny, score):
    exact = _rank(tiny, score=score).table
    columns = [c for c in exact.columns if c != "group"]
    for sketch in SKETCHED:
        sketched = _rank(tiny, score=score, sketch=sketch, dim=8).table  # k far below every group's size
        assert (sketched["group"] == exact["group"]).all()
        pd.testing.assert_frame_equal(sketched[columns], exact[columns], check_exact=False, rtol=1e-9, atol=1e-15, obj=sketch)


def test_saved_span_coordinates_rank_every_mean_gradient_score_again(tiny, tmp_path):
    ranking = _rank(tiny, sketch="sjlt", dim=8, delta=0.1)
    ranking.save_quantities(tmp_path / "soir")
    table, quantities, manifest = load_quantities(tmp_path / "soir")
    assert manifest["version"] == 2 and manifest["means"] == "span"
    assert {v.shape for k in ("mean_forget", "mean_retain") for v in quantities[k].values()} == {(2,)}  # not k, not D_S
    pd.testing.assert_frame_equal(rerank(tmp_path / "soir").table, ranking.table, check_exact=False, rtol=1e-12)
    for score in ("soir-slope", "cancel"):  # other scores from the same file equal a fresh exact ranking
        fresh = _rank(tiny, score=score).table
        pd.testing.assert_frame_equal(rerank(tmp_path / "soir", score=score).table, fresh, check_exact=False, rtol=1e-9, atol=1e-15)
    other_delta = rerank(tmp_path / "soir", delta=0.05).table
    pd.testing.assert_frame_equal(other_delta, _rank(tiny, delta=0.05).table, check_exact=False, rtol=1e-9, atol=1e-15)

    # soir-datainf keeps the mean forget gradient in the space of the per-example sketches
    datainf = _rank(tiny, score="soir-datainf", sketch="gaussian", dim=8)
    datainf.save_quantities(tmp_path / "datainf")
    _, quantities, manifest = load_quantities(tmp_path / "datainf")
    assert manifest["means"] == "sketched" and {v.shape for v in quantities["mean_forget"].values()} == {(8,)}
    pd.testing.assert_frame_equal(rerank(tmp_path / "datainf").table, datainf.table, check_exact=False, rtol=1e-12)


def test_old_and_future_files_are_refused_in_one_line(tiny, tmp_path):
    ranking = _rank(tiny, sketch="sjlt", dim=8)
    manifest_path = tmp_path / "s" / "manifest.json"
    for version, message in ((1, "format 1.*sketched mean gradients.*--save-sketches"), (3, "format version 3.*--save-sketches")):
        ranking.save_quantities(tmp_path / "s")
        manifest = json.loads(manifest_path.read_text())
        manifest["version"] = version
        manifest_path.write_text(json.dumps(manifest))
        with pytest.raises(UserError, match=message) as info:
            load_quantities(tmp_path / "s")
        assert "\n" not in str(info.value)
    # format 1 without a sketch meant what it means now: still read
    exact = _rank(tiny)
    exact.save_quantities(tmp_path / "s")
    manifest = json.loads(manifest_path.read_text())
    manifest["version"] = 1
    del manifest["means"]
    manifest_path.write_text(json.dumps(manifest))
    assert np.allclose(rerank(tmp_path / "s").table["score"], exact.table["score"], rtol=1e-12)
