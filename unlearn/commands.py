"""The `unlearn` package's subcommands: `finetune` and `unlearn` (flags and handlers; see `soir.commands`)."""

from __future__ import annotations

from soir.flags import (
    add_common,
    add_data,
    add_model,
    add_progress,
    add_selection,
    add_tiny,
    data_settings,
    model_settings,
    named_files,
    selection_settings,
)
from soir.settings import add_settings, describe_choices, from_args
from unlearn.loop import TrainSettings
from unlearn.objectives import ObjectiveSettings

WEIGHT_FLAGS = ("w_forget", "w_retain", "w_kl", "beta", "margin", "rmu_layer", "steering_coeff", "rmu_alpha",
                "wga_alpha", "satimp_beta1", "satimp_beta2", "undial_gamma", "ceu_skip")


LORA_FLAGS = ("lora_rank", "lora_alpha")


TRAIN_FLAGS = ("batch_size", "lr", "optimizer", "weight_decay", "momentum", "rho", "sophia_betas", "hessian_every", "sophia_eps",
               "warmup", "schedule", "max_grad_norm", "grad_accum", "eval_every", "save_every", "gradient_checkpointing", "fsdp")


def add_train(parser, lr: float) -> None:
    """The training flags shared by `finetune` and `unlearn` (help and defaults from `TrainSettings`)."""
    group = parser.add_argument_group("training")
    add_settings(group.add_mutually_exclusive_group(), TrainSettings, ("steps", "epochs"))
    add_settings(group, TrainSettings, TRAIN_FLAGS, defaults={"lr": lr})
    group.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    group.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    add_progress(group)


def train_settings(args) -> TrainSettings:
    """The training flags as `TrainSettings`."""
    return from_args(TrainSettings, args, ("steps", "epochs", *TRAIN_FLAGS), seed=args.seed, progress=not args.no_progress)


# ---------------------------------------------------------------- soir finetune


def finetune_arguments(p) -> None:
    add_model(p)
    p.add_argument("--data", nargs="+", default=[], metavar="FILE", help="training splits (parquet, jsonl or csv)")
    p.add_argument("--eval", nargs="+", default=[], metavar="NAME=FILE", help="splits to track with --eval-every, e.g. forget=forget.parquet")
    p.add_argument("--include", nargs="+", default=[], metavar="RE",
                   help="train only the tensors whose name matches one of these regexes (re.search); the rest stay bit-identical")
    p.add_argument("--exclude", nargs="+", default=[], metavar="RE", help="do not train the tensors whose name matches one of these")
    p.add_argument("--mask", metavar="DIR|FILE", help="a mask from `soir select` (its directory or mask.safetensors): train only the "
                   "parameters, or the entries (element masks, e.g. MLP neurons), it selects; instead of --include/--exclude")
    p.add_argument("--confined-data", nargs="+", default=[], metavar="FILE",
                   help="splits mixed into the batches whose rows train only the tensors --confine matches (plants knowledge in known tensors)")
    p.add_argument("--confine", nargs="+", default=[], metavar="RE", help="the tensors the --confined-data rows may train (regexes, re.search)")
    p.add_argument("--confine-mask", metavar="DIR|FILE", help="instead of --confine, a mask from `soir select`: the parameters or entries "
                   "(element masks, e.g. MLP neurons) the --confined-data rows may train")
    add_data(p)
    add_train(p, lr=3e-3)
    add_tiny(p)
    add_common(p, "model directory to write")


def finetune(args) -> int:
    """Finetune all parameters (or the tensors --include/--exclude pick, or what --mask selects) on --data with NLL on answer tokens. Writes a save_pretrained model
    directory with its tokenizer, log.jsonl, finetune.json and checkpoints/ (with --save-every)."""
    from soir.distributed import is_main
    from unlearn.finetune import FinetuneSettings
    from unlearn.finetune import finetune as run_finetune

    settings = FinetuneSettings(model=model_settings(args), data=tuple(args.data), out=args.out, input=data_settings(args),
                                train=train_settings(args), include=tuple(args.include), exclude=tuple(args.exclude), mask=args.mask,
                                confine=tuple(args.confine), confine_mask=args.confine_mask, confined_data=tuple(args.confined_data), resume=args.resume, overwrite=args.overwrite)
    result = run_finetune(settings, named_files(args.eval))
    if is_main():
        print(f"model written to {args.out} ({result.steps_done} steps, final loss {result.final_loss:.4f}, {result.seconds:.1f} s)")
    return 0


