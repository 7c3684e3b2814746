"""The `revert` quantity: what undoing finetuning in one group does (docs/design.md §5).

A finetuned model sits near a stationary point of its training loss, where the forget and
retain gradients cancel on every tensor that learned both ("Why localizers fail after
finetuning"); scores led by those gradients then measure depth, not knowledge. Reverting a
group to its base values asks the question directly: how much forget loss and how much
retain loss come back when this group forgets everything finetuning taught it. Forward
passes only: one evaluation of each split per group, from the group's first block up, no graph.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from soir.curvature import RecordedForwards, group_direction
from soir.data import example_losses, n_examples
from soir.groups import Group


@torch.no_grad()
def revert_quantities(model: nn.Module, base_model: nn.Module, forget: Sequence[Mapping[str, Tensor]], retain: Sequence[Mapping[str, Tensor]],
                      groups: Sequence[Group], bar=None, loss_fn: Callable = example_losses,
                      reduce: Callable[[float, int], float] | None = None) -> dict[str, Tensor]:
    """{group: tensor([forget-loss rise, retain-loss rise])} (float64) of setting the group to the
    base model's values; the model is restored bit for bit.

    Each split's forward is recorded once and a group's forwards start at its first block, the
    blocks below returning their recorded outputs (`RecordedForwards`, as `fd` and `soir-line`)."""
    named = dict(model.named_parameters())
    base = {n: p.detach() for n, p in base_model.named_parameters()}
    recorded = {"forget": RecordedForwards(model, forget, groups, loss_fn)}
    recorded["retain"] = RecordedForwards(model, retain, groups, loss_fn, recorded["forget"].starts)
    rows = {s: n_examples(b) for s, b in (("forget", forget), ("retain", retain))}

    def mean(split: str, total: float) -> float:
        value = total / rows[split]
        return value if reduce is None else reduce(value, rows[split])

    start_loss = {s: mean(s, r.base) for s, r in recorded.items()}
    out = {}
    for g in groups:
        kept = {n: named[n].detach().clone() for n in g.param_names}
        shift = group_direction(g, {n: base[n].to(named[n]) - kept[n] for n in g.param_names}, named)
        try:
            for n, v in shift.items():
                named[n].add_(v)
            rises = [mean(s, r.total(r.starts[g.name])) - start_loss[s] for s, r in recorded.items()]
        finally:
            for n in g.param_names:
                named[n].copy_(kept[n])
        out[g.name] = torch.tensor(rises, dtype=torch.float64)
        if bar is not None:
            bar.update(1)
    return out
