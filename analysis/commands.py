"""The `analysis` package's subcommands: `evaluate` and the attacks (`soir attack relearn`, `soir attack quantize`); flags and handlers.

Everything a user supplies (files, columns, MMLU answers, flag combinations) is read and
checked before a model is loaded, and the outputs are written only at the end, each file
atomically: a mistake ends with one line (exit 2) and nothing written.
"""

from __future__ import annotations

import argparse
import math
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import pandas as pd

from soir.data import SEMEVAL_ID, parse_column_map, read_split
from soir.errors import UserError
from soir.flags import (
    add_common,
    add_data,
    add_model,
    add_progress,
    data_settings,
    model_settings,
)
from soir.io import check_out_dir
from soir.settings import add_settings, from_args

RELEARN_FLAGS = ("fraction", "steps", "lr", "batch_size", "max_new_tokens")
QUANTIZE_FLAGS = ("bits", "keep_embeddings", "generate", "max_new_tokens", "batch_size")

SUMMARY = (
    ("forget regurgitation", "forget/regurgitation"),
    ("forget knowledge", "forget/knowledge"),
    ("retain regurgitation", "retain/regurgitation"),
    ("retain knowledge", "retain/knowledge"),
    ("forget accuracy (teacher-forced)", "forget/accuracy"),
    ("retain accuracy (teacher-forced)", "retain/accuracy"),
    ("forget exact memorization", "forget/exact_memorization"),
    ("forget extraction strength", "forget/extraction_strength"),
    ("task aggregate", "task_aggregate"),
    ("MIA AUC", "mia_auc"),
    ("MIA score", "mia_score"),
    ("MMLU accuracy", "mmlu/accuracy"),
    ("forget quality", "forget_quality"),
    ("model utility", "model_utility"),
    ("final score", "final_score"),
)


def _read(name: str, path: str, columns: dict[str, str]) -> pd.DataFrame:
    frame = read_split(path, columns)
    unmatched = sum(SEMEVAL_ID.search(str(i)) is None for i in frame["id"])
    if unmatched:
        warnings.warn(
            f"{name} ({Path(path).name}): {unmatched} of {len(frame)} rows have no SemEval id (ending in sc1 or qa0-qa4); "
            "they are scored as sentence completions (ROUGE-L recall), not as questions (exact match)"
        )
    return frame


def _format(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.3f}"


def summary_lines(metrics: dict) -> list[str]:
    """The headline numbers of a `metrics.json`, one `name  value` line each (those present)."""
    width = max(len(label) for label, _ in SUMMARY)
    return [f"{label:<{width}}  {_format(metrics[key])}" for label, key in SUMMARY if key in metrics]


def evaluate_arguments(p) -> None:
    from analysis.metrics import ALL_MIA_ATTACKS, MIA_SCOPES
    from analysis.mmlu import MMLUSettings

    add_model(p)
    p.add_argument("--forget", required=True, metavar="FILE", help="the forget split (parquet, jsonl or csv)")
    p.add_argument("--retain", required=True, metavar="FILE", help="the retain split")
    p.add_argument("--holdout", metavar="FILE", help="non-members for membership inference; MIA runs when it is given")
    p.add_argument("--mia", action=argparse.BooleanOptionalAction, default=None, help="membership inference (default: on when --holdout is given; --mia without --holdout is an error)")
    p.add_argument("--mia-attack", metavar="NAME", help=f"the attack whose score enters the final score: {', '.join(ALL_MIA_ATTACKS)} (default: loss; all that run are reported)")
    p.add_argument("--reference-model", metavar="DIR", help="a reference model (same tokenizer; e.g. the retain-only oracle or the base) for the reference MIA: the row's loss minus the reference's (default: that attack is skipped)")
    p.add_argument("--mia-gradnorm", action=argparse.BooleanOptionalAction, default=None, help="the gradient-norm MIA: the norm of the gradient of each forget and holdout row's loss w.r.t. every parameter, one backward per row (default: on with MIA)")
    p.add_argument("--gradnorm-p", type=float, choices=(1.0, 2.0, float("inf")), metavar="P", help="the p of the gradient-norm MIA's p-norm: 1, 2 or inf (default: 2)")
    p.add_argument("--mia-scope", choices=MIA_SCOPES, help="tokens membership inference scores: answer (the answer and EOS after the prompt) or document (every token of prompt + answer, as SemEval computes MIA) (default: answer)")
    p.add_argument("--min-k", type=float, default=0.4, help="k of Min-K%% and Min-K%%++ (default: 0.4)")
    p.add_argument("--mmlu", metavar="FILE", help="a local MMLU-layout file (question, choices, answer index; or A-D columns), e.g. the testbed's general_mc.parquet")
    add_settings(p, MMLUSettings, ("mode", "shots"), prefix="mmlu", unset=("mode", "shots"))
    p.add_argument("--mmlu-dev", metavar="FILE", help="few-shot rows for --mmlu-mode kshot (MMLU's dev split, same layout; default: the rows of --mmlu whose split is dev, else the first K other questions of each subject)")
    p.add_argument("--mmlu-prompt", metavar="TEXT", help="MMLU prompt with {question} for --mmlu-mode loglik; each option follows as ' {choice}' (default: '{question}\\nAnswer:'; '{question}' for the testbed's general_mc, which matches its training rows)")
    p.add_argument("--oracle", metavar="DIR|FILE", help="a retain-only model directory (or its per_example.parquet) for TOFU forget quality")
    p.add_argument("--max-new-tokens", type=int, metavar="N", help="generated tokens per row at most (default: 64)")
    p.add_argument("--batch-size", type=int, metavar="N", help="rows per forward pass for generation, scoring and MMLU (default: 16, 8, 16)")
    p.add_argument("--no-generate", action="store_true", help="teacher-forced metrics only (no ROUGE, exact match or task aggregate)")
    p.add_argument("--semeval-out", metavar="DIR", help="also write the generations as the official SemEval scorer reads them: DIR/forget_0.csv and DIR/retain_0.csv (id, task, input, expected_output, model_output)")
    add_progress(p)
    add_data(p)
    add_common(p, "directory for metrics.json and per_example.parquet")


