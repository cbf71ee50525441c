"""LSTM, GRU and RNN: pruning hidden units.

Hidden unit j owns row j of every gate block of W, R and B (gate g's rows are g·H + j), the
peephole entries of P, column j of R (how every gate reads h_j back), entry j of the initial
states and of the outputs Y, Y_h, Y_c. Removing it is exact: once column j of R is gone (the
oracle zeroes it), no other unit sees h_j, and c_j only feeds h_j. ``hidden_size`` is
rewritten. The input size (X's last axis ↔ W's axis 2) is an ordinary consumer axis.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from spa.rules.base import CouplingContext, RewriteContext, Role, register

__all__ = ["RecurrentRule"]

_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


@register("LSTM", "GRU", "RNN")
class RecurrentRule:
    def couplings(self, node: ir.Node, ctx: CouplingContext) -> None:
        x, w, r = ctx.input(0), ctx.input(1), ctx.input(2)
        b = ctx.input(3)
        h = int(ctx.attr("hidden_size", 0))
        gates = _GATES[node.op_type]
        if h <= 0 or ctx.size(w, 1) != gates * h or ctx.size(r, 2) != h:
            return
        # Input channels: X[..., I] is read by W[:, :, I].
        if ctx.tie(x, -1, w, 2):
            ctx.weight(w, 2, Role.IN)
        units = np.tile(np.arange(h), gates)  # row g·H + j belongs to unit j
        y = ctx.output(0)
        # Every hidden-indexed axis is tied to R's column axis: unit j ↔ column j.
        ctx.tie(w, 1, r, 2, np.arange(gates * h), units)
        ctx.weight(w, 1, Role.OUT)
        ctx.tie(r, 1, r, 2, np.arange(gates * h), units)
        ctx.weight(r, 1, Role.OUT)
        ctx.weight(r, 2, Role.IN)
        if b is not None and ctx.tie(b, 1, r, 2, np.arange(2 * gates * h), np.tile(np.arange(h), 2 * gates)):
            ctx.weight(b, 1, Role.PARAM)
        p = ctx.input(7) if node.op_type == "LSTM" else None
        if p is not None and ctx.tie(p, 1, r, 2, np.arange(3 * h), np.tile(np.arange(h), 3)):
            ctx.weight(p, 1, Role.PARAM)
        for state in (ctx.input(5), ctx.input(6) if node.op_type == "LSTM" else None):
            if state is not None and ctx.tie(state, -1, r, 2):
                if ctx.is_constant(state):
                    ctx.weight(state, -1, Role.PARAM)
        if y is not None:
            ctx.tie(y, -1, r, 2)  # Y is [seq, dirs, batch, H] (layout 0) or [batch, seq, dirs, H]
        for out in node.outputs[1:]:
            if out is not None:
                ctx.tie(out, -1, r, 2)

    def rewrite(self, node: ir.Node, ctx: RewriteContext) -> None:
        kept = ctx.kept(node.inputs[2], 2)
        if kept is not None:
            ctx.set_attr("hidden_size", int(len(kept)))
