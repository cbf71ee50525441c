"""Allocation: how many units each group loses, and which.

- ``uniform``: every prunable group loses ``ratio`` of its units (its lowest-scored free ones).
- ``global``: one threshold over the normalised scores of all groups; ``ratio`` of all units go.
Both respect ``min_keep`` in every *dim* of a group, not just in the group: each layer keeps at
least that fraction of its channels and at least one (a Concat input or a layer that owns only
some units of its group never collapses to zero channels). ``round_to`` N holds for every
layer too: the kept count of every weight OUT dim with ≥ N channels (each conv/linear's
output channels, also when several layers share one group, as the inputs of a Concat do) is
a multiple of N, or the dim is left whole; a group none of whose OUT dims has N channels
rounds its kept unit count instead (when it has ≥ N units). Rounding keeps more, never fewer: it gives removed units back, highest-scored first,
until every such count is rounded (a unit shared by several dims counts in each). Frozen units
are never chosen.

``search_target`` finds the smallest ratio whose plan meets a FLOPs target (bisection: FLOPs
only fall as the ratio grows, up to the min-keep floor), and says whether the target was met
and which figure was reached, so an unreachable target is never silent.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from spa.analysis.channels import Group
from spa.errors import UsageError
from spa.rules.base import Role

__all__ = ["ALLOCATIONS", "TargetSearch", "allocate", "search_target"]

#: "latency" is "global" over scores weighted by measured latency savings (spa.latency_target).
ALLOCATIONS = ("uniform", "global", "latency")


class _Budget:
    """Which units of one group may still go without any dim falling under its floor."""

    def __init__(self, group: Group, min_keep: float) -> None:
        self.group = group
        self.counts = np.stack([np.bincount(group.unit_of[d], minlength=group.n_units) for d in group.dims])
        sizes = self.counts.sum(axis=1)
        floors = np.maximum(1, np.ceil(min_keep * sizes - 1e-9)).astype(np.int64)
        self.room = sizes - floors  # channels each dim may still lose
        self.cap = max(0, group.n_units - max(1, math.ceil(min_keep * group.n_units - 1e-9)))
        self.removed: list[int] = []

    def try_remove(self, unit: int) -> bool:
        if self.group.frozen[unit] or len(self.removed) >= self.cap:
            return False
        c = self.counts[:, unit]
        if np.any(c > self.room):
            return False
        self.room -= c
        self.removed.append(unit)
        return True

    def restore(self, unit: int) -> None:
        self.removed.remove(unit)
        self.room += self.counts[:, unit]


def _order(group: Group, scores: np.ndarray) -> np.ndarray:
    """Free units by ascending score, ties by index (deterministic)."""
    free = np.flatnonzero(~group.frozen)
    return free[np.lexsort((free, scores[free]))]


def _round(budget: _Budget, scores: np.ndarray, round_to: int) -> None:
    """Give units back (highest-scored first) until every rounded count is a multiple of round_to.

    Rounded counts: the kept channels of each OUT dim with ≥ round_to channels or, when the
    group has no such dim, its kept units (if it has ≥ round_to). Not both: layers of 32 and 4
    channels behind one Concat keep 24 and 4, whose sum is no multiple of 8. A count that is
    whole (nothing removed from it) needs no rounding, so the loop ends at the latest when
    every unit is back.
    """
    if round_to <= 1 or not budget.removed:
        return
    group = budget.group
    rows = [i for i, d in enumerate(group.dims) if Role.OUT in group.roles.get(d, ()) and budget.counts[i].sum() >= round_to]
    counts = budget.counts[rows]  # [dims, units]: channels of each rounded dim per unit
    if not rows and group.n_units >= round_to:
        counts = np.vstack([counts, np.ones((1, group.n_units), dtype=counts.dtype)])
    if not len(counts):
        return
    sizes = counts.sum(axis=1)
    removed = np.zeros(group.n_units, dtype=bool)
    removed[budget.removed] = True
    while removed.any():
        kept = sizes - counts[:, removed].sum(axis=1)
        bad = np.flatnonzero((kept % round_to != 0) & (kept != sizes))
        if not bad.size:
            return
        # Units that would move the first unrounded count; give back the highest-scored one.
        candidates = np.flatnonzero(removed & (counts[bad[0]] > 0))
        unit = int(max(candidates, key=lambda u: (scores[u], u)))
        budget.restore(unit)
        removed[unit] = False


def allocate(
    groups: Sequence[Group],
    scores: Mapping[str, np.ndarray],
    *,
    ratio: float,
    method: str = "uniform",
    min_keep: float = 0.1,
    round_to: int = 1,
) -> dict[str, np.ndarray]:
    """Removed units per group id (only prunable groups appear)."""
    if not 0.0 <= ratio < 1.0:
        raise UsageError(f"ratio must be in [0, 1), got {ratio}")
    if not 0.0 <= min_keep <= 1.0:
        raise UsageError(f"min-keep must be in [0, 1], got {min_keep}")
    if round_to < 1:
        raise UsageError(f"round-to must be ≥ 1, got {round_to}")
    prunable = [g for g in groups if g.prunable and g.id in scores]
    budgets = {g.id: _Budget(g, min_keep) for g in prunable}
    if method == "uniform":
        for g in prunable:
            want = int(ratio * g.n_units)
            for u in _order(g, scores[g.id]):
                if len(budgets[g.id].removed) >= want:
                    break
                budgets[g.id].try_remove(int(u))
    elif method == "global":
        want = int(ratio * sum(g.n_units for g in prunable))
        entries = sorted((float(scores[g.id][u]), gi, int(u)) for gi, g in enumerate(prunable) for u in np.flatnonzero(~g.frozen))
        taken = 0
        for _, gi, u in entries:
            if taken >= want:
                break
            taken += budgets[prunable[gi].id].try_remove(u)
    else:
        raise UsageError(f"unknown allocation '{method}' (choose from {', '.join(ALLOCATIONS)})")
    removed = {}
    for g in prunable:
        b = budgets[g.id]
        _round(b, scores[g.id], round_to)
        if b.removed:
            removed[g.id] = np.sort(np.asarray(b.removed, dtype=np.int64))
    return removed


@dataclasses.dataclass(frozen=True)
class TargetSearch:
    """Outcome of :func:`search_target`: the ratio chosen and the figure it reaches."""

    ratio: float
    reached: float
    target: float

    @property
    def met(self) -> bool:
        return self.reached <= self.target

    def message(self, what: str = "FLOPs") -> str:
        """One line for an unmet target (a refusal or a warning)."""
        return (
            f"the {what} target {self.target:g} is out of reach: pruning every prunable group as far as "
            f"--min-keep allows (ratio {self.ratio:.3f}) leaves {self.reached:.3f} of the {what}"
        )


def search_target(
    figure_at: Callable[[float], float], target: float, *, max_ratio: float = 0.99, steps: int = 24
) -> TargetSearch:
    """Smallest ratio in [0, max_ratio] whose figure (``figure_at(ratio)``, e.g. FLOPs after /
    before) is ``<= target``, with the figure it reaches.

    When no ratio meets the target, the result is the smallest ratio that reaches the lowest
    figure (the min-keep floor: a larger ratio removes nothing more), and ``met`` is False.
    Bisection assumes ``figure_at`` does not grow with the ratio.
    """
    cache: dict[float, float] = {}

    def at(r: float) -> float:
        if r not in cache:
            cache[r] = float(figure_at(r))
        return cache[r]

    if at(0.0) <= target:
        return TargetSearch(0.0, at(0.0), target)
    floor = at(max_ratio)
    goal = target if floor <= target else floor
    lo, hi = 0.0, max_ratio
    for _ in range(steps):
        mid = (lo + hi) / 2
        if at(mid) <= goal:
            hi = mid
        else:
            lo = mid
    return TargetSearch(hi, at(hi), target)
