"""The testbeds the evidence benchmarks stand on, built per variant and seed, with what each can show.

A benchmark is only as good as its instrument: before trusting a comparison on a testbed, check
that the finetuned model really holds its forget set (teacher-forced answer accuracy far above the
retain-only oracle's on the forget rows), keeps retain and general ability, and how far
finetuning moved it from the base. Variants (`analysis.demo.TestbedRecipe.variant`): `default`
(the demo's 3 × 128 OLMo), `deep` (8 blocks) and `gentle` (a base pretrained 4× longer, finetuned
at a third of the rate). Each testbed is a `soir demo`-shaped folder (data/, base/,
finetuned/, oracle/ and `testbed.json` with its recipe) under `--out-dir`, named VARIANT-sSEED;
a finished one is kept and only measured again.

    .venv/bin/python benchmarks/testbeds.py --variants default deep gentle --seeds 0 1 2 --out-dir /tmp/beds

Writes testbeds.{csv,json,md} into --out: per testbed, teacher-forced answer accuracy of the
base, finetuned and oracle models on forget, retain and holdout, general multiple-choice accuracy,
and the finetuning shift ‖θ_ft − θ_base‖ / ‖θ_base‖ (all parameters, and the median tensor).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analysis.demo import TestbedRecipe, build_testbed  # noqa: E402
from analysis.mmlu import MMLUSettings, mmlu_accuracy  # noqa: E402
from report import write_results  # noqa: E402
from soir.data import answer_accuracy, encode, pad_id, read_split, teacher_forced  # noqa: E402
from soir.models import load_model, load_tokenizer  # noqa: E402

RECIPE_FILE = "testbed.json"
GENERAL = MMLUSettings(prompt="{question}", progress=False)  # as the demo scores general_mc
MODELS = ("base", "finetuned", "oracle")
SPLITS = ("forget", "retain", "holdout")


def ensure_testbed(out_dir: Path, variant: str, seed: int) -> Path:
    """The testbed VARIANT-sSEED under `out_dir`, built unless a finished one is there."""
    path = out_dir / f"{variant}-s{seed}"
    if (path / RECIPE_FILE).is_file():
        return path
    recipe = TestbedRecipe.variant(variant, seed)
    started = time.perf_counter()
    build_testbed(path, recipe, progress=False)
    (path / RECIPE_FILE).write_text(json.dumps({"variant": variant, "seed": seed, "recipe": asdict(recipe),
                                                "build_seconds": round(time.perf_counter() - started, 1)}, indent=2, default=str))
    return path


def relative_shift(base, finetuned) -> dict[str, float]:
    """‖θ_ft − θ_base‖ / ‖θ_base‖ over all parameters, and the median over tensors."""
    moved, size, per_tensor = 0.0, 0.0, []
    base_params = dict(base.named_parameters())
    for name, p in finetuned.named_parameters():
        d = float((p.detach().double() - base_params[name].detach().double()).norm() ** 2)
        s = float(base_params[name].detach().double().norm() ** 2)
        moved, size = moved + d, size + s
        per_tensor.append((d / s) ** 0.5 if s > 0 else float("nan"))
    return {"shift_relative": (moved / size) ** 0.5, "shift_relative_median_tensor": float(pd.Series(per_tensor).median())}


def measure(path: Path) -> dict:
    """Accuracies of the testbed's models and its finetuning shift."""
    info = json.loads((path / RECIPE_FILE).read_text())
    data = path / "data"
    tokenizer = load_tokenizer(data / "tokenizer")
    pad = pad_id(tokenizer)
    encoded = {s: encode(read_split(data / f"{s}.parquet"), tokenizer) for s in SPLITS}
    row = {"testbed": path.name, "variant": info["variant"], "seed": info["seed"], "layers": info["recipe"]["size"]["layers"],
           "build_seconds": info["build_seconds"]}
    models = {m: load_model(path / m, tokenizer, dtype="float32") for m in MODELS}
    row["n_params"] = sum(p.numel() for p in models["base"].parameters())
    for name, model in models.items():
        for split, enc in encoded.items():
            row[f"{name}_{split}"] = answer_accuracy(teacher_forced(model, enc, pad))
        row[f"{name}_general"] = mmlu_accuracy(model, tokenizer, data / "general_mc.parquet", GENERAL).accuracy
    with torch.no_grad():
        row.update(relative_shift(models["base"], models["finetuned"]))
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["default"], choices=["default", "deep", "gentle"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--out-dir", required=True, help="where the testbeds are built (VARIANT-sSEED folders)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="where testbeds.{csv,json,md} go")
    p.add_argument("--built-only", action="store_true", help="measure the variant × seed testbeds already built, build none")
    args = p.parse_args(argv)
    started = time.perf_counter()
    rows = []
    for variant in args.variants:
        for seed in args.seeds:
            if args.built_only and not (Path(args.out_dir) / f"{variant}-s{seed}" / RECIPE_FILE).is_file():
                continue
            rows.append(measure(ensure_testbed(Path(args.out_dir), variant, seed)))
            print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    summary = table.groupby("variant", sort=False)[[c for c in table if c.startswith(("finetuned_", "oracle_", "base_", "shift_"))]].mean()
    write_results(args.out, "testbeds", table, {"settings": vars(args)}, started=started,
                  tables={"Mean over seeds": summary.T}, notes="Teacher-forced answer accuracy; general = multiple-choice accuracy.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
