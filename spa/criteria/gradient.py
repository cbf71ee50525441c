"""Gradient criteria (METHODS §2), computed on the ONNX model itself through ``spa.autodiff``.

Per weight θ, with g = ∂L/∂θ on the calibration data (or seeded synthetic inputs):

- ``taylor``  |θ·g|           first-order Taylor (Molchanov et al.), for a trained model;
- ``hessian`` θ²·F            OBD with the empirical Fisher diagonal F = mean over feeds of g_f²;
- ``snip``    |θ·g|           connection sensitivity (Lee et al.), at initialisation;
- ``grasp``   θ·(Hg)          GraSP (Wang et al.) at initialisation: its score S = −θ·Hg and it
                              removes the *largest* S (alecwangcq/GraSP ``pruner/GraSP.py``:
                              ``-layer.weight.data * layer.weight.grad``, keep ``S <= threshold``),
                              so spa's keep-high score is −S = θ·Hg, summed per channel (signed);
- ``crop``    |θ·(Hg)|        CroP (Rachwan et al.): keep the largest.

Hg is the Hessian-gradient product ∂(g_detached · g(θ))/∂θ (double backprop, as both public
codes do). Each per-weight score is summed over a channel's slice and aggregated over the
group's members exactly as ``l1`` is (``Criterion.group_scores``, METHODS §1); members with no
gradient (BatchNorm running statistics, integer tensors) are left out. ``grasp``'s scores are
signed, so its groups are normalised by the mean |score| instead of the mean.

The loss (:func:`objective`): cross-entropy on the first output when the calibration data
carries ``labels``. Without labels: for the at-initialisation criteria, the output norm
½‖y‖² (SNIP-style sensitivity of the output); for a trained model, the cross-entropy to the
model's own predictions (argmax of the first output). The KL divergence to the original's
outputs would be the natural label-free loss, but at the original weights it sits at its
minimum: its gradient is exactly zero (every Taylor score would be 0) and its Hessian is the
Fisher, whose per-sample factors are the gradients of this cross-entropy. Outputs that are not
``[batch, classes]`` logits fall back to the output norm.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from spa.autodiff import TorchGraph, require_torch
from spa.criteria.base import Criterion, CriterionInputs, register_criterion
from spa.errors import UsageError
from spa.rules.base import Role

__all__ = ["GradientCriterion", "Taylor", "Hessian", "Snip", "GraSP", "CroP", "objective_name", "compute_gradients"]


class GradientCriterion(Criterion):
    """Per-weight score from θ and the quantity the gradients step computed for it."""

    needs = frozenset({"gradients"})
    #: What ``CriterionInputs.gradients[name]`` must hold: "grad" | "fisher" | "hg".
    quantity: ClassVar[str] = "grad"
    #: A pruning-at-initialisation criterion (label-free objective: the output norm).
    at_init: ClassVar[bool] = False

    def per_weight(self, w: np.ndarray, q: np.ndarray) -> np.ndarray:
        return np.abs(w * q)

    def covers(self, name: str, inputs: CriterionInputs) -> bool:
        return name in inputs.gradients

    def local_scores(self, weight: np.ndarray, axis: int, role: Role, name: str, inputs: CriterionInputs) -> np.ndarray:
        s = self.per_weight(np.asarray(weight, dtype=np.float64), np.asarray(inputs.gradients[name], dtype=np.float64))
        other = tuple(i for i in range(s.ndim) if i != axis)
        return s.sum(axis=other) if other else s


@register_criterion
class Taylor(GradientCriterion):
    name = "taylor"


@register_criterion
class Hessian(GradientCriterion):
    name = "hessian"
    quantity = "fisher"

    def per_weight(self, w: np.ndarray, q: np.ndarray) -> np.ndarray:
        return w * w * q


@register_criterion
class Snip(GradientCriterion):
    name = "snip"
    at_init = True


@register_criterion
class GraSP(GradientCriterion):
    name = "grasp"
    quantity = "hg"
    at_init = True

    def per_weight(self, w: np.ndarray, q: np.ndarray) -> np.ndarray:
        return w * q

    def normalizer(self, score: np.ndarray) -> float:
        return float(np.abs(score).mean()) if score.size else 0.0


@register_criterion
class CroP(GradientCriterion):
    name = "crop"
    quantity = "hg"
    at_init = True


# -- the loss and the gradients ----------------------------------------------------------------


def objective_name(criterion: GradientCriterion, labelled: bool) -> str:
    """``ce`` (labels), ``norm`` (at-init, no labels) or ``self-ce`` (trained, no labels)."""
    if labelled:
        return "ce"
    return "norm" if criterion.at_init else "self-ce"


def _loss(torch, kind: str, outputs: list[Any], labels: Any):
    """Sum over the feed's samples (the caller divides by the number of samples)."""
    floats = [y for y in outputs if y.is_floating_point()]
    if not floats:
        raise UsageError("gradient criteria need a floating-point model output")
    y = floats[0]
    if kind != "norm" and y.dim() == 2 and y.shape[1] > 1:
        target = labels if kind == "ce" else y.detach().argmax(dim=1)
        return torch.nn.functional.cross_entropy(y, target.long().reshape(-1), reduction="sum")
    if kind == "ce":
        raise UsageError(f"labels need a [batch, classes] first output, the model's is {list(y.shape)}")
    return 0.5 * sum((t * t).sum() for t in floats)


