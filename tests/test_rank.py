"""`soir rank`: the ranking table and its files, agreement with the curvature/score functions,
sketched against exact rankings, and the command line."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import spearmanr

from soir.curvature import hvp_peak_bytes, hvp_quadratic_forms, kfac_peak_bytes, taylor_coefficients
from soir.data import encode, n_examples, pad_id, read_split, split_batches
from soir.errors import UserError
from soir.gradients import mean_gradient
from soir.models import load_model, load_tokenizer
from soir.ranking import BASE_COLUMNS, SOIR_COLUMNS, RankSettings, load, rank
from soir.scores import SCORES, soir_components
from soirlab.cli import build_parser, main

LAYERS = (r"layers\.",)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def testbed(quick_testbed):
    tok = load_tokenizer(quick_testbed["data"] / "tokenizer")
    model = load_model(quick_testbed["finetuned"], tok, eager_attention=True)
    split = {s: encode(read_split(quick_testbed["data"] / f"{s}.parquet"), tok) for s in ("forget", "retain")}
    return {"paths": quick_testbed, "tokenizer": tok, "model": model, "pad": pad_id(tok), **split}


def test_soir_ranking_table_files_and_order(testbed, tmp_path):
    model, pad = testbed["model"], testbed["pad"]
    ranking = rank(model, testbed["forget"], testbed["retain"], pad, RankSettings(batch_size=16), progress=False)
    table = ranking.table
    n_tensors = len(list(model.named_parameters()))
    assert list(table.columns) == list(BASE_COLUMNS[:6]) + ["score", "rank", *SOIR_COLUMNS]
    assert len(table) == n_tensors and table["n_params"].sum() == sum(p.numel() for p in model.parameters())
    assert sorted(table["rank"]) == list(range(1, len(table) + 1))
    ranked = ranking.ranked()
    finite = ranked["score"][np.isfinite(ranked["score"])]
    assert finite.is_monotonic_increasing  # soir: ascending, lower retain damage first
    assert np.allclose(table["forget_gain"], 1.0)  # every reachable group forgets Δ = 1 nat
    assert (table["a"] > 0).all() and np.isfinite(table[["b", "c_f", "c_r"]].to_numpy()).all()
    ranking.save(tmp_path)
    again = load(tmp_path / "ranking.parquet")
    pd.testing.assert_frame_equal(again.table, table, check_dtype=False)
    assert again.settings == ranking.settings
    meta = json.loads((tmp_path / "ranking.json").read_text())
    # 16 groups: hvp's cost (a second backward per group) is past the default's limit, kfac's is not
    assert meta["settings"]["score"] == "soir" and meta["settings"]["curvature"] == "kfac" and meta["curvature_choice"].endswith(": kfac")
    assert {"torch", "transformers", "soir"} <= set(meta["versions"]) and meta["timings_s"]["total"] > 0
    assert meta["n_forget"] == len(testbed["forget"]) and meta["seeds"]["seed"] == 0


def test_soir_with_sketch_none_equals_the_curvature_and_score_functions(testbed):
    model, pad = testbed["model"], testbed["pad"]
    names = ["model.layers.0.self_attn.v_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    settings = RankSettings(include=tuple(n.replace(".", r"\.") + "$" for n in names), batch_size=7, delta=0.3)
    ranking = rank(model, testbed["forget"], testbed["retain"], pad, settings, progress=False)
    table = ranking.table.set_index("group")
    assert list(table.index) == names
    forget = split_batches(testbed["forget"], pad, 64)
    retain = split_batches(testbed["retain"], pad, 64)
    for name in names:
        direct = taylor_coefficients(model, forget, retain, [name])  # jvp(grad) HVPs, one batch per split
        comps = soir_components(direct["a"], direct["b"], direct["c_f"], direct["c_r"], 0.3)
        row = table.loc[name]
        for key in ("a", "b", "c_f", "c_r"):
            assert row[key] == pytest.approx(direct[key], rel=2e-4, abs=1e-9), (name, key)
        assert row["score"] == pytest.approx(float(comps["score"]), rel=2e-4)
        assert row["eta"] == pytest.approx(float(comps["eta"]), rel=2e-4)


def test_hvp_quadratic_forms_restrict_to_neuron_slices(make_model, tokenizer, qa_frame):
    """A neuron group's form uses v zeroed outside its slices: equals vᵀ H v over the whole tensors."""
    from soir.curvature import quadratic_form
    from soir.groups import gather, parameter_groups, scatter

    model = make_model("llama", dtype=torch.float64)
    enc = encode(qa_frame, tokenizer)
    batches = split_batches(enc, pad_id(tokenizer), 3)
    groups = [g for g in parameter_groups(model, "neuron") if g.role == "neuron"][:2]
    params = dict(model.named_parameters())
    vectors = {n: torch.randn_like(p) for n, p in params.items()}
    forms = hvp_quadratic_forms(model, batches, groups, vectors)
    for g in groups:
        v = scatter(g, gather(g, vectors), params)
        assert forms[g.name] == pytest.approx(quadratic_form(model, batches, list(v), v), rel=1e-6)


