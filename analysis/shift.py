"""Parameter shift from a base model to its finetuned model (docs/design.md §9), tensor by tensor.

Per tensor, with Δ = θ_ft − θ_base: ‖Δ‖₂ (`l2`), ‖Δ‖₂ / ‖θ_base‖₂ (`relative_l2`), the cosine
between θ_ft and θ_base, max |Δ|, and for matrices the top singular values of Δ and its stable
rank ‖Δ‖_F² / σ₁² (1 for a rank-one change; up to min(d_out, d_in) for an even spread).
Rolled up by layer, kind (attn / mlp / norm / embed / head) and role (q, k, v, o, qkv, gate,
up, down, …: GPT-2's and GPT-NeoX's names mapped to the same roles as `soir.groups`), and by
layer × role for the heatmap: a roll-up's l2 is the root of the summed squares, its
relative_l2 over the same sum of ‖θ_base‖².

Checkpoints are streamed (`soir.weights.TensorSource`): one tensor of each model at a time.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from soir.errors import UserError
from soir.runtime import tqdm
from soir.settings import setting
from soir.weights import TensorSource

LEVELS = ("tensor", "layer", "kind", "role", "layer_role")
COLUMNS = ("level", "name", "layer", "kind", "role", "n_params", "l2", "base_l2", "relative_l2", "cosine", "max_abs",
           "stable_rank", "singular_values")


@dataclass(frozen=True)
class ShiftSettings:
    """How much of each Δ's spectrum to report."""

    top_singular: int = setting(5, "top singular values of each matrix's Δ to report", metavar="K")
    exact_svd_below: int = 1 << 22  # matrices of fewer entries get exact singular values; larger ones a randomized SVD
    seed: int = 0
    progress: bool = True


