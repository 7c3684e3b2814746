"""Evaluation metrics (docs/design.md §8): SemEval-2025 Task 4, membership inference and TOFU-style.

Pure functions on strings and numbers (ROUGE-L recall, exact match, AUC, harmonic-mean
aggregates, truth ratio, forget quality, model utility), token metrics of the teacher-forced
predictions (exact memorization, extraction strength), plus `sequence_scores`, which gets
every likelihood-based per-example number from one forward pass per batch: answer loss,
answer probability, teacher-forced token accuracy, the token metrics and the
membership-inference scores (and, when asked, the two that need more than that pass: the
gradient norm, one backward per example, and the loss against a reference model).

Which tokens are scored (`sequence_scores(scope=...)`): with `scope="answer"` (the default)
the answer tokens plus the one EOS that `soir.data.encode` labels (the prompt is context
only), so LOSS equals the per-example loss of the data contract. With `scope="document"`, as
SemEval-2025 Task 4 computes membership inference, the document is the row's full text
`template.prompt(input) + output`, tokenized in one piece with the tokenizer's special tokens
(no EOS appended), and every token after the first is scored.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
import zlib
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from soir.data import (
    IGNORE_INDEX,
    Template,
    answer_hits,
    collate,
    encode,
    pad_id,
    per_example_loss,
)
from soir.errors import UserError
from soir.registry import Registry
from soir.runtime import device_of, eval_mode, lm_logits, to_device, tqdm

# ---------------------------------------------------------------- text metrics


@functools.lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l_recall(prediction: str, reference: str) -> float:
    """ROUGE-L recall of `prediction` against `reference` (SemEval regurgitation, TOFU ROUGE)."""
    return float(_rouge_scorer().score(reference, prediction)["rougeL"].recall)


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the stripped, lower-cased strings are equal (SemEval knowledge), else 0.0."""
    return float(str(prediction).strip().lower() == str(reference).strip().lower())


# Per-row metrics of a generation against its reference, registered by name: `soir evaluate`
# scores every generated row with each (a per-example column NAME, and NAME_paraphrased-style
# columns on paraphrased questions) and reports the split means as `SPLIT/NAME`.
TEXT_METRICS: Registry[Callable[[str, str], float]] = Registry("metric")
TEXT_METRICS.register("rouge_l_recall", rouge_l_recall, help="ROUGE-L recall against the reference (SemEval regurgitation)")
TEXT_METRICS.register("exact_match", exact_match, help="stripped, lower-cased equality (SemEval knowledge)")


# ---------------------------------------------------------------- token metrics (teacher-forced)


def exact_memorization(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of answer tokens whose teacher-forced argmax prediction is the label (Tirumala et al. 2022).

    OpenUnlearning's `exact_memorization`: `predictions[t]` is the argmax of the model's
    next-token distribution given the prompt and the true answer tokens before t. NaN for an
    answer of no tokens.
    """
    if labels.numel() == 0:
        return float("nan")
    return float((predictions == labels).double().mean())


def extraction_strength(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """1 - k/L: k the shortest answer prefix after which the teacher-forced argmax predictions
    reproduce the rest of the answer exactly, L the answer's length (Carlini et al. 2021).

    As OpenUnlearning's `extraction_strength` it is teacher-forced (the argmax at each position
    given the true prefix, not a free generation), so it equals the length of the longest
    correctly predicted answer suffix over L. k runs over 0..L, so an answer whose last token is
    mispredicted scores 0; OpenUnlearning's loop stops at k = L - 1 and gives such an answer
    1/L. NaN for an answer of no tokens.
    """
    count = labels.numel()
    if count == 0:
        return float("nan")
    wrong = (predictions != labels).nonzero()
    prefix = int(wrong[-1]) + 1 if len(wrong) else 0
    return 1.0 - prefix / count


# Per-example metrics of the teacher-forced argmax predictions of an answer's tokens against
# those tokens (the labelled tokens without the trailing EOS, as OpenUnlearning scores them),
# registered by name: `sequence_scores` computes each as a column NAME, and `soir evaluate`
# reports the split means as `SPLIT/NAME`.
TOKEN_METRICS: Registry[Callable[[torch.Tensor, torch.Tensor], float]] = Registry("token metric")
TOKEN_METRICS.register("exact_memorization", exact_memorization, help="share of answer tokens the teacher-forced argmax reproduces (OpenUnlearning)")
TOKEN_METRICS.register("extraction_strength", extraction_strength, help="share of the answer's end the teacher-forced argmax reproduces without error (OpenUnlearning)")


def answer_predictions(logits: torch.Tensor, labels: torch.Tensor, eos_id: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per example: (teacher-forced argmax predictions, labels) of its labelled tokens, on the CPU,
    without a trailing `eos_id` (the EOS `soir.data.encode` appends is not part of the answer)."""
    predictions = logits[:, :-1].argmax(-1).cpu()
    shift_labels = labels[:, 1:].cpu()
    pairs = []
    for row_predictions, row_labels in zip(predictions, shift_labels):
        mask = row_labels != IGNORE_INDEX
        row_predictions, row_labels = row_predictions[mask], row_labels[mask]
        if eos_id is not None and row_labels.numel() and int(row_labels[-1]) == eos_id:
            row_predictions, row_labels = row_predictions[:-1], row_labels[:-1]
        pairs.append((row_predictions, row_labels))
    return pairs


