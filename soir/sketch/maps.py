"""Sketch maps (docs/design.md §6): seeded random linear maps that keep inner products.

A sketch maps a group's gradient (dimension D) to k dimensions with a random matrix P
with E[PᵀP] = I, so E[<Px, Py>] = <x, y>. Every map is a pure function of
(kind, group name, seed, D, k): it is regenerated from a hash of the group name, never
stored. Maps are generated on the CPU, so the same name gives the same map on every
device, and in blocks of columns seeded independently, so the `chunk` setting (how many
columns one matmul handles) never changes the map.

Kinds, registered by name in `SKETCHES` (one registration per kind):

- `none`: the identity (exact; k = D).
- `gaussian`: dense JL, entries N(0, 1/k).
- `rademacher`: dense JL, entries ±1/√k.
- `sjlt`: sparse JL / count-sketch: s nonzeros ±1/√s per input coordinate, in s
  distinct buckets when s divides k (one per block of k/s rows); a signed scatter-add.
- `oporp`: one permutation + one random projection (the thesis's RapidGrad map):
  random signs, a random permutation, sums over k equal contiguous buckets. Each
  coordinate lands in exactly one bucket with a random sign, so E[PᵀP] = I with
  scale 1 (no √(k/D) factor: that would shrink inner products by k/D).
- `factored`: for a weight matrix of shape (d_out, d_in), P = P_out ⊗ P_in with
  P_out (k_out×d_out), P_in (k_in×d_in) dense Gaussian (or Rademacher) maps of scale
  1/√k_out and 1/√k_in, k = k_out·k_in. The sketch of G is vec(P_out G P_inᵀ), row
  major, which equals (P_out ⊗ P_in) vec(G). `FactoredSketcher` computes it for
  per-example gradients from forward and backward hooks in one batched pass.

Layout convention: the gradient of a weight is sketched in the (out, in) layout of
nn.Linear. transformers' Conv1D stores its weight as (in, out); its gradient is
transposed before sketching, so a Conv1D and a Linear computing the same function
have the same sketch. nn.Embedding's weight (num_embeddings, dim) is treated as
(out, in) = (vocabulary, hidden), the layout of a tied output head.

A group made of several tensors is sketched by the sum of its members' sketches (same
k, independently seeded maps): the block map [P_1, P_2] also has E[PᵀP] = I.
"""

from __future__ import annotations

import hashlib
import math
from typing import Callable, Sequence

import torch
from einops import einsum, rearrange
from torch import Tensor

from soir.registry import Registry

DENSE_BLOCK = 4096  # columns of a dense map drawn from one seeded generator
SPARSE_BLOCK = 1 << 16  # columns of an sjlt map drawn from one seeded generator
DEFAULT_CHUNK = 16384  # columns handled by one matmul / scatter (rounded to whole blocks)
CACHE_BYTES = 64 << 20  # a map up to this size is kept after its first use



def map_seed(name: str, seed: int = 0, *salt) -> int:
    """A stable 63-bit seed from a group name, the global seed and a salt (kind, block…).

    blake2b, not Python's `hash`, so it is the same in every process.
    """
    text = "\x1f".join([str(int(seed)), name, *map(str, salt)])
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") >> 1


def _generator(*args) -> torch.Generator:
    return torch.Generator().manual_seed(map_seed(*args))


