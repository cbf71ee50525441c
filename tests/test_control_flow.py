"""If branches are pruned consistently with the graph around them, for either branch taken."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import onnxruntime as ort
from onnx import numpy_helper

import spa
from spa.verify import masked_weights

IF_MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1,3,8,8] x, bool c) => (float[1,4,8,8] y) {
   a = Conv <pads=[1,1,1,1]> (x, w1, b1)
   r = Relu(a)
   t = If(c) <then_branch = g1 () => (float[1,8,8,8] o1) { o1 = Conv <pads=[1,1,1,1]> (r, w2) },
              else_branch = g2 () => (float[1,8,8,8] o2) { o2 = Sigmoid(r) }>
   y = Conv <pads=[1,1,1,1]> (t, w3)
}
"""


def _model(text: str, **shapes) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    m = onnx.parser.parse_model(text)
    for name, shape in shapes.items():
        m.graph.initializer.append(numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name))
    onnx.checker.check_model(m, full_check=True)
    return m


def _run(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def test_if_branches_pruned_alike(tmp_path) -> None:
    m = _model(IF_MODEL, w1=(8, 3, 3, 3), b1=(8,), w2=(8, 8, 3, 3), w3=(4, 8, 3, 3))
    result = spa.prune(m, ratio=0.5, benchmark=False)
    assert {layer["weight"] for layer in result.report.layers} == {"w1", "w2"}
    pruned = onnx.load(result.save(tmp_path / "p.onnx"))
    reference = onnx.ModelProto()
    reference.CopyFrom(m)
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    for name, arr in masked_weights(result.plan, inits.__getitem__).items():
        t = next(t for t in reference.graph.initializer if t.name == name)
        t.CopyFrom(numpy_helper.from_array(arr, name))
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    for cond in (True, False):
        feeds = {"x": x, "c": np.array(cond)}
        np.testing.assert_allclose(_run(pruned, feeds), _run(reference, feeds), rtol=1e-4, atol=1e-5)
        assert not np.allclose(_run(pruned, feeds), _run(m, feeds), atol=1e-3)  # it did change


LOOP_MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1,3,8,8] x) => (float[1,3,8,8] y) {
   n = Constant <value = int64 {2}> ()
   t = Constant <value = bool {1}> ()
   y = Loop(n, t, x) <body = b (int64 i, bool cin, float[1,3,8,8] s) => (bool cout, float[1,3,8,8] s2) {
        cout = Identity(cin)
        h = Conv <pads=[1,1,1,1]> (s, w1)
        hr = Relu(h)
        s2 = Conv <pads=[1,1,1,1]> (hr, w2)
   }>
}
"""


def test_loop_body_prunes_inside_and_freezes_the_carried_value() -> None:
    m = _model(LOOP_MODEL, w1=(8, 3, 3, 3), w2=(3, 8, 3, 3))
    result = spa.prune(m, ratio=0.5, benchmark=False)
    assert result.report.oracle["passed"]
    assert [(layer["weight"], layer["kept"]) for layer in result.report.layers] == [("w1", 4)]
    codes = {r["code"] for b in result.report.blocked for r in b["reasons"]}
    assert "subgraph" in codes or "no_rule" in codes


def test_if_branch_with_its_own_constant_weights() -> None:
    # As torch/silero export it: the branch holds its weight as a Constant node, and shapes
    # inside the branch need the branch's own constants (kept there by canonicalize).
    rng = np.random.default_rng(0)
    w2 = numpy_helper.from_array(rng.standard_normal((8, 8, 3, 3)).astype(np.float32), "w2c")
    m = _model(
        IF_MODEL.replace("o1 = Conv <pads=[1,1,1,1]> (r, w2)", "w2c = Constant <value = float[8,8,3,3] w2c_value> ()\n o1 = Conv <pads=[1,1,1,1]> (r, w2c)").replace(
            "w2c_value", "{" + ",".join(f"{v:.6f}" for v in numpy_helper.to_array(w2).reshape(-1)) + "}"
        ),
        w1=(8, 3, 3, 3), b1=(8,), w3=(4, 8, 3, 3),
    )
    result = spa.prune(m, ratio=0.5, benchmark=False)
    assert result.report.oracle["passed"] and result.report.oracle["asserted"]
    assert {layer["weight"] for layer in result.report.layers} == {"w1", "w2c"}
