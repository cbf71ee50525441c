"""The rule registry's key set is pinned here (STYLE.md house rule 6).

Adding or removing a rule means editing this table in the same change: an op silently
gaining or losing a rule changes what spa prunes.
"""

from __future__ import annotations

import pytest

import spa.rules
from spa.rules import get_rule, registered_ops

# family module → op types it registers (all in the default ONNX domain).
EXPECTED: dict[str, set[str]] = {
    "attention": {"Attention"},
    "concat_split": {"Concat", "Slice", "Split"},
    "control_flow": {"If"},
    "conv": {"Conv", "ConvTranspose"},
    "elementwise": {
        # unary
        "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Swish", "Tanh", "Erf", "Gelu",
        "Softplus", "Softsign", "Elu", "Selu", "Celu", "ThresholdedRelu", "Mish", "Clip", "Shrink",
        "Exp", "Log", "Abs", "Neg", "Sqrt", "Reciprocal", "Floor", "Ceil", "Round", "Sign",
        "Sin", "Cos", "Tan", "Asin", "Acos", "Atan", "Sinh", "Cosh", "Asinh", "Acosh", "Atanh",
        "Not", "IsNaN", "IsInf", "BitwiseNot", "Identity", "Cast", "CastLike", "Dropout",
        # broadcasting
        "Add", "Sub", "Mul", "Div", "Pow", "Mod", "Max", "Min", "Mean", "Sum",
        "Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "And", "Or", "Xor",
        "BitwiseAnd", "BitwiseOr", "BitwiseXor", "BitShift", "Where", "PRelu",
    },
    "expand": {"ConstantOfShape", "Expand"},
    "gather": {"Gather"},
    "linear": {"Gemm", "MatMul"},
    "norm": {
        "BatchNormalization", "InstanceNormalization", "GroupNormalization", "LayerNormalization", "LRN",
        "RMSNormalization", "SimplifiedLayerNormalization",
    },
    "quantize": {
        "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear",
        "QLinearConv", "ConvInteger", "QLinearMatMul", "MatMulInteger",
    },
    "recurrent": {"RNN", "GRU", "LSTM"},
    "reduce": {
        "ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceProd", "ReduceL1", "ReduceL2",
        "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare", "ArgMax", "ArgMin",
        "Softmax", "LogSoftmax", "Hardmax",
    },
    "reshape": {"Flatten", "Reshape"},
    "shape": {"Transpose", "Squeeze", "Unsqueeze", "Shape", "Tile"},
    "spatial": {"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "Pad", "Resize", "Upsample"},
}


# com.microsoft (ONNX Runtime contrib) ops, family module → op types.
EXPECTED_MS: dict[str, set[str]] = {
    "attention": {
        "Attention", "MultiHeadAttention", "SkipLayerNormalization", "SkipSimplifiedLayerNormalization",
        "BiasGelu", "FastGelu", "BiasAdd", "Gelu", "QuickGelu",
    },
}


def test_registry_key_set_is_pinned():
    expected = {("", op) for ops in EXPECTED.values() for op in ops}
    expected |= {("com.microsoft", op) for ops in EXPECTED_MS.values() for op in ops}
    got = registered_ops()
    assert got == expected, f"unexpected: {sorted(got - expected)}; missing: {sorted(expected - got)}"


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_each_op_lives_in_its_family_module(family):
    for op in EXPECTED[family]:
        rule = get_rule("", op)
        assert type(rule).__module__ == f"spa.rules.{family}", op


def test_families_are_disjoint():
    seen: set[str] = set()
    for ops in EXPECTED.values():
        assert not seen & ops
        seen |= ops


def test_ai_onnx_is_the_default_domain():
    assert get_rule("ai.onnx", "Conv") is get_rule("", "Conv")
    assert get_rule("com.microsoft", "Conv") is None
    assert get_rule("com.microsoft", "Attention") is not get_rule("", "Attention")
    assert get_rule("", "DepthToSpace") is None


def test_registering_twice_is_refused():
    with pytest.raises(RuntimeError):

        @spa.rules.register("Conv")
        class Duplicate:  # pragma: no cover - never instantiated past registration
            def couplings(self, node, ctx) -> None: ...

            def rewrite(self, node, ctx) -> None: ...


def test_look_through_ops_are_pinned_and_have_rules():
    from spa.rules.base import LOOK_THROUGH

    assert set(LOOK_THROUGH) == {("", "DequantizeLinear"), ("", "Cast"), ("", "Identity"), ("", "Transpose")}
    for domain, op in LOOK_THROUGH:  # each must also tie its input to its output
        assert get_rule(domain, op) is not None, op


def test_look_through_maps_transpose_axes_both_ways():
    import onnx_ir as ir

    from spa.rules.base import look_through

    x = ir.Value(name="x", shape=ir.Shape([2, 3, 4]))
    node = ir.node("Transpose", [x], attributes={"perm": [2, 0, 1]})
    t = look_through(node)
    assert t is not None
    assert [t.input_axis(node, k, 3) for k in range(3)] == [2, 0, 1]
    assert [t.output_axis(node, t.input_axis(node, k, 3), 3) for k in range(3)] == [0, 1, 2]
    assert look_through(ir.node("Relu", [x])) is None
    assert look_through(ir.node("Cast", [x], domain="com.microsoft")) is None


def test_zero_points_live_with_the_quantize_rules():
    import onnx_ir as ir

    from spa.rules import quantize

    assert {op for op, _ in quantize.ZERO_POINT_OF} <= {op for _, op in registered_ops()}
    x = ir.Value(name="x", shape=ir.Shape([4, 3]))
    dq = ir.node("DequantizeLinear", [x, x, x], attributes={"axis": 0})
    assert quantize.weight_zero_point(dq, 0) == (2, 0)
    assert quantize.weight_zero_point(ir.node("DequantizeLinear", [x, x, x]), 0) == (2, 1)
    assert quantize.weight_zero_point(ir.node("QLinearConv", [x] * 8), 3) == (5, 0)
    assert quantize.weight_zero_point(dq, 1) is None
    assert quantize.weight_zero_point(ir.node("Conv", [x, x]), 1) is None
