"""Pooling, Pad and Resize: channels pass through, spatial changes never touch them."""

from __future__ import annotations

import numpy as np
import pytest

from spa.rules.base import BlockCode

from ._graphs import const_input, group_codes, group_of, model, prune_and_check

_CONVS = dict(w1=(8, 3, 3, 3), b1=(8,), w2=(4, 8, 3, 3), b2=(4,))


def _through(body: str, out_hw: int, *, opset: int = 17, **inits):
    """x → Conv(w1) → a → <body: a … → v> → Conv(w2) → y."""
    return model(
        f"""
        g (float[1,3,6,6] x) => (float[1,4,{out_hw},{out_hw}] y) {{
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          {body}
          y = Conv <pads=[1,1,1,1]> (v, w2, b2)
        }}""",
        opset=opset,
        **_CONVS,
        **inits,
    )


@pytest.mark.parametrize(
    "body, hw",
    [
        ("v = MaxPool <kernel_shape=[2,2], strides=[2,2]> (a)", 3),
        ("v = AveragePool <kernel_shape=[3,3], pads=[1,1,1,1]> (a)", 6),
        ("v = LpPool <kernel_shape=[2,2], strides=[2,2], p=2> (a)", 3),
        ("v = GlobalAveragePool (a)", 1),
        ("v = GlobalMaxPool (a)", 1),
        ("v = GlobalLpPool <p=3> (a)", 1),
    ],
    ids=["MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"],
)
def test_pool(body, hw):
    prune_and_check(_through(body, hw), sliced={"w1": 0, "w2": 1})


def test_maxpool_unused_indices_output():
    m = _through("v, idx = MaxPool <kernel_shape=[2,2], strides=[2,2]> (a)", 3)
    prune_and_check(m, sliced={"w1": 0, "w2": 1})


def test_maxpool_read_indices_block():
    # Indices are positions in the flattened input, channel offset included: removing a
    # channel renumbers every later one, so channels whose indices are read must stay.
    m = _through(
        """p, idx = MaxPool <kernel_shape=[2,2], strides=[2,2]> (a)
          f = Cast <to=1> (idx)
          s = Mul(f, tiny)
          v = Add(p, s)""",
        3,
        tiny=np.array(1e-2, np.float32),
    )
    assert BlockCode.DATA_DEPENDENT in group_codes(m, "a", 1)
    assert group_of(m, "a", 1).n_free == 0


@pytest.mark.parametrize("opset", [13, 18])
@pytest.mark.parametrize("mode", ["constant", "reflect", "edge"])
def test_pad_spatial(opset, mode):
    if opset == 18:  # with an explicit axes input
        body = f'v = Pad <mode="{mode}"> (a, pads, , axes)'
        inits = dict(pads=np.array([1, 2, 1, 0], np.int64), axes=np.array([2, 3], np.int64))
    else:
        body = f'v = Pad <mode="{mode}"> (a, pads)'
        inits = dict(pads=np.array([0, 0, 1, 2, 0, 0, 1, 0], np.int64))
    m = model(
        f"""
        g (float[1,3,6,6] x) => (float[1,4,6,6] y) {{
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          {body}
          y = Conv (v, w2, b2)
        }}""",
        opset=opset, **_CONVS, **inits,
    )
    res = prune_and_check(m, sliced={"w1": 0, "w2": 1})
    assert res.model.graph.initializers["pads"].shape == inits["pads"].shape


def test_pad_channel_axis_blocks():
    m = model(
        """
        g (float[1,3,6,6] x) => (float[1,4,6,6] y) {
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          v = Pad (a, pads)
          y = Conv <pads=[1,1,1,1]> (v, w2, b2)
        }""",
        w1=(8, 3, 3, 3), b1=(8,), w2=(4, 10, 3, 3), b2=(4,),
        pads=np.array([0, 1, 0, 0, 0, 1, 0, 0], np.int64),
    )
    assert BlockCode.UNMAPPED_AXIS in group_codes(m, "a", 1)
    assert group_of(m, "a", 1).n_free == 0


def test_resize_scales():
    m = _through(
        'v = Resize <mode="nearest"> (a, "", scales)',
        12,
        scales=np.array([1, 1, 2, 2], np.float32),
    )
    res = prune_and_check(m, sliced={"w1": 0, "w2": 1})
    assert res.model.graph.initializers["scales"].const_value.numpy().tolist() == [1, 1, 2, 2]


def test_resize_sizes_rewrites_channel_count():
    m = _through(
        'v = Resize <mode="linear"> (a, "", "", sizes)',
        12,
        sizes=np.array([1, 8, 12, 12], np.int64),
    )
    res = prune_and_check(m, sliced={"w1": 0, "w2": 1})
    k = res.model.graph.initializers["w1"].shape[0]
    assert const_input(res, "v", 3) == [1, k, 12, 12]


def test_resize_sizes_with_axes():
    # opset 18: sizes given only for the spatial axes, nothing to rewrite.
    m = _through(
        'v = Resize <mode="nearest", axes=[2,3]> (a, "", "", sizes)',
        12,
        opset=18,
        sizes=np.array([12, 12], np.int64),
    )
    res = prune_and_check(m, sliced={"w1": 0, "w2": 1})
    assert const_input(res, "v", 3) == [12, 12]


def test_resize_over_channels_blocks():
    m = model(
        """
        g (float[1,3,6,6] x) => (float[1,4,6,6] y) {
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          v = Resize <mode="nearest"> (a, "", scales)
          y = Conv <pads=[1,1,1,1]> (v, w2, b2)
        }""",
        w1=(8, 3, 3, 3), b1=(8,), w2=(4, 16, 3, 3), b2=(4,),
        scales=np.array([1, 2, 1, 1], np.float32),
    )
    assert group_of(m, "a", 1).n_free == 0


def test_resize_sizes_with_channel_in_axes():
    # opset 18: axes [1, 2, 3] with sizes [8, 12, 12]: the channel entry is rewritten.
    m = _through(
        'v = Resize <mode="nearest", axes=[1,2,3]> (a, "", "", sizes)',
        12,
        opset=18,
        sizes=np.array([8, 12, 12], np.int64),
    )
    res = prune_and_check(m, sliced={"w1": 0, "w2": 1})
    assert const_input(res, "v", 3) == [res.model.graph.initializers["w1"].shape[0], 12, 12]


def test_conv_transpose_then_batchnorm():
    m = model(
        """
        g (float[1,3,5,5] x) => (float[1,4,10,10] y) {
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          t = ConvTranspose <strides=[2,2], kernel_shape=[2,2]> (a, wt)
          n = BatchNormalization (t, s, bias, mean, var)
          y = Conv <pads=[1,1,1,1]> (n, w2, b2)
        }""",
        w1=(8, 3, 3, 3), b1=(8,), wt=(8, 6, 2, 2), s=(6,), bias=(6,), mean=(6,),
        var=np.linspace(0.5, 2, 6).astype(np.float32), w2=(4, 6, 3, 3), b2=(4,),
    )
    prune_and_check(m, sliced={"wt": 1, "s": 0, "w2": 1})
