"""Custom rules without editing spa: per-call rules (``rules=``) and ``spa.rules`` plug-ins.

The custom op is ``com.example::MyScale`` (a per-channel scale), defined as a model-local
function so ONNX Runtime can run it; the analysis sees the op itself (the model is not
canonicalized, which would inline the function).
"""

from __future__ import annotations

import importlib.metadata
import pathlib
import sys
import types

import numpy as np
import onnx
import onnx.numpy_helper
import onnx.parser
import onnx.shape_inference
import onnx_ir as ir
import pytest

from spa import verify
from spa.allocate import allocate
from spa.analysis.channels import analyze_channels
from spa.errors import UsageError
from spa.passes.prune import PrunePass
from spa.planning import build_plan
from spa.rules import registry
from spa.rules.base import BlockCode, CouplingContext, Dim, NoRewrite, Role

_TEXT = """
<ir_version: 10, opset_import: ["" : 17, "com.example" : 1]>
g (float[1,3,6,6] x) => (float[1,4,6,6] y) {
  a = Conv <pads=[1,1,1,1]> (x, w1, b1)
  s = com.example.MyScale (a, scale)
  r = Relu (s)
  y = Conv <pads=[1,1,1,1]> (r, w2, b2)
}
<domain: "com.example", opset_import: ["" : 17]>
MyScale (X, S) => (Y) {
  Y = Mul (X, S)
}
"""


class MyScaleRule(NoRewrite):
    """``Y = X · S`` with S of shape [C, 1, 1]: X, Y and S[0] are the same channels."""

    op_types = ("MyScale",)
    domain = "com.example"

    def couplings(self, node: ir.Node, ctx: CouplingContext) -> None:
        x, s, y = ctx.input(0), ctx.input(1), ctx.output(0)
        for axis in range(ctx.rank(y)):
            ctx.tie(x, axis, y, axis)
        if ctx.tie(s, 0, y, 1):
            ctx.weight(s, 0, Role.PARAM)
        ctx.allow(s, 1)
        ctx.allow(s, 2)


def _proto() -> onnx.ModelProto:
    proto = onnx.parser.parse_model(_TEXT)
    rng = np.random.default_rng(0)
    for name, shape in {"w1": (8, 3, 3, 3), "b1": (8,), "scale": (8, 1, 1), "w2": (4, 8, 3, 3), "b2": (4,)}.items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name))
    onnx.checker.check_model(proto)
    return proto


def _model(proto: onnx.ModelProto) -> ir.Model:
    model = ir.from_proto(onnx.shape_inference.infer_shapes(proto, strict_mode=True))
    for i, node in enumerate(model.graph):
        node.name = node.name or f"n{i}"
    return model


def _group(cg, value: str, axis: int):
    g = cg.group_of(Dim(value, axis))
    assert g is not None
    return g


def test_custom_op_is_blocked_without_its_rule() -> None:
    cg = analyze_channels(_model(_proto()))
    g = _group(cg, "w1", 0)
    assert {r.code for r in g.reasons} == {BlockCode.NO_RULE}
    assert not g.prunable


@pytest.mark.parametrize(
    "rules",
    [
        [MyScaleRule()],
        [MyScaleRule],  # a class is instantiated
        {("com.example", "MyScale"): MyScaleRule()},
        {"com.example::MyScale": MyScaleRule()},
    ],
    ids=["list", "class", "tuple-key", "string-key"],
)
def test_custom_op_prunes_exactly_with_its_rule(rules, tmp_path: pathlib.Path) -> None:
    proto = _proto()
    model = _model(proto)
    cg = analyze_channels(model, rules=rules)
    g = _group(cg, "w1", 0)
    assert g.prunable and not g.reasons
    assert Dim("scale", 0) in g.dims
    scores = {gr.id: np.arange(gr.n_units, dtype=np.float64) for gr in cg.groups if gr.prunable}
    removed = allocate(cg.groups, scores, ratio=0.5)
    assert len(removed[g.id]) == 4
    plan = build_plan(model, cg, removed)  # the rules come with the analysis
    assert {t.name for t in plan.tensors} == {"w1", "b1", "scale", "w2"}

    reference = ir.from_proto(ir.to_proto(model))
    verify.mask_model(reference, plan)
    pruned = ir.from_proto(ir.to_proto(model))
    assert PrunePass(plan)(pruned).modified
    assert list(pruned.graph.initializers["scale"].const_value.numpy().shape) == [4, 1, 1]
    ref_path, pruned_path = tmp_path / "masked.onnx", tmp_path / "pruned.onnx"
    ir.save(reference, ref_path)
    ir.save(pruned, pruned_path)
    feeds = verify.make_inputs(verify.session(ref_path))
    result = verify.run_oracle(ref_path, pruned_path, feeds)
    assert result.passed, result
    assert result.max_abs_diff <= 1e-5


