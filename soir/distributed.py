"""Data parallelism on torch.distributed, for `torchrun` (docs/design.md §10).

Every process runs the same command on its own shard of the rows; what the stages compute
from rows is combined here, so every process ends with the same numbers as one process over
all rows (up to float summation order), and only the main process writes:

- means over examples (mean gradients, curvature forms, split losses): each process's local
  mean weighted by its row count, summed over processes (`weighted_means`, `global_mean`);
- per-example rows (gradient sketches): gathered in process order (`gather_rows`);
- training gradients: averaged by PyTorch's DistributedDataParallel during backward
  (`data_parallel`), each process taking every world-size-th row of each batch (`shard_batch`);
- evaluation: every world-size-th row of each split is scored by one process and the
  per-example tables gathered in the original order (`shard_frame`, `gather_frame`);
- training a model too large for one device: FSDP2 (`shard_model`), which keeps each process's
  shard of every parameter, gradient and optimiser state; checkpoints and the saved model hold
  whole tensors (`whole`, `full_state_dict`), read back into shards (`shard_like`).

With one process (no process group) every function is the identity, so nothing else changes.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from soir.errors import UserError


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def init_from_environment() -> None:
    """Join the process group `torchrun` describes (WORLD_SIZE > 1): gloo on CPU, nccl on CUDA."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def weighted_means(means: Mapping[str, Tensor | float], count: int) -> dict:
    """The global mean of each value from this process's mean over `count` rows: one all-reduce
    of Σ count·mean and Σ count. Floats stay floats, tensors keep their shape, dtype and device."""
    if world_size() == 1:
        return dict(means)
    names = list(means)
    values = [torch.as_tensor(means[n], dtype=torch.float64) for n in names]
    flat = torch.cat([v.reshape(-1).to(torch.float64).cpu() for v in values] + [torch.ones(1, dtype=torch.float64)]) * count
    flat = flat.to(_device())
    dist.all_reduce(flat)
    flat = flat.cpu()
    total = float(flat[-1])
    out, start = {}, 0
    for name, value in zip(names, values):
        part = flat[start:start + value.numel()].reshape(value.shape) / total
        start += value.numel()
        original = means[name]
        out[name] = part.to(dtype=original.dtype, device=original.device) if torch.is_tensor(original) else float(part)
    return out


def gather_rows(rows: Tensor) -> Tensor:
    """This process's rows (n_local, …) and every other's, concatenated in process order."""
    if world_size() == 1:
        return rows
    device = _device()
    size = torch.tensor([rows.shape[0]], device=device)
    sizes = [torch.zeros_like(size) for _ in range(world_size())]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *rows.shape[1:]), dtype=rows.dtype, device=device)
    padded[: rows.shape[0]] = rows.to(device)
    parts = [torch.zeros_like(padded) for _ in range(world_size())]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)]).to(rows.device)


def global_mean(value: float, count: int) -> float:
    """One scalar's global mean from this process's mean over `count` rows."""
    return weighted_means({"value": value}, count)["value"]


def total(count: int) -> int:
    """The sum of `count` over processes (rows of a sharded split)."""
    return round(global_mean(float(count), 1) * world_size())


def shard_rows(index: Sequence[int]) -> list[int]:
    """This process's share of an ordered list of rows: every world-size-th, from its rank."""
    if world_size() > 1 and len(index) < world_size():
        raise UserError(f"{len(index)} rows cannot be shared by {world_size()} processes: use more rows or fewer processes")
    return list(index)[rank()::world_size()]


def shard_batch(batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Every world-size-th row of a collated batch, from this process's rank."""
    if world_size() == 1:
        return dict(batch)
    rows = next(iter(batch.values())).shape[0]
    if rows < world_size():
        raise UserError(f"a batch of {rows} rows cannot be shared by {world_size()} processes: raise --batch-size")
    return {k: v[rank()::world_size()] for k, v in batch.items()}


def shard_frame(frame):
    """Every world-size-th row of a table, from this process's rank (a copy with a fresh index)."""
    return frame.iloc[rank()::world_size()].reset_index(drop=True)


def gather_frame(part, total: int):
    """The inverse of `shard_frame`: every process's part, rows back in their original order."""
    if world_size() == 1:
        return part
    import pandas as pd

    parts = [None] * world_size()
    dist.all_gather_object(parts, part)
    order = [i for r in range(world_size()) for i in range(r, total, world_size())]
    return pd.concat(parts, ignore_index=True).set_axis(order).sort_index()


class _DataParallel(torch.nn.parallel.DistributedDataParallel):
    """DDP that answers attribute lookups it does not know from the wrapped model (`config`,
    `model.layers`, …), so objectives take it where they take the model."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether `shard_model` has sharded `model` (FSDP2)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard_model(model: torch.nn.Module) -> None:
    """Shard `model` over the processes in place with FSDP2's `fully_shard`: one unit per
    transformer block, one for the rest (embeddings, final norm, head). Parameter names,
    shapes and requires_grad stay; each parameter becomes a DTensor holding this process's
    rows. Frozen parameters are sharded too, so a model that does not fit on one device does."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cuda" if dist.get_backend() == "nccl" else "cpu", (world_size(),))
    layers = getattr(model.config, "num_hidden_layers", None)
    blocks = next((m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == layers), None)
    if blocks is None:
        raise UserError(f"{type(model).__name__}: no list of {layers} transformer blocks to shard; run without --fsdp")
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)  # the root too: a swapped-in reference must be gathered anew


def whole(tensor: Tensor) -> Tensor:
    """A sharded tensor (DTensor) gathered whole on every process (a collective); others as they are."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def shard_like(value: Tensor, like: Tensor) -> Tensor:
    """A whole tensor cut like `like` (this process's shard when `like` is a DTensor)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor):
        return value
    return distribute_tensor(value.to(like.device, like.dtype), like.device_mesh, like.placements)


def full_state_dict(model: torch.nn.Module) -> dict[str, Tensor] | None:
    """The whole state dict of a sharded model, on the main process's CPU (a collective: every
    process calls it; the others get an empty dict); None for a model that is not sharded."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def data_parallel(model: torch.nn.Module) -> torch.nn.Module:
    """`model` under DistributedDataParallel when several processes run (else `model` itself).

    DDP buckets and all-reduces (averages) the gradients of parameters with requires_grad during
    backward, so frozen parameters outside a mask take no bucket and no traffic. Unused-parameter
    detection is on: an objective may leave some selected tensors without a gradient (RMU's
    layers after its steering layer), which plain DDP would take for a hang."""
    if world_size() == 1 or is_sharded(model):  # FSDP reduces the gradients itself
        return model
    return _DataParallel(model, device_ids=[torch.cuda.current_device()] if dist.get_backend() == "nccl" else None,
                         find_unused_parameters=True)


def average(value: float) -> float:
    """A scalar's mean over processes (for logged losses)."""
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_device())
    dist.all_reduce(t)
    return float(t) / world_size()