# ---------------------------------------------------------------- membership inference


def auc(member_scores: Iterable[float], nonmember_scores: Iterable[float], *, higher_is_member: bool = True) -> float:
    """Fraction of (member, non-member) pairs the score orders correctly; ties count one half.

    This is the area under the ROC curve (the Mann-Whitney U statistic over the pair count),
    computed from average ranks in O(n log n).
    """
    from scipy.stats import rankdata

    members = np.asarray(list(member_scores), dtype=np.float64)
    nonmembers = np.asarray(list(nonmember_scores), dtype=np.float64)
    if members.size == 0 or nonmembers.size == 0:
        raise ValueError("auc needs at least one member and one non-member score")
    if np.isnan(members).any() or np.isnan(nonmembers).any():
        raise ValueError("auc got a NaN score")
    if not higher_is_member:
        members, nonmembers = -members, -nonmembers
    ranks = rankdata(np.concatenate([members, nonmembers]))
    n_m, n_n = members.size, nonmembers.size
    u = ranks[:n_m].sum() - n_m * (n_m + 1) / 2
    return float(u / (n_m * n_n))


def mia_score(auc_value: float) -> float:
    """SemEval MIA score 1 - 2|AUC - 0.5|: 1 when members and non-members are indistinguishable."""
    return 1.0 - 2.0 * abs(float(auc_value) - 0.5)


def min_k_mean(values: Sequence[float] | np.ndarray | torch.Tensor, k: float = 0.4) -> float:
    """Mean of the lowest `max(1, floor(k * n))` values (the Min-K% statistic)."""
    values = torch.as_tensor(values, dtype=torch.float64).flatten()
    if values.numel() == 0:
        return float("nan")
    if not 0 < k <= 1:
        raise ValueError(f"k must be in (0, 1], got {k}")
    count = max(1, int(k * values.numel()))
    return float(torch.sort(values).values[:count].mean())


@dataclass(frozen=True)
class MIAAttack:
    """A per-document membership-inference score: its per-example column and its orientation."""

    column: str
    higher_is_member: bool
    description: str


MIA_ATTACKS: dict[str, MIAAttack] = {
    "loss": MIAAttack("loss", False, "mean NLL of the answer tokens (Yeom et al.)"),
    "zlib": MIAAttack("zlib", False, "mean NLL / zlib-compressed length of the answer text in bytes (Carlini et al.)"),
    "min_k": MIAAttack("min_k", True, "mean of the lowest k fraction of answer-token log-probs (Shi et al.)"),
    "min_k_pp": MIAAttack("min_k_pp", True, "Min-K% over log-probs standardised by the model's own mean/std over the vocabulary (Zhang et al.)"),
}
# The attacks that need more than the one scoring pass (`sequence_scores(gradnorm=True,
# reference=...)`): a backward per example, or a second model. Their sign convention is
# OpenUnlearning's (as LOSS: a higher score means less likely a member).
EXTRA_MIA_ATTACKS: dict[str, MIAAttack] = {
    "gradnorm": MIAAttack("gradnorm", False, "p-norm of the gradient of the example's loss w.r.t. every model parameter (OpenUnlearning mia_gradnorm)"),
    "reference": MIAAttack("loss_minus_reference", False, "the example's loss minus a reference model's loss on the same tokens (OpenUnlearning mia_reference)"),
}
ALL_MIA_ATTACKS: dict[str, MIAAttack] = {**MIA_ATTACKS, **EXTRA_MIA_ATTACKS}
GRADNORM_ORDERS = (1.0, 2.0, math.inf)  # the p of the gradient-norm attack (OpenUnlearning's choices)


