"""Masks: which parameters (whole tensors) and which entries (element masks) may change.

A `Mask` is made for one model: it records the model's architecture class and the
(name, shape) of every parameter (its fingerprint), so it cannot be applied to another.

On disk (`soir select` writes it, `--mask FILE` reads it) it is two files in a directory:

- `mask.safetensors`, the artifact: one tensor per selected parameter. A 0-d uint8 tensor
  `tensor::NAME` marks NAME selected whole; a uint8 0/1 tensor `elements::NAME` is an
  element mask. The header metadata holds `format=soir-mask`, the version, the
  fingerprint and the settings (JSON), so this file alone is enough to load the mask.
- `mask.json`, a readable summary: names, counts, fingerprint, settings.

An element mask has the parameter's number of dimensions; each of its sizes is the
parameter's or 1 (it broadcasts). An MLP neuron of a `Linear` up projection (out, in) is a
row, mask shape (out, 1); of a GPT-2 `Conv1D` c_fc (in, out) it is a column, shape (1, out).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import torch

from soir.errors import UserError
from soir.io import atomic_path, write_json

FORMAT = "soir-mask"
VERSION = 1
TENSORS_FILE = "mask.safetensors"
SUMMARY_FILE = "mask.json"
_WHOLE = "tensor::"
_ELEMENTS = "elements::"


@dataclass(frozen=True)
class Fingerprint:
    """The model a mask was made for: its class name and every parameter's (name, shape)."""

    architecture: str
    parameters: tuple[tuple[str, tuple[int, ...]], ...]

    @classmethod
    def of(cls, model) -> "Fingerprint":
        from torch.distributed.fsdp import FSDPModule

        own = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))  # not FSDP's subclass of a sharded model
        return cls(own.__name__, tuple((n, tuple(p.shape)) for n, p in model.named_parameters()))

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self.parameters)

    def to_json(self) -> dict:
        return {"architecture": self.architecture, "parameters": [[n, list(s)] for n, s in self.parameters]}

    @classmethod
    def from_json(cls, obj: Mapping) -> "Fingerprint":
        return cls(str(obj["architecture"]), tuple((str(n), tuple(int(d) for d in s)) for n, s in obj["parameters"]))


