"""The `revert` quantity: what undoing finetuning in one group does (docs/design.md §5).

A finetuned model sits near a stationary point of its training loss, where the forget and
retain gradients cancel on every tensor that learned both ("Why localizers fail after
finetuning"); scores led by those gradients then measure depth, not knowledge. Reverting a
group to its base values asks the question directly: how much forget loss and how much
retain loss come back when this group forgets everything finetuning taught it. Forward
passes only: two evaluations of each split per group, no graph.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from soir.curvature import group_direction
from soir.data import example_losses
from soir.groups import Group
from soir.linesearch import loss_along


@torch.no_grad()
def revert_quantities(model: nn.Module, base_model: nn.Module, forget: Sequence[Mapping[str, Tensor]], retain: Sequence[Mapping[str, Tensor]],
                      groups: Sequence[Group], bar=None, loss_fn: Callable = example_losses,
                      reduce: Callable[[float, int], float] | None = None) -> dict[str, Tensor]:
    """{group: tensor([forget-loss rise, retain-loss rise])} (float64) of setting the group to the
    base model's values; the model is restored bit for bit."""
    named = dict(model.named_parameters())
    base = {n: p.detach() for n, p in base_model.named_parameters()}
    no_step = {}
    start_forget = loss_along(model, no_step, 0.0, forget, loss_fn, reduce)
    start_retain = loss_along(model, no_step, 0.0, retain, loss_fn, reduce)
    out = {}
    for g in groups:
        shift = group_direction(g, {n: base[n].to(named[n]) - named[n].detach() for n in g.param_names}, named)
        forget_rise = loss_along(model, shift, 1.0, forget, loss_fn, reduce) - start_forget
        retain_rise = loss_along(model, shift, 1.0, retain, loss_fn, reduce) - start_retain
        out[g.name] = torch.tensor([forget_rise, retain_rise], dtype=torch.float64)
        if bar is not None:
            bar.update(1)
    return out
