"""Resolve Reshape output shapes that ONNX inference leaves open in dynamic-batch exports.

``x.view(x.size(0), -1)`` and ``q.view(bsz, seq, heads, d)`` build their target from ``Shape``
pieces. With a symbolic batch, ONNX inference gives up on the whole output (``[N, ?]``), and
every channel after it would be frozen. Here the target is evaluated *symbolically*: a piece
taken from ``Shape(t)`` is t's own symbolic dim, so ``[N, -1]`` of an ``[N, 8, 2, 2]`` input
is ``[N, 32]`` — proven, since the symbols cancel (``-1`` is solved only when every symbolic
input dim is matched by the same symbol in the target).

Only shapes are written (never a tensor or a node); unresolvable targets are left alone.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import onnx_ir as ir

from spa.graph import all_nodes

__all__ = ["ResolveReshapesPass", "symbolic_value"]

logger = logging.getLogger(__name__)

Dims = list  # of int | ir.SymbolicDim


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None or value.is_graph_input():
        return None
    return value.const_value.numpy()


def symbolic_value(value: ir.Value | None, depth: int = 8) -> Dims | None:
    """A small 1-D integer tensor as a list of ints and symbols, when provable."""
    if value is None or depth == 0:
        return None
    c = _const(value)
    if c is not None:
        return [int(v) for v in c.reshape(-1)] if c.ndim <= 1 else None
    node = value.producer()
    if node is None:
        return None
    op, ins = node.op_type, node.inputs
    if op == "Shape":
        if ins[0] is None or ins[0].shape is None:
            return None
        start = int(node.attributes["start"].value) if "start" in node.attributes else 0
        end = node.attributes["end"].value if "end" in node.attributes else None
        return list(ins[0].shape.dims)[slice(start, None if end is None else int(end))]
    if op in ("Cast", "Identity", "Squeeze", "Unsqueeze"):
        return symbolic_value(ins[0], depth - 1)
    if op == "Concat":
        out: Dims = []
        for piece in ins:
            dims = symbolic_value(piece, depth - 1)
            if dims is None:
                return None
            out.extend(dims)
        return out
    if op == "Gather":
        data, idx = symbolic_value(ins[0], depth - 1), _const(ins[1])
        axis = int(node.attributes["axis"].value) if "axis" in node.attributes else 0
        if data is None or idx is None or axis != 0:
            return None
        return [data[int(i)] for i in idx.reshape(-1)]
    if op == "Slice":
        data = symbolic_value(ins[0], depth - 1)
        starts, ends = _const(ins[1]), _const(ins[2])
        steps = _const(ins[4]) if len(ins) > 4 and ins[4] is not None else None
        if data is None or starts is None or ends is None or (steps is not None and int(steps.reshape(-1)[0]) != 1):
            return None
        lo, hi, _ = slice(int(starts.reshape(-1)[0]), int(ends.reshape(-1)[0]), 1).indices(len(data))
        return data[lo:hi]
    return None


def _resolve(in_dims: Dims, target: Dims, allowzero: bool) -> Dims | None:
    dims = list(target)
    for k, d in enumerate(dims):
        if d == 0 and not allowzero:
            if k >= len(in_dims):
                return None
            dims[k] = in_dims[k]
    if sum(1 for d in dims if d == -1) > 1:
        return None
    if -1 in dims:
        sym_in = sorted(str(d.value) for d in in_dims if not isinstance(d, int))
        sym_out = sorted(str(d.value) for d in dims if not isinstance(d, int))
        if any(not isinstance(d, int) and d.value is None for d in (*in_dims, *dims)) or sym_in != sym_out:
            return None
        known = math.prod(d for d in dims if isinstance(d, int) and d != -1)
        total = math.prod(d for d in in_dims if isinstance(d, int))
        if known == 0 or total % known:
            return None
        dims[dims.index(-1)] = total // known
    return dims


class ResolveReshapesPass(ir.passes.InPlacePass):
    """Fill in Reshape output dims that a symbolic target proves (see module docstring)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        count = 0
        for node in all_nodes(model.graph):
            if node.op_type != "Reshape" or len(node.inputs) < 2:
                continue
            x, y = node.inputs[0], node.outputs[0]
            if x is None or x.shape is None or (y.shape is not None and all(isinstance(d, int) for d in y.shape.dims)):
                continue
            target = symbolic_value(node.inputs[1])
            if target is None:
                continue
            allowzero = "allowzero" in node.attributes and int(node.attributes["allowzero"].value) == 1
            dims = _resolve(list(x.shape.dims), target, allowzero)
            if dims is None or (y.shape is not None and len(y.shape) != len(dims)):
                continue
            if y.shape is not None:
                # Keep what inference knew; fill only the unknowns.
                dims = [old if isinstance(old, int) or not isinstance(new, int) else new for old, new in zip(y.shape.dims, dims)]
            new = ir.Shape(dims)
            if y.shape is None or list(y.shape.dims) != list(new.dims):
                y.shape = new
                count += 1
        if count:
            logger.info("resolved %d reshape output shapes", count)
        return ir.passes.PassResult(model, bool(count))