def _compute_dtype(x: Tensor, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None:
        return dtype
    return torch.promote_types(x.dtype, torch.float32) if x.is_floating_point() else torch.float32


# ---------------------------------------------------------------- maps


class Sketch:
    """A seeded linear map R^D -> R^k with E[PᵀP] = I.

    `project(x)` takes (n, D) (or (D,)) and returns (n, k) (or (k,)) in `dtype`, by default
    x's dtype promoted to at least float32. `matrix()` is the dense (k, D) map, for checks.
    """

    kind = "?"
    block = DENSE_BLOCK

    def __init__(self, dim_in: int, k: int, seed_name: str, seed: int = 0, *, device=None, dtype=None,
                 chunk: int = DEFAULT_CHUNK, cache_bytes: int = CACHE_BYTES):
        if dim_in < 1 or k < 1:
            raise ValueError(f"a sketch needs dim_in >= 1 and k >= 1, not dim_in={dim_in}, k={k}")
        self.dim_in, self.k, self.seed_name, self.seed = int(dim_in), int(k), seed_name, int(seed)
        self.device = None if device is None else torch.device(device)
        self.dtype = dtype
        self.chunk = max(self.block, int(chunk) // self.block * self.block)
        self.cache_bytes = cache_bytes
        self._cache: dict = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.seed_name!r}, {self.dim_in} -> {self.k}, seed={self.seed})"

    # subclasses implement _prepare(device, dtype) -> state and _project_into(out, x_chunk, start, stop, state)
    def project(self, x: Tensor) -> Tensor:
        vector = x.dim() == 1
        x = x.reshape(1 if vector else x.shape[0], -1)
        if x.shape[1] != self.dim_in:
            raise ValueError(f"{self!r} projects vectors of {self.dim_in} coordinates, not {x.shape[1]}")
        dtype = _compute_dtype(x, self.dtype)
        device = self.device or x.device
        x = x.to(device=device, dtype=dtype)
        out = torch.zeros(x.shape[0], self.k, device=device, dtype=dtype)
        with torch.no_grad():
            state = self._prepare(device, dtype)
            for start in range(0, self.dim_in, self.chunk):
                stop = min(start + self.chunk, self.dim_in)
                self._project_into(out, x[:, start:stop], start, stop, state)
        return out[0] if vector else out

    def _prepare(self, device, dtype):
        return None

    def matrix(self, device=None, dtype=torch.float64) -> Tensor:
        """The dense (k, D) map (small D only: it projects the identity)."""
        return self.project(torch.eye(self.dim_in, device=device, dtype=dtype)).T.contiguous()

    def _blocks(self, start: int, stop: int):
        for b in range(start // self.block, -(-stop // self.block)):
            yield b, b * self.block, min((b + 1) * self.block, self.dim_in)

    def _cached(self, key, make: Callable[[], object], nbytes: int):
        if key in self._cache:
            return self._cache[key]
        value = make()
        if nbytes <= self.cache_bytes:
            self._cache[key] = value
        return value


class PaddedIdentity(Sketch):
    """x ↦ [x; 0] in R^k for D ≤ k: exact, PᵀP = I (a group member too small to compress)."""

    kind = "identity"

    def project(self, x: Tensor) -> Tensor:
        vector = x.dim() == 1
        x = x.reshape(1 if vector else x.shape[0], -1)
        out = torch.zeros(x.shape[0], self.k, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
        out[:, : x.shape[1]] = x
        return out[0] if vector else out


class IdentitySketch(Sketch):
    """`none`: exact gradients, k = D."""

    kind = "none"

    def __init__(self, dim_in: int, k: int | None = None, seed_name: str = "", seed: int = 0, **options):
        if k is not None and k != dim_in:
            raise ValueError(f"the `none` sketch keeps all {dim_in} coordinates; it cannot give k={k}")
        super().__init__(dim_in, dim_in, seed_name, seed, **options)

    def project(self, x: Tensor) -> Tensor:
        vector = x.dim() == 1
        out = x.reshape(1 if vector else x.shape[0], -1)
        if out.shape[1] != self.dim_in:
            raise ValueError(f"{self!r} takes vectors of {self.dim_in} coordinates, not {out.shape[1]}")
        out = out.to(device=self.device or x.device, dtype=_compute_dtype(x, self.dtype))
        return out[0] if vector else out


class DenseSketch(Sketch):
    """Dense JL maps, generated block by block of columns."""

    def _draw(self, generator: torch.Generator, width: int) -> Tensor:  # unscaled, float32, CPU
        raise NotImplementedError

    def _columns(self, start: int, stop: int, device, dtype) -> Tensor:
        """Columns [start, stop) of P (scaled), shape (k, stop - start); whole blocks only."""
        parts = [self._draw(_generator(self.seed_name, self.seed, self.kind, b), hi - lo) for b, lo, hi in self._blocks(start, stop)]
        return torch.cat(parts, 1).to(device=device, dtype=dtype).mul_(1.0 / math.sqrt(self.k))

    def _prepare(self, device, dtype):
        if self.k * self.dim_in * torch.finfo(dtype).bits // 8 <= self.cache_bytes:
            return self._cached((str(device), dtype), lambda: self._columns(0, self.dim_in, device, dtype), 0)
        return (device, dtype)  # too big to keep: regenerate chunk by chunk

    def _project_into(self, out, x, start, stop, state):
        columns = state[:, start:stop] if isinstance(state, Tensor) else self._columns(start, stop, *state)
        out.addmm_(x, columns.T)


class GaussianSketch(DenseSketch):
    kind = "gaussian"

    def _draw(self, generator, width):
        return torch.randn(self.k, width, generator=generator)


class RademacherSketch(DenseSketch):
    kind = "rademacher"

    def _draw(self, generator, width):
        return torch.randint(0, 2, (self.k, width), generator=generator).float().mul_(2).sub_(1)


class SJLTSketch(Sketch):
    """Sparse JL: each input coordinate goes to `s` buckets with signs ±1/√s (index_add_)."""

    kind = "sjlt"
    block = SPARSE_BLOCK

    def __init__(self, dim_in: int, k: int, seed_name: str, seed: int = 0, *, s: int = 1, **options):
        super().__init__(dim_in, k, seed_name, seed, **options)
        if not 1 <= s <= k:
            raise ValueError(f"sjlt needs 1 <= s <= k, not s={s}, k={k}")
        self.s = int(s)

    def _hashes(self, start: int, stop: int, device) -> tuple[Tensor, Tensor]:
        """Buckets (s, width) int64 and signs (s, width) float32 ±1 of columns [start, stop)."""
        buckets, signs = [], []
        distinct = self.k % self.s == 0  # one bucket in each of s blocks of k/s rows
        for b, lo, hi in self._blocks(start, stop):
            g = _generator(self.seed_name, self.seed, self.kind, self.s, b)
            if distinct:
                rows = self.k // self.s
                bucket = torch.randint(0, rows, (self.s, hi - lo), generator=g) + rows * torch.arange(self.s)[:, None]
            else:
                bucket = torch.randint(0, self.k, (self.s, hi - lo), generator=g)
            buckets.append(bucket)
            signs.append(torch.randint(0, 2, (self.s, hi - lo), generator=g).float().mul_(2).sub_(1))
        return torch.cat(buckets, 1).to(device), torch.cat(signs, 1).to(device)

    def _prepare(self, device, dtype):
        if self.dim_in * self.s * 12 <= self.cache_bytes:
            return self._cached(str(device), lambda: self._hashes(0, self.dim_in, device), 0)
        return device  # too big to keep: regenerate chunk by chunk

    def _project_into(self, out, x, start, stop, state):
        if isinstance(state, tuple):
            bucket, sign = state[0][:, start:stop], state[1][:, start:stop]
        else:
            bucket, sign = self._hashes(start, stop, state)
        scale = 1.0 / math.sqrt(self.s)
        for row in range(self.s):
            out.index_add_(1, bucket[row], x * sign[row].to(x.dtype), alpha=scale)


class OPORPSketch(Sketch):
    """One permutation + one random projection: signs, a permutation, k bucket sums.

    The D coordinates (padded with zeros to m·k, m = ⌈D/k⌉) are permuted and cut into
    k contiguous buckets of m; bucket j sums its coordinates times random signs. The
    map has one ±1 per column, so E[PᵀP] = I at scale 1. Holds a D-long bucket index.
    """

    kind = "oporp"

    def _index(self, device) -> tuple[Tensor, Tensor]:
        g = _generator(self.seed_name, self.seed, self.kind)
        width = -(-self.dim_in // self.k)
        slot = torch.randperm(width * self.k, generator=g)[: self.dim_in]
        sign = torch.randint(0, 2, (self.dim_in,), generator=g).float().mul_(2).sub_(1)
        return (slot // width).to(device), sign.to(device)

    def _prepare(self, device, dtype):
        return self._cached(str(device), lambda: self._index(device), self.dim_in * 12)

    def _project_into(self, out, x, start, stop, state):
        bucket, sign = state
        out.index_add_(1, bucket[start:stop], x * sign[start:stop].to(x.dtype))


def factor_pair(k: int, d_out: int, d_in: int) -> tuple[int, int]:
    """(k_out, k_in) with k_out·k_in = k, as near √k as divisors allow; the larger factor
    goes to the larger dimension."""
    small = max(a for a in range(1, math.isqrt(k) + 1) if k % a == 0)
    big = k // small
    return (big, small) if d_out >= d_in else (small, big)


class KroneckerSketch(Sketch):
    """`factored`: P = P_out ⊗ P_in on a (d_out, d_in) matrix flattened row-major.

    `project(x)` takes (n, d_out·d_in) or (n, d_out, d_in); `factors()` gives (P_out, P_in).
    """

    kind = "factored"

    def __init__(self, dim_in: int, k: int, seed_name: str, seed: int = 0, *, shape: Sequence[int] | None = None,
                 base: str = "gaussian", **options):
        if shape is None or len(shape) != 2 or shape[0] * shape[1] != dim_in:
            raise ValueError(f"a factored sketch needs shape=(d_out, d_in) with d_out*d_in = dim_in ({dim_in}), not {shape}")
        if base not in ("gaussian", "rademacher"):
            raise ValueError(f"factored sketches use gaussian or rademacher factors, not {base!r}")
        super().__init__(dim_in, k, seed_name, seed, **options)
        self.shape = (int(shape[0]), int(shape[1]))
        self.k_out, self.k_in = factor_pair(self.k, *self.shape)
        options.pop("chunk", None)
        cls = GaussianSketch if base == "gaussian" else RademacherSketch
        self.p_out = cls(self.shape[0], self.k_out, f"{seed_name}|out", seed, **options)
        self.p_in = cls(self.shape[1], self.k_in, f"{seed_name}|in", seed, **options)

    def factors(self, device=None, dtype=torch.float32) -> tuple[Tensor, Tensor]:
        """(P_out (k_out, d_out), P_in (k_in, d_in)), each with E[PᵀP] = I."""
        key = ("factors", str(device), dtype)
        if key not in self._cache:
            self._cache[key] = tuple(p._columns(0, p.dim_in, device, dtype) for p in (self.p_out, self.p_in))
        return self._cache[key]

    def project(self, x: Tensor) -> Tensor:
        vector = x.dim() == 1
        x = x.reshape(1 if vector else x.shape[0], *self.shape)
        dtype = _compute_dtype(x, self.dtype)
        device = self.device or x.device
        p_out, p_in = self.factors(device, dtype)
        out = rearrange(einsum(p_out, x.to(device=device, dtype=dtype), p_in, "a o, n o i, b i -> n a b"), "n a b -> n (a b)")
        return out[0] if vector else out

    def matrix(self, device=None, dtype=torch.float64) -> Tensor:
        p_out, p_in = self.factors(device, dtype)
        return torch.kron(p_out, p_in)


SKETCHES: Registry[type[Sketch]] = Registry("sketch", "--sketch")
SKETCHES.register("none", IdentitySketch, help="exact per-example gradients, the accuracy reference")
SKETCHES.register("gaussian", GaussianSketch, help="dense JL, N(0, 1/k) entries")
SKETCHES.register("rademacher", RademacherSketch, help="dense JL, ±1/√k entries")
SKETCHES.register("sjlt", SJLTSketch, help="sparse JL / count-sketch, a signed scatter-add")
SKETCHES.register("oporp", OPORPSketch, help="the thesis's one-permutation-one-projection map")
SKETCHES.register("factored", KroneckerSketch, help="P_out ⊗ P_in on weight matrices from forward/backward hooks, no per-example gradients")


def make_sketch(kind: str, dim_in: int, k: int | None, seed_name: str, seed: int = 0, device=None, dtype=None, **options) -> Sketch:
    """The `kind` map for a group `seed_name` of `dim_in` coordinates, to `k` dimensions.

    Options: `chunk` (columns per matmul), `cache_bytes`; `s` for sjlt; `shape=(d_out, d_in)`
    and `base` (gaussian|rademacher) for factored. `none` takes k = None or dim_in.
    """
    return SKETCHES.get(kind)(dim_in, k, seed_name, seed, device=device, dtype=dtype, **options)


