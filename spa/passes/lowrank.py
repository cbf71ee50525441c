"""The ``lowrank`` pass: replace chosen layers by a factor pair (METHODS.md §6.1–6.2).

``LowRankPass({weight name: rank})`` rewrites each named layer (``spa.factorize.find_layers``):

- Gemm ``Y = α·A'·B' + β·C`` → ``Gemm(A, P; transA, α)`` then ``Gemm(·, Q, C; β)``;
- MatMul ``X·B`` → ``MatMul(X, P)`` then ``MatMul(·, Q)`` (a bias ``Add`` after it stays);
- Conv → a Conv with the layer's kernel, strides, pads, dilations and group and ``r`` outputs
  per group, then a 1×1 Conv (same group count) with the original bias.

The original node becomes the *second* factor, so its name, its output value (graph outputs,
downstream readers) and its bias keep their names; the first factor is a new node
``<node>/lowrank`` inserted before it. The factor weights are new initializers
``<weight>.lowrank_in`` / ``<weight>.lowrank_out``; the weight they replace (the input model's
name, which reports use) is removed. With a whitener ``L`` for a weight (``whiteners``) the
factors come from the activation-whitened SVD.

It will not touch: layers not named, layers :func:`~spa.factorize.find_layers` refuses (a shared
or non-float weight, a batched MatMul weight), subgraphs. Ranks are checked (≥ 1, ≤ full
rank); a rank that does not pay is applied anyway when asked for explicitly (an oracle run
asks for full rank), the pipeline never asks for one.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from spa.errors import UsageError
from spa.graph import all_initializers, attr
from spa.factorize import Layer, factor, find_layers
from spa.passes.canonicalize import infer_shapes

__all__ = ["LowRankPass"]

logger = logging.getLogger(__name__)


class LowRankPass(ir.passes.InPlacePass):
    """Factorize the layers named in ``ranks`` (weight name → rank); see the module docstring.

    Attributes:
        ranks: weight name (the input model's) → rank.
        whiteners: weight name → Cholesky factor of its input's E[x xᵀ] (Gemm/MatMul only).
        factors: weight name → precomputed ``(W₂, W₁)`` (``spa.factorize.factor``) at that rank.
    """

    def __init__(self, ranks: Mapping[str, int], whiteners: Mapping[str, np.ndarray] | None = None,
                 factors: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None) -> None:
        super().__init__()
        self.ranks = dict(ranks)
        self.whiteners = dict(whiteners or {})
        #: weight → (W₂, W₁) already computed by the caller at that rank (the pipeline reuses them)
        self.factors = dict(factors or {})

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if not self.ranks:
            return ir.passes.PassResult(model, False)
        layers, refused = find_layers(model)
        by_weight = {l.weight: l for l in layers}
        missing = [w for w in self.ranks if w not in by_weight]
        if missing:
            raise UsageError(f"cannot factorize '{missing[0]}': not the weight of a factorable Gemm/MatMul/Conv of this model")
        graph = model.graph
        inits = all_initializers(graph)
        nodes = {n.name: n for n in graph}
        for weight, rank in self.ranks.items():
            layer = by_weight[weight]
            if not 1 <= rank <= layer.full_rank:
                raise UsageError(f"rank {rank} for '{weight}' is out of range [1, {layer.full_rank}]")
            value = inits[weight]
            array = value.const_value.numpy()
            w2, w1 = self.factors.get(weight) or factor(layer, array, rank, self.whiteners.get(weight))
            if w1.shape[1] != rank:
                raise ValueError(f"factors for '{weight}' have rank {w1.shape[1]}, not {rank}")
            _rewrite(graph, nodes[layer.node], layer, value, w2.astype(array.dtype), w1.astype(array.dtype))
            logger.debug("factorized %s (%s) at rank %d of %d", layer.node, weight, rank, layer.full_rank)
        io = {v.name for v in (*graph.inputs, *graph.outputs)}
        for node in graph:
            for v in node.outputs:
                if v.name not in io:
                    v.shape = None
        infer_shapes(model)
        return ir.passes.PassResult(model, True)


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    while name in graph.initializers:
        name += "_"
    v = ir.val(name, ir.DataType.from_numpy(array.dtype), ir.Shape(array.shape), const_value=ir.tensor(np.ascontiguousarray(array), name=name))
    graph.register_initializer(v)
    return v


def _rewrite(graph: ir.Graph, node: ir.Node, layer: Layer, weight: ir.Value, w2: np.ndarray, w1: np.ndarray) -> None:
    """First factor: a new node before ``node``; ``node`` becomes the second factor."""
    g, r = layer.groups, w1.shape[1]
    if layer.op_type == "Conv":
        kernel = layer.weight_shape[2:]
        first_w = w1.reshape(g * r, layer.weight_shape[1], *kernel)  # [g·r, C/g, k…]
        second_w = w2.transpose(0, 1, 2).reshape(g * layer.m, r, *([1] * len(kernel)))  # [M, r, 1…]
    else:
        first_w = w1[0].T  # [K, r]: x · P
        second_w = w2[0].T  # [r, N]
    p = _initializer(graph, f"{weight.name}.lowrank_in", first_w)
    q = _initializer(graph, f"{weight.name}.lowrank_out", second_w)
    x = node.inputs[0]
    if layer.op_type == "Conv":
        attrs = [a for k, a in node.attributes.items() if k != "kernel_shape"]
        first = ir.node("Conv", [x, p], attributes={a.name: a for a in attrs}, name=f"{node.name}/lowrank", num_outputs=1)
        nd = len(kernel)
        for k in ("strides", "dilations"):
            node.attributes[k] = ir.AttrInt64s(k, [1] * nd)
        node.attributes["pads"] = ir.AttrInt64s("pads", [0] * (2 * nd))
        node.attributes["kernel_shape"] = ir.AttrInt64s("kernel_shape", [1] * nd)
        node.attributes.pop("auto_pad", None)
    elif layer.op_type == "Gemm":
        first = ir.node(
            "Gemm", [x, p], name=f"{node.name}/lowrank", num_outputs=1,
            attributes={"transA": int(attr(node, "transA", 0)), "alpha": float(attr(node, "alpha", 1.0))},
        )
        node.attributes.pop("transA", None)
        node.attributes.pop("transB", None)
        node.attributes.pop("alpha", None)
    else:
        first = ir.node("MatMul", [x, p], name=f"{node.name}/lowrank", num_outputs=1)
    first.outputs[0].name = f"{node.name}/lowrank_output"
    first.outputs[0].dtype = weight.dtype
    graph.insert_before(node, first)
    node.replace_input_with(0, first.outputs[0])
    node.replace_input_with(1, q)
    if not weight.uses():
        graph.initializers.pop(weight.name, None)
