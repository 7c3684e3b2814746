"""How many retain rows a ranking needs: Spearman of rankings made from a random subset of the
retain split to the ranking made from all of it (the thesis's stability study).

On a testbed made by `soir demo --out DIR`, for each score and each retain size n (rows drawn
without replacement, `--seeds` draws each), `soir rank` runs in this process with the whole
forget split and the n retain rows; every ranking is compared with the full-retain ranking of
the same score (Spearman over groups, and the overlap of the top 10% of groups).

    .venv/bin/python benchmarks/stability.py --testbed demo-out --out benchmarks/results

Writes stability.{csv,json,md,png} through benchmarks/report.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from report import write_results  # noqa: E402

SCORES = ("soir", "soir-datainf", "fo-influence", "wagle")


def top_overlap(a, b, fraction: float = 0.1) -> float:
    k = max(1, round(fraction * len(a)))
    return len(set(a.nsmallest(k, "rank").index) & set(b.nsmallest(k, "rank").index)) / k


def run(testbed: Path, scores, sizes, seeds: int, threads: int) -> list[dict]:
    import torch
    from scipy.stats import spearmanr

    from soir.data import encode, pad_id, read_split
    from soir.models import load_model, load_tokenizer
    from soir.ranking import RankSettings, rank

    torch.set_num_threads(threads)
    tokenizer = load_tokenizer(testbed / "data" / "tokenizer")
    model = load_model(testbed / "finetuned", tokenizer, eager_attention=True)
    forget = encode(read_split(testbed / "data" / "forget.parquet"), tokenizer)
    retain_frame = read_split(testbed / "data" / "retain.parquet")
    pad = pad_id(tokenizer)
    rows = []
    for score in scores:
        full = rank(model, forget, encode(retain_frame, tokenizer), pad, RankSettings(score=score), progress=False).table.set_index("group")
        for n in sizes:
            if n >= len(retain_frame):
                continue
            for seed in range(seeds):
                subset = encode(retain_frame.sample(n=n, random_state=seed), tokenizer)
                table = rank(model, forget, subset, pad, RankSettings(score=score), progress=False).table.set_index("group").loc[full.index]
                rho = float(spearmanr(full["score"], table["score"], nan_policy="omit").statistic)
                rows.append({"score": score, "retain_rows": n, "seed": seed, "spearman_to_full": round(rho, 4),
                             "top10_overlap": round(top_overlap(full, table), 4), "n_groups": len(full)})
                print(rows[-1], flush=True)
        rows.append({"score": score, "retain_rows": len(retain_frame), "seed": 0, "spearman_to_full": 1.0, "top10_overlap": 1.0, "n_groups": len(full)})
    return rows


def summarize(table) -> dict:
    """The markdown's tables: mean over draws of the Spearman to the all-rows ranking and of the top-10% overlap,
    per score and retain size."""
    groups = int(table["n_groups"].iloc[0])
    return {f"{what}, mean over draws ({groups} tensor groups; columns: retain rows)":
            table.pivot_table(index="score", columns="retain_rows", values=column, sort=False)
            for what, column in (("Spearman to the all-rows ranking", "spearman_to_full"), ("Top-10% overlap", "top10_overlap"))}


def plot(table, path: Path) -> None:
    from analysis.plots import new_figure, save_figure

    fig, ax = new_figure((7, 4.5))
    summary = table.groupby(["score", "retain_rows"])["spearman_to_full"].agg(["mean", "std"]).reset_index()
    for score, rows in summary.groupby("score", sort=False):
        ax.errorbar(rows["retain_rows"], rows["mean"], yerr=rows["std"].fillna(0), marker="o", capsize=3, label=score)
    ax.set(xscale="log", xlabel="retain rows used for ranking", ylabel="Spearman to the all-rows ranking",
           title=f"Ranking stability ({int(table['n_groups'].iloc[0])} tensor groups; mean ± std over draws)")
    ax.grid(alpha=0.3)
    ax.legend(title="--score", fontsize=8)
    save_figure(fig, path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--testbed", type=Path, required=True, help="a directory written by `soir demo --out DIR`")
    p.add_argument("--scores", nargs="+", default=list(SCORES))
    p.add_argument("--sizes", nargs="+", type=int, default=[25, 50, 100, 200])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args()
    started = time.perf_counter()

    import pandas as pd

    table = pd.DataFrame(run(args.testbed, args.scores, args.sizes, args.seeds, args.threads))
    paths = write_results(args.out, "stability", table, {"rows": table.to_dict("records")}, started=started, tables=summarize(table),
                          figure=lambda path: plot(table, path))
    print("wrote", ", ".join(str(path) for path in paths.values()))


if __name__ == "__main__":
    main()
