"""Attention fused into one op: ONNX Attention (opset 23) and ONNX Runtime's com.microsoft ops."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import pytest
from onnx import numpy_helper

import spa


def _with_weights(text: str, **shapes) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    m = onnx.parser.parse_model(text)
    for name, shape in shapes.items():
        m.graph.initializer.append(numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name))
    return m


ONNX_ATTENTION = """
<ir_version: 10, opset_import: ["" : 23]>
g (float[1,6,16] x) => (float[1,6,16] y) {
   q = MatMul(x, wq)
   k = MatMul(x, wk)
   v = MatMul(x, wv)
   a = Attention <q_num_heads=4, kv_num_heads=2> (q, k, v)
   y = MatMul(a, wo)
}
"""


def test_onnx_attention_gqa_heads() -> None:
    m = _with_weights(ONNX_ATTENTION, wq=(16, 16), wk=(16, 8), wv=(16, 8), wo=(16, 16))
    result = spa.prune(m, ratio=0.5, benchmark=False)
    kept = {layer["weight"]: layer["kept"] for layer in result.report.layers}
    assert kept == {"wq": 8, "wk": 4, "wv": 4}  # one KV head goes with its two query heads
    assert result.report.oracle["passed"] and result.report.oracle["asserted"]
    node = next(n for n in result.model.graph if n.op_type == "Attention")
    assert (node.attributes["q_num_heads"].value, node.attributes["kv_num_heads"].value) == (2, 1)


def test_ort_fused_bert(zoo_onnx, tmp_path) -> None:
    optimizer = pytest.importorskip("onnxruntime.transformers.optimizer")
    fused = optimizer.optimize_model(str(zoo_onnx("bert")), model_type="bert", num_heads=4, hidden_size=32, opt_level=0)
    path = tmp_path / "fused.onnx"
    fused.save_model_to_file(str(path))
    ops = {(n.domain, n.op_type) for n in onnx.load(path).graph.node}
    assert ("com.microsoft", "Attention") in ops and ("com.microsoft", "SkipLayerNormalization") in ops
    result = spa.prune(path, ratio=0.5, benchmark=False)
    kept = {layer["weight"]: (layer["channels"], layer["kept"]) for layer in result.report.layers}
    fused_qkv = [v for k, v in kept.items() if "qkv" in k]
    assert fused_qkv == [(96, 48)]  # 4 → 2 heads inside the fused Attention
    assert result.report.oracle["passed"] and result.report.oracle["asserted"]
    codes = {r["code"] for b in result.report.blocked for r in b["reasons"]}
    assert "channel_mixing" in codes  # SkipLayerNormalization keeps the hidden size
    loose = spa.prune(path, ratio=0.5, benchmark=False, allow_inexact=True)
    assert loose.report.flops_after < result.report.flops_after
    assert loose.report.oracle["exact_part"]["passed"]
