"""Masked unlearning at scale: time per step and peak memory of `soir unlearn` on models built
from config, for the full model against a 10% tensor mask and a 10% element mask, in float32
and in bf16 (float32 masters of the selected entries only, docs/design.md §7), and for LoRA
adapters (`--lora-rank`) on the 10% tensor mask's linear layers or on every linear layer.

Each model is an OLMo with random weights (`1b`: the OLMo-1B shape, hidden 2048, 16 layers,
16 heads, MLP 8192, vocabulary 50304; or HIDDENxLAYERS with a 4·hidden MLP and the testbed's
vocabulary), saved with the testbed tokenizer. Every configuration runs `soir unlearn` (NPO, so
the reference forward is in the step) in a fresh process (a MASK ending in -gc adds
--gradient-checkpointing; `lora` adapts the tensor mask's layers, `lora-all` every linear layer of
the blocks, rank --lora-rank); a baseline process only loads the model
in the same dtype, and "extra" is the run's peak RSS minus the baseline's. Beside it, the bytes
the design predicts beyond the loaded model: gradients + AdamW's two moments of the trained
entries (float32) + their float32 masters when the weights are bf16 or the mask is by element
+ the reference's copy of the selected entries (a full copy for the full model); for LoRA, the
adapters, their gradients and AdamW's two moments (float32, 16 bytes per adapter entry), with no
reference copy (the reference is the model with its adapters off).

    .venv/bin/python benchmarks/unlearn_scale.py                                  # 256x16 fp32 and 1b bf16
    .venv/bin/python benchmarks/unlearn_scale.py --runs 256x16:float32:full,tensor
    .venv/bin/python benchmarks/unlearn_scale.py --steps 3 --runs 256x16:float32:lora,lora-all

Writes unlearn_scale.{csv,json,md,png} through benchmarks/report.py, its rows merged with the results
already in --out by size, dtype and mask (the JSON's `commands` lists every run that made them).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from report import command_line, peak_rss_mb, write_results  # noqa: E402
from unlearn_memory import pick_tensors  # noqa: E402

RUNS = ("256x16:float32:full,tensor,element,element-gc,lora,lora-all", "1b:bfloat16:tensor,element")
LORA_MASKS = {"lora": "tensor", "lora-all": "linear"}  # the mask whose layers get adapters
SHAPES = {"1b": dict(hidden=2048, layers=16, heads=16, intermediate=8192, vocab=50304)}
BYTES = {"float32": 4, "bfloat16": 2}


def shape_of(size: str) -> dict:
    if size in SHAPES:
        return SHAPES[size]
    hidden, layers = (int(x) for x in size.split("x"))
    return dict(hidden=hidden, layers=layers, heads=max(4, hidden // 64), intermediate=4 * hidden, vocab=None)


def build(data: Path, size: str, dtype: str, fraction: float, out: Path) -> dict:
    """Save the model of `size` in `dtype` with the testbed tokenizer, and its tensor, element and linear
    (every 2-D block weight: all linear layers of the blocks) masks."""
    import torch
    from transformers import AutoModelForCausalLM

    from soir.mask import Mask
    from soir.models import TinySize, load_tokenizer, save_model, tiny_config

    shape = shape_of(size)
    tokenizer = load_tokenizer(data / "tokenizer")
    size_settings = TinySize(hidden=shape["hidden"], layers=shape["layers"], heads=shape["heads"], intermediate=shape["intermediate"])
    config = tiny_config("olmo", shape["vocab"] or len(tokenizer), size_settings, tokenizer)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    save_model(model, tokenizer, out / "model")
    Mask.from_names(model, pick_tensors(model, fraction)).save(out / "tensor")
    blocks = [name for name, p in model.named_parameters() if p.dim() == 2 and "embed" not in name and "lm_head" not in name]
    Mask.from_names(model, blocks).save(out / "linear")
    generator = torch.Generator().manual_seed(0)
    rows = {name: torch.rand(p.shape[0], 1, generator=generator) < fraction
            for name, p in model.named_parameters() if p.dim() == 2 and "embed" not in name and "lm_head" not in name}
    Mask.from_selection(model, (), rows).save(out / "element")
    return {"n_params": sum(p.numel() for p in model.parameters())}


def load_only(model_dir: Path, dtype: str) -> None:
    """The baseline: the process, the imports and the loaded model."""
    from soir.models import load_model, load_tokenizer

    load_model(model_dir, load_tokenizer(model_dir), dtype=dtype)


def run(data: Path, size: str, dtype: str, masks: list[str], args, work: Path) -> list[dict]:
    from soir.mask import load as load_mask

    here = work / f"{size}-{dtype}"
    info = json.loads(subprocess.check_output([sys.executable, __file__, "--build", str(here), "--data", str(data), "--size", size,
                                               "--dtype", dtype, "--fraction", str(args.fraction)]))
    base_rss, _ = peak_rss_mb([sys.executable, __file__, "--load-only", str(here / "model"), "--dtype", dtype])
    rows = []
    for spec in masks:
        kind, checkpointing = spec.removesuffix("-gc"), spec.endswith("-gc")
        mask_dir = LORA_MASKS.get(kind, kind)
        out = here / f"out-{spec}"
        command = [str(Path(sys.executable).with_name("soir")), "unlearn", "--model", str(here / "model"), "--dtype", dtype,
                   "--forget", str(data / "forget.parquet"), "--retain", str(data / "retain.parquet"), "--objective", "npo",
                   "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--lr", "1e-5", "--warmup", "0",
                   "--no-progress", "--out", str(out)]
        if kind != "full":
            command += ["--mask", str(here / mask_dir)]
        if kind in LORA_MASKS:
            command += ["--lora-rank", str(args.lora_rank)]
        if checkpointing:
            command.append("--gradient-checkpointing")
        try:
            rss, wall = peak_rss_mb(command)
        except RuntimeError as error:  # e.g. killed for memory: a run that does not fit is a result, not a crash
            rows.append({"size": size, "dtype": dtype, "mask": spec, "n_params": info["n_params"], "steps": args.steps,
                         "batch_size": args.batch_size, "baseline_rss_mib": round(base_rss), "status": "failed: " + str(error).rsplit(" failed with ", 1)[-1]})
            print(f"{size} {dtype} {spec}: {rows[-1]['status']}", file=sys.stderr)
            continue
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        seconds = [r["seconds"] for r in log]
        n = info["n_params"]
        selected = n if kind == "full" else load_mask(here / mask_dir).n_selected
        master = dtype != "float32" or kind == "element"
        weight = BYTES[dtype]
        predicted = selected * 4 * (3 + master) + selected * weight * (kind != "full") + n * weight * (kind == "full")
        trained = selected
        if kind in LORA_MASKS:  # float32 adapters + gradients + two moments; no reference copy
            trained = json.loads((out / "lora.json").read_text())["n_adapter_params"]
            predicted = trained * 4 * 4
        rows.append({
            "size": size, "dtype": dtype, "mask": spec, "n_params": n, "n_selected": selected, "fraction": round(selected / n, 4),
            "n_trained": trained, "lora_rank": args.lora_rank if kind in LORA_MASKS else 0, "steps": args.steps, "batch_size": args.batch_size,
            "seconds_per_step": round((seconds[-1] - seconds[0]) / max(1, len(seconds) - 1), 3), "first_step_s": seconds[0],
            "wall_s": round(wall, 1), "model_mib": round(n * weight / 2**20), "baseline_rss_mib": round(base_rss), "peak_rss_mib": round(rss),
            "extra_rss_mib": round(rss - base_rss), "predicted_extra_mib_without_activations": round(predicted / 2**20), "status": "ok",
        })
        print(f"{size} {dtype} {spec}: {rows[-1]['seconds_per_step']} s/step, extra {rows[-1]['extra_rss_mib']} MiB "
              f"(predicted without activations {rows[-1]['predicted_extra_mib_without_activations']})", file=sys.stderr)
    return rows


def summarize(table) -> dict:
    """The markdown's table: time per step and memory beyond the loaded model of every run."""
    columns = ["n_params", "fraction", "n_trained", "lora_rank", "seconds_per_step", "extra_rss_mib", "predicted_extra_mib_without_activations", "status"]
    return {"soir unlearn (NPO): seconds per step and peak RSS beyond the loaded model (MiB)":
            table.set_index(["size", "dtype", "mask"])[[c for c in columns if c in table]]}


