"""`soir-line`'s line search: `solve` against `search` on hand-made curves, and `line_quantities`
(recorded forwards, blocks below a group replayed) against `reference_line_quantities` (full
forwards, bisection) on tiny models in float64."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from soir.curvature import RecordedForwards, group_direction, split_loss
from soir.data import encode, example_losses, pad_id, split_batches
from soir.gradients import mean_gradient
from soir.groups import parameter_groups
from soir.linesearch import line_quantities, loss_along, reference_line_quantities, replica_count, search, solve

pytestmark = pytest.mark.usefixtures("one_thread")

CURVES = {  # (loss along the line, a = its slope at 0, Δ)
    "quadratic": (lambda e: 0.5 * e + 2.0 * e * e, 0.5, 1.0),
    "saturating": (lambda e: 3.0 * math.tanh(e), 3.0, 2.0),  # first-order step Δ/a overshoots the curve's bend
    "steep": (lambda e: 1e-3 * e + (e / 40.0) ** 4, 1e-3, 1.0),  # the root ~40, far below Δ/a = 1000
    "far": (lambda e: 1e-3 * e / (1.0 + e / 5000.0), 1e-3, 1.0),  # the root 1250, past Δ/a = 1000: the bracket grows
    "sigmoid": (lambda e: 4.0 / (1.0 + math.exp(-(math.log(e) + 3.0) * 3.0)) + 1e-4 * e, None, 1.0),  # a neuron's shape
}


def _slope_at_zero(curve, eps: float = 1e-9) -> float:
    return curve(eps) / eps


@pytest.mark.parametrize("name", CURVES)
def test_solve_gives_the_converged_answer_of_search_in_fewer_evaluations(name):
    """From the first-order step, `solve` lands where `search` lands when its bisection is run to
    the end (60 points), to its log-η tolerance, and with fewer points than `search` needs to get
    that close."""
    curve, a, delta = CURVES[name]
    a = a if a is not None else _slope_at_zero(curve)
    converged, gain = search(curve, 0.0, delta, delta / a, 60)
    assert math.isfinite(converged) and gain == pytest.approx(delta, rel=1e-12)
    for tolerance in (1e-6, 1e-10):
        eta, found, used = solve(curve, a, delta, evaluations=60, tolerance=tolerance)
        assert eta == pytest.approx(converged, rel=tolerance), (name, tolerance)
        assert found == curve(eta)
        needs = next(n for n in range(1, 61) if abs(math.log(search(curve, 0.0, delta, delta / a, n)[0] / converged)) <= tolerance)
        assert used < needs, (name, tolerance, used, needs)
    _, _, from_guess = solve(curve, a, delta, guess=converged * 1.01, evaluations=60)
    assert from_guess <= 4


def test_solve_keeps_the_verdict_of_search_on_groups_that_cannot_reach_delta():
    """A curve that saturates below Δ: both give up (inf, the largest gain seen) after trying
    search's grid up to 4⁹ Δ/a; running out of evaluations first is also a give-up, as in search."""
    curve = lambda e: 0.9 * math.tanh(e)  # noqa: E731
    eta, gain = search(curve, 0.0, 1.0, 1.0 / 0.9, 12)
    assert eta == math.inf
    tried = []
    eta2, gain2, used = solve(lambda e: tried.append(e) or curve(e), 0.9, 1.0, guess=0.05)
    assert eta2 == math.inf and gain2 == pytest.approx(gain, rel=1e-12) and used <= 12
    assert max(tried) == pytest.approx(4**9 / 0.9, rel=1e-12)  # the last point search tries
    grid = {round(math.log(e * 0.9) / math.log(4), 9) for e in tried}
    assert set(range(10)) <= grid  # every point of search's grid was tried
    eta3, _, used3 = solve(curve, 0.9, 1.0, evaluations=5)
    assert eta3 == math.inf and used3 == 5


@pytest.fixture(scope="module")
def batches(tokenizer):
    import pandas as pd

    frame = pd.DataFrame({
        "id": [f"r{i}" for i in range(6)],
        "input": ["What is Alice Moon's phone number?", "Where does Alice Moon work?", "Alice Moon was born on",
                  "What is the capital of Norland?", "In the village of Oakridge", "Seven plus five equals"],
        "output": [" 555-0142", " Port Vell", " 3 March 1990 and works as a baker.", " Fjordheim", " a quiet fox named Pim", " twelve"],
        "task": ["Task2"] * 6,
    })
    pad = pad_id(tokenizer)
    forget = split_batches(encode(frame.iloc[:4], tokenizer), pad, 2)  # two batches per split: the record holds each
    retain = split_batches(encode(frame.iloc[2:], tokenizer), pad, 3)
    return forget, retain


