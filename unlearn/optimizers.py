"""Optimizers, registered by name (`--optimizer`): one factory plus one registration each.

A factory takes the parameters to train and the `TrainSettings` and returns a
`torch.optim.Optimizer`. The training loop checkpoints whatever per-parameter state the
optimizer keeps (`optimizer.state`) and restores it exactly on resume, and masked training
zeroes the state of masked-out entries, so any optimizer registered here keeps the exact-mask
rules (docs/design.md §7).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from soir.registry import Registry

OptimizerFactory = Callable[[Iterable[torch.nn.Parameter], "object"], torch.optim.Optimizer]
OPTIMIZERS: Registry[OptimizerFactory] = Registry("optimizer", "--optimizer")


@OPTIMIZERS.register("adamw", help="AdamW with decoupled weight decay")
def adamw(params, settings) -> torch.optim.Optimizer:
    return torch.optim.AdamW(list(params), lr=settings.lr, betas=settings.betas, weight_decay=settings.weight_decay)


@OPTIMIZERS.register("sgd", help="SGD, with --momentum")
def sgd(params, settings) -> torch.optim.Optimizer:
    return torch.optim.SGD(list(params), lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)


def make_optimizer(name: str, params, settings) -> torch.optim.Optimizer:
    return OPTIMIZERS.get(name)(params, settings)
