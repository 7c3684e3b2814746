"""The training loop shared by finetuning and unlearning (docs/design.md §7).

Steps (or epochs), a warmup + cosine/linear/constant schedule, gradient clipping and
accumulation, an evaluation callback every N steps, a JSONL log, a tqdm bar, atomic
safetensors checkpoints of the trained tensors and the optimiser state, exact resume, and
a stop on a non-finite loss that keeps the last good checkpoint.

Batches are a pure function of the step (`soir.data.BatchStream`), and the learning rate is a
pure function of the step, so a checkpoint needs only tensors, the optimiser state and the
RNG state to resume bit-identically. An optimiser with a curvature estimate (`hessian_every`,
SophiaG) gets its Gauss–Newton–Bartlett pass before updates 0, k, 2k, …, with labels sampled
from a generator seeded by (seed, step): the schedule and the samples are pure functions of
the step too. Under torchrun the model runs under DistributedDataParallel: each process trains
on its share of every batch's rows and DDP averages the gradients during the last micro-batch's
backward (`soir.distributed.data_parallel`); the main process logs and saves.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Mapping

import torch
from safetensors.torch import load_file, save_file

from soir.distributed import (
    average,
    barrier,
    data_parallel,
    is_main,
    is_sharded,
    shard_batch,
    shard_like,
    shard_model,
    whole,
    world_size,
)
from soir.errors import UserError
from soir.io import atomic_path
from soir.runtime import device_of, tqdm
from soir.settings import setting
from unlearn.masking import MaskedParameters
from unlearn.objectives import gnb_loss, hessian_streams
from unlearn.optimizers import OPTIMIZERS, check_sophia, make_optimizer

CHECKPOINTS = "checkpoints"
# settings that shape the trajectory: a resumed run must use the ones its checkpoint was made with
TRAJECTORY = ("steps", "lr", "optimizer", "weight_decay", "betas", "momentum", "rho", "sophia_betas", "hessian_every", "sophia_eps",
              "warmup", "schedule", "min_lr_ratio", "max_grad_norm", "grad_accum", "batch_size", "seed")
EvalCallback = Callable[[torch.nn.Module, int], Mapping[str, float]]


@dataclass(frozen=True)
class TrainSettings:
    """How to train: length, batches, optimiser, schedule, and how often to log, evaluate and save.

    `epochs`, when set, replaces `steps` (the stage turns it into steps: `resolve_steps`).
    """

    steps: int = setting(100, "optimiser steps")
    epochs: float | None = setting(None, "passes over the data, instead of --steps")
    batch_size: int = setting(32, "rows per batch")
    lr: float = setting(1e-3, "peak learning rate")
    optimizer: str = setting("adamw", "the optimiser", choices=OPTIMIZERS)
    weight_decay: float = setting(0.0, "weight decay")
    betas: tuple[float, float] = setting((0.9, 0.999), "AdamW's β1 β2")
    momentum: float = setting(0.0, "SGD momentum")
    rho: float = setting(0.04, "SophiaG's ρ: the Hessian's scale in the clipped step m / max(ρ·h, ε) (Liu et al. 2023; "
                               "the reference implementation's default)")
    sophia_betas: tuple[float, float] = setting((0.965, 0.99), "SophiaG's β1 (momentum) and β2 (Hessian average), "
                                                               "the reference implementation's defaults", metavar="B")
    hessian_every: int = setting(10, "SophiaG: refresh the Gauss–Newton–Bartlett Hessian estimate every K steps, one extra "
                                     "forward and backward each (the paper's k = 10)", metavar="K")
    sophia_eps: float = setting(1e-12, "SophiaG's ε, the floor of ρ·h (the paper's 1e-12)", metavar="EPS")
    warmup: float = setting(0.05, "warmup: a fraction of the steps (< 1) or a step count")
    schedule: str = setting("cosine", "learning-rate decay after warmup", choices=("cosine", "linear", "constant"))
    min_lr_ratio: float = setting(0.0, "the learning rate at the end of the schedule, as a fraction of --lr")
    max_grad_norm: float | None = setting(1.0, "gradient clipping norm; 0 turns it off")
    grad_accum: int = setting(1, "micro-batches per step")
    eval_every: int = setting(0, "log teacher-forced answer accuracy every N steps (0: off)", metavar="N")
    save_every: int = setting(0, "checkpoint every N steps for --resume (0: off)", metavar="N")
    keep_checkpoints: int = setting(2, "checkpoints kept")
    gradient_checkpointing: bool = setting(False, "recompute each block's activations during backward instead of keeping them "
                                                  "(transformers' gradient checkpointing): less memory for about one more forward")
    fsdp: bool = setting(False, "under torchrun, shard weights, gradients and optimiser state over the processes (FSDP2, a unit per "
                                "transformer block) for a model that does not fit on one device; whole-tensor masks and float32 "
                                "weights; with one process it does nothing")
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        if self.steps <= 0:
            raise UserError(f"the step count must be positive, got {self.steps}")
        if not self.lr > 0:
            raise UserError(f"the learning rate must be positive, got {self.lr}")
        if self.grad_accum < 1:
            raise UserError(f"gradient accumulation must be at least 1, got {self.grad_accum}")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise UserError(f"unknown schedule {self.schedule!r}: use cosine, linear or constant")
        if self.batch_size <= 0:
            raise UserError(f"--batch-size must be positive, got {self.batch_size}")
        if self.epochs is not None and not self.epochs > 0:
            raise UserError(f"--epochs must be positive, got {self.epochs}")
        OPTIMIZERS.get(self.optimizer)
        check_sophia(self.rho, self.sophia_betas, self.sophia_eps, self.hessian_every)

    def resolve_steps(self, batches_per_epoch: int) -> "TrainSettings":
        """These settings with `epochs` (if set) turned into a step count."""
        if self.epochs is None:
            return self
        return replace(self, steps=math.ceil(self.epochs * batches_per_epoch / self.grad_accum))

    def lr_at(self, step: int) -> float:
        """Learning rate of update `step` (0-based)."""
        warmup = int(self.warmup * self.steps) if self.warmup < 1 else int(self.warmup)
        if step < warmup:
            return self.lr * (step + 1) / warmup
        if self.schedule == "constant":
            return self.lr
        progress = (step - warmup) / max(1, self.steps - warmup)
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if self.schedule == "cosine" else 1 - progress
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * shape)


@dataclass
class TrainResult:
    """What a run did; `evals` holds its evaluation rows, `train` the settings it ran with (steps resolved),
    `parallel` how it ran: "none" (one process), "ddp" (DistributedDataParallel) or "fsdp", and on how many processes."""

    steps_done: int
    final_loss: float
    seconds: float
    tokens: int
    resumed_from: int | None
    parallel: str = "none"
    evals: list[dict] = field(default_factory=list)
    train: dict | None = None


def gradient_checkpointing(model: torch.nn.Module, on: bool) -> None:
    """transformers' gradient checkpointing, non-reentrant (it works with frozen inputs and double
    backward); transformers 5 calls it activation checkpointing."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise UserError(f"{type(model).__name__} does not support gradient checkpointing: run without --gradient-checkpointing")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs) if on else model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs) if on else model.gradient_checkpointing_disable()


