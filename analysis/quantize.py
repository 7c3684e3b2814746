"""The quantization probe (docs/design.md §8, robustness probes): does forgetting survive rounding the weights?

Unlearning that holds only at full precision is not unlearning: an unlearned model is often
deployed quantized, and small weight changes that hide the forget set can be rounded away,
bringing the finetuned knowledge back (Zhang et al., "Catastrophic failure of LLM unlearning
via quantization", 2024). The probe measures forget and retain metrics at full precision, rounds
the weights, and measures again.

Rounding (`quantize_tensor`): weight-only, symmetric, round-to-nearest, one scale per output
channel: scale = max|w| over the channel / (2^(bits-1) - 1), q = clamp(round(w / scale),
-(2^(bits-1) - 1), 2^(bits-1) - 1), w' = q * scale (ties round to even, as `torch.round`; an
all-zero channel stays zero). The output channel is a row of an `nn.Linear` weight (out, in), a
column of GPT-2's `Conv1D` weight (stored (in, out)), a row of an embedding (one token, which
is also the output channel of a tied head), and the first axis of any other tensor.

Which tensors (`quantize_plan`): every floating parameter with two or more dimensions, a tied
tensor once. One-dimensional parameters (norm weights, biases) stay at full precision, as in
every weight-only scheme (bitsandbytes, GPTQ, AWQ): they are a tiny share of the parameters and
a per-channel scale of a vector would be the vector itself. Input embeddings and the output head
are rounded too, unless `keep_embeddings` (bitsandbytes and GPTQ leave them at full precision).

Metrics on each split, before and after: teacher-forced answer-token accuracy (pooled),
answer probability and loss, and unless `generate` is off, QA exact match (knowledge),
ROUGE-L recall on completion rows (regurgitation) and over all rows. `change` is after - before.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import pandas as pd
import torch
from torch import nn

from analysis.evaluate import probe_metrics, probe_settings
from soir.data import Template
from soir.settings import check_fields, setting

BITS = (8, 4)
METRICS = ("accuracy", "probability", "loss", "knowledge", "regurgitation", "rouge_l_recall")
SPLITS = ("forget", "retain")


@dataclass(frozen=True)
class QuantizeSettings:
    """The probe: round to `bits` (8 or 4) per output channel, then measure forget and retain again.

    keep_embeddings: leave embeddings and head at full precision. generate=False measures
    teacher-forced metrics only (accuracy, probability, loss; no exact match or ROUGE).
    """

    bits: int = setting(8, "bits per weight (symmetric, per output channel, round to nearest)", choices=BITS)
    keep_embeddings: bool = setting(False, "leave the input embeddings and the output head at full precision (as bitsandbytes and GPTQ do)")
    generate: bool = setting(True, "greedy generation for QA exact match and ROUGE-L recall (--no-generate: teacher-forced metrics only)")
    max_new_tokens: int = setting(64, "generated tokens per row when measuring", minimum=1)
    batch_size: int = setting(16, "rows per forward pass when measuring", minimum=1)
    template: str = Template().text
    max_length: int = 256
    progress: bool = True

    def __post_init__(self):
        check_fields(self)


# ---------------------------------------------------------------- rounding


def quantize_tensor(weight: torch.Tensor, bits: int, axis: int = 0) -> torch.Tensor:
    """`weight` rounded symmetrically to `bits` per channel along `axis` and scaled back (a new tensor).

    Worked in float64 for float64 weights, float32 otherwise; returned in the weight's dtype.
    """
    if bits < 2:
        raise ValueError(f"bits must be at least 2, got {bits}")
    if weight.dim() < 1:
        raise ValueError("quantize_tensor needs a tensor with at least one dimension")
    qmax = 2 ** (bits - 1) - 1
    work = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = weight.detach().to(work)
    axis = axis % w.dim()
    others = [d for d in range(w.dim()) if d != axis]
    scale = w.abs().amax(dim=others, keepdim=True) / qmax if others else w.abs() / qmax
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero channel: q = 0
    q = torch.clamp(torch.round(w / safe), -qmax, qmax)
    return (q * scale).to(weight.dtype)


def quantize_plan(model: nn.Module, keep_embeddings: bool = False) -> tuple[list[tuple[str, nn.Parameter, int]], list[str]]:
    """(name, parameter, output-channel axis) of every tensor the probe rounds, and the names of
    the floating parameters it leaves at full precision (see the module docstring)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    seen: set[int] = set()
    plan, kept = [], []
    for module_name, module in model.named_modules():
        embedding = isinstance(module, nn.Embedding) or (head is not None and module is head)
        for name, parameter in module.named_parameters(recurse=False):
            if id(parameter) in seen or not parameter.is_floating_point():
                continue
            seen.add(id(parameter))
            full = f"{module_name}.{name}" if module_name else name
            if parameter.dim() < 2 or (embedding and keep_embeddings):
                kept.append(full)
                continue
            axis = 1 if type(module).__name__ == "Conv1D" and name == "weight" else 0  # GPT-2 stores (in, out)
            plan.append((full, parameter, axis))
    return plan, kept


