"""Quantized models: QDQ (QuantizeLinear/DequantizeLinear) and the integer ops.

QDQ: Q and DQ keep every axis; a per-axis scale/zero point ([C] along ``axis``) is a
per-channel parameter sliced with its channel, a per-tensor one is left alone. A weight that
reaches Conv/MatMul through DequantizeLinear is still a constant weight: roles are recorded on
the quantized initializer (``CouplingContext.weight`` looks through DQ), so QDQ models prune
like float ones. Blocked quantization (``block_size``) along a channel axis is refused.

QLinearConv / ConvInteger / QLinearMatMul / MatMulInteger are Conv/MatMul with the weight at
another input position and per-output-channel weight scales/zero points.

Zero points (:data:`ZERO_POINT_OF`, :func:`weight_zero_point`): a quantized weight's "zero" is
its zero point, not 0, so the mask oracle (``spa.verify``) fills a removed column of such a
weight with the zero point of that channel. A new quantized op whose weight has a zero
point gets an entry here next to its rule.
"""

from __future__ import annotations

import onnx_ir as ir

from spa.graph import attr, canonical_domain
from spa.rules._util import tie_same_shape
from spa.rules.base import BlockCode, CouplingContext, NoRewrite, Role, register
from spa.rules.conv import ConvRule
from spa.rules.linear import MatMulRule

__all__ = ["ZERO_POINT_OF", "weight_zero_point", "QDQRule", "DynamicQuantizeRule", "QLinearConvRule", "ConvIntegerRule", "QLinearMatMulRule", "MatMulIntegerRule"]


#: (op, input index of a quantized weight) → (input index of its zero point, zero point axis
#: in the weight). Axis None: the op's ``axis`` attribute (default 1), as for DequantizeLinear.
ZERO_POINT_OF: dict[tuple[str, int], tuple[int, int | None]] = {
    ("DequantizeLinear", 0): (2, None),
    ("QLinearConv", 3): (5, 0),
    ("ConvInteger", 1): (3, 0),
    ("QLinearMatMul", 3): (5, -1),
    ("MatMulInteger", 1): (3, -1),
}


def weight_zero_point(node: ir.Node, index: int) -> tuple[int, int] | None:
    """Where the zero point of the quantized weight at input ``index`` of ``node`` lives:
    (its input index, its axis in the weight, possibly negative). None when that input is no
    quantized weight with a zero point (a default-domain op of :data:`ZERO_POINT_OF`)."""
    if canonical_domain(node.domain) != "":
        return None
    spec = ZERO_POINT_OF.get((node.op_type, index))
    if spec is None:
        return None
    zp_index, axis = spec
    return zp_index, int(attr(node, "axis", 1)) if axis is None else axis


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
