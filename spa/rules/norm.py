"""Normalizations: BatchNormalization, InstanceNormalization, GroupNormalization, LayerNormalization, LRN.

BatchNorm and InstanceNorm act per channel: their parameters are sliced with the channel.
GroupNormalization normalizes over whole groups, so a unit is a whole group of channels and
``num_groups`` shrinks. LayerNormalization mixes every channel of its normalized axes: those
axes are blocked here (CHANNEL_MIXING); the other axes pass through. LRN mixes neighbouring
channels: blocked.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from spa.graph import attr
from spa.rules._util import tie_same_shape
from spa.rules.base import BlockCode, CouplingContext, NoRewrite, RewriteContext, Role, register

__all__ = ["PerChannelNormRule", "GroupNormRule", "LayerNormRule", "LRNRule"]


def _tie_batch_and_channels(ctx: CouplingContext, x: ir.Value | None, y: ir.Value | None) -> None:
    """Batch and channel axes map one to one; an Instance/GroupNorm *mixes* its spatial axes
    (mean and variance over them), so those are blocked — they can carry channels after a
    Reshape (GroupNorm(1) written as Reshape → InstanceNorm → Reshape)."""
    rank = ctx.rank(x)
    if rank is None or ctx.rank(y) != rank:
        return
    for ax in range(rank):
        if ax < 2:
            ctx.tie(x, ax, y, ax)
        else:
            reason = f"{ctx.node.op_type} '{ctx.name}' normalizes over axis {ax}"
            ctx.block(x, ax, BlockCode.CHANNEL_MIXING, reason)
            ctx.block(y, ax, BlockCode.CHANNEL_MIXING, reason)


@register("BatchNormalization", "InstanceNormalization")
class PerChannelNormRule(NoRewrite):
    """BatchNorm (inference) is a per-channel affine map: every axis maps one to one.
    InstanceNorm normalizes each channel over its spatial axes, which therefore mix."""

    def couplings(self, node: ir.Node, ctx: CouplingContext) -> None:
        x, y = ctx.input(0), ctx.output(0)
        if node.op_type == "InstanceNormalization":
            _tie_batch_and_channels(ctx, x, y)
        else:
            tie_same_shape(ctx, x, y)
        for p in node.inputs[1:]:
            if p is not None and ctx.tie(p, 0, y, 1):
                ctx.weight(p, 0, Role.PARAM)
        for extra in node.outputs[1:]:  # training-mode running statistics, shape [C]
            if extra is not None:
                ctx.tie(extra, 0, y, 1)


@register("GroupNormalization")
class GroupNormRule:
    def couplings(self, node: ir.Node, ctx: CouplingContext) -> None:
        x, y = ctx.input(0), ctx.output(0)
        _tie_batch_and_channels(ctx, x, y)
        c = ctx.size(x, 1)
        groups = int(ctx.attr("num_groups", 0))
        if c is None or groups <= 0 or c % groups:
            return
        # The output must carry the channels before they become units: onnx's shape inference
        # leaves GroupNormalization-21 outputs unshaped, and a unit tied only to itself would
        # let the channels go while the (invisible) consumers still read them.
        if ctx.size(y, 1) != c:
            ctx.tie(x, 1, y, 1)  # blocks x's channels (DYNAMIC_SHAPE or UNMAPPED_AXIS)
            return
        per = c // groups
        # Channels of one group form one unit: only whole groups may go.
        ctx.tie(x, 1, x, 1, np.arange(c), (np.arange(c) // per) * per)
        for p in node.inputs[1:3]:
            n = ctx.size(p, 0)
            if n == c:
                ok = ctx.tie(p, 0, y, 1)
            elif n == groups:  # opset 18 layout: one scale per group
                ok = ctx.tie(p, 0, y, 1, np.arange(c) // per, np.arange(c))
            else:
                ok = False
            if ok:
                ctx.weight(p, 0, Role.PARAM)

    def rewrite(self, node: ir.Node, ctx: RewriteContext) -> None:
        x = node.inputs[0]
        kept = ctx.kept(x, 1)
        if kept is None:
            return
        groups = int(attr(node, "num_groups"))
        per = int(x.shape[1]) // groups
        ctx.set_attr("num_groups", int(len(kept)) // per)


@register("LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization")
class LayerNormRule(NoRewrite):
    """Normalizes over axes ``axis``…: those channels mix without weights.

    Blocked (CHANNEL_MIXING) by default. With ``allow_inexact`` the normalized axes are tied
    through (scale and bias sliced with them) and marked inexact: removing a hidden channel
    changes the mean and variance the others are normalized by.
    """

    def couplings(self, node: ir.Node, ctx: CouplingContext) -> None:
        x, y = ctx.input(0), ctx.output(0)
        rank = ctx.rank(x)
        if rank is None:
            return
        axis = int(ctx.attr("axis", -1)) % rank
        normalized = list(range(axis, rank))
        tie_same_shape(ctx, x, y, skip=normalized)
        for extra in node.outputs[1:]:  # Mean / InvStdDev: reduced over normalized axes
            if extra is not None and ctx.rank(extra) == rank:
                for ax in range(axis):
                    ctx.tie(extra, ax, y, ax)
                for ax in normalized:
                    ctx.allow(extra, ax)
        reason = f"{node.op_type} '{ctx.name}' normalizes over axes {normalized}: removing a channel changes every other"
        if ctx.allow_inexact:
            for ax in normalized:
                ctx.tie(x, ax, y, ax)
                ctx.mark_inexact(y, ax, reason)
            for p in node.inputs[1:]:
                r = ctx.rank(p)
                if r is None:
                    continue
                for k in range(r):  # scale/bias broadcast against the normalized trailing axes
                    o = rank - r + k
                    if o in normalized and ctx.size(p, k) == ctx.size(y, o) and ctx.tie(p, k, y, o):
                        ctx.weight(p, k, Role.PARAM)
            return
        for ax in normalized:
            ctx.block(x, ax, BlockCode.CHANNEL_MIXING, reason)
            ctx.block(y, ax, BlockCode.CHANNEL_MIXING, reason)
        for p in node.inputs[1:]:
            ctx.block(p, None, BlockCode.CHANNEL_MIXING, reason)


@register("LRN")
class LRNRule(NoRewrite):
    def couplings(self, node: ir.Node, ctx: CouplingContext) -> None:
        x, y = ctx.input(0), ctx.output(0)
        tie_same_shape(ctx, x, y, skip=[1])
        reason = f"LRN '{ctx.name}' sums over neighbouring channels"
        ctx.block(x, 1, BlockCode.CHANNEL_MIXING, reason)
        ctx.block(y, 1, BlockCode.CHANNEL_MIXING, reason)