@dataclass(eq=False)
class Mask:
    """Selected parameters of one model.

    `tensors`: names of parameters selected whole. `elements`: name → bool tensor (the
    parameter's shape, or broadcastable to it with sizes 1) of the entries that may change.
    A name is in at most one of the two. `settings`: how the mask was made (for the record).
    """

    fingerprint: Fingerprint
    tensors: list[str] = field(default_factory=list)
    elements: dict[str, torch.Tensor] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    def __post_init__(self):
        shapes = self.fingerprint.shapes
        unknown = [n for n in list(self.tensors) + list(self.elements) if n not in shapes]
        if unknown:
            raise UserError(f"the mask names parameters the model does not have: {_few(unknown)}")
        both = set(self.tensors) & set(self.elements)
        if both:
            raise ValueError(f"parameters both whole and element-masked: {_few(sorted(both))}")
        for name, mask in self.elements.items():
            if mask.dtype != torch.bool:
                raise ValueError(f"element mask of {name} must be a bool tensor, not {mask.dtype}")
            if not broadcasts(tuple(mask.shape), shapes[name]):
                raise UserError(f"the element mask of {name} has shape {tuple(mask.shape)}, which does not fit the parameter's {shapes[name]}")
        order = {n: i for i, (n, _) in enumerate(self.fingerprint.parameters)}
        self.tensors = sorted(set(self.tensors), key=order.__getitem__)
        self.elements = {n: self.elements[n].cpu() for n in sorted(self.elements, key=order.__getitem__)}

    # ------------------------------------------------------------ building

    @classmethod
    def from_selection(
        cls,
        model,
        tensors: Iterable[str] = (),
        elements: Mapping[str, torch.Tensor] | None = None,
        settings: Mapping | None = None,
    ) -> "Mask":
        """A mask for `model` from whole-tensor names and element masks.

        Names may be any alias of a tied parameter (e.g. `lm_head.weight`); they are stored
        under the parameter's first name. An element mask that selects every entry becomes a
        whole tensor, one that selects none is dropped; a name given both ways is whole.
        A selection of nothing is a UserError.
        """
        alias = _aliases(model)
        tensors = [_canonical(alias, n) for n in tensors]
        whole = set(tensors)
        kept: dict[str, torch.Tensor] = {}
        for name, mask in (elements or {}).items():
            name = _canonical(alias, name)
            mask = torch.as_tensor(mask).to(torch.bool).cpu()
            if name in whole or not mask.any():
                continue
            if mask.all():
                tensors.append(name)
                whole.add(name)
                continue
            kept[name] = mask | kept[name] if name in kept else mask
        if not tensors and not kept:
            raise UserError("the selection matches no parameter: widen it (a larger --top, or a looser --include)")
        return cls(Fingerprint.of(model), tensors, kept, dict(settings or {}))

    @classmethod
    def from_names(cls, model, names: Iterable[str], settings: Mapping | None = None) -> "Mask":
        """Select the named parameters whole."""
        return cls.from_selection(model, names, None, settings)

    @classmethod
    def full(cls, model, settings: Mapping | None = None) -> "Mask":
        """Select every parameter."""
        return cls.from_selection(model, [n for n, _ in model.named_parameters()], None, settings)

    # ------------------------------------------------------------ queries

    @property
    def names(self) -> list[str]:
        """Every parameter the mask lets change (whole or in part), in model order."""
        order = {n: i for i, (n, _) in enumerate(self.fingerprint.parameters)}
        return sorted(list(self.tensors) + list(self.elements), key=order.__getitem__)

    @property
    def is_full(self) -> bool:
        """True when every parameter is selected whole."""
        return len(self.tensors) == len(self.fingerprint.parameters)

    def selected_count(self, name: str) -> int:
        """Number of entries of parameter `name` that may change."""
        shape = self.fingerprint.shapes[name]
        if name in self.tensors:
            return math.prod(shape)
        if name in self.elements:
            mask = self.elements[name]
            repeat = math.prod(s for s, m in zip(shape, mask.shape) if m == 1 and s != 1)
            return int(mask.sum()) * repeat
        return 0

    @property
    def n_selected(self) -> int:
        """Number of parameter entries that may change."""
        return sum(self.selected_count(n) for n in self.names)

    @property
    def n_total(self) -> int:
        """Number of parameter entries of the model (tied parameters counted once)."""
        return sum(math.prod(s) for _, s in self.fingerprint.parameters)

    def element_mask(self, name: str) -> torch.Tensor:
        """The full-shape bool mask of parameter `name` (all True for a whole tensor)."""
        shape = self.fingerprint.shapes[name]
        if name in self.tensors:
            return torch.ones(shape, dtype=torch.bool)
        if name in self.elements:
            return self.elements[name].expand(shape).clone()
        return torch.zeros(shape, dtype=torch.bool)

    def check_fits(self, model, source: str = "the mask") -> None:
        """UserError unless `model` has the architecture and parameter shapes the mask was made for."""
        mine, theirs = self.fingerprint, Fingerprint.of(model)
        if mine.architecture == theirs.architecture and mine.shapes == theirs.shapes:
            return
        hint = "make the mask with this model (soir rank, soir select) or pass the model it was made for"
        if mine.architecture != theirs.architecture:
            raise UserError(f"{source} was made for a {mine.architecture} model but this model is a {theirs.architecture}: {hint}")
        a, b = mine.shapes, theirs.shapes
        for name in a:
            if name not in b:
                raise UserError(f"{source} was made for a model with parameter {name}, which this {theirs.architecture} lacks: {hint}")
            if a[name] != b[name]:
                raise UserError(f"{source} was made for a model whose {name} has shape {a[name]}; this model's has {b[name]}: {hint}")
        extra = [n for n in b if n not in a]
        raise UserError(f"this model has parameters the mask's model lacked ({_few(extra)}): {hint}")

    # ------------------------------------------------------------ disk

    def summary(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "architecture": self.fingerprint.architecture,
            "n_selected": self.n_selected,
            "n_total": self.n_total,
            "fraction": self.n_selected / max(self.n_total, 1),
            "tensors": list(self.tensors),
            "elements": {
                n: {"shape": list(self.fingerprint.shapes[n]), "mask_shape": list(m.shape), "selected": self.selected_count(n)}
                for n, m in self.elements.items()
            },
            "settings": self.settings,
            "fingerprint": self.fingerprint.to_json(),
        }

    def save(self, path_dir: str | os.PathLike) -> Path:
        """Write `mask.safetensors` and `mask.json` into `path_dir`, each atomically; return the former."""
        from safetensors.torch import save_file

        path_dir = Path(path_dir)
        path_dir.mkdir(parents=True, exist_ok=True)
        tensors = {f"{_WHOLE}{n}": torch.ones((), dtype=torch.uint8) for n in self.tensors}
        tensors.update({f"{_ELEMENTS}{n}": m.to(torch.uint8).contiguous() for n, m in self.elements.items()})
        metadata = {
            "format": FORMAT,
            "version": str(VERSION),
            "fingerprint": json.dumps(self.fingerprint.to_json()),
            "settings": json.dumps(self.settings, default=str),
        }
        target = path_dir / TENSORS_FILE
        with atomic_path(target) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
        write_json(path_dir / SUMMARY_FILE, self.summary())
        return target


