"""Why localizers fail after finetuning: per-group gradient, curvature, Fisher, revert and shift
statistics of planted models, planted tensors against the rest (docs/design.md §5).

Plants the forget knowledge into known tensors with benchmarks/planted.py's two recipes
(a: from the retain-only model, only the chosen tensors train; b: the whole model trains, the
forget rows' gradient confined to the chosen tensors), then measures for every tensor group:
|g_f,S|, |g_r,S|, cos(g_f,S, g_r,S), a = |g_f|², b = g_rᵀg_f, c_f, c_r (exact hvp), the trace of
the empirical Fisher (data labels) and of the true Fisher (labels sampled from the model) on
forget and retain, the forget/retain loss rise of reverting the group to the pretrained base
and to the model before planting, and |θ − θ_base|. The tables give each statistic's precision
at k (k = number planted) as a ranking.

    .venv/bin/python benchmarks/diagnosis.py --testbed demo-out
    .venv/bin/python benchmarks/diagnosis.py --summarize benchmarks/results/diagnosis.csv   # tables again from the rows

Writes diagnosis.{csv,json,md}.
"""
import argparse
import re
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analysis.demo import TestbedRecipe  # noqa: E402
from report import write_results  # noqa: E402
from soir.curvature import CurvatureOptions  # noqa: E402
from soir.data import example_losses, split_batches  # noqa: E402
from soir.groups import gather, parameter_groups  # noqa: E402
from soir.models import ModelSettings  # noqa: E402
from soir.quantities import GroupQuantities  # noqa: E402
from soir.scores import soir_components  # noqa: E402
from testbed_runs import Testbed  # noqa: E402
from unlearn.finetune import FinetuneSettings, finetune  # noqa: E402
from unlearn.loop import TrainSettings  # noqa: E402

PLACEMENTS = {"mlp0": r"layers\.0\.mlp\.(gate|up|down)_proj", "attn1": r"layers\.1\.self_attn\.(q|k|v|o)_proj",
              "mlp2": r"layers\.2\.mlp\.(gate|up|down)_proj", "pair": r"layers\.0\.mlp\.up_proj|layers\.2\.self_attn\.v_proj"}


def mean_loss(model, batches):
    with torch.no_grad():
        tot = n = 0
        for b in batches:
            l = example_losses(model, b); tot += float(l.sum()); n += len(l)
    return tot / n

def sampled(model, batches, seed):
    g = torch.Generator().manual_seed(seed); out = []
    with torch.no_grad():
        for b in batches:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
            lab = b["labels"].clone(); m = lab[:, 1:] != -100
            probs = torch.softmax(logits[m], -1)
            s = torch.multinomial(probs, 1, generator=g).squeeze(1)
            inner = lab[:, 1:].clone(); inner[m] = s; lab[:, 1:] = inner
            out.append({**b, "labels": lab})
    return out

def traces(model, groups, batches):
    """Σ over examples of |g_i,S|² / n (per-example gradient second moment, trace)."""
    params = dict(model.named_parameters()); tot = {g.name: 0.0 for g in groups}; n = 0
    for b in batches:
        for i in range(b["input_ids"].shape[0]):
            one = {k: v[i:i+1] for k, v in b.items()}
            model.zero_grad(); example_losses(model, one).sum().backward()
            grads = {k: (p.grad if p.grad is not None else torch.zeros_like(p)) for k, p in params.items()}
            for g in groups:
                tot[g.name] += float(gather(g, grads).double().pow(2).sum())
            n += 1
    model.zero_grad()
    return {k: v / n for k, v in tot.items()}

def revert(model, groups, source):
    src = dict(source.named_parameters()); own = dict(model.named_parameters())
    lf0, lr0 = mean_loss(model, F), mean_loss(model, R); out = {}
    for g in groups:
        saved = {n: own[n].detach().clone() for n in g.param_names}
        with torch.no_grad():
            for n in g.param_names: own[n].copy_(src[n])
        out[g.name] = (mean_loss(model, F) - lf0, mean_loss(model, R) - lr0)
        with torch.no_grad():
            for n in g.param_names: own[n].copy_(saved[n])
    return out

