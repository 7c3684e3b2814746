"""`soir demo`: the whole study on the built-in testbed, end to end on a laptop CPU.

So far: build the testbed (splits + tokenizer), train the base model on `general`, finetune
it on `forget` + `retain`, train the retain-only oracle (the base model finetuned on `retain`
alone, same recipe: the reference for TOFU forget quality), report teacher-forced answer
accuracy of every model on every split, and evaluate each (`analysis.evaluate`: SemEval
metrics, MIA with `holdout` as non-members, MMLU-style accuracy on `general_mc`, forget
quality against the oracle) into eval/<model>/. Then the localized unlearning study: rank the
finetuned model's tensors by `soir` (and, as the control, `random`), select the top 10% of
parameters by each, unlearn with GradDiff on those alone, and evaluate the unlearned models
beside the others.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from soir.data import answer_accuracy, encode, pad_id, read_split, teacher_forced
from soir.io import check_out_dir, write_json
from soir.models import ModelSettings, TinySize, load_model, load_tokenizer
from soir.synth import SynthSettings, write_testbed
from unlearn.finetune import FinetuneSettings, finetune
from unlearn.loop import TrainSettings


@dataclass(frozen=True)
class TestbedRecipe:
    """Sizes and schedules of the testbed build; the defaults memorise in a few CPU minutes."""

    synth: SynthSettings = field(default_factory=SynthSettings)
    size: TinySize = field(default_factory=TinySize)
    base_steps: int = 150
    finetune_steps: int = 500
    lr: float = 3e-3
    batch_size: int = 32
    seed: int = 0

    @classmethod
    def quick(cls, seed: int = 0) -> "TestbedRecipe":
        """A reduced build for tests and `--quick`: fewer people, a narrower model, fewer steps."""
        synth = SynthSettings(seed=seed, people_forget=2, people_retain=4, people_holdout=2, docs_forget=1, docs_retain=1, docs_holdout=1, vocab_size=512)
        return cls(synth=synth, size=TinySize(hidden=64, layers=2, heads=4, intermediate=256), base_steps=40, finetune_steps=200, seed=seed)


@dataclass(frozen=True)
class UnlearnRecipe:
    """The demo's localized unlearning: one run per ranking score, equal parameter budgets."""

    scores: tuple[str, ...] = ("soir", "random")
    top: float = 0.1  # fraction of parameters, filled in rank order
    objective: str = "graddiff"
    steps: int = 100
    lr: float = 1e-2
    w_retain: float = 5.0
    seed: int = 0


SPLITS = ("forget", "retain", "holdout", "general")


def build_testbed(out: str | Path, recipe: TestbedRecipe = TestbedRecipe(), progress: bool = True) -> dict[str, Path]:
    """Write data/, base/, finetuned/ and oracle/ (base finetuned on `retain` only) under `out`; return their paths."""
    out = Path(out)
    data = out / "data"
    write_testbed(data, recipe.synth)
    train = TrainSettings(steps=recipe.base_steps, batch_size=recipe.batch_size, lr=recipe.lr, seed=recipe.seed, progress=progress)
    tiny = ModelSettings("tiny:olmo", tokenizer=str(data / "tokenizer"), size=recipe.size)
    finetune(FinetuneSettings(model=tiny, data=(str(data / "general.parquet"),), out=str(out / "base"), train=train, overwrite=True))
    train = TrainSettings(steps=recipe.finetune_steps, batch_size=recipe.batch_size, lr=recipe.lr, seed=recipe.seed, progress=progress)
    base = ModelSettings(str(out / "base"))
    member_data = (str(data / "forget.parquet"), str(data / "retain.parquet"))
    finetune(FinetuneSettings(model=base, data=member_data, out=str(out / "finetuned"), train=train, overwrite=True))
    finetune(FinetuneSettings(model=base, data=(str(data / "retain.parquet"),), out=str(out / "oracle"), train=train, overwrite=True))
    return {"data": data, "base": out / "base", "finetuned": out / "finetuned", "oracle": out / "oracle"}


