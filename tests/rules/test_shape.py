"""Layout ops: Transpose, Squeeze/Unsqueeze, Flatten, Reshape (incl. channel shuffle), Shape."""

from __future__ import annotations

import numpy as np
import pytest

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


def test_reshape_with_computed_shape_blocks():
    # The usual torch flatten: shape = concat(shape(x)[0:1], [-1]), computed at run time
    # (from the graph input, so the Reshape is the only node refusing a's channels).
    m = model(
        """
        g (float[1,3,2,2] x) => (float[1,5] y) {
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          sh = Shape(x)
          n = Slice(sh, zero, one)
          shp = Concat <axis=0> (n, minus_one)
          f = Reshape(a, shp)
          y = Gemm (f, wf, bf)
        }""",
        w1=(8, 3, 3, 3), b1=(8,), wf=(32, 5), bf=(5,),
        zero=_i64(0), one=_i64(1), minus_one=_i64(-1),
    )
    assert BlockCode.DATA_DEPENDENT in group_codes(m, "a", 1)
    assert group_of(m, "a", 1).n_free == 0


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
    m = model(
        """
        g (float[1,3,6,6] x) => (float[1,4,6,6] y) {
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          s = Shape <start=1, end=2> (a)
          f = Cast <to=1> (s)
          v = Mul(a, f)
          y = Conv <pads=[1,1,1,1]> (v, w2, b2)
        }""",
        w1=(8, 3, 3, 3), b1=(8,), w2=(4, 8, 3, 3), b2=(4,),
    )
    assert BlockCode.DATA_DEPENDENT in group_codes(m, "a", 1)
    assert group_of(m, "a", 1).n_free == 0


def test_shape_of_spatial_axes_keeps_channels():
    m = model(
        """
        g (float[1,3,6,6] x) => (float[1,4,6,6] y) {
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          s = Shape <start=2> (a)
          f = Cast <to=1> (s)
          n = ReduceSum <keepdims=1> (f)
          v = Mul(a, n)
          y = Conv <pads=[1,1,1,1]> (v, w2, b2)
        }""",
        w1=(8, 3, 3, 3), b1=(8,), w2=(4, 8, 3, 3), b2=(4,),
    )
    prune_and_check(m, sliced={"w1": 0, "w2": 1})
