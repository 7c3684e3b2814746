"""How much ranking accuracy does gradient compression cost, where does its error come from, and
how much time does it save?

On a model's tensor groups (a saved model, or `--model random:HIDDENxLAYERS`: the random-init OLMo
that benchmarks/scale.py builds, with the data's tokenizer):

1. accuracy: for each sketch (gaussian, rademacher, sjlt, oporp, factored), k per group and sketch
   seed, the Spearman correlation and top-10% overlap with the exact (`--sketch none`) ranking of
   - `soir-datainf`, computed in sketch space from per-example retain sketches and the sketched
     mean forget gradient (with its time per example and peak memory);
   - `soir`, `soir-slope` and `cancel`, as `soir rank --sketch X` computes them (`means = exact`:
     the mean gradients are exact, `soir.quantities.mean_form`) and as it did before format 2
     (`means = sketched`: a_S = |g_f,S|² and b_S = g_r,Sᵀg_f,S from sketches of the mean gradients);
   c_f and c_r are exact HVPs (they do not depend on the sketch);
2. diagnosis, on the same sketches: per group, cos(g_f,S, g_r,S) and the errors of the sketched a_S
   and b_S, their RMS over seeds beside what a JL map predicts (√(2/k) for a, √((1 + cos²)/k)/|cos|
   for b), how often b changes sign, and the `soir` ranking with only a or only b sketched;
3. ggn-sketch: c_f, c_r of `--curvature ggn --sketch X` against `--curvature ggn --sketch none` with
   the same sampled labels (the same seed), and the `soir` ranking with them (a, b exact);
4. timing, on one batch: `factored` sketches of every Linear weight vs a plain batched
   forward+backward (target ≤ 1.25×) and vs per-example vmap gradients + a dense projection
   at equal k (target: factored ≥ 20× faster), with TRAK's BasicProjector (the peer) and the
   thesis's `oporp` on the same vmap gradients;
5. ggn: Spearman of `soir` rankings with `ggn` against exact HVP curvature.

    .venv/bin/python benchmarks/compression.py --model DIR/finetuned --data DIR/data --seeds 5
    .venv/bin/python benchmarks/compression.py --model random:256x16 --data DIR/data --name compression_256x16 \
        --max-examples 32 --ks 64 128 256 512 1024 --sketches sjlt oporp factored --seeds 5 --skip timing ggn

Writes NAME.{csv,json,md,png} (`report.write_results`: the accuracy rows, every summary table, Spearman
against k and time per example, and the diagnosis), NAME_diagnosis.csv (per group, sketch, k, seed),
NAME_ggn_sketch.csv and NAME_timing.csv.

Per-example sketches of the non-factored kinds are projections of exact per-example gradients
computed once (their time per example adds the measured per-example gradient time); `factored`
runs its own hook pass.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
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

from report import write_results  # noqa: E402
from soir.curvature import ggn_quadratic_forms, hvp_quadratic_forms  # noqa: E402
from soir.data import encode, example_losses, pad_id, read_split, split_batches  # noqa: E402
from soir.gradients import mean_gradient, per_example_grads  # noqa: E402
from soir.groups import group_table, parameter_groups  # noqa: E402
from soir.io import atomic_path  # noqa: E402
from soir.models import load_model, load_tokenizer  # noqa: E402
from soir.quantities import mean_form, mean_quantities  # noqa: E402
from soir.ranking import RankSettings, rank, score_table  # noqa: E402
from soir.scores import SCORES, soir_components  # noqa: E402
from soir.sketch import FactoredSketcher, SketchPlan, make_sketch, matrix_modules, param_names  # noqa: E402

KINDS = ("gaussian", "rademacher", "sjlt", "oporp", "factored")
MEAN_SCORES = ("soir", "soir-slope", "cancel")  # scores of the mean gradients (and the curvature) only
THESIS = {"mlp_only_k1024": 0.82, "all_tensors_k1024": 0.01, "target_all_tensors_k1024": 0.95}
TARGET = {"soir_spearman_at_k256": 0.95}


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


def scores_of(score: str, groups, quantities: dict, delta: float, lam: float) -> np.ndarray:
    """Every group's `score` from its quantities, through the ranking's own scoring (`score_table`)."""
    return score_table(group_table(groups), quantities, RankSettings(score=score, delta=delta, lam=lam))["score"].to_numpy()


def rho(exact: np.ndarray, approx: np.ndarray) -> float:
    return float(spearmanr(exact, approx).statistic)


def dots(groups, first: dict, second: dict) -> np.ndarray:
    return np.array([float(first[g.name].double() @ second[g.name].double()) for g in groups])


# ---------------------------------------------------------------- accuracy and diagnosis


def accuracy(model, groups, fb, rb, ks, kinds, seeds, delta, lam, log):
    """(accuracy rows, diagnosis rows, exact pieces): see the module docstring, sections 1 and 2."""
    names = param_names(groups)
    n_r = sum(len(b["input_ids"]) for b in rb)
    log("exact pieces: mean gradients, HVP curvature, per-example retain gradients")
    g_f = mean_gradient(model, fb, names)
    g_r = mean_gradient(model, rb, names)
    start = time.perf_counter()
    c_f = hvp_quadratic_forms(model, fb, groups, g_f)
    c_r = hvp_quadratic_forms(model, rb, groups, g_f)
    hvp_seconds = time.perf_counter() - start
    start = time.perf_counter()
    with torch.no_grad():
        chunks = [per_example_grads(model, b, names) for b in rb]
    # per-example retain gradients with the two mean gradients as two extra rows: one projection
    # call per (sketch, k) generates each dense map once for all of them
    per_example = {n: torch.cat([c[n] for c in chunks] + [g_f[n][None], g_r[n][None]]) for n in names}
    del chunks
    grad_seconds = time.perf_counter() - start

    def split_rows(sketches):  # retain rows, mean forget, mean retain
        return ({n: s[:n_r] for n, s in sketches.items()}, {n: s[n_r] for n, s in sketches.items()},
                {n: s[n_r + 1] for n, s in sketches.items()})

    curvature = {"c_f": c_f, "c_r": c_r}
    exact_retain, exact_f, exact_r = split_rows(SketchPlan(model, groups, "none", 1).project_examples(per_example))
    exact = {"mean_forget": exact_f, "mean_retain": exact_r, "per_example_retain": exact_retain, **curvature}
    reference = {score: scores_of(score, groups, exact, delta, lam) for score in ("soir-datainf", *MEAN_SCORES)}
    a, b, r_sq = dots(groups, exact_f, exact_f), dots(groups, exact_r, exact_f), dots(groups, exact_r, exact_r)
    cos = b / np.sqrt(a * r_sq)
    c_f_arr, c_r_arr = (np.array([c[g.name] for g in groups]) for c in (c_f, c_r))
    soir_of = lambda a_, b_: soir_components(a_, b_, c_f_arr, c_r_arr, delta)["score"]  # noqa: E731
    log(f"  |cos(g_f,S, g_r,S)|: median {np.median(np.abs(cos)):.3f}, {int((np.abs(cos) < 0.1).sum())} of {len(groups)} groups below 0.1")
    rows, diagnosis = [], []
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
                stored = sum(t.numel() * t.element_size() for t in retain.values()) / 2**20
                start = time.perf_counter()
                now = mean_quantities(groups, {"forget": g_f, "retain": g_r}, mean_form(kind, SCORES["soir"].needs), plan)
                means_seconds = time.perf_counter() - start
                before = {"mean_forget": sf, "mean_retain": sr}
                variants = [("soir-datainf", "sketched", {"per_example_retain": retain, "mean_forget": sf}, sketch_seconds)]
                for score in MEAN_SCORES:
                    variants += [(score, "exact", {**now, **curvature}, None), (score, "sketched", {**before, **curvature}, None)]
                approximate = {}
                for score, means, quantities, seconds in variants:
                    approx = approximate[score, means] = scores_of(score, groups, quantities, delta, lam)
                    rows.append({
                        "score": score, "means": means, "sketch": kind, "k": k, "seed": seed,
                        "spearman": rho(reference[score], approx),
                        "top10_overlap": overlap(reference[score], approx, SCORES[score].lower_is_better),
                        "ms_per_example": np.nan if seconds is None else 1e3 * seconds / n_r,
                        "peak_rss_mb": memory.mb if seconds is not None else np.nan,
                        "sketch_mb": stored if seconds is not None else np.nan,
                        "means_seconds": means_seconds if means == "exact" else np.nan,
                    })
                a_s, b_s = dots(groups, sf, sf), dots(groups, sr, sf)
                attribution = {"soir_a_sketched": rho(reference["soir"], soir_of(a_s, b)),
                               "soir_b_sketched": rho(reference["soir"], soir_of(a, b_s)),
                               "soir_both_sketched": rho(reference["soir"], soir_of(a_s, b_s))}
                diagnosis += [{"sketch": kind, "k": k, "seed": seed, "group": g.name, "cos": cos[i], "a": a[i], "b": b[i],
                               "a_sketch": a_s[i], "b_sketch": b_s[i], "soir": reference["soir"][i],
                               "soir_sketch": approximate["soir", "sketched"][i], "datainf": reference["soir-datainf"][i],
                               "datainf_sketch": approximate["soir-datainf", "sketched"][i], **attribution} for i, g in enumerate(groups)]
                last = {r["score"] + "/" + r["means"]: r["spearman"] for r in rows[-len(variants):]}
                log(f"  {kind:10s} k={k:5d} seed={seed}: soir ρ={last['soir/exact']:.3f} (sketched means {last['soir/sketched']:.3f}: "
                    f"a alone {attribution['soir_a_sketched']:.3f}, b alone {attribution['soir_b_sketched']:.3f})  "
                    f"datainf ρ={last['soir-datainf/sketched']:.3f}  {rows[-len(variants)]['ms_per_example']:.1f} ms/example")
    exact_info = {"hvp_seconds": hvp_seconds, "per_example_grad_seconds": grad_seconds, "n_retain": n_r,
                  "median_abs_cos": float(np.median(np.abs(cos))), "groups_abs_cos_below_0.1": int((np.abs(cos) < 0.1).sum()),
                  "median_neighbour_gap": {score: neighbour_gap(reference[score]) for score in reference}}
    pieces = {"g_f": g_f, "exact_means": {"mean_forget": exact_f, "mean_retain": exact_r}, "reference_soir": reference["soir"]}
    return pd.DataFrame(rows), pd.DataFrame(diagnosis), exact_info, pieces


def neighbour_gap(scores: np.ndarray) -> float:
    """Median over neighbours in the exact order of (s_i+1 − s_i) / max(|s_i|, |s_i+1|) (finite scores): a
    relative error of a score of about this size swaps it with its neighbour."""
    s = np.sort(scores[np.isfinite(scores)])
    return float(np.median(np.diff(s) / np.maximum(np.abs(s[1:]), np.abs(s[:-1]))))


def squared_relative_error(approx: pd.Series, exact: pd.Series) -> pd.Series:
    """The squared relative error ((approx − exact) / |exact|)²: its mean over seeds, square-rooted, is the RMS."""
    return ((approx - exact) / exact.abs()).pow(2)


def root_mean(squares: pd.Series) -> float:
    return float(np.sqrt(squares.mean()))


def diagnose(diagnosis: pd.DataFrame) -> pd.DataFrame:
    """Per (sketch, k): how large the errors of the sketched a and b are against what a JL map predicts,
    how often b changes sign, and the soir ranking with only a or only b sketched (means over seeds)."""
    finite = np.isfinite(diagnosis.soir) & np.isfinite(diagnosis.soir_sketch)
    d = diagnosis.assign(sq_a=squared_relative_error(diagnosis.a_sketch, diagnosis.a), sq_b=squared_relative_error(diagnosis.b_sketch, diagnosis.b),
                         sq_soir=squared_relative_error(diagnosis.soir_sketch, diagnosis.soir).where(finite),
                         sq_datainf=squared_relative_error(diagnosis.datainf_sketch, diagnosis.datainf),
                         flipped=np.sign(diagnosis.b_sketch) != np.sign(diagnosis.b))
    per_group = d.groupby(["sketch", "k", "group"]).agg(cos=("cos", "first"), rms_a=("sq_a", root_mean), rms_b=("sq_b", root_mean),
                                                         rms_soir=("sq_soir", root_mean), rms_datainf=("sq_datainf", root_mean),
                                                         flipped=("flipped", "mean")).reset_index()
    per_group["predicted_a"] = np.sqrt(2 / per_group.k)
    per_group["predicted_b"] = np.sqrt((1 + per_group.cos**2) / per_group.k) / per_group.cos.abs()
    table = per_group.groupby(["sketch", "k"]).agg(
        median_abs_cos=("cos", lambda c: np.median(np.abs(c))),
        rms_rel_error_a=("rms_a", "median"), jl_predicts_a=("predicted_a", "median"),
        rms_rel_error_b=("rms_b", "median"), jl_predicts_b=("predicted_b", "median"),
        b_sign_flips=("flipped", "mean"), rms_rel_error_soir=("rms_soir", "median"), rms_rel_error_datainf=("rms_datainf", "median"))
    ranks = diagnosis.drop_duplicates(["sketch", "k", "seed"]).groupby(["sketch", "k"])[
        ["soir_a_sketched", "soir_b_sketched", "soir_both_sketched"]].mean()
    return table.join(ranks)


# ---------------------------------------------------------------- ggn with sketches


def ggn_sketch_error(model, groups, fb, rb, pieces, ks, kinds, seeds, delta, lam, log) -> pd.DataFrame:
    """c_f, c_r of ggn with each sketch against ggn without (same seed, so the same sampled labels), per group,
    and the soir ranking with them (a, b exact) against the one with exact ggn terms."""
    rows = []
    for seed in range(seeds):
        start = time.perf_counter()
        exact = [ggn_quadratic_forms(model, batches, groups, pieces["g_f"], sketch="none", seed=seed) for batches in (fb, rb)]
        exact_seconds = time.perf_counter() - start
        reference = scores_of("soir", groups, {**pieces["exact_means"], "c_f": exact[0], "c_r": exact[1]}, delta, lam)
        for kind in kinds:
            for k in ks:
                start = time.perf_counter()
                sketched = [ggn_quadratic_forms(model, batches, groups, pieces["g_f"], sketch=kind, k=k, seed=seed) for batches in (fb, rb)]
                seconds = time.perf_counter() - start
                scores = scores_of("soir", groups, {**pieces["exact_means"], "c_f": sketched[0], "c_r": sketched[1]}, delta, lam)
                spearman = rho(reference, scores)
                rows += [{"sketch": kind, "k": k, "seed": seed, "group": g.name, "c_f": exact[0][g.name], "c_f_sketch": sketched[0][g.name],
                          "c_r": exact[1][g.name], "c_r_sketch": sketched[1][g.name], "soir_spearman": spearman,
                          "soir_spearman_to_hvp": rho(pieces["reference_soir"], scores), "seconds": seconds, "exact_seconds": exact_seconds}
                         for g in groups]
                log(f"  ggn {kind:10s} k={k:5d} seed={seed}: soir ρ to ggn without sketch {spearman:.3f}, {seconds:.1f} s ({exact_seconds:.1f} s without)")
    return pd.DataFrame(rows)


def ggn_sketch_summary(rows: pd.DataFrame) -> pd.DataFrame:
    """Per (sketch, k): median over groups of the RMS relative errors of c_f, c_r over seeds, how often c_r
    changes sign, and the soir rankings' agreement (means over seeds)."""
    d = rows.assign(sq_f=squared_relative_error(rows.c_f_sketch, rows.c_f), sq_r=squared_relative_error(rows.c_r_sketch, rows.c_r),
                    flip_r=np.sign(rows.c_r_sketch) != np.sign(rows.c_r))
    per_group = d.groupby(["sketch", "k", "group"]).agg(rms_f=("sq_f", root_mean), rms_r=("sq_r", root_mean), flip_r=("flip_r", "mean"))
    table = per_group.groupby(["sketch", "k"]).agg(rms_rel_error_c_f=("rms_f", "median"), rms_rel_error_c_r=("rms_r", "median"),
                                                   c_r_sign_flips=("flip_r", "mean"))
    ranks = rows.drop_duplicates(["sketch", "k", "seed"]).groupby(["sketch", "k"]).agg(
        soir_spearman_mean=("soir_spearman", "mean"), soir_spearman_min=("soir_spearman", "min"),
        soir_spearman_to_hvp=("soir_spearman_to_hvp", "mean"), seconds=("seconds", "median"), seconds_without_sketch=("exact_seconds", "median"))
    return table.join(ranks)


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


