"""Helpers shared by rule families (private)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from spa.graph import is_constant
from spa.rules.base import CouplingContext, RewriteContext, Role

__all__ = [
    "tie_same_shape",
    "tie_broadcast",
    "const_array",
    "const_ints",
    "int_list_input_or_attr",
    "shape_target",
    "rewrite_target",
]


def tie_same_shape(ctx: CouplingContext, x: ir.Value | None, y: ir.Value | None, skip: Sequence[int] = ()) -> None:
    """Tie every axis of ``x`` to the same axis of ``y`` (element-wise ops), except ``skip``."""
    rank = ctx.rank(x)
    if rank is None or ctx.rank(y) != rank:
        return
    skip_n = {a % rank for a in skip}
    ctx.tie_axes(x, y, [ax for ax in range(rank) if ax not in skip_n])


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
    if value is None or not is_constant(value):
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


def shape_target(shape_v: ir.Value | None) -> tuple[list[int | None], list[tuple[ir.Node | None, int, int] | None]] | None:
    """The entries of a Reshape/Expand target, and where each constant one lives.

    A constant target gives ints. A target assembled by a Concat (exporters build
    ``[batch, seq, -1, 32]`` from ``Shape`` pieces and constants) gives None for the pieces
    computed at run time and ints for the constant pieces; ``where`` says (node, input, offset)
    of each constant entry so it can be rewritten. None when the target is neither.
    """
    const = const_array(shape_v)
    if const is not None:
        flat = [int(v) for v in const.reshape(-1)]
        return flat, [(None, 1, k) for k in range(len(flat))]
    src = shape_v.producer() if shape_v is not None else None
    while src is not None and src.op_type == "Cast" and len(src.outputs[0].uses()) == 1:
        shape_v = src.inputs[0]  # tf2onnx casts the assembled target
        src = shape_v.producer()
    if src is None or src.op_type != "Concat":
        return None
    # A target shared with other Reshapes (Q, K and V of one layer) cannot be rewritten for
    # one of them: its explicit sizes are then fixed (only -1 entries may change).
    shared = len(shape_v.uses()) != 1
    entries: list[int | None] = []
    where: list[tuple[ir.Node | None, int, int] | None] = []
    for j, piece in enumerate(src.inputs):
        c = const_array(piece)
        if c is not None:
            for k, v in enumerate(c.reshape(-1)):
                entries.append(int(v))
                where.append(None if shared else (src, j, k))
        elif piece is not None and piece.shape is not None and len(piece.shape) == 1 and isinstance(piece.shape[0], int):
            entries.extend([None] * piece.shape[0])
            where.extend([None] * piece.shape[0])
        else:
            return None
    return entries, where


def rewrite_target(ctx: RewriteContext, where: list, changes: dict[int, int]) -> None:
    """Write new sizes into the constant pieces of a target (see ``shape_target``)."""
    pieces: dict[tuple[str | None, int], list[int]] = {}
    owners: dict[tuple[str | None, int], ir.Node] = {}
    for k, size in changes.items():
        if where[k] is None:
            raise ValueError(f"{ctx.node.op_type} '{ctx.name}': entry {k} changed but is fixed in a shared target")
        src, index, offset = where[k]
        owner = ctx.node if src is None else src
        key = (None if src is None else src.name, index)
        if key not in pieces:
            pieces[key] = [int(v) for v in const_array(owner.inputs[index]).reshape(-1)]
        pieces[key][offset] = size
    for (owner, index), values in sorted(pieces.items(), key=lambda kv: (kv[0][0] or "", kv[0][1])):
        ctx.set_const(index, values, node=owner)
