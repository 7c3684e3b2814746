"""Group scores (docs/design.md §5): pure functions of per-group quantities, registered by name.

A score is one function plus one `register_score` call naming the per-group quantities it
`needs` (`QUANTITIES`); the ranker computes only those and calls the function once per group
with them as keyword arguments, plus any of `PARAMETERS` the function names (`delta`, `lam`,
`gamma`, `seed` from the ranking settings; `name`, `n_params` of the group). Gradients of a
group arrive flattened: per-example gradients as (n, k), mean gradients as (k,), where k is
the group's size or, for scores that are inner products only (`sketchable`) under `--sketch`,
the dimension of its gradient sketches; mean gradients without per-example ones then come as
their 1–2 exact span coordinates (`soir.quantities.mean_form`, docs/design.md §6). A function
returns the score, or a dict with the score under `score` and extra columns for the ranking table.

- `soir` (default, ascending): the predicted retain damage of forgetting Δ nats by a
  gradient-ascent step restricted to the group; invariant to rescaling the group.
- `soir-datainf` (descending): the thesis's DataInf-style |v_S|₂, computed from Gram
  quantities so it is exact in sketch space.
- `soir-slope` (ascending): b/a, soir's Δ → 0 limit: retain damage per nat forgotten by the first step.
- `cancel` (descending): −cos(g_f,S, g_r,S), high where finetuning fitted forget and retain together.
- `revert` (descending, needs the base model): how selectively resetting the group to its
  base values brings the forget loss back, measured by forward passes.
- baselines: `grad-magnitude`, `fo-influence`, `fisher`, `wagle`, `shift`, `random`.
"""

from __future__ import annotations

import inspect
import math
import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from soir.errors import UserError
from soir.registry import Registry, first_line

# ---------------------------------------------------------------- soir


def _as_float64(x) -> Tensor:
    return x.detach().to(torch.float64) if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x, dtype=np.float64))


def soir_components(a, b, c_f, c_r, delta: float) -> dict:
    """η, forget gain F(η), retain damage R(η) and the `soir` score, per group.

    With δ_S = η g_f,S:  F(η) = η a + ½ η² c_f,  R(η) = η b + ½ η² c_r. η is the
    smallest positive root of F(η) = Δ, by the cancellation-free form of the quadratic
    formula: η = 2Δ / (a + √(a² + 2 c_f Δ)) when a > 0 (Δ/a when c_f = 0), and
    η = (√(a² + 2 c_f Δ) − a) / c_f when a ≤ 0 < c_f. The score is R(η), lower is better.

    A group with no positive root (a > 0 with a² + 2 c_f Δ < 0, or a ≤ 0 with c_f ≤ 0),
    or with a non-finite input, cannot reach Δ: η = inf, score = +inf (ranked last),
    retain_damage = nan and forget_gain = the most its Taylor model can forget,
    sup_{η>0} F(η) (a²/(2|c_f|) or 0). Vectorised over groups: takes scalars, numpy
    arrays or tensors, returns arrays of the same kind (float64).
    """
    if not delta > 0:
        raise UserError(f"the forget target Δ must be positive (nats of forget-loss increase), got {delta}")
    as_numpy = not any(isinstance(x, Tensor) for x in (a, b, c_f, c_r))
    a, b, c_f, c_r = torch.broadcast_tensors(*map(_as_float64, (a, b, c_f, c_r)))
    finite = torch.isfinite(a) & torch.isfinite(b) & torch.isfinite(c_f) & torch.isfinite(c_r)
    disc = a * a + 2.0 * c_f * delta
    root = torch.sqrt(disc.clamp_min(0.0))
    eta = torch.full_like(a, float("inf"))
    rising = finite & (a > 0) & (disc >= 0)
    eta = torch.where(rising, 2.0 * delta / torch.where(rising, a + root, 1.0), eta)
    convex = finite & (a <= 0) & (c_f > 0)
    eta = torch.where(convex, (root - a) / torch.where(convex, c_f, 1.0), eta)
    reachable = rising | convex
    safe_eta = torch.where(reachable, eta, 0.0)
    gain = safe_eta * a + 0.5 * safe_eta**2 * c_f
    sup_gain = torch.where((a > 0) & (c_f < 0), a * a / (-2.0 * torch.where(c_f < 0, c_f, -1.0)), torch.zeros_like(a))
    forget_gain = torch.where(reachable, gain, torch.where(finite, sup_gain, float("nan")))
    damage = safe_eta * b + 0.5 * safe_eta**2 * c_r
    retain_damage = torch.where(reachable, damage, float("nan"))
    score = torch.where(reachable, damage, float("inf"))
    out = {"eta": eta, "forget_gain": forget_gain, "retain_damage": retain_damage, "score": score}
    return {k: v.numpy() for k, v in out.items()} if as_numpy else out


