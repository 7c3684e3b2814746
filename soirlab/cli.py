"""The `soir` command: one dispatcher for every subcommand (docs/design.md §11).

This top-level package is the one place that knows `soir`, `unlearn` and `analysis`. The
table below names each subcommand, its one-line help and where its flags and handler live
(`module:function`); a subcommand's module is imported only when that subcommand runs (or
shows its --help), so `soir --help` imports no torch. Each subcommand's flags take their
choices and help from the registries and their defaults from the settings dataclasses.
Mistakes a user can cause end with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys
import warnings
from dataclasses import dataclass

EXIT_USER_ERROR = 2


@dataclass(frozen=True)
class Command:
    """A subcommand: `arguments(parser)` adds its flags, `handler(args)` runs it ("module:function" each);
    the handler's docstring is the subcommand's --help description.

    A group has `children`, or a `registry` ("module:NAME", a Registry of entries with
    `arguments` and `run`, such as `analysis.attacks.ATTACKS`): one subcommand per entry.
    """

    name: str
    help: str
    arguments: str = ""
    handler: str = ""
    children: tuple["Command", ...] = ()
    registry: str = ""


COMMANDS = (
    Command("demo", "the whole study on the built-in testbed", "analysis.demo:demo_arguments", "analysis.demo:run"),
    Command("data", "datasets: `soir data synth` writes the built-in testbed", children=(
        Command("synth", "write the testbed splits and a tokenizer trained on them", "soir.commands:synth_arguments", "soir.commands:synth"),
    )),
    Command("finetune", "train a model on splits (NLL on answer tokens)", "unlearn.commands:finetune_arguments", "unlearn.commands:finetune"),
    Command("rank", "rank parameter groups by SOIR or a baseline score", "soir.commands:rank_arguments", "soir.commands:rank"),
    Command("select", "make a parameter mask from a ranking", "soir.commands:select_arguments", "soir.commands:select"),
    Command("unlearn", "masked unlearning: only the selected parameters change", "unlearn.commands:unlearn_arguments", "unlearn.commands:unlearn"),
    Command("evaluate", "SemEval-2025 Task 4, MIA, MMLU and TOFU-style metrics of a model", "analysis.commands:evaluate_arguments", "analysis.commands:evaluate"),
    Command("attack", "robustness probes of an unlearned model (relearning, …)", registry="analysis.attacks:ATTACKS"),
    Command("shift", "parameter shift from a base to a finetuned checkpoint, per tensor, layer, kind and role", "analysis.commands:shift_arguments", "analysis.commands:shift"),
    Command("curves", "unlearn each layer (or group) alone: forget/retain curves, Pareto plot, robustness summary", "analysis.commands:curves_arguments", "analysis.commands:curves"),
    Command("compare", "agreement between rankings: Spearman, Kendall, top-k overlap", "analysis.commands:compare_arguments", "analysis.commands:compare"),
)


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line and exit 2."""

    def error(self, message: str):
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(EXIT_USER_ERROR)


def _load(target: str):
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _add(sub, command: Command, path: tuple[str, ...]) -> None:
    """Add `command` to the subparsers `sub`; its flags only if `path` (the words of the command
    line) selects it, so building the parser imports just the one subcommand's module."""
    p = sub.add_parser(command.name, help=command.help, description=command.help)
    selected = path[:1] == (command.name,)
    if command.children or command.registry:
        inner = p.add_subparsers(dest=f"{command.name}_command", metavar="COMMAND", parser_class=Parser, required=True)
        if command.registry and selected:  # listing a registry's entries imports it
            registry = _load(command.registry)
            for name, entry in registry.items():
                q = inner.add_parser(name, help=registry.help(name), description=registry.help(name))
                if path[1:2] == (name,):
                    _fill(q, entry.arguments, entry.run)
        for child in command.children:
            _add(inner, child, path[1:] if selected else ())
    elif selected:
        _fill(p, _load(command.arguments), _load(command.handler))


def _fill(parser, arguments, run) -> None:
    """A subcommand's flags, its handler, and its handler's docstring as the --help description."""
    arguments(parser)
    parser.description = inspect.getdoc(run) or parser.description
    parser.set_defaults(run=run)


def build_parser(argv: list[str] | tuple[str, ...] = ()) -> Parser:
    """The parser for `argv`: every subcommand's name and help, and the flags of the one `argv` names."""
    parser = Parser(
        prog="soir",
        description="Localized unlearning for LLMs: rank parameters by second-order influence (SOIR), "
        "unlearn only those, and measure forgetting, retention, privacy and general ability.",
        epilog="Start with `soir demo --out DIR` for the whole study on the built-in testbed. "
        "Every subcommand has --help.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    words = tuple(a for a in argv if not a.startswith("-"))[:2]
    for command in COMMANDS:
        _add(sub, command, words)
    return parser


def _one_line_warnings(message, category, filename, lineno, line=None) -> str:
    return f"soir: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    run = getattr(args, "run", None)
    if run is None:
        parser.print_help()
        return EXIT_USER_ERROR
    warnings.formatwarning = _one_line_warnings
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    from soir.distributed import init_from_environment
    from soir.errors import UserError

    hf_logging.disable_progress_bar()  # our own bars say what is happening; theirs repeat per file
    try:
        init_from_environment()  # a process group when started by torchrun
        return run(args) or 0
    except UserError as exc:
        sys.stderr.write(f"soir: error: {exc}\n")
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        sys.stderr.write("soir: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
