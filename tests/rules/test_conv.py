"""Conv and ConvTranspose: plain, grouped, depthwise, 1D/2D/3D, non-constant weights."""

from __future__ import annotations

import numpy as np
import pytest

from spa.rules.base import BlockCode

from ._graphs import codes, group_codes, group_of, kept_of, model, node_of, prune_and_check


@pytest.mark.parametrize(
    "spatial, k",
    [((9,), (3,)), ((6, 6), (3, 3)), ((4, 4, 4), (3, 3, 3))],
    ids=["1d", "2d", "3d"],
)
def test_conv_nd(spatial, k):
    s = ",".join(map(str, spatial))
    pads = ",".join(["1"] * (2 * len(spatial)))
    m = model(
        f"""
        g (float[1,3,{s}] x) => (float[1,4,{s}] y) {{
          a = Conv <pads=[{pads}]> (x, w1, b1)
          r = Relu(a)
          y = Conv <pads=[{pads}]> (r, w2, b2)
        }}""",
        w1=(8, 3, *k), b1=(8,), w2=(4, 8, *k), b2=(4,),
    )
    res = prune_and_check(m, sliced={"w1": 0, "b1": 0, "w2": 1}, kept={"w2": 0, "w1": 1})
    assert kept_of(res, "w1", 0) == kept_of(res, "w2", 1) == kept_of(res, "b1", 0)


@pytest.mark.parametrize("mult", [1, 2])
def test_depthwise_rewrites_group(mult):
    m = model(
        f"""
        g (float[1,3,6,6] x) => (float[1,4,6,6] y) {{
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          r = Relu(a)
          d = Conv <group=8, pads=[1,1,1,1]> (r, wd, bd)
          e = Relu(d)
          y = Conv (e, w2, b2)
        }}""",
        w1=(8, 3, 3, 3), b1=(8,), wd=(8 * mult, 1, 3, 3), bd=(8 * mult,), w2=(4, 8 * mult, 1, 1), b2=(4,),
    )
    res = prune_and_check(m, sliced={"w1": 0, "wd": 0, "bd": 0, "w2": 1})
    kept = kept_of(res, "w1", 0)
    assert node_of(res, "d").attributes["group"].value == len(kept)
    # Input channel i owns outputs i·m … i·m+m-1 of the depthwise conv: they go together.
    assert kept_of(res, "wd", 0) == [i * mult + t for i in kept for t in range(mult)]


def test_grouped_conv_equal_removal_per_group():
    # group=2, C/g = 4 input channels and M/g = 4 output channels per group.
    m = model(
        """
        g (float[1,3,6,6] x) => (float[1,4,6,6] y) {
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          r = Relu(a)
          d = Conv <group=2, pads=[1,1,1,1]> (r, wg, bg)
          e = Relu(d)
          y = Conv (e, w2, b2)
        }""",
        w1=(8, 3, 3, 3), b1=(8,), wg=(8, 4, 3, 3), bg=(8,), w2=(4, 8, 1, 1), b2=(4,),
    )
    res = prune_and_check(m, sliced={"w1": 0, "wg": (0, 1), "w2": 1})
    assert node_of(res, "d").attributes["group"].value == 2
    # Equal removal in each group, at the same positions.
    for name, axis, per in (("w1", 0, 4), ("wg", 0, 4)):
        kept = np.asarray(kept_of(res, name, axis))
        first, second = kept[kept < per], kept[kept >= per] - per
        assert len(first) == len(second) and (first == second).all(), kept
    assert res.model.graph.initializers["wg"].shape[1] * 2 == len(kept_of(res, "w1", 0))


def test_conv_transpose_plain():
    m = model(
        """
        g (float[1,3,5,5] x) => (float[1,4,11,11] y) {
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          r = Relu(a)
          t = ConvTranspose <strides=[2,2]> (r, wt, bt)
          u = Relu(t)
          y = Conv <pads=[1,1,1,1]> (u, w2, b2)
        }""",
        w1=(8, 3, 3, 3), b1=(8,), wt=(8, 6, 3, 3), bt=(6,), w2=(4, 6, 3, 3), b2=(4,),
    )
    prune_and_check(m, sliced={"w1": 0, "wt": (0, 1), "bt": 0, "w2": 1})


def test_conv_transpose_grouped():
    # group=2: W[C=8, M/g=3, k, k], output M = 6.
    m = model(
        """
        g (float[1,3,5,5] x) => (float[1,4,11,11] y) {
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          r = Relu(a)
          t = ConvTranspose <strides=[2,2], group=2> (r, wt, bt)
          u = Relu(t)
          y = Conv <pads=[1,1,1,1]> (u, w2, b2)
        }""",
        w1=(8, 3, 3, 3), b1=(8,), wt=(8, 3, 3, 3), bt=(6,), w2=(4, 6, 3, 3), b2=(4,),
    )
    res = prune_and_check(m, sliced={"w1": 0, "wt": 0}, ratio=0.5)
    assert node_of(res, "t").attributes["group"].value == 2
    wt = res.model.graph.initializers["wt"].shape
    assert wt[0] % 2 == 0


