"""Comparing rankings (docs/design.md §9): how much do two localizers agree, and on the groups that matter?

For every pair of rankings over the same groups: Spearman's ρ and Kendall's τ of the ranks,
and the top-k overlap at k = 5%, 10% and 25% of the groups (|A ∩ B| / k) and of the
parameters (each ranking's top groups filling that fraction of the parameters in rank order,
as `soir select --by params` does; the overlap is the parameters both select over the
smaller of the two selections).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Mapping, Sequence

import pandas as pd
from scipy.stats import kendalltau, spearmanr

from soir.errors import UserError
from soir.ranking import Ranking
from soir.select import fill_budget

FRACTIONS = (0.05, 0.10, 0.25)


def _check_same_groups(a: str, b: str, ta: pd.DataFrame, tb: pd.DataFrame) -> None:
    ga, gb = set(ta["group"]), set(tb["group"])
    if ga != gb:
        only = sorted(ga - gb) or sorted(gb - ga)
        owner, other = (a, b) if ga - gb else (b, a)
        raise UserError(f"rankings over different groups: {owner} has {only[0]}, {other} has not "
                        f"({len(ga)} vs {len(gb)} groups; rank at the same --granularity, --norms and --include/--exclude)")


def top_groups(table: pd.DataFrame, fraction: float) -> set[str]:
    ranked = table.sort_values("rank", kind="stable")
    return set(ranked["group"].iloc[: max(1, int(round(fraction * len(ranked))))])


def top_params(table: pd.DataFrame, fraction: float) -> set[str]:
    ranked = table.sort_values("rank", kind="stable")
    sizes = [int(n) for n in ranked["n_params"]]
    return {ranked["group"].iloc[i] for i in fill_budget(sizes, fraction * sum(sizes))}


def pair_agreement(ta: pd.DataFrame, tb: pd.DataFrame, fractions: Sequence[float] = FRACTIONS) -> dict[str, float]:
    """Spearman, Kendall and top-k overlaps of two ranking tables over the same groups."""
    merged = ta[["group", "rank", "n_params"]].merge(tb[["group", "rank"]], on="group", suffixes=("_a", "_b"))
    size = dict(zip(merged["group"], merged["n_params"]))
    row = {"n_groups": len(merged),
           "spearman": float(spearmanr(merged["rank_a"], merged["rank_b"]).statistic),
           "kendall": float(kendalltau(merged["rank_a"], merged["rank_b"]).statistic)}
    for fraction in fractions:
        label = f"{fraction * 100:g}"
        a, b = top_groups(ta, fraction), top_groups(tb, fraction)
        row[f"top{label}_groups"] = len(a & b) / len(a)
        a, b = top_params(ta, fraction), top_params(tb, fraction)
        both, smaller = sum(size[g] for g in a & b), min(sum(size[g] for g in a), sum(size[g] for g in b))
        row[f"top{label}_params"] = both / smaller if smaller else float("nan")
    return row


def compare_rankings(rankings: Mapping[str, Ranking | pd.DataFrame], fractions: Sequence[float] = FRACTIONS) -> pd.DataFrame:
    """One row per pair of the named rankings (a, b, n_groups, spearman, kendall, top-k overlaps)."""
    if len(rankings) < 2:
        raise UserError(f"compare needs at least two rankings, got {len(rankings)}")
    tables = {name: r.table if isinstance(r, Ranking) else r for name, r in rankings.items()}
    first = next(iter(tables))
    for name in tables:
        _check_same_groups(first, name, tables[first], tables[name])
    rows = [{"a": a, "b": b, **pair_agreement(tables[a], tables[b], fractions)} for a, b in itertools.combinations(tables, 2)]
    return pd.DataFrame(rows)


def rank_table(rankings: Mapping[str, Ranking | pd.DataFrame]) -> pd.DataFrame:
    """One row per group: its kind and its rank under each ranking (a column per ranking name)."""
    tables = {name: r.table if isinstance(r, Ranking) else r for name, r in rankings.items()}
    first = next(iter(tables.values()))
    out = first[["group", "kind", "n_params"]].copy()
    for name, table in tables.items():
        out[name] = out["group"].map(dict(zip(table["group"], table["rank"]))).astype(int)
    return out


def ranking_names(paths: Sequence[str | Path]) -> list[str]:
    """Readable unique names for rankings: their directory names (made unique with a suffix)."""
    names, seen = [], {}
    for path in paths:
        path = Path(path)
        name = path.name if path.is_dir() else path.parent.name
        seen[name] = seen.get(name, 0) + 1
        names.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return names


def write_comparison(out: Path, pairs: pd.DataFrame, ranks: pd.DataFrame, pair: tuple[str, str] | None = None) -> list[Path]:
    """`compare.parquet`, `ranks.parquet`, the Spearman heatmap and a rank-vs-rank scatter, each atomically."""
    from analysis.plots import compare_heatmap, rank_scatter, save_figure
    from soir.io import write_parquet

    write_parquet(out / "compare.parquet", pairs)
    write_parquet(out / "ranks.parquet", ranks)
    written = [out / "compare.parquet", out / "ranks.parquet",
               save_figure(compare_heatmap(pairs, "spearman"), out / "compare.png"),
               save_figure(compare_heatmap(pairs, "top10_params"), out / "compare_top10_params.png")]
    a, b = pair or (pairs["a"].iloc[0], pairs["b"].iloc[0])
    written.append(save_figure(rank_scatter(ranks, a, b), out / "scatter.png"))
    return written


def check_pair(pair: Sequence[str] | None, names: Sequence[str]) -> tuple[str, str] | None:
    if pair is None:
        return None
    unknown = [p for p in pair if p not in names]
    if unknown:
        raise UserError(f"--pair {unknown[0]} is not one of the rankings compared ({', '.join(names)})")
    return tuple(pair)