def soir_score(a, b, c_f, c_r, delta: float):
    """The `soir` score R(η_S) alone (see `soir_components`)."""
    return soir_components(a, b, c_f, c_r, delta)["score"]


# ---------------------------------------------------------------- soir-datainf


def soir_datainf_from_gram(gram: Tensor, cross: Tensor, forget_sq: float, sq_norms_uncompressed_mean: float, dim_uncompressed: int, lam: float) -> float:
    """|v|₂ of `soir_datainf` from inner products only.

    gram = (g_iᵀ g_j) (n_r, n_r), cross = (g_iᵀ ḡ_f) (n_r,), forget_sq = |ḡ_f|²,
    sq_norms_uncompressed_mean = mean_i |g_i|² used for the damping λ.
    With w_i = (g_iᵀ ḡ_f)/(λ + |g_i|²) and u = n_r ḡ_f − Σ_i w_i g_i:
    |u|² = n_r² |ḡ_f|² − 2 n_r Σ_i w_i (g_iᵀ ḡ_f) + wᵀ Gram w, and |v| = |u| / (n_r λ).
    """
    gram, cross = gram.to(torch.float64), cross.to(torch.float64)
    n_r = cross.numel()
    damping = lam * sq_norms_uncompressed_mean / dim_uncompressed
    if damping <= 0:  # all retain gradients vanish: no curvature to invert
        return 0.0 if forget_sq == 0 else float("inf")
    w = cross / (damping + torch.diagonal(gram))
    u_sq = n_r * n_r * forget_sq - 2.0 * n_r * float(w @ cross) + float(w @ gram @ w)
    return float(np.sqrt(max(u_sq, 0.0)) / (n_r * damping))


def soir_datainf(per_example_retain: Tensor, mean_forget: Tensor, n_params: int, lam: float = 0.1) -> float:
    """The thesis's SOIR, |v_S|₂ (descending), from per-example retain gradients (or sketches).

    v = −1/(n_r λ) Σ_i [ ḡ_f − g_i (g_iᵀ ḡ_f)/(λ + |g_i|²) ] over retain examples i, with
    λ = lam · mean_i(|g_i|² / D) and D the group's uncompressed size. Computed from the
    Gram quantities |ḡ_f|², g_iᵀ ḡ_f and g_iᵀ g_j, so sketches give it in sketch space.
    """
    g = per_example_retain.to(torch.float64).reshape(per_example_retain.shape[0], -1)
    f = mean_forget.to(torch.float64).reshape(-1)
    gram = g @ g.T
    return soir_datainf_from_gram(gram, g @ f, float(f @ f), float(torch.diagonal(gram).mean()), n_params, lam)


# ---------------------------------------------------------------- baselines


def grad_magnitude(per_example_forget: Tensor) -> float:
    """Mean over forget examples of the L2 norm of each example's group gradient: mean_i |g_i,S|₂.

    (Not the norm of the mean gradient.) Sketches preserve norms in expectation.
    """
    g = per_example_forget.to(torch.float64).reshape(per_example_forget.shape[0], -1)
    return float(g.norm(dim=1).mean())


def fo_influence(per_example_forget: Tensor, per_example_retain: Tensor) -> float:
    """First-order influence: mean over forget×retain pairs of |g_f,iᵀ g_r,j|."""
    f = per_example_forget.to(torch.float64).reshape(per_example_forget.shape[0], -1)
    r = per_example_retain.to(torch.float64).reshape(per_example_retain.shape[0], -1)
    return float((f @ r.T).abs().mean())


def fisher(per_example_forget: Tensor, per_example_retain: Tensor, damping: float = 1e-3) -> float:
    """SSD-style importance ratio: Σ_j F_f,j / (F_r,j + ε) over the group's coordinates j.

    F_f = mean_i g_f,i², F_r = mean_i g_r,i² are the diagonal empirical Fishers (squared
    per-example gradients of the data labels) on forget and retain; ε = damping · mean_j F_r,j
    keeps coordinates the retain set never touches finite and is scale-free. Needs true
    parameter coordinates: not meaningful on sketches. Larger = more forget-specific.
    """
    f = per_example_forget.to(torch.float64).reshape(per_example_forget.shape[0], -1).pow(2).mean(0)
    r = per_example_retain.to(torch.float64).reshape(per_example_retain.shape[0], -1).pow(2).mean(0)
    eps = damping * float(r.mean())
    if eps <= 0:
        eps = torch.finfo(torch.float64).tiny
    return float((f / (r + eps)).sum())


