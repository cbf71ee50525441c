"""The mask-equivalence oracle itself: a correct plan passes, a corrupted one must fail.

DESIGN.md, "The test oracle": a deliberately wrong slice must fail it; ratio 0 leaves every
tensor byte-identical.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnx.numpy_helper
import onnx.parser
import pytest

import spa
from spa.passes.prune import PrunePass
from spa.planning import Plan, build_plan
from spa.rules.base import AttrRewrite, ConstRewrite, Dim


def _model() -> onnx.ModelProto:
    """conv → BN → relu → depthwise conv → slice → conv: OUT, IN, PARAM axes and rewrites."""
    proto = onnx.parser.parse_model(
        """
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[1,3,6,6] x) => (float[1,4,6,6] y) {
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          n = BatchNormalization (a, s, bias, mean, var)
          r = Relu(n)
          d = Conv <group=8, pads=[1,1,1,1]> (r, wd, bd)
          e = Relu(d)
          c = Slice (e, starts, ends, axes)
          y = Conv <pads=[1,1,1,1]> (c, w2, b2)
        }"""
    )
    rng = np.random.default_rng(0)
    arrays = {
        "w1": rng.standard_normal((8, 3, 3, 3)),
        "b1": rng.standard_normal(8),
        "s": rng.standard_normal(8),
        "bias": rng.standard_normal(8),
        "mean": rng.standard_normal(8),
        "var": rng.uniform(0.5, 2, 8),
        "wd": rng.standard_normal((8, 1, 3, 3)),
        "bd": rng.standard_normal(8),
        "w2": rng.standard_normal((4, 6, 3, 3)),
        "b2": rng.standard_normal(4),
    }
    for name, arr in arrays.items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(arr.astype(np.float32), name))
    for name, v in {"starts": [1], "ends": [7], "axes": [1]}.items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(np.array(v, np.int64), name))
    return proto


def _plan(proto: onnx.ModelProto, ratio: float = 0.5) -> tuple[Plan, spa.PruneOptions]:
    options = spa.PruneOptions(ratio=ratio, benchmark=False)
    return spa.plan(proto, options=options), options


def _execute(proto: onnx.ModelProto, plan: Plan, options: spa.PruneOptions) -> spa.PruneResult:
    return spa.apply(proto, plan, options=options)


def _edit(plan: Plan, name: str):
    return next(t for t in plan.tensors if t.name == name)


def _other_subset(kept: list[int], size: int) -> list[int]:
    """An ascending index set of the same length as ``kept`` that differs from it."""
    removed = [i for i in range(size) if i not in kept]
    assert removed, "nothing was removed on this axis"
    return sorted(kept[1:] + removed[:1])


def test_correct_plan_passes():
    proto = _model()
    plan, options = _plan(proto)
    assert not plan.empty
    res = _execute(proto, plan, options)
    assert res.report.oracle["passed"] and res.report.oracle["asserted"]
    assert res.report.groups_pruned >= 1


def test_plan_json_round_trip_replays_exactly():
    proto = _model()
    plan, options = _plan(proto)
    replay = Plan.from_json(plan.to_json())
    assert replay.to_json() == plan.to_json() and not replay.empty
    res = _execute(proto, replay, options)
    assert res.report.oracle["passed"] and res.report.oracle["asserted"]
    assert res.report.groups_pruned >= 1  # an empty replay would pass the oracle trivially


@pytest.mark.parametrize("name, axis", [("w2", 1), ("w1", 0), ("bd", 0), ("var", 0)], ids=["consumer-in", "producer-out", "depthwise-bias", "bn-param"])
def test_wrong_slice_fails(name, axis):
    proto = _model()
    plan, options = _plan(proto)
    edit = _edit(plan, name)
    edit.kept[axis] = _other_subset(edit.kept[axis], edit.shape[axis])
    with pytest.raises(spa.VerificationError):
        _execute(proto, plan, options)


def _remove_channel_zero(proto: onnx.ModelProto) -> Plan:
    """A hand-made plan: remove only channel 0 of ``a`` (outside the Slice's range [1, 7))."""
    analysis = spa.analyze(proto)
    g = analysis.channels.group_of(Dim("a", 1))
    return build_plan(analysis.model, analysis.channels, {g.id: g.unit_of[Dim("a", 1)][:1]})


def test_hand_made_plan_passes():
    proto = _model()
    res = _execute(proto, _remove_channel_zero(proto), spa.PruneOptions(benchmark=False))
    assert res.report.oracle["passed"]
    assert res.model.graph.initializers["w1"].shape[0] == 7


def test_dropped_slice_rewrite_fails_on_numbers():
    # Removing channel 0 shifts the Slice to [0, 6). Left at [1, 7) it still reads six
    # channels (the shapes agree, ORT runs) but the wrong ones: only the numbers tell.
    proto = _model()
    plan = _remove_channel_zero(proto)
    assert any(isinstance(r, ConstRewrite) for r in plan.rewrites), plan.rewrites
    plan.rewrites = [r for r in plan.rewrites if not isinstance(r, ConstRewrite)]
    with pytest.raises(spa.VerificationError) as err:
        _execute(proto, plan, spa.PruneOptions(benchmark=False))
    assert err.value.max_diff is not None and err.value.max_diff > 0


def test_dropped_group_rewrite_fails():
    # group=8 on fewer channels: the pruned model does not even run, which must fail too.
    proto = _model()
    plan, options = _plan(proto)
    assert any(isinstance(r, AttrRewrite) and r.name == "group" for r in plan.rewrites)
    plan.rewrites = [r for r in plan.rewrites if not (isinstance(r, AttrRewrite) and r.name == "group")]
    with pytest.raises(spa.VerificationError):
        _execute(proto, plan, options)


def test_mask_that_misses_a_consumer_fails():
    # Drop the IN role of the consumer: the reference no longer zeroes the removed columns,
    # so the (correct) pruned model differs from it. The oracle's reference is only as
    # strong as the plan's roles; this checks that a leaking channel is visible.
    proto = _model()
    plan, options = _plan(proto)
    edit = _edit(plan, "w2")
    edit.roles[1] = []
    with pytest.raises(spa.VerificationError):
        _execute(proto, plan, options)


def test_ratio_zero_is_byte_identical():
    proto = _model()
    plan, options = _plan(proto, ratio=0.0)
    assert plan.empty
    analysis = spa.analyze(proto)
    assert PrunePass(plan)(analysis.model).modified is False
    res = spa.prune(copy.deepcopy(proto), ratio=0.0, benchmark=False)
    assert res.report.groups_pruned == 0
    before = {t.name: t for t in proto.graph.initializer}
    after = res.model.graph.initializers
    assert set(after) == set(before)
    for name, t in before.items():
        got, want = after[name].const_value.numpy(), onnx.numpy_helper.to_array(t)
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert got.tobytes() == want.tobytes(), name
