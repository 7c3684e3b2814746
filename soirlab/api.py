"""The front door: every stage as one function over loaded objects or paths (see `soirlab`).

Each function accepts what the command line reads from disk either already in memory (a model,
DataFrames, a `Ranking`, a `Mask`) or as a path, turns keyword options into the stage's
settings dataclass, calls the same stage function the command line calls, and returns the
typed artifact the command line writes.
"""

from __future__ import annotations

import copy as copying
from dataclasses import fields, replace
from pathlib import Path
from typing import Mapping, Sequence

import pandas as pd
from torch import nn

from soir.data import DataSettings, Encoded, pad_id
from soir.errors import UserError
from soir.mask import Mask
from soir.mask import load as load_mask
from soir.models import ModelSettings, TinySize, load_tokenizer
from soir.ranking import Ranking, RankSettings
from soir.ranking import load as load_ranking
from soir.select import SelectSettings

SPLIT_NAMES = ("forget", "retain", "holdout", "general")
SPLIT_SUFFIXES = (".parquet", ".jsonl", ".csv")


def _settings(cls, given, options: dict, what: str):
    """`given` (a `cls`, or None for the defaults) with `options` replacing its fields."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise TypeError(f"{what} got unknown options {unknown}; {cls.__name__} has: {', '.join(sorted(names))}")
    base = given if given is not None else cls()
    return replace(base, **options) if options else base


def load_model(model: str | Path, tokenizer: str | Path | None = None, *, dtype: str | None = None, device: str | None = None,
               eager_attention: bool = True, size: TinySize | None = None, seed: int = 0):
    """(model, tokenizer) from a `save_pretrained` directory, or `tiny:ARCH` built from config with `tokenizer`.

    Eager attention is on by default, as curvature (`rank`) needs it."""
    spec = ModelSettings(model=str(model), tokenizer=None if tokenizer is None else str(tokenizer), dtype=dtype, device=device,
                         size=size or TinySize())
    tok = spec.load_tokenizer()
    return spec.load(tok, eager_attention=eager_attention, seed=seed), tok


def load_splits(source: str | Path | Sequence[str | Path], data: DataSettings = DataSettings()) -> dict[str, pd.DataFrame]:
    """Splits by name: a directory's forget / retain / holdout / general files (parquet, jsonl or csv),
    or the given files (named by their stem)."""
    if isinstance(source, (str, Path)) and Path(source).is_dir():
        directory = Path(source)
        found = {name: next((directory / f"{name}{s}" for s in SPLIT_SUFFIXES if (directory / f"{name}{s}").is_file()), None)
                 for name in SPLIT_NAMES}
        paths = {name: path for name, path in found.items() if path is not None}
        if not paths:
            raise UserError(f"{directory} holds none of {', '.join(SPLIT_NAMES)} (.parquet, .jsonl or .csv)")
    else:
        files = [source] if isinstance(source, (str, Path)) else list(source)
        paths = {Path(p).stem: Path(p) for p in files}
    return {name: data.read(path) for name, path in paths.items()}


def _model(model, tokenizer):
    """(model, tokenizer): a loaded model with its tokenizer (or the tokenizer's path), or a path loaded here."""
    if isinstance(tokenizer, (str, Path)):
        tokenizer = load_tokenizer(tokenizer)
    if isinstance(model, nn.Module):
        if tokenizer is None:
            raise UserError("give the tokenizer of the loaded model (tokenizer=...)")
        return model, tokenizer
    spec = ModelSettings(str(model))
    tokenizer = tokenizer if tokenizer is not None else spec.load_tokenizer()
    return spec.load(tokenizer, eager_attention=True), tokenizer


def _other(model, tokenizer):
    """A second model (a base, an oracle) as given, or loaded from its path with `tokenizer`."""
    return model if isinstance(model, nn.Module) else ModelSettings(str(model)).load(tokenizer, eager_attention=True)


def _frame(split, data: DataSettings) -> pd.DataFrame:
    return split if isinstance(split, pd.DataFrame) else data.read(split)


def _encoded(split, tokenizer, data: DataSettings) -> Encoded:
    return split if isinstance(split, Encoded) else data.encode(_frame(split, data), tokenizer)


def rank(model, forget, retain, *, tokenizer=None, base=None, settings: RankSettings | None = None,
         data: DataSettings = DataSettings(), progress: bool = True, keep_quantities: bool = False, **options) -> Ranking:
    """Rank `model`'s parameter groups (`soir.ranking.rank`); `options` are `RankSettings` fields
    (score, granularity, curvature, sketch, dim, delta, …). `base` (a model or path) is for `shift`."""
    from soir.ranking import rank as rank_groups

    settings = _settings(RankSettings, settings, options, "rank")
    model, tokenizer = _model(model, tokenizer)
    base = None if base is None else _other(base, tokenizer)
    return rank_groups(model, _encoded(forget, tokenizer, data), _encoded(retain, tokenizer, data), pad_id(tokenizer), settings,
                       base_model=base, progress=progress, keep_quantities=keep_quantities)


def select(ranking: Ranking | str | Path, model, *, settings: SelectSettings | None = None, **options) -> Mask:
    """A `Mask` of `model` from a ranking (`soir.select.select`); `options` are `SelectSettings` fields (top, by, per_kind, …)."""
    from soir.select import select as select_groups

    ranking = ranking if isinstance(ranking, Ranking) else load_ranking(ranking)
    if not isinstance(model, nn.Module):
        model = ModelSettings(str(model)).load()
    return select_groups(ranking, model, _settings(SelectSettings, settings, options, "select"))


def unlearn(model, forget, retain, *, tokenizer=None, mask: Mask | str | Path | None = None, objective: str = "graddiff",
            weights=None, train=None, data: DataSettings = DataSettings(), out: str | Path | None = None, copy: bool = False,
            eval_callback=None, lora_rank: int = 0, lora_alpha: float | None = None, **options):
    """Masked unlearning of `model` in memory (`unlearn.unlearning.unlearn_model`): it is changed in
    place (or a copy, with `copy=True`), never reloaded from disk. `options` are `TrainSettings`
    fields (steps, lr, batch_size, eval_every, optimizer, …) or `ObjectiveSettings` fields (w_forget,
    w_retain, w_kl, beta, margin). `out`, when given, keeps the log, eval rows and checkpoints.
    `lora_rank` > 0 trains merged LoRA adapters on the linear weights the mask selects (α = `lora_alpha`, default 2·rank).
    Returns (the unlearned model, its `UnlearnResult` with the evaluation rows in `evals`)."""
    from unlearn.loop import TrainSettings
    from unlearn.objectives import ObjectiveSettings
    from unlearn.unlearning import unlearn_model

    weight_names = {f.name for f in fields(ObjectiveSettings)}
    weights = _settings(ObjectiveSettings, weights, {k: v for k, v in options.items() if k in weight_names}, "unlearn")
    train = _settings(TrainSettings, train or TrainSettings(lr=1e-5), {k: v for k, v in options.items() if k not in weight_names}, "unlearn")
    model, tokenizer = _model(model, tokenizer)
    if copy:
        model = copying.deepcopy(model)
    if mask is not None and not isinstance(mask, Mask):
        mask = load_mask(mask)
    result = unlearn_model(model, tokenizer, _frame(forget, data), _frame(retain, data), mask, objective=objective, weights=weights,
                           train=train, data=data, out=out, eval_callback=eval_callback, lora_rank=lora_rank, lora_alpha=lora_alpha)
    return model, result


def evaluate(model, tokenizer=None, splits: Mapping[str, pd.DataFrame | str | Path] | None = None, *, forget=None, retain=None,
             holdout=None, mmlu=None, oracle=None, reference=None, settings=None, data: DataSettings = DataSettings(), **options):
    """SemEval, MIA, MMLU and TOFU metrics (`analysis.evaluate.evaluate`): (metrics dict, per-example table).

    Splits come as a mapping (e.g. `load_splits(...)`: its `holdout` becomes the MIA non-members and
    `general` is left out) or as `forget=`, `retain=`. `reference` (a model or path, same tokenizer)
    is the reference model of the reference MIA; without it that attack is skipped. `options` are
    `EvalSettings` fields."""
    from analysis.evaluate import EvalSettings
    from analysis.evaluate import evaluate as run_evaluate

    given = dict(splits or {})
    holdout = given.pop("holdout", holdout)
    given.pop("general", None)
    given.update({k: v for k, v in (("forget", forget), ("retain", retain)) if v is not None})
    frames = {name: _frame(split, data) for name, split in given.items()}
    model, tokenizer = _model(model, tokenizer)
    if oracle is not None and not isinstance(oracle, pd.DataFrame):
        oracle = _other(oracle, tokenizer)
    reference = None if reference is None else _other(reference, tokenizer)
    settings = _settings(EvalSettings, settings or EvalSettings(template=data.template), {"mia": holdout is not None, **options}, "evaluate")
    return run_evaluate(model, tokenizer, frames, holdout=None if holdout is None else _frame(holdout, data), mmlu=mmlu, oracle=oracle,
                        settings=settings, reference=reference)


def shift(base, finetuned, *, settings=None, **options) -> pd.DataFrame:
    """Parameter shift from `base` to `finetuned` (directories, streamed tensor by tensor, or loaded
    models): `analysis.shift.parameter_shift`'s table. `options` are `ShiftSettings` fields."""
    from analysis.shift import ShiftSettings, parameter_shift

    return parameter_shift(base, finetuned, _settings(ShiftSettings, settings, options, "shift"))


def curves(model, forget, retain, *, tokenizer=None, oracle=None, out: str | Path | None = None, settings=None,
           progress: bool = True, **options):
    """Unlearn each group alone and measure it (`analysis.curves.layer_curves`): a `Curves` with the
    table, the robustness summary and the oracle's point. `options` are `CurveSettings` fields (by,
    objective, weights, train, generate, target, …); `steps`, `lr`, `eval_every` go to its `train`."""
    from analysis.curves import CurveSettings, layer_curves

    train_keys = {"steps", "lr", "eval_every", "batch_size", "optimizer", "weight_decay", "warmup", "schedule", "seed"}
    settings = _settings(CurveSettings, settings, {k: v for k, v in options.items() if k not in train_keys}, "curves")
    train = {k: v for k, v in options.items() if k in train_keys}
    if train:
        settings = replace(settings, train=replace(settings.train, **train))
    model, tokenizer = _model(model, tokenizer)
    if oracle is not None and not isinstance(oracle, dict):
        oracle = _other(oracle, tokenizer)
    return layer_curves(model, tokenizer, _frame(forget, settings.data), _frame(retain, settings.data), settings, out=out,
                        oracle=oracle, progress=progress)


def compare(rankings: Mapping[str, Ranking | str | Path] | Sequence[str | Path]) -> pd.DataFrame:
    """Agreement of every pair of rankings (`analysis.compare.compare_rankings`): one row per pair."""
    from analysis.compare import compare_rankings, ranking_names

    if not isinstance(rankings, Mapping):
        rankings = dict(zip(ranking_names(rankings), rankings))
    return compare_rankings({name: r if isinstance(r, Ranking) else load_ranking(r) for name, r in rankings.items()})
