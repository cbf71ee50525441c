"""Surgery: execute a plan on the model.

Slices every initializer the plan names along its axes (names kept, so plans, reports and
state_dict keys keep pointing at the same tensors), applies the attribute and constant
rewrites the rules asked for, then re-infers the shapes of intermediate values. Graph inputs
and outputs are never touched. The pass consults no rule: a plan is all it needs, which is
what makes ``spa apply`` a faithful replay.

A constant input that another node also reads (a shape constant shared by two Reshapes) is
not edited in place: the rewritten copy gets its own initializer named after the node.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from spa.errors import PlanMismatchError
from spa.passes.canonicalize import infer_shapes
from spa.planning import Plan
from spa.rules.base import AttrRewrite, ConstRewrite
from spa.graph import all_initializers

__all__ = ["PrunePass", "slice_tensor"]

logger = logging.getLogger(__name__)


def slice_tensor(array: np.ndarray, kept: dict[int, list[int]]) -> np.ndarray:
    """Keep ``kept[axis]`` along each axis; one contiguous copy at the end."""
    out = array
    for axis, idx in sorted(kept.items()):
        out = np.take(out, np.asarray(idx, dtype=np.int64), axis=axis)
    return np.ascontiguousarray(out)


class PrunePass(ir.passes.InPlacePass):
    """Apply a :class:`~spa.planning.Plan` (see module docstring)."""

    def __init__(self, plan: Plan) -> None:
        super().__init__()
        self.plan = plan

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if self.plan.empty:
            return ir.passes.PassResult(model, False)
        graph = model.graph
        initializers = all_initializers(graph)
        for edit in self.plan.tensors:
            value = initializers.get(edit.name)
            if value is None or value.const_value is None:
                raise PlanMismatchError(f"plan slices '{edit.name}', which is not an initializer of this model")
            if [int(s) for s in value.shape] != edit.shape:
                raise PlanMismatchError(f"plan expects '{edit.name}' of shape {edit.shape}, the model has {list(value.shape)}")
            new = slice_tensor(value.const_value.numpy(), edit.kept)
            value.const_value = ir.tensor(new, name=edit.name)
            value.shape = ir.Shape(new.shape)
            logger.debug("sliced %s to %s", edit.name, new.shape)

        nodes = {n.name: n for n in graph.all_nodes()}
        for rw in self.plan.rewrites:
            node = nodes.get(rw.node)
            if node is None:
                raise PlanMismatchError(f"plan rewrites node '{rw.node}', which this model does not have")
            if isinstance(rw, AttrRewrite):
                _set_attr(node, rw)
            else:
                _set_const_input(graph, node, rw)

        io = {v.name for v in (*graph.inputs, *graph.outputs)}
        for node in graph.all_nodes():
            for v in node.outputs:
                if v.name not in io:
                    v.shape = None
        infer_shapes(model)
        return ir.passes.PassResult(model, True)


def _set_attr(node: ir.Node, rw: AttrRewrite) -> None:
    if rw.value is None:
        node.attributes.pop(rw.name, None)
        return
    if isinstance(rw.value, list):
        attr = ir.AttrFloat32s(rw.name, rw.value) if any(isinstance(x, float) for x in rw.value) else ir.AttrInt64s(rw.name, rw.value)
    elif isinstance(rw.value, float):
        attr = ir.AttrFloat32(rw.name, rw.value)
    else:
        attr = ir.AttrInt64(rw.name, int(rw.value))
    node.attributes[rw.name] = attr


def _set_const_input(graph: ir.Graph, node: ir.Node, rw: ConstRewrite) -> None:
    array = np.asarray(rw.value, dtype=np.int64)
    current = node.inputs[rw.index] if rw.index < len(node.inputs) else None
    shared = current is not None and (len(current.uses()) > 1 or current.is_graph_output() or current.is_graph_input())
    if current is not None and current.is_initializer() and not shared:
        array = array.astype(current.const_value.numpy().dtype)
        current.const_value = ir.tensor(array, name=current.name)
        current.shape = ir.Shape(array.shape)
        return
    base = current.name if current is not None else f"{node.name}_input{rw.index}"
    name = f"{base}__spa_{node.name}"
    while name in graph.initializers:
        name += "_"
    new = ir.val(name, ir.DataType.INT64, ir.Shape(array.shape), const_value=ir.tensor(array, name=name))
    graph.register_initializer(new)
    if rw.index >= len(node.inputs):
        node.resize_inputs(rw.index + 1)
    node.replace_input_with(rw.index, new)
