"""How reproducible a ranking is across the rows it is computed on: the ceiling on how well any cheap
first stage can agree with the full `soir-line` ranking (issue 20's two-stage target).

On the testbed of `soir demo`, per granularity (tensor: every group; neuron: `--neurons` MLP
neurons spread over the table) and per random halving of the rows (`--splits`; each split's forget
and retain rows cut into two disjoint halves), `soir rank` runs each score of `--scores` on either
half, as a user would rank with half the data. Agreement between the two halves: Spearman of the
ranks and the overlap of the top 10%. A score that disagrees with itself across halves ranks by
which rows it saw as much as by the groups, and a first stage cannot be expected to agree with it
better than it agrees with itself (`line_cost_agreement.md` has the first stages against the full
ranking).

    .venv/bin/python benchmarks/line_reliability.py --testbed TESTBED --out benchmarks/results

Writes line_reliability.{csv,json,md,png} through benchmarks/report.py.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from line_cost import top_overlap  # noqa: E402


def measure(testbed: Path, granularities, scores, splits: int, neurons: int, threads: int) -> pd.DataFrame:
    import torch
    from scipy.stats import spearmanr

    from soir.data import encode, pad_id, read_split
    from soir.groups import parameter_groups
    from soir.models import load_model, load_tokenizer
    from soir.ranking import RankSettings, rank

    torch.set_num_threads(threads)
    tokenizer = load_tokenizer(testbed / "data" / "tokenizer")
    model = load_model(testbed / "finetuned", tokenizer, eager_attention=True, dtype="float32")
    pad = pad_id(tokenizer)
    data = {s: encode(read_split(testbed / "data" / f"{s}.parquet"), tokenizer) for s in ("forget", "retain")}
    rows = []
    for granularity in granularities:
        groups = parameter_groups(model, granularity, RankSettings().norms)
        include: tuple[str, ...] = ()
        if granularity == "neuron":
            chosen = [g for g in groups if g.role == "neuron"]
            chosen = chosen[:: max(1, len(chosen) // neurons)][:neurons]
            include = tuple("^" + re.escape(g.name) + "$" for g in chosen)
        for split in range(splits):
            halves = {}
            for s, encoded in data.items():
                order = torch.randperm(len(encoded), generator=torch.Generator().manual_seed(1000 * split + (s == "retain"))).tolist()
                halves[s] = (encoded.subset(sorted(order[: len(order) // 2])), encoded.subset(sorted(order[len(order) // 2:])))
            for spec in scores:
                score, _, curvature = spec.partition(":")
                settings = RankSettings(score=score, granularity=granularity, curvature=curvature or None, include=include)
                tables, seconds = [], 0.0
                for half in (0, 1):
                    started = time.perf_counter()
                    tables.append(rank(model, halves["forget"][half], halves["retain"][half], pad, settings, progress=False)
                                  .table.set_index("group"))
                    seconds += time.perf_counter() - started
                a, b = tables[0], tables[1].loc[tables[0].index]
                rows.append({"granularity": granularity, "score": spec, "split": split, "n_groups": len(a),
                             "forget_rows_per_half": len(halves["forget"][0]), "retain_rows_per_half": len(halves["retain"][0]),
                             "spearman_halves": float(spearmanr(a["rank"], b["rank"]).statistic),
                             "top10_overlap_halves": top_overlap(a, b), "seconds_both_halves": round(seconds, 2)})
                print(rows[-1], flush=True)
    return pd.DataFrame(rows)


def summary(frame: pd.DataFrame) -> pd.DataFrame:
    grouped = frame.groupby(["granularity", "score"], sort=False)
    return pd.DataFrame({
        "n_groups": grouped["n_groups"].first(), "splits": grouped.size(),
        "spearman_mean": grouped["spearman_halves"].mean(), "spearman_min": grouped["spearman_halves"].min(),
        "spearman_max": grouped["spearman_halves"].max(), "top10_overlap_mean": grouped["top10_overlap_halves"].mean(),
        "top10_overlap_min": grouped["top10_overlap_halves"].min(), "top10_overlap_max": grouped["top10_overlap_halves"].max()})


def plot(frame: pd.DataFrame, path: Path) -> None:
    from analysis.plots import new_figure, save_figure

    fig, axes = new_figure((9.0, 3.6), ncols=2)
    labels = list(dict.fromkeys(zip(frame["granularity"], frame["score"])))
    for ax, column, title in zip(axes, ("spearman_halves", "top10_overlap_halves"), ("Spearman, half against half", "top-10% overlap")):
        for i, (granularity, score) in enumerate(labels):
            values = frame[(frame["granularity"] == granularity) & (frame["score"] == score)][column]
            ax.scatter(np.full(len(values), i), values, color="C0", alpha=0.7)
            ax.plot([i - 0.25, i + 0.25], [values.mean()] * 2, color="black")
        ax.set_xticks(range(len(labels)), [f"{g}\n{s}" for g, s in labels], fontsize=8)
        ax.set_ylim(-0.5 if column == "spearman_halves" else -0.05, 1.05)
        ax.axhline(0.9, color="grey", lw=0.8, ls="--")
        ax.set_title(title)
    fig.suptitle("Does a ranking reproduce on other rows? (disjoint halves of the testbed's splits)")
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--testbed", type=Path, required=True, help="a testbed directory (benchmarks/testbeds.py or soir demo)")
    parser.add_argument("--granularities", nargs="+", default=["tensor", "neuron"], choices=["tensor", "neuron"])
    parser.add_argument("--scores", nargs="+", default=["soir-line", "soir-slope", "soir:kfac"], help="SCORE or SCORE:CURVATURE")
    parser.add_argument("--splits", type=int, default=3, help="random halvings of the rows")
    parser.add_argument("--neurons", type=int, default=150, help="MLP neurons spread over the table at neuron granularity")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    from report import write_results

    started = time.perf_counter()
    frame = measure(args.testbed, args.granularities, args.scores, args.splits, args.neurons, args.threads)
    notes = ("CPU. Each split halves the forget and the retain rows at random (disjoint halves); every score ranks on either half "
             "with `soir rank`'s defaults. The dashed line in the figure is the two-stage target (0.9).")
    write_results(args.out, "line_reliability", frame, {"testbed": str(args.testbed), "splits": args.splits, "neurons": args.neurons,
                                                        "threads": args.threads},
                  started=started, tables={"half against half": summary(frame)}, figure=lambda path: plot(frame, path), notes=notes)


if __name__ == "__main__":
    main()
