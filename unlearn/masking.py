"""Masked optimisation: only the parameters a `Mask` selects may change (docs/design.md §7).

Parameters outside the mask get requires_grad=False and are never given to the optimiser,
so no gradient, weight decay or momentum reaches them. A parameter with an element mask is
in the optimiser whole; per step the loop calls

    loss.backward()
    masked.mask_gradients()          # before clipping: the norm counts selected entries only
    clip_grad_norm_(masked.parameters(), ...)
    optimizer.step()
    masked.restore(optimizer)        # after the step: undo weight decay on masked-out entries

`restore` copies the original values back into the masked-out entries and zeroes their
optimiser state (exp_avg, exp_avg_sq, momentum buffers), so they stay bit-identical.
"""

from __future__ import annotations

import torch

from soir.mask import Mask


class MaskedParameters:
    """Freeze `model` outside `mask` and hand the optimiser the selected parameters."""

    def __init__(self, model, mask: Mask):
        mask.check_fits(model)
        self.model, self.mask = model, mask
        named = dict(model.named_parameters())
        selected = set(mask.names)
        for name, param in named.items():
            param.requires_grad_(name in selected)
        self._named = [(name, named[name]) for name in mask.names]
        # name -> (parameter, bool mask on its device, copy of the original values)
        self._elements = {
            name: (named[name], m.to(named[name].device), named[name].detach().clone())
            for name, m in mask.elements.items()
        }

    def parameters(self) -> list[torch.nn.Parameter]:
        """The parameters to give the optimiser (selected whole or in part)."""
        return [p for _, p in self._named]

    def named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return list(self._named)

    @property
    def has_elements(self) -> bool:
        return bool(self._elements)

    @torch.no_grad()
    def mask_gradients(self) -> None:
        """Zero the gradient entries outside the element masks. Call before gradient clipping."""
        for param, keep, _ in self._elements.values():
            if param.grad is not None:
                param.grad.masked_fill_(~keep, 0)

    @torch.no_grad()
    def restore(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Copy the original values back into masked-out entries; zero their optimiser state.

        Call after every `optimizer.step()`. Any state tensor shaped like the parameter
        (Adam's exp_avg, exp_avg_sq, max_exp_avg_sq; SGD's momentum_buffer) is zeroed there.
        """
        for param, keep, original in self._elements.values():
            param.copy_(torch.where(keep, param, original))
            if optimizer is not None:
                for value in optimizer.state.get(param, {}).values():
                    if torch.is_tensor(value) and value.shape == param.shape:
                        value.masked_fill_(~keep, 0)

    @torch.no_grad()
    def snapshot_selected(self) -> dict[str, torch.Tensor]:
        """Copies of the current values of the selected tensors (whole tensors, also element-masked ones)."""
        return {name: param.detach().clone() for name, param in self._named}
