"""Channel-blocked convolutions on CPU targets: NCHW → NCHW{b}c, with ``b`` the target's fp32
SIMD width (16 on AVX-512, 8 on AVX/AVX2).

Why: in NCHW the innermost contiguous axis of a conv's output is the image width, so a 7×7 or
14×14 map fills a 16-lane vector badly whatever schedule MetaSchedule finds. Blocking ``b``
channels innermost (MLAS's own layout) makes every vector a full set of channels. Measured at
equal trials on this machine (``benchmarks/target.py --parts layout``): 3×3 convs ran 1.5–1.8×
faster blocked, 1×1 convs the same. TOPI's ``conv2d_NCHWc`` compute was tried first and lost
on 1×1 convs (2× slower than NCHW): it reduces over one fused input-channel axis indexed by
division and modulo; :func:`conv2d_nchwc` reduces over the block and the chunk separately.

Only convs whose weight is a constant, with one group and both channel counts multiples of
``b``, are blocked (a ResNet stem with 3 input channels stays NCHW). Elementwise ops between
blocked convs follow them (``ConvertLayout``), so layout transforms are left only where a
blocked region meets the rest; the weight and bias transforms are folded into the constants.
"""

from __future__ import annotations

from typing import Any

from spa.kernels.target import TargetSpec, vector_width

__all__ = ["block_convs", "conv2d_nchwc", "block_size"]


def block_size(spec: TargetSpec) -> int:
    """The channel block for ``spec``, or 0 where convs stay NCHW: only x86 llvm targets with
    8- or 16-lane fp32 vectors, where the layout was measured."""
    if spec.kind != "llvm":
        return 0
    width = vector_width(spec)
    return width if width in (8, 16) else 0


def conv2d_nchwc(data, kernel, strides, padding, dilation):
    """conv2d on ``data`` [N, C/b, H, W, b] with ``kernel`` [O/b, C/b, kH, kW, b(in), b(out)]:
    a TE compute with the input-channel chunk and block as two reduction axes."""
    from tvm import te, topi

    n, chunks, h, w, _ = (int(v) for v in data.shape)
    out_chunks, _, kh, kw, in_block, out_block = (int(v) for v in kernel.shape)
    sh, sw = strides
    top, left, bottom, right = padding
    dh, dw = dilation
    if any(padding):
        data = topi.nn.pad(data, [0, 0, top, left, 0], [0, 0, bottom, right, 0], name="data_pad")
    oh = (h + top + bottom - (kh - 1) * dh - 1) // sh + 1
    ow = (w + left + right - (kw - 1) * dw - 1) // sw + 1
    rc = te.reduce_axis((0, chunks), "rc")
    ry = te.reduce_axis((0, kh), "ry")
    rx = te.reduce_axis((0, kw), "rx")
    rb = te.reduce_axis((0, in_block), "rb")
    return te.compute(
        (n, out_chunks, oh, ow, out_block),
        lambda b, o, y, x, ob: te.sum(data[b, rc, y * sh + ry * dh, x * sw + rx * dw, rb] * kernel[o, rc, ry, rx, rb, ob], axis=[rc, ry, rx, rb]),
        name="conv2d_NCHWc",
    )


def _legalize_conv2d(bb, call):
    from tvm.relax.transform.legalize_ops.nn import _nn_conv2d

    a = call.attrs
    if str(a.data_layout) in ("NCHW", "NHWC"):
        return _nn_conv2d(bb, call)
    ints = lambda xs: [int(x) for x in xs]  # noqa: E731
    return bb.call_te(conv2d_nchwc, call.args[0], call.args[1], ints(a.strides), ints(a.padding), ints(a.dilation), primfunc_name_hint="conv2d_NCHWc")


def _blockable(call, block: int) -> bool:
    a = call.attrs
    weight = call.args[1]
    if not hasattr(weight, "value") or int(a.groups) != 1:  # a constant weight: its transform folds
        return False
    if str(a.data_layout) != "NCHW" or str(a.kernel_layout) != "OIHW" or str(a.out_layout) != "NCHW":
        return False
    if str(weight.value.dtype) != "float32":
        return False
    shape = weight.value.shape
    return len(shape) == 4 and shape[0] % block == 0 and shape[1] % block == 0


def _conv_layouts(mod) -> list[str]:
    """The data layout of every conv2d call in ``mod``'s Relax functions."""
    from tvm import relax

    found = []
    for func in mod.functions.values():
        if not isinstance(func, relax.Function):
            continue
        blocks = getattr(func.body, "blocks", ())
        for block in blocks:
            for binding in block.bindings:
                value = binding.value
                if isinstance(value, relax.Call) and getattr(value.op, "name", None) == "relax.nn.conv2d":
                    found.append(str(value.attrs.data_layout))
    return found


def block_convs(mod, spec: TargetSpec) -> tuple[Any, dict[str, Any]]:
    """``mod`` (imported, not yet legalised) with its blockable convs in NCHW{b}c, legalised
    and constant-folded; and what was done: ``{"conv_layout": ..., "convs_blocked": k,
    "convs": n}``. Unchanged (and not legalised) where :func:`block_size` is 0 or no conv
    qualifies."""
    import tvm
    from tvm import relax

    block = block_size(spec)
    layouts = _conv_layouts(mod)
    if not block or not layouts:
        return mod, {"conv_layout": "NCHW", "convs": len(layouts)}

    def choose(call) -> dict[str, list[str]]:
        # A conv left out must still name its layout: with none, TVM's conv2d layout inference
        # takes a blocked producer's 5-D layout for its own 4-D one and fails.
        if call.op.name == "relax.nn.conv2d":
            return {"relax.nn.conv2d": [f"NCHW{block}c", f"OIHW{block}i{block}o"] if _blockable(call, block) else ["NCHW", "OIHW"]}
        return {}

    converted = relax.transform.ConvertLayout({}, layout_cb=choose)(mod)
    blocked = sum(lay == f"NCHW{block}c" for lay in _conv_layouts(converted))
    if not blocked:
        return mod, {"conv_layout": "NCHW", "convs": len(layouts)}
    info = {"conv_layout": f"NCHW{block}c", "convs_blocked": blocked, "convs": len(layouts)}
    with spec.tvm():
        passes = [
            relax.transform.DecomposeOpsForInference(),
            relax.transform.LegalizeOps(customize_legalize_map={"relax.nn.conv2d": _legalize_conv2d}),
            relax.transform.FoldConstant(),
        ]
        return tvm.transform.Sequential(passes)(converted), info
