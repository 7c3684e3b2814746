"""The per-group inputs of the scores (docs/design.md §5, §6): computed from a model, or stored and read back.

`GroupQuantities(...).compute(needs)` computes exactly the quantities a score `needs`
(`soir.scores.QUANTITIES`), each at most once:

- `mean_forget`, `mean_retain`: the mean gradient of the split, one batched pass
  (`soir.gradients.mean_gradient`), always exact; given to the scores in the form `mean_form`
  picks: gathered per group (`--sketch none`), sketched with the maps of the per-example
  sketches when the score also needs those (so inner products between them are consistent),
  and otherwise as exact coordinates in the span of the group's mean gradients
  (`soir.sketch.span_coordinates`: a_S, b_S, |g_r,S|² exact under any sketch);
- `c_f`, `c_r`: g_f,Sᵀ H_SS g_f,S of the forget and retain loss, by the chosen curvature
  method (`soir.curvature.CURVATURES`), with the mean forget gradient as direction;
- `per_example_forget`, `per_example_retain`: per-example gradient sketches (exact with `none`);
- `theta`, `theta_base`: the parameters of the model and of its base model;
- `line`: η, forget gain and retain damage of the measured step along g_f,S that forgets Δ
  (`soir.linesearch`);
- `revert`: the forget- and retain-loss rises of resetting the group to the base model
  (`soir.revert`).

Values are {group name: tensor} (c_f, c_r: {group name: float}). Under torchrun each process
holds a shard of the rows; means are combined by row count and per-example rows gathered
(`soir.distributed`), so every process ends with the quantities of all rows. `save_quantities` writes the
gradient and sketch quantities (`soir rank --save-sketches`), `load_quantities` reads them for
`soir.ranking.rerank`.
"""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from soir.curvature import CURVATURES, CurvatureOptions
from soir.data import example_losses, n_examples
from soir.distributed import gather_rows, global_mean, weighted_means
from soir.errors import UserError
from soir.gradients import mean_gradient
from soir.groups import Group, gather, group_table
from soir.linesearch import line_quantities
from soir.revert import revert_quantities
from soir.runtime import tqdm, versions
from soir.scores import QUANTITIES
from soir.sketch import (
    MANIFEST_FILE,
    SketchPlan,
    load_sketches,
    param_names,
    save_sketches,
    span_coordinates,
)

SPLITS = ("forget", "retain")
GROUP_TENSORS = ("mean_forget", "mean_retain", "per_example_forget", "per_example_retain")
GROUP_SCALARS = ("c_f", "c_r")
SAVED = GROUP_TENSORS + GROUP_SCALARS  # what --save-sketches stores; θ and θ_base never are
FROM_DATA = SAVED + ("line", "revert")  # the quantities that need the forget and retain batches
SKETCHES_FORMAT = "soir-rank-sketches"
SKETCHES_DIR = "sketches"
# 2: mean gradients under a sketch are exact span coordinates unless per-example sketches were saved
# with them (`manifest["means"]`); 1 (still read): they were sketched whenever --sketch was set
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MEAN_FORMS = ("exact", "sketched", "span")
GROUP_COLUMNS = ("group", "layer", "kind", "role", "n_params", "tied")


def describe(keys: Iterable[str]) -> str:
    """'the mean forget gradient and per-example retain sketches' for messages."""
    text = [QUANTITIES[k] for k in keys]
    if {"c_f", "c_r"} <= set(keys):
        text = [t for t in text if not t.startswith("the curvature term")] + ["the curvature terms c_f, c_r"]
    return " and ".join(dict.fromkeys(text))


def mean_form(sketch: str, keys: Iterable[str]) -> str:
    """How the mean gradients reach a score that needs `keys` under `--sketch sketch` (one of MEAN_FORMS).

    `exact`: the group's entries (`--sketch none`). `sketched`: projected with the maps of the
    per-example sketches the score also needs, so that g_iᵀḡ_f (`soir-datainf`) is an inner
    product in one sketch space. `span`: otherwise; the exact coordinates of the group's mean
    gradients in an orthonormal basis of their span (1 or 2 numbers each), which keep a_S, b_S
    and |g_r,S|² exact: a sketch of the means would add an error of order |g_r,S||g_f,S|/√k to
    b_S, an inner product of nearly orthogonal vectors (benchmarks/compression.py, diagnosis).
    """
    if sketch == "none":
        return "exact"
    return "sketched" if any(k.startswith("per_example_") for k in keys) else "span"