def load(path: str | os.PathLike) -> Mask:
    """Read a mask from `mask.safetensors`, its `mask.json` sibling, or their directory."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir() or path.name == SUMMARY_FILE:
        path = (path if path.is_dir() else path.parent) / TENSORS_FILE
    if not path.is_file():
        raise UserError(f"mask file not found: {path} (write one with `soir select`)")
    not_mask = f"{path} is not a SOIR mask (expected the mask.safetensors that `soir select` writes)"
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise UserError(not_mask)
            if int(metadata.get("version", "0")) > VERSION:
                raise UserError(f"{path} is a mask of format version {metadata['version']}; this soir reads up to {VERSION}: upgrade soir")
            fingerprint = Fingerprint.from_json(json.loads(metadata["fingerprint"]))
            settings = json.loads(metadata.get("settings", "{}"))
            tensors, elements = [], {}
            for key in handle.keys():
                if key.startswith(_WHOLE):
                    tensors.append(key[len(_WHOLE):])
                elif key.startswith(_ELEMENTS):
                    elements[key[len(_ELEMENTS):]] = handle.get_tensor(key).to(torch.bool)
                else:
                    raise UserError(not_mask)
    except UserError:
        raise
    except Exception:  # not safetensors, a truncated file, a broken header
        raise UserError(not_mask) from None
    return Mask(fingerprint, tensors, elements, settings)


def broadcasts(mask_shape: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    """True when an element mask of `mask_shape` expands to a parameter of `shape` (same rank, sizes equal or 1)."""
    return len(mask_shape) == len(shape) and all(m in (1, s) for m, s in zip(mask_shape, shape))


def _aliases(model) -> dict[str, str]:
    """Every name of every parameter → its first name (tied parameters have several)."""
    first: dict[int, str] = {}
    alias = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        alias[name] = first.setdefault(id(p), name)
    return alias


def _canonical(alias: Mapping[str, str], name: str) -> str:
    if name not in alias:
        raise UserError(f"the model has no parameter named {name!r}")
    return alias[name]


def _few(names: list[str], k: int = 3) -> str:
    return ", ".join(names[:k]) + (f" and {len(names) - k} more" if len(names) > k else "")
