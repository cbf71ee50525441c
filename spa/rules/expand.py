"""Ops whose output sizes are spelled out in a constant: Expand, ConstantOfShape.

An output axis that comes from the data (Expand's input has that size) is tied to it. An
output axis whose size the *constant* decides (a broadcast axis of Expand, every axis of
ConstantOfShape) may take any size: the rule allows it and rewrites the constant's entry to the
new size. Torch builds zero initial RNN states this way ([dirs, batch, hidden]).
"""

from __future__ import annotations

import onnx_ir as ir

from spa.rules._util import const_ints, rewrite_target, shape_target
from spa.rules.base import BlockCode, CouplingContext, RewriteContext, Role, register

__all__ = ["ExpandRule", "ConstantOfShapeRule"]


@register("Expand")
class ExpandRule:
    def couplings(self, node: ir.Node, ctx: CouplingContext) -> None:
        x, shape_v, y = ctx.input(0), ctx.input(1), ctx.output(0)
        spec = shape_target(shape_v)
        rx, ry = ctx.rank(x), ctx.rank(y)
        if spec is None:
            ctx.block_all(BlockCode.DATA_DEPENDENT, f"Expand '{ctx.name}': the target shape is computed at run time")
            return
        if rx is None or ry is None:
            return
        entries, where = spec
        for o in range(ry):
            i = o - (ry - rx)
            k = o - (ry - len(entries))
            entry = entries[k] if k >= 0 else 1
            rewritable = k < 0 or (entry is not None and where[k] is not None)
            sx = ctx.size(x, i) if i >= 0 else None
            sy = ctx.size(y, o)
            if i >= 0 and sx is not None and sx == sy and sx != 1:
                if entry == 1 or rewritable:  # data size; an explicit entry is kept in step
                    if ctx.tie(x, i, y, o) and ctx.is_constant(x):
                        ctx.weight(x, i, Role.PARAM)
            elif entry is not None and entry == sy and rewritable:
                ctx.allow(y, o)  # the constant decides this size; rewrite() keeps it in step

    def rewrite(self, node: ir.Node, ctx: RewriteContext) -> None:
        y = node.outputs[0]
        if not ctx.changed(y):
            return
        entries, where = shape_target(node.inputs[1])
        ry = len(y.shape)
        changes = {}
        for k, s in enumerate(entries):
            o = k + ry - len(entries)
            if s is not None and s != 1 and ctx.kept(y, o) is not None:
                changes[k] = ctx.new_size(y, o)
        rewrite_target(ctx, where, changes)


@register("ConstantOfShape")
class ConstantOfShapeRule:
    def couplings(self, node: ir.Node, ctx: CouplingContext) -> None:
        shape_v, y = ctx.input(0), ctx.output(0)
        if const_ints(ctx, shape_v) is None:
            ctx.block_all(BlockCode.DATA_DEPENDENT, f"ConstantOfShape '{ctx.name}': the shape is computed at run time")
            return
        for o in range(ctx.rank(y) or 0):
            ctx.allow(y, o)

    def rewrite(self, node: ir.Node, ctx: RewriteContext) -> None:
        y = node.outputs[0]
        if not ctx.changed(y):
            return
        ctx.set_const(0, [ctx.new_size(y, o) for o in range(len(y.shape))])
