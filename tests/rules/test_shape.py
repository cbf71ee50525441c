"""Layout ops: Transpose, Squeeze/Unsqueeze, Flatten, Reshape (incl. channel shuffle), Shape."""

from __future__ import annotations

import numpy as np
import pytest

import spa
from spa.rules.base import BlockCode

from ._graphs import const_input, group_codes, group_of, kept_of, model, prune_and_check


def _i64(*v: int) -> np.ndarray:
    return np.array(v, np.int64)


def test_transpose_to_nhwc_then_matmul():
    m = model(
        """
        g (float[1,3,6,6] x) => (float[1,6,6,4] y) {
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          t = Transpose <perm=[0,2,3,1]> (a)
          s = Mul(t, scale)
          y = MatMul(s, w2)
        }""",
        w1=(8, 3, 3, 3), b1=(8,), scale=(8,), w2=(8, 4),
    )
    res = prune_and_check(m, sliced={"w1": 0, "scale": 0, "w2": 0})
    assert kept_of(res, "w1", 0) == kept_of(res, "w2", 0) == kept_of(res, "scale", 0)


def test_transpose_round_trip():
    m = model(
        """
        g (float[1,3,6,6] x) => (float[1,4,6,6] y) {
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          t = Transpose <perm=[0,2,3,1]> (a)
          r = Relu(t)
          u = Transpose <perm=[0,3,1,2]> (r)
          y = Conv <pads=[1,1,1,1]> (u, w2, b2)
        }""",
        w1=(8, 3, 3, 3), b1=(8,), w2=(4, 8, 3, 3), b2=(4,),
    )
    prune_and_check(m, sliced={"w1": 0, "w2": 1})


@pytest.mark.parametrize("opset", [11, 13])
def test_squeeze_unsqueeze(opset):
    if opset == 11:
        sq, unsq, inits = "Squeeze <axes=[2,3]> (p)", "Unsqueeze <axes=[2,3]> (r)", {}
    else:
        sq, unsq, inits = "Squeeze (p, axes)", "Unsqueeze (r, axes)", dict(axes=_i64(2, 3))
    m = model(
        f"""
        g (float[1,3,6,6] x) => (float[1,4,1,1] y) {{
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          p = GlobalAveragePool (a)
          s = {sq}
          h = Gemm <transB=1> (s, wf, bf)
          r = Relu(h)
          u = {unsq}
          y = Conv (u, w2, b2)
        }}""",
        opset=opset,
        w1=(8, 3, 3, 3), b1=(8,), wf=(6, 8), bf=(6,), w2=(4, 6, 1, 1), b2=(4,),
        **inits,
    )
    prune_and_check(m, sliced={"w1": 0, "wf": (0, 1), "bf": 0, "w2": 1})


def test_flatten_nchw_maps_blocks_into_gemm():
    # a[1, 8, 2, 2] → Flatten → [1, 32]: channel c owns Gemm rows 4c … 4c+3.
    m = model(
        """
        g (float[1,3,2,2] x) => (float[1,5] y) {
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          r = Relu(a)
          f = Flatten(r)
          y = Gemm (f, wf, bf)
        }""",
        w1=(8, 3, 3, 3), b1=(8,), wf=(32, 5), bf=(5,),
    )
    assert group_of(m, "a", 1).n_units == 8
    res = prune_and_check(m, sliced={"w1": 0, "wf": 0}, kept={"wf": 1})
    kept = kept_of(res, "w1", 0)
    assert kept_of(res, "wf", 0) == [4 * c + t for c in kept for t in range(4)]


def test_flatten_nhwc_maps_strided_columns():
    # NHWC flatten: column (h·W + w)·C + c reads channel c, so each channel owns a stride-C comb.
    m = model(
        """
        g (float[1,3,2,2] x) => (float[1,5] y) {
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          t = Transpose <perm=[0,2,3,1]> (a)
          f = Flatten(t)
          y = Gemm (f, wf, bf)
        }""",
        w1=(8, 3, 3, 3), b1=(8,), wf=(32, 5), bf=(5,),
    )
    res = prune_and_check(m, sliced={"w1": 0, "wf": 0})
    kept = kept_of(res, "w1", 0)
    assert kept_of(res, "wf", 0) == sorted(8 * p + c for c in kept for p in range(4))


