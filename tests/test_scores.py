"""Scores: the soir root and Taylor model against true loss changes on an exactly quadratic
model, invariance to a function-preserving rescaling, soir-datainf against a dense
implementation, and the baselines."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from soir.curvature import split_loss, taylor_coefficients
from soir.data import collate, encode, pad_id
from soir.errors import UserError
from soir.gradients import mean_gradient, per_example_grads
from soir.scores import (
    SCORES,
    fisher,
    fo_influence,
    get_score,
    grad_magnitude,
    random_score,
    shift,
    soir_components,
    soir_datainf,
    wagle,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- the root and the Taylor model


def test_eta_is_the_smallest_positive_root():
    rng = np.random.default_rng(0)
    a, c_f = rng.normal(size=200) * 2, rng.normal(size=200) * 5
    b, c_r = rng.normal(size=200), rng.normal(size=200)
    out = soir_components(a, b, c_f, c_r, delta=0.7)
    assert isinstance(out["score"], np.ndarray)
    for i in range(200):
        roots = np.roots([0.5 * c_f[i], a[i], -0.7])
        positive = [r.real for r in roots if abs(r.imag) < 1e-12 and r.real > 0]
        if positive:
            eta = min(positive)
            assert out["eta"][i] == pytest.approx(eta, rel=1e-9)
            assert out["forget_gain"][i] == pytest.approx(0.7, rel=1e-9)
            assert out["score"][i] == pytest.approx(eta * b[i] + 0.5 * eta**2 * c_r[i], rel=1e-9, abs=1e-12)
        else:
            assert out["eta"][i] == np.inf and out["score"][i] == np.inf and np.isnan(out["retain_damage"][i])


def test_soir_root_edge_cases_and_stability():
    out = soir_components(torch.tensor([2.0, 1.0, 1.0, 0.0, -1.0, 0.0]), torch.ones(6), torch.tensor([0.0, 1e-14, -10.0, 0.0, 2.0, 8.0]), torch.zeros(6), delta=1e-3)
    assert isinstance(out["eta"], torch.Tensor)
    eta = out["eta"].tolist()
    assert eta[0] == pytest.approx(1e-3 / 2, rel=1e-15)  # c_f = 0: Δ/a
    assert eta[1] == pytest.approx(1e-3, rel=1e-12)  # 2cΔ ≪ a²: no cancellation
    assert eta[2] == pytest.approx((1 - np.sqrt(1 - 0.02)) / 10, rel=1e-12)  # concave, reachable
    assert eta[3] == np.inf  # a = 0 = c_f
    assert eta[4] == pytest.approx((np.sqrt(1 + 4e-3) + 1) / 2, rel=1e-12)  # starts downhill, then convex
    assert eta[5] == pytest.approx(np.sqrt(2e-3 / 8), rel=1e-12)  # a = 0 < c_f
    unreachable = soir_components(1.0, 1.0, -10.0, 0.0, delta=1.0)
    assert unreachable["score"] == np.inf and unreachable["forget_gain"] == pytest.approx(1 / 20)
    assert soir_components(np.nan, 1.0, 1.0, 1.0, delta=1.0)["score"] == np.inf
    with pytest.raises(UserError, match="positive"):
        soir_components(1.0, 1.0, 1.0, 1.0, delta=0.0)


class Quadratic(nn.Module):
    """pred = W x + V z; per-example loss ½ Σ_k s_k (pred_k − y_k)², exactly quadratic in (W, V)."""

    def __init__(self, signs):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.W = nn.Parameter(torch.randn(3, 4, generator=generator, dtype=torch.float64))
        self.V = nn.Parameter(torch.randn(3, 2, generator=generator, dtype=torch.float64))
        self.register_buffer("signs", torch.tensor(signs, dtype=torch.float64))

    def forward(self, batch):
        return batch["x"] @ self.W.T + batch["z"] @ self.V.T


def quadratic_loss(model, batch):
    return 0.5 * ((model(batch) - batch["y"]) ** 2 * model.signs).sum(-1)


def quadratic_batches(seed, sizes):
    generator = torch.Generator().manual_seed(seed)
    return [
        {name: torch.randn(size, dim, generator=generator, dtype=torch.float64) * 2 for name, dim in (("x", 4), ("z", 2), ("y", 3))}
        for size in sizes
    ]


@pytest.mark.parametrize("signs", [[1.0, 1.0, 1.0], [0.3, -1.0, -1.0]], ids=["convex", "indefinite"])
@pytest.mark.parametrize("group", [["W"], ["W", "V"]], ids=["W", "W+V"])
def test_soir_predictions_equal_true_loss_changes_on_a_quadratic_model(signs, group):
    model = Quadratic(signs)
    forget, retain = quadratic_batches(1, [3, 2]), quadratic_batches(2, [4, 1, 2])
    coefficients = taylor_coefficients(model, forget, retain, group, loss_fn=quadratic_loss)
    assert (coefficients["c_f"] > 0) == (min(signs) > 0)  # both branches of the root
    delta = 5.0  # large enough that the ½η²c terms matter (several per cent)
    out = soir_components(**coefficients, delta=delta)
    assert np.isfinite(out["score"])
    assert abs(0.5 * float(out["eta"]) ** 2 * coefficients["c_f"]) > 0.02 * delta
    g_f = mean_gradient(model, forget, group, loss_fn=quadratic_loss)
    before_f, before_r = float(split_loss(model, forget, quadratic_loss)), float(split_loss(model, retain, quadratic_loss))
    with torch.no_grad():
        for name in group:
            getattr(model, name).add_(float(out["eta"]) * g_f[name])  # δ_S = η g_f,S, other parameters fixed
    after_f, after_r = float(split_loss(model, forget, quadratic_loss)), float(split_loss(model, retain, quadratic_loss))
    assert after_f - before_f == pytest.approx(delta, rel=1e-9)
    assert after_r - before_r == pytest.approx(float(out["retain_damage"]), rel=1e-9)
    assert float(out["score"]) == float(out["retain_damage"])


# ---------------------------------------------------------------- invariance on a real model


def qa_batches(tokenizer, frame):
    enc = encode(frame, tokenizer)
    return [collate(enc.input_ids, enc.labels, pad_id(tokenizer))]


def test_soir_is_invariant_to_rescaling_v_and_o_while_grad_magnitude_is_not(make_model, tokenizer, qa_frame):
    model = make_model("llama", dtype=torch.float64)
    forget, retain = qa_batches(tokenizer, qa_frame.iloc[:2]), qa_batches(tokenizer, qa_frame.iloc[2:])
    v_name, o_name = "model.layers.0.self_attn.v_proj.weight", "model.layers.0.self_attn.o_proj.weight"
    scale = 3.0
    rescaled = copy.deepcopy(model)
    with torch.no_grad():
        rescaled.get_parameter(v_name).mul_(scale)
        rescaled.get_parameter(o_name).div_(scale)
    assert float(split_loss(rescaled, forget)) == pytest.approx(float(split_loss(model, forget)), rel=1e-10)

    delta = 0.01
    for name, gradient_factor in ((v_name, 1 / scale), (o_name, scale)):
        scores = []
        for m in (model, rescaled):
            out = soir_components(**taylor_coefficients(m, forget, retain, [name]), delta=delta)
            assert np.isfinite(out["score"])
            scores.append(float(out["score"]))
        assert scores[1] == pytest.approx(scores[0], rel=1e-5)
        magnitudes = [grad_magnitude(per_example_grads(m, forget[0], [name])[name]) for m in (model, rescaled)]
        assert magnitudes[1] == pytest.approx(magnitudes[0] * gradient_factor, rel=1e-6)


# ---------------------------------------------------------------- soir-datainf


def dense_datainf(g, g_f, dim, lam):
    damping = lam * float((g**2).sum(1).mean()) / dim
    total = torch.zeros_like(g_f)
    for g_i in g:
        total += g_f - g_i * (g_i @ g_f) / (damping + g_i @ g_i)
    return float((-total / (len(g) * damping)).norm())


def test_soir_datainf_equals_the_dense_formula(make_model, tokenizer, qa_frame):
    model = make_model("olmo", dtype=torch.float64)
    name = "model.layers.1.self_attn.v_proj.weight"
    forget, retain = qa_batches(tokenizer, qa_frame.iloc[:2]), qa_batches(tokenizer, qa_frame.iloc[1:])
    g = per_example_grads(model, retain[0], [name])[name].flatten(1)
    g_f = mean_gradient(model, forget, [name])[name].flatten()
    for lam in (0.1, 10.0):
        assert soir_datainf(g, g_f, g.shape[1], lam) == pytest.approx(dense_datainf(g, g_f, g.shape[1], lam), rel=1e-6)
    # its documented bias: gradients multiplied by c divide the score by c
    assert soir_datainf(2 * g, 2 * g_f, g.shape[1], 0.1) == pytest.approx(soir_datainf(g, g_f, g.shape[1], 0.1) / 2, rel=1e-9)


# ---------------------------------------------------------------- baselines and the registry


def test_baselines_on_hand_made_gradients():
    forget = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    retain = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert grad_magnitude(forget) == pytest.approx((5 + 1) / 2)
    assert fo_influence(forget, retain) == pytest.approx((3 + 8 + 0 + 2) / 4)
    f_f, f_r = np.array([4.5, 8.5]), np.array([0.5, 2.0])
    assert fisher(forget, retain, damping=0.0) == pytest.approx(float((f_f / f_r).sum()))
    assert fisher(forget, retain, damping=0.1) == pytest.approx(float((f_f / (f_r + 0.1 * f_r.mean())).sum()))
    theta, g_f, g_r = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 1.0]), torch.tensor([2.0, 2.0])
    assert wagle(theta, g_f, g_r, gamma=2.0) == pytest.approx(abs((1 - 1) * 0.5) + abs((-2 - 1) * 1.0))
    assert shift(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 0.0])) == pytest.approx(2.0)
    assert random_score("layers.0", seed=1) == random_score("layers.0", seed=1)
    assert random_score("layers.0", seed=1) != random_score("layers.1", seed=1)
    assert random_score("layers.0", seed=1) != random_score("layers.0", seed=2)


def test_score_registry():
    assert set(SCORES) == {"soir", "soir-line", "soir-datainf", "grad-magnitude", "fo-influence", "fisher", "wagle", "shift", "random", "soir-slope", "cancel", "revert"}
    assert SCORES["soir"].lower_is_better and SCORES["soir-line"].lower_is_better and not SCORES["soir-datainf"].lower_is_better
    reached = SCORES["soir-line"].fn(line=torch.tensor([3.0, 0.99, 0.25], dtype=torch.float64))  # η, measured gain, measured damage
    assert reached == {"score": 0.25, "eta": 3.0, "forget_gain": 0.99, "retain_damage": 0.25}
    unreachable = SCORES["soir-line"].fn(line=torch.tensor([float("inf"), 0.4, float("nan")], dtype=torch.float64))
    assert unreachable["score"] == float("inf") and unreachable["forget_gain"] == 0.4
    one = torch.tensor([1.0])  # a = |g_f|² = 1, b = g_rᵀ g_f = 1: η = Δ / a = 2, R = η b = 2
    row = SCORES["soir"].fn(mean_forget=one, mean_retain=one, c_f=0.0, c_r=0.0, delta=2.0)
    assert row["score"] == pytest.approx(2.0) and row["eta"] == pytest.approx(2.0) and row["a"] == row["b"] == 1.0
    with pytest.raises(UserError, match="unknown score"):
        get_score("nope")