def test_build_plan_takes_the_rules_explicitly_too() -> None:
    model = _model(_proto())
    cg = analyze_channels(model, rules=[MyScaleRule()])
    g = _group(cg, "w1", 0)
    removed = {g.id: np.array([0, 1])}
    assert build_plan(model, cg, removed, rules=[MyScaleRule()]).tensors == build_plan(model, cg, removed).tensors


def test_a_per_call_rule_is_not_registered() -> None:
    analyze_channels(_model(_proto()), rules=[MyScaleRule()])
    assert ("com.example", "MyScale") not in registry.registered_ops()
    assert registry.get_rule("com.example", "MyScale") is None


def test_per_call_rules_come_before_the_registry() -> None:
    class Opaque(NoRewrite):
        op_types = "Relu"

        def couplings(self, node, ctx) -> None:
            ctx.block_all(BlockCode.UNSUPPORTED_ATTRIBUTE, "test: this Relu is opaque")

    cg = analyze_channels(_model(_proto()), rules=[MyScaleRule(), Opaque()])
    assert BlockCode.UNSUPPORTED_ATTRIBUTE in {r.code for r in _group(cg, "w1", 0).reasons}


def test_resolve_rules_forms() -> None:
    rule = MyScaleRule()
    assert registry.resolve_rules(None) == {}
    assert registry.resolve_rules([rule]) == {("com.example", "MyScale"): rule}
    assert registry.resolve_rules({"Relu": rule}) == {("", "Relu"): rule}
    assert registry.resolve_rules({("ai.onnx", "Relu"): rule}) == {("", "Relu"): rule}


class _NoOps(NoRewrite):
    def couplings(self, node, ctx) -> None: ...


@pytest.mark.parametrize(
    "rules, words",
    [
        ([_NoOps()], "no op_types"),
        ([object()], "no couplings"),
        ({("com.example",): MyScaleRule()}, "key"),
        ([MyScaleRule(), MyScaleRule()], "two custom rules"),
        ("MyScale", "list of rules"),
    ],
)
def test_resolve_rules_refuses_what_is_not_a_rule(rules, words: str) -> None:
    with pytest.raises(UsageError, match=words):
        registry.resolve_rules(rules)


# -- plug-ins: the spa.rules entry-point group ----------------------------------------------


@pytest.fixture
def plugin_module(monkeypatch: pytest.MonkeyPatch):
    """A module ``spa_test_plugin`` on sys.modules, and the registry restored afterwards."""
    mod = types.ModuleType("spa_test_plugin")
    mod.rules = lambda: [MyScaleRule()]
    mod.broken = lambda: 1 / 0
    mod.clash = lambda: {"Conv": MyScaleRule()}
    monkeypatch.setitem(sys.modules, "spa_test_plugin", mod)
    saved = dict(registry._REGISTRY)
    yield mod
    registry._REGISTRY.clear()
    registry._REGISTRY.update(saved)


def _ep(attr: str) -> importlib.metadata.EntryPoint:
    return importlib.metadata.EntryPoint(name=attr, value=f"spa_test_plugin:{attr}", group=registry.ENTRY_POINT_GROUP)


def test_entry_point_rules_are_registered(plugin_module) -> None:
    added = registry.load_plugins([_ep("rules")])
    assert added == [("com.example", "MyScale")]
    cg = analyze_channels(_model(_proto()))
    assert _group(cg, "w1", 0).prunable


