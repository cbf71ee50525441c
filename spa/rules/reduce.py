"""Reductions and axis-wise normalizers: Reduce*, ArgMax/ArgMin, Softmax/LogSoftmax/Hardmax.

Axes that are not reduced pass through (with or without keepdims). A reduced or normalized
axis mixes all its channels without weights: removing one changes every result, so such an
axis is blocked (CHANNEL_MIXING). Reducing spatial axes (a ReduceMean global pool) is fine.
"""

from __future__ import annotations

import onnx_ir as ir

from spa.rules._util import const_ints
from spa.rules.base import BlockCode, CouplingContext, NoRewrite, register

__all__ = ["ReduceRule", "SoftmaxRule"]

REDUCE_OPS = (
    "ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceProd", "ReduceL1", "ReduceL2",
    "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare", "ArgMax", "ArgMin",
)
_MEAN_LIKE = frozenset({"ReduceMean", "ReduceL2", "ReduceSumSquare"})
# Opset where ``axes`` moved from attribute to input.
_AXES_AS_INPUT = {"ReduceSum": 13}


def _reduced_axes(ctx: CouplingContext, rank: int) -> list[int] | None:
    op = ctx.node.op_type
    if op in ("ArgMax", "ArgMin"):
        return [int(ctx.attr("axis", 0)) % rank]
    if ctx.opset >= _AXES_AS_INPUT.get(op, 18) and ctx.input(1) is not None:
        axes = const_ints(ctx, ctx.input(1))
        if axes is None:
            return None
    else:
        axes = ctx.attr("axes")
    if not axes:
        if int(ctx.attr("noop_with_empty_axes", 0)):
            return []
        return list(range(rank))
    return sorted({int(a) % rank for a in axes})


@register(*REDUCE_OPS)
class ReduceRule(NoRewrite):
    def couplings(self, node: ir.Node, ctx: CouplingContext) -> None:
        x, y = ctx.input(0), ctx.output(0)
        rank = ctx.rank(x)
        if rank is None:
            return
        axes = _reduced_axes(ctx, rank)
        if axes is None:
            ctx.block_all(BlockCode.DATA_DEPENDENT, f"{node.op_type} '{ctx.name}': axes are not constant")
            return
        keep = int(ctx.attr("keepdims", 1))
        o = 0
        for ax in range(rank):
            if ax in axes:
                reason = f"{node.op_type} '{ctx.name}' reduces over axis {ax}"
                if ctx.allow_inexact and node.op_type in _MEAN_LIKE and keep:
                    ctx.allow(x, ax)  # RMSNorm's mean of squares: the mean shifts, marked inexact
                    ctx.mark_inexact(x, ax, reason)
                else:
                    ctx.block(x, ax, BlockCode.CHANNEL_MIXING, reason)
                if keep:
                    ctx.allow(y, o)
                    o += 1
                continue
            ctx.tie(x, ax, y, o)
            o += 1


@register("Softmax", "LogSoftmax", "Hardmax")
class SoftmaxRule(NoRewrite):
    def couplings(self, node: ir.Node, ctx: CouplingContext) -> None:
        x, y = ctx.input(0), ctx.output(0)
        rank = ctx.rank(x)
        if rank is None:
            return
        axis = int(ctx.attr("axis", -1 if ctx.opset >= 13 else 1)) % rank
        mixed = [axis] if ctx.opset >= 13 else list(range(axis, rank))
        for ax in range(rank):
            if ax in mixed:
                reason = f"{node.op_type} '{ctx.name}' normalizes over axis {ax}"
                ctx.block(x, ax, BlockCode.CHANNEL_MIXING, reason)
                ctx.block(y, ax, BlockCode.CHANNEL_MIXING, reason)
            else:
                ctx.tie(x, ax, y, ax)
