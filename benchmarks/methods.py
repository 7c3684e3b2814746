"""Unlearning methods side by side on one mask: every unlearning objective in the registry
(`unlearn.objectives.OBJECTIVES`, all but `finetune`; each at its own defaults) with AdamW, and
graddiff with SophiaG.

Given a testbed made by `soir demo --out DIR` (DIR/data/{forget,retain,holdout}.parquet,
DIR/finetuned/, DIR/oracle/), this ranks the finetuned model with the default `soir` score,
selects the top 10% of parameters (`--by params`), and unlearns that mask with each method at
each learning rate (the same mask, seed, steps and batches for all). Every run is measured
on forget, retain and holdout: teacher-forced answer-token accuracy and answer loss and, with
`--generate`, greedy-generation ROUGE-L recall (regurgitation), QA exact match (knowledge) and
the LOSS-attack MIA AUC through `analysis.evaluate`. The finetuned model (before unlearning)
and the retain-only oracle are measured the same way, as the two ends of the trade-off.

    .venv/bin/python benchmarks/methods.py --testbed DIR                      # teacher-forced only
    .venv/bin/python benchmarks/methods.py --testbed DIR --generate --lrs 1e-3 3e-3 1e-2

Writes methods.csv (one row per run), methods.json (the command, settings, mask, rows), methods.md
(one table of every run) and methods.png (retain against forget answer accuracy, one marker per
method, one point per learning rate; with --generate a second panel of ROUGE-L) into --out,
through benchmarks/report.py.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from report import write_results  # noqa: E402
from unlearn.objectives import OBJECTIVES, unlearns  # noqa: E402

# label -> (objective, optimizer): every registered objective that unlearns, with AdamW; GradDiff with SophiaG too
METHODS = {**{name: (name, "adamw") for name, objective in OBJECTIVES.items() if unlearns(objective)},
           "graddiff-sophiag": ("graddiff", "sophiag")}
SPLITS = ("forget", "retain", "holdout")


def measure(model, tokenizer, frames, data, generate: bool, max_new_tokens: int) -> dict[str, float]:
    """Teacher-forced accuracy and loss per split; with `generate`, analysis.evaluate's regurgitation,
    knowledge and MIA AUC."""
    from soir.data import answer_accuracy, pad_id, teacher_forced

    row = {}
    for name, frame in frames.items():
        table = teacher_forced(model, data.encode(frame, tokenizer), pad_id(tokenizer))
        row[f"{name}/accuracy"] = answer_accuracy(table)
        row[f"{name}/loss"] = float(table["loss"].mean())
    if generate:
        from analysis.evaluate import EvalSettings, evaluate
        from analysis.generation import GenerationSettings

        settings = EvalSettings(template=data.template, generation=GenerationSettings(max_new_tokens=max_new_tokens, progress=False),
                                progress=False)
        metrics, _ = evaluate(model, tokenizer, {"forget": frames["forget"], "retain": frames["retain"]}, holdout=frames["holdout"],
                              settings=settings)
        for key in ("forget/regurgitation", "forget/knowledge", "retain/regurgitation", "retain/knowledge", "mia_auc"):
            row[key] = float(metrics.get(key, float("nan")))
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--testbed", required=True, type=Path, help="a directory written by `soir demo --out DIR`")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="which methods (default: all)")
    p.add_argument("--lrs", nargs="+", type=float, default=[1e-3, 1e-2], help="learning rates, each method runs at each (default: 1e-3 1e-2)")
    p.add_argument("--steps", type=int, default=100, help="unlearning steps per run (default: 100, the demo's)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--top", type=float, default=0.1, help="fraction of parameters selected by the soir ranking (default: 0.1)")
    p.add_argument("--w-retain", type=float, default=5.0, help="retain NLL weight of the objectives with a retain term (default: 5, the demo's)")
    p.add_argument("--generate", action="store_true", help="also greedy generation: ROUGE-L, exact match and MIA (slower)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="where methods.{csv,json,md,png} go")
    args = p.parse_args(argv)

    import torch

    from soir.data import DataSettings, pad_id, read_split
    from soir.errors import UserError
    from soir.models import ModelSettings
    from soir.ranking import RankSettings, rank
    from soir.select import SelectSettings, select
    from unlearn.loop import TrainSettings
    from unlearn.objectives import ObjectiveSettings
    from unlearn.unlearning import unlearn_model

    torch.set_num_threads(args.threads)
    testbed = args.testbed
    missing = [str(testbed / p) for p in ("data/forget.parquet", "data/retain.parquet", "data/holdout.parquet", "finetuned", "oracle")
               if not (testbed / p).exists()]
    if missing:
        sys.exit(f"methods.py: {testbed} is not a `soir demo` testbed: missing {', '.join(missing)}")
    data = DataSettings()
    frames = {name: read_split(testbed / "data" / f"{name}.parquet") for name in SPLITS}
    spec = ModelSettings(str(testbed / "finetuned"), dtype="float32")
    tokenizer = spec.load_tokenizer()

    started = time.perf_counter()
    finetuned = spec.load(tokenizer, eager_attention=True, seed=args.seed)
    ranking = rank(finetuned, data.encode(frames["forget"], tokenizer), data.encode(frames["retain"], tokenizer), pad_id(tokenizer),
                   RankSettings(seed=args.seed), progress=False)
    mask = select(ranking, finetuned, SelectSettings(top=args.top, by="params"))
    print(f"ranked and selected {mask.n_selected} of {mask.n_total} parameters ({mask.n_selected / mask.n_total:.1%}) "
          f"in {time.perf_counter() - started:.0f} s", file=sys.stderr)

    rows = []
    for label, path in (("finetuned", testbed / "finetuned"), ("oracle", testbed / "oracle")):
        model = ModelSettings(str(path), dtype="float32").load(tokenizer)
        rows.append({"method": label, "objective": None, "optimizer": None, "lr": None, "steps": 0, "seconds": 0.0,
                     **measure(model, tokenizer, frames, data, args.generate, args.max_new_tokens)})
    weights = ObjectiveSettings(w_retain=args.w_retain)
    for label in args.methods:
        objective, optimizer = METHODS[label]
        for lr in args.lrs:
            model = spec.load(tokenizer, seed=args.seed)
            train = TrainSettings(steps=args.steps, batch_size=args.batch_size, lr=lr, optimizer=optimizer, seed=args.seed, progress=False)
            run_started = time.perf_counter()
            try:
                result = unlearn_model(model, tokenizer, frames["forget"], frames["retain"], mask, objective=objective, weights=weights,
                                       train=train, data=data)
                row = {"method": label, "objective": objective, "optimizer": optimizer, "lr": lr, "steps": result.steps_done,
                       "seconds": round(time.perf_counter() - run_started, 2), "final_loss": result.final_loss,
                       **measure(model, tokenizer, frames, data, args.generate, args.max_new_tokens)}
            except UserError as error:  # a diverging run (non-finite loss) is a result, not a crash
                row = {"method": label, "objective": objective, "optimizer": optimizer, "lr": lr, "steps": None,
                       "seconds": round(time.perf_counter() - run_started, 2), "error": str(error)}
            rows.append(row)
            shown = ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k.endswith(("/accuracy", "/regurgitation")) and isinstance(v, float))
            print(f"{label:>17} lr {lr:g}: {shown or row.get('error')} ({row['seconds']:.0f} s)", file=sys.stderr)

    table = pd.DataFrame(rows)
    meta = {
        "testbed": str(testbed),
        "settings": {"methods": {m: METHODS[m] for m in args.methods}, "lrs": args.lrs, "steps": args.steps, "batch_size": args.batch_size,
                     "top": args.top, "by": "params", "score": "soir", "weights": asdict(weights),
                     "generate": args.generate, "max_new_tokens": args.max_new_tokens, "seed": args.seed, "threads": args.threads},
        "mask": {"n_selected": mask.n_selected, "n_total": mask.n_total, "tensors": mask.tensors, "elements": list(mask.elements)},
        "rows": table.to_dict(orient="records"),
    }
    tables = summarize(table, meta)
    paths = write_results(args.out, "methods", table, meta, started=started, tables=tables,
                          figure=lambda path: plot(table, path, args.generate))
    print(next(iter(tables.values())).to_string())
    print("wrote", ", ".join(str(path) for path in paths.values()), file=sys.stderr)
    return 0


def summarize(table: pd.DataFrame, meta: dict) -> dict:
    """The markdown's table: every run (and the two reference models), forget, retain and holdout side by side."""
    settings = meta["settings"]
    first = ["objective", "optimizer", "forget/accuracy", "retain/accuracy", "holdout/accuracy", "forget/loss", "retain/loss", "holdout/loss"]
    generated = [c for c in ("forget/regurgitation", "retain/regurgitation", "forget/knowledge", "retain/knowledge", "mia_auc") if c in table]
    columns = [c for c in [*first, *generated, "final_loss", "seconds", "error"] if c in table]
    title = (f"Every objective on the soir top-{settings['top']:.0%} mask ({meta['mask']['n_selected']:,} of {meta['mask']['n_total']:,} "
             f"parameters), {settings['steps']} steps of batch {settings['batch_size']}, teacher-forced answer accuracy and loss")
    return {title: table.set_index(["method", "lr"])[columns]}


