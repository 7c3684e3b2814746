"""Robustness probes of an unlearned model, registered by name: `soir attack NAME`.

An attack is one definition (its flags and its handler) plus one `ATTACKS.register` call;
the command line builds `soir attack --help` and one subcommand per entry from this registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from analysis.commands import (
    attack_quantize,
    attack_relearn,
    quantize_arguments,
    relearn_arguments,
)
from soir.registry import Registry


@dataclass(frozen=True)
class Attack:
    """A probe's command line: `arguments(parser)` adds its flags, `run(args)` runs it (exit status)."""

    arguments: Callable[[object], None]
    run: Callable[[object], int]


ATTACKS: Registry[Attack] = Registry("attack")
ATTACKS.register("relearn", Attack(relearn_arguments, attack_relearn),
                 help="finetune on part of the forget set, measure what comes back on the rest")
ATTACKS.register("quantize", Attack(quantize_arguments, attack_quantize),
                 help="round the weights to 8 or 4 bits, measure whether forgetting survives")
