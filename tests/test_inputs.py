"""Tests for spa.inputs: one resolution of input shapes for every count and every run."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from spa import verify
from spa.errors import UsageError
from spa.inputs import describe_inputs, graph_inputs, make_feeds, resolve_input_shapes, specialize


def _two_inputs() -> onnx.ModelProto:
    """``a [batch, 4]`` and ``b [1, batch]`` (batch on axis 1): Concat needs one batch size."""
    nodes = [
        helper.make_node("Transpose", ["b"], ["bt"], name="bt", perm=[1, 0]),
        helper.make_node("Concat", ["a", "bt"], ["y"], name="cat", axis=1),
        helper.make_node("Cast", ["ids"], ["idf"], name="cast", to=TensorProto.FLOAT),
    ]
    graph = helper.make_graph(
        nodes,
        "two",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", 4]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, "batch"]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq", None]),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, [2]),  # an overridable initializer
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None), helper.make_tensor_value_info("idf", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.ones(2, np.float32), "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _ir(proto: onnx.ModelProto) -> ir.Model:
    return ir.from_proto(proto)


def test_symbols_get_one_value_on_every_input():
    model = _ir(_two_inputs())
    assert [v.name for v in graph_inputs(model)] == ["a", "b", "ids"]  # not the initializer
    shapes = resolve_input_shapes(model)
    # batch is first seen on axis 0 (→ 1), and b gets the same 1 although it has it on axis 1;
    # seq and the unnamed dim are 64.
    assert shapes == {"a": [1, 4], "b": [1, 1], "ids": [1, 64, 64]}
    # Given on one input, the symbol takes that value everywhere.
    shapes = resolve_input_shapes(model, {"b": [1, 8]})
    assert shapes == {"a": [8, 4], "b": [1, 8], "ids": [8, 64, 64]}
    # And ORT runs the model on those feeds (with batch 1 and 64 it failed).
    sess = ort.InferenceSession(_two_inputs().SerializeToString(), providers=["CPUExecutionProvider"])
    y, _ = sess.run(None, make_feeds(model, shapes))
    assert y.shape == (8, 5)


def test_given_shapes_are_checked():
    model = _ir(_two_inputs())
    with pytest.raises(UsageError, match=r"'nope', not inputs of the model \(inputs: a \[batch, 4\], b \[1, batch\], ids \[batch, seq, \?\]\)"):
        resolve_input_shapes(model, {"nope": [1, 4]})
    with pytest.raises(UsageError, match="initializers, not inputs"):
        resolve_input_shapes(model, {"w": [2]})
    with pytest.raises(UsageError, match=r"has 3 dims, but the input has rank 2"):
        resolve_input_shapes(model, {"a": [1, 4, 1]})
    with pytest.raises(UsageError, match=r"axis 1 is 4 in the model, not 5"):
        resolve_input_shapes(model, {"a": [2, 5]})
    with pytest.raises(UsageError, match=r"'batch' two values: 2 on a and 3 on b"):
        resolve_input_shapes(model, {"a": [2, 4], "b": [1, 3]})


def test_input_without_shape_lists_the_dynamic_inputs():
    proto = _two_inputs()
    proto.graph.input[2].type.tensor_type.ClearField("shape")
    model = _ir(proto)
    with pytest.raises(UsageError, match=r"input 'ids' has no shape .* give --input-shape ids:D1xD2x… \(dynamic inputs: a \[batch, 4\], b \[1, batch\], ids \(no shape\)\)"):
        resolve_input_shapes(model)
    assert resolve_input_shapes(model, {"ids": [2, 3]})["a"] == [1, 4]  # any rank when unknown
    assert describe_inputs(model) == "a [batch, 4], b [1, batch], ids (no shape)"


def test_make_feeds_is_the_verify_random_stream():
    proto = _two_inputs()
    model = _ir(proto)
    shapes = resolve_input_shapes(model, {"a": [3, 4]})
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    old = verify.make_inputs(sess, shapes, seed=5)
    for new in (
        make_feeds(model, shapes, seed=5),
        make_feeds({i.name: i.type for i in sess.get_inputs()}, shapes, seed=5),  # ORT's type strings
    ):
        assert list(new) == list(old)
        for k in old:
            assert new[k].dtype == old[k].dtype and np.array_equal(new[k], old[k])
    const = make_feeds(model, shapes, seed=5, values={"b": 2.5})
    assert (const["b"] == 2.5).all() and np.array_equal(const["a"], old["a"])
    with pytest.raises(UsageError, match="--input-value names 'sr'"):
        make_feeds(model, shapes, values={"sr": 16000})


def test_verify_make_inputs_is_spa_inputs():
    """One implementation: the verification feeds are resolved by spa.inputs (one value per
    symbol on every input; a name that is no input refused), whatever session they come from."""
    proto = _two_inputs()
    model = _ir(proto)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for given in ({}, {"b": [1, 8]}):
        feeds = verify.make_inputs(sess, given, seed=3)
        want = make_feeds(model, resolve_input_shapes(model, given), seed=3)
        assert list(feeds) == list(want) == ["a", "b", "ids"]
        for k in want:
            assert feeds[k].dtype == want[k].dtype and np.array_equal(feeds[k], want[k])
        sess.run(None, feeds)  # the symbol 'batch' has one value: ORT runs it
    assert verify.make_inputs(sess)["b"].shape == (1, 1)  # not [1, 64]: batch is 1 everywhere
    with pytest.raises(UsageError, match="'nope', not inputs of the model"):
        verify.make_inputs(sess, {"nope": [1, 4]})
    with pytest.raises(UsageError, match="--input-value names 'sr'"):
        verify.make_inputs(sess, values={"sr": 1.0})


def _computed_pad(clip: bool) -> onnx.ModelProto:
    """x [N, C, H, W] → Pad to a multiple of 8 (pads from Shape arithmetic) → Conv."""
    inits = [
        numpy_helper.from_array(np.array([2], np.int64), "s"),
        numpy_helper.from_array(np.array([4], np.int64), "e"),
        numpy_helper.from_array(np.array([8], np.int64), "m"),
        numpy_helper.from_array(np.zeros(6, np.int64), "z"),
        numpy_helper.from_array(np.array(0, np.int64), "lo"),
        numpy_helper.from_array(np.array(7, np.int64), "hi"),
        numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w"),
    ]
    nodes = [
        helper.make_node("Shape", ["x"], ["shp"]),
        helper.make_node("Slice", ["shp", "s", "e"], ["hw"]),
        helper.make_node("Mod", ["hw", "m"], ["r"]),
        helper.make_node("Sub", ["m", "r"], ["p"]),
        helper.make_node("Clip" if clip else "Identity", ["p", "lo", "hi"] if clip else ["p"], ["q"]),
        helper.make_node("Concat", ["z", "q"], ["pads"], axis=0),
        helper.make_node("Pad", ["x", "pads"], ["xp"]),
        helper.make_node("Conv", ["xp", "w"], ["y"], name="conv"),
    ]
    graph = helper.make_graph(
        nodes, "pad", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("clip", [False, True])
def test_specialize_gives_static_shapes(clip):
    model = _ir(_computed_pad(clip))
    before = {n.name: n.outputs[0].shape for n in model.graph}
    shapes = resolve_input_shapes(model, {"x": [2, 3, 20, 30]})
    spec = specialize(model, shapes)
    conv = next(n for n in spec.graph if n.op_type == "Conv")
    # pad 20 → 24, 30 → 32; 3x3 conv, no padding → 22 x 30
    assert list(conv.outputs[0].shape.dims) == [2, 4, 22, 30]
    assert spec.graph.inputs[0].shape.dims == (2, 3, 20, 30)
    # The caller's model is untouched, names are kept, tensors are shared.
    assert {n.name: n.outputs[0].shape for n in model.graph} == before
    assert model.graph.inputs[0].shape.dims[2] == ir.SymbolicDim("H")
    assert spec.graph.initializers["w"].const_value is model.graph.initializers["w"].const_value
    blind = specialize(model, shapes, observe=False)
    conv = next(n for n in blind.graph if n.op_type == "Conv")
    assert conv.outputs[0].shape.is_static() != clip  # a Clip only ORT evaluates
    # Shapes observed elsewhere (one run shared with verification) can be handed in.
    observed = specialize(model, shapes, observe={"xp": [2, 3, 24, 32], "y": [2, 4, 22, 30]})
    assert next(n for n in observed.graph if n.op_type == "Conv").outputs[0].shape.dims == (2, 4, 22, 30)
