"""Pooling, Pad, Resize/Upsample: ops that act on spatial axes and keep channels apart.

Batch and channel axes pass through. Pad and Resize pass through exactly those axes they do
not change (pads 0, scale 1); a Resize given by ``sizes`` has the channel count written in
that constant, so it is rewritten when the channel axis shrinks.
"""

from __future__ import annotations

import onnx_ir as ir

from spa.graph import attr
from spa.rules._util import const_ints, int_list_input_or_attr
from spa.rules.base import BlockCode, CouplingContext, NoRewrite, RewriteContext, register

__all__ = ["PoolRule", "PadRule", "ResizeRule"]


@register("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")
class PoolRule(NoRewrite):
    """MaxPool's Indices count positions in the flattened input, channel offset included
    (``(n·C + c)·H·W + …``): removing a channel renumbers every later one, so channels whose
    indices are read are frozen (DATA_DEPENDENT, like Shape)."""

    def couplings(self, node: ir.Node, ctx: CouplingContext) -> None:
        x = ctx.input(0)
        for y in node.outputs:  # MaxPool's Indices output has Y's shape
            if y is not None:
                ctx.tie(x, 0, y, 0)
                ctx.tie(x, 1, y, 1)
        indices = ctx.output(1) if node.op_type == "MaxPool" else None
        if indices is not None and (indices.uses() or indices.is_graph_output()):
            ctx.block(
                x, 1, BlockCode.DATA_DEPENDENT,
                f"MaxPool '{ctx.name}': its Indices output '{indices.name}' encodes channel positions",
            )


@register("Pad")
class PadRule(NoRewrite):
    def couplings(self, node: ir.Node, ctx: CouplingContext) -> None:
        x, y = ctx.input(0), ctx.output(0)
        rank = ctx.rank(x)
        if rank is None:
            return
        present, pads = int_list_input_or_attr(ctx, 1, "pads")
        axes = list(range(rank))
        if ctx.input(3) is not None:
            given = const_ints(ctx, ctx.input(3))
            axes = None if given is None else [a % rank for a in given]
        if not present or pads is None or axes is None:
            ctx.block_all(BlockCode.DATA_DEPENDENT, f"Pad '{ctx.name}': pads or axes are not constant")
            return
        n = len(axes)
        padded = {axes[i] for i in range(n) if pads[i] != 0 or pads[i + n] != 0}
        for ax in range(rank):
            if ax not in padded:
                ctx.tie(x, ax, y, ax)


def _resize_unchanged_axes(ctx: CouplingContext, x: ir.Value, rank: int) -> tuple[list[int] | None, bool]:
    """Axes a Resize leaves alone, and whether the node spells the sizes out."""
    axes_attr = ctx.attr("axes")
    axes = [a % rank for a in axes_attr] if axes_attr is not None else list(range(rank))
    if ctx.node.op_type == "Upsample":
        scales_v = ctx.input(1)
        sizes_v = None
    else:
        scales_v = ctx.input(2)
        sizes_v = ctx.input(3)
    scales = ctx.const(scales_v) if scales_v is not None else None
    if scales_v is not None and scales is None:
        return None, False
    if scales is not None and scales.size:
        return [a for a in range(rank) if a not in axes or float(scales.reshape(-1)[axes.index(a)]) == 1.0], False
    sizes = const_ints(ctx, sizes_v)
    if sizes is None:
        return None, False
    return [a for a in range(rank) if a not in axes or sizes[axes.index(a)] == ctx.size(x, a)], True


@register("Resize", "Upsample")
class ResizeRule:
    def couplings(self, node: ir.Node, ctx: CouplingContext) -> None:
        x, y = ctx.input(0), ctx.output(0)
        rank = ctx.rank(x)
        if rank is None:
            return
        unchanged, _ = _resize_unchanged_axes(ctx, x, rank)
        if unchanged is None:
            ctx.block_all(BlockCode.DATA_DEPENDENT, f"{node.op_type} '{ctx.name}': scales/sizes are not constant")
            return
        for ax in unchanged:
            ctx.tie(x, ax, y, ax)

    def rewrite(self, node: ir.Node, ctx: RewriteContext) -> None:
        if node.op_type != "Resize" or len(node.inputs) < 4 or node.inputs[3] is None:
            return
        x = node.inputs[0]
        sizes_v = node.inputs[3]
        if sizes_v.const_value is None or not ctx.changed(x):
            return
        sizes = [int(s) for s in sizes_v.const_value.numpy().reshape(-1)]
        rank = len(x.shape)
        axes = [a % rank for a in attr(node, "axes", range(rank))]
        new = list(sizes)
        for i, a in enumerate(axes):
            if sizes[i] == x.shape[a]:
                new[i] = ctx.new_size(x, a)
        if new != sizes:
            ctx.set_const(3, new)
