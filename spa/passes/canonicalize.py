"""Canonicalize: bring any loaded model into the form the analyses expect.

- model-local functions are inlined (their bodies are ordinary nodes to the rules);
- every Constant node becomes an initializer (PaddlePaddle and torch exports keep weights and
  shape constants in Constant nodes; rules read constants from initializers only), and
  initializers of If/Loop bodies move to the main graph (surgery edits one table);
- nodes get unique non-empty names (plans and reports address nodes by name);
- nodes are sorted topologically (the channel analysis walks in order);
- shapes are inferred, so every rule can ask for static sizes;
- shape arithmetic over static sizes is folded into constants (``FoldShapesPass``), so a
  ``view(x.size(0), -1)`` or a torch RNN's zero state is a proven Reshape/Expand; nodes and
  initializers nothing reads are dropped.

Tensors are never copied or changed: only where they live (Constant → initializer). The pass
does not touch graph inputs, outputs or initializer names, so plans keep pointing at the input
model's tensors.
"""

from __future__ import annotations

import logging

import onnx_ir as ir
import onnx_ir.passes.common as common

from spa.passes.fold_shapes import FoldShapesPass

__all__ = ["CanonicalizePass"]

logger = logging.getLogger(__name__)


class CanonicalizePass(ir.passes.InPlacePass):
    """Inline, lift constants, name, sort and infer shapes (see module docstring)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for p in (
            common.InlinePass(),
            common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
            common.LiftSubgraphInitializersToMainGraphPass(),
            common.NameFixPass(),
            common.TopologicalSortPass(),
        ):
            modified |= p(model).modified
        infer_shapes(model)
        if FoldShapesPass()(model).modified:
            modified = True
            infer_shapes(model)
        modified |= common.RemoveUnusedNodesPass()(model).modified
        modified |= _remove_unused_initializers(model)
        return ir.passes.PassResult(model, modified)


# Ops whose first output always has the first input's shape; ONNX shape inference leaves some
# of them unshaped (GroupNormalization), which would freeze their channels needlessly.
_SAME_SHAPE = frozenset({"GroupNormalization", "InstanceNormalization", "LayerNormalization", "BatchNormalization"})


def infer_shapes(model: ir.Model) -> None:
    """Run ONNX shape inference, keeping what is known when inference cannot finish.

    Strict inference refuses some valid models (custom domains, …); a non-strict pass still
    fills in what it can, and values left without shapes simply block their channels.
    Same-shape ops that inference leaves unshaped get their input's shape, then inference
    runs once more so their consumers are shaped too.
    """
    _infer(model)
    _unknown_dims_are_symbolic(model)
    filled = False
    for node in model.graph.all_nodes():
        out = node.outputs[0] if node.outputs else None
        if node.op_type in _SAME_SHAPE and out is not None and out.shape is None and node.inputs[0].shape is not None:
            out.shape = ir.Shape(list(node.inputs[0].shape.dims))
            out.dtype = out.dtype or node.inputs[0].dtype
            filled = True
    if filled:
        _infer(model)
        _unknown_dims_are_symbolic(model)


def _remove_unused_initializers(model: ir.Model) -> bool:
    """Drop initializers nothing reads (left by exporters or by folding); ORT warns about them."""
    graph = model.graph
    dead = [name for name, v in graph.initializers.items() if not v.uses() and not v.is_graph_output() and not v.is_graph_input()]
    for name in dead:
        del graph.initializers[name]
    return bool(dead)


def _unknown_dims_are_symbolic(model: ir.Model) -> None:
    """Some exporters (PaddlePaddle) write unknown sizes as ``-1``: make them symbolic, so a
    negative "size" can never be taken for a static one."""
    graph = model.graph
    values = [*graph.inputs, *graph.outputs, *(v for n in graph.all_nodes() for v in n.outputs)]
    for v in values:
        if v.shape is not None and any(isinstance(d, int) and d < 0 for d in v.shape.dims):
            v.shape = ir.Shape([ir.SymbolicDim(None) if isinstance(d, int) and d < 0 else d for d in v.shape.dims])


def _infer(model: ir.Model) -> None:
    try:
        common.ShapeInferencePass(strict_mode=True)(model)
    except Exception as e:  # noqa: BLE001 - onnx raises many kinds; fall back to lenient mode
        logger.info("strict shape inference failed (%s); retrying leniently", e)
        common.ShapeInferencePass(check_type=False, strict_mode=False)(model)