def mean_quantities(groups: Sequence[Group], means: Mapping[str, Mapping[str, Tensor]], form: str,
                    plan: SketchPlan | None = None) -> dict[str, dict[str, Tensor]]:
    """{"mean_<split>": {group: vector}} from the exact mean gradients {split: {name: tensor}}, in
    `form` (`mean_form`; `sketched` needs the `plan`)."""
    splits = list(means)
    if form == "exact":
        return {f"mean_{s}": {g.name: gather(g, means[s]) for g in groups} for s in splits}
    if form == "sketched":
        return {f"mean_{s}": sketched for s, sketched in zip(splits, plan.project_means([means[s] for s in splits]))}
    if form != "span":
        raise ValueError(f"unknown form of the mean gradients {form!r}: use {', '.join(MEAN_FORMS)}")
    coordinates = {g.name: span_coordinates(g, [means[s] for s in splits]) for g in groups}
    return {f"mean_{s}": {name: c[i] for name, c in coordinates.items()} for i, s in enumerate(splits)}


def progress_bar(progress: bool, total: int, desc: str, unit: str = "step"):
    return tqdm(total=total, desc=desc, unit=unit, disable=not progress, leave=False)


class GroupQuantities:
    """The per-group quantities of one model and its forget/retain batches, computed on request.

    `sketch`, `dim`, `seed` pick the gradient sketches, `curvature` the method for c_f, c_r;
    `base_model` is only needed for `theta_base`. `timings` records seconds per pass.
    """

    def __init__(self, model: nn.Module, groups: Sequence[Group], forget: Sequence[Mapping[str, Tensor]],
                 retain: Sequence[Mapping[str, Tensor]], *, curvature: str = "hvp", options: CurvatureOptions = CurvatureOptions(),
                 base_model: nn.Module | None = None, loss_fn: Callable = example_losses, progress: bool = True):
        self.model, self.groups, self.base_model, self.loss_fn, self.progress = model, list(groups), base_model, loss_fn, progress
        self.batches = {"forget": list(forget), "retain": list(retain)}
        self.curvature, self.options = curvature, options
        self.names = param_names(self.groups)
        self.timings: dict[str, float] = {}
        self._plan: SketchPlan | None = None

    @property
    def plan(self) -> SketchPlan:
        if self._plan is None:
            self._plan = SketchPlan(self.model, self.groups, self.options.sketch, self.options.dim, self.options.seed)
        return self._plan

    def compute(self, needs: Iterable[str]) -> dict:
        """{quantity: {group: value}} for every quantity in `needs`."""
        needs = list(dict.fromkeys(needs))
        unknown = [k for k in needs if k not in QUANTITIES]
        if unknown:
            raise ValueError(f"unknown quantities {unknown}: use {', '.join(QUANTITIES)}")
        out: dict = {}
        curvature = "c_f" in needs or "c_r" in needs
        means = [s for s in SPLITS if f"mean_{s}" in needs]
        full = self._mean_gradients([s for s in SPLITS if s in means or (s == "forget" and (curvature or "line" in needs))])
        if means:
            form = mean_form(self.options.sketch, needs)
            out.update(mean_quantities(self.groups, {s: full[s] for s in means}, form, self.plan if form == "sketched" else None))
        if curvature:
            out["c_f"], out["c_r"] = self._curvature(full["forget"])
        if "line" in needs:
            start = time.perf_counter()
            with progress_bar(self.progress, len(self.groups), "line search", "group") as bar:
                out["line"] = line_quantities(self.model, self.batches["forget"], self.batches["retain"], self.groups, full["forget"],
                                              self.options.delta, bar=bar, loss_fn=self.loss_fn, reduce=global_mean,
                                              replicas=self.options.replicas)
            self.timings["line_search"] = time.perf_counter() - start
        for s in SPLITS:
            if f"per_example_{s}" in needs:
                out[f"per_example_{s}"] = self._per_example(s)
        if "theta" in needs:
            out["theta"] = self._gathered(self.model, "model")
        if ("theta_base" in needs or "revert" in needs) and self.base_model is None:
            raise UserError("this score needs the base model (the checkpoint the model was finetuned from): give --base DIR")
        if "theta_base" in needs:
            out["theta_base"] = self._gathered(self.base_model, "base model")
        if "revert" in needs:
            self._gathered(self.base_model, "base model")  # the same shapes, or one clear line
            start = time.perf_counter()
            with progress_bar(self.progress, len(self.groups), "revert to base", "group") as bar:
                out["revert"] = revert_quantities(self.model, self.base_model, self.batches["forget"], self.batches["retain"], self.groups,
                                                  bar=bar, loss_fn=self.loss_fn, reduce=global_mean)
            self.timings["revert"] = time.perf_counter() - start
        return {k: out[k] for k in needs}

    def _mean_gradients(self, splits: Sequence[str]) -> dict[str, dict[str, Tensor]]:
        if not splits:
            return {}
        start = time.perf_counter()
        full = {s: weighted_means(mean_gradient(self.model, self.batches[s], self.names, self.loss_fn), n_examples(self.batches[s]))
                for s in splits}
        self.timings["mean_gradients"] = time.perf_counter() - start
        return full

    def _curvature(self, direction: Mapping[str, Tensor]) -> tuple[dict[str, float], dict[str, float]]:
        method = CURVATURES.get(self.curvature)
        start = time.perf_counter()
        total = sum(method.steps(len(self.groups), len(self.batches[s]), self.options) for s in SPLITS)
        with progress_bar(self.progress, total, f"curvature ({self.curvature}, {method.unit})") as bar:
            forms = [weighted_means(method.forms(self.model, self.batches[s], self.groups, direction, self.options, bar, self.loss_fn),
                                    n_examples(self.batches[s])) for s in SPLITS]
        self.timings["curvature"] = time.perf_counter() - start
        return forms[0], forms[1]

    def _per_example(self, split: str) -> dict[str, Tensor]:
        start = time.perf_counter()
        batches = self.batches[split]
        with progress_bar(self.progress, len(batches), f"per-example sketches ({split})", "batch") as bar:
            out = {name: gather_rows(rows) for name, rows in self.plan.split(batches, bar, self.loss_fn).items()}
        self.timings[f"per_example_{split}"] = time.perf_counter() - start
        return out

    def _gathered(self, model: nn.Module, what: str) -> dict[str, Tensor]:
        params = {n: p.detach() for n, p in model.named_parameters()}
        mine = dict(self.model.named_parameters())
        for n in self.names:
            if n not in params or tuple(params[n].shape) != tuple(mine[n].shape):
                raise UserError(f"the {what} does not match: its {n} is {'missing' if n not in params else tuple(params[n].shape)}, "
                                f"the model's is {tuple(mine[n].shape)} (give the checkpoint this model was finetuned from)")
        return {g.name: gather(g, params) for g in self.groups}


