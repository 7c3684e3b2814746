"""The quantization probe: per-channel symmetric rounding, which tensors, restoring, and `soir attack quantize`."""

from __future__ import annotations

import json
import re

import pytest
import torch

from analysis.quantize import (
    QuantizeSettings,
    quantize_model_,
    quantize_plan,
    quantize_probe,
    quantize_tensor,
    quantized,
    split_metrics,
)
from soir.errors import UserError
from soir.models import save_model
from soirlab.cli import main


def test_quantize_tensor_equals_a_hand_computation():
    # 8 bits: qmax 127. Row 0: max|w| 127 -> scale 1, 2.5 and -3.5 are ties (to even: 2, -4).
    # Row 1: all zeros stays zero. Row 2: max|w| 254 -> scale 2: w/2 = -127, 0.5, 1.5, -0.45 -> -127, 0, 2, -0.
    w = torch.tensor([[127.0, 2.5, -3.5, 0.4], [0.0, 0.0, 0.0, 0.0], [-254.0, 1.0, 3.0, -0.9]])
    expected = torch.tensor([[127.0, 2.0, -4.0, 0.0], [0.0, 0.0, 0.0, 0.0], [-254.0, 0.0, 4.0, 0.0]])
    assert torch.equal(quantize_tensor(w, 8), expected)
    assert torch.equal(quantize_tensor(w.T, 8, axis=1), expected.T)  # channels along the columns (GPT-2's Conv1D)
    assert torch.equal(quantize_tensor(w.double(), 8), expected.double()) and quantize_tensor(w.double(), 8).dtype == torch.float64
    # 4 bits: qmax 7. Row 0: scale 1 -> 7, -4 (tie), 1, 0. Row 1: scale 2: -7, 2.5 -> 2, 1.45 -> 1, -0.5 -> -0.
    w4 = torch.tensor([[7.0, -3.5, 1.2, 0.49], [-14.0, 5.0, 2.9, -1.0], [0.0, 0.0, 0.0, 0.0]])
    expected4 = torch.tensor([[7.0, -4.0, 1.0, 0.0], [-14.0, 4.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert torch.equal(quantize_tensor(w4, 4), expected4)
    # a general matrix: every entry is an integer multiple (at most qmax) of its row's scale, within half a step
    g = torch.randn(5, 9, generator=torch.Generator().manual_seed(0))
    scale = g.abs().amax(1, keepdim=True) / 7
    q = quantize_tensor(g, 4) / scale
    assert torch.allclose(q, q.round(), atol=1e-5) and q.abs().max() <= 7 + 1e-5
    assert ((quantize_tensor(g, 4) - g).abs() <= scale / 2 + 1e-6).all()
    assert torch.equal(g, torch.randn(5, 9, generator=torch.Generator().manual_seed(0)))  # the input is not changed


def test_plan_rounds_matrices_and_keeps_vectors(make_model):
    gpt2 = make_model("gpt2")
    plan, kept = quantize_plan(gpt2)
    axes = {name: axis for name, _, axis in plan}
    assert axes["transformer.h.0.attn.c_attn.weight"] == 1 and axes["transformer.h.0.mlp.c_fc.weight"] == 1  # Conv1D: (in, out)
    assert axes["transformer.wte.weight"] == 0 and axes["transformer.wpe.weight"] == 0
    assert "lm_head.weight" not in axes  # tied to wte: rounded once
    assert "transformer.h.0.attn.c_attn.bias" in kept and "transformer.h.0.ln_1.weight" in kept
    assert all(p.dim() >= 2 for _, p, _ in plan)
    plan, kept = quantize_plan(gpt2, keep_embeddings=True)
    assert "transformer.wte.weight" in kept and "transformer.wpe.weight" in kept and all("wte" not in n for n, _, _ in plan)

    llama = make_model("llama")
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    summary = quantize_model_(llama, 4)  # in place, as its name says
    after = llama.state_dict()
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(after[q_proj], quantize_tensor(before[q_proj], 4, axis=0))
    assert not torch.equal(after[q_proj], before[q_proj])
    for name in summary["kept"]:
        assert torch.equal(after[name], before[name]), name  # norms stay bit for bit
    assert any("norm" in name for name in summary["kept"]) and "lm_head.weight" in summary["rounded"]  # llama: untied head
    assert summary["tensors"] == len(summary["rounded"]) and 0 < summary["relative_change"] < 0.2


def test_quantized_restores_the_weights(make_model):
    model = make_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with quantized(model, 4) as summary:
        name = summary["rounded"][0]
        assert not torch.equal(model.state_dict()[name], before[name])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(RuntimeError, match="boom"), quantized(model, 8):
        raise RuntimeError("boom")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_probe_measures_before_and_after(make_model, tokenizer, qa_frame):
    model = make_model("olmo")
    settings = QuantizeSettings(bits=4, generate=False, progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = quantize_probe(model, tokenizer, qa_frame, qa_frame.iloc[:2], settings)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # restore=True: unchanged
    assert result["before"]["forget"] == split_metrics(model, tokenizer, qa_frame, settings, "forget")
    with quantized(model, 4):
        assert result["after"]["retain"] == split_metrics(model, tokenizer, qa_frame.iloc[:2], settings, "retain")
    change = result["change"]["forget"]
    assert change["loss"] == pytest.approx(result["after"]["forget"]["loss"] - result["before"]["forget"]["loss"])
    assert change["loss"] != 0.0 and result["before"]["forget"]["knowledge"] is None  # nothing generated
    json.dumps(result, allow_nan=False)
    with pytest.raises(UserError, match="unknown --bits 3: use one of 8, 4"):
        QuantizeSettings(bits=3)


@pytest.fixture
def files(tmp_path, make_model, tokenizer, qa_frame):
    save_model(make_model("gpt2"), tokenizer, tmp_path / "model")
    qa_frame.to_parquet(tmp_path / "forget.parquet")
    qa_frame.iloc[2:].to_parquet(tmp_path / "retain.parquet")
    return tmp_path


def _args(files, out, *extra):
    return ["attack", "quantize", "--model", str(files / "model"), "--forget", str(files / "forget.parquet"),
            "--retain", str(files / "retain.parquet"), "--max-new-tokens", "4", "--no-progress", "--out", str(out), *extra]


def test_attack_quantize_command(files, tokenizer, qa_frame, capsys):
    out = files / "probe"
    assert main(_args(files, out, "--bits", "4")) == 0
    result = json.loads((out / "quantize.json").read_text())
    assert set(result) >= {"settings", "quantized", "before", "after", "change", "inputs"}
    assert result["settings"]["bits"] == 4 and result["quantized"]["bits"] == 4
    assert set(result["before"]["forget"]) == {"accuracy", "probability", "loss", "knowledge", "regurgitation", "rouge_l_recall"}
    assert result["before"]["forget"]["knowledge"] is not None  # generated
    from soir.models import load_model

    model = load_model(files / "model", tokenizer)
    settings = QuantizeSettings(**{**result["settings"], "progress": False})
    assert result["before"]["retain"] == pytest.approx(split_metrics(model, tokenizer, qa_frame.iloc[2:], settings, "retain"))
    quantize_model_(model, 4)
    assert result["after"]["forget"] == pytest.approx(split_metrics(model, tokenizer, qa_frame, settings, "forget"))
    printed = capsys.readouterr().out
    assert "4-bit" in printed and "forget" in printed and "retain" in printed


def test_attack_quantize_bad_bits(files, capsys):
    out = files / "probe"
    with pytest.raises(SystemExit) as exit_info:
        main(_args(files, out, "--bits", "3"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error: argument --bits: invalid choice: 3" in err[0]
    assert not out.exists()
    assert main(_args(files, out, "--batch-size", "0")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.match(r"soir: error: --batch-size must be at least 1", err[0]) and not out.exists()
