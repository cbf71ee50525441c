"""The folding passes: each exact against ONNX Runtime on torch exports and small graphs."""

from __future__ import annotations

import pathlib

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper, numpy_helper

from spa.passes.canonicalize import CanonicalizePass
from spa.passes.fold import fold_model
from spa.passes.fold_affine import FoldAffinePass
from spa.passes.fold_batchnorm import FoldBatchNormPass
from spa.passes.merge_linear import MergeLinearPass
from spa.passes.remove_identity import RemoveIdentityPass

torch = pytest.importorskip("torch")
nn = torch.nn
ort = pytest.importorskip("onnxruntime")


def _run(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # ORT must not fold for us
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)


def _export(module: nn.Module, x: torch.Tensor, tmp_path: pathlib.Path) -> onnx.ModelProto:
    module.eval()
    path = tmp_path / "m.onnx"
    torch.onnx.export(module, (x,), str(path), dynamo=False, do_constant_folding=False, training=torch.onnx.TrainingMode.EVAL,
                      input_names=["x"], output_names=["y"])
    return onnx.load(path)


def _check_exact(proto: onnx.ModelProto, pass_or_fn, feeds) -> tuple[onnx.ModelProto, bool]:
    """Canonicalize (as the pipeline does before folding), run the pass, compare in ORT."""
    model = ir.from_proto(proto)
    CanonicalizePass()(model)
    modified = pass_or_fn(model)
    out = ir.to_proto(model)
    onnx.checker.check_model(out, full_check=True)
    ref, got = _run(proto, feeds), _run(out, feeds)
    assert [r.shape for r in ref] == [g.shape for g in got]
    for r, g in zip(ref, got):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(r).max())))
    assert [o.name for o in out.graph.output] == [o.name for o in proto.graph.output]
    return out, modified


def _ops(proto: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in proto.graph.node]


class _ConvBN(nn.Module):
    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=bias)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 4, 3, stride=2, groups=2, bias=False)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn2(self.conv2(torch.relu(self.bn(self.conv(x)))))


def _randomize_bn(m: nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    for mod in m.modules():
        if isinstance(mod, (nn.BatchNorm2d, nn.BatchNorm1d)):
            n = mod.num_features
            mod.running_mean.copy_(torch.randn(n, generator=g))
            mod.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            mod.weight.data.copy_(torch.randn(n, generator=g))
            mod.bias.data.copy_(torch.randn(n, generator=g))


@pytest.mark.parametrize("bias", [True, False])
def test_batchnorm_folds_into_conv_exactly(tmp_path: pathlib.Path, bias: bool) -> None:
    torch.manual_seed(0)
    m = _ConvBN(bias)
    _randomize_bn(m)
    x = torch.randn(2, 3, 9, 9)
    proto = _export(m, x, tmp_path)
    assert _ops(proto).count("BatchNormalization") == 2
    out, modified = _check_exact(proto, lambda model: FoldBatchNormPass()(model).modified, {"x": x.numpy()})
    assert modified and "BatchNormalization" not in _ops(out)
    names = {t.name for t in out.graph.initializer}
    assert {"conv.weight", "conv2.weight"} <= names  # the input model's names
    assert ("conv.bias" if bias else "bn.bias") in names and "bn2.bias" in names


def test_batchnorm_after_gemm_folds(tmp_path: pathlib.Path) -> None:
    m = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5))
    _randomize_bn(m)
    x = torch.randn(4, 6)
    proto = _export(m, x, tmp_path)
    out, modified = _check_exact(proto, lambda model: FoldBatchNormPass()(model).modified, {"x": x.numpy()})
    assert modified and "BatchNormalization" not in _ops(out)