def mia_results(member: pd.DataFrame, nonmember: pd.DataFrame, attacks: Iterable[str] = tuple(MIA_ATTACKS)) -> dict[str, dict[str, float]]:
    """AUC and SemEval MIA score of each named attack (of `ALL_MIA_ATTACKS`), from per-example score tables."""
    results = {}
    for name in attacks:
        attack = ALL_MIA_ATTACKS[name]
        value = auc(member[attack.column], nonmember[attack.column], higher_is_member=attack.higher_is_member)
        results[name] = {"auc": value, "score": mia_score(value)}
    return results


# ---------------------------------------------------------------- model scores


@dataclass(frozen=True)
class ScoreSettings:
    """Settings of likelihood scoring.

    batch_size: rows per forward pass. max_length: tokens per row (prompt truncated from the
    left, as in `soir.data.encode`). min_k: the k of Min-K% and Min-K%++. gradnorm_p: the p of
    the gradient-norm attack's p-norm (1, 2 or inf). progress: tqdm bar.
    """

    batch_size: int = 8
    max_length: int = 256
    min_k: float = 0.4
    gradnorm_p: float = 2.0
    progress: bool = True

    def __post_init__(self):
        if float(self.gradnorm_p) not in GRADNORM_ORDERS:
            raise UserError(f"the gradient-norm p must be 1, 2 or inf, got {self.gradnorm_p}")


SCORE_COLUMNS = ("loss", "probability", "accuracy", "n_tokens", "zlib", "min_k", "min_k_pp")  # then one per TOKEN_METRICS entry
MIA_SCOPES = ("answer", "document")  # the tokens `sequence_scores` scores (module docstring)


def pooled_accuracy(rows) -> float | None:
    """Teacher-forced answer-token accuracy over all answer tokens of `rows` (as `soir.data.answer_accuracy`).

    Pools tokens rather than averaging rows, so long answers weigh by their length.
    """
    tokens = rows["n_tokens"].sum()
    return float((rows["accuracy"] * rows["n_tokens"]).sum() / tokens) if tokens else None


