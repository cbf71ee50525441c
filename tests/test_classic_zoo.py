"""The classic model-zoo conventions (issue 17): opset 7–10, initializers that are also graph
inputs (IR < 4), and weights computed by constant subgraphs (ConstantOfShape).

Small graphs built with onnx.helper test one convention each against ONNX Runtime; the nine
``light_*`` models shipped in onnx's own test data are the end-to-end check (slow, except
SqueezeNet, which takes well under a second).
"""

from __future__ import annotations

import os
import pathlib

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import spa
from spa import io, verify
from spa.analysis.channels import analyze_channels
from spa.errors import UnsupportedError
from spa.graph import notes
from spa.passes import upgrade_opset
from spa.passes.canonicalize import CanonicalizePass, infer_shapes
from spa.passes.fold_constants import FoldConstantsPass
from spa.passes.weight_inputs import WeightInputsPass

LIGHT = pathlib.Path(os.path.dirname(onnx.__file__)) / "backend" / "test" / "data" / "light"
LIGHT_NAMES = ["bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50", "shufflenet",
               "squeezenet", "vgg19", "zfnet512"]

RNG = np.random.default_rng(0)


def _rand(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def _two_convs(opset: int, *, ir_version: int, weights_as_inputs: bool = False, extra=()) -> onnx.ModelProto:
    """x[1,3,8,8] → Conv(8) → BN → Relu → Conv(4) → y: one prunable group of 8 channels."""
    inits = [
        numpy_helper.from_array(_rand(8, 3, 3, 3), "w1"),
        numpy_helper.from_array(_rand(8), "b1"),
        numpy_helper.from_array(_rand(8), "scale"),
        numpy_helper.from_array(_rand(8), "bias"),
        numpy_helper.from_array(_rand(8), "mean"),
        numpy_helper.from_array(np.abs(_rand(8)) + 0.5, "var"),
        numpy_helper.from_array(_rand(4, 8, 3, 3), "w2"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "scale", "bias", "mean", "var"], ["n1"]),
        helper.make_node("Relu", ["n1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["y"], pads=[1, 1, 1, 1]),
        *extra,
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])]
    if weights_as_inputs:
        inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)


def _ort(model: onnx.ModelProto | ir.Model, tmp_path: pathlib.Path, name: str, feeds=None):
    path = tmp_path / f"{name}.onnx"
    if isinstance(model, ir.Model):
        io.save_model(model, path)
    else:
        onnx.save(model, path)
    sess = verify.session(path)
    feeds = feeds if feeds is not None else verify.make_inputs(sess)
    return path, feeds, verify.run(sess, feeds)


# ---------------------------------------------------------------------------------------------
# opset 7–10: upgraded on load
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("opset", [7, 9, 10])
def test_old_opset_is_upgraded_and_prunes_exactly(tmp_path: pathlib.Path, opset: int) -> None:
    proto = _two_convs(opset, ir_version=4)
    model = io.load_model(proto)
    assert model.opset_imports[""] == upgrade_opset.TARGET_OPSET
    assert model.meta[upgrade_opset.UPGRADED_FROM_KEY] == opset
    assert model.ir_version >= 7
    assert any(f"opset {opset}" in n for n in notes(model))

    # The upgrade itself, against ONNX Runtime: the original opset runs there too.
    up_path, feeds, _ = _ort(model, tmp_path, "up")
    assert upgrade_opset.check_upgrade(proto, up_path, feeds) <= 1e-6

    result = spa.prune(proto, ratio=0.5, benchmark=False)
    assert result.report.oracle["passed"]
    assert result.report.groups_pruned == 1
    _, _, (y0,) = _ort(proto, tmp_path, "orig", feeds)
    _, _, (y1,) = _ort(result.model, tmp_path, "pruned", feeds)
    assert y0.shape == y1.shape