def wagle(theta: Tensor, mean_forget: Tensor, mean_retain: Tensor, gamma: float = 1.0) -> float:
    """WAGLE weight attribution Σ_j |(θ_j − g_r,j/γ) g_f,j| (descending). Needs true coordinates."""
    t, f, r = (x.to(torch.float64).reshape(-1) for x in (theta, mean_forget, mean_retain))
    return float(((t - r / gamma) * f).abs().sum())


def shift(theta: Tensor, theta_base: Tensor) -> float:
    """Finetuning shift |θ_ft − θ_base|₂ of the group (descending); needs a base model."""
    return float((theta.to(torch.float64) - theta_base.to(torch.float64)).norm())


def random_score(name: str, seed: int = 0) -> float:
    """A uniform [0, 1) score from (seed, group name): reproducible and independent of group order."""
    return float(np.random.default_rng([seed, zlib.crc32(name.encode())]).random())


# ---------------------------------------------------------------- registry

# The per-group quantities a score can ask for, and what each is (for messages).
QUANTITIES = {
    "mean_forget": "the mean forget gradient",
    "mean_retain": "the mean retain gradient",
    "per_example_forget": "per-example forget sketches",
    "per_example_retain": "per-example retain sketches",
    "c_f": "the curvature term c_f",
    "c_r": "the curvature term c_r",
    "theta": "the model's parameters",
    "theta_base": "the base model's parameters",
    "line": "the line search to the forget target",
    "revert": "the losses with the group reverted to the base model",
}
NEEDS_BASE = ("theta_base", "revert")  # quantities read from the base model (`--base`)
# Scalars from the ranking settings or the group that a score function may name.
PARAMETERS = ("delta", "lam", "gamma", "seed", "name", "n_params")


@dataclass(frozen=True)
class Score:
    """A registered score: its function, ranking direction and the per-group quantities it needs."""

    fn: Callable
    lower_is_better: bool
    needs: tuple[str, ...]
    sketchable: bool  # exact (or unbiased) when gradients are replaced by sketches
    columns: tuple[str, ...] = ()  # extra ranking-table columns the function returns
    help: str = ""

    @property
    def needs_base(self) -> bool:
        return any(q in NEEDS_BASE for q in self.needs)

    @property
    def parameters(self) -> tuple[str, ...]:
        """The `PARAMETERS` the function takes (its other arguments keep their defaults)."""
        return tuple(p for p in inspect.signature(self.fn).parameters if p in PARAMETERS and p not in self.needs)

    def __call__(self, quantities: dict, context: dict) -> dict[str, float]:
        """{score, *columns} of one group from its quantities and the context (PARAMETERS)."""
        value = self.fn(**quantities, **{p: context[p] for p in self.parameters})
        return dict(value) if isinstance(value, dict) else {"score": value}


SCORES: Registry[Score] = Registry("score", "--score")


def register_score(name: str, *, lower_is_better: bool, needs: tuple[str, ...], sketchable: bool = True,
                   columns: tuple[str, ...] = (), help: str = ""):
    """Decorator: make a per-group score function available as `--score NAME`."""
    unknown = [q for q in needs if q not in QUANTITIES]
    if unknown:
        raise ValueError(f"score {name!r} needs unknown quantities {unknown}: use {', '.join(QUANTITIES)}")

    def add(fn: Callable) -> Callable:
        score = Score(fn, lower_is_better, tuple(needs), sketchable, tuple(columns), help or first_line(fn.__doc__ or ""))
        loose = [n for n, p in inspect.signature(fn).parameters.items()
                 if n not in needs and n not in PARAMETERS and p.default is inspect.Parameter.empty]
        if loose:
            raise ValueError(f"score {name!r}: {loose} are neither quantities it needs nor any of {', '.join(PARAMETERS)}")
        SCORES.register(name, score, help=score.help)
        return fn

    return add


def get_score(name: str) -> Score:
    return SCORES.get(name)


def _flat(x: Tensor) -> Tensor:
    return x.double().reshape(-1)


@register_score("soir", lower_is_better=True, needs=("mean_forget", "mean_retain", "c_f", "c_r"),
                columns=("a", "b", "c_f", "c_r", "eta", "forget_gain", "retain_damage"),
                help="the predicted retain damage of forgetting --delta nats with the group alone; lower is better")
def soir(mean_forget: Tensor, mean_retain: Tensor, c_f: float, c_r: float, delta: float) -> dict[str, float]:
    """SOIR: a = |g_f,S|², b = g_r,Sᵀ g_f,S with the curvature terms, through `soir_components`."""
    a = float(_flat(mean_forget) @ _flat(mean_forget))
    b = float(_flat(mean_retain) @ _flat(mean_forget))
    comps = soir_components(a, b, c_f, c_r, delta)
    return {"score": float(comps["score"]), "a": a, "b": b, "c_f": float(c_f), "c_r": float(c_r),
            **{k: float(comps[k]) for k in ("eta", "forget_gain", "retain_damage")}}