def evaluate(args) -> int:
    """Evaluate a model on --forget and --retain: greedy generation (ROUGE-L recall on completion rows,
    exact match on QA rows), teacher-forced answer probability and accuracy, exact memorization and
    extraction strength, TOFU truth ratio; membership inference (LOSS, zlib, Min-K%, Min-K%++,
    gradient-norm AUC, and the loss against --reference-model) with --holdout as non-members, on the
    answer tokens or (--mia-scope document, as SemEval) on the whole prompt + answer; MMLU-style
    accuracy with --mmlu, by option likelihood (--mmlu-mode loglik, the default) or as the SemEval
    scorer runs it (--mmlu-mode kshot: open-instruct's 5-shot prompt, argmax over the answer
    letters); TOFU forget quality with --oracle. Writes metrics.json (every aggregate, with
    settings) and per_example.parquet (every score by id); with --semeval-out DIR also the
    generations in the official scorer's layout, DIR/forget_0.csv and DIR/retain_0.csv."""
    from analysis.evaluate import (
        EvalSettings,
        semeval_tables,
        write_evaluation,
        write_semeval,
    )
    from analysis.evaluate import evaluate as run_evaluate
    from analysis.generation import GenerationSettings
    from analysis.metrics import ALL_MIA_ATTACKS, ScoreSettings
    from analysis.mmlu import MMLUSettings, read_mmlu, split_dev
    from soir.distributed import is_main
    from soir.models import check_model_dir

    out = Path(args.out)
    check_out_dir(out, overwrite=True)  # writes named files only: any directory will do
    mia_flags = {"--mia": args.mia is True, "--mia-attack": args.mia_attack is not None, "--mia-scope": args.mia_scope is not None,
                 "--reference-model": args.reference_model is not None, "--mia-gradnorm": args.mia_gradnorm is True,
                 "--gradnorm-p": args.gradnorm_p is not None}
    mia_asked = [flag for flag, given in mia_flags.items() if given]
    if mia_asked and args.holdout is None:
        raise UserError(f"membership inference needs non-members: give --holdout FILE (a split the model never saw), or drop {'/'.join(mia_asked)}")
    if mia_asked and args.mia is False:
        raise UserError(f"{mia_asked[0]} is for membership inference, which --no-mia turns off: drop one of them")
    mia = args.holdout is not None and args.mia is not False
    if args.mia_attack is not None and args.mia_attack not in ALL_MIA_ATTACKS:
        raise UserError(f"unknown --mia-attack {args.mia_attack!r}: use one of {', '.join(ALL_MIA_ATTACKS)}")
    if args.mia_attack == "reference" and args.reference_model is None:
        raise UserError("--mia-attack reference needs a reference model: give --reference-model DIR")
    for flag in ("max_new_tokens", "batch_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    mmlu_flags = {"--mmlu-mode": args.mmlu_mode, "--mmlu-shots": args.mmlu_shots, "--mmlu-dev": args.mmlu_dev, "--mmlu-prompt": args.mmlu_prompt}
    given = [flag for flag, value in mmlu_flags.items() if value is not None]
    if given and not args.mmlu:
        raise UserError(f"{given[0]} needs an MMLU file: give --mmlu FILE, or drop {given[0]}")
    mode = args.mmlu_mode or MMLUSettings().mode
    if mode == "kshot" and args.mmlu_prompt is not None:
        raise UserError("--mmlu-prompt applies to --mmlu-mode loglik only (kshot uses open-instruct's fixed prompt): drop it")
    for flag in ("--mmlu-shots", "--mmlu-dev"):
        if mode == "loglik" and mmlu_flags[flag] is not None:
            raise UserError(f"{flag} applies to --mmlu-mode kshot only: add --mmlu-mode kshot, or drop {flag}")
    mmlu_prompt = args.mmlu_prompt if args.mmlu_prompt is not None else MMLUSettings().prompt
    if "{question}" not in mmlu_prompt:
        raise UserError(f"--mmlu-prompt must contain {{question}}, got {mmlu_prompt!r}")
    if args.semeval_out is not None:
        if args.no_generate:
            raise UserError("--semeval-out writes the generations: drop --no-generate")
        check_out_dir(args.semeval_out, overwrite=True)  # writes named files only
    if not 0 < args.min_k <= 1:
        raise UserError(f"--min-k must lie in (0, 1], got {args.min_k}")

    data = data_settings(args)
    columns = parse_column_map(args.columns)
    splits = {"forget": _read("forget", args.forget, columns), "retain": _read("retain", args.retain, columns)}
    holdout = _read("holdout", args.holdout, columns) if args.holdout else None
    mmlu = read_mmlu(args.mmlu) if args.mmlu else None
    mmlu_dev = read_mmlu(args.mmlu_dev) if args.mmlu_dev else None
    oracle = None
    if args.oracle:
        oracle_path = Path(args.oracle)
        if oracle_path.is_file() and oracle_path.suffix == ".parquet":
            try:
                oracle = pd.read_parquet(oracle_path)
            except Exception as exc:
                raise UserError(f"cannot read --oracle {oracle_path}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
        elif oracle_path.is_dir():
            check_model_dir(oracle_path)
        else:
            raise UserError(f"--oracle {oracle_path} is neither a model directory nor an oracle's per_example.parquet")
        if "perturbed_outputs" not in splits["forget"].columns:
            raise UserError(f"forget quality (--oracle) needs a forget split with a 'perturbed_outputs' column (TOFU-style rows); {args.forget} has none")
    spec = model_settings(args)
    spec.check()
    reference_spec = replace(spec, model=args.reference_model) if args.reference_model else None
    if reference_spec is not None:
        reference_spec.check()

    progress = not args.no_progress
    generation = GenerationSettings(progress=progress, **{k: v for k, v in (("max_new_tokens", args.max_new_tokens), ("batch_size", args.batch_size)) if v is not None})
    scoring = ScoreSettings(max_length=args.max_length, min_k=args.min_k, progress=progress, **({"batch_size": args.batch_size} if args.batch_size else {}),
                            **({"gradnorm_p": args.gradnorm_p} if args.gradnorm_p is not None else {}))
    mmlu_settings = MMLUSettings(mode=mode, prompt=mmlu_prompt, progress=progress, **{k: v for k, v in (("shots", args.mmlu_shots), ("batch_size", args.batch_size)) if v is not None})
    if mmlu is not None:
        split_dev(mmlu, mmlu_dev)  # a file of dev rows only fails here, before the model is loaded
    settings = EvalSettings(
        template=data.template, generation=generation, scoring=scoring, mmlu=mmlu_settings,
        generate=not args.no_generate, mia=mia, mia_attack=args.mia_attack or "loss", mia_gradnorm=args.mia_gradnorm is not False,
        mia_scope=args.mia_scope or "answer", progress=progress,
    )

    tokenizer = spec.load_tokenizer()
    model = spec.load(tokenizer, seed=args.seed)
    if args.oracle and oracle is None:
        oracle = replace(spec, model=args.oracle).load(tokenizer)
    reference = reference_spec.load(tokenizer, seed=args.seed) if reference_spec is not None else None
    metrics, per_example = run_evaluate(model, tokenizer, splits, holdout=holdout, mmlu=mmlu, oracle=oracle, settings=settings, mmlu_dev=mmlu_dev,
                                        reference=reference)
    metrics["inputs"] = {
        "model": args.model, "tokenizer": spec.tokenizer_dir, "forget": args.forget, "retain": args.retain,
        "holdout": args.holdout, "mmlu": args.mmlu, "mmlu_dev": args.mmlu_dev, "oracle": args.oracle, "reference_model": args.reference_model,
        "seed": args.seed,
        "columns": columns or None, "semeval_out": args.semeval_out,
    }
    if not is_main():  # under torchrun every process holds the whole evaluation; one writes it
        return 0
    tables = semeval_tables(splits, per_example, settings) if args.semeval_out is not None else {}
    write_evaluation(out, metrics, per_example)
    written = write_semeval(args.semeval_out, tables) if tables else []
    print("\n".join(summary_lines(metrics)))
    print(f"\nwritten: {out / 'metrics.json'}, {out / 'per_example.parquet'} ({len(per_example)} rows)"
          + "".join(f", {path}" for path in written))
    return 0


def relearn_arguments(p) -> None:
    from analysis.relearn import RelearnSettings

    add_model(p)
    p.add_argument("--forget", required=True, metavar="FILE", help="the forget split (parquet, jsonl or csv)")
    add_settings(p, RelearnSettings, RELEARN_FLAGS)
    add_progress(p)
    add_data(p)
    add_common(p, "directory for relearn.json")


def attack_relearn(args) -> int:
    """The relearning attack: split --forget by person/document (the id without its SemEval suffix),
    finetune a copy of --model for --steps on --fraction of them, and report forget metrics
    (teacher-forced accuracy, QA exact match, ROUGE-L recall) on the held-back people before and
    after. Writes relearn.json."""
    from analysis.relearn import (
        RelearnSettings,
        relearn_attack,
        split_by_subject,
        summary_table,
    )
    from soir.io import write_json
    from soir.models import TINY_PREFIX

    out = Path(args.out)
    check_out_dir(out, overwrite=True)  # writes named files only: any directory will do
    data = data_settings(args)
    settings = from_args(RelearnSettings, args, RELEARN_FLAGS, seed=args.seed, template=data.template, max_length=data.max_length,
                         progress=not args.no_progress)
    forget = _read("forget", args.forget, parse_column_map(args.columns))
    split_by_subject(forget, settings.fraction, settings.seed)  # fails early when the set cannot be split
    if args.model.startswith(TINY_PREFIX):
        raise UserError("the relearning attack needs a trained model directory, not tiny:*")
    spec = model_settings(args)
    tokenizer = spec.load_tokenizer()
    result = relearn_attack(args.model, tokenizer, forget, settings=settings, device=args.device, dtype=args.dtype)
    result["inputs"] = {"model": args.model, "tokenizer": spec.tokenizer_dir, "forget": args.forget}
    write_json(out / "relearn.json", result)
    table = summary_table(result)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}", na_rep="-"))
    print(f"\nattacked {result['split']['attacked_rows']} rows ({', '.join(result['split']['attacked_subjects'])}), "
          f"measured on {result['split']['held_out_rows']} held-back rows; written: {out / 'relearn.json'}")
    return 0


def quantize_arguments(p) -> None:
    from analysis.quantize import QuantizeSettings

    add_model(p)
    p.add_argument("--forget", required=True, metavar="FILE", help="the forget split (parquet, jsonl or csv)")
    p.add_argument("--retain", required=True, metavar="FILE", help="the retain split")
    add_settings(p, QuantizeSettings, QUANTIZE_FLAGS)
    add_progress(p)
    add_data(p)
    add_common(p, "directory for quantize.json")


def attack_quantize(args) -> int:
    """The quantization probe: measure forget and retain (teacher-forced answer accuracy, probability
    and loss; QA exact match and ROUGE-L recall unless --no-generate) at full precision, round every
    weight matrix to --bits (symmetric, per output channel, round to nearest; norms and biases stay
    at full precision, embeddings and head too with --keep-embeddings) and measure again. Forgetting
    that rounding undoes was never more than a small weight change. Writes quantize.json."""
    from analysis.quantize import QuantizeSettings, quantize_probe, summary_table
    from soir.io import write_json

    out = Path(args.out)
    check_out_dir(out, overwrite=True)  # writes named files only: any directory will do
    data = data_settings(args)
    settings = from_args(QuantizeSettings, args, QUANTIZE_FLAGS, template=data.template, max_length=data.max_length, progress=not args.no_progress)
    columns = parse_column_map(args.columns)
    forget, retain = _read("forget", args.forget, columns), _read("retain", args.retain, columns)
    spec = model_settings(args)
    spec.check()
    tokenizer = spec.load_tokenizer()
    model = spec.load(tokenizer, seed=args.seed)
    result = quantize_probe(model, tokenizer, forget, retain, settings, restore=False)  # the model is not used afterwards
    result["inputs"] = {"model": args.model, "tokenizer": spec.tokenizer_dir, "forget": args.forget, "retain": args.retain, "seed": args.seed}
    write_json(out / "quantize.json", result)
    print(summary_table(result).to_string(index=False, float_format=lambda v: f"{v:.3f}", na_rep="-"))
    q = result["quantized"]
    print(f"\nrounded {q['tensors']} tensors ({q['parameters']:,} parameters) to {q['bits']} bits, relative weight change "
          f"{q['relative_change']:.2e}; kept {len(q['kept'])} at full precision; written: {out / 'quantize.json'}")
    return 0



# ---------------------------------------------------------------- soir shift


def shift_arguments(p) -> None:
    from analysis.shift import ShiftSettings

    p.add_argument("--base", required=True, metavar="DIR", help="the model before finetuning (a save_pretrained directory)")
    p.add_argument("--finetuned", required=True, metavar="DIR", help="the finetuned model (same architecture)")
    add_settings(p, ShiftSettings, ("top_singular",))
    add_progress(p)
    add_common(p, "directory for shift.parquet, shift.json and shift.png")


def shift(args) -> int:
    """Parameter shift from --base to --finetuned, streamed tensor by tensor from safetensors (sharded
    checkpoints too): per tensor the L2 norm of θ_ft − θ_base, its relative L2 (over ‖θ_base‖), the
    cosine between the two tensors, max |Δ| and, for matrices, the top singular values and stable rank
    of Δ; rolled up by layer, kind and role. Writes shift.parquet (a `level` column: tensor, layer,
    kind, role, layer_role), shift.json and shift.png (layers × roles heatmap of the relative shift)."""
    import time

    from analysis.shift import ShiftSettings, parameter_shift, write_shift
    from soir.runtime import versions

    out = check_out_dir(args.out, "shift.json")
    settings = from_args(ShiftSettings, args, ("top_singular",), seed=args.seed, progress=not args.no_progress)
    start = time.perf_counter()
    table = parameter_shift(args.base, args.finetuned, settings)
    seconds = time.perf_counter() - start
    write_shift(out, table, {"base": args.base, "finetuned": args.finetuned, "settings": asdict(settings), "seconds": seconds, "versions": versions()})
    tensors = table[table["level"] == "tensor"]
    top = table[table["level"] == "layer_role"].nlargest(3, "relative_l2")
    print(f"{len(tensors)} tensors compared in {seconds:.1f} s; largest relative shifts (layer:role): "
          + ", ".join(f"{r.name} {r.relative_l2:.3g}" for r in top.itertuples()))
    print(f"wrote {out / 'shift.parquet'}, {out / 'shift.png'}")
    return 0


# ---------------------------------------------------------------- soir curves


CURVE_FLAGS = ("by", "norms", "include", "exclude", "generate", "max_new_tokens", "target")


def curves_arguments(p) -> None:
    from analysis.curves import CurveSettings
    from unlearn.commands import WEIGHT_FLAGS, add_objective
    from unlearn.loop import TrainSettings
    from unlearn.objectives import ObjectiveSettings

    add_model(p)
    p.add_argument("--forget", required=True, metavar="FILE", help="the split to forget")
    p.add_argument("--retain", required=True, metavar="FILE", help="the split to keep")
    p.add_argument("--oracle", metavar="DIR", help="a retain-only model: its point on the Pareto plot, and closest_step in the summary")
    add_settings(p, CurveSettings, CURVE_FLAGS)
    add_objective(p)
    add_settings(p, ObjectiveSettings, WEIGHT_FLAGS, group="objective weights")
    add_settings(p, TrainSettings, ("steps", "eval_every", "batch_size", "lr", "optimizer", "weight_decay", "warmup", "schedule", "max_grad_norm"),
                 group="unlearning of each group", defaults={"steps": 30, "eval_every": 5, "lr": 1e-5, "warmup": 0})
    p.add_argument("--overwrite", action="store_true", help="start again in a --out that holds curves of other settings")
    add_progress(p)
    add_data(p)
    add_common(p, "directory for curves.parquet, summary.parquet, curves.png, pareto.png (and groups/, to continue an interrupted run)")


def curves(args) -> int:
    """Unlearn each group (--by layer, kind, module or tensor) alone for --steps steps, measuring forget
    and retain every --eval-every steps, on one model load (each group's tensors are restored after its
    run). Writes curves.parquet (group, step, forget/retain teacher-forced accuracy and loss; with
    --generate ROUGE-L recall and QA exact match), curves.png, pareto.png (retain against forget, the
    oracle as a star with --oracle) and summary.parquet (per group: retain when forget first reaches
    --target, area under the retain curve, the step closest to the oracle). An interrupted run continues
    with the groups not yet done when run again with the same flags."""
    import shutil

    from analysis.curves import SETTINGS_FILE, CurveSettings, layer_curves, write_curves
    from unlearn.commands import WEIGHT_FLAGS
    from unlearn.loop import TrainSettings
    from unlearn.objectives import ObjectiveSettings

    out = check_out_dir(args.out, SETTINGS_FILE, overwrite=args.overwrite)
    data = data_settings(args)
    train = from_args(TrainSettings, args, ("steps", "eval_every", "batch_size", "lr", "optimizer", "weight_decay", "warmup", "schedule", "max_grad_norm"),
                      seed=args.seed, progress=False)
    settings = from_args(CurveSettings, args, CURVE_FLAGS, objective=args.objective, weights=from_args(ObjectiveSettings, args, WEIGHT_FLAGS),
                         train=train, data=data)
    spec = model_settings(args, dtype="float32")
    forget, retain = data.read(args.forget), data.read(args.retain)
    tokenizer = spec.load_tokenizer()
    oracle = replace(spec, model=args.oracle).load(tokenizer) if args.oracle else None
    model = spec.load(tokenizer, seed=args.seed)
    if args.overwrite:
        shutil.rmtree(out, ignore_errors=True)
    result = layer_curves(model, tokenizer, forget, retain, settings, out=out, oracle=oracle, progress=not args.no_progress)
    write_curves(out, result)
    summary = result.summary[["group", "retain_at_target", "step_at_target", "retain_auc", "final_forget", "final_retain"]]
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.3f}", na_rep="-"))
    print(f"\nwrote {out / 'curves.parquet'}, {out / 'summary.parquet'}, {out / 'curves.png'}, {out / 'pareto.png'}")
    return 0


