"""What `soir rank --score soir-line` costs against `--score soir`, and how far its line search
(recorded forwards, blocks below a group replayed, secant + Brent steps; `soir.linesearch`)
agrees with the reference path it replaced (full forwards, ×4 bracket from Δ/a, bisection).

On the testbed of `soir demo` (its finetuned model and data), per granularity, in this process
and back to back: `rank` with `--score soir` (its default curvature), then with `--score
soir-line`; then `reference_line_quantities` on the same batches, on every group (tensor) or on
`--reference-groups` groups spread over the table (neuron: its time is that per group × the
groups). Agreement: relative differences of η and of the retain damage (the score) between the
two paths, over the groups both reach, the groups only one reaches, and Spearman over the
groups; at tensor granularity also against the reference bisected to its end (`--converged`
evaluations), which says which of the two is off. Evaluations: forget-split forwards per group
(the new path's are counted on the groups the reference runs on; the reference's are 12, 10 for
a group that cannot reach Δ).

Two-stage rankings (`soir rank --score soir-line --shortlist N`): every cheap first stage (`soir`
with `--curvature kfac`, `fd`, `ggn`, `soir-slope`, and `soir-line@ROWS`, the line search itself on
ROWS rows per split, the first stage of `--shortlist-by soir-line --shortlist-rows ROWS`) ranks
every group, timed, and is compared with the full soir-line ranking (Spearman over the groups, unreachable ones last; overlap of the top
10%); for each N of `--shortlists` the two-stage ranking's top 10% against the full one's, for each
first stage, taken from the full ranking (a group's soir-line score does not depend on which other
groups are scored, up to the search's 10⁻⁶ in log η), and for the first stages of
`--timed-shortlist-by` also run for real and timed.

Targets (docs/design.md §5, issue 20): soir-line ≤ 1.5 × soir's rank time at tensor
granularity; ≤ 5 minutes at neuron granularity (1,550 groups) on 2 cores, with --shortlist or
without; the two-stage top 10% overlaps the full one's by ≥ 0.9. Rank times are wall seconds and,
beside them, CPU seconds of this process (`cpu_seconds`): run with one thread, these are what the
wall time would be on an idle core, whatever else the machine runs; the neuron target is judged on them.

    .venv/bin/python benchmarks/line_cost.py --testbed TESTBED --out benchmarks/results

Writes line_cost.{csv,json,md,png} (the rank times) and line_cost_agreement.{csv,json,md} (first
stages and two-stage rankings against the full soir-line ranking) through benchmarks/report.py.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

TARGETS = {"tensor": ("ratio", 1.5), "neuron": ("seconds", 300.0)}
FIRST_STAGES = ("soir:kfac", "soir:fd", "soir-slope", "soir:ggn")


def relative(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a - b) / np.maximum(np.abs(b), 1e-12)


def agreement(new: pd.DataFrame, ref: pd.DataFrame, label: str) -> dict:
    """η and damage differences of `new` against `ref` (columns eta, damage), over shared groups."""
    from scipy.stats import spearmanr

    new = new.loc[ref.index]
    both = np.isfinite(new["eta"]) & np.isfinite(ref["eta"])
    eta = relative(new["eta"][both].to_numpy(), ref["eta"][both].to_numpy())
    damage = relative(new["damage"][both].to_numpy(), ref["damage"][both].to_numpy())
    score = lambda t: t["damage"].where(np.isfinite(t["eta"]), 1e30)  # noqa: E731  (unreachable ranks last)
    return {f"{label}_groups": int(len(ref)), f"{label}_both_reach": int(both.sum()),
            f"{label}_reach_differs": int((np.isfinite(new["eta"]) != np.isfinite(ref["eta"])).sum()),
            f"{label}_eta_rel_max": float(eta.max(initial=0.0)), f"{label}_eta_rel_median": float(np.median(eta)) if len(eta) else 0.0,
            f"{label}_damage_rel_max": float(damage.max(initial=0.0)),
            f"{label}_damage_rel_median": float(np.median(damage)) if len(damage) else 0.0,
            f"{label}_spearman_score": float(spearmanr(score(new), score(ref)).statistic) if len(ref) > 2 else math.nan}


def top(table: pd.DataFrame, fraction: float = 0.1) -> set:
    """The best `fraction` of a ranking's groups (at least one), by its rank column."""
    return set(table.sort_values("rank", kind="stable").index[: max(1, math.ceil(fraction * len(table)))])