def test_batchnorm_with_a_shared_weight_is_left(tmp_path: pathlib.Path) -> None:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(4, 3, 1, 1)).astype(np.float32), "w")
    bn = [numpy_helper.from_array(a.astype(np.float32), n) for a, n in ((np.ones(4), "s"), (np.zeros(4), "b"), (np.zeros(4), "m"), (np.ones(4), "v"))]
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"]),
         helper.make_node("Conv", ["x", "w"], ["z"])],
        "g", [helper.make_tensor_value_info("x", 1, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", 1, None), helper.make_tensor_value_info("z", 1, None)], [w, *bn])
    model = ir.from_proto(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    assert FoldBatchNormPass()(model).modified is False


class _Affine(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.conv2 = nn.Conv2d(6, 6, 1, bias=False)
        self.fc = nn.Linear(6, 5)
        self.mm = nn.Linear(5, 4)
        self.register_buffer("s", torch.randn(1, 6, 1, 1))
        self.register_buffer("t", torch.randn(6, 1, 1))
        self.register_buffer("u", torch.randn(5))
        self.register_buffer("v", torch.rand(4) + 0.5)

    def forward(self, x):
        y = self.conv(x) * self.s + self.t
        y = self.conv2(y) - 0.5  # a shift on a bias-less conv: the constant becomes its bias
        y = y.mean((2, 3))
        y = self.fc(y) * 2.0 + self.u
        return self.mm(torch.tanh(y)) / self.v


def test_per_channel_mul_add_fold_into_weights(tmp_path: pathlib.Path) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 7)
    proto = _export(_Affine(), x, tmp_path)
    before = _ops(proto)
    out, modified = _check_exact(proto, lambda model: FoldAffinePass()(model).modified, {"x": x.numpy()})
    assert modified
    after = _ops(out)
    for op in ("Mul", "Div", "Sub"):
        assert after.count(op) < before.count(op) or before.count(op) == 0, op
    assert "Div" not in after and "Sub" not in after


def test_a_mul_that_broadcasts_larger_is_left() -> None:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(4, 3)).astype(np.float32), "w")
    c = numpy_helper.from_array(rng.normal(size=(2, 1, 4)).astype(np.float32), "c")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["t"]), helper.make_node("Mul", ["t", "c"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", 1, [5, 4])], [helper.make_tensor_value_info("y", 1, None)], [w, c])
    model = ir.from_proto(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    assert FoldAffinePass()(model).modified is False


class _Chain(nn.Module):
    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.a = nn.Linear(16, 12, bias=bias)
        self.b = nn.Linear(12, 8, bias=bias)
        self.c = nn.Linear(8, 4)

    def forward(self, x):
        return self.c(torch.relu(self.b(self.a(x))))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rank3", [False, True])
def test_linear_chain_merges_exactly(tmp_path: pathlib.Path, bias: bool, rank3: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16) if rank3 else torch.randn(3, 16)
    proto = _export(_Chain(bias), x, tmp_path)
    n_linear = sum(op in ("Gemm", "MatMul") for op in _ops(proto))
    out, modified = _check_exact(proto, lambda model: MergeLinearPass()(model).modified, {"x": x.numpy()})
    assert modified
    assert sum(op in ("Gemm", "MatMul") for op in _ops(out)) == n_linear - 1  # a·b merged, c after the relu kept
    names = {t.name for t in out.graph.initializer}
    assert "b.weight" in names and "a.weight" not in names  # the merged weight under the second's name


def test_a_pair_that_pays_is_not_merged() -> None:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=s).astype(np.float32), n) for n, s in (("p", (64, 4)), ("q", (4, 64)))]
    g = helper.make_graph([helper.make_node("MatMul", ["x", "p"], ["t"]), helper.make_node("MatMul", ["t", "q"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", 1, [2, 64])], [helper.make_tensor_value_info("y", 1, None)], inits)
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    assert MergeLinearPass()(ir.from_proto(proto)).modified is False
    out, modified = _check_exact(proto, lambda model: MergeLinearPass(always=True)(model).modified, {"x": rng.normal(size=(2, 64)).astype(np.float32)})
    assert modified and _ops(out) == ["MatMul"]


def test_conv_then_1x1_conv_merges(tmp_path: pathlib.Path) -> None:
    m = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1, stride=2, groups=2), nn.Conv2d(8, 4, 1, groups=2))
    x = torch.randn(1, 2, 8, 8)
    proto = _export(m, x, tmp_path)
    out, modified = _check_exact(proto, lambda model: MergeLinearPass()(model).modified, {"x": x.numpy()})
    assert modified and _ops(out) == ["Conv"]


def test_no_op_nodes_are_removed(tmp_path: pathlib.Path) -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.drop = nn.Dropout(0.5)

        def forward(self, x):
            y = self.drop(self.fc(x)) * 1.0 + 0.0
            return y.permute(0, 1).reshape(3, 4).to(torch.float32)

    x = torch.randn(3, 4)
    proto = _export(M(), x, tmp_path)
    out, modified = _check_exact(proto, lambda model: RemoveIdentityPass()(model).modified, {"x": x.numpy()})
    assert modified and _ops(out) == ["Gemm"], _ops(out)
    assert out.graph.output[0].name == "y"


def test_identity_between_graph_input_and_output_is_kept() -> None:
    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [helper.make_tensor_value_info("x", 1, [2])],
                          [helper.make_tensor_value_info("y", 1, [2])])
    model = ir.from_proto(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    assert RemoveIdentityPass()(model).modified is False


def test_fold_model_reaches_a_fixpoint_on_an_unfused_export(tmp_path: pathlib.Path) -> None:
    torch.manual_seed(0)
    m = _ConvBN(False)
    _randomize_bn(m)
    x = torch.randn(1, 3, 9, 9)
    proto = _export(m, x, tmp_path)
    out, removed = _check_exact(proto, fold_model, {"x": x.numpy()})
    assert removed["fold-batchnorm"] == 2
    model = ir.from_proto(out)
    assert not any(fold_model(model).values())  # a second run finds nothing


def test_the_fold_step_after_pruning_is_checked_and_names_stay(tmp_path: pathlib.Path) -> None:
    import spa

    torch.manual_seed(0)
    m = _ConvBN(True)
    _randomize_bn(m)
    x = torch.randn(1, 3, 9, 9)
    proto = _export(m, x, tmp_path)
    path = tmp_path / "unfused.onnx"
    onnx.save(proto, path)
    r = spa.prune(str(path), ratio=0.25, fold=True, benchmark=False)
    assert r.report.fold["removed_nodes"]["fold-batchnorm"] == 2
    assert r.report.fold["max_abs_diff"] <= 1e-4  # the folded model against the pruned one, in ORT
    assert r.report.oracle["max_abs_diff"] <= 1e-4  # the surgery was proven before folding
    names = {t.name for t in r.plan.tensors}
    assert "conv.weight" in names  # the plan names the input model's tensors
    out = ir.to_proto(r.model)
    assert "BatchNormalization" not in _ops(out)
    assert {"conv.weight", "conv.bias", "conv2.weight", "bn2.bias"} <= {t.name for t in out.graph.initializer}
