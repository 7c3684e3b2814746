"""The relearning attack (docs/design.md §8, robustness probes): does forgetting survive a little finetuning?

An attacker who holds part of the forget set finetunes the unlearned model on it for a few
steps, then we measure the forget metrics on the REST of the forget set. If unlearning only
suppressed the knowledge, it comes back on rows the attacker never trained on.

How the forget set is split: by subject, not by row. SemEval ids end in `sc1` or `qa0`–`qa4`
and the part before that names the person or document (`p0003qa2` -> `p0003`), so all rows
about one person land on the same side: the held-back rows are about OTHER people than the
attack rows, and a gain there is knowledge coming back rather than the attack teaching the
answer again. Rows without a SemEval id are each their own group. Groups are shuffled with
the seed; `fraction` of them (rounded, at least one, leaving at least one) are attack groups.

Metrics before and after, on the held-back rows (the attack's result) and on the attack rows
(a sanity check: these were trained on directly): teacher-forced answer-token accuracy
(pooled over answer tokens), answer probability, QA exact match (knowledge), ROUGE-L recall on completion
rows (regurgitation), ROUGE-L recall over all rows, and exact match on paraphrased questions.
`recovered` is after − before.
"""

from __future__ import annotations

import copy
import json
import math
import random
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch

from analysis.evaluate import probe_metrics, probe_settings
from soir.data import SEMEVAL_ID, BatchStream, Template, encode, pad_id
from soir.errors import UserError
from soir.settings import setting
from unlearn.loop import Trainer, TrainSettings
from unlearn.objectives import get_objective

METRICS = ("accuracy", "probability", "knowledge", "regurgitation", "rouge_l_recall", "paraphrased_exact_match")


