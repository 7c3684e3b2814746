"""A GPU check of the whole pipeline at OLMo scale: `rank` (each curvature method that fits),
masked `unlearn` and `evaluate` on OLMo-1B- and OLMo-7B-shaped models with random weights, in
bf16 and float32, each stage stopped at a time budget so the check ends within 9 minutes.

On a CUDA machine (the device tool's H100 / H200: Python 3.12, torch 2.11, transformers 5, no
internet), from the repository root, nothing installed beyond the image:

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out $OUT      # then copy $OUT/gpu_check.* to benchmarks/results/

and on CPU at tiny shapes (what tests/test_gpu_check.py runs):

    .venv/bin/python benchmarks/gpu_check.py --tiny --out /tmp/gpu-check

rouge-score (with nltk) is the one dependency such an image may lack. Without it `evaluate`
computes the teacher-forced metrics and MIA, times greedy generation without scoring it, and
says so in its row's note. To score ROUGE as well, carry three pure-Python wheels (1.7 MiB;
rouge-score has only an sdist on PyPI, so its wheel is built here):

    echo /.whl/ >> .git/info/exclude
    .venv/bin/pip wheel --no-deps -w .whl rouge-score==0.1.2
    .venv/bin/pip download --no-deps --only-binary=:all: -d .whl nltk==3.10.4 defusedxml==0.7.1
    # on the device (run with carry=[".whl"]), before the command above:
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site

(nltk's other needs, click, joblib, regex and tqdm, and rouge-score's, absl-py, numpy and six,
are in that image.)

What runs. Each run is one model (SIZE:DTYPE) in a fresh worker process: the model is built from
config with random weights directly on the device (seed 0), then its stages run in order:

- `rank-hvp`, `rank-fd`, `rank-ggn`, `rank-soir-line`: `soir.ranking.rank` at tensor granularity
  on 64 forget + 256 retain rows (random words of a 50304-word tokenizer built in process, rows
  of at most 256 tokens). `ggn` uses `--sketch factored` and ranks every group. hvp, fd and
  soir-line cost per group, so they rank the groups of the first and the last block (14 of the
  114 groups of the 1B shape; `--all-groups` ranks every one), and the row gives the time
  extrapolated to every group: fixed cost + per-group cost × groups (a group's cost grows with
  its depth, so the first and last blocks bracket the mean). `loss_forwards` counts the forwards
  made through the loss, so a stopped row says how far it got (hvp: one per batch for the mean
  gradients, then one per batch for the curvature; fd: one plus two per group and batch; the line
  search: several per group). `soir-line` uses `--shortlist` instead of the scope when the
  toolkit has it, and its default `--line-batch` (on a GPU, up to 8 groups of a block searching
  side by side, one forward per round); `rank-soir-line-k1` runs it again with `--line-batch 1`,
  one group per forward, so the two rows say what the batched forward gains. A method skips with
  its reason when it cannot run: fd needs float32 weights, and every stage whose estimated peak (the toolkit's own estimate for hvp)
  exceeds 95% of the device's free memory skips.
- `unlearn`: `soir.select` takes 10% of the parameters (`--top COUNT --by params`) from the first
  ranking that ranked every group (else a scoped one, else `--score random`), and
  `unlearn.unlearning.unlearn_model` runs NPO for 20 steps (batch 8, lr 1e-5, no warmup).
- `evaluate`: `analysis.evaluate.evaluate` on 64 rows (32 forget + 32 retain) with greedy
  generation (64 new tokens) and MIA against 32 holdout rows.

Each stage records wall time, peak `torch.cuda.max_memory_allocated` (reset before the stage),
the estimated peak, its status (ok / skipped: reason / stopped at time budget / failed: error)
and the device, torch and transformers. A stage stops at its budget through SIGALRM: the
exception comes in the main thread between Python bytecodes (after the batch, group or CUDA call
in flight), the model is then built afresh for the next stage, and the parent process kills a
worker that outlives its deadline (a stuck kernel) and records its remaining stages as stopped.
Runs come in order of importance: 1B bf16, 1B float32 (fd), 7B bf16, 7B float32; every stage's
budget is cut to what is left of `--budget`, and a stage with too little left is skipped.

Writes gpu_check.{csv,json,png} and gpu_check.log (the workers' output) into --out.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclass(frozen=True)
class Shape:
    """An OLMo shape built from config (`soir.models.tiny_config`), and the rank batch it uses."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    max_positions: int = 2048
    rank_batch: int = 16


