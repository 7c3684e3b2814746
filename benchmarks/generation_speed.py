"""Batched greedy generation against one row at a time, on the testbed's finetuned model.

The evaluation generates a continuation for every row (docs/design.md §8); this measures that
step on N testbed rows (forget, retain, holdout, general; cycled when N exceeds them) with
`analysis.generation.generate_ids` at batch size 1 and at larger batch sizes, same prompts,
same `max_new_tokens`. Runs alternate (1, 16, 64, 1, 16, 64, ...) so drifting machine load
hits every batch size alike; the median over repeats is reported. Batched and one-at-a-time
outputs are compared token for token (the evaluation's contract is that they agree).

    python benchmarks/generation_speed.py --testbed DIR [--rows 500] [--batch-sizes 1 16 64] [--repeats 5]

DIR is a `soir demo` output directory (its finetuned/ model and data/ are used).
Writes benchmarks/results/generation_speed.{csv,json,md,png} (or --results DIR) through benchmarks/report.py and prints a table;
exits 1 when the best batched run is less than --target (default 5) times faster than batch size 1.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from transformers.utils import logging as hf_logging

from analysis.generation import GenerationSettings, generate_ids, prompt_token_ids
from report import write_results  # benchmarks/ is sys.path[0] when this runs as a script
from soir.data import pad_id, read_split
from soir.models import load_model, load_tokenizer

RESULTS = Path(__file__).parent / "results"
SPLITS = ("forget", "retain", "holdout", "general")


def testbed_inputs(data: Path, rows: int) -> list[str]:
    """`rows` prompts from the testbed splits, in split order, cycled when there are fewer."""
    inputs = [text for split in SPLITS if (data / f"{split}.parquet").is_file() for text in read_split(data / f"{split}.parquet")["input"]]
    if not inputs:
        sys.exit(f"no testbed splits under {data}: give a `soir demo` output directory")
    return [inputs[i % len(inputs)] for i in range(rows)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--testbed", type=Path, required=True, help="a `soir demo` output directory")
    parser.add_argument("--model", type=Path, help="model directory (default: TESTBED/finetuned)")
    parser.add_argument("--rows", type=int, default=500)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--target", type=float, default=5.0, help="required speedup of the best batched run over batch size 1")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    started = time.perf_counter()
    if 1 not in args.batch_sizes:
        args.batch_sizes = [1, *args.batch_sizes]
    hf_logging.set_verbosity_error()
    torch.manual_seed(0)

    model_dir = args.model or args.testbed / "finetuned"
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, tokenizer)
    model.eval()
    prompts = prompt_token_ids(tokenizer, testbed_inputs(args.testbed / "data", args.rows))
    eos, pad = tokenizer.eos_token_id, pad_id(tokenizer)

    def run(batch_size: int) -> tuple[float, list[list[int]]]:
        settings = GenerationSettings(max_new_tokens=args.max_new_tokens, batch_size=batch_size, progress=False)
        start = time.perf_counter()
        ids = generate_ids(model, prompts, eos_id=eos, pad=pad, settings=settings)
        return time.perf_counter() - start, ids

    run(max(args.batch_sizes))  # warm-up: allocator, kernels
    records, outputs = [], {}
    for repeat in range(args.repeats):
        for batch_size in args.batch_sizes:
            seconds, ids = run(batch_size)
            outputs[batch_size] = ids
            tokens = sum(len(x) for x in ids)
            records.append({"batch_size": batch_size, "repeat": repeat, "seconds": seconds, "rows_per_s": len(prompts) / seconds, "new_tokens": tokens})
            print(f"repeat {repeat}  batch {batch_size:>3}: {seconds:7.2f} s  ({len(prompts) / seconds:7.1f} rows/s)", flush=True)
    runs = pd.DataFrame(records)

    reference = outputs[1]
    summary = []
    for batch_size in args.batch_sizes:
        times = runs.loc[runs["batch_size"] == batch_size, "seconds"].tolist()
        same = sum(a == b for a, b in zip(outputs[batch_size], reference))
        summary.append({"batch_size": batch_size, "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
                        "rows_per_s": len(prompts) / statistics.median(times), "same_as_one_at_a_time": same / len(prompts)})
    table = pd.DataFrame(summary)
    one = table.loc[table["batch_size"] == 1, "median_s"].item()
    table["speedup"] = one / table["median_s"]
    best = table.loc[table["batch_size"] != 1, "speedup"].max() if len(table) > 1 else float("nan")

    environment = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                   "machine": platform.machine(), "processor": platform.processor() or platform.machine()}
    report = {
        "model": str(model_dir), "rows": len(prompts), "max_new_tokens": args.max_new_tokens, "repeats": args.repeats,
        "n_params": sum(p.numel() for p in model.parameters()), "summary": table.to_dict(orient="records"),
        "best_speedup": best, "target": args.target, "passed": bool(best >= args.target), "environment": environment,
    }
    paths = write_results(args.results, "generation_speed", runs, report, started=started, tables=summarize(runs, report),
                          figure=lambda path: plot(table, report, path))

    print()
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"\nbest batched speedup {best:.1f}x (target {args.target:.0f}x): {'PASS' if best >= args.target else 'FAIL'}")
    print("written:", ", ".join(str(path) for path in paths.values()))
    sys.exit(0 if best >= args.target else 1)


def summarize(runs: pd.DataFrame, report: dict) -> dict:
    """The markdown's table: the summary per batch size the JSON records."""
    return {f"Greedy generation of {report['rows']} testbed rows, {report['max_new_tokens']} new tokens at most, "
            f"median of {report['repeats']} repeats (target: {report['target']:g}x)": pd.DataFrame(report["summary"]).set_index("batch_size")}


def plot(table: pd.DataFrame, report: dict, path: Path) -> None:
    from analysis.plots import new_figure, save_figure

    fig, ax = new_figure((5.5, 3.5))
    bars = ax.bar([str(b) for b in table["batch_size"]], table["rows_per_s"], color=["#999999"] + ["#3b6ea8"] * (len(table) - 1))
    for bar, speedup in zip(bars, table["speedup"]):
        ax.annotate(f"{speedup:.1f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=9)
    ax.set_xlabel("batch size")
    ax.set_ylabel("rows / s (median)")
    ax.set_title(f"Greedy generation, {report['rows']} testbed rows, {report['max_new_tokens']} new tokens max")
    save_figure(fig, path, dpi=120)


if __name__ == "__main__":
    main()
