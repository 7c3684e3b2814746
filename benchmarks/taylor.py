"""Which ranking predicts what masked unlearning of one group really costs, on subjects it never saw?

On each testbed (a `soir demo` output) the subjects (people, stories, documents: ids share a
5-character prefix) of the forget and the retain split are halved (`halve_by_subject`): a
*fitted* half and a *held-out* half, no subject in both.

- **Rankings** read the finetuned model and the fitted half's rows only (forget and retain):
  `soir` with exact HVP curvature and with Gauss–Newton, `soir-slope` (b/a: `soir`'s first-order
  model, whose R = Δ·b/a orders the groups the same way), `soir-line`, `revert` and `shift` (from
  the pretrained base), `cancel`, `soir-datainf`, `grad-magnitude`, `fo-influence`, `fisher`,
  `wagle`, `random` (`--random-draws` seeded draws) and, for reference, group size (largest
  first; not a registered score).
- **The truth** per tensor group S: masked GradDiff on S alone (`Mask.from_names` of the group's
  parameters), from the finetuned model, trained on *all forget rows* and the *fitted-half retain
  rows*; the held-out retain subjects are never used by ranking or unlearning. Its learning rate
  is searched (`analysis.matching.find_operating_point`, ≤ `--max-runs` runs, AdamW, `--steps`
  steps) until the teacher-forced answer accuracy on the held-out forget subjects is within
  ±`--tol` of the retain-only oracle's there (the forgetting an exact unlearner reaches). The
  truth is what that run did to the held-out retain subjects: the drop in their teacher-forced
  answer accuracy (primary) and the rise in their answer loss. With `--seeds` > 1 every GradDiff
  batch-order seed is searched on its own and the truth is the mean over seeds; how well the seeds
  agree with each other is the ceiling a ranking can reach. A group whose search cannot reach the
  target (for any seed) is *unreachable*: it has no truth, is left out of the correlations and is
  reported apart, with the position each ranking gives it.
- **Statistics**: per testbed, Spearman between each ranking's positions and the truth over the
  reachable groups; the mean over testbeds with a bootstrap 95% interval (groups resampled within
  each testbed; for `random` a draw is resampled too).

A separate section keeps the check of `soir`'s quadratic model: the step it assumes,
δ_S = η_S g_f,S with η_S chosen so the predicted forget gain is `--delta`, is applied for real
and its forget gain and retain damage (answer-loss changes) are measured on the fitted and the
held-out rows, for hvp, ggn and first order (η = Δ/a).

    .venv/bin/python benchmarks/taylor.py --testbeds beds/default-s0 beds/default-s1 beds/default-s2

On few cores split the work over processes with `--shard I/N` (`--parts` each: the rankings of
every N-th testbed, every N-th (seed, testbed, group) search) and join them with `--merge DIR ...`. Writes taylor.{csv,json,md,png} (csv: one row per
testbed × group, its truth and every ranking's position and score), taylor_searches.csv (every
search: seed, the runs it took as [rate, held-out forget accuracy], the chosen run's numbers) and
taylor_quadratic.csv.
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
from scipy.stats import rankdata

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analysis.matching import find_operating_point  # noqa: E402
from localization import halve_by_subject, subject_of  # noqa: E402
from report import command_line, write_results  # noqa: E402
from soir.curvature import group_direction, split_loss  # noqa: E402
from soir.data import answer_accuracy, encode, example_losses, split_batches, teacher_forced  # noqa: E402
from soir.gradients import mean_gradient  # noqa: E402
from soir.io import atomic_path  # noqa: E402
from soir.groups import parameter_groups  # noqa: E402
from soir.linesearch import loss_along  # noqa: E402
from soir.mask import Mask  # noqa: E402
from soir.ranking import RankSettings, rank  # noqa: E402
from testbed_runs import Testbed  # noqa: E402

# label -> the `rank` settings it runs with; "size" is a reference, not a registered score
RANKINGS = {
    "soir (hvp)": {"score": "soir", "curvature": "hvp"},
    "soir (ggn)": {"score": "soir", "curvature": "ggn"},
    "soir-slope (first order)": {"score": "soir-slope"},
    "soir-line": {"score": "soir-line"},
    "revert": {"score": "revert"},
    "shift": {"score": "shift"},
    "cancel": {"score": "cancel"},
    "soir-datainf": {"score": "soir-datainf"},
    "grad-magnitude": {"score": "grad-magnitude"},
    "fo-influence": {"score": "fo-influence"},
    "fisher": {"score": "fisher"},
    "wagle": {"score": "wagle"},
    "random": {"score": "random"},
}
SIZE = "size (largest first)"
TRUTHS = {"retain_accuracy_drop": "held-out retain accuracy drop", "retain_loss_rise": "held-out retain loss rise (nats)"}
PRIMARY = "retain_accuracy_drop"


# ---------------------------------------------------------------- one testbed


class Halves:
    """A testbed's subject halves, encoded, and the finetuned model's numbers on them."""

    def __init__(self, bed: Testbed):
        forget, retain = (halve_by_subject(bed.frames[s]) for s in ("forget", "retain"))
        self.fitted = {"forget": forget["val"], "retain": retain["val"]}
        self.held = {"forget": forget["test"], "retain": retain["test"]}
        self.encoded = {f"{where}_{s}": encode(frames[s], bed.tokenizer)
                        for where, frames in (("fitted", self.fitted), ("held", self.held)) for s in ("forget", "retain")}
        self.sets = {k: self.encoded[k] for k in ("held_forget", "held_retain")}


def measured(bed: Testbed, model, sets) -> dict[str, float]:
    """Teacher-forced answer accuracy and mean answer loss on each set."""
    out = {}
    for name, enc in sets.items():
        table = teacher_forced(model, enc, bed.pad)
        out[f"{name}_accuracy"] = answer_accuracy(table)
        out[f"{name}_loss"] = float(table["loss"].mean())
    return out


def rankings(bed: Testbed, halves: Halves, args) -> tuple[pd.DataFrame, dict]:
    """Every ranking of the finetuned model's tensor groups from the fitted rows: one row per group × ranking × draw."""
    model, base = bed.model("finetuned", eager=True), bed.model("base")
    rows, seconds = [], {}
    for label, settings in RANKINGS.items():
        draws = range(args.random_draws) if settings["score"] == "random" else [0]
        t = time.perf_counter()
        for draw in draws:
            ranking = rank(model, halves.encoded["fitted_forget"], halves.encoded["fitted_retain"], bed.pad,
                           RankSettings(**settings, seed=draw, delta=args.delta, batch_size=32), base_model=base, progress=False)
            own = [c for c in ("eta", "forget_gain", "retain_damage") if c in ranking.table]  # soir's and soir-line's step
            for r in ranking.table.to_dict("records"):
                rows.append({"ranking": label, "draw": draw, "group": r["group"], "n_params": r["n_params"], "score": r["score"],
                             "position": r["rank"], **{c: r[c] for c in own}})
        seconds[label] = round((time.perf_counter() - t) / len(draws), 2)
        print(f"  ranked by {label} ({seconds[label]} s a draw)", flush=True)
    table = pd.DataFrame(rows)
    sizes = table[(table.ranking == "random") & (table.draw == 0)].copy()  # any ranking's group list
    sizes["ranking"], sizes["score"] = SIZE, sizes["n_params"].astype(float)
    sizes["position"] = sizes["n_params"].rank(ascending=False, method="first").astype(int)
    return pd.concat([table, sizes], ignore_index=True), seconds


