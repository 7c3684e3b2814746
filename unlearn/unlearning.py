"""The unlearn stage: masked unlearning of a model on a forget split, keeping a retain split
(docs/design.md §7, §11).

Which parameters may change comes from one of

- `mask`: a mask directory or `mask.safetensors` (`soir select` writes them);
- `ranking` + `selection` (`SelectSettings`): a `soir rank` ranking, selected here with
  `soir.select.select`;
- `include` / `exclude`: regular expressions (`re.search`) over parameter names, selecting
  whole tensors (exclude-only: everything but those);
- nothing: every parameter.

Outside the mask nothing moves (`MaskedParameters`); KL, NPO, DPO and RMU compare with the
model as it was before unlearning, through a swap of the selected tensors (`make_reference`),
built before any checkpoint is loaded. Each step draws one forget batch (the forget stream
defines the epochs) and one retain batch (cycled, with its own shuffle). Objectives that train
on refusals (idk, dpo) also get `forget_idk`: the forget split with each answer replaced by a
refusal (`unlearn.objectives.with_refusals`, chosen by (seed, row id)), shuffled like `forget`
so both streams hold the same rows at every step.

`--out` receives the unlearned model (`save_pretrained` + tokenizer), `log.jsonl` (every
loss component each step, evaluation rows as `eval/...`), `eval.jsonl` (evaluation rows,
step 0 = before unlearning), `checkpoints/` (the selected tensors and optimiser state, with
`save_every`), the mask (`mask.safetensors`, `mask.json`) and `unlearn.json` (all settings
and the result). Everything the user supplies is checked before anything is written.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Mapping

import pandas as pd
import torch

from soir.data import BatchStream, DataSettings, answer_accuracy, pad_id, teacher_forced
from soir.distributed import barrier, full_state_dict, is_main
from soir.errors import UserError
from soir.io import check_out_dir, write_json
from soir.mask import TENSORS_FILE, Mask
from soir.mask import load as load_mask
from soir.models import ModelSettings
from soir.ranking import load as load_ranking
from soir.runtime import device_of, to_device
from soir.select import SelectSettings, select
from unlearn.finetune import write_model
from unlearn.loop import CHECKPOINTS, EvalCallback, Trainer, TrainResult, TrainSettings, shard_for_training
from unlearn.masking import MaskedParameters, regex_mask
from unlearn.objectives import (
    IDK_STREAM,
    OBJECTIVES,
    ObjectiveSettings,
    get_objective,
    unlearns,
    with_refusals,
)
from unlearn.reference import make_reference

EVAL_FILE = "eval.jsonl"
SETTINGS_FILE = "unlearn.json"


@dataclass(frozen=True)
class UnlearnSettings:
    """What to unlearn, on which parameters, and how (an epoch is one pass over the forget split)."""

    model: ModelSettings
    forget: tuple[str, ...]
    retain: tuple[str, ...]
    out: str
    objective: str = "graddiff"
    weights: ObjectiveSettings = field(default_factory=ObjectiveSettings)
    # the mask: at most one source
    mask: str | None = None
    ranking: str | None = None
    selection: SelectSettings | None = None  # how to select from `ranking`
    include: tuple[str, ...] = ()  # without a ranking: regexes over parameter names, selected whole
    exclude: tuple[str, ...] = ()
    input: DataSettings = field(default_factory=DataSettings)
    train: TrainSettings = field(default_factory=lambda: TrainSettings(lr=1e-5))
    resume: bool = False
    overwrite: bool = False


@dataclass
class UnlearnResult(TrainResult):
    """A training run's summary, plus which reference model the objective compared with."""

    reference: str | None = None


# ---------------------------------------------------------------- the mask


def _check_sources(s: UnlearnSettings) -> None:
    regex = bool(s.include or s.exclude)
    if s.mask and (s.ranking or regex):
        raise UserError("--mask cannot be combined with --ranking or --include/--exclude: give one source of the mask")
    if s.ranking and regex:
        raise UserError("with --ranking, --include/--exclude scope the ranking's groups: give them in the selection settings")
    if s.ranking and s.selection is None:
        raise UserError("--ranking needs --top (a fraction like 0.1, or a count of groups)")
    if s.selection is not None and not s.ranking:
        raise UserError("--top selects from a ranking: give --ranking DIR too (or a ready mask with --mask)")


