"""`soir demo`: the whole localized-unlearning study on the built-in testbed, on a laptop CPU.

Stages, each cached by its inputs (a re-run reuses finished stages; an interrupted run continues
with the first unfinished one; a damaged output is redone):

1. `data`: the testbed splits and tokenizer (`soir.synth`);
2. `base`: a tiny OLMo trained on `pretrain` (general facts and the Task3 "real" documents);
3. `finetuned`: the base finetuned on forget + retain, their extra phrasings, and `general` replayed
   (so general ability is kept, as real finetuning keeps it);
4. `oracle`: the base finetuned the same way on retain alone (what unlearning should approach);
5. `shift`: base → finetuned parameter shift;
6. `rankings`: the finetuned model's tensors ranked by `soir` and every baseline; their agreement;
7. `unlearning`: masked unlearning on the top `top` of parameters by `soir` and by `random`, and on
   the full model, with each method;
8. `evaluation`: every model evaluated (SemEval, MIA, MMLU-style, TOFU forget quality);
9. `curves`: each layer unlearned alone (the layer-robustness curves and Pareto front);
10. `probes`: robustness probes (relearning, quantization) of the unlearned models;
11. `report`: `report.md` with the figures and a paragraph that reads the results.

Each stage prints one line with its time and the time expected on a 2-core machine.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import pandas as pd

from soir.data import answer_accuracy, encode, pad_id, read_split, teacher_forced
from soir.errors import UserError
from soir.io import check_out_dir, write_json
from soir.models import ModelSettings, TinySize, load_model, load_tokenizer
from soir.synth import SynthSettings, write_testbed
from unlearn.finetune import FinetuneSettings, finetune
from unlearn.loop import TrainSettings

STUDY_VERSION = 2  # bump when a stage's code changes what it writes: every cached stage is redone
RECORDS = ".stages"
SPLITS = ("forget", "retain", "holdout", "general")


# ---------------------------------------------------------------- recipes


@dataclass(frozen=True)
class TestbedRecipe:
    """Sizes and schedules of the testbed build: the model memorises forget and retain, keeps its
    general ability, and answers held-out paraphrases."""

    synth: SynthSettings = field(default_factory=SynthSettings)
    size: TinySize = field(default_factory=lambda: TinySize(hidden=128, layers=3, heads=4, intermediate=512))
    base_steps: int = 400
    base_lr: float = 3e-3
    finetune_epochs: float = 20.0  # forget / retain accuracy 0.996 / 0.998 (17 epochs: 0.989 / 0.987, every fidelity check still passes)
    lr: float = 3e-3
    batch_size: int = 32
    seed: int = 0

    @classmethod
    def quick(cls, seed: int = 0) -> "TestbedRecipe":
        """A reduced build for `--quick` and the tests: fewer subjects, a narrower model."""
        synth = SynthSettings(seed=seed, people_forget=10, people_retain=10, people_holdout=10, docs_forget=2, docs_retain=2, docs_holdout=2,
                              real_forget=2, real_retain=2, real_holdout=2, vocab_size=768)
        return cls(synth=synth, size=TinySize(hidden=64, layers=2, heads=4, intermediate=256), base_steps=300, base_lr=1e-2,
                   finetune_epochs=35.0, lr=6e-3, seed=seed)

    @classmethod
    def smallest(cls, seed: int = 0) -> "TestbedRecipe":
        """The smallest build that still runs every stage (the demo's own test)."""
        synth = SynthSettings(seed=seed, people_forget=3, people_retain=3, people_holdout=3, docs_forget=1, docs_retain=1, docs_holdout=1,
                              real_forget=1, real_retain=1, real_holdout=1, vocab_size=400)
        return cls(synth=synth, size=TinySize(hidden=32, layers=2, heads=4, intermediate=64), base_steps=20, finetune_epochs=3.0, seed=seed)

    @classmethod
    def variant(cls, name: str, seed: int = 0) -> "TestbedRecipe":
        """A named testbed for the evidence benchmarks, its data and training seeded by `seed`:

        - `default`: the demo's testbed (3 blocks × 128);
        - `deep`: the same recipe on 8 blocks;
        - `gentle`: a base pretrained 4× longer, then finetuned at a third of the rate, so finetuning
          moves θ less relative to θ (on `default` ‖θ_ft − θ_base‖ is of the order of ‖θ_base‖). Ten
          epochs instead of twenty moved it less still but left the forget set barely learned
          (answer accuracy 0.71 against the oracle's 0.50), too weak an instrument.
        """
        default = cls(synth=SynthSettings(seed=seed), seed=seed)
        variants = {
            "default": default,
            "deep": replace(default, size=replace(default.size, layers=8)),
            "gentle": replace(default, base_steps=4 * default.base_steps, lr=default.lr / 3),
        }
        if name not in variants:
            raise UserError(f"unknown testbed variant {name!r}: use one of {', '.join(variants)}")
        return variants[name]

    def finetune_data(self, data: Path) -> tuple[str, ...]:
        return tuple(str(data / f"{name}.parquet") for name in ("forget", "retain", "forget_phrasings", "retain_phrasings", "general"))

    def oracle_data(self, data: Path) -> tuple[str, ...]:
        return tuple(str(data / f"{name}.parquet") for name in ("retain", "retain_phrasings", "general"))


@dataclass(frozen=True)
class StudyRecipe:
    """What the study ranks, unlearns and probes on top of the testbed."""

    testbed: TestbedRecipe = field(default_factory=TestbedRecipe)
    scores: tuple[str, ...] = ("soir", "soir-datainf", "grad-magnitude", "fo-influence", "fisher", "wagle", "shift", "random")
    masks: tuple[str, ...] = ("soir", "random", "full")  # top `top` of parameters by these rankings, and the full model
    methods: tuple[str, ...] = ("graddiff",)  # `soir demo --methods graddiff npo idk dpo rmu` runs more
    top: float = 0.1
    unlearn_steps: int = 100
    unlearn_lr: float = 1e-2
    w_retain: float = 5.0
    curve_steps: int = 30
    curve_every: int = 5
    relearn_steps: int = 20
    quantize_bits: tuple[int, ...] = (8, 4)
    probe_masks: tuple[str, ...] = ("soir", "random")  # the unlearned models (of the first method) the probes attack
    max_new_tokens: int = 80

    @classmethod
    def quick(cls, seed: int = 0) -> "StudyRecipe":
        return cls(testbed=TestbedRecipe.quick(seed), scores=("soir", "grad-magnitude", "shift", "random"), methods=("graddiff",),
                   unlearn_steps=60, curve_steps=20, relearn_steps=10, quantize_bits=(4,))

    @classmethod
    def smallest(cls, seed: int = 0) -> "StudyRecipe":
        return cls(testbed=TestbedRecipe.smallest(seed), scores=("soir", "random"), methods=("graddiff",), top=0.3, unlearn_steps=4,
                   curve_steps=2, curve_every=1, relearn_steps=2, quantize_bits=(8,), probe_masks=("soir",), max_new_tokens=16)


# ---------------------------------------------------------------- the testbed


def build_testbed(out: str | Path, recipe: TestbedRecipe = TestbedRecipe(), progress: bool = True, oracle_seeds: tuple[int, ...] = ()) -> dict[str, Path]:
    """Write data/, base/, finetuned/ and oracle/ under `out` (and oracle-<seed>/ for each of
    `oracle_seeds`: the same oracle recipe with another seed); return their paths."""
    out = Path(out)
    paths = {"data": out / "data", "base": out / "base", "finetuned": out / "finetuned", "oracle": out / "oracle"}
    write_testbed(paths["data"], recipe.synth)
    for name in ("base", "finetuned", "oracle"):
        train_model(name, paths, recipe, progress)
    for seed in oracle_seeds:
        paths[f"oracle-{seed}"] = out / f"oracle-{seed}"
        train_model("oracle", paths, replace(recipe, seed=seed), progress, out=paths[f"oracle-{seed}"])
    return paths


def train_model(name: str, paths: dict[str, Path], recipe: TestbedRecipe, progress: bool, out: Path | None = None) -> None:
    """Train the testbed's `base`, `finetuned` or `oracle` model into `out` (default: paths[name])."""
    data = paths["data"]
    train = TrainSettings(batch_size=recipe.batch_size, lr=recipe.lr, seed=recipe.seed, progress=progress)
    if name == "base":
        model = ModelSettings("tiny:olmo", tokenizer=str(data / "tokenizer"), size=recipe.size)
        settings = FinetuneSettings(model=model, data=(str(data / "pretrain.parquet"),), out="",
                                    train=replace(train, steps=recipe.base_steps, lr=recipe.base_lr))
    else:
        files = recipe.finetune_data(data) if name == "finetuned" else recipe.oracle_data(data)
        settings = FinetuneSettings(model=ModelSettings(str(paths["base"])), data=files, out="", train=replace(train, epochs=recipe.finetune_epochs))
    finetune(replace(settings, out=str(out or paths[name]), overwrite=True))


def accuracy_table(models: dict[str, Path], data: Path) -> pd.DataFrame:
    """Teacher-forced answer-token accuracy of each model on each testbed split."""
    rows = []
    tokenizer = load_tokenizer(data / "tokenizer")
    encoded = {split: encode(read_split(data / f"{split}.parquet"), tokenizer) for split in SPLITS}
    for name, path in models.items():
        model = load_model(path, tokenizer)
        for split, enc in encoded.items():
            rows.append({"model": name, "split": split, "answer_accuracy": answer_accuracy(teacher_forced(model, enc, pad_id(tokenizer)))})
    return pd.DataFrame(rows).pivot(index="model", columns="split", values="answer_accuracy")[list(SPLITS)]


# ---------------------------------------------------------------- stages, cached by their inputs


def intact(path: Path) -> bool:
    """Whether a stage output exists and every file the toolkit wrote in it reads back (safetensors
    headers that cover their file, parquet footers, JSON)."""
    if not path.exists():
        return False
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    try:
        for file in files:
            if file.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(file), framework="pt"):
                    pass
            elif file.suffix == ".parquet":
                import pyarrow.parquet as pq

                pq.read_metadata(file)
            elif file.suffix == ".json":
                json.loads(file.read_text())
    except Exception:
        return False
    return True


