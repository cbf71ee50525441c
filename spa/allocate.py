"""Allocation: how many units each group loses, and which.

- ``uniform``: every prunable group loses ``ratio`` of its units (its lowest-scored free ones).
- ``global``: one threshold over the normalised scores of all groups; ``ratio`` of all units go.
Both respect ``min_keep`` (each group keeps at least that fraction, and at least one unit: no
layer collapses) and ``round_to`` (kept counts are multiples of N where the group has ≥ N
units; rounding keeps more, never fewer). Frozen units are never chosen.

``search_ratio`` finds the smallest ratio whose plan meets a FLOPs target (bisection: FLOPs
only fall as the ratio grows, up to the min-keep floor).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from spa.analysis.channels import Group
from spa.errors import UsageError

__all__ = ["ALLOCATIONS", "allocate", "search_ratio"]

ALLOCATIONS = ("uniform", "global")


def _max_removable(group: Group, min_keep: float) -> int:
    keep = max(1, math.ceil(min_keep * group.n_units - 1e-9))
    return max(0, min(group.n_units - keep, group.n_free))


def _round(group: Group, n_remove: int, round_to: int) -> int:
    if round_to <= 1 or group.n_units < round_to:
        return n_remove
    kept = group.n_units - n_remove
    kept = min(group.n_units, math.ceil(kept / round_to) * round_to)
    return group.n_units - kept


def _lowest(group: Group, scores: np.ndarray, n: int) -> np.ndarray:
    free = np.flatnonzero(~group.frozen)
    order = free[np.lexsort((free, scores[free]))]  # by score, ties by index: deterministic
    return np.sort(order[:n])


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
    counts: dict[str, int] = {}
    if method == "uniform":
        for g in prunable:
            counts[g.id] = min(int(ratio * g.n_units), _max_removable(g, min_keep))
    elif method == "global":
        budget = int(ratio * sum(g.n_units for g in prunable))
        caps = {g.id: _max_removable(g, min_keep) for g in prunable}
        entries = [(float(scores[g.id][u]), gi, int(u)) for gi, g in enumerate(prunable) for u in np.flatnonzero(~g.frozen)]
        entries.sort()
        counts = {g.id: 0 for g in prunable}
        taken = 0
        for _, gi, _u in entries:
            if taken >= budget:
                break
            gid = prunable[gi].id
            if counts[gid] < caps[gid]:
                counts[gid] += 1
                taken += 1
    else:
        raise UsageError(f"unknown allocation '{method}' (choose from {', '.join(ALLOCATIONS)})")
    removed = {}
    for g in prunable:
        n = _round(g, counts.get(g.id, 0), round_to)
        if n > 0:
            removed[g.id] = _lowest(g, scores[g.id], n)
    return removed


def search_ratio(flops_at: Callable[[float], float], target: float, *, max_ratio: float = 0.99, steps: int = 24) -> float:
    """Smallest ratio in [0, max_ratio] with ``flops_at(ratio) <= target`` (or max_ratio)."""
    if flops_at(0.0) <= target:
        return 0.0
    lo, hi = 0.0, max_ratio
    if flops_at(hi) > target:
        return hi
    for _ in range(steps):
        mid = (lo + hi) / 2
        if flops_at(mid) <= target:
            hi = mid
        else:
            lo = mid
    return hi
