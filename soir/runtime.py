"""Small helpers every stage shares: where a model lives, eval mode, moving batches, logits, versions,
and the progress bar.

Each is defined once here; stages import these names rather than keeping their own copies.
"""

from __future__ import annotations

import contextlib
import importlib.util
import platform
import sys
from typing import IO, Iterator, Mapping

import torch
from torch import Tensor, nn

# notebook progress bars need ipywidgets; without it tqdm.auto only warns, so use the text bar
# (find_spec looks for it without importing it)
if importlib.util.find_spec("ipywidgets") is not None:
    from tqdm.auto import tqdm as _Bar
else:
    from tqdm.std import tqdm as _Bar
_WIDGET = any(c.__module__ == "tqdm.notebook" for c in _Bar.__mro__)  # a notebook's widget bar: kept as it is

Batch = Mapping[str, Tensor]


def is_terminal(stream: IO) -> bool:
    """Whether `stream` is a terminal, where a bar can redraw itself in place."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


class _Discard:
    """Where a bar in plain-line mode sends tqdm's own carriage-return drawing."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


class ProgressBar(_Bar):
    """tqdm's bar on a terminal and in a notebook. Where the stream is not a terminal (output sent to a
    file or a pipe: CI, `make demo > log`, captured test output) it writes a few plain lines instead of
    redrawing with carriage returns: one at the start, one each time another tenth of `total` is done,
    one at the end; with no `total`, the start and the end. A transient bar (`leave=False`, gone from a
    terminal once done) writes only its end line, and only when it ran `TRANSIENT_S` or longer."""

    TENTHS = 10
    TRANSIENT_S = 10.0

    def __init__(self, *args, **kwargs):
        self.lines_to: IO | None = None  # the stream plain lines go to (None: an ordinary bar)
        self.logged_tenth: int | None = None  # the tenth of `total` the last plain line showed
        self.logged_n: float | None = None  # and its count
        stream = kwargs.get("file") or sys.stderr
        if not _WIDGET and not kwargs.get("disable") and not is_terminal(stream):
            self.lines_to = stream
            # every update reaches display() (cheap: it draws nothing), which writes a line at each new tenth
            kwargs.update(file=_Discard(), mininterval=0, miniters=1, dynamic_ncols=False)
        super().__init__(*args, **kwargs)

    @property
    def transient(self) -> bool:
        return self.leave is False

    def tenth(self) -> int:
        """How many tenths of `total` are done (0 without a total)."""
        if not self.total:
            return 0
        return max(0, min(self.TENTHS, int(self.TENTHS * self.n // self.total)))

    def plain_line(self) -> str:
        """The bar's statistics without the bar itself ('train:  40% 20/50 [00:02<00:03, 9.8step/s, loss=1.2]')."""
        return self.format_meter(**{**self.format_dict, "ncols": 0}).replace("\r", "")

    def write_line(self) -> None:
        self.logged_n = self.n
        try:
            self.lines_to.write(self.plain_line() + "\n")
            self.lines_to.flush()
        except (OSError, ValueError):  # the stream closed under us (interpreter exit): stay quiet
            self.lines_to = None

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if self.lines_to is None:
            return super().display(msg, pos)
        tenth = self.tenth()
        if msg is None and not self.transient and tenth < self.TENTHS and (self.logged_tenth is None or tenth > self.logged_tenth):
            self.logged_tenth = tenth  # the whole of `total` gets its line from close()
            self.write_line()
        return True

    def close(self) -> None:
        if self.lines_to is not None and not self.disable:
            ran_long = self.format_dict["elapsed"] >= self.TRANSIENT_S
            if self.n != self.logged_n and (not self.transient or ran_long):  # no second line for the same count
                self.write_line()
            self.logged_tenth = self.TENTHS  # tqdm's own closing display writes nothing more
        super().close()


tqdm = ProgressBar  # the name every stage imports


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
