"""MMLU-style multiple-choice accuracy from a local file (docs/design.md §8), in two modes.

Layouts read (parquet, JSON Lines or CSV):
- the Hugging Face layout: `question`, `choices` (a list; a JSON/Python list string in CSV),
  `answer` (an index, or a letter), optional `subject`;
- the A-D layout: `question`, `A`, `B`, `C`, `D` (E.. optional), `answer` (a letter or an index),
  optional `subject`; the original headerless MMLU CSVs (question, A, B, C, D, answer) too,
  with the subject taken from the file name (`abstract_algebra_test.csv` -> abstract_algebra).
An optional `split` column marks few-shot rows: rows whose split is `dev` (or `few_shot`) are
the solved examples of `kshot` mode and are never scored; a separate dev file can be given too
(`mmlu_accuracy(..., dev=FILE)`, `soir evaluate --mmlu-dev`). Without a `subject` column every row
has the subject `all`; an empty subject cell where other rows have one is an error (its row
would land in no subject's shots or accuracy).

`loglik` mode (the default of `MMLUSettings`): the prompt is `prompt.format(question=...)`
(default "{question}\\nAnswer:") and each option is the continuation `choice.format(choice=...)`
(default " {choice}"); prompt and option are tokenized separately (prompt with special tokens,
option without, as `soir.data.encode` does) and the option's score is the sum of its tokens'
log-probs. The prediction is the highest-scoring option (the first on a tie).

`kshot` mode is MMLU as the SemEval-2025 Task 4 scorer runs it (open-instruct's
`eval/mmlu/run_eval.py` with its defaults, `--ntrain 5`): the prompt is the header "The
following are multiple choice questions (with answers) about  {subject}.\\n\\n" (underscores
as spaces; the double space is open-instruct's, whose `format_subject` puts a space before
every word), then `shots` solved examples "{question}\\nA. {choice}\\nB. ...\\nAnswer: {letter}\\n\\n"
of the same subject (its first dev rows; for a subject without dev rows, the first other
questions of the subject, never the question itself), then the question in the same format
ending "Answer:". A prompt longer than `kshot_max_tokens` tokens drops shots from the end, as
open-instruct does at 2048. The prediction is the argmax of the next-token logits over the
tokens of " A", " B", … (as many letters as the question has choices; see `letter_token_ids`).

Accuracy is reported over all scored questions (`accuracy`, the micro average open-instruct
reports), per subject, and as the mean over subjects (`accuracy_macro`).
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from soir.data import IGNORE_INDEX, collate, list_cell, pad_id, token_nll
from soir.errors import UserError
from soir.runtime import device_of, eval_mode, lm_logits, to_device, tqdm
from soir.settings import check_fields, setting

LETTERS = "ABCDEFGHIJ"
MODES = ("loglik", "kshot")
DEV_SPLITS = ("dev", "few_shot", "fewshot", "few-shot")  # `split` values that mark few-shot rows
NO_SUBJECT = "all"


@dataclass(frozen=True)
class MMLUSettings:
    """How multiple-choice questions are scored (the module docstring describes both modes).

    mode: `loglik` (option log-likelihood after `prompt`) or `kshot` (open-instruct's k-shot
    prompt, argmax over the answer-letter tokens). shots: k of `kshot`. prompt, choice: the
    question and option formats of `loglik`. batch_size: sequences per forward pass.
    max_length: tokens per `loglik` sequence (longer ones lose prompt tokens from the left).
    kshot_max_tokens: a `kshot` prompt longer than this drops shots (open-instruct: 2048).
    """

    mode: str = setting("loglik", "MMLU scoring: loglik (highest option log-likelihood after the prompt) or kshot (open-instruct's k-shot prompt, argmax over the answer letters, as the SemEval scorer)", choices=MODES)
    shots: int = setting(5, "solved examples of the same subject before each question in kshot mode", minimum=0)
    prompt: str = "{question}\nAnswer:"
    choice: str = " {choice}"
    batch_size: int = setting(16, "sequences per forward pass", minimum=1)
    max_length: int = 512
    kshot_max_tokens: int = 2048
    progress: bool = True

    def __post_init__(self):
        check_fields(self, prefix="mmlu")


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


def _missing(value) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def _subjects(frame: pd.DataFrame, path: Path) -> list[str]:
    """Each row's subject: `all` without a subject column (or with one that is empty throughout),
    else the cell; an empty cell where other rows have a subject is a UserError naming the row."""
    if "subject" not in frame.columns:
        return [NO_SUBJECT] * len(frame)
    missing = [_missing(v) for v in frame["subject"]]
    if all(missing):
        return [NO_SUBJECT] * len(frame)
    if any(missing):
        row = missing.index(True)
        raise UserError(f"MMLU file {path}: row {row} has no subject while other rows have one: give every row its subject, or drop the 'subject' column to score all rows as one subject")
    return [str(v).strip() for v in frame["subject"]]


def read_mmlu(path: str | Path) -> pd.DataFrame:
    """Read a local MMLU-layout file into columns `question`, `subject`, `choices` (list), `answer`
    (index) and `split` (the file's `split` column, else `test`; `DEV_SPLITS` rows are few-shot rows)."""
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
    subjects = _subjects(frame, path)
    splits = ["test" if _missing(v) else str(v).strip() for v in frame["split"]] if "split" in frame.columns else ["test"] * len(frame)
    return pd.DataFrame({"question": frame["question"].astype(str).tolist(), "subject": subjects, "choices": choices, "answer": answers, "split": splits})


def _is_dev(questions: pd.DataFrame) -> np.ndarray:
    if "split" not in questions.columns:
        return np.zeros(len(questions), dtype=bool)
    return questions["split"].astype(str).str.strip().str.lower().isin(DEV_SPLITS).to_numpy()


def split_dev(questions: pd.DataFrame, dev: pd.DataFrame | str | Path | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(questions to score, few-shot pool): the pool is the rows marked dev plus every row of `dev`."""
    if dev is not None and not isinstance(dev, pd.DataFrame):
        dev = read_mmlu(dev)
    marked = _is_dev(questions)
    scored = questions[~marked].reset_index(drop=True)
    pool = pd.concat([questions[marked], dev] if dev is not None else [questions[marked]], ignore_index=True)
    if len(scored) == 0:
        raise UserError("the MMLU file has only few-shot (dev) rows and no questions to score: give the test split (dev rows as --mmlu-dev)")
    return scored, pool


# ---------------------------------------------------------------- k-shot (open-instruct)


def format_subject(subject: str) -> str:
    """open-instruct's `format_subject`: every underscore-separated word with a space before it."""
    return "".join(" " + word for word in str(subject).split("_"))


def format_example(question: str, choices, answer: int | None = None) -> str:
    """`{question}\\nA. {choice}\\nB. …\\nAnswer:`, and ` {letter}\\n\\n` after it for a solved example."""
    if len(choices) > len(LETTERS):
        raise UserError(f"an MMLU question has {len(choices)} choices; at most {len(LETTERS)} (A-{LETTERS[-1]}) are supported")
    text = str(question) + "".join(f"\n{LETTERS[j]}. {c}" for j, c in enumerate(choices)) + "\nAnswer:"
    return text + f" {LETTERS[int(answer)]}\n\n" if answer is not None else text


def kshot_header(subject: str) -> str:
    """The k-shot prompt's first line, exactly as open-instruct writes it (note its double space)."""
    return f"The following are multiple choice questions (with answers) about {format_subject(subject)}.\n\n"


def few_shot_rows(questions: pd.DataFrame, pool: pd.DataFrame, k: int) -> list[list[int]]:
    """For each question, the rows of its (at most) `k` solved examples, in order.

    Entries >= 0 index `pool` (the subject's first k dev rows); entries < 0 are -1 - j for row j
    of `questions` (a subject without dev rows: its first k other questions, never itself).
    """
    by_subject_pool: dict[str, list[int]] = {}
    for j, subject in enumerate(pool["subject"].astype(str)):
        by_subject_pool.setdefault(subject, []).append(j)
    by_subject: dict[str, list[int]] = {}
    for j, subject in enumerate(questions["subject"].astype(str)):
        by_subject.setdefault(subject, []).append(j)
    rows = []
    for i, subject in enumerate(questions["subject"].astype(str)):
        if subject in by_subject_pool:
            rows.append(by_subject_pool[subject][:k])
        else:
            rows.append([-1 - j for j in by_subject[subject] if j != i][:k])
    return rows


def kshot_prompts(questions: pd.DataFrame, pool: pd.DataFrame | None = None, settings: MMLUSettings = MMLUSettings(), tokenizer=None) -> tuple[list[str], list[int]]:
    """The k-shot prompt of every question and the number of shots it kept.

    With a tokenizer, a prompt longer than `settings.kshot_max_tokens` tokens (counted without
    special tokens, as open-instruct counts) drops shots from the end until it fits, with one
    warning giving the count.
    """
    pool = pool if pool is not None else questions.iloc[:0]
    shots = few_shot_rows(questions, pool, settings.shots)
    prompts, kept, shortened = [], [], 0
    for i, row in enumerate(questions.itertuples(index=False)):
        examples = []
        for j in shots[i]:
            source = pool.iloc[j] if j >= 0 else questions.iloc[-1 - j]
            examples.append(format_example(source["question"], source["choices"], source["answer"]))
        end = format_example(row.question, row.choices)
        k = len(examples)
        prompt = kshot_header(row.subject) + "".join(examples[:k]) + end
        if tokenizer is not None:
            while k > 0 and len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) > settings.kshot_max_tokens:
                k -= 1
                prompt = kshot_header(row.subject) + "".join(examples[:k]) + end
            shortened += k < len(examples)
        prompts.append(prompt)
        kept.append(k)
    if shortened:
        warnings.warn(f"{shortened} MMLU k-shot prompts were longer than {settings.kshot_max_tokens} tokens and dropped shots (as open-instruct)")
    return prompts, kept


def letter_token_ids(tokenizer, n: int) -> list[int]:
    """The token id scored for each of the first `n` answer letters: the LAST token of " A", " B", ….

    This is open-instruct's choice (`tokenizer.encode(" " + letter, add_special_tokens=False)[-1]`).
    A tokenizer that cannot make " A" as one token splits off the space (byte-level BPE without
    the merge: "Ġ" + "A"; SentencePiece: "▁" + "A"): the first token is then the same for every
    letter and its argmax would mean nothing, so the letter's own (last) token is scored, with a
    warning. Letters whose scored tokens coincide cannot be told apart: a UserError.
    """
    if n > len(LETTERS):
        raise UserError(f"an MMLU question has {n} choices; at most {len(LETTERS)} (A-{LETTERS[-1]}) are supported")
    ids, split = [], []
    for letter in LETTERS[:n]:
        tokens = tokenizer(" " + letter, add_special_tokens=False)["input_ids"]
        if not tokens:
            raise UserError(f"the tokenizer makes no token of {' ' + letter!r}: it cannot score MMLU answer letters (use --mmlu-mode loglik)")
        if len(tokens) > 1:
            split.append(letter)
        ids.append(int(tokens[-1]))
    if len(set(ids)) < len(ids):
        raise UserError(f"the tokenizer gives answer letters {', '.join(LETTERS[:n])} the same last token: k-shot MMLU cannot tell them apart (use --mmlu-mode loglik)")
    if split:
        warnings.warn(f"the tokenizer makes ' {split[0]}' (and {len(split) - 1} other answer letters) from several tokens; scoring the last token of each, as open-instruct does")
    return ids


def letter_scores(model, tokenizer, prompts: list[str], n_choices: list[int], settings: MMLUSettings = MMLUSettings()) -> list[np.ndarray]:
    """Next-token log-probs of the answer-letter tokens after each prompt, one array per prompt.

    Prompts are tokenized with special tokens (open-instruct's default), right-padded, and the
    logits are read at each row's last real token, so padding changes nothing.
    """
    letters = letter_token_ids(tokenizer, max(n_choices)) if prompts else []
    ids = tokenizer(prompts, add_special_tokens=True)["input_ids"] if prompts else []
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    device = device_of(model)
    pad = pad_id(tokenizer)
    scores: list[np.ndarray] = [np.zeros(0)] * len(prompts)
    with eval_mode(model, no_grad=True):
        for start in tqdm(range(0, len(order), settings.batch_size), desc="mmlu", disable=not settings.progress, leave=False):
            rows = order[start : start + settings.batch_size]
            batch = to_device(collate([ids[i] for i in rows], None, pad), device)
            logits = lm_logits(model, batch)
            last = batch["attention_mask"].sum(1) - 1
            final = logits[torch.arange(len(rows), device=logits.device), last]
            work = torch.float64 if final.dtype == torch.float64 else torch.float32
            logp = torch.log_softmax(final.to(work), dim=-1)[:, letters].cpu().double().numpy()
            for r, i in enumerate(rows):
                scores[i] = logp[r, : n_choices[i]]
    return scores


# ---------------------------------------------------------------- option log-likelihood


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


def mmlu_accuracy(model, tokenizer, questions: pd.DataFrame | str | Path, settings: MMLUSettings = MMLUSettings(), dev: pd.DataFrame | str | Path | None = None) -> MMLUResult:
    """Multiple-choice accuracy (in `settings.mode`), overall, per subject and over subjects.

    `questions`: a file (`read_mmlu`) or its table; rows marked dev are few-shot rows, not
    scored. `dev`: more few-shot rows (a file or table, e.g. MMLU's dev split). The
    per-question table has subject, answer, prediction, scores (per option: summed
    log-likelihood in `loglik`, letter log-prob in `kshot`), shots (`kshot`: examples kept) and correct.
    """
    if not isinstance(questions, pd.DataFrame):
        questions = read_mmlu(questions)
    questions, pool = split_dev(questions, dev)
    if settings.mode == "kshot":
        prompts, shots = kshot_prompts(questions, pool, settings, tokenizer)
        scores = letter_scores(model, tokenizer, prompts, [len(c) for c in questions["choices"]], settings)
    else:
        scores, shots = option_scores(model, tokenizer, questions, settings), [0] * len(questions)
    predictions = [int(np.argmax(s)) for s in scores]
    table = pd.DataFrame(
        {
            "subject": questions["subject"].tolist(),
            "answer": questions["answer"].astype(int).tolist(),
            "prediction": predictions,
            "scores": [s.tolist() for s in scores],
            "shots": shots,
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
