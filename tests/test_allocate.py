"""Allocation: ``round_to`` holds for every layer's kept count, not only per group."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.numpy_helper
import onnx.parser
import pytest

import spa
from spa.allocate import allocate

_CONCAT = """
<ir_version: 10, opset_import: ["" : 17]>
g (float[1,3,8,8] x) => (float[1,4,8,8] y) {
  a = Conv <pads=[1,1,1,1]> (x, wa, ba)
  b = Conv <pads=[1,1,1,1]> (x, wb, bb)
  c = Concat <axis=1> (a, b)
  r = Relu (c)
  y = Conv <pads=[1,1,1,1]> (r, wc, bc)
}
"""


def _concat_model(seed: int = 0) -> onnx.ModelProto:
    proto = onnx.parser.parse_model(_CONCAT)
    rng = np.random.default_rng(seed)
    shapes = {"wa": (32, 3, 3, 3), "ba": (32,), "wb": (16, 3, 3, 3), "bb": (16,), "wc": (4, 48, 3, 3), "bc": (4,)}
    for name, shape in shapes.items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name))
    onnx.checker.check_model(proto)
    return proto


@pytest.mark.parametrize("allocation", ["uniform", "global"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_round_to_holds_for_every_conv_behind_a_concat(allocation: str, seed: int) -> None:
    res = spa.prune(_concat_model(seed), ratio=0.6, round_to=8, allocation=allocation, benchmark=False)
    assert res.report.oracle["passed"] and res.report.oracle["asserted"], res.report.oracle
    inits = res.model.graph.initializers
    kept_a, kept_b = inits["wa"].shape[0], inits["wb"].shape[0]
    assert kept_a < 32 or kept_b < 16, "nothing was pruned"
    assert kept_a % 8 == 0 and kept_b % 8 == 0, (kept_a, kept_b)
    assert inits["wc"].shape[1] == kept_a + kept_b
    # Rounding keeps more, never fewer: at least 1 - ratio of the 48 channels stay.
    assert kept_a + kept_b >= 0.4 * 48


def test_rounding_gives_units_back_and_exempts_small_layers() -> None:
    analysis = spa.analyze(_concat_model())
    (group,) = [g for g in analysis.channels.groups if g.prunable]
    scores = {group.id: np.arange(group.n_units, dtype=np.float64)}
    plain = allocate([group], scores, ratio=0.6)[group.id]
    rounded = allocate([group], scores, ratio=0.6, round_to=8)[group.id]
    assert set(rounded) <= set(plain)  # only units given back
    wa, wb = (next(d for d in group.dims if d.value == w and d.axis == 0) for w in ("wa", "wb"))
    for dim, size in ((wa, 32), (wb, 16)):
        kept = size - int(np.isin(group.unit_of[dim], rounded).sum())
        assert kept % 8 == 0 and kept > 0
    # A layer smaller than round_to is left to min_keep; the larger one is whole or rounded.
    low_b = {group.id: -np.arange(group.n_units, dtype=np.float64)}  # wb's units score lowest
    r32 = allocate([group], low_b, ratio=0.6, round_to=32)[group.id]
    assert 32 - int(np.isin(group.unit_of[wa], r32).sum()) == 32
    assert 16 - int(np.isin(group.unit_of[wb], r32).sum()) == 2  # min_keep 0.1 of 16, not rounded
