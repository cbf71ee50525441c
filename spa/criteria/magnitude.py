"""L1 / L2 magnitude: the sum of |w|^p over each channel's slice (no p-th root, METHODS §1)."""

from __future__ import annotations

import numpy as np

from spa.criteria.base import Criterion, CriterionInputs, register_criterion
from spa.rules.base import Role

__all__ = ["L1", "L2"]


def _slice_sums(w: np.ndarray, axis: int, p: int) -> np.ndarray:
    """Σ|w|^p over every axis but ``axis``, accumulated in float64 without a float64 copy."""
    a = np.square(w) if p == 2 else np.abs(w)
    other = tuple(i for i in range(w.ndim) if i != axis)
    return a.sum(axis=other, dtype=np.float64) if other else a.astype(np.float64)


@register_criterion
class L1(Criterion):
    name = "l1"

    def local_scores(self, weight: np.ndarray, axis: int, role: Role, name: str, inputs: CriterionInputs) -> np.ndarray:
        return _slice_sums(weight, axis, 1)


@register_criterion
class L2(Criterion):
    name = "l2"

    def local_scores(self, weight: np.ndarray, axis: int, role: Role, name: str, inputs: CriterionInputs) -> np.ndarray:
        return _slice_sums(weight, axis, 2)
