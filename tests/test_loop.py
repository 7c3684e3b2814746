"""The training loop: exact resume after a kill, non-finite stop, accumulation, schedule, eval, log."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from soir.data import BatchStream, encode, pad_id
from soir.errors import UserError
from unlearn.loop import NonFiniteLoss, Trainer, TrainSettings
from unlearn.objectives import get_objective

TINY = ["--hidden", "32", "--layers", "1", "--heads", "2", "--intermediate", "64"]


def finetune_command(tokenizer_dir, data, out, *extra):
    return [sys.executable, "-m", "soirlab.cli", "finetune", "--model", "tiny:olmo", "--tokenizer", str(tokenizer_dir),
            "--data", str(data), "--out", str(out), "--steps", "300", "--batch-size", "2", "--lr", "1e-2",
            "--weight-decay", "0.1", "--no-progress", "--seed", "3", *TINY, *extra]


def test_resume_after_kill_is_bit_identical(tmp_path, tokenizer, qa_frame):
    tokenizer.save_pretrained(tmp_path / "tok")
    data = tmp_path / "data.parquet"
    qa_frame.to_parquet(data)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = tmp_path / "killed"
    proc = subprocess.Popen(finetune_command(tmp_path / "tok", data, killed, "--save-every", "20"), env=env, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list((killed / "checkpoints").glob("step-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (killed / "model.safetensors").exists()
    resumed = subprocess.run(finetune_command(tmp_path / "tok", data, killed, "--save-every", "20", "--resume"), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    straight = subprocess.run(finetune_command(tmp_path / "tok", data, tmp_path / "straight"), env=env, capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr
    a, b = load_file(killed / "model.safetensors"), load_file(tmp_path / "straight" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(line) for line in (killed / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == list(range(1, 301))


class NanAt:
    """The finetune objective, but the loss turns NaN at one step."""

    streams = ("train",)
    needs_reference = False

    def __init__(self, step):
        self.calls, self.step, self.inner = 0, step, get_objective("finetune")

    def __call__(self, model, batches, reference=None):
        self.calls += 1
        loss, parts = self.inner(model, batches)
        return (loss * float("nan") if self.calls == self.step else loss), parts


def stream(tokenizer, frame, batch_size=2):
    return BatchStream(encode(frame, tokenizer), batch_size, pad_id(tokenizer), seed=0)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, make_model, tokenizer, qa_frame):
    model = make_model("olmo")
    trainer = Trainer(model, NanAt(8), {"train": stream(tokenizer, qa_frame)}, TrainSettings(steps=20, save_every=5, progress=False), tmp_path)
    with pytest.raises(NonFiniteLoss, match="step 8.*step-00000005"):
        trainer.train()
    assert isinstance(NonFiniteLoss("x"), UserError)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000005"]
    weights = load_file(tmp_path / "checkpoints" / "step-00000005" / "weights.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the NaN step never reached the weights


def test_resume_refuses_other_training_settings(tmp_path, make_model, tokenizer, qa_frame):
    settings = TrainSettings(steps=4, save_every=2, progress=False)
    Trainer(make_model("olmo"), get_objective("finetune"), {"train": stream(tokenizer, qa_frame)}, settings, tmp_path).train()
    longer = TrainSettings(steps=8, save_every=2, progress=False)
    trainer = Trainer(make_model("olmo"), get_objective("finetune"), {"train": stream(tokenizer, qa_frame)}, longer, tmp_path)
    with pytest.raises(UserError, match="steps 4 -> 8"):
        trainer.train(resume=True)


# SGD passes the summation-order rounding of float64 gradients through unchanged; AdamW divides by √v,
# which amplifies it on coordinates whose gradient is near zero (how far depends on the thread count).
# A wrong accumulation (a missing 1/accum, a dropped micro-batch) moves weights by ~lr, far beyond both.
@pytest.mark.parametrize("optimizer, rtol, atol", [("sgd", 1e-8, 1e-11), ("adamw", 1e-6, 1e-8)])
def test_gradient_accumulation_matches_one_large_batch(tmp_path, make_model, tokenizer, qa_frame, optimizer, rtol, atol):
    finals = []
    for batch_size, accum in ((4, 1), (2, 2)):
        model = make_model("llama", dtype=torch.float64)
        settings = TrainSettings(steps=3, lr=1e-2, grad_accum=accum, optimizer=optimizer, progress=False)
        Trainer(model, get_objective("finetune"), {"train": stream(tokenizer, qa_frame, batch_size)}, settings, tmp_path / str(accum)).train()
        finals.append([p.detach().clone() for p in model.parameters()])
    assert any(not torch.equal(a, b) for a, b in zip(finals[0], [p.detach() for p in make_model("llama", dtype=torch.float64).parameters()]))
    for a, b in zip(*finals):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def test_schedule_warmup_then_cosine():
    s = TrainSettings(steps=10, lr=1.0, warmup=2, schedule="cosine")
    assert [s.lr_at(i) for i in range(2)] == [0.5, 1.0]
    assert s.lr_at(2) == pytest.approx(1.0) and s.lr_at(6) == pytest.approx(0.5) and s.lr_at(9) < 0.05
    linear = TrainSettings(steps=10, lr=1.0, warmup=0, schedule="linear")
    assert linear.lr_at(5) == pytest.approx(0.5)
    assert TrainSettings(steps=10, lr=2.0, warmup=0, schedule="constant").lr_at(9) == 2.0


@pytest.mark.parametrize("bad", [dict(steps=0), dict(steps=-3), dict(lr=0.0), dict(lr=-1.0), dict(grad_accum=0), dict(schedule="step")])
def test_bad_settings(bad):
    with pytest.raises(UserError):
        TrainSettings(**bad)


def test_eval_callback_and_log(tmp_path, make_model, tokenizer, qa_frame):
    model = make_model("gpt2")
    calls = []

    def evaluate(model, step):
        assert not model.training
        calls.append(step)
        return {"score": float(step)}

    settings = TrainSettings(steps=7, eval_every=3, progress=False)
    result = Trainer(model, get_objective("finetune"), {"train": stream(tokenizer, qa_frame)}, settings, tmp_path, eval_callback=evaluate).train()
    assert calls == [3, 6, 7] and result.steps_done == 7
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 8))
    assert rows[2]["eval/score"] == 3.0 and "eval/score" not in rows[0]
    assert rows[0]["loss"] > rows[-1]["loss"] and {"lr", "nll", "grad_norm"} <= rows[0].keys()
