"""Edited plans: every invalid field is a PlanError (a UsageError, exit 2) that names it."""

from __future__ import annotations

import copy
import json
import pathlib
from typing import Any

import numpy as np
import onnx
import onnx.numpy_helper
import onnx.parser
import pytest

import spa
from spa.errors import PlanError, UsageError
from spa.planning import PLAN_OPTION_KEYS, PLAN_VERSION, Plan

_TEXT = """
<ir_version: 10, opset_import: ["" : 17]>
g (float[1,3,6,6] x) => (float[1,4,6,6] y) {
  a = Conv <pads=[1,1,1,1]> (x, w1, b1)
  r = Relu (a)
  s1, s2 = Split <axis=1> (r, sp)
  c = Concat <axis=1> (s1, s2)
  y = Conv <pads=[1,1,1,1]> (c, w2, b2)
}
"""


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    proto = onnx.parser.parse_model(_TEXT)
    rng = np.random.default_rng(0)
    for name, shape in {"w1": (8, 3, 3, 3), "b1": (8,), "w2": (4, 8, 3, 3), "b2": (4,)}.items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name))
    proto.graph.initializer.append(onnx.numpy_helper.from_array(np.array([3, 5], np.int64), "sp"))
    plan = spa.plan(proto, ratio=0.5, benchmark=False)
    d = json.loads(plan.dumps())
    assert d["groups"] and d["tensors"] and d["rewrites"], d
    return d


def _edited(doc: dict[str, Any], path: str, value: Any = KeyError) -> dict[str, Any]:
    """``doc`` with the field at ``a.b[0].c`` set to ``value`` (deleted when KeyError)."""
    d = copy.deepcopy(doc)
    *parents, last = path.replace("]", "").replace("[", ".").split(".")
    target: Any = d
    for p in parents:
        target = target[int(p)] if p.isdigit() else target[p]
    key: Any = int(last) if last.isdigit() else last
    if value is KeyError:
        del target[key]
    else:
        target[key] = value
    return d


def test_a_valid_plan_reads_back(doc) -> None:
    plan = Plan.from_json(doc)
    assert plan.to_json() == doc


def test_plan_options_are_the_prune_options_a_plan_records() -> None:
    assert tuple(spa.PruneOptions().plan_options()) == PLAN_OPTION_KEYS


@pytest.mark.parametrize(
    "path, value, words",
    [
        ("version", KeyError, "version is missing"),
        ("version", PLAN_VERSION + 1, f"version {PLAN_VERSION + 1} is not supported"),
        ("groups", KeyError, "groups is missing"),
        ("groups", {}, "groups must be a list"),
        ("groups[0].removed", KeyError, "groups[0].removed is missing"),
        ("groups[0].removed", [1, 0], "groups[0].removed must be ascending"),
        ("groups[0].removed", [999], "groups[0].removed[0] = 999 is out of range"),
        ("groups[0].removed", ["1"], "groups[0].removed[0] must be an integer"),
        ("groups[0].units", -1, "groups[0].units must be an integer ≥ 0"),
        ("groups[0].id", 3, "groups[0].id must be a string"),
        ("groups[0].scores", "high", "groups[0].scores must be null or a list"),
        ("tensors[0].name", KeyError, "tensors[0].name is missing"),
        ("tensors[0].shape", [8, "3"], "tensors[0].shape[1] must be an integer"),
        ("tensors[0].axes[0].axis", 9, "tensors[0].axes[0].axis = 9 is out of range"),
        ("tensors[0].axes[0].kept", [99], "tensors[0].axes[0].kept[0] = 99 is out of range"),
        ("tensors[0].axes[0].kept", KeyError, "tensors[0].axes[0].kept is missing"),
        ("rewrites[0].kind", "magic", "rewrites[0].kind must be 'attribute' or 'constant'"),
        ("rewrites[0].value", [1.5], "rewrites[0].value[0] must be an integer"),
        ("rewrites[0].node", KeyError, "rewrites[0].node is missing"),
        ("model_sha256", 12, "model_sha256 must be a string or null"),
        ("options", [], "options must be an object"),
        ("options.speed", 3, "options.speed is not a plan option"),
        ("options.ratio", 1.5, "options.ratio must be a number in [0, 1)"),
        ("options.ratio", "0.5", "options.ratio must be a number in [0, 1)"),
        ("options.ratio", True, "options.ratio must be a number in [0, 1)"),
        ("options.criterion", "magic", "options.criterion must be a known criterion name"),
        ("options.allocation", "greedy", "options.allocation must be 'uniform', 'global' or 'latency'"),
        ("options.min_keep", -0.1, "options.min_keep must be a number in [0, 1]"),
        ("options.round_to", 0, "options.round_to must be an integer ≥ 1"),
        ("options.round_to", 2.0, "options.round_to must be an integer ≥ 1"),
        ("options.flops_target", 0, "options.flops_target must be null or a number in (0, 1]"),
        ("options.seed", -1, "options.seed must be an integer ≥ 0"),
        ("options.allow_inexact", 1, "options.allow_inexact must be true or false"),
    ],
)
def test_an_invalid_field_is_named(doc, path: str, value: Any, words: str) -> None:
    with pytest.raises(PlanError) as info:
        Plan.from_json(_edited(doc, path, value))
    assert words in str(info.value)
    assert isinstance(info.value, UsageError)


def test_a_valid_edit_is_accepted(doc) -> None:
    d = _edited(_edited(doc, "options.round_to", 4), "options.flops_target", None)
    assert Plan.from_json(_edited(d, "options.ratio", 0)).options["round_to"] == 4
    assert Plan.from_json(_edited(doc, "options", {})).options == {}  # options may be partial


def test_the_source_names_the_file(doc, tmp_path: pathlib.Path) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps(_edited(doc, "groups[0].removed")))
    with pytest.raises(PlanError, match=r"^plan '.*p\.json': groups\[0\]\.removed is missing$"):
        Plan.load(path)
    path.write_text("{not json")
    with pytest.raises(PlanError, match="is not JSON"):
        Plan.load(path)
    with pytest.raises(PlanError, match="is not a file"):
        Plan.load(tmp_path / "missing.json")
    with pytest.raises(PlanError, match="must be a JSON object"):
        Plan.loads("[1, 2]")
    path.write_text(json.dumps(doc))
    assert Plan.load(path).to_json() == doc
