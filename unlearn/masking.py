"""Masked optimisation: only the parameters a `Mask` selects may change (docs/design.md §7).

Parameters outside the mask get requires_grad=False and are never given to the optimiser,
so no gradient, weight decay or momentum reaches them. The optimiser trains `trained()`:

- a float32 (or float64) tensor selected whole: the parameter itself;
- an element-masked tensor: a vector of its selected entries only;
- a bf16/fp16 tensor selected whole: a float32 master copy of it.

For the last two, a hook moves the parameter's gradient into the trained tensor as soon as
backward has accumulated it (gathering the selected entries; upcast to float32 from half precision) and drops the dense
gradient, so no dense gradient or optimiser state of a partly selected tensor is kept, and
half-precision weights get float32 updates. Under torchrun the hook would see the gradient
before DistributedDataParallel has averaged it, so there `collect_gradients()` moves the
averaged gradients after backward instead (DDP keeps whole-tensor gradient buckets anyway).
After each optimiser step `sync()` writes the trained tensors back into the model; entries
outside the mask are never written, so they stay bit-identical. Per step:

    loss.backward()                  # hooks gather the selected gradients
    masked.collect_gradients()       # (under torchrun: gather them now)
    clip_grad_norm_(masked.trained().values(), ...)
    optimizer.step()
    masked.sync()
"""

from __future__ import annotations

import re
from typing import Mapping

import torch

from soir.distributed import world_size
from soir.errors import UserError
from soir.mask import Mask

FULL_PRECISION = (torch.float32, torch.float64)


class MaskedParameters:
    """Freeze `model` outside `mask` and hand the optimiser the selected entries (a context
    manager: leaving it removes the gradient hooks)."""

    def __init__(self, model, mask: Mask):
        mask.check_fits(model)
        self.model, self.mask = model, mask
        named = dict(model.named_parameters())
        selected = set(mask.names)
        for name, param in named.items():
            param.requires_grad_(name in selected)
        self._named = [(name, named[name]) for name in mask.names]
        self._trained: dict[str, torch.Tensor] = {}
        self._copies: list[tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor | None]] = []  # (parameter, trained, flat index)
        self._hooks = []
        self._in_backward = world_size() == 1  # under DDP the gradients are whole only after backward
        for name, param in self._named:
            keep = mask.elements.get(name)
            if keep is None and param.dtype in FULL_PRECISION:
                self._trained[name] = param
                continue
            index = None if keep is None else keep.to(param.device).expand(param.shape).reshape(-1).nonzero().squeeze(1)
            values = param.detach() if index is None else param.detach().reshape(-1)[index]
            master = torch.nn.Parameter(values.to(_master_dtype(param.dtype), copy=True))
            self._trained[name] = master
            self._copies.append((param, master, index))
            if self._in_backward:
                self._hooks.append(param.register_post_accumulate_grad_hook(_gather_into(master, index)))

    def __enter__(self) -> "MaskedParameters":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Remove the gradient hooks (the model is left as trained)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def trained(self) -> dict[str, torch.Tensor]:
        """name -> the tensor the optimiser updates (see the module docstring)."""
        return dict(self._trained)

    def named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The model's selected parameters, whole."""
        return list(self._named)

    def collect_gradients(self) -> None:
        """Move the model's gradients into the trained copies where no hook did during backward
        (under torchrun, after DDP's all-reduce); a no-op otherwise."""
        if self._in_backward:
            return
        for param, master, index in self._copies:
            if param.grad is not None:
                _gather_into(master, index)(param)

    @torch.no_grad()
    def sync(self) -> None:
        """Write the trained copies into the model's parameters (their selected entries only)."""
        for param, master, index in self._copies:
            if index is None:
                param.data.copy_(master)
            else:
                param.data.view(-1).index_copy_(0, index, master.to(param.dtype))

    @torch.no_grad()
    def snapshot_selected(self) -> dict[str, torch.Tensor]:
        """Copies of the current values of the selected tensors (whole tensors, also element-masked ones)."""
        return {name: param.detach().clone() for name, param in self._named}


def _master_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in FULL_PRECISION else torch.float32


def _gather_into(master: torch.Tensor, index: torch.Tensor | None):
    """A post-accumulate-grad hook: add the parameter's gradient (its `index` entries) to `master.grad`
    in the master's precision, then free the parameter's dense gradient."""

    def hook(param: torch.nn.Parameter) -> None:
        grad = (param.grad if index is None else param.grad.reshape(-1)[index]).to(master.dtype)  # a new tensor: a gather or an upcast
        if master.grad is None:
            master.grad = grad
        else:
            master.grad.add_(grad)
        param.grad = None

    return hook


def _compile(patterns, flag: str) -> list[re.Pattern]:
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as exc:
            raise UserError(f"bad {flag} regex {pattern!r}: {exc}") from None
    return compiled


def regex_mask(model, include=(), exclude=(), settings: Mapping | None = None) -> Mask:
    """Whole tensors whose names match any `include` regex (all, when none) and no `exclude` regex."""
    keep, drop = _compile(include, "--include"), _compile(exclude, "--exclude")
    names = [
        name for name, _ in model.named_parameters(remove_duplicate=False)
        if (not keep or any(r.search(name) for r in keep)) and not any(r.search(name) for r in drop)
    ]
    if not names:
        raise UserError(f"--include {list(include)} --exclude {list(exclude)} match no parameter of this model: check the names (e.g. model.layers.0.mlp)")
    return Mask.from_names(model, names, settings)
