"""`report.md` of the study (`analysis.demo`): the figures, the tables, and a paragraph that reads them.

Every number in the text is computed from the study's own outputs; nothing is written in advance.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pandas as pd

from analysis.plots import forget_retain_axes, new_figure, save_figure

FIGURES = "figures"


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float) and value != 0 and abs(value) < 10 ** -digits:
        return f"{value:.1e}"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _markdown(frame: pd.DataFrame, index: bool = False, formatted: bool = False) -> str:
    """A markdown table; `formatted` keeps cells already formatted as text (tabulate would parse
    "2.3e-52" back into a number and print it as 0.000)."""
    if formatted:
        return frame.to_markdown(index=index, disable_numparse=True)
    return frame.to_markdown(index=index, floatfmt=".3f")


def unlearning_figure(summary: pd.DataFrame, x: str = "forget accuracy", y: str = "retain accuracy"):
    """Retain against forget for every model of the study: where unlearning landed, against the oracle."""
    fig, ax = new_figure((7, 5))
    markers = {"base": ("s", "grey"), "finetuned": ("D", "black"), "oracle": ("*", "crimson")}
    for _, row in summary.iterrows():
        name = row["model"]
        marker, colour = markers.get(name, ("o", None))
        if colour is None:
            colour = {"soir": "tab:blue", "random": "tab:orange", "full": "tab:green"}.get(name.rpartition("-")[2], "tab:purple")
            marker = {"graddiff": "o", "npo": "^", "idk": "v", "dpo": "<", "rmu": ">"}.get(name.rpartition("-")[0], "o")
        ax.scatter(row[x], row[y], marker=marker, s=160 if name == "oracle" else 70,
                   color=colour, label=name, zorder=3)
    forget_retain_axes(ax, f"{x} (teacher-forced)", f"{y} (teacher-forced)", "Where each model lands: forget against retain")
    return fig


def _compare(gain: float, tolerance: float = 0.005) -> str:
    return "as much" if abs(gain) <= tolerance else "more" if gain > 0 else "less"


def reading(summary: pd.DataFrame, curves: pd.DataFrame | None, selections: dict, probes: pd.DataFrame | None, top: float) -> str:
    """The honest paragraph: what finetuning did, how the soir-localized unlearning compares with random
    and the full model, which layers kept retention, and what the probes brought back."""
    rows = summary.set_index("model")
    finetuned, oracle, base = rows.loc["finetuned"], rows.loc["oracle"], rows.loc["base"]
    if not finetuned["forget accuracy"] >= 0.9:
        return (f"The finetuned model did not memorise the forget set (teacher-forced forget accuracy {_fmt(finetuned['forget accuracy'])}): "
                "this configuration is too small to show what unlearning does, so nothing below should be read as a result.")
    lines = [f"Finetuning taught the forget set (teacher-forced forget accuracy {_fmt(finetuned['forget accuracy'])}, retain "
             f"{_fmt(finetuned['retain accuracy'])}) and kept general ability (MMLU-style accuracy {_fmt(base['MMLU'])} for the base model, "
             f"{_fmt(finetuned['MMLU'])} finetuned). The retain-only oracle, which never saw the forget set, has forget accuracy "
             f"{_fmt(oracle['forget accuracy'])}: that is where good unlearning should land."]
    methods = sorted({m.rpartition("-")[0] for m in rows.index if m.rpartition("-")[2] in ("soir", "random")})
    for method in methods:
        parts = {mask: rows.loc[f"{method}-{mask}"] for mask in ("soir", "random", "full") if f"{method}-{mask}" in rows.index}
        if "soir" not in parts or "random" not in parts:
            continue
        s, r = parts["soir"], parts["random"]
        forgot = _compare(r["forget accuracy"] - s["forget accuracy"])  # lower forget accuracy: more forgotten
        kept = _compare(s["retain accuracy"] - r["retain accuracy"])
        verdict = f"forgot {forgot} and kept {kept}"
        text = (f"With {method} on {top:.0%} of the parameters, compared with the random selection the soir one {verdict} (forget accuracy "
                f"{_fmt(s['forget accuracy'])} vs {_fmt(r['forget accuracy'])}, retain {_fmt(s['retain accuracy'])} vs {_fmt(r['retain accuracy'])}")
        if "full" in parts:
            text += f"; the full model reached forget {_fmt(parts['full']['forget accuracy'])} at retain {_fmt(parts['full']['retain accuracy'])}"
        text += ("). These are single runs at one learning rate, not matched operating points: a hint, not a result; "
                 "`benchmarks/localization.py` compares localizers at matched forget levels over seeds.")
        lines.append(text)
    if selections:
        lines.append(f"At a {top:.0%} parameter budget the {len(selections['selections'])} localizers chose {selections['distinct']} "
                     "different tensor sets.")
    if curves is not None and len(curves):
        ordered = curves.sort_values("retain_auc", ascending=False)
        best, worst = ordered.iloc[0], ordered.iloc[-1]
        lines.append(f"Unlearned one layer at a time, {best['group']} kept retention best (mean retain accuracy {_fmt(best['retain_auc'])}) and "
                     f"{worst['group']} worst ({_fmt(worst['retain_auc'])}); the final forget accuracy ranged from "
                     f"{_fmt(curves['final_forget'].min())} to {_fmt(curves['final_forget'].max())} across layers.")
    if probes is not None and len(probes):
        for kind, what in (("relearn", "The relearning attack (finetuning on half the forget set, measured on the other half)"),
                           ("quantize", "Rounding the weights")):
            rows_ = probes[probes["probe"].str.startswith(kind)]
            if not len(rows_):
                continue
            gains = rows_["forget accuracy after"] - rows_["forget accuracy before"]
            came_back = "part of what was unlearned comes back" if gains.max() > 0.02 else "little or nothing came back"
            lines.append(f"{what} changed forget accuracy by {_fmt(float(gains.min()))} to {_fmt(float(gains.max()))}: {came_back}.")
    return "\n\n".join(lines)


def write_report(out: Path, recipe) -> dict:
    """Write out/report.md and out/figures/ from the study's outputs."""
    from soir.io import atomic_path

    figures = out / FIGURES
    figures.mkdir(parents=True, exist_ok=True)
    for source, name in ((out / "shift" / "shift.png", "shift.png"), (out / "compare" / "compare.png", "compare.png"),
                         (out / "compare" / "scatter.png", "scatter.png"), (out / "curves" / "curves.png", "curves.png"),
                         (out / "curves" / "pareto.png", "pareto.png")):
        if source.is_file():
            shutil.copyfile(source, figures / name)
    summary = pd.read_parquet(out / "eval" / "summary.parquet")
    save_figure(unlearning_figure(summary), figures / "unlearning.png")
    curves = pd.read_parquet(out / "curves" / "summary.parquet") if (out / "curves" / "summary.parquet").is_file() else None
    probes = pd.read_parquet(out / "probes" / "summary.parquet") if (out / "probes" / "summary.parquet").is_file() else None
    selections = json.loads((out / "rankings" / "selections.json").read_text()) if (out / "rankings" / "selections.json").is_file() else {}
    shift = pd.read_parquet(out / "shift" / "shift.parquet")
    roles = shift[shift["level"] == "role"].nlargest(3, "relative_l2")
    layers = shift[shift["level"] == "layer"].sort_values("relative_l2", ascending=False)
    pairs = pd.read_parquet(out / "compare" / "compare.parquet")
    t = recipe.testbed
    sections = [
        "# SOIR demo: the localized-unlearning study on the built-in testbed\n",
        "## The testbed\n",
        f"A {t.size.layers}-layer OLMo-shaped model (hidden {t.size.hidden}) trained from scratch on general facts and the Task3 "
        f"documents (`base`), finetuned on {t.synth.people_forget + t.synth.people_retain} people, "
        f"{t.synth.docs_forget + t.synth.docs_retain} stories and {t.synth.real_forget + t.synth.real_retain} documents with the general "
        f"facts replayed (`finetuned`), and the same recipe on the retain split alone (`oracle`). Forget: {t.synth.people_forget} people, "
        f"{t.synth.docs_forget} stories, {t.synth.real_forget} documents.\n",
        "## Where finetuning moved the weights\n",
        "![parameter shift](figures/shift.png)\n",
        "Largest relative shift by role: " + ", ".join(f"{r.name} {_fmt(r.relative_l2)}" for r in roles.itertuples()) + "; by layer: "
        + ", ".join(f"{r.name} {_fmt(r.relative_l2)}" for r in layers.itertuples()) + ".\n",
        "## Rankings\n",
        f"The finetuned model's {int((shift['level'] == 'tensor').sum())} tensors ranked by {', '.join(f'`{s}`' for s in recipe.scores)}; agreement (Spearman ρ) between every pair:\n",
        "![ranking agreement](figures/compare.png)\n",
        _markdown(pairs[["a", "b", "spearman", "kendall", "top10_groups", "top10_params"]]) + "\n",
        "## Unlearning\n",
        f"GradDiff-style unlearning ({', '.join(recipe.methods)}) for {recipe.unlearn_steps} steps at lr {recipe.unlearn_lr:g} on the top "
        f"{recipe.top:.0%} of parameters by `soir` and by `random`, and on the full model. Regurgitation is ROUGE-L recall of greedy "
        "completions, knowledge is QA exact match, accuracy is teacher-forced answer-token accuracy, MIA uses the holdout as non-members "
        "(LOSS; MIA score 1 − 2|AUC − 0.5|), MMLU is multiple-choice accuracy on general_mc, forget quality is the KS-test p-value of "
        "forget truth ratios against the oracle's.\n",
        "![forget against retain](figures/unlearning.png)\n",
        _markdown(summary.set_index("model").T.reset_index().rename(columns={"index": "metric"}).map(
            lambda v: _fmt(v) if isinstance(v, float) else v), formatted=True) + "\n",
        "## Layer robustness\n",
        "Each layer unlearned alone (GradDiff), forget and retain measured every few steps:\n",
        "![curves](figures/curves.png)\n",
        "![Pareto](figures/pareto.png)\n",
    ]
    if curves is not None:
        sections.append(_markdown(curves[["group", "retain_at_target", "step_at_target", "retain_auc", "final_forget", "final_retain", "oracle_distance"]]) + "\n")
    if probes is not None:
        sections += ["## Robustness probes\n", _markdown(probes) + "\n"]
    sections += ["## Reading the results\n", reading(summary, curves, selections, probes, recipe.top) + "\n"]
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text("\n".join(sections))
    return {"distinct_selections": selections.get("distinct")}

