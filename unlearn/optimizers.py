"""Optimizers, registered by name (`--optimizer`): one factory plus one registration each.

A factory takes the parameters to train and the `TrainSettings` and returns a
`torch.optim.Optimizer`. The training loop checkpoints whatever per-parameter state the
optimizer keeps (`optimizer.state`, every entry a tensor) and restores it exactly on resume,
and masked training zeroes the state of masked-out entries (every state tensor shaped like
its parameter), so any optimizer registered here keeps the exact-mask rules (docs/design.md §7).

An optimizer that preconditions with a curvature estimate declares `hessian_every = k` and a
method `update_hessian(batch_size)`: the training loop then runs the Gauss–Newton–Bartlett pass
(`unlearn.objectives.gnb_loss`) before updates 0, k, 2k, … and calls it with the pass's
gradient in `.grad` (masked like a training gradient) and the number of positions it averaged.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

from soir.errors import UserError
from soir.registry import Registry

OptimizerFactory = Callable[[Iterable[torch.nn.Parameter], "object"], torch.optim.Optimizer]
OPTIMIZERS: Registry[OptimizerFactory] = Registry("optimizer", "--optimizer")


@OPTIMIZERS.register("adamw", help="AdamW with decoupled weight decay")
def adamw(params, settings) -> torch.optim.Optimizer:
    return torch.optim.AdamW(list(params), lr=settings.lr, betas=settings.betas, weight_decay=settings.weight_decay)


@OPTIMIZERS.register("sgd", help="SGD, with --momentum")
def sgd(params, settings) -> torch.optim.Optimizer:
    return torch.optim.SGD(list(params), lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)


def check_sophia(rho: float, betas: tuple[float, float], eps: float, hessian_every: int) -> None:
    """Raise a one-line UserError when SophiaG's settings are unusable."""
    if not (math.isfinite(rho) and rho > 0):
        raise UserError(f"--rho must be a positive number (SophiaG's ρ scales the Hessian in the clipped ratio), got {rho}")
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise UserError(f"--sophia-betas must be two numbers in [0, 1) (β1 of the momentum, β2 of the Hessian average), got {' '.join(map(str, betas))}")
    if not (math.isfinite(eps) and eps > 0):
        raise UserError(f"--sophia-eps must be a positive number (the floor of ρ·h), got {eps}")
    if int(hessian_every) != hessian_every or hessian_every < 1:
        raise UserError(f"--hessian-every must be a whole number of steps >= 1, got {hessian_every}")


class SophiaG(torch.optim.Optimizer):
    """SophiaG (Liu et al. 2023, "Sophia: A Scalable Stochastic Second-order Optimizer for Language
    Model Pre-training", Algorithm 3 with the Gauss–Newton–Bartlett estimator of Algorithm 2).

    Per parameter, with g the (clipped, masked) training gradient:

        m ← β1·m + (1 − β1)·g                              every step
        h ← β2·h + (1 − β2)·ĥ,  ĥ = B·ĝ⊙ĝ                  every k steps (`update_hessian(B)`)
        θ ← θ − η·λ·θ                                       decoupled weight decay
        θ ← θ − η·clip(m / max(ρ·h, ε), 1)                  clip(z, 1) = max(min(z, 1), −1)

    ĝ is the gradient of the mean loss over B positions against labels sampled from the model
    (the loop computes it and leaves it in `.grad`), so B·ĝ⊙ĝ estimates the diagonal of the
    Gauss–Newton matrix of that mean loss without bias. h starts at 0 and is not bias-corrected,
    as in the paper; every coordinate moves by at most η per step. The reference implementation
    keeps the EMA of ĝ⊙ĝ and multiplies by B in the step, and adds ε instead of taking the
    max; with the same B the two agree up to ε. State (all tensors, so checkpoints hold it
    whole): `step` (0-d), `exp_avg` (m) and `hessian` (h), the last two shaped like the
    parameter, so masked training zeroes them on masked-out entries.
    """

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.965, 0.99), rho: float = 0.04,
                 weight_decay: float = 0.0, eps: float = 1e-12, hessian_every: int = 10):
        check_sophia(rho, tuple(betas), eps, hessian_every)
        if not lr > 0:
            raise UserError(f"the learning rate must be positive, got {lr}")
        if weight_decay < 0:
            raise UserError(f"--weight-decay must be >= 0, got {weight_decay}")
        self.hessian_every = int(hessian_every)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), rho=rho, weight_decay=weight_decay, eps=eps))

    def _state(self, param: torch.Tensor) -> dict:
        state = self.state[param]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["hessian"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def update_hessian(self, batch_size: int) -> None:
        """h ← β2·h + (1 − β2)·B·ĝ⊙ĝ with ĝ each parameter's `.grad` (the GNB pass's mean-loss
        gradient) and B = `batch_size`, the number of positions that mean ran over."""
        for group in self.param_groups:
            beta2 = group["betas"][1]
            for param in group["params"]:
                if param.grad is None:
                    continue
                hessian = self._state(param)["hessian"]
                hessian.mul_(beta2).addcmul_(param.grad, param.grad, value=(1 - beta2) * batch_size)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1 = group["betas"][0]
            lr, rho, eps, decay = group["lr"], group["rho"], group["eps"], group["weight_decay"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self._state(param)
                state["step"] += 1
                if decay:
                    param.mul_(1 - lr * decay)
                exp_avg = state["exp_avg"]
                exp_avg.mul_(beta1).add_(param.grad, alpha=1 - beta1)
                ratio = (exp_avg / (rho * state["hessian"]).clamp_min(eps)).clamp_(-1, 1)
                param.add_(ratio, alpha=-lr)
        return loss


@OPTIMIZERS.register("sophiag", help="SophiaG (Liu et al. 2023): momentum over a clipped diagonal Gauss–Newton preconditioner, "
                                     "its GNB estimate refreshed every --hessian-every steps; see --rho, --sophia-betas")
def sophiag(params, settings) -> torch.optim.Optimizer:
    return SophiaG(list(params), lr=settings.lr, betas=settings.sophia_betas, rho=settings.rho, weight_decay=settings.weight_decay,
                   eps=settings.sophia_eps, hessian_every=settings.hessian_every)


def make_optimizer(name: str, params, settings) -> torch.optim.Optimizer:
    return OPTIMIZERS.get(name)(params, settings)
