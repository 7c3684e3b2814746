"""Which localizer keeps the most retain at equal forgetting? Matched operating points, over testbeds and seeds.

On each testbed (a `benchmarks/testbeds.py` folder; several seeds and variants), the subjects
(people, stories, documents) of each split are halved: forget subjects into a *validation* half
(the operating point is searched on it) and a *test* half; retain subjects into an *unlearning*
half (the rows localizers rank with and GradDiff's retain term trains on) and a *held-out* half
that neither ranking nor unlearning ever sees, so test retain measures what unlearning did to
retain knowledge it was not told to keep, not the loss it trained on.

Every localizer ranks the finetuned model on all forget rows and the unlearning-half retain rows
(tensor groups for budgets of 5% and more, MLP-neuron groups below, where a tensor is too coarse),
and its selection at a parameter budget (`soir select --top B --by params`) is unlearned with
GradDiff; so are `random` selections (each mask seed a run of its own) and the full model. For
every run (selection × unlearning seed) the learning rate is searched (`analysis.matching`,
bracket then interpolation in log rate, at most `--max-runs` runs) until the validation forget
accuracy is within ±`--tol` of the retain-only oracle's, the forgetting an exact unlearner
reaches; the chosen run's test numbers are reported, and a run that cannot reach the target is
counted as such and kept (with its closest run). A search starts from the rates around the one the
last search of the same localizer and budget chose (`--warm`), or from `--lrs` / `--full-lrs`.
With `--relearn-steps N` each chosen run also faces the relearning attack (N steps on half of the
forget subjects, teacher-forced forget accuracy gained on the other half): does a mask that
forgets as much leave knowledge that comes back more, or less, easily than the full model?

Statistics: paired differences of held-out retain accuracy against `random` (the mean of the
random masks at the same budget) and against the full model, per (testbed, held-out subject),
averaged over unlearning seeds; bootstrap 95% intervals over those units and a two-sided
sign-flip permutation test of the mean.

    .venv/bin/python benchmarks/localization.py --testbeds beds/default-s0 beds/default-s1 beds/default-s2 --out DIR

On few cores run one process per testbed (`--out` each, OMP_NUM_THREADS=1) and join them with
`--merge DIR ...`. Writes localization.{csv,json,md,png} (csv: one row per search, its chosen
run), localization_runs.csv (every run of every search) and localization_subjects.csv (held-out
retain per subject of every chosen run).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from transformers.utils import logging as transformers_logging

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analysis.matching import find_operating_point  # noqa: E402
from analysis.mmlu import mmlu_accuracy  # noqa: E402
from report import mean_interval, sign_flip_p, write_results  # noqa: E402
from soir.data import answer_accuracy, encode, teacher_forced  # noqa: E402
from soir.mask import Mask  # noqa: E402
from soir.ranking import RankSettings, rank  # noqa: E402
from soir.scores import SCORES  # noqa: E402
from soir.select import SelectSettings, select  # noqa: E402
from testbed_runs import Testbed  # noqa: E402
from testbeds import GENERAL, RECIPE_FILE  # noqa: E402

LOCALIZERS = ("soir", "soir-slope", "revert", "shift")
RANDOM, FULL = "random", "full model"
RANKINGS = "localization_rankings"  # every localizer's ranking table, per testbed and granularity
FINE_BUDGET = 0.05  # budgets below this select neuron groups
SETS = ("val_forget", "test_forget", "heldout_retain", "unlearn_retain")


def subject_of(ids: pd.Series) -> pd.Series:
    """The person, story or document a row is about: ids share a 5-character prefix (p0012qa1)."""
    return ids.str[:5]


def halve_by_subject(frame: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Two halves with no subject in both: sorted subjects alternate, so each kind is split evenly."""
    subjects = subject_of(frame["id"])
    first = subjects.isin(sorted(subjects.unique())[0::2])
    return {"val": frame[first].reset_index(drop=True), "test": frame[~first].reset_index(drop=True)}


def testbed_info(path: Path) -> dict:
    recipe = path / RECIPE_FILE
    return json.loads(recipe.read_text()) if recipe.is_file() else {"variant": "default", "seed": 0}


