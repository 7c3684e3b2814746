"""What soir's curvature costs against one gradient pass, per granularity and curvature method,
and how far the cheaper methods agree with the exact one.

For each granularity (tensor, module, layer, kind) and each curvature method (`hvp`, the exact
reference; `fd`, forward passes only; `ggn` with exact per-example gradients and with the
factored sketch at its default k = 1024), `soir rank` runs in this process on a testbed made by `soir demo --out DIR`.
Its own stage timings give the curvature time (both splits) and the mean-gradient time (the
gradient pass over both splits); agreement is Spearman over groups to `hvp` of the same
granularity, for c_f, c_r and the score.

    .venv/bin/python benchmarks/curvature_cost.py --testbed demo-out --out benchmarks/results

Writes curvature_cost.{csv,json,md,png} through benchmarks/report.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from report import write_results  # noqa: E402

GRANULARITIES = ("tensor", "module", "layer", "kind")
METHODS = {"hvp": {"curvature": "hvp"}, "fd": {"curvature": "fd"}, "ggn": {"curvature": "ggn"},
           "ggn-factored": {"curvature": "ggn", "sketch": "factored"}}  # k = 1024 per group


def run(testbed: Path, granularities, methods, max_examples: int | None, threads: int) -> list[dict]:
    import torch
    from scipy.stats import spearmanr

    from soir.data import encode, pad_id, read_split
    from soir.models import load_model, load_tokenizer
    from soir.ranking import RankSettings, rank

    torch.set_num_threads(threads)
    tokenizer = load_tokenizer(testbed / "data" / "tokenizer")
    model = load_model(testbed / "finetuned", tokenizer, eager_attention=True)
    splits = {s: encode(read_split(testbed / "data" / f"{s}.parquet"), tokenizer) for s in ("forget", "retain")}
    rows = []
    for granularity in granularities:
        tables = {}
        for method in methods:
            settings = RankSettings(granularity=granularity, max_examples=max_examples, **METHODS[method])
            ranking = rank(model, splits["forget"], splits["retain"], pad_id(tokenizer), settings, progress=False)
            timings = ranking.info["timings_s"]
            tables[method] = ranking.table.set_index("group")
            row = {"granularity": granularity, "method": method, "n_groups": ranking.info["n_groups"],
                   "n_forget": ranking.info["n_forget"], "n_retain": ranking.info["n_retain"],
                   "gradient_pass_s": timings["mean_gradients"], "curvature_s": timings["curvature"],
                   "curvature_over_gradient_pass": round(timings["curvature"] / timings["mean_gradients"], 2)}
            exact = tables["hvp"]
            this = tables[method].loc[exact.index]
            for column in ("c_f", "c_r", "score"):
                row[f"spearman_{column}_vs_hvp"] = round(float(spearmanr(exact[column], this[column]).statistic), 4)
            rows.append(row)
            print(row, flush=True)
    return rows


def summarize(table) -> dict:
    """The markdown's tables: curvature time over one gradient pass, and the score's Spearman to hvp, per granularity and method."""
    columns = {"Curvature stage time / one gradient pass (both splits)": "curvature_over_gradient_pass",
               "Spearman of the soir score over groups to hvp's": "spearman_score_vs_hvp"}
    return {title: table.pivot_table(index=["granularity", "n_groups"], columns="method", values=column, sort=False)
            for title, column in columns.items()}


def plot(table, path: Path) -> None:
    from analysis.plots import new_figure, save_figure

    fig, (cost, agree) = new_figure((12, 4.5), ncols=2)
    for method, rows in table.groupby("method", sort=False):
        rows = rows.sort_values("n_groups")
        cost.plot(rows["n_groups"], rows["curvature_over_gradient_pass"], "o-", label=method)
        agree.plot(rows["n_groups"], rows["spearman_score_vs_hvp"], "o-", label=method)
    for _, row in table[table["method"] == table["method"].iloc[0]].drop_duplicates("n_groups").iterrows():
        cost.annotate(row["granularity"], (row["n_groups"], row["curvature_over_gradient_pass"]), fontsize=8, xytext=(3, 3), textcoords="offset points")
    cost.set(xscale="log", yscale="log", xlabel="parameter groups (granularity as labelled)",
             ylabel="curvature time / gradient pass", title="cost of the curvature stage")
    agree.set(xscale="log", xlabel="parameter groups", ylabel="Spearman of the soir score to hvp", title="agreement with the exact curvature")
    for ax in (cost, agree):
        ax.grid(alpha=0.3)
        ax.legend(title="--curvature", fontsize=8)
    n = int(table["n_forget"].iloc[0]), int(table["n_retain"].iloc[0])
    fig.suptitle(f"soir rank on the default testbed's finetuned model ({n[0]} forget + {n[1]} retain rows)")
    save_figure(fig, path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--testbed", type=Path, required=True, help="a directory written by `soir demo --out DIR`")
    p.add_argument("--granularities", nargs="+", default=list(GRANULARITIES), choices=GRANULARITIES)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="hvp must come first (the reference)")
    p.add_argument("--max-examples", type=int, default=None, help="rows per split (default: all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args()
    started = time.perf_counter()
    if args.methods[0] != "hvp":
        p.error("--methods must start with hvp, the reference the others are compared with")

    import pandas as pd

    table = pd.DataFrame(run(args.testbed, args.granularities, args.methods, args.max_examples, args.threads))
    meta = {"threads": args.threads, "rows": table.to_dict("records")}
    paths = write_results(args.out, "curvature_cost", table, meta, started=started, tables=summarize(table),
                          figure=lambda path: plot(table, path))
    print("wrote", ", ".join(str(path) for path in paths.values()))


if __name__ == "__main__":
    main()