@pytest.mark.parametrize("arch", ["olmo", "gpt2", "llama"])
def test_replayed_blocks_give_the_full_forward(make_model, tokenizer, qa_frame, arch):
    """With a group's weights perturbed, the forward that replays the blocks below the group's
    first block gives the very losses of a full forward, for every group (embeddings start at 0,
    the final norm and an untied head after the last block)."""
    from soir.curvature import LayerCache, first_block
    from soir.data import example_losses
    from soir.groups import parameter_groups

    model = make_model(arch)
    batch = split_batches(encode(qa_frame, tokenizer), pad_id(tokenizer), 4)[0]
    groups = parameter_groups(model, "tensor")
    cache = LayerCache(model)
    named = dict(model.named_parameters())
    with torch.no_grad():
        with cache.record():
            starts, recorded = first_block(model, cache, groups, lambda: example_losses(model, batch))
        assert torch.equal(recorded, example_losses(model, batch))
        assert cache.depth == 2 and min(starts.values()) == 0 and max(starts.values()) == (1 if arch == "gpt2" else 2)  # gpt2 ties its head
        for g in groups:
            kept = {m: named[m].clone() for m in g.param_names}
            for m in g.param_names:
                named[m].add_(torch.randn_like(named[m]), alpha=0.1)
            full = example_losses(model, batch)
            with cache.skip_below(starts[g.name]):
                replayed = example_losses(model, batch)
            for m in g.param_names:
                named[m].copy_(kept[m])
            assert torch.equal(full, replayed), g.name
    assert all(not hasattr(b, "forward") or "forward" not in vars(b) for b in cache.blocks)  # unpatched


@pytest.mark.parametrize("arch", ["olmo", "gpt2"])
def test_forward_only_forms_match_the_exact_forms_and_restore_the_weights(make_model, tokenizer, qa_frame, arch):
    """fd's central differences along the forget gradient equal the exact double-backward forms
    (to O(h²) truncation and the float32 attention softmax) for every group, neuron slices
    included; the weights come back bit for bit."""
    from soir.curvature import fd_quadratic_forms
    from soir.groups import parameter_groups

    model = make_model(arch, dtype=torch.float64)
    batches = split_batches(encode(qa_frame, tokenizer), pad_id(tokenizer), 3)
    groups = parameter_groups(model, "tensor") + [g for g in parameter_groups(model, "neuron") if g.role == "neuron"][:2]
    vectors = mean_gradient(model, batches, [n for n, _ in model.named_parameters()])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    exact = hvp_quadratic_forms(model, batches, groups, vectors)
    approx = fd_quadratic_forms(model, batches, groups, vectors, step=1e-3)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    scale = max(abs(c) for c in exact.values())
    for g in groups:
        assert approx[g.name] == pytest.approx(exact[g.name], rel=2e-2, abs=1e-3 * scale), g.name


def test_forward_only_curvature_ranks_like_the_exact_one(testbed):
    """On the quick testbed in float32 (the model as ranked), fd's soir ranking agrees with hvp's."""
    model, pad = testbed["model"], testbed["pad"]
    exact = rank(model, testbed["forget"], testbed["retain"], pad, RankSettings(batch_size=16, curvature="hvp"), progress=False).table.set_index("group")
    fd = rank(model, testbed["forget"], testbed["retain"], pad, RankSettings(batch_size=16, curvature="fd"), progress=False).table.set_index("group")
    fd = fd.loc[exact.index]
    for column in ("c_f", "c_r", "score"):
        assert spearmanr(exact[column], fd[column]).statistic >= 0.95, column
    assert np.allclose(fd["c_r"], exact["c_r"], rtol=0.05, atol=1e-3 * exact["c_r"].abs().max())


