"""Layout ops: Transpose, Squeeze, Unsqueeze, Flatten, Reshape, Shape.

Reshape and Flatten are proven from static shapes, never guessed (Torch-Pruning guesses here,
and breaks): input and output dims are cut into *segments* whose element counts match.
- one axis ↔ one axis of equal size: identity;
- one axis ↔ several (a split, e.g. channel shuffle C → [g, C/g]): one output axis carries the
  channel index and the others keep their size. A split that feeds attention (it reaches a
  MatMul of two activations through layout ops) is a head split: the outer axis (heads)
  carries, so whole heads are the units; otherwise the largest axis, innermost on ties;
- several ↔ one (a merge, e.g. Flatten [C, H, W] → [C·H·W]): the carrier is the input axis
  already tied to weights upstream (so NCHW and NHWC both work), else the outermost; each
  carrier channel owns a contiguous-stride block of the merged axis;
- several ↔ several: not provable, blocked (INDIVISIBLE).
A Reshape whose shape is not a constant is blocked (DATA_DEPENDENT). The shape constant is
rewritten with the new sizes; ``-1`` and ``0`` entries are kept where they stay correct.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from spa.rules._util import int_list_input_or_attr
from spa.rules.base import BlockCode, CouplingContext, NoRewrite, RewriteContext, register

__all__ = ["TransposeRule", "SqueezeRule", "UnsqueezeRule", "ReshapeRule", "ShapeRule", "TileRule", "segments"]


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


def _static(d) -> bool:
    return isinstance(d, int)


def _same_symbol(a, b) -> bool:
    return isinstance(a, ir.SymbolicDim) and isinstance(b, ir.SymbolicDim) and a.value is not None and a.value == b.value


def segments(ins: list, outs: list) -> list[tuple[list[int], list[int]]]:
    """Cut two shapes into matching segments, from the left then from the right.

    Dims are ints or symbols. What cannot be matched (a symbolic dim facing a different one)
    is left out; callers leave those axes unmapped.
    """

    def walk(a: list, b: list) -> list[tuple[list[int], list[int]]]:
        segs: list[tuple[list[int], list[int]]] = []
        i = j = 0
        while i < len(a) or j < len(b):
            if i < len(a) and a[i] == 1:
                segs.append(([i], []))
                i += 1
                continue
            if j < len(b) and b[j] == 1:
                segs.append(([], [j]))
                j += 1
                continue
            if i >= len(a) or j >= len(b):
                break
            if not (_static(a[i]) and _static(b[j])):
                if _same_symbol(a[i], b[j]):
                    segs.append(([i], [j]))
                    i, j = i + 1, j + 1
                    continue
                break
            pa, pb, sa, sb = a[i], b[j], [i], [j]
            i, j = i + 1, j + 1
            ok = True
            while pa != pb:
                if pa < pb:
                    if i >= len(a) or not _static(a[i]):
                        ok = False
                        break
                    pa *= a[i]
                    sa.append(i)
                    i += 1
                else:
                    if j >= len(b) or not _static(b[j]):
                        ok = False
                        break
                    pb *= b[j]
                    sb.append(j)
                    j += 1
            if not ok:
                break
            segs.append((sa, sb))
        return segs

    left = walk(ins, outs)
    used_in = {i for s, _ in left for i in s}
    used_out = {j for _, s in left for j in s}
    rest_in = [i for i in range(len(ins)) if i not in used_in]
    rest_out = [j for j in range(len(outs)) if j not in used_out]
    if rest_in or rest_out:
        # Match the unmatched tail from the right (e.g. [N?, C, H, W] → [?, C·H·W]).
        ri, ro = rest_in[::-1], rest_out[::-1]
        right = walk([ins[i] for i in ri], [outs[j] for j in ro])
        for sa, sb in right:
            left.append((sorted(ri[k] for k in sa), sorted(ro[k] for k in sb)))
    return left


def _strides(sizes: list[int]) -> list[int]:
    return [math.prod(sizes[k + 1 :]) for k in range(len(sizes))]


def tie_reshape(ctx: CouplingContext, x: ir.Value, y: ir.Value) -> None:
    """Tie channels through a static reshape (Reshape or Flatten), by segments."""
    if x.shape is None or y.shape is None:
        return
    ins, outs = list(x.shape.dims), list(y.shape.dims)
    for sa, sb in segments(ins, outs):
        sa = [i for i in sa if ins[i] != 1]
        sb = [j for j in sb if outs[j] != 1]
        if not sa or not sb:
            continue
        if len(sa) == 1 and len(sb) == 1:
            ctx.tie(x, sa[0], y, sb[0])
        elif len(sa) == 1:
            _tie_split(ctx, x, sa[0], y, sb, [int(outs[j]) for j in sb])
        elif len(sb) == 1:
            _tie_merge(ctx, x, sa, [int(ins[i]) for i in sa], y, sb[0])
        else:
            reason = f"{ctx.node.op_type} '{ctx.name}' regroups axes {sa} into {sb}: no channel mapping can be proven"
            for i in sa:
                ctx.block(x, i, BlockCode.INDIVISIBLE, reason)
            for j in sb:
                ctx.block(y, j, BlockCode.INDIVISIBLE, reason)


_LAYOUT_OPS = frozenset({"Transpose", "Identity", "Cast", "Unsqueeze", "Tile", "Expand", "Reshape", "Mul", "Div"})


def _feeds_attention(value: ir.Value, depth: int = 6) -> bool:
    """Whether ``value`` reaches a MatMul of two activations through layout-only ops.

    Read-only look-ahead: a head split ([.., D] → [.., heads, head_dim]) is followed by
    transposes (and, for grouped-query attention, a repeat) before Q·Kᵀ or P·V.
    """
    frontier = [value]
    for _ in range(depth):
        nxt = []
        for v in frontier:
            for node in v.consumers():
                if node.op_type == "MatMul" and all(i is not None and i.const_value is None for i in node.inputs):
                    return True
                if node.op_type in _LAYOUT_OPS:
                    nxt.extend(node.outputs)
        frontier = nxt
    return False


def _tie_split(ctx: CouplingContext, x: ir.Value, axis: int, y: ir.Value, outs: list[int], sizes: list[int]) -> None:
    if _feeds_attention(y):
        k = 0  # heads: whole heads are the units
    else:
        k = max(range(len(sizes)), key=lambda t: (sizes[t], t))  # largest, innermost on ties
    stride = _strides(sizes)[k]
    channels = np.arange(math.prod(sizes))
    ctx.tie(x, axis, y, outs[k], channels, (channels // stride) % sizes[k])


def _tie_merge(ctx: CouplingContext, x: ir.Value, ins: list[int], sizes: list[int], y: ir.Value, out: int) -> None:
    hinted = [t for t, i in enumerate(ins) if ctx.is_channel(x, i)]
    k = hinted[0] if hinted else 0
    stride = _strides(sizes)[k]
    flat = np.arange(math.prod(sizes))
    ctx.tie(x, ins[k], y, out, (flat // stride) % sizes[k], flat)


@register("Flatten")
class FlattenRule(NoRewrite):
    def couplings(self, node: ir.Node, ctx: CouplingContext) -> None:
        x, y = ctx.input(0), ctx.output(0)
        if ctx.rank(x) is None or ctx.rank(y) is None:
            return
        tie_reshape(ctx, x, y)


@register("Reshape")
class ReshapeRule:
    def couplings(self, node: ir.Node, ctx: CouplingContext) -> None:
        x, shape_v, y = ctx.input(0), ctx.input(1), ctx.output(0)
        if ctx.const(shape_v) is None:
            ctx.block_all(BlockCode.DATA_DEPENDENT, f"Reshape '{ctx.name}': the target shape is computed at run time")
            return
        if ctx.rank(x) is None or ctx.rank(y) is None:
            return
        tie_reshape(ctx, x, y)

    def rewrite(self, node: ir.Node, ctx: RewriteContext) -> None:
        x, shape_v, y = node.inputs[0], node.inputs[1], node.outputs[0]
        if not ctx.changed(x, y):
            return
        spec = [int(s) for s in shape_v.const_value.numpy().reshape(-1)]
        allowzero = "allowzero" in node.attributes and int(node.attributes["allowzero"].value) == 1
        new = list(spec)
        for k, s in enumerate(spec):
            if s == -1:
                continue
            out_size = ctx.new_size(y, k)
            if s == 0 and not allowzero:
                if k < len(x.shape) and ctx.new_size(x, k) == out_size:
                    continue
            if out_size is None:
                raise ValueError(f"Reshape '{node.name}': axis {k} changed but has no static size")
            new[k] = out_size
        if new != spec:
            ctx.set_const(1, new)


@register("Shape")
class ShapeRule(NoRewrite):
    """Shape reads sizes: axes it reports are frozen, the others may change freely."""

    def couplings(self, node: ir.Node, ctx: CouplingContext) -> None:
        x = ctx.input(0)
        rank = ctx.rank(x)
        if rank is None:
            return
        start = int(ctx.attr("start", 0))
        end = ctx.attr("end")
        reported = range(rank)[slice(start, None if end is None else int(end))]
        for ax in range(rank):
            if ax in reported:
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
