"""Planting knowledge in known tensors (benchmarks/planted.py's two recipes): `soir finetune
--include` (recipe a) and `--confine` with `--confined-data` (recipe b)."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from soir.data import BatchStream, collate, encode, example_losses, pad_id
from soir.models import save_model
from soirlab.cli import main
from unlearn.finetune import ConfinedFinetune

CONFINED = ["model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.down_proj.weight"]


@pytest.fixture
def files(tmp_path, tokenizer, make_model, qa_frame):
    qa_frame.iloc[:2].to_parquet(tmp_path / "forget.parquet")
    qa_frame.iloc[2:].to_parquet(tmp_path / "retain.parquet")
    save_model(make_model("olmo"), tokenizer, tmp_path / "model")
    return tmp_path


def plant(files, out, *args):
    code = main(["finetune", "--model", str(files / "model"), *args, "--confine", r"layers\.1\.mlp\.(up|down)",
                 "--lr", "1e-2", "--weight-decay", "0.1", "--batch-size", "4", "--no-progress", "--out", str(files / out)])
    assert code == 0
    before, after = load_file(files / "model" / "model.safetensors"), load_file(files / out / "model.safetensors")
    return sorted(k for k in before if not torch.equal(before[k], after[k])), len(before)


def test_a_step_on_confined_rows_alone_changes_only_the_confined_tensors(files):
    moved, _ = plant(files, "b", "--confined-data", str(files / "forget.parquet"), "--steps", "1")
    assert moved == sorted(CONFINED)


def test_free_rows_still_train_every_tensor(files):
    moved, total = plant(files, "b", "--data", str(files / "retain.parquet"), "--confined-data", str(files / "forget.parquet"), "--steps", "2")
    assert len(moved) == total  # the recipe-(b) model: every tensor moved, only the confined ones saw the forget rows


def test_confined_gradients_by_hand(make_model, tokenizer, qa_frame):
    """Outside the confined tensors the gradient is the free rows' alone; inside, both rows'; the loss is the batch mean."""
    model = make_model("olmo", dtype=torch.float64)
    data = encode(qa_frame, tokenizer)
    batch = collate(data.input_ids, data.labels, pad_id(tokenizer))
    flags = torch.tensor([True, False, True, False])
    objective = ConfinedFinetune(model, set(CONFINED))
    loss, _ = objective(model, {"train": {**batch, "confined": flags}})
    model.zero_grad()
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}

    losses = example_losses(model, batch)
    assert float(loss.detach()) == pytest.approx(float(losses.detach().mean()), rel=1e-12)
    params = dict(model.named_parameters())
    everything = torch.autograd.grad(losses.sum() / 4, list(params.values()), allow_unused=True, retain_graph=True)
    free_only = torch.autograd.grad(losses[~flags].sum() / 4, list(params.values()), allow_unused=True)
    for (name, _), whole, free in zip(params.items(), everything, free_only):
        expected = whole if name in CONFINED else free
        torch.testing.assert_close(got[name], torch.zeros_like(got[name]) if expected is None else expected, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(everything[list(params).index("model.layers.0.mlp.up_proj.weight")],
                              free_only[list(params).index("model.layers.0.mlp.up_proj.weight")])


def test_batch_stream_rows_are_the_collated_rows(tokenizer, qa_frame):
    data = encode(pd.concat([qa_frame] * 3, ignore_index=True), tokenizer)
    stream = BatchStream(data, 5, pad_id(tokenizer), seed=3)
    for index in (0, 1, 3):
        rows = stream.rows(index)
        assert torch.equal(stream(index)["input_ids"], collate([data.input_ids[i] for i in rows], [data.labels[i] for i in rows], pad_id(tokenizer))["input_ids"])


@pytest.mark.parametrize("args, message", [
    (["--confine", "layers"], "--confine and --confined-data go together"),
    (["--confined-data", "{d}/forget.parquet", "--confine", "no_such"], "matches no trained tensor"),
    (["--confined-data", "{d}/forget.parquet", "--confine", "layers.0", "--include", "layers.1"], "matches no trained tensor"),
    ([], "nothing to train on"),
])
def test_confine_errors(files, capsys, args, message):
    out = files / "out"
    code = main(["finetune", "--model", str(files / "model"), *[a.format(d=files) for a in args], "--steps", "1", "--no-progress", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not out.exists()