def sequence_scores(
    model,
    tokenizer,
    inputs: Sequence[str],
    outputs: Sequence[str],
    *,
    template: Template = Template(),
    settings: ScoreSettings = ScoreSettings(),
    desc: str = "score",
    scope: str = "answer",
    gradnorm: bool = False,
    reference=None,
) -> pd.DataFrame:
    """Per-example likelihood scores of `output` given `template.prompt(input)`, one row per pair.

    `scope="document"` scores every token of `template.prompt(input) + output` after the first
    instead (`document_tokens`): then every column below is over those tokens, and zlib divides
    by the compressed length of that text.

    Columns: loss (mean NLL of the labelled answer tokens, `soir.data.per_example_loss`),
    probability (exp(-loss)), accuracy (teacher-forced argmax hits over answer tokens,
    `soir.data.answer_hits`), n_tokens, zlib (loss / len(zlib.compress(output bytes))),
    min_k (mean of the lowest k fraction of token log-probs) and min_k_pp (the same over
    (log p(x_t) - mu_t) / sigma_t, mu_t and sigma_t the mean and standard deviation of
    log p(.) under the model's own next-token distribution at position t), then one column per
    `TOKEN_METRICS` entry (exact_memorization, extraction_strength: over the labelled tokens
    without the trailing EOS, `answer_predictions`). With `gradnorm`: gradnorm (the
    `settings.gradnorm_p`-norm of the gradient of loss w.r.t. every parameter,
    `gradient_norms`); with a `reference` model: loss_minus_reference (loss minus the
    reference's loss on the same tokens).
    """
    inputs, outputs = [str(x) for x in inputs], [str(x) for x in outputs]
    names = [*SCORE_COLUMNS, *TOKEN_METRICS, *(["gradnorm"] if gradnorm else []), *(["loss_minus_reference"] if reference is not None else [])]
    if len(inputs) != len(outputs):
        raise ValueError("inputs and outputs differ in length")
    if not inputs:
        return pd.DataFrame({c: pd.Series(dtype=float) for c in names})
    input_ids, label_ids, texts = scored_tokens(tokenizer, inputs, outputs, template=template, max_length=settings.max_length, scope=scope)
    device = device_of(model)
    pad = pad_id(tokenizer)
    columns: dict[str, list[float]] = {c: [] for c in names}
    starts = range(0, len(input_ids), settings.batch_size)
    with eval_mode(model, no_grad=True), eval_mode(reference, no_grad=True) if reference is not None else contextlib.nullcontext():
        for start in tqdm(starts, desc=desc, disable=not settings.progress, leave=False):
            stop = start + settings.batch_size
            cpu_batch = collate(input_ids[start:stop], label_ids[start:stop], pad)
            batch = to_device(cpu_batch, device)
            logits = lm_logits(model, batch)
            labels = batch["labels"]
            loss = per_example_loss(logits, labels)
            hits, counts = answer_hits(logits, labels)
            token_logp, token_z = token_statistics(logits, labels)
            for row, (lp, z) in enumerate(zip(token_logp, token_z)):
                columns["loss"].append(float(loss[row]))
                columns["probability"].append(math.exp(-float(loss[row])))
                columns["accuracy"].append(float(hits[row]) / max(int(counts[row]), 1))
                columns["n_tokens"].append(int(counts[row]))
                columns["min_k"].append(min_k_mean(lp, settings.min_k))
                columns["min_k_pp"].append(min_k_mean(z, settings.min_k))
            for predictions, answer in answer_predictions(logits, labels, tokenizer.eos_token_id):
                for name, metric in TOKEN_METRICS.items():
                    columns[name].append(metric(predictions, answer))
            if reference is not None:
                reference_batch = to_device(cpu_batch, device_of(reference))
                reference_loss = per_example_loss(lm_logits(reference, reference_batch), reference_batch["labels"]).cpu()
                columns["loss_minus_reference"].extend(float(a) - float(b) for a, b in zip(loss.cpu(), reference_loss))
    for loss, text in zip(columns["loss"], texts):
        columns["zlib"].append(loss / len(zlib.compress(text.encode("utf-8"))))
    if gradnorm:
        columns["gradnorm"] = gradient_norms(model, input_ids, label_ids, p=settings.gradnorm_p, progress=settings.progress, desc=f"{desc} (gradient norm)")
    return pd.DataFrame(columns)


def scored_tokens(tokenizer, inputs: Sequence[str], outputs: Sequence[str], *, template: Template = Template(), max_length: int = 256,
                  scope: str = "answer") -> tuple[list[list[int]], list[list[int]], list[str]]:
    """(token ids, labels, the texts zlib compresses) of the pairs, as `sequence_scores` scores them in `scope`."""
    if scope not in MIA_SCOPES:
        raise UserError(f"unknown scoring scope {scope!r}: use one of {', '.join(MIA_SCOPES)}")
    if scope == "document":
        texts = [template.prompt(i) + o for i, o in zip(inputs, outputs)]
        return (*document_tokens(tokenizer, texts, max_length), texts)
    frame = pd.DataFrame({"id": [str(i) for i in range(len(inputs))], "input": list(inputs), "output": list(outputs)})
    data = encode(frame, tokenizer, template, max_length)
    return data.input_ids, data.labels, list(outputs)


@contextlib.contextmanager
def _all_parameters_trainable(parameters: Sequence[torch.nn.Parameter]):
    flags = [p.requires_grad for p in parameters]
    try:
        for p in parameters:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in zip(parameters, flags):
            p.requires_grad_(flag)


