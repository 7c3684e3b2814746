"""Masks, masked optimisation and the swap reference (docs/design.md §7): outside the mask nothing moves."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

from soir.data import collate, encode, pad_id
from soir.errors import UserError
from soir.mask import Mask, load
from tests.conftest import neuron_selection
from unlearn.masking import MaskedParameters
from unlearn.objectives import ObjectiveSettings, get_objective, nll
from unlearn.reference import CopyReference, SwapReference, make_reference

ARCHS = ("olmo", "gpt2")
WHOLE = {
    "olmo": ["model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.q_proj.weight"],
    "gpt2": ["transformer.h.0.mlp.c_proj.weight", "transformer.h.1.attn.c_attn.weight", "transformer.h.1.ln_1.bias"],
}


def make_mask(model, arch, kind):
    if kind == "tensor":
        return Mask.from_names(model, WHOLE[arch])
    tensors, elements = neuron_selection(arch)
    return Mask.from_selection(model, tensors, elements)


@pytest.fixture
def batch(tokenizer, qa_frame):
    data = encode(qa_frame, tokenizer)
    return collate(data.input_ids, data.labels, pad_id(tokenizer))


def train(model, masked, batch, steps=3, lr=1e-2):
    trained = list(masked.trained().values())
    optimizer = torch.optim.AdamW(trained, lr=lr, weight_decay=0.1)
    for _ in range(steps):
        optimizer.zero_grad()
        (-nll(model, batch)).backward()  # gradient ascent
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        masked.sync()
    return optimizer


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("kind", ["tensor", "element"])
@pytest.mark.parametrize("arch", ARCHS)
def test_outside_the_mask_nothing_moves(make_model, batch, arch, kind):
    model = make_model(arch)
    mask = make_mask(model, arch, kind)
    before = snapshot(model)
    masked = MaskedParameters(model, mask)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == mask.names
    optimizer = train(model, masked, batch)
    after = snapshot(model)
    params = dict(model.named_parameters())
    assert all(p.grad is None for n, p in params.items() if n in mask.elements)  # no dense gradient kept
    for name in before:
        if name not in mask.names:
            assert torch.equal(before[name], after[name]), name
            assert params[name].grad is None
        elif name in mask.tensors:
            assert not torch.equal(before[name], after[name]), name
        else:
            keep = mask.element_mask(name).expand(before[name].shape)
            assert torch.equal(before[name][~keep], after[name][~keep]), name
            assert (before[name][keep] != after[name][keep]).all(), name
            state = optimizer.state[masked.trained()[name]]
            for key in ("exp_avg", "exp_avg_sq"):  # optimiser state of the selected entries only
                assert state[key].shape == (int(keep.sum()),) and state[key].abs().sum() > 0, key
    assert mask.n_selected > 0 and (kind == "tensor" or mask.elements)


def dense_masked_training(model, mask, batch, steps, lr=1e-2):
    """The straightforward way: whole tensors in AdamW, gradients zeroed outside the element masks,
    masked-out entries and their state put back after each step."""
    named = dict(model.named_parameters())
    for name, param in named.items():
        param.requires_grad_(name in mask.names)
    params = [named[n] for n in mask.names]
    keeps = {n: mask.element_mask(n).expand(named[n].shape) for n in mask.elements}
    originals = {n: named[n].detach().clone() for n in keeps}
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.1)
    for _ in range(steps):
        optimizer.zero_grad()
        (-nll(model, batch)).backward()
        with torch.no_grad():
            for name, keep in keeps.items():
                named[name].grad.masked_fill_(~keep, 0)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            for name, keep in keeps.items():
                named[name].copy_(torch.where(keep, named[name], originals[name]))
                for value in optimizer.state[named[name]].values():
                    if value.shape == keep.shape:
                        value.masked_fill_(~keep, 0)


@pytest.mark.parametrize("arch", ARCHS)
def test_compact_entries_train_like_dense_masked_tensors(make_model, batch, arch):
    """Training the gathered entries is the same optimisation as masking dense gradients and state."""
    model = make_model(arch)
    expected = copy.deepcopy(model)
    mask = make_mask(model, arch, "element")
    train(model, MaskedParameters(model, mask), batch, steps=3)
    dense_masked_training(expected, mask, batch, steps=3)
    for (name, got), want in zip(model.named_parameters(), expected.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)


def test_the_gathered_gradient_is_the_dense_one_at_the_selected_entries():
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    keep = torch.tensor([[True], [False], [True]])
    x = torch.randn(5, 4)
    dense = torch.autograd.grad(layer(x).square().sum(), layer.weight)[0]
    with MaskedParameters(layer, Mask.from_selection(layer, ["bias"], {"weight": keep})) as masked:
        for _ in range(2):  # two backwards accumulate, as with gradient accumulation
            layer(x).square().sum().backward()
        assert layer.weight.grad is None
        assert torch.equal(masked.trained()["weight"].grad, 2 * dense[keep.expand(3, 4)])
        assert masked.trained()["bias"] is layer.bias and layer.bias.grad is not None
    layer.zero_grad(set_to_none=True)
    layer(x).square().sum().backward()  # leaving the context removed the hook
    assert torch.equal(layer.weight.grad, dense)


def test_half_precision_weights_train_through_a_float32_master():
    """Updates far below bf16's resolution add up in the master and reach the weights."""
    layer = torch.nn.Linear(4, 1, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        layer.weight.fill_(1.0)  # bf16's spacing at 1.0 is 2**-7
    masked = MaskedParameters(layer, Mask.from_names(layer, ["weight"]))
    master = masked.trained()["weight"]
    assert master.dtype == torch.float32 and master is not layer.weight
    optimizer = torch.optim.SGD([master], lr=1e-3)
    naive = torch.nn.Linear(4, 1, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        naive.weight.fill_(1.0)
    naive_optimizer = torch.optim.SGD(naive.parameters(), lr=1e-3)
    x = torch.ones(1, 4, dtype=torch.bfloat16)
    for _ in range(20):
        optimizer.zero_grad()
        layer(x).sum().backward()  # gradient 1 per entry: each step moves 1e-3
        optimizer.step()
        masked.sync()
        naive_optimizer.zero_grad()
        naive(x).sum().backward()
        naive_optimizer.step()
    assert torch.equal(naive.weight, torch.ones_like(naive.weight))  # in bf16 alone every step rounds away
    torch.testing.assert_close(master, torch.full_like(master, 1 - 20e-3))
    assert torch.equal(layer.weight.detach(), master.detach().view(1, 4).to(torch.bfloat16)) and layer.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("kind", ["tensor", "element"])
@pytest.mark.parametrize("arch", ARCHS)
def test_swap_reference_is_the_original_model(make_model, batch, arch, kind):
    model = make_model(arch)
    original = copy.deepcopy(model).eval()
    mask = make_mask(model, arch, kind)
    masked = MaskedParameters(model, mask)
    reference = make_reference(model, mask, masked.snapshot_selected())
    assert isinstance(reference, SwapReference) and reference.n_stored == mask.n_selected  # the selected entries only
    train(model, masked, batch, steps=2)
    model.train()
    with torch.no_grad():
        expected = original(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        current = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert not torch.allclose(current, expected)

    trained = snapshot(model)
    pointers = {n: p.data_ptr() for n, p in model.named_parameters()}
    for param in masked.trained().values():
        param.grad = None
    loss = nll(model, batch)  # a graph built before the reference call must survive it
    got = reference.logits(batch)
    loss.backward()
    assert torch.equal(got, expected)
    assert not got.requires_grad and model.training
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), trained[name]) and param.data_ptr() == pointers[name], name

    grads = {n: p.grad.clone() for n, p in masked.trained().items()}
    for param in masked.trained().values():
        param.grad = None
    nll(model, batch).backward()
    for name, param in masked.trained().items():
        assert torch.equal(param.grad, grads[name]), name


def test_full_mask_uses_a_copy(make_model, batch):
    model = make_model("olmo")
    original = copy.deepcopy(model)
    mask = Mask.full(model)
    assert mask.is_full and mask.n_selected == mask.n_total
    masked = MaskedParameters(model, mask)
    reference = make_reference(model, mask)
    assert isinstance(reference, CopyReference)
    train(model, masked, batch, steps=1)
    with torch.no_grad():
        expected = original(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(reference.logits(batch), expected)


def test_objective_with_masked_training_keeps_the_rest(make_model, batch):
    """npo + a swap reference through a few masked steps: still nothing outside moves."""
    model = make_model("gpt2")
    mask = make_mask(model, "gpt2", "element")
    before = snapshot(model)
    masked = MaskedParameters(model, mask)
    reference = make_reference(model, mask)
    objective = get_objective("npo", ObjectiveSettings(beta=0.5))
    optimizer = torch.optim.AdamW(masked.trained().values(), lr=1e-2, weight_decay=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        loss, _ = objective(model, {"forget": batch, "retain": batch}, reference)
        loss.backward()
        optimizer.step()
        masked.sync()
    after = snapshot(model)
    for name in before:
        keep = mask.element_mask(name)
        assert torch.equal(before[name][~keep], after[name][~keep]), name


# ---------------------------------------------------------------- the Mask artifact


def test_save_load_round_trip(make_model, tmp_path):
    model = make_model("gpt2")
    tensors, elements = neuron_selection("gpt2")
    mask = Mask.from_selection(model, tensors, elements, settings={"top": 0.1, "score": "soir"})
    assert mask.n_selected == 32 * 32 + 32 * 4 + 4
    path = mask.save(tmp_path / "sel")
    assert sorted(p.name for p in (tmp_path / "sel").iterdir()) == ["mask.json", "mask.safetensors"]
    for source in (path, tmp_path / "sel", tmp_path / "sel" / "mask.json"):
        loaded = load(source)
        assert loaded.fingerprint == mask.fingerprint and loaded.settings == mask.settings
        assert loaded.tensors == mask.tensors and loaded.elements.keys() == mask.elements.keys()
        for name in mask.elements:
            assert torch.equal(loaded.elements[name], mask.elements[name]) and loaded.elements[name].dtype == torch.bool
        assert loaded.n_selected == mask.n_selected
        loaded.check_fits(model)
    import json

    summary = json.loads((tmp_path / "sel" / "mask.json").read_text())
    assert summary["n_selected"] == mask.n_selected and summary["tensors"] == tensors
    assert summary["elements"]["transformer.h.0.mlp.c_fc.weight"]["selected"] == 32 * 4


def one_line_user_error(call):
    with pytest.raises(UserError) as error:
        call()
    message = str(error.value)
    assert message and "\n" not in message
    return message


def test_loading_something_else_is_a_user_error(make_model, tmp_path):
    (tmp_path / "text.safetensors").write_text("hello")
    assert "not a SOIR mask" in one_line_user_error(lambda: load(tmp_path / "text.safetensors"))
    save_file({"w": torch.zeros(2)}, str(tmp_path / "weights.safetensors"))
    assert "not a SOIR mask" in one_line_user_error(lambda: load(tmp_path / "weights.safetensors"))
    assert "not found" in one_line_user_error(lambda: load(tmp_path / "missing"))


def test_a_mask_from_another_model_is_a_user_error(make_model, tmp_path):
    from soir.models import TinySize
    from tests.conftest import SMALL

    olmo = make_model("olmo")
    Mask.from_names(olmo, WHOLE["olmo"]).save(tmp_path)
    mask = load(tmp_path)
    assert "GPT2LMHeadModel" in one_line_user_error(lambda: mask.check_fits(make_model("gpt2")))
    wider = make_model("olmo", size=TinySize(hidden=SMALL.hidden, layers=2, heads=4, intermediate=96, max_positions=64))
    assert "shape" in one_line_user_error(lambda: MaskedParameters(wider, mask))


def test_selection_errors_and_normalisation(make_model):
    model = make_model("gpt2")
    assert "no parameter named" in one_line_user_error(lambda: Mask.from_names(model, ["transformer.h.9.mlp.c_fc.weight"]))
    assert "matches no parameter" in one_line_user_error(lambda: Mask.from_names(model, []))
    tied = Mask.from_names(model, ["lm_head.weight"])  # the tied output embedding is the input one
    assert tied.tensors == ["transformer.wte.weight"]
    everything = torch.ones(32, 64, dtype=torch.bool)
    nothing = torch.zeros(64, dtype=torch.bool)
    mask = Mask.from_selection(model, [], {"transformer.h.0.mlp.c_fc.weight": everything, "transformer.h.0.mlp.c_fc.bias": nothing})
    assert mask.tensors == ["transformer.h.0.mlp.c_fc.weight"] and not mask.elements
    with pytest.raises(UserError, match="does not fit"):
        Mask.from_selection(model, [], {"transformer.h.0.mlp.c_fc.weight": (torch.arange(64) < 3)[:, None]})