def selections(bed: Testbed, model, base, retain_rows, args, seed: int) -> list[tuple[dict, Mask, int]]:
    """(description, mask, unlearning seed) of every run on this testbed."""
    forget_enc, retain_enc = bed.encoded["forget"], encode(retain_rows, bed.tokenizer)
    unlearn_seeds = range(args.first_unlearn_seed, args.first_unlearn_seed + args.unlearn_seeds)
    out = [({"localizer": FULL, "budget": 1.0, "mask_seed": -1}, Mask.full(model), u) for u in unlearn_seeds]
    for budget in args.budgets:
        granularity = "neuron" if budget < FINE_BUDGET else "tensor"

        def ranked(score: str, score_seed: int = 0):
            ranking = rank(model, forget_enc, retain_enc, bed.pad,
                           RankSettings(score=score, granularity=granularity, max_examples=args.max_examples, seed=score_seed),
                           base_model=base if SCORES[score].needs_base else None, progress=False)
            if score != RANDOM:  # kept for the diagnosis (e.g. revert's forget and retain rises per group)
                folder = Path(args.out) / RANKINGS
                folder.mkdir(parents=True, exist_ok=True)
                ranking.table.assign(testbed=bed.path.name).to_parquet(folder / f"{bed.path.name}_{score}_{granularity}.parquet")
            return ranking

        for localizer in args.localizers:
            started = time.perf_counter()
            mask = select(ranked(localizer), model, SelectSettings(top=budget, by="params"))
            print(f"  ranked by {localizer} ({granularity}): {time.perf_counter() - started:.0f} s", flush=True)
            out += [({"localizer": localizer, "budget": budget, "mask_seed": -1}, mask, u) for u in unlearn_seeds]
        for draw in range(args.first_random_mask, args.first_random_mask + args.random_masks):
            mask_seed = 1000 * seed + draw  # every testbed and draw its own mask
            out.append(({"localizer": RANDOM, "budget": budget, "mask_seed": mask_seed},
                        select(ranked(RANDOM, mask_seed), model, SelectSettings(top=budget, by="params")), draw))
    return out


