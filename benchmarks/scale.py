"""Cost of `soir rank` as the model grows: time and peak memory against parameters and groups, for
each curvature method (`hvp` exact, `fd` forward-only, `kfac` Kronecker-factored) and for the
defaults (`--curvature` unset: `soir.curvature.choose_curvature`).

Each model is an OLMo built from config with random weights (hidden × layers, 4·hidden MLP, the
testbed tokenizer) and saved to a temporary directory; each `soir rank --max-examples N` runs in a
fresh process whose peak RSS comes from wait4. Next to it, in another fresh process, one plain
gradient pass over the same batches of both splits (forward + backward, the model loaded the same
way): the memory yardstick. "Gradient pass" time is rank's own mean-gradient stage (both splits,
from `ranking.json`), and curvature time its curvature stage.

Targets (issue 20): `soir rank` with its defaults on the 256 × 16 model ≤ 4 × its time on the 256 × 4
one and ≤ 2.5 GB peak RSS; kfac's and fd's soir rankings against hvp's (Spearman of c_f, c_r and the
score; on random weights many groups sit at the edge of reachability, where a small error in c_f
moves a group between "reachable" and "ranked last").

    /work/cpu_run .venv/bin/python benchmarks/scale.py --out benchmarks/results
    /work/cpu_run .venv/bin/python benchmarks/scale.py --sizes 512x8      # one more size, merged

Writes scale.{csv,json,md,png} through benchmarks/report.py (rows are merged by size and curvature
with earlier results).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from report import peak_rss_mb, write_results  # noqa: E402

SIZES = ("128x2", "128x8", "256x4", "256x16")
CURVATURES = ("hvp", "fd", "kfac", "default")
TARGET_TIME_RATIO, TARGET_RSS_MB = 4.0, 2500.0  # the defaults on 256x16 against 256x4; peak RSS in MB (10⁶ bytes)


def build_model(data: Path, size: str, out: Path) -> dict:
    """Save a random-init OLMo of `size` (hidden x layers) with the testbed tokenizer into `out`."""
    from soir.models import TinySize, load_model, load_tokenizer, save_model

    hidden, layers = (int(x) for x in size.split("x"))
    tokenizer = load_tokenizer(data / "tokenizer")
    model = load_model("tiny:olmo", tokenizer, size=TinySize(hidden=hidden, layers=layers, heads=max(4, hidden // 64), intermediate=4 * hidden))
    save_model(model, tokenizer, out)
    return {"n_params": sum(p.numel() for p in model.parameters())}


def gradient_pass(model_dir: Path, data: Path, max_examples: int, batch_size: int) -> None:
    """One forward + backward over the batches rank uses, nothing kept (the memory yardstick)."""
    from soir.data import encode, example_losses, pad_id, read_split, split_batches
    from soir.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, tokenizer, eager_attention=True)
    for offset, split in enumerate(("forget", "retain")):
        encoded = encode(read_split(data / f"{split}.parquet"), tokenizer)
        for batch in split_batches(encoded, pad_id(tokenizer), batch_size, max_examples, offset):
            example_losses(model, batch).sum().backward()


def spearman(a, b) -> float:
    from scipy.stats import spearmanr

    return round(float(spearmanr(a, b).statistic), 4)


def run_size(data: Path, size: str, curvatures: list[str], max_examples: int, batch_size: int, threads: int, work: Path) -> list[dict]:
    import pandas as pd

    model_dir = work / size
    info = json.loads(subprocess.check_output([sys.executable, __file__, "--build", str(model_dir), "--data", str(data), "--sizes", size]))
    python = sys.executable
    yard_rss, _ = peak_rss_mb([python, __file__, "--gradient-pass", str(model_dir), "--data", str(data),
                               "--max-examples", str(max_examples), "--batch-size", str(batch_size)], threads=threads)
    rows, tables = [], {}
    for curvature in curvatures:
        out = work / f"{size}-{curvature}"
        chosen = [] if curvature == "default" else ["--curvature", curvature]
        rss, wall = peak_rss_mb([str(Path(python).with_name("soir")), "rank", "--model", str(model_dir), "--forget", str(data / "forget.parquet"),
                                 "--retain", str(data / "retain.parquet"), *chosen, "--max-examples", str(max_examples),
                                 "--batch-size", str(batch_size), "--no-progress", "--out", str(out)], threads=threads)
        ranking = json.loads((out / "ranking.json").read_text())
        timings = ranking["timings_s"]
        tables[curvature] = pd.read_parquet(out / "ranking.parquet").set_index("group")
        rows.append({
            "size": size, "curvature": curvature, "chosen": ranking["settings"]["curvature"], "n_params": info["n_params"],
            "n_groups": ranking["n_groups"], "n_forget": ranking["n_forget"], "n_retain": ranking["n_retain"], "threads": ranking["threads"],
            "wall_s": round(wall, 2), "peak_rss_mib": round(rss), "gradient_pass_peak_rss_mib": round(yard_rss),
            "rss_over_gradient_pass": round(rss / yard_rss, 2), "gradient_pass_s": timings["mean_gradients"], "curvature_s": timings["curvature"],
            "curvature_over_gradient_pass": round(timings["curvature"] / timings["mean_gradients"], 2),
            "unreachable_groups": int((tables[curvature]["score"] == float("inf")).sum()),
            "curvature_choice": ranking.get("curvature_choice", ""),
        })
    if "hvp" in tables:
        exact = tables["hvp"]
        for row in rows:
            other = tables[row["curvature"]].loc[exact.index]
            for column in ("c_f", "c_r", "score"):
                row[f"spearman_{column}_vs_hvp"] = spearman(exact[column], other[column])
    return rows


def summary(table):
    """The targets: the defaults' 256x16 / 256x4 time ratio and 256x16 peak RSS."""
    import pandas as pd

    default = table[table["curvature"] == "default"].set_index("size")
    out = []
    if {"256x4", "256x16"} <= set(default.index):
        ratio = default.loc["256x16", "wall_s"] / default.loc["256x4", "wall_s"]
        rss_mb = default.loc["256x16", "peak_rss_mib"] * 2**20 / 1e6
        out.append({"target": f"defaults: time 256x16 / 256x4 ≤ {TARGET_TIME_RATIO:g}", "measured": round(ratio, 2),
                    "met": bool(ratio <= TARGET_TIME_RATIO)})
        out.append({"target": f"defaults: peak RSS on 256x16 ≤ {TARGET_RSS_MB:g} MB", "measured": round(rss_mb),
                    "met": bool(rss_mb <= TARGET_RSS_MB)})
    return pd.DataFrame(out)


