"""`factored` sketches of per-example gradients from forward and backward hooks (docs/design.md §6).

For a weight W of an nn.Linear, Conv1D or nn.Embedding module, grad_W(i) = Σ_t δ_t x_tᵀ, so
its `KroneckerSketch` P_out grad_W(i) P_inᵀ = Σ_t (P_out δ_t)(P_in x_t)ᵀ is computed from
the module's inputs and output gradients without forming any per-example gradient.
"""

from __future__ import annotations

from typing import Callable, Mapping, NamedTuple, Sequence

import torch
from torch import Tensor, nn

from soir.data import example_losses
from soir.gradients import per_example_grads
from soir.sketch.maps import KroneckerSketch, Sketch, make_sketch


def conv1d_type():
    """transformers' Conv1D class (GPT-2's transposed linear), or () when transformers is missing."""
    try:
        from transformers.pytorch_utils import Conv1D
        return Conv1D
    except Exception:  # transformers missing: nothing is a Conv1D
        return ()


def matrix_modules(model: nn.Module, embeddings: bool = False) -> list[str]:
    """Names of the nn.Linear and Conv1D modules (and nn.Embedding if asked) of a model."""
    kinds = (nn.Linear, conv1d_type()) + ((nn.Embedding,) if embeddings else ())
    return [name for name, module in model.named_modules() if isinstance(module, kinds)]


def matrix_layouts(model: nn.Module) -> dict[str, tuple[str, tuple[int, int], str]]:
    """{weight name: (layout, (d_out, d_in), module name)} of the model's Linear, Conv1D and
    Embedding weights (first owning module; Conv1D shapes in the (out, in) layout)."""
    conv1d = conv1d_type()
    names = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, tuple[str, tuple[int, int], str]] = {}
    for module_name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, Tensor) or weight.dim() != 2 or id(weight) not in names or names[id(weight)] in out:
            continue
        if isinstance(module, nn.Embedding):
            out[names[id(weight)]] = ("embedding", tuple(weight.shape), module_name)
        elif conv1d and isinstance(module, conv1d):
            out[names[id(weight)]] = ("conv1d", tuple(weight.shape[::-1]), module_name)
        elif isinstance(module, nn.Linear):
            out[names[id(weight)]] = ("linear", tuple(weight.shape), module_name)
    return out


class _Hooked(NamedTuple):
    module: nn.Module
    layout: str  # linear | conv1d | embedding
    weight: str  # canonical parameter name of the weight
    bias: str | None  # parameter name of a sketched bias


