"""How much ranking accuracy does gradient compression cost, and how much time does it save?

On the testbed's finetuned model (all tensor groups):

1. accuracy: for each sketch (gaussian, rademacher, sjlt, oporp, factored) and k per group,
   the Spearman correlation and top-10% overlap of the `soir` and `soir-datainf` rankings
   against the exact (`--sketch none`) rankings, with time per example and peak memory;
2. timing, on one batch: `factored` sketches of every Linear weight vs a plain batched
   forward+backward (target ≤ 1.25×) and vs per-example vmap gradients + a dense projection
   at equal k (target: factored ≥ 20× faster), with TRAK's BasicProjector (the peer) and the
   thesis's `oporp` on the same vmap gradients;
3. curvature: Spearman of `soir` rankings with `ggn` against exact HVP curvature.

    .venv/bin/python benchmarks/compression.py --model /tmp/demo-default/finetuned \
        --data /tmp/demo-default/data --out benchmarks/results

Writes compression.csv (accuracy), compression_timing.csv, compression.json (summary,
settings, versions) and compression.png (Spearman vs k, panels soir / soir-datainf).

How `soir` is sketched (as `soir rank --sketch X --dim K` computes it): a and b come from
sketches of the mean gradients; c_f and c_r are exact HVPs (they do not depend on the
sketch). `soir-datainf` is computed entirely in sketch space from per-example retain
sketches and the mean forget sketch. Per-example sketches of the non-factored kinds are
projections of exact per-example gradients computed once (their time per example adds the
measured per-example gradient time); `factored` runs its own hook pass.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import torch
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from soir.curvature import hvp_quadratic_forms  # noqa: E402
from soir.data import (  # noqa: E402
    encode,
    example_losses,
    pad_id,
    read_split,
    split_batches,  # noqa: E402
)
from soir.gradients import mean_gradient, per_example_grads  # noqa: E402
from soir.groups import parameter_groups  # noqa: E402
from soir.models import load_model, load_tokenizer  # noqa: E402
from soir.ranking import RankSettings, rank  # noqa: E402
from soir.runtime import versions  # noqa: E402
from soir.scores import soir_components, soir_datainf  # noqa: E402
from soir.sketch import (  # noqa: E402
    FactoredSketcher,
    SketchPlan,  # noqa: E402
    make_sketch,
    matrix_modules,
)

KINDS = ("gaussian", "rademacher", "sjlt", "oporp", "factored")
THESIS = {"mlp_only_k1024": 0.82, "all_tensors_k1024": 0.01, "target_all_tensors_k1024": 0.95}


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every 5 ms (MB)."""

    def __enter__(self):
        self.process = psutil.Process()
        self.base = self.peak = self.process.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)
        self.mb = (self.peak - self.base) / 2**20


def overlap(exact: np.ndarray, approx: np.ndarray, lower_is_better: bool, fraction: float = 0.1) -> float:
    m = max(1, math.ceil(fraction * len(exact)))
    order = (lambda s: np.argsort(s, kind="stable")) if lower_is_better else (lambda s: np.argsort(-s, kind="stable"))
    return len(set(order(exact)[:m]) & set(order(approx)[:m])) / m


def timed(fn, reps: int = 3):
    """Median wall time of `reps` calls after one warm-up, and the last result."""
    out = fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), out


# ---------------------------------------------------------------- accuracy


