"""Training objectives, registered by name: `finetune`, and the unlearning objectives `ga`,
`graddiff`, `kl`, `npo`, `simnpo`, `combo`, `idk`, `dpo`, `wga`, `satimp`, `undial`, `ce-u`,
`altpo`, `rmu` (docs/design.md §7).

An objective is one class plus one registration (`@register_objective(NAME)`): it declares
the batch streams it needs (`train`, or `forget`, `forget_idk` and `retain`), whether it needs
the reference model, and the weights it uses, and maps a model plus one batch per stream to a
scalar loss and its named components (for the log). An objective that needs the model and the
mask before training (RMU: its layer and random direction) has `prepare(model, mask, seed)`,
which the unlearn stage calls before anything is written.

Streams are built by the unlearn stage: `forget` and `retain` from the splits, `forget_idk`
(`IDK_STREAM`) from the forget split with every answer replaced by the objective's preferred
answer (`preferred_frame`): a refusal from the shipped list (`with_refusals`), or for altpo the
split's `alternate` column when it has one (`with_alternates`); the prompt is kept, only the new
answer and EOS are labelled. `forget_idk` is shuffled like `forget`, so batch i of the two holds
the same rows in the same order.
"""

from __future__ import annotations

import math
import warnings
import zlib
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Callable, Mapping, Protocol, Sequence

import pandas as pd
import torch
import torch.nn.functional as F

from soir.data import IGNORE_INDEX, example_losses, list_cell, per_example_loss, token_nll
from soir.errors import UserError
from soir.groups import layer_index
from soir.registry import Registry
from soir.runtime import lm_logits
from soir.settings import setting

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ObjectiveSettings:
    """Weights and temperatures shared by the objectives; each uses the ones it needs."""

    w_forget: float = setting(1.0, "weight of the forget term (idk: of the refusal NLL)")
    w_retain: float = setting(1.0, "weight of the retain NLL (graddiff, npo, simnpo, combo, idk, dpo, wga, satimp, undial, altpo)")
    w_kl: float = setting(1.0, "weight of the KL to the original model on retain (kl, combo)")
    beta: float = setting(0.1, "inverse temperature β of NPO, SimNPO, DPO and AltPO (OpenUnlearning's 0.1)")
    margin: float = setting(0.0, "SimNPO's margin γ")
    rmu_layer: int | None = setting(None, "RMU: the transformer block (0-based) whose output is steered (default: the deepest "
                                          "block the mask selects; WMDP steers block 7 of Zephyr-7B's 32, training blocks 5-7)",
                                    metavar="L")
    steering_coeff: float = setting(6.5, "RMU's steering coefficient c: forget activations are pushed towards c·u, u a random "
                                         "unit vector (WMDP's 6.5 for Zephyr-7B; several times the testbed's activation norms)",
                                    metavar="C")
    rmu_alpha: float = setting(10.0, "RMU's weight α of the retain activations' squared distance to the original model's "
                                     "(10 balances forget and retain on the built-in testbed; WMDP: 1200 for Zephyr-7B)",
                               metavar="ALPHA")
    wga_alpha: float = setting(1.0, "WGA's exponent α: each forget token's NLL is weighted by its probability to the power α "
                                    "(OpenUnlearning's 1; 0 is plain gradient ascent)", metavar="ALPHA")
    satimp_beta1: float = setting(5.0, "SatImp's saturation exponent β1: a forget token's weight is p^β1 (1 − p)^β2 "
                                       "(OpenUnlearning's 5)", metavar="B1")
    satimp_beta2: float = setting(1.0, "SatImp's importance exponent β2 (OpenUnlearning's 1)", metavar="B2")
    undial_gamma: float = setting(10.0, "UNDIAL: how far the teacher's logit of each forget token is lowered "
                                        "(OpenUnlearning's `beta`, 10)", metavar="G")
    ceu_skip: int = setting(1, "CE-U: the first N answer tokens of each forget row are left out of the loss "
                               "(the paper's footnote; OpenUnlearning's 1)", metavar="N")


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


IDK_STREAM = "forget_idk"
FORGET_STREAMS = ("forget", IDK_STREAM)


