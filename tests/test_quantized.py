"""Quantized models (ONNX Runtime's own quantizer): QDQ prunes exactly, integer ops refuse clearly."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

import spa

quantization = pytest.importorskip("onnxruntime.quantization")


class _Calibration(quantization.CalibrationDataReader):
    def __init__(self) -> None:
        self.n = 0

    def get_next(self):
        self.n += 1
        if self.n > 3:
            return None
        return {"input": np.random.default_rng(self.n).standard_normal((1, 3, 32, 32)).astype(np.float32)}


@pytest.mark.parametrize(
    "per_channel, weight_type",
    [(True, "QInt8"), (False, "QUInt8")],
    ids=["per-channel-int8", "per-tensor-uint8-zero-point"],
)
def test_qdq_prunes_exactly(zoo_onnx, tmp_path: pathlib.Path, per_channel: bool, weight_type: str) -> None:
    out = tmp_path / "q.onnx"
    qt = getattr(quantization.QuantType, weight_type)
    quantization.quantize_static(
        str(zoo_onnx("resnet")), str(out), _Calibration(), quant_format=quantization.QuantFormat.QDQ,
        per_channel=per_channel, weight_type=qt, activation_type=qt,
    )
    result = spa.prune(out, ratio=0.5, benchmark=False)
    assert result.report.groups_pruned >= 5
    assert result.report.flops_ratio < 0.4
    # A uint8 weight's removed slice is masked with its zero point, not 0: the oracle is exact.
    assert result.report.oracle["passed"] and result.report.oracle["asserted"]


def test_integer_operator_format_blocks_with_reasons(zoo_onnx, tmp_path: pathlib.Path) -> None:
    out = tmp_path / "q.onnx"
    quantization.quantize_static(
        str(zoo_onnx("resnet")), str(out), _Calibration(), quant_format=quantization.QuantFormat.QOperator, per_channel=True
    )
    result = spa.prune(out, ratio=0.5, benchmark=False)
    assert result.report.oracle["passed"]
    codes = {r["code"] for b in result.report.blocked for r in b["reasons"]}
    assert "no_rule" in codes  # com.microsoft QLinearAdd / QLinearGlobalAveragePool: named, not guessed


def test_dynamic_quantization_refuses_with_reason(zoo_onnx, tmp_path: pathlib.Path) -> None:
    out = tmp_path / "q.onnx"
    quantization.quantize_dynamic(str(zoo_onnx("resnet")), str(out))
    result = spa.prune(out, ratio=0.5, benchmark=False)
    codes = {r["code"] for b in result.report.blocked for r in b["reasons"]}
    assert "channel_mixing" in codes