def accuracy(model, groups, fb, rb, ks, kinds, seeds, delta, lam, log):
    names = list(dict.fromkeys(n for g in groups for n in g.param_names))
    n_r = sum(len(b["input_ids"]) for b in rb)
    log("exact pieces: mean gradients, HVP curvature, per-example retain gradients")
    g_f = mean_gradient(model, fb, names)
    g_r = mean_gradient(model, rb, names)
    start = time.perf_counter()
    c_f = hvp_quadratic_forms(model, fb, groups, g_f)
    c_r = hvp_quadratic_forms(model, rb, groups, g_f)
    hvp_seconds = time.perf_counter() - start
    c_f = np.array([c_f[g.name] for g in groups])
    c_r = np.array([c_r[g.name] for g in groups])
    start = time.perf_counter()
    with torch.no_grad():
        chunks = [per_example_grads(model, b, names) for b in rb]
    # per-example retain gradients with the two mean gradients as two extra rows: one projection
    # call per (sketch, k) generates each dense map once for all of them
    per_example = {n: torch.cat([c[n] for c in chunks] + [g_f[n][None], g_r[n][None]]) for n in names}
    del chunks
    grad_seconds = time.perf_counter() - start

    def soir_scores(sf, sr):
        a = np.array([float(sf[g.name].double() @ sf[g.name].double()) for g in groups])
        b = np.array([float(sr[g.name].double() @ sf[g.name].double()) for g in groups])
        return soir_components(a, b, c_f, c_r, delta)["score"]

    def datainf_scores(retain, mean_forget):
        return np.array([soir_datainf(retain[g.name], mean_forget[g.name], g.n_params, lam) for g in groups])

    def split_rows(sketches):  # retain rows, mean forget, mean retain
        return ({n: s[:n_r] for n, s in sketches.items()}, {n: s[n_r] for n, s in sketches.items()},
                {n: s[n_r + 1] for n, s in sketches.items()})

    exact_retain, exact_f, exact_r = split_rows(SketchPlan(model, groups, "none", 1).project_examples(per_example))
    exact_soir = soir_scores(exact_f, exact_r)
    exact_datainf = datainf_scores(exact_retain, exact_f)
    rows = []
    for kind in kinds:
        for k in ks:
            for seed in range(seeds):
                plan = SketchPlan(model, groups, kind, k, seed)
                with PeakRSS() as memory:
                    start = time.perf_counter()
                    if kind == "factored":  # the real path: hooks, no per-example gradients
                        retain = plan.split(rb)
                        sketch_seconds = time.perf_counter() - start
                        sf, sr = plan.project_means([g_f, g_r])
                    else:
                        retain, sf, sr = split_rows(plan.project_examples(per_example))
                        sketch_seconds = time.perf_counter() - start + grad_seconds
                soir_s = soir_scores(sf, sr)
                datainf_s = datainf_scores(retain, sf)
                stored = sum(t.numel() * t.element_size() for t in retain.values()) / 2**20
                for score, exact, approx, lower in (("soir", exact_soir, soir_s, True), ("soir-datainf", exact_datainf, datainf_s, False)):
                    rows.append({
                        "score": score, "sketch": kind, "k": k, "seed": seed,
                        "spearman": float(spearmanr(exact, approx).statistic),
                        "top10_overlap": overlap(exact, approx, lower),
                        "ms_per_example": 1e3 * sketch_seconds / n_r,
                        "peak_rss_mb": memory.mb, "sketch_mb": stored,
                    })
                log(f"  {kind:10s} k={k:5d} seed={seed}: soir ρ={rows[-2]['spearman']:.3f}  datainf ρ={rows[-1]['spearman']:.3f}  "
                    f"{rows[-1]['ms_per_example']:.1f} ms/example")
    exact_info = {"hvp_seconds": hvp_seconds, "per_example_grad_seconds": grad_seconds, "n_retain": n_r}
    return pd.DataFrame(rows), exact_info


# ---------------------------------------------------------------- timing


