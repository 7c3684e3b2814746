"""Unlearning objectives against values computed by hand from fixed logits (docs/design.md §7)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from soir.data import collate, encode, pad_id
from soir.errors import UserError
from soir.mask import Mask
from unlearn.objectives import (
    OBJECTIVES,
    ObjectiveSettings,
    check_settings,
    get_objective,
)
from unlearn.reference import make_reference

V = 7
X = -100


class Table(torch.nn.Module):
    """A stand-in model whose logits for each batch are fixed leaf tensors."""

    def __init__(self, pairs):
        super().__init__()
        self.pairs = pairs

    def forward(self, input_ids, attention_mask, use_cache=None):
        for ids, logits in self.pairs:
            if torch.equal(ids, input_ids):
                return SimpleNamespace(logits=logits)
        raise KeyError("unknown batch")


class TableReference:
    def __init__(self, pairs):
        self.table = Table(pairs)

    def logits(self, batch):
        return self.table(batch["input_ids"], batch["attention_mask"]).logits.detach()


def make_batch(labels, seed):
    labels = torch.tensor(labels)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, labels.shape, generator=generator)
    ids = torch.where(labels == X, ids, labels)
    return {"input_ids": ids, "attention_mask": (ids >= 0).long(), "labels": labels}


# forget: prompt of 2 and 1 tokens, right padding on row 1; retain: three rows, one with a long prompt
FORGET = make_batch([[X, X, 3, 1, 4, X], [X, 2, 6, X, X, X]], seed=1)
RETAIN = make_batch([[X, 5, 0, 2], [X, X, X, 1], [X, 4, X, X]], seed=2)


def random_logits(batch, seed, scale=2.0):
    generator = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*batch["labels"].shape, V, generator=generator)).requires_grad_()


@pytest.fixture
def setup():
    model_f, model_r = random_logits(FORGET, 10), random_logits(RETAIN, 11)
    ref_f, ref_r = random_logits(FORGET, 20).detach(), random_logits(RETAIN, 21).detach()
    model = Table([(FORGET["input_ids"], model_f), (RETAIN["input_ids"], model_r)])
    reference = TableReference([(FORGET["input_ids"], ref_f), (RETAIN["input_ids"], ref_r)])
    return SimpleNamespace(model=model, reference=reference, model_f=model_f, model_r=model_r, ref_f=ref_f, ref_r=ref_r)


# ---------------------------------------------------------------- by hand, in float64, one token at a time


def token_logprobs(logits, labels):
    """Per example: the log-probabilities of its labelled tokens (logits at t-1 predict labels[t])."""
    rows = []
    for i in range(labels.shape[0]):
        values = []
        for t in range(1, labels.shape[1]):
            if labels[i, t] != X:
                z = logits[i, t - 1].detach().double()
                values.append(float(z[labels[i, t]] - torch.logsumexp(z, 0)))
        rows.append(values)
    return rows


def mean_nll(logits, labels):
    return sum(-sum(r) / len(r) for r in token_logprobs(logits, labels)) / labels.shape[0]


def kl_by_hand(ref, cur, labels):
    per_example = []
    for i in range(labels.shape[0]):
        terms = []
        for t in range(1, labels.shape[1]):
            if labels[i, t] != X:
                p = torch.softmax(ref[i, t - 1].double(), 0)
                q = torch.softmax(cur[i, t - 1].detach().double(), 0)
                terms.append(float((p * (p.log() - q.log())).sum()))
        per_example.append(sum(terms) / len(terms))
    return sum(per_example) / len(per_example)


def log_sigmoid(z):
    return -math.log1p(math.exp(-z))


BATCHES = {"forget": FORGET, "retain": RETAIN}
S = ObjectiveSettings(w_forget=0.7, w_retain=1.3, w_kl=0.4, beta=0.5, margin=0.3)


def run(name, setup, settings=S, batches=BATCHES):
    objective = get_objective(name, settings)
    loss, parts = objective(setup.model, {k: batches[k] for k in objective.streams if k in batches}, setup.reference)
    assert loss.requires_grad and all(not v.requires_grad for v in parts.values())
    return float(loss.detach()), {k: float(v) for k, v in parts.items()}


def test_ga(setup):
    loss, parts = run("ga", setup)
    nll_f = mean_nll(setup.model_f, FORGET["labels"])
    assert loss == pytest.approx(-0.7 * nll_f, rel=1e-5)
    assert parts["forget_nll"] == pytest.approx(nll_f, rel=1e-5)


def test_graddiff(setup):
    loss, _ = run("graddiff", setup)
    expected = -0.7 * mean_nll(setup.model_f, FORGET["labels"]) + 1.3 * mean_nll(setup.model_r, RETAIN["labels"])
    assert loss == pytest.approx(expected, rel=1e-5)


def test_kl(setup):
    loss, parts = run("kl", setup)
    kl = kl_by_hand(setup.ref_r, setup.model_r, RETAIN["labels"])
    assert kl > 0.1 and parts["kl"] == pytest.approx(kl, rel=1e-5)
    assert loss == pytest.approx(-0.7 * mean_nll(setup.model_f, FORGET["labels"]) + 0.4 * kl, rel=1e-5)


def test_npo(setup):
    loss, parts = run("npo", setup)
    cur = token_logprobs(setup.model_f, FORGET["labels"])
    ref = token_logprobs(setup.ref_f, FORGET["labels"])
    beta = 0.5
    npo = -(2 / beta) * sum(log_sigmoid(-beta * (sum(c) - sum(r))) for c, r in zip(cur, ref)) / len(cur)
    assert parts["npo"] == pytest.approx(npo, rel=1e-5)
    assert loss == pytest.approx(0.7 * npo + 1.3 * mean_nll(setup.model_r, RETAIN["labels"]), rel=1e-5)


def test_npo_without_retain_term(setup):
    loss, parts = run("npo", setup, ObjectiveSettings(w_forget=1.0, w_retain=0.0, beta=0.5), {"forget": FORGET})
    assert "retain_nll" not in parts and loss == pytest.approx(parts["npo"], rel=1e-6)


def test_simnpo(setup):
    loss, parts = run("simnpo", setup)
    cur = token_logprobs(setup.model_f, FORGET["labels"])
    beta, margin = 0.5, 0.3
    simnpo = -(2 / beta) * sum(log_sigmoid(-beta * sum(c) / len(c) - margin) for c in cur) / len(cur)
    assert parts["simnpo"] == pytest.approx(simnpo, rel=1e-5)
    assert loss == pytest.approx(0.7 * simnpo + 1.3 * mean_nll(setup.model_r, RETAIN["labels"]), rel=1e-5)


def test_combo_is_the_weighted_sum_of_its_parts(setup):
    loss, parts = run("combo", setup)
    nll_f, nll_r = mean_nll(setup.model_f, FORGET["labels"]), mean_nll(setup.model_r, RETAIN["labels"])
    kl = kl_by_hand(setup.ref_r, setup.model_r, RETAIN["labels"])
    assert parts == pytest.approx({"forget_nll": nll_f, "retain_nll": nll_r, "kl": kl}, rel=1e-5)
    assert loss == pytest.approx(-0.7 * nll_f + 1.3 * nll_r + 0.4 * kl, rel=1e-5)
    graddiff, _ = run("graddiff", setup)
    kl_only, _ = run("kl", setup, ObjectiveSettings(w_forget=0.0, w_kl=0.4))
    assert loss == pytest.approx(graddiff + kl_only, rel=1e-5)


def test_gradients_flow_to_the_model_logits(setup):
    objective = get_objective("combo", S)
    loss, _ = objective(setup.model, BATCHES, setup.reference)
    loss.backward()
    assert setup.model_f.grad.abs().sum() > 0 and setup.model_r.grad.abs().sum() > 0


def unlabelled_positions(labels):
    """Positions whose logits predict no labelled token (prompt, padding, the last one)."""
    predicts = torch.zeros(labels.shape, dtype=torch.bool)
    predicts[:, :-1] = labels[:, 1:] != X
    return ~predicts


def test_kl_ignores_prompt_and_padding_positions(setup):
    _, before = run("kl", setup)
    free = unlabelled_positions(RETAIN["labels"])
    assert free.any() and (~free).any()
    with torch.no_grad():
        setup.model_r[free] = 50 * torch.randn(int(free.sum()), V)
        setup.ref_r[free] = -50 * torch.randn(int(free.sum()), V)
    _, after = run("kl", setup)
    assert after["kl"] == before["kl"]
    i, t = torch.nonzero(~free)[0].tolist()
    with torch.no_grad():  # a change at one labelled position does move it
        setup.model_r[i, t, 0] += 3.0  # (a constant added to every logit would not)
    _, moved = run("kl", setup)
    assert moved["kl"] != before["kl"]


@pytest.mark.parametrize(
    "name, settings",
    [
        ("ga", ObjectiveSettings(w_forget=0.0)),
        ("graddiff", ObjectiveSettings(w_forget=0.0, w_retain=0.0)),
        ("kl", ObjectiveSettings(w_forget=0.0, w_kl=0.0, w_retain=1.0)),
        ("npo", ObjectiveSettings(w_forget=0.0, w_retain=0.0)),
        ("simnpo", ObjectiveSettings(w_forget=0.0, w_retain=0.0)),
        ("combo", ObjectiveSettings(w_forget=0.0, w_retain=0.0, w_kl=0.0)),
    ],
)
def test_zero_weights_are_a_user_error(name, settings):
    with pytest.raises(UserError, match="sum to zero"):
        get_objective(name, settings)
    with pytest.raises(UserError, match="sum to zero"):
        check_settings(name, settings)


def test_bad_values_are_user_errors():
    with pytest.raises(UserError, match="w_retain"):
        get_objective("graddiff", ObjectiveSettings(w_retain=-1.0))
    with pytest.raises(UserError, match="beta"):
        get_objective("npo", ObjectiveSettings(beta=0.0))
    with pytest.raises(UserError, match="unknown objective"):
        get_objective("nope")
    get_objective("ga", ObjectiveSettings(w_retain=0.0, w_kl=0.0))  # unused weights may be zero


def test_registry_streams_and_references():
    assert {"finetune", "ga", "graddiff", "kl", "npo", "simnpo", "combo"} <= set(OBJECTIVES)
    assert OBJECTIVES["ga"].streams == ("forget",)
    for name in ("graddiff", "kl", "npo", "simnpo", "combo"):
        assert OBJECTIVES[name].streams == ("forget", "retain")
    known = ("finetune", "ga", "graddiff", "kl", "npo", "simnpo", "combo")
    assert {n for n in known if OBJECTIVES[n].needs_reference} == {"kl", "npo", "combo"}
    with pytest.raises(ValueError, match="reference"):
        get_objective("npo")(Table([]), BATCHES, None)


# ---------------------------------------------------------------- on a real tiny model


def test_on_a_model_at_its_reference(make_model, tokenizer, qa_frame):
    """At the start the model is its reference: KL = 0, NPO = (2/β) log 2, ga = −finetune."""
    model = make_model("olmo")
    data = encode(qa_frame, tokenizer)
    batch = collate(data.input_ids, data.labels, pad_id(tokenizer))
    batches = {"forget": batch, "retain": batch, "train": batch}
    reference = make_reference(model, Mask.from_names(model, ["model.layers.0.mlp.up_proj.weight"]))
    settings = ObjectiveSettings(w_forget=1.0, w_retain=0.0, w_kl=1.0, beta=0.5)
    _, kl = get_objective("kl", settings)(model, batches, reference)
    assert float(kl["kl"]) == pytest.approx(0.0, abs=1e-6)
    npo, _ = get_objective("npo", settings)(model, batches, reference)
    assert float(npo.detach()) == pytest.approx(2 / 0.5 * math.log(2), rel=1e-5)
    ga, _ = get_objective("ga", settings)(model, batches)
    finetune, _ = get_objective("finetune", settings)(model, batches)
    assert float(ga.detach()) == pytest.approx(-float(finetune.detach()), rel=1e-6) and float(finetune.detach()) > 1.0
