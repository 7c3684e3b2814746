"""`soir unlearn --lora-rank R` (docs/design.md §7): LoRA adapters on exactly the linear layers a
tensor mask selects, the reference is the model with its adapters off, and the adapters are merged
back, so the saved model is a plain one where nothing outside those layers moved."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from soir.mask import Mask
from soir.models import ModelSettings, load_model, save_model
from soirlab.cli import main
from tests.conftest import neuron_selection
from unlearn.loop import TrainSettings
from unlearn.objectives import ObjectiveSettings
from unlearn.unlearning import LoraAdapters, UnlearnSettings, lora_targets, unlearn

LINEAR = {"olmo": ["model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.q_proj.weight"],
          "gpt2": ["transformer.h.0.mlp.c_proj.weight", "transformer.h.1.attn.c_attn.weight"]}
TRAIN = TrainSettings(steps=3, lr=1e-2, batch_size=2, warmup=0, progress=False, seed=1)


@pytest.fixture
def setup(tmp_path, tokenizer, qa_frame, make_model, one_thread):
    """A tiny OLMo saved with the tokenizer, its mask of two linear weights, qa_frame as forget and retain."""
    qa_frame.to_parquet(tmp_path / "forget.parquet")
    qa_frame.iloc[::-1].to_parquet(tmp_path / "retain.parquet")
    model = make_model("olmo")
    save_model(model, tokenizer, tmp_path / "olmo")
    Mask.from_names(model, LINEAR["olmo"]).save(tmp_path / "mask")
    return tmp_path


def settings(d, out, **kw):
    return UnlearnSettings(model=ModelSettings(str(d / "olmo"), dtype="float32"), forget=(str(d / "forget.parquet"),),
                           retain=(str(d / "retain.parquet"),), out=str(out), mask=str(d / "mask"),
                           **{"train": TRAIN, "objective": "npo", **kw})


def log_of(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_only_the_adapted_layers_move_and_the_model_saves_plain(setup):
    out = setup / "lora"
    result = unlearn(settings(setup, out, lora_rank=2))
    assert result.steps_done == 3 and result.reference == "AdapterReference"
    before, after = load_file(setup / "olmo" / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    for name in before:
        if name in LINEAR["olmo"]:
            assert not torch.equal(before[name], after[name]), f"{name} was adapted but did not change"
        else:
            assert torch.equal(before[name], after[name]), f"{name} moved outside the adapted layers"
    reloaded = load_model(out)
    assert [n for n, _ in reloaded.named_parameters()] == [n for n, _ in load_model(setup / "olmo").named_parameters()]
    assert not hasattr(reloaded, "peft_config")
    lora = json.loads((out / "lora.json").read_text())
    assert lora["rank"] == 2 and lora["alpha"] == 4.0 and lora["modules"] == [n.removesuffix(".weight") for n in LINEAR["olmo"]]
    # each adapter: A (2 × in) and B (out × 2)
    shapes = [before[n].shape for n in LINEAR["olmo"]]
    assert lora["n_adapter_params"] == sum(2 * (rows + cols) for rows, cols in shapes)

    # step 1: B = 0, so the adapted model is the reference and log π_θ − log π_ref = 0 on every row:
    # NPO's forget term is (2/β)·log 2, as on the masked path without LoRA
    plain = setup / "plain"
    unlearn(settings(setup, plain, train=replace(TRAIN, steps=1)))
    first, masked = log_of(out)[0], log_of(plain)[0]
    beta = ObjectiveSettings().beta
    assert first["npo"] == pytest.approx(2 / beta * math.log(2), rel=1e-6)
    assert first["npo"] == pytest.approx(masked["npo"], rel=1e-6)
    assert first["loss"] == pytest.approx(masked["loss"], rel=1e-6)


@pytest.mark.parametrize("arch", ["olmo", "gpt2"])
def test_merge_adds_alpha_over_rank_b_a_and_the_reference_is_the_original_model(make_model, tokenizer, arch, one_thread):
    model, original = make_model(arch), make_model(arch)
    mask = Mask.from_names(model, LINEAR[arch])
    targets = lora_targets(model, mask)
    batch = tokenizer(["Alice Moon was born on 3 March 1990"], return_tensors="pt")
    batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        expected = original(**batch, use_cache=False).logits
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    adapters = LoraAdapters(model, targets, rank=3)  # α = 2·3
    trained = adapters.trained()
    assert set(trained) == {f"{m}.lora_{ab}.default.weight" for m in targets for ab in "AB"}
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in trained.items():
            if ".lora_B." in name:
                param.normal_()
    adapted = model(**batch, use_cache=False).logits
    assert not torch.allclose(adapted, expected, atol=1e-3)
    model.train()
    reference = adapters.reference()
    assert torch.equal(reference.logits(batch), expected)
    assert model.training and all(p.requires_grad for p in trained.values())
    assert torch.equal(model(**batch, use_cache=False).logits, adapted)  # the adapters are back on

    # W ← W + (α/r)·B A (GPT-2's Conv1D stores W as (in, out): its update is (B A)ᵀ)
    deltas = {}
    for module in targets:
        a, b = trained[f"{module}.lora_A.default.weight"].double(), trained[f"{module}.lora_B.default.weight"].double()
        deltas[module] = (6 / 3) * (b @ a) if arch == "olmo" else (6 / 3) * (b @ a).T
    adapters.close()
    for name, param in model.named_parameters():
        param.requires_grad_(flags[name])
    merged, base = dict(model.named_parameters()), dict(original.named_parameters())
    assert merged.keys() == base.keys() and not hasattr(model, "peft_config")
    for name in merged:
        module = name.removesuffix(".weight")
        if module in deltas:
            torch.testing.assert_close(merged[name].double(), base[name].double() + deltas[module], rtol=0, atol=1e-6)
        else:
            assert torch.equal(merged[name], base[name])


class Killed(Exception):
    pass


def test_resume_is_bit_identical_and_needs_the_same_adapters(setup):
    from soir.errors import UserError

    train = replace(TRAIN, steps=4, save_every=2, eval_every=1)

    def dies_at(step):
        def callback(model, s):
            if s == step:
                raise Killed
            return {"probe": float(sum(p.double().sum() for p in model.parameters()))}
        return callback

    unlearn(settings(setup, setup / "straight", lora_rank=2, train=train), dies_at(-1))
    with pytest.raises(Killed):
        unlearn(settings(setup, setup / "killed", lora_rank=2, train=train), dies_at(3))
    with pytest.raises(UserError, match="LoRA settings"):
        unlearn(settings(setup, setup / "killed", lora_rank=2, lora_alpha=1.0, train=train, resume=True), dies_at(-1))
    result = unlearn(settings(setup, setup / "killed", lora_rank=2, train=train, resume=True), dies_at(-1))
    assert result.resumed_from == 2
    a, b = load_file(setup / "killed" / "model.safetensors"), load_file(setup / "straight" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_masks_lora_cannot_adapt_are_refused_in_one_line_before_writing(setup, tokenizer, make_model, capsys):
    model = make_model("gpt2")
    save_model(model, tokenizer, setup / "gpt2")
    tensors, elements = neuron_selection("olmo", broadcast=True)
    Mask.from_selection(load_model(setup / "olmo"), tensors, elements).save(setup / "elements")
    Mask.from_names(model, ["transformer.h.0.mlp.c_proj.bias", *LINEAR["gpt2"]]).save(setup / "bias")
    common = ["--forget", str(setup / "forget.parquet"), "--retain", str(setup / "retain.parquet"), "--steps", "1", "--no-progress"]
    olmo = ["--model", str(setup / "olmo")]
    cases = {
        "entries of model.layers.0.mlp.up_proj.weight:": [*olmo, "--mask", str(setup / "elements"), "--lora-rank", "2"],
        "the bias of a Conv1D": ["--model", str(setup / "gpt2"), "--mask", str(setup / "bias"), "--lora-rank", "2"],
        "the weight of a LayerNorm": ["--model", str(setup / "gpt2"), "--include", r"h\.0\.", "--lora-rank", "2"],
        "the weight of an Embedding": [*olmo, "--lora-rank", "2"],  # no mask: every parameter
        "must be 0 (off) or positive": [*olmo, "--mask", str(setup / "mask"), "--lora-rank", "-1"],
        "--lora-alpha must be positive": [*olmo, "--mask", str(setup / "mask"), "--lora-rank", "2", "--lora-alpha", "0"],
        "does not run under --fsdp": [*olmo, "--mask", str(setup / "mask"), "--lora-rank", "2", "--fsdp"],
    }
    for i, (message, flags) in enumerate(cases.items()):
        out = setup / f"refused-{i}"
        assert main(["unlearn", *flags, *common, "--out", str(out)]) == 2, message
        err = capsys.readouterr().err
        assert "Traceback" not in err and message in err.strip().splitlines()[-1], err
        assert err.strip().splitlines()[-1].startswith("soir: error:")
        assert not out.exists()