def test_a_sketch_leaves_soir_exact_and_brings_datainf_close_at_large_k(testbed):
    """soir's mean gradients are exact under any sketch (docs/design.md §6); soir-datainf's per-example
    gradients are sketched and its ranking approaches the exact one at large k."""
    model, pad = testbed["model"], testbed["pad"]
    common = dict(include=LAYERS, batch_size=16)
    exact = rank(model, testbed["forget"], testbed["retain"], pad, RankSettings(**common), progress=False)
    sketched = rank(model, testbed["forget"], testbed["retain"], pad, RankSettings(sketch="gaussian", dim=2048, **common), progress=False)
    pd.testing.assert_frame_equal(sketched.table, exact.table, check_exact=False, rtol=1e-6)
    common = dict(score="soir-datainf", max_examples=16, **common)
    exact = rank(model, testbed["forget"], testbed["retain"], pad, RankSettings(**common), progress=False)
    sketched = rank(model, testbed["forget"], testbed["retain"], pad, RankSettings(sketch="gaussian", dim=2048, **common), progress=False)
    assert (sketched.table["group"] == exact.table["group"]).all()
    assert not np.allclose(sketched.table["score"], exact.table["score"])  # really sketched
    rho = spearmanr(exact.table["score"], sketched.table["score"]).statistic
    assert rho > 0.9, rho


def test_datainf_and_baselines_rank_descending(testbed):
    model, pad = testbed["model"], testbed["pad"]
    for score, sketch in (("soir-datainf", "sjlt"), ("grad-magnitude", "factored"), ("fisher", "none")):
        settings = RankSettings(score=score, sketch=sketch, dim=256, include=LAYERS, max_examples=8)
        ranking = rank(model, testbed["forget"], testbed["retain"], pad, settings, progress=False)
        ranked = ranking.ranked()
        assert not ranking.lower_is_better and ranked["score"].is_monotonic_decreasing, score
        assert (ranked["score"] > 0).all() and ranking.info["n_retain"] <= 8
        assert "c_f" not in ranking.table


def test_ggn_curvature_runs_from_sketches(testbed):
    model, pad = testbed["model"], testbed["pad"]
    settings = RankSettings(curvature="ggn", sketch="factored", dim=64, include=(r"layers\.1\.",), max_examples=8)
    table = rank(model, testbed["forget"], testbed["retain"], pad, settings, progress=False).table
    assert np.isfinite(table[["c_f", "c_r"]].to_numpy()).all() and (table["c_f"] != 0).all()


def test_user_errors(testbed):
    model, pad = testbed["model"], testbed["pad"]
    with pytest.raises(UserError, match="needs the base model"):
        rank(model, testbed["forget"], testbed["retain"], pad, RankSettings(score="shift"), progress=False)
    with pytest.raises(UserError, match="true parameter coordinates"):
        RankSettings(score="wagle", sketch="sjlt")
    with pytest.raises(UserError, match="unknown score"):
        RankSettings(score="nope")
    with pytest.raises(UserError, match="matched no parameter group"):
        rank(model, testbed["forget"], testbed["retain"], pad, RankSettings(score="random", include=("nope",)), progress=False)


