"""A checkpoint's tensors, one at a time: safetensors files (one, or shards with an index) or a model in memory.

`TensorSource.of(x)` takes a `save_pretrained` directory (`model.safetensors`, or
`model-0000k-of-0000n.safetensors` with `model.safetensors.index.json`) or a loaded model,
and gives its tensor names, their shapes (from the headers alone) and each tensor on request.
A tensor is read with plain file reads at the offsets its shard's header gives (safetensors
maps whole files, and the mapped pages count as the reader's memory), so streaming a 7B
checkpoint holds one tensor at a time, never a whole shard. Only safetensors are read.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor, nn

from soir.errors import UserError

DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I64": torch.int64,
          "I32": torch.int32, "I16": torch.int16, "U8": torch.uint8, "I8": torch.int8, "BOOL": torch.bool}
ITEM_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "U8": 1, "I8": 1, "BOOL": 1}
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


class TensorSource:
    """Names, shapes and values of a checkpoint's tensors (see the module docstring); every tensor
    read is a fresh copy its reader may change in place."""

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
                   {n: p.numel() * p.element_size() for n, p in params.items()}, lambda n: params[n].detach().clone())

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

        headers: dict[Path, tuple[int, dict]] = {}

        def read(key: str) -> Tensor:
            file = files[key]
            if file not in headers:
                headers[file] = _header(file)
            start, header = headers[file]
            entry = header[key]
            begin, end = entry["data_offsets"]
            out = torch.empty(entry["shape"], dtype=DTYPES[entry["dtype"]])
            with open(file, "rb") as handle:
                handle.seek(start + begin)
                if handle.readinto(memoryview(out.view(-1).view(torch.uint8).numpy())) != end - begin:
                    raise UserError(f"{file} ends inside {key}: the checkpoint is incomplete (copy or save it again)")
            return out

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


def _header(file: Path) -> tuple[int, dict]:
    """(where the data starts, the header's {name: {dtype, shape, data_offsets}}) of a safetensors file."""
    with open(file, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return 8 + length, header


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