@pytest.mark.parametrize(
    "shape, rewritten",
    [((1, 8), True), ((0, -1), False), ((1, -1), False), ((-1, 8), True)],
    ids=["explicit", "zero-minus-one", "one-minus-one", "minus-one-explicit"],
)
def test_reshape_nc11_to_nc(shape, rewritten):
    m = model(
        """
        g (float[1,3,6,6] x) => (float[1,4] y) {
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          p = GlobalAveragePool (a)
          s = Reshape (p, shp)
          y = Gemm <transB=1> (s, wf, bf)
        }""",
        w1=(8, 3, 3, 3), b1=(8,), wf=(4, 8), bf=(4,), shp=_i64(*shape),
    )
    res = prune_and_check(m, sliced={"w1": 0, "wf": 1})
    k = len(kept_of(res, "w1", 0))
    expected = [k if (s == 8) else s for s in shape] if rewritten else list(shape)
    assert const_input(res, "s", 1) == expected


def test_channel_shuffle():
    # [1, 8, H, W] → [1, 2, 4, H, W] → swap → [1, 4, 2, H, W] → [1, 8, H, W]: channel j·4 + i
    # lands at i·2 + j, so channels {i, i+4} form one unit and both reshapes are rewritten.
    m = model(
        """
        g (float[1,3,4,4] x) => (float[1,4,4,4] y) {
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          r1 = Reshape (a, s1)
          t = Transpose <perm=[0,2,1,3,4]> (r1)
          r2 = Reshape (t, s2)
          y = Conv <pads=[1,1,1,1]> (r2, w2, b2)
        }""",
        w1=(8, 3, 3, 3), b1=(8,), w2=(4, 8, 3, 3), b2=(4,),
        s1=_i64(1, 2, 4, 4, 4), s2=_i64(1, 8, 4, 4),
    )
    assert group_of(m, "a", 1).n_units == 4
    res = prune_and_check(m, sliced={"w1": 0, "w2": 1})
    kept = kept_of(res, "w1", 0)
    positions = sorted({c % 4 for c in kept})
    assert kept == sorted(p + 4 * j for p in positions for j in range(2))
    assert kept_of(res, "w2", 1) == sorted(2 * p + j for p in positions for j in range(2))
    k = len(positions)
    assert const_input(res, "r1", 1) == [1, 2, k, 4, 4]
    assert const_input(res, "r2", 1) == [1, 2 * k, 4, 4]


_TORCH_FLATTEN = """
g (float[{batch},3,2,2] x) => (float[{batch},5] y) {{
  a = Conv <pads=[1,1,1,1]> (x, w1, b1)
  sh = Shape(x)
  n = Slice(sh, zero, one)
  shp = Concat <axis=0> (n, minus_one)
  f = Reshape(a, shp)
  y = Gemm (f, wf, bf)
}}"""


def _torch_flatten(batch: str):
    # The usual torch flatten: shape = concat(shape(x)[0:1], [-1]), computed at run time.
    return model(
        _TORCH_FLATTEN.format(batch=batch),
        w1=(8, 3, 3, 3), b1=(8,), wf=(32, 5), bf=(5,),
        zero=_i64(0), one=_i64(1), minus_one=_i64(-1),
    )


def test_reshape_with_dynamic_batch_target_is_resolved():
    # shape = concat(shape(x)[0:1], [-1]) with a symbolic batch: the target is evaluated
    # symbolically ([N, -1] of [N, 8, 2, 2] is [N, 32]) and the Flatten block is proven.
    res = prune_and_check(_torch_flatten("N"), sliced={"w1": 0, "wf": 0})
    kept = kept_of(res, "w1", 0)
    assert kept_of(res, "wf", 0) == [4 * c + t for c in kept for t in range(4)]


