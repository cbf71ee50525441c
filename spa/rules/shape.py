"""Layout ops: Transpose, Squeeze, Unsqueeze, Shape, Tile (Reshape/Flatten: reshape.py).

Axes are followed one to one through permutations and inserted/removed size-1 axes. Shape
reads sizes, so the axes whose sizes its consumers use are frozen; Tile repeats channels.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from spa.graph import attr
from spa.rules._util import const_array, int_list_input_or_attr
from spa.rules.base import BlockCode, CouplingContext, NoRewrite, register

__all__ = ["TransposeRule", "SqueezeRule", "UnsqueezeRule", "ShapeRule", "TileRule"]


@register("Transpose")
class TransposeRule(NoRewrite):
    def couplings(self, node: ir.Node, ctx: CouplingContext) -> None:
        x, y = ctx.input(0), ctx.output(0)
        rank = ctx.rank(x)
        if rank is None:
            return
        perm = ctx.attr("perm")
        perm = list(range(rank))[::-1] if perm is None else [int(p) for p in perm]
        for o, i in enumerate(perm):
            ctx.tie(x, i, y, o)


def _squeeze_axes(ctx: CouplingContext, rank: int) -> list[int] | None:
    present, axes = int_list_input_or_attr(ctx, 1, "axes")
    if present:
        return None if axes is None else sorted(a % rank for a in axes)
    x = ctx.input(0)
    shape = ctx.shape(x)
    if shape is None or any(d is None for d in shape):
        return None
    return [i for i, d in enumerate(shape) if d == 1]


@register("Squeeze")
class SqueezeRule(NoRewrite):
    def couplings(self, node: ir.Node, ctx: CouplingContext) -> None:
        x, y = ctx.input(0), ctx.output(0)
        rank = ctx.rank(x)
        if rank is None:
            return
        axes = _squeeze_axes(ctx, rank)
        if axes is None:
            ctx.block_all(BlockCode.DATA_DEPENDENT, f"Squeeze '{ctx.name}': axes are not constant")
            return
        kept = [a for a in range(rank) if a not in axes]
        for o, i in enumerate(kept):
            ctx.tie(x, i, y, o)


@register("Unsqueeze")
class UnsqueezeRule(NoRewrite):
    def couplings(self, node: ir.Node, ctx: CouplingContext) -> None:
        x, y = ctx.input(0), ctx.output(0)
        ry = ctx.rank(y)
        if ry is None or ctx.rank(x) is None:
            return
        present, axes = int_list_input_or_attr(ctx, 1, "axes")
        if axes is None:
            ctx.block_all(BlockCode.DATA_DEPENDENT, f"Unsqueeze '{ctx.name}': axes are not constant")
            return
        new = {a % ry for a in axes}
        for i, o in enumerate(a for a in range(ry) if a not in new):
            ctx.tie(x, i, y, o)


def _shape_entries_read(out: ir.Value, positions: list[int], depth: int = 6) -> set[int] | None:
    """Which entries of a Shape output (``positions``: entry → axis) its consumers use, when
    every path picks constant entries (Gather on axis 0, step-1 Slice, through Cast);
    None when something reads the vector whole. tf2onnx gathers a permutation first, then
    slices the batch out of it."""
    if depth == 0:
        return None
    read: set[int] = set()
    for node, index in out.uses():
        if index != 0:
            return None
        if node.op_type == "Cast":
            sub = _shape_entries_read(node.outputs[0], positions, depth - 1)
        elif node.op_type == "Gather":
            idx = const_array(node.inputs[1])
            axis = int(attr(node, "axis", 0))
            if idx is None or axis != 0 or idx.ndim > 1:
                return None
            picked = [positions[int(i) % len(positions)] for i in idx.reshape(-1)]
            sub = set(picked) if idx.ndim == 0 else _shape_entries_read(node.outputs[0], picked, depth - 1)
        elif node.op_type == "Slice":
            starts, ends = const_array(node.inputs[1]), const_array(node.inputs[2])
            steps = const_array(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else None
            if starts is None or ends is None or (steps is not None and int(steps.reshape(-1)[0]) != 1):
                return None
            lo, hi, _ = slice(int(starts.reshape(-1)[0]), int(ends.reshape(-1)[0]), 1).indices(len(positions))
            sub = set(positions[lo:hi])
        else:
            return None
        if sub is None:
            return None
        read |= sub
    return read


@register("Shape")
class ShapeRule(NoRewrite):
    """Shape reads sizes: the axes whose sizes are used are frozen, the others may change.

    When every consumer picks constant entries (``x.size(0)``: Gather 0), only those axes
    are read; otherwise every reported axis is.
    """

    def couplings(self, node: ir.Node, ctx: CouplingContext) -> None:
        x = ctx.input(0)
        rank = ctx.rank(x)
        if rank is None:
            return
        start = int(ctx.attr("start", 0))
        end = ctx.attr("end")
        reported = list(range(rank))[slice(start, None if end is None else int(end))]
        picked = _shape_entries_read(node.outputs[0], reported) if reported else set()
        read = set(reported) if picked is None else picked
        for ax in range(rank):
            if ax in read:
                ctx.block(x, ax, BlockCode.DATA_DEPENDENT, f"Shape '{ctx.name}' reports the size of axis {ax} of '{x.name}'")
            else:
                ctx.allow(x, ax)


@register("Tile")
class TileRule(NoRewrite):
    """Copy k of a tiled axis is channel i of the input again: removing i removes every copy."""

    def couplings(self, node: ir.Node, ctx: CouplingContext) -> None:
        x, y = ctx.input(0), ctx.output(0)
        rank = ctx.rank(x)
        repeats = ctx.const(ctx.input(1))
        if repeats is None:
            ctx.block_all(BlockCode.DATA_DEPENDENT, f"Tile '{ctx.name}': repeats are not constant")
            return
        if rank is None:
            return
        for ax, rep in enumerate(int(r) for r in repeats.reshape(-1)):
            n = ctx.size(x, ax)
            if rep == 1:
                ctx.tie(x, ax, y, ax)
            elif n is not None:
                ctx.tie(x, ax, y, ax, np.tile(np.arange(n), rep), np.arange(n * rep))