def top_overlap(table: pd.DataFrame, full: pd.DataFrame, fraction: float = 0.1) -> float:
    """|top(table) ∩ top(full)| / |top(full)|."""
    return len(top(table, fraction) & top(full, fraction)) / len(top(full, fraction))


def two_stage_ranks(first: pd.DataFrame, full: pd.DataFrame, n: int) -> pd.DataFrame:
    """The ranking `--shortlist n` gives from the first stage's table and the full soir-line one: the
    first stage's best n in soir-line's order, then the rest in the first stage's order."""
    order = list(first.sort_values("rank", kind="stable").index)
    best = set(order[:n])
    chosen = [g for g in full.sort_values("rank", kind="stable").index if g in best] + order[n:]
    return pd.DataFrame({"rank": np.arange(1, len(chosen) + 1)}, index=chosen).loc[full.index]


def stage_spec(spec: str) -> tuple[str, str | None, int | None]:
    """SCORE[:CURVATURE][@ROWS] as (score, curvature, rows per split): `soir-line@16` is the line
    search on 16 rows, the first stage of `--shortlist-by soir-line --shortlist-rows 16`."""
    spec, _, rows = spec.partition("@")
    score, _, curvature = spec.partition(":")
    return score, curvature or None, int(rows) if rows else None


def run(testbed: Path, granularities, threads: int, reference_groups: int, converged: int, delta: float,
        first_stages=(), shortlists=(), timed_shortlists=(), line_groups: int | None = None, timed_by=("soir-slope",)):
    import torch

    from soir.data import encode, pad_id, read_split, split_batches
    from soir.gradients import mean_gradient
    from soir.groups import parameter_groups
    from soir.linesearch import line_quantities, reference_line_quantities
    from soir.models import load_model, load_tokenizer
    from soir.ranking import RankSettings, rank
    from scipy.stats import spearmanr

    torch.set_num_threads(threads)
    tokenizer = load_tokenizer(testbed / "data" / "tokenizer")
    model = load_model(testbed / "finetuned", tokenizer, eager_attention=True, dtype="float32")
    pad = pad_id(tokenizer)
    splits = {s: encode(read_split(testbed / "data" / f"{s}.parquet"), tokenizer) for s in ("forget", "retain")}
    rows, details, summary, agreements = [], [], {}, []
    for granularity in granularities:
        times, cpu_times = {}, {}  # wall seconds, and CPU seconds of this (one-thread) process: what the wall would be on an idle core
        tables = {}
        every = parameter_groups(model, granularity, RankSettings().norms)
        n_groups = len(every)
        # with --line-groups, the full soir-line ranking (and fd, whose cost also grows with the groups) runs on groups
        # spread over the table, its time extrapolated to every group and the agreements taken over those groups
        scored = every if not line_groups or n_groups <= line_groups else every[:: math.ceil(n_groups / line_groups)]
        only = tuple("^" + re.escape(g.name) + "$" for g in scored) if len(scored) < n_groups else ()
        for score in ("soir", "soir-line"):
            settings = RankSettings(score=score, granularity=granularity, delta=delta, include=only if score == "soir-line" else ())
            started, cpu = time.perf_counter(), time.process_time()
            ranking = rank(model, splits["forget"], splits["retain"], pad, settings, progress=False)
            times[score], cpu_times[score] = time.perf_counter() - started, time.process_time() - cpu
            stages = ranking.info["timings_s"]
            if score == "soir-line" and only:
                scale = n_groups / len(scored) - 1
                cpu_times[score] += stages["line_search"] * scale * cpu_times[score] / times[score]  # the line search's share, at this run's CPU/wall
                times[score] += stages["line_search"] * scale
            tables[score] = ranking.table.set_index("group")
            print(f"{granularity}: rank --score {score}: {times[score]:.1f} s {ranking.info['timings_s']}", flush=True)
        # the reference on the same batches as rank's (RankSettings' defaults)
        settings = RankSettings(granularity=granularity)
        forget = split_batches(splits["forget"], pad, settings.batch_size, None, settings.seed, shard=True)
        retain = split_batches(splits["retain"], pad, settings.batch_size, None, settings.seed + 1, shard=True)
        groups = parameter_groups(model, granularity, settings.norms)
        names = list(dict.fromkeys(n for g in groups for n in g.param_names))
        direction = mean_gradient(model, forget, names)
        pool = [g for g in groups if g.name in tables["soir-line"].index]
        sample = pool if len(pool) <= reference_groups else pool[:: math.ceil(len(pool) / reference_groups)]
        started = time.perf_counter()
        ref = reference_line_quantities(model, forget, retain, sample, direction, delta)
        ref_s = time.perf_counter() - started
        counts: dict[str, int] = {}
        line_quantities(model, forget, retain, sample, direction, delta, counts=counts)
        line = tables["soir-line"].rename(columns={"retain_damage": "damage"})[["eta", "damage"]]
        reference = pd.DataFrame({name: {"eta": float(v[0]), "damage": float(v[2])} for name, v in ref.items()}).T
        stats = agreement(line, reference, "vs_reference")
        extrapolated = len(sample) < len(groups)
        reference_s = ref_s * len(groups) / len(sample)
        conv = None
        if converged and not extrapolated:
            conv = reference_line_quantities(model, forget, retain, sample, direction, delta, evaluations=converged)
            conv = pd.DataFrame({name: {"eta": float(v[0]), "damage": float(v[2])} for name, v in conv.items()}).T
            stats |= agreement(line, conv, "new_vs_converged") | agreement(reference, conv, "reference_vs_converged")
        for name in reference.index:
            details.append({"granularity": granularity, "group": name, "eta_new": line.loc[name, "eta"], "eta_reference": reference.loc[name, "eta"],
                            "damage_new": line.loc[name, "damage"], "damage_reference": reference.loc[name, "damage"],
                            "eta_converged": math.nan if conv is None else conv.loc[name, "eta"],
                            "damage_converged": math.nan if conv is None else conv.loc[name, "damage"],
                            "evaluations_new": counts[name]})
        reference_rank_s = reference_s + stages["setup"] + stages["mean_gradients"]  # rank with the reference line search
        target_kind, target = TARGETS.get(granularity, ("ratio", math.nan))
        measured = times["soir-line"] / times["soir"] if target_kind == "ratio" else cpu_times["soir-line"]
        summary[granularity] = {"n_groups": n_groups, "soir_s": times["soir"], "soir_line_s": times["soir-line"],
                                "soir_line_over_soir": times["soir-line"] / times["soir"],
                                "soir_cpu_s": cpu_times["soir"], "soir_line_cpu_s": cpu_times["soir-line"],
                                "reference_line_search_s": reference_s, "reference_rank_s": reference_rank_s,
                                "reference_extrapolated_from_groups": len(sample) if extrapolated else None,
                                "line_search_s": stages["line_search"], "line_search_over_reference": stages["line_search"] / reference_s,
                                "evaluations_new_mean": float(np.mean(list(counts.values()))),
                                "evaluations_reference_mean": float(np.mean([12 if math.isfinite(v) else 10 for v in reference["eta"]])),
                                "target": f"{'soir-line / soir' if target_kind == 'ratio' else 'soir-line CPU seconds (one thread)'} ≤ {target:g}",
                                "target_met": bool(measured <= target), **stats}
        summary[granularity]["line_search_groups"] = len(scored)  # line_search_s is theirs; soir_line_s extrapolates to every group
        print(granularity, json.dumps(summary[granularity], default=float), flush=True)
        for path, seconds, cpu_s in (("soir", times["soir"], cpu_times["soir"]), ("soir-line", times["soir-line"], cpu_times["soir-line"]),
                                     ("soir-line reference", reference_rank_s, math.nan)):
            rows.append({"granularity": granularity, "path": path, "n_groups": n_groups, "seconds": round(seconds, 2),
                         "cpu_seconds": round(cpu_s, 2),
                         "extrapolated": bool((path == "soir-line reference" and extrapolated) or (path == "soir-line" and only)),
                         "over_soir": round(seconds / times["soir"], 3), "threads": threads})
        full = tables["soir-line"]
        firsts = {}
        for spec in first_stages:  # the cheap first stages against the full soir-line ranking
            score, curvature, rows_ = stage_spec(spec)
            settings = RankSettings(score=score, granularity=granularity, delta=delta, curvature=curvature, max_examples=rows_,
                                    include=only if curvature == "fd" else ())
            started = time.perf_counter()
            firsts[spec] = rank(model, splits["forget"], splits["retain"], pad, settings, progress=False).table.set_index("group").loc[full.index]
            seconds = time.perf_counter() - started
            print(f"{granularity}: first stage {spec}: {seconds:.1f} s", flush=True)
            if curvature == "fd" and only:
                seconds = seconds * n_groups / len(scored)  # its cost grows with the groups: extrapolated
            agreements.append({"granularity": granularity, "ranking": spec, "shortlist": None, "n_groups": n_groups, "seconds": round(seconds, 2),
                               "compared_groups": len(full),
                               "spearman_vs_soir_line": float(spearmanr(firsts[spec]["rank"], full["rank"]).statistic),
                               "top10_overlap": top_overlap(firsts[spec], full), "timed": True})
            for fraction in shortlists:
                two = two_stage_ranks(firsts[spec], full, math.ceil(fraction * len(full)))
                agreements.append({"granularity": granularity, "ranking": f"{spec} → soir-line", "shortlist": math.ceil(fraction * n_groups),
                                   "n_groups": n_groups, "compared_groups": len(full),
                                   "spearman_vs_soir_line": float(spearmanr(two["rank"], full["rank"]).statistic),
                                   "top10_overlap": top_overlap(two, full), "timed": False})
        for timed, fraction in ((by, f) for by in timed_by for f in timed_shortlists):  # two-stage rankings run for real, timed
            n = math.ceil(fraction * n_groups)
            by, _, by_rows = stage_spec(timed)
            settings = RankSettings(score="soir-line", granularity=granularity, delta=delta, shortlist=n, shortlist_by=by,
                                    **({"shortlist_rows": by_rows} if by_rows else {}))
            path = f"soir-line --shortlist {n}" + ("" if timed == "soir-slope" else f" --shortlist-by {by} --shortlist-rows {by_rows}"
                                                   if by_rows else f" --shortlist-by {by}")
            started, cpu = time.perf_counter(), time.process_time()
            ranking = rank(model, splits["forget"], splits["retain"], pad, settings, progress=False)
            seconds, cpu_s = time.perf_counter() - started, time.process_time() - cpu
            two = ranking.table.set_index("group").loc[full.index]
            print(f"{granularity}: {path}: {seconds:.1f} s {ranking.info['timings_s']}", flush=True)
            rows.append({"granularity": granularity, "path": path, "n_groups": n_groups, "seconds": round(seconds, 2),
                         "cpu_seconds": round(cpu_s, 2),
                         "extrapolated": False, "over_soir": round(seconds / times["soir"], 3), "threads": threads})
            agreements.append({"granularity": granularity, "ranking": f"{timed} → soir-line (run)", "shortlist": n,
                               "n_groups": n_groups, "seconds": round(seconds, 2), "compared_groups": len(full),
                               "spearman_vs_soir_line": float(spearmanr(two["rank"], full["rank"]).statistic),
                               "top10_overlap": top_overlap(two, full), "timed": True})
            key = f"shortlist_{n}" + ("" if timed == "soir-slope" else f"_by_{timed}")
            summary[granularity][f"{key}_s"], summary[granularity][f"{key}_timings_s"] = seconds, ranking.info["timings_s"]
    return rows, details, summary, agreements