@dataclass(frozen=True)
class RelearnSettings:
    """The attack: `steps` AdamW steps at a constant `lr` (no warmup) on `fraction` of the forget groups.

    generate=False measures teacher-forced metrics only (accuracy, probability; no exact match or ROUGE).
    """

    fraction: float = setting(0.5, "fraction of the forget people/documents the attacker trains on")
    steps: int = setting(20, "finetuning steps of the attack")
    lr: float = setting(1e-3, "constant AdamW learning rate of the attack")
    batch_size: int = setting(32, "rows per attack batch")
    seed: int = 0
    template: str = Template().text
    max_length: int = 256
    max_new_tokens: int = setting(64, "generated tokens per row when measuring")
    eval_batch_size: int = 16
    generate: bool = True
    progress: bool = True

    def __post_init__(self):
        if not 0 < self.fraction < 1:
            raise UserError(f"--fraction must lie strictly between 0 and 1, got {self.fraction}")
        if self.steps < 1:
            raise UserError(f"--steps must be positive, got {self.steps}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UserError(f"--lr must be positive, got {self.lr}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be positive, got {self.batch_size}")


def subject_of(example_id: str) -> str:
    """The person or document an id is about: the id without its SemEval suffix (or the whole id)."""
    example_id = str(example_id)
    match = SEMEVAL_ID.search(example_id)
    return example_id[: match.start()] if match and match.start() > 0 else example_id


def split_by_subject(frame: pd.DataFrame, fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(attack rows, held-back rows): whole subjects on each side, `fraction` of the subjects attacked.

    `frame` needs an `id` column."""
    subjects = frame["id"].astype(str).map(subject_of)
    groups = sorted(subjects.unique())
    if len(groups) < 2:
        raise UserError(f"the relearning attack needs rows about at least two people or documents to split; the forget set has {len(groups)} ({groups[0] if groups else 'none'})")
    random.Random(seed).shuffle(groups)
    n_attack = min(len(groups) - 1, max(1, round(fraction * len(groups))))
    attack = set(groups[:n_attack])
    chosen = subjects.isin(attack).to_numpy()
    return frame[chosen].reset_index(drop=True), frame[~chosen].reset_index(drop=True)


def forget_metrics(model, tokenizer, frame: pd.DataFrame, settings: RelearnSettings, name: str = "forget") -> dict[str, float]:
    """Forget metrics of `model` on `frame` (`analysis.evaluate.probe_metrics`)."""
    evaluation = probe_settings(settings.template, settings.max_length, settings.max_new_tokens, settings.eval_batch_size,
                                settings.generate, settings.progress)
    metrics = probe_metrics(model, tokenizer, frame, evaluation, name)
    return {k: metrics[k] for k in METRICS}


def _difference(before: dict, after: dict) -> dict:
    return {k: (after[k] - before[k]) if before[k] is not None and after[k] is not None else None for k in before}


def _load(model_dir, tokenizer, device, dtype):
    if isinstance(model_dir, torch.nn.Module):
        model = copy.deepcopy(model_dir)
        return model.to(device) if device is not None else model
    from soir.models import load_model

    return load_model(model_dir, tokenizer, dtype=dtype, device=device)


def relearn_attack(
    model_dir,
    tokenizer,
    forget_frame: pd.DataFrame,
    fraction: float = 0.5,
    steps: int = 20,
    lr: float = 1e-3,
    seed: int = 0,
    *,
    settings: RelearnSettings | None = None,
    device: str | None = None,
    dtype: str | None = None,
) -> dict:
    """Finetune a copy of the model on `fraction` of the forget subjects; forget metrics on the rest before and after.

    `model_dir`: a model directory (or a loaded model, which is copied, never changed).
    `settings` overrides `fraction`, `steps`, `lr` and `seed` when given.
    Returns a JSON-ready dict: settings, the split (subjects and row counts), `held_out` and
    `attacked` each with `before`, `after`, `recovered` (after − before), and the training log.
    """
    settings = settings or RelearnSettings(fraction=fraction, steps=steps, lr=lr, seed=seed)
    for column in ("input", "output"):
        if column not in forget_frame.columns:
            raise UserError(f"the forget split has no {column!r} column; it has: {', '.join(map(str, forget_frame.columns))}")
    frame = forget_frame.reset_index(drop=True)
    if "id" not in frame.columns:
        frame = frame.assign(id=[f"forget-{i}" for i in range(len(frame))])
    attack, held_out = split_by_subject(frame, settings.fraction, settings.seed)
    template = Template(settings.template)
    model = _load(model_dir, tokenizer, device, dtype)

    before = {"held_out": forget_metrics(model, tokenizer, held_out, settings, "held_out"), "attacked": forget_metrics(model, tokenizer, attack, settings, "attacked")}

    data = encode(attack, tokenizer, template, settings.max_length)
    stream = BatchStream(data, settings.batch_size, pad_id(tokenizer), seed=settings.seed)
    where = next(model.parameters()).device
    train = TrainSettings(steps=settings.steps, lr=settings.lr, warmup=0, schedule="constant", seed=settings.seed, progress=settings.progress)
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="soir-relearn-") as tmp:
        result = Trainer(model, get_objective("finetune"), {"train": lambda i: {k: v.to(where) for k, v in stream(i).items()}}, train, tmp).train()
        log = [json.loads(line) for line in (Path(tmp) / "log.jsonl").read_text().splitlines()]
    seconds = time.perf_counter() - start

    after = {"held_out": forget_metrics(model, tokenizer, held_out, settings, "held_out"), "attacked": forget_metrics(model, tokenizer, attack, settings, "attacked")}
    subjects = {"attacked": sorted(set(map(subject_of, attack["id"]))), "held_out": sorted(set(map(subject_of, held_out["id"])))}
    return {
        "settings": asdict(settings),
        "split": {
            "by": "subject (id without its SemEval suffix)",
            "attacked_subjects": subjects["attacked"],
            "held_out_subjects": subjects["held_out"],
            "attacked_rows": len(attack),
            "held_out_rows": len(held_out),
        },
        "held_out": {"before": before["held_out"], "after": after["held_out"], "recovered": _difference(before["held_out"], after["held_out"])},
        "attacked": {"before": before["attacked"], "after": after["attacked"], "recovered": _difference(before["attacked"], after["attacked"])},
        "train": {"steps": result.steps_done, "final_loss": result.final_loss, "seconds": seconds, "loss": [row["loss"] for row in log]},
    }


def summary_table(result: dict) -> pd.DataFrame:
    """Before / after / recovered of each metric, on the held-back and the attacked rows."""
    rows = []
    for side in ("held_out", "attacked"):
        for metric in METRICS:
            b, a, r = (result[side][k][metric] for k in ("before", "after", "recovered"))
            rows.append({"rows": side, "metric": metric, "before": b, "after": a, "recovered": r})
    return pd.DataFrame(rows)