def test_old_opset_from_a_path(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(_two_convs(9, ir_version=4), path)
    model = io.load_model(path)
    assert model.meta[upgrade_opset.UPGRADED_FROM_KEY] == 9
    assert spa.prune(path, ratio=0.5, benchmark=False).report.oracle["passed"]


@pytest.mark.parametrize("opset", [5, 6])
def test_older_opsets_stay_refused(opset: int) -> None:
    with pytest.raises(UnsupportedError, match=f"opset {opset} is not supported"):
        io.load_model(_two_convs(opset, ir_version=4))


def test_converter_failure_is_one_line_naming_the_op(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(model, target):
        raise RuntimeError("/project/onnx/version_converter/BaseConverter.h:65: adapter_lookup: Assertion `false` "
                           "failed: No Adapter For Current Version $9 for BatchNormalization")

    monkeypatch.setattr(onnx.version_converter, "convert_version", fail)
    with pytest.raises(UnsupportedError) as info:
        io.load_model(_two_convs(9, ir_version=4))
    message = str(info.value)
    assert "\n" not in message and "op BatchNormalization" in message and "9 → 13" in message


def test_check_upgrade_refuses_changed_outputs(tmp_path: pathlib.Path) -> None:
    proto = _two_convs(9, ir_version=4)
    changed = _two_convs(13, ir_version=7)
    changed.graph.initializer[0].CopyFrom(numpy_helper.from_array(_rand(8, 3, 3, 3), "w1"))
    path, feeds, _ = _ort(changed, tmp_path, "changed")
    with pytest.raises(UnsupportedError, match="the opset upgrade changed the outputs"):
        upgrade_opset.check_upgrade(proto, path, feeds)


def test_downgrade_back_to_the_input_opset(tmp_path: pathlib.Path) -> None:
    proto = _two_convs(9, ir_version=4)
    dropout = helper.make_node("Dropout", ["y"], ["z"], ratio=0.3)
    proto.graph.node.append(dropout)
    proto.graph.output[0].name = "z"
    result = spa.prune(proto, ratio=0.5, benchmark=False)
    pruned = ir.to_proto(result.model)
    back = upgrade_opset.downgrade(pruned, 9)
    assert back is not None
    assert upgrade_opset.default_opset(back) == 9
    pruned_path, feeds, _ = _ort(pruned, tmp_path, "pruned")
    back_path = tmp_path / "back.onnx"
    onnx.save(back, back_path)
    assert upgrade_opset.check_upgrade(back_path, pruned_path, feeds) <= 1e-6


def test_downgrade_returns_none_where_it_cannot(caplog: pytest.LogCaptureFixture) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    gelu = helper.make_model(helper.make_graph([helper.make_node("Gelu", ["x"], ["y"])], "g", [x], [y]),
                             opset_imports=[helper.make_opsetid("", 20)])
    assert upgrade_opset.downgrade(gelu, 9) is None
    assert "Gelu" in caplog.text


def test_verification_checks_the_upgrade(monkeypatch: pytest.MonkeyPatch) -> None:
    """An upgraded input is compared with the file as given (check_upgrade), and the report says so."""
    proto = _two_convs(9, ir_version=4)
    result = spa.prune(proto, ratio=0.5, benchmark=False)
    check = result.report.options["upgrade_check"]
    assert check["from_opset"] == 9 and check["to_opset"] == upgrade_opset.TARGET_OPSET
    assert 0 <= check["max_abs_diff"] <= 1e-6
    assert any("upgrade was checked in ONNX Runtime" in n for n in result.report.notes)
    # Not upgraded, or no ORT verification: no check.
    assert "upgrade_check" not in spa.prune(_two_convs(13, ir_version=7), ratio=0.5, benchmark=False).report.options
    assert "upgrade_check" not in spa.prune(proto, ratio=0.5, benchmark=False, verify="check").report.options

    def changed(original, upgraded_path, feeds):
        raise UnsupportedError("the opset upgrade changed the outputs: 'y' differs by 1")

    monkeypatch.setattr(upgrade_opset, "check_upgrade", changed)
    with pytest.raises(UnsupportedError, match="the opset upgrade changed the outputs"):
        spa.prune(proto, ratio=0.5, benchmark=False)


@pytest.mark.parametrize("source", ["proto", "path"])
def test_keep_opset_writes_the_input_opset(tmp_path: pathlib.Path, source: str) -> None:
    proto = _two_convs(9, ir_version=3, weights_as_inputs=True)
    src = proto
    if source == "path":
        src = tmp_path / "in.onnx"
        onnx.save(proto, src)
    result = spa.prune(src, ratio=0.5, benchmark=False, keep_opset=True)
    assert result.model.opset_imports[""] == 9
    assert any("written back at the input's opset 9" in n for n in result.report.notes)
    assert not result.report.warnings
    out = result.save(tmp_path / "out.onnx")
    saved = onnx.load(out)
    assert upgrade_opset.default_opset(saved) == 9
    onnx.checker.check_model(saved, full_check=True)
    # It runs in ORT and gives the outputs of the pruned model at the upgraded opset.
    upgraded = spa.prune(src, ratio=0.5, benchmark=False)
    assert upgraded.model.opset_imports[""] == upgrade_opset.TARGET_OPSET
    up_path, feeds, (y13,) = _ort(upgraded.model, tmp_path, "up")
    _, _, (y9,) = _ort(saved, tmp_path, "back", feeds)
    np.testing.assert_allclose(y9, y13, rtol=1e-5, atol=1e-6)
    assert [w.shape for w in (y9,)] == [(1, 4, 8, 8)]


def test_keep_opset_warns_and_keeps_the_upgrade_where_it_cannot(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    monkeypatch.setattr(upgrade_opset, "downgrade_or_reason", lambda proto, opset: (None, "no adapter for Foo"))
    result = spa.prune(_two_convs(9, ir_version=4), ratio=0.5, benchmark=False, keep_opset=True)
    assert result.model.opset_imports[""] == upgrade_opset.TARGET_OPSET
    assert any("--keep-opset" in w and "no adapter for Foo" in w for w in result.report.warnings)
    assert result.report.oracle["passed"]


def test_keep_opset_checks_the_result_in_ort(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    """A converted model ORT cannot load (or that gives other outputs) is not written."""
    real = verify.session

    def session(path, threads=0, *, pruned=False):
        if pathlib.Path(path).parent.name.startswith("spa-opset-"):
            raise spa.VerificationError("ONNX Runtime cannot load the pruned model: test")
        return real(path, threads, pruned=pruned)

    monkeypatch.setattr(verify, "session", session)
    result = spa.prune(_two_convs(9, ir_version=4), ratio=0.5, benchmark=False, keep_opset=True)
    assert result.model.opset_imports[""] == upgrade_opset.TARGET_OPSET
    assert any("--keep-opset" in w and "cannot load" in w for w in result.report.warnings)


def test_save_model_at_an_opset(tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    model = io.load_model(_two_convs(13, ir_version=7))
    out = io.save_model(model, tmp_path / "m9.onnx", opset=9)
    assert upgrade_opset.default_opset(onnx.load(out)) == 9
    assert model.opset_imports[""] == 13  # the model itself is not changed
    gelu = helper.make_model(
        helper.make_graph([helper.make_node("Gelu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])]),
        opset_imports=[helper.make_opsetid("", 20)])
    out = io.save_model(ir.from_proto(gelu), tmp_path / "gelu.onnx", opset=9)
    assert upgrade_opset.default_opset(onnx.load(out)) == 20
    assert "written at opset 20, not 9" in caplog.text


# ---------------------------------------------------------------------------------------------
# initializers that are also graph inputs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("opset", "ir_version"), [(9, 3), (13, 7)])
def test_weight_inputs_are_weights_by_default(tmp_path: pathlib.Path, opset: int, ir_version: int) -> None:
    proto = _two_convs(opset, ir_version=ir_version, weights_as_inputs=True)
    result = spa.prune(proto, ratio=0.5, benchmark=False)
    assert result.report.oracle["passed"]
    assert result.report.groups_pruned == 1
    assert [v.name for v in result.model.graph.inputs] == ["x"]
    assert [v.name for v in result.model.graph.outputs] == ["y"]
    assert set(result.model.graph.initializers) == {"w1", "b1", "scale", "bias", "mean", "var", "w2"}
    assert [layer["weight"] for layer in result.report.layers] == ["w1"]

    model = io.load_model(proto)
    CanonicalizePass()(model)
    assert any("7 initializers were also graph inputs" in n for n in notes(model))
    assert model.ir_version >= 4
    # Same numbers in ONNX Runtime as the file as written.
    canon_path, feeds, (y1,) = _ort(model, tmp_path, "canon")
    _, _, (y0,) = _ort(proto, tmp_path, "orig", feeds)
    np.testing.assert_allclose(y0, y1, rtol=1e-5, atol=1e-6)


def test_keep_weight_inputs_freezes_their_channels() -> None:
    proto = _two_convs(13, ir_version=7, weights_as_inputs=True)
    model = io.load_model(proto)
    CanonicalizePass(keep_weight_inputs=True)(model)
    assert [v.name for v in model.graph.inputs] == ["x", "w1", "b1", "scale", "bias", "mean", "var", "w2"]
    assert any("kept as overridable inputs" in n and "--keep-weight-inputs" in n for n in notes(model))
    groups = analyze_channels(model).groups
    assert groups and not any(g.prunable for g in groups)
    reasons = " ".join(r.reason for g in groups for r in g.reasons)
    assert "graph input" in reasons
    # A plain code with its message, on every channel group (each has its weight as a source).
    from spa.rules.base import BlockCode

    candidates = [g for g in groups if g.has_source]
    assert candidates and all(BlockCode.WEIGHT_INPUT in {r.code for r in g.reasons} for g in candidates)
    assert all("--keep-weight-inputs" in r.reason for g in candidates for r in g.reasons if r.code is BlockCode.WEIGHT_INPUT)


def test_keep_weight_inputs_in_prune() -> None:
    """Needs the pipeline to pass ``keep_weight_inputs`` on to CanonicalizePass."""
    proto = _two_convs(13, ir_version=7, weights_as_inputs=True)
    result = spa.prune(proto, ratio=0.5, keep_weight_inputs=True, benchmark=False)
    assert result.report.groups_pruned == 0
    assert len(result.model.graph.inputs) == 8
    # The report lists the frozen groups with the reason (not "the model has no channel groups").
    assert result.report.groups_total >= 1 and result.report.groups_blocked == result.report.groups_total
    assert {r["code"] for b in result.report.blocked for r in b["reasons"]} >= {"weight_input"}
    assert any("are graph inputs" in w and "--keep-weight-inputs" in w for w in result.report.warnings), result.report.warnings


def test_weight_inputs_pass_leaves_outputs_alone() -> None:
    proto = _two_convs(13, ir_version=7, weights_as_inputs=True)
    proto.graph.output.append(helper.make_tensor_value_info("w2", TensorProto.FLOAT, [4, 8, 3, 3]))
    model = ir.from_proto(proto)
    assert WeightInputsPass(keep=False)(model).modified
    assert [v.name for v in model.graph.outputs] == ["y", "w2"]
    assert [v.name for v in model.graph.inputs] == ["x"]


# ---------------------------------------------------------------------------------------------
# weights computed by constant subgraphs
# ---------------------------------------------------------------------------------------------


def _computed_weights() -> onnx.ModelProto:
    """Conv weights from ConstantOfShape·random and Constant→Reshape; bias from ConstantOfShape."""
    shape = lambda name, dims: numpy_helper.from_array(np.asarray(dims, np.int64), name)  # noqa: E731
    fill = numpy_helper.from_array(np.asarray([0.5], np.float32))
    nodes = [
        helper.make_node("ConstantOfShape", ["w1_shape"], ["w1_ones"], value=fill),
        helper.make_node("Mul", ["w1_ones", "w1_noise"], ["w1"]),
        helper.make_node("ConstantOfShape", ["b1_shape"], ["b1"], value=fill),
        helper.make_node("Constant", [], ["w2_flat"], value=numpy_helper.from_array(_rand(4 * 8 * 9))),
        helper.make_node("Reshape", ["w2_flat", "w2_shape"], ["w2"]),
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["y"], pads=[1, 1, 1, 1]),
    ]
    inits = [shape("w1_shape", [8, 3, 3, 3]), shape("b1_shape", [8]), shape("w2_shape", [4, 8, 3, 3]),
             numpy_helper.from_array(_rand(8, 3, 3, 3), "w1_noise")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)


def test_constant_subgraph_weights_become_prunable(tmp_path: pathlib.Path) -> None:
    proto = _computed_weights()
    model = io.load_model(proto)
    CanonicalizePass()(model)
    assert {"w1", "b1", "w2"} <= set(model.graph.initializers)
    assert not any(n.op_type in ("ConstantOfShape", "Mul", "Reshape") for n in model.graph)
    assert any("3 tensors computed by constant subgraphs" in n for n in notes(model))
    canon_path, feeds, (y1,) = _ort(model, tmp_path, "canon")
    _, _, (y0,) = _ort(proto, tmp_path, "orig", feeds)
    np.testing.assert_array_equal(y0, y1)

    result = spa.prune(proto, ratio=0.5, benchmark=False)
    assert result.report.oracle["passed"]
    assert result.report.groups_pruned == 1
    assert [layer["weight"] for layer in result.report.layers] == ["w1"]


def test_folding_is_deterministic() -> None:
    proto, protos = _computed_weights(), []
    for _ in range(2):
        model = io.load_model(proto)
        CanonicalizePass()(model)
        protos.append(ir.to_proto(model).SerializeToString())
    assert protos[0] == protos[1]


def test_tied_weights_are_not_copied() -> None:
    """W feeds one MatMul directly and another through Transpose·Neg: folding would copy it."""
    w = numpy_helper.from_array(_rand(8, 8), "W")
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["a"]),
        helper.make_node("Transpose", ["W"], ["Wt"]),
        helper.make_node("Neg", ["Wt"], ["Wn"]),
        helper.make_node("MatMul", ["a", "Wn"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])], [w])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    assert not FoldConstantsPass()(model).modified
    assert list(model.graph.initializers) == ["W"]


def test_transparent_weight_chains_keep_their_initializer() -> None:
    """Cast/Transpose of an initializer: the rules read through them, so W keeps its name."""
    w = numpy_helper.from_array(_rand(8, 8).astype(np.float16), "W")
    nodes = [helper.make_node("Cast", ["W"], ["Wf"], to=TensorProto.FLOAT), helper.make_node("MatMul", ["x", "Wf"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])], [w])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    assert not FoldConstantsPass()(model).modified


def test_non_weight_constants_are_bounded() -> None:
    """A big constant that is not a weight (a broadcast mask) counts against the budget."""
    one = numpy_helper.from_array(np.asarray([1.0], np.float32))
    nodes = [
        helper.make_node("ConstantOfShape", ["mask_shape"], ["mask"], value=one),
        helper.make_node("Add", ["x", "mask"], ["y"]),
    ]
    inits = [numpy_helper.from_array(np.asarray([64, 64], np.int64), "mask_shape")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 64])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model = ir.from_proto(proto)
    infer_shapes(model)
    assert not FoldConstantsPass(min_budget_bytes=1024)(model).modified  # 16 KiB > 1 KiB
    model = ir.from_proto(proto)
    infer_shapes(model)
    assert FoldConstantsPass()(model).modified  # within the default 16 MiB


# ---------------------------------------------------------------------------------------------
# the classic zoo itself
# ---------------------------------------------------------------------------------------------


def _prune_light(name: str, tmp_path: pathlib.Path) -> tuple[float, spa.PruneResult]:
    path = LIGHT / f"light_{name}.onnx"
    if not path.exists():
        pytest.skip(f"{path} is not in this onnx install")
    result = spa.prune(path, ratio=0.5, benchmark=False)
    report = result.report
    assert report.oracle["passed"], name
    assert report.groups_pruned > 0, name
    # Same output shapes in ONNX Runtime.
    _, feeds, before = _ort(onnx.load(path), tmp_path, "orig")
    _, _, after = _ort(result.model, tmp_path, "pruned", feeds)
    assert [a.shape for a in before] == [b.shape for b in after]
    return report.macs_after / report.macs_before, result


def test_light_squeezenet(tmp_path: pathlib.Path) -> None:
    ratio, _ = _prune_light("squeezenet", tmp_path)
    assert ratio <= 0.45


@pytest.mark.slow
def test_light_zoo(tmp_path: pathlib.Path) -> None:
    ratios = {}
    for name in LIGHT_NAMES:
        (tmp_path / name).mkdir()
        ratios[name], _ = _prune_light(name, tmp_path / name)
    assert all(r <= 0.7 for r in ratios.values()), ratios
    assert sum(r <= 0.45 for r in ratios.values()) >= 6, ratios


def test_upgrade_keeps_external_weights_lazy(tmp_path: pathlib.Path) -> None:
    proto = _two_convs(9, ir_version=4)
    path = tmp_path / "m.onnx"
    onnx.save(proto, path, save_as_external_data=True, all_tensors_to_one_file=True, location="m.onnx.data", size_threshold=0)
    model = io.load_model(path)
    assert model.meta[upgrade_opset.UPGRADED_FROM_KEY] == 9
    assert all(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values() if v.name in ("w1", "w2"))
    result = spa.prune(path, ratio=0.5, benchmark=False)
    assert result.report.oracle["passed"] and result.report.groups_pruned == 1
