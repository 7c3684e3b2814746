"""Does the `soir` Taylor model predict what a group's step really does?

For every tensor group S of the testbed's finetuned model, the step the score assumes,
δ_S = η_S g_f,S with η_S chosen so the predicted forget gain is Δ, is applied for real and the
forget gain F and retain damage R are measured (split-loss differences). Predictions come from
three models of the curvature: exact HVPs (`hvp`), Gauss–Newton (`ggn`) and none (first order:
η = Δ / a, R = η b). Reported per model: Spearman between predicted and measured R (the target
is ≥ 0.8), and median relative errors of F and R.

Then the line search (`soir.linesearch`, the `soir-line` score): along g_f,S, the real forget
loss is measured until it has risen by Δ (bisection in log η, ≤ `--evaluations` forwards), and
R is measured there. It costs those forwards per group and needs no second-order pass.

Both the quadratic models and the line search are fitted on half of each split's rows (even
rows) and measured on the other half (odd rows: other questions about the same people and
documents), so "line" is not measured on the rows it searched, and on the fitted rows too.
The truth a ranking is judged by: on the held-out rows, the retain damage of the step along
g_f,S that raises the held-out forget loss by Δ (the same line search, on held-out rows).

    .venv/bin/python benchmarks/taylor.py --model demo-out/finetuned --data demo-out/data

Writes taylor.{csv,json,png}.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from soir.curvature import ggn_quadratic_forms, group_direction, hvp_quadratic_forms, split_loss  # noqa: E402
from soir.linesearch import line_quantities, loss_along  # noqa: E402
from soir.data import encode, example_losses, pad_id, read_split, split_batches  # noqa: E402
from soir.gradients import mean_gradient  # noqa: E402
from soir.groups import parameter_groups  # noqa: E402
from soir.models import load_model, load_tokenizer  # noqa: E402
from soir.runtime import versions  # noqa: E402
from soir.scores import soir_components  # noqa: E402


def losses_at(model, direction, eta, splits) -> dict[str, float]:
    with torch.no_grad():
        return {name: loss_along(model, direction, eta, batches, example_losses) for name, batches in splits.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "demo-out" / "finetuned"))
    p.add_argument("--data", default=str(ROOT / "demo-out" / "data"))
    p.add_argument("--delta", type=float, default=1.0, help="the forget target Δ in nats (default: 1)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--evaluations", type=int, default=12, help="forget-loss forwards per group in the line search (default: 12, as rank)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    started = time.perf_counter()
    data = Path(args.data)
    tokenizer = load_tokenizer(data / "tokenizer")
    model = load_model(args.model, tokenizer, eager_attention=True, dtype="float32").eval()
    pad = pad_id(tokenizer)
    frames = {s: read_split(data / f"{s}.parquet") for s in ("forget", "retain")}
    fit = {s: split_batches(encode(f.iloc[::2], tokenizer), pad, args.batch_size) for s, f in frames.items()}
    held = {s: split_batches(encode(f.iloc[1::2], tokenizer), pad, args.batch_size) for s, f in frames.items()}
    groups = parameter_groups(model, "tensor")
    names = list(dict.fromkeys(n for g in groups for n in g.param_names))
    named = dict(model.named_parameters())
    print(f"{len(groups)} groups; fit rows {len(frames['forget'].iloc[::2])} forget / {len(frames['retain'].iloc[::2])} retain", flush=True)

    g_f = mean_gradient(model, fit["forget"], names)
    g_r = mean_gradient(model, fit["retain"], names)
    directions = {g.name: group_direction(g, g_f, named) for g in groups}
    a = np.array([float(sum((v.double() ** 2).sum() for v in directions[g.name].values())) for g in groups])
    b = np.array([float(sum((g_r[n].double() * v.double()).sum() for n, v in directions[g.name].items())) for g in groups])
    timings = {}
    curv = {}
    for method, forms in (("hvp", hvp_quadratic_forms), ("ggn", ggn_quadratic_forms)):
        t = time.perf_counter()
        curv[method] = {split: forms(model, fit[split], groups, g_f) for split in ("forget", "retain")}
        timings[method] = time.perf_counter() - t
    curv["first-order"] = {split: {g.name: 0.0 for g in groups} for split in ("forget", "retain")}

    base = {"fit": {s: float(split_loss(model, fit[s])) for s in fit}, "held": {s: float(split_loss(model, held[s])) for s in held}}
    rows = []

    def measure(row: dict, direction) -> dict:
        """`row` with the forget gain and retain damage of its step η measured on both halves."""
        if math.isfinite(row["eta"]):
            for where, splits in (("fit", fit), ("held", held)):
                measured = losses_at(model, direction, row["eta"], splits)
                row[f"forget_gain_{where}"] = measured["forget"] - base[where]["forget"]
                row[f"retain_damage_{where}"] = measured["retain"] - base[where]["retain"]
        return row

    for method in ("hvp", "ggn", "first-order"):
        c_f = np.array([curv[method]["forget"][g.name] for g in groups])
        c_r = np.array([curv[method]["retain"][g.name] for g in groups])
        comp = soir_components(a, b, c_f, c_r, args.delta)
        for i, g in enumerate(groups):
            eta = float(comp["eta"][i])
            row = {"method": method, "group": g.name, "n_params": g.n_params, "a": a[i], "b": b[i], "c_f": c_f[i], "c_r": c_r[i], "eta": eta,
                   "predicted_forget_gain": float(comp["forget_gain"][i]), "predicted_retain_damage": float(comp["retain_damage"][i])}
            rows.append(measure(row, directions[g.name]))
        print(f"  {method}: measured", flush=True)

    # the truth on held-out rows: the damage of reaching Δ there (the same line search, on the held-out rows)
    truth = {name: float(v[2]) if math.isfinite(v[0]) else math.inf
             for name, v in line_quantities(model, held["forget"], held["retain"], groups, g_f, args.delta, args.evaluations).items()}
    print("  held-out truth: measured", flush=True)
    t = time.perf_counter()
    line = line_quantities(model, fit["forget"], fit["retain"], groups, g_f, args.delta, args.evaluations)
    timings["line"] = time.perf_counter() - t
    for i, g in enumerate(groups):
        eta, gain, damage = (float(x) for x in line[g.name])
        row = {"method": "line", "group": g.name, "n_params": g.n_params, "a": a[i], "b": b[i], "eta": eta, "predicted_forget_gain": gain,
               "predicted_retain_damage": damage if math.isfinite(eta) else math.inf}  # the score: R measured on the rows searched
        rows.append(measure(row, directions[g.name]))
    t = time.perf_counter()
    mean_gradient(model, fit["forget"], names)
    mean_gradient(model, fit["retain"], names)
    timings["gradient_pass"] = time.perf_counter() - t
    table = pd.DataFrame(rows)
    table["heldout_true_damage"] = table["group"].map(truth)

    summary = {"delta": args.delta, "groups": len(groups), "timings_s": timings, "model": args.model, "versions": versions(), "methods": {}}
    for method, part in table.groupby("method", sort=False):
        ok = part[np.isfinite(part["eta"]) & part["retain_damage_fit"].notna()] if "retain_damage_fit" in part else part.iloc[:0]
        stats = {"reachable_groups": int(len(ok)), "eta_min": float(ok["eta"].min()), "eta_max": float(ok["eta"].max())}
        # the ranking against the truth: unreachable groups (score inf) rank last on both sides
        stats["spearman_to_heldout_truth"] = float(spearmanr(part["predicted_retain_damage"].fillna(np.inf).replace(np.inf, 1e30),
                                                             part["heldout_true_damage"].replace(np.inf, 1e30)).statistic)
        for where in ("fit", "held"):
            stats[f"spearman_damage_{where}"] = float(spearmanr(ok["predicted_retain_damage"], ok[f"retain_damage_{where}"]).statistic)
            stats[f"median_rel_err_gain_{where}"] = float(np.median(np.abs(ok[f"forget_gain_{where}"] - args.delta) / args.delta))
            stats[f"median_rel_err_damage_{where}"] = float(np.median(np.abs(ok["predicted_retain_damage"] - ok[f"retain_damage_{where}"])
                                                                    / ok[f"retain_damage_{where}"].abs().clip(lower=1e-12)))
        summary["methods"][method] = stats
        print(f"{method:>12}: {stats['reachable_groups']} reachable, η {stats['eta_min']:.3g}…{stats['eta_max']:.3g}; "
              f"Spearman predicted vs measured R: fit {stats['spearman_damage_fit']:.3f}, held-out {stats['spearman_damage_held']:.3f}; "
              f"median rel. error F {stats['median_rel_err_gain_fit']:.2f}, R {stats['median_rel_err_damage_fit']:.2f}; "
              f"ranking vs held-out truth {stats['spearman_to_heldout_truth']:.3f}", flush=True)
    # do the quadratic rankings agree with the line search's?
    line = table[table.method == "line"].set_index("group")
    for method in ("hvp", "ggn", "first-order"):
        other = table[table.method == method].set_index("group").loc[line.index]
        both = np.isfinite(line["predicted_retain_damage"]) & np.isfinite(other["predicted_retain_damage"])
        summary["methods"][method]["spearman_to_line_ranking"] = float(spearmanr(other["predicted_retain_damage"][both],
                                                                                 line["predicted_retain_damage"][both]).statistic)
    timings["seconds"] = time.perf_counter() - started
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "taylor.csv", index=False)
    summary["command"] = " ".join(["python", *sys.argv])
    (out / "taylor.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    plot(table, summary, out / "taylor.png")
    print(f"wrote {out}/taylor.csv, .json, .png ({timings['seconds']:.0f} s)")
    return 0


def plot(table: pd.DataFrame, summary: dict, path: Path) -> None:
    """Top: predicted R against R measured at the same step on the fitted rows (the Taylor check).
    Bottom: the score against the held-out truth (what a ranking should order by)."""
    from analysis.plots import new_figure, save_figure

    methods = list(dict.fromkeys(table["method"]))
    fig, axes = new_figure((4 * len(methods), 7.2), len(methods), nrows=2)
    for column, method in enumerate(methods):
        part = table[(table.method == method) & np.isfinite(table["eta"])]
        stats = summary["methods"][method]
        for row, (y, label, title) in enumerate((
                ("retain_damage_fit", "measured R at the step (fitted rows)", f"Spearman {stats['spearman_damage_fit']:.2f}"),
                ("heldout_true_damage", "held-out truth: R of forgetting Δ there", f"Spearman {stats['spearman_to_heldout_truth']:.2f} (all groups)"))):
            ax = axes[row][column]
            shown = part[np.isfinite(part[y])]
            ax.scatter(shown["predicted_retain_damage"], shown[y], s=18)
            ends = np.r_[shown["predicted_retain_damage"], shown[y]]
            ax.plot([ends.min(), ends.max()], [ends.min(), ends.max()], "k--", lw=0.7)
            ax.set_title(f"{method}: {title}", fontsize=9)
            ax.set_xlabel("the score: predicted retain damage R (nats)")
            ax.set_ylabel(label, fontsize=8)
            ax.grid(alpha=0.3)
    fig.suptitle(f"Taylor check of each group's step to a forget gain of Δ = {summary['delta']} ({summary['groups']} tensor groups)")
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
