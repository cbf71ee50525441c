"""Channel-blocked convolutions on CPU targets: NCHW → NCHW{b}c, with ``b`` the target's fp32
SIMD width (16 on AVX-512, 8 on AVX/AVX2).

Why: in NCHW the innermost contiguous axis of a conv's output is the image width, so a 7×7 or
14×14 map fills a 16-lane vector badly whatever schedule MetaSchedule finds. Blocking ``b``
channels innermost (MLAS's own layout) makes every vector a full set of channels. Measured at
equal trials (``benchmarks/target.py --parts layout``, docs/target.md): on a Zen 4 (NCHW16c) 3×3
and 1×1 convs ran 1.2–1.4× faster blocked, boundary transforms included, and tuned ResNet-50 at
ratio 0.5 went from 40.8 to 24.5 ms at 2400 trials; on a Zen 3 (NCHW8c) two of the three convs
ran 1.3–1.5× faster blocked and one 1.2× slower. TOPI's ``conv2d_NCHWc``
compute was tried first and lost on 1×1 convs (2× slower than NCHW): it reduces over one fused
input-channel axis indexed by division and modulo; :func:`conv2d_nchwc` reduces over the block
and the chunk separately.

Only convs whose weight is a constant, with one group and out channels a multiple of ``b``,
are blocked; one whose in channels are not (a stem on 3 input channels) reads NCHW and writes
blocked. Elementwise ops between
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
    """conv2d into [N, O/b, H', W', b] from ``data`` [N, C/b, H, W, b] with ``kernel``
    [O/b, C/b, kH, kW, b(in), b(out)], or from NCHW ``data`` [N, C, H, W] with ``kernel``
    [O/b, C, kH, kW, b(out)] (a stem whose input channels are not a multiple of ``b``): a TE
    compute with the input channels' chunk and block as separate reduction axes."""
    from tvm import te, topi

    blocked_in = len(data.shape) == 5
    n, chunks, h, w = (int(v) for v in data.shape[:4])
    out_chunks, _, kh, kw = (int(v) for v in kernel.shape[:4])
    out_block = int(kernel.shape[-1])
    sh, sw = strides
    top, left, bottom, right = padding
    dh, dw = dilation
    if any(padding):
        tail = [0] if blocked_in else []
        data = topi.nn.pad(data, [0, 0, top, left, *tail], [0, 0, bottom, right, *tail], name="data_pad")
    oh = (h + top + bottom - (kh - 1) * dh - 1) // sh + 1
    ow = (w + left + right - (kw - 1) * dw - 1) // sw + 1
    rc = te.reduce_axis((0, chunks), "rc")
    ry = te.reduce_axis((0, kh), "ry")
    rx = te.reduce_axis((0, kw), "rx")
    if not blocked_in:
        return te.compute(
            (n, out_chunks, oh, ow, out_block),
            lambda b, o, y, x, ob: te.sum(data[b, rc, y * sh + ry * dh, x * sw + rx * dw] * kernel[o, rc, ry, rx, ob], axis=[rc, ry, rx]),
            name="conv2d_NCHWc",
        )
    rb = te.reduce_axis((0, int(kernel.shape[4])), "rb")
    return te.compute(
        (n, out_chunks, oh, ow, out_block),
        lambda b, o, y, x, ob: te.sum(data[b, rc, y * sh + ry * dh, x * sw + rx * dw, rb] * kernel[o, rc, ry, rx, rb, ob], axis=[rc, ry, rx, rb]),
        name="conv2d_NCHWc",
    )


def _legalize_conv2d(bb, call):
    from tvm.relax.transform.legalize_ops.nn import _nn_conv2d

    a = call.attrs
    if str(a.out_layout) in ("NCHW", "NHWC"):
        return _nn_conv2d(bb, call)
    ints = lambda xs: [int(x) for x in xs]  # noqa: E731
    return bb.call_te(conv2d_nchwc, call.args[0], call.args[1], ints(a.strides), ints(a.padding), ints(a.dilation), primfunc_name_hint="conv2d_NCHWc")


def _layouts_for(call, block: int) -> list[str]:
    """The [data, kernel, output] layouts ``call`` (a conv2d) is built in: channel-blocked where
    its out channels are a multiple of ``block`` (its input too where its in channels are),
    NCHW otherwise. A conv left out must still name its layout: with none, TVM's layout
    inference takes a blocked producer's 5-D layout for the conv's own 4-D one and fails."""
    nchw = ["NCHW", "OIHW", "NCHW"]
    a = call.attrs
    weight = call.args[1]
    if not hasattr(weight, "value") or int(a.groups) != 1:  # a constant weight: its transform folds
        return nchw
    if str(a.data_layout) != "NCHW" or str(a.kernel_layout) != "OIHW" or str(a.out_layout) != "NCHW":
        return nchw
    shape = weight.value.shape
    if str(weight.value.dtype) != "float32" or len(shape) != 4 or shape[0] % block:
        return nchw
    if shape[1] % block:
        return ["NCHW", f"OIHW{block}o", f"NCHW{block}c"]
    return [f"NCHW{block}c", f"OIHW{block}i{block}o", f"NCHW{block}c"]


def _conv_layouts(mod) -> list[str]:
    """The output layout of every conv2d call in ``mod``'s Relax functions."""
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
                    found.append(str(value.attrs.out_layout))
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
        return {"relax.nn.conv2d": _layouts_for(call, block)} if call.op.name == "relax.nn.conv2d" else {}

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
