"""Figures people can read: titles, labelled axes with units, legends, colour bars.

Each function takes the table a stage wrote and returns a matplotlib `Figure` built without
pyplot (no global state, no interactive backend: it works in scripts, tests and notebooks
alike, where a returned figure displays itself); `save_figure` writes one atomically as PNG
(150 dpi, tight bounding box).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure

ROLE_ORDER = ("q", "k", "v", "qkv", "o", "gate", "up", "down", "attn_norm", "mlp_norm", "attn_post_norm", "mlp_post_norm")


class ShownFigure(Figure):
    """A Figure that shows itself as a PNG in notebooks (`_repr_png_`), whatever the backend."""

    def _repr_png_(self) -> bytes:
        return to_png(self)


def new_figure(figsize, ncols: int = 1, nrows: int = 1, **options):
    """(figure, axes) without pyplot."""
    figure = ShownFigure(figsize=figsize, layout="constrained")
    return figure, figure.subplots(nrows, ncols, **options)


def to_png(figure, dpi: int = 150) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return buffer.getvalue()


def save_figure(figure, path: str | Path, dpi: int = 150) -> Path:
    from soir.io import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(to_png(figure, dpi))
    return path


def _role_order(roles) -> list[str]:
    roles = list(dict.fromkeys(roles))
    return [r for r in ROLE_ORDER if r in roles] + sorted(r for r in roles if r not in ROLE_ORDER)


def shift_heatmap(table: pd.DataFrame, value: str = "relative_l2"):
    """Layers × roles of the finetuning shift (`soir shift`'s layer_role rows)."""
    cells = table[table["level"] == "layer_role"]
    grid = cells.pivot_table(index="layer", columns="role", values=value, aggfunc="first")
    grid = grid[_role_order(grid.columns)].sort_index()
    fig, ax = new_figure((1.0 + 0.75 * grid.shape[1], 1.2 + 0.45 * grid.shape[0]))
    image = ax.imshow(grid.to_numpy(dtype=float), aspect="auto", cmap="viridis")
    ax.set_xticks(range(grid.shape[1]), grid.columns, rotation=45, ha="right")
    ax.set_yticks(range(grid.shape[0]), [str(int(i)) for i in grid.index])
    ax.set_xlabel("role")
    ax.set_ylabel("layer")
    label = {"relative_l2": "‖Δθ‖ / ‖θ_base‖", "l2": "‖Δθ‖₂", "max_abs": "max |Δθ|"}.get(value, value)
    ax.set_title(f"Finetuning shift per layer and role ({label})")
    for (i, j), v in np.ndenumerate(grid.to_numpy(dtype=float)):
        if np.isfinite(v):
            ax.text(j, i, f"{v:.3g}", ha="center", va="center", fontsize=7, color="white" if v < np.nanmean(grid.to_numpy(dtype=float)) else "black")
    fig.colorbar(image, ax=ax, label=label)
    return fig


def _groups_colours(groups):
    cmap = colormaps["viridis" if len(groups) > 10 else "tab10"]
    return {g: cmap(i / max(1, len(groups) - 1)) if len(groups) > 10 else cmap(i) for i, g in enumerate(groups)}


def curves_figure(curves: pd.DataFrame, metric: str = "accuracy"):
    """Forget and retain `metric` against step, one line per group (`soir curves`)."""
    groups = list(dict.fromkeys(curves["group"]))
    colours = _groups_colours(groups)
    fig, axes = new_figure((11, 4.2), 2, sharex=True)
    for ax, side in zip(axes, ("forget", "retain")):
        for group in groups:
            rows = curves[curves["group"] == group].sort_values("step")
            ax.plot(rows["step"], rows[f"{side}_{metric}"], marker=".", color=colours[group], label=group)
        ax.set_title(f"{side.capitalize()} {metric.replace('_', ' ')} while unlearning one group alone")
        ax.set_xlabel("unlearning step")
        ax.set_ylabel(f"{side} {_metric_label(metric)}")
        ax.grid(alpha=0.3)
    axes[1].legend(title="group", fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return fig


def _metric_label(metric: str) -> str:
    return {"accuracy": "answer-token accuracy (teacher-forced)", "loss": "answer NLL (nats/token)",
            "rouge_l_recall": "ROUGE-L recall", "exact_match": "QA exact match"}.get(metric, metric)


def pareto_figure(curves: pd.DataFrame, metric: str = "accuracy", oracle: dict | None = None):
    """Retain against forget `metric`, one trajectory per group; the retain-only oracle as a star."""
    groups = list(dict.fromkeys(curves["group"]))
    colours = _groups_colours(groups)
    fig, ax = new_figure((7.5, 5.5))
    for group in groups:
        rows = curves[curves["group"] == group].sort_values("step")
        ax.plot(rows[f"forget_{metric}"], rows[f"retain_{metric}"], marker=".", color=colours[group], label=group, alpha=0.85)
        ax.scatter(rows[f"forget_{metric}"].iloc[-1:], rows[f"retain_{metric}"].iloc[-1:], color=colours[group], marker="x")
    if oracle is not None:
        ax.scatter([oracle[f"forget_{metric}"]], [oracle[f"retain_{metric}"]], marker="*", s=250, color="crimson", zorder=5, label="retain-only oracle")
    forget_retain_axes(ax, f"forget {_metric_label(metric)}", f"retain {_metric_label(metric)}",
                       "Forget / retain trade-off of unlearning each group alone\n(start at the finetuned model; × marks the last step)")
    return fig


def forget_retain_axes(ax, forget_label: str, retain_label: str, title: str) -> None:
    """Labels, title, grid and an outside legend of a retain-against-forget plot; forget decreases to the right."""
    ax.set_xlabel(f"{forget_label} (lower: more forgotten)")
    ax.set_ylabel(f"{retain_label} (higher: better kept)")
    ax.set_title(title)
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))


