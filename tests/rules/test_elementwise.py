"""Element-wise ops: residual adds, per-channel and scalar constants, PRelu, every unary op, Where, Sum/Max."""

from __future__ import annotations

import functools

import numpy as np
import onnx.defs
import pytest

from spa import io as spa_io
from spa.rules.elementwise import UNARY_OPS

from ._graphs import group_of, kept_of, model, prune_and_check

_CONVS = dict(w1=(8, 3, 3, 3), b1=(8,), w2=(4, 8, 3, 3), b2=(4,))


def _sandwich(body: str, *, opset: int = 17, **inits) -> object:
    """x → Conv(w1) → a → <body: a … → v> → Conv(w2) → y: w1's channels flow through ``body``."""
    return model(
        f"""
        g (float[1,3,6,6] x) => (float[1,4,6,6] y) {{
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          {body}
          y = Conv <pads=[1,1,1,1]> (v, w2, b2)
        }}""",
        opset=opset,
        **_CONVS,
        **inits,
    )


def test_residual_add_prunes_both_branches_identically():
    m = model(
        """
        g (float[1,3,6,6] x) => (float[1,4,6,6] y) {
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          r = Relu(a)
          b = Conv <pads=[1,1,1,1]> (r, wb, bb)
          c = Add(a, b)
          y = Conv <pads=[1,1,1,1]> (c, w2, b2)
        }""",
        **_CONVS, wb=(8, 8, 3, 3), bb=(8,),
    )
    res = prune_and_check(m, sliced={"w1": 0, "wb": (0, 1), "bb": 0, "w2": 1})
    assert kept_of(res, "w1", 0) == kept_of(res, "wb", 0) == kept_of(res, "wb", 1) == kept_of(res, "w2", 1)


@pytest.mark.parametrize("op", ["Mul", "Add", "Sub", "Div"])
def test_per_channel_constant_is_sliced(op):
    d = np.random.default_rng(3).uniform(0.5, 2.0, (1, 8, 1, 1)).astype(np.float32)
    m = _sandwich(f"v = {op}(a, d)", d=d)
    res = prune_and_check(m, sliced={"w1": 0, "d": 1, "w2": 1})
    assert kept_of(res, "d", 1) == kept_of(res, "w1", 0)


def test_per_channel_constant_first_operand():
    m = _sandwich("v = Sub(d, a)", d=(1, 8, 1, 1))
    prune_and_check(m, sliced={"w1": 0, "d": 1, "w2": 1})


@pytest.mark.parametrize("op", ["Mul", "Add"])
@pytest.mark.parametrize("shape", [(), (1,), (1, 1, 1, 1)], ids=["scalar", "[1]", "[1,1,1,1]"])
def test_scalar_constant_is_kept(op, shape):
    m = _sandwich(f"v = {op}(a, s)", s=np.full(shape, 0.7, np.float32))
    res = prune_and_check(m, sliced={"w1": 0, "w2": 1})
    assert res.model.graph.initializers["s"].shape == shape


def test_prelu_per_channel_slope():
    m = _sandwich("v = PRelu(a, slope)", slope=(8, 1, 1))
    res = prune_and_check(m, sliced={"w1": 0, "slope": 0, "w2": 1})
    assert kept_of(res, "slope", 0) == kept_of(res, "w1", 0)


def test_prelu_shared_slope_is_kept():
    m = _sandwich("v = PRelu(a, slope)", slope=np.array([0.2], np.float32))
    prune_and_check(m, sliced={"w1": 0, "w2": 1}, kept={"slope": 0})


@functools.cache
def _first_opset(op: str) -> int:
    return min(s.since_version for s in onnx.defs.get_all_schemas_with_history() if s.name == op and s.domain == "")