def timing(model, batch, k, reps, log):
    """Factored sketches of every Linear weight vs plain forward+backward, vmap + dense projection,
    TRAK's BasicProjector and oporp, at k per weight."""
    modules = matrix_modules(model)
    weights = [f"{m}.weight" for m in modules]
    params = dict(model.named_parameters())
    n = len(batch["input_ids"])
    rows = []

    def plain():
        model.zero_grad(set_to_none=True)
        example_losses(model, batch).sum().backward()
        model.zero_grad(set_to_none=True)

    model.eval()
    t_plain, _ = timed(plain, reps)
    sketcher = FactoredSketcher(model, modules, k, bias_kind=None)
    t_factored, _ = timed(lambda: sketcher.sketch(example_losses, batch), reps)
    with torch.no_grad():
        t_vmap, grads = timed(lambda: per_example_grads(model, batch, weights), 1)

    def project(kind):
        maps = {w: make_sketch(kind, params[w].numel(), k, w) for w in weights}
        return lambda: {w: maps[w].project(grads[w].reshape(n, -1)) for w in weights}

    t_dense, _ = timed(project("gaussian"), 1)
    t_oporp, _ = timed(project("oporp"), reps)
    t_sjlt, _ = timed(project("sjlt"), reps)
    rows += [
        {"path": "plain forward+backward (batched)", "seconds": t_plain},
        {"path": "factored sketches (hooks)", "seconds": t_factored},
        {"path": "per-example vmap gradients", "seconds": t_vmap},
        {"path": "vmap + dense gaussian projection", "seconds": t_vmap + t_dense},
        {"path": "vmap + oporp (thesis)", "seconds": t_vmap + t_oporp},
        {"path": "vmap + sjlt", "seconds": t_vmap + t_sjlt},
    ]
    try:
        from trak.projectors import BasicProjector, ProjectionType
    except ImportError:
        print("note: traker is not installed (pip install --no-deps traker): the TRAK column is skipped")
    else:
        start = time.perf_counter()
        projectors = {w: BasicProjector(params[w].numel(), k, 0, ProjectionType.normal, torch.device("cpu"), block_size=k) for w in weights}
        t_init = time.perf_counter() - start
        t_trak, _ = timed(lambda: {w: projectors[w].project(grads[w].reshape(n, -1), model_id=0) for w in weights}, 1)
        rows += [{"path": "vmap + TRAK BasicProjector (project only)", "seconds": t_vmap + t_trak},
                 {"path": "vmap + TRAK BasicProjector (with matrix generation)", "seconds": t_vmap + t_trak + t_init}]
    for row in rows:
        row["x_plain"] = row["seconds"] / t_plain
        row["x_factored"] = row["seconds"] / t_factored
        row["examples"] = n
        row["k_per_weight"] = k
        row["weights"] = len(weights)
    table = pd.DataFrame(rows)
    log(table.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    return table, {"factored_over_plain": t_factored / t_plain, "dense_over_factored": (t_vmap + t_dense) / t_factored,
                   "target_factored_over_plain": 1.25, "target_dense_over_factored": 20.0}


# ---------------------------------------------------------------- ggn


def ggn_agreement(model, forget, retain, pad, batch_size, max_examples, log):
    common = dict(batch_size=batch_size, max_examples=max_examples)
    exact = rank(model, forget, retain, pad, RankSettings(**common), progress=False)
    out = {}
    for label, settings in (("ggn none", RankSettings(curvature="ggn", **common)),
                            ("ggn none x4", RankSettings(curvature="ggn", ggn_samples=4, **common)),
                            ("ggn factored k=1024", RankSettings(curvature="ggn", sketch="factored", dim=1024, **common))):
        other = rank(model, forget, retain, pad, settings, progress=False)
        out[label] = {"spearman_soir": float(spearmanr(exact.table["score"], other.table["score"]).statistic),
                      "spearman_c_r": float(spearmanr(exact.table["c_r"], other.table["c_r"]).statistic),
                      "seconds": other.info["timings_s"]["total"]}
        log(f"  {label}: soir ρ={out[label]['spearman_soir']:.3f} (c_r ρ={out[label]['spearman_c_r']:.3f}), {out[label]['seconds']:.1f} s")
    out["hvp_seconds"] = exact.info["timings_s"]["total"]
    return out


# ---------------------------------------------------------------- plot


def plot(table: pd.DataFrame, path: Path, title: str = "all tensor groups"):
    """Top: Spearman against k per group; bottom: the same points against time per example (the trade-off)."""
    from analysis.plots import new_figure, save_figure

    fig, axes = new_figure((11, 8), 2, nrows=2, sharey=True)
    summary = (table.groupby(["score", "sketch", "k"])[["spearman", "ms_per_example"]]
               .agg({"spearman": ["mean", "min", "max"], "ms_per_example": "median"}).reset_index())
    summary.columns = ["score", "sketch", "k", "mean", "min", "max", "ms"]
    for column, score in enumerate(("soir", "soir-datainf")):
        for row, x in enumerate(("k", "ms")):
            ax = axes[row][column]
            for kind in KINDS:
                rows = summary[(summary.score == score) & (summary.sketch == kind)]
                if rows.empty:
                    continue
                ax.plot(rows[x], rows["mean"], marker="o", label=kind)
                ax.fill_between(rows[x], rows["min"], rows["max"], alpha=0.15)
            ax.axhline(THESIS["target_all_tensors_k1024"], color="k", ls="--", lw=0.8, label="target 0.95")
            if score == "soir-datainf" and x == "k":
                ax.scatter([1024], [THESIS["mlp_only_k1024"]], marker="x", color="grey", label="thesis, MLP only")
                ax.scatter([1024], [THESIS["all_tensors_k1024"]], marker="+", color="grey", s=80, label="thesis, all tensors")
            ax.set_xscale("log", base=2 if x == "k" else 10)
            ax.set_xlabel("k per group" if x == "k" else "sketching time per retain example (ms, log)")
            ax.set_title(f"{score}: ranking vs exact, {title}")
            ax.grid(alpha=0.3)
        axes[0][column].set_ylabel("Spearman ρ")
        axes[1][column].set_ylabel("Spearman ρ")
    axes[0][1].legend(fontsize=8, loc="lower right")
    save_figure(fig, path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="/tmp/demo-default/finetuned")
    p.add_argument("--data", default="/tmp/demo-default/data")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--name", default="compression", help="file name prefix of the results (default: %(default)s)")
    p.add_argument("--ks", type=int, nargs="+", default=[2**e for e in range(6, 13)], help="k per group (default: 64 … 4096)")
    p.add_argument("--sketches", nargs="+", default=list(KINDS), choices=list(KINDS))
    p.add_argument("--seeds", type=int, default=1, help="sketch seeds per (sketch, k) (default: 1)")
    p.add_argument("--max-examples", type=int, help="rows per split (default: all)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--delta", type=float, default=1.0)
    p.add_argument("--lam", type=float, default=0.1)
    p.add_argument("--timing-k", type=int, default=1024, help="k per weight in the timing section (default: 1024 = 32×32)")
    p.add_argument("--reps", type=int, default=5, help="repetitions of each timed path (median)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--skip", nargs="*", default=[], choices=["accuracy", "timing", "ggn"], help="sections to skip")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    started = time.perf_counter()

    data = Path(args.data)
    tok_dir = data / "tokenizer" if (data / "tokenizer").is_dir() else Path(args.model)
    tokenizer = load_tokenizer(tok_dir)
    model = load_model(args.model, tokenizer, eager_attention=True, dtype="float32").eval()
    forget = encode(read_split(data / "forget.parquet"), tokenizer)
    retain = encode(read_split(data / "retain.parquet"), tokenizer)
    pad = pad_id(tokenizer)
    fb = split_batches(forget, pad, args.batch_size, args.max_examples, 0)
    rb = split_batches(retain, pad, args.batch_size, args.max_examples, 1)
    groups = parameter_groups(model, "tensor")
    summary = {"model": args.model, "data": str(data), "groups": len(groups), "n_params": sum(g.n_params for g in groups),
               "threads": torch.get_num_threads(), "device": "cpu", "versions": versions(), "thesis": THESIS,
               "settings": {k: v for k, v in vars(args).items()}}
    log(f"{len(groups)} tensor groups, {summary['n_params']:,} parameters; forget {len(forget)}, retain {len(retain)} rows; "
        f"{torch.get_num_threads()} threads")

    if "accuracy" not in args.skip:
        table, exact_info = accuracy(model, groups, fb, rb, args.ks, args.sketches, args.seeds, args.delta, args.lam, log)
        table.to_csv(out / f"{args.name}.csv", index=False)
        plot(table, out / f"{args.name}.png", f"{len(groups)} tensor groups")
        summary["exact"] = exact_info
        at = table[table.k == 1024].groupby(["score", "sketch"])["spearman"].mean().unstack(0)
        summary["spearman_at_k1024"] = at.to_dict()
        log("\nSpearman ρ vs exact ranking (all tensor groups, mean over seeds):")
        log(table.pivot_table(index=["sketch", "k"], columns="score", values="spearman").to_string(float_format=lambda x: f"{x:.3f}"))
    if "timing" not in args.skip:
        log("\ntiming on one batch (median):")
        batch = rb[len(rb) // 2]
        ttable, ratios = timing(model, batch, args.timing_k, args.reps, log)
        ttable.to_csv(out / f"{args.name}_timing.csv", index=False)
        summary["timing"] = ratios
        log(f"factored / plain = {ratios['factored_over_plain']:.2f}× (target ≤ 1.25); "
            f"vmap+dense / factored = {ratios['dense_over_factored']:.1f}× (target ≥ 20)")
    if "ggn" not in args.skip:
        log("\nggn vs exact HVP curvature (soir rankings):")
        summary["ggn_vs_hvp"] = ggn_agreement(model, forget, retain, pad, args.batch_size, args.max_examples, log)
    summary["seconds"] = time.perf_counter() - started
    (out / f"{args.name}.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    log(f"\nwrote {out}/{args.name}.csv, .json, .png (and {args.name}_timing.csv) in {summary['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
