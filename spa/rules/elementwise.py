"""Element-wise ops: activations, casts, and broadcasting arithmetic.

Unary ops map channel i to channel i on every axis. Broadcasting ops (Add … Where, PRelu)
tie each input axis that has the output's size to that output axis, so a residual Add couples
both branches, and a per-channel constant (bias, scale, PRelu slope) is sliced with its channel
while a scalar or size-1 axis is left alone.
"""

from __future__ import annotations

import onnx_ir as ir

from spa.rules._util import tie_broadcast, tie_same_shape
from spa.rules.base import CouplingContext, NoRewrite, register

__all__ = ["UnaryRule", "BroadcastRule"]

UNARY_OPS = (
    "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Swish", "Tanh", "Erf", "Gelu",
    "Softplus", "Softsign", "Elu", "Selu", "Celu", "ThresholdedRelu", "Mish", "Clip", "Shrink",
    "Exp", "Log", "Abs", "Neg", "Sqrt", "Reciprocal", "Floor", "Ceil", "Round", "Sign",
    "Sin", "Cos", "Tan", "Asin", "Acos", "Atan", "Sinh", "Cosh", "Asinh", "Acosh", "Atanh",
    "Not", "IsNaN", "IsInf", "BitwiseNot",
    "Identity", "Cast", "CastLike", "Dropout",
)

BROADCAST_OPS = (
    "Add", "Sub", "Mul", "Div", "Pow", "Mod", "Max", "Min", "Mean", "Sum",
    "Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "And", "Or", "Xor",
    "BitwiseAnd", "BitwiseOr", "BitwiseXor", "BitShift", "Where", "PRelu",
)


@register(*UNARY_OPS)
class UnaryRule(NoRewrite):
    """Only input 0 carries data; Clip's min/max are scalars, CastLike's input 1 only a dtype."""

    def couplings(self, node: ir.Node, ctx: CouplingContext) -> None:
        x = ctx.input(0)
        for y in node.outputs:  # Dropout's mask has the data's shape too
            tie_same_shape(ctx, x, y)
        if node.op_type == "CastLike":
            target = ctx.input(1)
            if target is not None and ctx.rank(target) is not None:
                for ax in range(ctx.rank(target)):
                    ctx.allow(target, ax)  # only its dtype is read


@register(*BROADCAST_OPS)
class BroadcastRule(NoRewrite):
    def couplings(self, node: ir.Node, ctx: CouplingContext) -> None:
        tie_broadcast(ctx, list(node.inputs), ctx.output(0))