def truth(bed: Testbed, halves: Halves, names: list[str], seed: int, finetuned: dict, target: float, args) -> dict:
    """Masked GradDiff on the parameters `names` alone at the rate where held-out forget reaches `target`; its held-out retain damage."""
    mask = Mask.from_names(bed.model("finetuned"), names)

    def attempt(lr: float):
        model = bed.unlearn("finetuned", mask, "graddiff", lr, args.steps, seed, retain=halves.fitted["retain"])
        numbers = measured(bed, model, halves.sets)
        return numbers["held_forget_accuracy"], numbers

    t = time.perf_counter()
    point = find_operating_point(attempt, target, args.lr_range[0], args.lr_range[1], tol=args.tol, max_runs=args.max_runs)
    after = point.result
    return {"reached": point.reached, "lr": point.lr, "runs": point.n_runs, "why_not": point.reason,
            "search": json.dumps([[float(f"{r:.4g}"), round(v, 4)] for r, v in point.runs]),
            "heldout_forget_accuracy": after["held_forget_accuracy"],
            "retain_accuracy_drop": finetuned["held_retain_accuracy"] - after["held_retain_accuracy"],
            "retain_loss_rise": after["held_retain_loss"] - finetuned["held_retain_loss"],
            "search_seconds": round(time.perf_counter() - t, 1)}


