"""spa.graph: the one home of graph facts (domain, opset, constants, subgraphs, attributes)."""

from __future__ import annotations

import numpy as np
import onnx.parser
import onnx_ir as ir

from spa import graph
from spa.analysis import channels

_IF = """
<ir_version: 10, opset_import: ["" : 17]>
g (bool c, float[2] x) => (float[2] y) {
  y = If (c) <
    then_branch = t () => (float[2] o) { o = Add (x, one) },
    else_branch = e () => (float[2] o) { o = Identity (x) }
  >
}
"""


def _if_model() -> ir.Model:
    model = ir.from_proto(onnx.parser.parse_model(_IF))
    then = model.graph.node(0).attributes["then_branch"].as_graph()
    one = ir.Value(name="one", const_value=ir.tensor(np.ones(2, np.float32), name="one"))
    then.register_initializer(one)
    then.node(0).replace_input_with(1, one)
    return model


def test_canonical_domain():
    assert graph.canonical_domain("") == ""
    assert graph.canonical_domain("ai.onnx") == ""
    assert graph.canonical_domain(None) == ""
    assert graph.canonical_domain("com.microsoft") == "com.microsoft"


def test_default_opset_reads_both_spellings():
    assert graph.default_opset({"": 13}) == 13
    assert graph.default_opset({"ai.onnx": 17, "com.microsoft": 1}) == 17
    assert graph.default_opset({"com.microsoft": 1}) == 0
    assert graph.default_opset({}, default=17) == 17
    model = ir.from_proto(onnx.parser.parse_model('<ir_version: 10, opset_import: ["ai.onnx" : 17]> g (float[2] x) => (float[2] y) { y = Relu (x) }'))
    assert graph.default_opset(model) == 17


def test_subgraphs_attr_and_body_initializers():
    model = _if_model()
    node = model.graph.node(0)
    assert [g.name for g in graph.subgraphs(node)] == ["t", "e"]
    assert graph.subgraphs(node.attributes["then_branch"].as_graph().node(0)) == []
    assert graph.attr(node, "missing", 7) == 7
    assert isinstance(graph.attr(node, "else_branch"), ir.Graph)
    assert set(graph.all_initializers(model.graph)) == {"one"}


def test_is_constant_and_its_reexport():
    assert channels.is_constant is graph.is_constant
    w = ir.Value(name="w", const_value=ir.tensor(np.ones(2, np.float32)))
    g = ir.Graph([], [], nodes=[], initializers=[w])
    assert graph.is_constant(w)
    g.inputs.append(w)  # an initializer a caller may override is no constant
    assert not graph.is_constant(w)


def test_fold_shapes_reads_the_ai_onnx_spelling():
    """Squeeze-11 takes its axes as an attribute: evaluated at opset 17 (the old fallback when
    the default domain is imported as "ai.onnx") it would not fold."""
    import onnx.helper as oh
    from onnx import TensorProto

    from spa.passes.fold_shapes import FoldShapesPass

    nodes = [
        oh.make_node("Shape", ["x"], ["s"]),
        oh.make_node("Unsqueeze", ["s"], ["u"], axes=[0]),
        oh.make_node("Squeeze", ["u"], ["q"], axes=[0]),
        oh.make_node("Reshape", ["x", "q"], ["y"]),
    ]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])], [oh.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    proto = oh.make_model(graph, opset_imports=[oh.make_opsetid("ai.onnx", 11)], ir_version=7)
    model = ir.from_proto(proto)
    FoldShapesPass()(model)
    reshape = next(n for n in model.graph if n.op_type == "Reshape")
    assert reshape.inputs[1].const_value is not None
    assert reshape.inputs[1].const_value.numpy().tolist() == [2, 3]
