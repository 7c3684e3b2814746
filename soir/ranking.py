"""Ranking parameter groups by a score (docs/design.md §5): the `soir rank` stage.

`rank(model, forget, retain, pad, settings)` reads top to bottom: cut the model into groups
(`soir.groups`), batch the two splits (`soir.data.split_batches`), compute the per-group
quantities the chosen score declares it needs (`soir.quantities.GroupQuantities`), score every
group (`soir.scores`) and return a `Ranking`: a table with one row per group (group, layer,
kind, role, n_params, tied, score, rank, and the score's own columns, e.g. `soir`'s a, b, c_f,
c_r, eta, forget_gain, retain_damage) plus the settings, versions, seeds and timings, saved as
`ranking.parquet` and `ranking.json`. `rerank` scores again from saved quantities
(`soir rank --from-sketches`) without a model pass.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import pandas as pd
import torch
from torch import nn

from soir.curvature import (
    CURVATURES,
    GGN_SECOND_MAP,
    CurvatureOptions,
    choose_curvature,
)
from soir.data import Encoded, example_losses, n_examples, split_batches
from soir.distributed import total
from soir.errors import UserError
from soir.groups import (
    GRANULARITIES,
    NORMS,
    filter_groups,
    group_table,
    parameter_groups,
)
from soir.io import write_json, write_parquet
from soir.linesearch import replica_count
from soir.quantities import (
    FROM_DATA,
    SAVED,
    GroupQuantities,
    describe,
    load_quantities,
    save_quantities,
    sketches_path,
)
from soir.runtime import device_of, dtype_of, versions
from soir.scores import SCORES, get_score
from soir.settings import setting
from soir.sketch import SKETCHES

RANKING_FILE = "ranking.parquet"
SETTINGS_FILE = "ranking.json"
FORMAT = "soir-ranking"
VERSION = 1
BASE_COLUMNS = ("group", "layer", "kind", "role", "n_params", "tied", "score", "rank")
SOIR_COLUMNS = SCORES["soir"].columns
FIRST_STAGES = ("soir-slope", "soir", "soir-line")  # --shortlist-by: two whose cost does not grow with the groups; the line search on few rows
FIRST_STAGE_CURVATURE = "kfac"  # soir's curvature as a first stage, unless --curvature is given


@dataclass
class RankSettings:
    """How to rank. `dim` is k per group; `curvature` None lets `choose_curvature` pick by cost and memory;
    `shortlist` N ranks with soir-line only the N groups `shortlist_by` ranks best (`rank`)."""

    score: str = setting("soir", "the score to rank by", choices=SCORES)
    granularity: str = setting("tensor", "what a group is", choices=GRANULARITIES)
    norms: str = setting("join", "norm weights join the following linear group, are excluded, or stand alone", choices=NORMS)
    curvature: str | None = setting(None, "how soir's c_f, c_r are computed (default: hvp for a few groups, kfac beyond, "
                                    "whose cost does not grow with the groups; fd when neither fits --memory-budget)", choices=CURVATURES)
    memory_budget: float | None = setting(None, "GiB the default curvature may use (default: 90% of the device's free memory)",
                                          metavar="GIB")
    sketch: str = setting("none", "gradient compression", choices=SKETCHES)
    dim: int = setting(1024, "sketch dimensions per group", metavar="K")
    delta: float = setting(1.0, "soir's forget target: nats of forget-loss increase every group is asked for")
    lam: float = setting(0.1, "soir-datainf's damping factor")
    gamma: float = setting(1.0, "wagle's γ")
    ggn_samples: int = setting(1, "label draws per example for ggn and kfac")
    shortlist: int | None = setting(None, "with --score soir-line: run the line search on the N groups --shortlist-by ranks best "
                                    "only; the others follow in that first stage's order (default: every group)", metavar="N")
    shortlist_by: str = setting("soir-slope", "the first stage of --shortlist: soir-slope or soir (with --curvature kfac unless "
                                "--curvature is given), whose cost does not grow with the groups, or soir-line itself on "
                                "--shortlist-rows rows per split, whose cost does, at a fraction of the price", choices=FIRST_STAGES)
    shortlist_rows: int = setting(16, "rows per split of --shortlist-by soir-line (a seeded subset)", metavar="N")
    line_batch: int | None = setting(None, "soir-line: how many groups of one block search side by side, sharing each forward "
                                     "(default: 1 on CPU, where it does not pay; on a GPU as many as --memory-budget holds, at most 8)",
                                     metavar="K")
    batch_size: int = setting(32, "rows per batch")
    max_examples: int | None = setting(None, "use a seeded random subset of at most N rows per split (default: all)", metavar="N")
    seed: int = 0
    include: tuple[str, ...] = setting((), "rank only groups whose name matches RE (re.search)", metavar="RE")
    exclude: tuple[str, ...] = setting((), "leave out groups whose name matches RE", metavar="RE")

    def __post_init__(self):
        self.include, self.exclude = tuple(self.include), tuple(self.exclude)
        score = get_score(self.score)
        if self.granularity not in GRANULARITIES:
            raise UserError(f"unknown --granularity {self.granularity!r}: use one of {', '.join(GRANULARITIES)}")
        if self.norms not in NORMS:
            raise UserError(f"unknown --norms {self.norms!r}: use one of {', '.join(NORMS)}")
        if self.curvature is not None:
            CURVATURES.get(self.curvature)
        if self.memory_budget is not None and not self.memory_budget > 0:
            raise UserError(f"--memory-budget must be a positive number of GiB, not {self.memory_budget}")
        SKETCHES.get(self.sketch)
        if self.dim < 1:
            raise UserError(f"--dim must be a positive number of sketch dimensions per group, not {self.dim}")
        if not self.delta > 0:
            raise UserError(f"--delta must be positive (nats of forget-loss increase), not {self.delta}")
        if not self.lam > 0:
            raise UserError(f"--lam must be positive, not {self.lam}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, not {self.batch_size}")
        if self.max_examples is not None and self.max_examples < 1:
            raise UserError(f"--max-examples must be at least 1, not {self.max_examples}")
        if self.ggn_samples < 1:
            raise UserError(f"ggn needs at least one label sample per example, not {self.ggn_samples}")
        if self.shortlist is not None:
            if self.score != "soir-line":
                raise UserError(f"--shortlist runs soir-line's line search on a shortlist: give --score soir-line, or leave out --shortlist")
            if self.shortlist < 1:
                raise UserError(f"--shortlist must be a number of groups, at least 1, not {self.shortlist}")
        if self.line_batch is not None and self.line_batch < 1:
            raise UserError(f"--line-batch must be a number of groups, at least 1, not {self.line_batch}")
        if self.shortlist_rows < 1:
            raise UserError(f"--shortlist-rows must be a number of rows, at least 1, not {self.shortlist_rows}")
        if self.shortlist_by not in FIRST_STAGES:
            raise UserError(f"unknown --shortlist-by {self.shortlist_by!r}: use one of {', '.join(FIRST_STAGES)}")
        if not score.sketchable and self.sketch != "none":
            raise UserError(f"--score {self.score} needs true parameter coordinates: use --sketch none")

    @property
    def curvature_options(self) -> CurvatureOptions:
        return CurvatureOptions(sketch=self.sketch, dim=self.dim, seed=self.seed, ggn_samples=self.ggn_samples, delta=self.delta,
                                replicas=self.line_batch or 1)


@dataclass
class Ranking:
    """A ranked table of groups plus how it was made (settings, versions, timings)."""

    table: pd.DataFrame
    settings: RankSettings
    info: dict = field(default_factory=dict)
    # the per-group inputs the scores were computed from (`rank(..., keep_quantities=True)`, `rerank`)
    quantities: dict | None = field(default=None, repr=False, compare=False)

    @property
    def lower_is_better(self) -> bool:
        return SCORES[self.settings.score].lower_is_better

    def ranked(self) -> pd.DataFrame:
        """The table sorted by rank (best first)."""
        return self.table.sort_values("rank", kind="stable").reset_index(drop=True)

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "settings": asdict(self.settings), **self.info}

    def save(self, out_dir: str | Path) -> Path:
        """Write `ranking.parquet` and `ranking.json` into `out_dir` (each atomically)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_parquet(out_dir / RANKING_FILE, self.table)
        write_json(out_dir / SETTINGS_FILE, self.to_json())
        return out_dir / RANKING_FILE

    def save_quantities(self, out_dir: str | Path) -> Path:
        """Write the quantities the scores came from (`soir rank --save-sketches`), for `rerank`."""
        if self.quantities is None:
            raise ValueError("this ranking carries no quantities: rank with keep_quantities=True")
        return save_quantities(out_dir, self.table, self.quantities, asdict(self.settings), self.info)


