"""Parameter shift, layer-robustness curves and ranking comparison: statistics on hand-made cases,
resuming, and the command line's one-line errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from analysis.compare import compare_rankings, pair_agreement
from analysis.curves import CurveSettings, layer_curves, robustness
from analysis.shift import parameter_shift, read_shift, tensor_shift
from soir.errors import UserError
from soir.models import save_model
from soir.weights import TensorSource
from soirlab.cli import main
from unlearn.loop import TrainSettings

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- shift


def test_tensor_shift_statistics_by_hand():
    torch.manual_seed(0)
    base = torch.randn(12, 7, dtype=torch.float64)
    u, v = torch.randn(12, 1, dtype=torch.float64), torch.randn(1, 7, dtype=torch.float64)
    row = tensor_shift(base, base + u @ v)  # a rank-one change
    delta = u @ v
    assert row["l2"] == pytest.approx(float(delta.norm()), rel=1e-12)
    assert row["relative_l2"] == pytest.approx(float(delta.norm() / base.norm()), rel=1e-12)
    assert row["max_abs"] == pytest.approx(float(delta.abs().max()))
    assert row["cosine"] == pytest.approx(float((base * (base + delta)).sum() / (base.norm() * (base + delta).norm())))
    assert row["stable_rank"] == pytest.approx(1.0, rel=1e-9)
    assert row["singular_values"][0] == pytest.approx(float(u.norm() * v.norm()), rel=1e-9)
    assert all(s < 1e-9 for s in row["singular_values"][1:])
    spread = tensor_shift(base, base + torch.eye(12, 7, dtype=torch.float64))  # equal singular values: stable rank 7
    assert spread["stable_rank"] == pytest.approx(7.0) and spread["singular_values"] == pytest.approx([1.0] * 5)
    vector = tensor_shift(torch.ones(5), torch.ones(5) * 2)
    assert vector["relative_l2"] == pytest.approx(1.0) and vector["cosine"] == pytest.approx(1.0) and math.isnan(vector["stable_rank"])


def test_randomized_svd_of_large_matrices_matches_exact():
    from analysis.shift import singular_values

    torch.manual_seed(1)
    low_rank = torch.randn(300, 3) @ torch.randn(3, 200) + 1e-3 * torch.randn(300, 200)
    exact = torch.linalg.svdvals(low_rank)[:3].numpy()
    assert np.allclose(singular_values(low_rank, 3, exact_below=10, seed=0), exact, rtol=1e-3)


def _sharded(tmp_path, model, name):
    """`model` saved with small shards (model-0000k-of-0000n.safetensors + index)."""
    model.save_pretrained(tmp_path / name, safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / name / "model.safetensors.index.json").is_file()
    return tmp_path / name


def test_shift_of_checkpoints_sharded_or_not_equals_the_models_in_memory(tmp_path, make_model, tokenizer):
    base, finetuned = make_model("olmo", seed=0), make_model("olmo", seed=0)
    with torch.no_grad():
        finetuned.model.layers[1].mlp.down_proj.weight.add_(torch.outer(torch.ones(32), torch.arange(64.0)) * 1e-2)
    in_memory = parameter_shift(base, finetuned)
    save_model(base, tokenizer, tmp_path / "base")
    sharded = _sharded(tmp_path, finetuned, "finetuned")
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 2
    streamed = parameter_shift(tmp_path / "base", sharded)
    pd.testing.assert_frame_equal(streamed.drop(columns="singular_values"), in_memory.drop(columns="singular_values"), rtol=1e-9)
    tensors = streamed[streamed["level"] == "tensor"].set_index("name")
    moved = tensors[tensors["l2"] > 0]
    assert list(moved.index) == ["model.layers.1.mlp.down_proj.weight"] and moved["stable_rank"].iloc[0] == pytest.approx(1.0)
    assert (moved["layer"].iloc[0], moved["kind"].iloc[0], moved["role"].iloc[0]) == (1, "mlp", "down")
    cell = streamed[(streamed["level"] == "layer_role") & (streamed["name"] == "1:down")]
    assert cell["l2"].iloc[0] == pytest.approx(moved["l2"].iloc[0])
    layer = streamed[(streamed["level"] == "layer") & (streamed["name"] == "1")]
    assert layer["l2"].iloc[0] == pytest.approx(moved["l2"].iloc[0]) and layer["n_params"].iloc[0] == sum(
        p.numel() for n, p in finetuned.named_parameters() if n.startswith("model.layers.1."))
    assert TensorSource.of(sharded).nbytes() == sum(p.numel() * 4 for p in finetuned.parameters())


def test_gpt2_roles_and_the_shift_command(tmp_path, make_model, tokenizer, capsys):
    base, finetuned = make_model("gpt2", seed=0), make_model("gpt2", seed=3)
    save_model(base, tokenizer, tmp_path / "base")
    save_model(finetuned, tokenizer, tmp_path / "ft")
    assert main(["shift", "--base", str(tmp_path / "base"), "--finetuned", str(tmp_path / "ft"), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    table = read_shift(tmp_path / "out")
    roles = set(table.loc[table["level"] == "tensor", "role"])
    assert {"qkv", "o", "up", "down"} <= roles and (tmp_path / "out" / "shift.png").stat().st_size > 10_000
    assert isinstance(table.loc[table["name"] == "transformer.h.0.mlp.c_fc.weight", "singular_values"].iloc[0], list)


def test_shift_refuses_mismatched_or_missing_checkpoints(tmp_path, make_model, tokenizer, capsys):
    save_model(make_model("olmo"), tokenizer, tmp_path / "olmo")
    save_model(make_model("llama"), tokenizer, tmp_path / "llama")
    wide = make_model("olmo")
    state = {n: p.detach().contiguous() for n, p in wide.named_parameters()}
    state["model.layers.0.mlp.up_proj.weight"] = torch.zeros(65, 32)
    (tmp_path / "wide").mkdir()
    save_file(state, str(tmp_path / "wide" / "model.safetensors"))
    (tmp_path / "wide" / "config.json").write_text((tmp_path / "olmo" / "config.json").read_text())
    out = tmp_path / "out"
    assert main(["shift", "--base", str(tmp_path / "olmo"), "--finetuned", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert main(["shift", "--base", str(tmp_path / "olmo"), "--finetuned", str(tmp_path / "wide"), "--out", str(out)]) == 2
    assert main(["shift", "--base", str(tmp_path / "olmo"), "--finetuned", str(tmp_path / "llama"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("soir: error:") for line in err)
    assert "not found" in err[0] and "model.layers.0.mlp.up_proj.weight is (64, 32)" in err[1] and "(65, 32)" in err[1]
    assert not out.exists()


# ---------------------------------------------------------------- curves


@pytest.fixture
def curve_data(qa_frame):
    return qa_frame, qa_frame.iloc[::-1].reset_index(drop=True)


SETTINGS = CurveSettings(by="layer", objective="ga", train=TrainSettings(steps=4, eval_every=2, lr=1e-2, warmup=0, progress=False, batch_size=2))


def test_curves_one_row_per_group_and_step_and_the_model_comes_back(make_model, tokenizer, curve_data, tmp_path):
    model = make_model("olmo")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    curves = layer_curves(model, tokenizer, *curve_data, SETTINGS, out=tmp_path, progress=False)
    groups = ["model.embed_tokens", "model.layers.0", "model.layers.1", "lm_head"]
    assert list(dict.fromkeys(curves.table["group"])) == groups
    assert len(curves.table) == len(groups) * 3 and sorted(set(curves.table["step"])) == [0, 2, 4]
    assert {"forget_accuracy", "forget_loss", "retain_accuracy", "retain_loss"} <= set(curves.table.columns)
    start = curves.table[curves.table["step"] == 0]
    assert start["forget_loss"].nunique() == 1  # every group starts from the same model
    moved = curves.table[curves.table["step"] == 4].set_index("group")["forget_loss"]
    assert (moved > start["forget_loss"].iloc[0]).all()  # gradient ascent raises the forget loss in every group
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # restored after each group
    assert all(p.requires_grad for p in model.parameters())
    assert list(curves.summary["group"]) == groups and curves.summary["retain_auc"].between(0, 1).all()


def test_curves_resume_without_redoing_finished_groups(make_model, tokenizer, curve_data, tmp_path, monkeypatch):
    import analysis.curves as curves_module

    real, calls, interrupt_at = curves_module.unlearn_model, [], [3]

    def counting(model, tokenizer, forget, retain, mask, **options):
        calls.append(mask.settings["group"])
        if len(calls) == interrupt_at[0]:
            raise KeyboardInterrupt  # the third group never finishes
        return real(model, tokenizer, forget, retain, mask, **options)

    monkeypatch.setattr(curves_module, "unlearn_model", counting)
    with pytest.raises(KeyboardInterrupt):
        layer_curves(make_model("olmo"), tokenizer, *curve_data, SETTINGS, out=tmp_path, progress=False)
    assert len(list((tmp_path / "groups").glob("*.parquet"))) == 2
    calls.clear()
    interrupt_at[0] = None
    resumed = layer_curves(make_model("olmo"), tokenizer, *curve_data, SETTINGS, out=tmp_path, progress=False)
    assert calls == ["model.layers.1", "lm_head"]  # only the groups not yet done
    straight = layer_curves(make_model("olmo"), tokenizer, *curve_data, SETTINGS, progress=False)
    pd.testing.assert_frame_equal(resumed.table, straight.table)
    with pytest.raises(UserError, match="other settings"):
        layer_curves(make_model("olmo"), tokenizer, *curve_data, CurveSettings(by="kind", train=SETTINGS.train), out=tmp_path, progress=False)


def test_robustness_summary_by_hand():
    table = pd.DataFrame({"group": ["g"] * 3, "layer": [0] * 3, "kind": ["other"] * 3, "n_params": [10] * 3, "step": [0, 10, 20],
                          "forget_accuracy": [1.0, 0.6, 0.2], "retain_accuracy": [1.0, 0.9, 0.5]})
    row = robustness(table, target=0.6, oracle={"forget_accuracy": 0.5, "retain_accuracy": 0.95}).iloc[0]
    assert row["step_at_target"] == 10 and row["retain_at_target"] == 0.9
    assert row["retain_auc"] == pytest.approx(((1.0 + 0.9) / 2 * 10 + (0.9 + 0.5) / 2 * 10) / 20)
    assert row["closest_step"] == 10 and row["oracle_distance"] == pytest.approx(math.hypot(0.1, 0.05))
    never = robustness(table, target=0.1).iloc[0]
    assert math.isnan(never["retain_at_target"]) and math.isnan(never["closest_step"])


def test_curves_command_writes_its_files_and_refuses_a_by_that_matches_nothing(tmp_path, make_model, tokenizer, curve_data, capsys):
    save_model(make_model("olmo"), tokenizer, tmp_path / "m")
    curve_data[0].to_parquet(tmp_path / "f.parquet")
    curve_data[1].to_parquet(tmp_path / "r.parquet")
    common = ["--model", str(tmp_path / "m"), "--forget", str(tmp_path / "f.parquet"), "--retain", str(tmp_path / "r.parquet"),
              "--steps", "2", "--eval-every", "1", "--lr", "1e-2", "--batch-size", "2", "--no-progress"]
    out = tmp_path / "out"
    assert main(["curves", *common, "--by", "kind", "--include", r"layers\.0", "--oracle", str(tmp_path / "m"), "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} >= {"curves.parquet", "summary.parquet", "curves.png", "pareto.png", "curves.json", "groups"}
    assert list(pd.read_parquet(out / "summary.parquet")["group"]) == ["model.layers.0.attn", "model.layers.0.mlp"]
    assert json.loads((out / "curves.json").read_text())["oracle"]["forget_accuracy"] >= 0
    capsys.readouterr()
    bad = tmp_path / "bad"
    assert main(["curves", *common, "--include", "nothing-like-this", "--out", str(bad)]) == 2
    assert main(["curves", *common, "--eval-every", "0", "--out", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "matched no parameter group" in err[0] and "--eval-every" in err[1]
    assert not bad.exists()


# ---------------------------------------------------------------- compare


def _table(order, sizes=None):
    groups = [f"g{i}" for i in range(len(order))]
    return pd.DataFrame({"group": groups, "kind": "mlp", "n_params": sizes or [10] * len(order), "rank": order, "score": order})


def test_compare_identical_reversed_and_overlaps_by_hand():
    a = _table(list(range(1, 21)))
    assert pair_agreement(a, a)["spearman"] == pytest.approx(1.0) and pair_agreement(a, a)["kendall"] == pytest.approx(1.0)
    reversed_ = _table(list(range(20, 0, -1)))
    row = pair_agreement(a, reversed_)
    assert row["spearman"] == pytest.approx(-1.0) and row["kendall"] == pytest.approx(-1.0)
    assert row["top5_groups"] == 0.0 and row["top25_groups"] == 0.0
    swapped = _table([2, 1] + list(range(3, 21)))  # the top two swap places
    row = pair_agreement(a, swapped)
    assert row["top5_groups"] == 0.0 and row["top10_groups"] == 1.0
    # by parameters: g0 holds half the parameters, so the top 25% of parameters is g1..g5 in a and g0-less too
    big = _table(list(range(1, 21)), sizes=[190] + [10] * 19)
    assert pair_agreement(big, big)["top25_params"] == 1.0
    pairs = compare_rankings({"a": a, "b": reversed_, "c": swapped})
    assert list(zip(pairs["a"], pairs["b"])) == [("a", "b"), ("a", "c"), ("b", "c")]


def test_compare_command_and_rankings_over_other_groups(tmp_path, capsys):
    from soir.ranking import Ranking, RankSettings

    for name, order in (("x", list(range(1, 11))), ("y", list(range(10, 0, -1)))):
        Ranking(_table(order).assign(layer=0, role="up", tied=False), RankSettings()).save(tmp_path / name)
    Ranking(_table(list(range(1, 10))).assign(layer=0, role="up", tied=False), RankSettings()).save(tmp_path / "fewer")
    assert main(["compare", str(tmp_path / "x"), str(tmp_path / "y"), "--out", str(tmp_path / "out")]) == 0
    pairs = pd.read_parquet(tmp_path / "out" / "compare.parquet")
    assert pairs["spearman"].iloc[0] == pytest.approx(-1.0)
    assert {"compare.png", "scatter.png", "ranks.parquet"} <= {p.name for p in (tmp_path / "out").iterdir()}
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "x"), str(tmp_path / "fewer"), "--out", str(tmp_path / "bad")]) == 2
    assert main(["compare", str(tmp_path / "x"), str(tmp_path / "y"), "--pair", "x", "z", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "different groups" in err[0] and "g9" in err[0] and "--pair z" in err[1]
    assert not (tmp_path / "bad").exists()
