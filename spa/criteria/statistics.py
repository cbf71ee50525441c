"""Criteria that read the activations' moments (the pipeline's ``statistics`` step).

- ``activation``: mean |x| of each channel at the inputs of the group's consumers (on
  calibration data when given, else the data-free moments), averaged over the consumers.
- ``obs``: the output error a unit's removal leaves *after* compensation (METHODS §3.1), summed
  over the group's consumers (§3.2): for consumer ``y = W x`` with the damped second moment
  ``H`` of ``[x; 1]``, removing channels ``S`` costs ``Σ_taps tr(W_S [(H⁻¹)_SS]⁻¹ W_Sᵀ)``,
  divided by the consumer's output energy ``Σ_taps tr(W H Wᵀ)`` so that consumers of
  different scale add up. The group scores are *not* renormalised: a relative output error is
  comparable across groups, so ``--allocation global`` ranks groups by predicted damage.
  Groups with no consumer compensation can handle fall back to ``l2``, rescaled to the
  median obs score so they neither dominate nor vanish in a global ranking. On synthetic
  statistics (the data-free fallback) the channels are taken as independent
  (``E[x xᵀ] → diag(Var) + μμᵀ``, :func:`criterion_moments`): their correlations are the
  synthetic inputs', and a choice that trusts them removes channels whose stand-ins fail on
  real inputs (measured on PP-OCRv4, docs/compensation.md); compensation still uses them.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from spa.analysis.channels import Group
from spa.analysis.moments import Moments
from spa.compensation import DAMP, quadratic_trace, consumer_refusal
from spa.criteria.base import CRITERIA, Criterion, CriterionInputs, register_criterion
from spa.rules.base import Role

__all__ = ["Activation", "OBS", "augmented_inverse", "criterion_moments", "obs_unit_errors"]


def _usable(inputs: CriterionInputs, group: Group):
    for c in inputs.consumers[group.id]:
        m = inputs.moments.get(c.activation) if c.activation is not None else None
        if m is not None and m.mean.shape[0] == c.activation_size and consumer_refusal(c) is None:
            yield c, m


class _StatisticsCriterion(Criterion):
    """Scores whole groups from the consumer view and the moments (no per-weight score)."""

    needs = frozenset({"consumers", "moments"})

    def local_scores(self, weight: np.ndarray, axis: int, role: Role, name: str, inputs: CriterionInputs) -> np.ndarray:
        raise NotImplementedError(f"{self.name} scores whole groups")  # pragma: no cover


@register_criterion
class Activation(_StatisticsCriterion):
    name = "activation"

    def group_scores(self, group: Group, inputs: CriterionInputs, group_index: int) -> np.ndarray:
        total = np.zeros(group.n_units)
        members = np.zeros(group.n_units)
        for c, m in _usable(inputs, group):
            per_column = m.abs_mean[c.channel]
            total += np.bincount(c.unit_of_column[c.column], weights=per_column, minlength=group.n_units)
            members[np.unique(c.unit_of_column[c.column])] += 1
        if not members.any():
            return CRITERIA["l1"].group_scores(group, inputs, group_index)
        score = np.divide(total, members, out=np.zeros_like(total), where=members > 0)
        mean = score.mean()
        return score / mean if mean > 0 else score


def augmented_inverse(second: np.ndarray, mean: np.ndarray, damp: float = DAMP) -> np.ndarray:
    """Inverse of the damped second moment of ``[x; 1]`` (the bias column last)."""
    c = len(mean)
    G = np.empty((c + 1, c + 1))
    G[:c, :c] = second
    diag = np.diag(second)
    scale = float(diag[diag > 0].mean()) if (diag > 0).any() else 1.0
    G[np.arange(c), np.arange(c)] += damp * scale + (diag <= 0) * scale
    G[:c, c] = G[c, :c] = mean
    G[c, c] = 1.0 + damp
    return np.linalg.pinv(G, hermitian=True)


def obs_unit_errors(c, m, W: np.ndarray, n_units: int, damp: float = DAMP) -> np.ndarray:
    """Relative output error of removing each unit consumer ``c`` reads (weight ``W``, input
    moments ``m``), after compensation."""
    M = c.as_matrix(W).astype(np.float64)
    r = c.receptive
    Hinv = augmented_inverse(m.second, m.mean, damp)
    C = c.activation_size
    total = 0.0
    for t in range(r):
        Wt = M[:, np.arange(C) * r + t]
        total += float(quadratic_trace(Wt, m.second))
    errors = np.zeros(n_units)
    for unit in np.unique(c.unit_of_column):
        S = c.columns_of(int(unit))  # identity layout: columns are channels
        block = Hinv[np.ix_(S, S)]
        try:
            inv_block = np.linalg.inv(block) if len(S) > 1 else np.array([[1.0 / block[0, 0]]])
        except np.linalg.LinAlgError:
            inv_block = np.linalg.pinv(block)
        e = 0.0
        for t in range(r):
            WS = M[:, S * r + t]
            e += float(quadratic_trace(WS, inv_block))
        errors[int(unit)] = e
    return errors / max(total, 1e-30)


def criterion_moments(m: Moments) -> Moments:
    """The moments ``obs`` scores with: synthetic statistics (source ``synthetic…``) with their
    channels taken as independent, ``diag(Var) + μμᵀ``; everything else as it is."""
    if m.independent or not m.source.startswith("synthetic"):
        return m
    return dataclasses.replace(m, second=np.diag(m.variance) + np.outer(m.mean, m.mean), independent=True)


@register_criterion
class OBS(_StatisticsCriterion):
    name = "obs"

    def group_scores(self, group: Group, inputs: CriterionInputs, group_index: int) -> np.ndarray | None:
        """Summed relative errors, or None when no consumer of the group can be compensated."""
        score = np.zeros(group.n_units)
        seen = False
        for c, m in _usable(inputs, group):
            score += obs_unit_errors(c, criterion_moments(m), inputs.weight(c.weight), group.n_units)
            seen = True
        return score if seen else None

    def score_all(self, groups: list[Group], inputs: CriterionInputs) -> dict[str, np.ndarray]:
        scores = {g.id: self.group_scores(g, inputs, i) for i, g in enumerate(groups) if g.prunable}
        means = [float(v.mean()) for v in scores.values() if v is not None and v.size]
        level = float(np.median(means)) if means else 1.0
        for i, g in enumerate(groups):
            if g.id in scores and scores[g.id] is None:
                scores[g.id] = CRITERIA["l2"].group_scores(g, inputs, i) * level
        return scores