@dataclass
class Stage:
    """One step of the study: what it writes, what it depends on, how long it is expected to take."""

    name: str
    run: Callable[[], dict | None]
    outputs: tuple[Path, ...]
    inputs: dict
    upstream: tuple[str, ...] = ()
    expected_s: float = 0.0


class Study:
    """Runs stages in order, reusing a stage whose inputs (its settings and its upstream stages'
    keys) are unchanged and whose outputs are intact."""

    def __init__(self, out: Path, total: int, echo: Callable[[str], None] = print):
        self.out, self.total, self.echo = out, total, echo
        self.keys: dict[str, str] = {}
        self.results: dict[str, dict] = {}
        self.seconds: dict[str, float] = {}
        self.done = 0

    def key(self, stage: Stage) -> str:
        text = json.dumps({"stage": stage.name, "inputs": stage.inputs, "upstream": [self.keys[u] for u in stage.upstream],
                           "version": STUDY_VERSION}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def run(self, stage: Stage) -> dict:
        self.done += 1
        key = self.key(stage)
        record_path = self.out / RECORDS / f"{stage.name}.json"
        record = _read_json(record_path)
        label = f"[{self.done:>2}/{self.total}] {stage.name:<11}"
        if record and record.get("key") == key and all(intact(p) for p in stage.outputs):
            self.keys[stage.name], self.results[stage.name], self.seconds[stage.name] = key, record.get("result") or {}, 0.0
            self.echo(f"{label} reused (took {record['seconds']:.0f} s when it ran)")
            return self.results[stage.name]
        for path in stage.outputs:  # a stale or damaged output is redone from scratch
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        record_path.unlink(missing_ok=True)
        start = time.perf_counter()
        result = stage.run() or {}
        seconds = time.perf_counter() - start
        write_json(record_path, {"key": key, "seconds": seconds, "result": result, "inputs": stage.inputs})
        self.keys[stage.name], self.results[stage.name], self.seconds[stage.name] = key, result, seconds
        self.echo(f"{label} {seconds:5.0f} s{timing_note(seconds, stage.expected_s)}")
        return result


SLOW = 1.5  # a stage this many times its expected time is called out
SLOW_SLACK_S = 5.0  # ... when it is also this much longer (a 1 s stage taking 2 s is noise)


def timing_note(seconds: float, expected_s: float) -> str:
    """' (expected ~N s)' after a stage's time, saying so when the stage ran SLOW× past it."""
    if not expected_s:
        return ""
    if seconds > SLOW * expected_s and seconds > expected_s + SLOW_SLACK_S:
        return (f" (expected ~{expected_s:.0f} s; {seconds / expected_s:.1f}× that: other processes on the cores? "
                "with them, OMP_NUM_THREADS=1 runs faster)")
    return f" (expected ~{expected_s:.0f} s)"


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def unlearned_name(method: str, mask: str) -> str:
    return f"{method}-{mask}"


def stages(out: Path, paths: dict[str, Path], recipe: StudyRecipe, progress: bool) -> list[Stage]:
    """The study's stages in order (see the module docstring)."""
    t = recipe.testbed
    data = paths["data"]
    testbed = asdict(t)
    unlearned = [unlearned_name(m, k) for m in recipe.methods for k in recipe.masks]
    return [
        Stage("data", lambda: write_testbed(data, t.synth) and None, (data,), asdict(t.synth)),
        Stage("base", lambda: train_model("base", paths, t, progress), (paths["base"],), testbed, ("data",)),
        Stage("finetuned", lambda: train_model("finetuned", paths, t, progress), (paths["finetuned"],), testbed, ("base",)),
        Stage("oracle", lambda: train_model("oracle", paths, t, progress), (paths["oracle"],), testbed, ("base",)),
        Stage("shift", lambda: shift_stage(out, paths, progress), (out / "shift",), {}, ("finetuned",)),
        Stage("rankings", lambda: rankings_stage(out, paths, recipe, progress), (out / "rankings", out / "compare"),
              {"scores": recipe.scores, "top": recipe.top}, ("finetuned",)),
        Stage("unlearning", lambda: unlearning_stage(out, paths, recipe, progress), tuple(out / "unlearned" / n for n in unlearned),
              {k: getattr(recipe, k) for k in ("masks", "methods", "top", "unlearn_steps", "unlearn_lr", "w_retain")}, ("rankings",)),
        Stage("evaluation", lambda: evaluation_stage(out, paths, recipe, unlearned, progress), (out / "eval",),
              {"models": unlearned, "max_new_tokens": recipe.max_new_tokens}, ("unlearning", "oracle")),
        Stage("curves", lambda: curves_stage(out, paths, recipe, progress), (out / "curves",),
              {k: getattr(recipe, k) for k in ("curve_steps", "curve_every", "unlearn_lr", "w_retain")}, ("finetuned", "oracle")),
        Stage("probes", lambda: probes_stage(out, paths, recipe, progress), (out / "probes",),
              {k: getattr(recipe, k) for k in ("relearn_steps", "quantize_bits", "probe_masks", "max_new_tokens")}, ("unlearning",)),
        Stage("report", lambda: write_report(out, recipe), (out / "report.md", out / "figures"), {},
              ("shift", "rankings", "evaluation", "curves", "probes")),
    ]


def shift_stage(out: Path, paths: dict[str, Path], progress: bool) -> dict:
    from analysis.shift import ShiftSettings, parameter_shift, write_shift

    table = parameter_shift(paths["base"], paths["finetuned"], ShiftSettings(progress=progress))
    write_shift(out / "shift", table, {"base": str(paths["base"]), "finetuned": str(paths["finetuned"])})
    return {}


def _splits(data: Path) -> dict[str, pd.DataFrame]:
    return {name: read_split(data / f"{name}.parquet") for name in ("forget", "retain", "holdout")}


def rankings_stage(out: Path, paths: dict[str, Path], recipe: StudyRecipe, progress: bool) -> dict:
    """Every score's ranking of the finetuned model's tensors, their agreement, and what each selects."""
    from analysis.compare import compare_rankings, rank_table, write_comparison
    from soir.ranking import RankSettings, rank
    from soir.select import SelectSettings, select

    data = paths["data"]
    tokenizer = load_tokenizer(data / "tokenizer")
    model = load_model(paths["finetuned"], tokenizer, eager_attention=True)
    base = load_model(paths["base"], tokenizer, eager_attention=True)
    frames = _splits(data)
    forget, retain = (encode(frames[s], tokenizer) for s in ("forget", "retain"))
    rankings, selections = {}, {}
    for score in recipe.scores:
        ranking = rank(model, forget, retain, pad_id(tokenizer), RankSettings(score=score, seed=recipe.testbed.seed),
                       base_model=base if score == "shift" else None, progress=progress)
        ranking.save(out / "rankings" / score)
        rankings[score] = ranking
        selections[score] = select(ranking, model, SelectSettings(top=recipe.top, by="params")).settings["groups"]
    (out / "compare").mkdir(parents=True, exist_ok=True)
    write_comparison(out / "compare", compare_rankings(rankings), rank_table(rankings), pair=("soir", "random"))
    distinct = len({tuple(sorted(groups)) for groups in selections.values()})
    write_json(out / "rankings" / "selections.json", {"top": recipe.top, "by": "params", "selections": selections, "distinct": distinct})
    return {"distinct_selections": distinct, "n_groups": int(len(next(iter(rankings.values())).table))}


def unlearning_stage(out: Path, paths: dict[str, Path], recipe: StudyRecipe, progress: bool) -> dict:
    """Masked unlearning of the finetuned model on each mask with each method."""
    from soir.select import SelectSettings
    from unlearn.objectives import ObjectiveSettings
    from unlearn.unlearning import UnlearnSettings, unlearn

    data = paths["data"]
    train = TrainSettings(steps=recipe.unlearn_steps, lr=recipe.unlearn_lr, eval_every=max(1, recipe.unlearn_steps // 5),
                          seed=recipe.testbed.seed, progress=progress)
    results = {}
    for method in recipe.methods:
        for mask in recipe.masks:
            source = {} if mask == "full" else {"ranking": str(out / "rankings" / mask), "selection": SelectSettings(top=recipe.top, by="params")}
            name = unlearned_name(method, mask)
            result = unlearn(UnlearnSettings(
                model=ModelSettings(str(paths["finetuned"]), dtype="float32"), forget=(str(data / "forget.parquet"),),
                retain=(str(data / "retain.parquet"),), out=str(out / "unlearned" / name), objective=method,
                weights=ObjectiveSettings(w_retain=recipe.w_retain), train=train, overwrite=True, **source))
            results[name] = {"final_loss": result.final_loss, "seconds": result.seconds}
    return results


EVAL_COLUMNS = {
    "forget regurgitation": "forget/regurgitation",
    "forget knowledge": "forget/knowledge",
    "retain regurgitation": "retain/regurgitation",
    "retain knowledge": "retain/knowledge",
    "forget accuracy": "forget/accuracy",
    "retain accuracy": "retain/accuracy",
    "paraphrased forget EM": "forget/paraphrased_exact_match",
    "task aggregate": "task_aggregate",
    "MIA AUC": "mia_auc",
    "MIA score": "mia_score",
    "MMLU": "mmlu/accuracy",
    "forget quality": "forget_quality",
    "model utility": "model_utility",
    "final score": "final_score",
}


EVAL_BATCH = 64  # rows per batch wherever the study measures a model: greedy decoding costs per step, not per row


def testbed_eval_settings(max_new_tokens: int = 80, progress: bool = False):
    """How the testbed's models are evaluated (MMLU prompts as the general split is trained)."""
    from analysis.evaluate import EvalSettings
    from analysis.generation import GenerationSettings
    from analysis.metrics import ScoreSettings
    from analysis.mmlu import MMLUSettings

    return EvalSettings(
        generation=GenerationSettings(max_new_tokens=max_new_tokens, batch_size=EVAL_BATCH, progress=progress),
        scoring=ScoreSettings(batch_size=EVAL_BATCH, progress=progress),
        mmlu=MMLUSettings(prompt="{question}", batch_size=EVAL_BATCH, progress=progress),
        progress=progress,
    )


def evaluation_stage(out: Path, paths: dict[str, Path], recipe: StudyRecipe, unlearned: list[str], progress: bool) -> dict:
    """`analysis.evaluate` of every model into eval/<model>/; the headline numbers in eval/summary.parquet.

    Forget quality compares each model's forget truth ratios with the oracle's (evaluated first)."""
    from analysis.evaluate import evaluate, write_evaluation
    from analysis.metrics import forget_quality
    from soir.io import write_parquet

    data = paths["data"]
    tokenizer = load_tokenizer(data / "tokenizer")
    frames = _splits(data)
    settings = testbed_eval_settings(recipe.max_new_tokens, progress)
    models = {"oracle": paths["oracle"], "base": paths["base"], "finetuned": paths["finetuned"],
              **{name: out / "unlearned" / name for name in unlearned}}
    reference, rows = None, {}
    for name, path in models.items():
        model = load_model(path, tokenizer)
        metrics, per_example = evaluate(model, tokenizer, {"forget": frames["forget"], "retain": frames["retain"]}, holdout=frames["holdout"],
                                        mmlu=data / "general_mc.parquet", oracle=reference, settings=settings)
        if name == "oracle":
            reference = per_example[per_example["split"] == "forget"]
            ratios = reference["truth_ratio"].to_numpy(dtype=float)
            metrics["forget_quality"] = forget_quality(ratios, ratios)
        write_evaluation(out / "eval" / name, metrics, per_example)
        rows[name] = {"model": name, **{label: metrics.get(key) for label, key in EVAL_COLUMNS.items()}}
    order = ["base", "finetuned", "oracle", *unlearned]
    write_parquet(out / "eval" / "summary.parquet", pd.DataFrame([rows[n] for n in order]))
    return {}


def curves_stage(out: Path, paths: dict[str, Path], recipe: StudyRecipe, progress: bool) -> dict:
    from analysis.curves import CurveSettings, layer_curves, write_curves
    from unlearn.objectives import ObjectiveSettings

    data = paths["data"]
    tokenizer = load_tokenizer(data / "tokenizer")
    frames = _splits(data)
    train = TrainSettings(steps=recipe.curve_steps, eval_every=recipe.curve_every, lr=recipe.unlearn_lr, warmup=0, progress=False,
                          seed=recipe.testbed.seed)
    settings = CurveSettings(by="layer", objective="graddiff", weights=ObjectiveSettings(w_retain=recipe.w_retain), train=train)
    curves = layer_curves(load_model(paths["finetuned"], tokenizer), tokenizer, frames["forget"], frames["retain"], settings,
                          out=out / "curves", oracle=load_model(paths["oracle"], tokenizer), progress=progress)
    write_curves(out / "curves", curves)
    return {}


def probes_stage(out: Path, paths: dict[str, Path], recipe: StudyRecipe, progress: bool) -> dict:
    """The relearning attack and the quantization probe on the unlearned models of the first method
    (the `probe_masks` ones)."""
    from analysis.quantize import QuantizeSettings, quantize_probe
    from analysis.relearn import RelearnSettings, relearn_attack
    from soir.io import write_parquet

    data = paths["data"]
    tokenizer = load_tokenizer(data / "tokenizer")
    frames = _splits(data)
    rows = []
    for mask in recipe.probe_masks:
        name = unlearned_name(recipe.methods[0], mask)
        settings = RelearnSettings(steps=recipe.relearn_steps, seed=recipe.testbed.seed, max_new_tokens=recipe.max_new_tokens,
                                   eval_batch_size=EVAL_BATCH, progress=progress)
        result = relearn_attack(out / "unlearned" / name, tokenizer, frames["forget"], settings=settings)
        write_json(out / "probes" / f"relearn-{name}.json", result)
        held = result["held_out"]
        rows.append({"model": name, "probe": f"relearn ({recipe.relearn_steps} steps)", "forget accuracy before": held["before"]["accuracy"],
                     "forget accuracy after": held["after"]["accuracy"], "retain accuracy before": math.nan, "retain accuracy after": math.nan,
                     "forget knowledge before": held["before"]["knowledge"], "forget knowledge after": held["after"]["knowledge"]})
        model = load_model(out / "unlearned" / name, tokenizer)
        for bits in recipe.quantize_bits:
            result = quantize_probe(model, tokenizer, frames["forget"], frames["retain"],
                                    QuantizeSettings(bits=bits, max_new_tokens=recipe.max_new_tokens, batch_size=EVAL_BATCH, progress=progress))
            write_json(out / "probes" / f"quantize{bits}-{name}.json", result)
            before, after = result["before"], result["after"]
            rows.append({"model": name, "probe": f"quantize {bits}-bit", "forget accuracy before": before["forget"]["accuracy"],
                         "forget accuracy after": after["forget"]["accuracy"], "retain accuracy before": before["retain"]["accuracy"],
                         "retain accuracy after": after["retain"]["accuracy"], "forget knowledge before": before["forget"]["knowledge"],
                         "forget knowledge after": after["forget"]["knowledge"]})
    write_parquet(out / "probes" / "summary.parquet", pd.DataFrame(rows))
    return {}


def write_report(out: Path, recipe: StudyRecipe) -> dict:
    from analysis.report import write_report as write

    return write(out, recipe)


# expected seconds per stage on 2 cores. default: the stage lines of `make demo` on a fresh clone on 2 idle cores
# (2026-12-07, the README's "Quick start"); quick: an earlier `soir demo --quick` run, not measured again
EXPECTED = {
    "default": {"data": 1, "base": 39, "finetuned": 76, "oracle": 63, "shift": 1, "rankings": 19, "unlearning": 93, "evaluation": 43,
                "curves": 47, "probes": 37, "report": 1},
    "quick": {"data": 3, "base": 8, "finetuned": 20, "oracle": 12, "shift": 2, "rankings": 8, "unlearning": 10, "evaluation": 15,
              "curves": 10, "probes": 8, "report": 4},
}


def study(out: str | Path, recipe: StudyRecipe = StudyRecipe(), progress: bool = True, expected: dict | None = None,
          echo: Callable[[str], None] = print) -> dict:
    """Run (or continue) the whole study into `out`; return the report's numbers."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"data": out / "data", "base": out / "base", "finetuned": out / "finetuned", "oracle": out / "oracle"}
    expected = expected or {}
    plan = stages(out, paths, recipe, progress)
    runner = Study(out, len(plan), echo)
    for stage in plan:
        stage.expected_s = expected.get(stage.name, 0.0)
        runner.run(stage)
    return {"seconds": runner.seconds, "results": runner.results}


# ---------------------------------------------------------------- the command


def demo_arguments(p) -> None:
    from soir.flags import add_common, add_progress

    add_common(p, "directory for every artifact of the study (an earlier run there is continued)")
    p.add_argument("--quick", action="store_true", help="a reduced testbed and study (about 2 minutes on 2 cores)")
    p.add_argument("--methods", nargs="+", metavar="NAME", help="unlearning objectives to run on each mask (default: graddiff; "
                   "any of the registered ones, e.g. graddiff npo idk dpo rmu; each adds about a minute)")
    p.add_argument("--redo", action="store_true", help="run every stage again instead of reusing finished ones")
    add_progress(p)


def run(args) -> int:
    """The whole localized-unlearning study on the built-in testbed: build the testbed (data, tokenizer,
    a base model, its finetuned model and a retain-only oracle), measure the parameter shift, rank the
    finetuned model's tensors by soir and every baseline, unlearn the top 10% of parameters by soir, by
    random and the full model, evaluate every model, draw the layer-robustness curves, probe the
    unlearned models (relearning, quantization), and write report.md with its figures. Finished
    stages are reused when run again (and an interrupted run continues); --redo runs them all."""
    out = check_out_dir(args.out, "report.md", resume=(Path(args.out) / RECORDS).is_dir())
    if args.redo:
        shutil.rmtree(out / RECORDS, ignore_errors=True)
    recipe = StudyRecipe.quick(args.seed) if args.quick else StudyRecipe(testbed=TestbedRecipe(synth=SynthSettings(seed=args.seed), seed=args.seed))
    if args.methods:
        from unlearn.objectives import OBJECTIVES, unlearns

        for name in args.methods:
            if name not in OBJECTIVES or not unlearns(OBJECTIVES.get(name)):
                raise UserError(f"--methods {name!r} is not an unlearning objective: use any of "
                                f"{', '.join(n for n, o in OBJECTIVES.items() if unlearns(o))}")
        recipe = replace(recipe, methods=tuple(dict.fromkeys(args.methods)))
    start = time.perf_counter()
    study(out, recipe, progress=not args.no_progress, expected=EXPECTED["quick" if args.quick else "default"])
    print(f"\nthe study took {time.perf_counter() - start:.0f} s; report: {out / 'report.md'}")
    return 0