def localized_unlearning(paths: dict[str, Path], out: Path, recipe: UnlearnRecipe = UnlearnRecipe(), progress: bool = True) -> dict[str, Path]:
    """Rank, select and unlearn once per score; return the unlearned model directories by label."""
    from soir.ranking import RankSettings, rank
    from soir.select import SelectSettings, select
    from unlearn.objectives import ObjectiveSettings
    from unlearn.unlearning import UnlearnSettings, unlearn

    data = paths["data"]
    tokenizer = load_tokenizer(data / "tokenizer")
    model = load_model(paths["finetuned"], tokenizer, eager_attention=True)
    forget, retain = (encode(read_split(data / f"{split}.parquet"), tokenizer) for split in ("forget", "retain"))
    unlearned = {}
    for score in recipe.scores:
        ranking = rank(model, forget, retain, pad_id(tokenizer), RankSettings(score=score, seed=recipe.seed), progress=progress)
        ranking.save(out / "rankings" / score)
        mask_dir = select(ranking, model, SelectSettings(top=recipe.top, by="params")).save(out / "masks" / score)
        target = out / f"unlearned-{score}"
        unlearn(UnlearnSettings(
            model=ModelSettings(str(paths["finetuned"]), dtype="float32"), forget=(str(data / "forget.parquet"),), retain=(str(data / "retain.parquet"),),
            out=str(target), objective=recipe.objective, weights=ObjectiveSettings(w_retain=recipe.w_retain), mask=str(mask_dir),
            train=TrainSettings(steps=recipe.steps, lr=recipe.lr, seed=recipe.seed, progress=progress), overwrite=True,
        ))
        unlearned[f"unlearned-{score}"] = target
    return unlearned


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


EVAL_COLUMNS = {
    "forget regurgitation": "forget/regurgitation",
    "forget knowledge": "forget/knowledge",
    "retain regurgitation": "retain/regurgitation",
    "retain knowledge": "retain/knowledge",
    "paraphrased forget EM": "forget/paraphrased_exact_match",
    "task aggregate": "task_aggregate",
    "MIA AUC": "mia_auc",
    "MIA score": "mia_score",
    "MMLU": "mmlu/accuracy",
    "forget quality": "forget_quality",
    "model utility": "model_utility",
    "final score": "final_score",
}


def evaluation_table(models: dict[str, Path], data: Path, out: Path, oracle: str = "oracle", progress: bool = True) -> pd.DataFrame:
    """`analysis.evaluate` of each model on the testbed, written to out/<model>/; the headline numbers as a table.

    Forget quality compares each model's forget truth ratios with those of `models[oracle]`
    (evaluated first; its own forget quality is 1 by definition).
    """
    from analysis.evaluate import EvalSettings, evaluate, write_evaluation
    from analysis.generation import GenerationSettings
    from analysis.metrics import ScoreSettings, forget_quality
    from analysis.mmlu import MMLUSettings

    tokenizer = load_tokenizer(data / "tokenizer")
    splits = {name: read_split(data / f"{name}.parquet") for name in ("forget", "retain")}
    holdout = read_split(data / "holdout.parquet")
    settings = EvalSettings(
        generation=GenerationSettings(max_new_tokens=80, batch_size=32, progress=progress),
        scoring=ScoreSettings(batch_size=32, progress=progress),
        mmlu=MMLUSettings(prompt="{question}", batch_size=64, progress=progress),  # as the general split is trained
        progress=progress,
    )
    order = sorted(models, key=lambda name: name != oracle)
    reference, rows = None, {}
    for name in order:
        model = load_model(models[name], tokenizer)
        metrics, per_example = evaluate(model, tokenizer, splits, holdout=holdout, mmlu=data / "general_mc.parquet", oracle=reference, settings=settings)
        if name == oracle:
            reference = per_example[per_example["split"] == "forget"]
            ratios = reference["truth_ratio"].to_numpy(dtype=float)
            metrics["forget_quality"] = forget_quality(ratios, ratios)
        write_evaluation(out / name, metrics, per_example)
        rows[name] = {label: metrics.get(key) for label, key in EVAL_COLUMNS.items()}
    return pd.DataFrame.from_dict(rows, orient="index").reindex(list(models)).astype(float)