def compute_gradients(
    graph: TorchGraph,
    names: Sequence[str],
    quantity: str,
    samples: Iterable[tuple[Mapping[str, np.ndarray], np.ndarray | None]],
    kind: str,
    wrt: Sequence[str] | None = None,
) -> tuple[dict[str, np.ndarray], int]:
    """``quantity`` ("grad": mean gradient; "fisher": mean of squared per-feed gradients;
    "hg": Hessian × mean gradient) for the initializers ``names``, over ``samples``
    ((feed, labels) pairs). Returns the arrays (float64) and the number of samples used.

    ``wrt`` (default ``names``) are the parameters differentiated: Hg is H·g over all of them
    (the gradient flow ‖g‖² of the whole model, not only of the scored weights)."""
    torch = require_torch()
    samples = list(samples)
    if not samples:
        raise UsageError("gradient criteria need at least one input sample")
    leaves = graph.leaves(sorted(set(names) | set(wrt or ())))
    order = list(leaves)

    def feed_loss(feed, labels, count):
        lab = None if labels is None else torch.from_numpy(np.asarray(labels))
        out = graph(feed, leaves)
        n = int(out[0].shape[0]) if out[0].dim() else 1
        count[0] += n
        return _loss(torch, kind, out, lab)

    count = [0]
    if quantity in ("grad", "hg"):
        total = {n: torch.zeros_like(leaves[n]) for n in order}
        for feed, labels in samples:
            grads = torch.autograd.grad(feed_loss(feed, labels, count), [leaves[n] for n in order], allow_unused=True)
            for n, g in zip(order, grads):
                if g is not None:
                    total[n] += g.detach()
        g_mean = {n: total[n] / max(count[0], 1) for n in order}
        if quantity == "grad":
            return {n: g_mean[n].double().numpy() for n in names}, count[0]
        hg = {n: torch.zeros_like(leaves[n]) for n in order}
        count2 = [0]
        for feed, labels in samples:
            loss = feed_loss(feed, labels, count2)
            grads = torch.autograd.grad(loss, [leaves[n] for n in order], create_graph=True, allow_unused=True)
            z = sum((g * g_mean[n]).sum() for n, g in zip(order, grads) if g is not None)
            if not isinstance(z, torch.Tensor) or not z.requires_grad:
                continue  # piecewise-linear everywhere on this feed: Hg is zero
            second = torch.autograd.grad(z, [leaves[n] for n in order], allow_unused=True)
            for n, h in zip(order, second):
                if h is not None:
                    hg[n] += h.detach()
        return {n: (hg[n] / max(count2[0], 1)).double().numpy() for n in names}, count[0]
    if quantity == "fisher":
        fisher = {n: torch.zeros_like(leaves[n]) for n in order}
        feeds = 0
        for feed, labels in samples:
            grads = torch.autograd.grad(feed_loss(feed, labels, count), [leaves[n] for n in order], allow_unused=True)
            for n, g in zip(order, grads):
                if g is not None:
                    fisher[n] += g.detach() ** 2
            feeds += 1
        return {n: (fisher[n] / feeds).double().numpy() for n in names}, count[0]
    raise ValueError(f"unknown gradient quantity {quantity!r}")
