"""The data contract: reading, labels, truncation, collation, the per-example loss."""

import warnings

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from soir.data import (
    IGNORE_INDEX,
    BatchStream,
    Template,
    collate,
    encode,
    pad_id,
    parse_column_map,
    per_example_loss,
    read_split,
    row_kind,
)
from soir.errors import UserError


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl", ".csv"])
def test_read_split_formats(tmp_path, qa_frame, suffix):
    path = tmp_path / f"split{suffix}"
    {".parquet": lambda: qa_frame.to_parquet(path), ".jsonl": lambda: qa_frame.to_json(path, orient="records", lines=True),
     ".csv": lambda: qa_frame.to_csv(path, index=False)}[suffix]()
    frame = read_split(path)
    assert list(frame["input"]) == list(qa_frame["input"])
    assert list(frame["output"]) == list(qa_frame["output"])


def test_column_mapping_reads_tofu_style(tmp_path):
    path = tmp_path / "tofu.jsonl"
    pd.DataFrame({"question": ["Who?"], "answer": [" Me"]}).to_json(path, orient="records", lines=True)
    frame = read_split(path, parse_column_map("question=input,answer=output"))
    assert frame.loc[0, "input"] == "Who?" and frame.loc[0, "output"] == " Me"
    assert frame.loc[0, "id"] == "tofu-0"


def test_read_errors_name_the_problem(tmp_path, qa_frame):
    with pytest.raises(UserError, match="not found"):
        read_split(tmp_path / "missing.parquet")
    path = tmp_path / "no_output.parquet"
    qa_frame.drop(columns="output").to_parquet(path)
    with pytest.raises(UserError, match=r"no_output\.parquet has no 'output' column"):
        read_split(path)
    path = tmp_path / "empty.parquet"
    qa_frame.iloc[:0].to_parquet(path)
    with pytest.raises(UserError, match="empty split"):
        read_split(path)
    with pytest.raises(UserError, match="SOURCE=TARGET"):
        parse_column_map("question")


def test_labels_mask_prompt_and_label_answer_plus_eos(tokenizer, qa_frame):
    data = encode(qa_frame, tokenizer)
    for row, (ids, labels, p) in enumerate(zip(data.input_ids, data.labels, data.prompt_lengths)):
        prompt = tokenizer(qa_frame["input"][row])["input_ids"]
        answer = tokenizer(qa_frame["output"][row], add_special_tokens=False)["input_ids"]
        assert ids == prompt + answer + [tokenizer.eos_token_id]
        assert labels == [IGNORE_INDEX] * len(prompt) + answer + [tokenizer.eos_token_id]
        assert p == len(prompt)


def test_template_wraps_the_prompt(tokenizer, qa_frame):
    template = Template("### Input: {input}\n### Output: {output}")
    data = encode(qa_frame, tokenizer, template)
    prompt = tokenizer.decode(data.input_ids[0][: data.prompt_lengths[0]])
    assert prompt == f"### Input: {qa_frame['input'][0]}\n### Output: "
    with pytest.raises(UserError):
        Template("{output} then {input}")


def test_truncation_keeps_the_answer_and_warns_once(tokenizer, qa_frame):
    full = encode(qa_frame, tokenizer)
    limit = max(len(x) - p for x, p in zip(full.input_ids, full.prompt_lengths)) + 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        short = encode(qa_frame, tokenizer, max_length=limit)
    assert len(caught) == 1 and str(short.truncated) in str(caught[0].message)
    for long_ids, long_labels, ids, labels in zip(full.input_ids, full.labels, short.input_ids, short.labels):
        assert len(ids) <= limit
        assert ids == long_ids[len(long_ids) - len(ids):]  # prompt lost from the left
        assert [t for t in labels if t != IGNORE_INDEX] == [t for t in long_labels if t != IGNORE_INDEX]


def test_collate_right_and_left_padding():
    batch = collate([[5, 6, 7], [8]], [[-100, 6, 7], [8]], pad=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    left = collate([[5, 6, 7], [8]], None, pad=0, side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert "labels" not in left


def test_per_example_loss_is_mean_nll_of_labelled_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11, dtype=torch.float64)
    labels = torch.tensor([[-100, -100, 3, 4, 1], [-100, 7, 2, -100, -100]])
    expected = []
    for b in range(2):
        terms = [-F.log_softmax(logits[b, t - 1], -1)[labels[b, t]] for t in range(1, 5) if labels[b, t] != -100]
        expected.append(torch.stack(terms).mean())
    torch.testing.assert_close(per_example_loss(logits, labels), torch.stack(expected))


def test_padding_does_not_change_the_loss(make_model, tokenizer, qa_frame):
    model = make_model("llama", dtype=torch.float64)
    data = encode(qa_frame, tokenizer)
    pad = pad_id(tokenizer)
    together = per_example_loss(model(**{k: v for k, v in collate(data.input_ids, None, pad).items()}).logits, collate(data.input_ids, data.labels, pad)["labels"])
    for i in range(len(data)):
        one = collate(data.input_ids[i:i + 1], data.labels[i:i + 1], pad)
        alone = per_example_loss(model(input_ids=one["input_ids"], attention_mask=one["attention_mask"]).logits, one["labels"])
        torch.testing.assert_close(alone[0], together[i])


def test_batch_stream_is_a_function_of_the_step(tokenizer, qa_frame):
    data = encode(qa_frame, tokenizer)
    a, b = BatchStream(data, 3, pad_id(tokenizer), seed=1), BatchStream(data, 3, pad_id(tokenizer), seed=1)
    seen = [a(i) for i in range(6)]
    for i in reversed(range(6)):
        assert torch.equal(b(i)["input_ids"], seen[i]["input_ids"])
    epoch = sorted(tuple(r[m.bool()].tolist()) for batch in seen[:2] for r, m in zip(batch["input_ids"], batch["attention_mask"]))
    assert epoch == sorted(tuple(x) for x in data.input_ids)  # each epoch visits every row once
    assert not torch.equal(seen[0]["input_ids"], seen[2]["input_ids"][: len(seen[0]["input_ids"])])  # next epoch reshuffles


def test_row_kind_reads_semeval_ids():
    assert row_kind("6de8a3ba-f2ec-4d0b-9c2f-57d2c12fb4b8qa3") == "qa"
    assert row_kind("p0001sc1") == "sc"
    assert row_kind("no-pattern") == "sc"