def test_conv_transpose_depthwise():
    m = model(
        """
        g (float[1,3,5,5] x) => (float[1,4,11,11] y) {
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          r = Relu(a)
          t = ConvTranspose <strides=[2,2], group=8> (r, wt, bt)
          u = Relu(t)
          y = Conv <pads=[1,1,1,1]> (u, w2, b2)
        }""",
        w1=(8, 3, 3, 3), b1=(8,), wt=(8, 2, 3, 3), bt=(16,), w2=(4, 16, 3, 3), b2=(4,),
    )
    res = prune_and_check(m, sliced={"w1": 0, "wt": 0, "bt": 0, "w2": 1}, kept={"wt": 1})
    kept = kept_of(res, "w1", 0)
    assert node_of(res, "t").attributes["group"].value == len(kept)
    assert kept_of(res, "bt", 0) == [2 * i + t for i in kept for t in range(2)]


def test_non_constant_weight_blocks():
    # The weight is a graph input: the conv's output channels cannot be sliced.
    m = model(
        """
        g (float[1,3,6,6] x, float[8,3,3,3] w1) => (float[1,4,6,6] y) {
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          r = Relu(a)
          y = Conv <pads=[1,1,1,1]> (r, w2, b2)
        }""",
        b1=(8,), w2=(4, 8, 3, 3), b2=(4,),
    )
    assert BlockCode.NON_CONSTANT_WEIGHT in group_codes(m, "a", 1)
    assert not group_of(m, "a", 1).prunable


def test_computed_weight_blocks_its_residual_partner():
    # Branch B's weight is computed at run time (scaled by a graph input): the residual Add
    # couples it with branch A, whose weight is constant, so the group is a channel, blocked.
    m = model(
        """
        g (float[1,3,6,6] x, float sc) => (float[1,4,6,6] y) {
          wb = Mul(wraw, sc)
          a = Conv <pads=[1,1,1,1]> (x, wa)
          b = Conv <pads=[1,1,1,1]> (x, wb)
          c = Add(a, b)
          y = Conv <pads=[1,1,1,1]> (c, w2)
        }""",
        wa=(8, 3, 3, 3), wraw=(8, 3, 3, 3), w2=(4, 8, 3, 3),
    )
    assert group_codes(m, "c", 1) == {BlockCode.NON_CONSTANT_WEIGHT}
    assert BlockCode.NON_CONSTANT_WEIGHT in codes(m)
    assert group_of(m, "c", 1).n_free == 0


def test_grouped_conv_after_concat():
    # The grouped conv's positional units span both Concat inputs (a feeds group 0, b group 1).
    m = model(
        """
        g (float[1,3,6,6] x) => (float[1,4,6,6] y) {
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          b = Conv <pads=[1,1,1,1]> (x, wb, bb)
          c = Concat <axis=1> (a, b)
          d = Conv <group=2, pads=[1,1,1,1]> (c, wg, bg)
          y = Conv <pads=[1,1,1,1]> (d, w2, b2)
        }""",
        w1=(4, 3, 3, 3), b1=(4,), wb=(4, 3, 3, 3), bb=(4,), wg=(8, 4, 3, 3), bg=(8,), w2=(4, 8, 3, 3), b2=(4,),
    )
    res = prune_and_check(m, sliced={"w1": 0, "wb": 0, "wg": 1})
    assert kept_of(res, "w1", 0) == kept_of(res, "wb", 0) == kept_of(res, "wg", 1)


def test_depthwise_after_grouped_conv():
    m = model(
        """
        g (float[1,3,6,6] x) => (float[1,4,6,6] y) {
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          d = Conv <group=2, pads=[1,1,1,1]> (a, wg, bg)
          e = Conv <group=8, pads=[1,1,1,1]> (d, wd, bd)
          y = Conv <pads=[1,1,1,1]> (e, w2, b2)
        }""",
        w1=(8, 3, 3, 3), b1=(8,), wg=(8, 4, 3, 3), bg=(8,), wd=(8, 1, 3, 3), bd=(8,), w2=(4, 8, 3, 3), b2=(4,),
    )
    res = prune_and_check(m, sliced={"wg": 0, "wd": 0, "w2": 1})
    assert node_of(res, "e").attributes["group"].value == res.model.graph.initializers["wd"].shape[0]
    assert node_of(res, "d").attributes["group"].value == 2


def test_conv_transpose_depthwise_multiplier_one():
    m = model(
        """
        g (float[1,3,5,5] x) => (float[1,4,10,10] y) {
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          t = ConvTranspose <strides=[2,2], kernel_shape=[2,2], group=8> (a, wt, bt)
          y = Conv <pads=[1,1,1,1]> (t, w2, b2)
        }""",
        w1=(8, 3, 3, 3), b1=(8,), wt=(8, 1, 2, 2), bt=(8,), w2=(4, 8, 3, 3), b2=(4,),
    )
    res = prune_and_check(m, sliced={"w1": 0, "wt": 0, "bt": 0, "w2": 1})
    assert node_of(res, "t").attributes["group"].value == len(kept_of(res, "w1", 0))
