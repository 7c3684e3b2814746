"""Time of `soir rank` and `soir unlearn` on one process and on several under torchrun (gloo on
CPU), on the testbed's finetuned model, with the same total number of threads.

One process gets all `--threads` threads; N processes get threads / N each, so the comparison
is what data parallelism buys over intra-op threads on the same cores. Unlearning: NPO on a
10% tensor mask (`soir select --top 0.1 --by params` of a `soir` ranking), under DDP and, on
several processes, under `--fsdp` too; time per step from log.jsonl (first step excluded);
ranking: `soir rank` wall time.

    .venv/bin/python benchmarks/distributed_scaling.py --testbed demo-out

Writes distributed_scaling.{csv,json,md,png} through benchmarks/report.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from report import write_results  # noqa: E402


def command(processes: int, threads: int, args: list[str]) -> float:
    """Wall seconds of `soir ARGS` on `processes` processes with threads / processes threads each."""
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads // processes)), "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}
    launch = [sys.executable, "-m", "soirlab.cli"] if processes == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", "-m", "soirlab.cli"]
    started = time.perf_counter()
    done = subprocess.run([*launch, *args], env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(args[:1])} on {processes} processes failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - started


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--testbed", default=str(ROOT / "demo-out"))
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--threads", type=int, default=2, help="threads in all (default: 2, this machine's cores)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    started = time.perf_counter()
    bed = Path(args.testbed)
    data = ["--forget", str(bed / "data" / "forget.parquet"), "--retain", str(bed / "data" / "retain.parquet")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="soir-scaling-") as work:
        work = Path(work)
        command(1, args.threads, ["rank", "--model", str(bed / "finetuned"), *data, "--no-progress", "--out", str(work / "ranking")])
        command(1, args.threads, ["select", "--ranking", str(work / "ranking"), "--model", str(bed / "finetuned"), "--top", "0.1",
                                  "--by", "params", "--out", str(work / "mask")])
        for n in args.processes:
            rank_s = command(n, args.threads, ["rank", "--model", str(bed / "finetuned"), *data, "--no-progress", "--out", str(work / f"rank-{n}")])

            def unlearn(name: str, *extra: str) -> tuple[float, float]:
                """(wall seconds, seconds per step) of one NPO run."""
                out = work / f"unlearn-{name}-{n}"
                wall = command(n, args.threads, ["unlearn", "--model", str(bed / "finetuned"), *data, "--mask", str(work / "mask"),
                                                 "--objective", "npo", "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                                                 "--lr", "1e-3", "--warmup", "0", "--no-progress", "--out", str(out), *extra])
                seconds = [json.loads(line)["seconds"] for line in (out / "log.jsonl").read_text().splitlines()]
                return wall, (seconds[-1] - seconds[0]) / (len(seconds) - 1)

            unlearn_s, per_step = unlearn("ddp")
            fsdp_per_step = unlearn("fsdp", "--fsdp")[1] if n > 1 else float("nan")
            timings = json.loads((work / f"rank-{n}" / "ranking.json").read_text())["timings_s"]
            rows.append({"processes": n, "threads_per_process": max(1, args.threads // n), "rank_wall_s": round(rank_s, 2),
                         "rank_stages_s": round(timings["total"], 2), "unlearn_wall_s": round(unlearn_s, 2), "unlearn_s_per_step": round(per_step, 4),
                         "unlearn_fsdp_s_per_step": round(fsdp_per_step, 4)})
            print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    for column in ("rank_stages_s", "unlearn_s_per_step"):
        table[f"{column}_speedup"] = (table[column].iloc[0] / table[column]).round(2)
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, gloo", "settings": {k: v for k, v in vars(args).items() if k != "out"},
            "rows": table.to_dict(orient="records")}
    paths = write_results(args.out, "distributed_scaling", table, meta, started=started, tables=summarize(table, meta),
                          figure=lambda path: plot(table, path))
    print(table.to_string(index=False))
    print("wrote", ", ".join(str(path) for path in paths.values()))
    return 0


def summarize(table: pd.DataFrame, meta: dict) -> dict:
    """The markdown's table: the rows, one per process count."""
    return {f"soir rank and soir unlearn (NPO, 10% mask) on {meta['settings']['threads']} threads in all ({meta['machine']})":
            table.set_index("processes")}


def plot(table: pd.DataFrame, path: Path) -> None:
    from analysis.plots import new_figure, save_figure

    fig, (left, right) = new_figure((9, 3.6), 2)
    left.bar(table["processes"].astype(str), table["rank_stages_s"])
    left.set_xlabel("processes (same cores in all)")
    left.set_ylabel("seconds")
    left.set_title("soir rank (its stages)")
    where = range(len(table))
    right.bar([i - 0.2 for i in where], table["unlearn_s_per_step"], width=0.4, label="one process / DDP")
    right.bar([i + 0.2 for i in where], table["unlearn_fsdp_s_per_step"].fillna(0), width=0.4, label="--fsdp")
    right.set_xticks(list(where), table["processes"].astype(str))
    right.legend(fontsize=8)
    right.set_xlabel("processes (same cores in all)")
    right.set_ylabel("seconds per step")
    right.set_title("soir unlearn, NPO, 10% mask")
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
