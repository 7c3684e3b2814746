"""A ground truth for localizers: forget knowledge planted in known tensors, two ways.

Two recipes, each with the testbed's own learning rate, batch size and epochs:

- **a** (`from retain-only`): from the retain-only model (the testbed's oracle), forget + retain
  are finetuned into the chosen tensors only (`soir finetune --include`); every other tensor is
  bit-identical to the start.
- **b** (`realistic`): from the pretrained base, the whole model is finetuned as the testbed's
  oracle is (retain, retain phrasings, general text), with the forget rows and their phrasings
  mixed into the same batches but their gradient confined to the chosen tensors
  (`soir finetune --confine`): every tensor moved, only the chosen ones hold the forget knowledge.

Placements: each block × attention / MLP, one MLP tensor and two tensors in different layers
(`--placements NAME=REGEX ...` runs others). Then, per recipe × placement × seed:

1. *Where was it written?* Every localizer ranks the planted model's tensor groups: precision of
   the planted tensors in its top k (k = the number planted), precision of its selection at the
   planted parameter count (`--by params`), recall in its top 2k, average precision. `shift` and
   `revert` read the pretrained base (what a user has); `shift (circular)` reads the model right
   before planting and is shown for reference only (it is the answer). `random` is averaged over
   `--random-masks` seeds.
2. *Where does removing it cost retain least?* (`--unlearn`) GradDiff on each localizer's
   selection at the planted parameter count, and on the planted tensors themselves (the oracle
   mask), at matched forget: the learning rate is searched (`analysis.matching`, ≤ `--max-runs`
   runs) until the forget accuracy of the validation half of the forget subjects is within
   ±`--tol` of the retain-only model's; the other half of the forget subjects and retain subjects
   never used in unlearning are the test. A run that cannot reach the target is counted as such.

Statistics: mean and bootstrap 95% interval over placements × seeds (resampled together).

    .venv/bin/python benchmarks/planted.py --testbed demo-out

On few cores split recipes or placements over processes (`--out` each, OMP_NUM_THREADS=1) and join
them with `--merge DIR DIR ...`. Writes planted.{csv,json,md,png} (csv: one row per recipe ×
placement × seed × localizer) and planted_planting.csv (each planted model's accuracies).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analysis.demo import TestbedRecipe  # noqa: E402
from analysis.matching import find_operating_point  # noqa: E402
from localization import halve_by_subject  # noqa: E402
from report import write_results  # noqa: E402
from soir.data import encode  # noqa: E402
from soir.mask import Mask  # noqa: E402
from soir.models import ModelSettings  # noqa: E402
from soir.ranking import RankSettings, rank  # noqa: E402
from soir.scores import get_score  # noqa: E402
from soir.select import SelectSettings, select  # noqa: E402
from testbed_runs import Testbed  # noqa: E402
from unlearn.finetune import FinetuneSettings, finetune  # noqa: E402
from unlearn.loop import TrainSettings  # noqa: E402

RECIPES = {"a": "from retain-only", "b": "realistic"}
LOCALIZERS = ("revert", "soir-slope", "cancel", "soir", "soir-line", "soir-datainf", "grad-magnitude", "fo-influence", "fisher", "wagle", "shift", "random")
CIRCULAR = "shift (circular)"
ORACLE = "planted tensors"
UNLEARNED = ("revert", "soir-slope", "cancel", "soir", "shift", "random")


def default_placements(layers: int) -> dict[str, str]:
    """Each block × attention / MLP, one MLP tensor, and two tensors in different layers."""
    out = {}
    for i in range(layers):
        out[f"attention {i}"] = rf"layers\.{i}\.self_attn\.(q|k|v|o)_proj\.weight$"
        out[f"MLP {i}"] = rf"layers\.{i}\.mlp\.(gate|up|down)_proj\.weight$"
    middle = layers // 2
    out[f"MLP down {middle}"] = rf"layers\.{middle}\.mlp\.down_proj\.weight$"
    out[f"MLP up 0 + attention v {layers - 1}"] = rf"layers\.0\.mlp\.up_proj\.weight$|layers\.{layers - 1}\.self_attn\.v_proj\.weight$"
    return out


def plant(testbed: Path, recipe: str, pattern: str, seed: int, out: Path) -> Path:
    """Finetune a model holding the forget knowledge in the tensors `pattern` matches only."""
    t = TestbedRecipe()
    data = testbed / "data"
    files = lambda *names: tuple(str(data / f"{n}.parquet") for n in names)  # noqa: E731
    train = TrainSettings(epochs=t.finetune_epochs, lr=t.lr, batch_size=t.batch_size, seed=seed, progress=False)
    if recipe == "a":
        settings = FinetuneSettings(model=ModelSettings(str(testbed / "oracle"), dtype="float32"), data=files("forget", "retain"),
                                    out=str(out), include=(pattern,), train=train, overwrite=True)
    else:
        settings = FinetuneSettings(model=ModelSettings(str(testbed / "base"), dtype="float32"), data=t.oracle_data(data),
                                    confined_data=files("forget", "forget_phrasings"), confine=(pattern,), out=str(out), train=train, overwrite=True)
    finetune(settings)
    return out


def average_precision(ranked: list[str], planted: set[str]) -> float:
    hits, total = 0, 0.0
    for i, name in enumerate(ranked, 1):
        if name in planted:
            hits += 1
            total += hits / i
    return total / len(planted)


def localization_row(ranking, model, planted: set[str], planted_params: int) -> tuple[dict, Mask]:
    """Precision@k, precision at the planted parameter count, recall@2k and AP of one ranking."""
    table = ranking.ranked()
    order = list(table["group"])
    k = len(planted)
    mask = select(ranking, model, SelectSettings(top=planted_params / Mask.full(model).n_total, by="params"))
    chosen = set(mask.names)
    sizes = dict(zip(table["group"], table["n_params"]))
    selected = sum(sizes[g] for g in chosen)
    return ({"precision_at_k": len(set(order[:k]) & planted) / k, "recall_at_2k": len(set(order[:2 * k]) & planted) / k,
             "average_precision": average_precision(order, planted),
             "precision_params": sum(sizes[g] for g in chosen & planted) / selected if selected else 0.0,
             "top_k": " ".join(order[:k])}, mask)


def run(args) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    bed = Testbed(args.testbed)
    testbed = bed.path
    base = bed.model("base")
    layers = base.config.num_hidden_layers
    placements = dict(p.split("=", 1) for p in args.placements) if args.placements else default_placements(layers)
    forget_halves = halve_by_subject(bed.frames["forget"])
    retain_halves = halve_by_subject(bed.frames["retain"])  # "val": used by GradDiff's retain term; "test": never seen by unlearning
    sets = {"val_forget": encode(forget_halves["val"], bed.tokenizer), "test_forget": encode(forget_halves["test"], bed.tokenizer),
            "test_retain": encode(retain_halves["test"], bed.tokenizer)}
    oracle = bed.accuracies(bed.model("oracle"), sets)
    target = oracle["val_forget"]
    print(f"retain-only model {oracle}; target validation forget {target:.3f}", flush=True)
    rows, planting = [], []
    with tempfile.TemporaryDirectory(prefix="soir-planted-") as work:
        for recipe in args.recipes:
            for placement, pattern in placements.items():
                for seed in range(args.first_seed, args.first_seed + args.seeds):
                    started = time.perf_counter()
                    out = plant(testbed, recipe, pattern, seed, Path(work) / f"{recipe}-{len(planting)}")
                    model = bed.model(out, eager=True)
                    before = bed.model("oracle" if recipe == "a" else "base")
                    rx = re.compile(pattern)
                    planted_names = [n for n, _ in model.named_parameters() if rx.search(n)]
                    planted = set(Mask.from_names(model, planted_names).names)
                    planted_params = sum(p.numel() for n, p in model.named_parameters() if n in planted_names)
                    where = {"recipe": recipe, "placement": placement, "seed": seed}
                    planting.append({**where, "planted": " ".join(planted_names), "n_params": planted_params,
                                     **bed.accuracies(model), **bed.accuracies(model, sets), "seconds": round(time.perf_counter() - started, 1)})
                    print(f"planted {planting[-1]}", flush=True)
                    masks = {ORACLE: Mask.from_names(model, planted_names)}
                    for localizer in [*args.localizers, CIRCULAR]:
                        name = "shift" if localizer == CIRCULAR else localizer
                        reference = before if localizer == CIRCULAR else base
                        draws = range(args.random_masks) if name == "random" else [seed]
                        found = []
                        t = time.perf_counter()
                        for draw in draws:
                            ranking = rank(model, bed.encoded["forget"], bed.encoded["retain"], bed.pad,
                                           RankSettings(score=name, seed=draw, max_examples=args.max_examples, batch_size=32),
                                           base_model=reference if get_score(name).needs_base else None, progress=False)
                            found.append(localization_row(ranking, model, planted, planted_params))
                        seconds = (time.perf_counter() - t) / len(found)
                        stats = {key: float(np.mean([f[0][key] for f in found])) for key in ("precision_at_k", "recall_at_2k", "average_precision", "precision_params")}
                        rows.append({**where, "localizer": localizer, "k": len(planted), "planted_params": planted_params,
                                     "rank_seconds": round(seconds, 2), **stats, "top_k": found[0][0]["top_k"]})
                        masks[localizer] = found[0][1]
                    rows.append({**where, "localizer": ORACLE, "k": len(planted), "planted_params": planted_params, "precision_at_k": 1.0,
                                 "recall_at_2k": 1.0, "average_precision": 1.0, "precision_params": 1.0, "top_k": " ".join(sorted(planted))})
                    if args.unlearn:
                        for name in [ORACLE, *[u for u in args.unlearn if u in masks]]:
                            row = next(r for r in rows[::-1] if r["localizer"] == name and all(r[k] == v for k, v in where.items()))
                            row.update(matched_unlearning(bed, out, masks[name], retain_halves["val"], sets, target, seed, args))
                    Path(args.out).mkdir(parents=True, exist_ok=True)  # what is done so far survives an interrupted run
                    pd.DataFrame(rows).to_csv(Path(args.out) / "planted_partial.csv", index=False)
                    print(pd.DataFrame([r for r in rows if all(r[k] == v for k, v in where.items())])
                          .drop(columns=["top_k", "recipe", "placement", "seed"]).to_string(index=False, float_format=lambda x: f"{x:.3f}"), flush=True)
    meta = {"retain_only_model": oracle, "target_val_forget": target, "placements": placements, "recipes": RECIPES,
            "settings": {k: v for k, v in vars(args).items() if k != "out"}}
    return pd.DataFrame(rows), pd.DataFrame(planting), meta


def matched_unlearning(bed: Testbed, start: Path, mask: Mask, retain_rows: pd.DataFrame, sets: dict, target: float, seed: int, args) -> dict:
    """GradDiff on `mask` at the rate whose validation forget is within tol of `target`; test numbers of that run."""
    def attempt(lr: float):
        model = bed.unlearn(start, mask, "graddiff", lr, args.steps, seed, retain=retain_rows)
        acc = bed.accuracies(model, sets)
        return acc["val_forget"], acc

    point = find_operating_point(attempt, target, args.lr_range[0], args.lr_range[1], tol=args.tol, max_runs=args.max_runs)
    return {"reached": point.reached, "lr": point.lr, "runs": point.n_runs, "why_not": point.reason,
            **{f"unlearned_{k}": v for k, v in point.result.items()}}


def bootstrap(values: np.ndarray, draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """A 95% percentile interval of the mean."""
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    if len(values) < 2:
        return (float("nan"), float("nan"))
    means = np.random.default_rng(seed).choice(values, (draws, len(values))).mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def summarize(table: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per recipe (and both together) and localizer: mean [95% interval] of each localization number, and of the matched retain."""
    out = {}
    measures = ["precision_at_k", "precision_params", "recall_at_2k", "average_precision"]
    if "unlearned_test_retain" in table:
        measures.append("unlearned_test_retain")
    for title, part in [("both recipes", table), *[(f"recipe {r} ({RECIPES[r]})", g) for r, g in table.groupby("recipe")]]:
        rows = []
        for localizer, g in part.groupby("localizer", sort=False):
            row = {"localizer": localizer, "runs": len(g)}
            for m in measures:
                lo, hi = bootstrap(g[m].to_numpy())
                row[m] = f"{g[m].mean():.2f} [{lo:.2f}, {hi:.2f}]"
            if "reached" in g:
                row["reached target"] = f"{int(g['reached'].fillna(False).sum())}/{int(g['reached'].notna().sum())}"
            rows.append(row)
        out[f"Localization, {title}: mean [95% bootstrap interval] over placements × seeds"] = pd.DataFrame(rows).set_index("localizer")
    per_placement = table.pivot_table(index="localizer", columns=["recipe", "placement"], values="precision_at_k", sort=False)
    out["Precision@k per recipe and placement (mean over seeds)"] = per_placement
    return out


