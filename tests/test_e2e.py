"""End to end on torch-exported architectures: every pruned model is exactly the masked original.

ResNet (residual adds, downsample shortcuts), DenseNet (Concat), MobileNetV2 (depthwise,
inverted residual), ShuffleNet (Split + channel shuffle through Reshape/Transpose), SE blocks,
UNet (ConvTranspose + skip Concat), an NHWC graph with Transposes, Conv1d/Conv3d.
The oracle inside ``spa.prune`` raises if the pruned model computes anything else.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import spa

pytest.importorskip("torch")
import zoo  # noqa: E402

FAST = [n for n in zoo.NAMES if n not in zoo.SLOW]


def _outputs(path_or_proto, feeds):
    src = path_or_proto if isinstance(path_or_proto, (str, pathlib.Path)) else path_or_proto.SerializeToString()
    sess = ort.InferenceSession(str(src) if isinstance(src, pathlib.Path) else src, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_zoo_prunes_exactly(zoo_onnx: Callable[..., pathlib.Path], name: str, allocation: str, tmp_path: pathlib.Path) -> None:
    path = zoo_onnx(name)
    result = spa.prune(path, ratio=0.5, allocation=allocation, benchmark=False)
    rep = result.report
    assert rep.oracle["passed"] and rep.oracle["asserted"]
    assert rep.groups_pruned >= 1
    assert rep.flops_after < 0.6 * rep.flops_before
    out = result.save(tmp_path / "out.onnx")
    onnx.checker.check_model(str(out), full_check=True)
    original, pruned = onnx.load(path), onnx.load(out)
    assert [str(o.type) for o in original.graph.output] == [str(o.type) for o in pruned.graph.output]
    x = zoo.sample_input(name, zoo.build(name)[1]).numpy()
    (y,) = _outputs(out, {"input": x})
    assert np.isfinite(y).all()


@pytest.mark.parametrize("name", ["resnet", "mobilenetv2", "shufflenet"])
def test_round_to_and_min_keep(zoo_onnx, name: str) -> None:
    result = spa.prune(zoo_onnx(name), ratio=0.9, round_to=4, min_keep=0.25, benchmark=False)
    assert result.report.layers, "nothing was pruned"
    for layer in result.report.layers:  # every pruned layer's output channels
        assert layer["kept"] >= 0.25 * layer["channels"] - 1e-9
        if layer["channels"] >= 4:
            assert layer["kept"] % 4 == 0, layer


def test_flops_target(zoo_onnx) -> None:
    result = spa.prune(zoo_onnx("resnet"), ratio=0.0, flops_target=0.4, allocation="global", benchmark=False)
    assert result.report.flops_after <= 0.4 * result.report.flops_before
    assert result.report.flops_after >= 0.25 * result.report.flops_before  # not wildly over-pruned


def test_dynamic_batch(zoo_onnx) -> None:
    path = zoo_onnx("shufflenet", dynamic_batch=True)
    result = spa.prune(path, ratio=0.5, benchmark=False, input_shapes={"input": [3, 3, 32, 32]})
    assert result.report.groups_pruned >= 1 and result.report.oracle["passed"]


def test_criteria_differ_but_all_exact(zoo_onnx) -> None:
    plans = {}
    for crit in ("l1", "l2", "random"):
        r = spa.prune(zoo_onnx("se"), ratio=0.5, criterion=crit, benchmark=False)
        assert r.report.oracle["passed"]
        plans[crit] = [g.removed for g in r.plan.groups]
    assert plans["l1"] != plans["random"]


def test_inputs_from_memory(zoo_onnx) -> None:
    proto = onnx.load(zoo_onnx("resnet"))
    before = proto.SerializeToString()
    r1 = spa.prune(proto, ratio=0.5, benchmark=False)
    import onnx_ir as ir

    model = ir.from_proto(proto)
    r2 = spa.prune(model, ratio=0.5, benchmark=False)
    assert proto.SerializeToString() == before  # the caller's model is untouched
    assert r1.report.flops_after == r2.report.flops_after


def test_transformer_heads_and_mlp(zoo_onnx) -> None:
    result = spa.prune(zoo_onnx("transformer"), ratio=0.5, benchmark=False)
    layers = {layer["weight"]: layer for layer in result.report.layers}
    # Q, K, V lose whole heads (4 heads × 8 → 2 heads), the MLP loses half its width.
    assert sorted(v["kept"] for v in layers.values()) == [16] * 6 + [64] * 2
    assert result.report.oracle["passed"] and result.report.oracle["asserted"]


def test_gqa_removes_kv_heads_with_their_query_heads(zoo_onnx) -> None:
    result = spa.prune(zoo_onnx("gqa"), ratio=0.5, benchmark=False)
    kept = sorted((layer["channels"], layer["kept"]) for layer in result.report.layers)
    assert (32, 16) in kept and (16, 8) in kept  # 4→2 query heads, 2→1 KV heads
    assert result.report.oracle["passed"]


def test_hidden_size_only_with_allow_inexact(zoo_onnx) -> None:
    path = zoo_onnx("bert")
    exact = spa.prune(path, ratio=0.5, benchmark=False)
    assert any(r["code"] == "channel_mixing" for b in exact.report.blocked for r in b["reasons"])
    loose = spa.prune(path, ratio=0.5, benchmark=False, allow_inexact=True)
    assert loose.report.flops_after < exact.report.flops_after
    assert loose.report.oracle["inexact_groups"] and not loose.report.oracle["asserted"]
    assert "embed.weight" in {layer["weight"] for layer in loose.report.layers}


def test_float16_model(tmp_path) -> None:
    import warnings

    import torch

    model, shape = zoo.build("resnet")
    path = tmp_path / "fp16.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.half(), (torch.randn(*shape).half(),), str(path), dynamo=False, opset_version=17)
    result = spa.prune(path, ratio=0.5, benchmark=False)
    assert result.report.groups_pruned >= 5
    assert result.report.oracle["passed"] and result.report.oracle["asserted"]


@pytest.mark.parametrize("name", ["transformer", "resnet"])
def test_dynamo_exporter(tmp_path, name: str) -> None:
    """The torch.export-based exporter (dynamo=True) gives other graphs; same guarantees."""
    import contextlib
    import io
    import warnings

    import torch

    pytest.importorskip("onnxscript")
    model, shape = zoo.build(name)
    path = tmp_path / f"{name}.onnx"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (zoo.sample_input(name, shape),), str(path), dynamo=True, opset_version=18,
                          input_names=["input"], output_names=["output"])
    result = spa.prune(path, ratio=0.5, benchmark=False)
    assert result.report.groups_pruned >= 4
    assert result.report.flops_ratio < 0.6
    assert result.report.oracle["passed"] and result.report.oracle["asserted"]


def test_tied_embedding_is_shared_not_broken(tmp_path) -> None:
    """An embedding table read by Gather (ids) and, transposed, by the output projection."""
    import warnings

    import torch

    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(40, 16)
            self.fc1, self.fc2 = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)

        def forward(self, ids):
            h = self.embed(ids)
            h = h + self.fc2(torch.relu(self.fc1(h)))
            return h @ self.embed.weight.T

    torch.manual_seed(0)
    path = tmp_path / "tied.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Tied().eval(), (torch.randint(0, 40, (1, 6)),), str(path), dynamo=False,
                          do_constant_folding=False, opset_version=17, input_names=["input"], output_names=["output"])
    result = spa.prune(path, ratio=0.5, benchmark=False)
    assert result.report.oracle["passed"] and result.report.oracle["asserted"]
    kept = {layer["weight"]: layer["kept"] for layer in result.report.layers}
    # The hidden size is pruned once for both uses of the table (one tensor, one slice), the
    # MLP width through the Transpose a non-folded torch Linear reads, the vocabulary never.
    assert kept["embed.weight"] == kept["fc2.weight"] == 8 and kept["fc1.weight"] == 16
    table = result.model.graph.initializers["embed.weight"].const_value
    assert tuple(table.shape) == (40, 8)
