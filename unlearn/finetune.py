"""The finetune stage: NLL descent on the parameters of a model over one or more splits.

Two calls build the testbed's finetune-then-unlearn pair: a base model trained on `general`,
and a finetuned model trained from it on `forget` + `retain`. With `include`/`exclude` only
the matching tensors train (masked training, bit-identical elsewhere): the planted testbed
(benchmarks/planted.py) writes the forget knowledge into known tensors that way.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from soir.data import BatchStream, DataSettings, answer_accuracy, pad_id, teacher_forced
from soir.distributed import barrier, full_state_dict, is_main
from soir.io import check_out_dir, write_json
from soir.mask import Mask
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
    resume: bool = False
    overwrite: bool = False


def write_model(model, tokenizer, out: Path, state_dict: dict | None = None) -> None:
    """`save_pretrained` the model (or `state_dict`, a sharded model's gathered weights) and its
    tokenizer into `out`, each file replacing its old version atomically."""
    with tempfile.TemporaryDirectory(dir=out, prefix=".final-") as tmp:
        save_model(model, tokenizer, tmp, state_dict)
        for item in Path(tmp).iterdir():
            os.replace(item, Path(out) / item.name)


def finetune(settings: FinetuneSettings, eval_data: dict[str, Sequence[str]] | None = None) -> TrainResult:
    """Train, save the model and tokenizer into `settings.out`, and return the run's summary.

    Everything the user supplies is checked before anything is written.
    `eval_data` maps a name to split files whose teacher-forced answer accuracy is logged
    every `train.eval_every` steps.
    """
    out = Path(settings.out)
    tokenizer = settings.model.load_tokenizer()
    frame = settings.input.read(settings.data)
    evals = {name: settings.input.read(files) for name, files in (eval_data or {}).items()}
    model = settings.model.load(tokenizer, seed=settings.train.seed)
    mask = regex_mask(model, settings.include, settings.exclude) if settings.include or settings.exclude else Mask.full(model)
    check_out_dir(out, resume=settings.resume, overwrite=settings.overwrite)

    pad = pad_id(tokenizer)
    data = settings.input.encode(frame, tokenizer)
    stream = BatchStream(data, settings.train.batch_size, pad, seed=settings.train.seed)
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
        trainer = Trainer(model, get_objective("finetune"), {"train": lambda index: to_device(stream(index), device)}, train, out,
                          masked=masked, eval_callback=evaluate if encoded_evals else None)
        result = trainer.train(resume=settings.resume)
    state = full_state_dict(model)  # under --fsdp every process hands in its shards
    if not is_main():  # under torchrun one process writes
        return result
    write_model(model, tokenizer, out, state)
    write_json(out / "finetune.json", {"settings": asdict(settings) | {"train": asdict(train)}, "result": asdict(result)})
    return result