def load(path: str | Path) -> Ranking:
    """Read a ranking from its directory, `ranking.parquet` or `ranking.json`."""
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    table_path, json_path = directory / RANKING_FILE, directory / SETTINGS_FILE
    if not table_path.is_file() or not json_path.is_file():
        raise UserError(f"no ranking at {path}: it needs {RANKING_FILE} and {SETTINGS_FILE} (write them with `soir rank`)")
    try:
        meta = json.loads(json_path.read_text())
        table = pd.read_parquet(table_path)
    except Exception as exc:
        raise UserError(f"cannot read the ranking at {directory}: {type(exc).__name__}: {exc}") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"{json_path} is not a SOIR ranking (expected the ranking.json that `soir rank` writes)")
    settings = _settings(meta.get("settings", {}))
    info = {k: v for k, v in meta.items() if k not in ("format", "version", "settings")}
    missing = [c for c in BASE_COLUMNS if c not in table.columns]
    if missing:
        raise UserError(f"{table_path} lacks the columns {missing}: is it a `soir rank` output?")
    return Ranking(table, settings, info)


def _settings(saved: Mapping) -> RankSettings:
    names = {f.name for f in fields(RankSettings)}
    return RankSettings(**{k: v for k, v in saved.items() if k in names})


# ---------------------------------------------------------------- scoring