def run_testbed(path: Path, args, earlier: tuple[list, list, list] = ([], [], [])) -> tuple[list[dict], list[dict], list[dict], dict]:
    """Every search on one testbed: (chosen runs, all runs, per-subject held-out retain, testbed facts); the partial
    files hold these after the `earlier` testbeds' rows, so an interrupted run keeps every testbed it finished."""
    info = testbed_info(path)
    bed = Testbed(path)
    forget_halves = halve_by_subject(bed.frames["forget"])
    retain_halves = halve_by_subject(bed.frames["retain"])
    retain_unlearn, retain_heldout = retain_halves["val"], retain_halves["test"]
    frames = {"val_forget": forget_halves["val"], "test_forget": forget_halves["test"],
              "heldout_retain": retain_heldout, "unlearn_retain": retain_unlearn}
    sets = {name: encode(frame, bed.tokenizer) for name, frame in frames.items()}
    general = path / "data" / "general_mc.parquet"

    def measure(model) -> tuple[dict, pd.DataFrame]:
        tables = {name: teacher_forced(model, enc, bed.pad) for name, enc in sets.items()}
        return {name: answer_accuracy(t) for name, t in tables.items()}, tables["heldout_retain"]

    model, base = bed.model("finetuned", eager=True), bed.model("base")
    oracle_model = bed.model("oracle")
    oracle, _ = measure(oracle_model)
    finetuned, _ = measure(model)
    facts = {"testbed": path.name, "variant": info["variant"], "testbed_seed": info["seed"], "target_val_forget": oracle["val_forget"],
             "oracle": {**oracle, "general": mmlu_accuracy(oracle_model, bed.tokenizer, general, GENERAL).accuracy},
             "finetuned": {**finetuned, "general": mmlu_accuracy(model, bed.tokenizer, general, GENERAL).accuracy},
             "subjects": {name: int(subject_of(f["id"]).nunique()) for name, f in frames.items()}}
    print(f"{path.name}: retain-only {facts['oracle']}\n  finetuned {facts['finetuned']}", flush=True)
    target = oracle["val_forget"]
    where = {"variant": info["variant"], "testbed": path.name, "testbed_seed": info["seed"]}
    chosen, runs, subjects = [], [], []
    found: dict[tuple, float] = {}  # the rate the last search of the same localizer and budget chose: the next one starts around it
    for describe, mask, seed in selections(bed, model, base, retain_unlearn, args, info["seed"]):
        started = time.perf_counter()
        key = (describe["localizer"], describe["budget"])

        def attempt(lr: float):
            unlearned = bed.unlearn("finetuned", mask, "graddiff", lr, args.steps, seed, retain=retain_unlearn)
            acc, heldout = measure(unlearned)
            runs.append({**where, **describe, "unlearn_seed": seed, "lr": lr, **acc})
            return acc["val_forget"], (acc, heldout, unlearned)

        lo, hi = (found[key] / args.warm, found[key] * args.warm) if key in found else (args.full_lrs if mask.is_full else args.lrs)
        point = find_operating_point(attempt, target, lo, hi, tol=args.tol, max_runs=args.max_runs, expand=args.expand)
        acc, heldout, unlearned = point.result
        if point.reached:
            found[key] = point.lr
        row = {**where, **describe, "unlearn_seed": seed, "n_selected": mask.n_selected, "fraction": mask.n_selected / mask.n_total,
               "reached": point.reached, "why_not": point.reason, "lr": point.lr, "runs": point.n_runs, **acc,
               "general": mmlu_accuracy(unlearned, bed.tokenizer, general, GENERAL).accuracy,
               **bed.relearned(unlearned, args.relearn_steps, seed), "seconds": round(time.perf_counter() - started, 1)}
        chosen.append(row)
        per_subject = heldout.assign(subject=subject_of(heldout["id"])).groupby("subject")[["correct", "answer_tokens"]].sum()
        subjects += [{**where, **describe, "unlearn_seed": seed, "subject": s, "correct": int(r.correct), "answer_tokens": int(r.answer_tokens)}
                     for s, r in per_subject.iterrows()]
        print(f"  {describe['localizer']} @ {describe['budget']:g} seed {seed}: lr {point.lr:.3g}, val forget {acc['val_forget']:.3f} "
              f"(target {target:.3f}{'' if point.reached else ', NOT REACHED: ' + point.reason}), held-out retain "
              f"{acc['heldout_retain']:.3f}, {point.n_runs} runs, {row['seconds']:.0f} s", flush=True)
        save_partial(Path(args.out), earlier[0] + chosen, earlier[1] + runs, earlier[2] + subjects)
    return chosen, runs, subjects, facts


def save_partial(out: Path, chosen: list[dict], runs: list[dict], subjects: list[dict]) -> None:
    """What is done so far, so an interrupted run keeps it."""
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("partial", chosen), ("partial_runs", runs), ("partial_subjects", subjects)):
        pd.DataFrame(rows).to_csv(out / f"localization_{name}.csv", index=False)


# ---------------------------------------------------------------- statistics


def subject_accuracy(subjects: pd.DataFrame) -> pd.DataFrame:
    """Held-out retain accuracy per (variant, testbed, localizer, budget, subject), averaged over unlearning seeds / random masks."""
    per_run = subjects.assign(accuracy=subjects["correct"] / subjects["answer_tokens"].clip(lower=1))
    return per_run.groupby(["variant", "testbed", "localizer", "budget", "subject"], as_index=False)["accuracy"].mean()