def plot(table: pd.DataFrame, diagnosis: pd.DataFrame, path: Path, title: str):
    """soir against k (exact means now, sketched means before), soir-datainf against k and time per
    example, and the relative error of the sketched b against |cos(g_f,S, g_r,S)| with the JL prediction."""
    from analysis.plots import new_figure, save_figure

    fig, axes = new_figure((12, 9), 2, nrows=2)
    summary = (table.groupby(["score", "means", "sketch", "k"])[["spearman", "ms_per_example"]]
               .agg({"spearman": ["mean", "min", "max"], "ms_per_example": "median"}).reset_index())
    summary.columns = ["score", "means", "sketch", "k", "mean", "min", "max", "ms"]
    panels = ((axes[0][0], "soir", "k"), (axes[0][1], "soir-datainf", "k"), (axes[1][0], "soir-datainf", "ms"))
    for ax, score, x in panels:
        for n, kind in enumerate(KINDS):
            for means, style in (("exact", "-"), ("sketched", "--" if score == "soir" else "-")):
                rows = summary[(summary.score == score) & (summary.sketch == kind) & (summary.means == means)]
                if rows.empty:
                    continue
                label = kind if score != "soir" else f"{kind}, {'exact means (now)' if means == 'exact' else 'sketched means (before)'}"
                ax.plot(rows[x], rows["mean"], style, marker="o", color=f"C{n}", label=label)
                ax.fill_between(rows[x], rows["min"], rows["max"], color=f"C{n}", alpha=0.15)
        ax.axhline(0.95, color="k", ls=":", lw=0.8, label="target 0.95")
        ax.set_xscale("log", base=2 if x == "k" else 10)
        ax.set_xlabel("k per group" if x == "k" else "sketching time per retain example (ms, log)")
        ax.set_ylabel("Spearman ρ to the exact ranking (mean, min–max over seeds)")
        ax.set_title(f"{score}, {title}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    ax = axes[1][1]
    if not diagnosis.empty:
        d = diagnosis.assign(sq=squared_relative_error(diagnosis.b_sketch, diagnosis.b))
        for n, (k, rows) in enumerate(d[d.sketch == d.sketch.iloc[0]].groupby("k")):
            per_group = rows.groupby("group").agg(cos=("cos", "first"), rms=("sq", root_mean))
            ax.scatter(per_group.cos.abs(), per_group.rms, s=10, color=f"C{n}", label=f"k = {k}")
            grid = np.geomspace(max(per_group.cos.abs().min(), 1e-4), 1, 50)
            ax.plot(grid, np.sqrt((1 + grid**2) / k) / grid, color=f"C{n}", lw=0.8)
        ax.axhline(1, color="k", ls=":", lw=0.8)
        ax.set(xscale="log", yscale="log", xlabel="|cos(g_f,S, g_r,S)| per group",
               ylabel="RMS over seeds of (b_sketch − b) / |b|",
               title=f"sketched b = g_r,Sᵀg_f,S ({d.sketch.iloc[0]}); lines: JL prediction √((1+cos²)/k)/|cos|")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, path, dpi=120)