def test_reshape_with_unprovable_computed_target_blocks():
    # A target read from a tensor's *values* cannot be evaluated: DATA_DEPENDENT.
    m = model(
        """
        g (float[1,3,2,2] x, int64[2] t) => (float[1,5] y) {
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          f = Reshape (a, t)
          y = Gemm (f, wf, bf)
        }""",
        w1=(8, 3, 3, 3), b1=(8,), wf=(32, 5), bf=(5,),
    )
    assert BlockCode.DATA_DEPENDENT in group_codes(m, "a", 1)
    assert group_of(m, "a", 1).n_free == 0


def test_reshape_with_static_computed_shape_is_proven():
    # With a static batch canonicalize folds the same computation into a constant shape.
    res = prune_and_check(_torch_flatten("1"), sliced={"w1": 0, "wf": 0})
    kept = kept_of(res, "w1", 0)
    assert kept_of(res, "wf", 0) == [4 * c + t for c in kept for t in range(4)]


def test_reshape_regrouping_channels_is_indivisible():
    # [1, 6, 2, 2] → [1, 3, 8]: channels and space are regrouped, no channel survives whole.
    m = model(
        """
        g (float[1,3,2,2] x) => (float[1,3,5] y) {
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          r = Reshape (a, shp)
          y = MatMul (r, wm)
        }""",
        w1=(6, 3, 3, 3), b1=(6,), wm=(8, 5), shp=_i64(1, 3, 8),
    )
    assert BlockCode.INDIVISIBLE in group_codes(m, "a", 1)
    assert group_of(m, "a", 1).n_free == 0


def test_shape_of_channel_axis_blocks():
    # Shape(a) reports the channel count (a dynamic batch keeps it from being folded).
    m = model(
        """
        g (float[N,3,6,6] x) => (float[N,4,6,6] y) {
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          s = Shape (a)
          f = Cast <to=1> (s)
          n = ReduceSum <keepdims=1> (f)
          v = Mul(a, n)
          y = Conv <pads=[1,1,1,1]> (v, w2, b2)
        }""",
        w1=(8, 3, 3, 3), b1=(8,), w2=(4, 8, 3, 3), b2=(4,),
    )
    assert BlockCode.DATA_DEPENDENT in group_codes(m, "a", 1)
    assert group_of(m, "a", 1).n_free == 0


def test_shape_of_spatial_axes_keeps_channels():
    # Shape reports only the (symbolic) spatial dims: the channels may go.
    m = model(
        """
        g (float[1,3,H,W] x) => (float[1,4,H,W] y) {
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          s = Shape <start=2> (a)
          f = Cast <to=1> (s)
          n = ReduceSum <keepdims=1> (f)
          v = Mul(a, n)
          y = Conv <pads=[1,1,1,1]> (v, w2, b2)
        }""",
        w1=(8, 3, 3, 3), b1=(8,), w2=(4, 8, 3, 3), b2=(4,),
    )
    assert any(n.op_type == "Shape" for n in spa.analyze(m).model.graph)
    prune_and_check(m, sliced={"w1": 0, "w2": 1})


def test_gap_flatten_gemm_head():
    m = model(
        """
        g (float[1,3,6,6] x) => (float[1,5] y) {
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          p = GlobalAveragePool (a)
          f = Flatten (p)
          y = Gemm <transB=1> (f, wf, bf)
        }""",
        w1=(8, 3, 3, 3), b1=(8,), wf=(5, 8), bf=(5,),
    )
    res = prune_and_check(m, sliced={"w1": 0, "wf": 1})
    assert kept_of(res, "wf", 1) == kept_of(res, "w1", 0)


def test_squeeze_all_unit_axes_opset13():
    # Squeeze without axes drops every size-1 axis, the batch included: [1, 8, 1, 1] → [8].
    m = model(
        """
        g (float[1,3,6,6] x) => (float[4] y) {
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          p = GlobalAveragePool (a)
          s = Squeeze (p)
          y = MatMul (s, wm)
        }""",
        opset=13, w1=(8, 3, 3, 3), b1=(8,), wm=(8, 4),
    )
    prune_and_check(m, sliced={"w1": 0, "wm": 0})


