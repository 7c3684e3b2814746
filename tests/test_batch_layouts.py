"""One global batch, any layout (docs/design.md §7, §10): 8 rows a step as one batch, as two
accumulated micro-batches of 4, or shared by 2 processes (gloo, torchrun; --batch-size counts the
rows of the whole batch, each process takes every other one), each way with or without
accumulation, give one process's weights for every registered unlearning objective, in float64."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from soir.mask import Mask
from soir.models import save_model
from tests.batch_layouts_driver import run_layouts, run_name
from tests.conftest import neuron_selection
from unlearn.objectives import OBJECTIVES, unlearns

pytestmark = pytest.mark.slow

UNLEARNING = [name for name, objective in OBJECTIVES.items() if unlearns(objective)]
REFERENCE = (1, 8, 1)  # (processes, --batch-size, --grad-accum)
LAYOUTS = [(1, 4, 2), (2, 8, 1), (2, 4, 2)]
ROOT = Path(__file__).resolve().parents[1]


def rows(start: int, count: int) -> pd.DataFrame:
    """QA rows whose answers run from 1 to 6 extra words: micro-batches differ in token counts and padding."""
    extra = "and the fox named Pim collected blue stones".split()
    answers = [f" It is number {i * 7 % 13} " + " ".join(extra[: i % 6 + 1]) + "." for i in range(start, start + count)]
    return pd.DataFrame({"id": [f"r{i}qa0" for i in range(start, start + count)],
                         "input": [f"What is fact {i} about Norland?" for i in range(start, start + count)],
                         "output": answers, "task": "Task2"})


@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer, make_model):
    """A tiny float64 OLMo, 16 forget and 16 retain rows (two global batches of 8 an epoch), and a
    mask of 4 MLP neurons of block 0 plus block 1's v_proj (RMU steers block 1)."""
    d = tmp_path_factory.mktemp("layouts")
    rows(0, 16).to_parquet(d / "forget.parquet")
    rows(16, 16).to_parquet(d / "retain.parquet")
    model = make_model("olmo", dtype=torch.float64)
    save_model(model, tokenizer, d / "model")
    tensors, elements = neuron_selection("olmo", broadcast=True)
    Mask.from_selection(model, tensors, elements).save(d / "mask")
    return d


@pytest.fixture(scope="module")
def runs(files, one_thread):
    """Every objective in every layout: the 2-process ones in one torchrun launch (started first,
    it runs while this process does the 1-process ones)."""
    out = files / "runs"
    two = sorted({(b, k) for p, b, k in LAYOUTS if p == 2})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}
    launch = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "tests.batch_layouts_driver",
         str(files), str(out), "--layouts", *(f"{b}x{k}" for b, k in two), "--objectives", *UNLEARNING],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        run_layouts(files, out, UNLEARNING, sorted({(b, k) for p, b, k in [REFERENCE, *LAYOUTS] if p == 1}))
        _, stderr = launch.communicate(timeout=600)
    finally:
        if launch.poll() is None:
            launch.kill()
    assert launch.returncode == 0, stderr[-3000:]
    return out


def trained(runs: Path, objective: str, layout: tuple[int, int, int]) -> dict[str, torch.Tensor]:
    return load_file(runs / run_name(objective, *layout) / "model.safetensors")


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: "p{}-b{}x{}".format(*layout))
@pytest.mark.parametrize("objective", UNLEARNING)
def test_every_layout_of_one_global_batch_trains_the_same_weights(files, runs, objective, layout):
    """Each objective is a mean over rows of per-row terms (the nonlinear NPO, SimNPO and DPO
    losses included: σ is taken per row), the micro-batches of a step hold equal numbers of rows, and
    DDP averages equal shares: the step's gradient is that of the 8 rows at once. RMU's direction
    and the refusals are seeded by the run's seed and the row ids, not by the layout. The update is
    plain SGD without clipping, so the moves (weights − start) are compared, not just the weights."""
    start = load_file(files / "model" / "model.safetensors")
    one, other = trained(runs, objective, REFERENCE), trained(runs, objective, layout)
    assert one.keys() == other.keys() == start.keys()
    moved = [name for name in start if not torch.equal(one[name], start[name])]
    assert moved, f"{objective} moved no weight: the comparison would be empty"
    for name in start:
        assert other[name].dtype == torch.float64, name
        torch.testing.assert_close(other[name] - start[name], one[name] - start[name], rtol=1e-5, atol=1e-12, msg=name)
