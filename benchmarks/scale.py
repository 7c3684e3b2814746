"""Cost of `soir rank` as the model grows: time and peak memory against parameters and groups,
with the exact curvature (`--curvature hvp`) and the forward-only one (`--curvature fd`).

Each model is an OLMo built from config with random weights (hidden × layers, 4·hidden MLP,
the testbed tokenizer) and saved to a temporary directory; each `soir rank --max-examples N`
runs in a fresh process whose peak RSS comes from wait4. Next to it, in another fresh process,
one plain gradient pass over the same batches of both splits (forward + backward, the model
loaded the same way): the yardstick of the targets

  - rank's peak RSS ≤ 3 × the gradient pass's peak RSS (model included);
  - curvature time per split ≤ 4 × one gradient pass, whatever the number of groups;
  - rank time of 256 × 16 ≤ 4 × that of 256 × 4 (linear in parameters);
  - fd's soir ranking agrees with hvp's at Spearman ≥ 0.95 (reported for the score and for
    c_f, c_r themselves: on random weights many groups sit at the edge of reachability, where
    a small error in c_f moves a group between "reachable" and "ranked last").

Every run reads `ranking.json`'s stage timings, so "gradient pass" time is rank's own
mean-gradient stage (both splits) and curvature time is its curvature stage.

    .venv/bin/python benchmarks/scale.py --out benchmarks/results            # the table of the scale issue
    .venv/bin/python benchmarks/scale.py --sizes 768x12 --curvatures fd      # one more size

Writes scale.{csv,json,png} (rows are merged by size and curvature with earlier results).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from shift_memory import peak_rss_mb  # noqa: E402  (a command's peak RSS and time in a fresh process)

SIZES = ("128x2", "128x8", "256x4", "256x16", "512x8")


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


def run_size(data: Path, size: str, curvatures: list[str], max_examples: int, batch_size: int, work: Path) -> list[dict]:
    model_dir = work / size
    info = json.loads(subprocess.check_output([sys.executable, __file__, "--build", str(model_dir), "--data", str(data), "--sizes", size]))
    python = sys.executable
    yard_rss, yard_s = peak_rss_mb([python, __file__, "--gradient-pass", str(model_dir), "--data", str(data),
                                     "--max-examples", str(max_examples), "--batch-size", str(batch_size)])
    rows = []
    for curvature in curvatures:
        out = work / f"{size}-{curvature}"
        rss, wall = peak_rss_mb([str(Path(python).with_name("soir")), "rank", "--model", str(model_dir), "--forget", str(data / "forget.parquet"),
                                  "--retain", str(data / "retain.parquet"), "--curvature", curvature, "--max-examples", str(max_examples),
                                  "--batch-size", str(batch_size), "--no-progress", "--out", str(out)])
        ranking = json.loads((out / "ranking.json").read_text())
        timings = ranking["timings_s"]
        rows.append({
            "size": size, "curvature": curvature, "n_params": info["n_params"], "n_groups": ranking["n_groups"],
            "n_forget": ranking["n_forget"], "n_retain": ranking["n_retain"], "wall_s": round(wall, 2), "peak_rss_mib": round(rss),
            "gradient_pass_peak_rss_mib": round(yard_rss), "rss_over_gradient_pass": round(rss / yard_rss, 2),
            "gradient_pass_s": timings["mean_gradients"], "curvature_s": timings["curvature"],
            "curvature_over_gradient_pass": round(timings["curvature"] / timings["mean_gradients"], 2),
        })
    if {"hvp", "fd"} <= set(curvatures):
        import pandas as pd
        from scipy.stats import spearmanr

        exact = pd.read_parquet(work / f"{size}-hvp" / "ranking.parquet").set_index("group")
        fd = pd.read_parquet(work / f"{size}-fd" / "ranking.parquet").set_index("group").loc[exact.index]
        for row in rows:
            row["fd_vs_hvp_spearman_score"] = round(float(spearmanr(exact["score"], fd["score"]).statistic), 4)
            row["fd_vs_hvp_spearman_c_f"] = round(float(spearmanr(exact["c_f"], fd["c_f"]).statistic), 4)
            row["fd_vs_hvp_spearman_c_r"] = round(float(spearmanr(exact["c_r"], fd["c_r"]).statistic), 4)
            row["unreachable_groups"] = int((exact["score"] == float("inf")).sum()) if row["curvature"] == "hvp" else int((fd["score"] == float("inf")).sum())
    return rows


def plot(table, path: Path) -> None:
    from analysis.plots import new_figure, save_figure

    fig, axes = new_figure((15, 4.5), ncols=3)
    for curvature, rows in table.groupby("curvature"):
        rows = rows.sort_values("n_params")
        axes[0].plot(rows["n_params"] / 1e6, rows["wall_s"], "o-", label=f"soir rank, --curvature {curvature}")
        axes[1].plot(rows["n_params"] / 1e6, rows["peak_rss_mib"] / 1024, "o-", label=f"soir rank, --curvature {curvature}")
        axes[2].plot(rows["n_groups"], rows["curvature_over_gradient_pass"], "o", label=f"--curvature {curvature}")
    yard = table.drop_duplicates("size").sort_values("n_params")
    axes[1].plot(yard["n_params"] / 1e6, yard["gradient_pass_peak_rss_mib"] / 1024, "k--", label="one gradient pass (yardstick)")
    axes[1].plot(yard["n_params"] / 1e6, 3 * yard["gradient_pass_peak_rss_mib"] / 1024, "k:", label="3 × gradient pass (target)")
    axes[2].axhline(4, color="k", ls=":", label="4 × (target)")
    for size, row in yard.set_index("size").iterrows():
        axes[0].annotate(size, (row["n_params"] / 1e6, table[table["size"] == size]["wall_s"].max()), fontsize=8)
    axes[0].set(xscale="log", yscale="log", xlabel="parameters (millions)", ylabel="wall time (s)", title="rank time")
    axes[1].set(xscale="log", xlabel="parameters (millions)", ylabel="peak RSS (GiB)", title="rank peak memory")
    axes[2].set(xlabel="parameter groups", ylabel="curvature time / gradient pass", title="curvature cost per gradient pass")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    n = int(table["n_forget"].iloc[0])
    fig.suptitle(f"soir rank on random-init OLMo models, {n} forget + {n} retain rows, 2 CPU threads")
    save_figure(fig, path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=list(SIZES), help="hidden x layers, e.g. 256x16")
    p.add_argument("--curvatures", nargs="+", default=["hvp", "fd"])
    p.add_argument("--data", type=Path, help="a testbed data directory (forget/retain parquet + tokenizer/); default: a fresh one")
    p.add_argument("--max-examples", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
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

    with tempfile.TemporaryDirectory(prefix="soir-scale-") as tmp:
        work = Path(tmp)
        data = args.data
        if data is None:
            data = work / "data"
            write_testbed(data)
        rows = []
        for size in args.sizes:
            rows += run_size(data, size, args.curvatures, args.max_examples, args.batch_size, work)
            print(pd.DataFrame(rows).to_string(index=False), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(rows)
    csv = args.out / "scale.csv"
    if csv.exists():
        earlier = pd.read_csv(csv)
        keep = ~earlier.set_index(["size", "curvature"]).index.isin(table.set_index(["size", "curvature"]).index)
        table = pd.concat([earlier[keep], table], ignore_index=True)
    table = table.sort_values(["n_params", "curvature"]).reset_index(drop=True)
    table.to_csv(csv, index=False)
    meta = {"command": "python benchmarks/scale.py " + " ".join(sys.argv[1:]), "machine": platform.processor() or platform.machine(),
            "cpu_threads": 2, "rows": table.to_dict("records")}
    (args.out / "scale.json").write_text(json.dumps(meta, indent=2) + "\n")
    plot(table, args.out / "scale.png")
    print(f"wrote {csv}, scale.json and scale.png")


if __name__ == "__main__":
    main()
