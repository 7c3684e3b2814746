"""The thesis's decile study: does the top of a ranking unlearn better than its bottom?

Each score ranks the testbed's finetuned model (tensor groups); then GradDiff unlearns with
each tenth of the ranking in turn (the groups at rank offsets 0 %, 10 %, …, 90 %, a tenth of the
groups each, `soir select --top 0.1 --offset K`), at one learning rate and step count for all,
over several seeds. If a score localizes, forget accuracy after unlearning rises (forgets less)
from the first decile to the last, or retain accuracy falls; a flat curve is what a random
ranking gives.

    .venv/bin/python benchmarks/deciles.py --testbed demo-out

Writes deciles.{csv,json,md,png} through benchmarks/report.py.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import pandas as pd
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from report import write_results  # noqa: E402
from soir.ranking import RankSettings, rank  # noqa: E402
from soir.select import SelectSettings, select  # noqa: E402
from soir.scores import get_score  # noqa: E402
from testbed_runs import Testbed  # noqa: E402

SCORES = ("soir", "soir-line", "soir-datainf", "shift", "fo-influence", "random")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--testbed", default=str(ROOT / "demo-out"), help="a `soir demo` output (base/, finetuned/, data/)")
    p.add_argument("--scores", nargs="+", default=list(SCORES))
    p.add_argument("--seeds", type=int, default=2, help="unlearning seeds per decile (default: 2)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--max-examples", type=int, default=128, help="rows per split the scores rank with (default: 128)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    started = time.perf_counter()
    bed = Testbed(args.testbed)
    model, base = bed.model("finetuned", eager=True), bed.model("base")
    rows = []
    for score in args.scores:
        ranking = rank(model, bed.encoded["forget"], bed.encoded["retain"], bed.pad, RankSettings(score=score, max_examples=args.max_examples),
                       base_model=base if get_score(score).needs_base else None, progress=False)
        n_groups = len(ranking.table)
        size = math.ceil(0.1 * n_groups)
        for decile in range(10):
            offset = min(round(decile * n_groups / 10), n_groups - size)
            mask = select(ranking, model, SelectSettings(top=size if size > 1 else 0.1, offset=offset))
            for seed in range(args.seeds):
                acc = bed.unlearned("finetuned", mask, "graddiff", args.lr, args.steps, seed)
                rows.append({"score": score, "decile": decile, "offset": offset, "seed": seed, "groups": " ".join(mask.names),
                             "n_params": mask.n_selected, **acc})
        part = pd.DataFrame([r for r in rows if r["score"] == score]).groupby("decile")[["forget_accuracy", "retain_accuracy"]].mean()
        print(f"{score}: forget {' '.join(f'{x:.2f}' for x in part['forget_accuracy'])} | "
              f"retain {' '.join(f'{x:.2f}' for x in part['retain_accuracy'])}", flush=True)
    table = pd.DataFrame(rows)
    trend = {}
    for score, part in table.groupby("score", sort=False):
        trend[score] = {f"spearman_decile_vs_{m}": float(spearmanr(part["decile"], part[f"{m}_accuracy"]).statistic) for m in ("forget", "retain")}
    meta = {"settings": {k: v for k, v in vars(args).items() if k != "out"}, "trend": trend}
    paths = write_results(args.out, "deciles", table, meta, started=started, tables=summarize(table, meta),
                          figure=lambda path: plot(table, args, path))
    print(json.dumps(trend, indent=1))
    print("wrote", ", ".join(str(path) for path in paths.values()))
    return 0


def summarize(table: pd.DataFrame, meta: dict) -> dict:
    """The markdown's tables: mean forget and retain accuracy per score and decile, and each score's trend over deciles."""
    settings = meta["settings"]
    run = f"GradDiff at lr {settings['lr']:g}, {settings['steps']} steps, mean over {settings['seeds']} seeds"
    tables = {f"{metric.capitalize()} accuracy after unlearning each tenth of the ranking ({run}; columns: decile)":
              table.pivot_table(index="score", columns="decile", values=f"{metric}_accuracy", sort=False) for metric in ("forget", "retain")}
    tables["Spearman of the decile to accuracy (a ranking that localizes: forget rises, retain falls)"] = pd.DataFrame(meta["trend"]).T
    return tables


def plot(table: pd.DataFrame, args, path: Path) -> None:
    from analysis.plots import new_figure, save_figure

    fig, axes = new_figure((11, 4), 2)
    for ax, metric in zip(axes, ("forget", "retain")):
        for score, part in table.groupby("score", sort=False):
            stats = part.groupby("decile")[f"{metric}_accuracy"].agg(["mean", "std"])
            ax.errorbar(stats.index * 10, stats["mean"], yerr=stats["std"].fillna(0), marker="o", capsize=2, label=score)
        ax.set_xlabel("the unlearned tenth of the ranking (rank offset, %)")
        ax.set_ylabel(f"{metric} accuracy after GradDiff")
        ax.set_title(f"{metric}: lr {args.lr:g}, {args.steps} steps, mean ± std over {args.seeds} seeds")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
