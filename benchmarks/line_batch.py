"""What `soir rank --score soir-line --line-batch K` gains: up to K groups of one block search side
by side, each round of their evaluations one forward of K replicas of the batches
(`soir.linesearch.line_quantities`, `soir.curvature.RecordedForwards.totals`), against K = 1,
one group per forward.

On the testbed of `soir demo` (its finetuned model and data, `soir rank`'s default batches), per
granularity (tensor: every group; neuron: `--neurons` MLP neurons spread over the table) and per
thread count, `line_quantities` runs at each K of `--line-batches`, back to back in this process.
Each row gives wall and CPU seconds, forwards of the forget and retain splits (`rounds`, one per
call of `totals`), forget evaluations per group (a group's prior is that of the groups finished
when it starts, so K > 1 may need a few more), and the agreement with K = 1: the largest relative
difference of η and of the retain damage, and Spearman of the damage.

On CPU a forward's cost per token does not fall with its batch, so K > 1 is not expected to pay
here; the same comparison on a GPU is `benchmarks/gpu_check.py`'s rank-soir-line and
rank-soir-line-k1 rows.

    .venv/bin/python benchmarks/line_batch.py --testbed TESTBED --out benchmarks/results

Writes line_batch.{csv,json,md,png} through benchmarks/report.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from line_cost import relative  # noqa: E402


def measure(testbed: Path, granularities, line_batches, threads_list, neurons: int) -> pd.DataFrame:
    from soir.curvature import RecordedForwards
    from soir.data import encode, pad_id, read_split, split_batches
    from soir.models import load_model, load_tokenizer
    from soir.ranking import RankSettings

    tokenizer = load_tokenizer(testbed / "data" / "tokenizer")
    model = load_model(testbed / "finetuned", tokenizer, eager_attention=True, dtype="float32")
    pad, settings = pad_id(tokenizer), RankSettings()
    splits = {s: encode(read_split(testbed / "data" / f"{s}.parquet"), tokenizer) for s in ("forget", "retain")}
    forget = split_batches(splits["forget"], pad, settings.batch_size, settings.max_examples, settings.seed, shard=True)
    retain = split_batches(splits["retain"], pad, settings.batch_size, settings.max_examples, settings.seed + 1, shard=True)
    rounds = []
    original = RecordedForwards.totals

    def counted(self, start, steps):
        rounds.append(len(steps))
        return original(self, start, steps)

    RecordedForwards.totals = counted
    try:
        rows = sweep(model, forget, retain, settings, granularities, line_batches, threads_list, neurons, rounds)
    finally:
        RecordedForwards.totals = original
    frame = pd.DataFrame(rows)
    first = frame.groupby(["granularity", "threads"])["seconds"].transform("first")
    frame["over_k1"] = (frame["seconds"] / first).round(3)
    return frame


def sweep(model, forget, retain, settings, granularities, line_batches, threads_list, neurons: int, rounds: list) -> list[dict]:
    """One row per granularity × threads × K; `rounds` collects the replicas of each `totals` call."""
    import torch
    from scipy.stats import spearmanr

    from soir.gradients import mean_gradient
    from soir.groups import parameter_groups
    from soir.linesearch import line_quantities

    rows = []
    for granularity in granularities:
        groups = parameter_groups(model, granularity, settings.norms)
        if granularity == "neuron":
            neuron_groups = [g for g in groups if g.role == "neuron"]
            groups = neuron_groups[:: max(1, len(neuron_groups) // neurons)][:neurons]
        names = list(dict.fromkeys(n for g in groups for n in g.param_names))
        direction = mean_gradient(model, forget, names)
        for threads in threads_list:
            torch.set_num_threads(threads)
            reference = None
            for k in line_batches:
                counts: dict[str, int] = {}
                rounds.clear()
                wall, cpu = time.perf_counter(), time.process_time()
                out = line_quantities(model, forget, retain, groups, direction, settings.delta, counts=counts, replicas=k)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                table = pd.DataFrame({g: v.numpy() for g, v in out.items()}, index=["eta", "gain", "damage"]).T
                reference = table if reference is None else reference
                both = np.isfinite(table["eta"]) & np.isfinite(reference["eta"])
                rel = lambda c: float(relative(table[c][both].to_numpy(), reference[c][both].to_numpy()).max(initial=0.0))  # noqa: E731
                damage = lambda t: t["damage"].where(np.isfinite(t["eta"]), 1e30)  # noqa: E731  (unreachable ranks last)
                rows.append({"granularity": granularity, "n_groups": len(groups), "threads": threads, "line_batch": k,
                             "seconds": round(wall, 2), "cpu_seconds": round(cpu, 2), "seconds_per_group": round(wall / len(groups), 4),
                             "rounds": len(rounds), "replicas_per_round": round(float(np.mean(rounds)), 2),
                             "evaluations_per_group": round(float(np.mean(list(counts.values()))), 2),
                             "reached": int(np.isfinite(table["eta"]).sum()), "eta_rel_max_vs_k1": rel("eta"),
                             "damage_rel_max_vs_k1": rel("damage"),
                             "spearman_vs_k1": float(spearmanr(damage(table), damage(reference)).statistic)})
                print(rows[-1], flush=True)
    return rows


def shown(frame: pd.DataFrame) -> pd.DataFrame:
    """The table for the markdown, its relative differences in scientific notation."""
    frame = frame.copy()
    for column in ("eta_rel_max_vs_k1", "damage_rel_max_vs_k1"):
        frame[column] = frame[column].map("{:.1e}".format)
    return frame


def plot(frame: pd.DataFrame, path: Path) -> None:
    from analysis.plots import new_figure, save_figure

    fig, ax = new_figure((6.4, 4.0))
    for (granularity, threads), part in frame.groupby(["granularity", "threads"]):
        label = f"{granularity} ({part['n_groups'].iloc[0]} groups), {threads} thread(s)"
        ax.plot(part["line_batch"], part["over_k1"], marker="o", label=label)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("--line-batch K (groups of one block per forward)")
    ax.set_ylabel("line-search wall time / K = 1")
    ax.set_title("soir-line's batched line search on CPU (testbed)")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--testbed", type=Path, required=True, help="a testbed directory (benchmarks/testbeds.py or soir demo)")
    parser.add_argument("--granularities", nargs="+", default=["tensor", "neuron"], choices=["tensor", "neuron"])
    parser.add_argument("--line-batches", nargs="+", type=int, default=[1, 2, 4, 8], help="the K to time; the first is the reference")
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2], help="torch threads per measurement")
    parser.add_argument("--neurons", type=int, default=96, help="MLP neurons spread over the table at neuron granularity")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    from report import write_results

    started = time.perf_counter()
    frame = measure(args.testbed, args.granularities, args.line_batches, args.threads, args.neurons)
    notes = ("CPU, the machine's 2 cores. `seconds` is the line search alone (both splits recorded, every group searched); "
             "`over_k1` its ratio to the first K at the same granularity and threads. No GPU was used.")
    write_results(args.out, "line_batch", frame, {"testbed": str(args.testbed), "threads": args.threads, "neurons": args.neurons},
                  started=started, tables={"line search": shown(frame).set_index(["granularity", "threads", "line_batch"])},
                  figure=lambda path: plot(frame, path), notes=notes)


if __name__ == "__main__":
    main()