@register_score("soir-line", lower_is_better=True, needs=("line",), columns=("eta", "forget_gain", "retain_damage"),
                help="the measured retain damage of forgetting --delta nats with the group alone (a line search of "
                     "forward passes along g_f,S); lower is better")
def soir_line(line: Tensor) -> dict[str, float]:
    """SOIR measured instead of extrapolated: R at the η where the real forget loss has risen by Δ."""
    eta, gain, damage = (float(x) for x in line)
    return {"score": damage if math.isfinite(eta) else math.inf, "eta": eta, "forget_gain": gain, "retain_damage": damage}


@register_score("cancel", lower_is_better=False, needs=("mean_forget", "mean_retain"), columns=("cos", "forget_norm", "retain_norm"),
                help="how exactly the group's mean forget and retain gradients cancel, −cos(g_f,S, g_r,S): a group that learned "
                     "both sits where they do; higher is better")
def cancel(mean_forget: Tensor, mean_retain: Tensor) -> dict[str, float]:
    """−cos(g_f,S, g_r,S): finetuning to a stationary point of the summed loss leaves g_f,S ≈ −c g_r,S
    exactly on the groups that learned both splits, while a group that learned only the retain
    rows (g_r,S ≈ 0) points anywhere. NaN (ranked last) when either gradient is 0."""
    f, r = _flat(mean_forget), _flat(mean_retain)
    nf, nr = float(f.norm()), float(r.norm())
    cos = float(f @ r) / (nf * nr) if nf > 0 and nr > 0 else math.nan
    return {"score": -cos, "cos": cos, "forget_norm": nf, "retain_norm": nr}


@register_score("soir-slope", lower_is_better=True, needs=("mean_forget", "mean_retain"), columns=("a", "b"),
                help="retain damage per nat forgotten by the first step along g_f,S (soir's Δ → 0 limit): "
                     "g_r,Sᵀg_f,S / |g_f,S|²; lower is better")
def soir_slope(mean_forget: Tensor, mean_retain: Tensor) -> dict[str, float]:
    """b / a: the slope dR/dF of soir's Taylor model at the start, which `soir` tends to as Δ → 0.

    At a stationary point of the summed finetuning loss, n_f g_f,S + n_r g_r,S ≈ 0 on the groups
    that learned both splits, so b / a ≈ −n_f / n_r there, and ≈ 0 on groups that never saw the
    forget rows. Invariant to rescaling the group; NaN (ranked last) when g_f,S = 0.
    """
    f, r = _flat(mean_forget), _flat(mean_retain)
    a, b = float(f @ f), float(r @ f)
    return {"score": b / a if a > 0 else math.nan, "a": a, "b": b}


@register_score("revert", lower_is_better=False, needs=("revert",), sketchable=False, columns=("forget_rise", "retain_rise"),
                help="the forget loss that reverting the group to the base model (--base) brings back, less the retain "
                     "loss it costs, in nats; higher is better")
def revert(revert: Tensor) -> dict[str, float]:
    """f − r: forget-loss rise less retain-loss rise when the group is reset to θ_base (measured).

    A group that holds what finetuning taught about the forget rows gives back more forget loss
    than retain loss; one that holds shared skills (format, language) gives back both alike.
    """
    forget_rise, retain_rise = (float(x) for x in revert)
    return {"score": forget_rise - retain_rise, "forget_rise": forget_rise, "retain_rise": retain_rise}


register_score("soir-datainf", lower_is_better=False, needs=("per_example_retain", "mean_forget"),
               help="the thesis's SOIR, |v_S|₂ with DataInf damping --lam; higher is better")(soir_datainf)
register_score("grad-magnitude", lower_is_better=False, needs=("per_example_forget",),
               help="mean per-example forget gradient norm")(grad_magnitude)
register_score("fo-influence", lower_is_better=False, needs=("per_example_forget", "per_example_retain"),
               help="mean |g_fᵀ g_r| over forget × retain pairs")(fo_influence)
register_score("fisher", lower_is_better=False, needs=("per_example_forget", "per_example_retain"), sketchable=False,
               help="SSD-style diagonal Fisher ratio forget / retain")(fisher)
register_score("wagle", lower_is_better=False, needs=("theta", "mean_forget", "mean_retain"), sketchable=False,
               help="WAGLE weight attribution |(θ − g_r/γ) ⊙ g_f|")(wagle)
register_score("shift", lower_is_better=False, needs=("theta", "theta_base"), sketchable=False,
               help="finetuning shift |θ − θ_base| (needs --base)")(shift)
register_score("random", lower_is_better=False, needs=(),
               help="seeded uniform control")(random_score)