def plot(table: pd.DataFrame, path: Path, generate: bool) -> None:
    """Retain against forget, one marker per method, one point per learning rate (labelled)."""
    from analysis.plots import new_figure, save_figure

    panels = [("accuracy", "teacher-forced answer accuracy")] + ([("regurgitation", "ROUGE-L recall (greedy)")] if generate else [])
    markers = dict(zip(["finetuned", "oracle", *METHODS], itertools.chain("*P", itertools.cycle("os^vDX<>hp8dH"))))
    fig, axes = new_figure((6 * len(panels), 5), len(panels), squeeze=False)
    for ax, (metric, title) in zip(axes[0], panels):
        for method, part in table.groupby("method", sort=False):
            part = part.dropna(subset=[f"forget/{metric}", f"retain/{metric}"]) if f"forget/{metric}" in part else part.iloc[:0]
            if part.empty:
                continue
            ax.plot(part[f"forget/{metric}"], part[f"retain/{metric}"], marker=markers.get(method, "o"), linestyle="-" if len(part) > 1 else "",
                    markersize=11 if method in ("finetuned", "oracle") else 8, label=method)
            for _, r in part.iterrows():
                if r["lr"] == r["lr"] and r["lr"] is not None:
                    ax.annotate(f"{r['lr']:g}", (r[f"forget/{metric}"], r[f"retain/{metric}"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(f"forget {metric} (lower is better)")
        ax.set_ylabel(f"retain {metric} (higher is better)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncols=2)
    fig.suptitle("unlearning methods on the soir top-10% mask (points: learning rates)")
    save_figure(fig, path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
