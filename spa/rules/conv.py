"""Conv and ConvTranspose (1D/2D/3D, grouped and depthwise).

Conv: X[N, C, *S] · W[M, C/g, *k] (+ B[M]) → Y[N, M, *S'].
- g == 1: W axis 1 reads X's channels one to one; W axis 0 produces Y's channels.
- depthwise-like (C/g == 1): input channel i *is* group i and feeds outputs i·m … i·m+m-1
  (m = M/g), so removing it removes its whole group: ``group`` becomes the kept input count.
- grouped (C/g > 1): every group must keep the same count, so position j inside each group is
  one unit (X channels {i·C/g + j}) and likewise for outputs ({i·M/g + t}); ``group`` stays.
ConvTranspose is the same with W's axes swapped (W[C, M/g, *k]).
Spatial axes are never channels: this rule leaves them unmapped (frozen if ever coupled).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from spa.graph import attr
from spa.rules.base import CouplingContext, RewriteContext, Role, register

__all__ = ["ConvRule", "ConvTransposeRule"]


def _group_layout(ctx: CouplingContext, x: ir.Value, w: ir.Value, in_axis_w: int, out_axis_w: int, y: ir.Value):
    """Return (C, M, g) when statically known, else None."""
    c = ctx.size(x, 1)
    m = ctx.size(y, 1)
    g = int(ctx.attr("group", 1))
    if c is None or m is None or g < 1 or c % g or m % g:
        return None
    return c, m, g


@register("Conv")
class ConvRule:
    """Input positions are class attributes so quantized convs (quantize.py) reuse the rule."""

    X, W, B = 0, 1, 2
    PER_OUT: tuple[int, ...] = ()  # per-output-channel inputs (weight scales / zero points)

    def couplings(self, node: ir.Node, ctx: CouplingContext) -> None:
        x, w = ctx.input(self.X), ctx.input(self.W)
        b = ctx.input(self.B) if self.B is not None else None
        y = ctx.output(0)
        ctx.tie(x, 0, y, 0)
        layout = _group_layout(ctx, x, w, 1, 0, y)
        if layout is None:
            # Unknown channel counts: nothing here can be followed; the unmapped-axis check freezes them.
            return
        c, m, g = layout
        ctx.tie(w, 0, y, 1)
        ctx.weight(w, 0, Role.OUT)
        for p in (b, *(ctx.input(i) for i in self.PER_OUT)):
            if p is not None and ctx.rank(p) == 1 and ctx.size(p, 0) == m and ctx.tie(p, 0, y, 1):
                ctx.weight(p, 0, Role.PARAM)
        cg, mg = c // g, m // g
        if g == 1:
            ctx.tie(x, 1, w, 1)
            ctx.weight(w, 1, Role.IN)
        elif cg == 1:
            ctx.tie(x, 1, y, 1, np.repeat(np.arange(c), mg), np.arange(m))
        else:
            ctx.tie(x, 1, w, 1, np.arange(c), np.arange(c) % cg)
            ctx.weight(w, 1, Role.IN)
            ctx.tie(y, 1, y, 1, np.arange(m), np.arange(m) % mg)

    def rewrite(self, node: ir.Node, ctx: RewriteContext) -> None:
        g = int(attr(node, "group", 1))
        x, w = node.inputs[self.X], node.inputs[self.W]
        if g > 1 and w.shape is not None and w.shape[1] == 1:
            kept = ctx.kept(x, 1)
            if kept is not None:
                ctx.set_attr("group", int(len(kept)))


@register("ConvTranspose")
class ConvTransposeRule:
    def couplings(self, node: ir.Node, ctx: CouplingContext) -> None:
        x, w = ctx.input(0), ctx.input(1)
        b = ctx.input(2)
        y = ctx.output(0)
        ctx.tie(x, 0, y, 0)
        layout = _group_layout(ctx, x, w, 0, 1, y)
        if layout is None:
            return
        c, m, g = layout
        cg, mg = c // g, m // g
        ctx.tie(x, 1, w, 0)
        ctx.weight(w, 0, Role.IN)
        if b is not None:
            ctx.tie(b, 0, y, 1)
            ctx.weight(b, 0, Role.PARAM)
        if g == 1:
            ctx.tie(w, 1, y, 1)
            ctx.weight(w, 1, Role.OUT)
        elif cg == 1:
            # Input channel i is group i and produces outputs i·mg … ; W axis 1 is shared by all
            # groups, so it cannot be a unit of its own without merging every group.
            ctx.tie(x, 1, y, 1, np.repeat(np.arange(c), mg), np.arange(m))
            ctx.weight(w, 0, Role.OUT)
        else:
            ctx.tie(x, 1, x, 1, np.arange(c), np.arange(c) % cg)
            ctx.tie(w, 1, y, 1, np.arange(m) % mg, np.arange(m))
            ctx.weight(w, 1, Role.OUT)

    def rewrite(self, node: ir.Node, ctx: RewriteContext) -> None:
        g = int(attr(node, "group", 1))
        x, w = node.inputs[0], node.inputs[1]
        if g > 1 and x.shape is not None and isinstance(x.shape[1], int) and x.shape[1] == g:
            kept = ctx.kept(x, 1)
            if kept is not None:
                ctx.set_attr("group", int(len(kept)))