def measure(BED: Path, OUT: Path, PLACEMENTS: dict, RECIPES: list) -> pd.DataFrame:
    global F, R
    bed = Testbed(BED); data = BED / "data"; recipe = TestbedRecipe()
    base = bed.model("base")
    F = split_batches(bed.encoded["forget"], bed.pad, 32, 128); R = split_batches(bed.encoded["retain"], bed.pad, 32, 128)
    rows = []
    for recipe_name in RECIPES:
        for pname, pattern in PLACEMENTS.items():
            out = OUT / f"{recipe_name}-{pname}"
            start_name = "oracle" if recipe_name == "a" else "base"
            if not (out / "model.safetensors").exists():
                t = time.time()
                if recipe_name == "a":
                    s = FinetuneSettings(model=ModelSettings(str(BED / "oracle"), dtype="float32"), data=tuple(str(data / f"{x}.parquet") for x in ("forget", "retain")),
                                         out=str(out), include=(pattern,), overwrite=True,
                                         train=TrainSettings(epochs=recipe.finetune_epochs, lr=recipe.lr, batch_size=32, seed=0, progress=False))
                else:
                    s = FinetuneSettings(model=ModelSettings(str(BED / "base"), dtype="float32"),
                                         data=tuple(str(data / f"{x}.parquet") for x in ("retain", "retain_phrasings", "general")),
                                         confined_data=tuple(str(data / f"{x}.parquet") for x in ("forget", "forget_phrasings")), confine=(pattern,),
                                         out=str(out), overwrite=True,
                                         train=TrainSettings(epochs=recipe.finetune_epochs, lr=recipe.lr, batch_size=32, seed=0, progress=False))
                finetune(s); print(f"planted {recipe_name} {pname} in {time.time()-t:.0f}s", flush=True)
            model = bed.model(out, eager=True); start = bed.model(start_name)
            acc = bed.accuracies(model)
            moved = {n for (n, p), q in zip(model.named_parameters(), start.parameters()) if not p.detach().equal(q.detach())}
            rx = re.compile(pattern)
            planted_t = {n for n, _ in model.named_parameters() if rx.search(n)}
            groups = parameter_groups(model, "tensor", "join")
            gq = GroupQuantities(model, groups, F, R, curvature="hvp", options=CurvatureOptions(delta=1.0), progress=False)
            q = gq.compute(["mean_forget", "mean_retain", "c_f", "c_r"])
            tf_emp, tr_emp = traces(model, groups, F), traces(model, groups, R)
            tf_true, tr_true = traces(model, groups, sampled(model, F, 1)), traces(model, groups, sampled(model, R, 2))
            rv_base, rv_start = revert(model, groups, base), revert(model, groups, start)
            for g in groups:
                f, r = q["mean_forget"][g.name].double(), q["mean_retain"][g.name].double()
                th = gather(g, dict(model.named_parameters())).double(); tb = gather(g, dict(base.named_parameters())).double()
                ts = gather(g, dict(start.named_parameters())).double()
                rows.append(dict(recipe=recipe_name, placement=pname, group=g.name, n_params=g.n_params,
                                 planted=any(n in planted_t for n in g.param_names),
                                 gf=float(f.norm()), gr=float(r.norm()), cos=float(f @ r / (f.norm() * r.norm() + 1e-30)),
                                 a=float(f @ f), b=float(f @ r), c_f=q["c_f"][g.name], c_r=q["c_r"][g.name],
                                 emp_fisher_f=tf_emp[g.name], emp_fisher_r=tr_emp[g.name], true_fisher_f=tf_true[g.name], true_fisher_r=tr_true[g.name],
                                 revert_base_f=rv_base[g.name][0], revert_base_r=rv_base[g.name][1],
                                 revert_start_f=rv_start[g.name][0], revert_start_r=rv_start[g.name][1],
                                 shift_base=float((th - tb).norm()), shift_start=float((th - ts).norm()), theta=float(th.norm()),
                                 **{f"acc_{k}": v for k, v in acc.items()}))
            pd.DataFrame(rows).to_csv(OUT / "diag.csv", index=False)
            print(recipe_name, pname, acc, "moved", len(moved), flush=True)
    return pd.DataFrame(rows)


def summarize(d: pd.DataFrame) -> dict[str, pd.DataFrame]:
    d["soir"] = -soir_components(d.a.values, d.b.values, d.c_f.values, d.c_r.values, 1.0)["score"]
    cands = {
     "‖g_f‖ (grad-magnitude-like)": d.gf, "soir (−score)": d.soir, "cancel: −cos(g_f, g_r)": -d.cos, "‖g_f‖ / ‖g_r‖": d.gf / d.gr,
     "soir-slope: −b / a": -d.b / d.a, "revert f/r": d.revert_base_f/d.revert_base_r,
     "emp. Fisher ratio f/r": d.emp_fisher_f / d.emp_fisher_r, "true Fisher ratio f/r": d.true_fisher_f / d.true_fisher_r,
     "true Fisher f": d.true_fisher_f,
     "revert to base atan2": np.arctan2(d.revert_base_f, d.revert_base_r), "revert: f − r (from base)": d.revert_base_f - d.revert_base_r,
     "revert to base f": d.revert_base_f,
     "shift from base": d.shift_base, "shift from start (circular)": d.shift_start,
    }
    rows = []
    for (rec, pl), part in d.groupby(["recipe", "placement"], sort=False):
        k = int(part.planted.sum())
        for name, s in cands.items():
            top = s.loc[part.index].sort_values(ascending=False).index[:k]
            rows.append(dict(recipe=rec, placement=pl, score=name, precision=part.loc[top, "planted"].mean()))
    t = pd.DataFrame(rows).pivot_table(index="score", columns=["recipe", "placement"], values="precision", sort=False)
    t[("all", "mean")] = t.mean(axis=1)
    medians = d.groupby(["recipe", "planted"])[["gf", "gr", "cos", "a", "b", "c_f", "c_r", "emp_fisher_f", "emp_fisher_r", "true_fisher_f",
                                                 "true_fisher_r", "revert_base_f", "revert_base_r", "shift_base"]].median()
    return {"Precision@k of each statistic as a ranking (descending), per recipe and placement": t,
            "Medians per group, planted against the rest": medians}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--testbed", default=str(ROOT / "demo-out"))
    p.add_argument("--recipes", nargs="+", default=["a", "b"])
    p.add_argument("--work", default="diagnosis-models", help="where the planted models are written (and reused)")
    p.add_argument("--summarize", metavar="CSV", help="only rebuild the tables from an earlier run's rows")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    started = time.perf_counter()
    torch.set_num_threads(1)
    rows = pd.read_csv(args.summarize) if args.summarize else measure(Path(args.testbed), Path(args.work), PLACEMENTS, args.recipes)
    tables = summarize(rows)
    meta = {"placements": PLACEMENTS, "recipes": args.recipes, "planting_seed": 0,
            "rows_made_by": ".venv/bin/python benchmarks/diagnosis.py --testbed TESTBED (TESTBED: analysis.demo.build_testbed "
                            "with the default TestbedRecipe, seed 0), 2 cores"}
    write_results(args.out, "diagnosis", rows, meta, started=started, tables=tables)
    print(next(iter(tables.values())).round(2).to_string())
    return 0


if __name__ == "__main__":
    sys.exit(main())
