"""Gradient sketches (docs/design.md §6): unbiased inner products, exact factored sketches, seeding, files."""

from __future__ import annotations

import math

import pytest
import torch

from soir.data import collate, example_losses
from soir.errors import UserError
from soir.gradients import per_example_grads
from soir.sketch import (
    SKETCHES,
    FactoredSketcher,
    KroneckerSketch,
    factor_pair,
    load_sketches,
    make_sketch,
    matrix_modules,
    save_sketches,
)

D, K, SEEDS = 100, 16, 200
SHAPE = (10, 10)  # factored: a (d_out, d_in) matrix of D coordinates


def _options(kind):
    return {"shape": SHAPE} if kind == "factored" else {}


@pytest.fixture
def batch(tokenizer):
    texts = ["Alice Moon was born on 3 March", "What is the capital of Norland? Fjordheim.", "Seven plus five equals twelve."]
    ids = [tokenizer(t)["input_ids"] for t in texts]
    labels = [[-100] * 3 + x[3:] for x in ids]
    return collate(ids, labels, tokenizer.pad_token_id or 0)


@pytest.mark.parametrize("kind,options", [
    ("gaussian", {}), ("rademacher", {}), ("sjlt", {}), ("sjlt", {"s": 4}), ("sjlt", {"s": 3}), ("oporp", {}), ("factored", {}),
])
def test_inner_products_are_kept_in_expectation(kind, options):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(D, generator=gen, dtype=torch.float64)
    y = 0.6 * x + torch.randn(D, generator=gen, dtype=torch.float64)
    pairs = torch.stack([x, y])
    inner = []
    for seed in range(SEEDS):  # a fresh map per seed
        sx, sy = make_sketch(kind, D, K, "layers.1.mlp.up_proj.weight", seed, **options, **_options(kind)).project(pairs)
        inner.append(sx @ sy)
    inner = torch.stack(inner)
    standard_error = inner.std() / math.sqrt(SEEDS)
    assert inner.std() > 0  # really random
    assert abs(inner.mean() - x @ y) < 3 * standard_error, (kind, inner.mean().item(), (x @ y).item(), standard_error.item())


def test_none_is_exact():
    x = torch.randn(3, D, dtype=torch.float64)
    torch.testing.assert_close(make_sketch("none", D, None, "w").project(x), x)
    assert set(SKETCHES) == {"none", "gaussian", "rademacher", "sjlt", "oporp", "factored"}


def test_sparse_maps_have_the_stated_structure():
    sjlt = make_sketch("sjlt", D, K, "w", s=4).matrix()
    nonzero = sjlt != 0
    assert (nonzero.sum(0) == 4).all()  # s distinct buckets per coordinate (s divides k)
    torch.testing.assert_close(sjlt[nonzero].abs(), torch.full((4 * D,), 0.5, dtype=torch.float64))
    oporp = make_sketch("oporp", D, K, "w").matrix()
    assert (oporp.abs().sum(0) == 1).all()  # one ±1 per coordinate: E[PᵀP] = I at scale 1
    assert oporp.abs().sum(1).max() <= math.ceil(D / K)  # k (nearly) equal buckets


def test_maps_are_seeded_by_name_and_seed_and_chunking_does_not_change_them():
    for kind in ("gaussian", "rademacher", "sjlt", "oporp", "factored"):
        a = make_sketch(kind, D, K, "layers.0.q", 0, **_options(kind)).matrix()
        torch.testing.assert_close(make_sketch(kind, D, K, "layers.0.q", 0, **_options(kind)).matrix(), a, rtol=0, atol=0)
        assert not torch.allclose(make_sketch(kind, D, K, "layers.0.k", 0, **_options(kind)).matrix(), a)
        assert not torch.allclose(make_sketch(kind, D, K, "layers.0.q", 1, **_options(kind)).matrix(), a)
    x = torch.randn(2, 70_000, dtype=torch.float64)  # more than one seeded block of columns
    for kind in ("gaussian", "sjlt", "oporp"):
        reference = make_sketch(kind, x.shape[1], 4, "big", chunk=1 << 20).project(x)
        streamed = make_sketch(kind, x.shape[1], 4, "big", chunk=4096, cache_bytes=0).project(x)
        torch.testing.assert_close(streamed, reference)
    # float32 and float64 use the same map
    torch.testing.assert_close(make_sketch("gaussian", D, K, "w").project(x[:, :D].float()), make_sketch("gaussian", D, K, "w").project(x[:, :D]).float())


def test_kronecker_sketch_is_the_kronecker_product():
    assert factor_pair(1024, 64, 64) == (32, 32) and factor_pair(512, 300, 32) == (32, 16) and factor_pair(512, 32, 300) == (16, 32)
    sketch = KroneckerSketch(6 * 8, 12, "w", shape=(6, 8))
    p_out, p_in = sketch.factors(dtype=torch.float64)
    assert p_out.shape == (3, 6) and p_in.shape == (4, 8)
    g = torch.randn(5, 6, 8, dtype=torch.float64)
    expected = torch.einsum("ao,noi,bi->nab", p_out, g, p_in).reshape(5, 12)  # vec(P_out G P_inᵀ), row major
    torch.testing.assert_close(sketch.project(g), expected)
    torch.testing.assert_close(g.reshape(5, -1) @ torch.kron(p_out, p_in).T, expected)


