"""Kronecker-factored curvature (`--curvature kfac`): every group's c = v_Sᵀ G_SS v_S from one pass
over a split, whatever the number of groups (docs/design.md §5 'Curvature').

G is the Gauss–Newton matrix = true Fisher of the split loss, estimated as `ggn` does: labels drawn
from the model at every labelled position, and mean_i T_i (g_iᵀu)² with g_i the gradient of example
i's mean token loss and T_i its labelled tokens (`soir.curvature.ggn_estimate`). For a matrix
module z = W x (+ b), g_i = Σ_s δ_is x_isᵀ over its positions s; KFAC drops the cross-position
terms and factors the expectation over tokens (x and δ independent), which gives, for a direction U
of the module (out × in, a bias as one more input column fed a constant 1),

    c ≈ tr(Uᵀ S U A),   A = (1/M) Σ x xᵀ,   S = (1/n) Σ_i T_i Σ_s δ_is δ_isᵀ,

over the M (example, position) pairs whose output gradient is not zero (the positions the loss
reads through the module: answer positions for the head, every position up to the last answer
token below it; never pads or the last token). A group spanning several modules sums their forms
(block-diagonal: cross-module curvature is dropped); a weight used by two modules (tied
embeddings) sums both uses.

Because only forms along one known direction (the mean forget gradient) are needed, neither
factor is eigendecomposed nor always stored whole:

- a whole-module direction U keeps the factor of the smaller side and U projected on the other:
  S and Σ (X Uᵀ)ᵀ(X Uᵀ) (= M · U A Uᵀ) when out ≤ in, else A and Σ (D U)ᵀ(D U); so an LM head
  never forms its vocabulary × vocabulary S;
- one row j (a neuron's row of up / gate, with its bias entry): c_j = S_jj · u_jᵀ A u_j, from
  diag S and Σ (x u_j)² per token, for all rows at once;
- one column j (a neuron's column of down): c_j = A_jj · h_jᵀ S h_j, from diag A and Σ (δ h_j)².

nn.Linear, GPT-2's Conv1D and nn.Embedding (a linear map of one-hot inputs, A diagonal) are
factored. Every other parameter a group holds (norm weights and biases) gets the `ggn` estimator
itself, exact per-example gradients of the same sampled labels for those parameters only
(`soir.gradients.per_example_grads`, one vmapped pass per batch, none when no group holds such
a parameter), added to the group's form as one more diagonal block.

The labels are drawn from the logits of the hooked forward itself (one forward and one backward
per batch); the backward differentiates a zero added to the embeddings, so no parameter gradient
is computed and requires_grad flags are restored. Under torchrun the factors are summed over
processes before the forms are taken, so every process returns the forms of all rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from soir.curvature import draw_labels
from soir.data import per_example_loss
from soir.distributed import weighted_means, world_size
from soir.gradients import Batch, flatten_examples, per_example_grads
from soir.groups import Group, ParamSlice
from soir.runtime import device_of, dtype_of, eval_mode, lm_logits, to_device
from soir.sketch.factored import conv1d_type


@dataclass
class Factored:
    """One matrix module in the (out, in) layout and what the groups need of it.

    `columns` is `inputs` plus one when a group holds the bias. Directions are (out, columns)
    matrices in the work dtype; `whole` maps each group holding more than one row or column of
    the module to its direction there, `row_owner` / `column_owner` map a row / column to the
    group holding just that one, and `rows` / `cols` are the direction on those rows / columns."""

    module: nn.Module
    layout: str  # linear | conv1d | embedding
    outputs: int
    inputs: int
    bias: bool
    whole: dict[str, Tensor] = field(default_factory=dict)
    row_owner: dict[int, str] = field(default_factory=dict)
    column_owner: dict[int, str] = field(default_factory=dict)
    rows: Tensor | None = None
    cols: Tensor | None = None
    sums: dict[str, Tensor] = field(default_factory=dict)

    @property
    def columns(self) -> int:
        return self.inputs + int(self.bias)

    @property
    def side(self) -> str:
        """Which factor whole directions keep: the output one (S) unless the input side is smaller."""
        return "S" if self.layout == "embedding" or self.outputs <= self.columns else "A"

    def add(self, key: str, value: Tensor) -> None:
        self.sums[key] = value if key not in self.sums else self.sums[key] + value

    def accumulate(self, inputs: Tensor, gradients: Tensor) -> None:
        """Add one call's tokens: `inputs` (N, in) (token ids for an embedding), `gradients` (N, out),
        already √T_i-scaled and restricted to the tokens whose output gradient is not zero."""
        d = gradients
        self.add("tokens", torch.tensor(float(d.shape[0]), dtype=torch.float64))
        embedding = self.layout == "embedding"
        x = None if embedding else (torch.cat([inputs, torch.ones_like(inputs[:, :1])], 1) if self.bias else inputs)

        def through(direction: Tensor) -> Tensor:  # X Uᵀ: (N, out)
            return direction.T[inputs] if embedding else x @ direction.T

        if self.whole:
            if self.side == "S":
                self.add("S", d.T @ d)
                for name, u in self.whole.items():
                    z = through(u)
                    self.add(f"whole/{name}", z.T @ z)
            else:
                self.add("A", x.T @ x)
                for name, u in self.whole.items():
                    y = d @ u
                    self.add(f"whole/{name}", y.T @ y)
        if self.rows is not None:
            self.add("diag_S", (d * d).sum(0))
            self.add("rows", through(self.rows).pow(2).sum(0))
        if self.cols is not None:
            self.add("diag_A", torch.bincount(inputs, minlength=self.inputs).to(d.dtype) if embedding else (x * x).sum(0))
            self.add("cols", (d @ self.cols).pow(2).sum(0))

    def forms(self, examples: float) -> dict[str, float]:
        """{group: its form in this module} from the summed factors of `examples` rows."""
        tokens = float(self.sums.get("tokens", 0.0))
        out: dict[str, float] = {}
        if tokens == 0 or examples == 0:
            return {name: 0.0 for name in [*self.whole, *self.row_owner.values(), *self.column_owner.values()]}
        scale = 1.0 / (tokens * examples)
        factor = self.sums.get(self.side)
        for name in self.whole:
            out[name] = out.get(name, 0.0) + float((factor.double() * self.sums[f"whole/{name}"].double()).sum()) * scale
        if self.rows is not None:
            per_row = (self.sums["diag_S"].double() * self.sums["rows"].double()) * scale
            for j, name in self.row_owner.items():
                out[name] = out.get(name, 0.0) + float(per_row[j])
        if self.cols is not None:
            per_column = (self.sums["diag_A"].double() * self.sums["cols"].double()) * scale
            for j, name in self.column_owner.items():
                out[name] = out.get(name, 0.0) + float(per_column[j])
        return out


def matrix_modules(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(name, module, layout) of every nn.Linear, Conv1D and nn.Embedding of the model."""
    conv1d = conv1d_type()
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            found.append((name, module, "embedding"))
        elif conv1d and isinstance(module, conv1d):
            found.append((name, module, "conv1d"))
        elif isinstance(module, nn.Linear):
            found.append((name, module, "linear"))
    return found


