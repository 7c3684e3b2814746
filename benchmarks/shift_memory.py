"""Peak memory of `soir shift` on two sharded checkpoints of a ~250M-parameter OLMo-shaped model.

`soir shift` streams both checkpoints tensor by tensor, so what its peak memory adds for a large
model should be about one tensor of each (plus the SVD's workspace), whatever the checkpoint size.
This builds a random-init base model from config and a "finetuned" one (every tensor perturbed, some
by a low-rank change), saves both in shards (`--shard-size`), runs `soir shift` on them in a fresh
process, and reports its peak RSS against the checkpoint size, the largest tensor, a process that
only imports torch and transformers, and the same command on a tiny pair of checkpoints (its fixed
cost: imports, the model built on the meta device, the figure).

    python benchmarks/shift_memory.py --out benchmarks/results

Writes shift_memory.{csv,json,md,png} through benchmarks/report.py.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from report import peak_rss_mb, write_results  # noqa: E402


def build(directory: Path, hidden: int, layers: int, intermediate: int, vocab: int, shard: str) -> dict:
    """Save base/ and finetuned/ under `directory`; return the model's size."""
    import torch
    from transformers import OlmoConfig, OlmoForCausalLM

    config = OlmoConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                        num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = OlmoForCausalLM(config)
    model.save_pretrained(directory / "base", safe_serialization=True, max_shard_size=shard)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 1e-3)
            if p.dim() == 2 and "mlp" in name:
                p.add_(torch.outer(torch.randn(p.shape[0], generator=generator), torch.randn(p.shape[1], generator=generator)) * 1e-3)
    model.save_pretrained(directory / "finetuned", safe_serialization=True, max_shard_size=shard)
    largest = max(p.numel() for p in model.parameters())
    return {"n_params": sum(p.numel() for p in model.parameters()), "largest_tensor_params": largest, "dtype": "float32"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=9)
    p.add_argument("--intermediate", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--shard-size", default="200MB")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--build", type=Path, help=argparse.SUPPRESS)  # internal: build the checkpoints into this directory
    args = p.parse_args()
    if args.build:
        size = build(args.build, args.hidden, args.layers, args.intermediate, args.vocab, args.shard_size)
        (args.build / "size.json").write_text(json.dumps(size))
        return

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="soir-shift-bench-") as tmp:
        tmp = Path(tmp)
        # build in another process: a forked child starts with its parent's RSS, so the parent stays small
        start = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--build", str(tmp), "--hidden", str(args.hidden), "--layers", str(args.layers),
                        "--intermediate", str(args.intermediate), "--vocab", str(args.vocab), "--shard-size", args.shard_size],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        build_seconds = time.perf_counter() - start
        size = json.loads((tmp / "size.json").read_text())
        shards = len(list((tmp / "finetuned").glob("model-*-of-*.safetensors")))
        checkpoint_mb = sum(f.stat().st_size for f in (tmp / "finetuned").glob("*.safetensors")) / 2**20
        baseline_mb, _ = peak_rss_mb([sys.executable, "-c", "import torch, transformers, pandas, scipy"])
        subprocess.run([sys.executable, __file__, "--build", str(tmp / "tiny"), "--hidden", "64", "--layers", "2", "--intermediate", "256",
                        "--vocab", "1024", "--shard-size", args.shard_size], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        fixed_mb, _ = peak_rss_mb([sys.executable, "-m", "soirlab.cli", "shift", "--base", str(tmp / "tiny" / "base"),
                                   "--finetuned", str(tmp / "tiny" / "finetuned"), "--out", str(tmp / "tiny" / "shift"), "--no-progress"])
        shift_mb, seconds = peak_rss_mb([sys.executable, "-m", "soirlab.cli", "shift", "--base", str(tmp / "base"),
                                         "--finetuned", str(tmp / "finetuned"), "--out", str(tmp / "shift"), "--no-progress"])
    largest_mb = size["largest_tensor_params"] * 4 / 2**20
    result = {
        "model": {"hidden": args.hidden, "layers": args.layers, "intermediate": args.intermediate, "vocab": args.vocab, **size},
        "shards_per_checkpoint": shards, "checkpoint_mb": round(checkpoint_mb, 1), "largest_tensor_mb": round(largest_mb, 1),
        "import_only_peak_rss_mb": round(baseline_mb, 1), "shift_tiny_model_peak_rss_mb": round(fixed_mb, 1),
        "shift_peak_rss_mb": round(shift_mb, 1),
        "shift_above_tiny_mb": round(shift_mb - fixed_mb, 1),
        "above_tiny_in_largest_tensors": round((shift_mb - fixed_mb) / largest_mb, 2),
        "above_tiny_over_both_checkpoints": round((shift_mb - fixed_mb) / (2 * checkpoint_mb), 3),
        "shift_seconds": round(seconds, 1), "build_seconds": round(build_seconds, 1), "threads": 2,
    }
    import pandas as pd

    rows = pd.DataFrame([{"what": "one checkpoint on disk", "mb": checkpoint_mb}, {"what": "both checkpoints on disk", "mb": 2 * checkpoint_mb},
                         {"what": "import torch + transformers (peak RSS)", "mb": baseline_mb},
                         {"what": "soir shift, tiny checkpoints (peak RSS)", "mb": fixed_mb}, {"what": "soir shift (peak RSS)", "mb": shift_mb},
                         {"what": "largest tensor (fp32)", "mb": largest_mb}])
    paths = write_results(args.out, "shift_memory", rows, result, started=started, tables=summarize(rows, result),
                          figure=lambda path: plot(rows, result, path))
    print(json.dumps(result, indent=2))
    print("wrote", ", ".join(str(path) for path in paths.values()))


def title(result: dict) -> str:
    return f"soir shift on two {result['model']['n_params'] / 1e6:.0f}M-parameter checkpoints ({result['shards_per_checkpoint']} shards each)"


def summarize(rows, result: dict) -> dict:
    """The markdown's table: the rows, in MiB."""
    return {f"{title(result)}, MiB": rows.set_index("what")}


def plot(rows, result: dict, path: Path) -> None:
    from analysis.plots import new_figure, save_figure

    fig, ax = new_figure((7, 3.2))
    ax.barh(rows["what"], rows["mb"], color=["#999", "#bbb", "#6a9", "#8bd", "#36c", "#c63"])
    ax.set_xlabel("MiB")
    ax.set_title(title(result))
    ax.invert_yaxis()
    save_figure(fig, path)


if __name__ == "__main__":
    main()