def plot(table, path: Path) -> None:
    from analysis.plots import new_figure, save_figure

    fig, axes = new_figure((15, 4.5), ncols=3)
    for curvature, rows in table.groupby("curvature"):
        rows = rows.sort_values("n_params")
        label = "defaults" if curvature == "default" else f"--curvature {curvature}"
        axes[0].plot(rows["n_params"] / 1e6, rows["wall_s"], "o-", label=label)
        axes[1].plot(rows["n_params"] / 1e6, rows["peak_rss_mib"] / 1024, "o-", label=label)
        axes[2].plot(rows["n_groups"], rows["curvature_over_gradient_pass"], "o", label=label)
    yard = table.drop_duplicates("size").sort_values("n_params")
    axes[1].plot(yard["n_params"] / 1e6, yard["gradient_pass_peak_rss_mib"] / 1024, "k--", label="one gradient pass (yardstick)")
    axes[1].axhline(TARGET_RSS_MB * 1e6 / 2**30, color="k", ls=":", label="defaults' target on 256x16")
    for size, row in yard.set_index("size").iterrows():
        axes[0].annotate(size, (row["n_params"] / 1e6, table[table["size"] == size]["wall_s"].max()), fontsize=8)
    axes[0].set(xscale="log", yscale="log", xlabel="parameters (millions)", ylabel="wall time (s)", title="soir rank time")
    axes[1].set(xscale="log", xlabel="parameters (millions)", ylabel="peak RSS (GiB)", title="soir rank peak memory")
    axes[2].set(xlabel="parameter groups", ylabel="curvature time / gradient pass", yscale="log", title="curvature cost per gradient pass")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    n, threads = int(table["n_forget"].iloc[0]), int(table["threads"].iloc[0])
    fig.suptitle(f"soir rank on random-init OLMo models, {n} forget + {n} retain rows, {threads} CPU thread(s), other jobs running")
    save_figure(fig, path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=list(SIZES), help="hidden x layers, e.g. 256x16")
    p.add_argument("--curvatures", nargs="+", default=list(CURVATURES), help="curvature methods, and 'default' for --curvature unset")
    p.add_argument("--data", type=Path, help="a testbed data directory (forget/retain parquet + tokenizer/); default: a fresh one")
    p.add_argument("--max-examples", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="OpenMP threads of each measured process")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--build", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--gradient-pass", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.build:
        print(json.dumps(build_model(args.data, args.sizes[0], args.build)))
        return
    if args.gradient_pass:
        gradient_pass(args.gradient_pass, args.data, args.max_examples, args.batch_size)
        return

    import pandas as pd

    from soir.synth import write_testbed

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="soir-scale-") as tmp:
        work = Path(tmp)
        data = args.data
        if data is None:
            data = work / "data"
            write_testbed(data)
        rows = []
        for size in args.sizes:
            rows += run_size(data, size, args.curvatures, args.max_examples, args.batch_size, args.threads, work)
            print(pd.DataFrame(rows).drop(columns="curvature_choice").to_string(index=False), flush=True)
    table = pd.DataFrame(rows)
    csv = args.out / "scale.csv"
    if csv.exists():
        earlier = pd.read_csv(csv)
        if "threads" in earlier:  # rows measured the same way (before: 2 threads, no kfac, no defaults row)
            # new rows replace old ones; what a new row lacks (its Spearman against hvp when hvp was not rerun) is kept
            key = ["size", "curvature"]
            table = table.set_index(key).combine_first(earlier.set_index(key)).reset_index()[list(earlier.columns)]
    table = table.sort_values(["n_params", "curvature"]).reset_index(drop=True)
    shown = table.drop(columns=["curvature_choice", "n_forget", "n_retain", "threads"]).set_index(["size", "curvature"])
    choices = table[table["curvature"] == "default"][["size", "curvature_choice"]].set_index("size")
    notes = (f"CPU, {args.threads} thread(s) per measured process, run through /work/cpu_run with other jobs on the 2-core machine: "
             "times are noisy; ratios within one size were measured back to back. No GPU was used. A row rerun without hvp keeps "
             "its Spearman against hvp from the run that had it.")
    paths = write_results(args.out, "scale", table, {"threads": args.threads, "max_examples": args.max_examples, "batch_size": args.batch_size},
                          started=started, tables={"rank cost per size and curvature": shown, "targets": summary(table),
                                                   "the defaults' choice": choices},
                          figure=lambda path: plot(table, path), notes=notes)
    print("wrote " + ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    main()
