"""Training objectives, registered by name: `finetune`, and the unlearning objectives `ga`,
`graddiff`, `kl`, `npo`, `simnpo`, `combo` (docs/design.md §7).

An objective is one class plus one registration (`@register_objective(NAME)`): it declares
the batch streams it needs (`train`, or `forget` and `retain`), whether it needs the
reference model, and the weights it uses, and maps a model plus one batch per stream to a
scalar loss and its named components (for the log).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from soir.data import IGNORE_INDEX, example_losses, per_example_loss, token_nll
from soir.errors import UserError
from soir.registry import Registry
from soir.runtime import lm_logits
from soir.settings import setting

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ObjectiveSettings:
    """Weights and temperatures shared by the objectives; each uses the ones it needs."""

    w_forget: float = setting(1.0, "weight of the forget term")
    w_retain: float = setting(1.0, "weight of the retain NLL (graddiff, npo, simnpo, combo)")
    w_kl: float = setting(1.0, "weight of the KL to the original model on retain (kl, combo)")
    beta: float = setting(0.1, "NPO/SimNPO inverse temperature β")
    margin: float = setting(0.0, "SimNPO's margin γ")


class Objective(Protocol):
    streams: tuple[str, ...]
    needs_reference: bool

    def __call__(self, model, batches: dict[str, Batch], reference=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


OBJECTIVES: Registry[Callable[[ObjectiveSettings], Objective]] = Registry("objective", "--objective")


def register_objective(name: str, help: str = ""):
    """Class decorator: make an objective available as `--objective NAME`."""

    def decorate(cls):
        cls.name = name
        OBJECTIVES.register(name, cls, help=help)
        return cls

    return decorate


def get_objective(name: str, settings: ObjectiveSettings = ObjectiveSettings()) -> Objective:
    return OBJECTIVES.get(name)(settings)


def nll(model, batch: Batch) -> torch.Tensor:
    """Mean over examples of the per-example answer NLL (docs/design.md §3)."""
    return example_losses(model, batch).mean()


@register_objective("finetune")
class Finetune:
    """NLL descent on the `train` stream: the testbed's finetune stage."""

    streams = ("train",)
    needs_reference = False

    def __init__(self, settings: ObjectiveSettings):
        self.settings = settings

    def __call__(self, model, batches, reference=None):
        loss = nll(model, batches["train"])
        return loss, {"nll": loss.detach()}


# ---------------------------------------------------------------- unlearning objectives
#
# Conventions shared by all of them (docs/design.md §3, §7):
# - NLL_s is the mean over the examples of stream s of each example's mean NLL over its
#   labelled tokens (answer + EOS); prompt and padding positions never count.
# - log π(y|x) of an example is the SUM of the log-probabilities of its labelled tokens
#   (NPO, as in the NPO paper and OpenUnlearning); SimNPO divides it by |y|, the number of
#   labelled tokens.
# - A term whose weight is 0 is not computed (no forward pass), and is absent from the
#   components. Components are unweighted and detached: `forget_nll`, `retain_nll`, `kl`,
#   `npo`, `simnpo` (the objective's forget term before its weight).
# - A reference is any object with `logits(batch) -> Tensor` computed without grad
#   (unlearn.reference); it stands for the model before unlearning.