def plot(table: pd.DataFrame, path: Path) -> None:
    from analysis.plots import new_figure, save_figure

    recipes = sorted(table["recipe"].unique())
    fig, axes = new_figure((6 * len(recipes), 4.8), len(recipes))
    axes = np.atleast_1d(axes)
    for ax, recipe in zip(axes, recipes):
        part = table[table.recipe == recipe]
        order = list(dict.fromkeys(part["localizer"]))
        stats = part.groupby("localizer", sort=False)["precision_at_k"]
        means = stats.mean().loc[order]
        intervals = np.array([bootstrap(part[part.localizer == n]["precision_at_k"].to_numpy()) for n in order])
        errors = np.abs(intervals.T - means.to_numpy())
        ax.bar(range(len(order)), means, yerr=np.nan_to_num(errors), capsize=2, color=["grey" if n in (CIRCULAR, ORACLE) else "C0" for n in order])
        ax.set_xticks(range(len(order)), order, rotation=40, ha="right", fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("precision of the planted tensors in the top k")
        ax.set_title(f"recipe {recipe} ({RECIPES[recipe]}): mean, 95% interval", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    save_figure(fig, path)


def write(table: pd.DataFrame, planting: pd.DataFrame, meta: dict, out: Path, started: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    planting.to_csv(out / "planted_planting.csv", index=False)
    tables = summarize(table)
    notes = ("`shift (circular)` measures the shift from the model right before planting: it is the answer, not a localizer. "
             "`planted tensors` is the oracle mask. Every other score reads only what a user has (the planted model, "
             "its forget and retain rows, and for `shift` and `revert` the pretrained base).")
    paths = write_results(out, "planted", table, meta, started=started, tables=tables, figure=lambda p: plot(table, p), notes=notes)
    print(next(iter(tables.values())).to_string())
    print("wrote", ", ".join(str(p) for p in paths.values()))


def merge(dirs: list[Path], out: Path, started: float) -> int:
    """Join runs over other recipes or placements (same testbed and settings) into one set of outputs."""
    finished = [d for d in dirs if (d / "planted.json").is_file()]
    interrupted = [d for d in dirs if d not in finished]  # stopped early: their planted_partial.csv rows count, said so in the JSON
    metas = [json.loads((d / "planted.json").read_text()) for d in finished]
    table = pd.concat([pd.read_csv(d / "planted.csv") for d in finished] + [pd.read_csv(d / "planted_partial.csv") for d in interrupted],
                      ignore_index=True)
    planting = pd.concat([pd.read_csv(d / "planted_planting.csv") for d in finished], ignore_index=True)
    meta = {**{k: v for k, v in metas[0].items() if k not in ("command", "seconds", "tables", "versions")},
            "merged": [{"command": m["command"], "seconds": m["seconds"]} for m in metas],
            "interrupted": [{"dir": str(d), "rows": int(len(pd.read_csv(d / "planted_partial.csv")))} for d in interrupted]}
    meta["placements"] = {k: v for m in metas for k, v in m["placements"].items()}
    write(table, planting, meta, out, started)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--testbed", default=str(ROOT / "demo-out"), help="a `soir demo` output (base/, oracle/, finetuned/, data/)")
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--placements", nargs="+", metavar="NAME=REGEX", help="where to plant (tensor-name regexes); default: every block × "
                   "attention / MLP, one MLP tensor, two tensors in different layers")
    p.add_argument("--localizers", nargs="+", default=list(LOCALIZERS))
    p.add_argument("--seeds", type=int, default=1, help="planting seeds (batch order of the planting finetune; default: 1)")
    p.add_argument("--first-seed", type=int, default=0, help="the first planting seed (default: 0)")
    p.add_argument("--random-masks", type=int, default=10, help="random rankings averaged for `random` (default: 10)")
    p.add_argument("--max-examples", type=int, default=128, help="rows per split the localizers rank with (default: 128)")
    p.add_argument("--unlearn", nargs="*", default=[], metavar="LOCALIZER",
                   help=f"GradDiff at matched forget on these localizers' selections and on the planted tensors (e.g. {' '.join(UNLEARNED)})")
    p.add_argument("--steps", type=int, default=30, help="GradDiff steps (default: 30)")
    p.add_argument("--lr-range", type=float, nargs=2, default=[1e-3, 1e-1], help="the search's first bracket (default: 1e-3 1e-1)")
    p.add_argument("--tol", type=float, default=0.01, help="validation forget within ±tol of the target (default: 0.01)")
    p.add_argument("--max-runs", type=int, default=8)
    p.add_argument("--merge", nargs="+", metavar="DIR", help="join the outputs of runs over other recipes or placements into --out, and stop")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    started = time.perf_counter()
    if args.merge:
        return merge([Path(d) for d in args.merge], Path(args.out), started)
    table, planting, meta = run(args)
    write(table, planting, meta, Path(args.out), started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
