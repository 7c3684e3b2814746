"""KFAC curvature (`soir.kfac`): against the Kronecker form built by hand from per-token activations and
sampled-label output gradients, and, where KFAC is exact (one linear layer, one token per example),
against the sampled-label Gauss–Newton estimator and the exact Gauss–Newton form."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from soir.curvature import CURVATURES, dot, draw_labels, gauss_newton_product, ggn_terms
from soir.data import per_example_loss
from soir.gradients import mean_gradient
from soir.groups import Group, ParamSlice, parameter_groups
from soir.kfac import kfac_quadratic_forms
from soir.runtime import lm_inputs
from soir.sketch import param_names
from tests.test_curvature import make_batches

pytestmark = pytest.mark.usefixtures("one_thread")


def element_masks(group: Group, params) -> dict[str, torch.Tensor]:
    masks = {}
    for s in group.slices:
        s.view(masks.setdefault(s.name, torch.zeros(params[s.name].shape, dtype=torch.bool))).fill_(True)
    return masks


def hand_forms(model, batches, groups, vectors, seed=0):
    """tr(Vᵀ S V A) per module touched, summed per group, with A = Σ x xᵀ / M and S = Σ T_i δ δᵀ / n over
    the tokens whose output gradient is not zero (x one-hot for embeddings, with a 1 appended under a
    bias), plus mean_i T_i (g_iᵀ u)² over per-example gradients for the parameters of no such module."""
    params = dict(model.named_parameters())
    held = {s.name for g in groups for s in g.slices}
    modules = {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding, Conv1D))
               and any(p is m.weight or p is getattr(m, "bias", None) for n, p in params.items() if n in held)}
    names = {id(p): n for n, p in params.items()}
    covered = {names[id(p)] for m in modules.values() for p in (m.weight, getattr(m, "bias", None)) if p is not None}
    others = [n for n in held if n not in covered]
    stats = {name: {"A": 0.0, "S": 0.0, "M": 0} for name in modules}
    other_terms = {g.name: 0.0 for g in groups}
    generator = torch.Generator().manual_seed(seed)
    examples = 0
    for batch in batches:
        seen = {}

        def keeper(name):
            def hook(module, args, output):
                x = args[0]
                if output.shape[0] == 1 and batch["input_ids"].shape[0] > 1:  # GPT-2's positions
                    output = output.expand(batch["input_ids"].shape[0], *output.shape[1:])
                    x = x.expand(batch["input_ids"].shape[0], *x.shape[1:])
                output.retain_grad()
                seen[name] = (x.detach(), output)
                return output
            return hook

        handles = [m.register_forward_hook(keeper(name)) for name, m in modules.items()]
        logits = model(**lm_inputs(batch)).logits
        for h in handles:
            h.remove()
        labels, n_tokens = draw_labels(logits, batch["labels"], generator)
        losses = per_example_loss(logits, labels)
        n = len(losses)
        losses.sum().backward(retain_graph=True)
        for name, m in modules.items():
            x, output = seen[name]
            d = output.grad * n_tokens.double().sqrt()[:, None, None]
            if isinstance(m, nn.Embedding):
                x = nn.functional.one_hot(x, m.num_embeddings).double()
            if getattr(m, "bias", None) is not None:
                x = torch.cat([x, torch.ones_like(x[..., :1])], -1)
            keep = (d != 0).any(-1)
            stats[name]["A"] += x[keep].T @ x[keep]
            stats[name]["S"] += d[keep].T @ d[keep]
            stats[name]["M"] += int(keep.sum())
        for i in range(n):
            if others:
                grads = torch.autograd.grad(losses[i], [params[o] for o in others], retain_graph=True)
                for g in groups:
                    masks = element_masks(g, params)
                    value = sum((gr * vectors[o] * masks[o]).sum() for gr, o in zip(grads, others) if o in masks)
                    other_terms[g.name] += float(n_tokens[i]) * float(value) ** 2
        examples += n
        model.zero_grad(set_to_none=True)
    out = {}
    for g in groups:
        masks = element_masks(g, params)
        c = other_terms[g.name] / examples
        for name, m in modules.items():
            weight, bias = names[id(m.weight)], names.get(id(getattr(m, "bias", None)))
            if weight not in masks and bias not in masks:
                continue
            u = vectors[weight] * masks[weight] if weight in masks else torch.zeros_like(m.weight)
            u = u if isinstance(m, nn.Linear) else u.T  # (out, in)
            if bias is not None:
                b = vectors[bias] * masks[bias] if bias in masks else torch.zeros_like(m.bias)
                u = torch.cat([u, b[:, None]], 1)
            a, s = stats[name]["A"] / stats[name]["M"], stats[name]["S"] / examples
            c += float(torch.trace(u.T @ s @ u @ a))
        out[g.name] = c
    return out


@pytest.mark.parametrize("arch, granularity", [("olmo", "tensor"), ("olmo", "neuron"), ("gpt2", "tensor"), ("gpt2", "module"),
                                                ("gpt2", "neuron"), ("llama", "module")])
def test_kfac_matches_the_kronecker_form_built_by_hand(make_model, tokenizer, qa_frame, arch, granularity):
    model = make_model(arch, dtype=torch.float64)
    batches = make_batches(tokenizer, qa_frame, [3, 1])
    groups = parameter_groups(model, granularity)
    vectors = mean_gradient(model, batches, param_names(groups))
    forms = kfac_quadratic_forms(model, batches, groups, vectors, seed=3)
    reference = hand_forms(model, batches, groups, vectors, seed=3)
    assert set(forms) == {g.name for g in groups}
    for name, value in reference.items():
        assert forms[name] == pytest.approx(value, rel=1e-9, abs=1e-14 * max(reference.values())), name
    assert min(reference.values()) >= 0 and max(reference.values()) > 0


class LinearLM(nn.Module):
    """logits = W e(token) + b: one linear layer over a fixed embedding, called like a causal LM."""

    def __init__(self, vocab=7, width=5):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.register_buffer("embedding", torch.randn(vocab, width, generator=generator, dtype=torch.float64))
        self.head = nn.Linear(width, vocab).double()
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(vocab, width, generator=generator))
            self.head.bias.copy_(torch.randn(vocab, generator=generator))

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return SimpleNamespace(logits=self.head(self.embedding[input_ids]))


def test_kfac_is_exact_for_one_linear_layer_and_one_token():
    model = LinearLM()
    rows = 400  # one example, each copy drawing its own label
    batch = {"input_ids": torch.tensor([[3, 1]]).repeat(rows, 1), "attention_mask": torch.ones(rows, 2, dtype=torch.long),
             "labels": torch.tensor([[-100, 1]]).repeat(rows, 1)}
    group = Group("head", (ParamSlice("head.weight"), ParamSlice("head.bias")), None, "head", "lm_head", 42)
    names = ["head.weight", "head.bias"]
    generator = torch.Generator().manual_seed(1)
    u = {n: torch.randn(p.shape, generator=generator, dtype=torch.float64) for n, p in model.named_parameters()}
    kfac = kfac_quadratic_forms(model, [batch], [group], u, seed=5)["head"]
    # the same draws: x x^T is the same for every copy, so the Kronecker factors lose nothing
    terms = ggn_terms(model, [batch], names, u, samples=1, seed=5)[0]
    assert kfac == pytest.approx(float(terms.mean()), rel=1e-12)
    exact = float(dot(gauss_newton_product(model, [batch], names, u), u))
    stderr = float(terms.std()) / rows**0.5
    assert stderr < 0.1 * exact
    assert abs(kfac - exact) < 4 * stderr


def test_kfac_is_registered_and_its_cost_is_per_batch():
    method = CURVATURES.get("kfac")
    assert method.unit == "batch"
    assert method.steps(1550, 3, SimpleNamespace(ggn_samples=1)) == 3
