"""MMLU-style multiple-choice accuracy from a local file (docs/design.md §8), by option likelihood.

Layouts read (parquet, JSON Lines or CSV):
- the Hugging Face layout: `question`, `choices` (a list; a JSON/Python list string in CSV),
  `answer` (an index, or a letter), optional `subject`;
- the A-D layout: `question`, `A`, `B`, `C`, `D` (E.. optional), `answer` (a letter or an index),
  optional `subject`; the original headerless MMLU CSVs (question, A, B, C, D, answer) too,
  with the subject taken from the file name (`abstract_algebra_test.csv` -> abstract_algebra).

Scoring: the prompt is `prompt.format(question=...)` (default "{question}\\nAnswer:") and each
option is the continuation `choice.format(choice=...)` (default " {choice}"); prompt and
option are tokenized separately (prompt with special tokens, option without, as
`soir.data.encode` does) and the option's score is the sum of its tokens' log-probs. The
prediction is the highest-scoring option (the first on a tie). Accuracy is reported over all
questions (`accuracy`), per subject, and as the mean over subjects (`accuracy_macro`).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from soir.data import IGNORE_INDEX, collate, list_cell, pad_id, token_nll
from soir.errors import UserError
from soir.runtime import device_of, eval_mode, lm_logits, to_device

LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class MMLUSettings:
    """Prompt format and batching of multiple-choice scoring."""

    prompt: str = "{question}\nAnswer:"
    choice: str = " {choice}"
    batch_size: int = 16
    max_length: int = 512
    progress: bool = True


@dataclass
class MMLUResult:
    """Overall (micro) accuracy, mean over subjects, per-subject accuracy and per-question table."""

    accuracy: float
    accuracy_macro: float
    per_subject: dict[str, float]
    per_question: pd.DataFrame


def _subject_from_name(path: Path) -> str:
    return re.sub(r"_(test|dev|val|validation|train|auxiliary_train)$", "", path.stem)


def _read_table(path: Path) -> pd.DataFrame:
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            return pd.read_parquet(path)
        if suffix in (".jsonl", ".json"):
            return pd.read_json(path, lines=suffix == ".jsonl")
        if suffix == ".csv":
            frame = pd.read_csv(path, keep_default_na=False)
            if "question" not in frame.columns and len(frame.columns) == 6:  # original headerless MMLU CSV
                frame = pd.read_csv(path, header=None, names=["question", "A", "B", "C", "D", "answer"], keep_default_na=False)
                frame["subject"] = _subject_from_name(path)
            return frame
    except Exception as exc:
        raise UserError(f"cannot read MMLU file {path}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    raise UserError(f"cannot read MMLU file {path}: use a .parquet, .jsonl or .csv file")


def _parse_choices(value, path: Path, row: int) -> list[str]:
    choices = list_cell(value)
    if not isinstance(choices, list) or len(choices) == 0:
        raise UserError(f"{path}: row {row}: `choices` must be a non-empty list, got {str(value)[:60]!r}")
    return [str(x) for x in choices]


def _parse_answer(value, n_choices: int, path: Path, row: int) -> int:
    index = None
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        index = int(value)
    elif isinstance(value, (float, np.floating)) and float(value).is_integer():
        index = int(value)
    elif isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"-?\d+", text):
            index = int(text)
        elif len(text) == 1 and text.upper() in LETTERS:
            index = LETTERS.index(text.upper())
    if index is None:
        raise UserError(f"{path}: row {row}: answer {value!r} is neither an option index nor a letter A-{LETTERS[n_choices - 1]}")
    if not 0 <= index < n_choices:
        raise UserError(f"MMLU file {path}: row {row}: answer {value!r} is out of range for {n_choices} choices (give an option index 0-{n_choices - 1} or a letter A-{LETTERS[n_choices - 1]})")
    return index


def read_mmlu(path: str | Path) -> pd.DataFrame:
    """Read a local MMLU-layout file into columns `question`, `subject`, `choices` (list), `answer` (index)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"MMLU file not found: {path} (give a local .parquet/.jsonl/.csv with question, choices, answer)")
    frame = _read_table(path)
    if len(frame) == 0:
        raise UserError(f"MMLU file {path} has no rows")
    have = ", ".join(map(str, frame.columns))
    for column in ("question", "answer"):
        if column not in frame.columns:
            raise UserError(f"MMLU file {path} has no {column!r} column; it has: {have}")
    if "choices" in frame.columns:
        choices = [_parse_choices(v, path, i) for i, v in enumerate(frame["choices"])]
    elif all(letter in frame.columns for letter in "ABCD"):
        letters = [x for x in LETTERS if x in frame.columns]
        letters = letters[: next((i for i, x in enumerate(letters) if x != LETTERS[i]), len(letters))]
        choices = [[str(row[x]) for x in letters] for _, row in frame.iterrows()]
    else:
        raise UserError(f"MMLU file {path} has neither a 'choices' column nor A, B, C, D columns; it has: {have}")
    answers = [_parse_answer(v, len(c), path, i) for i, (v, c) in enumerate(zip(frame["answer"], choices))]
    subjects = frame["subject"].astype(str).tolist() if "subject" in frame.columns else ["all"] * len(frame)
    return pd.DataFrame({"question": frame["question"].astype(str).tolist(), "subject": subjects, "choices": choices, "answer": answers})


