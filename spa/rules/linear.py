"""Gemm and MatMul.

Gemm: Y[M, N] = α·A'[M, K]·B'[K, N] + β·C (A' = Aᵀ if transA, B' = Bᵀ if transB).
MatMul: numpy matmul; 1-D operands are promoted and the promoted axis dropped again.

The contraction axis K is one channel space of both operands. When an operand is a constant
its K axis is an IN weight (the mask oracle zeroes it) and its free axis an OUT weight.
When *both* operands are activations (attention scores, …) removing a K channel changes the
product rather than masking a term, so the contraction is blocked (CHANNEL_MIXING).
"""

from __future__ import annotations

import onnx_ir as ir

from spa.rules._util import tie_broadcast
from spa.rules.base import BlockCode, CouplingContext, NoRewrite, Role, register

__all__ = ["GemmRule", "MatMulRule"]


def _contract(ctx: CouplingContext, a: ir.Value, a_k: int, a_free: int | None, b: ir.Value, b_k: int, b_free: int | None) -> None:
    ca, cb = ctx.is_weight(a), ctx.is_weight(b)
    if not ca and not cb:
        reason = f"{ctx.node.op_type} '{ctx.name}' contracts two activations over this axis"
        ctx.block(a, a_k, BlockCode.CHANNEL_MIXING, reason)
        ctx.block(b, b_k, BlockCode.CHANNEL_MIXING, reason)
        return
    ctx.tie(a, a_k, b, b_k)
    for v, k, free, const in ((a, a_k, a_free, ca), (b, b_k, b_free, cb)):
        if const:
            ctx.weight(v, k, Role.IN)
            if free is not None:
                ctx.weight(v, free, Role.OUT)


@register("Gemm")
class GemmRule(NoRewrite):
    def couplings(self, node: ir.Node, ctx: CouplingContext) -> None:
        a, b, c = ctx.input(0), ctx.input(1), ctx.input(2)
        y = ctx.output(0)
        if ctx.rank(a) != 2 or ctx.rank(b) != 2 or ctx.rank(y) != 2:
            return
        ta, tb = int(ctx.attr("transA", 0)), int(ctx.attr("transB", 0))
        a_m, a_k = (1, 0) if ta else (0, 1)
        b_k, b_n = (1, 0) if tb else (0, 1)
        ctx.tie(a, a_m, y, 0)
        ctx.tie(b, b_n, y, 1)
        _contract(ctx, a, a_k, a_m, b, b_k, b_n)
        if c is not None:
            tie_broadcast(ctx, [c], y)


@register("MatMul")
class MatMulRule(NoRewrite):
    """Input positions are class attributes so quantized matmuls (quantize.py) reuse the rule."""

    A, B = 0, 1
    PER_COL: tuple[int, ...] = ()  # per-output-column inputs of B (scales / zero points)

    def couplings(self, node: ir.Node, ctx: CouplingContext) -> None:
        a, b = ctx.input(self.A), ctx.input(self.B)
        y = ctx.output(0)
        ra, rb, ry = ctx.rank(a), ctx.rank(b), ctx.rank(y)
        if ra is None or rb is None or ry is None:
            return
        if ra == 1 and rb == 1:
            _contract(ctx, a, 0, None, b, 0, None)
            return
        a_k = ra - 1
        b_k = 0 if rb == 1 else rb - 2
        a_m = ra - 2 if ra >= 2 else None
        b_n = rb - 1 if rb >= 2 else None
        if a_m is not None:
            ctx.tie(a, a_m, y, ry - 2 if rb >= 2 else ry - 1)
        if b_n is not None:
            ctx.tie(b, b_n, y, ry - 1)
            for p in (ctx.input(i) for i in self.PER_COL):
                if p is not None and ctx.rank(p) == 1 and ctx.size(p, 0) == ctx.size(y, ry - 1) and ctx.tie(p, 0, y, ry - 1):
                    ctx.weight(p, 0, Role.PARAM)
        _contract(ctx, a, a_k, a_m, b, b_k, b_n)
        # Batch axes broadcast like element-wise ops.
        batch = [v for v, r in ((a, ra), (b, rb)) if r > 2]
        if batch:
            tie_broadcast(ctx, batch, y, out_axes=range(ry - 2), right_offset=2)
