"""The data contract (docs/design.md §3): reading splits, prompt templates, labels, collation, losses.

A split is a table with `input` and `output` columns (the SemEval-2025 Task 4 schema;
`id`, `task`, `split` optional). Prompt tokens and padding are labelled -100; answer
tokens plus one EOS are labelled. The per-example loss is the mean NLL over an example's
labelled tokens, so a split's loss is the mean over examples and its gradient is the mean
of per-example gradients.
"""

from __future__ import annotations

import ast
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import pandas as pd
import torch
import torch.nn.functional as F

from soir.distributed import shard_rows
from soir.errors import UserError
from soir.runtime import device_of, eval_mode, lm_logits, to_device
from soir.settings import setting

IGNORE_INDEX = -100
REQUIRED_COLUMNS = ("input", "output")
SEMEVAL_ID = re.compile(r"(sc1|qa[0-4])$")


# ---------------------------------------------------------------- reading


def parse_column_map(spec: str | None) -> dict[str, str]:
    """Parse `question=input,answer=output` into {"question": "input", "answer": "output"}."""
    if not spec:
        return {}
    mapping = {}
    for part in spec.split(","):
        source, sep, target = part.partition("=")
        if not sep or not source.strip() or not target.strip():
            raise UserError(f"bad column mapping {part!r}: write it as SOURCE=TARGET, e.g. question=input,answer=output")
        mapping[source.strip()] = target.strip()
    return mapping


