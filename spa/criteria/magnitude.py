"""L1 / L2 magnitude: the sum of |w|^p over each channel's slice (no p-th root, METHODS §1)."""

from __future__ import annotations

import numpy as np

from spa.criteria.base import Criterion, CriterionInputs, register_criterion
from spa.rules.base import Role

__all__ = ["L1", "L2"]


def _slice_sums(w: np.ndarray, axis: int, p: int) -> np.ndarray:
    a = np.abs(w.astype(np.float64, copy=False))
    if p == 2:
        a = a * a
    other = tuple(i for i in range(w.ndim) if i != axis)
    return a.sum(axis=other) if other else a


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