def unlearns(objective) -> bool:
    """Whether an objective (class or instance) reads forget data, i.e. unlearns."""
    return any(stream in FORGET_STREAMS for stream in objective.streams)


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
#   `npo`, `simnpo`, `dpo`, `rmu_forget` (the objective's forget term before its weight),
#   `idk_nll` (the NLL of the refusals) and `rmu_retain`.
# - A reference is any object with `logits(batch) -> Tensor` computed without grad
#   (unlearn.reference); it stands for the model before unlearning. RMU also calls its
#   `apply(fn)`: fn(model) evaluated with the model's original values, without grad.


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
    (their sum would be zero: there would be nothing to optimise); its temperatures (NPO,
    SimNPO and DPO's β, RMU's steering coefficient, UNDIAL's γ) must be finite and > 0, and its
    exponents and counts (`nonnegative`: WGA's α, SatImp's β1 and β2, CE-U's skip) finite and ≥ 0.
    """
    used = getattr(OBJECTIVES.get(name), "weights", ())
    for field_name in used:
        value = getattr(settings, field_name)
        if not math.isfinite(value) or value < 0:
            raise UserError(f"objective {name}: {field_name}={value} is not allowed; weights must be finite and >= 0")
    if used and sum(getattr(settings, f) for f in used) == 0:
        listed = ", ".join(f"{f}=0" for f in used)
        raise UserError(f"objective {name}: its weights sum to zero ({listed}); give at least one a positive value")
    temperatures = getattr(OBJECTIVES[name], "temperatures", ())
    for field_name in temperatures:
        value = getattr(settings, field_name)
        if not math.isfinite(value) or value <= 0:
            raise UserError(f"objective {name}: {field_name}={value} must be > 0")
    for field_name in getattr(OBJECTIVES[name], "nonnegative", ()):
        value = getattr(settings, field_name)
        if not math.isfinite(value) or value < 0:
            raise UserError(f"objective {name}: {field_name}={value} must be finite and >= 0")
    if "beta" in temperatures and not math.isfinite(settings.margin):
        raise UserError(f"objective {name}: margin={settings.margin} must be finite")


class _Unlearning:
    """Common part: settings check on construction, reference check on call."""

    name = ""
    streams: tuple[str, ...] = ("forget", "retain")
    needs_reference = False
    weights: tuple[str, ...] = ()
    temperatures: tuple[str, ...] = ()
    nonnegative: tuple[str, ...] = ()

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


def log_ratio(model, reference, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(log π_θ(y|x) − log π_ref(y|x) per example, the model's mean answer NLL, detached) on a batch."""
    ref_logp = sequence_logprob(reference.logits(batch), batch["labels"])
    logits = lm_logits(model, batch)
    return sequence_logprob(logits, batch["labels"]) - ref_logp, per_example_loss(logits.detach(), batch["labels"]).mean()


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
        loss, parts = 0.0, {}
        if self.settings.w_forget:
            ratio, parts["forget_nll"] = log_ratio(model, reference, batches["forget"])
            npo = -(2.0 / self.settings.beta) * F.logsigmoid(-self.settings.beta * ratio).mean()
            parts["npo"] = npo.detach()
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


# ---------------------------------------------------------------- refusals (idk, dpo)

REFUSALS_FILE = "refusals.txt"


@lru_cache(maxsize=None)
def refusals() -> tuple[str, ...]:
    """The shipped refusal strings (unlearn/refusals.txt, one per line; `#` lines are comments)."""
    text = resources.files("unlearn").joinpath(REFUSALS_FILE).read_text(encoding="utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#"))


def refusal_for(row_id: str, seed: int = 0, choices: Sequence[str] | None = None) -> str:
    """The refusal of one row: a pure function of (seed, row id), so every run and every resume
    of a run relabels a row the same way, whatever the order or subset of the rows."""
    choices = refusals() if choices is None else tuple(choices)
    return choices[zlib.crc32(f"{seed}:{row_id}".encode()) % len(choices)]


def with_refusals(frame: pd.DataFrame, seed: int = 0, choices: Sequence[str] | None = None) -> pd.DataFrame:
    """`frame` with each answer replaced by a refusal (`refusal_for`), for the `forget_idk` stream.

    The prompt (`input`) is kept; the refusal takes the answer's leading whitespace, so under the
    raw-concatenation template " 555-0142" becomes " I don't know." Encoded with
    `DataSettings.encode`, only the refusal and the EOS are labelled.
    """
    out = frame.copy()
    answers = [str(a) for a in frame["output"]]
    out["output"] = [a[: len(a) - len(a.lstrip())] + refusal_for(i, seed, choices) for a, i in zip(answers, frame["id"].astype(str))]
    return out


@register_objective("idk")
class IDK(_Unlearning):
    """IDK (TOFU's idk): NLL on a refusal in place of each forget answer, plus the retain NLL.

        loss = w_f · NLL(refusal | forget prompt) + w_r · NLL_r

    The refusals come from `forget_idk` (`with_refusals`); component `idk_nll`.
    """

    streams = (IDK_STREAM, "retain")
    weights = ("w_forget", "w_retain")

    def __call__(self, model, batches, reference=None):
        loss, parts = 0.0, {}
        if self.settings.w_forget:
            idk = nll(model, batches[IDK_STREAM])
            parts["idk_nll"] = idk.detach()
            loss = self.settings.w_forget * idk
        return self._retain_nll(model, batches, loss, parts), parts


@register_objective("dpo")
class DPO(_Unlearning):
    """DPO (Rafailov et al. 2023) preferring a refusal to the forget answer, as OpenUnlearning's IdkDPO, plus the retain NLL.

        loss = w_f · −(2/β) · mean_i log σ(β [(log π_θ(y_w|x) − log π_ref(y_w|x)) − (log π_θ(y_l|x) − log π_ref(y_l|x))])
               + w_r · NLL_r

    y_w is the refusal (`forget_idk`), y_l the original answer (`forget`), the same prompt x;
    log π is summed over the labelled tokens and the reference is the model before unlearning,
    as in OpenUnlearning's `compute_dpo_loss` (with its −2/β scale, which NPO shares). At the
    start the loss is (2/β) log 2. Components: `dpo`, `forget_nll`, `idk_nll`.
    """

    streams = ("forget", IDK_STREAM, "retain")
    needs_reference = True
    weights = ("w_forget", "w_retain")
    temperatures = ("beta",)
    term, preferred_nll = "dpo", "idk_nll"  # the names of its components

    def __call__(self, model, batches, reference=None):
        reference = self._reference(reference)
        loss, parts = 0.0, {}
        if self.settings.w_forget:
            win, parts[self.preferred_nll] = log_ratio(model, reference, batches[IDK_STREAM])
            lose, parts["forget_nll"] = log_ratio(model, reference, batches["forget"])
            dpo = -(2.0 / self.settings.beta) * F.logsigmoid(self.settings.beta * (win - lose)).mean()
            parts[self.term] = dpo.detach()
            loss = self.settings.w_forget * dpo
        return self._retain_nll(model, batches, loss, parts), parts


# ---------------------------------------------------------------- alternate answers (altpo)

ALTERNATE_COLUMN = "alternate"


def with_alternates(frame: pd.DataFrame, seed: int = 0, column: str = ALTERNATE_COLUMN) -> pd.DataFrame:
    """`frame` with each answer replaced by one of its row's alternate answers (column `alternate`), for
    altpo's `forget_idk` stream; without that column, by a refusal (`with_refusals`).

    A cell holds one alternate or a list of them (AltPO generates several per question); which one
    a row gets is a pure function of (seed, row id), as `refusal_for`. The alternate takes the
    answer's leading whitespace, as in `with_refusals`. A row without an alternate is a UserError.
    """
    if column not in frame.columns:
        return with_refusals(frame, seed)
    out, answers, empty = frame.copy(), [], []
    for answer, row_id, cell in zip(frame["output"].astype(str), frame["id"].astype(str), frame[column]):
        value = list_cell(cell)
        values = value if isinstance(value, list) else ([] if value is None else [value])
        options = [str(o).strip() for o in values if str(o).strip()]
        if not options:
            empty.append(row_id)
            continue
        answers.append(answer[: len(answer) - len(answer.lstrip())] + refusal_for(row_id, seed, options))
    if empty:
        raise UserError(f"the forget split's {column!r} column is empty in {len(empty)} rows (e.g. id {empty[0]}): "
                        f"give every row an alternate answer, or drop the column to prefer refusals")
    out["output"] = answers
    return out


def preferred_frame(objective, forget: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """The rows of an objective's `forget_idk` stream: `forget` relabelled by its `preferred_answers`
    (altpo: `with_alternates`), else by refusals (`with_refusals`: idk, dpo)."""
    return getattr(objective, "preferred_answers", with_refusals)(forget, seed=seed)


@register_objective("altpo")
class AltPO(DPO):
    """AltPO (Mekala et al. 2025, "Alternate Preference Optimization"): DPO preferring an alternate answer to the forget answer, plus the retain NLL.

        loss = w_f · −(2/β) · mean_i log σ(β [(log π_θ(ã|x) − log π_ref(ã|x)) − (log π_θ(y|x) − log π_ref(y|x))])
               + w_r · NLL_r

    as `dpo`, with the preferred answer ã an in-domain alternate (the same question answered with
    other, plausible facts) instead of a refusal: positive feedback that keeps the answers fluent.
    The alternates come from the forget split's `alternate` column (`with_alternates`; one per row
    or a list, one picked per row); AltPO and OpenUnlearning generate them with the model before
    unlearning, here they are data. Without the column they are the shipped refusals, and altpo
    is dpo. As OpenUnlearning (which runs AltPO as its DPO trainer on the alternates): β = 0.1,
    w_f = w_r = 1 (its sweep: β 0.05–0.5, retain weight 1–5). Components: `altpo`, `forget_nll`,
    `alternate_nll`.
    """

    term, preferred_nll = "altpo", "alternate_nll"
    preferred_answers = staticmethod(with_alternates)


# ---------------------------------------------------------------- reweighted tokens and soft targets (wga, satimp, undial, ce-u)
#
# Their forget terms are means over each example's labelled tokens, then over the examples (the
# toolkit's convention, docs/design.md §3); OpenUnlearning averages over all the labelled tokens
# of a batch at once. The two agree when every answer has the same length.


def _weighted_nll(model, batch: Batch, weight: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean_i (1/|y_i|) Σ_t w_t · NLL_t, the plain mean NLL, detached), with w_t = weight(p_t) of each
    token's probability p_t = exp(−NLL_t) taken detached: the weights scale the tokens' gradients."""
    token, mask = token_nll(lm_logits(model, batch), batch["labels"])
    plain = token.detach()
    return token_mean(weight(torch.exp(-plain)) * token, mask), token_mean(plain, mask)


def _labelled_positions(logits: torch.Tensor, labels: torch.Tensor, skip: int = 0):
    """(the logits (N, V) at the positions predicting a labelled token, in at least float32; those
    tokens (N,); the example of each (N,); the count per example (B,)), leaving out the first
    `skip` labelled tokens of every example."""
    mask = labels[:, 1:] != IGNORE_INDEX
    if skip:
        mask = mask & (mask.cumsum(1) > skip)
    logits = logits[:, :-1][mask]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return logits, labels[:, 1:][mask], mask.nonzero(as_tuple=True)[0], mask.sum(1)


def _soft_cross_entropy(target: torch.Tensor, logits: torch.Tensor, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Mean over the examples with positions of each one's mean over them of CE(q, p) = −Σ_v q(v) log p(v)
    (0 when no example has any: e.g. CE-U's skip took every token)."""
    per_token = -(target * F.log_softmax(logits, dim=-1)).sum(-1)
    total = torch.zeros(counts.size(0), dtype=per_token.dtype, device=per_token.device).index_add(0, rows, per_token)
    return (total / counts.clamp_min(1)).mean()  # a row with no tokens left counts 0, as per_example_loss does


@register_objective("wga")
class WGA(_Unlearning):
    """Weighted gradient ascent (Wang et al. 2025, "Rethinking LLM Unlearning Objectives"): each forget token's NLL weighted by its probability^α, plus the retain NLL.

        loss = −w_f · mean_i (1/|y_i|) Σ_t sg(p_t)^α · NLL_t + w_r · NLL_r,   p_t = π_θ(y_t | x, y_<t)

    sg: the weight is detached. Gradient ascent's gradient weights a token by 1/p_t (∇ log p =
    ∇p / p), so the tokens already forgotten dominate it; WGA multiplies that by p_t^α. α
    (`wga_alpha`) is OpenUnlearning's 1 (α = 0 is gradient ascent); its WGA adds the retain NLL
    with weight 1, as here. Components: `wga` (the weighted forget NLL), `forget_nll`.
    """

    weights = ("w_forget", "w_retain")
    nonnegative = ("wga_alpha",)

    def __call__(self, model, batches, reference=None):
        loss, parts = 0.0, {}
        if self.settings.w_forget:
            alpha = self.settings.wga_alpha
            wga, parts["forget_nll"] = _weighted_nll(model, batches["forget"], lambda p: p.pow(alpha))
            parts["wga"] = wga.detach()
            loss = -self.settings.w_forget * wga
        return self._retain_nll(model, batches, loss, parts), parts


@register_objective("satimp")
class SatImp(_Unlearning):
    """SatImp (Yang et al. 2025, "Exploring Criteria of Loss Reweighting"): gradient ascent with each forget token weighted by p^β1 (1 − p)^β2, plus the retain NLL.

        loss = −w_f · mean_i (1/|y_i|) Σ_t sg(p_t)^β1 (1 − sg(p_t))^β2 · NLL_t + w_r · NLL_r

    The saturation factor p^β1 damps the tokens already unlikely (forgotten enough), the
    importance factor (1 − p)^β2 those the model is surest of; weights detached, as in WGA (which
    is β2 = 0). β1 = 5, β2 = 1 (`satimp_beta1`, `satimp_beta2`) are OpenUnlearning's defaults.
    OpenUnlearning's config weights the forget term 0.1 (its γ) and the retain NLL 1: give
    --w-forget 0.1 to match it. Components: `satimp` (the weighted forget NLL), `forget_nll`.
    """

    weights = ("w_forget", "w_retain")
    nonnegative = ("satimp_beta1", "satimp_beta2")

    def __call__(self, model, batches, reference=None):
        loss, parts = 0.0, {}
        if self.settings.w_forget:
            beta1, beta2 = self.settings.satimp_beta1, self.settings.satimp_beta2
            satimp, parts["forget_nll"] = _weighted_nll(model, batches["forget"], lambda p: p.pow(beta1) * (1 - p).pow(beta2))
            parts["satimp"] = satimp.detach()
            loss = -self.settings.w_forget * satimp
        return self._retain_nll(model, batches, loss, parts), parts


@register_objective("undial")
class UNDIAL(_Unlearning):
    """UNDIAL (Dong et al. 2025): self-distillation on the forget answers towards the original model with each true token's logit lowered by γ.

        loss = w_f · mean_i (1/|y_i|) Σ_t CE(q_t, p_θ,t) + w_r · NLL_r,   q_t = softmax(z_ref,t − γ · e_{y_t})

    z_ref,t are the reference's logits at the position that predicts y_t (the model before
    unlearning, through the swapped original values of `unlearn.reference`, not a second model),
    e_{y_t} its one-hot, CE(q, p) = −Σ_v q(v) log p(v). The target is fixed, so the loss is
    bounded below (its minimum is at p = q), unlike gradient ascent. γ (`undial_gamma`) is
    OpenUnlearning's 10 (its `beta`; its sweep: 3, 10, 30). Only the labelled answer positions
    count; OpenUnlearning averages over every position, prompt and padding included. Its config
    weights the retain NLL 0 (the paper has none), its community runs 1–5: --w-retain 0 is the
    paper's form. Components: `undial`, `forget_nll`.
    """

    needs_reference = True
    weights = ("w_forget", "w_retain")
    temperatures = ("undial_gamma",)

    def __call__(self, model, batches, reference=None):
        reference = self._reference(reference)
        loss, parts = 0.0, {}
        if self.settings.w_forget:
            batch = batches["forget"]
            teacher = _labelled_positions(reference.logits(batch), batch["labels"])[0]
            logits = lm_logits(model, batch)
            student, tokens, rows, counts = _labelled_positions(logits, batch["labels"])
            adjusted = teacher.clone()
            adjusted[torch.arange(tokens.numel(), device=tokens.device), tokens] -= self.settings.undial_gamma
            undial = _soft_cross_entropy(F.softmax(adjusted, dim=-1), student, rows, counts)
            parts["undial"] = undial.detach()
            parts["forget_nll"] = per_example_loss(logits.detach(), batch["labels"]).mean()
            loss = self.settings.w_forget * undial
        return self._retain_nll(model, batches, loss, parts), parts


@register_objective("ce-u")
class CEU(_Unlearning):
    """CE-U (Yang 2025, "Cross Entropy Unlearning"): cross-entropy towards the model's own next-token distribution with the true token removed.

        loss = w_f · mean_i (1/|y_i'|) Σ_{t ∈ y_i'} CE(q_t, p_θ,t),   q_t = softmax(sg(z_t) with z_t[y_t] = −∞)

    q_t is p_θ,t renormalised without y_t, detached, so the gradient in the logits, p_θ,t − q_t,
    is p_t(y_t) on the true token and −p_t(v) p_t(y_t) / (1 − p_t(y_t)) on the others: bounded,
    and vanishing as the true token is forgotten. y_i' leaves out the first `ceu_skip` labelled
    tokens of each row (the paper's footnote; OpenUnlearning's default 1). No retain term and no
    reference, as in the paper and OpenUnlearning. Components: `ceu`, `forget_nll`.
    """

    streams = ("forget",)
    weights = ("w_forget",)
    nonnegative = ("ceu_skip",)

    def __call__(self, model, batches, reference=None):
        batch = batches["forget"]
        logits = lm_logits(model, batch)
        current, tokens, rows, counts = _labelled_positions(logits, batch["labels"], skip=self.settings.ceu_skip)
        removed = current.detach().scatter(-1, tokens[:, None], float("-inf"))
        ceu = _soft_cross_entropy(F.softmax(removed, dim=-1), current, rows, counts)
        parts = {"ceu": ceu.detach(), "forget_nll": per_example_loss(logits.detach(), batch["labels"]).mean()}
        return self.settings.w_forget * ceu, parts


# ---------------------------------------------------------------- activations (rmu)


def decoder_blocks(model) -> torch.nn.ModuleList:
    """The transformer blocks of a causal LM: its ModuleList with `config.num_hidden_layers` entries
    (`model.layers`, `transformer.h`, `gpt_neox.layers`, …)."""
    count = model.config.num_hidden_layers
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return module
    raise UserError(f"cannot find the {count} transformer blocks of this {type(model).__name__}: objective rmu needs them")


def block_output(model, batch: Batch, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the output hidden states (B, T, d) of block `layer`, the logits) of one forward pass.

    A forward hook on the block, as WMDP's RMU code; for the last block this is the state
    before the final norm (HF's `hidden_states[-1]` is after it)."""
    captured = []

    def hook(module, inputs, output):
        captured.append(output[0] if isinstance(output, tuple) else output)

    handle = decoder_blocks(model)[layer].register_forward_hook(hook)
    try:
        logits = lm_logits(model, batch)
    finally:
        handle.remove()
    return captured[0], logits


def token_mean(per_token: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over examples of each example's mean over its (unpadded) tokens; per_token is (B, T)."""
    mask = attention_mask.to(per_token.dtype)
    return ((per_token * mask).sum(1) / mask.sum(1).clamp_min(1)).mean()


def _squared_distance(hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """‖hidden − target‖² per token (B, T), in at least float32."""
    if hidden.dtype in (torch.float16, torch.bfloat16):
        hidden, target = hidden.float(), target.float()
    return (hidden - target.to(hidden.dtype)).pow(2).sum(-1)


@register_objective("rmu")
class RMU(_Unlearning):
    """RMU (Li et al. 2024, WMDP): forget activations of block --rmu-layer steered to c·u, retain activations kept at the original model's.

        loss = w_f · mean_x (1/|x|) Σ_t ‖h_θ(x)_t − c·u‖²  (x forget)  +  α · mean_x (1/|x|) Σ_t ‖h_θ(x)_t − h_ref(x)_t‖²  (x retain)

    h is the output of block ℓ (`rmu_layer`) at every unpadded token of the input, prompt and
    answer, as the paper averages over the tokens of the input (WMDP's code takes an
    element-wise MSE instead, which divides both terms by the width d: α and c keep their
    meaning). u is drawn once, uniform on [0, 1)^d and normalised (seeded by the run's seed);
    h_ref comes from the reference's `apply` (the swapped original tensors). By default ℓ is the
    deepest block the mask selects: WMDP steers the deepest of the blocks it trains (7 of 5-7),
    and parameters above ℓ cannot move h_ℓ. Components: `rmu_forget`, `rmu_retain` (unweighted)
    and `forget_nll`.
    """

    needs_reference = True
    weights = ("w_forget", "rmu_alpha")
    temperatures = ("steering_coeff",)

    def __init__(self, settings: ObjectiveSettings):
        super().__init__(settings)
        if settings.rmu_layer is not None and settings.rmu_layer < 0:
            raise UserError(f"objective rmu: --rmu-layer {settings.rmu_layer} is negative; give a block index from 0")
        self.layer: int | None = None
        self.direction: torch.Tensor | None = None

    def prepare(self, model, mask, seed: int = 0) -> None:
        """Fix the layer (checked against the model) and draw u; call before training."""
        blocks = len(decoder_blocks(model))
        layer = self.settings.rmu_layer
        if layer is None:
            selected = [i for i in (layer_index(name) for name in mask.names) if i is not None]
            layer = max(selected) if selected else 7 * blocks // 32  # no block selected: WMDP's relative depth
        if not 0 <= layer < blocks:
            raise UserError(f"objective rmu: --rmu-layer {layer} is out of range: this model has {blocks} blocks, give 0 to {blocks - 1}")
        above = [name for name in mask.names if layer_index(name) is not None and layer_index(name) > layer]
        if above:
            warnings.warn(f"objective rmu steers block {layer}: {len(above)} selected tensors above it (e.g. {above[0]}) get no gradient")
        generator = torch.Generator().manual_seed(seed)
        direction = torch.rand(model.config.hidden_size, generator=generator, dtype=torch.float64)
        self.layer, self.direction = layer, direction / direction.norm()

    def __call__(self, model, batches, reference=None):
        if self.direction is None:
            raise ValueError("objective rmu needs prepare(model, mask, seed) before its first call (unlearn_model does it)")
        s = self.settings
        loss, parts = 0.0, {}
        if s.w_forget:
            batch = batches["forget"]
            hidden, logits = block_output(model, batch, self.layer)
            target = (s.steering_coeff * self.direction).to(hidden.device)
            forget = token_mean(_squared_distance(hidden, target), batch["attention_mask"])
            parts["rmu_forget"] = forget.detach()
            parts["forget_nll"] = per_example_loss(logits.detach(), batch["labels"]).mean()
            loss = s.w_forget * forget
        if s.rmu_alpha:
            batch = batches["retain"]
            original = self._reference(reference).apply(lambda m: block_output(m, batch, self.layer)[0])
            hidden, _ = block_output(model, batch, self.layer)
            retain = token_mean(_squared_distance(hidden, original), batch["attention_mask"])
            parts["rmu_retain"] = retain.detach()
            loss = loss + s.rmu_alpha * retain
        return loss, parts


# ---------------------------------------------------------------- Sophia's Hessian pass


def hessian_streams(objective) -> tuple[str, ...]:
    """The streams whose labelled positions the GNB pass samples: `objective.hessian_streams`, else all its streams."""
    return tuple(getattr(objective, "hessian_streams", objective.streams))


def gnb_loss(model, batches: Mapping[str, Batch], generator: torch.Generator) -> tuple[torch.Tensor, int]:
    """(Σ CE against sampled labels, B) over the labelled positions of `batches` (Sophia's Algorithm 2).

    At every position that predicts a labelled token, a label is drawn from the model's own
    next-token distribution there (`generator`) and the cross-entropy against it is summed; B
    counts the positions. The gradient of the sum over B is the GNB's ĝ, and B·ĝ⊙ĝ estimates
    the diagonal Gauss–Newton matrix of the mean NLL over those positions without bias (the
    cross-position terms vanish in expectation). This is the curvature the loop gives SophiaG
    for every objective: the Gauss–Newton of the NLL of the tokens the objective trains on.
    For the NLL terms (finetune, ga, graddiff, the retain term of npo, simnpo, idk, dpo) it is
    their exact Gauss–Newton up to their weights and signs. The forget term of graddiff and ga
    enters with its magnitude: its Gauss–Newton −G_f is negative semi-definite, no square of
    sampled gradients can estimate it, and as a preconditioner it would make ρ·h ≤ 0 and the
    step unbounded; |−G_f| = G_f is the saddle-free choice, and the clip bounds the step where
    the curvature is small; so do the reweighted ascents of wga and satimp. For the other forget
    terms (npo, dpo, altpo, undial, ce-u, rmu: not NLLs) it is the Fisher metric of the model's
    predictive distribution on those tokens, the same preconditioner.
    """
    total, count = None, 0
    for batch in batches.values():
        mask = batch["labels"][:, 1:] != IGNORE_INDEX
        n = int(mask.sum())
        if not n:
            continue
        logits = lm_logits(model, batch)[:, :-1][mask]
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        with torch.no_grad():
            sampled = torch.multinomial(torch.softmax(logits.detach(), -1), 1, generator=generator).squeeze(1)
        part = F.cross_entropy(logits, sampled, reduction="sum")
        total = part if total is None else total + part
        count += n
    return (total if total is not None else torch.zeros(())), count