def build_mask(model, s: UnlearnSettings) -> Mask:
    """The mask of `s` for `model`, checked to fit it."""
    _check_sources(s)
    if s.mask:
        mask = load_mask(s.mask)
        mask.check_fits(model, source=f"the mask {s.mask}")
        return mask
    if s.ranking:
        ranking = load_ranking(s.ranking)
        mask = select(ranking, model, s.selection)
        mask.check_fits(model, source=f"the selection from {s.ranking}")
        return mask
    if s.include or s.exclude:
        return regex_mask(model, s.include, s.exclude, {"source": "regex", "include": list(s.include), "exclude": list(s.exclude)})
    return Mask.full(model, {"source": "all"})


def same_mask(a: Mask, b: Mask) -> bool:
    return (
        a.fingerprint == b.fingerprint and a.tensors == b.tensors and a.elements.keys() == b.elements.keys()
        and all(torch.equal(a.elements[n], b.elements[n]) for n in a.elements)
    )


# ---------------------------------------------------------------- evaluation


def accuracy_callback(encoded: Mapping, pad: int) -> EvalCallback:
    """Teacher-forced answer accuracy and answer loss on each encoded split (`forget`, `retain`)."""

    def evaluate(model, step):
        row = {}
        for name, data in encoded.items():
            table = teacher_forced(model, data, pad)
            row[f"{name}_accuracy"] = answer_accuracy(table)
            row[f"{name}_loss"] = float(table["loss"].mean())
        return row

    return evaluate


class _EvalRows:
    """Wraps an evaluation callback: every row it returns is also appended to eval.jsonl."""

    def __init__(self, callback: EvalCallback, path: Path):
        self.callback, self.path = callback, path

    def __call__(self, model, step):
        row = {k: float(v) for k, v in dict(self.callback(model, step)).items()}
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"step": step, **row}) + "\n")
        return row


def _keep_eval_rows(path: Path, upto: int) -> None:
    rows = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= upto] if path.exists() else []
    path.write_text("".join(line + "\n" for line in rows))


# ---------------------------------------------------------------- the stage


def unlearn_model(
    model,
    tokenizer,
    forget: pd.DataFrame,
    retain: pd.DataFrame,
    mask: Mask | None = None,
    *,
    objective: str = "graddiff",
    weights: ObjectiveSettings = ObjectiveSettings(),
    train: TrainSettings = TrainSettings(lr=1e-5),
    data: DataSettings = DataSettings(),
    out: str | Path | None = None,
    resume: bool = False,
    eval_callback: EvalCallback | None = None,
) -> "UnlearnResult":
    """Unlearn `forget` while keeping `retain`, changing only what `mask` selects (None: everything),
    on the model as it is in memory (changed in place; its requires_grad flags are restored after).

    `out` receives the mask, `log.jsonl`, `eval.jsonl` and checkpoints (`train.save_every`;
    `resume` continues from the latest); None runs in a temporary directory and keeps nothing
    on disk. `eval_callback(model, step) -> {name: value}` runs before the first step and every
    `train.eval_every` steps (None: teacher-forced answer accuracy and loss on forget and retain);
    its rows are also in the result's `evals`.
    """
    unlearning = get_objective(objective, weights)
    if not unlearns(unlearning):
        raise UserError(f"objective {objective} does not unlearn (it has no forget term): use one of "
                        f"{', '.join(n for n, o in OBJECTIVES.items() if unlearns(o))}")
    mask = Mask.full(model, {"source": "all"}) if mask is None else mask
    mask.check_fits(model)
    prepare_objective(unlearning, model, mask, train.seed)
    pad = pad_id(tokenizer)
    encoded = {"forget": data.encode(forget, tokenizer), "retain": data.encode(retain, tokenizer)}
    streams = {
        "forget": BatchStream(encoded["forget"], train.batch_size, pad, seed=train.seed),
        "retain": BatchStream(encoded["retain"], train.batch_size, pad, seed=train.seed + 1),
    }
    if IDK_STREAM in unlearning.streams:  # the same rows as `forget` at every step: same length, same seed
        streams[IDK_STREAM] = BatchStream(data.encode(with_refusals(forget, seed=train.seed), tokenizer), train.batch_size, pad,
                                          seed=train.seed)
    train = train.resolve_steps(streams["forget"].batches_per_epoch)
    device = device_of(model)
    shard_for_training(model, mask, train)  # --fsdp under torchrun
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    with contextlib.ExitStack() as stack:
        if out is None:
            out = stack.enter_context(tempfile.TemporaryDirectory(prefix="soir-unlearn-"))
            train = replace(train, save_every=0)
        out = Path(out)
        stack.callback(_restore_flags, model, flags)
        # masked parameters and the reference, from the model as it was before unlearning
        masked = stack.enter_context(MaskedParameters(model, mask))
        reference = make_reference(model, mask) if unlearning.needs_reference else None
        out.mkdir(parents=True, exist_ok=True)
        if is_main():  # under torchrun one process writes; every one trains on its share of each batch
            mask.save(out)
        callback = _EvalRows(eval_callback or accuracy_callback(encoded, pad), out / EVAL_FILE) if train.eval_every else None

        def on_start(resumed_from: int | None) -> None:
            if callback is None or not is_main():
                return
            if resumed_from is not None:
                _keep_eval_rows(callback.path, resumed_from)
            else:
                callback.path.write_text("")
                with torch.no_grad():
                    callback(model.eval(), 0)

        trainer = Trainer(
            model, unlearning, {name: _on_device(st, device) for name, st in streams.items() if name in unlearning.streams}, train, out,
            masked=masked, eval_callback=callback, reference=reference, on_start=on_start,
        )
        done = trainer.train(resume=resume)
        evals = [json.loads(line) for line in callback.path.read_text().splitlines()] if callback is not None and is_main() else []
    return UnlearnResult(**{**asdict(done), "evals": evals, "train": asdict(train)},
                         reference=type(reference).__name__ if reference is not None else None)


