"""Sketches of parameter groups: one seeded map per group member, and per-example sketching of a
batch for every group at once (`SketchPlan`), as the ranking stage uses them (docs/design.md §6).

Each member slice of a group has its own map seeded by its parameter name (so `factored`
matches `FactoredSketcher`); the member sketches are summed (the block map keeps inner
products in expectation). A member with at most k coordinates is kept exact (an identity
padded with zeros to k). `factored` sketches Linear / Conv1D / Embedding weights from hooks
without per-example gradients; other members fall back to `sjlt`.

A few full gradients that are computed exactly anyway (the mean gradients) need no random map:
`span_coordinates` gives their exact coordinates in an orthonormal basis of their span, which
keep every inner product among them.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from einops import rearrange
from torch import Tensor, nn

from soir.data import example_losses
from soir.gradients import per_example_grads
from soir.groups import Group
from soir.runtime import device_of, eval_mode, to_device
from soir.sketch.factored import FactoredSketcher, matrix_layouts
from soir.sketch.maps import KroneckerSketch, PaddedIdentity, Sketch, make_sketch


def param_names(groups: Sequence[Group]) -> list[str]:
    """The distinct parameter names the groups touch, in group order."""
    return list(dict.fromkeys(n for g in groups for n in g.param_names))


def flat_member(group: Group, index: int, tensor: Tensor, batched: bool) -> Tensor:
    """The entries of slice `index` of `group` in `tensor` (a parameter-shaped tensor, or (n, *shape)),
    as (n, numel) (n = 1 for an unbatched tensor)."""
    s = group.slices[index]
    if s.dim is not None:
        tensor = tensor.select(s.dim + int(batched), s.index)
    return rearrange(tensor, "n ... -> n (...)") if batched else tensor.reshape(1, -1)


def gather_examples(group: Group, grads: Mapping[str, Tensor]) -> Tensor:
    """A group's entries of per-example tensors {name: (n, *shape)} as (n, D_S) (`soir.groups.gather` order)."""
    return torch.cat([flat_member(group, i, grads[s.name], True) for i, s in enumerate(group.slices)], dim=1)


def exact_dot(x: Tensor, y: Tensor, chunk: int = 1 << 22) -> float:
    """xᵀy of two 1-D tensors accumulated in float64, `chunk` entries at a time (no float64 copy of a
    whole embedding)."""
    return float(sum(torch.dot(x[i:i + chunk].double(), y[i:i + chunk].double()) for i in range(0, x.numel(), chunk)))


def gram_factor(gram: Tensor) -> Tensor:
    """Upper-triangular X (m, m) with XᵀX = `gram` (a PSD Gram matrix): its Cholesky factor, taken in
    the given order so the first vector's coordinates are (|x_1|, 0, …); a vector in the span of the
    earlier ones (a zero pivot) gets no new axis."""
    gram = gram.to(torch.float64)
    m = gram.shape[0]
    x = torch.zeros(m, m, dtype=torch.float64)
    for j in range(m):
        for i in range(j):
            if x[i, i] > 0:
                x[i, j] = (gram[i, j] - x[:i, i] @ x[:i, j]) / x[i, i]
        x[j, j] = torch.sqrt(torch.clamp(gram[j, j] - x[:j, j] @ x[:j, j], min=0.0))
    return x


def span_coordinates(group: Group, grads: Sequence[Mapping[str, Tensor]]) -> list[Tensor]:
    """The group's entries of m full-size gradients {name: parameter-shaped tensor}, each as its m
    exact coordinates (float64) in an orthonormal basis of their span.

    Their inner products are those of the gradients (to float64 rounding of the float64 Gram
    matrix): a map to m dimensions with no sketch error, made from the vectors themselves, for
    scores that use only inner products among them (`soir`'s a_S = |g_f,S|², b_S = g_r,Sᵀg_f,S).
    """
    flats = [[s.view(g[s.name]).reshape(-1) for s in group.slices] for g in grads]
    m = len(flats)
    gram = torch.zeros(m, m, dtype=torch.float64)
    for i in range(m):
        for j in range(i + 1):
            gram[i, j] = gram[j, i] = sum(exact_dot(x, y) for x, y in zip(flats[i], flats[j]))
    factor = gram_factor(gram)
    return [factor[:, i].clone() for i in range(m)]


