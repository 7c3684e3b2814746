"""Batched greedy decoding for evaluation (docs/design.md §8: regurgitation and knowledge).

Prompts are built with the data contract's `Template.prompt` and tokenized exactly as
`soir.data.encode` tokenizes them, then left-padded with `soir.data.collate(side="left")`.
Position ids are computed from the attention mask, so a padded row sees the same
positions as it would alone and batched output equals one-at-a-time output (up to
floating-point summation order; exactly in float64 on the tiny test models).

The loop is our own (a KV-cached forward per step) rather than `model.generate`, so that it
behaves the same across transformers versions and architectures (GPT-2's absolute positions
included) and has no sampling or generation-config surprises; a test checks it against
`model.generate(do_sample=False)` on an unpadded prompt.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from typing import Sequence

import torch

from soir.data import Template, collate, pad_id
from soir.errors import UserError
from soir.runtime import device_of, dtype_of, eval_mode, tqdm


@dataclass(frozen=True)
class GenerationSettings:
    """Greedy decoding settings.

    max_new_tokens: generated tokens per row at most (EOS ends a row earlier).
    batch_size: rows per forward pass.
    max_prompt_tokens: longer prompts lose tokens from the left (one warning with a count).
    progress: show a tqdm bar.
    """

    max_new_tokens: int = 64
    batch_size: int = 16
    max_prompt_tokens: int = 512
    progress: bool = True

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise UserError(f"the generation batch size must be at least 1, got {self.batch_size}")
        if self.max_prompt_tokens < 1:
            raise UserError(f"max_prompt_tokens must be at least 1, got {self.max_prompt_tokens}")


def prompt_token_ids(tokenizer, inputs: Sequence[str], template: Template = Template(), max_prompt_tokens: int = 512) -> list[list[int]]:
    """Token ids of each row's prompt, as `soir.data.encode` makes them; long prompts keep their right end."""
    prompts = [template.prompt(str(text)) for text in inputs]
    if not prompts:
        return []
    ids = [list(x) for x in tokenizer(prompts, add_special_tokens=True)["input_ids"]]
    cut = sum(len(x) > max_prompt_tokens for x in ids)
    if cut:
        warnings.warn(f"{cut} of {len(ids)} prompts were longer than {max_prompt_tokens} tokens and lost tokens from the left")
        ids = [x[-max_prompt_tokens:] for x in ids]
    if any(len(x) == 0 for x in ids):
        raise UserError("a prompt tokenized to no tokens: give every row a non-empty input or a template with text before {output}")
    return ids


def needs_explicit_mask(model) -> bool:
    """True for eager attention in float64, where transformers' own mask breaks left padding.

    Eager attention adds `finfo(float64).min` for masked keys and then takes the softmax in
    float32, where that value becomes -inf: a left-padding row (every key masked) turns into
    NaN, and 0 * NaN then spreads it to the real tokens of that row. We pass our own 4D
    additive mask there, with a large finite negative value.
    """
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) == "eager" and dtype_of(model) == torch.float64


def additive_mask(padding: torch.Tensor, query_length: int, dtype: torch.dtype) -> torch.Tensor:
    """A (B, 1, Q, K) additive causal mask from a (B, K) padding mask; the last Q keys are the queries."""
    keys = padding.shape[1]
    query_index = torch.arange(keys - query_length, keys, device=padding.device)[:, None]
    causal = torch.arange(keys, device=padding.device)[None, :] <= query_index
    allowed = causal[None] & padding[:, None, :].bool()
    zero = torch.zeros((), dtype=dtype, device=padding.device)
    return torch.where(allowed, zero, torch.tensor(-1e30, dtype=dtype, device=padding.device))[:, None]


def cache_argument(model) -> str:
    """The name of the KV-cache argument of the model's forward: `cache` since transformers 5.2x,
    `past_key_values` before (and for remote code that keeps it)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def greedy_batch(model, prompts: Sequence[Sequence[int]], *, eos_id: int, pad: int, max_new_tokens: int) -> list[list[int]]:
    """Greedy continuation token ids of one left-padded batch, each cut before its first EOS.

    Rows that have emitted EOS keep being fed `pad` (their outputs are ignored); the loop stops
    when every row is done or after `max_new_tokens` steps.
    """
    device = device_of(model)
    batch = collate(prompts, None, pad, side="left")
    input_ids = batch["input_ids"].to(device)
    mask = batch["attention_mask"].to(device)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    generated: list[torch.Tensor] = []
    past = None
    cache_arg = cache_argument(model)
    step_ids, step_positions = input_ids, positions
    explicit = needs_explicit_mask(model)
    for _ in range(max_new_tokens):
        step_mask = additive_mask(mask, step_ids.shape[1], dtype_of(model)) if explicit else mask
        out = model(input_ids=step_ids, attention_mask=step_mask, position_ids=step_positions, use_cache=True, **{cache_arg: past})
        past = getattr(out, "cache", None) if cache_arg == "cache" else getattr(out, "past_key_values", None)
        next_ids = out.logits[:, -1].argmax(-1)
        next_ids = torch.where(done, torch.full_like(next_ids, pad), next_ids)
        generated.append(next_ids)
        done = done | (next_ids == eos_id)
        if bool(done.all()):
            break
        if past is None:  # a model without a cache: feed the whole sequence again
            step_ids = torch.cat([step_ids, next_ids[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            step_positions = (mask.cumsum(-1) - 1).clamp_min(0)
        else:
            step_ids = next_ids[:, None]
            step_positions = step_positions[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    tokens = torch.stack(generated, dim=1).tolist() if generated else [[] for _ in prompts]
    result = []
    for row in tokens:
        result.append(row[: row.index(eos_id)] if eos_id in row else row)
    return result


def generate_ids(model, prompts: Sequence[Sequence[int]], *, eos_id: int, pad: int, settings: GenerationSettings = GenerationSettings(), desc: str = "generate") -> list[list[int]]:
    """Greedy continuations of many prompts, batched by similar length; returned in input order."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    result: list[list[int]] = [[] for _ in prompts]
    starts = range(0, len(order), settings.batch_size)
    with eval_mode(model, no_grad=True):
        for start in tqdm(starts, desc=desc, disable=not settings.progress, leave=False):
            rows = order[start : start + settings.batch_size]
            outputs = greedy_batch(model, [prompts[i] for i in rows], eos_id=eos_id, pad=pad, max_new_tokens=settings.max_new_tokens)
            for i, ids in zip(rows, outputs):
                result[i] = ids
    return result


def generate(
    model,
    tokenizer,
    inputs: Sequence[str],
    settings: GenerationSettings = GenerationSettings(),
    template: Template = Template(),
    desc: str = "generate",
) -> list[str]:
    """Greedy continuations of `template.prompt(input)` as text: no prompt, no EOS, special tokens dropped."""
    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no EOS token; set eos_token in its tokenizer_config.json")
    prompts = prompt_token_ids(tokenizer, inputs, template, settings.max_prompt_tokens)
    ids = generate_ids(model, prompts, eos_id=tokenizer.eos_token_id, pad=pad_id(tokenizer), settings=settings, desc=desc)
    return [tokenizer.decode(x, skip_special_tokens=True, clean_up_tokenization_spaces=False) for x in ids]