def in_layout(tensor: Tensor, layout: str) -> Tensor:
    """A weight-shaped tensor in the (out, in) layout (Conv1D and embedding weights are (in, out))."""
    return tensor if layout == "linear" else tensor.T


def lines(slices: Sequence[ParamSlice], layout: str, weight: str, inputs: int) -> list[tuple[str, int | None, str]]:
    """Where the slices of one module's weight / bias lie in the (out, in + bias) layout:
    ('row', j, part), ('col', j, part) or ('all', None, 'weight'), part 'weight' or 'bias' (a whole
    bias is the bias column, index `inputs`)."""
    out = []
    for s in slices:
        part = "weight" if s.name == weight else "bias"
        if s.dim is None:
            out.append(("all", None, part) if part == "weight" else ("col", inputs, part))
        elif part == "bias":
            out.append(("row", s.index, part))
        else:
            row_dim = 0 if layout == "linear" else 1
            out.append(("row" if s.dim == row_dim else "col", s.index, part))
    return out


def mark(mask: Tensor, kind: str, index: int | None, part: str, inputs: int) -> None:
    """Set the entries of one `lines` item in a (out, in + bias) mask."""
    span = slice(0, inputs) if part == "weight" else slice(inputs, inputs + 1)
    if kind == "row":
        mask[index, span] = True
    elif kind == "col":
        mask[:, index] = True
    else:
        mask[:, span] = True


