"""Sketches on disk: `sketches.safetensors` plus a JSON `manifest.json`, written atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

from torch import Tensor

from soir.errors import UserError
from soir.io import atomic_path

SKETCH_FILE = "sketches.safetensors"
MANIFEST_FILE = "manifest.json"


def save_sketches(path_dir: str | Path, sketches: Mapping[str, Tensor], manifest: Mapping | None = None) -> None:
    """Write `sketches.safetensors` and `manifest.json` into `path_dir`, atomically.

    The manifest (JSON-serialisable: kind, k, seed, model, split, …) is stored as given,
    with `tensors`: {name: shape} added.
    """
    from safetensors.torch import save_file

    manifest = dict(manifest or {})
    manifest["tensors"] = {name: list(t.shape) for name, t in sketches.items()}
    with atomic_path(path_dir) as tmp:
        tmp.mkdir()
        save_file({name: t.detach().cpu().contiguous() for name, t in sketches.items()}, str(tmp / SKETCH_FILE))
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")


def load_sketches(path_dir: str | Path, device="cpu") -> tuple[dict[str, Tensor], dict]:
    """Read what `save_sketches` wrote: ({name: tensor}, manifest)."""
    from safetensors.torch import load_file

    path_dir = Path(path_dir)
    if not (path_dir / SKETCH_FILE).is_file() or not (path_dir / MANIFEST_FILE).is_file():
        raise UserError(f"{path_dir} holds no sketches: it needs {SKETCH_FILE} and {MANIFEST_FILE}")
    sketches = load_file(str(path_dir / SKETCH_FILE), device=str(device))
    manifest = json.loads((path_dir / MANIFEST_FILE).read_text())
    return sketches, manifest
