"""Random importance, seeded per group: the baseline every criterion must beat."""

from __future__ import annotations

import numpy as np

from spa.analysis.channels import Group
from spa.criteria.base import Criterion, CriterionInputs, register_criterion
from spa.rules.base import Role

__all__ = ["Random"]


@register_criterion
class Random(Criterion):
    name = "random"

    def local_scores(self, weight: np.ndarray, axis: int, role: Role, name: str, inputs: CriterionInputs) -> np.ndarray:
        raise NotImplementedError("random scores whole units, see group_scores")

    def group_scores(self, group: Group, inputs: CriterionInputs, group_index: int) -> np.ndarray:
        rng = np.random.default_rng([inputs.seed, group_index])
        return rng.random(group.n_units) + 0.5
