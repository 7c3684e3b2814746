"""Peak memory and time per step of KL unlearning (docs/design.md §7), three ways:

  (a) full     every parameter trained; the reference is a full copy of the model (CopyReference)
  (b) copy     a ~10% tensor mask, but still a full copy of the model as reference
  (c) swap     the same mask with the swapped reference (SwapReference: a copy of the selected tensors only)

Each configuration runs in a fresh subprocess, and so does a baseline that only loads the
model and the data, so the numbers are "peak RSS of the run minus peak RSS of the baseline"
(torch's CPU allocations are invisible to tracemalloc; ru_maxrss sees them). On CUDA the
peak of torch.cuda.max_memory_allocated over the model's footprint is reported instead.
Next to the measurements, the analytic byte counts: the model (P), the selected tensors (S),
gradients, AdamW state (2 × trained), the reference copy (P or S).

Target: (c) ≤ model + 4·S + activations (grads S + Adam 2S + reference S), far less than (b).

The testbed model is tiny (~0.8M parameters), so activations dominate its numbers; the
script also measures a wider tiny:olmo (random init, the testbed tokenizer; --hidden/--layers)
where the parameter memory is visible.

    .venv/bin/python benchmarks/unlearn_memory.py                      # testbed model + hidden 512 × 8 layers
    .venv/bin/python benchmarks/unlearn_memory.py --sizes testbed      # the testbed model only

Writes unlearn_memory.{csv,json,md,png} through benchmarks/report.py.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from report import write_results  # noqa: E402

CONFIGS = ("baseline", "grads", "full", "copy", "swap")
LABELS = {"full": "(a) full model, copy reference", "copy": "(b) 10% mask, full copy reference", "swap": "(c) 10% mask, swapped reference"}


# ---------------------------------------------------------------- worker (one configuration per process)


def pick_tensors(model, fraction: float) -> list[str]:
    """Whole 2-D block tensors (no embeddings), last layer first, added while they bring the total closer to fraction × all."""
    named = list(model.named_parameters())
    total = sum(p.numel() for _, p in named)
    budget = fraction * total
    candidates = [(n, p.numel()) for n, p in named if p.dim() == 2 and "embed" not in n and "lm_head" not in n and "wte" not in n]

    def layer(name):
        parts = [int(x) for x in name.split(".") if x.isdigit()]
        return parts[0] if parts else -1

    candidates.sort(key=lambda item: (-layer(item[0]), -item[1]))
    chosen, size = [], 0
    for name, n in candidates:
        if abs(size + n - budget) < abs(size - budget):
            chosen.append(name)
            size += n
    return chosen


def worker(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from soir.data import BatchStream, encode, pad_id, read_splits
    from soir.mask import Mask
    from soir.models import TinySize, load_model, load_tokenizer
    from unlearn.loop import Trainer, TrainSettings
    from unlearn.masking import MaskedParameters
    from unlearn.objectives import ObjectiveSettings, get_objective
    from unlearn.reference import CopyReference, SwapReference

    tokenizer = load_tokenizer(args.model)
    if args.size == "testbed":
        model = load_model(args.model, tokenizer, dtype="float32", device=args.device)
    else:
        hidden, layers = (int(x) for x in args.size.split("x"))
        heads = max(1, hidden // 64)
        model = load_model("tiny:olmo", tokenizer, dtype="float32", device=args.device, size=TinySize(hidden, layers, heads, 4 * hidden, 256))
    data = Path(args.data)
    pad = pad_id(tokenizer)
    forget = BatchStream(encode(read_splits([data / "forget.parquet"]), tokenizer), args.batch_size, pad, seed=0)
    retain = BatchStream(encode(read_splits([data / "retain.parquet"]), tokenizer), args.batch_size, pad, seed=1)
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    loaded = torch.cuda.memory_allocated() if cuda else 0

    element = next(model.parameters()).element_size()
    n_params = sum(p.numel() for p in model.parameters())
    row = {"size": args.size, "config": args.config, "n_params": n_params, "bytes_per_param": element, "batch_size": args.batch_size}
    objective = get_objective("kl", ObjectiveSettings(w_forget=1.0, w_kl=1.0))

    def on_device(stream):
        return lambda i: {k: v.to(device) for k, v in stream(i).items()}

    if args.config == "grads":
        # activations + gradients of the selected tensors only: the same forward/backward passes
        # (a "reference" sharing the live tensors, no copy), no optimiser, no reference copy
        mask = Mask.from_names(model, pick_tensors(model, args.fraction))
        masked = MaskedParameters(model, mask)
        shared = SwapReference(model, mask.names, {n: p.detach() for n, p in masked.named_parameters()})
        streams = {"forget": on_device(forget), "retain": on_device(retain)}
        for step in range(args.steps):
            loss, _ = objective(model, {k: f(step) for k, f in streams.items()}, shared)
            loss.backward()
            if step < args.steps - 1:
                model.zero_grad(set_to_none=True)
        row.update({"n_selected": mask.n_selected, "fraction": mask.n_selected / n_params, "model_bytes": n_params * element,
                    "selected_bytes": mask.n_selected * element, "grad_bytes": mask.n_selected * element,
                    "analytic_extra_bytes": mask.n_selected * element})
    elif args.config != "baseline":
        mask = Mask.full(model) if args.config == "full" else Mask.from_names(model, pick_tensors(model, args.fraction))
        masked = MaskedParameters(model, mask)
        reference = SwapReference(model, mask.names) if args.config == "swap" else CopyReference(model)

        settings = TrainSettings(steps=args.steps, lr=1e-4, weight_decay=0.01, warmup=0, progress=False)
        with tempfile.TemporaryDirectory() as out:
            trainer = Trainer(model, objective, {"forget": on_device(forget), "retain": on_device(retain)}, settings, out,
                              parameters=dict(masked.named_parameters()), reference=reference)
            trainer.train()
            log = [json.loads(line) for line in Path(out, "log.jsonl").read_text().splitlines()]
        seconds = [r["seconds"] for r in log]
        selected = mask.n_selected
        row.update({
            "n_selected": selected,
            "fraction": selected / n_params,
            "seconds_per_step": (seconds[-1] - seconds[0]) / max(1, len(seconds) - 1),
            "first_step_seconds": seconds[0],
            "reference": type(reference).__name__,
        })
        # analytic bytes beyond the loaded model: gradients + AdamW state of the trained tensors, the reference copy
        trained = selected * element
        copy_bytes = n_params * element if args.config in ("full", "copy") else selected * element
        row.update({
            "model_bytes": n_params * element,
            "selected_bytes": trained,
            "grad_bytes": trained,
            "optimizer_bytes": 2 * trained,
            "reference_bytes": copy_bytes,
            "analytic_extra_bytes": 3 * trained + copy_bytes,
        })
    row["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    if cuda:
        torch.cuda.synchronize()
        row["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
        row["cuda_loaded_bytes"] = loaded
    return row


# ---------------------------------------------------------------- driver


def run_config(args, size: str, config: str) -> dict:
    command = [sys.executable, __file__, "--worker", config, "--size", size, "--model", args.model, "--data", args.data,
               "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--fraction", str(args.fraction),
               "--threads", str(args.threads), "--device", args.device]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        sys.exit(f"{size}/{config} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="/tmp/demo-default/finetuned", help="the testbed's finetuned model (default: %(default)s)")
    p.add_argument("--data", default="/tmp/demo-default/data", help="directory with forget.parquet and retain.parquet (default: %(default)s)")
    p.add_argument("--sizes", default="testbed,512x8", help="comma list: testbed (the model itself) and/or HIDDENxLAYERS tiny:olmo models (default: %(default)s)")
    p.add_argument("--hidden", type=int, help="shorthand: add a HIDDENxLAYERS size (with --layers)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--steps", type=int, default=6, help="steps per configuration; time per step excludes the first (default: 6)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--fraction", type=float, default=0.1, help="mask size as a fraction of parameters (default: 0.1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (default: 1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="where unlearn_memory.{csv,json,md,png} go")
    p.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    p.add_argument("--size", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        args.config = args.worker
        print(json.dumps(worker(args)))
        return 0

    import pandas as pd

    started = time.perf_counter()
    sizes = [s for s in args.sizes.split(",") if s]
    if args.hidden:
        sizes.append(f"{args.hidden}x{args.layers}")
    rows = []
    for size in sizes:
        base = run_config(args, size, "baseline")
        for config in CONFIGS[1:]:
            run_started = time.perf_counter()
            row = run_config(args, size, config)
            row["wall_seconds"] = round(time.perf_counter() - run_started, 1)
            row["baseline_rss_bytes"] = base["peak_rss_bytes"]
            row["extra_rss_bytes"] = row["peak_rss_bytes"] - base["peak_rss_bytes"]
            if "cuda_peak_bytes" in row:
                row["extra_cuda_bytes"] = row["cuda_peak_bytes"] - row["cuda_loaded_bytes"]
            rows.append(row)
            print(f"{size:>8} {config:>5}: extra {row['extra_rss_bytes'] / 2**20:8.1f} MiB, {row.get('seconds_per_step', float('nan')):.3f} s/step", file=sys.stderr)
    table = pd.DataFrame(rows)
    extra = "extra_cuda_bytes" if "extra_cuda_bytes" in table else "extra_rss_bytes"
    # activations of the masked runs: the `grads` run (forward/backward only) minus its gradients;
    # target of a masked run = model + 4 × selected (grads, Adam's two moments, the reference copy) + activations
    table["measured_total_bytes"] = table["model_bytes"] + table[extra]
    for size in sizes:
        here = table["size"] == size
        grads = table[here & (table["config"] == "grads")].iloc[0]
        activations = max(0, grads[extra] - grads["grad_bytes"])
        masked = here & table["config"].isin(["copy", "swap"])
        table.loc[here, "activation_estimate_bytes"] = activations
        table.loc[masked, "target_bytes"] = table.loc[masked, "model_bytes"] + 4 * table.loc[masked, "selected_bytes"] + activations
    table["meets_target"] = table["measured_total_bytes"] <= table["target_bytes"]
    meta = {"steps": args.steps, "batch_size": args.batch_size, "threads": args.threads, "device": args.device, "measure": extra,
            "rows": table.to_dict(orient="records")}
    tables = summarize(table, meta)
    paths = write_results(args.out, "unlearn_memory", table, meta, started=started, tables=tables, figure=lambda path: plot(table, extra, path))

    mib = lambda b: "" if b != b else f"{b / 2**20:.1f}"
    print(next(iter(tables.values())).round(3).to_string())
    for size in sizes:
        by = table[table["size"] == size].set_index("config")
        b, c = by.loc["copy", extra], by.loc["swap", extra]
        print(f"{size}: (c) swap uses {mib(b - c)} MiB less than (b) copy beyond the model (analytic: model − selected = "
              f"{mib(by.loc['copy', 'reference_bytes'] - by.loc['swap', 'reference_bytes'])} MiB); "
              f"(c) total {mib(by.loc['swap', 'measured_total_bytes'])} MiB vs target model + 4×selected + activations "
              f"{mib(by.loc['swap', 'target_bytes'])} MiB ({by.loc['swap', 'measured_total_bytes'] / by.loc['swap', 'target_bytes']:.1%}; "
              f"AdamW's per-tensor temporaries and allocator slack are not in the target)")
    print("wrote", ", ".join(str(path) for path in paths.values()))
    return 0


def summarize(table, meta: dict) -> dict:
    """The markdown's table: per size and configuration, measured and analytic MiB beyond the model, the target, s/step."""
    mib = 2**20
    shown = {"params": table["n_params"], "selected": table["n_selected"], "extra MiB (measured)": table[meta["measure"]] / mib,
             "extra MiB (analytic, no activations)": table["analytic_extra_bytes"] / mib, "reference MiB": table["reference_bytes"] / mib,
             "target total MiB": table["target_bytes"] / mib, "measured total MiB": table["measured_total_bytes"] / mib,
             "s/step": table["seconds_per_step"]}
    frame = table[["size", "config"]].assign(**shown).set_index(["size", "config"])
    return {f"KL unlearning, {meta['steps']} steps of batch {meta['batch_size']} ({meta['measure']} over a process that only loads)": frame}


