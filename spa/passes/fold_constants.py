"""Fold constant-only subgraphs into initializers, so computed weights become weights.

Some models compute their weights: the classic zoo files (``light_*`` in onnx's test data)
produce every weight with ``ConstantOfShape``; other exporters write ``Constant → Cast``,
``Constant → Reshape/Transpose`` or ``DequantizeLinear``-free fp16 → fp32 chains. Rules read
weights from initializers only, so such a weight freezes its channels ("not a constant
initializer") and nothing is pruned. This pass evaluates them once.

What is folded: the *constant region* — nodes of the default domain with one output, no
subgraph, a deterministic op, and only constant inputs (initializers that are not graph
inputs, or outputs of region nodes). Only its *frontier* is materialised: region outputs read
by a node outside the region. Intermediate results are dropped as soon as they are used up,
and the region's nodes are left for ``RemoveUnusedNodesPass``.

Each folded frontier value becomes an initializer with the value's own name — the name the
input model gives that tensor — so plans and reports name it as the input model does.

Bounds, so a small file can never blow up into a huge one by accident:

- a frontier read as a *weight* (``WEIGHT_INPUTS``: Conv/Gemm/MatMul/norm/RNN weights) is the
  model's own weight: it is always folded (ONNX Runtime materialises it at every run anyway);
- any other frontier counts against a budget of ``max(initializer bytes, MIN_BUDGET_BYTES)``
  in all; a frontier whose static size is unknown is not folded.

Chains the rules already read through (Cast/Identity/Transpose of an initializer, and
anything with DequantizeLinear) are not folded: the weight keeps its name, layout and
quantization.

A frontier computed from existing float initializers is folded only where it is no larger
than they are (a Reshape or a scaling of a weight, not a Gather that expands a bias table).

Shared (tied) weights stay one tensor: a frontier computed from a float initializer that
something else also reads (``Transpose(W)`` beside ``W`` itself, two transposes of one tied
embedding) is left alone — folding it would make two copies of one weight.
"""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import onnx_ir as ir

from spa.graph import add_note
from spa.passes.fold_shapes import evaluate_node

__all__ = ["FoldConstantsPass", "WEIGHT_INPUTS", "MIN_BUDGET_BYTES"]

logger = logging.getLogger(__name__)

#: Folded bytes allowed for non-weight constants when the model's own initializers are fewer.
MIN_BUDGET_BYTES = 16 << 20

#: (op_type → input indices) read as weights: a constant there is a weight of the model.
WEIGHT_INPUTS: dict[str, frozenset[int]] = {
    "Conv": frozenset({1, 2}),
    "ConvTranspose": frozenset({1, 2}),
    "Gemm": frozenset({0, 1, 2}),
    "MatMul": frozenset({0, 1}),
    "BatchNormalization": frozenset({1, 2, 3, 4}),
    "InstanceNormalization": frozenset({1, 2}),
    "LayerNormalization": frozenset({1, 2}),
    "GroupNormalization": frozenset({1, 2}),
    "PRelu": frozenset({1}),
    "Gather": frozenset({0}),
    "LSTM": frozenset({1, 2, 3}),
    "GRU": frozenset({1, 2, 3}),
    "RNN": frozenset({1, 2, 3}),
}

#: Ops whose value is not a function of their inputs (or that have none to be constant).
_NOT_FOLDABLE = frozenset(
    {
        "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli",
        "Constant", "If", "Loop", "Scan", "SequenceConstruct", "SequenceEmpty", "SequenceInsert", "SequenceErase",
        "SplitToSequence", "ConcatFromSequence", "SequenceAt", "SequenceLength", "SequenceMap", "Optional",
        "OptionalGetElement", "OptionalHasElement",
        # Quantized weights stay quantized: the rules read through DequantizeLinear.
        "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear",
    }
)