def test_unsqueeze_negative_axes():
    m = model(
        """
        g (float[2,5] x) => (float[2,4,1] y) {
          h = Gemm <transB=1> (x, w1, c1)
          r = Relu(h)
          u = Unsqueeze (r, axes)
          y = Conv (u, w2, b2)
        }""",
        opset=13, w1=(8, 5), c1=(8,), axes=_i64(-1), w2=(4, 8, 1), b2=(4,),
    )
    prune_and_check(m, sliced={"w1": 0, "w2": 1})


def test_reshape_keeps_zero_copy_entries():
    # [1, 8, 6, 6] → [0, 0, -1] = [1, 8, 36]: the zeros still copy the (new) channel count.
    m = model(
        """
        g (float[1,3,6,6] x) => (float[1,4,36] y) {
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          r = Reshape (a, shp)
          y = Conv <pads=[1,1]> (r, w2, b2)
        }""",
        w1=(8, 3, 3, 3), b1=(8,), w2=(4, 8, 3), b2=(4,), shp=_i64(0, 0, -1),
    )
    res = prune_and_check(m, sliced={"w1": 0, "w2": 1})
    assert const_input(res, "r", 1) == [0, 0, -1]


def test_reshape_drops_unit_batch():
    # [1, 8, 6, 6] → [8, 36], then W[4, 8] · r: the constant-first MatMul reads the channels.
    m = model(
        """
        g (float[1,3,6,6] x) => (float[4,36] y) {
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          r = Reshape (a, shp)
          y = MatMul (wm, r)
        }""",
        w1=(8, 3, 3, 3), b1=(8,), wm=(4, 8), shp=_i64(8, 36),
    )
    res = prune_and_check(m, sliced={"w1": 0, "wm": 1})
    assert const_input(res, "r", 1) == [len(kept_of(res, "w1", 0)), 36]


def test_transpose_without_perm_reverses():
    m = model(
        """
        g (float[4,5] x) => (float[3,4] y) {
          h = Gemm <transB=1> (x, w1, c1)
          t = Transpose (h)
          y = MatMul (w2, t)
        }""",
        w1=(8, 5), c1=(8,), w2=(3, 8),
    )
    prune_and_check(m, sliced={"w1": 0, "w2": 1})


def test_layernorm_after_nhwc_transpose_blocks():
    # ConvNeXt: LayerNorm over the channel axis in channels-last layout.
    m = model(
        """
        g (float[1,3,6,6] x) => (float[1,6,6,4] y) {
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          t = Transpose <perm=[0,2,3,1]> (a)
          n = LayerNormalization <axis=-1> (t, s, bias)
          y = MatMul (n, wm)
        }""",
        w1=(8, 3, 3, 3), b1=(8,), s=(8,), bias=(8,), wm=(8, 4),
    )
    assert BlockCode.CHANNEL_MIXING in group_codes(m, "a", 1)
    assert group_of(m, "a", 1).n_free == 0


def test_shape_constant_shared_with_a_frozen_reshape():
    # Both Reshapes read ``shp``; only the first one's channels go, so surgery must give it a
    # rewritten copy and leave the shared constant alone.
    m = model(
        """
        g (float[1,3,6,6] x, float[1,8,1,1] z) => (float[1,4] y, float[1,8] yz) {
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          p = GlobalAveragePool (a)
          s = Reshape (p, shp)
          y = Gemm <transB=1> (s, wf, bf)
          yz = Reshape (z, shp)
        }""",
        w1=(8, 3, 3, 3), b1=(8,), wf=(4, 8), bf=(4,), shp=_i64(1, 8),
    )
    res = prune_and_check(m, sliced={"w1": 0, "wf": 1})
    assert const_input(res, "s", 1) == [1, len(kept_of(res, "w1", 0))]
    assert const_input(res, "yz", 1) == [1, 8]
    assert res.model.graph.initializers["shp"].const_value.numpy().tolist() == [1, 8]
