"""Merge two consecutive linear ops with nothing non-linear between them, when that is cheaper.

``y = W₂ (W₁ x + b₁) + b₂ = (W₂W₁) x + (W₂ b₁ + b₂)``. Handled chains (each intermediate value
read by the next op only):

- ``MatMul(x, P) → MatMul(·, Q)``, also with a bias ``Add`` after the first when the second has
  one too (``MatMul → Add(b₁) → MatMul → Add(b₂)``);
- ``Gemm → Gemm`` (the second without transA; the first's C a per-column vector or absent);
- ``Conv (any kernel) → 1×1 Conv`` with stride 1, no padding, dilation 1 and the same group count
  (what the ``lowrank`` pass emits).

It merges only where the merged weight has no more elements than the two together (MACs per
output position for all three forms): a factor pair whose rank no longer pays (after pruning,
or in a torch ``Linear → Linear`` export) is fused back; one that pays is left alone. The second
op survives (its name, output and bias names); the merged weight takes the name the pair came
from (``W`` for ``W.lowrank_in``/``W.lowrank_out``), else the second weight's name.

It will not touch: shared weights or biases, an intermediate read elsewhere or a graph output,
a first bias the second op has no bias to absorb, Conv pairs with other attributes, subgraphs.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from spa.graph import attr
from spa.passes._rewire import Weight, can_edit, const_array, drop_unused_initializers, only_reader, remove_dead, set_const, weight_of

__all__ = ["MergeLinearPass"]

logger = logging.getLogger(__name__)


def _merged_name(first: str, second: str) -> str:
    a, b = first.removesuffix(".lowrank_in"), second.removesuffix(".lowrank_out")
    return a if a == b and a != first else second


def _ints(node: ir.Node, name: str, default: int) -> list[int]:
    v = attr(node, name, None)
    return [int(x) for x in v] if v is not None else []


class MergeLinearPass(ir.passes.InPlacePass):
    """See the module docstring. ``always=True`` merges also where it costs more (tests)."""

    def __init__(self, always: bool = False) -> None:
        super().__init__()
        self.always = always

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        count = 0
        for node in list(graph):
            if node.graph is graph and node.domain in ("", "ai.onnx") and self._merge(graph, node):
                count += 1
        if count:
            drop_unused_initializers(graph)
            logger.info("merged %d pairs of linear ops", count)
        return ir.passes.PassResult(model, bool(count))

    def _cheaper(self, w1: np.ndarray, w2: np.ndarray, merged_size: int) -> bool:
        return self.always or merged_size <= w1.size + w2.size

    def _merge(self, graph: ir.Graph, first: ir.Node) -> bool:
        if first.op_type not in ("MatMul", "Gemm", "Conv"):
            return False
        p = weight_of(first.inputs[1] if len(first.inputs) > 1 else None)
        if p is None or p.array.dtype.kind != "f":
            return False
        P = p.array
        t = first.outputs[0]
        nxt = only_reader(t)
        b1 = b1v = None
        if first.op_type == "MatMul" and nxt is not None and nxt.op_type == "Add":
            other = nxt.inputs[1] if nxt.inputs[0] is t else nxt.inputs[0]
            if const_array(other) is None or not can_edit(other):
                return False
            b1v, b1 = other, const_array(other).astype(np.float64)
            t = nxt.outputs[0]
            add1, nxt = nxt, only_reader(t)
        if nxt is None or nxt.op_type != first.op_type or nxt.domain not in ("", "ai.onnx") or nxt.inputs[0] is not t:
            return False
        q = weight_of(nxt.inputs[1] if len(nxt.inputs) > 1 else None)
        if q is None or q.array.dtype.kind != "f":
            return False
        Q = q.array
        if first.op_type == "MatMul":
            return self._matmul(graph, first, nxt, p, P, q, Q, b1v, b1, add1 if b1v is not None else None)
        if first.op_type == "Gemm":
            return self._gemm(graph, first, nxt, p, P, q, Q)
        return self._conv(graph, first, nxt, p, P, q, Q)

    def _finish(self, graph: ir.Graph, first: ir.Node, second: ir.Node, p: Weight, q: Weight, merged: np.ndarray, extra: list[ir.Node] = ()) -> None:
        name = _merged_name(p.name, q.name)
        x = first.inputs[0]
        q.write(merged)
        second.replace_input_with(0, x)
        for n in [*extra, first]:
            graph.remove(n, safe=True)
        remove_dead(graph)
        v = q.value
        if name != v.name and name not in graph.initializers:
            v.name = name  # onnx-ir re-keys graph.initializers
            v.const_value.name = name
        logger.debug("merged %s into %s", first.name, second.name)

    def _matmul(self, graph, first, second, p, P, q, Q, b1v, b1, add1) -> bool:
        if P.ndim != 2 or Q.ndim != 2:
            return False
        merged = P.astype(np.float64) @ Q.astype(np.float64)
        if not self._cheaper(P, Q, merged.size):
            return False
        if b1v is not None:
            add2 = only_reader(second.outputs[0])
            if add2 is None or add2.op_type != "Add":
                return False
            b2v = add2.inputs[1] if add2.inputs[0] is second.outputs[0] else add2.inputs[0]
            b2 = const_array(b2v)
            if b2 is None or not can_edit(b2v) or b1.size not in (1, P.shape[1]) or b2.size not in (1, Q.shape[1]):
                return False
            shift = np.broadcast_to(b1.reshape(-1), (P.shape[1],)) @ Q.astype(np.float64)
            set_const(b2v, (np.broadcast_to(b2.reshape(-1), (Q.shape[1],)) + shift).reshape((1,) * (b2.ndim - 1) + (-1,) if b2.ndim else (-1,)))
        self._finish(graph, first, second, p, q, merged, [add1] if add1 is not None else [])
        return True

    def _gemm(self, graph, first, second, p, P, q, Q) -> bool:
        if int(attr(second, "transA", 0)):
            return False
        B1 = P.T if int(attr(first, "transB", 0)) else P  # [K, R]
        B2 = Q.T if int(attr(second, "transB", 0)) else Q  # [R, N]
        merged = B1.astype(np.float64) @ B2.astype(np.float64)
        if not self._cheaper(P, Q, merged.size):
            return False
        a1, a2 = float(attr(first, "alpha", 1.0)), float(attr(second, "alpha", 1.0))
        c1v = first.inputs[2] if len(first.inputs) > 2 else None
        c2v = second.inputs[2] if len(second.inputs) > 2 else None
        n = B2.shape[1]
        bias = np.zeros(n)
        if c1v is not None:
            c1 = const_array(c1v)
            if c1 is None or c1.size not in (1, B1.shape[1]):
                return False
            bias += a2 * float(attr(first, "beta", 1.0)) * (np.broadcast_to(c1.reshape(-1), (B1.shape[1],)) @ B2)
        if c2v is not None:
            c2 = const_array(c2v)
            if c2 is None or not can_edit(c2v) or c2.size not in (1, n):
                return False
            bias += float(attr(second, "beta", 1.0)) * np.broadcast_to(c2.reshape(-1), (n,))
        elif c1v is not None:
            if not can_edit(c1v):
                return False
            first.replace_input_with(2, None)
            second.resize_inputs(3)
            second.replace_input_with(2, c1v)
            c2v = c1v
        if c2v is not None:
            set_const(c2v, bias)
        second.attributes["alpha"] = ir.AttrFloat32("alpha", a1 * a2)
        second.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
        second.attributes["transB"] = ir.AttrInt64("transB", 0)
        second.attributes["transA"] = ir.AttrInt64("transA", int(attr(first, "transA", 0)))
        self._finish(graph, first, second, p, q, merged)
        return True

    def _conv(self, graph, first, second, p, P, q, Q) -> bool:
        nd = Q.ndim - 2
        if any(int(k) != 1 for k in Q.shape[2:]) or _ints(second, "strides", 1) not in ([], [1] * nd):
            return False
        if _ints(second, "pads", 0) not in ([], [0] * 2 * nd) or _ints(second, "dilations", 1) not in ([], [1] * nd):
            return False
        if attr(second, "auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET", "VALID", b"VALID"):
            return False
        g = int(attr(first, "group", 1))
        if int(attr(second, "group", 1)) != g or P.shape[0] % g or Q.shape[0] % g:
            return False
        r, m = P.shape[0] // g, Q.shape[0] // g
        if Q.shape[1] != r:
            return False
        A = P.reshape(g, r, -1).astype(np.float64)
        B = Q.reshape(g, m, r).astype(np.float64)
        merged = np.einsum("gmr,grn->gmn", B, A).reshape(g * m, *P.shape[1:])
        if not self._cheaper(P, Q, merged.size):
            return False
        b1v = first.inputs[2] if len(first.inputs) > 2 else None
        b2v = second.inputs[2] if len(second.inputs) > 2 else None
        if b1v is not None:
            b1 = const_array(b1v)
            if b1 is None or (b2v is not None and (const_array(b2v) is None or not can_edit(b2v))) or (b2v is None and not can_edit(b1v)):
                return False
            shift = np.einsum("gmr,gr->gm", B, b1.astype(np.float64).reshape(g, r)).reshape(-1)
            if b2v is None:
                first.replace_input_with(2, None)
                second.resize_inputs(3)
                second.replace_input_with(2, b1v)
                set_const(b1v, shift)
            else:
                set_const(b2v, const_array(b2v).astype(np.float64).reshape(-1) + shift)
        for k in ("kernel_shape", "strides", "pads", "dilations", "auto_pad"):
            second.attributes.pop(k, None)
            if k in first.attributes:
                second.attributes[k] = first.attributes[k]
        self._finish(graph, first, second, p, q, merged)
        return True
