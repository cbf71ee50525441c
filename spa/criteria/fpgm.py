"""FPGM (He et al., CVPR 2019): a channel near the geometric median of its layer is redundant.

Score of slice i along an axis: Σ_j ‖w_i − w_j‖₂ over the other slices of the same weight
(higher = farther from the others = keep), from the Gram matrix so it costs one C×C product.
"""

from __future__ import annotations

import numpy as np

from spa.criteria.base import Criterion, CriterionInputs, register_criterion
from spa.rules.base import Role

__all__ = ["FPGM"]


def distance_sums(weight: np.ndarray, axis: int) -> np.ndarray:
    """Σ_j ‖w_i − w_j‖₂ for every slice i of ``weight`` along ``axis``."""
    x = np.moveaxis(np.asarray(weight, dtype=np.float64), axis, 0).reshape(weight.shape[axis], -1)
    sq = np.einsum("ij,ij->i", x, x)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (x @ x.T), 0.0)
    return np.sqrt(d2).sum(axis=1)


@register_criterion
class FPGM(Criterion):
    name = "fpgm"

    def local_scores(self, weight: np.ndarray, axis: int, role: Role, name: str, inputs: CriterionInputs) -> np.ndarray:
        return distance_sums(weight, axis)
