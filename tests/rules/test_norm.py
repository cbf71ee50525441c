"""Normalizations: BatchNorm, InstanceNorm, GroupNorm (opset 18 and 21), LayerNorm, LRN."""

from __future__ import annotations

import numpy as np
import pytest

from spa.rules.base import BlockCode

from ._graphs import group_codes, group_of, kept_of, model, node_of, prune_and_check

RNG = np.random.default_rng(1)


def _positive(n: int) -> np.ndarray:
    return RNG.uniform(0.5, 2.0, n).astype(np.float32)


def test_batchnorm_after_conv():
    m = model(
        """
        g (float[1,3,6,6] x) => (float[1,4,6,6] y) {
          a = Conv <pads=[1,1,1,1]> (x, w1)
          n = BatchNormalization <epsilon=1e-5> (a, s, bias, mean, var)
          r = Relu(n)
          y = Conv <pads=[1,1,1,1]> (r, w2, b2)
        }""",
        w1=(8, 3, 3, 3), s=(8,), bias=(8,), mean=(8,), var=_positive(8), w2=(4, 8, 3, 3), b2=(4,),
    )
    res = prune_and_check(m, sliced={"w1": 0, "s": 0, "bias": 0, "mean": 0, "var": 0, "w2": 1})
    assert kept_of(res, "w1", 0) == kept_of(res, "var", 0) == kept_of(res, "w2", 1)


def test_instancenorm():
    m = model(
        """
        g (float[1,3,6,6] x) => (float[1,4,6,6] y) {
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          n = InstanceNormalization (a, s, bias)
          r = Relu(n)
          y = Conv <pads=[1,1,1,1]> (r, w2, b2)
        }""",
        w1=(8, 3, 3, 3), b1=(8,), s=(8,), bias=(8,), w2=(4, 8, 3, 3), b2=(4,),
    )
    prune_and_check(m, sliced={"w1": 0, "s": 0, "bias": 0, "w2": 1})


_GN = """
g (float[1,3,6,6] x) => (float[1,4,6,6] y) {value_info}{{
  a = Conv <pads=[1,1,1,1]> (x, w1, b1)
  n = GroupNormalization <num_groups=4, epsilon=1e-5> (a, s, bias)
  r = Relu(n)
  y = Conv <pads=[1,1,1,1]> (r, w2, b2)
}}"""


def _groupnorm(opset: int, param: int, value_info: str = "<float[1,8,6,6] n>"):
    # 8 channels in 4 groups of 2. onnx's shape inference does not shape GroupNormalization
    # outputs, so the graph states n's shape (as exporters do in value_info).
    return model(
        _GN.format(value_info=value_info),
        opset=opset,
        check=opset != 18,  # the ONNX checker refuses the deprecated GroupNormalization-18
        w1=(8, 3, 3, 3), b1=(8,), s=(param,), bias=(param,), w2=(4, 8, 3, 3), b2=(4,),
    )


@pytest.mark.parametrize("opset, param", [(21, 8), (18, 4)], ids=["opset21-per-channel", "opset18-per-group"])
def test_groupnorm_removes_whole_groups(opset, param):
    m = _groupnorm(opset, param)
    assert group_of(m, "a", 1).n_units == 4
    res = prune_and_check(m, sliced={"w1": 0, "s": 0, "bias": 0, "w2": 1}, own_oracle=opset == 18)
    kept = kept_of(res, "w1", 0)
    groups = sorted({k // 2 for k in kept})
    assert kept == [2 * gi + t for gi in groups for t in range(2)]  # whole groups only
    assert node_of(res, "n").attributes["num_groups"].value == len(groups)
    expected_param = kept if param == 8 else groups
    assert kept_of(res, "s", 0) == expected_param


def test_groupnorm_with_unshaped_output_still_prunes_whole_groups():
    # onnx leaves GroupNormalization outputs unshaped; canonicalize gives them the input's
    # shape, so whole groups still go and the consumers follow.
    m = _groupnorm(21, 8, value_info="")
    assert group_of(m, "a", 1).n_units == 4
    res = prune_and_check(m, sliced={"w1": 0, "s": 0, "bias": 0, "w2": 1})
    kept = kept_of(res, "w1", 0)
    assert kept == [2 * gi + t for gi in sorted({k // 2 for k in kept}) for t in range(2)]


def test_layernorm_over_channels_blocks():
    m = model(
        """
        g (float[2,5] x) => (float[2,3] y) {
          h = Gemm <transB=1> (x, w1, b1)
          n = LayerNormalization <axis=-1> (h, s, bias)
          y = Gemm <transB=1> (n, w2, b2)
        }""",
        w1=(8, 5), b1=(8,), s=(8,), bias=(8,), w2=(3, 8), b2=(3,),
    )
    assert BlockCode.CHANNEL_MIXING in group_codes(m, "h", 1)
    assert group_of(m, "h", 1).n_free == 0


def test_layernorm_over_spatial_axes_keeps_channels():
    # Normalizing over the last axis of [N, C, L] leaves the channel axis prunable.
    m = model(
        """
        g (float[1,3,6] x) => (float[1,4,6] y) {
          a = Conv <pads=[1,1]> (x, w1, b1)
          n = LayerNormalization <axis=-1> (a, s, bias)
          y = Conv <pads=[1,1]> (n, w2, b2)
        }""",
        w1=(8, 3, 3), b1=(8,), s=(6,), bias=(6,), w2=(4, 8, 3), b2=(4,),
    )
    prune_and_check(m, sliced={"w1": 0, "w2": 1}, kept={"s": 0})


def test_lrn_blocks():
    m = model(
        """
        g (float[1,3,6,6] x) => (float[1,4,6,6] y) {
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          n = LRN <size=3> (a)
          y = Conv <pads=[1,1,1,1]> (n, w2, b2)
        }""",
        w1=(8, 3, 3, 3), b1=(8,), w2=(4, 8, 3, 3), b2=(4,),
    )
    assert BlockCode.CHANNEL_MIXING in group_codes(m, "a", 1)
    assert group_of(m, "a", 1).n_free == 0


def test_instancenorm_over_channels_moved_into_space_is_blocked():
    # GroupNorm(1 group) as timm's ShViT writes it: [1, C, 1, 1] → [1, 1, C] → InstanceNorm
    # (normalizes over the last axis, i.e. over the channels) → back. Removing a channel would
    # change the statistics of all the others: the channels must stay (caught in the zoo).
    m = model(
        """
        g (float[1,3,1,1] x) => (float[1,4,1,1] y) {
          a = Conv (x, w1, b1)
          r = Reshape (a, s1)
          n = InstanceNormalization (r, sc, bi)
          b = Reshape (n, s2)
          y = Conv (b, w2, b2)
        }""",
        w1=(8, 3, 1, 1), b1=(8,), sc=(1,), bi=(1,), w2=(4, 8, 1, 1), b2=(4,),
        s1=np.array([1, 1, 8], np.int64), s2=np.array([1, 8, 1, 1], np.int64),
    )
    assert BlockCode.CHANNEL_MIXING in group_codes(m, "a", 1)
    assert group_of(m, "a", 1).n_free == 0
