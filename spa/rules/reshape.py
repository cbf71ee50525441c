"""Reshape and Flatten, proven from static shapes, never guessed (Torch-Pruning guesses here,
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
A Reshape target must be a constant, or a Concat of constants and run-time sizes (the batch
of a dynamic-batch export): run-time entries never carry channels. The target is rewritten
with the new sizes; ``-1`` and ``0`` entries are kept where they stay correct.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from spa.graph import attr
from spa.rules._util import rewrite_target, shape_target
from spa.rules.base import BlockCode, CouplingContext, NoRewrite, RewriteContext, register

__all__ = ["FlattenRule", "ReshapeRule", "segments", "tie_reshape"]


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


def tie_reshape(ctx: CouplingContext, x: ir.Value, y: ir.Value, fixed_out: frozenset[int] = frozenset()) -> None:
    """Tie channels through a static reshape (Reshape or Flatten), by segments.

    ``fixed_out``: output axes whose size cannot be rewritten (computed at run time from
    ``Shape``, or spelled in a target shared with other Reshapes): they never carry channels.
    """
    if x.shape is None or y.shape is None:
        return
    ins, outs = list(x.shape.dims), list(y.shape.dims)
    for sa, sb in segments(ins, outs):
        sa = [i for i in sa if ins[i] != 1]
        sb = [j for j in sb if outs[j] != 1]
        if not sa or not sb:
            continue
        if len(sa) == 1 and len(sb) == 1:
            if sb[0] not in fixed_out:
                ctx.tie(x, sa[0], y, sb[0])
        elif len(sa) == 1:
            _tie_split(ctx, x, sa[0], y, sb, [int(outs[j]) for j in sb], fixed_out)
        elif len(sb) == 1:
            if sb[0] not in fixed_out:
                _tie_merge(ctx, x, sa, [int(ins[i]) for i in sa], y, sb[0])
        else:
            reason = f"{ctx.node.op_type} '{ctx.name}' regroups axes {sa} into {sb}: no channel mapping can be proven"
            for i in sa:
                ctx.block(x, i, BlockCode.INDIVISIBLE, reason)
            for j in sb:
                ctx.block(y, j, BlockCode.INDIVISIBLE, reason)


_LAYOUT_OPS = frozenset(
    {"Transpose", "Identity", "Cast", "Unsqueeze", "Squeeze", "Split", "Gather", "Slice", "Tile", "Expand", "Reshape", "Mul", "Div"}
)


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


def _tie_split(
    ctx: CouplingContext, x: ir.Value, axis: int, y: ir.Value, outs: list[int], sizes: list[int], fixed_out: frozenset[int] = frozenset()
) -> None:
    if _feeds_attention(y):
        # A head split: [heads, d], or [3, heads, d] for a fused QKV projection (timm ViT).
        # Heads sit just before the head dim; whole heads are the units.
        k = max(0, len(sizes) - 2)
    else:
        k = max(range(len(sizes)), key=lambda t: (sizes[t], t))  # largest, innermost on ties
    if outs[k] in fixed_out:
        return  # the carrier's size cannot be rewritten: leave the channels unmapped (frozen)
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
        spec = shape_target(shape_v)
        if spec is None:
            ctx.block_all(BlockCode.DATA_DEPENDENT, f"Reshape '{ctx.name}': the target shape is computed at run time")
            return
        if ctx.rank(x) is None or ctx.rank(y) is None:
            return
        entries, where = spec
        fixed = frozenset(k for k, (e, w) in enumerate(zip(entries, where)) if e is None or (w is None and e != -1))
        tie_reshape(ctx, x, y, fixed)

    def rewrite(self, node: ir.Node, ctx: RewriteContext) -> None:
        x, shape_v, y = node.inputs[0], node.inputs[1], node.outputs[0]
        if not ctx.changed(x, y):
            return
        entries, where = shape_target(shape_v)
        allowzero = int(attr(node, "allowzero", 0)) == 1
        changes: dict[int, int] = {}
        for k, s in enumerate(entries):
            if s is None or s == -1:
                continue
            out_size = ctx.new_size(y, k)
            if s == 0 and not allowzero and k < len(x.shape) and ctx.new_size(x, k) == out_size:
                continue
            if out_size is None:
                raise ValueError(f"Reshape '{node.name}': axis {k} changed but has no static size")
            if out_size != s:
                changes[k] = out_size
        rewrite_target(ctx, where, changes)