# ---------------------------------------------------------------- on disk: rank again without a model pass


def save_quantities(out_dir: str | Path, table: pd.DataFrame, quantities: Mapping, settings: Mapping, info: Mapping) -> Path:
    """Write the gradient and sketch quantities of a ranking as `sketches.safetensors` + `manifest.json`
    (atomically, `soir.sketch.save_sketches`).

    Tensors are named `KIND/GROUP` (KIND one of GROUP_TENSORS) and `curvature/c_f`, `curvature/c_r`
    (float64, one entry per group in manifest order). The manifest records the settings that
    produced them, n_f, n_r, the groups (name, layer, kind, role, uncompressed size D_S, tied) and
    `means`, the form of the mean gradients (`mean_form`: under a sketch, span coordinates of 1 or 2
    numbers per group unless per-example sketches were saved with them, so the file stays small).
    """
    groups = list(table["group"])
    tensors: dict[str, Tensor] = {}
    for kind, value in quantities.items():
        if kind in GROUP_TENSORS:
            for name in groups:
                tensors[f"{kind}/{name}"] = value[name].detach().cpu().clone()
        elif kind in GROUP_SCALARS:
            tensors[f"curvature/{kind}"] = torch.as_tensor(np.asarray([value[name] for name in groups], dtype=np.float64))
    rows = table[list(GROUP_COLUMNS)]
    manifest = {
        "format": SKETCHES_FORMAT, "version": FORMAT_VERSION,
        "settings": dict(settings),
        **{key: settings[key] for key in ("score", "granularity", "norms", "sketch", "dim", "seed", "curvature")},
        "n_f": info.get("n_forget"), "n_r": info.get("n_retain"),
        "quantities": sorted(k for k in quantities if k in SAVED),
        "means": mean_form(settings["sketch"], quantities) if any(k.startswith("mean_") for k in quantities) else None,
        "groups": [{"name": r.group, "layer": None if pd.isna(r.layer) else int(r.layer), "kind": r.kind, "role": r.role,
                    "D_S": int(r.n_params), "tied": bool(r.tied)} for r in rows.itertuples(index=False)],
        "ranking_info": {k: info[k] for k in ("n_forget", "n_retain", "dtype", "device", "architecture", "seeds", "inputs") if k in info},
        "versions": versions(),
    }
    save_sketches(out_dir, tensors, manifest)
    return Path(out_dir)