def paired(subjects: pd.DataFrame) -> pd.DataFrame:
    """Per variant, localizer and budget: held-out retain minus `random`'s (same budget) and minus the full model's,
    per (testbed, subject): mean, bootstrap 95% interval, sign-flip p."""
    acc = subject_accuracy(subjects)
    rows = []
    for variant, part in acc.groupby("variant", sort=False):
        wide = part.pivot_table(index=["testbed", "subject"], columns=["localizer", "budget"], values="accuracy")
        for localizer, budget in wide.columns:
            if localizer == FULL:
                continue
            for against, key in (("random", (RANDOM, budget)), ("full model", (FULL, 1.0))):
                if key not in wide.columns or key == (localizer, budget):
                    continue
                d = (wide[(localizer, budget)] - wide[key]).dropna().to_numpy()
                lo, hi = mean_interval(d)
                rows.append({"variant": variant, "localizer": localizer, "budget": budget, "against": against, "units": len(d),
                             "difference": float(d.mean()), "low": lo, "high": hi, "p": sign_flip_p(d)})
    # a run of random masks alone has nothing to pair: its table is empty until --merge joins it with the others
    return pd.DataFrame(rows, columns=["variant", "localizer", "budget", "against", "units", "difference", "low", "high", "p"])


def summary(chosen: pd.DataFrame, subjects: pd.DataFrame) -> pd.DataFrame:
    """Per variant, localizer and budget: the chosen runs' numbers (means over searches, token accuracies pooled
    per run) and the held-out retain accuracy per (testbed, subject) unit: its mean and 95% interval."""
    acc = subject_accuracy(subjects)
    rows = []
    for (variant, localizer, budget), g in chosen.groupby(["variant", "localizer", "budget"], sort=False):
        units = acc[(acc.variant == variant) & (acc.localizer == localizer) & (acc.budget == budget)]["accuracy"].to_numpy()
        lo, hi = mean_interval(units)
        rows.append({"variant": variant, "localizer": localizer, "budget": budget, "searches": len(g),
                     "reached": int(g["reached"].sum()), "runs per search": g["runs"].mean(),
                     "val forget": g["val_forget"].mean(), "test forget": g["test_forget"].mean(),
                     "held-out retain": g["heldout_retain"].mean(), "per subject": units.mean(), "low": lo, "high": hi,
                     "unlearning retain": g["unlearn_retain"].mean(), "general": g["general"].mean(), "median lr": g["lr"].median(),
                     **({"relearned": g["relearned"].mean(), "relearned low": (r := mean_interval(g["relearned"]))[0], "relearned high": r[1]}
                        if "relearned" in g and g["relearned"].notna().any() else {})})
    return pd.DataFrame(rows)


