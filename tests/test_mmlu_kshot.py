"""MMLU as the SemEval scorer runs it (open-instruct's k-shot prompt, argmax over the answer letters)."""

from __future__ import annotations

import json
import re
import warnings
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from analysis.mmlu import (
    MMLUSettings,
    kshot_prompts,
    letter_scores,
    letter_token_ids,
    mmlu_accuracy,
    read_mmlu,
    split_dev,
)
from soir.errors import UserError
from soir.models import save_model
from soir.tokenizer import train_tokenizer
from soirlab.cli import main

QUIET = MMLUSettings(mode="kshot", shots=2, progress=False, batch_size=3)


def _rows() -> pd.DataFrame:
    """Two subjects; algebra has two dev rows (the shots) and three test questions, biology one
    test question and no dev rows. Question texts differ in length so the prompts do."""
    return pd.DataFrame({
        "question": ["What is 1+1?", "What is 2+2?", "What is 3+3?", "Solve x+1=3 for x, then double it.", "What is 7-7?", "What colour is grass?"],
        "subject": ["abstract_algebra"] * 5 + ["high_school_biology"],
        "choices": [["1", "2", "3", "4"], ["4", "5", "6", "7"], ["6", "7", "8", "9"], ["2", "3", "4", "5"], ["0", "1", "7", "14"], ["blue", "green", "red"]],
        "answer": [1, 0, 0, 0, 0, 1],
        "split": ["dev", "dev", "test", "test", "test", "test"],
    })


def test_kshot_prompt_is_open_instructs_layout():
    questions, pool = split_dev(_rows())
    assert list(questions["question"]) == ["What is 3+3?", "Solve x+1=3 for x, then double it.", "What is 7-7?", "What colour is grass?"]
    prompts, kept = kshot_prompts(questions, pool, MMLUSettings(mode="kshot", shots=2))
    # the header as open-instruct writes it (its format_subject puts a space before every word:
    # hence "about  abstract algebra"), the subject's two dev rows solved, then the question
    assert prompts[0] == (
        "The following are multiple choice questions (with answers) about  abstract algebra.\n\n"
        "What is 1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
        "What is 2+2?\nA. 4\nB. 5\nC. 6\nD. 7\nAnswer: A\n\n"
        "What is 3+3?\nA. 6\nB. 7\nC. 8\nD. 9\nAnswer:"
    )
    assert kept == [2, 2, 2, 0]  # biology has no dev rows and no other question: no shots
    assert prompts[3] == "The following are multiple choice questions (with answers) about  high school biology.\n\nWhat colour is grass?\nA. blue\nB. green\nC. red\nAnswer:"

    # no dev split in the file: the first k OTHER questions of the subject, never the question itself
    no_dev = _rows().drop(columns="split")
    questions, pool = split_dev(no_dev)
    assert len(pool) == 0 and len(questions) == 6
    prompts, kept = kshot_prompts(questions, pool, MMLUSettings(mode="kshot", shots=2))
    assert prompts[0] == (
        "The following are multiple choice questions (with answers) about  abstract algebra.\n\n"
        "What is 2+2?\nA. 4\nB. 5\nC. 6\nD. 7\nAnswer: A\n\n"
        "What is 3+3?\nA. 6\nB. 7\nC. 8\nD. 9\nAnswer: A\n\n"
        "What is 1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:"
    )
    assert "What is 3+3?\nA. 6" not in prompts[2].split("\n\n", 1)[1].rsplit("\n\n", 1)[0]  # question 2 is not its own shot
    assert prompts[2].count("Answer: ") == 2 and prompts[2].startswith(prompts[0].split("\n\n")[0])
    assert kept == [2, 2, 2, 2, 2, 0]

    # a missing subject column: every row is subject "all" (and k = 5 by default)
    prompts, kept = kshot_prompts(*split_dev(no_dev.drop(columns="subject").assign(subject="all")), MMLUSettings(mode="kshot"))
    assert prompts[0].startswith("The following are multiple choice questions (with answers) about  all.\n\n") and kept == [5] * 6


def test_long_prompts_drop_shots_from_the_end(tokenizer):
    questions, pool = split_dev(_rows())
    full, _ = kshot_prompts(questions, pool, MMLUSettings(mode="kshot", shots=2))
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in full]
    limit = lengths[0] - 1  # one token too many for the first question
    with pytest.warns(UserWarning, match="dropped shots"):
        cut, kept = kshot_prompts(questions, pool, MMLUSettings(mode="kshot", shots=2, kshot_max_tokens=limit), tokenizer)
    assert kept[0] < 2 and cut[0].count("Answer: ") == kept[0]
    assert len(tokenizer(cut[0], add_special_tokens=False)["input_ids"]) <= limit
    assert cut[0].endswith("What is 3+3?\nA. 6\nB. 7\nC. 8\nD. 9\nAnswer:") and "What is 1+1?" in cut[0]  # the first shot stays


