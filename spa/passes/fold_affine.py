"""Fold per-channel constant Mul/Div/Add/Sub after a linear op into its weights (exact).

For ``t = W x + b`` read only by ``Mul(t, c)`` / ``Div(t, c)`` / ``Add(t, c)`` / ``Sub(t, c)``
with ``c`` a constant that is a scalar or varies along the output channel only (Conv: axis 1,
``[M,1,1]`` / ``[1,M,1,1]``; Gemm/MatMul: the last axis, ``[N]`` / ``[1,N]``):

- scale: ``W' = c·W`` (Conv rows, Gemm/MatMul output columns), ``b' = c·b``;
- shift: ``b' = b + c``.

The bias is the Conv's ``B``, the Gemm's ``C`` (a per-column vector), or, for a MatMul, the
constant of the ``Add`` right after it (``MatMul → Add(b) → Mul(c)`` scales both). A shift on
a Conv or Gemm without a bias makes ``c`` (its name kept) the bias. Weights and biases keep
their names; the folded node goes and its output name moves to the linear op's output.

It will not touch: a constant that broadcasts the output to a larger shape or varies along
another axis; ``c − t`` or ``c / t`` (the constant first for Sub/Div); a weight or bias another
node also reads; a linear output that another node reads or that is a graph output; a shift
after a bias-less MatMul (that Add *is* its bias); input-side constants; subgraphs.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from spa.graph import attr
from spa.passes._rewire import bypass, can_edit, const_array, drop_unused_initializers, set_const, weight_of

__all__ = ["FoldAffinePass"]

logger = logging.getLogger(__name__)

_OPS = ("Mul", "Div", "Add", "Sub")


def _per_channel(c: np.ndarray, rank: int | None, axis: int, channels: int) -> np.ndarray | None:
    """``c`` as a length-``channels`` vector when it is a scalar or varies along ``axis`` of a
    rank-``rank`` output only, without broadcasting the output larger; else None."""
    if c.size == 1 and (c.ndim == 0 or (rank is not None and c.ndim <= rank)):
        return np.full(channels, float(c.reshape(-1)[0]))
    if rank is None or c.ndim > rank:
        return None
    shape = (1,) * (rank - c.ndim) + c.shape
    want = [1] * rank
    want[axis] = channels
    if list(shape) != want:
        return None
    return c.reshape(-1).astype(np.float64)


class FoldAffinePass(ir.passes.InPlacePass):
    """See the module docstring."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        count = 0
        for node in list(graph):
            if node.op_type in _OPS and node.domain in ("", "ai.onnx") and node.graph is graph and self._fold(node):
                count += 1
        if count:
            drop_unused_initializers(graph)
            logger.info("folded %d per-channel Mul/Add constants", count)
        return ir.passes.PassResult(model, bool(count))

    def _fold(self, node: ir.Node) -> bool:
        if len(node.inputs) != 2:
            return False
        t, cv = node.inputs
        if node.op_type in ("Mul", "Add") and const_array(t) is not None and const_array(cv) is None:
            t, cv = cv, t  # commutative: the constant may come first
        c = const_array(cv)
        if c is None or t is None or c.dtype.kind != "f" or t.is_graph_output() or len(t.uses()) != 1:
            return False
        prod = t.producer()
        if prod is None or prod.domain not in ("", "ai.onnx"):
            return False
        rank = len(t.shape) if t.shape is not None else None
        scale = node.op_type in ("Mul", "Div")
        matmul_bias = None
        if prod.op_type == "Add" and len(prod.inputs) == 2:  # MatMul → Add(b) → this
            u, bv = prod.inputs
            if const_array(u) is not None:
                u, bv = bv, u
            mm = u.producer() if u is not None else None
            if mm is None or mm.op_type != "MatMul" or const_array(bv) is None or u.is_graph_output() or len(u.uses()) != 1:
                return False
            matmul_bias, prod = bv, mm
        if prod.op_type not in ("Conv", "Gemm", "MatMul"):
            return False
        w = weight_of(prod.inputs[1])
        if w is None or w.array.dtype.kind != "f":
            return False
        W = w.array
        if prod.op_type == "Conv":
            axis, channels = 1, W.shape[0]
        elif prod.op_type == "Gemm":
            tb = bool(attr(prod, "transB", 0))
            axis, channels = (rank - 1 if rank else 1), (W.shape[0] if tb else W.shape[1])
        else:
            if W.ndim != 2:
                return False
            axis, channels = (rank - 1 if rank else None), W.shape[1]
            if axis is None:
                return False
        vec = _per_channel(c, rank, axis, channels)
        if vec is None:
            return False
        if node.op_type == "Div":
            if not np.all(vec != 0):
                return False
            vec = 1.0 / vec
        elif node.op_type == "Sub":
            vec = -vec
        bias = matmul_bias if matmul_bias is not None else (prod.inputs[2] if prod.op_type != "MatMul" and len(prod.inputs) > 2 else None)
        if bias is not None and not can_edit(bias):
            return False
        b = const_array(bias).astype(np.float64) if bias is not None else None
        if b is not None and b.size not in (1, channels):
            return False
        if prod.op_type == "Gemm" and b is not None:
            b = float(attr(prod, "beta", 1.0)) * b
        if scale:
            if prod.op_type == "Conv":
                w.write(W * vec.reshape(-1, *([1] * (W.ndim - 1))))
            elif prod.op_type == "Gemm" and bool(attr(prod, "transB", 0)):
                w.write(W * vec[:, None])
            else:
                w.write(W * vec[None, :])
            if b is not None:
                set_const(bias, (np.broadcast_to(b.reshape(-1), (channels,)) * vec).reshape(_bias_shape(b, channels)))
        else:
            if b is not None:
                set_const(bias, (np.broadcast_to(b.reshape(-1), (channels,)) + vec).reshape(_bias_shape(b, channels)))
            elif prod.op_type == "MatMul" or not can_edit(cv):
                return False
            else:
                set_const(cv, vec.astype(c.dtype))
                node.replace_input_with(list(node.inputs).index(cv), None)
                prod.resize_inputs(3)
                prod.replace_input_with(2, cv)
        if prod.op_type == "Gemm" and b is not None or (prod.op_type == "Gemm" and not scale):
            prod.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
        if not bypass(node, t):
            raise AssertionError(f"{node.name}: could not be bypassed after folding")
        logger.debug("folded %s into %s", node.name, prod.name)
        return True


def _bias_shape(b: np.ndarray, channels: int) -> tuple[int, ...]:
    return (channels,) if b.ndim <= 1 else tuple(channels if s != 1 else 1 for s in b.shape) if b.size == channels else (1,) * (b.ndim - 1) + (channels,)