#: Ops the channel rules already see through to the initializer behind them
#: (``CouplingContext.weight_source``): a chain of these from an initializer is left as it is,
#: so the weight keeps its name and layout (a torch ``Transpose(W)`` stays ``W``).
_TRANSPARENT = frozenset({"Cast", "Identity", "Transpose"})


def _is_constant(value: ir.Value) -> bool:
    return value.is_initializer() and not value.is_graph_input() and value.const_value is not None


def _nbytes(value: ir.Value) -> int | None:
    if value.shape is None or value.dtype is None or not all(isinstance(d, int) for d in value.shape.dims):
        return None
    return int(np.prod(value.shape.dims, dtype=np.int64)) * max(1, value.dtype.itemsize)


def _has_subgraph(node: ir.Node) -> bool:
    return any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values())


def _read_as_weight(value: ir.Value) -> bool:
    return any(
        node.domain in ("", "ai.onnx") and idx in WEIGHT_INPUTS.get(node.op_type, ())
        for node, idx in value.uses()
    )


class FoldConstantsPass(ir.passes.InPlacePass):
    """See module docstring."""

    def __init__(self, min_budget_bytes: int = MIN_BUDGET_BYTES) -> None:
        super().__init__()
        self.min_budget_bytes = min_budget_bytes

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        opset = int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 17)))

        # 1. The constant region, in topological order (the graph is sorted).
        region: list[ir.Node] = []
        produced: set[ir.Value] = set()
        for node in graph:
            if (
                node.domain not in ("", "ai.onnx")
                or node.op_type in _NOT_FOLDABLE
                or len(node.outputs) != 1
                or not node.inputs
                or _has_subgraph(node)
                or node.outputs[0].is_graph_output()
            ):
                continue
            if all(v is None or v in produced or _is_constant(v) for v in node.inputs):
                region.append(node)
                produced.add(node.outputs[0])
        if not region:
            return ir.passes.PassResult(model, False)
        in_region = set(region)

        # 2. The frontier: region outputs read outside the region.
        frontier = [n.outputs[0] for n in region if any(user not in in_region for user, _ in n.outputs[0].uses())]
        if not frontier:
            return ir.passes.PassResult(model, False)

        # 3. Which frontier values to fold: the tie rule, then the size budget.
        sources = self._sources(region)
        float_sources = Counter()
        for f in frontier:
            for s in sources[f]:
                float_sources[s] += 1
        budget = max(sum(v.const_value.nbytes for v in graph.initializers.values() if v.const_value is not None), self.min_budget_bytes)
        chosen: list[ir.Value] = []
        skipped_tied = skipped_size = 0
        for f in frontier:
            if _transparent_chain(f):
                continue
            tied = [s for s in sources[f] if float_sources[s] > 1 or any(user not in in_region for user, _ in s.uses())]
            if tied:
                skipped_tied += 1
                continue
            size = _nbytes(f)
            if sources[f] and (size is None or size > sum(src.const_value.nbytes for src in sources[f])):
                # Computed from existing weights and bigger than they are (Gather of a bias
                # table): the stored weights stay what they are.
                skipped_size += 1
                continue
            if not _read_as_weight(f):
                if size is None or size > budget:
                    skipped_size += 1
                    continue
                budget -= size
            chosen.append(f)
        if not chosen:
            return ir.passes.PassResult(model, False)

        # 4. Evaluate what the chosen values need, dropping intermediates once used up.
        needed: set[ir.Node] = set()
        stack = [f.producer() for f in chosen]
        while stack:
            node = stack.pop()
            if node in needed:
                continue
            needed.add(node)
            stack.extend(v.producer() for v in node.inputs if v is not None and v in produced)
        remaining = Counter(v for n in region if n in needed for v in n.inputs if v is not None and v in produced)
        keep = set(chosen)
        values: dict[ir.Value, np.ndarray] = {}
        folded: list[tuple[ir.Value, np.ndarray]] = []
        for node in region:
            if node not in needed:
                continue
            out = node.outputs[0]
            inputs = [None if v is None else values[v] if v in produced else v.const_value.numpy() for v in node.inputs]
            try:
                y = self._evaluate(node, inputs, opset)
            except Exception as e:  # noqa: BLE001 - the reference evaluator raises many kinds
                logger.info("cannot fold %s (%s): %s", node.name, node.op_type, e)
                y = None
            for v in node.inputs:
                if v is not None and v in produced:
                    remaining[v] -= 1
                    if remaining[v] == 0 and v not in keep:
                        values.pop(v, None)
            if y is None or y.dtype == object or (out.dtype is not None and ir.DataType.from_numpy(y.dtype) != out.dtype):
                keep.discard(out)
                # Everything downstream of a value that cannot be computed stays as it is.
                _poison(node, needed)
                continue
            if out in keep:
                folded.append((out, y))
            if remaining[out] > 0:
                values[out] = y

        # 5. Replace each folded value by an initializer of the same name.
        total = 0
        for out, y in folded:
            name = out.name
            out.name = f"{name}__spa_folded_from"
            tensor = ir.tensor(np.ascontiguousarray(y), name=name)
            init = ir.Value(name=name, shape=ir.Shape(y.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
            graph.register_initializer(init)
            out.replace_all_uses_with(init)
            total += tensor.nbytes
        if folded:
            nodes = len(needed)
            add_note(model, f"{len(folded)} tensors computed by constant subgraphs ({nodes} nodes, e.g. "
                            f"{Counter(n.op_type for n in needed).most_common(1)[0][0]}) were folded into initializers "
                            f"({total / 2**20:.1f} MiB)")
            logger.info("folded %d constant tensors (%d nodes, %d bytes)", len(folded), nodes, total)
        if skipped_tied or skipped_size:
            logger.info("left %d constant subgraphs that read shared weights and %d above the size budget", skipped_tied, skipped_size)
        return ir.passes.PassResult(model, bool(folded))

    @staticmethod
    def _sources(region: list[ir.Node]) -> dict[ir.Value, set[ir.Value]]:
        """Per region output: the float initializers (more than one element) it is computed from."""
        src: dict[ir.Value, set[ir.Value]] = {}
        for node in region:
            s: set[ir.Value] = set()
            for v in node.inputs:
                if v is None:
                    continue
                if v in src:
                    s |= src[v]
                elif v.const_value is not None and v.dtype is not None and v.dtype.is_floating_point() and v.const_value.size > 1:
                    s.add(v)
            src[node.outputs[0]] = s
        return src

    @staticmethod
    def _evaluate(node: ir.Node, inputs: list[np.ndarray | None], opset: int) -> np.ndarray | None:
        if node.op_type == "ConstantOfShape":  # the common case, done without building a model
            attr = node.attributes.get("value")
            fill = attr.value.numpy().reshape(-1) if attr is not None and attr.value is not None else np.zeros(1, np.float32)
            shape = [int(d) for d in np.asarray(inputs[0]).reshape(-1)]
            return np.full(shape, fill[0], dtype=fill.dtype)
        return evaluate_node(node, inputs, opset)


def _transparent_chain(value: ir.Value) -> bool:
    """Whether ``value`` is an initializer seen through Cast/Identity/Transpose only."""
    for _ in range(8):
        node = value.producer()
        if node is None or node.op_type not in _TRANSPARENT or node.inputs[0] is None:
            return False
        value = node.inputs[0]
        if _is_constant(value):
            return True
    return False


def _poison(node: ir.Node, needed: set[ir.Node]) -> None:
    """Drop from ``needed`` every node downstream of ``node`` (their inputs will be missing)."""
    stack = [node]
    while stack:
        n = stack.pop()
        needed.discard(n)
        for user, _ in n.outputs[0].uses():
            if user in needed:
                stack.append(user)
