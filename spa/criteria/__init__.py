"""Importance criteria. Every criterion yields per-unit scores for a group (higher = keep).

Magnitude criteria need only the weights; later criteria (Taylor, SNIP, activations …) plug
in through the same `Criterion` interface with the extra inputs they declare in ``needs``.
"""

from __future__ import annotations

from spa.criteria.base import CRITERIA, Criterion, CriterionInputs, get_criterion, score_groups
from spa.criteria import bn, fpgm, magnitude, rand, statistics  # noqa: F401  (registration)
from spa.criteria import gradient  # noqa: F401  (registration: taylor, hessian, snip, grasp, crop)

__all__ = ["CRITERIA", "Criterion", "CriterionInputs", "get_criterion", "score_groups"]
