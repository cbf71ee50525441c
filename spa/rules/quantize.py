"""Quantized models: QDQ (QuantizeLinear/DequantizeLinear) and the integer ops.

QDQ: Q and DQ keep every axis; a per-axis scale/zero point ([C] along ``axis``) is a
per-channel parameter sliced with its channel, a per-tensor one is left alone. A weight that
reaches Conv/MatMul through DequantizeLinear is still a constant weight: roles are recorded on
the quantized initializer (``CouplingContext.weight`` looks through DQ), so QDQ models prune
like float ones. Blocked quantization (``block_size``) along a channel axis is refused.

QLinearConv / ConvInteger / QLinearMatMul / MatMulInteger are Conv/MatMul with the weight at
another input position and per-output-channel weight scales/zero points.
"""

from __future__ import annotations

import onnx_ir as ir

from spa.rules._util import tie_same_shape
from spa.rules.base import BlockCode, CouplingContext, NoRewrite, Role, register
from spa.rules.conv import ConvRule
from spa.rules.linear import MatMulRule

__all__ = ["QDQRule", "DynamicQuantizeRule", "QLinearConvRule", "ConvIntegerRule", "QLinearMatMulRule", "MatMulIntegerRule"]


@register("QuantizeLinear", "DequantizeLinear")
class QDQRule(NoRewrite):
    def couplings(self, node: ir.Node, ctx: CouplingContext) -> None:
        x, y = ctx.input(0), ctx.output(0)
        rank = ctx.rank(x)
        if rank is None:
            return
        axis = int(ctx.attr("axis", 1)) % max(rank, 1) if rank else 0
        blocked = int(ctx.attr("block_size", 0)) > 0
        params = [p for p in node.inputs[1:] if p is not None and ctx.rank(p)]
        if blocked and params:
            reason = f"{node.op_type} '{ctx.name}' uses blocked quantization along axis {axis}"
            ctx.block(x, axis, BlockCode.UNSUPPORTED_ATTRIBUTE, reason)
            ctx.block(y, axis, BlockCode.UNSUPPORTED_ATTRIBUTE, reason)
            tie_same_shape(ctx, x, y, skip=[axis])
            return
        tie_same_shape(ctx, x, y)
        for p in params:  # per-axis [C] is sliced with the channel; per-tensor ([] or [1]) stays
            if ctx.rank(p) == 1 and ctx.size(p, 0) == ctx.size(y, axis) != 1 and ctx.tie(p, 0, y, axis) and ctx.is_constant(p):
                ctx.weight(p, 0, Role.PARAM)


@register("DynamicQuantizeLinear")
class DynamicQuantizeRule(NoRewrite):
    """The scale is computed from the min/max over *all* channels: removing one can change it."""

    def couplings(self, node: ir.Node, ctx: CouplingContext) -> None:
        x, y = ctx.input(0), ctx.output(0)
        rank = ctx.rank(x)
        if rank is None:
            return
        if ctx.allow_inexact:
            tie_same_shape(ctx, x, y)
            for ax in range(rank):
                ctx.mark_inexact(y, ax, f"DynamicQuantizeLinear '{ctx.name}' derives its scale from every channel")
            return
        ctx.block_all(BlockCode.CHANNEL_MIXING, f"DynamicQuantizeLinear '{ctx.name}' derives its scale from every channel")


@register("QLinearConv")
class QLinearConvRule(ConvRule):
    X, W, B = 0, 3, 8
    PER_OUT = (4, 5)


@register("ConvInteger")
class ConvIntegerRule(ConvRule):
    X, W, B = 0, 1, None
    PER_OUT = (3,)


@register("QLinearMatMul")
class QLinearMatMulRule(MatMulRule):
    A, B = 0, 3
    PER_COL = (4, 5)


@register("MatMulInteger")
class MatMulIntegerRule(MatMulRule):
    A, B = 0, 1
    PER_COL = (3,)