SHAPES = {
    "1b": Shape(hidden=2048, layers=16, heads=16, intermediate=8192, vocab=50304, rank_batch=16),
    "7b": Shape(hidden=4096, layers=32, heads=32, intermediate=11008, vocab=50304, rank_batch=8),
    "tiny-1b": Shape(hidden=32, layers=2, heads=2, intermediate=64, vocab=300, max_positions=128, rank_batch=8),
    "tiny-7b": Shape(hidden=48, layers=3, heads=4, intermediate=96, vocab=320, max_positions=128, rank_batch=8),
}


@dataclass(frozen=True)
class Workload:
    """The rows and step counts every run uses."""

    forget: int = 64
    retain: int = 256
    evaluate: int = 64  # half forget rows, half retain rows
    holdout: int = 32  # non-members for MIA
    prompt_words: tuple[int, int] = (160, 200)
    answer_words: tuple[int, int] = (32, 55)  # prompt + answer + EOS <= 256 tokens
    unlearn_steps: int = 20
    unlearn_batch: int = 8
    mask_fraction: float = 0.1
    new_tokens: int = 64
    eval_batch: int = 16


WORKLOAD = Workload()
TINY_WORKLOAD = Workload(forget=8, retain=16, evaluate=8, holdout=4, prompt_words=(6, 12), answer_words=(3, 6), unlearn_steps=2,
                         unlearn_batch=4, new_tokens=4, eval_batch=8)

STAGES = ("rank-hvp", "rank-fd", "rank-ggn", "rank-soir-line", "rank-soir-line-k1", "unlearn", "evaluate")
DEFAULT_BUDGET_S = 500  # the stages' share of the 9 minutes; the rest is the workers' start and the writing
RUNS = (
    "1b:bfloat16:rank-ggn=30,rank-hvp=40,rank-soir-line=35,rank-soir-line-k1=25,unlearn=25,evaluate=25",
    "1b:float32:rank-fd=35,unlearn=20,evaluate=15",
    "7b:bfloat16:rank-ggn=30,rank-hvp=35,rank-soir-line=30,unlearn=30,evaluate=25",
    "7b:float32:rank-fd=30,unlearn=20,evaluate=15",
)
TINY_RUNS = tuple(spec.replace("1b:", "tiny-1b:").replace("7b:", "tiny-7b:") for spec in RUNS)
BUILD_ALLOWANCE_S = 45  # building a model on the device and one warm-up forward, beyond the stage budgets
START_ALLOWANCE_S = 30  # a worker's imports and CUDA start
KILL_GRACE_S = 15  # how long past its deadline a worker may run before it is killed
MIN_STAGE_S = 2.0  # a stage with less time left than this (or than its own budget, if smaller) is skipped
MEMORY_SHARE = 0.95  # of the device's free memory a stage's estimated peak may use
COLUMNS = ("run", "size", "dtype", "stage", "method", "status", "wall_s", "peak_memory_mib", "memory_estimate_gib", "budget_s",
           "n_params", "hidden", "layers", "heads", "intermediate", "vocab", "batch_size", "n_forget", "n_retain", "n_groups",
           "n_groups_total", "scope", "extrapolated_all_groups_s", "line_batch", "loss_forwards", "device", "device_name", "torch",
           "transformers", "note")
STOPPED = "stopped at time budget"


@dataclass(frozen=True)
class StagePlan:
    name: str
    budget_s: float


@dataclass(frozen=True)
class RunPlan:
    """One model (size, dtype) and the stages it runs, in order."""

    size: str
    dtype: str
    stages: tuple[StagePlan, ...]

    @property
    def name(self) -> str:
        return f"{self.size} {self.dtype}"

    @property
    def budget_s(self) -> float:
        return sum(s.budget_s for s in self.stages)


def usage_error(message: str):
    """One line on stderr and exit status 2, as the toolkit's UserError."""
    print(f"gpu_check: {message}", file=sys.stderr)
    raise SystemExit(2)


