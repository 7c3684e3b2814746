"""Parameter groups: the units SOIR scores, ranks and selects (docs/design.md §5 'Granularity').

A `Group` is a named set of coordinates of a model: whole parameters, or single rows /
columns of them (`ParamSlice`). `parameter_groups(model, granularity, norms)` cuts a
Hugging Face causal LM into groups at one of five granularities:

- `tensor`: each named parameter;
- `module`: each linear module of a layer (q, k, v, o, qkv, up, gate, down), bias with weight;
- `layer`: each transformer block; embeddings and head are groups of their own;
- `kind`: attn / mlp (/ norm) of each layer;
- `neuron`: each MLP hidden unit j (row j of up and gate, their bias entry j, column j of
  down; rows and columns swap for GPT-2's transposed `Conv1D`); everything else by module.

Norm parameters `join` the linear group they feed (pre-norms: the attention's q/qkv or the
MLP's up; post-norms such as OLMo2's: o or down; the final norm: the head), are left out
(`exclude`), or stand `alone`. Tied input/output embeddings are one tensor and one group with
role `embed+lm_head`. Group names are module paths (or parameter names for `tensor`), so
they are stable across runs and usable in `--include/--exclude` regexes.

Roles are functional and the same across architectures: GPT-2's `c_fc` and GPT-NeoX's
`dense_h_to_4h` have role `up`, `mlp.c_proj` / `dense_4h_to_h` role `down`, `attn.c_proj` /
`attention.dense` role `o`, fused `c_attn` / `query_key_value` role `qkv`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch

from soir.errors import UserError

GRANULARITIES = ("tensor", "module", "layer", "kind", "neuron")
NORMS = ("join", "exclude", "alone")
KINDS = ("attn", "mlp", "norm", "embed", "head", "other")


@dataclass(frozen=True)
class ParamSlice:
    """A whole named parameter (`dim is None`) or `param.select(dim, index)`: one row or column."""

    name: str
    dim: int | None = None
    index: int | None = None

    def numel(self, shape: Sequence[int]) -> int:
        n = 1
        for i, size in enumerate(shape):
            if i != self.dim:
                n *= int(size)
        return n

    def view(self, tensor: torch.Tensor) -> torch.Tensor:
        """The entries of a full-size `tensor` this slice covers (a view)."""
        return tensor if self.dim is None else tensor.select(self.dim, self.index)


@dataclass(frozen=True)
class Group:
    """A named set of parameter entries; `n_params` is the total number of entries."""

    name: str
    slices: tuple[ParamSlice, ...]
    layer: int | None
    kind: str
    role: str
    n_params: int
    tied: bool = False

    @property
    def param_names(self) -> tuple[str, ...]:
        """The distinct parameter names the group touches, in slice order."""
        return tuple(dict.fromkeys(s.name for s in self.slices))


# --------------------------------------------------------------------------- naming rules

_BLOCK_RE = re.compile(r"^((?:\w+\.)*?(?:layers|h|blocks|block|layer)\.(\d+))\.")

_ATTN_SEGMENTS = {"self_attn", "attn", "attention", "self_attention"}
_MLP_SEGMENTS = {"mlp", "feed_forward", "ffn", "block_sparse_moe", "moe"}

_ATTN_ROLES = {
    "q_proj": "q", "query": "q", "wq": "q", "q": "q",
    "k_proj": "k", "key": "k", "wk": "k", "k": "k",
    "v_proj": "v", "value": "v", "wv": "v", "v": "v",
    "o_proj": "o", "out_proj": "o", "dense": "o", "c_proj": "o", "wo": "o", "o": "o",
    "c_attn": "qkv", "query_key_value": "qkv", "qkv_proj": "qkv", "Wqkv": "qkv", "W_pack": "qkv", "qkv": "qkv",
}
_MLP_ROLES = {
    "gate_proj": "gate", "w1": "gate",
    "up_proj": "up", "w3": "up", "c_fc": "up", "dense_h_to_4h": "up", "fc1": "up", "fc_in": "up",
    "down_proj": "down", "w2": "down", "c_proj": "down", "dense_4h_to_h": "down", "fc2": "down", "fc_out": "down",
    "gate_up_proj": "gate_up",
}
# Block-level norms: leaf name -> role. Which linear they join is decided in _norm_target.
_PRE_ATTN_NORMS = {"input_layernorm", "ln_1", "attention_norm", "ln_attn", "norm1", "attn_norm", "pre_attention_layernorm"}
_PRE_MLP_NORMS = {"post_attention_layernorm", "ln_2", "ffn_norm", "norm2", "ln_mlp", "mlp_norm", "pre_feedforward_layernorm"}
_POST_MLP_NORMS = {"post_feedforward_layernorm"}
_POS_EMBEDS = {"wpe", "embed_positions", "position_embeddings"}
_NORM_LEAF_RE = re.compile(r"^(ln(_\w+|\d+)?|.*norm.*)$", re.IGNORECASE)


def layer_index(name: str) -> int | None:
    """The transformer block a parameter name belongs to (`model.layers.3.…` -> 3), else None."""
    m = _BLOCK_RE.match(name)
    return int(m.group(2)) if m else None


@dataclass
class _Param:
    name: str
    module: str          # owning module path ('' at the root)
    leaf: str            # last component of the module path
    attr: str            # 'weight', 'bias', ...
    shape: tuple[int, ...]
    block: str | None    # 'model.layers.0'
    layer: int | None
    kind: str
    role: str
    conv1d: bool
    is_norm: bool = False
    target: str | None = None   # for norms: the module path of the linear group they join
    tied: bool = False


def _describe(model) -> list[_Param]:
    """Classify every (deduplicated) parameter of `model`."""
    modules = dict(model.named_modules())
    in_emb = _get(model, "get_input_embeddings")
    out_emb = _get(model, "get_output_embeddings")
    in_w = getattr(in_emb, "weight", None)
    out_w = getattr(out_emb, "weight", None)
    tied = in_w is not None and in_w is out_w

    params: list[_Param] = []
    seen_block = False
    for name, p in model.named_parameters():
        module, _, attr = name.rpartition(".")
        mod = modules.get(module)
        leaf = module.rpartition(".")[2]
        m = _BLOCK_RE.match(name)
        block, layer = (m.group(1), int(m.group(2))) if m else (None, None)
        seen_block = seen_block or block is not None
        cls = type(mod).__name__ if mod is not None else ""
        is_norm = "Norm" in cls or bool(_NORM_LEAF_RE.match(leaf))
        info = _Param(name, module, leaf, attr, tuple(p.shape), block, layer, "other", leaf or attr, cls == "Conv1D", is_norm)
        if block is not None:
            inner = module[len(block) + 1:].split(".") if module != block else []
            if is_norm:
                info.kind = "norm"
            elif any(s in _ATTN_SEGMENTS for s in inner):
                info.kind, info.role = "attn", _ATTN_ROLES.get(leaf, leaf)
            elif any(s in _MLP_SEGMENTS for s in inner):
                info.kind, info.role = "mlp", _MLP_ROLES.get(leaf, leaf)
        elif p is in_w:
            info.kind, info.role, info.tied = "embed", ("embed+lm_head" if tied else "embed"), tied
        elif (out_w is not None and p is out_w) or (out_emb is not None and mod is out_emb):
            info.kind, info.role = "head", "lm_head"
        elif isinstance(mod, torch.nn.Embedding):
            info.kind, info.role = "embed", ("pos_embed" if leaf in _POS_EMBEDS else leaf)
        elif is_norm:
            info.kind, info.role = "norm", ("final_norm" if seen_block else "embed_norm")
        params.append(info)

    _attach_norms(params, in_w_name=_name_of(model, in_w), out_w_name=_name_of(model, out_w))
    return params


def _get(model, method: str):
    try:
        return getattr(model, method)()
    except (AttributeError, NotImplementedError):
        return None


def _name_of(model, tensor) -> str | None:
    if tensor is None:
        return None
    for name, p in model.named_parameters():
        if p is tensor:
            return name
    return None


def _attach_norms(params: list[_Param], in_w_name: str | None, out_w_name: str | None) -> None:
    """Give each norm parameter its role and the module path of the linear it joins."""
    by_name = {p.name: p for p in params}
    # (block, kind) -> [(role, module path)] in parameter order
    linears: dict[tuple[str, str], list[tuple[str, str]]] = {}
    post_ffn_blocks = set()
    for p in params:
        if p.block is None:
            continue
        if p.kind in ("attn", "mlp"):
            entry = (p.role, p.module)
            lst = linears.setdefault((p.block, p.kind), [])
            if entry not in lst:
                lst.append(entry)
        if p.is_norm and p.leaf in _POST_MLP_NORMS:
            post_ffn_blocks.add(p.block)

    def find(block: str, kind: str, roles: Sequence[str], fallback: bool = True) -> str | None:
        lst = linears.get((block, kind), [])
        for role in roles:
            for r, module in lst:
                if r == role:
                    return module
        return lst[0][1] if lst and fallback else None

    head = by_name[out_w_name].module if out_w_name in by_name else None
    embed = by_name[in_w_name].module if in_w_name in by_name else None
    for p in params:
        if not p.is_norm:
            continue
        if p.block is None:
            if p.kind == "norm":
                p.target = head if p.role == "final_norm" else embed
            continue
        inner = p.module[len(p.block) + 1:].split(".")
        if any(s in _ATTN_SEGMENTS for s in inner[:-1]):          # q_norm / k_norm inside attention
            p.role = p.leaf
            first = p.leaf[:1].lower()
            p.target = find(p.block, "attn", [first] if first in "qk" else ["q", "qkv"])
        elif any(s in _MLP_SEGMENTS for s in inner[:-1]):
            p.role = p.leaf
            p.target = find(p.block, "mlp", ["up", "gate_up", "gate"])
        elif p.leaf == "post_attention_layernorm" and p.block in post_ffn_blocks:   # OLMo2/Gemma2 post-norm
            p.role, p.target = "attn_post_norm", find(p.block, "attn", ["o"])
        elif p.leaf in _PRE_ATTN_NORMS:
            p.role, p.target = "attn_norm", find(p.block, "attn", ["q", "qkv"])
        elif p.leaf in _PRE_MLP_NORMS:
            p.role, p.target = "mlp_norm", find(p.block, "mlp", ["up", "gate_up", "gate"])
        elif p.leaf in _POST_MLP_NORMS:
            p.role, p.target = "mlp_post_norm", find(p.block, "mlp", ["down"])
        else:
            p.role = p.leaf


# --------------------------------------------------------------------------- grouping


def _neuron_mlps(params: list[_Param]) -> dict[str, dict]:
    """MLPs whose hidden units can be cut out: parent module path -> layout.

    A layout has an `up` weight, a `down` weight, optionally a `gate` weight, and optional up /
    gate biases, all Linear or all Conv1D, agreeing on the hidden size.
    """
    parents: dict[str, list[_Param]] = {}
    for p in params:
        if p.kind == "mlp" and p.role in ("up", "gate", "down", "gate_up"):
            parents.setdefault(p.module.rpartition(".")[0], []).append(p)
    layouts = {}
    for parent, members in parents.items():
        slots: dict[tuple[str, str], _Param] = {}
        ok = True
        for p in members:
            key = (p.role, p.attr)
            if key in slots or p.role == "gate_up" or p.attr not in ("weight", "bias"):
                ok = False
            slots[key] = p
        up, down = slots.get(("up", "weight")), slots.get(("down", "weight"))
        if not ok or up is None or down is None or len(up.shape) != 2 or len(down.shape) != 2:
            continue
        conv = up.conv1d
        if down.conv1d != conv:
            continue
        hidden_dim_up, hidden_dim_down = (1, 0) if conv else (0, 1)
        width = up.shape[hidden_dim_up]
        dims: dict[str, int] = {up.name: hidden_dim_up, down.name: hidden_dim_down}
        gate = slots.get(("gate", "weight"))
        if gate is not None:
            if gate.conv1d != conv or len(gate.shape) != 2 or gate.shape[hidden_dim_up] != width:
                continue
            dims[gate.name] = hidden_dim_up
        if down.shape[hidden_dim_down] != width:
            continue
        bad_bias = False
        for role in ("up", "gate"):
            b = slots.get((role, "bias"))
            if b is not None:
                if b.shape != (width,) or (role, "weight") not in slots:
                    bad_bias = True
                dims[b.name] = 0
        if bad_bias:
            continue
        layouts[parent] = {"width": width, "dims": dims, "layer": up.layer}
    return layouts


def parameter_groups(model, granularity: str = "tensor", norms: str = "join") -> list[Group]:
    """Cut `model` into parameter groups at `granularity` (see the module docstring).

    Every parameter entry is in at most one group; with `norms` 'join' or 'alone' in exactly one.
    Groups come in a fixed order (the order of `model.named_parameters()`), names are unique.
    """
    if granularity not in GRANULARITIES:
        raise UserError(f"unknown granularity {granularity!r}: use one of {', '.join(GRANULARITIES)}")
    if norms not in NORMS:
        raise UserError(f"unknown --norms {norms!r}: use one of {', '.join(NORMS)}")

    params = _describe(model)
    by_name = {p.name: p for p in params}
    by_module: dict[str, list[_Param]] = {}
    for p in params:
        by_module.setdefault(p.module, []).append(p)
    layouts = _neuron_mlps(params) if granularity == "neuron" else {}
    split_params = {name: parent for parent, lay in layouts.items() for name in lay["dims"]}
    split_modules = {by_name[n].module for n in split_params}

    order: dict[str, list[ParamSlice]] = {}
    meta: dict[str, tuple[int | None, str, str]] = {}
    position: dict[str, int] = {}      # a group sits where its first own (not joined) parameter is

    def add(key: str, piece: ParamSlice, info: tuple[int | None, str, str] | None) -> None:
        order.setdefault(key, []).append(piece)
        if info is not None and key not in meta:
            meta[key] = info
            position[key] = index

    def module_key(module: str, fallback: str) -> str:
        return module or fallback

    for index, p in enumerate(params):
        if p.is_norm and norms == "exclude":
            continue
        target = p.target if p.is_norm and norms == "join" else None
        if target is not None and granularity == "neuron" and target in split_modules:
            target = None                                   # the MLP is cut into neurons: no one to join
        if p.name in split_params:
            parent = split_params[p.name]
            lay = layouts[parent]
            dim = lay["dims"][p.name]
            for j in range(lay["width"]):
                add(f"{parent}.neuron.{j}", ParamSlice(p.name, dim, j), (lay["layer"], "mlp", "neuron"))
            continue
        whole = ParamSlice(p.name)
        if target is not None:                              # a norm joining a linear group
            anchor = by_module[target][0]
            if granularity == "tensor":
                weight = next((q for q in by_module[target] if q.attr == "weight"), anchor)
                add(weight.name, whole, None)
            elif granularity in ("module", "neuron"):
                add(target, whole, None)
            elif granularity == "layer":
                add(anchor.block if anchor.block is not None else target, whole, None)
            else:  # kind
                add(f"{anchor.block}.{anchor.kind}" if anchor.block is not None else target, whole, None)
            continue
        own = (p.layer, p.kind, p.role)
        if granularity == "tensor":
            add(p.name, whole, own)
        elif granularity in ("module", "neuron"):
            add(module_key(p.module, p.name), whole, own)
        elif p.block is None:                               # embeddings, head, final norm
            add(module_key(p.module, p.name), whole, own)
        elif granularity == "layer":
            if p.is_norm:                                   # norms='alone'
                add(module_key(p.module, p.name), whole, own)
            else:
                add(p.block, whole, (p.layer, "other", "layer"))
        else:  # kind
            add(f"{p.block}.{p.kind}", whole, (p.layer, p.kind, p.kind))

    tied_names = {p.name for p in params if p.tied}
    groups = []
    for key in sorted(order, key=lambda k: position.get(k, len(params))):
        slices = order[key]
        layer, kind, role = meta.get(key, (None, "norm", "norm"))
        n = sum(s.numel(by_name[s.name].shape) for s in slices)
        groups.append(Group(key, tuple(slices), layer, kind, role, n, tied=any(s.name in tied_names for s in slices)))
    return groups


# --------------------------------------------------------------------------- helpers


def group_table(groups: Iterable[Group]):
    """A DataFrame with one row per group: group, layer, kind, role, n_params, tied."""
    import pandas as pd

    groups = list(groups)
    return pd.DataFrame(
        {
            "group": pd.Series([g.name for g in groups], dtype=object),
            "layer": pd.array([g.layer for g in groups], dtype="Int64"),
            "kind": pd.Series([g.kind for g in groups], dtype=object),
            "role": pd.Series([g.role for g in groups], dtype=object),
            "n_params": pd.array([g.n_params for g in groups], dtype="int64"),
            "tied": pd.array([g.tied for g in groups], dtype=bool),
        }
    )


def _lookup(tensors: Mapping[str, torch.Tensor], name: str, group: Group) -> torch.Tensor:
    try:
        return tensors[name]
    except KeyError:
        raise KeyError(f"no tensor for parameter {name!r} of group {group.name!r}") from None


def gather(group: Group, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The group's entries of full-size `tensors` (keyed by parameter name) as one 1-D vector.

    The order is the order of `group.slices`, each slice flattened row-major.
    """
    parts = [s.view(_lookup(tensors, s.name, group)).reshape(-1) for s in group.slices]
    return torch.cat(parts) if parts else torch.empty(0)


