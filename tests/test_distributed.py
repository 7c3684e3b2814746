"""Data parallelism under torchrun on CPU (gloo, 2 processes): the same ranking and the same
weights as one process, nothing outside the mask moves, and a 2-process checkpoint resumes in one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from soir.mask import Mask
from soir.mask import load as load_mask
from soir.models import save_model
from soirlab.cli import main
from tests.conftest import neuron_selection

pytestmark = pytest.mark.slow


def torchrun(args: list[str], processes: int = 2, ok: bool = True) -> str:
    """`torchrun --standalone --nproc-per-node N -m soirlab.cli ARGS`, one thread per process; its stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
                           "-m", "soirlab.cli", *args], env=env, capture_output=True, text=True, timeout=600)
    assert (done.returncode == 0) == ok, done.stderr[-3000:]
    return done.stderr


@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer, make_model):
    """A tiny OLMo and 12 forget / 12 retain rows (batches of 4 split evenly over 2 processes)."""
    d = tmp_path_factory.mktemp("distributed")
    rows = [(f"What is fact {i} about Norland?", f" It is number {i * 7 % 13}.") for i in range(24)]
    frame = pd.DataFrame({"id": [f"r{i}qa0" for i in range(24)], "input": [q for q, _ in rows], "output": [a for _, a in rows],
                          "task": "Task2"})
    frame.iloc[:12].to_parquet(d / "forget.parquet")
    frame.iloc[12:].to_parquet(d / "retain.parquet")
    model = make_model("olmo")
    save_model(model, tokenizer, d / "model")
    tensors, elements = neuron_selection("olmo", broadcast=True)
    Mask.from_selection(model, tensors, elements).save(d / "mask")
    Mask.from_names(model, TENSOR_MASK).save(d / "tensor-mask")
    return d


TENSOR_MASK = ["model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight", "lm_head.weight"]


@pytest.mark.parametrize("score, sketch", [("soir", "none"), ("soir-datainf", "none"), ("soir-datainf", "sjlt"), ("soir-line", "none")])
def test_two_processes_rank_like_one(files, score, sketch):
    """Means are combined by row count (soir's gradients and HVP forms, soir-line's losses) and
    per-example gradients or sketches gathered (soir-datainf; sketch maps are seeded by parameter
    name, so every process projects alike): the same scores as one process."""
    common = ["rank", "--model", str(files / "model"), "--forget", str(files / "forget.parquet"), "--retain", str(files / "retain.parquet"),
              "--score", score, "--sketch", sketch, "--dim", "64", "--delta", "0.1",  # Δ a random tiny model can reach
              "--curvature", "hvp",  # exact: kfac's and ggn's label draws depend on how the rows are sharded
              "--batch-size", "4", "--no-progress"]
    assert main([*common, "--out", str(files / f"one-{score}-{sketch}")]) == 0
    torchrun([*common, "--out", str(files / f"two-{score}-{sketch}")])
    one = pd.read_parquet(files / f"one-{score}-{sketch}" / "ranking.parquet").set_index("group")
    two = pd.read_parquet(files / f"two-{score}-{sketch}" / "ranking.parquet").set_index("group").loc[one.index]
    finite = np.isfinite(one["score"])
    assert finite.sum() >= len(one) // 2
    np.testing.assert_allclose(two["score"][finite], one["score"][finite], rtol=1e-4, atol=1e-9)
    assert (np.isfinite(two["score"]) == finite).all()


def unlearn_args(files, out: str, steps: int = 4, mask: str = "mask") -> list[str]:
    return ["unlearn", "--model", str(files / "model"), "--forget", str(files / "forget.parquet"), "--retain", str(files / "retain.parquet"),
            "--mask", str(files / mask), "--objective", "npo", "--steps", str(steps), "--batch-size", "4", "--grad-accum", "2", "--lr", "1e-2",
            "--weight-decay", "0.1", "--warmup", "0", "--save-every", "2", "--no-progress", "--out", str(files / out)]


def test_two_processes_unlearn_like_one_with_the_same_global_batch(files):
    """Each process takes half of every batch and DDP averages the gradients (on the second of
    two micro-batches: the first accumulates locally): the weights of one process with the whole
    batch, and outside the mask bit for bit the original ones."""
    assert main(unlearn_args(files, "one")) == 0
    torchrun(unlearn_args(files, "two"))
    start, one, two = (load_file(files / d / "model.safetensors") for d in ("model", "one", "two"))
    mask = load_mask(files / "mask")
    for name in start:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-6, msg=name)
        keep = mask.element_mask(name) if name in mask.names else torch.zeros(start[name].shape, dtype=torch.bool)
        assert torch.equal(two[name][~keep], start[name][~keep]), name
        if name in mask.names:
            assert not torch.equal(two[name][keep], start[name][keep]), name
    logs = [pd.read_json(files / d / "log.jsonl", lines=True) for d in ("one", "two")]
    np.testing.assert_allclose(logs[1]["loss"], logs[0]["loss"], rtol=1e-4)
    ran = [json.loads((files / d / "unlearn.json").read_text())["result"]["parallel"] for d in ("one", "two")]
    assert ran == ["none", "ddp × 2"]


