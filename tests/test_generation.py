"""Greedy generation: batched (left-padded) equals one-at-a-time, EOS and length stops, text output."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from analysis.generation import (
    GenerationSettings,
    generate,
    generate_ids,
    prompt_token_ids,
)
from soir.data import Template
from soir.errors import UserError

PROMPTS = [
    "Alice Moon was born on",
    "What is the capital of Norland?",
    "Seven",
    "In the village of Oakridge a quiet fox named Pim",
]


class Successor(torch.nn.Module):
    """A cache-less mock LM whose next token is `table[last token]` (default: last token + 1)."""

    def __init__(self, vocab: int, table: dict[int, int] | None = None):
        super().__init__()
        self.vocab = vocab
        self.table = table or {}
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.calls = 0

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None, **kwargs):
        self.calls += 1
        nxt = input_ids.clone().apply_(lambda t: self.table.get(t, (t + 1) % self.vocab))
        logits = torch.nn.functional.one_hot(nxt, self.vocab).float() * 10
        return SimpleNamespace(logits=logits, past_key_values=None)


def _ids(model, tokenizer, prompts, batch_size, max_new_tokens=6):
    settings = GenerationSettings(max_new_tokens=max_new_tokens, batch_size=batch_size, progress=False)
    ids = prompt_token_ids(tokenizer, prompts)
    return generate_ids(model, ids, eos_id=tokenizer.eos_token_id, pad=tokenizer.pad_token_id, settings=settings)


@pytest.mark.parametrize("eager", [True, False], ids=["eager", "sdpa"])
def test_batched_equals_one_at_a_time(arch, eager, make_model, tokenizer):
    if not eager and arch != "olmo":
        pytest.skip("sdpa is checked on one architecture")
    model = make_model(arch, dtype=torch.float64, eager=eager)
    batched = _ids(model, tokenizer, PROMPTS, batch_size=len(PROMPTS))
    single = [_ids(model, tokenizer, [p], batch_size=1)[0] for p in PROMPTS]
    assert batched == single
    assert any(len(x) > 0 for x in batched)  # the comparison is not between empty outputs
    if arch == "olmo":  # a different batching (two batches, other padding) gives the same tokens too
        assert _ids(model, tokenizer, PROMPTS, batch_size=2) == single


@pytest.mark.parametrize("arch_name", ["olmo", "gpt2"])
def test_matches_hf_generate(arch_name, make_model, tokenizer):
    model = make_model(arch_name, dtype=torch.float64)
    for prompt in PROMPTS[1:3]:
        ids = prompt_token_ids(tokenizer, [prompt])[0]
        ours = _ids(model, tokenizer, [prompt], batch_size=1, max_new_tokens=10)[0]
        reference = model.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), do_sample=False,
            max_new_tokens=10, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )[0, len(ids):].tolist()
        if tokenizer.eos_token_id in reference:
            reference = reference[: reference.index(tokenizer.eos_token_id)]
        assert ours == reference


def test_stops_at_eos_and_max_new_tokens():
    model = Successor(vocab=50)
    settings = GenerationSettings(max_new_tokens=8, batch_size=2, progress=False)
    # no EOS reached: eight successors each
    out = generate_ids(model, [[5, 6], [10]], eos_id=40, pad=0, settings=settings)
    assert out == [list(range(7, 15)), list(range(11, 19))]
    # EOS = 13: the first row stops after 12, the second after 12 as well; EOS itself is dropped
    out = generate_ids(model, [[5, 6], [10]], eos_id=13, pad=0, settings=settings)
    assert out == [[7, 8, 9, 10, 11, 12], [11, 12]]
    # the loop ends as soon as every row is done: the first row needs 7 steps
    model.calls = 0
    generate_ids(model, [[5, 6], [10]], eos_id=13, pad=0, settings=settings)
    assert model.calls == 7
    # EOS as the first token: empty continuation
    assert generate_ids(model, [[12]], eos_id=13, pad=0, settings=settings) == [[]]


def test_generate_returns_text_without_prompt_or_eos(tokenizer):
    prompt = "What is the capital of Norland?"
    answer = " Fjordheim"
    prompt_ids = tokenizer(prompt)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    chain = [prompt_ids[-1], *answer_ids, tokenizer.eos_token_id]
    assert len(set(chain)) == len(chain)  # the mock's table needs distinct keys
    table = dict(zip(chain[:-1], chain[1:]))
    model = Successor(vocab=len(tokenizer), table=table)
    settings = GenerationSettings(max_new_tokens=20, progress=False)
    assert generate(model, tokenizer, [prompt], settings) == [answer]
    # a template's prompt is what the model continues
    template = Template("Q: {input}{output}")
    assert generate(model, tokenizer, [prompt], settings, template) == [answer]
    short = GenerationSettings(max_new_tokens=2, progress=False)
    assert generate(model, tokenizer, [prompt], short) == [tokenizer.decode(answer_ids[:2])]


def test_restores_training_mode_and_truncates_long_prompts(make_model, tokenizer):
    model = make_model("llama")
    model.train()
    with pytest.warns(UserWarning, match="1 of 2 prompts"):
        ids = prompt_token_ids(tokenizer, ["word " * 40, "Seven"], max_prompt_tokens=16)
    assert len(ids[0]) == 16 and ids[0] == tokenizer("word " * 40)["input_ids"][-16:]
    generate(model, tokenizer, ["Seven"], GenerationSettings(max_new_tokens=2, progress=False))
    assert model.training


def test_settings_are_checked():
    with pytest.raises(UserError, match="max_new_tokens"):
        GenerationSettings(max_new_tokens=0)
    with pytest.raises(UserError, match="batch size"):
        GenerationSettings(batch_size=0)
