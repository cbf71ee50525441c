"""Criterion interface and group-level aggregation (METHODS.md §1).

A criterion scores each channel index of one weight axis (``local_scores``). The group score
of a unit is the *mean* over the weight members that contain it of the sum of their local
scores over the unit's channels, then divided by the group's mean so that groups of
different layers compare in a global ranking (Torch-Pruning's defaults: reduction mean,
normalizer mean). Criteria that need more than weights (gradients, activations) declare it in
``needs`` and receive it through :class:`CriterionInputs`; a criterion that scores a whole
group at once (``obs``: the output error left after compensation) overrides ``group_scores``.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import numpy as np

from spa.analysis.channels import ChannelGraph, Group
from spa.errors import UnsupportedError
from spa.rules.base import Role

__all__ = ["Criterion", "CriterionInputs", "CRITERIA", "register_criterion", "get_criterion", "score_groups"]


@dataclasses.dataclass
class CriterionInputs:
    """What a criterion may read. ``weight(name)`` returns an initializer as numpy.

    ``gradients`` (keyed by initializer name; the pipeline's ``gradients`` step) holds, for
    each weight a gradient criterion scores, the per-weight quantity that criterion declares
    (``spa.criteria.gradient``: the mean gradient g, the Fisher diagonal, or Hg);
    ``activations`` are for later criteria; ``seed`` makes random criteria reproducible.
    """

    weight: Callable[[str], np.ndarray]
    seed: int = 0
    gradients: Mapping[str, np.ndarray] | None = None
    activations: Mapping[str, np.ndarray] | None = None
    #: The analysed model (``bn`` reads which weights are BatchNorm scales).
    model: Any = None
    #: The consumer view and the moments of the activations consumers read (the pipeline's
    #: ``statistics`` step): ``activation`` and ``obs`` need them.
    consumers: Any = None
    moments: Mapping[str, Any] | None = None


class Criterion(abc.ABC):
    name: ClassVar[str]
    needs: ClassVar[frozenset[str]] = frozenset()

    @abc.abstractmethod
    def local_scores(self, weight: np.ndarray, axis: int, role: Role, name: str, inputs: CriterionInputs) -> np.ndarray:
        """Score of every index along ``axis`` of one weight (length ``weight.shape[axis]``)."""

    def covers(self, name: str, inputs: CriterionInputs) -> bool:
        """Whether weight ``name`` takes part in the aggregation (gradient criteria: only the
        weights that have a gradient; BatchNorm running statistics have none)."""
        return True

    def normalizer(self, score: np.ndarray) -> float:
        """What a group's scores are divided by (the mean, Torch-Pruning's default)."""
        return float(score.mean()) if score.size else 0.0

    def group_scores(self, group: Group, inputs: CriterionInputs, group_index: int) -> np.ndarray:
        """Per-unit scores of a group, normalised to mean 1 over the group's units."""
        total = np.zeros(group.n_units)
        members = np.zeros(group.n_units)
        for dim, roles in group.roles.items():
            role = roles[0]
            if not self.covers(dim.value, inputs):
                continue
            w = inputs.weight(dim.value)
            if w.ndim == 0:
                continue
            local = np.asarray(self.local_scores(w, dim.axis, role, dim.value, inputs), dtype=np.float64)
            units = group.unit_of[dim]
            total += np.bincount(units, weights=local, minlength=group.n_units)
            members[np.unique(units)] += 1
        score = np.divide(total, members, out=np.zeros_like(total), where=members > 0)
        mean = self.normalizer(score)
        return score / mean if mean > 0 else score

    def score_all(self, groups: list[Group], inputs: CriterionInputs) -> dict[str, np.ndarray]:
        """Scores of the prunable ones of ``groups`` (all of the analysis, in order: the index
        seeds ``random``) keyed by id. Override to relate groups to each other."""
        return {g.id: self.group_scores(g, inputs, i) for i, g in enumerate(groups) if g.prunable}


CRITERIA: dict[str, Criterion] = {}


def register_criterion(cls: type[Criterion]) -> type[Criterion]:
    CRITERIA[cls.name] = cls()
    return cls


def get_criterion(name: str) -> Criterion:
    try:
        return CRITERIA[name]
    except KeyError:
        raise UnsupportedError(f"unknown criterion '{name}' (choose from {', '.join(sorted(CRITERIA))})") from None


def score_groups(cg: ChannelGraph, criterion: Criterion, inputs: CriterionInputs) -> dict[str, np.ndarray]:
    """Scores of every prunable group's units, keyed by group id."""
    missing = criterion.needs - {k for k in ("gradients", "activations", "model", "consumers", "moments") if getattr(inputs, k) is not None}
    if missing:
        raise UnsupportedError(f"criterion '{criterion.name}' needs {', '.join(sorted(missing))}, which were not given")
    return criterion.score_all(cg.groups, inputs)