CASES = {
    "llama": ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"],
    "olmo": ["model.layers.0.mlp.down_proj", "lm_head"],
    "gpt2": ["transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_fc", "transformer.wpe"],  # Conv1D, biases, positions
    "qwen2": ["model.layers.0.self_attn.k_proj", "lm_head"],  # tied embeddings: both roles, one map
}


@pytest.mark.parametrize("arch", list(CASES))
def test_factored_sketch_equals_the_kronecker_map_of_per_example_gradients(make_model, batch, arch):
    model = make_model(arch, dtype=torch.float64).eval()
    extra = ["model.norm.weight", "model.layers.0.input_layernorm.weight"] if arch == "llama" else []  # sjlt fallback
    sketcher = FactoredSketcher(model, CASES[arch], k=12, seed=5, extra_params=extra)
    sketches = sketcher.sketch(example_losses, batch)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())  # no side effects
    grads = per_example_grads(model, batch, list(sketches))
    if arch == "qwen2":
        assert "model.embed_tokens.weight" in sketches and "lm_head.weight" not in sketches
    if arch == "gpt2":
        assert {"transformer.h.0.attn.c_attn.bias", "transformer.wpe.weight"} <= set(sketches)
    n = batch["input_ids"].shape[0]
    for name, sketch in sketches.items():
        assert sketch.shape == (n, 12) and sketch.dtype == torch.float64
        g = grads[name]
        if name in sketcher.maps:
            kron = sketcher.maps[name]
            if tuple(g.shape[1:]) != kron.shape:  # Conv1D stores (in, out): sketch the (out, in) layout
                assert arch == "gpt2" and ".c_" in name
                g = g.transpose(1, 2)
            expected = g.reshape(n, -1) @ kron.matrix().T
        elif name in sketcher.bias_maps:
            expected = sketcher.bias_maps[name].project(g)
        else:
            expected = make_sketch("sjlt", g[0].numel(), 12, name, 5).project(g.reshape(n, -1))
        assert expected.abs().max() > 0
        torch.testing.assert_close(sketch, expected, rtol=1e-9, atol=1e-12)


def test_gpt2_conv1d_and_tied_head(make_model, batch):
    model = make_model("gpt2", dtype=torch.float64).eval()
    sketches = FactoredSketcher(model, ["lm_head"], k=9).sketch(example_losses, batch)
    assert set(sketches) == {"transformer.wte.weight"}  # lm_head is tied to wte: one tensor, both roles
    sketcher = FactoredSketcher(model, ["transformer.h.0.mlp.c_proj"], k=9, bias_kind=None)
    (name, sketch), = sketcher.sketch(example_losses, batch).items()
    g = per_example_grads(model, batch, [name])[name]  # (n, in, out)
    p_out, p_in = sketcher.maps[name].factors(dtype=torch.float64)
    torch.testing.assert_close(sketch, torch.einsum("ao,nio,bi->nab", p_out, g, p_in).reshape(len(g), 9))


def test_per_example_grads_match_separate_backward_passes(make_model, tokenizer, batch):
    # SDPA, not eager attention: transformers' eager attention takes its softmax in float32 even for float64
    # weights, which leaves padded and unpadded rows ~1e-7 apart (seen at one thread), far above this test's 1e-9
    model = make_model("olmo", dtype=torch.float64, eager=False).eval()
    names = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.1.post_attention_layernorm.weight"]
    names = [n for n in names if n in dict(model.named_parameters())]
    grads = per_example_grads(model, batch, names, chunk_size=2)
    params = dict(model.named_parameters())
    for i in range(batch["input_ids"].shape[0]):
        width = int(batch["attention_mask"][i].sum())  # the example alone, without padding
        single = {key: value[i : i + 1, :width] for key, value in batch.items()}
        model.zero_grad(set_to_none=True)
        example_losses(model, single).sum().backward()
        for name in names:
            torch.testing.assert_close(grads[name][i], params[name].grad, rtol=1e-9, atol=1e-12)
    with pytest.raises(UserError, match="no parameter"):
        per_example_grads(model, batch, ["nope.weight"])


def test_sketch_of_all_linear_weights_runs_in_float32(make_model, batch):
    model = make_model("neox").eval()
    names = matrix_modules(model)
    sketches = FactoredSketcher(model, names, k=64).sketch(example_losses, batch)
    assert {f"{n}.weight" for n in names} <= set(sketches)
    assert all(s.shape == (3, 64) and s.dtype == torch.float32 and torch.isfinite(s).all() for s in sketches.values())
    with pytest.raises(ValueError, match="factored sketches take"):
        FactoredSketcher(model, ["gpt_neox.final_layer_norm"], k=4)
    with pytest.raises(UserError, match="unknown sketch"):
        make_sketch("fft", D, K, "w")


def test_save_and_load_round_trip(tmp_path):
    sketches = {"model.layers.0.mlp.up_proj.weight": torch.randn(4, 16), "lm_head.weight": torch.randn(4, 16, dtype=torch.float64)}
    manifest = {"kind": "factored", "k": 16, "seed": 3, "split": "forget"}
    save_sketches(tmp_path / "sk", sketches, manifest)
    save_sketches(tmp_path / "sk", sketches, manifest)  # overwriting is atomic too
    loaded, meta = load_sketches(tmp_path / "sk")
    assert set(loaded) == set(sketches)
    for name, value in sketches.items():
        torch.testing.assert_close(loaded[name], value, rtol=0, atol=0)
    assert {key: meta[key] for key in manifest} == manifest
    assert meta["tensors"]["lm_head.weight"] == [4, 16]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sk"]  # no temporary left behind
