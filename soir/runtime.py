"""Small helpers every stage shares: where a model lives, eval mode, moving batches, logits, versions,
and the progress bar.

Each is defined once here; stages import these names rather than keeping their own copies.
"""

from __future__ import annotations

import contextlib
import importlib.util
import platform
from typing import Iterator, Mapping

import torch
from torch import Tensor, nn

# notebook progress bars need ipywidgets; without it tqdm.auto only warns, so use the text bar
# (find_spec looks for it without importing it)
if importlib.util.find_spec("ipywidgets") is not None:
    from tqdm.auto import tqdm  # noqa: F401  (re-exported: the stages' progress bar)
else:
    from tqdm.std import tqdm  # noqa: F401

Batch = Mapping[str, Tensor]


def device_of(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a parameterless module)."""
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def dtype_of(model: nn.Module) -> torch.dtype:
    """The floating dtype of the model's first floating parameter (float32 when there is none)."""
    for parameter in model.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return torch.float32


def to_device(batch: Batch, device: torch.device | str) -> dict[str, Tensor]:
    """The batch with every tensor moved to `device` (other entries passed as they are)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


@contextlib.contextmanager
def eval_mode(model: nn.Module, no_grad: bool = False) -> Iterator[None]:
    """Run with every module in eval mode (no dropout), optionally without grad; restore each
    module's own training flag afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad() if no_grad else contextlib.nullcontext():
            yield
    finally:
        for module, training in modes:
            module.training = training


def lm_inputs(batch: Batch) -> dict:
    """The keyword arguments of a causal LM's forward for a collated batch (no KV cache)."""
    return {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask"), "use_cache": False}


def lm_logits(model: nn.Module, batch: Batch) -> Tensor:
    """Logits (B, L, V) of a causal LM on a collated batch (no KV cache)."""
    return model(**lm_inputs(batch)).logits


def versions() -> dict[str, str]:
    """Versions of the libraries a result depends on, recorded in every artifact's JSON."""
    from importlib.metadata import PackageNotFoundError, version

    import numpy
    import pandas
    import transformers

    try:
        soir_version = version("soir")
    except PackageNotFoundError:
        soir_version = "unknown"
    return {"torch": torch.__version__, "transformers": transformers.__version__, "soir": soir_version,
            "python": platform.python_version(), "numpy": numpy.__version__, "pandas": pandas.__version__}
