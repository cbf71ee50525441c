"""TensorFlow/Keras graphs converted by tf2onnx (NHWC, Transpose pairs, run-time shape building).

The .onnx files were made by models/build_keras.py (tensorflow-cpu 2.21, tf2onnx 1.17, in a
separate venv: tensorflow is not a dependency) and are checked in so CI needs no TensorFlow.
"""

from __future__ import annotations

import pathlib

import onnxruntime as ort
import pytest

import spa

DATA = pathlib.Path(__file__).parent / "data" / "tf2onnx"


@pytest.mark.parametrize(
    "name, at_least",
    [("cnn_res", 3), ("cnn_flat", 3), ("lstm", 3)],
    ids=["residual-depthwise", "nhwc-flatten-dense", "embedding-lstm"],
)
def test_keras_models_prune_exactly(name: str, at_least: int) -> None:
    path = DATA / f"{name}.onnx"
    inp = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_inputs()[0]
    shape = [d if isinstance(d, int) else 1 for d in inp.shape]
    result = spa.prune(path, ratio=0.5, benchmark=False, input_shapes={inp.name: shape})
    assert result.report.groups_pruned >= at_least
    assert result.report.flops_ratio < 0.5
    assert result.report.oracle["passed"] and result.report.oracle["asserted"]
