"""Concat, Split and Slice along the channel axis: offsets, ranges, rewritten sizes."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from spa.rules.base import BlockCode

from ._graphs import const_input, group_codes, group_of, kept_of, model, node_of, prune_and_check


def _i64(*v: int) -> np.ndarray:
    return np.array(v, np.int64)


def test_concat_densenet():
    m = model(
        """
        g (float[1,3,6,6] x) => (float[1,4,6,6] y) {
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          r = Relu(a)
          b = Conv <pads=[1,1,1,1]> (r, w2, b2)
          c = Concat <axis=1> (a, b)
          s = Relu(c)
          y = Conv <pads=[1,1,1,1]> (s, w3, b3)
        }""",
        w1=(6, 3, 3, 3), b1=(6,), w2=(4, 6, 3, 3), b2=(4,), w3=(4, 10, 3, 3), b3=(4,),
    )
    # One group of 6 + 4 units (the Concat output holds both): the budget is shared.
    assert group_of(m, "c", 1).n_units == 10
    res = prune_and_check(m, sliced={"w3": 1})
    ka = kept_of(res, "w1", 0) or list(range(6))
    kb = kept_of(res, "w2", 0) or list(range(4))
    assert kept_of(res, "w3", 1) == ka + [6 + i for i in kb]
    assert (kept_of(res, "w2", 1) or list(range(6))) == ka


def test_concat_with_graph_input_freezes_only_its_part():
    m = model(
        """
        g (float[1,3,6,6] x) => (float[1,4,6,6] y) {
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          r = Relu(a)
          c = Concat <axis=1> (x, r)
          y = Conv <pads=[1,1,1,1]> (c, w3, b3)
        }""",
        w1=(8, 3, 3, 3), b1=(8,), w3=(4, 11, 3, 3), b3=(4,),
    )
    g = group_of(m, "c", 1)
    assert BlockCode.GRAPH_IO in {r.code for r in g.reasons}
    assert g.n_free == 8 and g.frozen.sum() == 3  # x's three channels are frozen, a's are not
    res = prune_and_check(m, sliced={"w1": 0, "w3": 1})
    ka = kept_of(res, "w1", 0)
    assert kept_of(res, "w3", 1) == [0, 1, 2] + [3 + i for i in ka]


def _split_model(opset: int, split: str, inits: dict, out_a: int, out_b: int):
    return model(
        f"""
        g (float[1,3,6,6] x) => (float[1,2,6,6] ya, float[1,2,6,6] yb) {{
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          {split}
          ya = Conv <pads=[1,1,1,1]> (s1, wa)
          yb = Conv <pads=[1,1,1,1]> (s2, wb)
        }}""",
        opset=opset,
        w1=(8, 3, 3, 3), b1=(8,), wa=(2, out_a, 3, 3), wb=(2, out_b, 3, 3),
        **inits,
    )


@pytest.mark.parametrize(
    "opset, split, inits, sizes",
    [
        (11, "s1, s2 = Split <axis=1, split=[3,5]> (a)", {}, (3, 5)),
        (13, "s1, s2 = Split <axis=1> (a, sp)", dict(sp=_i64(3, 5)), (3, 5)),
        (13, "s1, s2 = Split <axis=1> (a)", {}, (4, 4)),
        (18, "s1, s2 = Split <axis=1, num_outputs=2> (a)", {}, (4, 4)),
    ],
    ids=["opset11-attr", "opset13-input", "opset13-equal", "opset18-num_outputs"],
)
def test_split_rewrites_sizes(opset, split, inits, sizes):
    m = _split_model(opset, split, inits, *sizes)
    res = prune_and_check(m, sliced={"w1": 0})
    kept = np.asarray(kept_of(res, "w1", 0))
    new = [int((kept < sizes[0]).sum()), int((kept >= sizes[0]).sum())]
    assert res.model.graph.initializers["wa"].shape[1] == new[0]
    assert res.model.graph.initializers["wb"].shape[1] == new[1]
    node = node_of(res, "s1")
    if opset == 11:
        assert list(node.attributes["split"].value) == new
    else:
        assert const_input(res, "s1", 1) == new
        assert "num_outputs" not in node.attributes


def test_slice_channel_range_rewrites_starts_ends():
    m = model(
        """
        g (float[1,3,6,6] x) => (float[1,4,6,6] y) {
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          s = Slice (a, starts, ends, axes)
          y = Conv <pads=[1,1,1,1]> (s, w2, b2)
        }""",
        w1=(8, 3, 3, 3), b1=(8,), w2=(4, 4, 3, 3), b2=(4,),
        starts=_i64(2), ends=_i64(6), axes=_i64(1),
    )
    res = prune_and_check(m, ratio=0.6, sliced={"w1": 0})
    kept = kept_of(res, "w1", 0)
    inside = [k for k in kept if 2 <= k < 6]
    assert kept_of(res, "w2", 1) in ([k - 2 for k in inside], None)
    lo = sum(1 for k in kept if k < 2)
    assert const_input(res, "s", 1) == [lo]
    assert const_input(res, "s", 2) == [lo + len(inside)]


def test_slice_to_the_end_and_negative_start():
    m = model(
        """
        g (float[1,3,6,6] x) => (float[1,4,6,6] y) {
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          s = Slice (a, starts, ends, axes)
          y = Conv <pads=[1,1,1,1]> (s, w2, b2)
        }""",
        w1=(8, 3, 3, 3), b1=(8,), w2=(4, 5, 3, 3), b2=(4,),
        starts=_i64(-5), ends=_i64(np.iinfo(np.int64).max), axes=_i64(1),
    )
    prune_and_check(m, ratio=0.5, sliced={"w1": 0})


def test_slice_spatial_passes_channels():
    m = model(
        """
        g (float[1,3,6,6] x) => (float[1,4,4,6] y) {
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          s = Slice (a, starts, ends, axes)
          y = Conv <pads=[1,1,1,1]> (s, w2, b2)
        }""",
        w1=(8, 3, 3, 3), b1=(8,), w2=(4, 8, 3, 3), b2=(4,),
        starts=_i64(1), ends=_i64(5), axes=_i64(2),
    )
    res = prune_and_check(m, sliced={"w1": 0, "w2": 1})
    assert const_input(res, "s", 1) == [1] and const_input(res, "s", 2) == [5]


def test_strided_slice_on_channels_blocks():
    m = model(
        """
        g (float[1,3,6,6] x) => (float[1,4,6,6] y) {
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          s = Slice (a, starts, ends, axes, steps)
          y = Conv <pads=[1,1,1,1]> (s, w2, b2)
        }""",
        w1=(8, 3, 3, 3), b1=(8,), w2=(4, 4, 3, 3), b2=(4,),
        starts=_i64(0), ends=_i64(8), axes=_i64(1), steps=_i64(2),
    )
    assert BlockCode.UNMAPPED_AXIS in group_codes(m, "a", 1)
    assert group_of(m, "a", 1).n_free == 0


def test_concat_of_a_tensor_with_itself():
    # cat([a, a]): channel i appears twice; removing it removes both copies (Torch-Pruning #146).
    m = model(
        """
        g (float[1,3,6,6] x) => (float[1,4,6,6] y) {
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          c = Concat <axis=1> (a, a)
          y = Conv <pads=[1,1,1,1]> (c, w3, b3)
        }""",
        w1=(8, 3, 3, 3), b1=(8,), w3=(4, 16, 3, 3), b3=(4,),
    )
    assert group_of(m, "a", 1).n_units == 8
    res = prune_and_check(m, sliced={"w1": 0, "w3": 1})
    ka = kept_of(res, "w1", 0)
    assert kept_of(res, "w3", 1) == ka + [8 + i for i in ka]


def test_concat_on_spatial_axis_couples_channels():
    m = model(
        """
        g (float[1,3,6,6] x) => (float[1,4,12,6] y) {
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          b = Conv <pads=[1,1,1,1]> (x, wb, bb)
          c = Concat <axis=-2> (a, b)
          y = Conv <pads=[1,1,1,1]> (c, w3, b3)
        }""",
        w1=(8, 3, 3, 3), b1=(8,), wb=(8, 3, 3, 3), bb=(8,), w3=(4, 8, 3, 3), b3=(4,),
    )
    res = prune_and_check(m, sliced={"w1": 0, "wb": 0, "w3": 1})
    assert kept_of(res, "w1", 0) == kept_of(res, "wb", 0)


def test_split_with_a_graph_output_part_freezes_only_that_part():
    m = model(
        """
        g (float[1,3,6,6] x) => (float[1,3,6,6] s1, float[1,2,6,6] yb) {
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          s1, s2 = Split <axis=1> (a, sp)
          yb = Conv <pads=[1,1,1,1]> (s2, wb)
        }""",
        opset=13, w1=(8, 3, 3, 3), b1=(8,), wb=(2, 5, 3, 3), sp=_i64(3, 5),
    )
    g = group_of(m, "a", 1)
    assert g.frozen.sum() == 3 and g.n_free == 5
    res = prune_and_check(m, sliced={"w1": 0, "wb": 1})
    assert all(k in kept_of(res, "w1", 0) for k in (0, 1, 2))
    assert const_input(res, "s1", 1)[0] == 3


def test_slice_without_axes_input():
    # axes omitted: starts/ends cover axes 0 and 1 in order.
    m = model(
        """
        g (float[1,3,6,6] x) => (float[1,4,6,6] y) {
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          s = Slice (a, starts, ends)
          y = Conv <pads=[1,1,1,1]> (s, w2, b2)
        }""",
        w1=(8, 3, 3, 3), b1=(8,), w2=(4, 5, 3, 3), b2=(4,),
        starts=_i64(0, 1), ends=_i64(1, 6),
    )
    res = prune_and_check(m, ratio=0.5, sliced={"w1": 0})
    kept = kept_of(res, "w1", 0)
    lo = sum(1 for k in kept if k < 1)
    assert const_input(res, "s", 1) == [0, lo]
    assert const_input(res, "s", 2) == [1, lo + sum(1 for k in kept if 1 <= k < 6)]


def test_slice_constants_shared_with_a_frozen_slice():
    m = model(
        """
        g (float[1,3,6,6] x, float[1,8,6,6] z) => (float[1,4,6,6] y, float[1,4,6,6] zz) {
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          s = Slice (a, starts, ends, axes)
          y = Conv <pads=[1,1,1,1]> (s, w2, b2)
          zz = Slice (z, starts, ends, axes)
        }""",
        w1=(8, 3, 3, 3), b1=(8,), w2=(4, 4, 3, 3), b2=(4,), starts=_i64(2), ends=_i64(6), axes=_i64(1),
    )
    res = prune_and_check(m, ratio=0.6, sliced={"w1": 0})
    assert const_input(res, "zz", 1) == [2] and const_input(res, "zz", 2) == [6]


def test_split_num_outputs_uneven():
    # opset 18: 7 channels in 2 outputs → [4, 3].
    m = model(
        """
        g (float[1,3,6,6] x) => (float[1,2,6,6] ya, float[1,2,6,6] yb) {
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          s1, s2 = Split <axis=1, num_outputs=2> (a)
          ya = Conv <pads=[1,1,1,1]> (s1, wa)
          yb = Conv <pads=[1,1,1,1]> (s2, wb)
        }""",
        opset=18, w1=(7, 3, 3, 3), b1=(7,), wa=(2, 4, 3, 3), wb=(2, 3, 3, 3),
    )
    res = prune_and_check(m, sliced={"w1": 0})
    kept = np.asarray(kept_of(res, "w1", 0))
    assert const_input(res, "s1", 1) == [int((kept < 4).sum()), int((kept >= 4).sum())]


def test_split_rewrite_reads_the_opset_spelled_ai_onnx():
    """Regression: a model importing the default domain as "ai.onnx" (opset 17) got the split
    sizes written as an attribute (the opset-11 form) and failed verification."""
    text = _split_model(13, "s1, s2 = Split <axis=1> (a, sp)", dict(sp=_i64(3, 5)), 3, 5)
    del text.opset_import[:]
    text.opset_import.add(domain="ai.onnx", version=17)
    res = prune_and_check(text, sliced={"w1": 0})
    assert {o.domain: o.version for o in ir.to_proto(res.model).opset_import} == {"ai.onnx": 17}
    kept = np.asarray(kept_of(res, "w1", 0))
    new = [int((kept < 3).sum()), int((kept >= 3).sum())]
    assert const_input(res, "s1", 1) == new
    assert "split" not in node_of(res, "s1").attributes
