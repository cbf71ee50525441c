"""Remove nodes that compute their input unchanged (exact).

Removed: ``Identity``; inference ``Dropout`` (its mask unused, no training_mode input set);
``Mul``/``Div`` by a constant 1 and ``Add``/``Sub`` of a constant 0 that do not broadcast the
input larger (a scalar, or all-ones/zeros of a rank not above the input's with every dim 1 or
equal); ``Transpose`` with the identity permutation; ``Reshape``/``Expand`` to the input's own
static shape; ``Cast`` to the input's own type; ``Pad`` with all-zero pads;
``Squeeze``/``Unsqueeze`` with no axes to act on are left (they are not no-ops by spec).

Readers move to the input; a removed node's graph-output name moves to its input (onnx-ir's
``IdentityEliminationPass`` rules). It will not touch: a node whose output is a graph output
when its input is a graph input, an initializer or another graph output; subgraphs.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from spa.graph import attr
from spa.passes._rewire import bypass, const_array, drop_unused_initializers

__all__ = ["RemoveIdentityPass"]

logger = logging.getLogger(__name__)


def _static(shape: ir.Shape | None) -> list[int] | None:
    if shape is None or not all(isinstance(d, int) for d in shape):
        return None
    return [int(d) for d in shape]


def _neutral(node: ir.Node, x: ir.Value, c: np.ndarray | None, value: float) -> bool:
    if c is None or not np.all(c == value):
        return False
    if c.ndim == 0 or c.size == 1 and c.ndim == 0:
        return True
    if x.shape is None or c.ndim > len(x.shape):
        return False
    dims = list(x.shape)[len(x.shape) - c.ndim:]
    return all(s == 1 or (isinstance(d, int) and d == s) for s, d in zip(c.shape, dims))


def _no_op_input(node: ir.Node) -> ir.Value | None:
    """The input ``node`` passes through unchanged, or None."""
    if node.domain not in ("", "ai.onnx") or len(node.outputs) < 1 or not node.inputs or node.inputs[0] is None:
        return None
    op, x = node.op_type, node.inputs[0]
    out = node.outputs[0]
    if op == "Identity":
        return x
    if op == "Dropout":
        extra = node.outputs[1:]
        training = node.inputs[2] if len(node.inputs) > 2 else None
        if any(o.uses() or o.is_graph_output() for o in extra):
            return None
        if training is not None and (const_array(training) is None or bool(const_array(training).reshape(-1)[0])):
            return None
        return x
    if len(node.outputs) != 1:
        return None
    if op in ("Mul", "Div", "Add", "Sub") and len(node.inputs) == 2:
        other = node.inputs[1]
        if _neutral(node, x, const_array(other), 1.0 if op in ("Mul", "Div") else 0.0):
            return x
        if op in ("Mul", "Add") and other is not None and _neutral(node, other, const_array(x), 1.0 if op == "Mul" else 0.0):
            return other
        return None
    if op == "Transpose":
        perm = attr(node, "perm", None)
        return x if perm is not None and list(perm) == list(range(len(perm))) else None
    if op in ("Reshape", "Expand"):
        s_in, s_out = _static(x.shape), _static(out.shape)
        return x if s_in is not None and s_in == s_out else None
    if op == "Cast":
        return x if x.dtype is not None and int(attr(node, "to", -1)) == x.dtype.value else None
    if op == "Pad":
        pads = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
        return x if pads is not None and not np.any(pads) else None
    return None


class RemoveIdentityPass(ir.passes.InPlacePass):
    """See the module docstring."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        count = 0
        for node in list(graph):
            x = _no_op_input(node)
            if x is not None and x.dtype == node.outputs[0].dtype or (x is not None and node.outputs[0].dtype is None):
                if bypass(node, x):
                    count += 1
        if count:
            drop_unused_initializers(graph)
            logger.info("removed %d no-op nodes", count)
        return ir.passes.PassResult(model, bool(count))
