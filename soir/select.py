"""Selecting parameters from a ranking (docs/design.md §5 'Selection'): the `soir select` stage.

`select(ranking, model, settings)` turns a `soir.ranking.Ranking` into a `soir.mask.Mask`:

1. the groups are rebuilt from the model with the ranking's granularity and norms (the
   ranking must have been made for this architecture);
2. `include` / `exclude` regexes (`re.search` on group names) narrow the candidates;
3. candidates are taken in rank order (best first), or from the bottom with `bottom`;
   the first `offset` of them are skipped;
4. `top` is a fraction in (0, 1]: of the candidate groups (`by="groups"`, rounded up, at
   least one) or of their parameters (`by="params"`: the budget is filled in rank order,
   a group that would overflow it is passed over for the next ones that fit). A whole
   number above 1 is a count instead (of groups, or of parameters with `by="params"`);
5. with `per_kind` the fraction is applied within each kind (attn / mlp / norm / embed /
   head …) separately, the thesis's proportional split; counts are rounded to the nearest
   whole number per kind, so a kind of one group (the embedding) joins only from top ≥ 0.5.

Whole groups become whole-tensor selections; neuron groups become element masks
(`soir.groups.element_mask`). A selection that matches nothing is a UserError.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from soir.errors import UserError
from soir.groups import Group, element_mask, filter_groups, parameter_groups
from soir.mask import Mask
from soir.ranking import Ranking
from soir.settings import setting

BY = ("groups", "params")


@dataclass
class SelectSettings:
    """Which of a ranking's groups make the mask (see the module docstring)."""

    top: float = setting(0.1, "a fraction in (0, 1] of the groups (or parameters, --by params); a whole number above 1 is a count", metavar="X")
    by: str = setting("groups", "--top counts groups, or fills a parameter budget in rank order", choices=BY)
    per_kind: bool = setting(False, "apply --top within each kind (attn, mlp, norm, …) separately")
    offset: int = setting(0, "skip the first K ranked groups", metavar="K")
    bottom: bool = setting(False, "select from the bottom of the ranking instead")
    include: tuple[str, ...] = setting((), "only groups whose name matches RE (re.search)", metavar="RE")
    exclude: tuple[str, ...] = setting((), "never groups whose name matches RE", metavar="RE")

    def __post_init__(self):
        self.include, self.exclude = tuple(self.include), tuple(self.exclude)
        if not (0 < self.top <= 1 or (self.top > 1 and float(self.top).is_integer())):
            raise UserError(f"--top is a fraction in (0, 1] of the groups or parameters (or a whole count above 1), not {self.top}")
        if self.by not in BY:
            raise UserError(f"--by must be one of {', '.join(BY)}, not {self.by!r}")
        if self.offset < 0 or not float(self.offset).is_integer():
            raise UserError(f"--offset skips that many groups: a whole number >= 0, not {self.offset}")
        self.offset = int(self.offset)


def _take(candidates: list[Group], settings: SelectSettings, at_least_one: bool = True) -> list[Group]:
    """The first `top` of `candidates` (already ordered) after skipping `offset`.

    A fraction of groups is rounded up (at least one) for a whole selection, and to the
    nearest count (possibly none) within one kind of a per-kind selection."""
    pool = candidates[settings.offset:]
    count = settings.top > 1  # a whole count rather than a fraction
    if settings.by == "groups":
        if count:
            n = int(settings.top)
        elif at_least_one:
            n = max(1, math.ceil(settings.top * len(candidates) - 1e-9))
        else:
            n = math.floor(settings.top * len(candidates) + 0.5)
        return pool[:n]
    budget = settings.top if count else settings.top * sum(g.n_params for g in candidates)
    return [pool[i] for i in fill_budget([g.n_params for g in pool], budget)]


def fill_budget(sizes: list[int], budget: float) -> list[int]:
    """Indices of the items taken in order while they fit a budget; an item that would overflow it
    is passed over for the next ones that fit (`--by params`)."""
    taken, used = [], 0
    for i, size in enumerate(sizes):
        if used + size <= budget + 1e-9:
            taken.append(i)
            used += size
    return taken


def ranked_groups(ranking: Ranking, model) -> list[Group]:
    """The model's groups (at the ranking's granularity and norms) in the ranking's order, best first."""
    s = ranking.settings
    groups = {g.name: g for g in parameter_groups(model, s.granularity, s.norms)}
    order = ranking.ranked()["group"].tolist()
    unknown = [n for n in order if n not in groups]
    if unknown:
        raise UserError(
            f"the ranking names groups this model does not have ({', '.join(unknown[:3])}{'…' if len(unknown) > 3 else ''}): "
            "give the model the ranking was made for"
        )
    return [groups[n] for n in order]


def select(ranking: Ranking, model, settings: SelectSettings = SelectSettings()) -> Mask:
    """A `Mask` of the selected groups of `model` (see the module docstring)."""
    candidates = filter_groups(ranked_groups(ranking, model), settings.include, settings.exclude)
    if settings.bottom:
        candidates = candidates[::-1]
    if settings.per_kind:
        kinds = list(dict.fromkeys(g.kind for g in candidates))
        chosen = {g.name for kind in kinds for g in _take([g for g in candidates if g.kind == kind], settings, at_least_one=False)}
        selected = [g for g in candidates if g.name in chosen]
    else:
        selected = _take(candidates, settings)
    if not selected:
        what = f"--top {settings.top} of the parameters" if settings.by == "params" else f"--top {settings.top}"
        raise UserError(
            f"the selection matches no parameter group ({what} after --offset {settings.offset} of {len(candidates)} candidates): "
            "raise --top, lower --offset or loosen --include/--exclude"
        )
    record = {
        **asdict(settings),
        "ranking": {"score": ranking.settings.score, "granularity": ranking.settings.granularity, "norms": ranking.settings.norms},
        "groups": [g.name for g in selected],
        "n_groups": len(selected),
        "n_candidates": len(candidates),
    }
    return mask_of_groups(model, selected, record)


def mask_of_groups(model, groups: list[Group], settings: dict | None = None) -> Mask:
    """The mask selecting exactly `groups` of `model`: whole groups as whole tensors, sliced
    (neuron) groups as element masks."""
    whole = [g for g in groups if all(s.dim is None for s in g.slices)]
    sliced = [g for g in groups if not all(s.dim is None for s in g.slices)]
    tensors = [s.name for g in whole for s in g.slices]
    elements = element_mask(sliced, model) if sliced else {}
    return Mask.from_selection(model, tensors, elements, settings)
