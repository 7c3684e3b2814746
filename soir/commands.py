"""The `soir` package's subcommands: `data synth`, `rank`, `select`.

Each subcommand is a pair: `<name>_arguments(parser)` defines its flags (choices and help from
the registries, defaults from the settings) and `<name>(args)` runs it by turning the flags into
settings and calling the stage's function. The dispatcher (`soirlab.cli`) imports them lazily.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from soir.errors import UserError
from soir.flags import (
    add_common,
    add_data,
    add_model,
    add_progress,
    add_selection,
    model_settings,
    selection_settings,
)
from soir.io import atomic_path, check_out_dir
from soir.settings import add_settings, from_args


def write_dir(out: Path, write) -> None:
    """Write a whole output directory atomically (replacing an earlier output of the same command)."""
    with atomic_path(out) as tmp:
        tmp.mkdir()
        write(tmp)


# ---------------------------------------------------------------- soir data synth


def synth_arguments(p) -> None:
    from soir.synth import SynthSettings

    add_common(p, "directory for the splits and tokenizer/")
    add_settings(p, SynthSettings, [f.name for f in dataclasses.fields(SynthSettings) if f.name != "seed"])


def synth(args) -> int:
    """Write forget/retain/holdout/general splits (parquet, SemEval-2025 Task 4 schema), general_mc (MMLU
    layout) and tokenizer/ (byte-level BPE, loadable by AutoTokenizer). Same seed, same files."""
    from soir.synth import SynthSettings, write_testbed

    out = check_out_dir(args.out, "synth.json")
    settings = SynthSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SynthSettings)})
    paths = write_testbed(out, settings)
    print(f"testbed written to {out}: " + ", ".join(sorted(p.name for p in paths.values())))
    return 0


# ---------------------------------------------------------------- soir rank


RANK_FLAGS = ("granularity", "norms", "curvature", "memory_budget", "sketch", "dim", "batch_size", "max_examples", "shortlist",
              "shortlist_by", "shortlist_rows", "line_batch", "include", "exclude")


def rank_arguments(p) -> None:
    from soir.ranking import RankSettings

    add_model(p, dtype="float32", required=False)
    p.add_argument("--forget", metavar="FILE", help="the forget split (parquet, jsonl or csv; required unless --from-sketches)")
    p.add_argument("--retain", metavar="FILE", help="the retain split (parquet, jsonl or csv; required unless --from-sketches)")
    p.add_argument("--base", metavar="DIR", help="the model before finetuning (needed by --score shift)")
    # unset: with --from-sketches these three default to the saved ones
    add_settings(p, RankSettings, ("score", "delta", "lam"), unset=("score", "delta", "lam"))
    add_settings(p, RankSettings, RANK_FLAGS)
    p.add_argument("--save-sketches", action="store_true", help="also write OUT/sketches/ (safetensors + manifest): the per-group gradients, sketches and curvature terms the score came from, for --from-sketches")
    p.add_argument("--from-sketches", metavar="DIR", help="rank again from saved sketches (a --save-sketches output, or its sketches/) without a model pass: only --score, --delta, --lam may change; the other ranking flags are the saved ones")
    add_progress(p)
    add_data(p)
    add_common(p, "directory for ranking.parquet and ranking.json (and sketches/ with --save-sketches)")


def rank(args) -> int:
    """Cut --model into parameter groups and rank them by --score on --forget/--retain. Writes
    ranking.parquet (group, layer, kind, role, n_params, tied, score, rank, and the score's own
    columns; for soir a, b, c_f, c_r, eta, forget_gain, retain_damage) and ranking.json (settings,
    versions, seeds, timings); with --save-sketches also sketches/, the per-group quantities the
    scores came from, and with --from-sketches DIR it ranks again from those without a model pass."""
    from soir.distributed import barrier, is_main
    from soir.quantities import SKETCHES_DIR
    from soir.ranking import SETTINGS_FILE, RankSettings, rerank

    from_sketches, save = args.from_sketches, args.save_sketches
    given = [flag for flag, value in (("--model", args.model), ("--forget", args.forget), ("--retain", args.retain)) if value]
    if from_sketches:
        if given:
            raise UserError(f"--from-sketches ranks again without a model pass: leave out {', '.join(given)}")
        source = Path(from_sketches).resolve()
        if Path(args.out).resolve() in (source, source.parent):
            raise UserError(f"--out {args.out} would replace the sketches read from {from_sketches}: choose another directory")
    elif len(given) < 3:
        missing = [f for f in ("--model", "--forget", "--retain") if f not in given]
        raise UserError(f"soir rank needs {', '.join(missing)} (or --from-sketches DIR to rank again from saved sketches)")
    out = check_out_dir(args.out, SETTINGS_FILE)
    barrier()  # every process has checked --out before the main one writes into it
    defaults = RankSettings()
    if from_sketches:
        ranking = rerank(from_sketches, score=args.score, delta=args.delta, lam=args.lam)
        settings = ranking.settings
    else:
        chosen = {k: getattr(defaults, k) if getattr(args, k) is None else getattr(args, k) for k in ("score", "delta", "lam")}
        settings = from_args(RankSettings, args, RANK_FLAGS, seed=args.seed, **chosen)
        ranking = _rank_from_model(args, settings, keep_quantities=save)

    def write(tmp: Path) -> None:
        ranking.save(tmp)
        if save:
            ranking.save_quantities(tmp / SKETCHES_DIR)

    if not is_main():  # under torchrun every process holds the same ranking; one writes it
        return 0
    write_dir(out, write)
    top = ranking.ranked().head(5)
    order = "ascending: lower is better" if ranking.lower_is_better else "descending: higher is better"
    how = f"from the sketches at {ranking.info['from_sketches']}" if from_sketches else f"in {ranking.info['timings_s']['total']:.1f} s"
    print(f"ranked {len(ranking.table)} {settings.granularity} groups by {settings.score} ({order}) {how}; best: " + ", ".join(top["group"]))
    print(f"wrote {out / 'ranking.parquet'} and {out / SETTINGS_FILE}" + (f", and {out / SKETCHES_DIR}/" if save else ""))
    return 0


def _rank_from_model(args, settings, keep_quantities: bool):
    """The model pass of `soir rank`: read the splits, load the model(s), rank."""
    import torch

    from soir.data import pad_id
    from soir.flags import data_settings
    from soir.ranking import rank as rank_groups
    from soir.scores import get_score

    if get_score(settings.score).needs_base and not args.base:
        raise UserError(f"--score {settings.score} needs the base model (the checkpoint this model was finetuned from): give --base DIR")
    data = data_settings(args)
    model_spec = model_settings(args, dtype="float32")
    forget_frame, retain_frame = data.read(args.forget), data.read(args.retain)
    tokenizer = model_spec.load_tokenizer()
    torch.manual_seed(args.seed)
    model = model_spec.load(tokenizer, eager_attention=True, seed=args.seed)
    base = dataclasses.replace(model_spec, model=args.base).load(tokenizer, eager_attention=True) if args.base else None
    ranking = rank_groups(model, data.encode(forget_frame, tokenizer), data.encode(retain_frame, tokenizer), pad_id(tokenizer), settings,
                          base_model=base, progress=not args.no_progress, keep_quantities=keep_quantities)
    ranking.info["inputs"] = {
        "model": str(args.model), "tokenizer": model_spec.tokenizer_dir, "base": args.base,
        "forget": str(args.forget), "retain": str(args.retain), "template": args.template, "columns": args.columns,
        "max_length": args.max_length,
    }
    return ranking


# ---------------------------------------------------------------- soir select


def select_arguments(p) -> None:
    p.add_argument("--ranking", required=True, metavar="DIR|FILE", help="a `soir rank` output directory, or its ranking.parquet / ranking.json")
    p.add_argument("--model", required=True, metavar="DIR|tiny:ARCH", help="the model the ranking was made for")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory (only for tiny:*)")
    add_selection(p, with_ranking=False)
    add_common(p, "directory for mask.safetensors and mask.json")


def select(args) -> int:
    """Select the top fraction of a ranking's groups (or of their parameters) for --model and write
    mask.safetensors + mask.json, the --mask of `soir unlearn`."""
    from soir.mask import SUMMARY_FILE
    from soir.models import ModelSettings
    from soir.ranking import load as load_ranking
    from soir.select import select as select_groups

    out = check_out_dir(args.out, SUMMARY_FILE)
    settings = selection_settings(args)
    ranking = load_ranking(args.ranking)
    spec = ModelSettings(model=args.model, tokenizer=args.tokenizer)
    spec.check()
    model = spec.load(spec.load_tokenizer() if args.tokenizer else None)
    mask = select_groups(ranking, model, settings)
    mask.settings["ranking"]["path"] = str(args.ranking)
    mask.settings["model"] = str(args.model)
    write_dir(out, mask.save)
    print(f"selected {mask.settings['n_groups']} of {mask.settings['n_candidates']} groups, "
          f"{mask.n_selected:,} of {mask.n_total:,} parameters ({mask.n_selected / max(mask.n_total, 1):.2%}); wrote {out / 'mask.safetensors'}")
    return 0
