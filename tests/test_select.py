"""`soir select`: masks from rankings on every architecture; top by groups and by parameters,
per kind, offset, bottom, include/exclude; neuron element masks; clear errors."""

from __future__ import annotations

import math

import pytest

from soir.data import encode, pad_id
from soir.errors import UserError
from soir.groups import parameter_groups
from soir.mask import load as load_mask
from soir.ranking import RankSettings, rank
from soir.select import SelectSettings, select
from soirlab.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def ranking_of(model, tokenizer, frame, **settings):
    enc = encode(frame, tokenizer)
    return rank(model, enc, enc, pad_id(tokenizer), RankSettings(**settings), progress=False)


def selected_groups(mask) -> list[str]:
    return mask.settings["groups"]


def test_groups_and_selection_on_every_architecture(make_model, tokenizer, qa_frame, arch):
    model = make_model(arch)
    ranking = ranking_of(model, tokenizer, qa_frame, score="grad-magnitude", granularity="module", sketch="sjlt", dim=64)
    groups = {g.name: g for g in parameter_groups(model, "module")}
    assert set(ranking.table["group"]) == set(groups)
    mask = select(ranking, model, SelectSettings(top=0.3))
    best = ranking.ranked()["group"].tolist()[: math.ceil(0.3 * len(groups))]
    assert selected_groups(mask) == best
    names = dict(model.named_parameters())
    expected = {s.name for g in best for s in groups[g].slices}
    assert set(mask.tensors) == {n for n in expected if n in names} and not mask.elements
    assert mask.n_selected == sum(groups[g].n_params for g in best)


@pytest.fixture
def olmo(make_model, tokenizer, qa_frame):
    model = make_model("olmo")
    return model, ranking_of(model, tokenizer, qa_frame, score="random", seed=3)


def test_top_fraction_of_groups_and_of_parameters(olmo):
    model, ranking = olmo
    order = ranking.ranked()
    n = len(order)
    assert selected_groups(select(ranking, model, SelectSettings(top=0.25))) == order["group"].tolist()[: math.ceil(0.25 * n)]
    assert selected_groups(select(ranking, model, SelectSettings(top=1.0))) == order["group"].tolist()
    assert selected_groups(select(ranking, model, SelectSettings(top=3))) == order["group"].tolist()[:3]  # a count
    budget = 0.2 * order["n_params"].sum()
    mask = select(ranking, model, SelectSettings(top=0.2, by="params"))
    chosen, used = [], 0
    for group, size in zip(order["group"], order["n_params"]):  # fill the budget in rank order
        if used + size <= budget:
            chosen.append(group)
            used += size
    assert selected_groups(mask) == chosen and mask.n_selected == used <= budget


def test_offset_bottom_and_regexes(olmo):
    model, ranking = olmo
    order = ranking.ranked()["group"].tolist()
    k = math.ceil(0.2 * len(order))
    assert selected_groups(select(ranking, model, SelectSettings(top=0.2, offset=2))) == order[2 : 2 + k]
    assert selected_groups(select(ranking, model, SelectSettings(top=0.2, bottom=True))) == order[::-1][:k]
    mlp = [g for g in order if ".mlp." in g]
    got = selected_groups(select(ranking, model, SelectSettings(top=0.5, include=(r"\.mlp\.",))))
    assert got == mlp[: math.ceil(0.5 * len(mlp))]
    got = selected_groups(select(ranking, model, SelectSettings(top=1.0, exclude=(r"layers\.0\.", "embed", "lm_head"))))
    assert got == [g for g in order if "layers.1." in g]


def test_per_kind_takes_the_fraction_of_each_kind(olmo):
    model, ranking = olmo
    order = ranking.ranked()
    mask = select(ranking, model, SelectSettings(top=0.5, per_kind=True))
    got = selected_groups(mask)
    for kind, rows in order.groupby("kind", sort=False):
        mine = [g for g in got if g in set(rows["group"])]
        assert mine == rows["group"].tolist()[: math.floor(0.5 * len(rows) + 0.5)], kind
    assert got == [g for g in order["group"] if g in set(got)]  # kept in rank order
    got = selected_groups(select(ranking, model, SelectSettings(top=0.2, per_kind=True)))
    kind = dict(zip(order["group"], order["kind"]))
    assert not {kind[g] for g in got} & {"embed", "head"}  # kinds of one group round to none at 0.2
    mlp = [g for g in order["group"] if kind[g] == "mlp"]
    assert [g for g in got if kind[g] == "mlp"] == mlp[: math.floor(0.2 * len(mlp) + 0.5)]


def test_selections_that_match_nothing_are_user_errors(olmo):
    model, ranking = olmo
    with pytest.raises(UserError, match="matched no parameter group"):
        select(ranking, model, SelectSettings(include=("nope",)))
    smallest = int(ranking.table["n_params"].min())
    with pytest.raises(UserError, match="matches no parameter group"):
        select(ranking, model, SelectSettings(top=smallest / ranking.table["n_params"].sum() / 2, by="params"))
    with pytest.raises(UserError, match="matches no parameter group"):
        select(ranking, model, SelectSettings(top=0.1, offset=1000))
    for bad in (dict(top=0), dict(top=1.5), dict(by="rows"), dict(offset=-1)):
        with pytest.raises(UserError):
            SelectSettings(**bad)


def test_neuron_granularity_gives_an_element_mask(make_model, tokenizer, qa_frame):
    model = make_model("gpt2")  # Conv1D: neurons are columns of c_fc, rows of mlp.c_proj
    ranking = ranking_of(model, tokenizer, qa_frame, score="random", granularity="neuron")
    mask = select(ranking, model, SelectSettings(top=0.05, include=(r"neuron",)))
    groups = {g.name: g for g in parameter_groups(model, "neuron")}
    assert mask.elements and not mask.tensors
    total = sum(groups[g].n_params for g in selected_groups(mask))
    assert mask.n_selected == total
    for g in selected_groups(mask):
        for s in groups[g].slices:
            assert s.view(mask.element_mask(s.name).expand(dict(model.named_parameters())[s.name].shape)).all()


def test_cli_select_writes_a_mask_and_errors_write_nothing(quick_testbed, tmp_path, capsys):
    from soir.data import read_split
    from soir.models import load_model, load_tokenizer

    tok = load_tokenizer(quick_testbed["data"] / "tokenizer")
    model = load_model(quick_testbed["finetuned"], tok)
    enc = encode(read_split(quick_testbed["data"] / "forget.parquet"), tok)
    ranking = rank(model, enc, enc, pad_id(tok), RankSettings(score="random"), progress=False)
    ranking.save(tmp_path / "ranking")
    out = tmp_path / "mask"
    common = ["select", "--ranking", str(tmp_path / "ranking" / "ranking.json"), "--model", str(quick_testbed["finetuned"])]
    assert main([*common, "--top", "0.5", "--by", "params", "--per-kind", "--out", str(out)]) == 0
    mask = load_mask(out)
    assert (out / "mask.json").is_file() and 0 < mask.n_selected < mask.n_total
    assert mask.settings["per_kind"] and mask.settings["ranking"]["score"] == "random"
    capsys.readouterr()
    assert main([*common, "--top", "0.5", "--include", "nothing-like-this", "--out", str(tmp_path / "bad")]) == 2
    assert main([*common, "--top", "2.5", "--out", str(tmp_path / "bad")]) == 2
    assert main(["select", "--ranking", str(tmp_path / "none"), "--model", str(quick_testbed["finetuned"]), "--top", "0.1", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("soir: error:") for line in err)
    assert not (tmp_path / "bad").exists()
