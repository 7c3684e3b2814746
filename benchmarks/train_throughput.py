"""Training tokens/s of the toolkit's loop against a bare PyTorch loop, same model and batches.

Both loops run AdamW with gradient clipping on identical precollated batches from the same
initial weights; the toolkit's loop adds its schedule, JSONL log, progress bar and checks.
Runs alternate (bare, loop, bare, loop, ...) so drifting machine load hits both alike.

    python benchmarks/train_throughput.py [--testbed DIR] [--steps 200] [--repeats 5]

Writes benchmarks/results/train_throughput.{csv,json,md,png} (or --out DIR) through benchmarks/report.py.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from transformers.utils import logging as hf_logging

from report import write_results  # benchmarks/ is sys.path[0] when this runs as a script
from soir.data import BatchStream, encode, pad_id, per_example_loss, read_splits  # noqa: E402
from soir.models import TinySize, load_model, load_tokenizer  # noqa: E402
from soir.synth import SynthSettings, write_testbed  # noqa: E402
from unlearn.loop import Trainer, TrainSettings  # noqa: E402
from unlearn.objectives import get_objective  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def bare_loop(model, batches, lr: float, max_grad_norm: float) -> None:
    """The reference: forward, loss, backward, clip, step; nothing else."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for batch in batches:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        per_example_loss(logits, batch["labels"]).mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def toolkit_loop(model, batches, lr: float, max_grad_norm: float, out: Path) -> None:
    settings = TrainSettings(steps=len(batches), lr=lr, max_grad_norm=max_grad_norm, progress=True)
    Trainer(model, get_objective("finetune"), {"train": batches.__getitem__}, settings, out).train()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--testbed", type=Path, help="a `soir data synth` directory (default: a fresh default testbed)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    started = time.perf_counter()
    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="throughput-") as work:
        table, model = measure(args, Path(work))
    median = table.groupby("loop")["tokens_per_s"].median()
    per_repeat = table.pivot(index="repeat", columns="loop", values="tokens_per_s")
    summary = {
        "median_tokens_per_s": median.to_dict(),
        "ratio_toolkit_over_bare": median["toolkit"] / median["bare"],
        "ratio_per_repeat": (per_repeat["toolkit"] / per_repeat["bare"]).tolist(),
        "target": ">= 0.90",
        "steps": args.steps, "batch_size": args.batch_size, "repeats": args.repeats,
        "model": "tiny:olmo " + json.dumps(TinySize().__dict__),
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
    }
    paths = write_results(args.out, "train_throughput", table, summary, started=started, tables=summarize(table, summary),
                          figure=lambda path: plot(table, path))
    print(json.dumps(summary, indent=2))
    print("wrote", ", ".join(str(path) for path in paths.values()))


def measure(args, work: Path) -> tuple[pd.DataFrame, torch.nn.Module]:
    """Alternating bare and toolkit runs (one row each) and the model they trained."""
    testbed = args.testbed or work / "testbed"
    if args.testbed is None:
        write_testbed(testbed, SynthSettings())
    tokenizer = load_tokenizer(testbed / "tokenizer")
    data = encode(read_splits([testbed / "forget.parquet", testbed / "retain.parquet"]), tokenizer)
    stream = BatchStream(data, args.batch_size, pad_id(tokenizer), seed=0)
    batches = [stream(i) for i in range(args.steps)]
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    model = load_model("tiny:olmo", tokenizer, size=TinySize())
    initial = {k: v.clone() for k, v in model.state_dict().items()}

    rows = []
    for repeat in range(args.repeats):
        for name in ("bare", "toolkit"):
            model.load_state_dict(initial)
            start = time.perf_counter()
            if name == "bare":
                bare_loop(model, batches, 3e-3, 1.0)
            else:
                toolkit_loop(model, batches, 3e-3, 1.0, work / f"run-{repeat}")
            seconds = time.perf_counter() - start
            rows.append({"repeat": repeat, "loop": name, "seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds})
            print(f"repeat {repeat} {name:>7}: {tokens / seconds:,.0f} tokens/s", file=sys.stderr)

    return pd.DataFrame(rows), model


def summarize(table: pd.DataFrame, summary: dict) -> dict:
    """The markdown's table: median tokens/s of each loop and the toolkit / bare ratio."""
    median = table.groupby("loop")["tokens_per_s"].agg(["median", "min", "max"])
    median["over bare (median)"] = median["median"] / median.loc["bare", "median"]
    return {f"Training tokens/s over {summary['repeats']} repeats of {summary['steps']} steps (target: toolkit / bare {summary['target']})": median}


def plot(table: pd.DataFrame, path: Path) -> None:
    from analysis.plots import new_figure, save_figure

    median = table.groupby("loop")["tokens_per_s"].median()
    fig, ax = new_figure((5, 3.2))
    ax.bar(median.index, median.values, color=["#888888", "#2a6f97"])
    for x, value in enumerate(median.values):
        ax.text(x, value, f"{value:,.0f}", ha="center", va="bottom")
    ax.set_ylabel("training tokens / s (median)")
    ax.set_title(f"toolkit loop / bare loop = {median['toolkit'] / median['bare']:.3f}")
    save_figure(fig, path, dpi=120)


if __name__ == "__main__":
    main()