def read_split(path: str | Path, columns: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Read a split from parquet, JSON Lines or CSV and check it has `input` and `output`.

    `columns` renames source columns first (TOFU-style `question`/`answer` files).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file not found: {path} (check the path; `soir data synth --out DIR` writes a testbed)")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            frame = pd.read_parquet(path)
        elif suffix in (".jsonl", ".json"):
            frame = pd.read_json(path, lines=suffix == ".jsonl")
        elif suffix == ".csv":
            frame = pd.read_csv(path, keep_default_na=False)
        else:
            raise UserError(f"cannot read {path}: use a .parquet, .jsonl or .csv file")
    except UserError:
        raise
    except Exception as exc:  # a corrupt or mis-named file
        raise UserError(f"cannot read {path}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    if columns:
        frame = frame.rename(columns=dict(columns))
    for column in REQUIRED_COLUMNS:
        if column not in frame.columns:
            hint = " (map it with --columns SOURCE=input,SOURCE=output)" if not columns else ""
            raise UserError(f"{path} has no {column!r} column{hint}; it has: {', '.join(map(str, frame.columns))}")
    if len(frame) == 0:
        raise UserError(f"{path} is an empty split: it has no rows")
    frame = frame.reset_index(drop=True)
    if "id" not in frame.columns:
        frame["id"] = [f"{path.stem}-{i}" for i in range(len(frame))]
    frame["input"] = frame["input"].astype(str)
    frame["output"] = frame["output"].astype(str)
    frame["id"] = frame["id"].astype(str)
    return frame


def read_splits(paths: Iterable[str | Path], columns: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Read and concatenate several splits."""
    frames = [read_split(p, columns) for p in paths]
    if not frames:
        raise UserError("no data files given")
    return pd.concat(frames, ignore_index=True)


def list_cell(value):
    """The list a table cell holds (a list, tuple or array, or its JSON / Python text), else the
    text itself (a cell with one string), or None for a cell that is missing or empty."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        for parse in (json.loads, ast.literal_eval):
            try:
                value = parse(text)
                break
            except (ValueError, SyntaxError):
                continue
        else:
            return text
    if hasattr(value, "tolist"):
        value = value.tolist()
    return list(value) if isinstance(value, (list, tuple)) else value


def row_kind(example_id: str) -> str:
    """`qa` for SemEval question-answer ids (`…qa0`–`…qa4`), else `sc` (sentence completion)."""
    match = SEMEVAL_ID.search(str(example_id))
    return "qa" if match and match.group(1).startswith("qa") else "sc"


# ---------------------------------------------------------------- encoding


@dataclass(frozen=True)
class Template:
    """A prompt template with `{input}` and a trailing `{output}`; the default concatenates them."""

    text: str = "{input}{output}"

    def __post_init__(self):
        if "{input}" not in self.text or not self.text.endswith("{output}"):
            raise UserError("a --template must contain {input} and end with {output}, e.g. '### Input: {input}\\n### Output: {output}'")

    def prompt(self, input_text: str) -> str:
        return self.text[: -len("{output}")].replace("{input}", input_text)


@dataclass(frozen=True)
class DataSettings:
    """How rows become token sequences; the same for every stage that reads splits."""

    template: str = setting(Template().text, "prompt template with {input} and a trailing {output} (default: raw concatenation, as SemEval prompts)")
    columns: Mapping[str, str] | None = None  # rename columns on reading (TOFU-style question/answer files): --columns
    max_length: int = setting(256, "tokens per row; longer rows lose prompt tokens from the left")

    def __post_init__(self):
        Template(self.template)
        if self.max_length < 2:
            raise UserError(f"--max-length must be at least 2 tokens (one answer token and EOS), got {self.max_length}")

    def read(self, paths: str | Path | Iterable[str | Path]) -> pd.DataFrame:
        """One split file, or several concatenated."""
        return read_split(paths, self.columns) if isinstance(paths, (str, Path)) else read_splits(paths, self.columns)

    def encode(self, frame: pd.DataFrame, tokenizer) -> "Encoded":
        return encode(frame, tokenizer, Template(self.template), self.max_length)


@dataclass
class Encoded:
    """Token ids and labels of a split, one list per example."""

    ids: list[str]
    input_ids: list[list[int]]
    labels: list[list[int]]
    prompt_lengths: list[int]
    truncated: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)

    def subset(self, index: Sequence[int]) -> "Encoded":
        return Encoded(
            [self.ids[i] for i in index],
            [self.input_ids[i] for i in index],
            [self.labels[i] for i in index],
            [self.prompt_lengths[i] for i in index],
        )

    @property
    def n_answer_tokens(self) -> int:
        return sum(len(x) - p for x, p in zip(self.input_ids, self.prompt_lengths))


def encode(
    frame: pd.DataFrame,
    tokenizer,
    template: Template = Template(),
    max_length: int = 256,
) -> Encoded:
    """Tokenize prompt and answer separately; label the answer and one EOS.

    Too-long rows lose prompt tokens from the left (then answer tokens from the right
    only if the answer alone is too long); a single warning gives the count.
    """
    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no EOS token; set eos_token in its tokenizer_config.json")
    prompts = [template.prompt(text) for text in frame["input"]]
    prompt_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    answer_ids = tokenizer(list(frame["output"]), add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    out = Encoded(list(frame["id"]), [], [], [])
    for prompt, answer in zip(prompt_ids, answer_ids):
        answer = list(answer) + [eos]
        if len(prompt) + len(answer) > max_length:
            out.truncated += 1
            answer = answer[: max_length - 1]
            prompt = prompt[len(prompt) - (max_length - len(answer)) :]
        out.input_ids.append(list(prompt) + answer)
        out.labels.append([IGNORE_INDEX] * len(prompt) + answer)
        out.prompt_lengths.append(len(prompt))
    if out.truncated:
        warnings.warn(f"{out.truncated} of {len(out)} rows were longer than {max_length} tokens and lost prompt tokens from the left")
    return out


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def collate(input_ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]] | None, pad: int, side: str = "right") -> dict[str, torch.Tensor]:
    """Pad a batch to its longest row: right padding for training, left for generation."""
    width = max(len(x) for x in input_ids)
    batch_ids = torch.full((len(input_ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(input_ids), width), dtype=torch.long)
    batch_labels = torch.full((len(input_ids), width), IGNORE_INDEX, dtype=torch.long)
    for row, ids in enumerate(input_ids):
        span = slice(0, len(ids)) if side == "right" else slice(width - len(ids), width)
        batch_ids[row, span] = torch.as_tensor(ids)
        mask[row, span] = 1
        if labels is not None:
            batch_labels[row, span] = torch.as_tensor(labels[row])
    batch = {"input_ids": batch_ids, "attention_mask": mask}
    if labels is not None:
        batch["labels"] = batch_labels
    return batch


def batches(data: Encoded, batch_size: int, pad: int) -> Iterable[dict[str, torch.Tensor]]:
    """Training-layout batches in order (for evaluation passes)."""
    for start in range(0, len(data), batch_size):
        stop = start + batch_size
        yield collate(data.input_ids[start:stop], data.labels[start:stop], pad)


def split_batches(data: Encoded, pad: int, batch_size: int, max_examples: int | None = None, seed: int = 0,
                  shard: bool = False) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches of a whole split (a seeded subset of `max_examples` rows if it is
    larger), rows sorted by length so batches carry little padding: the batches of one pass
    over a split (ranking, curvature). With `shard`, only this process's rows (every
    world-size-th of the sorted rows, `soir.distributed`)."""
    index = list(range(len(data)))
    if not index:
        raise UserError("an empty split: no examples to rank with")
    if max_examples is not None and len(index) > max_examples:
        index = sorted(torch.randperm(len(index), generator=torch.Generator().manual_seed(seed)).tolist()[:max_examples])
    index.sort(key=lambda i: len(data.input_ids[i]))
    if shard:
        index = shard_rows(index)
    return [collate([data.input_ids[i] for i in index[s:s + batch_size]], [data.labels[i] for i in index[s:s + batch_size]], pad)
            for s in range(0, len(index), batch_size)]


def n_examples(batches: Sequence[Mapping[str, torch.Tensor]]) -> int:
    """The number of rows in a list of collated batches."""
    return sum(len(b["input_ids"]) for b in batches)


@dataclass
class BatchStream:
    """Shuffled batches as a pure function of the step: exact resume needs no sampler state.

    Each epoch is a fresh permutation seeded by (seed, epoch); batch `i` of the whole run
    is always the same batch.
    """

    data: Encoded
    batch_size: int
    pad: int
    seed: int = 0
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def batches_per_epoch(self) -> int:
        return -(-len(self.data) // self.batch_size)

    def rows(self, index: int) -> list[int]:
        """The rows of `data` in batch `index`."""
        epoch, position = divmod(index, self.batches_per_epoch)
        if self._cache.get("epoch") != epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cache = {"epoch": epoch, "order": torch.randperm(len(self.data), generator=generator).tolist()}
        return self._cache["order"][position * self.batch_size : (position + 1) * self.batch_size]

    def __call__(self, index: int) -> dict[str, torch.Tensor]:
        rows = self.rows(index)
        return collate([self.data.input_ids[i] for i in rows], [self.data.labels[i] for i in rows], self.pad)


# ---------------------------------------------------------------- losses


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL (B, T-1) of next-token prediction and the mask of labelled positions."""
    shift_logits = logits[:, :-1]
    if shift_logits.dtype in (torch.float16, torch.bfloat16):
        shift_logits = shift_logits.float()
    shift_labels = labels[:, 1:]
    mask = shift_labels != IGNORE_INDEX
    nll = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.clamp_min(0).reshape(-1),
        reduction="none",
    ).view_as(shift_labels)
    return nll * mask, mask


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean NLL over each example's labelled tokens, shape (B,)."""
    nll, mask = token_nll(logits, labels)
    return nll.sum(1) / mask.sum(1).clamp_min(1)


