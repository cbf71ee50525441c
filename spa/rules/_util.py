"""Helpers shared by rule families (private)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from spa.rules.base import CouplingContext, Role

__all__ = ["tie_same_shape", "tie_broadcast", "const_array", "const_ints", "int_list_input_or_attr"]


def tie_same_shape(ctx: CouplingContext, x: ir.Value | None, y: ir.Value | None, skip: Sequence[int] = ()) -> None:
    """Tie every axis of ``x`` to the same axis of ``y`` (element-wise ops), except ``skip``."""
    rank = ctx.rank(x)
    if rank is None or ctx.rank(y) != rank:
        return
    skip_n = {a % rank for a in skip}
    for ax in range(rank):
        if ax not in skip_n:
            ctx.tie(x, ax, y, ax)


def tie_broadcast(
    ctx: CouplingContext,
    inputs: Sequence[ir.Value | None],
    y: ir.Value | None,
    *,
    out_axes: Sequence[int] | None = None,
    right_offset: int = 0,
) -> None:
    """Numpy-broadcast ties: input axes of the output's size are the output's channels.

    An input axis of size 1 broadcasts and is left unmapped (never a channel of this node);
    an input axis of unknown size next to a known one blocks the known one (``ctx.tie``).
    Constant inputs tied this way are per-channel parameters and are sliced with the group.
    ``right_offset`` skips trailing axes (MatMul's matrix dims) when aligning.
    """
    ry = ctx.rank(y)
    if ry is None:
        return
    axes = range(ry - right_offset) if out_axes is None else out_axes
    for o in axes:
        for v in inputs:
            rv = ctx.rank(v)
            if rv is None:
                continue
            i = o - (ry - rv)
            if i < 0:
                continue
            sv, sy = ctx.size(v, i), ctx.size(y, o)
            if sv == 1 and sy != 1:
                continue  # broadcast along this axis
            if ctx.tie(v, i, y, o) and ctx.is_constant(v):
                ctx.weight(v, i, Role.PARAM)


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """A constant initializer's value (not one a caller can override), for graph look-arounds
    outside a rule's own node (a Reshape target's Concat pieces, a Shape's consumers)."""
    if value is None or value.const_value is None or not value.is_initializer() or value.is_graph_input():
        return None
    return value.const_value.numpy()


def const_ints(ctx: CouplingContext, value: ir.Value | None) -> list[int] | None:
    arr = ctx.const(value)
    if arr is None:
        return None
    return [int(a) for a in arr.reshape(-1)]


def int_list_input_or_attr(ctx: CouplingContext, input_index: int, attr: str) -> tuple[bool, list[int] | None]:
    """(present, value) of a list given by an input (newer opsets) or an attribute (older).

    present=True with value None means it is given but not constant (data-dependent).
    """
    v = ctx.input(input_index)
    if v is not None:
        return True, const_ints(ctx, v)
    a = ctx.attr(attr)
    if a is not None:
        return True, [int(x) for x in a]
    return False, None
