"""Gather: embeddings (a constant table read by token ids) and constant-index selections.

Axes of ``data`` other than the gathered one pass to the output (shifted by the index rank);
for a constant table they are OUT weights — an embedding produces the hidden channels. The
gathered axis is followed only when the indices are a constant list: output position k is
data channel idx[k], and the list is rewritten to the kept positions. Run-time indices
(token ids) leave the gathered axis unmapped, so a vocabulary is never pruned.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from spa.graph import attr
from spa.rules.base import CouplingContext, RewriteContext, Role, register

__all__ = ["GatherRule"]


@register("Gather")
class GatherRule:
    def couplings(self, node: ir.Node, ctx: CouplingContext) -> None:
        data, indices, y = ctx.input(0), ctx.input(1), ctx.output(0)
        rd, ri = ctx.rank(data), ctx.rank(indices)
        if rd is None or ri is None:
            return
        axis = int(ctx.attr("axis", 0)) % rd
        table = ctx.is_constant(data)
        for ax in range(rd):
            if ax == axis:
                continue
            out_ax = ax if ax < axis else ax + ri - 1
            if ctx.tie(data, ax, y, out_ax) and table:
                ctx.weight(data, ax, Role.OUT)
        idx = ctx.const(indices)
        n = ctx.size(data, axis)
        if idx is not None and idx.ndim == 1 and n is not None:
            positions = np.asarray(idx, dtype=np.int64) % n
            if len(set(positions.tolist())) == len(positions):  # a repeated index would tie two outputs
                ctx.tie(data, axis, y, axis, positions, np.arange(len(positions)))
                if table:
                    ctx.weight(data, axis, Role.OUT)

    def rewrite(self, node: ir.Node, ctx: RewriteContext) -> None:
        data, indices = node.inputs[0], node.inputs[1]
        axis = int(attr(node, "axis", 0)) % len(data.shape)
        kept = ctx.kept(data, axis)
        if kept is None or indices.const_value is None:
            return
        idx = np.asarray(indices.const_value.numpy(), dtype=np.int64) % int(data.shape[axis])
        survivors = idx[np.isin(idx, kept)]
        ctx.set_const(1, np.searchsorted(kept, survivors).tolist())
