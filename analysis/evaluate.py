"""Evaluate a model on its splits: SemEval-2025 Task 4 metrics, MIA, MMLU and TOFU-style (docs/design.md §8).

`evaluate` returns the aggregates (a flat, JSON-ready dict that also records the settings) and
a per-example table; `write_evaluation` writes them as `metrics.json` and
`per_example.parquet`, each atomically.

Per row of every split:
- greedy generation from `template.prompt(input)` -> every registered text metric
  (`analysis.metrics.TEXT_METRICS`: `rouge_l_recall`, `exact_match`, …) against `output`. Rows are classified by `soir.data.row_kind`: `qa` ids (`…qa0`-`…qa4`)
  count towards knowledge (exact match), every other row (`…sc1`, or no SemEval id, scored
  as a completion) towards regurgitation (ROUGE-L recall);
- one teacher-forced pass -> `loss`, `probability`, `accuracy`, every registered token metric
  (`analysis.metrics.TOKEN_METRICS`: `exact_memorization`, `extraction_strength`, over the
  argmax predictions of the answer tokens) and the MIA scores `zlib`, `min_k`, `min_k_pp` (see
  `analysis.metrics.sequence_scores` for the tokens scored);
- with `paraphrased_input`: generation from it -> `paraphrased_<metric>` of every text metric;
- with `perturbed_outputs` (a list): TOFU `truth_ratio` of the perturbed answers against
  `paraphrased_output` (or `output` where that is missing), and `truth_ratio_score`
  (min(R, 1/R) on the forget split, max(0, 1 - R) elsewhere).
Holdout rows (non-members for MIA) get the teacher-forced scores only.

The forget and holdout rows (those membership inference scores) also get `gradnorm` (the
p-norm of the gradient of the row's loss w.r.t. every parameter: one backward per row;
`mia_gradnorm=False` skips it) and, given a reference model (`reference=`, `soir evaluate
--reference-model`), `loss_minus_reference` (the row's loss minus the reference's): the
OpenUnlearning attacks `mia_gradnorm` and `mia_reference`, reported as `mia/gradnorm/…` and
`mia/reference/…`; a skipped one is named in `mia/<attack>/skipped` with the reason.

Membership inference scores either the answer (`mia_scope="answer"`: the per-example `loss`,
`zlib`, `min_k`, `min_k_pp` above) or the whole document (`"document"`, as SemEval computes it:
one more teacher-forced pass over every token of `template.prompt(input) + output`, reported in
extra per-example columns `document_loss`, `document_zlib`, `document_min_k`, `document_min_k_pp`,
and `document_gradnorm`, `document_loss_minus_reference` where those run, on the forget and
holdout rows). `semeval_tables` / `write_semeval` give the forget and retain
generations in the layout the official SemEval scorer reads (`forget_0.csv`, `retain_0.csv`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from analysis.generation import GenerationSettings, generate
from analysis.metrics import (
    ALL_MIA_ATTACKS,
    EXTRA_MIA_ATTACKS,
    MIA_ATTACKS,
    MIA_SCOPES,
    TEXT_METRICS,
    TOKEN_METRICS,
    ScoreSettings,
    final_score,
    forget_quality,
    mia_results,
    model_utility,
    pooled_accuracy,
    sequence_scores,
    task_aggregate,
    truth_ratio,
    truth_ratio_forget_score,
    truth_ratio_retain_score,
)
from analysis.mmlu import MMLUSettings, mmlu_accuracy
from soir.data import Template, list_cell, row_kind
from soir.distributed import gather_frame, shard_frame, world_size
from soir.errors import UserError
from soir.io import atomic_path, write_json, write_parquet

ALL_TASKS = "all"
HOLDOUT = "holdout"
PER_EXAMPLE_COLUMNS = (  # the built-in columns; registered text and token metrics beyond these are appended
    "id", "split", "task", "kind", "generation", "rouge_l_recall", "exact_match",
    "probability", "accuracy", "loss", "n_tokens", "zlib", "min_k", "min_k_pp",
    "exact_memorization", "extraction_strength", "gradnorm", "loss_minus_reference",
    "truth_ratio", "truth_ratio_score", "paraphrased_generation", "paraphrased_exact_match",
    "paraphrased_rouge_l_recall", "mc_correct",
)
DOCUMENT_COLUMNS = ("loss", "zlib", "min_k", "min_k_pp")  # per-example `document_<column>` with mia_scope="document"
SEMEVAL_COLUMNS = ("id", "task", "input", "expected_output", "model_output")  # the official scorer's CSV layout


def per_example_columns() -> list[str]:
    """The columns of `per_example.parquet`: the built-in ones, then one (and its paraphrased
    twin) per registered text metric and one per registered token metric that is not built in."""
    extra = [c for name in TEXT_METRICS if name not in PER_EXAMPLE_COLUMNS for c in (name, f"paraphrased_{name}")]
    return list(PER_EXAMPLE_COLUMNS) + extra + [name for name in TOKEN_METRICS if name not in PER_EXAMPLE_COLUMNS]


def _text_scores(texts, references) -> dict[str, list[float]]:
    return {name: [metric(t, r) for t, r in zip(texts, references)] for name, metric in TEXT_METRICS.items()}


@dataclass(frozen=True)
class EvalSettings:
    """What to evaluate and how.

    template: the prompt template (`soir.data.Template`). generate: run greedy generation
    (False: teacher-forced metrics only). mia: membership inference, forget split = members,
    holdout = non-members (needs a holdout). mia_attack: the attack whose score enters the
    final score (all of `MIA_ATTACKS` are reported, and those of `EXTRA_MIA_ATTACKS` that run).
    mia_gradnorm: the gradient-norm attack (one backward per forget and holdout row).
    mia_scope: the tokens membership inference scores. "answer" (the default): the labelled
    tokens of the data contract, the answer and its EOS after the prompt as context, so the
    LOSS attack is the per-example loss (and gradnorm its gradient's norm). "document": as
    SemEval-2025 Task 4 computes MIA, the row's full text `template.prompt(input) + output`
    tokenized in one piece (with the tokenizer's special tokens, no EOS appended) is the
    document, and LOSS, zlib, Min-K% and Min-K%++ use every token after the first (zlib
    divides by the compressed length of the document text); prompts then count as much as
    answers. truth_ratio_mean: "geometric" (TOFU's code) or "arithmetic" (TOFU's paper).
    forget_split / retain_split: the split names that enter the task aggregate, forget
    quality and model utility. progress: tqdm bars.
    """

    template: str = "{input}{output}"
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    scoring: ScoreSettings = field(default_factory=ScoreSettings)
    mmlu: MMLUSettings = field(default_factory=MMLUSettings)
    generate: bool = True
    mia: bool = True
    mia_attack: str = "loss"
    mia_gradnorm: bool = True
    mia_scope: str = "answer"
    truth_ratio_mean: str = "geometric"
    forget_split: str = "forget"
    retain_split: str = "retain"
    progress: bool = True

    def __post_init__(self):
        if self.mia_attack not in ALL_MIA_ATTACKS:
            raise UserError(f"unknown MIA attack {self.mia_attack!r}: use one of {', '.join(ALL_MIA_ATTACKS)}")
        if self.mia_attack == "gradnorm" and not self.mia_gradnorm:
            raise UserError("the final score's MIA attack is gradnorm, which is turned off: drop --no-mia-gradnorm or pick another --mia-attack")
        if self.mia_scope not in MIA_SCOPES:
            raise UserError(f"unknown MIA scope {self.mia_scope!r}: use one of {', '.join(MIA_SCOPES)}")
        if self.truth_ratio_mean not in ("geometric", "arithmetic"):
            raise UserError(f"truth_ratio_mean must be 'geometric' or 'arithmetic', got {self.truth_ratio_mean!r}")


# ---------------------------------------------------------------- per example


def _present(value) -> bool:
    if value is None:
        return False
    if isinstance(value, float) and math.isnan(value):
        return False
    return True


def _as_list(value) -> list[str]:
    """A `perturbed_outputs` cell as a list of strings (list, array, JSON/Python list text, or missing)."""
    value = list_cell(value)
    if value is None:
        return []
    return [str(x) for x in value] if isinstance(value, list) else [str(value)]


def _check_split(name: str, frame: pd.DataFrame) -> None:
    if not isinstance(frame, pd.DataFrame):
        raise UserError(f"split {name!r} is not a table")
    for column in ("input", "output"):
        if column not in frame.columns:
            raise UserError(f"split {name!r} has no {column!r} column; it has: {', '.join(map(str, frame.columns))}")
    if len(frame) == 0:
        raise UserError(f"split {name!r} is empty: it has no rows")


def truth_ratios(model, tokenizer, frame: pd.DataFrame, *, template: Template, settings: ScoreSettings, mean: str = "geometric", desc: str = "truth ratio") -> np.ndarray:
    """TOFU truth ratio per row (NaN where a row has no `perturbed_outputs`)."""
    ratios = np.full(len(frame), np.nan)
    if "perturbed_outputs" not in frame.columns:
        return ratios
    inputs, outputs, owners = [], [], []
    for i, row in enumerate(frame.itertuples(index=False)):
        perturbed = _as_list(getattr(row, "perturbed_outputs"))
        if not perturbed:
            continue
        paraphrased = getattr(row, "paraphrased_output", None)
        true_answer = paraphrased if _present(paraphrased) and str(paraphrased).strip() else row.output
        for answer in [true_answer, *perturbed]:
            inputs.append(str(row.input))
            outputs.append(str(answer))
            owners.append(i)
    if not inputs:
        return ratios
    losses = sequence_scores(model, tokenizer, inputs, outputs, template=template, settings=settings, desc=desc)["loss"].to_numpy()
    grouped: dict[int, list[float]] = {}
    for owner, loss in zip(owners, losses):
        grouped.setdefault(owner, []).append(float(loss))
    for owner, values in grouped.items():
        ratios[owner] = truth_ratio(values[0], values[1:], mean=mean)
    return ratios


def score_split(model, tokenizer, name: str, frame: pd.DataFrame, settings: EvalSettings, *, generate_text: bool = True,
                reference=None) -> pd.DataFrame:
    """Per-example metrics of one split (see the module docstring for the columns; `reference`: the
    reference model of the reference MIA). Under torchrun each process scores every
    world-size-th row and every process gets the whole table."""
    _check_split(name, frame)
    frame = frame.reset_index(drop=True)
    if "id" not in frame.columns:
        frame = frame.assign(id=[f"{name}-{i}" for i in range(len(frame))])
    if len(frame) < world_size():  # too few rows to share: every process scores them all
        return _score_rows(model, tokenizer, name, frame, settings, generate_text, reference)
    return gather_frame(_score_rows(model, tokenizer, name, shard_frame(frame), settings, generate_text, reference), len(frame))


def _score_rows(model, tokenizer, name: str, frame: pd.DataFrame, settings: EvalSettings, generate_text: bool, reference) -> pd.DataFrame:
    template = Template(settings.template)
    generation, scoring = _progress(settings)
    ids = frame["id"].astype(str).tolist()
    out = pd.DataFrame(
        {
            "id": ids,
            "split": name,
            "task": frame["task"].fillna(ALL_TASKS).astype(str).tolist() if "task" in frame.columns else ALL_TASKS,
            "kind": [row_kind(i) for i in ids],
        }
    )
    columns = per_example_columns()
    for column in columns[4:]:
        out[column] = None if column.endswith("generation") else np.nan
    inputs, references = frame["input"].astype(str).tolist(), frame["output"].astype(str).tolist()

    if generate_text and settings.generate:
        texts = generate(model, tokenizer, inputs, generation, template, desc=f"generate {name}")
        out["generation"] = texts
        for metric, values in _text_scores(texts, references).items():
            out[metric] = values
        if "paraphrased_input" in frame.columns:
            rows = [i for i, v in enumerate(frame["paraphrased_input"]) if _present(v) and str(v).strip()]
            if rows:
                texts = generate(model, tokenizer, [str(frame["paraphrased_input"][i]) for i in rows], generation, template, desc=f"generate {name} (paraphrased)")
                out.loc[rows, "paraphrased_generation"] = pd.Series(texts, index=rows, dtype=object)
                for metric, values in _text_scores(texts, [references[i] for i in rows]).items():
                    out.loc[rows, f"paraphrased_{metric}"] = values

    mia_rows = settings.mia and settings.mia_scope == "answer" and name in (settings.forget_split, HOLDOUT)
    scores = sequence_scores(model, tokenizer, inputs, references, template=template, settings=scoring, desc=f"score {name}",
                             gradnorm=mia_rows and settings.mia_gradnorm, reference=reference if mia_rows else None)
    for column in scores.columns:
        out[column] = scores[column].to_numpy()

    ratios = truth_ratios(model, tokenizer, frame, template=template, settings=scoring, mean=settings.truth_ratio_mean, desc=f"truth ratio {name}")
    out["truth_ratio"] = ratios
    to_score = truth_ratio_forget_score if name == settings.forget_split else truth_ratio_retain_score
    out["truth_ratio_score"] = [np.nan if math.isnan(r) else to_score(r) for r in ratios]
    return out[columns]


PROBE_METRICS = ("accuracy", "probability", "loss", "knowledge", "regurgitation", "rouge_l_recall", "paraphrased_exact_match")


def probe_settings(template: str, max_length: int, max_new_tokens: int, batch_size: int, generate: bool, progress: bool) -> EvalSettings:
    """The evaluation a robustness probe runs on its splits (no MIA, generation optional)."""
    return EvalSettings(
        template=template,
        generation=GenerationSettings(max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress),
        scoring=ScoreSettings(batch_size=batch_size, max_length=max_length, progress=progress),
        generate=generate, mia=False, progress=progress,
    )


def probe_metrics(model, tokenizer, frame: pd.DataFrame, settings: EvalSettings, name: str = "forget") -> dict[str, float | None]:
    """A probe's headline numbers of `model` on one split (`PROBE_METRICS`): teacher-forced answer
    accuracy (pooled over tokens), answer probability and loss, QA exact match (knowledge), ROUGE-L
    recall on completion rows (regurgitation) and on all rows, exact match on paraphrased questions."""
    rows = score_split(model, tokenizer, name, frame, replace(settings, forget_split=name))
    qa, sc = rows[rows["kind"] == "qa"], rows[rows["kind"] != "qa"]

    def mean(values) -> float | None:
        values = pd.to_numeric(values, errors="coerce").dropna()
        return float(values.mean()) if len(values) else None

    return {
        "accuracy": pooled_accuracy(rows),
        "probability": mean(rows["probability"]),
        "loss": mean(rows["loss"]),
        "knowledge": mean(qa["exact_match"]),
        "regurgitation": mean(sc["rouge_l_recall"]),
        "rouge_l_recall": mean(rows["rouge_l_recall"]),
        "paraphrased_exact_match": mean(rows["paraphrased_exact_match"]),
    }


def _progress(settings: EvalSettings) -> tuple[GenerationSettings, ScoreSettings]:
    if settings.progress:
        return settings.generation, settings.scoring
    return replace(settings.generation, progress=False), replace(settings.scoring, progress=False)


# ---------------------------------------------------------------- aggregates


def _mean(values) -> float:
    values = pd.to_numeric(pd.Series(values), errors="coerce").dropna()
    return float(values.mean()) if len(values) else float("nan")


def split_aggregates(per_example: pd.DataFrame, name: str) -> dict[str, float]:
    """Means of one split's per-example columns, overall and (regurgitation, knowledge) per task."""
    rows = per_example[per_example["split"] == name]
    sc, qa = rows[rows["kind"] != "qa"], rows[rows["kind"] == "qa"]
    result = {
        f"{name}/n": float(len(rows)),
        f"{name}/regurgitation": _mean(sc["rouge_l_recall"]),
        f"{name}/knowledge": _mean(qa["exact_match"]),
    }
    metric_columns = [c for name in TEXT_METRICS for c in (name, f"paraphrased_{name}")]
    for column in [*metric_columns, *TOKEN_METRICS, "probability", "loss", "truth_ratio", "truth_ratio_score"]:
        result[f"{name}/{column}"] = _mean(rows[column])
    result[f"{name}/accuracy"] = pooled_accuracy(rows)
    for task in sorted(rows["task"].unique()):
        in_task = rows["task"] == task
        result[f"{name}/{task}/regurgitation"] = _mean(sc.loc[in_task[sc.index], "rouge_l_recall"])
        result[f"{name}/{task}/knowledge"] = _mean(qa.loc[in_task[qa.index], "exact_match"])
    return result


def _task_values(metrics: Mapping[str, float], per_example: pd.DataFrame, settings: EvalSettings) -> dict[tuple[str, str, str], float]:
    values = {}
    for side, name in (("forget", settings.forget_split), ("retain", settings.retain_split)):
        for task in sorted(per_example.loc[per_example["split"] == name, "task"].unique()):
            for metric in ("regurgitation", "knowledge"):
                values[(side, task, metric)] = metrics[f"{name}/{task}/{metric}"]
    return values


def _oracle_ratios(oracle, tokenizer, forget: pd.DataFrame, settings: EvalSettings) -> np.ndarray:
    if isinstance(oracle, pd.DataFrame):
        if "truth_ratio" not in oracle.columns:
            raise UserError("the oracle table has no 'truth_ratio' column: give the oracle's per_example.parquet")
        rows = oracle[oracle["split"] == settings.forget_split] if "split" in oracle.columns else oracle
        return pd.to_numeric(rows["truth_ratio"], errors="coerce").to_numpy(dtype=float)
    if hasattr(oracle, "forward") and callable(oracle):
        scoring = _progress(settings)[1]
        return truth_ratios(oracle, tokenizer, forget, template=Template(settings.template), settings=scoring, mean=settings.truth_ratio_mean, desc="truth ratio oracle")
    return np.asarray(list(oracle), dtype=float)


def _json_ready(value):
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if math.isnan(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def evaluate(
    model,
    tokenizer,
    splits: Mapping[str, pd.DataFrame],
    *,
    holdout: pd.DataFrame | None = None,
    mmlu: pd.DataFrame | str | Path | None = None,
    oracle=None,
    settings: EvalSettings = EvalSettings(),
    mmlu_dev: pd.DataFrame | str | Path | None = None,
    reference=None,
) -> tuple[dict, pd.DataFrame]:
    """Evaluate `model` on `splits` (name -> table with input/output); return (metrics, per-example table).

    holdout: non-member rows for MIA (required when `settings.mia`). mmlu: a local MMLU-layout
    file or a table from `analysis.mmlu.read_mmlu`; mmlu_dev: more few-shot rows for
    `settings.mmlu.mode == "kshot"` (MMLU's dev split). oracle: for TOFU forget quality, a
    retain-only model, its per-example table, or its forget truth ratios. reference: a model
    (same tokenizer) for the reference MIA, e.g. the retain-only oracle or the base; without
    one that attack is skipped (`mia/reference/skipped`).
    Metrics: `{split}/…` means, `{split}/{task}/regurgitation|knowledge`, `task_aggregate`,
    `mia/{attack}/auc|score` (or `mia/{attack}/skipped`), `mia_score`, `mmlu/accuracy…`, `forget_quality`,
    `model_utility`, `final_score` (+ `final_score_components`), and `settings`.
    """
    if not splits:
        raise UserError("nothing to evaluate: give at least one split")
    if HOLDOUT in splits and holdout is not None:
        raise UserError("a holdout was given twice: as a split named 'holdout' and as --holdout; give it once")
    if holdout is None and HOLDOUT in splits:
        holdout = splits[HOLDOUT]
    if settings.mia:
        if holdout is None:
            raise UserError("membership inference needs a holdout split of non-members (--holdout FILE), or turn MIA off (--no-mia)")
        if settings.forget_split not in splits:
            raise UserError(f"membership inference needs a {settings.forget_split!r} split (the members); got splits: {', '.join(splits)}")
        if settings.mia_attack == "reference" and reference is None:
            raise UserError("the final score's MIA attack is reference, which needs a reference model: give --reference-model PATH or pick another --mia-attack")
    elif reference is not None:
        raise UserError("a reference model is for membership inference: give a holdout (--holdout FILE) or drop the reference model")

    if oracle is not None and ("perturbed_outputs" not in splits.get(settings.forget_split, pd.DataFrame()).columns):
        raise UserError(f"forget quality needs a {settings.forget_split!r} split with a 'perturbed_outputs' column (TOFU-style rows)")

    frames = [score_split(model, tokenizer, name, frame, settings, reference=reference) for name, frame in splits.items()]
    if holdout is not None and HOLDOUT not in splits:
        frames.append(score_split(model, tokenizer, HOLDOUT, holdout, settings, generate_text=False, reference=reference))
    per_example = pd.concat(frames, ignore_index=True)

    metrics: dict = {}
    for name in per_example["split"].unique():
        metrics.update(split_aggregates(per_example, name))
    aggregate = task_aggregate(_task_values(metrics, per_example, settings)) if settings.generate else float("nan")
    metrics["task_aggregate"] = aggregate

    mia_value = None
    if settings.mia:
        members = per_example[per_example["split"] == settings.forget_split]
        nonmembers = per_example[per_example["split"] == HOLDOUT]
        if settings.mia_scope == "document":
            members, nonmembers = (document_scores(model, tokenizer, frame, settings, name, reference=reference) for name, frame in
                                   ((settings.forget_split, splits[settings.forget_split]), (HOLDOUT, holdout)))
            extra = [attack.column for attack in EXTRA_MIA_ATTACKS.values() if attack.column in members.columns]
            for column in [*DOCUMENT_COLUMNS, *extra]:
                per_example[f"document_{column}"] = np.nan
                for name, scores in ((settings.forget_split, members), (HOLDOUT, nonmembers)):
                    per_example.loc[per_example["split"] == name, f"document_{column}"] = scores[column].to_numpy()
        skipped = {"gradnorm": None if settings.mia_gradnorm else "turned off (mia_gradnorm=False, --no-mia-gradnorm)",
                   "reference": None if reference is not None else "no reference model given (--reference-model PATH)"}
        attacks = [*MIA_ATTACKS, *(attack for attack, reason in skipped.items() if reason is None)]
        for attack, result in mia_results(members, nonmembers, attacks).items():
            metrics[f"mia/{attack}/auc"] = result["auc"]
            metrics[f"mia/{attack}/score"] = result["score"]
        for attack, reason in skipped.items():
            if reason is not None:
                metrics[f"mia/{attack}/skipped"] = reason
        mia_value = metrics[f"mia/{settings.mia_attack}/score"]
        metrics["mia_auc"] = metrics[f"mia/{settings.mia_attack}/auc"]
        metrics["mia_score"] = mia_value

    mmlu_value = None
    if mmlu is not None:
        result = mmlu_accuracy(model, tokenizer, mmlu, replace(settings.mmlu, progress=settings.mmlu.progress and settings.progress), dev=mmlu_dev)
        mmlu_value = result.accuracy
        metrics["mmlu/accuracy"] = result.accuracy
        metrics["mmlu/accuracy_macro"] = result.accuracy_macro
        metrics["mmlu/n"] = float(len(result.per_question))
        for subject, value in result.per_subject.items():
            metrics[f"mmlu/subject/{subject}"] = value
        rows = result.per_question
        mc = pd.DataFrame({"id": [f"mmlu-{i}" for i in range(len(rows))], "split": "mmlu", "task": rows["subject"].astype(str), "kind": "mc"})
        columns = per_example_columns()
        for column in columns[4:]:
            mc[column] = None if column.endswith("generation") else np.nan
        mc["mc_correct"] = rows["correct"].to_numpy()
        per_example = pd.concat([per_example, mc[columns]], ignore_index=True)

    if oracle is not None:
        forget_rows = per_example[per_example["split"] == settings.forget_split]["truth_ratio"].to_numpy(dtype=float)
        if settings.forget_split not in splits or np.isnan(forget_rows).all():
            raise UserError(f"forget quality needs a {settings.forget_split!r} split with a 'perturbed_outputs' column (TOFU-style rows)")
        metrics["forget_quality"] = forget_quality(forget_rows, _oracle_ratios(oracle, tokenizer, splits[settings.forget_split], settings))

    if settings.retain_split in splits:
        retain = per_example[per_example["split"] == settings.retain_split]
        metrics["model_utility"] = model_utility(_mean(retain["probability"]), _mean(retain["rouge_l_recall"]), _mean(retain["truth_ratio_score"]))

    components = {"task_aggregate": aggregate, "mia_score": mia_value, "mmlu_accuracy": mmlu_value}
    present = {k: v for k, v in components.items() if v is not None and not math.isnan(v)}
    metrics["final_score"] = final_score(aggregate, mia_value, mmlu_value)
    metrics["final_score_components"] = sorted(present)
    metrics["settings"] = asdict(settings)
    return _json_ready(metrics), per_example


def document_scores(model, tokenizer, frame: pd.DataFrame, settings: EvalSettings, name: str = "split", *, reference=None) -> pd.DataFrame:
    """Document-scope likelihood scores of each row of `frame` (`sequence_scores(scope="document")`),
    with the gradient norm when `settings.mia_gradnorm` and the loss against `reference` when
    given. Under torchrun each process scores every world-size-th row, as `score_split`."""
    _check_split(name, frame)

    def score(rows: pd.DataFrame) -> pd.DataFrame:
        return sequence_scores(model, tokenizer, rows["input"].astype(str).tolist(), rows["output"].astype(str).tolist(),
                               template=Template(settings.template), settings=_progress(settings)[1], scope="document", desc=f"document {name}",
                               gradnorm=settings.mia_gradnorm, reference=reference)

    frame = frame.reset_index(drop=True)
    return score(frame) if len(frame) < world_size() else gather_frame(score(shard_frame(frame)), len(frame))


def semeval_tables(splits: Mapping[str, pd.DataFrame], per_example: pd.DataFrame, settings: EvalSettings = EvalSettings()) -> dict[str, pd.DataFrame]:
    """The forget and retain generations in the official SemEval scorer's layout: {file name: table}.

    `forget_0.csv` and `retain_0.csv` (of those of the two splits present), columns
    `SEMEVAL_COLUMNS`: one row per row of the split, `input` and `expected_output` its `input`
    and `output`, `model_output` the greedy generation (per_example's `generation`).
    """
    if not settings.generate:
        raise UserError("the SemEval output files hold generations: drop --no-generate to write them")
    tables = {}
    for side, name in (("forget", settings.forget_split), ("retain", settings.retain_split)):
        if name not in splits:
            continue
        frame = splits[name].reset_index(drop=True)
        rows = per_example[per_example["split"] == name].reset_index(drop=True)
        if len(rows) != len(frame):
            raise ValueError(f"per_example has {len(rows)} rows of split {name!r}, the split has {len(frame)}")
        tables[f"{side}_0.csv"] = pd.DataFrame({
            "id": rows["id"].astype(str), "task": rows["task"].astype(str), "input": frame["input"].astype(str),
            "expected_output": frame["output"].astype(str), "model_output": rows["generation"].fillna("").astype(str),
        })[list(SEMEVAL_COLUMNS)]
    if not tables:
        raise UserError(f"the SemEval output files need a {settings.forget_split!r} or {settings.retain_split!r} split")
    return tables


def write_semeval(out_dir: str | Path, tables: Mapping[str, pd.DataFrame]) -> list[Path]:
    """Write each `semeval_tables` table as CSV into `out_dir`, each atomically (soir.io.atomic_path)."""
    written = []
    for name, table in tables.items():
        with atomic_path(Path(out_dir) / name) as tmp:
            table.to_csv(tmp, index=False)
        written.append(Path(out_dir) / name)
    return written


def write_evaluation(out_dir: str | Path, metrics: Mapping, per_example: pd.DataFrame) -> None:
    """Write `metrics.json` and `per_example.parquet` into `out_dir`, each atomically (soir.io)."""
    out_dir = Path(out_dir)
    write_json(out_dir / "metrics.json", _json_ready(dict(metrics)))
    write_parquet(out_dir / "per_example.parquet", per_example)