def option_scores(model, tokenizer, questions: pd.DataFrame, settings: MMLUSettings = MMLUSettings()) -> list[np.ndarray]:
    """Sum log-prob of each option's tokens after the question prompt, one array per question."""
    pairs: list[tuple[int, list[int], list[int]]] = []
    prompts = [settings.prompt.format(question=q) for q in questions["question"]]
    prompt_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"] if prompts else []
    truncated = 0
    for q, (ids, choices) in enumerate(zip(prompt_ids, questions["choices"])):
        texts = [settings.choice.format(choice=c) for c in choices]
        for option in tokenizer(texts, add_special_tokens=False)["input_ids"]:
            option = list(option)[: settings.max_length - 1]
            prompt = list(ids)
            if len(prompt) + len(option) > settings.max_length:
                truncated += 1
                prompt = prompt[len(prompt) - (settings.max_length - len(option)) :]
            pairs.append((q, prompt, option))
    if truncated:
        warnings.warn(f"{truncated} MMLU question-option pairs were longer than {settings.max_length} tokens and lost prompt tokens from the left")
    device = device_of(model)
    pad = pad_id(tokenizer)
    totals: list[float] = []
    with eval_mode(model, no_grad=True):
        for start in tqdm(range(0, len(pairs), settings.batch_size), desc="mmlu", disable=not settings.progress, leave=False):
            chunk = pairs[start : start + settings.batch_size]
            ids = [p + o for _, p, o in chunk]
            labels = [[IGNORE_INDEX] * len(p) + o for _, p, o in chunk]
            batch = to_device(collate(ids, labels, pad), device)
            logits = lm_logits(model, batch)
            nll, _ = token_nll(logits, batch["labels"])
            totals.extend((-nll.double().sum(1)).tolist())
    scores: list[list[float]] = [[] for _ in range(len(questions))]
    for (q, _, _), total in zip(pairs, totals):
        scores[q].append(total)
    return [np.asarray(s) for s in scores]


def mmlu_accuracy(model, tokenizer, questions: pd.DataFrame | str | Path, settings: MMLUSettings = MMLUSettings()) -> MMLUResult:
    """Multiple-choice accuracy by highest option likelihood, overall and per subject."""
    if not isinstance(questions, pd.DataFrame):
        questions = read_mmlu(questions)
    scores = option_scores(model, tokenizer, questions, settings)
    predictions = [int(np.argmax(s)) for s in scores]
    table = pd.DataFrame(
        {
            "subject": questions["subject"].tolist(),
            "answer": questions["answer"].astype(int).tolist(),
            "prediction": predictions,
            "scores": [s.tolist() for s in scores],
        }
    )
    table["correct"] = (table["prediction"] == table["answer"]).astype(float)
    per_subject = {str(k): float(v) for k, v in table.groupby("subject", sort=True)["correct"].mean().items()}
    return MMLUResult(
        accuracy=float(table["correct"].mean()),
        accuracy_macro=float(np.mean(list(per_subject.values()))),
        per_subject=per_subject,
        per_question=table,
    )