def test_letter_tokens_are_the_last_token_of_space_letter(tokenizer):
    # this tokenizer has no " A" token: it makes "Ġ" + "A", and "Ġ" is the same for every letter,
    # so the letter's own (last) token is scored, as open-instruct does, with a warning
    assert [tokenizer.convert_ids_to_tokens(tokenizer(f" {x}", add_special_tokens=False)["input_ids"]) for x in "AB"] == [["Ġ", "A"], ["Ġ", "B"]]
    with pytest.warns(UserWarning, match="several tokens; scoring the last token"):
        ids = letter_token_ids(tokenizer, 4)
    assert ids == tokenizer.convert_tokens_to_ids(list("ABCD"))
    # a tokenizer that has " A" … " D" as single tokens: those, and no warning
    merged = train_tokenizer(["Answer: A B C D"] * 50 + ["A. one B. two C. three D. four"] * 50, vocab_size=300)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids = letter_token_ids(merged, 4)
    assert merged.convert_ids_to_tokens(ids) == ["ĠA", "ĠB", "ĠC", "ĠD"]

    class SameToken:  # a tokenizer that cannot tell the letters apart
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [7]}

    with pytest.raises(UserError, match="same last token"):
        letter_token_ids(SameToken(), 4)


class PrefixLengthLogits(torch.nn.Module):
    """A mock LM: the logits at position t are row t+1 of a table fixed by hand (they depend only on
    how many tokens the model has seen), so a right-padded batch must be read at each row's last
    real token, and the letter scores of a prompt of L tokens are log_softmax(table[L])."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table, requires_grad=False)

    def forward(self, input_ids, attention_mask=None, **kwargs):
        positions = torch.arange(1, input_ids.shape[1] + 1)
        return SimpleNamespace(logits=self.table[positions].expand(input_ids.shape[0], -1, -1))


def test_prediction_is_the_argmax_over_the_letter_tokens_and_accuracy_is_micro(tokenizer):
    questions, pool = split_dev(_rows())
    prompts, _ = kshot_prompts(questions, pool, QUIET)
    lengths = [len(tokenizer(p)["input_ids"]) for p in prompts]
    assert len(set(lengths)) == len(lengths)  # each question is told apart by its prompt length
    with pytest.warns(UserWarning, match="several tokens"):
        letters = letter_token_ids(tokenizer, 4)
    table = torch.zeros(max(lengths) + 2, len(tokenizer), dtype=torch.float64)
    table[:, tokenizer.convert_tokens_to_ids("Ġ")] = 50.0  # the space token wins over the vocabulary, but is no letter
    wanted = {lengths[0]: (0, [2.0, 1.0, 0.5, 0.0]),  # A: right (answer 0)
              lengths[1]: (0, [0.0, 3.0, 1.0, -1.0]),  # B: wrong
              lengths[2]: (0, [4.0, 0.0, 0.0, 3.9]),  # A: right
              lengths[3]: (1, [0.0, 1.0, 2.0, 9.0])}  # C over 3 choices (D is not a choice): wrong
    for length in wanted:
        table[length + 1, letters] = torch.tensor([0.0, 0.0, 0.0, 99.0], dtype=torch.float64)  # what padding would read
    for length, (_, values) in wanted.items():
        table[length, letters] = torch.tensor(values, dtype=torch.float64)
    model = PrefixLengthLogits(table)
    with pytest.warns(UserWarning, match="several tokens"):
        scores = letter_scores(model, tokenizer, prompts, [4, 4, 4, 3], QUIET)
    for s, length, n in zip(scores, lengths, [4, 4, 4, 3]):
        expected = torch.log_softmax(table[length], -1)[letters[:n]].numpy()
        assert np.allclose(s, expected, rtol=0, atol=1e-12)
    with pytest.warns(UserWarning, match="several tokens"):
        result = mmlu_accuracy(model, tokenizer, _rows(), QUIET)
    assert list(result.per_question["prediction"]) == [0, 1, 0, 2]
    assert list(result.per_question["shots"]) == [2, 2, 2, 0]
    assert result.accuracy == pytest.approx(2 / 4)  # micro: over questions
    assert result.per_subject == {"abstract_algebra": pytest.approx(2 / 3), "high_school_biology": 0.0}
    assert result.accuracy_macro == pytest.approx(1 / 3)


def test_letter_scores_equal_one_unpadded_forward(make_model, tokenizer):
    model = make_model("qwen2", dtype=torch.float64)
    questions, pool = split_dev(_rows())
    prompts, _ = kshot_prompts(questions, pool, QUIET)
    with pytest.warns(UserWarning):
        scores = letter_scores(model, tokenizer, prompts, [4, 4, 4, 3], QUIET)
    with pytest.warns(UserWarning):
        letters = letter_token_ids(tokenizer, 4)
    for prompt, s in zip(prompts, scores):
        ids = tokenizer(prompt)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1], -1)
        assert np.allclose(s, logp[letters[: len(s)]].numpy(), rtol=0, atol=1e-9)


def test_subjects_in_the_mmlu_layout(tmp_path):
    rows = _rows()
    rows.drop(columns="subject").to_json(tmp_path / "nosubject.jsonl", orient="records", lines=True)
    assert set(read_mmlu(tmp_path / "nosubject.jsonl")["subject"]) == {"all"}
    rows.assign(subject=None).to_json(tmp_path / "empty.jsonl", orient="records", lines=True)
    assert set(read_mmlu(tmp_path / "empty.jsonl")["subject"]) == {"all"}  # an empty column is no column
    bad = rows.copy()
    bad.loc[3, "subject"] = ""
    bad.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(UserError, match=r"bad.csv: row 3 has no subject while other rows have one"):
        read_mmlu(tmp_path / "bad.csv")
    with pytest.raises(UserError, match="only few-shot"):
        split_dev(read_mmlu(tmp_path / "nosubject.jsonl").assign(split="dev"))
    # a separate dev file gives the shots
    dev = rows[rows["split"] == "dev"].drop(columns="split")
    questions, pool = split_dev(rows[rows["split"] == "test"].drop(columns="split"), dev)
    assert len(pool) == 2 and kshot_prompts(questions, pool, QUIET)[0][0] == kshot_prompts(*split_dev(rows), QUIET)[0][0]


@pytest.fixture
def files(tmp_path, make_model, tokenizer, qa_frame):
    save_model(make_model(), tokenizer, tmp_path / "model")
    qa_frame.to_parquet(tmp_path / "forget.parquet")
    qa_frame.to_parquet(tmp_path / "retain.parquet")
    _rows().to_parquet(tmp_path / "mmlu.parquet")
    bad = _rows()
    bad.loc[4, "subject"] = None
    bad.to_parquet(tmp_path / "no_subject.parquet")
    return tmp_path


def _evaluate(files, out, *extra):
    return ["evaluate", "--model", str(files / "model"), "--forget", str(files / "forget.parquet"), "--retain", str(files / "retain.parquet"),
            "--no-generate", "--no-progress", "--out", str(out), *extra]


def test_evaluate_command_kshot(files, capsys):
    out = files / "eval"
    with pytest.warns(UserWarning, match="several tokens"):
        assert main(_evaluate(files, out, "--mmlu", str(files / "mmlu.parquet"), "--mmlu-mode", "kshot", "--mmlu-shots", "1")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings"]["mmlu"]["mode"] == "kshot" and metrics["settings"]["mmlu"]["shots"] == 1
    assert metrics["mmlu/n"] == 4.0  # the dev rows are shots, not questions
    assert set(metrics) >= {"mmlu/accuracy", "mmlu/accuracy_macro", "mmlu/subject/abstract_algebra", "mmlu/subject/high_school_biology"}
    mc = pd.read_parquet(out / "per_example.parquet").query("split == 'mmlu'")
    assert metrics["mmlu/accuracy"] == pytest.approx(mc["mc_correct"].mean())
    assert "MMLU accuracy" in capsys.readouterr().out


BAD = {
    "a row without a subject": (["--mmlu", "{d}/no_subject.parquet", "--mmlu-mode", "kshot"], r"no_subject.parquet: row 4 has no subject while other rows have one"),
    "shots in loglik mode": (["--mmlu", "{d}/mmlu.parquet", "--mmlu-shots", "3"], r"--mmlu-shots applies to --mmlu-mode kshot only"),
    "a prompt in kshot mode": (["--mmlu", "{d}/mmlu.parquet", "--mmlu-mode", "kshot", "--mmlu-prompt", "{{question}}"], r"--mmlu-prompt applies to --mmlu-mode loglik only"),
    "a mode without a file": (["--mmlu-mode", "kshot"], r"--mmlu-mode needs an MMLU file"),
    "negative shots": (["--mmlu", "{d}/mmlu.parquet", "--mmlu-mode", "kshot", "--mmlu-shots", "-1"], r"--mmlu-shots must be at least 0"),
}


@pytest.mark.parametrize("case", BAD)
def test_evaluate_command_bad_mmlu_input(case, files, capsys):
    extra, message = BAD[case]
    out = files / "eval"
    code = main(_evaluate(files, out, *[a.format(d=files) for a in extra]))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("soir: error:") and re.search(message, err[0]), err
    assert not out.exists()
