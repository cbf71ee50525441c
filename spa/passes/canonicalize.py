"""Canonicalize: bring any loaded model into the form the analyses expect.

- model-local functions are inlined (their bodies are ordinary nodes to the rules);
- every Constant node becomes an initializer of its own graph (PaddlePaddle and torch
  exports keep weights and shape constants in Constant nodes; rules read constants from
  initializers only). Bodies keep theirs: ONNX needs them there to shape the body;
- initializers that are also graph inputs (the IR<4 convention) are treated as weights and
  removed from the inputs (``WeightInputsPass``; ``keep_weight_inputs`` keeps them);
- nodes get unique non-empty names (plans and reports address nodes by name);
- nodes are sorted topologically (the channel analysis walks in order);
- shapes are inferred, so every rule can ask for static sizes;
- constant-only subgraphs that compute tensors (``ConstantOfShape`` weights of the classic
  zoo, ``Constant → Reshape`` chains) are folded into initializers named like the value they
  replace (``FoldConstantsPass``, bounded in size);
- shape arithmetic over static sizes is folded into constants (``FoldShapesPass``), so a
  ``view(x.size(0), -1)`` or a torch RNN's zero state is a proven Reshape/Expand; nodes and
  initializers nothing reads are dropped.

Existing tensors are never copied or changed: only where they live (Constant → initializer).
The pass does not touch graph outputs or initializer names (graph inputs only as said above),
and folded tensors take the name the input model gives them, so plans keep pointing at the
input model's tensors.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common
from onnx_ir.passes.common import _c_api_utils
from onnx_ir.passes.common.shape_inference import _merge_func as _shape_inference_merge

from spa.graph import all_nodes, gc_paused, has_subgraphs
from spa.passes.fold_constants import FoldConstantsPass
from spa.passes.fold_shapes import FoldShapesPass
from spa.passes.resolve_reshapes import ResolveReshapesPass
from spa.passes.weight_inputs import WeightInputsPass

__all__ = ["CanonicalizePass"]

logger = logging.getLogger(__name__)


class CanonicalizePass(ir.passes.InPlacePass):
    """Inline, lift constants, name, sort and infer shapes (see module docstring).

    Args:
        keep_weight_inputs: keep initializers that are also graph inputs as inputs
            (``--keep-weight-inputs``); their weights' channels are then frozen.
    """

    def __init__(self, keep_weight_inputs: bool = False) -> None:
        super().__init__()
        self.keep_weight_inputs = keep_weight_inputs

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        with gc_paused():
            return self._call(model)

    def _call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for p in (
            # Without local functions there is nothing to inline (the pass still walks every node).
            common.InlinePass() if model.functions else None,
            common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
            WeightInputsPass(keep=self.keep_weight_inputs),
            None if _names_unique(model) else common.NameFixPass(),
            None if _already_sorted(model) else common.TopologicalSortPass(),
        ):
            if p is not None:
                modified |= p(model).modified
        infer_shapes(model)
        folded = FoldConstantsPass()(model).modified
        if FoldShapesPass()(model).modified or folded:
            modified = True
            infer_shapes(model)
        modified |= _remove_unused_nodes(model)
        modified |= _remove_unused_initializers(model)
        return ir.passes.PassResult(model, modified)


# Ops whose first output always has the first input's shape; ONNX shape inference leaves some
# of them unshaped (GroupNormalization, ONNX Runtime's contrib ops), which would freeze their
# channels needlessly.
_SAME_SHAPE = frozenset(
    {
        ("", "GroupNormalization"), ("", "InstanceNormalization"), ("", "LayerNormalization"), ("", "BatchNormalization"),
        ("com.microsoft", "SkipLayerNormalization"), ("com.microsoft", "SkipSimplifiedLayerNormalization"),
        ("com.microsoft", "BiasGelu"), ("com.microsoft", "FastGelu"), ("com.microsoft", "BiasAdd"),
        ("com.microsoft", "Gelu"), ("com.microsoft", "QuickGelu"),
    }
)


def _implied_shape(node: ir.Node) -> ir.Shape | None:
    """The first output's shape where the op determines it and ONNX inference does not."""
    x = node.inputs[0] if node.inputs else None
    if x is None or x.shape is None:
        return None
    key = ("" if node.domain == "ai.onnx" else node.domain, node.op_type)
    if key in _SAME_SHAPE:
        return ir.Shape(list(x.shape.dims))
    if key == ("com.microsoft", "Attention") and len(x.shape) == 3:
        w = node.inputs[1]
        if w is not None and w.shape is not None and isinstance(w.shape[1], int) and w.shape[1] % 3 == 0:
            return ir.Shape([x.shape[0], x.shape[1], w.shape[1] // 3])
    return None


def infer_shapes(model: ir.Model) -> None:
    """Run ONNX shape inference, keeping what is known when inference cannot finish.

    Strict inference refuses some valid models (custom domains, …); a non-strict pass still
    fills in what it can, and values left without shapes simply block their channels.
    Same-shape ops that inference leaves unshaped get their input's shape, then inference
    runs once more so their consumers are shaped too.
    """
    nodes = all_nodes(model.graph)  # inference and ResolveReshapes add or remove no node
    _infer(model)
    _unknown_dims_are_symbolic(model, nodes)
    filled = False
    for node in nodes:
        out = node.outputs[0] if node.outputs else None
        if out is None or out.shape is not None:
            continue
        shape = _implied_shape(node)
        if shape is not None:
            out.shape = shape
            out.dtype = out.dtype or node.inputs[0].dtype
            filled = True
    if filled:
        _infer(model)
        _unknown_dims_are_symbolic(model, nodes)
    for _ in range(3):  # each resolved Reshape can unlock the next one downstream
        if not ResolveReshapesPass()(model).modified:
            break
        _infer(model)
        _unknown_dims_are_symbolic(model, nodes)
    if any(n.domain == "com.microsoft" for n in nodes):
        _infer_contrib(model)
        _unknown_dims_are_symbolic(model, nodes)


def _names_unique(model: ir.Model) -> bool:
    """Whether ``NameFixPass`` would leave the model as it is: no local functions, no bodies,
    every node and every value named, no two nodes and no two values sharing a name. The pass
    then renames nothing; it costs about a second on 100 000 nodes."""
    graph = model.graph
    if model.functions or has_subgraphs(graph):
        return False
    node_names: set[str] = set()
    values: set[ir.Value] = {*graph.inputs, *graph.outputs, *graph.initializers.values()}
    for node in graph:
        name = node.name
        if not name or name in node_names:
            return False
        node_names.add(name)
        values.update(node.outputs)
        for v in node.inputs:
            if v is not None:
                values.add(v)
    names = {v.name for v in values}
    return len(names) == len(values) and "" not in names and None not in names


def _already_sorted(model: ir.Model) -> bool:
    """Whether ``TopologicalSortPass`` would leave the model as it is: no local functions, no
    bodies, and every node after the producers of its inputs. The sort is stable (a sorted
    graph keeps its order), so it can be skipped; it costs seconds on 100 000 nodes."""
    graph = model.graph
    if model.functions or has_subgraphs(graph):
        return False
    seen: set[ir.Node] = set()
    for node in graph:
        for v in node.inputs:
            if v is not None:
                p = v.producer()
                if p is not None and p not in seen:
                    return False
        seen.add(node)
    return True


def _shapes_proto(model: ir.Model) -> onnx.ModelProto:
    """The model as a proto whose large weights are typed graph inputs: shape inference needs
    their shapes, not their bytes (and a >2 GB model would not serialize)."""
    proto = ir.to_proto(model)
    graph = proto.graph
    keep = []
    for t in graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL or onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize * max(1, int(np.prod(t.dims))) > 4096:
            graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            keep.append(t)
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return proto


def _fill_from(model: ir.Model, inferred: onnx.ModelProto) -> None:
    """Copy shapes from every graph (subgraphs too) of ``inferred`` onto values still unshaped."""
    types = {}
    stack = [inferred.graph]
    while stack:
        g = stack.pop()
        for vi in (*g.value_info, *g.output):
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
                types[vi.name] = vi.type.tensor_type
        for n in g.node:
            stack.extend(a.g for a in n.attribute if a.type == onnx.AttributeProto.GRAPH)
            stack.extend(sg for a in n.attribute if a.type == onnx.AttributeProto.GRAPHS for sg in a.graphs)
    for node in model.graph.all_nodes():
        for v in node.outputs:
            t = types.get(v.name)
            if v.shape is None and t is not None:
                v.shape = ir.Shape([d.dim_value if d.HasField("dim_value") else ir.SymbolicDim(d.dim_param or None) for d in t.shape.dim])
                if v.dtype is None and t.elem_type:
                    v.dtype = ir.DataType(t.elem_type)


def _infer_subgraphs(model: ir.Model) -> None:
    """onnx-ir's ShapeInferencePass leaves If/Loop bodies unshaped; ONNX's inference shapes
    them (in each body's value_info), so copy those shapes over."""
    if not has_subgraphs(model.graph):
        return
    top = set(model.graph)
    if not any(v.shape is None for n in model.graph.all_nodes() if n not in top for v in n.outputs):
        return
    try:
        _fill_from(model, onnx.shape_inference.infer_shapes(_shapes_proto(model)))
    except Exception as e:  # noqa: BLE001 - best effort: unknown shapes only block channels
        logger.info("subgraph shape inference failed: %s", e)


def _infer_contrib(model: ir.Model) -> None:
    """ONNX's shape inference does not know ONNX Runtime's contrib ops; ORT's symbolic shape
    inference does: shapes ONNX left unknown are filled in from it."""
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
    except ImportError:  # pragma: no cover - ORT is a dependency
        return
    proto = _shapes_proto(model)
    try:
        # SymbolicShapeInference.infer_shapes would write "sym_shape_infer_temp.onnx" into the
        # working directory when inference is incomplete; run its loop and keep partial results.
        ssi = SymbolicShapeInference(2**31 - 1, True, False, 0)
        ssi._preprocess(proto)
        while ssi.run_:
            ssi._infer_impl()
        ssi._update_output_from_vi()
    except Exception as e:  # noqa: BLE001 - best effort: unknown shapes only block channels
        logger.info("symbolic shape inference failed: %s", e)
        return
    _fill_from(model, ssi.out_mp_)


def _remove_unused_nodes(model: ir.Model) -> bool:
    """onnx-ir's ``RemoveUnusedNodesPass``, skipped where it provably changes nothing.

    The pass walks every node and looks up its schema (for unused optional outputs): about a
    second on a 100 000-node chain. In a graph without bodies or functions where every node's
    every output is read or is a graph output, its last input is set, and no node is a
    BatchNormalization (whose ``training_mode=0`` the pass drops), it removes no node, no
    input and no output; then only its initializer sweep remains, done here as it does it.
    """
    graph = model.graph
    if model.functions or has_subgraphs(graph):
        return common.RemoveUnusedNodesPass()(model).modified
    outputs = frozenset(graph.outputs)
    for node in graph:
        inputs = node.inputs
        if (inputs and inputs[-1] is None) or node.op_type == "BatchNormalization":
            return common.RemoveUnusedNodesPass()(model).modified
        for out in node.outputs:
            if out not in outputs and not out.uses():
                return common.RemoveUnusedNodesPass()(model).modified
    inputs = frozenset(graph.inputs)
    initializers = graph.initializers
    dead = [name for name, v in initializers.items() if not (v.uses() or v in outputs or v in inputs)]
    for name in dead:
        del initializers[name]
    if dead:
        logger.info("Removed %s unused nodes", len(dead))
    return bool(dead)


def _remove_unused_initializers(model: ir.Model) -> bool:
    """Drop initializers nothing reads (left by exporters or by folding); ORT warns about them."""
    graph = model.graph
    dead = [name for name, v in graph.initializers.items() if not v.uses() and not v.is_graph_output() and not v.is_graph_input()]
    for name in dead:
        del graph.initializers[name]
    return bool(dead)


def _unknown_dims_are_symbolic(model: ir.Model, nodes: list[ir.Node] | None = None) -> None:
    """Some exporters (PaddlePaddle) write unknown sizes as ``-1``: make them symbolic, so a
    negative "size" can never be taken for a static one. ``nodes``: every node, bodies too."""
    graph = model.graph
    values = [*graph.inputs, *graph.outputs, *(v for n in (all_nodes(graph) if nodes is None else nodes) for v in n.outputs)]
    for v in values:
        if v.shape is not None and any(isinstance(d, int) and d < 0 for d in v.shape.dims):
            v.shape = ir.Shape([ir.SymbolicDim(None) if isinstance(d, int) and d < 0 else d for d in v.shape.dims])


def _infer(model: ir.Model) -> None:
    try:
        _shape_inference(model, check_type=True, strict_mode=True)
    except Exception as e:  # noqa: BLE001 - onnx raises many kinds; fall back to lenient mode
        logger.info("strict shape inference failed (%s); retrying leniently", e)
        _shape_inference(model, check_type=False, strict_mode=False)
    _infer_subgraphs(model)


def _shape_inference(model: ir.Model, *, check_type: bool, strict_mode: bool) -> None:
    """onnx-ir's ``ShapeInferencePass`` (same serialization, same merge rule, same "left
    unchanged" when onnx's inference raises), merged without deserializing the inferred model.

    The pass turns the whole inferred proto back into an IR only to read each value's type:
    on a 100 000-node chain that is most of its time (~25 µs a value). A graph without
    subgraphs needs no IR for that: the types are read from the proto's inputs, value_info and
    outputs with the precedence deserialization gives them (see :func:`_inferred_types`).
    Graphs with subgraphs keep onnx-ir's merge (scoping rules across bodies).
    """
    def infer(proto: onnx.ModelProto) -> onnx.ModelProto:
        return onnx.shape_inference.infer_shapes(proto, check_type=check_type, strict_mode=strict_mode, data_prop=True)

    try:
        inferred = _c_api_utils.call_onnx_api(infer, model)
    except Exception as e:  # noqa: BLE001 - as ShapeInferencePass: the model is left unchanged
        logger.warning("Shape inference failed: %s. Model is left unchanged", e)
        return
    if has_subgraphs(model.graph):
        _shape_inference_merge(model, inferred)
        return
    types = _inferred_types(inferred.graph)
    del inferred
    cache: dict[bytes, tuple[ir.Shape | None, ir.DataType | None]] = {}
    for name, value in ir.convenience.create_value_mapping(model.graph).items():
        tp = types.get(name)
        if tp is None:
            continue
        shape, dtype = _type_of(tp, cache)
        # ``None != shape`` is true, but asks ``isinstance(None, Iterable)`` on the way (slow).
        if shape is not None and (value.shape is None or value.shape != shape):
            value.shape = shape
        if dtype is not None and value.dtype != dtype:
            value.dtype = dtype


def _inferred_types(graph: onnx.GraphProto) -> dict[str, onnx.TypeProto]:
    """Name → the type a value of ``graph`` (no subgraphs) gets when onnx-ir deserializes it:
    a graph input's own entry (the first of a name), a node output's ``value_info`` entry,
    a graph output's entry over either. Initializers are graph inputs here (``call_onnx_api``
    makes them so). Values left without an entry have neither shape nor type."""
    types: dict[str, onnx.TypeProto] = {}
    for vi in graph.input:
        types.setdefault(vi.name, vi.type)
    value_info = {vi.name: vi.type for vi in graph.value_info}
    produced: set[str] = set()
    for node in graph.node:
        for name in node.output:
            if name:
                produced.add(name)
                tp = value_info.get(name)
                if tp is not None:
                    types[name] = tp
    for vi in graph.output:
        if vi.name in types or vi.name in produced:
            types[vi.name] = vi.type
    return types


def _type_of(tp: onnx.TypeProto, cache: dict[bytes, tuple[ir.Shape | None, ir.DataType | None]]) -> tuple[ir.Shape | None, ir.DataType | None]:
    """(shape, dtype) as onnx-ir deserializes ``tp``. Static shapes are frozen, so one object
    is shared by every value of that type (what frozen shapes are for); a shape with symbolic
    dims is built afresh for each value."""
    key = tp.SerializeToString()
    hit = cache.get(key)
    if hit is not None:
        return hit
    shape = ir.serde.deserialize_type_proto_for_shape(tp)
    typ = ir.serde.deserialize_type_proto_for_type(tp)
    out = (shape, typ.dtype if typ is not None else None)
    if shape is None or all(isinstance(d, int) for d in shape.dims):
        cache[key] = out
    return out
