"""The testbed generator: deterministic, schema-true, split-disjoint, with a loadable tokenizer."""

import hashlib

import pandas as pd
import pytest
from transformers import AutoTokenizer

from soir.errors import UserError
from soir.synth import SynthSettings, synthesize, write_testbed

SMALL = SynthSettings(people_forget=3, people_retain=4, people_holdout=3, docs_forget=1, docs_retain=2, docs_holdout=1,
                      real_forget=1, real_retain=2, real_holdout=1, vocab_size=400)
QUESTIONS = {"Task1": 3, "Task2": 5, "Task3": 4}


def digest(directory):
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_same_seed_same_files_other_seed_other_people(tmp_path):
    write_testbed(tmp_path / "a", SMALL)
    write_testbed(tmp_path / "b", SMALL)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    other = synthesize(SynthSettings(**{**SMALL.__dict__, "seed": 1}))
    first = pd.read_parquet(tmp_path / "a" / "forget.parquet")
    assert set(first["input"]) != set(other["forget"]["input"])


def test_schema_ids_and_splits():
    splits = synthesize(SMALL)
    subjects = {}
    for split in ("forget", "retain", "holdout"):
        frame = splits[split]
        assert {"id", "input", "output", "task", "split"} <= set(frame.columns)
        assert (frame["split"] == split).all()
        for task, kind, n_questions in (("Task1", "docs", 3), ("Task2", "people", 5), ("Task3", "real", 4)):
            rows = frame[frame["task"] == task]
            assert len(rows) == (1 + n_questions) * SMALL.count(kind, split)
            assert sorted({i[-3:] for i in rows["id"]}) == [*[f"qa{q}" for q in range(n_questions)], "sc1"]
        subjects[split] = {i[:-3] for i in frame["id"]}
        qa = frame[frame["id"].str.contains("qa")]
        assert qa["paraphrased_input"].notna().all() and all(len(p) == SMALL.perturbed for p in qa["perturbed_outputs"])
        assert all(o not in list(p) for o, p in zip(qa["output"], qa["perturbed_outputs"]))
        assert (qa["paraphrased_input"] != qa["input"]).all()
    assert not (subjects["forget"] & subjects["retain"]) and not (subjects["retain"] & subjects["holdout"])
    mc = splits["general_mc"]
    assert {"question", "subject", "choices", "answer"} <= set(mc.columns)
    assert all(c[a] == o.strip() for c, a, o in zip(mc["choices"], mc["answer"], splits["general"]["output"]))


def test_every_phrasing_is_trained_for_some_subjects_and_held_out_for_others():
    splits = synthesize(SMALL)
    for split in ("forget", "retain"):
        frame, extra = splits[split], splits[f"{split}_phrasings"]
        qa = frame[frame["id"].str.contains("qa")]
        trained = set(qa["input"]) | set(extra["input"])
        assert not set(qa["paraphrased_input"]) & trained
        assert all(extra["output"].isin(qa["output"]))
        assert len(extra) == len(qa)  # PHRASINGS = 3: two trained (the row and one extra), one held out
    held = {(i[:-3], p.split()[0]) for i, p in zip(splits["retain"]["id"], splits["retain"]["paraphrased_input"]) if isinstance(p, str)}
    assert len({q for _, q in held}) > 1  # the held-out phrasing rotates


def test_pretrain_holds_general_and_the_seen_task3_documents():
    splits = synthesize(SMALL)
    pretrain = splits["pretrain"]
    seen = set(splits["forget"].query("task == 'Task3'")["input"]) | set(splits["retain"].query("task == 'Task3'")["input"])
    assert seen <= set(pretrain["input"]) and set(splits["general"]["input"]) <= set(pretrain["input"])
    assert not set(splits["holdout"].query("task == 'Task3'")["input"]) & set(pretrain["input"])


def test_tokenizer_loads_with_autotokenizer(tmp_path):
    write_testbed(tmp_path / "tb", SMALL)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tb" / "tokenizer")
    text = pd.read_parquet(tmp_path / "tb" / "retain.parquet")["input"][0]
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert tokenizer.eos_token is not None and tokenizer.pad_token is not None


def test_bad_sizes():
    with pytest.raises(UserError, match="people-forget must be positive"):
        SynthSettings(people_forget=0)