def order(scores: np.ndarray, lower_is_better: bool) -> np.ndarray:
    """Ranks 1..N: best first; NaN last; ties keep group order."""
    keys = [(bool(np.isnan(x)), x if lower_is_better else -x, i) for i, x in enumerate(scores)]
    ranks = np.empty(len(scores), dtype=np.int64)
    for r, (_, _, i) in enumerate(sorted(keys)):
        ranks[i] = r + 1
    return ranks


def score_table(table: pd.DataFrame, quantities: Mapping, settings: RankSettings) -> pd.DataFrame:
    """`table` (one row per group) with score, rank and the score's own columns, from per-group
    `quantities`. The one place score functions are applied, for `rank` and for `rerank`."""
    score = get_score(settings.score)
    missing = [k for k in score.needs if k not in quantities]
    if missing:
        raise UserError(f"--score {settings.score} needs {describe(missing)}")
    params = {"delta": settings.delta, "lam": settings.lam, "gamma": settings.gamma, "seed": settings.seed}
    rows = [score({k: quantities[k][name] for k in score.needs}, {**params, "name": name, "n_params": int(n)})
            for name, n in zip(table["group"], table["n_params"])]
    scores = np.asarray([row["score"] for row in rows], dtype=np.float64)
    table = table.copy()
    table["score"] = scores
    table["rank"] = order(scores, score.lower_is_better)
    for column in score.columns:
        table[column] = np.asarray([row[column] for row in rows], dtype=np.float64)
    return table