def gradient_norms(model, input_ids: Sequence[Sequence[int]], label_ids: Sequence[Sequence[int]], *, p: float = 2.0,
                   progress: bool = False, desc: str = "gradient norm") -> list[float]:
    """Per example: the p-norm of the gradient of its loss w.r.t. every floating parameter of `model`.

    The loss is the data contract's per-example loss (`soir.data.per_example_loss`, the tokens
    the `loss` column scores), the norm is over all parameters together,
    (sum over tensors of ||g_i||_p^p)^(1/p) (max |g| for p = inf), in float64. One unpadded
    forward and one backward per example, in eval mode (no dropout), frozen parameters
    included; the model's `.grad`s are left alone. OpenUnlearning's `mia_gradnorm` instead
    averages the per-tensor norms, in train mode.
    """
    if float(p) not in GRADNORM_ORDERS:
        raise UserError(f"the gradient-norm p must be 1, 2 or inf, got {p}")
    device = device_of(model)
    parameters = [q for q in model.parameters() if q.is_floating_point()]
    norms = []
    with eval_mode(model), torch.enable_grad(), _all_parameters_trainable(parameters):
        for ids, labels in tqdm(list(zip(input_ids, label_ids)), desc=desc, disable=not progress, leave=False):
            batch = to_device(collate([ids], [labels], 0), device)
            loss = per_example_loss(lm_logits(model, batch), batch["labels"])[0]
            grads = torch.autograd.grad(loss, parameters, allow_unused=True)
            per_tensor = [torch.linalg.vector_norm(g, ord=p, dtype=torch.float64) for g in grads if g is not None]
            norms.append(float(torch.linalg.vector_norm(torch.stack(per_tensor), ord=p)) if per_tensor else 0.0)
    return norms


def document_tokens(tokenizer, texts: Sequence[str], max_length: int = 256) -> tuple[list[list[int]], list[list[int]]]:
    """(token ids, labels) of whole documents for document-scope scoring: each text tokenized in
    one piece with the tokenizer's special tokens, every token labelled (the first is never
    predicted). A document longer than `max_length` keeps its first tokens, with one warning."""
    ids = [list(x) for x in tokenizer([str(t) for t in texts], add_special_tokens=True)["input_ids"]]
    cut = sum(len(x) > max_length for x in ids)
    if cut:
        warnings.warn(f"{cut} of {len(ids)} documents were longer than {max_length} tokens and were cut to their first {max_length}")
        ids = [x[:max_length] for x in ids]
    short = next((i for i, x in enumerate(ids) if len(x) < 2), None)
    if short is not None:
        raise UserError(f"row {short} is a document of {len(ids[short])} token(s): document-scope scores need at least two (use --mia-scope answer)")
    return ids, [list(x) for x in ids]