def parse_run(spec: str, stage_budget: float | None = None, default_budget: float = 30.0) -> RunPlan:
    """`SIZE:DTYPE:STAGE[=SECONDS],...` as a RunPlan (`stage_budget` replaces every stage's budget)."""
    try:
        size, dtype, stages = spec.split(":")
    except ValueError:
        usage_error(f"--runs {spec!r}: write SIZE:DTYPE:STAGE[=SECONDS],…, e.g. 1b:bfloat16:rank-ggn=30,unlearn")
    if size not in SHAPES:
        usage_error(f"unknown size {size!r} in {spec!r}: use one of {', '.join(SHAPES)}")
    if dtype not in ("bfloat16", "float32"):
        usage_error(f"unknown dtype {dtype!r} in {spec!r}: use bfloat16 or float32")
    plans = []
    for item in stages.split(","):
        name, _, seconds = item.partition("=")
        if name not in STAGES:
            usage_error(f"unknown stage {name!r} in {spec!r}: use {', '.join(STAGES)}")
        if seconds and not seconds.replace(".", "", 1).isdigit():
            usage_error(f"the budget of {name} in {spec!r} is {seconds!r}: give seconds, e.g. {name}=30")
        budget = stage_budget if stage_budget is not None else float(seconds) if seconds else default_budget
        plans.append(StagePlan(name, budget))
    return RunPlan(size, dtype, tuple(plans))


# ---------------------------------------------------------------- time budgets


class StageStopped(BaseException):
    """A stage's time budget ran out. A BaseException, so the toolkit's `except Exception` cannot swallow it."""


@contextlib.contextmanager
def time_budget(seconds: float):
    """Raise StageStopped in the main thread once `seconds` have passed (SIGALRM): between Python
    bytecodes, so after the batch, group or CUDA call in flight rather than inside it."""
    armed = [True]

    def stop(signum, frame):
        if armed[0]:
            raise StageStopped(f"{STOPPED} ({seconds:g} s)")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-6))
    try:
        yield
    finally:
        armed[0] = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------- data: random words, no hub


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer of exactly `vocab_size` tokens (EOS, pad, unk, then words w0, w1, …):
    random word rows become random token ids over the whole vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from soir.tokenizer import EOS, PAD

    unk = "<unk>"
    vocab = {EOS: 0, PAD: 1, unk: 2, **{f"w{i}": i + 3 for i in range(vocab_size - 3)}}
    words = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=words, eos_token=EOS, bos_token=EOS, pad_token=PAD, unk_token=unk)


def random_rows(name: str, n: int, vocab_size: int, work: Workload, seed: int):
    """`n` rows of random words (`input` prompt, `output` answer) as a split table."""
    import pandas as pd

    rng = random.Random(seed)

    def words(bounds: tuple[int, int]) -> str:
        return " ".join(f"w{rng.randrange(vocab_size - 3)}" for _ in range(rng.randint(*bounds)))

    return pd.DataFrame({"id": [f"{name}-{i}" for i in range(n)], "input": [words(work.prompt_words) for _ in range(n)],
                         "output": [" " + words(work.answer_words) for _ in range(n)]})


# ---------------------------------------------------------------- the worker: one process, its runs in order


def emit(path: Path, row: dict) -> None:
    """Append one JSON line (so the parent keeps every finished stage if the worker is killed)."""
    with open(path, "a") as handle:
        handle.write(json.dumps(row, default=str) + "\n")


