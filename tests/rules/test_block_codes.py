"""Every BlockCode has a graph that triggers it; the analysis and the report both carry the code.

Each trigger is a conv ``a = Conv(x, w1)`` whose channels reach a second conv through the
refusing construct, so without the block the group would be prunable.
"""

from __future__ import annotations

import pathlib

import numpy as np
import onnx
import pytest

import spa
from spa.passes.manager import PassManager
from spa.pipeline import PruneOptions, State, default_steps
from spa.rules.base import BlockCode, Dim

from ._graphs import group_codes, group_of, model

_CONVS = dict(w1=(8, 3, 3, 3), b1=(8,), w2=(4, 8, 3, 3), b2=(4,))


def _no_rule():
    # DepthToSpace has no rule (an op in the default domain; unknown domains are refused at load).
    return model(
        """
        g (float[1,3,6,6] x) => (float[1,4,12,12] y) {
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          d = DepthToSpace <blocksize=2> (a)
          y = Conv <pads=[1,1,1,1]> (d, w2, b2)
        }""",
        w1=(8, 3, 3, 3), b1=(8,), w2=(4, 2, 3, 3), b2=(4,),
    )


def _graph_io():
    return model(
        """
        g (float[1,3,6,6] x) => (float[1,4,6,6] y, float[1,8,6,6] a) {
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          r = Relu(a)
          y = Conv <pads=[1,1,1,1]> (r, w2, b2)
        }""",
        **_CONVS,
    )


def _dynamic_shape():
    # Concat with an input whose channel count is symbolic: the offsets are unknown.
    return model(
        """
        g (float[1,3,6,6] x, float[1,K,6,6] z) => (float[1,4,6,6] y, float[1,L,6,6] c) {
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          y = Conv <pads=[1,1,1,1]> (a, w2, b2)
          c = Concat <axis=1> (a, z)
        }""",
        **_CONVS,
    )


def _data_dependent():
    # The Slice start is a graph input: which channels it keeps is only known at run time.
    return model(
        """
        g (float[1,3,2,2] x, int64[1] st) => (float[1,1,2,2] y) {
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          s = Slice(a, st, en, ax)
          y = ReduceMean <axes=[1]> (s)
        }""",
        w1=(8, 3, 3, 3), b1=(8,), en=np.array([100], np.int64), ax=np.array([1], np.int64),
    )


def _unmapped_axis():
    # Pad on the channel axis: the rule maps only the axes it leaves alone.
    return model(
        """
        g (float[1,3,6,6] x) => (float[1,4,6,6] y) {
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          v = Pad (a, pads)
          y = Conv <pads=[1,1,1,1]> (v, w2, b2)
        }""",
        w1=(8, 3, 3, 3), b1=(8,), w2=(4, 9, 3, 3), b2=(4,),
        pads=np.array([0, 1, 0, 0, 0, 0, 0, 0], np.int64),
    )


def _channel_mixing():
    return model(
        """
        g (float[1,3,6,6] x) => (float[1,4,6,6] y) {
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          v = Softmax <axis=1> (a)
          y = Conv <pads=[1,1,1,1]> (v, w2, b2)
        }""",
        **_CONVS,
    )


def _subgraph():
    # A Loop body adds ``a`` (read from the outer graph) to a loop-carried value: the carried
    # value crosses the body's boundary, which no rule maps (Loop has none).
    return model(
        """
        g (float[1,3,6,6] x) => (float[1,4,6,6] y) {
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          b = Conv <pads=[1,1,1,1]> (x, wb, bb)
          v = Loop (trips, keep_going, b) <
            body = loop_body (int64 i, bool c, float[1,8,6,6] acc) => (bool c_out, float[1,8,6,6] acc_out) {
              c_out = Identity(c)
              acc_out = Add(acc, a)
            }
          >
          y = Conv <pads=[1,1,1,1]> (v, w2, b2)
        }""",
        **_CONVS, wb=(8, 3, 3, 3), bb=(8,),
        trips=np.array(2, np.int64), keep_going=np.array(True),
    )


def _non_constant_weight():
    # A weight computed at run time on one side of a residual Add, a constant one on the other.
    return model(
        """
        g (float[1,3,6,6] x, float s) => (float[1,4,6,6] y) {
          wb = Mul(wraw, s)
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          b = Conv <pads=[1,1,1,1]> (x, wb)
          c = Add(a, b)
          y = Conv <pads=[1,1,1,1]> (c, w2, b2)
        }""",
        **_CONVS, wraw=(8, 3, 3, 3),
    )


def _indivisible():
    return model(
        """
        g (float[1,3,2,2] x) => (float[1,3,5] y) {
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          r = Reshape (a, shp)
          y = MatMul (r, wm)
        }""",
        w1=(6, 3, 3, 3), b1=(6,), wm=(8, 5), shp=np.array([1, 3, 8], np.int64),
    )


