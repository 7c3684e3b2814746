"""Planting knowledge in known tensors or MLP neurons (benchmarks/planted.py's two recipes):
`soir finetune --include` or `--mask` (recipe a) and `--confine` or `--confine-mask` with
`--confined-data` (recipe b)."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from soir.data import BatchStream, collate, encode, example_losses, pad_id
from soir.mask import Mask
from soir.models import save_model
from soirlab.cli import main
from unlearn.finetune import ConfinedFinetune

CONFINED = ["model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.down_proj.weight"]
NEURONS = [1, 5, 7, 40]  # hidden units of layer 1's MLP (64 wide on the tests' SMALL model)


def neuron_elements() -> dict[str, torch.Tensor]:
    """Element masks of the MLP neurons NEURONS of layer 1: rows of up and gate, columns of down."""
    rows, columns = torch.zeros(64, 1, dtype=torch.bool), torch.zeros(1, 64, dtype=torch.bool)
    rows[NEURONS], columns[0, NEURONS] = True, True
    mlp = "model.layers.1.mlp"
    return {f"{mlp}.up_proj.weight": rows, f"{mlp}.gate_proj.weight": rows, f"{mlp}.down_proj.weight": columns}


@pytest.fixture
def files(tmp_path, tokenizer, make_model, qa_frame):
    qa_frame.iloc[:2].to_parquet(tmp_path / "forget.parquet")
    qa_frame.iloc[2:].to_parquet(tmp_path / "retain.parquet")
    save_model(make_model("olmo"), tokenizer, tmp_path / "model")
    return tmp_path


def finetuned(files, out, *args) -> tuple[dict, dict]:
    """The weights before and after `soir finetune` with `args`."""
    code = main(["finetune", "--model", str(files / "model"), *args, "--lr", "1e-2", "--batch-size", "4", "--no-progress", "--out", str(files / out)])
    assert code == 0
    return load_file(files / "model" / "model.safetensors"), load_file(files / out / "model.safetensors")


def plant(files, out, *args):
    before, after = finetuned(files, out, *args, "--confine", r"layers\.1\.mlp\.(up|down)", "--weight-decay", "0.1")
    return sorted(k for k in before if not torch.equal(before[k], after[k])), len(before)


@pytest.fixture
def neurons(files, make_model):
    """The neuron mask of NEURONS saved as `soir select` saves one."""
    Mask.from_selection(make_model("olmo"), elements=neuron_elements()).save(files / "neurons")
    return files / "neurons"


def changed_outside(before: dict, after: dict, elements: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """(parameters with an entry changed outside `elements`, element-masked parameters with no entry changed inside)."""
    outside, unchanged = [], []
    for name, old in before.items():
        keep = elements[name].expand(old.shape) if name in elements else torch.zeros(old.shape, dtype=torch.bool)
        moved = old != after[name]
        if (moved & ~keep).any():
            outside.append(name)
        if name in elements and not moved[keep].any():
            unchanged.append(name)
    return outside, unchanged


def test_recipe_a_with_an_element_mask_trains_only_the_planted_neurons(files, neurons):
    """Outside the planted neurons every parameter is bit-identical to the start (weight decay too stays inside)."""
    before, after = finetuned(files, "a", "--data", str(files / "forget.parquet"), str(files / "retain.parquet"), "--mask", str(neurons),
                              "--weight-decay", "0.1", "--steps", "2")
    assert changed_outside(before, after, neuron_elements()) == ([], [])


def test_recipe_b_with_an_element_mask_a_step_on_confined_rows_changes_only_the_neurons(files, neurons):
    """Decoupled weight decay would shrink every entry of a tensor with a gradient (the recipe uses none), so it is off here."""
    before, after = finetuned(files, "b", "--confined-data", str(files / "forget.parquet"), "--confine-mask", str(neurons), "--steps", "1")
    assert changed_outside(before, after, neuron_elements()) == ([], [])


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
    objective = ConfinedFinetune(model, Mask.from_names(model, CONFINED))
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


def test_confined_element_gradients_by_hand(make_model, tokenizer, qa_frame):
    """A whole confined tensor gets both rows' gradient, an element-masked one the free rows' plus the
    confined rows' inside its mask (m ⊙ grad), every other tensor the free rows' alone."""
    model = make_model("olmo", dtype=torch.float64)
    elements = neuron_elements()
    whole = "model.layers.0.self_attn.v_proj.weight"
    data = encode(qa_frame, tokenizer)
    batch = collate(data.input_ids, data.labels, pad_id(tokenizer))
    flags = torch.tensor([False, True, True, False])
    objective = ConfinedFinetune(model, Mask.from_selection(model, [whole], elements))
    loss, _ = objective(model, {"train": {**batch, "confined": flags}})
    model.zero_grad()
    loss.backward()

    params = dict(model.named_parameters())
    losses = example_losses(model, batch)
    free = torch.autograd.grad(losses[~flags].sum() / 4, list(params.values()), retain_graph=True, materialize_grads=True)
    confined = torch.autograd.grad(losses[flags].sum() / 4, list(params.values()), materialize_grads=True)
    for (name, p), f, c in zip(params.items(), free, confined):
        keep = elements[name].double() if name in elements else float(name == whole)
        got = torch.zeros_like(p) if p.grad is None else p.grad
        torch.testing.assert_close(got, f + keep * c, rtol=1e-10, atol=1e-12)
    up = list(params).index("model.layers.1.mlp.up_proj.weight")
    assert confined[up][NEURONS].abs().sum() > 0 and confined[up][[0, 2]].abs().sum() > 0  # the mask cut a gradient that was there


def test_batch_stream_rows_are_the_collated_rows(tokenizer, qa_frame):
    data = encode(pd.concat([qa_frame] * 3, ignore_index=True), tokenizer)
    stream = BatchStream(data, 5, pad_id(tokenizer), seed=3)
    for index in (0, 1, 3):
        rows = stream.rows(index)
        assert torch.equal(stream(index)["input_ids"], collate([data.input_ids[i] for i in rows], [data.labels[i] for i in rows], pad_id(tokenizer))["input_ids"])


@pytest.mark.parametrize("args, message", [
    (["--confine", "layers"], "--confine (or --confine-mask) and --confined-data go together"),
    (["--confine-mask", "{d}/neurons"], "--confine (or --confine-mask) and --confined-data go together"),
    (["--confined-data", "{d}/forget.parquet", "--confine-mask", "{d}/neurons", "--confine", "layers"], "cannot be combined"),
    (["--data", "{d}/retain.parquet", "--mask", "{d}/neurons", "--include", "layers"], "cannot be combined"),
    (["--data", "{d}/retain.parquet", "--mask", "{d}/gpt2-mask"], "was made for a GPT2LMHeadModel model"),
    (["--confined-data", "{d}/forget.parquet", "--confine-mask", "{d}/gpt2-mask"], "was made for a GPT2LMHeadModel model"),
    (["--data", "{d}/retain.parquet", "--mask", "{d}/no-such-mask"], "mask file not found"),
    (["--confined-data", "{d}/forget.parquet", "--confine-mask", "{d}/neurons", "--include", "layers.0"], "do not train"),
    (["--confined-data", "{d}/forget.parquet", "--confine", "no_such"], "matches no trained tensor"),
    (["--confined-data", "{d}/forget.parquet", "--confine", "layers.0", "--include", "layers.1"], "matches no trained tensor"),
    ([], "nothing to train on"),
])
def test_confine_errors(files, neurons, make_model, capsys, args, message):
    Mask.full(make_model("gpt2")).save(files / "gpt2-mask")
    out = files / "out"
    code = main(["finetune", "--model", str(files / "model"), *[a.format(d=files) for a in args], "--steps", "1", "--no-progress", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not out.exists()


def planted_module():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import planted

    return planted


def test_neuron_placement_draws_rows_and_columns_of_one_block(make_model):
    planted = planted_module()
    model = make_model("olmo")
    placement = planted.resolve_placement(model, "n", "neurons:5@1", [3, 0])
    assert placement.granularity == "neuron" and len(placement.groups) == 5
    assert all(g.startswith("model.layers.1.mlp.neuron.") for g in placement.groups)
    assert placement.n_params == 5 * (32 + 32 + 32)  # a row of up and of gate, a column of down, hidden 32
    chosen = sorted(int(g.rsplit(".", 1)[1]) for g in placement.groups)
    up = placement.mask.element_mask("model.layers.1.mlp.up_proj.weight")
    down = placement.mask.element_mask("model.layers.1.mlp.down_proj.weight")
    assert up.all(1).nonzero().squeeze(1).tolist() == chosen and down.all(0).nonzero().squeeze(1).tolist() == chosen
    again = planted.resolve_placement(model, "n", "neurons:5@1", [3, 0])
    assert again.groups == placement.groups != planted.resolve_placement(model, "n", "neurons:5@1", [4, 0]).groups
    tensors = planted.resolve_placement(model, "t", r"layers\.0\.mlp\.down_proj\.weight$", [0, 0])
    assert tensors.granularity == "tensor" and tensors.groups == {"model.layers.0.mlp.down_proj.weight"}


@pytest.mark.parametrize("spec, message", [("neurons:65@0", "has 64 MLP neurons"), ("no_such", "matches no parameter"), ("(", "not a regular")])
def test_placement_errors(make_model, spec, message):
    from soir.errors import UserError

    with pytest.raises(UserError, match=message):
        planted_module().resolve_placement(make_model("olmo"), "p", spec, [0, 0])


def subject_frame(values: dict[tuple[str, int], list[float]], localizer: str = "x") -> pd.DataFrame:
    """Per-subject values of runs: (testbed, placement index) -> one value per subject."""
    return pd.DataFrame([{"testbed": t, "recipe": "a", "placement": str(p), "seed": 0, "unlearn_seed": 0, "localizer": localizer,
                          "subject": f"s{j}", "accuracy": v} for (t, p), vs in values.items() for j, v in enumerate(vs)])


def test_crossed_bootstrap_resamples_runs_and_subjects():
    planted = planted_module()
    runs = {("t0", 0): [0.1, 0.3, 0.5], ("t0", 1): [0.2, 0.2, 0.8], ("t1", 0): [0.0, 1.0]}
    mean, lo, hi = planted.crossed_bootstrap(subject_frame(runs), "accuracy")
    assert mean == pytest.approx((0.3 + 0.4 + 0.5) / 3)  # the mean over runs of each run's mean over its subjects
    assert lo < mean < hi
    same_subjects = {("t0", p): [0.2, 0.6, 1.0] for p in range(4)}  # runs alike: only the subject draw can move the mean
    assert planted.crossed_bootstrap(subject_frame(same_subjects), "accuracy")[2] > 0.6 + 0.05
    same_runs = {("t0", p): [v] * 3 for p, v in enumerate([0.2, 0.4, 0.6, 0.8])}  # subjects alike: only the run draw can
    assert planted.crossed_bootstrap(subject_frame(same_runs), "accuracy")[1] < 0.5 - 0.05
    assert planted.crossed_bootstrap(subject_frame({("t0", p): [0.7] * 3 for p in range(3)}), "accuracy") == pytest.approx((0.7, 0.7, 0.7))


def test_retain_differences_pair_by_run_and_subject():
    planted = planted_module()
    oracle = subject_frame({("t0", 0): [0.9, 0.8], ("t0", 1): [0.5, 0.4]}, planted.ORACLE)
    mine = subject_frame({("t0", 1): [0.45, 0.5], ("t0", 0): [0.7, 0.8]})
    got = planted.retain_differences(pd.concat([oracle, mine.iloc[::-1]], ignore_index=True))
    got = got.set_index(["placement", "subject"])["difference"].sort_index()
    assert got.to_dict() == pytest.approx({("0", "s0"): -0.2, ("0", "s1"): 0.0, ("1", "s0"): -0.05, ("1", "s1"): 0.1})


def test_joined_runs_count_a_repeated_planting_once_as_the_first_run_has_it():
    planted = planted_module()
    first = pd.concat([subject_frame({("t0", 0): [0.9, 0.8]}, planted.ORACLE), subject_frame({("t0", 0): [0.7, 0.6]}, "soir")])
    later = pd.concat([subject_frame({("t0", 0): [0.1, 0.2], ("t1", 0): [0.3]}, planted.ORACLE),
                       subject_frame({("t0", 0): [0.5, 0.4]}, "revert")])  # re-planted t0 to add revert, and a new testbed
    got = planted.joined([first, later], "subjects").set_index(["testbed", "localizer", "subject"])["accuracy"]
    assert got.to_dict() == {("t0", planted.ORACLE, "s0"): 0.9, ("t0", planted.ORACLE, "s1"): 0.8, ("t0", "soir", "s0"): 0.7,
                             ("t0", "soir", "s1"): 0.6, ("t1", planted.ORACLE, "s0"): 0.3, ("t0", "revert", "s0"): 0.5,
                             ("t0", "revert", "s1"): 0.4}


def test_update_in_planted_is_the_planted_share_of_the_squared_update(make_model):
    planted = planted_module()
    before = make_model("olmo").double()
    placement = planted.resolve_placement(before, "n", "neurons:3@1", [0, 0])
    after = make_model("olmo").double()
    after.load_state_dict(before.state_dict())
    up, embed = "model.layers.1.mlp.up_proj.weight", "model.embed_tokens.weight"
    rows = placement.mask.element_mask(up).all(1).nonzero().squeeze(1)
    with torch.no_grad():
        named = dict(after.named_parameters())
        named[up][rows[0], :2] += torch.tensor([3.0, 4.0])  # inside: 9 + 16
        named[up][next(i for i in range(64) if i not in rows.tolist()), 0] += 1.0  # a row outside the 3 planted neurons: 1
        named[embed][0, 0] -= 5.0  # outside: 25
    assert planted.update_in(before, after, placement.mask) == pytest.approx(25 / 51, rel=1e-12)
    assert math.isnan(planted.update_in(before, before, placement.mask))