def revert_selectivity(folder: Path) -> pd.DataFrame:
    """What reverting each group to the base gives back, per testbed and granularity: with f, r the
    forget- and retain-loss rises (`revert`), the selectivity (f − r)/(|f| + |r|) of the groups: 0 where a
    group holds forget and retain knowledge alike, 1 where reverting it costs only forget loss."""
    rows = []
    for path in sorted(folder.glob("*_revert_*.parquet")):
        t = pd.read_parquet(path)
        granularity = path.stem.rsplit("_", 1)[1]
        f, r = t["forget_rise"].to_numpy(), t["retain_rise"].to_numpy()
        size = np.abs(f) + np.abs(r)
        selectivity = (f - r) / np.where(size > 0, size, np.nan)
        top = t.sort_values("rank").head(max(1, len(t) // 10)).index
        rows.append({"testbed": t["testbed"].iloc[0], "granularity": granularity, "groups": len(t), "median forget rise": np.median(f),
                     "median retain rise": np.median(r), "median selectivity": np.nanmedian(selectivity),
                     "top 10% selectivity": np.nanmean(selectivity[t.index.get_indexer(top)]), "max selectivity": np.nanmax(selectivity),
                     "share f > r": float(np.mean(f > r))})
    return pd.DataFrame(rows)


def plot(table: pd.DataFrame, diffs: pd.DataFrame, path: Path) -> None:
    from analysis.plots import new_figure, save_figure

    variants = list(dict.fromkeys(table["variant"]))
    fig, axes = new_figure((6.5 * len(variants), 9), len(variants), 2, squeeze=False)
    axes = np.asarray(axes).reshape(2, len(variants))
    for col, variant in enumerate(variants):
        top, bottom = axes[0, col], axes[1, col]
        part = table[table.variant == variant]
        for i, (_, r) in enumerate(part.iterrows()):
            label = r["localizer"] if r["localizer"] == FULL else f"{r['localizer']} {r['budget']:.0%}"
            y = r["per subject"]
            top.errorbar(r["test forget"], y, yerr=[[y - r["low"]], [r["high"] - y]], fmt="o" if r["budget"] >= FINE_BUDGET else "s",
                         color=f"C{i % 10}", capsize=2, label=label)
        top.set_xlabel("test forget accuracy (chosen run)")
        top.set_ylabel("held-out retain accuracy (mean over subjects)")
        top.set_title(f"{variant}: at matched forget (mean, 95% interval)", fontsize=10)
        top.legend(fontsize=7, ncol=2)
        top.grid(alpha=0.3)
        d = diffs[diffs.variant == variant].reset_index(drop=True)
        labels = [f"{r.localizer} {r.budget:.0%} − {r.against}" for r in d.itertuples()]
        bottom.errorbar(d["difference"], range(len(d)), xerr=[d["difference"] - d["low"], d["high"] - d["difference"]], fmt="o", capsize=2)
        bottom.axvline(0, color="grey", lw=0.8)
        bottom.set_yticks(range(len(d)), labels, fontsize=7)
        bottom.set_xlabel("paired difference in held-out retain accuracy")
        bottom.set_title(f"{variant}: paired differences, 95% bootstrap interval over subjects", fontsize=10)
        bottom.grid(axis="x", alpha=0.3)
    save_figure(fig, path)


def write(chosen: pd.DataFrame, runs: pd.DataFrame, subjects: pd.DataFrame, meta: dict, out: Path, started: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    runs.to_csv(out / "localization_runs.csv", index=False)
    subjects.to_csv(out / "localization_subjects.csv", index=False)
    table, diffs = summary(chosen, subjects), paired(subjects)
    tables = {"At matched forget (means over searches; held-out retain also per testbed × subject, with its 95% bootstrap interval)": table.set_index(["variant", "localizer", "budget"]),
              "Paired differences in held-out retain (per testbed × subject, averaged over seeds; p: sign-flip permutation)": diffs.set_index(["variant", "localizer", "budget", "against"])}
    selectivity = revert_selectivity(out / RANKINGS)
    if len(selectivity):
        tables["What reverting one group to the base gives back (revert's forget and retain loss rises f, r in nats; selectivity (f − r)/(|f| + |r|))"] = selectivity.set_index(["testbed", "granularity"])
    notes = (f"Target: validation forget accuracy within ±{meta['settings']['tol']} of the retain-only model's (per testbed). "
             "`reached` counts the searches that got there; the others are kept with their closest run. "
             "`random`: one search per mask seed (its unlearning seed is the draw); paired differences use the mean of its masks.")
    paths = write_results(out, "localization", chosen, meta, started=started, tables=tables, notes=notes,
                          figure=lambda p: plot(table, diffs, p))
    print(table.to_string(float_format=lambda x: f"{x:.3f}"))
    print(diffs.to_string(float_format=lambda x: f"{x:.3f}"))
    print("wrote", ", ".join(str(p) for p in paths.values()))


SEARCH = ["variant", "testbed", "localizer", "budget", "mask_seed", "unlearn_seed"]  # what identifies one operating-point search


def first_seen(table: pd.DataFrame, seen: set[tuple]) -> pd.DataFrame:
    """The rows of `table` whose search is not in `seen` (searches an earlier merged run already has)."""
    return table[[key not in seen for key in table[SEARCH].itertuples(index=False, name=None)]]


def merge(dirs: list[Path], out: Path, started: float) -> int:
    """Join the outputs of runs on other testbeds (same settings) into one set of outputs; an interrupted
    run's partial rows count, and the JSON says so."""
    chosen, runs, subjects, metas, interrupted, seen = [], [], [], [], [], set()
    for d in dirs:
        done = (d / "localization.json").is_file()
        prefix = "localization" if done else "localization_partial"
        tables = [pd.read_csv(d / f"{prefix}{name}.csv") for name in ("", "_runs", "_subjects")]
        fresh = [first_seen(table, seen) for table in tables]  # a search an earlier directory has (e.g. the full model) counts once
        seen |= set(tables[0][SEARCH].itertuples(index=False, name=None))
        for kept, table in zip((chosen, runs, subjects), fresh):
            kept.append(table)
        for ranking in (d / RANKINGS).glob("*.parquet"):
            (out / RANKINGS).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ranking, out / RANKINGS / ranking.name)
        if done:
            metas.append(json.loads((d / "localization.json").read_text()))
        else:
            interrupted.append({"dir": str(d), "searches": len(chosen[-1])})
    settings = metas[0]["settings"] if metas else {"tol": "?", "note": "every merged run was interrupted: settings unknown"}
    meta = {"settings": settings, "testbeds": [t for m in metas for t in m["testbeds"]],
            "merged": [{"command": m["command"], "seconds": m["seconds"]} for m in metas], "interrupted": interrupted}
    write(pd.concat(chosen, ignore_index=True), pd.concat(runs, ignore_index=True), pd.concat(subjects, ignore_index=True), meta, out, started)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--testbeds", nargs="+", default=[], metavar="DIR", help="testbed folders (benchmarks/testbeds.py or `soir demo` outputs)")
    p.add_argument("--localizers", nargs="*", default=list(LOCALIZERS), help="scores to rank with (none: only `random` "
                   "and the full model; default: %(default)s)")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.01], help="fractions of all parameters (default: 0.1 0.01)")
    p.add_argument("--unlearn-seeds", type=int, default=3, help="unlearning seeds per localizer selection and for the full model (default: 3)")
    p.add_argument("--first-unlearn-seed", type=int, default=0, help="the first unlearning seed, to add seeds to an earlier run "
                   "and --merge them (default: 0)")
    p.add_argument("--random-masks", type=int, default=4, help="random masks per budget and testbed, each unlearned once (default: 4)")
    p.add_argument("--first-random-mask", type=int, default=0, help="the first random mask's draw, to add masks to an earlier run "
                   "and --merge them (default: 0)")
    p.add_argument("--steps", type=int, default=30, help="GradDiff steps (batch 32; default: 30)")
    p.add_argument("--lrs", type=float, nargs=2, default=[1e-3, 1e-2], help="the search's first bracket for masks (default: 1e-3 1e-2)")
    p.add_argument("--full-lrs", type=float, nargs=2, default=[1e-4, 1e-3], help="the full model's first bracket (default: 1e-4 1e-3)")
    p.add_argument("--expand", type=float, default=4.0, help="bracket growth while the target is not bracketed (default: 4)")
    p.add_argument("--warm", type=float, default=1.5, help="a search after one of the same localizer and budget that reached the target "
                   "starts from its rate ÷ and × this (default: 1.5)")
    p.add_argument("--tol", type=float, default=0.01, help="validation forget within ±tol of the target (default: 0.01)")
    p.add_argument("--max-runs", type=int, default=8)
    p.add_argument("--relearn-steps", type=int, default=0, help="after each search, the relearning attack on its run: this many steps "
                   "on half of the forget subjects, forget accuracy gained on the other half (default: 0, no attack)")
    p.add_argument("--max-examples", type=int, default=128, help="rows per split the localizers rank with (default: 128)")
    p.add_argument("--merge", nargs="+", metavar="DIR", help="join the outputs of runs on other testbeds into --out, and stop")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    transformers_logging.disable_progress_bar()  # a bar per model load
    started = time.perf_counter()
    if args.merge:
        return merge([Path(d) for d in args.merge], Path(args.out), started)
    if not args.testbeds:
        p.error("give --testbeds DIR ... (or --merge DIR ...)")
    chosen, runs, subjects, facts = [], [], [], []
    for path in map(Path, args.testbeds):
        c, r, s, f = run_testbed(path, args, (chosen, runs, subjects))
        chosen += c
        runs += r
        subjects += s
        facts.append(f)
    meta = {"settings": {k: v for k, v in vars(args).items() if k not in ("out", "merge")}, "testbeds": facts}
    write(pd.DataFrame(chosen), pd.DataFrame(runs), pd.DataFrame(subjects), meta, Path(args.out), started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