class FactoredSketcher:
    """Per-example `factored` sketches of weight matrices in one batched forward+backward.

    For nn.Linear / Conv1D weights, grad_W(i) = Σ_t δ_t x_tᵀ over example i's positions, so
    its sketch is Σ_t (P_out δ_t)(P_in x_t)ᵀ: forward hooks keep P_in x_t (n, T, k_in),
    hooks on the module outputs project δ_t with P_out, and a bmm sums over positions. No
    per-example gradient is formed. nn.Embedding rows are one-hot inputs: P_out x_t is a
    column of P_out gathered by token id. A weight shared by several modules (tied
    embeddings) is sketched in all its roles, with one map, under its canonical name.

    Biases of the hooked modules (grad_b(i) = Σ_t δ_t) get `bias_kind` (default sjlt)
    sketches of the same k, so a weight and its bias join by summing. Other parameters
    (norms, …) listed in `extra_params` fall back to `extra_kind` (sjlt) on exact
    per-example gradients from `soir.gradients.per_example_grads` (a second, vmapped pass;
    right-padded batches).

    `sketch(loss_fn, batch)` follows the loss_fn contract of `soir.gradients.per_example_grads` (the sum of
    the per-example losses is differentiated once; rows are independent, so row i of each
    δ is example i's own) and needs every hooked module to see inputs with the batch
    dimension first, (n, …, d); a module that sees one row shared by the batch (GPT-2's
    position embedding) is expanded to n rows. During the call parameters are set to
    requires_grad=False and autograd differentiates only a zero added to the input
    embeddings (and to outputs that would not need a gradient otherwise), so no parameter
    gradient is computed, `.grad` is untouched and requires_grad is restored afterwards.
    Gradient checkpointing must be off. Returns {parameter name: (n, k)} in float32
    (float64 for a float64 model); `self.maps[name]` is the `KroneckerSketch`, the same map
    as make_sketch("factored", d_out·d_in, k, name, seed, shape=(d_out, d_in)).

    Cost (CPU, 1 thread, tiny OLMo hidden 128, 2 layers, 32 rows × ~40 tokens, all 15
    Linear weights, k = 1024): ≈ 0.9× a plain forward + loss.sum().backward(), because the
    weight-gradient matmuls are skipped; the hooks themselves add ≈ 15%.
    """

    def __init__(self, model: nn.Module, module_names: Sequence[str], k: int, seed: int = 0, *, base: str = "gaussian",
                 bias_kind: str | None = "sjlt", extra_params: Sequence[str] = (), extra_kind: str = "sjlt", dtype=None):
        self.model, self.k, self.seed = model, int(k), int(seed)
        self.bias_kind, self.extra_kind, self.extra_params = bias_kind, extra_kind, list(extra_params)
        modules = dict(model.named_modules())
        param_name = {id(p): n for n, p in model.named_parameters()}
        conv1d = conv1d_type()
        wanted = list(dict.fromkeys(module_names))
        for name in wanted:
            if name not in modules:
                raise ValueError(f"no module {name!r} in the model")
            if not isinstance(modules[name], (nn.Linear, nn.Embedding, conv1d)):
                raise ValueError(f"{name!r} is a {type(modules[name]).__name__}: factored sketches take nn.Linear, Conv1D or nn.Embedding")
        # a tied weight is sketched in every role: hook all modules sharing it
        shared = {id(modules[n].weight) for n in wanted}
        wanted += [n for n, m in model.named_modules() if n not in wanted and isinstance(m, (nn.Linear, nn.Embedding, conv1d))
                   and id(getattr(m, "weight", None)) in shared]
        self.hooked: dict[str, _Hooked] = {}
        self.maps: dict[str, KroneckerSketch] = {}
        self.bias_maps: dict[str, Sketch] = {}
        for name in wanted:
            module = modules[name]
            layout = "embedding" if isinstance(module, nn.Embedding) else "conv1d" if isinstance(module, conv1d) else "linear"
            weight = param_name.get(id(module.weight))
            if weight is None:
                raise ValueError(f"the weight of {name!r} is not a parameter of the model")
            shape = tuple(module.weight.shape) if layout != "conv1d" else tuple(module.weight.shape[::-1])
            self.maps.setdefault(weight, KroneckerSketch(shape[0] * shape[1], self.k, weight, self.seed, shape=shape, base=base))
            bias = getattr(module, "bias", None)
            bias_name = param_name.get(id(bias)) if bias_kind and layout != "embedding" and isinstance(bias, Tensor) else None
            if bias_name is not None:
                self.bias_maps[bias_name] = make_sketch(bias_kind, bias.numel(), None if bias_kind == "none" else self.k, bias_name, self.seed)
            self.hooked[name] = _Hooked(module, layout, weight, bias_name)
        self.dtype = dtype

    def sketch(self, loss_fn: Callable = example_losses, batch: Mapping | None = None) -> dict[str, Tensor]:
        """Per-example sketches {name: (n, k)} of the hooked weights (and biases, extras)."""
        model = self.model
        param = next(model.parameters())
        dtype = self.dtype or torch.promote_types(param.dtype, torch.float32)
        checkpointing = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5; older name below
        if checkpointing is None:
            checkpointing = getattr(model, "is_gradient_checkpointing", False)
        if checkpointing:
            raise RuntimeError("turn gradient checkpointing off to sketch: its recomputed forward would run the hooks twice")
        out: dict[str, Tensor] = {}
        sizes: set[int] = set()
        leaves: list[Tensor] = []
        rows: dict[str, int] = {}  # the batch size, from the first embedding or hooked call
        handles = []

        def _leaf(like):
            leaf = torch.zeros((), dtype=like.dtype, device=like.device, requires_grad=True)
            leaves.append(leaf)
            return leaf

        def add(name, value):
            out[name] = value if name not in out else out[name] + value

        def make_hook(module_name, entry):
            layout, weight, bias_name = entry.layout, entry.weight, entry.bias
            sketch = self.maps[weight]

            def forward_hook(mod, args, output):
                if not isinstance(output, Tensor):
                    raise RuntimeError(f"{module_name} returned a {type(output).__name__}, not a tensor")
                p_out, p_in = sketch.factors(output.device, dtype)
                if not args:
                    raise RuntimeError(f"{module_name} was called without a positional input")
                x = args[0].detach()
                n = x.shape[0]
                with torch.no_grad():
                    if layout == "embedding":
                        left = p_out.T[x.reshape(n, -1)]  # (n, T, k_out): P_out e_token
                    else:
                        left = x.reshape(n, -1, x.shape[-1]).to(dtype) @ p_in.T  # (n, T, k_in)
                if not output.requires_grad:  # upstream of everything: differentiate w.r.t. a zero added here
                    output = output + _leaf(output)
                if n == 1 and rows.get("n", 1) > 1:  # shared by the batch (GPT-2 positions): one copy per example
                    n = rows["n"]
                    output = output.expand(n, *output.shape[1:])
                    left = left.expand(n, *left.shape[1:])
                rows.setdefault("n", n)
                sizes.add(n)

                def backward_hook(grad):
                    if grad.shape[0] != n:
                        raise RuntimeError(f"{module_name}: its output gradient has {grad.shape[0]} rows for {n} examples (broadcast over the batch?)")
                    with torch.no_grad():
                        g = grad.reshape(n, -1, grad.shape[-1]).to(dtype)
                        if layout == "embedding":
                            right = g @ p_in.T  # (n, T, k_in)
                            add(weight, torch.bmm(left.transpose(1, 2), right).reshape(n, -1))
                        else:
                            right = g @ p_out.T  # (n, T, k_out)
                            add(weight, torch.bmm(right.transpose(1, 2), left).reshape(n, -1))
                        if bias_name is not None:
                            add(bias_name, self.bias_maps[bias_name].project(g.sum(1)))

                output.register_hook(backward_hook)
                return output

            return forward_hook

        # make every hooked output differentiable without asking for any parameter gradient:
        # a zero leaf added to the input embeddings is the only thing autograd differentiates.
        try:
            embed = model.get_input_embeddings()
        except (AttributeError, NotImplementedError):
            embed = None
        embed_hooked = embed is not None and any(entry.module is embed for entry in self.hooked.values())

        def embed_hook(mod, args, output):
            rows.setdefault("n", output.shape[0])
            return output + _leaf(output)

        requires = {}
        try:
            for p in model.parameters():  # detached weights: the forward keeps no parameter graph
                requires[p] = p.requires_grad
                p.requires_grad_(False)
            if embed is not None and not embed_hooked:
                handles.append(embed.register_forward_hook(embed_hook))
            for module_name, entry in self.hooked.items():
                handles.append(entry.module.register_forward_hook(make_hook(module_name, entry)))
            losses = loss_fn(model, batch)
            if not leaves or not losses.requires_grad:
                raise RuntimeError("the loss does not depend on any hooked module or the input embeddings (get_input_embeddings())")
            torch.autograd.grad(losses.sum(), leaves, allow_unused=True)
        finally:
            for handle in handles:
                handle.remove()
            for p, flag in requires.items():
                p.requires_grad_(flag)
        n = losses.shape[0]
        if sizes - {n}:
            raise RuntimeError(f"hooked modules saw batches of {sorted(sizes)} rows but the loss has {n}: modules must see (n, ..., d) inputs")
        for name in list(self.maps) + list(self.bias_maps):  # an output the loss does not use: zero gradient
            if name not in out:
                k = self.k if name in self.maps else self.bias_maps[name].k
                out[name] = torch.zeros(n, k, dtype=dtype, device=param.device)
        if self.extra_params:
            grads = per_example_grads(model, batch, self.extra_params, loss_fn)
            for name, g in grads.items():
                k = None if self.extra_kind == "none" else self.k
                out[name] = make_sketch(self.extra_kind, g[0].numel(), k, name, self.seed, dtype=dtype).project(g.reshape(n, -1))
        return out