def plot(table, extra: str, path: Path) -> None:
    from analysis.plots import new_figure, save_figure

    sizes = list(dict.fromkeys(table["size"]))
    fig, axes = new_figure((5.5 * len(sizes), 4), len(sizes), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        part = table[table["size"] == size].set_index("config").loc[list(LABELS)]
        x = range(len(part))
        measured = part[extra] / 2**20
        analytic = part["analytic_extra_bytes"] / 2**20
        ax.bar([i - 0.2 for i in x], measured, width=0.4, label="measured (over loaded model)")
        ax.bar([i + 0.2 for i in x], analytic, width=0.4, label="analytic: grads + Adam + reference")
        ax.set_xticks(list(x), ["(a) full", "(b) mask+copy", "(c) mask+swap"])
        ax.set_ylabel("MiB")
        params = int(part["n_params"].iloc[0])
        ax.set_title(f"{size}: {params / 1e6:.1f}M params, mask {part['fraction'].iloc[1]:.0%}")
        for i, (cfg, s) in enumerate(part["seconds_per_step"].items()):
            ax.annotate(f"{s:.2f} s/step", (i, max(measured.iloc[i], analytic.iloc[i])), ha="center", va="bottom", fontsize=8)
        ax.legend(fontsize=8)
    fig.suptitle("KL unlearning: peak memory beyond the model")
    save_figure(fig, path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
