"""A checkpoint's tensors, one at a time: safetensors files (one, or shards with an index) or a model in memory.

`TensorSource.of(x)` takes a `save_pretrained` directory (`model.safetensors`, or
`model-0000k-of-0000n.safetensors` with `model.safetensors.index.json`) or a loaded model,
and gives its tensor names, their shapes (from the headers alone) and each tensor on request.
Reading a tensor opens its shard only for that read, so streaming a 7B checkpoint holds one
tensor at a time, never the whole file. Only safetensors are read.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterator

from torch import Tensor, nn

from soir.errors import UserError

ITEM_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "U8": 1, "I8": 1, "BOOL": 1}
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


class TensorSource:
    """Names, shapes and values of a checkpoint's tensors (see the module docstring)."""

    def __init__(self, name: str, shapes: dict[str, tuple[int, ...]], nbytes: dict[str, int], read, directory: Path | None = None):
        self.name, self.shapes, self.sizes, self._read, self.directory = name, shapes, nbytes, read, directory

    @classmethod
    def of(cls, source) -> "TensorSource":
        if isinstance(source, nn.Module):
            return cls.from_model(source)
        return cls.from_directory(source)

    @classmethod
    def from_model(cls, model: nn.Module) -> "TensorSource":
        params = {n: p for n, p in model.named_parameters()}
        return cls(type(model).__name__, {n: tuple(p.shape) for n, p in params.items()},
                   {n: p.numel() * p.element_size() for n, p in params.items()}, lambda n: params[n].detach())

    @classmethod
    def from_directory(cls, directory: str | Path) -> "TensorSource":
        from safetensors import safe_open

        directory = Path(directory)
        if not directory.is_dir():
            raise UserError(f"checkpoint directory not found: {directory} (give a save_pretrained directory)")
        files = _shard_map(directory)
        shapes: dict[str, tuple[int, ...]] = {}
        sizes: dict[str, int] = {}
        for file in dict.fromkeys(files.values()):
            try:
                with safe_open(str(file), framework="pt") as handle:
                    for key in handle.keys():
                        if files.get(key) == file:
                            view = handle.get_slice(key)
                            shapes[key] = tuple(view.get_shape())
                            sizes[key] = math.prod(shapes[key]) * ITEM_BYTES.get(str(view.get_dtype()), 4)
            except Exception as exc:  # a truncated or damaged shard
                raise UserError(f"cannot read {file}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
                                "(a damaged or incomplete checkpoint: copy or save it again)") from None
        missing = [k for k in files if k not in shapes]
        if missing:
            raise UserError(f"{directory / INDEX} names {missing[0]} in {files[missing[0]].name}, which does not hold it: the checkpoint is incomplete")

        def read(key: str) -> Tensor:
            with safe_open(str(files[key]), framework="pt") as handle:
                return handle.get_tensor(key)

        return cls(str(directory), shapes, sizes, read, directory)

    def names(self) -> list[str]:
        return list(self.shapes)

    def __getitem__(self, key: str) -> Tensor:
        return self._read(key)

    def items(self) -> Iterator[tuple[str, Tensor]]:
        """(name, tensor) one at a time, in file order."""
        for key in self.shapes:
            yield key, self._read(key)

    def nbytes(self) -> int:
        """The size of all tensors, from the headers (no tensor is read)."""
        return sum(self.sizes.values())


def _shard_map(directory: Path) -> dict[str, Path]:
    """{tensor name: file} of a save_pretrained directory's safetensors."""
    index = directory / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as exc:
            raise UserError(f"{index} is not a safetensors index (it needs a weight_map): {exc}") from None
        files = {name: directory / file for name, file in weight_map.items()}
        absent = sorted({f.name for f in files.values() if not f.is_file()})
        if absent:
            raise UserError(f"{index} names shards that are missing: {', '.join(absent[:3])}: copy the whole checkpoint")
        return files
    single = directory / SINGLE
    if single.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(single), framework="pt") as handle:
                return {key: single for key in handle.keys()}
        except Exception as exc:
            raise UserError(f"cannot read {single}: {type(exc).__name__} (a damaged or incomplete checkpoint: save it again)") from None
    others = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt"))
    if others:
        raise UserError(f"{directory} holds {others[0]} but no safetensors: only safetensors are read "
                        "(load the model and save_pretrained it with safe_serialization=True)")
    raise UserError(f"{directory} holds no {SINGLE} or {INDEX}: give a save_pretrained model directory")
