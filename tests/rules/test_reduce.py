"""Reductions and axis normalizers: spatial reductions pass channels, channel reductions mix them."""

from __future__ import annotations

import numpy as np
import pytest

from spa.rules.base import BlockCode

from ._graphs import group_codes, group_of, model, prune_and_check

_CONVS = dict(w1=(8, 3, 3, 3), b1=(8,), w2=(4, 8, 1, 1), b2=(4,))


@pytest.mark.parametrize("op", ["ReduceMean", "ReduceMax", "ReduceSum", "ReduceL2"])
@pytest.mark.parametrize("opset", [13, 18])
def test_reduce_spatial_passes_channels(op, opset):
    # ReduceSum takes axes as an input from opset 13, the others from opset 18.
    as_input = opset >= (13 if op == "ReduceSum" else 18)
    call = f"{op} <keepdims=1> (a, axes)" if as_input else f"{op} <keepdims=1, axes=[2,3]> (a)"
    inits = dict(axes=np.array([2, 3], np.int64)) if as_input else {}
    m = model(
        f"""
        g (float[1,3,6,6] x) => (float[1,4,1,1] y) {{
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          v = {call}
          y = Conv (v, w2, b2)
        }}""",
        opset=opset, **_CONVS, **inits,
    )
    prune_and_check(m, sliced={"w1": 0, "w2": 1})


def test_reduce_spatial_without_keepdims():
    m = model(
        """
        g (float[1,3,6,6] x) => (float[1,4] y) {
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          v = ReduceMean <keepdims=0, axes=[-2,-1]> (a)
          y = Gemm <transB=1> (v, wf, bf)
        }""",
        w1=(8, 3, 3, 3), b1=(8,), wf=(4, 8), bf=(4,),
    )
    prune_and_check(m, sliced={"w1": 0, "wf": 1})


def test_argmax_over_spatial_axis():
    m = model(
        """
        g (float[1,3,6,6] x) => (float[1,4,1,6] y) {
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          i = ArgMax <axis=2, keepdims=1> (a)
          v = Cast <to=1> (i)
          y = Conv (v, w2, b2)
        }""",
        **_CONVS,
    )
    prune_and_check(m, sliced={"w1": 0, "w2": 1})


@pytest.mark.parametrize("opset", [13, 18])
def test_reduce_over_channels_blocks(opset):
    call = "ReduceMean <keepdims=1> (a, axes)" if opset >= 18 else "ReduceMean <keepdims=1, axes=[1]> (a)"
    inits = dict(axes=np.array([1], np.int64)) if opset >= 18 else {}
    m = model(
        f"""
        g (float[1,3,6,6] x) => (float[1,1,6,6] y) {{
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          v = {call}
          y = Relu(v)
        }}""",
        opset=opset, w1=(8, 3, 3, 3), b1=(8,), **inits,
    )
    assert BlockCode.CHANNEL_MIXING in group_codes(m, "a", 1)
    assert group_of(m, "a", 1).n_free == 0


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax", "Hardmax"])
def test_softmax_over_channels_blocks(op):
    m = model(
        f"""
        g (float[1,3,6,6] x) => (float[1,4,6,6] y) {{
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          v = {op} <axis=1> (a)
          y = Conv (v, w2, b2)
        }}""",
        **_CONVS,
    )
    assert BlockCode.CHANNEL_MIXING in group_codes(m, "a", 1)
    assert group_of(m, "a", 1).n_free == 0


def test_softmax_over_spatial_axis_passes_channels():
    m = model(
        """
        g (float[1,3,6,6] x) => (float[1,4,6,6] y) {
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          v = Softmax <axis=-1> (a)
          y = Conv (v, w2, b2)
        }""",
        **_CONVS,
    )
    prune_and_check(m, sliced={"w1": 0, "w2": 1})


def test_softmax_opset11_coerces_trailing_axes():
    # Before opset 13 Softmax flattens axes [axis:] into one: axis=2 mixes H and W only.
    m = model(
        """
        g (float[1,3,6,6] x) => (float[1,4,6,6] y) {
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          v = Softmax <axis=2> (a)
          y = Conv (v, w2, b2)
        }""",
        opset=11, **_CONVS,
    )
    prune_and_check(m, sliced={"w1": 0, "w2": 1})
    m1 = model(
        """
        g (float[1,3,6,6] x) => (float[1,4,6,6] y) {
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          v = Softmax <axis=1> (a)
          y = Conv (v, w2, b2)
        }""",
        opset=11, **_CONVS,
    )
    assert BlockCode.CHANNEL_MIXING in group_codes(m1, "a", 1)
