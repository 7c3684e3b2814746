"""Adding a score, an objective or a metric is one definition plus one registration: each is
registered inside a test and then used through the command line or the stage, with nothing else
changed."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from analysis.metrics import TEXT_METRICS
from soir.registry import Registry
from soir.scores import SCORES, register_score
from soirlab.cli import main
from unlearn.objectives import OBJECTIVES, nll, register_objective

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def registered():
    """Unregister whatever a test registers, so the registries stay as they were."""
    added: list[tuple[Registry, str]] = []
    yield added
    for registry, name in added:
        registry.unregister(name)


def test_a_score_registered_in_a_test_ranks_through_the_cli(quick_testbed, tmp_path, registered):
    calls = []

    @register_score("cosine-forget-retain", lower_is_better=False, needs=("mean_forget", "mean_retain"),
                    help="cosine between the group's mean forget and retain gradients")
    def cosine(mean_forget, mean_retain, name):
        calls.append(name)
        f, r = mean_forget.double(), mean_retain.double()
        return float(f @ r / (f.norm() * r.norm()))

    registered.append((SCORES, "cosine-forget-retain"))
    data = quick_testbed["data"]
    out = tmp_path / "rank"
    code = main(["rank", "--model", str(quick_testbed["finetuned"]), "--forget", str(data / "forget.parquet"),
                 "--retain", str(data / "retain.parquet"), "--score", "cosine-forget-retain", "--include", r"layers\.1\.",
                 "--out", str(out), "--no-progress"])
    assert code == 0
    table = pd.read_parquet(out / "ranking.parquet")
    assert sorted(calls) == sorted(table["group"]) and len(table) > 3
    assert table["score"].between(-1, 1).all() and table["score"].nunique() == len(table)
    # higher is better: rank 1 has the largest cosine
    assert table.loc[table["rank"].idxmin(), "score"] == table["score"].max()
    assert json.loads((out / "ranking.json").read_text())["settings"]["score"] == "cosine-forget-retain"
    # only what the score declared was computed: no curvature pass, no per-example pass
    assert set(json.loads((out / "ranking.json").read_text())["timings_s"]) == {"setup", "mean_gradients", "total"}


def test_a_score_that_names_an_unknown_quantity_is_refused():
    with pytest.raises(ValueError, match="unknown quantities"):
        register_score("bad", lower_is_better=True, needs=("hessian_diagonal",))(lambda hessian_diagonal: 0.0)


def test_an_objective_registered_in_a_test_unlearns_through_the_cli(quick_testbed, tmp_path, registered):
    @register_objective("half-ascent", help="half the gradient ascent of ga, for a test")
    class HalfAscent:
        streams = ("forget",)
        needs_reference = False

        def __init__(self, settings):
            self.settings = settings

        def __call__(self, model, batches, reference=None):
            forget = nll(model, batches["forget"])
            return -0.5 * forget, {"forget_nll": forget.detach()}

    registered.append((OBJECTIVES, "half-ascent"))
    data, out = quick_testbed["data"], tmp_path / "unlearned"
    code = main(["unlearn", "--model", str(quick_testbed["finetuned"]), "--forget", str(data / "forget.parquet"),
                 "--retain", str(data / "retain.parquet"), "--objective", "half-ascent", "--include", r"layers\.1\.mlp",
                 "--steps", "3", "--lr", "1e-2", "--out", str(out), "--no-progress"])
    assert code == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and all(row["loss"] == pytest.approx(-0.5 * row["forget_nll"]) for row in log)
    assert log[-1]["forget_nll"] > log[0]["forget_nll"]  # it ascends
    assert json.loads((out / "unlearn.json").read_text())["settings"]["objective"] == "half-ascent"


def test_a_metric_registered_in_a_test_is_reported_by_evaluate(quick_testbed, tmp_path, registered):
    def length_ratio(generation: str, reference: str) -> float:
        return len(generation.strip()) / max(1, len(reference.strip()))

    TEXT_METRICS.register("length_ratio", length_ratio, help="generated length over reference length")
    registered.append((TEXT_METRICS, "length_ratio"))
    data, out = quick_testbed["data"], tmp_path / "eval"
    code = main(["evaluate", "--model", str(quick_testbed["finetuned"]), "--forget", str(data / "forget.parquet"),
                 "--retain", str(data / "retain.parquet"), "--max-new-tokens", "8", "--out", str(out), "--no-progress"])
    assert code == 0
    rows = pd.read_parquet(out / "per_example.parquet")
    metrics = json.loads((out / "metrics.json").read_text())
    forget = rows[rows["split"] == "forget"]
    expected = [length_ratio(g, r) for g, r in zip(forget["generation"], pd.read_parquet(data / "forget.parquet")["output"])]
    assert np.allclose(forget["length_ratio"], expected)
    assert metrics["forget/length_ratio"] == pytest.approx(float(np.mean(expected)))
    assert "paraphrased_length_ratio" in rows.columns and "retain/paraphrased_length_ratio" in metrics


def test_the_cli_choices_follow_the_registries(registered):
    from soirlab.cli import build_parser

    @register_score("always-one", lower_is_better=True, needs=())
    def always_one():
        return 1.0

    registered.append((SCORES, "always-one"))
    rank = next(a for a in build_parser(["rank"])._actions if a.dest == "command").choices["rank"]
    score = next(a for a in rank._actions if a.dest == "score")
    assert list(score.choices) == list(SCORES) and "always-one" in score.choices