@torch.no_grad()
def quadratic_check(bed: Testbed, halves: Halves, ranked: pd.DataFrame, args) -> pd.DataFrame:
    """soir's own step per group and curvature model, applied for real: predicted against measured
    forget gain and retain damage (mean answer-loss changes) on the fitted and the held-out rows."""
    model = bed.model("finetuned", eager=True).eval()
    groups = parameter_groups(model, "tensor")
    named = dict(model.named_parameters())
    batches = {k: split_batches(enc, bed.pad, 32) for k, enc in halves.encoded.items()}
    with torch.enable_grad():
        g_f = mean_gradient(model, batches["fitted_forget"], list(named))
    before = {k: float(split_loss(model, b)) for k, b in batches.items()}
    rows = []
    for method, label in (("hvp", "soir (hvp)"), ("ggn", "soir (ggn)"), ("first-order", None)):
        for g in groups:
            v = group_direction(g, g_f, named)
            if label is None:  # first order: η = Δ / a, F = Δ, R = η b
                a = float(sum((x.double() ** 2).sum() for x in v.values()))
                slope = float(ranked[(ranked.ranking == "soir-slope (first order)") & (ranked.group == g.name)]["score"].iloc[0])
                eta, gain, damage = args.delta / a, args.delta, args.delta * slope
            else:
                part = ranked[(ranked.ranking == label) & (ranked.group == g.name)]
                eta, gain, damage = (float(part[c].iloc[0]) for c in ("eta", "forget_gain", "retain_damage"))
            row = {"method": method, "group": g.name, "eta": eta, "predicted_forget_gain": gain, "predicted_retain_damage": damage}
            if math.isfinite(eta):
                for where in ("fitted", "held"):
                    for split, what in (("forget", "forget_gain"), ("retain", "retain_damage")):
                        key = f"{where}_{split}"
                        row[f"measured_{what}_{where}"] = loss_along(model, v, eta, batches[key], example_losses) - before[key]
            rows.append(row)
    return pd.DataFrame(rows)


class Site:
    """One testbed: its halves, groups, and the finetuned and retain-only models' numbers on the held-out halves."""

    def __init__(self, path: Path):
        self.bed = Testbed(path)
        self.tag = self.bed.path.name
        self.halves = Halves(self.bed)
        self.groups = parameter_groups(self.bed.model("finetuned"), "tensor")
        self.finetuned = measured(self.bed, self.bed.model("finetuned"), self.halves.sets)
        self.oracle = measured(self.bed, self.bed.model("oracle"), self.halves.sets)
        self.target = self.oracle["held_forget_accuracy"]
        h = self.halves
        self.info = {"testbed": str(path), "target": self.target, "finetuned": self.finetuned, "oracle": self.oracle,
                     "rows": {k: len(v) for k, v in h.encoded.items()},
                     "subjects": {f"{w}_{s}": subject_of(f[s]["id"]).nunique() for w, f in (("fitted", h.fitted), ("held", h.held)) for s in ("forget", "retain")}}
        print(f"{self.tag}: {len(self.groups)} groups; {self.info}", flush=True)

    def rank_and_check(self, args, parts: Path) -> None:
        """Every ranking and the quadratic check, written to `parts`."""
        started = time.perf_counter()
        ranked, self.info["rank_seconds"] = rankings(self.bed, self.halves, args)
        self.info["rankings_seconds"] = round(time.perf_counter() - started, 1)
        ranked.insert(0, "testbed", self.tag)
        ranked.to_csv(parts / f"rankings_{self.tag}.csv", index=False)
        t = time.perf_counter()
        quadratic_check(self.bed, self.halves, ranked, args).assign(testbed=self.tag).to_csv(parts / f"quadratic_{self.tag}.csv", index=False)
        self.info["quadratic_seconds"] = round(time.perf_counter() - t, 1)
        (parts / f"testbed_{self.tag}.json").write_text(json.dumps(self.info, indent=2) + "\n")