def test_cli_rank_end_to_end_and_errors(testbed, tmp_path, capsys):
    paths = testbed["paths"]
    out = tmp_path / "rank"
    common = ["--model", str(paths["finetuned"]), "--forget", str(paths["data"] / "forget.parquet"),
              "--retain", str(paths["data"] / "retain.parquet"), "--no-progress"]
    assert main(["rank", *common, "--score", "shift", "--base", str(paths["base"]), "--granularity", "layer", "--out", str(out)]) == 0
    table = pd.read_parquet(out / "ranking.parquet")
    assert list(table.columns) == list(BASE_COLUMNS[:6]) + ["score", "rank"]
    assert {"model.layers.0", "model.layers.1"} <= set(table["group"]) and (table["score"] > 0).all()
    assert json.loads((out / "ranking.json").read_text())["inputs"]["base"] == str(paths["base"])
    assert main(["rank", *common, "--include", "layers.1.mlp", "--max-examples", "6", "--out", str(out)]) == 0  # replaces it
    table = pd.read_parquet(out / "ranking.parquet")
    assert set(SOIR_COLUMNS) <= set(table.columns) and len(table) == 3
    capsys.readouterr()
    bad = tmp_path / "bad"
    assert main(["rank", *common, "--score", "shift", "--out", str(bad)]) == 2
    assert main(["rank", *common, "--dim", "0", "--sketch", "sjlt", "--out", str(bad)]) == 2
    assert main(["rank", *common[:3], str(tmp_path / "missing.parquet"), *common[4:], "--out", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("soir: error:") for line in err)
    assert not bad.exists()


def test_cli_choices_match_the_registries():
    from soir.curvature import CURVATURES
    from soir.groups import GRANULARITIES, NORMS
    from soir.sketch import SKETCHES

    sub = next(a for a in build_parser(["rank"])._actions if a.dest == "command").choices["rank"]
    choices = {a.dest: list(a.choices) for a in sub._actions if a.choices}
    assert choices["score"] == list(SCORES) and choices["sketch"] == list(SKETCHES)
    assert choices["granularity"] == list(GRANULARITIES) and choices["norms"] == list(NORMS)
    assert choices["curvature"] == list(CURVATURES)


# ---------------------------------------------------------------- --save-sketches / --from-sketches


def _rank_cli(testbed, out, *flags) -> None:
    paths = testbed["paths"]
    common = ["--model", str(paths["finetuned"]), "--forget", str(paths["data"] / "forget.parquet"),
              "--retain", str(paths["data"] / "retain.parquet"), "--no-progress", "--max-examples", "8", "--batch-size", "8"]
    assert main(["rank", *common, *flags, "--out", str(out)]) == 0


def test_save_sketches_then_rank_again_without_a_model_pass(testbed, tmp_path, capsys):
    from soir.sketch import load_sketches

    # soir, exact: the saved quantities give the same scores, and another Δ equals a fresh rank with it
    few = ["--include", r"layers\.1\.(self_attn\.v_proj|mlp\.down_proj)"]
    _rank_cli(testbed, tmp_path / "soir", *few, "--delta", "0.5", "--save-sketches")
    tensors, manifest = load_sketches(tmp_path / "soir" / "sketches")
    groups = [g["name"] for g in manifest["groups"]]
    assert len(groups) == 2 and manifest["score"] == "soir" and manifest["curvature"] == "hvp" and manifest["n_f"] == 8
    assert {f"{k}/{g}" for k in ("mean_forget", "mean_retain") for g in groups} | {"curvature/c_f", "curvature/c_r"} == set(tensors)
    assert [tensors[f"mean_forget/{g}"].numel() for g in groups] == [g["D_S"] for g in manifest["groups"]]
    original = pd.read_parquet(tmp_path / "soir" / "ranking.parquet")
    assert main(["rank", "--from-sketches", str(tmp_path / "soir"), "--out", str(tmp_path / "again")]) == 0
    again = pd.read_parquet(tmp_path / "again" / "ranking.parquet")
    pd.testing.assert_frame_equal(again, original, check_exact=False, rtol=1e-10)
    assert json.loads((tmp_path / "again" / "ranking.json").read_text())["settings"]["delta"] == 0.5
    _rank_cli(testbed, tmp_path / "fresh", *few, "--delta", "2")
    assert main(["rank", "--from-sketches", str(tmp_path / "soir" / "sketches"), "--delta", "2", "--out", str(tmp_path / "delta")]) == 0
    fresh, other = (pd.read_parquet(tmp_path / d / "ranking.parquet") for d in ("fresh", "delta"))
    pd.testing.assert_frame_equal(other, fresh, check_exact=False, rtol=1e-6)
    assert not np.allclose(other["score"], original["score"])

    # soir-datainf, sketched: same scores from the saved sketches; another λ matches rerank's score code
    _rank_cli(testbed, tmp_path / "datainf", "--include", r"layers\.0\.mlp", "--score", "soir-datainf",
              "--sketch", "gaussian", "--dim", "64", "--save-sketches")
    tensors, manifest = load_sketches(tmp_path / "datainf" / "sketches")
    assert tensors[f"per_example_retain/{manifest['groups'][0]['name']}"].shape == (8, 64) and manifest["sketch"] == "gaussian"
    assert main(["rank", "--from-sketches", str(tmp_path / "datainf"), "--out", str(tmp_path / "datainf2")]) == 0
    original, again = (pd.read_parquet(tmp_path / d / "ranking.parquet") for d in ("datainf", "datainf2"))
    pd.testing.assert_frame_equal(again, original, check_exact=False, rtol=1e-10)
    assert main(["rank", "--from-sketches", str(tmp_path / "datainf"), "--lam", "1", "--out", str(tmp_path / "lam")]) == 0
    assert not np.allclose(pd.read_parquet(tmp_path / "lam" / "ranking.parquet")["score"], original["score"])

    # what was not saved: one line, exit 2, nothing written
    capsys.readouterr()
    bad = tmp_path / "bad"
    assert main(["rank", "--from-sketches", str(tmp_path / "soir"), "--score", "soir-datainf", "--out", str(bad)]) == 2
    assert main(["rank", "--from-sketches", str(tmp_path / "datainf"), "--score", "soir", "--out", str(bad)]) == 2
    assert main(["rank", "--from-sketches", str(tmp_path / "soir"), "--score", "wagle", "--out", str(bad)]) == 2
    assert main(["rank", "--out", str(bad)]) == 2  # neither a model nor sketches
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("soir: error:") for line in err), err
    assert "per-example retain sketches" in err[0] and "--save-sketches" in err[0]
    assert "c_f, c_r" in err[1] and "model's parameters" in err[2] and "--model" in err[3]
    assert not bad.exists()


