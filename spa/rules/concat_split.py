"""Concat, Split and Slice along any axis: channel offsets and ranges.

Concat: input k's channel i is output channel offset_k + i. Split: the reverse, and the split
sizes are rewritten from the kept counts. Slice (step 1): output channel i is input channel
start + i; the channels outside the range are simply not read here, and ``starts``/``ends``
are rewritten to the kept positions (a sorted kept set maps a range to a range).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from spa.graph import attr
from spa.rules._util import const_ints, int_list_input_or_attr
from spa.rules.base import BlockCode, CouplingContext, NoRewrite, RewriteContext, register

__all__ = ["ConcatRule", "SplitRule", "SliceRule"]


def _tie_other_axes(ctx: CouplingContext, a: ir.Value, b: ir.Value, axis: int) -> None:
    rank = ctx.rank(a)
    if rank is None or ctx.rank(b) != rank:
        return
    for ax in range(rank):
        if ax != axis:
            ctx.tie(a, ax, b, ax)


@register("Concat")
class ConcatRule(NoRewrite):
    def couplings(self, node: ir.Node, ctx: CouplingContext) -> None:
        y = ctx.output(0)
        rank = ctx.rank(y)
        if rank is None:
            return
        axis = int(ctx.attr("axis")) % rank
        sizes = [ctx.size(v, axis) for v in node.inputs]
        if any(s is None for s in sizes):
            # Offsets unknown: every input still maps its other axes, the concat axis is frozen.
            reason = f"Concat '{ctx.name}': an input's size along axis {axis} is not static"
            for v in node.inputs:
                ctx.block(v, axis, BlockCode.DYNAMIC_SHAPE, reason)
            ctx.block(y, axis, BlockCode.DYNAMIC_SHAPE, reason)
        else:
            offset = 0
            for v, n in zip(node.inputs, sizes):
                if n:
                    ctx.tie(v, axis, y, axis, np.arange(n), offset + np.arange(n))
                else:
                    ctx.allow(v, axis)
                offset += n
        for v in node.inputs:
            _tie_other_axes(ctx, v, y, axis)


def _split_sizes(ctx: CouplingContext, n: int) -> list[int] | None:
    present, split = int_list_input_or_attr(ctx, 1, "split")
    if present:
        return split
    k = len(ctx.node.outputs)
    num = ctx.attr("num_outputs")
    if num is not None:
        k = int(num)
        chunk = -(-n // k)
        return [min(chunk, n - i * chunk) for i in range(k)]
    return [n // k] * k if n % k == 0 else None


@register("Split")
class SplitRule:
    def couplings(self, node: ir.Node, ctx: CouplingContext) -> None:
        x = ctx.input(0)
        rank = ctx.rank(x)
        if rank is None:
            return
        axis = int(ctx.attr("axis", 0)) % rank
        n = ctx.size(x, axis)
        sizes = None if n is None else _split_sizes(ctx, n)
        if sizes is None:
            ctx.block_all(BlockCode.DATA_DEPENDENT, f"Split '{ctx.name}': split sizes are not constant or not static")
            return
        offset = 0
        for y, s in zip(node.outputs, sizes):
            if s:
                ctx.tie(x, axis, y, axis, offset + np.arange(s), np.arange(s))
            offset += s
            _tie_other_axes(ctx, x, y, axis)

    def rewrite(self, node: ir.Node, ctx: RewriteContext) -> None:
        x = node.inputs[0]
        axis = int(attr(node, "axis", 0)) % len(x.shape)
        if ctx.kept(x, axis) is None:
            return
        new = [ctx.new_size(y, axis) for y in node.outputs]
        if attr(node, "num_outputs") is not None:
            ctx.set_attr("num_outputs", None)
        if ctx.opset >= 13:
            ctx.set_const(1, new)
        else:
            ctx.set_attr("split", new)


def _slice_spec(ctx: CouplingContext) -> dict[int, tuple[int, int]] | None:
    """{axis: (start, stop)} after clamping, for a constant step-1 Slice; None if unprovable."""
    x = ctx.input(0)
    rank = ctx.rank(x)
    starts, ends = const_ints(ctx, ctx.input(1)), const_ints(ctx, ctx.input(2))
    axes_v, steps_v = ctx.input(3), ctx.input(4)
    axes = const_ints(ctx, axes_v) if axes_v is not None else list(range(len(starts or [])))
    steps = const_ints(ctx, steps_v) if steps_v is not None else [1] * len(starts or [])
    if None in (starts, ends, axes, steps) or rank is None:
        return None
    spec = {}
    for s, e, a, st in zip(starts, ends, axes, steps):
        a %= rank
        n = ctx.size(x, a)
        if st != 1 or n is None:
            if st != 1 and n is not None and n > 0:
                spec[a] = None  # a strided slice: this axis is not a channel mapping we prove
                continue
            return None
        lo, hi, _ = slice(s, e, 1).indices(n)
        spec[a] = (lo, max(lo, hi))
    return spec


@register("Slice")
class SliceRule:
    def couplings(self, node: ir.Node, ctx: CouplingContext) -> None:
        x, y = ctx.input(0), ctx.output(0)
        rank = ctx.rank(x)
        if rank is None:
            return
        spec = _slice_spec(ctx)
        if spec is None:
            ctx.block_all(BlockCode.DATA_DEPENDENT, f"Slice '{ctx.name}': starts/ends/axes/steps are not constant")
            return
        for ax in range(rank):
            if ax not in spec:
                ctx.tie(x, ax, y, ax)
            elif spec[ax] is not None:
                lo, hi = spec[ax]
                if hi > lo:
                    ctx.tie(x, ax, y, ax, np.arange(lo, hi), np.arange(hi - lo))
                else:
                    ctx.allow(x, ax)

    def rewrite(self, node: ir.Node, ctx: RewriteContext) -> None:
        x = node.inputs[0]
        rank = len(x.shape)
        starts = [int(v) for v in node.inputs[1].const_value.numpy().reshape(-1)]
        ends = [int(v) for v in node.inputs[2].const_value.numpy().reshape(-1)]
        axes = (
            [int(v) % rank for v in node.inputs[3].const_value.numpy().reshape(-1)]
            if len(node.inputs) > 3 and node.inputs[3] is not None
            else list(range(len(starts)))
        )
        new_starts, new_ends = list(starts), list(ends)
        for k, a in enumerate(axes):
            kept = ctx.kept(x, a)
            if kept is None:
                continue
            lo, hi, _ = slice(starts[k], ends[k], 1).indices(int(x.shape[a]))
            new_starts[k] = int(np.searchsorted(kept, lo))
            new_ends[k] = int(np.searchsorted(kept, max(lo, hi)))
        if new_starts != starts:
            ctx.set_const(1, new_starts)
        if new_ends != ends:
            ctx.set_const(2, new_ends)