class GroupSketch:
    """The sketch map of one group: a seeded map per member slice, member sketches summed.

    `kind == "none"` concatenates the members (dimension D_S); otherwise the dimension is k.
    A member's map is seeded by its parameter name (plus the slice for neuron groups), so a
    whole weight has the same map as `FactoredSketcher` gives it. `factored` members are the
    2-D weights of Linear / Conv1D (gradient transposed to (out, in)) / Embedding modules;
    other members with more than k coordinates fall back to `sjlt`.
    """

    def __init__(self, group: Group, kind: str, k: int, seed: int, shapes: Mapping[str, Sequence[int]],
                 layouts: Mapping[str, tuple[str, tuple[int, int], str]] | None = None):
        layouts = layouts or {}
        self.group, self.kind, self.k, self.seed = group, kind, int(k), int(seed)
        self.dim = group.n_params if kind == "none" else self.k
        self.maps: list[Sketch | None] = []
        self.transpose: list[bool] = []
        self.factored: list[bool] = []  # members whose sketch can come from FactoredSketcher hooks
        for s in group.slices:
            layout = layouts.get(s.name)
            numel = s.numel(shapes[s.name])
            seed_name = s.name if s.dim is None else f"{s.name}[{s.dim}:{s.index}]"
            hooked = kind == "factored" and s.dim is None and layout is not None
            transpose = hooked and layout[0] == "conv1d"
            if kind == "none":
                p = None
            elif numel <= self.k:
                p = PaddedIdentity(numel, self.k, seed_name, seed)
                hooked = False
            elif hooked:
                p = KroneckerSketch(numel, self.k, seed_name, seed, shape=layout[1])
            elif kind == "factored":
                p = make_sketch("sjlt", numel, self.k, seed_name, seed)
            else:
                p = make_sketch(kind, numel, self.k, seed_name, seed)
            self.maps.append(p)
            self.transpose.append(transpose)
            self.factored.append(hooked)

    def project_member(self, index: int, flat: Tensor) -> Tensor:
        """Sketch (n, k) of member `index` from its flattened entries (n, numel) in parameter layout."""
        p = self.maps[index]
        if p is None:
            return flat
        if self.transpose[index]:
            d_out, d_in = p.shape  # stored (in, out): transpose to (out, in)
            flat = rearrange(flat, "n (i o) -> n (o i)", i=d_in, o=d_out)
        return p.project(flat)

    def combine(self, parts: Sequence[Tensor]) -> Tensor:
        """The group sketch from member sketches (concatenated for `none`, else summed)."""
        if self.kind == "none":
            return torch.cat(parts, dim=1)
        out = parts[0]
        for part in parts[1:]:
            out = out + part
        return out

    def project(self, tensors: Mapping[str, Tensor], batched: bool = True) -> Tensor:
        """Sketch of full-size tensors: per-example {name: (n, *shape)} -> (n, dim), or one
        gradient {name: shape} (batched=False) -> (dim,)."""
        parts = [self.project_member(i, flat_member(self.group, i, tensors[s.name], batched)) for i, s in enumerate(self.group.slices)]
        out = self.combine(parts)
        return out if batched else out[0]


class SketchPlan:
    """The `GroupSketch` of every group, and per-example sketching of a batch for all groups at once.

    Per batch: one `FactoredSketcher` pass for hooked weights (`factored`), and one
    `vmap(grad)` pass (`soir.gradients.per_example_grads`) for every other member.
    """

    def __init__(self, model: nn.Module, groups: Sequence[Group], kind: str, k: int, seed: int = 0):
        self.model, self.groups, self.kind, self.k, self.seed = model, list(groups), kind, int(k), int(seed)
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        layouts = matrix_layouts(model) if kind == "factored" else {}
        self.sketches = {g.name: GroupSketch(g, kind, k, seed, shapes, layouts) for g in self.groups}
        hooked = {g.slices[i].name for g in self.groups for i, f in enumerate(self.sketches[g.name].factored) if f}
        self.hooked_modules = [layouts[n][2] for n in hooked]
        self.exact = list(dict.fromkeys(g.slices[i].name for g in self.groups for i, f in enumerate(self.sketches[g.name].factored) if not f))
        self._sketcher = FactoredSketcher(model, self.hooked_modules, self.k, self.seed, bias_kind=None) if self.hooked_modules else None

    def dim(self, group: Group) -> int:
        return self.sketches[group.name].dim

    def project_mean(self, grads: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """{group: (dim,)} sketches of one full gradient {name: parameter-shaped tensor}."""
        return self.project_means([grads])[0]

    def project_means(self, grads: Sequence[Mapping[str, Tensor]]) -> list[dict[str, Tensor]]:
        """Sketches of several full gradients, each map generated once for all of them."""
        stacked = {n: torch.stack([g[n] for g in grads]) for n in param_names(self.groups)}
        out = self.project_examples(stacked)
        return [{name: s[i] for name, s in out.items()} for i in range(len(grads))]

    def project_examples(self, grads: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """{group: (n, dim)} from materialised per-example gradients {name: (n, *shape)}."""
        return {g.name: self.sketches[g.name].project(grads) for g in self.groups}

    def per_example(self, batch: Mapping[str, Tensor], labels: Tensor | None = None, loss_fn=example_losses) -> dict[str, Tensor]:
        """{group: (n, dim)} sketches of each example's gradient (of `labels` if given)."""
        batch = to_device(batch, device_of(self.model))
        if labels is not None:
            batch = {**batch, "labels": labels}
        hooked: dict[str, Tensor] = {}
        if self._sketcher is not None:
            with eval_mode(self.model):
                hooked = self._sketcher.sketch(loss_fn, batch)
        exact = per_example_grads(self.model, batch, self.exact, loss_fn) if self.exact else {}
        out = {}
        for g in self.groups:
            sk = self.sketches[g.name]
            parts = [hooked[s.name] if sk.factored[i] else sk.project_member(i, flat_member(g, i, exact[s.name], True))
                     for i, s in enumerate(g.slices)]
            out[g.name] = sk.combine(parts)
        return out

    def split(self, batches: Sequence[Mapping[str, Tensor]], bar=None, loss_fn=example_losses) -> dict[str, Tensor]:
        """{group: (n, dim)} per-example sketches of a whole split."""
        parts: dict[str, list[Tensor]] = {g.name: [] for g in self.groups}
        for batch in batches:
            for name, s in self.per_example(batch, loss_fn=loss_fn).items():
                parts[name].append(s.cpu())
            if bar is not None:
                bar.update(1)
        return {name: torch.cat(p) for name, p in parts.items()}