def _unsupported_attribute():
    # Blocked quantization (opset 21 block_size) along the consumer weight's input-channel axis.
    return model(
        """
        g (float[1,3,6,6] x) => (float[1,4,6,6] y) {
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          w = DequantizeLinear <axis=1, block_size=2> (wq, ws)
          y = Conv <pads=[1,1,1,1]> (a, w)
        }""",
        opset=21,
        w1=(6, 3, 3, 3), b1=(6,),
        wq=(np.arange(4 * 6 * 9) % 100).astype(np.int8).reshape(4, 6, 3, 3),
        ws=np.full((4, 3, 3, 3), 0.05, np.float32),
    )


def _weight_input():
    # An old (IR<4) file lists its initializers as graph inputs too; --keep-weight-inputs keeps
    # them overridable, so the conv weight is the model's interface.
    proto = model(
        """
        g (float[1,3,6,6] x) => (float[1,4,6,6] y) {
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          r = Relu(a)
          y = Conv <pads=[1,1,1,1]> (r, w2, b2)
        }""",
        **_CONVS,
    )
    w1 = next(t for t in proto.graph.initializer if t.name == "w1")
    proto.graph.input.append(onnx.helper.make_tensor_value_info("w1", w1.data_type, list(w1.dims)))
    return proto


TRIGGERS = {
    BlockCode.NO_RULE: _no_rule,
    BlockCode.GRAPH_IO: _graph_io,
    BlockCode.DYNAMIC_SHAPE: _dynamic_shape,
    BlockCode.DATA_DEPENDENT: _data_dependent,
    BlockCode.UNMAPPED_AXIS: _unmapped_axis,
    BlockCode.CHANNEL_MIXING: _channel_mixing,
    BlockCode.SUBGRAPH: _subgraph,
    BlockCode.NON_CONSTANT_WEIGHT: _non_constant_weight,
    BlockCode.INDIVISIBLE: _indivisible,
    BlockCode.UNSUPPORTED_ATTRIBUTE: _unsupported_attribute,
    BlockCode.WEIGHT_INPUT: _weight_input,
}

#: Options a trigger needs (the default canonicalization would make w1 a plain weight again).
TRIGGER_OPTIONS: dict[BlockCode, dict] = {BlockCode.WEIGHT_INPUT: {"keep_weight_inputs": True}}

#: Codes that no rule or analysis emits yet. A code that starts being emitted must move to
#: TRIGGERS with a graph that triggers it (``test_unemitted_codes_are_really_unused``).
NOT_EMITTED: set[BlockCode] = set()


def test_every_code_has_a_trigger():
    assert set(TRIGGERS) | NOT_EMITTED == set(BlockCode)
    assert not set(TRIGGERS) & NOT_EMITTED


def test_emitted_codes_match_the_sources():
    """Every code with a trigger is emitted somewhere in spa, and no code of NOT_EMITTED is
    (NOT_EMITTED is empty today, so the first half is what this test checks)."""
    root = pathlib.Path(spa.__file__).parent
    sources = "\n".join(p.read_text() for p in root.rglob("*.py") if p != root / "rules" / "base.py")
    for code in BlockCode:
        emitted = f"BlockCode.{code.name}" in sources
        if code in NOT_EMITTED:
            assert not emitted, f"{code} is emitted now: add a trigger to TRIGGERS"
        else:
            assert emitted, f"{code} has a trigger but nothing in spa emits it: move it to NOT_EMITTED"


@pytest.mark.parametrize("code", list(TRIGGERS), ids=lambda c: c.value)
def test_code_is_reported(code):
    m = TRIGGERS[code]()
    options = TRIGGER_OPTIONS.get(code, {})
    g = _analysis(m, **options).channels.group_of(Dim("a", 1)) if options else group_of(m, "a", 1)
    assert g is not None
    assert code in {r.code for r in g.reasons}
    assert g.has_source and g.n_free == 0, "a's channels must be frozen"
    # The pipeline agrees: nothing of w1 is sliced, and the report names the code.
    res = spa.prune(m, ratio=0.5, benchmark=False, **options)
    assert res.model.graph.initializers["w1"].shape[0] == g.n_units
    reported = {r["code"] for b in res.report.blocked if "w1" in b["layers"] for r in b["reasons"]}
    assert code.value in reported


def _analysis(proto, **options):
    """``spa.analyze`` with pipeline options (load → canonicalize → analyze)."""
    state = State(source=proto, options=PruneOptions(**options))
    PassManager(default_steps(mode="plan")[:3]).run(state)
    return state.analysis


def test_weight_input_is_graph_io_without_keep():
    """Without --keep-weight-inputs the same file prunes: w1 is a weight, not an input."""
    res = spa.prune(_weight_input(), ratio=0.5, benchmark=False)
    assert res.model.graph.initializers["w1"].shape[0] == 4
    assert [v.name for v in res.model.graph.inputs] == ["x"]
