"""The scores built on "why localizers fail after finetuning" (docs/design.md §5): `soir-slope`,
`cancel` and `revert`, against hand computations on tiny models."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from soir.curvature import split_loss
from soir.data import encode, pad_id, split_batches
from soir.errors import UserError
from soir.groups import parameter_groups
from soir.ranking import RankSettings, rank
from soir.revert import revert_quantities
from soir.scores import SCORES

pytestmark = pytest.mark.usefixtures("one_thread")


def test_cancel_by_hand():
    row = SCORES["cancel"].fn(mean_forget=torch.tensor([1.0, 0.0]), mean_retain=torch.tensor([-1.0, 1.0]))
    assert row["cos"] == pytest.approx(-1 / math.sqrt(2)) and row["score"] == pytest.approx(1 / math.sqrt(2))
    assert row["forget_norm"] == 1.0 and row["retain_norm"] == pytest.approx(math.sqrt(2))
    # a scaled copy of the same pair scores the same: the score is scale-free
    assert SCORES["cancel"].fn(mean_forget=torch.tensor([3.0, 0.0]), mean_retain=torch.tensor([-0.1, 0.1]))["score"] == pytest.approx(row["score"])
    assert math.isnan(SCORES["cancel"].fn(mean_forget=torch.zeros(2), mean_retain=torch.ones(2))["score"])


def test_soir_slope_by_hand_and_as_soirs_small_delta_limit():
    f, r = torch.tensor([2.0, 0.0]), torch.tensor([-1.0, 3.0])  # a = 4, b = −2
    row = SCORES["soir-slope"].fn(mean_forget=f, mean_retain=r)
    assert (row["a"], row["b"], row["score"]) == (4.0, -2.0, -0.5)
    # soir's retain damage per nat forgotten tends to b / a as Δ → 0, whatever the curvature
    quadratic = SCORES["soir"].fn(mean_forget=f, mean_retain=r, c_f=3.0, c_r=-7.0, delta=1e-7)
    assert quadratic["score"] / 1e-7 == pytest.approx(row["score"], rel=1e-5)
    assert SCORES["soir-slope"].lower_is_better and SCORES["soir-slope"].sketchable
    assert math.isnan(SCORES["soir-slope"].fn(mean_forget=torch.zeros(2), mean_retain=r)["score"])


@pytest.mark.parametrize("rises, expected", [((0.5, 0.5), 0.0), ((1.0, 0.25), 0.75), ((-0.2, 0.3), -0.5)])
def test_revert_score_by_hand(rises, expected):
    row = SCORES["revert"].fn(revert=torch.tensor(rises, dtype=torch.float64))
    assert row["score"] == pytest.approx(expected) and (row["forget_rise"], row["retain_rise"]) == rises
    assert not SCORES["revert"].lower_is_better and SCORES["revert"].needs_base and not SCORES["cancel"].needs_base


@pytest.fixture
def pair(make_model, tokenizer, qa_frame):
    model, base = make_model("olmo", dtype=torch.float64, seed=0), make_model("olmo", dtype=torch.float64, seed=1)
    data = encode(qa_frame, tokenizer)
    forget, retain = (split_batches(data.subset(rows), pad_id(tokenizer), 2) for rows in ([0, 1], [2, 3]))
    return model, base, forget, retain


def test_revert_quantities_are_the_losses_of_the_reverted_model(pair):
    model, base, forget, retain = pair
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    groups = [g for g in parameter_groups(model, "tensor") if g.name == "model.layers.1.mlp.down_proj.weight"]
    groups += [g for g in parameter_groups(model, "neuron") if g.name.startswith("model.layers.0.mlp")][:2]
    got = revert_quantities(model, base, forget, retain, groups)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # restored bit for bit
    base_params = dict(base.named_parameters())
    for g in groups:
        reverted = copy.deepcopy(model)
        named = dict(reverted.named_parameters())
        with torch.no_grad():
            for s in g.slices:  # by hand: copy the base's entries of each slice
                target, source = named[s.name], base_params[s.name]
                if s.dim is None:
                    target.copy_(source)
                else:
                    target.select(s.dim, s.index).copy_(source.select(s.dim, s.index))
        with torch.no_grad():
            expected = [float(split_loss(reverted, b) - split_loss(model, b)) for b in (forget, retain)]
        assert got[g.name].tolist() == pytest.approx(expected, rel=1e-9, abs=1e-12)
        assert expected[0] != 0.0


def test_rank_by_revert_needs_the_base_and_ranks_descending(pair, tokenizer, qa_frame):
    model, base, _, _ = pair
    data = encode(qa_frame, tokenizer)
    forget, retain = data.subset([0, 1]), data.subset([2, 3])
    with pytest.raises(UserError, match="needs the base model"):
        rank(model, forget, retain, pad_id(tokenizer), RankSettings(score="revert"), progress=False)
    table = rank(model, forget, retain, pad_id(tokenizer), RankSettings(score="revert"), base_model=base, progress=False).table
    ordered = table.sort_values("rank")
    assert list(ordered["score"]) == sorted(ordered["score"], reverse=True)
    assert {"forget_rise", "retain_rise"} <= set(table.columns)