# ---------------------------------------------------------------- soir compare


def compare_arguments(p) -> None:
    p.add_argument("rankings", nargs="+", metavar="RANKING", help="two or more `soir rank` outputs (directories or ranking.parquet)")
    p.add_argument("--names", nargs="+", metavar="NAME", help="a name per ranking (default: their directory names)")
    p.add_argument("--pair", nargs=2, metavar=("A", "B"), help="the two rankings of the rank-vs-rank scatter (default: the first two)")
    add_common(p, "directory for compare.parquet, ranks.parquet, compare.png, compare_top10_params.png and scatter.png")


def compare(args) -> int:
    """Agreement between every pair of rankings over the same groups: Spearman ρ, Kendall τ and top-k
    overlap at 5%, 10% and 25% of the groups and of the parameters. Writes compare.parquet (one row per
    pair), ranks.parquet (each group's rank under each ranking), compare.png (Spearman heatmap),
    compare_top10_params.png and scatter.png (rank against rank for --pair)."""
    from analysis.compare import (
        check_pair,
        compare_rankings,
        rank_table,
        ranking_names,
        write_comparison,
    )
    from soir.ranking import load as load_ranking

    out = check_out_dir(args.out, "compare.parquet")
    names = args.names or ranking_names(args.rankings)
    if len(names) != len(args.rankings) or len(set(names)) != len(names):
        raise UserError(f"--names needs {len(args.rankings)} distinct names, one per ranking; got {len(names)}")
    rankings = {name: load_ranking(path) for name, path in zip(names, args.rankings)}
    pair = check_pair(args.pair, names)
    pairs = compare_rankings(rankings)
    written = write_comparison(out, pairs, rank_table(rankings), pair)
    print(pairs.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print("\nwrote " + ", ".join(str(p) for p in written))
    return 0