def token_statistics(logits: torch.Tensor, labels: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per example: log p(x_t) of its labelled tokens and their Min-K%++ standardisation.

    Only labelled positions are taken through the softmax (N x V, not B x T x V). Work is in
    float64 for float64 models, float32 otherwise.
    """
    shift_logits = logits[:, :-1]
    shift_labels = labels[:, 1:]
    mask = shift_labels != IGNORE_INDEX
    work = torch.float64 if logits.dtype == torch.float64 else torch.float32
    selected = shift_logits[mask].to(work)
    logp = F.log_softmax(selected, dim=-1)
    target = logp.gather(1, shift_labels[mask][:, None]).squeeze(1)
    p = logp.exp()
    mu = (p * logp).sum(-1)
    var = (p * logp.square()).sum(-1) - mu.square()
    z = (target - mu) / var.clamp_min(0).sqrt().clamp_min(torch.finfo(work).tiny)
    counts = mask.sum(1).tolist()
    return list(target.cpu().split(counts)), list(z.cpu().split(counts))


# ---------------------------------------------------------------- aggregates


def harmonic_mean(values: Iterable[float | None]) -> float:
    """Harmonic mean of the values that are present (not None/NaN); 0 when any is 0, NaN when none."""
    present = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not present:
        return float("nan")
    if any(v < 0 for v in present):
        raise ValueError(f"harmonic_mean needs non-negative values, got {present}")
    if any(v == 0 for v in present):
        return 0.0
    return len(present) / sum(1.0 / v for v in present)


SPLIT_SIDES = ("forget", "retain")
TASK_METRICS = ("regurgitation", "knowledge")


def task_aggregate(values: Mapping[tuple[str, str, str], float | None]) -> float:
    """SemEval-2025 Task 4 aggregate: harmonic mean of the per-task numbers that are present.

    `values[(side, task, metric)]` with side in {"forget", "retain"} and metric in
    {"regurgitation", "knowledge"}: 2 x 3 tasks x 2 = 12 numbers at most. Forget numbers enter
    as 1 - value, retain numbers as value; missing (None/NaN) entries are left out, so fewer
    tasks work; any zero term makes the aggregate 0.
    """
    terms = []
    for (side, task, metric), value in values.items():
        if side not in SPLIT_SIDES or metric not in TASK_METRICS:
            raise ValueError(f"task_aggregate keys are (forget|retain, task, regurgitation|knowledge), got {(side, task, metric)}")
        if value is None or math.isnan(float(value)):
            continue
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"task_aggregate values must lie in [0, 1], got {value} for {(side, task, metric)}")
        terms.append(1.0 - float(value) if side == "forget" else float(value))
    return harmonic_mean(terms)


def final_score(task_aggregate_value: float | None, mia_score_value: float | None, mmlu_accuracy: float | None) -> float:
    """SemEval final score: mean of task aggregate, MIA score and MMLU accuracy (those present)."""
    present = [float(v) for v in (task_aggregate_value, mia_score_value, mmlu_accuracy) if v is not None and not math.isnan(float(v))]
    return float(np.mean(present)) if present else float("nan")


# ---------------------------------------------------------------- TOFU-style


def truth_ratio(paraphrased_loss: float, perturbed_losses: Sequence[float], *, mean: str = "geometric") -> float:
    """TOFU truth ratio R = P(perturbed)^(1/len) / P(paraphrased)^(1/len), from per-token mean losses.

    Each P(a|q)^(1/|a|) is exp(-mean NLL of a). The TOFU paper averages the perturbed answers'
    normalised probabilities arithmetically (`mean="arithmetic"`); TOFU's released evaluation
    code (and so its published forget-quality numbers) averages their losses, i.e. takes the
    geometric mean (`mean="geometric"`, the default here). R < 1: the model prefers the true
    (paraphrased) answer.
    """
    perturbed = np.asarray(perturbed_losses, dtype=np.float64)
    if perturbed.size == 0:
        return float("nan")
    if mean == "geometric":
        return float(math.exp(float(paraphrased_loss) - perturbed.mean()))
    if mean == "arithmetic":
        return float(np.exp(-perturbed).mean() / math.exp(-float(paraphrased_loss)))
    raise ValueError(f"mean must be 'geometric' or 'arithmetic', got {mean!r}")


def truth_ratio_forget_score(ratio: float) -> float:
    """TOFU's forget-set statistic min(R, 1/R): 1 when true and false answers are equally likely."""
    return float(min(ratio, 1.0 / ratio)) if ratio > 0 else 0.0


def truth_ratio_retain_score(ratio: float) -> float:
    """TOFU's retain-set (model utility) form max(0, 1 - R): high when the true answer is preferred."""
    return float(max(0.0, 1.0 - ratio))


def forget_quality(model_ratios: Iterable[float], oracle_ratios: Iterable[float]) -> float:
    """TOFU forget quality: KS-test p-value between the model's and a retain-only oracle's forget truth ratios."""
    from scipy.stats import ks_2samp

    a = np.asarray([x for x in model_ratios if not math.isnan(x)], dtype=np.float64)
    b = np.asarray([x for x in oracle_ratios if not math.isnan(x)], dtype=np.float64)
    if a.size == 0 or b.size == 0:
        return float("nan")
    return float(ks_2samp(a, b).pvalue)


def model_utility(probability: float | None, rouge: float | None, truth_ratio_score: float | None) -> float:
    """TOFU model utility on the retain set: harmonic mean of answer probability, ROUGE-L recall and truth-ratio score."""
    return harmonic_mean([probability, rouge, truth_ratio_score])