def compare_heatmap(pairs: pd.DataFrame, metric: str = "spearman"):
    """Pairwise agreement of rankings (`soir compare`): a symmetric matrix of `metric`."""
    names = list(dict.fromkeys(list(pairs["a"]) + list(pairs["b"])))
    grid = np.full((len(names), len(names)), np.nan)
    for row in pairs.itertuples(index=False):
        i, j = names.index(row.a), names.index(row.b)
        grid[i, j] = grid[j, i] = getattr(row, metric)
    np.fill_diagonal(grid, 1.0)
    fig, ax = new_figure((1.6 + 0.75 * len(names), 1.2 + 0.65 * len(names)))
    low = -1.0 if metric in ("spearman", "kendall") else 0.0
    image = ax.imshow(grid, cmap="RdBu_r" if low < 0 else "viridis", vmin=low, vmax=1.0)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    for (i, j), v in np.ndenumerate(grid):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8, color="white" if abs(v) > 0.6 else "black")
    title = {"spearman": "Spearman ρ", "kendall": "Kendall τ"}.get(metric, metric.replace("_", " "))
    ax.set_title(f"Agreement between rankings ({title})")
    fig.colorbar(image, ax=ax, label=title)
    return fig


def rank_scatter(ranks: pd.DataFrame, a: str, b: str):
    """Rank of every group under ranking `a` against its rank under `b` (1 = best)."""
    fig, ax = new_figure((5.5, 5.5))
    kinds = list(dict.fromkeys(ranks["kind"]))
    cmap = colormaps["tab10"]
    for i, kind in enumerate(kinds):
        rows = ranks[ranks["kind"] == kind]
        ax.scatter(rows[a], rows[b], s=18, color=cmap(i % 10), label=kind, alpha=0.8)
    n = int(max(ranks[a].max(), ranks[b].max()))
    ax.plot([1, n], [1, n], color="grey", linestyle="--", linewidth=1, label="same rank")
    ax.set_xlabel(f"rank under {a} (1 = best)")
    ax.set_ylabel(f"rank under {b} (1 = best)")
    ax.set_title(f"Group ranks: {a} vs {b}")
    ax.legend(title="kind", fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def compression_tradeoff(table: pd.DataFrame, score: str = "soir"):
    """Ranking accuracy of each sketch against k and against time per example (`benchmarks/compression.py`'s table)."""
    rows = table[table["score"] == score]
    sketches = list(dict.fromkeys(rows["sketch"]))
    cmap = colormaps["tab10"]
    fig, (by_k, by_time) = new_figure((11, 4.2), 2, sharey=True)
    for i, sketch in enumerate(sketches):
        mean = rows[rows["sketch"] == sketch].groupby("k", as_index=False)[["spearman", "ms_per_example"]].mean()
        by_k.plot(mean["k"], mean["spearman"], marker="o", color=cmap(i), label=sketch)
        by_time.plot(mean["ms_per_example"], mean["spearman"], marker="o", color=cmap(i), label=sketch)
    by_k.set_xscale("log", base=2)
    by_k.set_xlabel("sketch dimensions per group, k")
    by_time.set_xscale("log")
    by_time.set_xlabel("time per example (ms)")
    by_k.set_ylabel(f"Spearman ρ to the exact {score} ranking")
    by_k.set_title(f"{score}: ranking accuracy against k")
    by_time.set_title(f"{score}: ranking accuracy against cost")
    for ax in (by_k, by_time):
        ax.grid(alpha=0.3)
    by_time.legend(title="sketch", fontsize=8)
    return fig


def shift_against_ranking(shift: pd.DataFrame, ranking: pd.DataFrame):
    """Each tensor's finetuning shift against its rank in a tensor-granularity ranking."""
    tensors = shift[shift["level"] == "tensor"].set_index("name")
    ranked = ranking.set_index("group")
    both = tensors.join(ranked[["rank"]], how="inner")
    fig, ax = new_figure((6.5, 4.8))
    kinds = list(dict.fromkeys(both["kind"]))
    cmap = colormaps["tab10"]
    for i, kind in enumerate(kinds):
        rows = both[both["kind"] == kind]
        ax.scatter(rows["rank"], rows["relative_l2"], color=cmap(i % 10), label=kind, s=24)
    ax.set_xlabel("rank in the ranking (1 = best)")
    ax.set_ylabel("finetuning shift ‖Δθ‖ / ‖θ_base‖")
    ax.set_title("Where finetuning moved the weights, against the ranking")
    ax.legend(title="kind", fontsize=8)
    ax.grid(alpha=0.3)
    return fig