def device_info(device) -> dict:
    import torch
    import transformers

    info = {"device": device.type, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "machine": platform.machine()}
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info.update(device_name=torch.cuda.get_device_name(device), device_memory_gib=round(properties.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    else:
        info.update(device_name="cpu", cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return info


def rouge_missing() -> str | None:
    """Why ROUGE cannot be scored here (analysis.metrics imports rouge_score when it scores), or None."""
    try:
        from rouge_score import rouge_scorer  # noqa: F401
    except ImportError as exc:
        return f"rouge_score cannot be imported ({exc})"
    return None


class ModelCheck:
    """One run: a model of one shape and dtype on the device, and its stages."""

    def __init__(self, run: RunPlan, work: Workload, device, deadline: float, results: Path, info: dict, all_groups: bool):
        import torch

        self.run, self.work, self.device, self.results, self.info, self.all_groups = run, work, device, results, info, all_groups
        self.shape = SHAPES[run.size]
        self.dtype = getattr(torch, run.dtype)
        self.deadline = min(deadline, time.time() + run.budget_s + BUILD_ALLOWANCE_S)
        self.model = None
        self.progress: dict = {}  # what a stage has done so far, recorded even when it stops
        self.fresh = False  # the model is as built (no stage has changed it)
        self.rankings: dict[str, tuple] = {}  # method -> (ranking, ranked every group)

    # ---- set-up

    def config(self):
        from soir.models import TinySize, tiny_config

        s = self.shape
        size = TinySize(hidden=s.hidden, layers=s.layers, heads=s.heads, intermediate=s.intermediate, max_positions=s.max_positions)
        config = tiny_config("olmo", s.vocab, size, self.tokenizer)
        config._attn_implementation = "eager"  # curvature needs double backward (as soir.models.load_model(eager_attention=True))
        return config

    def build(self):
        """The model with random weights (seed 0), made on the device, plus one warm-up forward."""
        import torch
        from transformers import AutoModelForCausalLM

        from soir.data import split_batches
        from soir.runtime import lm_logits, to_device

        self.model = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        torch.manual_seed(0)
        with torch.device(self.device):
            model = AutoModelForCausalLM.from_config(self.config(), dtype=self.dtype)
        model.to(self.device).eval()
        batch = to_device(split_batches(self.encoded["forget"], self.pad, self.shape.rank_batch)[0], self.device)
        with torch.no_grad():
            lm_logits(model, batch)
        self.model, self.fresh = model, True

    def prepare(self) -> None:
        """Tokenizer, rows, and the memory estimates (from a model on the meta device: no memory)."""
        import torch
        from transformers import AutoModelForCausalLM

        from soir.curvature import activation_bytes, free_memory_bytes, hvp_peak_bytes
        from soir.data import encode, pad_id
        from soir.groups import filter_groups, parameter_groups

        w, s = self.work, self.shape
        self.tokenizer = word_tokenizer(s.vocab)
        self.pad = pad_id(self.tokenizer)
        self.frames = {name: random_rows(name, n, s.vocab, w, seed) for seed, (name, n) in
                       enumerate((("forget", w.forget), ("retain", w.retain), ("holdout", w.holdout)))}
        self.encoded = {name: encode(self.frames[name], self.tokenizer) for name in ("forget", "retain")}
        self.length = max(len(x) for e in self.encoded.values() for x in e.input_ids)
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(self.config(), dtype=self.dtype)
        self.n_params = sum(p.numel() for p in meta.parameters())
        self.n_groups = len(parameter_groups(meta, "tensor", "join"))
        scoped = self.n_params if self.all_groups else \
            sum(g.n_params for g in filter_groups(parameter_groups(meta, "tensor", "join"), (self.scope(),)))
        element = torch.finfo(self.dtype).bits // 8
        weights = self.n_params * element

        def gradients(n: int) -> int:  # the float32 mean gradients of both splits
            return 2 * 4 * n

        def activations(rows: int) -> int:  # what a forward keeps for backward (the toolkit's estimate)
            return activation_bytes(meta, rows * self.length, self.length)

        def inference(rows: int) -> int:  # float32 logits and their softmax, and one block's activations
            return 2 * 4 * rows * self.length * s.vocab + activations(rows) // s.layers

        selected = w.mask_fraction * self.n_params
        fake = [{"input_ids": torch.empty((s.rank_batch, self.length), dtype=torch.long, device="meta")}]
        self.estimates = {
            "build": weights,
            "rank-hvp": hvp_peak_bytes(meta, fake),  # the whole model's, as `rank` estimates it (scoped: less)
            "rank-fd": weights + gradients(scoped) + activations(s.rank_batch),
            "rank-ggn": weights + gradients(self.n_params) + 2 * activations(s.rank_batch),
            "rank-soir-line": weights + gradients(scoped) + activations(s.rank_batch),
            # masters (bf16 weights), gradients and AdamW's moments of the selected entries, the reference's copy, activations
            "unlearn": weights + selected * (4 * (3 + (element < 4)) + element) + 2 * activations(w.unlearn_batch),
            "evaluate": weights + inference(w.eval_batch),
        }
        self.estimates["rank-soir-line-k1"] = self.estimates["rank-soir-line"]  # the same ranking, one group per forward
        self.capacity = MEMORY_SHARE * free_memory_bytes(self.device)
        del meta

    # ---- rows

    def row(self, stage: str, status: str, **extra) -> dict:
        method = stage.removeprefix("rank-") if stage.startswith("rank-") else None
        s = self.shape
        row = {"run": self.run.name, "size": self.run.size, "dtype": self.run.dtype, "stage": stage, "method": method, "status": status,
               "n_params": getattr(self, "n_params", None), "hidden": s.hidden, "layers": s.layers, "heads": s.heads,
               "intermediate": s.intermediate, "vocab": s.vocab,
               "memory_estimate_gib": round(self.estimates[stage] / 2**30, 2) if hasattr(self, "estimates") else None,
               **{k: self.info.get(k) for k in ("device", "device_name", "torch", "transformers")}, **extra}
        emit(self.results, row)
        return row

    def measured(self, stage: str, budget: float, body) -> None:
        """Run `body()` -> extras under `budget` seconds; record time, peak memory and status."""
        import torch

        cuda = self.device.type == "cuda"
        if cuda:  # what the last stage freed goes back to the device (no gc.collect: it costs ~0.5 s a call with these imports)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        extras, status = {}, "ok"
        self.progress = {}
        started = time.perf_counter()
        try:
            with time_budget(budget):
                extras = body() or {}
                if cuda:
                    torch.cuda.synchronize(self.device)
        except StageStopped as stop:
            status = str(stop)
        except torch.cuda.OutOfMemoryError:
            status = f"failed: CUDA out of memory (estimated {self.estimates[stage] / 2**30:.1f} GiB)"
        except Exception as exc:  # recorded, and the next stage runs
            status = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if cuda:
            with contextlib.suppress(Exception):
                torch.cuda.synchronize(self.device)
        wall = time.perf_counter() - started
        peak = torch.cuda.max_memory_allocated(self.device) / 2**20 if cuda else None
        if status != "ok" and stage != "build":
            self.fresh = None  # the stage may have left the model half-changed: build it again before the next one
        self.row(stage, status, wall_s=round(wall, 3), peak_memory_mib=None if peak is None else round(peak), budget_s=round(budget, 2),
                 **{**self.progress, **extras})

    # ---- the run

    def execute(self) -> None:
        self.prepare()
        gc.freeze()  # imports and rows stay for good: later collections (freeing a model) need not scan them
        weights = self.estimates["build"]
        if weights > self.capacity:
            reason = f"skipped: the weights need {weights / 2**30:.1f} GiB, more than {self.capacity / 2**30:.1f} GiB free"
            for stage in ("build", *(s.name for s in self.run.stages)):
                self.row(stage, reason)
            return
        self.measured("build", max(1.0, self.deadline - time.time()), lambda: self.build() or {"note": "random weights, seed 0, eager attention"})
        if self.model is None:
            for stage in self.run.stages:
                self.row(stage.name, "skipped: the model could not be built")
            return
        for stage in self.run.stages:
            self.stage(stage)

    def stage(self, stage: StagePlan) -> None:
        left = self.deadline - time.time()
        budget = min(stage.budget_s, left)
        if budget < min(MIN_STAGE_S, stage.budget_s):
            self.row(stage.name, f"skipped: the check's time budget is spent ({max(left, 0):.0f} s left)", budget_s=0)
            return
        if stage.name == "rank-fd" and self.run.dtype != "float32":
            self.row(stage.name, "skipped: fd needs float32 weights (a bf16 perturbation rounds away)")
            return
        need = self.estimates[stage.name]
        if need > self.capacity:
            self.row(stage.name, f"skipped: estimated peak {need / 2**30:.1f} GiB exceeds {self.capacity / 2**30:.1f} GiB "
                                 f"({MEMORY_SHARE:.0%} of the free memory)")
            return
        note = ""
        if self.fresh is None:  # the previous stage stopped or failed: start from the model as built
            try:
                self.build()
            except Exception as exc:
                self.row(stage.name, f"skipped: building the model again failed ({type(exc).__name__}: {exc})")
                return
            note = "model built again (the previous stage stopped or failed); "
            budget = min(budget, self.deadline - time.time())
        if stage.name.startswith("rank-"):
            self.measured(stage.name, budget, lambda: self.rank(stage.name.removeprefix("rank-"), note))
        elif stage.name == "unlearn":
            self.measured(stage.name, budget, lambda: self.unlearn(note))
        else:
            self.measured(stage.name, budget, lambda: self.evaluate(note))

    def scope(self) -> str:
        return rf"^model\.layers\.(0|{self.shape.layers - 1})\."

    def rank(self, method: str, note: str) -> dict:
        from soir.ranking import RankSettings, rank

        options = {"batch_size": self.shape.rank_batch, "seed": 0}
        names = {f.name for f in fields(RankSettings)}
        n_total = self.n_groups
        scoped = not self.all_groups and method != "ggn"
        if method.startswith("soir-line"):
            options["score"] = "soir-line"
            if method == "soir-line-k1" and "line_batch" in names:
                options["line_batch"] = 1
                note += "--line-batch 1 (one group per forward, to set against rank-soir-line's default); "
            if "shortlist" in names and not self.all_groups:
                options["shortlist"] = math.ceil(0.2 * n_total)
                scoped = False
                note += f"--shortlist {options['shortlist']}; "
        else:
            options["curvature"] = method
            if method == "ggn":
                options["sketch"] = "factored"
                note += "--sketch factored; "
        if scoped:
            options["include"] = (self.scope(),)
            note += "groups of the first and last block (no --shortlist in the toolkit)" if method.startswith("soir-line") else \
                "groups of the first and last block"
        self.progress.update(n_groups_total=n_total, scope=options.get("include", ("all groups",))[0], loss_forwards=0)
        ranking = rank(self.model, self.encoded["forget"], self.encoded["retain"], self.pad, RankSettings(**options), progress=False,
                       loss_fn=self.counted_loss)
        self.rankings[method] = (ranking, not scoped)
        info = ranking.info
        timings = info["timings_s"]
        per_group = timings.get("curvature", 0.0) + timings.get("line_search", 0.0)
        n = info["n_groups"]
        extrapolated = timings["total"] - per_group + per_group * n_total / n
        return {"batch_size": self.shape.rank_batch, "n_forget": info["n_forget"], "n_retain": info["n_retain"], "n_groups": n,
                "n_groups_total": n_total, "scope": options.get("include", ("all groups",))[0],
                "extrapolated_all_groups_s": round(extrapolated, 2), "timings_s": timings,
                "line_batch": getattr(ranking.settings, "line_batch", None) if method.startswith("soir-line") else None,
                "settings": {k: v for k, v in options.items() if k != "include"}, "note": note.rstrip("; ")}

    def counted_loss(self, model, batch):
        """The contract's per-example loss, counted: a stopped rank row still says how far it got."""
        from soir.data import example_losses

        self.progress["loss_forwards"] += 1
        return example_losses(model, batch)

    def unlearn(self, note: str) -> dict:
        from soir.ranking import RankSettings, rank
        from soir.select import SelectSettings, select
        from unlearn.loop import TrainSettings
        from unlearn.unlearning import unlearn_model

        w = self.work
        chosen = [m for m, (_, whole) in self.rankings.items() if whole] + [m for m, (_, whole) in self.rankings.items() if not whole]
        if chosen:
            ranking, source = self.rankings[chosen[0]][0], f"the rank-{chosen[0]} ranking"
        else:
            ranking = rank(self.model, self.encoded["forget"], self.encoded["retain"], self.pad, RankSettings(score="random"), progress=False)
            source = "a --score random ranking (no other ranking finished)"
        mask = select(ranking, self.model, SelectSettings(top=float(round(w.mask_fraction * self.n_params)), by="params"))
        train = TrainSettings(steps=w.unlearn_steps, lr=1e-5, batch_size=w.unlearn_batch, warmup=0, seed=0, progress=False)
        self.fresh = False
        result = unlearn_model(self.model, self.tokenizer, self.frames["forget"], self.frames["retain"], mask, objective="npo", train=train)
        return {"batch_size": w.unlearn_batch, "n_forget": w.forget, "n_retain": w.retain, "objective": "npo", "steps": result.steps_done,
                "final_loss": result.final_loss, "train_s": round(result.seconds, 3), "n_selected": mask.n_selected,
                "mask_fraction": round(mask.n_selected / self.n_params, 4),
                "note": f"{note}NPO, {result.steps_done} steps, {mask.n_selected / self.n_params:.1%} of the parameters "
                        f"({len(mask.tensors)} tensors) from {source}"}

    def evaluate(self, note: str) -> dict:
        from analysis.evaluate import EvalSettings, evaluate
        from analysis.generation import GenerationSettings, generate
        from analysis.metrics import ScoreSettings

        w = self.work
        half = w.evaluate // 2
        splits = {"forget": self.frames["forget"].head(half), "retain": self.frames["retain"].head(w.evaluate - half)}
        missing = rouge_missing()
        generation = GenerationSettings(max_new_tokens=w.new_tokens, batch_size=w.eval_batch, progress=False)
        settings = EvalSettings(generation=generation, scoring=ScoreSettings(batch_size=w.eval_batch, progress=False),
                                generate=missing is None, mia=True, progress=False)
        metrics, _ = evaluate(self.model, self.tokenizer, splits, holdout=self.frames["holdout"], settings=settings)
        if missing is not None:  # generation still runs and is timed, without the ROUGE it would be scored by
            for frame in splits.values():
                generate(self.model, self.tokenizer, frame["input"].tolist(), generation)
            note += f"ROUGE skipped: {missing}; generation timed without scoring; "
        which = "the unlearned model" if self.fresh is False else "the model as built"
        return {"batch_size": w.eval_batch, "n_forget": half, "n_retain": w.evaluate - half,
                "metrics": {k: metrics.get(k) for k in ("forget/loss", "retain/loss", "forget/rouge_l_recall", "mia_auc", "final_score")},
                "note": f"{note}{which}, {w.evaluate} rows + {w.holdout} holdout rows for MIA, {w.new_tokens} new tokens"}


def worker(spec_path: Path) -> None:
    import torch

    spec = json.loads(spec_path.read_text())
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    results = Path(spec["results"])
    info = device_info(device)
    emit(results, {"kind": "device", **info})
    work = Workload(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec["workload"].items()})
    for run in spec["runs"]:
        plan = RunPlan(run["size"], run["dtype"], tuple(StagePlan(**s) for s in run["stages"]))
        check = ModelCheck(plan, work, device, spec["deadline"], results, info, spec["all_groups"])
        try:
            check.execute()
        finally:
            check.model = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()


# ---------------------------------------------------------------- the parent: plan, workers, outputs


def missing_rows(plan: RunPlan, done: set[tuple[str, str]], reason: str) -> list[dict]:
    """Rows for the stages of `plan` (build included) that a worker never reported."""
    shape = SHAPES[plan.size]
    return [{"run": plan.name, "size": plan.size, "dtype": plan.dtype, "stage": stage, "status": reason,
             "method": stage.removeprefix("rank-") if stage.startswith("rank-") else None,
             "hidden": shape.hidden, "layers": shape.layers, "heads": shape.heads, "intermediate": shape.intermediate, "vocab": shape.vocab}
            for stage in ("build", *(s.name for s in plan.stages)) if (plan.name, stage) not in done]


def run_workers(groups: list[list[RunPlan]], args, work: Workload, deadline: float, log: Path) -> tuple[list[dict], dict]:
    """Each group of runs in one worker process; (rows of every planned stage, the device's description)."""
    rows, device = [], {}
    with tempfile.TemporaryDirectory(prefix="soir-gpu-check-") as tmp:
        for index, group in enumerate(groups):
            left = deadline - time.time()
            if left < START_ALLOWANCE_S / 3:
                for plan in group:
                    rows += missing_rows(plan, set(), "skipped: the check's time budget is spent")
                continue
            worker_deadline = min(deadline, time.time() + START_ALLOWANCE_S + sum(p.budget_s + BUILD_ALLOWANCE_S for p in group))
            results = Path(tmp) / f"worker-{index}.jsonl"
            spec = {"device": args.device, "threads": 1 if args.tiny else 0, "results": str(results), "deadline": worker_deadline,
                    "all_groups": args.all_groups, "workload": asdict(work),
                    "runs": [{"size": p.size, "dtype": p.dtype, "stages": [asdict(s) for s in p.stages]} for p in group]}
            spec_path = Path(tmp) / f"worker-{index}.json"
            spec_path.write_text(json.dumps(spec))
            env = {**os.environ, "PYTHONUNBUFFERED": "1", **({"OMP_NUM_THREADS": "1"} if args.tiny else {})}
            with open(log, "a") as handle:
                handle.write(f"=== worker {index}: {', '.join(p.name for p in group)}\n")
                handle.flush()
                process = subprocess.Popen([sys.executable, __file__, "--worker", str(spec_path)], stdout=handle, stderr=subprocess.STDOUT,
                                           env=env, start_new_session=True)
                try:
                    code = process.wait(timeout=max(1.0, worker_deadline + KILL_GRACE_S - time.time()))
                    reason = None if code == 0 else f"failed: the worker exited with code {code} (see gpu_check.log)"
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
                    reason = f"{STOPPED} (the worker outlived its deadline by {KILL_GRACE_S} s and was killed)"
            reported = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
            for row in reported:
                if row.get("kind") == "device":
                    device = device or {k: v for k, v in row.items() if k != "kind"}
                else:
                    rows.append(row)
            done = {(r["run"], r["stage"]) for r in rows}
            for plan in group:
                rows += missing_rows(plan, done, reason or "failed: the worker ended without reporting this stage")
    for row in rows:
        for key in ("device", "device_name", "torch", "transformers"):
            row.setdefault(key, device.get(key))
    return rows, device


def plot(rows: list[dict], device: dict, path: Path) -> None:
    from analysis.plots import new_figure, save_figure

    labels = [f"{r['run'].replace('bfloat16', 'bf16').replace('float32', 'fp32')}\n{r['stage']}" for r in rows]
    colours = ["C0" if r["status"] == "ok" else "C1" if r["status"].startswith(STOPPED) else "0.75" if r["status"].startswith("skipped")
               else "C3" for r in rows]
    fig, (time_axis, memory_axis) = new_figure((max(10, 0.55 * len(rows)), 7.5), nrows=2, sharex=True)
    x = range(len(rows))
    time_axis.bar(x, [r.get("wall_s") or 0 for r in rows], color=colours)
    time_axis.set_ylabel("wall time (s)")
    time_axis.set_title("stage time: blue ok, orange stopped at its budget, grey skipped, red failed")
    memory_axis.bar(x, [(r.get("peak_memory_mib") or 0) / 1024 for r in rows], color=colours, label="peak max_memory_allocated")
    memory_axis.plot(x, [r.get("memory_estimate_gib") or math.nan for r in rows], "k_", markersize=14, label="estimated peak")
    memory_axis.set_ylabel("GiB")
    memory_axis.set_xticks(list(x), labels, rotation=90, fontsize=7)
    memory_axis.legend(fontsize=8)
    for ax in (time_axis, memory_axis):
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"benchmarks/gpu_check.py on {device.get('device_name', '?')} (torch {device.get('torch', '?')}, "
                 f"transformers {device.get('transformers', '?')}), random-weight OLMo shapes")
    save_figure(fig, path, dpi=110)


def write_outputs(rows: list[dict], device: dict, meta: dict, out: Path) -> None:
    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(rows)
    for column in COLUMNS:
        if column not in table.columns:
            table[column] = None
    table[list(COLUMNS)].to_csv(out / "gpu_check.csv", index=False)
    (out / "gpu_check.json").write_text(json.dumps({**meta, "device": device, "rows": rows}, indent=2, default=str) + "\n")
    try:
        plot(rows, device, out / "gpu_check.png")
    except ImportError as exc:  # matplotlib missing: the tables stand alone
        print(f"gpu_check: no gpu_check.png ({exc})", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="the same stages at tiny shapes on CPU (the tests)")
    p.add_argument("--out", type=Path, help="where gpu_check.{csv,json,png,log} go (default: benchmarks/results; with --tiny, a temporary folder)")
    p.add_argument("--runs", nargs="+", help="SIZE:DTYPE:STAGE[=SECONDS],… (sizes: " + ", ".join(SHAPES) + "; stages: " + ", ".join(STAGES) + ")")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds for all the stages together")
    p.add_argument("--stage-budget", type=float, help="seconds for every stage, replacing the plan's")
    p.add_argument("--all-groups", action="store_true", help="rank every group with every method (no first/last-block scope)")
    p.add_argument("--device", help="torch device (default: cuda; cpu with --tiny)")
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return
    started = time.time()
    args.device = args.device or ("cpu" if args.tiny else "cuda")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            usage_error("no CUDA device here: run it on a GPU machine, or with --tiny to check it on CPU")
    out = args.out or (Path(tempfile.mkdtemp(prefix="soir-gpu-check-tiny-")) if args.tiny else ROOT / "benchmarks" / "results")
    work = TINY_WORKLOAD if args.tiny else WORKLOAD
    plans = [parse_run(spec, args.stage_budget) for spec in (args.runs or (TINY_RUNS if args.tiny else RUNS))]
    groups = [plans] if args.tiny else [[plan] for plan in plans]  # tiny: one process for all (fast); GPU: a fresh one per model
    out.mkdir(parents=True, exist_ok=True)
    log = out / "gpu_check.log"
    log.write_text("")
    rows, device = run_workers(groups, args, work, started + args.budget, log)
    meta = {"command": " ".join(["python", "benchmarks/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]),
            "budget_s": args.budget, "wall_s": round(time.time() - started, 1), "tiny": args.tiny, "workload": asdict(work),
            "shapes": {p.size: asdict(SHAPES[p.size]) for p in plans}, "runs": [asdict(p) for p in plans]}
    write_outputs(rows, device, meta, out)
    shown = ("run", "stage", "status", "wall_s", "peak_memory_mib", "memory_estimate_gib", "n_groups", "extrapolated_all_groups_s")
    for row in rows:
        print("  ".join(f"{k}={row.get(k)}" for k in shown if row.get(k) is not None))
    print(f"wrote {out / 'gpu_check.csv'}, gpu_check.json, gpu_check.png ({meta['wall_s']} s on {device.get('device_name')})")


if __name__ == "__main__":
    main()
