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


def train(model, masked, batch, steps=3, restore=True):
    optimizer = torch.optim.AdamW(masked.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(steps):
        optimizer.zero_grad()
        (-nll(model, batch)).backward()  # gradient ascent
        masked.mask_gradients()
        torch.nn.utils.clip_grad_norm_(masked.parameters(), 1.0)
        optimizer.step()
        if restore:
            masked.restore(optimizer)
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
    for name in before:
        if name not in mask.names:
            assert torch.equal(before[name], after[name]), name
            assert dict(model.named_parameters())[name].grad is None
        elif name in mask.tensors:
            assert not torch.equal(before[name], after[name]), name
        else:
            keep = mask.element_mask(name)
            assert torch.equal(before[name][~keep], after[name][~keep]), name
            assert (before[name][keep] != after[name][keep]).all(), name
            state = optimizer.state[dict(model.named_parameters())[name]]
            for key in ("exp_avg", "exp_avg_sq"):
                assert state[key][keep].abs().sum() > 0 and not state[key][~keep].any(), key
    assert mask.n_selected > 0 and (kind == "tensor" or mask.elements)


def test_without_restore_weight_decay_would_leak(make_model, batch):
    """The control for the test above: AdamW's decay alone moves masked-out entries."""
    model = make_model("gpt2")
    mask = make_mask(model, "gpt2", "element")
    before = snapshot(model)
    train(model, MaskedParameters(model, mask), batch, steps=1, restore=False)
    name = next(iter(mask.elements))
    keep = mask.element_mask(name)
    assert not torch.equal(before[name][~keep], dict(model.named_parameters())[name].detach()[~keep])


def test_restore_zeroes_optimiser_state_outside_the_mask():
    """State that reached masked-out entries (e.g. from elsewhere) is cleared, values put back."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    keep = torch.tensor([[True], [False], [True]])
    masked = MaskedParameters(layer, Mask.from_selection(layer, ["bias"], {"weight": keep}))
    original = layer.weight.detach().clone()
    optimizer = torch.optim.AdamW(masked.parameters(), lr=0.1, weight_decay=0.1)
    layer(torch.randn(5, 4)).square().sum().backward()  # no mask_gradients: the state leaks
    optimizer.step()
    state = optimizer.state[layer.weight]
    assert state["exp_avg"][1].abs().sum() > 0 and not torch.equal(layer.weight[1], original[1])
    masked.restore(optimizer)
    assert not state["exp_avg"][1].any() and not state["exp_avg_sq"][1].any() and state["exp_avg"][0].abs().sum() > 0
    assert torch.equal(layer.weight[1], original[1]) and not torch.equal(layer.weight[0], original[0])


@pytest.mark.parametrize("kind", ["tensor", "element"])
@pytest.mark.parametrize("arch", ARCHS)
def test_swap_reference_is_the_original_model(make_model, batch, arch, kind):
    model = make_model(arch)
    original = copy.deepcopy(model).eval()
    mask = make_mask(model, arch, kind)
    masked = MaskedParameters(model, mask)
    reference = make_reference(model, mask, masked.snapshot_selected())
    assert isinstance(reference, SwapReference)
    train(model, masked, batch, steps=2)
    model.train()
    with torch.no_grad():
        expected = original(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        current = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert not torch.allclose(current, expected)

    trained = snapshot(model)
    pointers = {n: p.data_ptr() for n, p in model.named_parameters()}
    model.zero_grad()
    loss = nll(model, batch)  # a graph built before the reference call must survive it
    got = reference.logits(batch)
    loss.backward()
    assert torch.equal(got, expected)
    assert not got.requires_grad and model.training
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), trained[name]) and param.data_ptr() == pointers[name], name

    grads = {n: p.grad.clone() for n, p in masked.named_parameters()}
    model.zero_grad()
    nll(model, batch).backward()
    for name, param in masked.named_parameters():
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
    optimizer = torch.optim.AdamW(masked.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        loss, _ = objective(model, {"forget": batch, "retain": batch}, reference)
        loss.backward()
        masked.mask_gradients()
        optimizer.step()
        masked.restore(optimizer)
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
