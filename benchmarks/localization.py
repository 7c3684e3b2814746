"""Which localizer gives the best retain at equal forgetting? The comparison at matched operating points.

On the testbed's finetuned model, each localizer ranks the tensor groups once; its selection at
a parameter budget (`soir select --top B --by params`) is unlearned with GradDiff and NPO over
a learning-rate grid and several seeds, and so is the full model. Rows of each split are halved:
the learning rate of every (selection, objective, seed) is chosen on the validation half (the
one whose forget accuracy comes closest to the retain-only model's, the forgetting an exact
unlearner would reach), and forget and retain are reported on the other half, never on the
rows the choice was made on. Reported: teacher-forced answer accuracy, mean ± std over seeds,
and a Pareto plot of retain against forget over the whole grid.

    .venv/bin/python benchmarks/localization.py --testbed demo-out

Writes localization.{csv,json,png} (csv: every run; json: the matched table).
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

from soir.data import encode  # noqa: E402
from soir.mask import Mask  # noqa: E402
from soir.ranking import RankSettings, rank  # noqa: E402
from soir.select import SelectSettings, select  # noqa: E402
from testbed_runs import Testbed  # noqa: E402

LOCALIZERS = ("soir", "soir-line", "soir-datainf", "grad-magnitude", "shift", "random")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--testbed", default=str(ROOT / "demo-out"), help="a `soir demo` output (base/, oracle/, finetuned/, data/)")
    p.add_argument("--localizers", nargs="+", default=list(LOCALIZERS))
    p.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.3], help="fractions of all parameters (default: 0.1 0.3)")
    p.add_argument("--objectives", nargs="+", default=["graddiff", "npo"])
    p.add_argument("--lrs", type=float, nargs="+", default=[3e-3, 1e-2, 3e-2])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--max-examples", type=int, default=128, help="rows per split the localizers rank with (default: 128)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    started = time.perf_counter()
    bed = Testbed(args.testbed)
    halves = {f"{half}_{s}": encode(f.iloc[start::2], bed.tokenizer) for s, f in bed.frames.items() for half, start in (("val", 0), ("test", 1))}
    model, base = bed.model("finetuned", eager=True), bed.model("base")
    oracle = bed.accuracies(bed.model("oracle"), halves)
    before = bed.accuracies(model, halves)
    print(f"retain-only model {oracle}\nfinetuned model {before}", flush=True)

    selections = {("full model", 1.0): Mask.full(model)}
    for localizer in args.localizers:
        ranking = rank(model, bed.encoded["forget"], bed.encoded["retain"], bed.pad, RankSettings(score=localizer, max_examples=args.max_examples),
                       base_model=base if localizer == "shift" else None, progress=False)
        for budget in args.budgets:
            selections[(localizer, budget)] = select(ranking, model, SelectSettings(top=budget, by="params"))
    rows = []
    for (localizer, budget), mask in selections.items():
        for objective in args.objectives:
            for lr in args.lrs:
                for seed in range(args.seeds):
                    acc = bed.unlearned("finetuned", mask, objective, lr, args.steps, seed, halves)
                    rows.append({"localizer": localizer, "budget": budget, "objective": objective, "lr": lr, "seed": seed,
                                 "n_selected": mask.n_selected, "fraction": round(mask.n_selected / mask.n_total, 4),
                                 "tensors": " ".join(mask.names) if not mask.is_full else "all", **acc})
        print(f"{localizer} @ {budget:g}: {len(rows)} runs, {time.perf_counter() - started:.0f} s", flush=True)
    table = pd.DataFrame(rows)
    matched = match(table, oracle["val_forget"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "localization.csv", index=False)
    meta = {"command": " ".join(["python", *sys.argv]), "settings": {k: v for k, v in vars(args).items() if k != "out"},
            "retain_only_model": oracle, "finetuned_model": before, "target_val_forget": oracle["val_forget"],
            "matched": matched.reset_index().to_dict(orient="records"), "seconds": time.perf_counter() - started}
    (out / "localization.json").write_text(json.dumps(meta, indent=2, default=float) + "\n")
    plot(table, matched, oracle, out / "localization.png")
    print(matched.to_string(float_format=lambda x: f"{x:.3f}"))
    print(f"wrote {out}/localization.csv, .json, .png ({meta['seconds']:.0f} s)")
    return 0


def match(table: pd.DataFrame, target: float) -> pd.DataFrame:
    """Per (localizer, budget, objective, seed): the run whose validation forget accuracy is closest
    to `target`; then mean ± std over seeds of the test-half accuracies at those runs."""
    keys = ["localizer", "budget", "objective"]
    chosen = table.loc[(table["val_forget"] - target).abs().groupby([table[k] for k in keys + ["seed"]]).idxmin()]
    stats = chosen.groupby(keys, sort=False)[["test_forget", "test_retain", "val_forget", "lr"]].agg(["mean", "std"])
    stats.columns = [f"{a}_{b}" for a, b in stats.columns]
    return stats


def plot(table: pd.DataFrame, matched: pd.DataFrame, oracle: dict, path: Path) -> None:
    from analysis.plots import new_figure, save_figure

    panels = list(dict.fromkeys(zip(table["objective"], table["budget"])))
    panels = [(o, b) for o, b in panels if b != 1.0]
    fig, axes = new_figure((4.2 * len(panels), 4.2), len(panels), squeeze=False)
    for ax, (objective, budget) in zip(axes[0], panels):
        part = table[(table.objective == objective) & ((table.budget == budget) | (table.localizer == "full model"))]
        for localizer, runs in part.groupby("localizer", sort=False):
            stats = runs.groupby("lr")[["test_forget", "test_retain"]].agg(["mean", "std"])
            ax.errorbar(stats[("test_forget", "mean")], stats[("test_retain", "mean")], xerr=stats[("test_forget", "std")],
                        yerr=stats[("test_retain", "std")], marker="o", ms=3, capsize=2, label=localizer)
        ax.axvline(oracle["test_forget"], color="grey", ls="--", lw=0.8, label="retain-only model")
        ax.set_xlabel("forget accuracy (test half; lower: forgot)")
        ax.set_ylabel("retain accuracy (test half)")
        ax.set_title(f"{objective}, budget {budget:.0%} of parameters", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