def shortlist_table(first: pd.DataFrame, scored: pd.DataFrame) -> pd.DataFrame:
    """The two-stage table: every group of `first` (the first stage's table), the shortlisted ones with
    their `scored` score and rank 1..N, the others after them in the first stage's order with NaN
    scores; `first_score`, `first_rank` and `shortlisted` say where each group came from."""
    table = first[list(BASE_COLUMNS[:6])].copy()
    scored = scored.set_index("group")
    table["score"] = table["group"].map(scored["score"]).astype(np.float64)
    rest = first[~first["group"].isin(scored.index)].sort_values("rank", kind="stable")["group"]
    ranks = {**scored["rank"].to_dict(), **{name: len(scored) + i + 1 for i, name in enumerate(rest)}}
    table["rank"] = table["group"].map(ranks).astype(np.int64)
    for column in scored.columns.difference([*BASE_COLUMNS], sort=False):
        table[column] = table["group"].map(scored[column]).astype(np.float64)
    table["shortlisted"] = table["group"].isin(scored.index)
    table["first_score"] = first["score"].to_numpy()
    table["first_rank"] = first["rank"].to_numpy()
    return table


# ---------------------------------------------------------------- ranking


def rank(model: nn.Module, forget: Encoded, retain: Encoded, pad: int, settings: RankSettings = RankSettings(),
         base_model: nn.Module | None = None, progress: bool = True, loss_fn: Callable = example_losses,
         keep_quantities: bool = False) -> Ranking:
    """Rank the model's parameter groups by `settings.score` (see the module docstring).

    `forget` and `retain` are encoded splits (`soir.data.encode`), `pad` the pad token id.
    `base_model` is needed by the scores reading it (`shift`, `revert`). `loss_fn(model, batch) -> (B,)` replaces the
    contract's per-example loss. The model is used in eval mode and left unchanged (no
    `.grad`, same requires_grad flags). Scores needing curvature need eager attention.
    Returns a `Ranking`; rank 1 is the best group (the score's `lower_is_better` decides
    the direction; NaN scores, and `soir`'s unreachable groups (score inf), rank last).
    With `keep_quantities` the ranking carries the per-group quantities its scores were
    computed from (`Ranking.quantities`), for `Ranking.save_quantities`.
    """
    started = time.perf_counter()
    score = get_score(settings.score)
    if score.needs_base and base_model is None:
        raise UserError(f"--score {settings.score} needs the base model (the checkpoint this model was finetuned from): give --base DIR")
    groups = filter_groups(parameter_groups(model, settings.granularity, settings.norms), settings.include, settings.exclude)
    needs_data = any(k in FROM_DATA for k in score.needs)

    def batches_of(stage: RankSettings) -> tuple[list, list]:
        return (split_batches(forget, pad, stage.batch_size, stage.max_examples, stage.seed, shard=True),
                split_batches(retain, pad, stage.batch_size, stage.max_examples, stage.seed + 1, shard=True))

    forget_batches, retain_batches = batches_of(settings) if needs_data else ([], [])
    choice = None
    if settings.curvature is None and {"c_f", "c_r"} & set(score.needs):
        curvature, choice = choose_curvature(model, forget_batches + retain_batches, settings.memory_budget, len(groups))
        settings = replace(settings, curvature=curvature)
    if settings.line_batch is None and "line" in score.needs:
        settings = replace(settings, line_batch=replica_count(model, forget_batches + retain_batches, settings.memory_budget))
    setup = time.perf_counter() - started

    def quantities_of(chosen: list, stage: RankSettings) -> GroupQuantities:
        batches = (forget_batches, retain_batches) if stage.max_examples == settings.max_examples else batches_of(stage)
        return GroupQuantities(model, chosen, *batches, curvature=stage.curvature, options=stage.curvature_options,
                               base_model=base_model, loss_fn=loss_fn, progress=progress)

    shortlisted = None
    if settings.shortlist is None:
        quantities = quantities_of(groups, settings)
        computed = quantities.compute(score.needs)
        table = score_table(group_table(groups), computed, settings)
        timings = quantities.timings
    else:
        first = replace(settings, score=settings.shortlist_by, shortlist=None, curvature=settings.curvature or FIRST_STAGE_CURVATURE)
        if first.score == "soir-line":
            first = replace(first, max_examples=min(settings.shortlist_rows, settings.max_examples or settings.shortlist_rows))
        first_quantities = quantities_of(groups, first)
        first_table = score_table(group_table(groups), first_quantities.compute(get_score(first.score).needs), first)
        best = set(first_table.sort_values("rank", kind="stable")["group"].head(settings.shortlist))
        chosen = [g for g in groups if g.name in best]
        quantities = quantities_of(chosen, settings)
        computed = quantities.compute(score.needs)
        table = shortlist_table(first_table, score_table(group_table(chosen), computed, settings))
        timings = {**{f"first_stage_{k}": v for k, v in first_quantities.timings.items()}, **quantities.timings}
        first_curvature = first.curvature if {"c_f", "c_r"} & set(get_score(first.score).needs) else None
        shortlisted = {"n": settings.shortlist, "scored": len(chosen),
                       "first_stage": {"score": first.score, "curvature": first_curvature, "max_examples": first.max_examples},
                       "unscored": "ranked after the scored groups in the first stage's order; score and the score's columns are NaN"}

    info = {
        "lower_is_better": score.lower_is_better,
        "n_groups": len(groups),
        "n_forget": total(n_examples(forget_batches)),
        "n_retain": total(n_examples(retain_batches)),
        "dtype": str(dtype_of(model)).replace("torch.", ""),
        "device": str(device_of(model)),
        "threads": torch.get_num_threads(),
        "seeds": {"seed": settings.seed, "forget_subset": settings.seed, "retain_subset": settings.seed + 1,
                  "sketch_maps": settings.seed, "ggn_second_map": settings.seed + GGN_SECOND_MAP},
        "timings_s": {k: round(v, 4) for k, v in {"setup": setup, **timings, "total": time.perf_counter() - started}.items()},
        "versions": versions(),
        "architecture": type(model).__name__,
    }
    if choice is not None:
        info["curvature_choice"] = choice
    if shortlisted is not None:
        info["shortlist"] = shortlisted
    saved = {k: v for k, v in computed.items() if k in SAVED} if keep_quantities else None
    return Ranking(table, settings, info, saved)


