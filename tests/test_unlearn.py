"""The unlearn stage (docs/design.md §7, §11): outside the mask nothing moves, resume is exact,
bad input ends with one line and exit 2, and the artifacts are written."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from soir.mask import Mask
from soir.models import ModelSettings, save_model
from soirlab.cli import main
from tests.conftest import neuron_selection
from unlearn.loop import TrainSettings
from unlearn.objectives import ObjectiveSettings
from unlearn.unlearning import UnlearnSettings, unlearn

MASKS = {
    # tensor masks: whole tensors only
    ("olmo", "tensor"): (["model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.q_proj.weight"], {}),
    ("gpt2", "tensor"): (["transformer.h.0.mlp.c_proj.weight", "transformer.h.1.attn.c_attn.weight", "transformer.h.1.ln_1.bias"], {}),
}


@pytest.fixture
def setup(tmp_path, tokenizer, qa_frame, make_model):
    """Tiny olmo and gpt2 models saved with the tokenizer, qa_frame as forget and retain."""
    qa_frame.to_parquet(tmp_path / "forget.parquet")
    qa_frame.iloc[::-1].to_parquet(tmp_path / "retain.parquet")
    for arch in ("olmo", "gpt2"):
        save_model(make_model(arch), tokenizer, tmp_path / arch)
    return tmp_path


def settings(d, arch, out, **kw):
    train = kw.pop("train", TrainSettings(steps=4, lr=1e-2, weight_decay=0.1, warmup=0, progress=False, seed=1))
    return UnlearnSettings(model=ModelSettings(str(d / arch), dtype="float32"), forget=(str(d / "forget.parquet"),),
                           retain=(str(d / "retain.parquet"),), out=str(out), train=replace(train, batch_size=2), **kw)


@pytest.mark.parametrize("kind", ["tensor", "element"])
@pytest.mark.parametrize("arch", ["olmo", "gpt2"])
def test_outside_the_mask_is_bit_identical(setup, make_model, arch, kind):
    from soir.models import load_model

    model = load_model(setup / arch)
    tensors, elements = MASKS[arch, kind] if kind == "tensor" else neuron_selection(arch, broadcast=True)
    mask = Mask.from_selection(model, tensors, elements)
    mask.save(setup / "mask")
    out = setup / "out"
    # combo: forget, retain and KL terms (the swap reference); AdamW momentum and weight decay > 0
    result = unlearn(settings(setup, arch, out, objective="combo", mask=str(setup / "mask"), train=TrainSettings(
        steps=4, lr=1e-2, weight_decay=0.1, warmup=0, progress=False, eval_every=2)))
    assert result.steps_done == 4
    before, after = load_file(setup / arch / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    for name in before:
        keep = mask.element_mask(name) if name in mask.names else torch.zeros(before[name].shape, dtype=torch.bool)
        assert torch.equal(before[name][~keep], after[name][~keep]), f"{name} moved outside the mask"
        if name in mask.tensors:
            assert not torch.equal(before[name], after[name]), f"{name} was selected but did not change"
        if name in mask.elements:
            assert (before[name][keep] != after[name][keep]).any(), f"{name}'s selected entries did not change"
    # artifacts: every loss component each step, evaluation rows, the mask, the settings
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all({"forget_nll", "retain_nll", "kl"} <= r.keys() for r in log)
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evals] == [0, 2, 4] and "retain_accuracy" in evals[0]
    assert "eval/forget_accuracy" in log[1]
    record = json.loads((out / "unlearn.json").read_text())
    assert record["reference"] == "SwapReference" and record["mask"]["n_selected"] == mask.n_selected
    assert json.loads((out / "mask.json").read_text())["tensors"] == mask.tensors


class Killed(Exception):
    pass


def test_resume_after_interruption_is_bit_identical(setup):
    """An element mask and KL (the swap reference must hold the ORIGINAL values after resuming)."""
    from soir.models import load_model

    tensors, elements = neuron_selection("olmo", broadcast=True)
    Mask.from_selection(load_model(setup / "olmo"), tensors, elements).save(setup / "mask")
    train = TrainSettings(steps=10, lr=1e-2, weight_decay=0.1, warmup=2, progress=False, seed=3, eval_every=1, save_every=3)
    base = dict(objective="kl", mask=str(setup / "mask"), weights=ObjectiveSettings(w_kl=2.0), train=train)

    def dies_at(step):
        def callback(model, s):
            if s == step:
                raise Killed
            return {"probe": float(next(model.parameters()).sum())}
        return callback

    fine = dies_at(-1)
    unlearn(settings(setup, "olmo", setup / "straight", **base), fine)
    with pytest.raises(Killed):
        unlearn(settings(setup, "olmo", setup / "killed", **base), dies_at(8))
    assert not (setup / "killed" / "model.safetensors").exists()
    assert sorted(p.name for p in (setup / "killed" / "checkpoints").iterdir()) == ["step-00000003", "step-00000006"]
    unlearn(settings(setup, "olmo", setup / "killed", resume=True, **base), fine)
    a, b = load_file(setup / "killed" / "model.safetensors"), load_file(setup / "straight" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    logs = [(setup / d / "log.jsonl").read_text() for d in ("killed", "straight")]
    strip = lambda text: [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in text.splitlines()]
    assert strip(logs[0]) == strip(logs[1])
    assert (setup / "killed" / "eval.jsonl").read_text() == (setup / "straight" / "eval.jsonl").read_text()


def test_resume_over_a_truncated_checkpoint_falls_back_or_fails_in_one_line(setup, capsys, recwarn):
    """A checkpoint cut short (a killed write, a copy cut in half) is passed over with a warning; the
    run continues from the one before and ends bit-identical to an uninterrupted run."""
    common = ["--model", str(setup / "olmo"), "--forget", str(setup / "forget.parquet"), "--retain", str(setup / "retain.parquet"),
              "--include", r"layers\.0\.mlp", "--lr", "1e-2", "--batch-size", "2", "--save-every", "2", "--no-progress"]
    assert main(["unlearn", *common, "--steps", "6", "--out", str(setup / "straight")]) == 0
    assert main(["unlearn", *common, "--steps", "6", "--out", str(setup / "cut")]) == 0
    checkpoints = sorted((setup / "cut" / "checkpoints").iterdir())
    assert [p.name for p in checkpoints] == ["step-00000002", "step-00000004"]
    weights = checkpoints[-1] / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (setup / "cut" / "model.safetensors").unlink()
    assert main(["unlearn", *common, "--steps", "6", "--resume", "--out", str(setup / "cut")]) == 0
    assert any("step-00000004" in str(w.message) and "damaged" in str(w.message) and "step-00000002" in str(w.message) for w in recwarn)
    log = [json.loads(line)["step"] for line in (setup / "cut" / "log.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3, 4, 5, 6]
    a, b = load_file(setup / "cut" / "model.safetensors"), load_file(setup / "straight" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # nothing good left: one line, exit 2
    for path in (setup / "cut" / "checkpoints").iterdir():
        (path / "optimizer.safetensors").write_bytes(b"cut")
    capsys.readouterr()
    assert main(["unlearn", *common, "--steps", "6", "--resume", "--out", str(setup / "cut")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "every checkpoint" in err[0] and "damaged" in err[0], err


def test_regex_and_full_masks(setup):
    from soir.models import load_model

    out = setup / "regex"
    unlearn(settings(setup, "gpt2", out, objective="npo", include=(r"h\.1\.mlp",), exclude=(r"bias",)))
    assert json.loads((out / "mask.json").read_text())["tensors"] == ["transformer.h.1.mlp.c_fc.weight", "transformer.h.1.mlp.c_proj.weight"]
    out = setup / "full"
    unlearn(settings(setup, "olmo", out, objective="kl", train=TrainSettings(steps=1, lr=1e-3, progress=False)))
    record = json.loads((out / "unlearn.json").read_text())
    assert record["reference"] == "CopyReference" and record["mask"]["fraction"] == 1.0
    assert load_model(out) is not None


@pytest.fixture
def cli_files(setup, tokenizer, make_model):
    from soir.models import load_model

    Mask.from_names(make_model("gpt2"), ["transformer.h.0.mlp.c_fc.weight"]).save(setup / "gpt2_mask")
    Mask.from_names(load_model(setup / "olmo"), ["model.layers.0.mlp.up_proj.weight"]).save(setup / "olmo_mask")
    save_file({"x": torch.zeros(3)}, setup / "not_a_mask.safetensors")
    (setup / "text_mask.safetensors").write_text("hello")
    return setup


BAD = {
    "mask of another architecture": (["--mask", "{d}/gpt2_mask"], r"made for a GPT2LMHeadModel model but this model is a OlmoForCausalLM"),
    "safetensors that is not a mask": (["--mask", "{d}/not_a_mask.safetensors"], r"not_a_mask.safetensors is not a SOIR mask"),
    "text file as a mask": (["--mask", "{d}/text_mask.safetensors"], r"is not a SOIR mask"),
    "missing mask": (["--mask", "{d}/nowhere"], r"mask file not found"),
    "weights sum to zero": (["--mask", "{d}/olmo_mask", "--w-forget", "0", "--w-retain", "0"], r"weights sum to zero"),
    "zero lr": (["--lr", "0"], r"learning rate must be positive"),
    "negative lr": (["--lr=-1e-3"], r"learning rate must be positive"),
    "two mask sources": (["--mask", "{d}/olmo_mask", "--include", "mlp"], r"--mask cannot be combined"),
    "top without ranking": (["--top", "0.1"], r"--top selects from a ranking"),
    "regex matching nothing": (["--include", "no_such_module"], r"match no parameter"),
    "bad regex": (["--include", "(mlp"], r"bad --include regex"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_and_writes_nothing(case, cli_files, capsys):
    args, message = BAD[case]
    d = cli_files
    out = d / "out"
    code = main(["unlearn", "--model", str(d / "olmo"), "--forget", str(d / "forget.parquet"), "--retain", str(d / "retain.parquet"),
                 "--objective", "graddiff", "--steps", "2", "--lr", "1e-3", "--out", str(out), "--no-progress",
                 *[a.format(d=d) for a in args]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("soir: error:"), err
    assert re.search(message, err[0]), err[0]
    assert not out.exists()


def test_cli_runs_and_resume_refuses_another_mask(cli_files, capsys):
    d = cli_files
    common = ["unlearn", "--model", str(d / "olmo"), "--forget", str(d / "forget.parquet"), "--retain", str(d / "retain.parquet"),
              "--steps", "2", "--lr", "1e-3", "--batch-size", "2", "--out", str(d / "run"), "--no-progress", "--save-every", "1"]
    assert main([*common, "--mask", str(d / "olmo_mask"), "--eval-every", "1"]) == 0
    assert "unlearned model written" in capsys.readouterr().out
    assert [json.loads(x)["step"] for x in (d / "run" / "eval.jsonl").read_text().splitlines()] == [0, 1, 2]
    assert main([*common, "--include", "layers.1.mlp", "--resume"]) == 2
    assert "needs the mask that run used" in capsys.readouterr().err


def test_mask_from_a_ranking(cli_files, capsys):
    """`--ranking DIR --top N`: the selection of soir.select, written as the run's mask."""
    import pandas as pd

    from soir.groups import parameter_groups
    from soir.models import load_model
    from soir.ranking import Ranking, RankSettings

    d = cli_files
    groups = parameter_groups(load_model(d / "olmo"), "tensor")[::-1]  # best = the last tensors
    table = pd.DataFrame({"group": [g.name for g in groups], "layer": [g.layer if g.layer is not None else -1 for g in groups],
                          "kind": [g.kind for g in groups], "role": [g.role for g in groups],
                          "n_params": [1] * len(groups), "tied": [False] * len(groups),
                          "score": [float(i) for i in range(len(groups))], "rank": list(range(1, len(groups) + 1))})
    Ranking(table, RankSettings(score="random")).save(d / "ranking")
    out = d / "ranked"
    assert main(["unlearn", "--model", str(d / "olmo"), "--forget", str(d / "forget.parquet"), "--retain", str(d / "retain.parquet"),
                 "--ranking", str(d / "ranking"), "--top", "2", "--exclude", "lm_head", "--steps", "1", "--lr", "1e-3",
                 "--out", str(out), "--no-progress"]) == 0, capsys.readouterr().err
    assert json.loads((out / "mask.json").read_text())["tensors"] == [g.name for g in groups[1:3]][::-1]