def quantize_model_(model: nn.Module, bits: int, keep_embeddings: bool = False) -> dict:
    """Round the model's weights IN PLACE (`quantize_plan`, `quantize_tensor`); return a summary:
    tensors and parameters rounded, the tensors kept, and the relative L2 change of the rounded ones."""
    plan, kept = quantize_plan(model, keep_embeddings)
    changed = total = 0.0
    n_params = 0
    with torch.no_grad():
        for _, parameter, axis in plan:
            rounded = quantize_tensor(parameter, bits, axis)
            changed += float((rounded.double() - parameter.double()).square().sum())
            total += float(parameter.double().square().sum())
            n_params += parameter.numel()
            parameter.copy_(rounded)
    return {"bits": bits, "tensors": len(plan), "parameters": n_params, "rounded": [name for name, _, _ in plan],
            "kept": kept, "relative_change": math.sqrt(changed / total) if total > 0 else 0.0}


@contextlib.contextmanager
def quantized(model: nn.Module, bits: int, keep_embeddings: bool = False) -> Iterator[dict]:
    """Run with the model's weights rounded (`quantize_model_`); afterwards every rounded tensor is
    restored bit for bit from a CPU copy, even when the body raises. Yields the summary."""
    plan, _ = quantize_plan(model, keep_embeddings)
    originals = [(parameter, parameter.detach().to("cpu", copy=True)) for _, parameter, _ in plan]
    try:
        yield quantize_model_(model, bits, keep_embeddings)
    finally:
        with torch.no_grad():
            for parameter, original in originals:
                parameter.copy_(original)


# ---------------------------------------------------------------- the probe


def split_metrics(model, tokenizer, frame: pd.DataFrame, settings: QuantizeSettings, name: str) -> dict[str, float | None]:
    """The probe's metrics of `model` on one split (`analysis.evaluate.probe_metrics`)."""
    evaluation = probe_settings(settings.template, settings.max_length, settings.max_new_tokens, settings.batch_size,
                                settings.generate, settings.progress)
    metrics = probe_metrics(model, tokenizer, frame, evaluation, name)
    return {k: metrics[k] for k in METRICS}


def _measure(model, tokenizer, splits: dict[str, pd.DataFrame], settings: QuantizeSettings) -> dict:
    return {name: split_metrics(model, tokenizer, frame, settings, name) for name, frame in splits.items()}


def quantize_probe(model, tokenizer, forget: pd.DataFrame, retain: pd.DataFrame, settings: QuantizeSettings = QuantizeSettings(),
                   *, restore: bool = True) -> dict:
    """Forget and retain metrics at full precision and after rounding the weights to `settings.bits`.

    restore=True (the default) gives the model back with its weights bit for bit as they were
    (`quantized`); restore=False leaves it rounded and saves the CPU copy of its weights (the
    command line, which discards the model afterwards). Returns a JSON-ready dict: settings,
    quantized (the rounding summary), before, after, change (after - before), each per split.
    """
    splits = {"forget": forget, "retain": retain}
    before = _measure(model, tokenizer, splits, settings)
    if restore:
        with quantized(model, settings.bits, settings.keep_embeddings) as summary:
            after = _measure(model, tokenizer, splits, settings)
    else:
        summary = quantize_model_(model, settings.bits, settings.keep_embeddings)
        after = _measure(model, tokenizer, splits, settings)
    change = {split: {k: (after[split][k] - before[split][k]) if before[split][k] is not None and after[split][k] is not None else None
                      for k in METRICS} for split in SPLITS}
    return {"settings": asdict(settings), "quantized": summary, "before": before, "after": after, "change": change}


def summary_table(result: dict) -> pd.DataFrame:
    """Full precision / quantized / change of each metric on forget and retain."""
    rows = []
    for split in SPLITS:
        for metric in METRICS:
            rows.append({"split": split, "metric": metric, "full": result["before"][split][metric],
                         f"{result['quantized']['bits']}-bit": result["after"][split][metric], "change": result["change"][split][metric]})
    return pd.DataFrame(rows)