def sketches_path(path: str | Path) -> Path:
    """The directory holding saved quantities: `path` itself, or `path/sketches` (a `soir rank` output)."""
    path = Path(path)
    if not (path / MANIFEST_FILE).is_file() and (path / SKETCHES_DIR / MANIFEST_FILE).is_file():
        return path / SKETCHES_DIR
    return path


def load_quantities(path: str | Path) -> tuple[pd.DataFrame, dict, dict]:
    """(group table, quantities, manifest) from what `save_quantities` wrote (or a rank output holding it)."""
    path = sketches_path(path)
    try:
        tensors, manifest = load_sketches(path)
    except UserError:
        raise UserError(f"no saved sketches at {path}: write them with `soir rank ... --save-sketches`") from None
    except Exception as exc:
        raise UserError(f"cannot read the sketches at {path}: {type(exc).__name__}: {exc}") from None
    if manifest.get("format") != SKETCHES_FORMAT:
        raise UserError(f"{path} holds no `soir rank --save-sketches` output (its manifest is not {SKETCHES_FORMAT!r})")
    again = "write them again with `soir rank ... --save-sketches`"
    version = manifest.get("version")
    if version not in READABLE_VERSIONS:
        raise UserError(f"the sketches at {path} are format version {version}, this soir reads versions "
                        f"{', '.join(map(str, READABLE_VERSIONS))}: {again}")
    saved_means = any(k.startswith("mean_") for k in manifest["quantities"])
    if version == 1 and saved_means and mean_form(manifest["sketch"], manifest["quantities"]) == "span":
        raise UserError(f"the sketches at {path} (format 1) hold sketched mean gradients, whose a_S, b_S carry a sketch "
                        f"error that format 2 removes: {again}")
    groups = [SimpleNamespace(name=g["name"], layer=g["layer"], kind=g["kind"], role=g["role"], n_params=g["D_S"], tied=g["tied"])
              for g in manifest["groups"]]
    quantities: dict = {}
    try:
        for kind in manifest["quantities"]:
            if kind in GROUP_TENSORS:
                quantities[kind] = {g.name: tensors[f"{kind}/{g.name}"] for g in groups}
            elif kind in GROUP_SCALARS:
                values = tensors[f"curvature/{kind}"].tolist()
                quantities[kind] = {g.name: float(v) for g, v in zip(groups, values)}
    except KeyError as exc:
        raise UserError(f"the sketches at {path} are incomplete (no {exc.args[0]}): {again}") from None
    return group_table(groups), quantities, manifest
