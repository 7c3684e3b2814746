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
built before any checkpoint is loaded. With `lora_rank` r > 0 the mask must select whole weights
of linear layers, and those modules get LoRA adapters instead (peft, `LoraAdapters`): W x +
(α/r)·B A x with B = 0 at the start; only A and B train (and are checkpointed), the reference is
the model with its adapters off (`AdapterReference`), and at the end W ← W + (α/r)·B A is merged
in, so the saved model is a plain one with its own parameter names.

Each step draws one forget batch (the forget stream defines the epochs) and one retain batch
(cycled, with its own shuffle). Objectives that train on refusals (idk, dpo) also get `forget_idk`: the forget split with each answer replaced by a
preferred answer (`unlearn.objectives.preferred_frame`: a refusal chosen by (seed, row id), or altpo's alternate), shuffled like `forget`
so both streams hold the same rows at every step.

`--out` receives the unlearned model (`save_pretrained` + tokenizer), `log.jsonl` (every
loss component each step, evaluation rows as `eval/...`), `eval.jsonl` (evaluation rows,
step 0 = before unlearning), `checkpoints/` (the selected tensors, or the adapters, and the
optimiser state, with `save_every`), the mask (`mask.safetensors`, `mask.json`), with LoRA
`lora.json` (rank, α, modules) and `unlearn.json` (all settings and the result). Everything the
user supplies is checked before anything is written.
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
from soir.settings import setting
from unlearn.finetune import write_model
from unlearn.loop import CHECKPOINTS, EvalCallback, Trainer, TrainResult, TrainSettings, shard_for_training
from unlearn.masking import MaskedParameters, regex_mask
from unlearn.objectives import (
    IDK_STREAM,
    OBJECTIVES,
    ObjectiveSettings,
    get_objective,
    preferred_frame,
    unlearns,
)
from unlearn.reference import AdapterReference, make_reference

EVAL_FILE = "eval.jsonl"
SETTINGS_FILE = "unlearn.json"
LORA_FILE = "lora.json"


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
    lora_rank: int = setting(0, "train rank-R LoRA adapters (peft) on the linear layers whose weights the mask selects, merged into "
                                "them at the end, instead of the weights themselves (0: off)", metavar="R")
    lora_alpha: float | None = setting(None, "LoRA's α: the adapted layer computes W x + (α/R)·B A x (default: 2R)", metavar="A")
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


# ---------------------------------------------------------------- LoRA


def check_lora(rank: int, alpha: float | None, train: TrainSettings) -> None:
    """UserError for LoRA settings that cannot run."""
    if rank < 0:
        raise UserError(f"--lora-rank must be 0 (off) or positive, got {rank}")
    if alpha is not None and not alpha > 0:
        raise UserError(f"--lora-alpha must be positive, got {alpha}")
    if rank and train.fsdp:
        raise UserError("--lora-rank does not run under --fsdp: its adapters are small, run with plain torchrun (data parallel) instead")


def lora_targets(model, mask: Mask) -> list[str]:
    """The modules LoRA adapts: those whose weights `mask` selects. Every selected tensor must be the
    whole weight of an `nn.Linear` (or GPT-2's `Conv1D`) and belong to that module alone."""
    from transformers.pytorch_utils import Conv1D

    if mask.elements:
        first, more = next(iter(mask.elements)), len(mask.elements) - 1
        raise UserError(f"--lora-rank adapts whole linear weights, and this mask selects entries of {first}"
                        f"{f' and {more} more tensors' if more else ''}: select whole tensors (rank by tensor or module) or run without --lora-rank")
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    named = dict(model.named_parameters())
    targets = []
    for name in mask.tensors:
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        shared = [n for n in owners[id(named[name])] if n != name]
        if leaf != "weight" or not isinstance(module, (torch.nn.Linear, Conv1D)) or shared:
            kind = type(module).__name__
            what = f"shared with {shared[0]}" if shared and leaf == "weight" else f"the {leaf} of {'an' if kind[0] in 'AEIOU' else 'a'} {kind}"
            raise UserError(f"--lora-rank adapts the weights of linear layers, and the mask selects {name} ({what}): leave it out "
                            "(e.g. --exclude 'bias|norm|embed|wte|wpe') or run without --lora-rank")
        targets.append(module_name)
    return targets


class LoraAdapters:
    """LoRA adapters (peft's `LoraModel`, injected in place) on `modules` of `model`: each computes
    W x + (α/r)·B A x, A (r × in) drawn from a generator seeded with `seed`, B (out × r) zero, so
    training starts at the model itself; every other parameter is frozen, adapters are float32 on
    half-precision weights. A context manager: leaving it merges W ← W + (α/r)·B A into every adapted
    weight and removes the adapters (peft's `merge_and_unload`), leaving a plain model with its own
    parameter names; nothing outside `modules` is touched."""

    def __init__(self, model, modules: list[str], rank: int, alpha: float | None = None, seed: int = 0):
        from peft import LoraConfig
        from peft.tuners.lora import LoraModel
        from peft.tuners.tuners_utils import cast_adapter_dtype
        from transformers.pytorch_utils import Conv1D

        self.model, self.modules, self.rank = model, list(modules), rank
        self.alpha = float(2 * rank if alpha is None else alpha)
        conv1d = all(isinstance(model.get_submodule(m), Conv1D) for m in self.modules)  # GPT-2: weights stored (in, out)
        config = LoraConfig(r=rank, lora_alpha=self.alpha, target_modules=self.modules, lora_dropout=0.0, bias="none",
                            fan_in_fan_out=conv1d)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.tuner = LoraModel(model, config, "default")
        cast_adapter_dtype(model, "default")
        if sorted(self.tuner.targeted_module_names) != sorted(self.modules):
            raise RuntimeError(f"peft adapted {sorted(self.tuner.targeted_module_names)[:3]}…, not the modules asked for")

    def __enter__(self) -> "LoraAdapters":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def trained(self) -> dict[str, torch.Tensor]:
        """name -> the adapter tensors (every lora_A and lora_B), the only parameters left trainable."""
        return {name: p for name, p in self.model.named_parameters() if p.requires_grad}

    def reference(self) -> AdapterReference:
        """The model before unlearning: this model with its adapters off."""
        return AdapterReference(self.tuner)

    def summary(self) -> dict:
        n = sum(p.numel() for p in self.trained().values())
        return {"rank": self.rank, "alpha": self.alpha, "modules": self.modules, "n_adapter_params": n}

    def close(self) -> None:
        """Merge the adapters into their weights and remove them (once)."""
        if self.tuner is not None:
            self.tuner.merge_and_unload()
            self.tuner = None


def _check_lora_resume(out: Path, rank: int, alpha: float | None) -> None:
    """A resumed run must train what its checkpoints hold: the same adapters (or none)."""
    if not any((out / CHECKPOINTS).glob("step-*")):
        return
    path = out / LORA_FILE
    before = json.loads(path.read_text()) if path.is_file() else {"rank": 0, "alpha": None}
    now = {"rank": rank, "alpha": float(2 * rank if alpha is None else alpha) if rank else None}
    if (before["rank"], before["alpha"] if before["rank"] else None) != (now["rank"], now["alpha"]):
        was = f"--lora-rank {before['rank']} --lora-alpha {before['alpha']:g}" if before["rank"] else "no --lora-rank"
        raise UserError(f"--resume in {out} needs the LoRA settings its checkpoints were made with ({was})")


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
    lora_rank: int = 0,
    lora_alpha: float | None = None,
) -> "UnlearnResult":
    """Unlearn `forget` while keeping `retain`, changing only what `mask` selects (None: everything),
    on the model as it is in memory (changed in place; its requires_grad flags are restored after).
    With `lora_rank` > 0 the selected linear weights change through merged LoRA adapters
    (`LoraAdapters`, α = `lora_alpha`, default 2·rank) instead.

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
    check_lora(lora_rank, lora_alpha, train)
    targets = lora_targets(model, mask) if lora_rank else None
    prepare_objective(unlearning, model, mask, train.seed)
    pad = pad_id(tokenizer)
    encoded = {"forget": data.encode(forget, tokenizer), "retain": data.encode(retain, tokenizer)}
    streams = {
        "forget": BatchStream(encoded["forget"], train.batch_size, pad, seed=train.seed),
        "retain": BatchStream(encoded["retain"], train.batch_size, pad, seed=train.seed + 1),
    }
    if IDK_STREAM in unlearning.streams:  # the same rows as `forget` at every step: same length, same seed
        streams[IDK_STREAM] = BatchStream(data.encode(preferred_frame(unlearning, forget, seed=train.seed), tokenizer), train.batch_size, pad,
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
        # masked parameters (or adapters) and the reference, from the model as it was before unlearning
        adapters = None
        if targets is None:
            masked, parameters = stack.enter_context(MaskedParameters(model, mask)), None
            reference = make_reference(model, mask) if unlearning.needs_reference else None
        else:  # merged into the weights when the stack closes, before the flags are restored
            adapters = stack.enter_context(LoraAdapters(model, targets, lora_rank, lora_alpha, seed=train.seed))
            masked, parameters = None, adapters.trained()
            reference = adapters.reference() if unlearning.needs_reference else None
        out.mkdir(parents=True, exist_ok=True)
        if is_main():  # under torchrun one process writes; every one trains on its share of each batch
            mask.save(out)
            if adapters is not None:
                write_json(out / LORA_FILE, adapters.summary())
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
            parameters=parameters, masked=masked, eval_callback=callback, reference=reference, on_start=on_start,
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
    check_lora(s.lora_rank, s.lora_alpha, s.train)
    objective = get_objective(s.objective, s.weights)
    tokenizer = s.model.load_tokenizer()
    frames = {"forget": s.input.read(s.forget), "retain": s.input.read(s.retain)}
    model = s.model.load(tokenizer, seed=s.train.seed)
    mask = build_mask(model, s)
    if s.lora_rank:
        lora_targets(model, mask)
    prepare_objective(objective, model, mask, s.train.seed)
    check_out_dir(out, resume=s.resume, overwrite=s.overwrite)
    if s.resume and (out / TENSORS_FILE).is_file():
        if not same_mask(load_mask(out), mask):
            raise UserError(f"--resume in {out} needs the mask that run used (its {TENSORS_FILE}); give the same --mask/--ranking/--include flags")
    if s.resume:
        _check_lora_resume(out, s.lora_rank, s.lora_alpha)
    if s.overwrite and not s.resume and is_main():
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
        (out / LORA_FILE).unlink(missing_ok=True)
    barrier()
    result = unlearn_model(model, tokenizer, frames["forget"], frames["retain"], mask, objective=s.objective, weights=s.weights,
                           train=s.train, data=s.input, out=out, resume=s.resume, eval_callback=eval_callback,
                           lora_rank=s.lora_rank, lora_alpha=s.lora_alpha)
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