def test_a_broken_or_clashing_plugin_is_skipped(plugin_module, caplog: pytest.LogCaptureFixture) -> None:
    conv = registry.get_rule("", "Conv")
    assert registry.load_plugins([_ep("broken"), _ep("clash")]) == []
    assert registry.get_rule("", "Conv") is conv
    assert "broken" in caplog.text and "clash" in caplog.text


def test_installed_entry_points_load_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(registry, "_entry_points", lambda: calls.append(1) or [])
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    registry.get_rule("", "Conv")
    registry.get_rule("", "Relu")
    registry.registered_ops()
    assert calls == [1]


# -- spa.prune(..., rules=[...]): the whole pipeline with a custom op ------------------------
#
# ``com.microsoft::FusedMatMul`` (``Y = alpha · A @ B``) is an op ONNX Runtime runs and spa has
# no rule for: unlike a model-local function, canonicalization cannot inline it away, so the
# analysis meets the op itself and only a per-call rule can open its channels.

_FUSED_TEXT = """
<ir_version: 10, opset_import: ["" : 17, "com.microsoft" : 1]>
g (float[2,8] x) => (float[2,4] y) {
  h = MatMul (x, w1)
  r = Relu (h)
  y = com.microsoft.FusedMatMul <alpha=1.0> (r, w2)
}
"""


class FusedMatMulRule(NoRewrite):
    """``Y[M, N] = A[M, K] @ B[K, N]`` with B a weight (no transposes)."""

    op_types = ("FusedMatMul",)
    domain = "com.microsoft"

    def couplings(self, node: ir.Node, ctx: CouplingContext) -> None:
        a, b, y = ctx.input(0), ctx.input(1), ctx.output(0)
        if ctx.attr("transA", 0) or ctx.attr("transB", 0) or ctx.rank(a) != 2 or ctx.rank(b) != 2 or not ctx.is_weight(b):
            return  # every axis unmentioned: frozen, which is safe
        ctx.tie(a, 0, y, 0)
        ctx.tie(a, 1, b, 0)
        ctx.weight(b, 0, Role.IN)
        ctx.tie(b, 1, y, 1)
        ctx.weight(b, 1, Role.OUT)


def _fused_proto() -> onnx.ModelProto:
    proto = onnx.parser.parse_model(_FUSED_TEXT)
    rng = np.random.default_rng(0)
    for name, shape in {"w1": (8, 16), "w2": (16, 4)}.items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name))
    return proto


def test_spa_prune_without_the_rule_prunes_nothing() -> None:
    import spa

    result = spa.prune(_fused_proto(), ratio=0.5, benchmark=False)
    assert result.plan.empty
    assert BlockCode.NO_RULE.value in {b["code"] for g in result.report.blocked for b in g["reasons"]}


@pytest.mark.parametrize("rules", [[FusedMatMulRule()], {"com.microsoft::FusedMatMul": FusedMatMulRule}], ids=["list", "mapping"])
def test_spa_prune_takes_per_call_rules(rules) -> None:
    import spa

    result = spa.prune(_fused_proto(), ratio=0.5, benchmark=False, rules=rules)
    edits = {t.name: t for t in result.plan.tensors}
    assert set(edits) == {"w1", "w2"}
    assert len(edits["w1"].kept[1]) == 8 and len(edits["w2"].kept[0]) == 8
    assert result.report.oracle["passed"] and result.report.oracle["asserted"]
    assert list(result.model.graph.initializers["w2"].const_value.shape) == [8, 4]
    # the plan replays with the same rules; the rules are not a plan option
    assert "rules" not in result.plan.options
    again = spa.apply(_fused_proto(), result.plan, benchmark=False, rules=rules)
    assert again.plan.tensors == result.plan.tensors and again.report.oracle["passed"]


def test_spa_prune_refuses_a_rule_that_is_not_one() -> None:
    import spa

    with pytest.raises(UsageError, match="no op_types"):
        spa.prune(_fused_proto(), ratio=0.5, benchmark=False, rules=[_NoOps()])