def plot(table: pd.DataFrame, details: pd.DataFrame, summary: dict, threads: int, path: Path) -> None:
    from analysis.plots import new_figure, save_figure

    fig, axes = new_figure((15, 4.6), ncols=3)
    granularities = list(dict.fromkeys(table["granularity"]))
    paths = ["soir", "soir-line", "soir-line reference"]
    width = 0.8 / len(paths)
    for i, name in enumerate(paths):
        part = table[table["path"] == name].set_index("granularity").loc[granularities]
        bars = axes[0].bar(np.arange(len(granularities)) + (i - 1) * width, part["seconds"], width,
                           label=name + (" (extrapolated at neuron)" if part["extrapolated"].any() else ""))
        for bar, over in zip(bars, part["over_soir"]):
            axes[0].annotate(f"{over:.2f}×", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=7)
    for j, g in enumerate(granularities):
        kind, target = TARGETS.get(g, ("ratio", math.nan))
        level = target * summary[g]["soir_s"] if kind == "ratio" else target
        axes[0].hlines(level, j - 0.45, j + 0.45, colors="k", linestyles=":", label="target" if j == 0 else None)
    axes[0].set(xticks=np.arange(len(granularities)), xticklabels=[f"{g}\n({summary[g]['n_groups']} groups)" for g in granularities],
                yscale="log", ylabel="rank time (s)", title=f"soir rank time, {threads} thread(s)")
    bins = np.arange(0.5, 13.5)
    for g in granularities:
        part = details[details["granularity"] == g]
        axes[1].hist(part["evaluations_new"], bins=bins, alpha=0.6, label=f"{g}: mean {part['evaluations_new'].mean():.1f}")
    axes[1].axvline(12, color="k", ls=":", label="reference: 12 (10 when unreachable)")
    axes[1].set(xlabel="forget-split forwards per group", ylabel="groups", title="line search evaluations (new path)")
    for g in granularities:
        part = details[(details["granularity"] == g) & np.isfinite(details["eta_new"]) & np.isfinite(details["eta_reference"])]
        truth = part["damage_converged"] if part["damage_converged"].notna().all() else None
        against = truth if truth is not None else part["damage_reference"]
        axes[2].scatter(against, relative(part["damage_new"].to_numpy(), against.to_numpy()) + 1e-12, s=14,
                        label=f"{g}: new path vs {'converged reference' if truth is not None else 'reference'}")
        if truth is not None:
            axes[2].scatter(truth, relative(part["damage_reference"].to_numpy(), truth.to_numpy()) + 1e-12, s=14, marker="x",
                            label=f"{g}: reference (12 forwards) vs converged")
    axes[2].set(yscale="log", xlabel="retain damage (nats)", ylabel="relative difference of the score",
                title="score agreement")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("soir-line: recorded forwards + secant/Brent steps against full forwards + bisection")
    save_figure(fig, path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--testbed", default=str(ROOT / "demo-out"), help="a `soir demo` output (finetuned/, data/)")
    p.add_argument("--granularities", nargs="+", default=["tensor", "neuron"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--delta", type=float, default=1.0)
    p.add_argument("--reference-groups", type=int, default=48, help="groups the reference runs on where there are more (default: 48)")
    p.add_argument("--converged", type=int, default=40, help="evaluations of the converged reference at tensor granularity (0: skip)")
    p.add_argument("--first-stages", nargs="*", default=list(FIRST_STAGES),
                   help="first stages to compare with the full soir-line ranking: SCORE, SCORE:CURVATURE, or soir-line@ROWS "
                   "(the line search on ROWS rows per split)")
    p.add_argument("--shortlists", nargs="*", type=float, default=[0.1, 0.2, 0.3],
                   help="shortlist sizes as fractions of the groups, two-stage rankings taken from the full one")
    p.add_argument("--timed-shortlists", nargs="*", type=float, default=[0.1, 0.2],
                   help="shortlist sizes (fractions of the groups) also run for real with each first stage of --timed-shortlist-by, timed")
    p.add_argument("--timed-shortlist-by", nargs="+", default=["soir-slope"],
                   help="the timed runs' first stages: soir-slope, soir, or soir-line@ROWS")
    p.add_argument("--line-groups", type=int, help="run the full soir-line ranking (and fd) on this many groups spread over the "
                   "table where there are more, extrapolating its time and comparing over those groups (default: every group)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    started = time.perf_counter()
    rows, details, summary, agreements = run(Path(args.testbed), args.granularities, args.threads, args.reference_groups, args.converged,
                                             args.delta, args.first_stages, args.shortlists, args.timed_shortlists, args.line_groups,
                                             args.timed_shortlist_by)
    from report import command_line, write_results

    table, details, agreements = pd.DataFrame(rows), pd.DataFrame(details), pd.DataFrame(agreements)
    out = Path(args.out)

    commands = {g: command_line() for g in summary}  # per granularity, the run that measured it
    if (out / "line_cost.json").exists():  # granularities run apart: keep the other granularities' results
        earlier = json.loads((out / "line_cost.json").read_text())
        other = [g for g in earlier.get("granularities", {}) if g not in summary]
        summary = {**{g: earlier["granularities"][g] for g in other}, **summary}
        commands = {**{g: earlier.get("granularity_commands", {}).get(g, earlier["command"]) for g in other}, **commands}
        details = pd.concat([pd.DataFrame([r for r in earlier.get("groups", []) if r["granularity"] in other]), details], ignore_index=True)
        table = pd.concat([pd.read_csv(out / "line_cost.csv").query("granularity in @other"), table], ignore_index=True)
        if (out / "line_cost_agreement.csv").exists():
            agreements = pd.concat([pd.read_csv(out / "line_cost_agreement.csv").query("granularity in @other"), agreements], ignore_index=True)
    notes = (f"CPU, {args.threads} thread(s), with other jobs on the 2-core machine: wall times (`seconds`) are noisy, CPU times "
             "(`cpu_seconds`, one thread) are what the wall would be on an idle core; "
             f"testbed {args.testbed}. No GPU was used." + (
                 f" Granularities other than {', '.join(args.granularities)} come from an earlier run of this script (its rows kept "
                 "when one granularity is run again; its command is in the JSON's `granularity_commands`)."
                 if set(commands) - set(args.granularities) else "") + (
                 f" With --line-groups {args.line_groups}, the full soir-line ranking and fd ran on that many groups spread over the "
                 "table where there are more: their times are extrapolated to every group, and every agreement is taken over those "
                 "groups (compared_groups), the two-stage ones with the same fraction of them shortlisted." if args.line_groups else ""))
    meta = {"testbed": str(args.testbed), "threads": args.threads, "delta": args.delta, "granularities": summary,
            "granularity_commands": commands,
            "groups": details.to_dict(orient="records")}
    write_results(args.out, "line_cost", table, meta, started=started, tables={"rank time": table.set_index(["granularity", "path"])},
                  figure=lambda path: plot(table, details, summary, args.threads, path), notes=notes)
    if len(agreements):  # none without first stages or timed shortlists
        shown = agreements.set_index(["granularity", "ranking", "shortlist"])
        write_results(args.out, "line_cost_agreement", agreements, {"testbed": str(args.testbed), "threads": args.threads,
                                                                     "delta": args.delta, "granularity_commands": commands},
                      started=started, tables={"agreement with the full soir-line ranking": shown}, notes=notes + (
                          " Rows with a shortlist and timed = False are taken from the full ranking (the shortlisted groups in "
                          "soir-line's order, the rest in the first stage's); timed rows were run."))
    print(f"wrote line_cost{' and line_cost_agreement' if len(agreements) else ''} under {args.out} ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