def describe_names(source) -> dict[str, tuple[int | None, str, str]]:
    """{tensor name: (layer, kind, role)} from the model's architecture (`soir.groups` naming);
    a checkpoint directory's model is built on the meta device from its config, with no weights."""
    from soir.groups import parameter_groups

    if isinstance(source, torch.nn.Module):
        model = source
    else:
        from transformers import AutoConfig, AutoModelForCausalLM

        try:
            config = AutoConfig.from_pretrained(source, local_files_only=True)
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config)
        except Exception as exc:
            raise UserError(f"cannot read the model config in {source}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    return {g.name: (g.layer, g.kind, g.role) for g in parameter_groups(model, "tensor", norms="alone")}


def check_same_architecture(base: TensorSource, finetuned: TensorSource) -> None:
    """UserError naming the first tensor the two checkpoints disagree on (missing, or another shape)."""
    for name in finetuned.names():
        if name not in base.shapes:
            raise UserError(f"the checkpoints differ: {finetuned.name} has {name}, {base.name} has not (give a base and a finetuned checkpoint of one architecture)")
        if base.shapes[name] != finetuned.shapes[name]:
            raise UserError(f"the checkpoints differ: {name} is {tuple(base.shapes[name])} in {base.name} but {tuple(finetuned.shapes[name])} in {finetuned.name}")
    extra = [n for n in base.names() if n not in finetuned.shapes]
    if extra:
        raise UserError(f"the checkpoints differ: {base.name} has {extra[0]}, {finetuned.name} has not (give a base and a finetuned checkpoint of one architecture)")


def singular_values(delta: torch.Tensor, k: int, exact_below: int, seed: int) -> np.ndarray:
    """The top `k` singular values of a matrix: exact for one of fewer than `exact_below` entries,
    else randomized (`torch.svd_lowrank`, whose workspace is a few (rows × k) blocks rather than
    the full SVD's copies of the matrix), seeded without touching the global RNG."""
    k = min(k, *delta.shape)
    if delta.numel() < exact_below:
        return torch.linalg.svdvals(delta)[:k].numpy()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.svd_lowrank(delta, q=min(k + 10, *delta.shape), niter=6)[1][:k].numpy()


CHUNK = 1 << 20  # elements per float64 accumulation step: norms without a float64 copy of a large tensor


def _sums(base: torch.Tensor, finetuned: torch.Tensor) -> tuple[float, float, float, float, float]:
    """(Σ Δ², Σ θ_base², Σ θ_ft², Σ θ_ft θ_base, max |Δ|), accumulated in float64 chunk by chunk."""
    b, f = base.reshape(-1), finetuned.reshape(-1)
    totals = torch.zeros(4, dtype=torch.float64)
    largest = 0.0
    for start in range(0, b.numel(), CHUNK):
        cb, cf = b[start:start + CHUNK].double(), f[start:start + CHUNK].double()
        d = cf - cb
        totals += torch.stack([d.square().sum(), cb.square().sum(), cf.square().sum(), (cf * cb).sum()])
        largest = max(largest, float(d.abs().max()))
    return (*totals.tolist(), largest)


def tensor_shift(base: torch.Tensor, finetuned: torch.Tensor, settings: ShiftSettings = ShiftSettings(), reuse: bool = False) -> dict:
    """The per-tensor statistics (see the module docstring): norms accumulated in float64; the SVD of Δ
    in float64 for float64 weights, else float32. With `reuse`, Δ is formed in `finetuned`'s memory."""
    d_sq, b_sq, f_sq, fb, max_abs = _sums(base, finetuned) if base.numel() else (0.0, 0.0, 0.0, 0.0, 0.0)
    l2, base_l2, ft_l2 = math.sqrt(d_sq), math.sqrt(b_sq), math.sqrt(f_sq)
    row = {
        "n_params": base.numel(),
        "l2": l2,
        "base_l2": base_l2,
        "relative_l2": l2 / base_l2 if base_l2 > 0 else math.inf if l2 > 0 else 0.0,
        "cosine": fb / (ft_l2 * base_l2) if ft_l2 > 0 and base_l2 > 0 else math.nan,
        "max_abs": max_abs,
        "stable_rank": math.nan,
        "singular_values": None,
    }
    if base.dim() == 2 and l2 > 0:
        work = torch.float64 if base.dtype == torch.float64 else torch.float32
        delta = finetuned.to(work) if reuse or finetuned.dtype != work else finetuned.to(work, copy=True)
        delta.sub_(base.to(work))
        sv = singular_values(delta, settings.top_singular, settings.exact_svd_below, settings.seed)
        del delta
        row["singular_values"] = [float(x) for x in sv]
        row["stable_rank"] = d_sq / float(sv[0]) ** 2 if sv[0] > 0 else math.nan
    return row


def rollup(tensors: pd.DataFrame) -> pd.DataFrame:
    """The tensor rows rolled up by layer, kind, role and layer × role (see the module docstring)."""
    frames = []
    keys = {"layer": ["layer"], "kind": ["kind"], "role": ["role"], "layer_role": ["layer", "role"]}
    for level, by in keys.items():
        rows = tensors.dropna(subset=["layer"]) if "layer" in by else tensors
        grouped = rows.assign(l2_sq=rows["l2"] ** 2, base_sq=rows["base_l2"] ** 2).groupby(by, dropna=False, sort=True)
        agg = grouped.agg(n_params=("n_params", "sum"), l2_sq=("l2_sq", "sum"), base_sq=("base_sq", "sum"), max_abs=("max_abs", "max"))
        agg = agg.reset_index()
        agg["l2"] = np.sqrt(agg.pop("l2_sq"))
        agg["base_l2"] = np.sqrt(agg.pop("base_sq"))
        agg["relative_l2"] = agg["l2"] / agg["base_l2"].where(agg["base_l2"] > 0)
        agg["level"] = level
        agg["name"] = agg[by].astype(str).agg(":".join, axis=1) if len(by) > 1 else agg[by[0]].astype(str)
        frames.append(agg)
    out = pd.concat(frames, ignore_index=True)
    for column in ("layer", "kind", "role"):
        if column not in out:
            out[column] = None
    return out


def parameter_shift(base, finetuned, settings: ShiftSettings = ShiftSettings()) -> pd.DataFrame:
    """The shift table of two checkpoints (directories or loaded models) of one architecture:
    one row per tensor (`level == "tensor"`) and per roll-up (layer, kind, role, layer_role)."""
    sources = TensorSource.of(base), TensorSource.of(finetuned)
    check_same_architecture(*sources)
    names = describe_names(finetuned)
    order = [n for n in names if n in sources[1].shapes] + [n for n in sources[1].names() if n not in names]
    rows = []
    for name in tqdm(order, desc="parameter shift", unit="tensor", disable=not settings.progress, leave=False):
        b, f = sources[0][name], sources[1][name]
        if not (b.is_floating_point() and f.is_floating_point()):
            continue
        layer, kind, role = names.get(name, (None, "other", name.rpartition(".")[2]))
        rows.append({"level": "tensor", "name": name, "layer": layer, "kind": kind, "role": role, **tensor_shift(b, f, settings, reuse=True)})
        del b, f
    tensors = pd.DataFrame(rows)
    tensors["layer"] = tensors["layer"].astype("Int64")
    table = pd.concat([tensors, rollup(tensors)], ignore_index=True)
    table["layer"] = table["layer"].astype("Int64")
    return table[list(COLUMNS)]


def write_shift(out: Path, table: pd.DataFrame, info: dict) -> None:
    """`shift.parquet`, `shift.json` and the layers × roles heatmap `shift.png` into `out`, atomically each."""
    from analysis.plots import save_figure, shift_heatmap
    from soir.io import write_json, write_parquet

    write_parquet(out / "shift.parquet", table.assign(singular_values=table["singular_values"].map(
        lambda v: json.dumps(v) if isinstance(v, list) else None)))
    write_json(out / "shift.json", info)
    save_figure(shift_heatmap(table), out / "shift.png")


def read_shift(path: str | Path) -> pd.DataFrame:
    """A `shift.parquet` (or its directory) with `singular_values` as lists again."""
    path = Path(path)
    path = path / "shift.parquet" if path.is_dir() else path
    if not path.is_file():
        raise UserError(f"no shift table at {path}: write one with `soir shift`")
    table = pd.read_parquet(path)
    table["singular_values"] = table["singular_values"].map(lambda v: json.loads(v) if isinstance(v, str) else None)
    return table