def test_the_default_curvature_weighs_cost_and_memory(make_model, tokenizer, qa_frame, tmp_path):
    """Unset --curvature is hvp for a few groups while its estimated peak fits --memory-budget, kfac
    (whose cost does not grow with the groups) for many or when hvp does not fit, fd when neither
    fits; ranking.json says which and why."""
    model = make_model("olmo")
    enc = encode(qa_frame, tokenizer)
    few = (r"layers\.1\.mlp",)

    def chosen(settings, m=model):
        ranking = rank(m, enc, enc, pad_id(tokenizer), settings, progress=False)
        return ranking.settings.curvature, ranking.info.get("curvature_choice", "")

    curvature, why = chosen(RankSettings(batch_size=2, memory_budget=64.0, include=few))
    assert curvature == "hvp" and "3 groups" in why and "do not dominate" in why and "fits" in why
    curvature, why = chosen(RankSettings(batch_size=2, memory_budget=64.0))
    assert curvature == "kfac" and "16 groups" in why and "backwards (about 8 gradient passes) dominate" in why
    batches = split_batches(enc, pad_id(tokenizer), 2)
    hvp_peak, kfac_peak = hvp_peak_bytes(model, batches), kfac_peak_bytes(model, batches)
    assert kfac_peak < hvp_peak
    between = (kfac_peak + hvp_peak) / 2 / 2**30
    curvature, why = chosen(RankSettings(batch_size=2, memory_budget=between, include=few))
    assert curvature == "kfac" and "hvp's estimated peak" in why and "exceeds" in why
    tight = rank(model, enc, enc, pad_id(tokenizer), RankSettings(batch_size=2, memory_budget=1e-6), progress=False)
    assert tight.settings.curvature == "fd" and tight.info["curvature_choice"].endswith("exceeds it: fd")
    assert "curvature_choice" not in rank(model, enc, enc, pad_id(tokenizer), RankSettings(score="grad-magnitude"), progress=False).info
    tight.save(tmp_path / "r")
    saved = json.loads((tmp_path / "r" / "ranking.json").read_text())
    assert saved["settings"]["curvature"] == "fd" and saved["curvature_choice"] == tight.info["curvature_choice"]
    half = make_model("olmo", dtype=torch.bfloat16)
    curvature, why = chosen(RankSettings(batch_size=2, memory_budget=1e-6), half)
    assert curvature == "kfac" and "needs float32" in why
    with pytest.raises(UserError, match="float32"):
        rank(half, enc, enc, pad_id(tokenizer), RankSettings(batch_size=2, curvature="fd"), progress=False)


# ---------------------------------------------------------------- --shortlist


def test_shortlist_of_every_group_is_soir_line(make_model, tokenizer, qa_frame):
    model = make_model("olmo")
    enc = encode(qa_frame, tokenizer)
    plain = rank(model, enc, enc, pad_id(tokenizer), RankSettings(score="soir-line", batch_size=2), progress=False).table
    every = rank(model, enc, enc, pad_id(tokenizer), RankSettings(score="soir-line", batch_size=2, shortlist=len(plain)), progress=False)
    columns = ["group", "score", "rank", "eta", "forget_gain", "retain_damage"]
    pd.testing.assert_frame_equal(every.table[columns], plain[columns], check_dtype=False)
    assert every.table["shortlisted"].all() and every.info["shortlist"]["scored"] == len(plain)


