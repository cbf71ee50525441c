"""The ``gradients`` step (after *statistics*, before *score*; only for a gradient criterion).

It runs the analysed model in torch (``spa.autodiff``), on ``--calibration`` data (with its
``labels`` when present) or, without data, on seeded synthetic inputs, and stores in
``State.gradients`` the quantity the criterion needs for every floating-point weight of a
prunable group (``spa.criteria.gradient``). BatchNorm running statistics are left out: they
are not trained parameters (Torch-Pruning's gradient importances skip them too).
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

from spa.autodiff import TorchGraph
from spa.calibration import open_calibration
from spa.criteria import get_criterion
from spa.criteria.gradient import GradientCriterion, compute_gradients, objective_name
from spa.errors import UsageError
from spa.graph import all_initializers
from spa.inputs import graph_inputs, make_feeds, resolve_input_shapes

if TYPE_CHECKING:  # pragma: no cover
    from spa.pipeline import State

__all__ = ["SYNTHETIC_SAMPLES", "needs_gradients", "gradients_step", "gradient_weights", "trainable"]

#: Seeded synthetic feeds when no calibration data is given.
SYNTHETIC_SAMPLES = 16


def needs_gradients(s: State) -> bool:
    return "gradients" in get_criterion(s.options.criterion).needs


def trainable(model) -> list[str]:
    """Floating-point initializers, without BatchNorm running statistics."""
    inits = all_initializers(model.graph)
    stats = {n.inputs[i].name for n in model.graph.all_nodes() if n.op_type == "BatchNormalization" for i in (3, 4) if len(n.inputs) > i and n.inputs[i] is not None}
    return sorted(n for n, v in inits.items() if n not in stats and v.const_value is not None and v.const_value.dtype.is_floating_point())


def gradient_weights(s: State) -> list[str]:
    """The trainable initializers of prunable groups (those the criterion scores)."""
    names = {d.value for g in s.analysis.channels.groups if g.prunable for d in g.roles}
    return [n for n in trainable(s.analysis.model) if n in names]


def gradients_step(s: State) -> bool:
    o = s.options
    crit = get_criterion(o.criterion)
    if not isinstance(crit, GradientCriterion):
        raise UsageError(f"criterion '{crit.name}' needs gradients but does not say which (subclass spa.criteria.gradient.GradientCriterion)")
    model = s.analysis.model
    graph = TorchGraph(model)  # refuses, naming the ops, before any work
    calib = s.calibration if s.calibration is not None else open_calibration(o.calibration, model, o.calibration_samples)
    if calib is not None:
        samples = list(itertools.islice(calib.labelled(), o.calibration_samples))
        with_labels = [lab is not None for _, lab in samples]
        if any(with_labels) and not all(with_labels):
            raise UsageError("--calibration: some samples carry labels and some do not")
        labelled, source = all(with_labels), "calibration"
    else:
        shapes = resolve_input_shapes(model, o.input_shapes)
        samples = [(make_feeds(model, shapes, seed=o.seed + 1 + k, values=o.input_values), None) for k in range(SYNTHETIC_SAMPLES)]
        labelled, source = False, "synthetic"
        integer = [v.name for v in graph_inputs(model) if v.dtype is not None and not v.dtype.is_floating_point()]
        if integer:
            s.warnings.append(f"{o.criterion}: gradients from random values of the integer inputs {', '.join(integer)} (give --calibration)")
    kind = objective_name(crit, labelled)
    names = gradient_weights(s)
    s.gradients, used = compute_gradients(graph, names, crit.quantity, samples, kind, wrt=trainable(model))
    s.notes["gradients"] = {"criterion": crit.name, "quantity": crit.quantity, "objective": kind, "source": source,
                            "samples": used, "weights": len(names)}
    return False
