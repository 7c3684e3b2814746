"""The reference model of KL and NPO: the model before unlearning (docs/design.md §7).

Masked unlearning changes only the selected entries, so the reference needs the original
values of those alone: `SwapReference` keeps a copy of them and swaps it in for the
reference forward pass, instead of holding a second full model. Only when the mask is
everything does `make_reference` fall back to `CopyReference`, a full deep copy.

Build the reference from the model as it is BEFORE unlearning (on resume: before loading
the checkpoint's changed tensors). The reference forward runs in eval mode (no dropout)
and without grad; it leaves the model's parameters, and its train/eval modes, as they were.
`logits(batch)` serves KL, NPO and DPO; `apply(fn)` evaluates any `fn(model)` on the original
model (RMU's activations of a block).

With LoRA adapters (`--lora-rank`) the base weights never change while the adapters train, so
`AdapterReference` is the model itself with its adapters switched off: no copy, no swap.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Iterable, Mapping

import torch

from soir.distributed import is_sharded
from soir.mask import Mask
from soir.runtime import eval_mode, lm_logits

Batch = dict[str, torch.Tensor]

class SwapReference:
    """The original values of `selected_names`, swapped into `model` for each reference forward.

    A whole tensor is swapped by rebinding its storage (`param.data = original`) and rebinding
    the current storage afterwards, so the current values come back bit for bit with no copy.
    For a tensor in `elements` (name -> bool mask broadcastable to it) only the selected entries'
    originals are kept, and written in and back out around the forward. `originals` (name ->
    whole tensor) may be given, e.g. `MaskedParameters.snapshot_selected()` taken before
    training; otherwise the current values are copied now.
    """

    def __init__(self, model, selected_names: Iterable[str], originals: Mapping[str, torch.Tensor] | None = None,
                 elements: Mapping[str, torch.Tensor] | None = None):
        self.model = model
        named = dict(model.named_parameters())
        names = list(dict.fromkeys(selected_names))
        missing = [n for n in names if n not in named]
        if missing:
            raise KeyError(f"the model has no parameters {missing[:3]}")
        elements = elements or {}
        self._params = [(named[n], self._original(named[n], n, originals)) for n in names if n not in elements]
        self._entries = []  # (parameter, flat index of its selected entries, their original values)
        for name in names:
            if name in elements:
                param = named[name]
                index = elements[name].to(param.device).expand(param.shape).reshape(-1).nonzero().squeeze(1)
                source = param.detach() if originals is None else self._original(param, name, originals)
                self._entries.append((param, index, source.reshape(-1)[index].clone()))

    @property
    def n_stored(self) -> int:
        """How many original values the reference keeps."""
        return sum(o.numel() for _, o in self._params) + sum(o.numel() for _, _, o in self._entries)

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
        """`fn(model)` with the original values swapped in, in eval mode and without grad.

        A sharded model's (FSDP's) parameters are views into storage FSDP gathers from, so there
        whole tensors are copied in and out instead of rebound."""
        in_place = is_sharded(self.model)
        current = [param.detach().clone() if in_place else param.data for param, _ in self._params]
        entries = [param.data.view(-1)[index] for param, index, _ in self._entries]  # a gather: a copy
        try:
            for param, original in self._params:
                _put(param, original, in_place)
            for param, index, original in self._entries:
                param.data.view(-1).index_copy_(0, index, original)
            with eval_mode(self.model):
                return fn(self.model)
        finally:
            for (param, _), data in zip(self._params, current):
                _put(param, data, in_place)
            for (param, index, _), values in zip(self._entries, entries):
                param.data.view(-1).index_copy_(0, index, values)

    @torch.no_grad()
    def logits(self, batch: Batch) -> torch.Tensor:
        return self.apply(lambda model: lm_logits(model, batch).detach())


def _put(param: torch.nn.Parameter, value: torch.Tensor, in_place: bool) -> None:
    """Give `param` the values of `value`: copied into its storage, or its storage rebound."""
    if in_place:
        param.detach().copy_(value)
    else:
        param.data = value


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


class AdapterReference:
    """The model before unlearning as the LoRA-adapted model with its adapters off (`tuner`: a peft
    `LoraModel`, whose `disable_adapter_layers` makes every adapted layer compute its base layer
    alone). Exact, since training changes the adapters only; switching back on leaves the adapters
    trainable as they were."""

    def __init__(self, tuner):
        self.tuner = tuner

    @torch.no_grad()
    def apply(self, fn: Callable[[torch.nn.Module], Any]) -> Any:
        """`fn(model)` with the adapters off, in eval mode and without grad."""
        model = self.tuner.model
        self.tuner.disable_adapter_layers()
        try:
            with eval_mode(model):
                return fn(model)
        finally:
            self.tuner.enable_adapter_layers()

    @torch.no_grad()
    def logits(self, batch: Batch) -> torch.Tensor:
        return self.apply(lambda model: lm_logits(model, batch).detach())


def make_reference(model, mask: Mask, originals: Mapping[str, torch.Tensor] | None = None):
    """`CopyReference` when `mask` selects every parameter whole (of an unsharded model), else a
    `SwapReference` of its tensors (of the selected entries only, for element-masked ones)."""
    if mask.is_full and not is_sharded(model):
        return CopyReference(model)
    return SwapReference(model, mask.names, originals, mask.elements)
