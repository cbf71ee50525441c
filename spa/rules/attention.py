"""Fused attention and its neighbours: ONNX ``Attention`` (opset 23), ONNX Runtime's
``com.microsoft`` Attention / MultiHeadAttention, and the fused ops around them.

Whole heads are the units. Head h owns channels h·d … h·d+d-1 of Q, K, V and of the output
(d = head size); with grouped-query attention a K/V head is one unit with the
``q_heads / kv_heads`` query heads that share it. ``num_heads`` (``q_num_heads`` /
``kv_num_heads``) is rewritten to the kept count. Anything the rule cannot see through
(past/present caches, 4-D layouts, packed QKV without weights) is blocked with a reason.

SkipLayerNormalization is LayerNorm over the hidden axis plus a residual add (blocked, or
inexact with ``--allow-inexact``); BiasGelu / FastGelu / BiasAdd are element-wise with a
per-channel bias.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from spa.graph import attr
from spa.rules._util import tie_broadcast, tie_same_shape
from spa.rules.base import BlockCode, CouplingContext, NoRewrite, RewriteContext, Role, register

__all__ = ["OnnxAttentionRule", "MsAttentionRule", "MultiHeadAttentionRule", "SkipLayerNormRule", "BiasActivationRule", "MsUnaryRule"]

MS = "com.microsoft"


def _heads_index(heads: int, d: int) -> np.ndarray:
    """Channel c of a [heads·d] axis → the first channel of its head (ties a head together)."""
    return (np.arange(heads * d) // d) * d


def _tie_head_axis(ctx: CouplingContext, v: ir.Value, axis: int, heads: int, d: int) -> None:
    ctx.tie(v, axis, v, axis, np.arange(heads * d), _heads_index(heads, d))


def _tie_qkv(ctx: CouplingContext, q: ir.Value, k: ir.Value, val: ir.Value, y: ir.Value, hq: int, hkv: int, d: int, dv: int) -> None:
    """Q head g·r+i, K head g, V head g and output head g·r+i are one unit (r = hq / hkv)."""
    r = hq // hkv
    _tie_head_axis(ctx, q, -1, hq, d)
    ctx.tie(q, -1, y, -1, np.arange(hq * d), (np.arange(hq * d) // d) * dv)  # query head → output head
    kv_of_q = (np.arange(hq) // r)
    ctx.tie(q, -1, k, -1, np.arange(hq) * d, kv_of_q * d)
    ctx.tie(q, -1, val, -1, np.arange(hq) * d, kv_of_q * dv)
    _tie_head_axis(ctx, k, -1, hkv, d)
    _tie_head_axis(ctx, val, -1, hkv, dv)
    _tie_head_axis(ctx, y, -1, hq, dv)


def _set_heads(ctx: RewriteContext, name: str, value: ir.Value, axis: int, heads: int) -> None:
    """Rewrite a head-count attribute from the kept channels of a [heads·d] axis."""
    kept = ctx.kept(value, axis)
    if kept is not None:
        ctx.set_attr(name, len(kept) // (int(value.shape[axis]) // heads))


def _block_extra(ctx: CouplingContext, node: ir.Node, first_extra: int, what: str) -> bool:
    extra = [v for v in node.inputs[first_extra:] if v is not None]
    if extra or len([o for o in node.outputs if o is not None]) > 1:
        ctx.block_all(BlockCode.UNSUPPORTED_ATTRIBUTE, f"{node.op_type} '{ctx.name}' uses {what}: heads are not followed through it")
        return True
    return False


@register("Attention")
class OnnxAttentionRule:
    """ONNX Attention (opset 23) on 3-D inputs [B, S, heads·d] with an optional mask."""

    def couplings(self, node: ir.Node, ctx: CouplingContext) -> None:
        q, k, v = ctx.input(0), ctx.input(1), ctx.input(2)
        y = ctx.output(0)
        hq, hkv = int(ctx.attr("q_num_heads", 0)), int(ctx.attr("kv_num_heads", 0))
        if any(ctx.rank(t) != 3 for t in (q, k, v, y)) or not hq or not hkv or hq % hkv:
            ctx.block_all(BlockCode.UNSUPPORTED_ATTRIBUTE, f"Attention '{ctx.name}': only 3-D inputs with q_num_heads/kv_num_heads are followed")
            return
        if _block_extra(ctx, node, 4, "a KV cache"):
            return
        mask = ctx.input(3)
        if mask is not None:
            for ax in range(ctx.rank(mask) or 0):
                if ctx.size(mask, ax) == 1:
                    ctx.allow(mask, ax)
        sq, sk, sv = ctx.size(q, 2), ctx.size(k, 2), ctx.size(v, 2)
        if None in (sq, sk, sv) or sq % hq or sk % hkv or sv % hkv:
            return
        for t in (q, k, v):
            ctx.tie(t, 0, y, 0)
        ctx.tie(q, 1, y, 1)
        _tie_qkv(ctx, q, k, v, y, hq, hkv, sq // hq, sv // hkv)

    def rewrite(self, node: ir.Node, ctx: RewriteContext) -> None:
        q, k = node.inputs[0], node.inputs[1]
        _set_heads(ctx, "q_num_heads", q, 2, int(attr(node, "q_num_heads")))
        _set_heads(ctx, "kv_num_heads", k, 2, int(attr(node, "kv_num_heads")))


@register("Attention", domain=MS)
class MsAttentionRule:
    """com.microsoft Attention: input [B, S, D] · weights [D, 3·H] + bias → [B, S, H]."""

    def couplings(self, node: ir.Node, ctx: CouplingContext) -> None:
        x, w, b = ctx.input(0), ctx.input(1), ctx.input(2)
        y = ctx.output(0)
        heads = int(ctx.attr("num_heads", 0))
        hidden = ctx.size(w, 1)
        if ctx.attr("qkv_hidden_sizes") is not None or not heads or hidden is None or hidden % 3 or ctx.rank(x) != 3:
            ctx.block_all(BlockCode.UNSUPPORTED_ATTRIBUTE, f"Attention '{ctx.name}': only equal Q/K/V sizes with a weight are followed")
            return
        if _block_extra(ctx, node, 4, "past state or extra inputs") or not ctx.is_weight(w):
            if not ctx.is_weight(w):
                ctx.block_all(BlockCode.NON_CONSTANT_WEIGHT, f"Attention '{ctx.name}': the QKV weight is not constant")
            return
        mask = ctx.input(3)
        if mask is not None:
            for ax in range(ctx.rank(mask) or 0):
                ctx.allow(mask, ax)  # a key mask: sequence positions, never channels
        h = hidden // 3
        d = h // heads
        ctx.tie(x, 0, y, 0)
        ctx.tie(x, 1, y, 1)
        if ctx.tie(x, 2, w, 0):
            ctx.weight(w, 0, Role.IN)
        # Output channel c is V column 2h + c; Q and K columns c and h + c belong to its head.
        cols = np.arange(h)
        ctx.tie(w, 1, y, 2, 2 * h + cols, cols)
        ctx.tie(w, 1, y, 2, cols, cols)
        ctx.tie(w, 1, y, 2, h + cols, cols)
        ctx.weight(w, 1, Role.OUT)
        if b is not None and ctx.size(b, 0) == 3 * h and ctx.tie(b, 0, w, 1):
            ctx.weight(b, 0, Role.PARAM)
        _tie_head_axis(ctx, y, 2, heads, d)

    def rewrite(self, node: ir.Node, ctx: RewriteContext) -> None:
        _set_heads(ctx, "num_heads", node.outputs[0], 2, int(attr(node, "num_heads")))


@register("MultiHeadAttention", domain=MS)
class MultiHeadAttentionRule:
    """com.microsoft MultiHeadAttention with separate 3-D Q, K, V [B, S, heads·d]."""

    def couplings(self, node: ir.Node, ctx: CouplingContext) -> None:
        q, k, v = ctx.input(0), ctx.input(1), ctx.input(2)
        y = ctx.output(0)
        heads = int(ctx.attr("num_heads", 0))
        if any(ctx.rank(t) != 3 for t in (q, k, v, y)) or not heads:
            ctx.block_all(BlockCode.UNSUPPORTED_ATTRIBUTE, f"MultiHeadAttention '{ctx.name}': only separate 3-D Q/K/V are followed")
            return
        if _block_extra(ctx, node, 3, "a bias, mask or cache input"):
            return
        sq, sv = ctx.size(q, 2), ctx.size(v, 2)
        if sq is None or sv is None or sq % heads or sv % heads:
            return
        for t in (q, k, v):
            ctx.tie(t, 0, y, 0)
        ctx.tie(q, 1, y, 1)
        _tie_qkv(ctx, q, k, v, y, heads, heads, sq // heads, sv // heads)

    def rewrite(self, node: ir.Node, ctx: RewriteContext) -> None:
        _set_heads(ctx, "num_heads", node.inputs[0], 2, int(attr(node, "num_heads")))


@register("SkipLayerNormalization", "SkipSimplifiedLayerNormalization", domain=MS)
class SkipLayerNormRule(NoRewrite):
    """LayerNorm(input + skip (+ bias)) over the last axis; outputs 0 and 3 have the input's shape."""

    def couplings(self, node: ir.Node, ctx: CouplingContext) -> None:
        x, skip = ctx.input(0), ctx.input(1)
        rank = ctx.rank(x)
        if rank is None:
            return
        full = [o for i, o in enumerate(node.outputs) if o is not None and i in (0, 3)]
        for t in (skip, *full):
            tie_same_shape(ctx, x, t, skip=[rank - 1])
        reason = f"{node.op_type} '{ctx.name}' normalizes over the hidden axis: removing a channel changes every other"
        if not ctx.allow_inexact:
            for t in (x, skip, *full):
                ctx.block(t, -1, BlockCode.CHANNEL_MIXING, reason)
            for p in node.inputs[2:]:
                ctx.block(p, None, BlockCode.CHANNEL_MIXING, reason)
            return
        for t in (skip, *full):
            ctx.tie(x, -1, t, -1)
        ctx.mark_inexact(x, -1, reason)
        for p in node.inputs[2:]:
            if p is not None and ctx.rank(p) == 1 and ctx.tie(p, 0, x, -1):
                ctx.weight(p, 0, Role.PARAM)


@register("BiasGelu", "FastGelu", "BiasAdd", domain=MS)
class BiasActivationRule(NoRewrite):
    def couplings(self, node: ir.Node, ctx: CouplingContext) -> None:
        tie_broadcast(ctx, list(node.inputs), ctx.output(0))


@register("Gelu", "QuickGelu", domain=MS)
class MsUnaryRule(NoRewrite):
    def couplings(self, node: ir.Node, ctx: CouplingContext) -> None:
        tie_same_shape(ctx, ctx.input(0), ctx.output(0))
