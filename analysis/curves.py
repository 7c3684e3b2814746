"""Layer-robustness curves (docs/design.md §9): unlearning each group alone, with forget and retain
measured every few steps: the thesis's single-layer unlearning and its per-layer Pareto front.

For every group (a layer, a kind, a module or a tensor) in turn: masked unlearning of that group
alone (`unlearn.unlearning.unlearn_model`, every other parameter bit-identical) for `steps` steps,
evaluating forget and retain every `eval_every` steps (teacher-forced answer accuracy and loss;
with `generate`, ROUGE-L recall of completions and QA exact match too); then the group's tensors
are restored from a kept copy, so one model load serves the whole run. Each finished group is
written to `groups/` at once, so an interrupted run continues with the groups not yet done.

The robustness summary per group: the retain metric when forget first reaches `target`
(`retain_at_target`, at `step_at_target`), the mean retain over the run (`retain_auc`: the area
under the retain curve over the steps, divided by the steps), the step closest to the
retain-only oracle (`closest_step`, `oracle_distance`, in the (forget, retain) plane) and the
final forget and retain.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from soir.data import DataSettings, pad_id, row_kind
from soir.errors import UserError
from soir.groups import NORMS, filter_groups, parameter_groups
from soir.io import write_json, write_parquet
from soir.runtime import tqdm
from soir.select import mask_of_groups
from soir.settings import setting
from unlearn.loop import TrainSettings
from unlearn.objectives import ObjectiveSettings
from unlearn.unlearning import accuracy_callback, unlearn_model

BY = ("layer", "kind", "module", "tensor")
GROUPS_DIR = "groups"
SETTINGS_FILE = "curves.json"


@dataclass(frozen=True)
class CurveSettings:
    """What a curve is: which groups, which objective, how long, how often measured."""

    by: str = setting("layer", "what a group is", choices=BY)
    norms: str = setting("join", "norm weights join the following linear group, are excluded, or stand alone", choices=NORMS)
    include: tuple[str, ...] = setting((), "only groups whose name matches RE (re.search)", metavar="RE")
    exclude: tuple[str, ...] = setting((), "leave out groups whose name matches RE", metavar="RE")
    objective: str = "graddiff"
    weights: ObjectiveSettings = field(default_factory=ObjectiveSettings)
    train: TrainSettings = field(default_factory=lambda: TrainSettings(steps=30, lr=1e-5, eval_every=5, warmup=0, progress=False))
    data: DataSettings = field(default_factory=DataSettings)
    generate: bool = setting(False, "also measure ROUGE-L recall of completions and QA exact match at every evaluation (slower)")
    max_new_tokens: int = setting(64, "generated tokens per row with --generate")
    target: float | None = setting(None, "the forget teacher-forced accuracy a group must reach for retain_at_target (default: the oracle's, or 0.5 without --oracle)")

    def __post_init__(self):
        if self.by not in BY:
            raise UserError(f"unknown --by {self.by!r}: use one of {', '.join(BY)}")
        if not self.train.eval_every:
            raise UserError("curves need --eval-every N (N >= 1): a curve is the forget and retain metrics every N steps")


def generation_callback(tokenizer, frames: dict[str, pd.DataFrame], data: DataSettings, max_new_tokens: int) -> Callable:
    """ROUGE-L recall on completion rows (regurgitation) and exact match on QA rows (knowledge) per split."""
    from analysis.generation import GenerationSettings, generate
    from analysis.metrics import exact_match, rouge_l_recall
    from soir.data import Template

    settings = GenerationSettings(max_new_tokens=max_new_tokens, batch_size=32, progress=False)
    template = Template(data.template)

    def measure(model, step):
        row = {}
        for name, frame in frames.items():
            texts = generate(model, tokenizer, list(frame["input"]), settings, template)
            kinds = [row_kind(i) for i in frame["id"]]
            rouge = [rouge_l_recall(t, r) for t, r, k in zip(texts, frame["output"], kinds) if k != "qa"]
            em = [exact_match(t, r) for t, r, k in zip(texts, frame["output"], kinds) if k == "qa"]
            row[f"{name}_rouge_l_recall"] = float(np.mean(rouge)) if rouge else math.nan
            row[f"{name}_exact_match"] = float(np.mean(em)) if em else math.nan
        return row

    return measure


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


@dataclass
class Curves:
    """The curves (one row per group × evaluation step), the robustness summary, and the oracle's point."""

    table: pd.DataFrame
    summary: pd.DataFrame
    oracle: dict | None = None
    settings: dict = field(default_factory=dict)


def oracle_point(oracle_model, tokenizer, frames: dict[str, pd.DataFrame], settings: CurveSettings) -> dict:
    """The retain-only oracle's forget and retain metrics, for the Pareto plot and `closest_step`."""
    encoded = {name: settings.data.encode(frame, tokenizer) for name, frame in frames.items()}
    row = accuracy_callback(encoded, pad_id(tokenizer))(oracle_model, 0)
    if settings.generate:
        row.update(generation_callback(tokenizer, frames, settings.data, settings.max_new_tokens)(oracle_model, 0))
    return row


