"""The reference model of KL and NPO: the model before unlearning (docs/design.md §7).

Masked unlearning changes only the selected tensors, so the reference needs the original
values of those alone: `SwapReference` keeps a copy of them and swaps it in for the
reference forward pass, instead of holding a second full model. Only when the mask is
everything does `make_reference` fall back to `CopyReference`, a full deep copy.

Build the reference from the model as it is BEFORE unlearning (on resume: before loading
the checkpoint's changed tensors). The reference forward runs in eval mode (no dropout)
and without grad; it leaves the model's parameters, and its train/eval modes, as they were.
`logits(batch)` serves KL, NPO and DPO; `apply(fn)` evaluates any `fn(model)` on the original
model (RMU's activations of a block).
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Iterable, Mapping

import torch

from soir.mask import Mask
from soir.runtime import eval_mode, lm_logits

Batch = dict[str, torch.Tensor]

class SwapReference:
    """The original values of `selected_names`, swapped into `model` for each reference forward.

    The swap rebinds each parameter's storage (`param.data = original`) and rebinds the
    current storage afterwards, so the current values come back bit for bit with no copy.
    `originals` (name → tensor) may be given, e.g. `MaskedParameters.snapshot_selected()`
    taken before training; otherwise the current values are copied now.
    """

    def __init__(self, model, selected_names: Iterable[str], originals: Mapping[str, torch.Tensor] | None = None):
        self.model = model
        named = dict(model.named_parameters())
        names = list(dict.fromkeys(selected_names))
        missing = [n for n in names if n not in named]
        if missing:
            raise KeyError(f"the model has no parameters {missing[:3]}")
        self._params = [(named[n], self._original(named[n], n, originals)) for n in names]

    @staticmethod
    def _original(param, name, originals) -> torch.Tensor:
        if originals is None:
            return param.detach().clone()
        value = originals[name]
        if value.shape != param.shape or value.dtype != param.dtype or value.device != param.device:
            raise ValueError(f"original of {name} is {tuple(value.shape)} {value.dtype} on {value.device}; the parameter is {tuple(param.shape)} {param.dtype} on {param.device}")
        return value

    @torch.no_grad()
    def apply(self, fn: Callable[[torch.nn.Module], Any]) -> Any:
        """`fn(model)` with the original values swapped in, in eval mode and without grad."""
        current = [param.data for param, _ in self._params]
        try:
            for param, original in self._params:
                param.data = original
            with eval_mode(self.model):
                return fn(self.model)
        finally:
            for (param, _), data in zip(self._params, current):
                param.data = data

    @torch.no_grad()
    def logits(self, batch: Batch) -> torch.Tensor:
        return self.apply(lambda model: lm_logits(model, batch).detach())


class CopyReference:
    """A frozen deep copy of the whole model (for a mask that selects everything)."""

    def __init__(self, model):
        self.model = copy.deepcopy(model).eval()
        for param in self.model.parameters():
            param.requires_grad_(False)

    @torch.no_grad()
    def apply(self, fn: Callable[[torch.nn.Module], Any]) -> Any:
        """`fn(copy)` on the frozen copy, without grad."""
        return fn(self.model)

    @torch.no_grad()
    def logits(self, batch: Batch) -> torch.Tensor:
        return lm_logits(self.model, batch).detach()


def make_reference(model, mask: Mask, originals: Mapping[str, torch.Tensor] | None = None):
    """`CopyReference` when `mask` selects every parameter whole, else a `SwapReference` of its tensors."""
    if mask.is_full:
        return CopyReference(model)
    return SwapReference(model, mask.names, originals)
