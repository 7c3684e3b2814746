"""OpenUnlearning's wga, satimp, undial, ce-u and altpo (docs/design.md §7): float64 hand computations
on fixed logits, one token at a time, their gradients where a weight or target is detached, the
alternate answers, and two steps of real masked unlearning on a tiny model."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch

from soir.data import collate, encode, example_losses, pad_id
from soir.errors import UserError
from soir.mask import Mask
from tests.conftest import neuron_selection
from tests.test_methods import BATCHES, FORGET, IDK, RETAIN, log_sigmoid, random_logits
from tests.test_objectives import Table, TableReference, X, mean_nll, token_logprobs
from unlearn.loop import TrainSettings
from unlearn.objectives import (
    IDK_STREAM,
    AltPO,
    OBJECTIVES,
    ObjectiveSettings,
    get_objective,
    preferred_frame,
    refusal_for,
    unlearns,
    with_alternates,
    with_refusals,
)
from unlearn.unlearning import unlearn_model

pytestmark = pytest.mark.usefixtures("one_thread")

NEW = ("wga", "satimp", "undial", "ce-u", "altpo")
S = ObjectiveSettings(w_forget=0.7, w_retain=1.3, beta=0.5, wga_alpha=0.6, satimp_beta1=1.5, satimp_beta2=0.8, undial_gamma=2.5,
                      ceu_skip=1)


@pytest.fixture
def tables():
    logits = {name: random_logits(batch, 10 + i) for i, (name, batch) in enumerate(BATCHES.items())}
    ref = {name: random_logits(batch, 20 + i).detach() for i, (name, batch) in enumerate(BATCHES.items())}
    model = Table([(BATCHES[n]["input_ids"], logits[n]) for n in BATCHES])
    reference = TableReference([(BATCHES[n]["input_ids"], ref[n]) for n in BATCHES])
    return SimpleNamespace(model=model, reference=reference, logits=logits, ref=ref)


def run(name, tables, settings=S):
    objective = get_objective(name, settings)
    loss, parts = objective(tables.model, {k: BATCHES[k] for k in objective.streams}, tables.reference)
    assert loss.requires_grad and all(not v.requires_grad for v in parts.values())
    return float(loss.detach()), {k: float(v) for k, v in parts.items()}


# ---------------------------------------------------------------- by hand: one labelled position at a time


def positions(labels):
    """Per example: the (t, token) of each labelled position t ≥ 1 (the logits at t − 1 predict it)."""
    return [[(t, int(labels[i, t])) for t in range(1, labels.shape[1]) if labels[i, t] != X] for i in range(labels.shape[0])]


def distribution(logits, i, t):
    return torch.softmax(logits[i, t - 1].detach().double(), 0)


def reweighted_by_hand(logits, labels, weight):
    """mean_i (1/|y_i|) Σ_t weight(p_t) · (−log p_t)."""
    rows = []
    for i, row in enumerate(positions(labels)):
        terms = []
        for t, y in row:
            p = float(distribution(logits, i, t)[y])
            terms.append(weight(p) * -math.log(p))
        rows.append(sum(terms) / len(terms))
    return sum(rows) / len(rows)


def soft_ce_by_hand(logits, labels, target, skip=0):
    """mean over rows of (1/|y_i'|) Σ_t −Σ_v q_t(v) log p_t(v), q_t = target(i, t, y); a row with no positions left counts 0."""
    rows = []
    for i, row in enumerate(positions(labels)):
        terms = []
        for t, y in row[skip:]:
            p, q = distribution(logits, i, t), target(i, t, y)
            terms.append(-sum(float(q[v]) * math.log(float(p[v])) for v in range(len(p)) if q[v] > 0))
        rows.append(sum(terms) / len(terms) if terms else 0.0)
    return sum(rows) / len(rows)


def logit_gradient(objective_name, settings, tables, stream="forget"):
    """The gradient of an objective's loss in the model's logits of one stream."""
    objective = get_objective(objective_name, settings)
    loss, _ = objective(tables.model, {k: BATCHES[k] for k in objective.streams}, tables.reference)
    loss.backward()
    return tables.logits[stream].grad


def test_wga_weights_each_forget_tokens_nll_by_its_probability_to_the_alpha(tables):
    loss, parts = run("wga", tables)
    wga = reweighted_by_hand(tables.logits["forget"], FORGET["labels"], lambda p: p ** 0.6)
    retain = mean_nll(tables.logits["retain"], RETAIN["labels"])
    assert parts == pytest.approx({"wga": wga, "forget_nll": mean_nll(tables.logits["forget"], FORGET["labels"]), "retain_nll": retain},
                                  rel=1e-12)
    assert loss == pytest.approx(-0.7 * wga + 1.3 * retain, rel=1e-12)
    # α = 0 is gradient ascent plus the retain NLL (graddiff)
    plain, _ = run("wga", tables, ObjectiveSettings(w_forget=0.7, w_retain=1.3, wga_alpha=0.0))
    graddiff, _ = run("graddiff", tables, ObjectiveSettings(w_forget=0.7, w_retain=1.3))
    assert plain == pytest.approx(graddiff, rel=1e-12)


def test_satimp_weights_by_saturation_and_importance(tables):
    loss, parts = run("satimp", tables)
    satimp = reweighted_by_hand(tables.logits["forget"], FORGET["labels"], lambda p: p ** 1.5 * (1 - p) ** 0.8)
    assert parts["satimp"] == pytest.approx(satimp, rel=1e-12) and satimp > 1e-3
    assert loss == pytest.approx(-0.7 * satimp + 1.3 * mean_nll(tables.logits["retain"], RETAIN["labels"]), rel=1e-12)
    defaults = ObjectiveSettings()
    assert (defaults.satimp_beta1, defaults.satimp_beta2, defaults.wga_alpha) == (5.0, 1.0, 1.0)  # OpenUnlearning's


@pytest.mark.parametrize("name, weight", [("wga", lambda p: p ** 0.6), ("satimp", lambda p: p ** 1.5 * (1 - p) ** 0.8)])
def test_the_token_weights_are_detached(tables, name, weight):
    """The gradient is gradient ascent's, token by token, times the weight: −w_f/(B |y_i|) · w(p) · (p − e_y)."""
    grad = logit_gradient(name, ObjectiveSettings(w_forget=0.7, w_retain=0.0, wga_alpha=0.6, satimp_beta1=1.5, satimp_beta2=0.8), tables)
    rows = positions(FORGET["labels"])
    for i, row in enumerate(rows):
        for t, y in row:
            p = distribution(tables.logits["forget"], i, t)
            expected = -0.7 / (len(rows) * len(row)) * weight(float(p[y])) * (p - torch.nn.functional.one_hot(torch.tensor(y), len(p)))
            assert torch.allclose(grad[i, t - 1], expected, rtol=1e-10, atol=1e-14)
    labelled = torch.zeros_like(grad[..., 0], dtype=torch.bool)
    for i, row in enumerate(rows):
        for t, _ in row:
            labelled[i, t - 1] = True
    assert (grad[~labelled] == 0).all()  # prompt and padding positions get nothing


def test_undial_distils_towards_the_reference_with_the_true_logit_lowered(tables):
    loss, parts = run("undial", tables)

    def target(i, t, y):
        z = tables.ref["forget"][i, t - 1].double().clone()
        z[y] -= 2.5
        return torch.softmax(z, 0)

    undial = soft_ce_by_hand(tables.logits["forget"], FORGET["labels"], target)
    retain = mean_nll(tables.logits["retain"], RETAIN["labels"])
    assert parts["undial"] == pytest.approx(undial, rel=1e-12) and parts["retain_nll"] == pytest.approx(retain, rel=1e-12)
    assert loss == pytest.approx(0.7 * undial + 1.3 * retain, rel=1e-12)
    # the gradient in the logits is p − q: the student is pulled to the adjusted teacher
    grad = logit_gradient("undial", ObjectiveSettings(w_forget=1.0, w_retain=0.0, undial_gamma=2.5), tables)
    rows = positions(FORGET["labels"])
    for i, row in enumerate(rows):
        for t, y in row:
            expected = (distribution(tables.logits["forget"], i, t) - target(i, t, y)) / (len(rows) * len(row))
            assert torch.allclose(grad[i, t - 1], expected, rtol=1e-10, atol=1e-14)
    with pytest.raises(ValueError, match="reference"):
        get_objective("undial", S)(tables.model, BATCHES, None)


@pytest.mark.parametrize("skip", [0, 1, 2])
def test_ce_u_targets_the_models_own_distribution_without_the_true_token(tables, skip):
    settings = ObjectiveSettings(w_forget=0.7, ceu_skip=skip)
    loss, parts = run("ce-u", tables, settings)

    def target(i, t, y):
        p = distribution(tables.logits["forget"], i, t).clone()
        p[y] = 0.0
        return p / p.sum()

    ceu = soft_ce_by_hand(tables.logits["forget"], FORGET["labels"], target, skip=skip)
    assert parts["ceu"] == pytest.approx(ceu, rel=1e-12) and "retain_nll" not in parts
    assert loss == pytest.approx(0.7 * ceu, rel=1e-12)
    # the gradient: p_t(y) on the true token, −p(v) p(y) / (1 − p(y)) elsewhere; nothing on the skipped tokens
    grad = logit_gradient("ce-u", settings, tables)
    kept = [row[skip:] for row in positions(FORGET["labels"])]
    counted = len(kept)  # every row counts, a row with nothing left as 0
    for i, row in enumerate(positions(FORGET["labels"])):
        for n, (t, y) in enumerate(row):
            p = distribution(tables.logits["forget"], i, t)
            if n < skip:
                assert (grad[i, t - 1] == 0).all()
                continue
            expected = -p * p[y] / (1 - p[y])
            expected[y] = p[y]
            assert torch.allclose(grad[i, t - 1], 0.7 * expected / (counted * len(kept[i])), rtol=1e-10, atol=1e-14)


def test_altpo_is_dpo_with_the_alternates_preferred(tables):
    loss, parts = run("altpo", tables)
    win_cur, win_ref = token_logprobs(tables.logits[IDK_STREAM], IDK["labels"]), token_logprobs(tables.ref[IDK_STREAM], IDK["labels"])
    lose_cur, lose_ref = token_logprobs(tables.logits["forget"], FORGET["labels"]), token_logprobs(tables.ref["forget"], FORGET["labels"])
    margins = [(sum(wc) - sum(wr)) - (sum(lc) - sum(lr)) for wc, wr, lc, lr in zip(win_cur, win_ref, lose_cur, lose_ref)]
    altpo = -(2 / 0.5) * sum(log_sigmoid(0.5 * m) for m in margins) / len(margins)
    assert parts == pytest.approx({"altpo": altpo, "forget_nll": mean_nll(tables.logits["forget"], FORGET["labels"]),
                                   "alternate_nll": mean_nll(tables.logits[IDK_STREAM], IDK["labels"]),
                                   "retain_nll": mean_nll(tables.logits["retain"], RETAIN["labels"])}, rel=1e-12)
    assert loss == pytest.approx(0.7 * altpo + 1.3 * parts["retain_nll"], rel=1e-12)
    _, dpo = run("dpo", tables)
    assert dpo["dpo"] == pytest.approx(altpo, rel=1e-12) and "idk_nll" in dpo  # dpo keeps its own names


# ---------------------------------------------------------------- alternate answers


def test_alternates_come_from_the_column_else_refusals(qa_frame):
    frame = qa_frame.assign(alternate=[" 555-0199", "Port Royal", '["1 May 1985 and works as a tailor.", "7 June 1979"]', ["Vesthavn"]])
    relabelled = with_alternates(frame, seed=3)
    assert list(relabelled["input"]) == list(qa_frame["input"]) and list(qa_frame["output"])[0] == " 555-0142"
    assert list(relabelled["output"][:2]) == [" 555-0199", " Port Royal"]  # the answer's leading space, as with_refusals
    options = ["1 May 1985 and works as a tailor.", "7 June 1979"]
    assert relabelled["output"][2] == " " + refusal_for("p1sc1", 3, options) and relabelled["output"][3] == " Vesthavn"
    picks = {with_alternates(frame, seed=s)["output"][2] for s in range(20)}
    assert picks == {" " + o for o in options}  # a list: one per row, by (seed, row id)
    assert with_alternates(qa_frame, seed=3).equals(with_refusals(qa_frame, seed=3))
    with pytest.raises(UserError, match="'alternate' column is empty in 1 rows"):
        with_alternates(frame.assign(alternate=["a", "", "b", "c"]))
    # which answers each objective's forget_idk stream holds
    assert preferred_frame(get_objective("altpo"), frame, seed=3).equals(relabelled)
    for name in ("dpo", "idk"):
        assert preferred_frame(get_objective(name), frame, seed=3).equals(with_refusals(frame, seed=3))


# ---------------------------------------------------------------- the registry, the settings and the command line


def test_registry_settings_and_help():
    from soirlab.cli import build_parser

    assert {n: (OBJECTIVES[n].streams, OBJECTIVES[n].needs_reference) for n in NEW} == {
        "wga": (("forget", "retain"), False), "satimp": (("forget", "retain"), False), "undial": (("forget", "retain"), True),
        "ce-u": (("forget",), False), "altpo": (("forget", IDK_STREAM, "retain"), True)}
    assert all(unlearns(OBJECTIVES[n]) for n in NEW)
    parser = next(a for a in build_parser(["unlearn"])._actions if a.dest == "command").choices["unlearn"]
    actions = {a.dest: a for a in parser._actions}
    assert set(NEW) <= set(actions["objective"].choices)
    assert all(f"{n} (" in actions["objective"].help for n in NEW)
    args = parser.parse_args(["--model", "m", "--forget", "f", "--retain", "r", "--out", "o", "--objective", "ce-u", "--ceu-skip", "2",
                              "--wga-alpha", "0.5", "--satimp-beta1", "4", "--satimp-beta2", "2", "--undial-gamma", "3"])
    assert (args.ceu_skip, args.wga_alpha, args.satimp_beta1, args.satimp_beta2, args.undial_gamma) == (2, 0.5, 4.0, 2.0, 3.0)
    for bad, match in [(("wga", dict(wga_alpha=-1.0)), "wga_alpha"), (("satimp", dict(satimp_beta2=float("nan"))), "satimp_beta2"),
                       (("undial", dict(undial_gamma=0.0)), "undial_gamma"), (("ce-u", dict(ceu_skip=-1)), "ceu_skip"),
                       (("ce-u", dict(w_forget=0.0)), "sum to zero"), (("altpo", dict(beta=0.0)), "beta")]:
        with pytest.raises(UserError, match=match):
            get_objective(bad[0], ObjectiveSettings(**bad[1]))


# ---------------------------------------------------------------- two steps of masked unlearning on a tiny model


@pytest.mark.parametrize("name", NEW)
def test_masked_unlearning_lowers_the_forget_likelihood_and_moves_only_the_mask(make_model, tokenizer, qa_frame, name):
    model = make_model("olmo")
    tensors, elements = neuron_selection("olmo")
    mask = Mask.from_selection(model, tensors, elements)
    before = copy.deepcopy(model.state_dict())
    data = encode(qa_frame, tokenizer)
    batch = collate(data.input_ids, data.labels, pad_id(tokenizer))
    with torch.no_grad():
        nll_before = float(example_losses(model.eval(), batch).mean())
    train = TrainSettings(steps=2, batch_size=4, lr=3e-2, warmup=0, progress=False)
    # SatImp's default β1 = 5 gives an untrained model's unlikely tokens (p ≈ 0.003) weights ≈ 1e-13: nothing moves
    weights = ObjectiveSettings(w_retain=0.0, satimp_beta1=1.0)
    unlearn_model(model, tokenizer, qa_frame, qa_frame.iloc[::-1].reset_index(drop=True), mask, objective=name, weights=weights, train=train)
    with torch.no_grad():
        nll_after = float(example_losses(model.eval(), batch).mean())
    assert nll_after > nll_before
    for key, value in model.state_dict().items():
        keep = mask.element_mask(key) if key in mask.names else torch.zeros(value.shape, dtype=torch.bool)
        assert torch.equal(before[key][~keep], value[~keep]), f"{key} moved outside the mask"
        if key in mask.names:
            assert (before[key][keep] != value[keep]).any(), f"{key} was selected but did not change"


def test_altpo_trains_on_the_forget_splits_alternates(make_model, tokenizer, qa_frame):
    frame = qa_frame.assign(alternate=[" 555-0199", " Port Royal", " 1 May 1985.", " Vesthavn"])
    seen = []

    class Spy(AltPO):
        def __call__(self, model, batches, reference=None):
            batch = batches[IDK_STREAM]
            seen.extend(tuple(ids[keep.bool()].tolist()) for ids, keep in zip(batch["input_ids"], batch["attention_mask"]))
            return super().__call__(model, batches, reference)

    OBJECTIVES.register("spy-altpo", Spy)
    Spy.name = "spy-altpo"
    try:
        unlearn_model(make_model("olmo"), tokenizer, frame, frame, None, objective="spy-altpo",
                      train=TrainSettings(steps=1, batch_size=4, lr=1e-3, progress=False))
    finally:
        OBJECTIVES.unregister("spy-altpo")
    assert set(seen) == {tuple(ids) for ids in encode(with_alternates(frame), tokenizer).input_ids}