def test_line_batch_searches_groups_side_by_side_to_the_same_ranking(make_model, tokenizer, qa_frame):
    """`--line-batch 4` gives soir-line's η, damage and order of the default (1 on CPU) within the
    search's tolerance, and ranking.json's settings say which ran."""
    model = make_model("olmo")
    enc = encode(qa_frame, tokenizer)
    plain = rank(model, enc, enc, pad_id(tokenizer), RankSettings(score="soir-line", batch_size=2), progress=False)
    side = rank(model, enc, enc, pad_id(tokenizer), RankSettings(score="soir-line", batch_size=2, line_batch=4), progress=False)
    assert plain.settings.line_batch == 1 and side.settings.line_batch == 4
    columns = ["eta", "forget_gain", "retain_damage"]
    np.testing.assert_allclose(side.table[columns].to_numpy(float), plain.table[columns].to_numpy(float), rtol=1e-5)
    assert side.table["group"].tolist() == plain.table["group"].tolist()


def test_shortlist_runs_the_line_search_on_the_first_stage_best_only(make_model, tokenizer, qa_frame, monkeypatch):
    import soir.quantities

    searched = []
    line_quantities = soir.quantities.line_quantities

    def counted(model, forget, retain, groups, *args, **kwargs):
        searched.append([g.name for g in groups])
        return line_quantities(model, forget, retain, groups, *args, **kwargs)

    monkeypatch.setattr(soir.quantities, "line_quantities", counted)
    model = make_model("olmo")
    enc = encode(qa_frame, tokenizer)
    slope = rank(model, enc, enc, pad_id(tokenizer), RankSettings(score="soir-slope", batch_size=2), progress=False).ranked()
    line = rank(model, enc, enc, pad_id(tokenizer), RankSettings(score="soir-line", batch_size=2), progress=False).table.set_index("group")
    searched.clear()
    two = rank(model, enc, enc, pad_id(tokenizer), RankSettings(score="soir-line", batch_size=2, shortlist=3), progress=False)
    best = list(slope["group"][:3])
    assert len(searched) == 1 and sorted(searched[0]) == sorted(best)  # one line search, of the 3 groups only
    ranked = two.ranked()
    assert list(ranked["group"][:3]) == list(line.loc[best].sort_values(["score"], kind="stable").index)
    assert list(ranked["group"][3:]) == list(slope["group"][3:])  # the rest in the first stage's order
    assert ranked["score"][3:].isna().all() and ranked["shortlisted"].tolist() == [True] * 3 + [False] * (len(ranked) - 3)
    assert np.allclose(ranked.set_index("group").loc[best, "score"], line.loc[best, "score"])
    assert two.info["shortlist"]["first_stage"] == {"score": "soir-slope", "curvature": None, "max_examples": None}
    assert {"first_stage_mean_gradients", "line_search"} <= set(two.info["timings_s"])
    by_soir = rank(model, enc, enc, pad_id(tokenizer), RankSettings(score="soir-line", batch_size=2, shortlist=3, shortlist_by="soir"),
                   progress=False)
    assert by_soir.info["shortlist"]["first_stage"] == {"score": "soir", "curvature": "kfac", "max_examples": None}


def test_shortlist_by_soir_line_searches_every_group_on_few_rows_then_the_shortlist_on_all(make_model, tokenizer, qa_frame, monkeypatch):
    import soir.quantities

    searched = []
    line_quantities = soir.quantities.line_quantities

    def counted(model, forget, retain, groups, *args, **kwargs):
        searched.append(([g.name for g in groups], n_examples(forget), n_examples(retain)))
        return line_quantities(model, forget, retain, groups, *args, **kwargs)

    monkeypatch.setattr(soir.quantities, "line_quantities", counted)
    model = make_model("olmo")
    enc = encode(qa_frame, tokenizer)
    few = rank(model, enc, enc, pad_id(tokenizer), RankSettings(score="soir-line", batch_size=2, max_examples=3), progress=False).ranked()
    searched.clear()
    two = rank(model, enc, enc, pad_id(tokenizer), RankSettings(score="soir-line", batch_size=2, shortlist=3, shortlist_by="soir-line",
                                                                shortlist_rows=3), progress=False)
    (first_groups, *first_rows), (second_groups, *second_rows) = searched
    assert len(first_groups) == len(few) and first_rows == [3, 3] and second_rows == [len(enc), len(enc)]
    assert sorted(second_groups) == sorted(few["group"][:3])  # the shortlist: the few-row line search's best 3
    assert list(two.ranked()["group"][3:]) == list(few["group"][3:])
    assert two.info["shortlist"]["first_stage"] == {"score": "soir-line", "curvature": None, "max_examples": 3}