def plot(table, path: Path) -> None:
    from analysis.plots import new_figure, save_figure

    labels = [f"{r['size']} {r['dtype']} {r['mask']}" + (f" r{int(r['lora_rank'])}" if r.get("lora_rank", 0) > 0 else "")
              + (f"\n{r['status']}" if isinstance(r.get("status"), str) and r["status"] != "ok" else "") for _, r in table.iterrows()]
    fig, (memory, time) = new_figure((11, 5.2), 2)
    x = range(len(table))
    memory.bar([i - 0.2 for i in x], table["extra_rss_mib"] / 1024, width=0.4, label="measured peak RSS beyond the loaded model")
    memory.bar([i + 0.2 for i in x], table["predicted_extra_mib_without_activations"] / 1024, width=0.4,
               label="predicted: grads + AdamW + masters + reference (LoRA: adapters + grads + AdamW)")
    memory.set_xticks(list(x), labels, fontsize=6, rotation=60, ha="right")
    memory.set_ylabel("GiB")
    memory.legend(fontsize=7, loc="upper left")
    memory.set_title("memory of masked NPO unlearning")
    time.bar(list(x), table["seconds_per_step"])
    time.set_xticks(list(x), labels, fontsize=6, rotation=60, ha="right")
    time.set_ylabel("seconds per step (2 CPU cores)")
    time.set_title("time per step")
    save_figure(fig, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", default=list(RUNS), help="SIZE:DTYPE:MASK,MASK… with SIZE 1b or HIDDENxLAYERS, MASK full, tensor, "
                                                                  "element, lora or lora-all, with -gc for --gradient-checkpointing")
    p.add_argument("--lora-rank", type=int, default=8, help="the rank of the lora rows")
    p.add_argument("--data", type=Path, default=ROOT / "demo-out" / "data", help="a testbed data directory (forget/retain parquet + tokenizer/)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--build", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--size", help=argparse.SUPPRESS)
    p.add_argument("--dtype", help=argparse.SUPPRESS)
    p.add_argument("--load-only", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.build:
        print(json.dumps(build(args.data, args.size, args.dtype, args.fraction, args.build)))
        return
    if args.load_only:
        load_only(args.load_only, args.dtype)
        return

    import pandas as pd

    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="soir-unlearn-scale-") as work:
        for spec in args.runs:
            size, dtype, masks = spec.split(":")
            rows += run(args.data, size, dtype, masks.split(","), args, Path(work))
    table = pd.DataFrame(rows)
    csv, previous = args.out / "unlearn_scale.csv", args.out / "unlearn_scale.json"
    commands = []
    if csv.exists():
        old = pd.read_csv(csv)
        keys = ["size", "dtype", "mask"]
        old = old[~old.set_index(keys).index.isin(table.set_index(keys).index)]
        table = pd.concat([old, table], ignore_index=True)
        commands = json.loads(previous.read_text()).get("commands", []) if previous.exists() else []
    meta = {"commands": [*commands, command_line()], "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, 2 threads",
            "rows": table.to_dict(orient="records")}
    paths = write_results(args.out, "unlearn_scale", table, meta, started=started, tables=summarize(table), figure=lambda path: plot(table, path))
    print(table.to_string(index=False))
    print("wrote", ", ".join(str(path) for path in paths.values()))


if __name__ == "__main__":
    main()