def rerank(sketches_dir: str | Path, score: str | None = None, delta: float | None = None, lam: float | None = None) -> Ranking:
    """Rank again from saved quantities (`Ranking.save_quantities`), without a model pass.

    `score`, `delta`, `lam` replace the saved settings (None keeps them); everything else (groups,
    sketch, seeds, curvature) is as saved. A score whose inputs were not saved is a UserError
    saying what to run instead.
    """
    started = time.perf_counter()
    path = sketches_path(sketches_dir)
    table, quantities, manifest = load_quantities(path)
    saved = manifest["settings"]
    changes = {k: v for k, v in (("score", score), ("delta", delta), ("lam", lam)) if v is not None}
    new_score = changes.get("score", saved["score"])
    wanted = get_score(new_score)
    rerun = f"run `soir rank --model … --forget … --retain … --score {new_score} --save-sketches` instead"
    missing = [k for k in wanted.needs if k not in quantities]
    if missing:
        raise UserError(f"--score {new_score} needs {describe(missing)}, which the sketches at {path} "
                        f"(saved by --score {saved['score']}) do not hold: {rerun}")
    if not wanted.sketchable and saved["sketch"] != "none":
        raise UserError(f"--score {new_score} needs true parameter coordinates, and the sketches at {path} are "
                        f"--sketch {saved['sketch']}: {rerun.replace('--save-sketches', '--sketch none --save-sketches')}")
    settings = _settings({**saved, **changes})
    info = {
        "lower_is_better": wanted.lower_is_better,
        "n_groups": len(table),
        **manifest.get("ranking_info", {}),
        "from_sketches": str(path),
        "sketches_settings": manifest["settings"],
        "threads": torch.get_num_threads(),
        "versions": versions(),
    }
    table = score_table(table, quantities, settings)
    info["timings_s"] = {"total": round(time.perf_counter() - started, 4)}
    return Ranking(table, settings, info, quantities)
