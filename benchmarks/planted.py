"""A ground truth for localizers: forget knowledge planted in known tensors.

Starting from the testbed's retain-only model (the oracle: base → finetuned on retain, every
parameter), forget + retain are finetuned into chosen tensors only (`soir finetune --include`,
bit-identical elsewhere; the retain rows keep those tensors from losing what they held), so
the only place the forget knowledge can live is known. Then, per placement and
seed:

1. every localizer ranks the planted model's tensor groups; precision of the planted tensors
   in its top k (k = the number planted), recall in its top 2k, and average precision;
2. GradDiff unlearning restricted to each localizer's top k (and to the planted tensors
   themselves, the mask an oracle localizer would pick) at two learning rates: does it get
   forget accuracy back to the retain-only model's while keeping retain accuracy?

Placements: an early MLP, a middle attention block and a late MLP (3-layer testbed model).
`shift` is measured from the pre-finetuning base model, as a user would have it (from the
retain-only model it would be an oracle).

    .venv/bin/python benchmarks/planted.py --testbed demo-out

Writes planted.{csv,json,png} (csv: one row per placement × seed × localizer × lr).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from soir.mask import Mask  # noqa: E402
from soir.models import ModelSettings  # noqa: E402
from soir.ranking import RankSettings, rank  # noqa: E402
from soir.select import SelectSettings, select  # noqa: E402
from testbed_runs import Testbed  # noqa: E402
from unlearn.finetune import FinetuneSettings, finetune  # noqa: E402
from unlearn.loop import TrainSettings  # noqa: E402

PLACEMENTS = {
    "early MLP (layer 0)": r"layers\.0\.mlp\.(gate|up|down)_proj",
    "middle attention (layer 1)": r"layers\.1\.self_attn\.(q|k|v|o)_proj",
    "late MLP (layer 2)": r"layers\.2\.mlp\.(gate|up|down)_proj",
}
LOCALIZERS = ("soir", "soir-line", "soir-datainf", "grad-magnitude", "fo-influence", "fisher", "wagle", "shift", "random")


def average_precision(ranked: list[str], planted: set[str]) -> float:
    hits, total = 0, 0.0
    for i, name in enumerate(ranked, 1):
        if name in planted:
            hits += 1
            total += hits / i
    return total / len(planted)


def run(args) -> tuple[pd.DataFrame, dict]:
    bed = Testbed(args.testbed)
    testbed, data = bed.path, bed.path / "data"
    base = bed.model("base")
    oracle, finetuned = bed.accuracies(bed.model("oracle")), bed.accuracies(bed.model("finetuned"))
    print(f"retain-only model: {oracle}; fully finetuned model: {finetuned}", flush=True)
    rows, planting = [], []
    with tempfile.TemporaryDirectory(prefix="soir-planted-") as work:
        for placement, pattern in PLACEMENTS.items():
            for seed in range(args.seeds):
                out = Path(work) / f"{len(planting)}"
                started = time.perf_counter()
                finetune(FinetuneSettings(model=ModelSettings(str(testbed / "oracle"), dtype="float32"),
                                          data=(str(data / "forget.parquet"), str(data / "retain.parquet")),
                                          out=str(out), include=(pattern,),
                                          train=TrainSettings(epochs=args.epochs, lr=args.plant_lr, batch_size=32, seed=seed, progress=False)))
                model, reference = bed.model(out, eager=True), bed.model("oracle")
                moved = sorted(n for (n, p), q in zip(model.named_parameters(), reference.parameters()) if not p.detach().equal(q.detach()))
                planted = set(Mask.from_names(model, moved).names)
                planted_acc = bed.accuracies(model)
                planting.append({"placement": placement, "seed": seed, "planted": moved, **planted_acc,
                                 "seconds": round(time.perf_counter() - started, 1)})
                print(f"{placement} seed {seed}: planted {len(moved)} tensors, {planted_acc}", flush=True)
                k = len(moved)
                masks = {"planted tensors": Mask.from_names(model, moved)}
                for localizer in LOCALIZERS:
                    t = time.perf_counter()
                    ranking = rank(model, bed.encoded["forget"], bed.encoded["retain"], bed.pad,
                                   RankSettings(score=localizer, seed=seed, max_examples=args.max_examples, batch_size=32),
                                   base_model=base if localizer == "shift" else None, progress=False)
                    seconds = time.perf_counter() - t
                    order = list(ranking.ranked()["group"])
                    mask = select(ranking, model, SelectSettings(top=k))
                    masks[localizer] = mask
                    rows.append({"placement": placement, "seed": seed, "localizer": localizer, "k": k, "rank_seconds": round(seconds, 2),
                                 "precision_at_k": len(set(order[:k]) & planted) / k,
                                 "recall_at_2k": len(set(order[:2 * k]) & planted) / k,
                                 "average_precision": average_precision(order, planted), "top_k": order[:k]})
                rows.append({"placement": placement, "seed": seed, "localizer": "planted tensors", "k": k, "precision_at_k": 1.0,
                             "recall_at_2k": 1.0, "average_precision": 1.0, "top_k": moved})
                for lr in args.lrs:
                    for name, mask in masks.items():
                        row = next(r for r in rows if r["placement"] == placement and r["seed"] == seed and r["localizer"] == name)
                        row.update({f"{key}_lr{lr:g}": v for key, v in bed.unlearned(out, mask, "graddiff", lr, args.steps, seed).items()})
                print(pd.DataFrame([r for r in rows if r["placement"] == placement and r["seed"] == seed])
                      .drop(columns=["top_k", "placement", "seed"]).to_string(index=False, float_format=lambda x: f"{x:.3f}"), flush=True)
    meta = {"retain_only_model": oracle, "finetuned_model": finetuned, "planting": planting, "placements": PLACEMENTS,
            "settings": {k: v for k, v in vars(args).items() if k != "out"}}
    return pd.DataFrame(rows), meta


def summarize(table: pd.DataFrame, lrs) -> pd.DataFrame:
    columns = ["precision_at_k", "recall_at_2k", "average_precision"] + [f"{s}_accuracy_lr{lr:g}" for lr in lrs for s in ("forget", "retain")]
    return table.groupby("localizer", sort=False)[columns].agg(["mean", "std"])


def plot(table: pd.DataFrame, meta: dict, lrs, path: Path) -> None:
    from analysis.plots import new_figure, save_figure

    fig, (left, right) = new_figure((12, 4.6), 2)
    order = list(dict.fromkeys(table["localizer"]))
    placements = list(dict.fromkeys(table["placement"]))
    width = 0.8 / len(placements)
    for i, placement in enumerate(placements):
        part = table[table.placement == placement].groupby("localizer", sort=False)["precision_at_k"].agg(["mean", "std"]).loc[order]
        left.bar(np.arange(len(order)) + (i - (len(placements) - 1) / 2) * width, part["mean"], width, yerr=part["std"], label=placement, capsize=2)
    left.set_xticks(range(len(order)), order, rotation=40, ha="right", fontsize=8)
    left.set_ylabel("precision of the planted tensors in the top k")
    left.set_title("localization: mean ± std over seeds")
    left.legend(fontsize=7)
    lr = lrs[-1]
    for name in order:
        part = table[table.localizer == name]
        f, r = part[f"forget_accuracy_lr{lr:g}"], part[f"retain_accuracy_lr{lr:g}"]
        right.errorbar(f.mean(), r.mean(), xerr=f.std(), yerr=r.std(), fmt="o", capsize=2, label=name)
    right.axvline(meta["retain_only_model"]["forget_accuracy"], color="grey", ls="--", lw=0.8, label="retain-only model")
    right.axhline(meta["retain_only_model"]["retain_accuracy"], color="grey", ls="--", lw=0.8)
    right.set_xlabel("forget accuracy after GradDiff on the top k (lower: forgot)")
    right.set_ylabel("retain accuracy")
    right.set_title(f"unlearning restricted to the top k, lr {lr:g}, {table.attrs.get('steps', '')} steps")
    right.legend(fontsize=6, ncol=2)
    right.grid(alpha=0.3)
    save_figure(fig, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--testbed", default=str(ROOT / "demo-out"), help="a `soir demo` output (base/, oracle/, finetuned/, data/)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=float, default=30.0, help="epochs of the masked finetune on forget + retain (default: 30)")
    p.add_argument("--plant-lr", type=float, default=1e-2)
    p.add_argument("--max-examples", type=int, default=128, help="rows per split the localizers rank with (default: 128)")
    p.add_argument("--steps", type=int, default=30, help="GradDiff steps (default: 30)")
    p.add_argument("--lrs", type=float, nargs="+", default=[3e-3, 1e-2])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    started = time.perf_counter()
    table, meta = run(args)
    table.attrs["steps"] = args.steps
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table.assign(top_k=table["top_k"].map(" ".join)).to_csv(out / "planted.csv", index=False)
    summary = summarize(table, args.lrs)
    meta["summary"] = {f"{a}/{b}": v for (a, b), v in summary.to_dict().items()}
    meta["seconds"] = time.perf_counter() - started
    meta["command"] = " ".join(["python", *sys.argv])
    (out / "planted.json").write_text(json.dumps(meta, indent=2, default=float) + "\n")
    plot(table, meta, args.lrs, out / "planted.png")
    print(summary.to_string(float_format=lambda x: f"{x:.3f}"))
    print(f"wrote {out}/planted.csv, .json, .png ({meta['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