def test_shortlist_errors_are_one_line(testbed, tmp_path, capsys):
    paths = testbed["paths"]
    common = ["--model", str(paths["finetuned"]), "--forget", str(paths["data"] / "forget.parquet"),
              "--retain", str(paths["data"] / "retain.parquet"), "--no-progress"]
    capsys.readouterr()
    bad = tmp_path / "bad"
    assert main(["rank", *common, "--score", "soir-line", "--shortlist", "0", "--out", str(bad)]) == 2
    assert main(["rank", *common, "--score", "soir-line", "--shortlist", "-3", "--out", str(bad)]) == 2
    assert main(["rank", *common, "--shortlist", "3", "--out", str(bad)]) == 2  # the default score is soir
    assert main(["rank", *common, "--score", "soir-line", "--line-batch", "0", "--out", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("soir: error:") for line in err), err
    assert "at least 1" in err[0] and "-3" in err[1] and "--score soir-line" in err[2] and "--line-batch" in err[3]
    assert not bad.exists()


# ---------------------------------------------------------------- soir-line


def test_line_search_finds_the_step_that_forgets_delta():
    """On hand-made loss curves: a quadratic (root known in closed form), a curve reached only far
    out (the bracket grows), one overshooting at the first-order step (it shrinks), one that never
    gets there."""
    from soir.linesearch import search

    eta, gain = search(lambda e: 2.0 + 0.5 * e * e, base=2.0, delta=1.0, start=0.01, evaluations=40)
    assert eta == pytest.approx(2**0.5, rel=1e-6) and gain == pytest.approx(1.0, rel=1e-6)
    eta, _ = search(lambda e: np.log1p(e), base=0.0, delta=3.0, start=1e-3, evaluations=40)
    assert eta == pytest.approx(np.expm1(3.0), rel=1e-6)
    eta, _ = search(lambda e: 100 * e, base=0.0, delta=1.0, start=1.0, evaluations=40)
    assert eta == pytest.approx(0.01, rel=1e-6)
    eta, gain = search(lambda e: 1 - np.exp(-e), base=0.0, delta=2.0, start=1.0, evaluations=40)
    assert eta == float("inf") and gain <= 1.0


def test_soir_line_measures_the_damage_of_its_own_step(testbed):
    """soir-line's η raises the real forget loss by Δ, its damage is the real retain loss change
    there, and the model is left bit-identical."""
    from soir.curvature import group_direction, split_loss
    from soir.data import example_losses
    from soir.groups import parameter_groups
    from soir.linesearch import loss_along

    model, pad = testbed["model"], testbed["pad"]
    names = ["model.layers.0.mlp.down_proj.weight", "lm_head.weight"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    settings = RankSettings(score="soir-line", include=tuple(n.replace(".", r"\.") + "$" for n in names), batch_size=16, delta=0.5)
    table = rank(model, testbed["forget"], testbed["retain"], pad, settings, progress=False).table.set_index("group")
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    forget, retain = split_batches(testbed["forget"], pad, 16), split_batches(testbed["retain"], pad, 16)
    g_f = mean_gradient(model, forget, names)
    named = dict(model.named_parameters())
    groups = {g.name: g for g in parameter_groups(model, "tensor") if g.name in names}
    with torch.no_grad():
        base_f, base_r = float(split_loss(model, forget)), float(split_loss(model, retain))
        for name in names:
            row, v = table.loc[name], group_direction(groups[name], g_f, named)
            assert np.isfinite(row["eta"]) and row["forget_gain"] == pytest.approx(0.5, abs=0.02)
            assert loss_along(model, v, row["eta"], forget, example_losses) - base_f == pytest.approx(row["forget_gain"], rel=1e-6)
            assert row["score"] == row["retain_damage"] == pytest.approx(loss_along(model, v, row["eta"], retain, example_losses) - base_r,
                                                                         rel=1e-6)