def layer_curves(model, tokenizer, forget: pd.DataFrame, retain: pd.DataFrame, settings: CurveSettings = CurveSettings(),
                 out: str | Path | None = None, oracle=None, progress: bool = True) -> Curves:
    """Unlearn each group of `model` alone and measure it (see the module docstring).

    The model comes back as it was (every group is restored after its run). `out`, when given,
    keeps each finished group in `out/groups/` and reuses them when run again with the same
    settings. `oracle` is a retain-only model (or its metrics as a dict) for the summary.
    """
    groups = filter_groups(parameter_groups(model, settings.by, settings.norms), settings.include, settings.exclude)
    frames = {"forget": forget, "retain": retain}
    if oracle is not None and not isinstance(oracle, dict):
        oracle = oracle_point(oracle, tokenizer, frames, settings)
    record = {"settings": _jsonable(asdict(settings)), "groups": [g.name for g in groups]}
    done_dir = None
    if out is not None:
        out = Path(out)
        done_dir = out / GROUPS_DIR
        saved = out / SETTINGS_FILE
        if saved.is_file() and json.loads(saved.read_text()).get("run") != record:
            raise UserError(f"{out} holds curves made with other settings or groups: choose a new --out, or --overwrite")
        done_dir.mkdir(parents=True, exist_ok=True)
        write_json(saved, {"run": record, "oracle": oracle})
    encoded = {name: settings.data.encode(frame, tokenizer) for name, frame in frames.items()}
    measure = accuracy_callback(encoded, pad_id(tokenizer))
    if settings.generate:
        generated = generation_callback(tokenizer, frames, settings.data, settings.max_new_tokens)
        teacher = measure

        def measure(model, step):
            return {**teacher(model, step), **generated(model, step)}

    tables = []
    bar = tqdm(groups, desc=f"curves (unlearn each {settings.by} alone)", unit="group", disable=not progress)
    for group in bar:
        bar.set_postfix_str(group.name, refresh=False)
        path = done_dir / f"{_safe(group.name)}.parquet" if done_dir is not None else None
        if path is not None and path.is_file():
            tables.append(pd.read_parquet(path))
            continue
        mask = mask_of_groups(model, [group], {"source": "curves", "group": group.name})
        params = dict(model.named_parameters())
        kept = {name: params[name].detach().clone() for name in mask.names}
        try:
            result = unlearn_model(model, tokenizer, forget, retain, mask, objective=settings.objective, weights=settings.weights,
                                   train=settings.train, data=settings.data, eval_callback=measure)
        finally:
            with torch.no_grad():
                for name, value in kept.items():
                    params[name].copy_(value)
        rows = pd.DataFrame(result.evals)
        rows.insert(0, "group", group.name)
        rows.insert(1, "layer", group.layer)
        rows.insert(2, "kind", group.kind)
        rows.insert(3, "n_params", group.n_params)
        rows["layer"] = rows["layer"].astype("Int64")
        if path is not None:
            write_parquet(path, rows)
        tables.append(rows)
    table = pd.concat(tables, ignore_index=True)
    target = settings.target if settings.target is not None else (oracle["forget_accuracy"] if oracle else 0.5)
    return Curves(table, robustness(table, target, oracle), oracle, record)


def robustness(table: pd.DataFrame, target: float, oracle: dict | None = None, metric: str = "accuracy") -> pd.DataFrame:
    """The robustness summary per group (see the module docstring) from the curves table."""
    rows = []
    for group, curve in table.groupby("group", sort=False):
        curve = curve.sort_values("step")
        steps = curve["step"].to_numpy(dtype=float)
        forget, retain = curve[f"forget_{metric}"].to_numpy(dtype=float), curve[f"retain_{metric}"].to_numpy(dtype=float)
        reached = np.flatnonzero(forget <= target + 1e-12)
        span = steps[-1] - steps[0]
        row = {
            "group": group, "layer": curve["layer"].iloc[0], "kind": curve["kind"].iloc[0], "n_params": int(curve["n_params"].iloc[0]),
            "target": target,
            "step_at_target": float(steps[reached[0]]) if reached.size else math.nan,
            "retain_at_target": float(retain[reached[0]]) if reached.size else math.nan,
            "retain_auc": float(np.trapezoid(retain, steps) / span) if span > 0 else float(retain[0]),
            "final_forget": float(forget[-1]), "final_retain": float(retain[-1]),
            "closest_step": math.nan, "oracle_distance": math.nan,
        }
        if oracle is not None:
            distance = np.hypot(forget - oracle[f"forget_{metric}"], retain - oracle[f"retain_{metric}"])
            row["closest_step"], row["oracle_distance"] = float(steps[int(np.argmin(distance))]), float(distance.min())
        rows.append(row)
    summary = pd.DataFrame(rows)
    summary["layer"] = summary["layer"].astype("Int64")
    return summary


def write_curves(out: str | Path, curves: Curves) -> None:
    """`curves.parquet`, `summary.parquet`, `curves.png` and `pareto.png` into `out`, each atomically."""
    from analysis.plots import curves_figure, pareto_figure, save_figure

    out = Path(out)
    write_parquet(out / "curves.parquet", curves.table)
    write_parquet(out / "summary.parquet", curves.summary)
    save_figure(curves_figure(curves.table), out / "curves.png")
    save_figure(pareto_figure(curves.table, oracle=curves.oracle), out / "pareto.png")
    if "forget_rouge_l_recall" in curves.table:
        save_figure(pareto_figure(curves.table, "rouge_l_recall", curves.oracle), out / "pareto_rouge.png")


def load_curves(path: str | Path) -> Curves:
    """The `Curves` a `soir curves` run wrote into `path` (curves.parquet, summary.parquet, curves.json)."""
    path = Path(path)
    if not (path / "curves.parquet").is_file():
        raise UserError(f"no curves at {path}: write them with `soir curves`")
    saved = json.loads((path / SETTINGS_FILE).read_text()) if (path / SETTINGS_FILE).is_file() else {}
    return Curves(pd.read_parquet(path / "curves.parquet"), pd.read_parquet(path / "summary.parquet"), saved.get("oracle"), saved.get("run", {}))


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))
