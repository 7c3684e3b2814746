"""What the evidence benchmarks share: a `soir demo` testbed loaded once, "unlearn a fresh
copy of a model with a mask, then measure teacher-forced answer accuracy", and the relearning
attack on a result."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analysis.relearn import RelearnSettings, relearn_attack  # noqa: E402
from soir.data import Encoded, answer_accuracy, encode, pad_id, read_split, teacher_forced  # noqa: E402
from soir.mask import Mask  # noqa: E402
from soir.models import load_model, load_tokenizer  # noqa: E402
from unlearn.loop import TrainSettings  # noqa: E402
from unlearn.unlearning import unlearn_model  # noqa: E402


@dataclass
class Testbed:
    """A `soir demo` output directory (base/, oracle/, finetuned/, data/) with its splits read and encoded."""

    path: Path

    def __post_init__(self):
        self.path = Path(self.path)
        self.tokenizer = load_tokenizer(self.path / "data" / "tokenizer")
        self.pad = pad_id(self.tokenizer)
        self.frames = {s: read_split(self.path / "data" / f"{s}.parquet") for s in ("forget", "retain")}
        self.encoded = {s: encode(f, self.tokenizer) for s, f in self.frames.items()}

    def model(self, name: str | Path = "finetuned", eager: bool = False):
        """A fresh float32 copy of the testbed's `name` model (or of a model directory)."""
        return load_model(self.path / name, self.tokenizer, eager_attention=eager, dtype="float32")

    def accuracies(self, model, sets: dict[str, Encoded] | None = None) -> dict[str, float]:
        """Teacher-forced answer accuracy on each set (default: forget and retain, as `{split}_accuracy`)."""
        sets = sets if sets is not None else {f"{s}_accuracy": e for s, e in self.encoded.items()}
        return {name: answer_accuracy(teacher_forced(model, enc, self.pad)) for name, enc in sets.items()}

    def unlearn(self, start: str | Path, mask: Mask, objective: str, lr: float, steps: int, seed: int, retain: pd.DataFrame | None = None):
        """A fresh copy of `start` unlearned with `mask` (batch 32, no warmup) on the forget split and
        `retain` (default: the whole retain split)."""
        model = self.model(start)
        retain = self.frames["retain"] if retain is None else retain
        unlearn_model(model, self.tokenizer, self.frames["forget"], retain, mask, objective=objective,
                      train=TrainSettings(steps=steps, lr=lr, batch_size=32, warmup=0, seed=seed, progress=False))
        return model

    def unlearned(self, start: str | Path, mask: Mask, objective: str, lr: float, steps: int, seed: int,
                  sets: dict[str, Encoded] | None = None) -> dict[str, float]:
        """Accuracies after unlearning a fresh copy of `start` with `mask` (`unlearn`)."""
        return self.accuracies(self.unlearn(start, mask, objective, lr, steps, seed), sets)

    def relearned(self, model, steps: int, seed: int) -> dict[str, float]:
        """The relearning attack (`analysis.relearn`: `steps` AdamW steps on half of the forget subjects) on a
        copy of `model`: teacher-forced forget accuracy on the other half before and after, and the gain.
        Knowledge only suppressed comes back; {} when `steps` is 0."""
        if not steps:
            return {}
        held = relearn_attack(model, self.tokenizer, self.frames["forget"],
                              settings=RelearnSettings(steps=steps, seed=seed, generate=False, progress=False))["held_out"]
        return {"relearn_before": held["before"]["accuracy"], "relearn_after": held["after"]["accuracy"], "relearned": held["recovered"]["accuracy"]}