def prepare_objective(objective, model, mask: Mask, seed: int) -> None:
    """Let an objective that needs the model and the mask (RMU) fix itself before training; its
    mistakes (a layer out of range) surface here, before anything is written."""
    prepare = getattr(objective, "prepare", None)
    if prepare is not None:
        prepare(model, mask, seed=seed)


def _on_device(stream: BatchStream, device) -> Callable[[int], dict]:
    return lambda index: to_device(stream(index), device)


def _restore_flags(model, flags: Mapping[str, bool]) -> None:
    for name, param in model.named_parameters():
        param.requires_grad_(flags[name])


def unlearn(settings: UnlearnSettings, eval_callback: EvalCallback | None = None) -> "UnlearnResult":
    """Load the model and splits of `settings`, unlearn (`unlearn_model`), and write the model and
    every artifact into `settings.out`; return the run's summary.

    Nothing is written when a setting, file, model or mask is wrong.
    """
    s = settings
    out = Path(s.out)
    # ---- check everything the user gave, before writing anything
    _check_sources(s)
    objective = get_objective(s.objective, s.weights)
    tokenizer = s.model.load_tokenizer()
    frames = {"forget": s.input.read(s.forget), "retain": s.input.read(s.retain)}
    model = s.model.load(tokenizer, seed=s.train.seed)
    mask = build_mask(model, s)
    prepare_objective(objective, model, mask, s.train.seed)
    check_out_dir(out, resume=s.resume, overwrite=s.overwrite)
    if s.resume and (out / TENSORS_FILE).is_file():
        if not same_mask(load_mask(out), mask):
            raise UserError(f"--resume in {out} needs the mask that run used (its {TENSORS_FILE}); give the same --mask/--ranking/--include flags")
    if s.overwrite and not s.resume and is_main():
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    barrier()
    result = unlearn_model(model, tokenizer, frames["forget"], frames["retain"], mask, objective=s.objective, weights=s.weights,
                           train=s.train, data=s.input, out=out, resume=s.resume, eval_callback=eval_callback)
    state = full_state_dict(model)  # under --fsdp every process hands in its shards
    if not is_main():
        return result
    write_model(model, tokenizer, out, state)
    summary = {k: v for k, v in mask.summary().items() if k in ("n_selected", "n_total", "fraction", "settings")}
    write_json(out / SETTINGS_FILE, {
        "settings": asdict(s) | {"train": result.train},
        "mask": summary,
        "reference": result.reference,
        "result": {k: v for k, v in asdict(result).items() if k not in ("evals", "train", "reference")},
    })
    return result
