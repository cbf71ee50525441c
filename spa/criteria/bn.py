"""BatchNorm scale (Network Slimming, Liu et al. 2017; Torch-Pruning's BNScaleImportance).

A unit's score is the mean |γ| of the BatchNormalization scales in its group. A group with no
BatchNorm (a BN folded into its conv at export, a transformer) falls back to ``l1``, so one
run can rank every group.
"""

from __future__ import annotations

import numpy as np

from spa.analysis.channels import Group
from spa.criteria.base import CRITERIA, Criterion, CriterionInputs, register_criterion
from spa.rules.base import Role

__all__ = ["BNScale", "bn_scales"]


def bn_scales(model) -> set[str]:
    """Names of the initializers that are BatchNormalization scales in ``model``."""
    return {
        n.inputs[1].name
        for n in model.graph.all_nodes()
        if n.op_type == "BatchNormalization" and n.domain in ("", "ai.onnx") and len(n.inputs) > 1 and n.inputs[1] is not None
    }


@register_criterion
class BNScale(Criterion):
    name = "bn"
    needs = frozenset({"model"})

    def local_scores(self, weight: np.ndarray, axis: int, role: Role, name: str, inputs: CriterionInputs) -> np.ndarray:
        """|γ| of a BN scale (the group score reads only those, see ``group_scores``)."""
        return np.abs(weight.astype(np.float64)).reshape(-1)

    def group_scores(self, group: Group, inputs: CriterionInputs, group_index: int) -> np.ndarray:
        scales = bn_scales(inputs.model)
        total = np.zeros(group.n_units)
        members = np.zeros(group.n_units)
        for dim in group.dims:
            if dim.value not in scales:
                continue
            local = np.abs(inputs.weight(dim.value).astype(np.float64)).reshape(-1)
            units = group.unit_of[dim]
            total += np.bincount(units, weights=local, minlength=group.n_units)
            members[np.unique(units)] += 1
        if not members.any():
            return CRITERIA["l1"].group_scores(group, inputs, group_index)
        score = np.divide(total, members, out=np.zeros_like(total), where=members > 0)
        mean = score.mean()
        return score / mean if mean > 0 else score