def run(args, parts: Path) -> None:
    """This process's share: the rankings of every `count`-th testbed and every `count`-th (seed, testbed, group) search."""
    index, count = (int(x) for x in args.shard.split("/"))
    sites = [Site(Path(p)) for p in args.testbeds]
    for i, site in enumerate(sites):
        if i % count == index:
            site.rank_and_check(args, parts)
    searches = [(seed, site, g) for seed in range(args.seeds) for site in sites for g in site.groups][index::count]
    rows = []
    for seed, site, g in searches:
        row = {"testbed": site.tag, "seed": seed, "group": g.name, "n_params": g.n_params, "target": site.target,
               **truth(site.bed, site.halves, list(g.param_names), seed, site.finetuned, site.target, args)}
        rows.append(row)
        pd.DataFrame(rows).to_csv(parts / "truth.csv", index=False)  # what is done so far survives an interruption
        print(f"  {site.tag} seed {seed} {g.name}: {'reached' if row['reached'] else 'UNREACHABLE'} at lr {row['lr']:.3g} in "
              f"{row['runs']} runs ({row['search_seconds']} s): held-out forget {row['heldout_forget_accuracy']:.3f}, retain accuracy "
              f"drop {row['retain_accuracy_drop']:.4f}, retain loss rise {row['retain_loss_rise']:.4f}", flush=True)


# ---------------------------------------------------------------- statistics


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's ρ (Pearson on average ranks, as `scipy.stats.spearmanr`); NaN when either side is constant."""
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(np.corrcoef(rankdata(x), rankdata(y))[0, 1])