def demo_arguments(p) -> None:
    from soir.flags import add_common, add_progress

    add_common(p, "directory for every artifact of the study")
    p.add_argument("--quick", action="store_true", help="a reduced testbed that runs in well under a minute")
    add_progress(p)


def run(args) -> int:
    """The whole study on the built-in testbed: build the testbed (data, tokenizer), train the base model
    on `general`, finetune it on forget + retain, rank, unlearn and evaluate, and write report.md."""
    out = check_out_dir(args.out, "demo.json")
    recipe = TestbedRecipe.quick(args.seed) if args.quick else TestbedRecipe(synth=SynthSettings(seed=args.seed), seed=args.seed)
    start = time.perf_counter()
    paths = build_testbed(out, recipe, progress=not args.no_progress)
    build_seconds = time.perf_counter() - start
    start = time.perf_counter()
    unlearned = localized_unlearning(paths, out, UnlearnRecipe(seed=args.seed), progress=not args.no_progress)
    unlearn_seconds = time.perf_counter() - start
    models = {"base": paths["base"], "finetuned": paths["finetuned"], "oracle": paths["oracle"], **unlearned}
    paths = {**paths, **unlearned}
    table = accuracy_table(models, paths["data"])
    start = time.perf_counter()
    evaluation = evaluation_table(models, paths["data"], out / "eval", progress=not args.no_progress)
    eval_seconds = time.perf_counter() - start
    (out / "report.md").write_text(
        "# SOIR demo\n\n## Testbed\n\n"
        f"Built in {build_seconds:.0f} s (synth, tokenizer, base, finetune, retain-only oracle).\n\n"
        f"## Localized unlearning\n\nRanked the finetuned model's tensors by `soir` and by `random`, selected the top "
        f"{UnlearnRecipe.top:.0%} of parameters by each (rankings/, masks/), and unlearned with GradDiff on those alone "
        f"(unlearned-<score>/; {unlearn_seconds:.0f} s in all).\n\n"
        "Teacher-forced answer-token accuracy:\n\n" + table.to_markdown(floatfmt=".3f") + "\n\n"
        "## Evaluation\n\n"
        f"`soir evaluate` of each model ({eval_seconds:.0f} s; eval/<model>/metrics.json and per_example.parquet): "
        "regurgitation is ROUGE-L recall of greedy completions, knowledge is QA exact match, MIA uses the holdout "
        "as non-members (LOSS attack; MIA score 1 - 2|AUC - 0.5|), MMLU is multiple-choice accuracy on general_mc "
        "(prompt: the bare question, as the general split is trained), "
        "forget quality is the KS-test p-value of forget truth ratios against the retain-only oracle. "
        "A good unlearned model looks like the oracle.\n\n" + evaluation.to_markdown(floatfmt=".3f") + "\n"
    )
    write_json(out / "demo.json", {
        "recipe": asdict(recipe), "build_seconds": build_seconds, "unlearn_seconds": unlearn_seconds, "eval_seconds": eval_seconds,
        "answer_accuracy": table.to_dict(orient="index"), "evaluation": evaluation.astype(object).where(evaluation.notna(), None).to_dict(orient="index"),
    })
    print(table.to_string(float_format=lambda v: f"{v:.3f}"))
    print()
    print(evaluation.T.to_string(float_format=lambda v: f"{v:.3f}"))
    print(f"\ntestbed built in {build_seconds:.0f} s, unlearned in {unlearn_seconds:.0f} s, evaluated in {eval_seconds:.0f} s")
    width = max(map(len, paths))
    for name, path in {**paths, "report": out / "report.md"}.items():
        print(f"{name:>{width}}: {path}")
    return 0