class KroneckerForms:
    """The KFAC forms of `groups` along `vectors` (full-size tensors), accumulated batch by batch.

    `add(batch, generator)` runs one forward and backward on labels drawn from the model;
    `forms()` returns {group: c}."""

    def __init__(self, model: nn.Module, groups: Sequence[Group], vectors: Mapping[str, Tensor]):
        self.model, self.groups = model, list(groups)
        params = dict(model.named_parameters())
        names = {id(p): n for n, p in params.items()}
        self.work = torch.promote_types(dtype_of(model), torch.float32)
        device = device_of(model)
        holding: dict[str, list[Group]] = {}
        for g in self.groups:
            for n in g.param_names:
                holding.setdefault(n, []).append(g)
        covered: set[str] = set()
        self.factored: dict[str, Factored] = {}
        for module_name, module, layout in matrix_modules(model):
            weight = names.get(id(module.weight))
            bias = getattr(module, "bias", None)
            bias = names.get(id(bias)) if isinstance(bias, Tensor) and layout != "embedding" else None
            held = [p for p in (weight, bias) if p is not None and p in holding]
            if not held:
                continue
            covered |= set(held)
            outputs, inputs = in_layout(module.weight, layout).shape
            entry = Factored(module, layout, outputs, inputs, bias in held)
            # the weight's direction in the (out, in) layout: a view of `vectors` when the dtypes agree
            weight_direction = in_layout(vectors[weight].detach(), layout).to(self.work) if weight in held else None
            full = None  # the module's whole direction with its bias column, built only when a group needs part of it
            if entry.bias or any(s.dim is not None for p in held for g in holding[p] for s in g.slices if s.name == p):
                full = torch.zeros(outputs, entry.columns, dtype=self.work, device=device)
                if weight_direction is not None:
                    full[:, :inputs] = weight_direction
                if entry.bias:
                    full[:, inputs] = vectors[bias].detach().to(full)
            row_mask = torch.zeros(outputs, entry.columns, dtype=torch.bool)
            column_mask = torch.zeros(outputs, entry.columns, dtype=torch.bool)
            for g in dict.fromkeys(g for p in held for g in holding[p]):
                where = lines([s for s in g.slices if s.name in held], layout, weight, inputs)
                kinds = {(kind, index) for kind, index, _ in where}
                kind, index = next(iter(kinds))
                if len(kinds) == 1 and kind == "row" and index not in entry.row_owner:
                    entry.row_owner[index] = g.name
                    target = row_mask
                elif len(kinds) == 1 and kind == "col" and index not in entry.column_owner:
                    entry.column_owner[index] = g.name
                    target = column_mask
                elif full is None:  # the whole weight, and no bias column: the direction as it is (no copy)
                    entry.whole[g.name] = weight_direction
                    continue
                else:  # a whole direction of its own
                    target = torch.zeros(outputs, entry.columns, dtype=torch.bool)
                for item in where:
                    mark(target, *item, inputs)
                if target is not row_mask and target is not column_mask:
                    entry.whole[g.name] = full * target.to(device)
            if entry.row_owner:
                entry.rows = full * row_mask.to(device)
            if entry.column_owner:
                entry.cols = full * column_mask.to(device)
            self.factored[module_name] = entry
        # parameters no matrix module covers: the ggn estimator on exact per-example gradients
        self.others = [n for n in holding if n not in covered]
        self.other_groups = [g for g in self.groups if any(n in self.others for n in g.param_names)]
        if self.others:
            columns = []
            for g in self.other_groups:
                parts = []
                for n in self.others:
                    mask = torch.zeros(params[n].shape, dtype=torch.bool)
                    for s in g.slices:
                        if s.name == n:
                            s.view(mask).fill_(True)
                    parts.append((vectors[n].detach().to(self.work) * mask.to(device)).reshape(-1) if n in vectors else
                                 torch.zeros(params[n].numel(), dtype=self.work, device=device))
                columns.append(torch.cat(parts))
            self.other_directions = torch.stack(columns, 1)  # (Σ numel, groups)
            self.other_sums = torch.zeros(len(self.other_groups), dtype=torch.float64)
        self.examples = 0.0

    def add(self, batch: Batch, generator: torch.Generator) -> None:
        """One forward and backward of `batch` on labels drawn from the model: accumulate the factors."""
        model = self.model
        batch = to_device(batch, device_of(model))
        state: dict = {}
        leaves: list[Tensor] = []
        handles = []

        def leaf_for(like: Tensor) -> Tensor:
            leaf = torch.zeros((), dtype=like.dtype, device=like.device, requires_grad=True)
            leaves.append(leaf)
            return leaf

        def hook_for(entry: Factored):
            def forward_hook(module, args, output):
                x = args[0].detach()
                if not output.requires_grad:
                    output = output + leaf_for(output)
                rows = state.setdefault("rows", output.shape[0])
                if output.shape[0] == 1 and rows > 1:  # shared by the batch (GPT-2 positions): one copy per example
                    output, x = output.expand(rows, *output.shape[1:]), x.expand(rows, *x.shape[1:])

                def backward_hook(grad):
                    with torch.no_grad():
                        d = grad.reshape(rows, -1, grad.shape[-1]).to(self.work)
                        d = d * state["scale"].view(-1, 1, 1)
                        keep = (d != 0).any(-1)
                        inputs = x.reshape(rows, -1) if entry.layout == "embedding" else x.reshape(rows, -1, x.shape[-1]).to(self.work)
                        entry.accumulate(inputs[keep], d[keep])

                output.register_hook(backward_hook)
                return output
            return forward_hook

        try:
            embed = model.get_input_embeddings()
        except (AttributeError, NotImplementedError):
            embed = None

        def embed_hook(module, args, output):
            state.setdefault("rows", output.shape[0])
            return output + leaf_for(output) if not output.requires_grad else output

        requires = {p: p.requires_grad for p in model.parameters()}
        try:
            for p in requires:
                p.requires_grad_(False)
            if embed is not None and not any(e.module is embed for e in self.factored.values()):
                handles.append(embed.register_forward_hook(embed_hook))
            for entry in self.factored.values():
                handles.append(entry.module.register_forward_hook(hook_for(entry)))
            with eval_mode(model), torch.enable_grad():
                logits = lm_logits(model, batch)
                labels, n_tokens = draw_labels(logits, batch["labels"], generator)
                state["scale"] = n_tokens.to(self.work).sqrt()
                losses = per_example_loss(logits, labels)
                if leaves and losses.requires_grad:
                    torch.autograd.grad(losses.sum(), leaves, allow_unused=True)
        finally:
            for handle in handles:
                handle.remove()
            for p, flag in requires.items():
                p.requires_grad_(flag)
        self.examples += len(labels)
        if self.others:
            grads = flatten_examples(per_example_grads(model, batch, self.others, labels=labels)).to(self.work)
            dots = grads @ self.other_directions  # (n, groups)
            self.other_sums += (n_tokens.to(dots)[:, None] * dots * dots).sum(0).double().cpu()

    def forms(self) -> dict[str, float]:
        """{group: c} over the rows added so far (summed over processes under torchrun)."""
        entries = list(self.factored.values())
        local = {f"{i}/{key}": value for i, e in enumerate(entries) for key, value in e.sums.items()}
        local["examples"] = torch.tensor(self.examples, dtype=torch.float64)
        if self.others:
            local["others"] = self.other_sums
        summed = summed_over_processes(local)
        examples = float(summed["examples"])
        c = {g.name: 0.0 for g in self.groups}
        for i, entry in enumerate(entries):
            entry.sums = {key.split("/", 1)[1]: value for key, value in summed.items() if key.startswith(f"{i}/")}
            for name, value in entry.forms(examples).items():
                c[name] += value
        if self.others and examples > 0:
            for g, value in zip(self.other_groups, summed["others"].tolist()):
                c[g.name] += value / examples
        return c


def summed_over_processes(values: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Each tensor summed over processes (itself in a single process)."""
    if world_size() == 1:
        return dict(values)
    return {k: v * world_size() for k, v in weighted_means(values, 1).items()}


def kfac_quadratic_forms(model: nn.Module, batches: Sequence[Batch], groups: Sequence[Group], vectors: Mapping[str, Tensor],
                         samples: int = 1, seed: int = 0, bar=None) -> dict[str, float]:
    """KFAC's u_Sᵀ G_SS u_S for every group (see the module docstring): `samples` label draws per
    example, the draws seeded by `seed` as `ggn`'s are."""
    forms = KroneckerForms(model, groups, vectors)
    generator = torch.Generator(device=device_of(model)).manual_seed(seed)
    for _ in range(samples):
        for batch in batches:
            forms.add(batch, generator)
            if bar is not None:
                bar.update(1)
    return forms.forms()