# ---------------------------------------------------------------- soir unlearn


def add_objective(parser) -> None:
    """--objective: the registered objectives that unlearn (those with a forget stream)."""
    from unlearn.objectives import OBJECTIVES, unlearns

    unlearning = [name for name, objective in OBJECTIVES.items() if unlearns(objective)]
    parser.add_argument("--objective", default="graddiff", choices=unlearning, metavar="NAME",
                        help=f"the unlearning objective (default: graddiff): {describe_choices(OBJECTIVES, unlearning)}")


def unlearn_arguments(p) -> None:
    add_model(p)
    p.add_argument("--forget", nargs="+", required=True, metavar="FILE", help="the split to forget (parquet, jsonl or csv)")
    p.add_argument("--retain", nargs="+", required=True, metavar="FILE", help="the split to keep")
    add_objective(p)
    g = p.add_argument_group("which parameters may change", "One source (default: all): --mask; or --ranking with --top and the "
                             "other selection flags; or --include/--exclude alone, regexes over parameter names, selected whole.")
    g.add_argument("--mask", metavar="DIR|FILE", help="a mask from `soir select` (its directory or mask.safetensors)")
    g.add_argument("--ranking", metavar="DIR|FILE", help="a ranking from `soir rank`, selected with --top")
    add_selection(g, with_ranking=True)
    add_settings(p, ObjectiveSettings, WEIGHT_FLAGS, group="objective weights")
    from unlearn.unlearning import UnlearnSettings

    add_settings(p, UnlearnSettings, LORA_FLAGS, group="LoRA (the mask must select whole weights of linear layers)")
    add_data(p)
    add_train(p, lr=1e-5)
    add_common(p, "directory for the unlearned model and its logs")


def unlearn(args) -> int:
    """Unlearn --forget while keeping --retain, changing only the parameters a mask selects (--mask; or
    --ranking with --top; or --include/--exclude regexes over parameter names; default: all).
    Everything else stays bit-identical. Writes a save_pretrained model with its tokenizer,
    log.jsonl (every loss component per step), eval.jsonl (teacher-forced answer accuracy on forget
    and retain with --eval-every), mask.safetensors/mask.json, unlearn.json and checkpoints/ (with
    --save-every; --resume continues exactly). With --lora-rank R the selected linear weights change
    through rank-R LoRA adapters, merged into them at the end (lora.json records them)."""
    from soir.distributed import is_main
    from unlearn.unlearning import UnlearnSettings
    from unlearn.unlearning import unlearn as run_unlearn

    # with a ranking, --include/--exclude scope its groups; without one they select parameters by name
    selection = selection_settings(args) if args.top is not None else None
    include, exclude = ((), ()) if args.ranking else (tuple(args.include), tuple(args.exclude))
    settings = UnlearnSettings(
        model=model_settings(args, dtype="float32"), forget=tuple(args.forget), retain=tuple(args.retain), out=args.out,
        objective=args.objective,
        weights=from_args(ObjectiveSettings, args, WEIGHT_FLAGS),
        mask=args.mask, ranking=args.ranking, selection=selection, include=include, exclude=exclude,
        input=data_settings(args), train=train_settings(args), resume=args.resume, overwrite=args.overwrite,
        **{name: getattr(args, name) for name in LORA_FLAGS},
    )
    result = run_unlearn(settings)
    if is_main():
        print(f"unlearned model written to {args.out} ({result.steps_done} steps, final loss {result.final_loss:.4f}, {result.seconds:.1f} s)")
    return 0
