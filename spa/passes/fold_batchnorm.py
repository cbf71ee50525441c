"""Fold an inference BatchNormalization into the Conv or Gemm that feeds it (exact).

``BN(y) = a·(y − mean) + β`` with ``a = γ / sqrt(var + ε)`` per channel, so for
``y = W x + b``: ``W' = a·W`` (rows: Conv axis 0, Gemm's output columns) and
``b' = a·(b − mean) + β``. The producer's output takes the BN's place (a graph output keeps its
name); the producer's weight keeps its name, and so does its bias — or, where it had none, the
BN's β tensor becomes the bias under β's name. So every tensor still carries an input-model name.

It will not touch: a BN in training mode or with more than one output used; a BN whose
parameters are not constants; a producer whose weight or bias another node also reads, whose
output another node reads or is a graph output; a Gemm whose C is not a per-column vector;
ConvTranspose; subgraphs.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from spa.graph import attr
from spa.passes._rewire import bypass, can_edit, const_array, drop_unused_initializers, set_const, weight_of

__all__ = ["FoldBatchNormPass"]

logger = logging.getLogger(__name__)


def _bn_affine(bn: ir.Node) -> tuple[np.ndarray, np.ndarray] | None:
    """(a, shift) with BN(y) = a·y + shift, or None when BN is not foldable."""
    if bn.op_type != "BatchNormalization" or bn.domain not in ("", "ai.onnx") or len(bn.inputs) < 5:
        return None
    if int(attr(bn, "training_mode", 0)) or any(o.uses() or o.is_graph_output() for o in bn.outputs[1:]):
        return None
    arrays = [const_array(v) for v in bn.inputs[1:5]]
    if any(a is None for a in arrays):
        return None
    gamma, beta, mean, var = (a.astype(np.float64).reshape(-1) for a in arrays)
    a = gamma / np.sqrt(var + float(attr(bn, "epsilon", 1e-5)))
    return a, beta - a * mean


class FoldBatchNormPass(ir.passes.InPlacePass):
    """Fold ``Conv → BN`` and ``Gemm → BN`` (see the module docstring)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        count = 0
        for bn in list(graph):
            if self._fold(bn):
                count += 1
        if count:
            drop_unused_initializers(graph)
            logger.info("folded %d BatchNormalization nodes", count)
        return ir.passes.PassResult(model, bool(count))

    def _fold(self, bn: ir.Node) -> bool:
        ab = _bn_affine(bn)
        if ab is None:
            return False
        a, shift = ab
        y = bn.inputs[0]
        prod = y.producer() if y is not None else None
        if prod is None or prod.op_type not in ("Conv", "Gemm") or prod.domain not in ("", "ai.onnx"):
            return False
        if y.is_graph_output() or len(y.uses()) != 1:
            return False
        w = weight_of(prod.inputs[1])
        if w is None:
            return False
        W = w.array.astype(np.float64)
        bias = prod.inputs[2] if len(prod.inputs) > 2 else None
        if bias is not None and not can_edit(bias):
            return False
        b = const_array(bias).astype(np.float64) if bias is not None else None
        target = bias if bias is not None else bn.inputs[2]
        if bias is None and not can_edit(target):
            return False  # β is shared with another node: it cannot become this bias
        if prod.op_type == "Conv":
            if W.shape[0] != a.size:
                return False
            W2 = W * a.reshape(-1, *([1] * (W.ndim - 1)))
            b_old = b.reshape(-1) if b is not None else np.zeros(a.size)
            new_b = a * b_old + shift
        else:
            if int(attr(prod, "transA", 0)) not in (0, 1) or W.ndim != 2:
                return False
            tb = bool(attr(prod, "transB", 0))
            n_out = W.shape[0] if tb else W.shape[1]
            if n_out != a.size:
                return False
            W2 = W * (a[:, None] if tb else a[None, :])
            beta = float(attr(prod, "beta", 1.0))
            if b is not None and b.size not in (1, a.size):
                return False
            b_old = beta * np.broadcast_to(b.reshape(-1), (a.size,)) if b is not None else np.zeros(a.size)
            new_b = a * b_old + shift
            prod.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
        w.write(W2)
        set_const(target, new_b.reshape(-1) if bias is None or b.ndim == 1 else new_b.reshape(b.shape if b.size == a.size else (1, -1)))
        if bias is None:
            prod.resize_inputs(3)
            # β is read by the BN now and by the producer from here on: detach it from the BN first.
            bn.replace_input_with(2, None)
            prod.replace_input_with(2, target)
        if not bypass(bn, y):
            raise AssertionError(f"{bn.name}: BatchNormalization could not be bypassed after folding")  # checked above
        logger.debug("folded %s into %s", bn.name, prod.name)
        return True