def sequence_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log π(y|x) per example, shape (B,): the sum over labelled tokens of log p(token)."""
    token, _ = token_nll(logits, labels)
    return -token.sum(1)


def labelled_kl(ref_logits: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """KL(p_ref ‖ p_model) of the next-token distributions, per example, shape (B,).

    Only positions that predict a labelled token count (the logits at t predict labels[t+1]);
    each example's value is the mean over its labelled tokens. The direction is
    Σ_v p_ref(v) (log p_ref(v) − log p_model(v)), as OpenUnlearning's `compute_kl_divergence`
    (TOFU's KL baseline).
    """
    mask = labels[:, 1:] != IGNORE_INDEX
    rows = mask.nonzero(as_tuple=True)[0]
    ref = F.log_softmax(ref_logits[:, :-1][mask].float(), dim=-1)
    cur = F.log_softmax(logits[:, :-1][mask].float(), dim=-1)
    p_ref = ref.exp()
    per_token = torch.where(p_ref > 0, p_ref * (ref - cur), torch.zeros_like(cur)).sum(-1)
    total = torch.zeros(labels.size(0), dtype=per_token.dtype, device=per_token.device).index_add(0, rows, per_token)
    return total / mask.sum(1).clamp_min(1)


def check_settings(name: str, settings: ObjectiveSettings) -> None:
    """Raise UserError when the settings cannot drive objective `name`.

    Weights must be finite and ≥ 0, and the weights the objective uses must not all be 0
    (their sum would be zero: there would be nothing to optimise); NPO and SimNPO need β > 0.
    """
    used = getattr(OBJECTIVES.get(name), "weights", ())
    for field_name in used:
        value = getattr(settings, field_name)
        if not math.isfinite(value) or value < 0:
            raise UserError(f"objective {name}: {field_name}={value} is not allowed; weights must be finite and >= 0")
    if used and sum(getattr(settings, f) for f in used) == 0:
        listed = ", ".join(f"{f}=0" for f in used)
        raise UserError(f"objective {name}: its weights sum to zero ({listed}); give at least one a positive value")
    if "beta" in getattr(OBJECTIVES[name], "temperatures", ()):
        if not math.isfinite(settings.beta) or settings.beta <= 0:
            raise UserError(f"objective {name}: beta={settings.beta} must be > 0")
        if not math.isfinite(settings.margin):
            raise UserError(f"objective {name}: margin={settings.margin} must be finite")


class _Unlearning:
    """Common part: settings check on construction, reference check on call."""

    name = ""
    streams: tuple[str, ...] = ("forget", "retain")
    needs_reference = False
    weights: tuple[str, ...] = ()
    temperatures: tuple[str, ...] = ()

    def __init__(self, settings: ObjectiveSettings):
        check_settings(self.name, settings)
        self.settings = settings

    def _reference(self, reference):
        if self.needs_reference and reference is None:
            raise ValueError(f"objective {self.name} needs a reference (unlearn.reference.make_reference)")
        return reference

    def _retain_nll(self, model, batches, loss, parts):
        """Add w_r · NLL_r when w_r > 0."""
        if self.settings.w_retain:
            retain = nll(model, batches["retain"])
            parts["retain_nll"] = retain.detach()
            loss = loss + self.settings.w_retain * retain
        return loss


@register_objective("ga")
class GradientAscent(_Unlearning):
    """Gradient ascent: loss = −w_f · NLL_f."""

    streams = ("forget",)
    weights = ("w_forget",)

    def __call__(self, model, batches, reference=None):
        forget = nll(model, batches["forget"])
        return -self.settings.w_forget * forget, {"forget_nll": forget.detach()}


@register_objective("graddiff")
class GradDiff(_Unlearning):
    """Gradient difference: loss = w_f · (−NLL_f) + w_r · NLL_r."""

    weights = ("w_forget", "w_retain")

    def __call__(self, model, batches, reference=None):
        loss, parts = 0.0, {}
        if self.settings.w_forget:
            forget = nll(model, batches["forget"])
            parts["forget_nll"] = forget.detach()
            loss = -self.settings.w_forget * forget
        return self._retain_nll(model, batches, loss, parts), parts


def _forget_and_kl(objective, model, batches, reference, with_retain_nll: bool):
    """w_f · (−NLL_f) [+ w_r · NLL_r] + w_kl · KL(p_ref ‖ p_model) on retain; one retain forward."""
    s = objective.settings
    loss, parts = 0.0, {}
    if s.w_forget:
        forget = nll(model, batches["forget"])
        parts["forget_nll"] = forget.detach()
        loss = -s.w_forget * forget
    use_retain_nll = with_retain_nll and s.w_retain
    if s.w_kl or use_retain_nll:
        batch = batches["retain"]
        ref_logits = reference.logits(batch) if s.w_kl else None
        logits = lm_logits(model, batch)
        if use_retain_nll:
            retain = per_example_loss(logits, batch["labels"]).mean()
            parts["retain_nll"] = retain.detach()
            loss = loss + s.w_retain * retain
        if s.w_kl:
            kl = labelled_kl(ref_logits, logits, batch["labels"]).mean()
            parts["kl"] = kl.detach()
            loss = loss + s.w_kl * kl
    return loss, parts


@register_objective("kl")
class KLMinimisation(_Unlearning):
    """loss = w_f · (−NLL_f) + w_kl · KL(p_ref ‖ p_model) on retain (labelled tokens only)."""

    needs_reference = True
    weights = ("w_forget", "w_kl")

    def __call__(self, model, batches, reference=None):
        return _forget_and_kl(self, model, batches, self._reference(reference), with_retain_nll=False)


@register_objective("combo")
class Combo(_Unlearning):
    """The seed report's sum: w_f · (−NLL_f) + w_r · NLL_r + w_kl · KL(p_ref ‖ p_model) on retain."""

    needs_reference = True
    weights = ("w_forget", "w_retain", "w_kl")

    def __call__(self, model, batches, reference=None):
        return _forget_and_kl(self, model, batches, self._reference(reference), with_retain_nll=True)


@register_objective("npo")
class NPO(_Unlearning):
    """Negative Preference Optimisation (Zhang et al. 2024), as in OpenUnlearning:

        loss = w_f · −(2/β) · mean_i log σ(−β (log π_θ(y_i|x_i) − log π_ref(y_i|x_i))) + w_r · NLL_r

    with log π(y|x) summed over the labelled tokens; the retain NLL term is skipped when w_r = 0.
    """

    needs_reference = True
    weights = ("w_forget", "w_retain")
    temperatures = ("beta",)

    def __call__(self, model, batches, reference=None):
        reference = self._reference(reference)
        beta = self.settings.beta
        loss, parts = 0.0, {}
        if self.settings.w_forget:
            batch = batches["forget"]
            ref_logp = sequence_logprob(reference.logits(batch), batch["labels"])
            logits = lm_logits(model, batch)
            logp = sequence_logprob(logits, batch["labels"])
            npo = -(2.0 / beta) * F.logsigmoid(-beta * (logp - ref_logp)).mean()
            parts["npo"] = npo.detach()
            parts["forget_nll"] = per_example_loss(logits.detach(), batch["labels"]).mean()
            loss = self.settings.w_forget * npo
        return self._retain_nll(model, batches, loss, parts), parts


@register_objective("simnpo")
class SimNPO(_Unlearning):
    """SimNPO (Fan et al. 2024, "Simplicity Prevails"): NPO without a reference, length-normalised:

        loss = w_f · −(2/β) · mean_i log σ(−(β/|y_i|) log π_θ(y_i|x_i) − γ) + w_r · NLL_r

    |y_i| is the number of labelled tokens. γ (`margin`) is the paper's margin, not multiplied
    by β (OpenUnlearning writes σ(β(NLL − δ)), i.e. margin βδ; the two agree at 0).
    """

    weights = ("w_forget", "w_retain")
    temperatures = ("beta",)

    def __call__(self, model, batches, reference=None):
        beta, margin = self.settings.beta, self.settings.margin
        loss, parts = 0.0, {}
        if self.settings.w_forget:
            batch = batches["forget"]
            mean_nll = per_example_loss(lm_logits(model, batch), batch["labels"])  # −(1/|y|) log π_θ(y|x)
            simnpo = -(2.0 / beta) * F.logsigmoid(beta * mean_nll - margin).mean()
            parts["simnpo"] = simnpo.detach()
            parts["forget_nll"] = mean_nll.mean().detach()
            loss = self.settings.w_forget * simnpo
        return self._retain_nll(model, batches, loss, parts), parts
