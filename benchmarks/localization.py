"""Which localizer gives the best retain at equal forgetting? The comparison at matched operating points.

On the testbed's finetuned model, each localizer ranks the groups once (tensor groups; neuron
groups for budgets under 5%, where a tensor is too coarse); its selection at a parameter budget
(`soir select --top B --by params`) is unlearned with GradDiff and NPO over a learning-rate grid
and several seeds, and so is the full model. The people and documents of each split are halved:
the learning rate of every (selection, objective, seed) is chosen on the validation half (the
one whose forget accuracy comes closest to the retain-only model's, the forgetting an exact
unlearner would reach), and everything is reported on the other half, never on the rows the
choice was made on: teacher-forced answer accuracy, regurgitation and QA exact match of forget
and retain, the MIA score (forget test half against the holdout split), general accuracy (MMLU
layout) and the SemEval final score, mean ± std over seeds; and a Pareto plot of retain
against forget over the whole grid.

    .venv/bin/python benchmarks/localization.py --testbed demo-out

On few cores, split the localizers over processes (`--out` each, `--no-full-model` on all but
one, OMP_NUM_THREADS=1) and join their outputs with `--merge DIR DIR ...`.

Writes localization.{csv,json,png} (csv: every run; json: the matched table),
localization_matched.csv (the chosen run of every selection, objective and seed, fully
evaluated) and localization.md (the matched table as markdown, for the README).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analysis.demo import testbed_eval_settings  # noqa: E402
from analysis.evaluate import evaluate  # noqa: E402
from soir.data import encode, read_split  # noqa: E402
from soir.mask import Mask  # noqa: E402
from soir.ranking import RankSettings, rank  # noqa: E402
from soir.scores import SCORES  # noqa: E402
from soir.select import SelectSettings, select  # noqa: E402
from testbed_runs import Testbed  # noqa: E402

LOCALIZERS = tuple(SCORES)
FINE_BUDGET = 0.05  # budgets below this select neuron groups
NEURON_TOO_COSTLY = {"soir-line"}  # its line search runs forward passes per group: over 8 minutes for 1,550 neuron groups here
REPORTED = {"forget_regurgitation": "forget/regurgitation", "forget_knowledge": "forget/knowledge",
            "retain_regurgitation": "retain/regurgitation", "retain_knowledge": "retain/knowledge",
            "mia_score": "mia_score", "general_accuracy": "mmlu/accuracy", "final_score": "final_score"}


def halve_by_subject(frame: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Validation and test halves with no person or document in both (alternate subjects, by id prefix)."""
    subjects = frame["id"].str[:5]
    order = sorted(subjects.unique())
    val = subjects.isin(order[0::2])
    return {"val": frame[val].reset_index(drop=True), "test": frame[~val].reset_index(drop=True)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--testbed", default=str(ROOT / "demo-out"), help="a `soir demo` output (base/, oracle/, finetuned/, data/)")
    p.add_argument("--localizers", nargs="+", default=list(LOCALIZERS))
    p.add_argument("--budgets", type=float, nargs="+", default=[0.01, 0.1, 0.3], help="fractions of all parameters (default: 0.01 0.1 0.3)")
    p.add_argument("--objectives", nargs="+", default=["graddiff", "npo"])
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-2, 3e-2, 1e-1])
    p.add_argument("--full-lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3], help="the full model's grid (it forgets at lower rates)")
    p.add_argument("--no-full-model", action="store_true", help="leave out the full-model baseline (it runs in another process)")
    p.add_argument("--merge", nargs="+", metavar="DIR", help="join the outputs of runs with other localizers into --out, and stop")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--max-examples", type=int, default=128, help="rows per split the localizers rank with (default: 128)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    if args.merge:
        return merge([Path(d) for d in args.merge], Path(args.out))
    started = time.perf_counter()
    bed = Testbed(args.testbed)
    parts = {s: halve_by_subject(f) for s, f in bed.frames.items()}
    halves = {f"{half}_{s}": encode(frame, bed.tokenizer) for s, h in parts.items() for half, frame in h.items()}
    holdout = read_split(Path(args.testbed) / "data" / "holdout.parquet")
    general = Path(args.testbed) / "data" / "general_mc.parquet"
    settings = testbed_eval_settings()

    def full_metrics(model) -> dict[str, float]:
        metrics, _ = evaluate(model, bed.tokenizer, {"forget": parts["forget"]["test"], "retain": parts["retain"]["test"]},
                              holdout=holdout, mmlu=general, settings=settings)
        return {name: metrics.get(key) for name, key in REPORTED.items()}

    model, base = bed.model("finetuned", eager=True), bed.model("base")
    oracle_model = bed.model("oracle")
    oracle = {**bed.accuracies(oracle_model, halves), **full_metrics(oracle_model)}
    before = {**bed.accuracies(model, halves), **full_metrics(model)}
    target = oracle["val_forget"]
    print(f"retain-only model {oracle}\nfinetuned model {before}", flush=True)

    selections = {} if args.no_full_model else {("full model", 1.0): Mask.full(model)}
    for localizer in args.localizers:
        for granularity in ("tensor", "neuron"):
            budgets = [b for b in args.budgets if (b < FINE_BUDGET) == (granularity == "neuron")]
            if not budgets or (granularity == "neuron" and localizer in NEURON_TOO_COSTLY):
                continue
            ranking = rank(model, bed.encoded["forget"], bed.encoded["retain"], bed.pad,
                           RankSettings(score=localizer, granularity=granularity, max_examples=args.max_examples),
                           base_model=base if SCORES[localizer].needs_base else None, progress=False)
            for budget in budgets:
                selections[(localizer, budget)] = select(ranking, model, SelectSettings(top=budget, by="params"))
        print(f"ranked by {localizer}: {time.perf_counter() - started:.0f} s", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, chosen = [], []
    for (localizer, budget), mask in selections.items():
        describe = {"localizer": localizer, "budget": budget, "n_selected": mask.n_selected, "fraction": round(mask.n_selected / mask.n_total, 4),
                    "granularity": "all" if mask.is_full else ("element" if mask.elements else "tensor")}
        for objective in args.objectives:
            for seed in range(args.seeds):
                runs = []
                for lr in (args.full_lrs if mask.is_full else args.lrs):
                    unlearned = bed.unlearn("finetuned", mask, objective, lr, args.steps, seed)
                    row = {**describe, "objective": objective, "lr": lr, "seed": seed, **bed.accuracies(unlearned, halves)}
                    runs.append((row, {k: v.clone() for k, v in unlearned.state_dict().items()}))
                    rows.append(row)
                row, state = min(runs, key=lambda run: abs(run[0]["val_forget"] - target))
                unlearned.load_state_dict(state)
                chosen.append({**row, **full_metrics(unlearned)})
        pd.DataFrame(rows).to_csv(out / "localization.csv", index=False)  # partial results survive an interrupted run
        print(f"{localizer} @ {budget:g}: {len(rows)} runs, {time.perf_counter() - started:.0f} s", flush=True)
    meta = {"command": " ".join(["python", *sys.argv]), "settings": {k: v for k, v in vars(args).items() if k not in ("out", "merge")},
            "split": "people and documents alternate between the validation and the test half",
            "retain_only_model": oracle, "finetuned_model": before, "target_val_forget": target, "seconds": time.perf_counter() - started}
    write(pd.DataFrame(rows), pd.DataFrame(chosen), meta, out)
    return 0


def merge(dirs: list[Path], out: Path) -> int:
    """Join runs over other localizers (same testbed, grid and seeds) into one set of outputs."""
    metas = [json.loads((d / "localization.json").read_text()) for d in dirs]
    table = pd.concat([pd.read_csv(d / "localization.csv") for d in dirs], ignore_index=True)
    picked = pd.concat([pd.read_csv(d / "localization_matched.csv") for d in dirs], ignore_index=True)
    meta = {**metas[0], "command": " ; ".join(m["command"] for m in metas) + " ; python " + " ".join(sys.argv),
            "seconds": [m["seconds"] for m in metas]}
    meta["settings"]["localizers"] = [name for m in metas for name in m["settings"]["localizers"]]
    out.mkdir(parents=True, exist_ok=True)
    write(table, picked, meta, out)
    return 0


def write(table: pd.DataFrame, picked: pd.DataFrame, meta: dict, out: Path) -> None:
    """localization.{csv,json,png,md} and localization_matched.csv from every run and the chosen ones."""
    matched = summarize(picked)
    table.to_csv(out / "localization.csv", index=False)
    picked.to_csv(out / "localization_matched.csv", index=False)
    meta = {**meta, "matched": matched.reset_index().to_dict(orient="records"),
            "interpolated": interpolate(table, meta["target_val_forget"]).to_dict(orient="records")}
    (out / "localization.json").write_text(json.dumps(meta, indent=2, default=float) + "\n")
    plot(table, matched, meta["retain_only_model"], out / "localization.png")
    (out / "localization.md").write_text(markdown(meta))
    print(matched.to_string(float_format=lambda x: f"{x:.3f}"))
    print(f"wrote {out}/localization.csv, localization_matched.csv, .json, .png, .md")


def summarize(picked: pd.DataFrame) -> pd.DataFrame:
    """Mean ± std over seeds of the chosen runs' test-half numbers, per (localizer, budget, objective)."""
    columns = ["test_forget", "test_retain", *REPORTED, "val_forget", "lr"]
    stats = picked.groupby(["localizer", "budget", "objective"], sort=False)[columns].agg(["mean", "std"])
    stats.columns = [f"{a}_{b}" for a, b in stats.columns]
    return stats


def interpolate(table: pd.DataFrame, target: float) -> pd.DataFrame:
    """Test forget and retain at the learning rate where validation forget crosses `target`, linear
    between the two grid points around the first crossing, per seed; then mean ± std over the seeds
    that cross (`reached` of `seeds`; `past_at_every_lr`: seeds that forget past it even at the lowest lr). The grid's points rarely land on the target; this matches
    the operating point more closely than the nearest grid point does."""
    rows = []
    for (localizer, budget, objective), runs in table.groupby(["localizer", "budget", "objective"], sort=False):
        points, past = [], 0
        for _, seed in runs.groupby("seed"):
            seed = seed.sort_values("lr")
            v, f, r = (seed[c].to_numpy() for c in ("val_forget", "test_forget", "test_retain"))
            past += bool((v < target).all())
            for i in range(len(v) - 1):
                if (v[i] - target) * (v[i + 1] - target) <= 0 and v[i] != v[i + 1]:
                    w = (target - v[i]) / (v[i + 1] - v[i])
                    points.append((f[i] + w * (f[i + 1] - f[i]), r[i] + w * (r[i + 1] - r[i])))
                    break
        frame = pd.DataFrame(points, columns=["test_forget", "test_retain"])
        rows.append({"localizer": localizer, "budget": budget, "objective": objective, "reached": len(points), "past_at_every_lr": past,
                     "seeds": runs["seed"].nunique(), **{f"{c}_{stat}": getattr(frame[c], stat)() for c in frame for stat in ("mean", "std")}})
    return pd.DataFrame(rows)


COLUMNS = {"test_forget": "forget acc.", "test_retain": "retain acc.", "forget_regurgitation": "forget regurg.",
           "forget_knowledge": "forget QA EM", "retain_regurgitation": "retain regurg.", "retain_knowledge": "retain QA EM",
           "mia_score": "MIA score", "general_accuracy": "general acc.", "final_score": "final score"}


def markdown(meta: dict) -> str:
    """The matched table (mean ± std over seeds, test halves), one table per objective, with the
    retain-only and finetuned models' rows first."""
    lines = []
    for objective in dict.fromkeys(r["objective"] for r in meta["matched"]):
        lines += [f"**{objective}** (lr chosen per seed on validation rows; test rows reported)", "",
                  "| selection | budget | " + " | ".join(COLUMNS.values()) + " |", "|---|---|" + "---|" * len(COLUMNS)]
        for name, model in (("retain-only model", meta["retain_only_model"]), ("finetuned model", meta["finetuned_model"])):
            lines.append(f"| {name} | | " + " | ".join(f"{model[c]:.2f}" for c in COLUMNS) + " |")
        for r in meta["matched"]:
            if r["objective"] == objective:
                cells = [f"{r[c + '_mean']:.2f} ± {r[c + '_std']:.2f}" for c in COLUMNS]
                lines.append(f"| {r['localizer']} | {r['budget']:.0%} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [f"**Retain at the target forget** (validation forget {meta['target_val_forget']:.2f}, the retain-only model's; "
              "test accuracies interpolated between the two learning rates around it; seeds that reach it of all seeds)", "",
              "| selection | budget | " + " | ".join(f"{o}: retain acc. (forget acc.), reached" for o in dict.fromkeys(r["objective"] for r in meta["matched"])) + " |",
              "|---|---|" + "---|" * len(set(r["objective"] for r in meta["matched"]))]
    by_key = {}
    for r in meta["interpolated"]:
        by_key.setdefault((r["localizer"], r["budget"]), {})[r["objective"]] = r
    for (localizer, budget), cells in by_key.items():
        shown = [f"{c['test_retain_mean']:.2f} ± {c['test_retain_std']:.2f} ({c['test_forget_mean']:.2f}), {c['reached']}/{c['seeds']}"
                 if c["reached"] else ("past it at every lr" if c["past_at_every_lr"] == c["seeds"] else "not reached") + f", 0/{c['seeds']}"
                 for c in cells.values()]
        lines.append(f"| {localizer} | {budget:.0%} | " + " | ".join(shown) + " |")
    return "\n".join(lines) + "\n"


def plot(table: pd.DataFrame, matched: pd.DataFrame, oracle: dict, path: Path) -> None:
    """Retain against forget (test halves) over each lr grid, a row per objective and a column per
    budget; the matched runs (mean ± std over seeds) as large markers."""
    from analysis.plots import new_figure, save_figure

    objectives = list(dict.fromkeys(table["objective"]))
    budgets = sorted(b for b in table["budget"].unique() if b != 1.0)
    fig, axes = new_figure((4.4 * len(budgets), 4.0 * len(objectives)), len(budgets), nrows=len(objectives), squeeze=False)
    localizers = list(dict.fromkeys(table["localizer"]))
    colors = {name: f"C{i % 10}" for i, name in enumerate(localizers)}
    for row, objective in enumerate(objectives):
        for col, budget in enumerate(budgets):
            ax = axes[row][col]
            part = table[(table.objective == objective) & ((table.budget == budget) | (table.localizer == "full model"))]
            for localizer, runs in part.groupby("localizer", sort=False):
                stats = runs.groupby("lr")[["test_forget", "test_retain"]].mean()
                ax.plot(stats["test_forget"], stats["test_retain"], marker="o", ms=2, lw=0.8, alpha=0.5, color=colors[localizer])
                key = (localizer, runs["budget"].iloc[0], objective)
                if key in matched.index:
                    m = matched.loc[key]
                    ax.errorbar(m["test_forget_mean"], m["test_retain_mean"], xerr=m["test_forget_std"], yerr=m["test_retain_std"],
                                marker="s", ms=6, capsize=2, color=colors[localizer], label=localizer)
            ax.axvline(oracle["test_forget"], color="grey", ls="--", lw=0.8, label="retain-only model")
            ax.set_xlabel("forget accuracy (test half; lower: forgot)")
            ax.set_ylabel("retain accuracy (test half)")
            ax.set_title(f"{objective}, {budget:.0%} of parameters", fontsize=9)
            ax.grid(alpha=0.3)
    shown = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            shown.setdefault(label, handle)
    fig.legend(shown.values(), shown.keys(), loc="outside right upper", fontsize=8)
    fig.suptitle("retain against forget on test rows: lines over each lr grid (mean of seeds); squares: the runs chosen on "
                 "validation rows, mean ± std over seeds", fontsize=9)
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