def test_fsdp_unlearns_like_one_process_and_resumes_in_one(files):
    """Under --fsdp every process holds a shard of each tensor (the reference too: NPO swaps the
    originals into the shards); the saved model and the checkpoints hold whole tensors. The weights
    are those of one process with the same global batch, outside the mask bit for bit the original
    ones, and step 2's checkpoint continued by one process, or by two under --fsdp again, ends
    where the 2-process run ends."""
    assert main(unlearn_args(files, "tensor-one", mask="tensor-mask")) == 0
    torchrun([*unlearn_args(files, "tensor-fsdp", mask="tensor-mask"), "--fsdp"])
    assert json.loads((files / "tensor-fsdp" / "unlearn.json").read_text())["result"]["parallel"] == "fsdp × 2"
    start, one, two = (load_file(files / d / "model.safetensors") for d in ("model", "tensor-one", "tensor-fsdp"))
    assert set(two) == set(start)
    for name in start:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-6, msg=name)
        assert torch.equal(two[name], start[name]) == (name not in TENSOR_MASK), name
    checkpoint = load_file(files / "tensor-fsdp" / "checkpoints" / "step-00000002" / "weights.safetensors")
    assert {n: tuple(t.shape) for n, t in checkpoint.items()} == {n: tuple(start[n].shape) for n in TENSOR_MASK}
    for processes in (1, 2):  # the whole tensors of a checkpoint are cut into shards again under --fsdp
        resumed = files / f"tensor-resumed-{processes}"
        shutil.copytree(files / "tensor-fsdp", resumed)
        (resumed / "model.safetensors").unlink()
        args = [*unlearn_args(files, resumed.name, mask="tensor-mask"), "--resume", "--fsdp"]
        if processes == 1:
            assert main(args) == 0
        else:
            torchrun(args)
        again = load_file(resumed / "model.safetensors")
        for name in start:
            torch.testing.assert_close(again[name], two[name], rtol=1e-4, atol=1e-6, msg=name)


def test_fsdp_refuses_an_element_mask(files):
    """FSDP shards whole tensors: a mask of some entries is refused in one line, before anything is written."""
    err = torchrun([*unlearn_args(files, "fsdp-elements"), "--fsdp"], ok=False)
    assert "soir: error: --fsdp trains whole tensors" in err and "exitcode  : 2" in err  # torchrun's own summary carries a traceback
    assert "loop.py" not in err  # but none comes from the toolkit
    assert not (files / "fsdp-elements").exists()


def test_a_two_process_checkpoint_resumes_in_one_process(files):
    """Step 2's checkpoint of a 2-process run, continued to step 4 by one process, ends where one
    process running all 4 steps ends."""
    torchrun(unlearn_args(files, "two-resume"))
    resumed = files / "resumed"
    shutil.copytree(files / "two-resume", resumed)
    (resumed / "model.safetensors").unlink()
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["step-00000002"]
    assert main([*unlearn_args(files, "resumed"), "--resume"]) == 0
    if not (files / "one" / "model.safetensors").exists():
        assert main(unlearn_args(files, "one")) == 0
    one, again = load_file(files / "one" / "model.safetensors"), load_file(resumed / "model.safetensors")
    for name in one:
        torch.testing.assert_close(again[name], one[name], rtol=1e-4, atol=1e-6, msg=name)


def test_two_processes_evaluate_like_one(files):
    """Each process scores every other row; the gathered per-example table and the metrics (MIA
    from the gathered losses included) are those of one process."""
    args = ["evaluate", "--model", str(files / "model"), "--forget", str(files / "forget.parquet"), "--retain", str(files / "retain.parquet"),
            "--holdout", str(files / "retain.parquet"), "--max-new-tokens", "6", "--no-progress"]
    assert main([*args, "--out", str(files / "eval-one")]) == 0
    torchrun([*args, "--out", str(files / "eval-two")])
    one, two = (pd.read_parquet(files / d / "per_example.parquet") for d in ("eval-one", "eval-two"))
    assert list(two["id"]) == list(one["id"]) and list(two["generation"]) == list(one["generation"])
    numeric = one.select_dtypes("number").columns
    pd.testing.assert_frame_equal(two[numeric], one[numeric], rtol=1e-4, check_dtype=False)
    metrics = [json.loads((files / d / "metrics.json").read_text()) for d in ("eval-one", "eval-two")]
    assert metrics[1]["mia/loss/auc"] == pytest.approx(metrics[0]["mia/loss/auc"], abs=1e-9)