# How each unary op is fed and read back as float (domains kept finite so a removed channel
# never turns into a NaN that zero-masking cannot hide). ``u`` is Sigmoid(a), in (0, 1).
_UNARY_BODY = {
    "Acosh": "p = Add(u, one)\n v = Acosh(p)",
    "Clip": "v = Clip(u, lo, hi)",
    "Not": "bm = Greater(u, half)\n nb = Not(bm)\n v = Cast <to=1> (nb)",
    "IsNaN": "bm = IsNaN(u)\n c = Cast <to=1> (bm)\n v = Add(u, c)",
    "IsInf": "bm = IsInf(u)\n c = Cast <to=1> (bm)\n v = Add(u, c)",
    "BitwiseNot": "i = Cast <to=6> (a)\n n = BitwiseNot(i)\n v = Cast <to=1> (n)",
    "Cast": "d = Cast <to=11> (u)\n v = Cast <to=1> (d)",
    "CastLike": "d = CastLike(u, like)\n v = Cast <to=1> (d)",
    "Dropout": "v, mask = Dropout(u)",
}
_UNARY_INITS = {
    "Acosh": dict(one=np.array(1.5, np.float32)),
    "Clip": dict(lo=np.array(0.2, np.float32), hi=np.array(0.8, np.float32)),
    "Not": dict(half=np.array(0.5, np.float32)),
    "CastLike": dict(like=np.array(0.0, np.float64)),
}


@pytest.mark.parametrize("op", UNARY_OPS)
def test_unary(op):
    opset = max(17, _first_opset(op))
    if opset not in spa_io.SUPPORTED_OPSETS:
        pytest.skip(f"{op} first appears at opset {opset}, outside spa.io.SUPPORTED_OPSETS")
    body = _UNARY_BODY.get(op, f"v = {op}(u)")
    m = _sandwich(f"u = Sigmoid(a)\n {body}", opset=opset, **_UNARY_INITS.get(op, {}))
    prune_and_check(m, sliced={"w1": 0, "w2": 1})


def test_where_with_per_channel_and_scalar_branches():
    m = _sandwich(
        "c = Greater(a, zero)\n v = Where(c, a, d)",
        zero=np.array(0.0, np.float32), d=(1, 8, 1, 1),
    )
    res = prune_and_check(m, sliced={"w1": 0, "d": 1, "w2": 1})
    assert res.model.graph.initializers["zero"].shape == ()


@pytest.mark.parametrize("op", ["Sum", "Max", "Min", "Mean"])
def test_variadic_of_three_branches(op):
    m = model(
        f"""
        g (float[1,3,6,6] x) => (float[1,4,6,6] y) {{
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          b = Conv <pads=[1,1,1,1]> (x, wb, bb)
          c = Conv <pads=[1,1,1,1]> (x, wc, bc)
          v = {op}(a, b, c)
          y = Conv <pads=[1,1,1,1]> (v, w2, b2)
        }}""",
        **_CONVS, wb=(8, 3, 3, 3), bb=(8,), wc=(8, 3, 3, 3), bc=(8,),
    )
    assert group_of(m, "a", 1).id == group_of(m, "c", 1).id
    res = prune_and_check(m, sliced={"w1": 0, "wb": 0, "wc": 0, "w2": 1})
    assert kept_of(res, "w1", 0) == kept_of(res, "wb", 0) == kept_of(res, "wc", 0)


@pytest.mark.parametrize("gate", ["Sigmoid", "HardSigmoid"])
def test_squeeze_excite_gate(gate):
    # MobileNetV3 / PaddleOCR SE block: the gate's channels and the gated conv's are one space.
    m = model(
        f"""
        g (float[1,3,6,6] x) => (float[1,4,6,6] y) {{
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          p = GlobalAveragePool (a)
          q = Conv (p, wr, br)
          r = Relu(q)
          e = Conv (r, we, be)
          s = {gate}(e)
          v = Mul(a, s)
          y = Conv <pads=[1,1,1,1]> (v, w2, b2)
        }}""",
        **_CONVS, wr=(4, 8, 1, 1), br=(4,), we=(8, 4, 1, 1), be=(8,),
    )
    res = prune_and_check(m, sliced={"w1": 0, "wr": 1, "we": 0, "be": 0, "w2": 1})
    assert kept_of(res, "w1", 0) == kept_of(res, "we", 0) == kept_of(res, "wr", 1)


def test_add_with_graph_input_freezes_the_group():
    m = model(
        """
        g (float[1,3,6,6] x, float[1,8,6,6] z) => (float[1,4,6,6] y) {
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          v = Add(a, z)
          y = Conv <pads=[1,1,1,1]> (v, w2, b2)
        }""",
        **_CONVS,
    )
    assert group_of(m, "a", 1).n_free == 0