def shard_for_training(model: torch.nn.Module, mask, settings: TrainSettings) -> None:
    """With `settings.fsdp` under torchrun, check that this run can be sharded and shard `model`
    (`soir.distributed.shard_model`); before the masked parameters and the reference are built."""
    if not settings.fsdp or world_size() == 1:
        return
    if mask.elements:
        raise UserError("--fsdp trains whole tensors, and this mask selects entries of some: select tensors, modules or layers, "
                        "or run without --fsdp")
    dtypes = {str(p.dtype).removeprefix("torch.") for p in model.parameters()} - {"float32"}
    if dtypes:
        raise UserError(f"--fsdp keeps float32 weights (they are the sharded optimiser masters), and this model has {', '.join(sorted(dtypes))}: "
                        "load it with --dtype float32")
    if settings.eval_every:
        raise UserError("--eval-every does not run under --fsdp yet: turn it off and evaluate the saved model (soir evaluate)")
    shard_model(model)


class NonFiniteLoss(UserError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def checkpoint_problem(path: Path) -> str | None:
    """What is wrong with a checkpoint directory (a missing, truncated or unreadable file), or None."""
    from safetensors import safe_open

    try:
        state = json.loads((path / "state.json").read_text())
        int(state["step"]), dict(state["settings"])
    except FileNotFoundError:
        return "no state.json"
    except (ValueError, KeyError, TypeError) as exc:
        return f"state.json unreadable: {type(exc).__name__}"
    for name in ("weights.safetensors", "optimizer.safetensors"):
        try:
            with safe_open(str(path / name), framework="pt"):
                pass
        except FileNotFoundError:
            return f"no {name}"
        except Exception as exc:  # safetensors checks that the header covers the whole file
            return f"{name}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    return None


class Trainer:
    """Runs an objective over named batch streams, training only `parameters`.

    `parameters` are the tensors the optimiser updates (default: the model's parameters with
    requires_grad). Under a mask they come from `masked` (`MaskedParameters.trained()`): its
    gradients are collected after each step's backward passes and its copies written into the
    model after every optimiser step and after a checkpoint is loaded. `on_start(step)` runs
    once before training, with the step resumed from (None for a fresh start); `reference` is
    handed to the objective.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        objective,
        streams: Mapping[str, Callable[[int], dict]],
        settings: TrainSettings,
        out: str | Path,
        parameters: Mapping[str, torch.Tensor] | None = None,
        eval_callback: EvalCallback | None = None,
        reference=None,
        masked: MaskedParameters | None = None,
        on_start: Callable[[int | None], None] | None = None,
    ):
        missing = [s for s in objective.streams if s not in streams]
        if missing:
            raise UserError(f"the objective needs data for {', '.join(missing)}")
        self.model, self.objective, self.streams, self.settings = model, objective, streams, settings
        self.out = Path(out)
        if parameters is None:
            parameters = masked.trained() if masked is not None else {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.params = dict(parameters)
        self.names = {id(p): n for n, p in self.params.items()}
        self.optimizer = make_optimizer(settings.optimizer, self.params.values(), settings)
        if world_size() > 1 and getattr(self.optimizer, "hessian_every", 0):
            raise UserError(f"--optimizer {settings.optimizer} does not run on several processes yet: use adamw or sgd, or one process")
        self.eval_callback, self.reference = eval_callback, reference
        self.masked, self.on_start = masked, on_start
        self.forward_model = data_parallel(model)  # what the objective calls: DDP under torchrun
        self.step = 0

    # ------------------------------------------------------------ checkpoints

    def _state_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Whole tensors (gathered from every process's shard under FSDP: a collective)."""
        weights = {n: whole(p.detach()).contiguous() for n, p in self.params.items()}
        optim = {}
        for p, state in self.optimizer.state.items():
            for key, value in state.items():
                optim[f"{self.names[id(p)]}::{key}"] = whole(value.detach()).contiguous()
        optim["::rng_cpu"] = torch.get_rng_state()
        if torch.cuda.is_available():
            optim["::rng_cuda"] = torch.cuda.get_rng_state()
        return weights, optim

    def save_checkpoint(self) -> Path:
        """Write the trained tensors and optimiser state at the current step, atomically (every
        process calls it; the main one writes)."""
        weights, optim = self._state_tensors()
        final = self.out / CHECKPOINTS / f"step-{self.step:08d}"
        if not is_main():
            return final
        with atomic_path(final) as tmp:
            tmp.mkdir()
            save_file(weights, tmp / "weights.safetensors")
            save_file(optim, tmp / "optimizer.safetensors")
            (tmp / "state.json").write_text(json.dumps({"step": self.step, "settings": asdict(self.settings)}, indent=2))
        for old in sorted((self.out / CHECKPOINTS).glob("step-*"))[: -self.settings.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    @staticmethod
    def latest_checkpoint(out: str | Path) -> Path | None:
        """The newest checkpoint in `out` that is whole; damaged ones (a killed write, a copy cut short)
        are passed over with a warning. None when there is none; a UserError when all are damaged."""
        found = sorted(Path(out, CHECKPOINTS).glob("step-*"), reverse=True)
        damaged = []
        for path in found:
            problem = checkpoint_problem(path)
            if problem is None:
                if damaged:
                    warnings.warn(f"checkpoint {damaged[0][0].name} in {Path(out) / CHECKPOINTS} is damaged ({damaged[0][1]}); "
                                  f"resuming from {path.name} instead")
                return path
            damaged.append((path, problem))
        if damaged:
            raise UserError(f"every checkpoint in {Path(out) / CHECKPOINTS} is damaged (newest: {damaged[0][0].name}, {damaged[0][1]}): "
                            "run again without --resume (with --overwrite)")
        return None

    def load_checkpoint(self, path: Path) -> None:
        """Restore trained tensors, optimiser state, RNG state and step from `path`."""
        saved = json.loads((path / "state.json").read_text())
        now = json.loads(json.dumps(asdict(self.settings)))
        changed = [f"{key} {saved['settings'][key]} -> {now[key]}" for key in TRAJECTORY
                   if key in saved["settings"] and now[key] != saved["settings"][key]]
        if changed:
            raise UserError(f"checkpoint {path} was made with other training settings ({'; '.join(changed)}): resume with the same ones")
        weights = load_file(path / "weights.safetensors")
        optim = load_file(path / "optimizer.safetensors")
        if set(weights) != set(self.params) or any(weights[n].shape != p.shape for n, p in self.params.items()):
            raise UserError(f"checkpoint {path} trains other tensors than this run: resume with the same mask and model")
        with torch.no_grad():
            for name, param in self.params.items():
                param.copy_(shard_like(weights[name], param))
        if self.masked is not None:
            self.masked.sync()
        torch.set_rng_state(optim.pop("::rng_cpu"))
        cuda_rng = optim.pop("::rng_cuda", None)
        if cuda_rng is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(cuda_rng)
        state = self.optimizer.state_dict()
        index = {name: i for i, name in enumerate(self.params)}
        state["state"] = {}
        for key, value in optim.items():
            name, _, field = key.partition("::")
            param = self.params[name]
            state["state"].setdefault(index[name], {})[field] = shard_like(value, param) if value.shape == param.shape else value
        self.optimizer.load_state_dict(state)
        self.step = saved["step"]

    # ------------------------------------------------------------ training

    def refresh_hessian(self) -> None:
        """The Gauss–Newton–Bartlett pass of update `self.step` (Sophia's Algorithm 2), for an
        optimiser with `hessian_every`: on the step's batches (every micro-batch, the objective's
        `hessian_streams`), ĝ = ∇ of the mean CE against labels sampled from the model over all B
        labelled positions; the optimiser gets ĝ in `.grad` (of the selected entries only, under a
        mask) and B (`update_hessian(B)`).
        The labels come from a generator seeded by (seed, step), so a resumed run draws the same ones.
        As in the paper, the pass runs before the update it serves and its gradient is not clipped
        (the reference implementation refreshes after the update, on the next batch, and clips it).
        """
        s = self.settings
        generator = torch.Generator(device=device_of(self.model)).manual_seed(s.seed * 1_000_003 + self.step)
        names = hessian_streams(self.objective)
        count = 0
        for micro in range(s.grad_accum):
            index = self.step * s.grad_accum + micro
            total, n = gnb_loss(self.model, {name: self.streams[name](index) for name in names}, generator)
            if n:
                total.backward()
            count += n
        if count:
            with torch.no_grad():
                for param in self.params.values():
                    if param.grad is not None:
                        param.grad.div_(count)
            self.optimizer.update_hessian(count)
        self.optimizer.zero_grad(set_to_none=True)

    def _gradient_sync(self, last: bool):
        """DDP all-reduces on the last micro-batch of a step only; the others accumulate locally."""
        if last or self.forward_model is self.model:
            return contextlib.nullcontext()
        return self.forward_model.no_sync()

    def _log(self, handle, row: dict) -> None:
        handle.write(json.dumps(row) + "\n")
        handle.flush()

    def train(self, resume: bool = False) -> TrainResult:
        """Train to `settings.steps`; with `resume`, continue from the latest checkpoint."""
        s = self.settings
        self.out.mkdir(parents=True, exist_ok=True)
        resumed_from = None
        log_path = self.out / "log.jsonl"
        checkpoint = self.latest_checkpoint(self.out) if resume else None
        if checkpoint is not None:
            self.load_checkpoint(checkpoint)
            resumed_from = self.step
            kept = [line for line in log_path.read_text().splitlines() if json.loads(line)["step"] <= self.step] if log_path.exists() else []
        else:
            torch.manual_seed(s.seed)
            kept = []
        barrier()  # every process has read the checkpoint and the log before the main one rewrites the log
        if is_main():
            log_path.write_text("".join(line + "\n" for line in kept))
        if self.on_start is not None:
            self.on_start(resumed_from)
        self.model.train()
        if s.gradient_checkpointing:
            gradient_checkpointing(self.model, True)
        try:
            return self._train_loop(resumed_from, log_path)
        finally:
            if s.gradient_checkpointing:
                gradient_checkpointing(self.model, False)

    def _train_loop(self, resumed_from: int | None, log_path: Path) -> TrainResult:
        s = self.settings
        start, tokens, loss_value = time.perf_counter(), 0, float("nan")
        bar = tqdm(total=s.steps, initial=self.step, disable=not s.progress or not is_main(), desc="train", unit="step", dynamic_ncols=True)
        hessian_every = getattr(self.optimizer, "hessian_every", 0)
        with open(log_path if is_main() else os.devnull, "a") as log:
            while self.step < s.steps:
                lr = s.lr_at(self.step)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                if hessian_every and self.step % hessian_every == 0:
                    self.refresh_hessian()
                total, components = 0.0, {}
                for micro in range(s.grad_accum):
                    index = self.step * s.grad_accum + micro
                    batches = {name: shard_batch(self.streams[name](index)) for name in self.objective.streams}
                    with self._gradient_sync(last=micro == s.grad_accum - 1):
                        loss, parts = self.objective(self.forward_model, batches, self.reference)
                        (loss / s.grad_accum).backward()
                    total += loss.item() / s.grad_accum
                    for key, value in parts.items():
                        components[key] = components.get(key, 0.0) + float(value) / s.grad_accum
                    tokens += sum(int(b["attention_mask"].sum()) for b in batches.values())
                if self.masked is not None:
                    self.masked.collect_gradients()
                total = average(total)
                if not math.isfinite(total):
                    bar.close()
                    last = self.latest_checkpoint(self.out)
                    kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written"
                    raise NonFiniteLoss(f"the loss became {total} at step {self.step + 1}; {kept}; lower --lr or raise --warmup")
                grad_norm = None
                if s.max_grad_norm:
                    grad_norm = float(whole(torch.nn.utils.clip_grad_norm_(list(self.params.values()), s.max_grad_norm)))
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                if self.masked is not None:
                    self.masked.sync()
                self.step += 1
                loss_value = total
                row = {"step": self.step, "lr": lr, "loss": total, **components, "grad_norm": grad_norm, "seconds": round(time.perf_counter() - start, 4)}
                if s.eval_every and (self.step % s.eval_every == 0 or self.step == s.steps) and self.eval_callback is not None and is_main():
                    self.model.eval()
                    with torch.no_grad():
                        metrics = dict(self.eval_callback(self.model, self.step))
                    self.model.train()
                    row.update({f"eval/{k}": v for k, v in metrics.items()})
                    if s.progress:
                        bar.write(f"step {self.step}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
                self._log(log, row)
                bar.set_postfix(loss=f"{total:.4f}", refresh=False)
                bar.update(1)
                if s.save_every and self.step % s.save_every == 0 and self.step < s.steps:
                    self.save_checkpoint()
        bar.close()
        self.model.eval()
        parallel = "fsdp" if is_sharded(self.model) else "ddp" if self.forward_model is not self.model else "none"
        return TrainResult(self.step, loss_value, time.perf_counter() - start, tokens, resumed_from,
                           parallel=parallel if parallel == "none" else f"{parallel} × {world_size()}")
