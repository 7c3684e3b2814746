"""`soir unlearn` for several objectives and batch layouts in one process, or in one `torchrun`
launch (tests/test_batch_layouts.py): process start and imports cost more than the tiny runs,
so every run of a layout family shares them. Each run writes its model to OUT/run_name(...).

    python -m torch.distributed.run --standalone --nproc-per-node 2 -m tests.batch_layouts_driver \
        FILES OUT --layouts 8x1 4x2 --objectives ga npo ...
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

STEPS = 3  # 16 rows in batches of 8: the third step starts the second epoch of both streams


def run_name(objective: str, processes: int, batch_size: int, grad_accum: int) -> str:
    return f"{objective}-p{processes}-b{batch_size}x{grad_accum}"


def unlearn_args(files: Path, out: Path, objective: str, batch_size: int, grad_accum: int) -> list[str]:
    """Plain SGD without clipping: the update is the gradient itself, so any change of its scale
    or of the rows' weights shows in the weights (AdamW's normalisation and the clip would hide a
    common scale)."""
    return ["unlearn", "--model", str(files / "model"), "--dtype", "float64", "--forget", str(files / "forget.parquet"),
            "--retain", str(files / "retain.parquet"), "--mask", str(files / "mask"), "--objective", objective,
            "--steps", str(STEPS), "--batch-size", str(batch_size), "--grad-accum", str(grad_accum), "--optimizer", "sgd",
            "--lr", "0.5", "--max-grad-norm", "0", "--warmup", "0", "--schedule", "constant", "--seed", "3", "--no-progress",
            "--out", str(out)]


def run_layouts(files: Path, out: Path, objectives: Sequence[str], layouts: Sequence[tuple[int, int]]) -> None:
    """Every objective in every (batch size, accumulation) layout, on as many processes as run this."""
    from soir.distributed import init_from_environment, world_size
    from soirlab.cli import main

    init_from_environment()  # `main` would join torchrun's process group; the run names need its size first
    for objective in objectives:
        for batch_size, grad_accum in layouts:
            target = out / run_name(objective, world_size(), batch_size, grad_accum)
            status = main(unlearn_args(files, target, objective, batch_size, grad_accum))
            if status != 0:
                raise SystemExit(f"soir unlearn --objective {objective} --batch-size {batch_size} --grad-accum {grad_accum}: exit {status}")


def parse_layout(text: str) -> tuple[int, int]:
    batch_size, _, grad_accum = text.partition("x")
    return int(batch_size), int(grad_accum)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--layouts", nargs="+", type=parse_layout, required=True, metavar="BxK")
    parser.add_argument("--objectives", nargs="+", required=True)
    args = parser.parse_args()
    run_layouts(args.files, args.out, args.objectives, args.layouts)