def by_score(table: pd.DataFrame, values: str, aggfunc: str) -> pd.DataFrame:
    """(sketch, k) × "score (means)" of the accuracy rows."""
    return table.assign(column=table.score + " (" + table["means"] + " means)").pivot_table(
        index=["sketch", "k"], columns="column", values=values, aggfunc=aggfunc)


def write_csv(path: Path, frame: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def load(args):
    """(model, tokenizer, model description): a saved model, or `random:HxL` built as benchmarks/scale.py builds it."""
    data = Path(args.data)
    tok_dir = data / "tokenizer" if (data / "tokenizer").is_dir() else Path(args.model)
    tokenizer = load_tokenizer(tok_dir)
    if not args.model.startswith("random:"):
        return load_model(args.model, tokenizer, eager_attention=True, dtype="float32").eval(), tokenizer
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from scale import build_model

    with tempfile.TemporaryDirectory() as tmp:
        build_model(data, args.model.split(":", 1)[1], Path(tmp) / "model")
        return load_model(Path(tmp) / "model", tokenizer, eager_attention=True, dtype="float32").eval(), tokenizer


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="/tmp/demo-default/finetuned", help="a saved model, or random:HIDDENxLAYERS (e.g. random:256x16)")
    p.add_argument("--data", default="/tmp/demo-default/data")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--name", default="compression", help="file name prefix of the results (default: %(default)s)")
    p.add_argument("--ks", type=int, nargs="+", default=[2**e for e in range(6, 13)], help="k per group (default: 64 … 4096)")
    p.add_argument("--sketches", nargs="+", default=list(KINDS), choices=list(KINDS))
    p.add_argument("--seeds", type=int, default=5, help="sketch seeds per (sketch, k) (default: %(default)s)")
    p.add_argument("--ggn-ks", type=int, nargs="+", default=[64, 256, 1024], help="k per group of the ggn-sketch section")
    p.add_argument("--ggn-sketches", nargs="+", default=["sjlt", "factored"], choices=list(KINDS))
    p.add_argument("--max-examples", type=int, help="rows per split (default: all)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--delta", type=float, default=1.0)
    p.add_argument("--lam", type=float, default=0.1)
    p.add_argument("--timing-k", type=int, default=1024, help="k per weight in the timing section (default: 1024 = 32×32)")
    p.add_argument("--reps", type=int, default=5, help="repetitions of each timed path (median)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--skip", nargs="*", default=[], choices=["accuracy", "ggn-sketch", "timing", "ggn"], help="sections to skip")
    args = p.parse_args(argv)
    if "accuracy" in args.skip and "ggn-sketch" not in args.skip:
        p.error("the ggn-sketch section uses the accuracy section's exact pieces: skip both or neither")
    if args.threads:
        torch.set_num_threads(args.threads)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    started = time.perf_counter()

    data = Path(args.data)
    model, tokenizer = load(args)
    forget = encode(read_split(data / "forget.parquet"), tokenizer)
    retain = encode(read_split(data / "retain.parquet"), tokenizer)
    pad = pad_id(tokenizer)
    fb = split_batches(forget, pad, args.batch_size, args.max_examples, 0)
    rb = split_batches(retain, pad, args.batch_size, args.max_examples, 1)
    groups = parameter_groups(model, "tensor")
    meta = {"model": args.model, "data": str(data), "groups": len(groups), "n_params": sum(g.n_params for g in groups),
            "threads": torch.get_num_threads(), "device": "cpu", "thesis": THESIS, "target": TARGET, "settings": vars(args)}
    log(f"{len(groups)} tensor groups, {meta['n_params']:,} parameters; forget {len(forget)}, retain {len(retain)} rows; "
        f"{torch.get_num_threads()} threads")
    out = Path(args.out)
    table, diagnosis, tables = pd.DataFrame(), pd.DataFrame(), {}
    if "accuracy" not in args.skip:
        table, diagnosis, meta["exact"], pieces = accuracy(model, groups, fb, rb, args.ks, args.sketches, args.seeds, args.delta, args.lam, log)
        mean = by_score(table, "spearman", "mean")
        tables["Spearman ρ to the exact ranking (mean over seeds)"] = mean
        tables["Spearman ρ to the exact ranking (min over seeds)"] = by_score(table, "spearman", "min")
        tables["top-10% overlap with the exact ranking (mean over seeds)"] = by_score(table, "top10_overlap", "mean")
        tables["Where sketched means lose the ranking: errors of a = |g_f,S|² and b = g_r,Sᵀg_f,S, soir with one of them sketched"] = diagnose(diagnosis)
        write_csv(out / f"{args.name}_diagnosis.csv", diagnosis)
        for k in (256, 1024):
            if k in args.ks:
                meta[f"spearman_at_k{k}"] = mean.xs(k, level="k").to_dict()
        log("\n" + mean.to_string(float_format=lambda x: f"{x:.3f}"))
        log("\n" + next(reversed(tables.values())).to_string(float_format=lambda x: f"{x:.3g}"))
    if "ggn-sketch" not in args.skip:
        log("\nggn with sketches against ggn without (same labels):")
        ggn_rows = ggn_sketch_error(model, groups, fb, rb, pieces, args.ggn_ks, args.ggn_sketches, args.seeds, args.delta, args.lam, log)
        write_csv(out / f"{args.name}_ggn_sketch.csv", ggn_rows)
        tables["ggn with sketches: errors of c_f, c_r against ggn without, and soir (a, b exact) against soir with exact ggn terms"] = (
            ggn_sketch_summary(ggn_rows))
        log(next(reversed(tables.values())).to_string(float_format=lambda x: f"{x:.3g}"))
    if "timing" not in args.skip:
        log("\ntiming on one batch (median):")
        ttable, meta["timing"] = timing(model, rb[len(rb) // 2], args.timing_k, args.reps, log)
        write_csv(out / f"{args.name}_timing.csv", ttable)
        tables["timing on one batch (median seconds)"] = ttable.set_index("path")
        log(f"factored / plain = {meta['timing']['factored_over_plain']:.2f}× (target ≤ 1.25); "
            f"vmap+dense / factored = {meta['timing']['dense_over_factored']:.1f}× (target ≥ 20)")
    if "ggn" not in args.skip:
        log("\nggn vs exact HVP curvature (soir rankings):")
        meta["ggn_vs_hvp"] = ggn_agreement(model, forget, retain, pad, args.batch_size, args.max_examples, log)
        tables["ggn against exact HVP curvature (soir rankings)"] = pd.DataFrame(
            {k: v for k, v in meta["ggn_vs_hvp"].items() if isinstance(v, dict)}).T
    notes = ("`means = exact`: `soir rank --sketch X` now (the mean gradients are exact; only per-example gradients are "
             "sketched). `means = sketched`: a_S and b_S from sketches of the mean gradients, as before sketch format 2. "
             "c_f, c_r are exact HVPs in both.")
    figure = (lambda path: plot(table, diagnosis, path, f"{len(groups)} tensor groups")) if not table.empty else None
    paths = write_results(out, args.name, table, meta, started=started, tables=tables, figure=figure, notes=notes)
    log("\nwrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