def example_losses(model, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The contract's per-example loss (B,) of a causal LM on a collated training batch."""
    return per_example_loss(lm_logits(model, batch), batch["labels"])


def answer_hits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced correct answer tokens and answer-token count per example, each (B,)."""
    shift_labels = labels[:, 1:]
    mask = shift_labels != IGNORE_INDEX
    correct = (logits[:, :-1].argmax(-1) == shift_labels) & mask
    return correct.sum(1), mask.sum(1)


def teacher_forced(model, data: Encoded, pad: int, batch_size: int = 64) -> pd.DataFrame:
    """Per-example answer NLL, correct answer tokens and answer-token count, teacher-forced."""
    device = device_of(model)
    losses, correct, counts = [], [], []
    with eval_mode(model, no_grad=True):
        for batch in batches(data, batch_size, pad):
            batch = to_device(batch, device)
            logits = lm_logits(model, batch)
            losses.append(per_example_loss(logits, batch["labels"]).cpu())
            hits, count = answer_hits(logits, batch["labels"])
            correct.append(hits.cpu())
            counts.append(count.cpu())
    return pd.DataFrame({
        "id": data.ids,
        "loss": torch.cat(losses).double().numpy(),
        "correct": torch.cat(correct).numpy(),
        "answer_tokens": torch.cat(counts).numpy(),
    })


def answer_accuracy(table: pd.DataFrame) -> float:
    """Teacher-forced answer-token accuracy over a `teacher_forced` table (micro-averaged)."""
    return float(table["correct"].sum() / max(1, table["answer_tokens"].sum()))