def scatter(group: Group, flat: torch.Tensor, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `gather`: full-size tensors (shapes from `like`, dtype and device of `flat`)
    for each parameter the group touches, holding `flat` on the group's entries and zeros elsewhere."""
    flat = flat.reshape(-1)
    if flat.numel() != group.n_params:
        raise ValueError(f"group {group.name!r} has {group.n_params} entries, got a vector of {flat.numel()}")
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for s in group.slices:
        if s.name not in out:
            out[s.name] = torch.zeros(_lookup(like, s.name, group).shape, dtype=flat.dtype, device=flat.device)
        view = s.view(out[s.name])
        view.copy_(flat[offset:offset + view.numel()].view(view.shape))
        offset += view.numel()
    return out


def element_mask(groups: Iterable[Group], model) -> dict[str, torch.Tensor]:
    """Boolean masks, True on the entries of `groups`, for each parameter they touch.

    Parameters no group touches are absent from the result. Masks live on the parameter's device.
    """
    shapes = dict(model.named_parameters())
    masks: dict[str, torch.Tensor] = {}
    for g in groups:
        for s in g.slices:
            if s.name not in masks:
                masks[s.name] = torch.zeros(shapes[s.name].shape, dtype=torch.bool, device=shapes[s.name].device)
            s.view(masks[s.name]).fill_(True)
    return masks


def _examples(groups: Sequence[Group], k: int = 5) -> str:
    if not groups:
        return "there are no groups"
    step = max(1, len(groups) // k)
    names = [g.name for g in groups[::step][:k]]
    return "groups are named like " + ", ".join(names)


def filter_groups(groups: Iterable[Group], include: Sequence[str] = (), exclude: Sequence[str] = ()) -> list[Group]:
    """The groups whose name matches (`re.search`) any `include` regex (all when none given) and
    no `exclude` regex. A regex that matches no group, or a filter that leaves nothing, is a UserError."""
    groups = list(groups)
    compiled = {}
    for flag, patterns in (("--include", include), ("--exclude", exclude)):
        for pattern in patterns:
            try:
                rx = re.compile(pattern)
            except re.error as exc:
                raise UserError(f"{flag} {pattern!r} is not a valid regular expression: {exc}") from None
            if not any(rx.search(g.name) for g in groups):
                raise UserError(f"{flag} {pattern!r} matched no parameter group ({_examples(groups)})")
            compiled.setdefault(flag, []).append(rx)
    inc, exc_ = compiled.get("--include", []), compiled.get("--exclude", [])
    kept = [g for g in groups if (not inc or any(r.search(g.name) for r in inc)) and not any(r.search(g.name) for r in exc_)]
    if not kept:
        raise UserError(
            f"--include {list(include)} with --exclude {list(exclude)} leaves no parameter group ({_examples(groups)})"
        )
    return kept
