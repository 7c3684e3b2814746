"""The finetune stage: NLL descent on the parameters of a model over one or more splits.

Two calls build the testbed's finetune-then-unlearn pair: a base model trained on `general`,
and a finetuned model trained from it on `forget` + `retain`. With `include`/`exclude` (whole
tensors) or `mask` (a `soir select` mask, element masks included) only the selected parameters
or entries train (masked training, bit-identical elsewhere). With `confined_data` and `confine`
(tensor regexes) or `confine_mask` (a mask, element masks included), every trained parameter
learns the rows of `data`, but the rows of `confined_data` reach only the confined tensors or
entries: batches mix both, and a confined row's loss flows through everything else as
constants. The planted testbeds (benchmarks/planted.py) write the forget knowledge into known
tensors or MLP neurons both ways.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch
from torch.func import functional_call

from soir.data import BatchStream, DataSettings, answer_accuracy, example_losses, pad_id, teacher_forced
from soir.distributed import barrier, full_state_dict, is_main
from soir.errors import UserError
from soir.io import check_out_dir, write_json
from soir.mask import Mask
from soir.mask import load as load_mask
from soir.models import ModelSettings, save_model
from soir.runtime import device_of, to_device
from unlearn.loop import CHECKPOINTS, Trainer, TrainResult, TrainSettings, shard_for_training
from unlearn.masking import MaskedParameters, regex_mask
from unlearn.objectives import get_objective


@dataclass(frozen=True)
class FinetuneSettings:
    """What to finetune on and how."""

    model: ModelSettings
    data: tuple[str, ...]
    out: str
    input: DataSettings = field(default_factory=DataSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    mask: str | None = None  # a `soir select` mask (directory or mask.safetensors): only what it selects trains
    confine: tuple[str, ...] = ()  # regexes: the tensors the rows of `confined_data` may train
    confine_mask: str | None = None  # or a mask: the parameters or entries the rows of `confined_data` may train
    confined_data: tuple[str, ...] = ()
    resume: bool = False
    overwrite: bool = False


def write_model(model, tokenizer, out: Path, state_dict: dict | None = None) -> None:
    """`save_pretrained` the model (or `state_dict`, a sharded model's gathered weights) and its
    tokenizer into `out`, each file replacing its old version atomically."""
    with tempfile.TemporaryDirectory(dir=out, prefix=".final-") as tmp:
        save_model(model, tokenizer, tmp, state_dict)
        for item in Path(tmp).iterdir():
            os.replace(item, Path(out) / item.name)


class ConfinedFinetune:
    """NLL descent where the rows flagged `confined` train only what the mask `confined` selects.

    The batch's loss is the same mean over its rows as plain finetuning; the confined rows run
    a second forward in which every parameter the mask does not select is detached, and an
    element-masked parameter p is seen as p.detach() + m ⊙ (p − p.detach()) (the same values, the
    gradient m ⊙ ∂L/∂p), so their gradient reaches only the selected entries while the free
    rows' gradient reaches every trained parameter.
    """

    streams = ("train",)
    needs_reference = False

    def __init__(self, model, confined: Mask):
        confined.check_fits(model, source="the confined mask")
        self.whole = set(confined.tensors)
        self.elements = dict(confined.elements)

    def confined_parameters(self, model) -> dict[str, torch.Tensor]:
        """The model's parameters as the confined rows see them."""
        params = {}
        for name, p in model.named_parameters():
            frozen = p.detach()
            if name in self.whole:
                params[name] = p
            elif name in self.elements:
                keep = self.elements[name].to(device=p.device, dtype=p.dtype)
                params[name] = frozen + keep * (p - frozen)
            else:
                params[name] = frozen
        return params

    def __call__(self, model, batches, reference=None):
        batch = batches["train"]
        flags = batch["confined"]
        parts = []
        if (~flags).any():
            parts.append(example_losses(model, _rows(batch, ~flags)))
        if flags.any():
            parts.append(example_losses(_Detached(model, self.confined_parameters(model)), _rows(batch, flags)))
        loss = torch.cat(parts).sum() / len(flags)
        return loss, {"nll": loss.detach()}


class _Detached:
    """A model called with some of its parameters replaced (torch.func.functional_call)."""

    def __init__(self, model, params):
        self.model, self.params = model, params

    def __call__(self, **inputs):
        return functional_call(self.model, self.params, (), inputs)


def _rows(batch: dict, keep: torch.Tensor) -> dict:
    return {k: v[keep] for k, v in batch.items() if k != "confined"}


def confined_mask(model, settings: FinetuneSettings, trained: Mask) -> Mask | None:
    """What the confined rows may train: the trained tensors `settings.confine` matches, or the mask
    `settings.confine_mask` (which must select only trained entries); None when nothing is confined."""
    if settings.confine_mask:
        confined = load_mask(settings.confine_mask)
        confined.check_fits(model, source=f"the --confine-mask {settings.confine_mask}")
        outside = [n for n in confined.names if (confined.element_mask(n) & ~trained.element_mask(n)).any()]
        if outside:
            raise UserError(f"--confine-mask selects entries of {outside[0]} that do not train (outside --mask/--include): "
                            "confine the rows to parameters that train")
        return confined
    if not settings.confine:
        return None
    trained_names = set(trained.names)
    names = set()
    for pattern in settings.confine:
        try:
            regex = re.compile(pattern)
        except re.error as exc:
            raise UserError(f"--confine {pattern!r} is not a regular expression: {exc}") from None
        found = {n for n, _ in model.named_parameters() if regex.search(n) and n in trained_names}
        if not found:
            raise UserError(f"--confine {pattern!r} matches no trained tensor of this model: check the names (e.g. model.layers.0.mlp)")
        names |= found
    return Mask.from_names(model, names, {"source": "confine", "confine": list(settings.confine)})


def trained_mask(model, settings: FinetuneSettings) -> Mask:
    """What trains: the mask `settings.mask`, the tensors `include`/`exclude` pick, or everything."""
    if settings.mask:
        mask = load_mask(settings.mask)
        mask.check_fits(model, source=f"the --mask {settings.mask}")
        return mask
    if settings.include or settings.exclude:
        return regex_mask(model, settings.include, settings.exclude)
    return Mask.full(model)


def finetune(settings: FinetuneSettings, eval_data: dict[str, Sequence[str]] | None = None) -> TrainResult:
    """Train, save the model and tokenizer into `settings.out`, and return the run's summary.

    Everything the user supplies is checked before anything is written.
    `eval_data` maps a name to split files whose teacher-forced answer accuracy is logged
    every `train.eval_every` steps.
    """
    out = Path(settings.out)
    tokenizer = settings.model.load_tokenizer()
    if settings.mask and (settings.include or settings.exclude):
        raise UserError("--mask cannot be combined with --include/--exclude: give one source of what trains")
    if settings.confine and settings.confine_mask:
        raise UserError("--confine and --confine-mask cannot be combined: give one source of what the confined rows train")
    if bool(settings.confine or settings.confine_mask) != bool(settings.confined_data):
        raise UserError("--confine (or --confine-mask) and --confined-data go together: what the confined rows may train, and those rows")
    frame = settings.input.read(settings.data) if settings.data else None
    confined_frame = settings.input.read(settings.confined_data) if settings.confined_data else None
    if frame is None and confined_frame is None:
        raise UserError("nothing to train on: give --data (or --confined-data with --confine)")
    evals = {name: settings.input.read(files) for name, files in (eval_data or {}).items()}
    model = settings.model.load(tokenizer, seed=settings.train.seed)
    mask = trained_mask(model, settings)
    confined = confined_mask(model, settings, mask)
    objective = ConfinedFinetune(model, confined) if confined is not None else get_objective("finetune")
    check_out_dir(out, resume=settings.resume, overwrite=settings.overwrite)

    pad = pad_id(tokenizer)
    frames = [f for f in (frame, confined_frame) if f is not None]
    data = settings.input.encode(pd.concat(frames, ignore_index=True), tokenizer)
    stream = BatchStream(data, settings.train.batch_size, pad, seed=settings.train.seed)
    flags = torch.zeros(len(data), dtype=torch.bool)
    flags[len(data) - (0 if confined_frame is None else len(confined_frame)):] = True

    def batch(index):
        rows = stream(index)
        if confined is not None:
            rows["confined"] = flags[stream.rows(index)]
        return to_device(rows, device)

    train = settings.train.resolve_steps(stream.batches_per_epoch)
    encoded_evals = {name: settings.input.encode(f, tokenizer) for name, f in evals.items()}
    device = device_of(model)

    def evaluate(model, step):
        return {f"{name}_accuracy": answer_accuracy(teacher_forced(model, enc, pad)) for name, enc in encoded_evals.items()}

    if settings.overwrite and not settings.resume and is_main():
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    barrier()
    shard_for_training(model, mask, train)  # --fsdp under torchrun
    with MaskedParameters(model, mask) as masked:
        trainer = Trainer(model, objective, {"train": batch}, train, out,
                          masked=masked, eval_callback=evaluate if encoded_evals else None)
        result = trainer.train(resume=settings.resume)
    state = full_state_dict(model)  # under --fsdp every process hands in its shards
    if not is_main():  # under torchrun one process writes
        return result
    write_model(model, tokenizer, out, state)
    write_json(out / "finetune.json", {"settings": asdict(settings) | {"train": asdict(train)}, "result": asdict(result)})
    return result