def spearman_with_interval(positions: list[np.ndarray], truths: list[np.ndarray], draws: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean over testbeds of Spearman(position, truth) and its bootstrap 95% interval.

    `positions[t]` is (n_draws, n_groups) of testbed t (several rows for `random`), `truths[t]` (n_groups,);
    each replicate resamples the groups of every testbed (and one draw per testbed)."""
    point = float(np.mean([np.nanmean([spearman(p, y) for p in ps]) for ps, y in zip(positions, truths)]))
    rng = np.random.default_rng(seed)
    replicates = []
    for _ in range(draws):
        values = []
        for ps, y in zip(positions, truths):
            pick = rng.integers(0, len(y), len(y))
            values.append(spearman(ps[rng.integers(0, len(ps))][pick], y[pick]))
        replicates.append(np.nanmean(values) if not np.all(np.isnan(values)) else math.nan)
    lo, hi = np.nanpercentile(replicates, [2.5, 97.5])
    return point, float(lo), float(hi)


def miss(why_not: str) -> str:
    """Why a search missed: the target lies beyond every rate tried, or it was bracketed but not hit within ±tol in the runs allowed."""
    if not why_not:
        return ""
    return "beyond the rates tried" if "even at the" in why_not else "bracketed, not within tol"


def truth_seeds(searches: pd.DataFrame) -> list[int]:
    """The unlearning seeds searched on every testbed × group: the truth is theirs (a seed run on some testbeds only counts
    for the seeds' agreement)."""
    cells = searches[["testbed", "group"]].drop_duplicates()
    return sorted(seed for seed, part in searches.groupby("seed") if len(part[["testbed", "group"]].drop_duplicates()) == len(cells))


def per_group(searches: pd.DataFrame) -> pd.DataFrame:
    """One row per testbed × group from the `truth_seeds`: reachable when every one of their searches reached the target; the
    truth is the mean over them."""
    searches = searches[searches["seed"].isin(truth_seeds(searches))]
    rows = []
    for (tb, group), part in searches.groupby(["testbed", "group"], sort=False):
        reached = bool(part["reached"].all())
        failed = part[~part["reached"]]
        rows.append({"testbed": tb, "group": group, "n_params": int(part["n_params"].iloc[0]), "target": part["target"].iloc[0],
                     "reached": reached, "seeds_reached": f"{int(part['reached'].sum())}/{len(part)}", "runs": int(part["runs"].sum()),
                     "lr": float(np.exp(np.log(part["lr"]).mean())), "heldout_forget_accuracy": part["heldout_forget_accuracy"].mean(),
                     **{t: part[t].mean() for t in TRUTHS}, "why_not": "" if reached else failed["why_not"].iloc[0],
                     "miss": "" if reached else miss(failed["why_not"].iloc[0])})
    return pd.DataFrame(rows)


def reliability(searches: pd.DataFrame) -> pd.DataFrame:
    """How well the truth agrees with itself: Spearman of each seed's damage against seed 0's, per testbed, over the groups both reached."""
    rows = []
    for (tb, seed), part in searches[searches.seed > 0].groupby(["testbed", "seed"]):
        first = searches[(searches.testbed == tb) & (searches.seed == 0)]
        both = part.merge(first, on="group", suffixes=("", "_0"))
        both = both[both["reached"] & both["reached_0"]]
        rows.append({"testbed": tb, "seed": seed, "groups": len(both),
                     **{f"Spearman to seed 0 ({TRUTHS[t]})": spearman(both[t].to_numpy(), both[f"{t}_0"].to_numpy()) for t in TRUTHS}})
    return pd.DataFrame(rows).set_index(["testbed", "seed"]) if rows else pd.DataFrame()


def summarize(table: pd.DataFrame, searches: pd.DataFrame, ranked: pd.DataFrame, quadratic: pd.DataFrame, meta: dict) -> dict[str, pd.DataFrame]:
    """`table` is `per_group(searches)`."""
    out = {}
    testbeds = list(dict.fromkeys(table["testbed"]))
    reachable = table[table["reached"]]
    rows = []
    for label in [*RANKINGS, SIZE]:
        mine = ranked[ranked.ranking == label]
        row = {"ranking": label}
        for column, title in TRUTHS.items():
            positions, truths = [], []
            for tb in testbeds:
                ok = reachable[reachable.testbed == tb].set_index("group")
                grid = mine[mine.testbed == tb].pivot_table(index="draw", columns="group", values="position")[ok.index]
                positions.append(grid.to_numpy(float))
                truths.append(ok[column].to_numpy(float))
            point, lo, hi = spearman_with_interval(positions, truths)
            row[f"Spearman to {title}"] = f"{point:.2f} [{lo:.2f}, {hi:.2f}]"
            if len(testbeds) > 1:
                row[f"per testbed ({column})"] = " / ".join(
                    f"{np.nanmean([spearman(p, y) for p in ps]):.2f}" for ps, y in zip(positions, truths))
        # where the ranking puts the groups that cannot reach the target: 0 = first, 1 = last
        unreachable = table[~table["reached"]]
        if len(unreachable):
            first = mine[mine.draw == 0].set_index(["testbed", "group"])["position"]
            n = mine[mine.draw == 0].groupby("testbed")["position"].max()
            place = [(first[(tb, g)] - 1) / (n[tb] - 1) for tb, g in zip(unreachable.testbed, unreachable.group)]
            row["unreachable: mean place (0 first, 1 last)"] = f"{np.mean(place):.2f}"
            row["unreachable in its top half"] = f"{sum(p < 0.5 for p in place)}/{len(place)}"
        rows.append(row)
    out["Each ranking against the truth (Spearman of position against damage over the reachable groups; mean over testbeds "
        "[bootstrap 95% interval]; positive = the ranking puts the groups that cost least first)"] = pd.DataFrame(rows).set_index("ranking")
    kinds = searches.assign(beyond=searches["why_not"].fillna("").map(miss) == "beyond the rates tried",
                            bracketed=searches["why_not"].fillna("").map(miss) == "bracketed, not within tol")
    counts = kinds.groupby(["testbed", "seed"]).agg(groups=("group", "size"), reached=("reached", "sum"),
                                                    **{"missed: beyond the rates tried": ("beyond", "sum"),
                                                       "missed: bracketed, not within tol": ("bracketed", "sum")},
                                                    runs=("runs", "sum"), mean_runs=("runs", "mean"), target=("target", "first"))
    out["Searches per testbed and unlearning seed (GradDiff runs; target = the oracle's held-out forget accuracy)"] = counts
    agreement = reliability(searches)
    if len(agreement):
        out["The truth against itself: another unlearning seed's damage against seed 0's (the ceiling a ranking can reach)"] = agreement
    unreachable = table[~table["reached"]]
    if len(unreachable):
        draw0 = ranked[ranked.draw == 0].pivot_table(index=["testbed", "group"], columns="ranking", values="position", sort=False)
        places = unreachable.sort_values("testbed", kind="stable").set_index(["testbed", "group"])[["n_params", "seeds_reached", "heldout_forget_accuracy", "miss", "why_not"]]
        places = places.join(draw0[[c for c in [*RANKINGS, SIZE] if c in draw0.columns]].astype(int)).reset_index("testbed")
        out["Unreachable groups (seeds whose search reached the target, the closest held-out forget accuracy, why) and the position each ranking gives them "
            f"(1 = first of {int(ranked.position.max())}; random: its first draw)"] = places
    out["Truth per group (reachable; sorted by damage)"] = (reachable.sort_values(["testbed", PRIMARY]).set_index("group")
                                                            [["testbed", "n_params", "lr", "runs", "heldout_forget_accuracy", *TRUTHS]])
    out["Truth per group"] = out.pop("Truth per group (reachable; sorted by damage)")
    out["Separately: soir's quadratic model against its own step measured (hvp, ggn, first order)"] = quadratic_summary(quadratic, meta["settings"]["delta"])
    return out


def quadratic_summary(quadratic: pd.DataFrame, delta: float) -> pd.DataFrame:
    rows = []
    for method, part in quadratic.groupby("method", sort=False):
        ok = part[np.isfinite(part["eta"]) & part["measured_retain_damage_fitted"].notna()]
        row = {"method": method, "groups with a step": f"{len(ok)}/{len(part)}", "eta median": ok["eta"].median(), "eta max": ok["eta"].max()}
        for where in ("fitted", "held"):
            rhos = [spearman(p["predicted_retain_damage"].to_numpy(), p[f"measured_retain_damage_{where}"].to_numpy()) for _, p in ok.groupby("testbed")]
            row[f"Spearman predicted/measured R ({where})"] = np.nanmean(rhos)
            row[f"median measured F ({where}, target {delta:g})"] = ok[f"measured_forget_gain_{where}"].median()
            row[f"median |R error| / |R| ({where})"] = float(np.median((ok["predicted_retain_damage"] - ok[f"measured_retain_damage_{where}"]).abs()
                                                                      / ok[f"measured_retain_damage_{where}"].abs().clip(lower=1e-12)))
        rows.append(row)
    return pd.DataFrame(rows).set_index("method")


def plot(table: pd.DataFrame, ranked: pd.DataFrame, rhos: dict[str, str], path: Path) -> None:
    """Each ranking's position of every group against its truth (titled with its Spearman `rhos[label]`);
    unreachable groups as red crosses above the axis."""
    from analysis.plots import new_figure, save_figure

    labels = [*RANKINGS, SIZE]
    columns = 4
    fig, axes = new_figure((4.2 * columns, 3.3 * math.ceil(len(labels) / columns)), columns, nrows=math.ceil(len(labels) / columns))
    axes = np.atleast_1d(axes).ravel()
    top = table.loc[table["reached"], PRIMARY].max()
    band = top + 0.08 * (top - min(0.0, table.loc[table["reached"], PRIMARY].min()))
    testbeds = list(dict.fromkeys(table["testbed"]))
    for ax, label in zip(axes, labels):
        mine = ranked[(ranked.ranking == label) & (ranked.draw == 0)].merge(table, on=["testbed", "group"])
        for i, tb in enumerate(testbeds):
            part = mine[mine.testbed == tb]
            ok = part[part["reached"]]
            ax.scatter(ok["position"], ok[PRIMARY], s=16, color=f"C{i}", label=tb)
            gone = part[~part["reached"]]
            ax.scatter(gone["position"], np.full(len(gone), band), marker="x", color="red", s=24,
                       label="unreachable" if i == 0 and len(gone) else None)
            if len(ok) > 2:
                fit = np.polyfit(ok["position"], ok[PRIMARY], 1)
                xs = np.array([ok["position"].min(), ok["position"].max()])
                ax.plot(xs, np.polyval(fit, xs), color=f"C{i}", lw=0.7, alpha=0.7)
        ax.axhline(band, color="red", lw=0.4, ls=":")
        ax.annotate("unreachable", (0.99, band), xycoords=("axes fraction", "data"), ha="right", va="bottom", fontsize=7, color="red")
        ax.set_title(f"{label}{' (draw 0 shown)' if label == 'random' else ''}: ρ {rhos[label]}", fontsize=9)
        ax.set_xlabel("position in the ranking (1 = best)", fontsize=8)
        ax.set_ylabel("held-out retain accuracy drop", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    for ax in axes[len(labels):]:
        ax.set_visible(False)
    fig.suptitle("Masked GradDiff on each tensor group alone, run to the oracle's held-out forget accuracy: "
                 "held-out retain damage against each ranking (fitted on the other subjects)", fontsize=10)
    save_figure(fig, path)


# ---------------------------------------------------------------- assembling


def assemble(parts: list[Path], out: Path, meta: dict, started: float) -> None:
    """Join the parts of one or more processes (same settings) into taylor.{csv,json,md,png} and taylor_quadratic.csv."""
    read = lambda pattern: pd.concat([pd.read_csv(f) for d in parts for f in sorted(d.glob(pattern))], ignore_index=True)  # noqa: E731
    searches = read("truth.csv").drop_duplicates(["testbed", "seed", "group"])
    ranked = read("rankings_*.csv").drop_duplicates(["testbed", "ranking", "draw", "group"])
    quadratic = read("quadratic_*.csv").drop_duplicates(["testbed", "method", "group"])
    testbeds = {}
    for d in parts:
        for f in sorted(d.glob("testbed_*.json")):
            testbeds.setdefault(f.stem.removeprefix("testbed_"), json.loads(f.read_text()))
    truth_rows = per_group(searches)
    expected = ranked[ranked.draw == 0].groupby("testbed")["group"].nunique().sum() * meta["settings"]["seeds"]
    meta = {**meta, "testbeds": testbeds, "searches": len(searches), "searches_expected": int(expected), "complete": len(searches) == expected,
            "graddiff_runs": int(searches["runs"].sum()), "unreachable_searches": int((~searches["reached"]).sum()),
            "unreachable_groups": int((~truth_rows["reached"]).sum()), "truth_seeds": truth_seeds(searches)}
    wide = truth_rows.copy()
    first = ranked[ranked.draw == 0]
    for label in [*RANKINGS, SIZE]:
        mine = first[first.ranking == label].set_index(["testbed", "group"])
        key = list(zip(wide.testbed, wide.group))
        wide[f"position: {label}"] = mine["position"].reindex(key).to_numpy()
        wide[f"score: {label}"] = mine["score"].reindex(key).to_numpy()
    tables = summarize(truth_rows, searches, ranked, quadratic, meta)
    out.mkdir(parents=True, exist_ok=True)
    for name, frame in (("taylor_quadratic.csv", quadratic), ("taylor_searches.csv", searches)):
        with atomic_path(out / name) as tmp:
            frame.to_csv(tmp, index=False)
    notes = (f"Truth: masked GradDiff on each tensor group alone (AdamW, {meta['settings']['steps']} steps, batch 32), trained on all "
             "forget rows and the fitted-half retain rows, its learning rate searched until the held-out forget subjects' "
             "teacher-forced accuracy is within ±tol of the retain-only oracle's; the damage is measured on retain subjects "
             "that neither the rankings nor unlearning ever saw. Rankings read the fitted halves of forget and retain only. "
             f"{len(searches)} searches, {meta['graddiff_runs']} GradDiff runs. The truth is unlearning seed(s) "
             f"{', '.join(map(str, meta['truth_seeds']))}, searched on every testbed × group"
             + "".join(f"; seed {seed} also ran on {', '.join(sorted(part['testbed'].unique()))} and counts only for the seeds' agreement"
                       for seed, part in searches[~searches["seed"].isin(meta["truth_seeds"])].groupby("seed"))
             + f". {meta['unreachable_groups']} of {len(truth_rows)} groups (testbed × group) missed the target: they are left out "
             "of the correlations and listed below."
             + ("" if meta["complete"] else f" Not every search asked for ran ({len(searches)} of {meta['searches_expected']}: stopped for time)."))
    rhos = next(iter(tables.values()))[f"Spearman to {TRUTHS[PRIMARY]}"].to_dict()
    paths = write_results(out, "taylor", wide, meta, started=started, tables=tables, figure=lambda p: plot(truth_rows, ranked, rhos, p), notes=notes)
    print(next(iter(tables.values())).to_string())
    print(tables["Separately: soir's quadratic model against its own step measured (hvp, ggn, first order)"].to_string())
    print("wrote", ", ".join(str(p) for p in paths.values()), out / "taylor_quadratic.csv", out / "taylor_searches.csv")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--testbeds", nargs="+", default=[str(ROOT / "demo-out")], help="`soir demo` outputs (base/, oracle/, finetuned/, data/)")
    p.add_argument("--delta", type=float, default=1.0, help="soir's forget target Δ in nats (default: 1)")
    p.add_argument("--random-draws", type=int, default=100, help="seeded `random` rankings (default: 100)")
    p.add_argument("--steps", type=int, default=30, help="GradDiff steps (default: 30)")
    p.add_argument("--seeds", type=int, default=1, help="GradDiff batch-order seeds, each searched on its own (default: 1)")
    p.add_argument("--lr-range", type=float, nargs=2, default=[1e-3, 1e-1], help="the search's first bracket (default: 1e-3 1e-1)")
    p.add_argument("--tol", type=float, default=0.01, help="held-out forget within ±tol of the target (default: 0.01)")
    p.add_argument("--max-runs", type=int, default=8)
    p.add_argument("--shard", default="0/1", metavar="I/N", help="rank only every N-th testbed and search only every N-th "
                   "(seed, testbed, group), from the I-th (default: 0/1, all)")
    p.add_argument("--parts", help="where this process writes its parts (default: OUT/taylor_parts)")
    p.add_argument("--merge", nargs="+", metavar="DIR", help="join the parts written by several processes into --out, and stop")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    started = time.perf_counter()
    if args.merge:
        dirs = [Path(d) for d in args.merge]
        made = [json.loads((d / "settings.json").read_text()) for d in dirs]
        if any(m["settings"] != made[0]["settings"] for m in made):
            raise SystemExit("taylor.py: the parts were made with different settings; merge only parts of one run")
        assemble(dirs, Path(args.out), {"settings": made[0]["settings"], "parts": [m["command"] for m in made]}, started)
        return 0
    parts = Path(args.parts or Path(args.out) / "taylor_parts")
    parts.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "parts", "merge", "shard")}
    (parts / "settings.json").write_text(json.dumps({"command": command_line(), "settings": settings}, indent=2) + "\n")
    run(args, parts)
    if args.shard == "0/1":
        assemble([parts], Path(args.out), {"settings": settings}, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
