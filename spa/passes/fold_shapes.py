"""Fold shape computations into constants, so rules see constants instead of arithmetic.

Exporters compute sizes at run time (``x.view(x.size(0), -1)``; zero RNN states built from
``Shape → Gather → Concat → Expand``). Where the sizes involved are static, those values are
constants in disguise, and a Reshape/Expand fed by them can be proven and rewritten like one
with a literal shape. This pass replaces:

- ``Shape(x)`` (with start/end) by a constant when the reported dims are static;
- ``Gather(Shape(x), const)`` by a constant when the gathered dims are static (dynamic batch);
- ``Size(x)`` by a constant when x's shape is static;
- any small node of a shape-arithmetic op whose inputs are all integer/bool constants, by
  its value (evaluated with ``onnx.reference``). Float weight arithmetic is left alone:
  folding it would duplicate weights and untie shared ones.

It never touches weights (inputs above ``MAX_ELEMENTS`` are left alone) nor graph outputs, and
leaves the now-unused nodes to ``RemoveUnusedNodesPass``.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx.reference
import onnx_ir as ir

from spa.graph import default_opset

__all__ = ["FoldShapesPass", "evaluate_node"]

logger = logging.getLogger(__name__)

MAX_ELEMENTS = 1 << 16

FOLDABLE = frozenset(
    {
        "Gather", "Unsqueeze", "Squeeze", "Concat", "Cast", "Add", "Sub", "Mul", "Div", "Mod", "Neg",
        "Abs", "Floor", "Ceil", "Max", "Min", "Slice", "Reshape", "Range", "ConstantOfShape", "Equal",
        "Less", "Greater", "Not", "And", "Or", "Where", "Expand", "Identity", "ReduceProd", "ReduceSum",
        "ReduceMax", "ReduceMin", "Sqrt", "Pow", "Tile", "Transpose", "Flatten",
    }
)


def _static_dims(value: ir.Value, start: int, end: int | None) -> list[int] | None:
    if value.shape is None:
        return None
    dims = list(value.shape.dims)[slice(start, end)]
    return [int(d) for d in dims] if all(isinstance(d, int) for d in dims) else None


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None or value.is_graph_input():
        return None
    return value.const_value.numpy()


class FoldShapesPass(ir.passes.InPlacePass):
    """See module docstring."""

    def __init__(self, opset: int | None = None) -> None:
        super().__init__()
        self.opset = opset

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        opset = self.opset or default_opset(model, 17)  # "" or "ai.onnx"
        count = 0
        for node in list(graph):
            if node.domain not in ("", "ai.onnx") or len(node.outputs) != 1:
                continue
            out = node.outputs[0]
            if out.is_graph_output():
                continue
            value = self._fold(node, opset)
            if value is None:
                continue
            const = ir.val(out.name + "__folded", ir.DataType.from_numpy(value.dtype), ir.Shape(value.shape), const_value=ir.tensor(value))
            name = const.name
            while name in graph.initializers:
                name += "_"
            const.name = name
            const.const_value.name = name
            graph.register_initializer(const)
            out.replace_all_uses_with(const)
            count += 1
        if count:
            logger.info("folded %d shape computations", count)
        return ir.passes.PassResult(model, bool(count))

    def _fold(self, node: ir.Node, opset: int) -> np.ndarray | None:
        op = node.op_type
        if op == "Shape":
            start = node.attributes["start"].value if "start" in node.attributes else 0
            end = node.attributes["end"].value if "end" in node.attributes else None
            dims = _static_dims(node.inputs[0], int(start), None if end is None else int(end))
            return None if dims is None else np.asarray(dims, dtype=np.int64)
        if op == "Size":
            dims = _static_dims(node.inputs[0], 0, None)
            return None if dims is None else np.asarray(int(np.prod(dims)), dtype=np.int64)
        if op == "Gather" and node.inputs[0] is not None and node.inputs[0].producer() is not None:
            src = node.inputs[0].producer()
            idx = _const(node.inputs[1])
            if src.op_type == "Shape" and idx is not None and src.inputs[0].shape is not None:
                shape = list(src.inputs[0].shape.dims)
                start = int(src.attributes["start"].value) if "start" in src.attributes else 0
                end = src.attributes["end"].value if "end" in src.attributes else None
                reported = shape[slice(start, None if end is None else int(end))]
                picked = [reported[int(i)] for i in np.asarray(idx).reshape(-1)]
                if all(isinstance(d, int) for d in picked):
                    return np.asarray(picked, dtype=np.int64).reshape(np.asarray(idx).shape)
        if op not in FOLDABLE:
            return None
        inputs = [_const(v) if v is not None else None for v in node.inputs]
        if any(v is not None and a is None for v, a in zip(node.inputs, inputs)):
            return None
        if any(a is not None and a.size > MAX_ELEMENTS for a in inputs):
            return None
        if any(a is not None and a.dtype.kind in "fc" for a in inputs):
            # Only shape arithmetic is folded: folding float weight arithmetic would duplicate
            # weights (a transposed copy of a tied embedding) and change what the model shares.
            return None
        try:
            return self._evaluate(node, inputs, opset)
        except Exception as e:  # noqa: BLE001 - the reference evaluator raises many kinds
            logger.debug("cannot fold %s: %s", node.name, e)
            return None

    @staticmethod
    def _evaluate(node: ir.Node, inputs: list[np.ndarray | None], opset: int) -> np.ndarray | None:
        y = evaluate_node(node, inputs, opset)
        return y if y.size <= MAX_ELEMENTS else None


def evaluate_node(node: ir.Node, inputs: list[np.ndarray | None], opset: int) -> np.ndarray:
    """The first output of ``node`` on constant ``inputs`` (``None`` for an absent optional
    input), evaluated by ``onnx.reference`` on a one-node model; raises where it cannot."""
    names = [f"i{k}" if a is not None else "" for k, a in enumerate(inputs)]
    proto = ir.serde.serialize_node(node)
    del proto.input[:]
    proto.input.extend(names)
    del proto.output[:]
    proto.output.append("y")
    feeds = {n: a for n, a in zip(names, inputs) if n}
    graph = onnx.helper.make_graph(
        [proto],
        "fold",
        [onnx.helper.make_tensor_value_info(n, onnx.helper.np_dtype_to_tensor_dtype(a.dtype), a.shape) for n, a in feeds.items()],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.UNDEFINED, None)],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    (y,) = onnx.reference.ReferenceEvaluator(model).run(None, feeds)
    return np.asarray(y)