@pytest.mark.parametrize("arch", ["olmo", "gpt2"])
def test_replayed_line_search_gives_the_reference_eta_and_damage(make_model, batches, arch):
    """On a tiny model in float64, for tensor groups from the embeddings to the head and a neuron: with a tight
    tolerance η, forget gain and retain damage equal those of the full-forward reference run to
    convergence (within 1e-6 relative); with the default tolerance η is within 1e-6 and the
    damage is exactly the full-forward retain damage at that η. The model comes back bit for bit."""
    forget, retain = batches
    model = make_model(arch, dtype=torch.float64)
    tensors = parameter_groups(model, "tensor")
    groups = tensors[::2] + tensors[-1:] + [g for g in parameter_groups(model, "neuron") if g.role == "neuron"][:1]  # embeddings to head
    names = list(dict.fromkeys(n for g in groups for n in g.param_names))
    direction = mean_gradient(model, forget, names)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    delta = 0.05  # reached by every tensor group of the random tiny models, by no single neuron
    reference = reference_line_quantities(model, forget, retain, groups, direction, delta, evaluations=45)  # bisected to ~1e-13
    tight = line_quantities(model, forget, retain, groups, direction, delta, evaluations=45, tolerance=1e-10)
    counts: dict[str, int] = {}
    default = line_quantities(model, forget, retain, groups, direction, delta, counts=counts)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    named = dict(model.named_parameters())
    reached = [g for g in groups if math.isfinite(float(reference[g.name][0]))]
    assert len(reached) >= len(groups) // 2
    for g in groups:
        ref, new, fast = (x[g.name].numpy() for x in (reference, tight, default))
        if not math.isfinite(ref[0]):
            assert new[0] == fast[0] == math.inf and np.isnan(new[2]) and np.isnan(fast[2]), g.name
            continue
        np.testing.assert_allclose(new, ref, rtol=1e-6, err_msg=g.name)
        assert fast[0] == pytest.approx(ref[0], rel=1e-6), g.name
        with torch.no_grad():
            base_retain = float(split_loss(model, retain))
            full = loss_along(model, group_direction(g, direction, named), float(fast[0]), retain, example_losses) - base_retain
        assert fast[2] == pytest.approx(full, rel=1e-9, abs=1e-12), g.name
    assert np.mean([counts[g.name] for g in reached]) < 8  # the reference takes 12 at its default


@pytest.mark.parametrize("arch", ["olmo", "gpt2"])
def test_replicas_of_one_block_share_a_forward_with_the_losses_of_one_at_a_time(make_model, batches, arch):
    """`RecordedForwards.totals` with several steps (tensor groups and neurons of one block, one
    forward of the repeated batches) gives each step's loss as the one-at-a-time path does, within
    1e-12 relative in float64; the model comes back bit for bit."""
    forget, _ = batches
    model = make_model(arch, dtype=torch.float64)
    layer = [g for g in parameter_groups(model, "tensor") if g.layer == 1]
    neurons = [g for g in parameter_groups(model, "neuron") if g.role == "neuron" and g.layer == 1][:3]
    groups = layer + neurons
    names = list(dict.fromkeys(n for g in groups for n in g.param_names))
    direction = mean_gradient(model, forget, names)
    named = dict(model.named_parameters())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    recorded = RecordedForwards(model, forget, groups)
    assert {recorded.starts[g.name] for g in groups} == {1}
    steps = [(group_direction(g, direction, named), 0.5 * (i + 1)) for i, g in enumerate(groups)]
    together = recorded.totals(1, steps)
    alone = [recorded.totals(1, [step])[0] for step in steps]
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    np.testing.assert_allclose(together, alone, rtol=1e-12)
    assert len(set(np.round(alone, 9))) == len(steps)  # the steps give different losses: the replicas are told apart


@pytest.mark.parametrize("arch", ["olmo", "gpt2"])
def test_line_searches_side_by_side_give_the_eta_and_damage_of_one_at_a_time(make_model, batches, arch):
    """With `replicas` 3, up to three groups of a block search side by side, one forward per round of
    evaluations: every group's η and damage equal those of `replicas` 1 within the search's
    tolerance (1e-6 relative), in fewer forwards, the groups outside the blocks included."""
    forget, retain = batches
    model = make_model(arch, dtype=torch.float64)
    groups = parameter_groups(model, "tensor") + [g for g in parameter_groups(model, "neuron") if g.role == "neuron"][:4]
    names = list(dict.fromkeys(n for g in groups for n in g.param_names))
    direction = mean_gradient(model, forget, names)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    forwards = []
    original = RecordedForwards.totals
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(RecordedForwards, "totals", lambda self, start, steps: forwards.append(len(steps)) or original(self, start, steps))
        alone = line_quantities(model, forget, retain, groups, direction, 0.05)
        n_alone = len(forwards)
        together = line_quantities(model, forget, retain, groups, direction, 0.05, replicas=3)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert max(forwards[n_alone:]) == 3 and len(forwards) - n_alone < 0.6 * n_alone
    assert list(together) == [g.name for g in groups]
    for g in groups:
        one, three = alone[g.name].numpy(), together[g.name].numpy()
        if not math.isfinite(one[0]):
            assert three[0] == math.inf and np.isnan(three[2]), g.name
            continue
        np.testing.assert_allclose(three, one, rtol=1e-6, err_msg=g.name)


def test_default_line_batch_is_one_on_cpu_and_what_the_budget_holds_on_an_accelerator(make_model, batches, monkeypatch):
    import soir.linesearch

    forget, retain = batches
    model = make_model("olmo")
    assert replica_count(model, forget + retain, None) == 1 and replica_count(model, forget + retain, 100.0) == 1  # CPU
    monkeypatch.setattr(soir.linesearch, "device_of", lambda m: torch.device("cuda"))
    counts = [replica_count(model, forget + retain, gib) for gib in (1e-9, 5e-4, 1e-3, 2e-3, 100.0)]
    assert counts[0] == 1 and counts[-1] == 8  # at least one; at most eight
    assert counts == sorted(counts) and len(set(counts)) >= 3  # more memory, more replicas
