"""Tests for spa.analysis.cost: MACs against torch's own flop counter, the SizeFn override,
params, symbolic dims and the speed the allocator depends on."""

from __future__ import annotations

import io
import time
import warnings

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import pytest
from onnx import TensorProto, helper, numpy_helper

from spa.analysis.cost import Cost, CostModel, count_cost, executed_macs
from spa.errors import UsageError
from spa.inputs import make_feeds, resolve_input_shapes

torch = pytest.importorskip("torch")
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402


def _export(module, x, **kwargs) -> ir.Model:
    """torch → ONNX (TorchScript exporter, opset 17) → onnx_ir with inferred shapes."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), x, buf, dynamo=False, opset_version=17, **kwargs)
    model = ir.from_proto(onnx.load_from_string(buf.getvalue()))
    common_passes.ShapeInferencePass()(model)
    return model


def _torch_flops(module, x) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*x) if isinstance(x, tuple) else module(x)
    return counter.get_total_flops()


class _BMM(torch.nn.Module):
    """Activation × activation, like attention scores and context."""

    def forward(self, q, k):
        scores = q @ k.transpose(-1, -2)
        return scores @ k


class _Linear3D(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(12, 7)

    def forward(self, x):
        return self.fc(x)  # 3-D input exports as MatMul + Add


CASES = {
    "conv2d": (lambda: torch.nn.Conv2d(4, 8, 3, padding=1, stride=2), (1, 4, 9, 9)),
    "conv2d_grouped": (lambda: torch.nn.Conv2d(8, 12, 3, groups=4, bias=False), (2, 8, 7, 7)),
    "conv2d_depthwise": (lambda: torch.nn.Conv2d(6, 6, 5, groups=6, padding=2), (1, 6, 8, 8)),
    "conv2d_dilated": (lambda: torch.nn.Conv2d(3, 5, (3, 2), dilation=2), (1, 3, 10, 9)),
    "conv1d": (lambda: torch.nn.Conv1d(5, 7, 3, padding=1), (3, 5, 16)),
    "conv3d": (lambda: torch.nn.Conv3d(2, 4, 3), (1, 2, 5, 6, 7)),
    "conv_transpose2d": (
        lambda: torch.nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1, output_padding=1),
        (1, 6, 5, 5),
    ),
    "conv_transpose2d_grouped": (lambda: torch.nn.ConvTranspose2d(6, 4, 2, groups=2), (1, 6, 4, 4)),
    "linear_gemm": (lambda: torch.nn.Linear(10, 6), (3, 10)),
    "linear_matmul_3d": (_Linear3D, (2, 5, 12)),
    "bmm_activations": (_BMM, ((2, 3, 6, 4), (2, 3, 5, 4))),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_macs_match_torch_flop_counter(case):
    make, shape = CASES[case]
    torch.manual_seed(0)
    module = make().eval()
    if isinstance(shape[0], tuple):
        x = tuple(torch.randn(*s) for s in shape)
    else:
        x = torch.randn(*shape)
    model = _export(module, x)
    cost = CostModel(model).count()
    assert cost.macs > 0
    assert cost.macs * 2 == _torch_flops(module, x)
    # The independent ORT-shape count agrees with torch too.
    assert executed_macs(model, make_feeds(model)) * 2 == _torch_flops(module, x)
    # Conv/Gemm/MatMul flops are exactly 2·MACs (bias adds not counted, like torch).
    assert cost.flops >= 2 * cost.macs


class _TwoConvs(torch.nn.Module):
    def __init__(self, mid: int):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, mid, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(mid, 5, 3, padding=1)

    def forward(self, x):
        return self.conv2(torch.relu(self.conv1(x)))


def test_size_override_predicts_pruned_model():
    x = torch.randn(1, 3, 8, 8)
    model = _export(_TwoConvs(16), x)
    convs = [n for n in model.graph if n.op_type == "Conv"]
    relu = next(n for n in model.graph if n.op_type == "Relu")
    w1, b1, w2 = convs[0].inputs[1], convs[0].inputs[2], convs[1].inputs[1]
    # Every (value, axis) of the pruned channel space, as the channel analysis lists them.
    pruned = {
        (convs[0].outputs[0].name, 1): 8,
        (relu.outputs[0].name, 1): 8,
        (w1.name, 0): 8,
        (b1.name, 0): 8,
        (w2.name, 1): 8,
    }
    cm = CostModel(model)
    before = cm.count(per_node=True)
    after = cm.count(lambda name, axis: pruned.get((name, axis)), per_node=True)

    n1, n2 = convs[0].name, convs[1].name
    assert after.per_node[n1][0] * 2 == before.per_node[n1][0]
    assert after.per_node[n2][0] * 2 == before.per_node[n2][0]
    assert after.macs * 2 == before.macs
    w1_elems = int(np.prod(w1.shape.dims))
    assert before.params - after.params == w1_elems // 2 + 8 + int(np.prod(w2.shape.dims)) // 2
    assert before.param_bytes - after.param_bytes == 4 * (before.params - after.params)

    # The prediction equals the count of the model actually built with 8 channels.
    real = CostModel(_export(_TwoConvs(8), x)).count()
    assert (after.macs, after.flops, after.params, after.param_bytes) == (
        real.macs,
        real.flops,
        real.params,
        real.param_bytes,
    )
    # Unchanged when the override answers None everywhere.
    assert cm.count(lambda n, a: None) == cm.count()


def test_params_match_torch_parameters_plus_bn_stats():
    # Conv → ReLU → BN keeps the BN node (Conv → BN would be folded by the exporter).
    module = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3),
        torch.nn.ReLU(),
        torch.nn.BatchNorm2d(8),
        torch.nn.Conv2d(8, 8, 3, groups=8, bias=False),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 4 * 4, 5),
    ).eval()
    bn = module[2]
    with torch.no_grad():  # fresh BN has weight == running_var (ones): the exporter dedupes them
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 2)
    x = torch.randn(1, 3, 8, 8)
    model = _export(module, x)
    assert any(n.op_type == "BatchNormalization" for n in model.graph)
    cost = CostModel(model).count()
    bn_stats = sum(b.numel() for name, b in module.named_buffers() if "running" in name)
    expected = sum(p.numel() for p in module.parameters()) + bn_stats
    assert cost.params == expected
    assert cost.param_bytes == 4 * expected


def test_symbolic_batch_counts_as_one_unless_given():
    module = _TwoConvs(6)
    x = torch.randn(1, 3, 8, 8)
    dynamic = _export(module, x, input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    assert not dynamic.graph.inputs[0].shape.is_static()
    static = _export(module, x)
    one = CostModel(dynamic).count()
    assert one == CostModel(static).count()
    eight = CostModel(dynamic, dim_values={"batch": 8}).count()
    assert eight.macs == 8 * one.macs
    assert eight.flops == 8 * one.flops
    assert eight.params == one.params
    # An unresolved symbol is counted as 1 but never passes for a known size.
    assert CostModel(dynamic).unknown and not CostModel(static).unknown
    assert CostModel(dynamic, dim_values={"batch": 8}).unknown == []
    # --input-shape reaches the count through the specialised copy.
    given = CostModel.for_inputs(dynamic, {"x": [8, 3, 8, 8]})
    assert given.unknown == [] and given.count() == eight


def test_lstm_macs():
    module = torch.nn.LSTM(10, 20, bidirectional=True)
    # Explicit initial states: left out, the exporter makes zero constants (counted as params).
    x = (torch.randn(5, 2, 10), (torch.zeros(2, 2, 20), torch.zeros(2, 2, 20)))
    model = _export(module, x)
    cost = CostModel(model).count()
    seq, batch, hidden, inp = 5, 2, module.hidden_size, module.input_size
    assert cost.macs == 2 * seq * batch * 4 * hidden * (inp + hidden)
    assert executed_macs(model, make_feeds(model)) == cost.macs
    assert cost.params == sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------
# Graphs built with onnx.helper: conventions, constants, and the speed test.


def _ir(model: onnx.ModelProto) -> ir.Model:
    m = ir.from_proto(model)
    common_passes.ShapeInferencePass()(m)
    return m


def _init(name: str, shape, dtype=np.float32) -> TensorProto:
    rng = np.random.default_rng(0)
    return numpy_helper.from_array(rng.standard_normal(shape).astype(dtype), name)


def test_elementwise_pool_and_params_conventions():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    shape_const = numpy_helper.from_array(np.array([1, -1], dtype=np.int64), "shape")
    eps = np.array(1e-5, np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("MaxPool", ["r"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Constant", [], ["k"], name="kconst", value=_init("kv", [4, 1, 1])),
        helper.make_node("Constant", [], ["eps"], name="epsc", value=numpy_helper.from_array(eps)),
        helper.make_node("Mul", ["p", "k"], ["m"], name="mul"),
        helper.make_node("Add", ["m", "eps"], ["a"], name="add"),
        helper.make_node("Softmax", ["a"], ["s"], name="softmax", axis=1),
        helper.make_node("Reshape", ["s", "shape"], ["f"], name="reshape"),
        helper.make_node("ReduceSum", ["f"], ["y"], name="rsum", keepdims=0),
        # the same weight used twice is one set of params
        helper.make_node("Conv", ["x", "w"], ["c2"], name="conv_again", pads=[1, 1, 1, 1]),
        helper.make_node("MyOp", ["c2"], ["z"], name="custom", domain="my.domain"),
    ]
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "g", [x], [y, z], [_init("w", [4, 4, 3, 3]), shape_const])
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("my.domain", 1)]
    )
    cm = CostModel(_ir(model))
    cost = cm.count(per_node=True)
    conv_macs = 1 * 4 * 4 * 9 * 8 * 8
    pooled = 4 * 4 * 4
    assert cost.per_node["conv"] == (conv_macs, 2 * conv_macs)
    assert cost.per_node["relu"] == (0, 4 * 8 * 8)
    assert cost.per_node["pool"] == (0, 4 * pooled)
    assert cost.per_node["mul"] == (0, pooled)
    assert cost.per_node["softmax"] == (0, 3 * pooled)
    assert cost.per_node["reshape"] == (0, 0)
    assert cost.per_node["rsum"] == (0, pooled)
    assert cost.per_node["custom"] == (0, 0)
    assert cm.uncounted == {"my.domain::MyOp": 1}
    assert cm.unknown == []
    assert cost.macs == 2 * conv_macs
    assert cost.flops == sum(f for _, f in cost.per_node.values())
    # w once (144) + Constant k (4); the int64 shape and the scalar eps are not params.
    assert cost.params == 4 * 4 * 3 * 3 + 4
    assert cost.param_bytes == 4 * cost.params
    assert count_cost(_ir(model)) == cm.count()
    assert isinstance(cost, Cost)
    assert cost.to_dict()["per_node"]["conv"] == [conv_macs, 2 * conv_macs]


def test_quantized_ops_match_float_macs():
    x = helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 4, 6, 6])
    a = helper.make_tensor_value_info("a", TensorProto.UINT8, [3, 5, 4])
    outs = [helper.make_tensor_value_info(n, TensorProto.INT32, None) for n in ("c", "mm")]
    w = numpy_helper.from_array(np.ones((8, 2, 3, 3), np.int8), "w")
    b = numpy_helper.from_array(np.ones((4, 7), np.int8), "b")
    nodes = [
        helper.make_node("ConvInteger", ["x", "w"], ["c"], name="ci", group=2),
        helper.make_node("MatMulInteger", ["a", "b"], ["mm"], name="mmi"),
    ]
    graph = helper.make_graph(nodes, "q", [x, a], outs, [w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    cost = CostModel(_ir(model)).count(per_node=True)
    assert cost.per_node["ci"][0] == 1 * 8 * 2 * 9 * 4 * 4
    assert cost.per_node["mmi"][0] == 3 * 5 * 7 * 4
    assert cost.params == 8 * 2 * 9 + 4 * 7  # int8 weights are params, 1 byte each
    assert cost.param_bytes == cost.params


def _resnet_like(blocks: int = 17, width: int = 8) -> onnx.ModelProto:
    """A ResNet-50-sized graph (bottlenecks: conv-bn-relu ×3, add, relu), ~180 nodes."""
    inits: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def conv_bn(inp: str, cin: int, cout: int, k: int, tag: str, relu: bool = True) -> str:
        inits.append(_init(f"{tag}.w", [cout, cin, k, k]))
        for s in ("scale", "bias", "mean"):
            inits.append(_init(f"{tag}.{s}", [cout]))
        inits.append(numpy_helper.from_array(np.ones(cout, np.float32), f"{tag}.var"))
        pad = k // 2
        nodes.append(
            helper.make_node(
                "Conv", [inp, f"{tag}.w"], [f"{tag}.c"], name=f"{tag}.conv", pads=[pad] * 4
            )
        )
        nodes.append(
            helper.make_node(
                "BatchNormalization",
                [f"{tag}.c", f"{tag}.scale", f"{tag}.bias", f"{tag}.mean", f"{tag}.var"],
                [f"{tag}.bn"],
                name=f"{tag}.bn",
            )
        )
        if not relu:
            return f"{tag}.bn"
        nodes.append(helper.make_node("Relu", [f"{tag}.bn"], [f"{tag}.r"], name=f"{tag}.relu"))
        return f"{tag}.r"

    cur = conv_bn("x", 3, 4 * width, 3, "stem")
    for i in range(blocks):
        h = conv_bn(cur, 4 * width, width, 1, f"b{i}.1")
        h = conv_bn(h, width, width, 3, f"b{i}.2")
        h = conv_bn(h, width, 4 * width, 1, f"b{i}.3", relu=False)
        nodes.append(helper.make_node("Add", [h, cur], [f"b{i}.add"], name=f"b{i}.add"))
        nodes.append(helper.make_node("Relu", [f"b{i}.add"], [f"b{i}.out"], name=f"b{i}.out"))
        cur = f"b{i}.out"
    nodes.append(helper.make_node("GlobalAveragePool", [cur], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="flat"))
    inits.append(_init("fc.w", [4 * width, 10]))
    nodes.append(helper.make_node("MatMul", ["flat", "fc.w"], ["y"], name="fc"))
    graph = helper.make_graph(
        nodes,
        "resnetish",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 56, 56])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_count_is_fast_on_resnet_sized_graph():
    model = _ir(_resnet_like())
    assert len(model.graph) >= 170
    cm = CostModel(model, dim_values={"batch": 1})
    assert cm.unknown == [] and not cm.uncounted
    # Halve the middle channels of every block, as an allocator's candidate plan would.
    pruned = {(name, axis): 4 for name, axis in cm.refs if ".1." in name or ".2." in name}
    size = pruned.get

    def fn(name: str, axis: int) -> int | None:
        return size((name, axis))

    base = cm.count()
    smaller = cm.count(fn)
    assert smaller.macs < base.macs and smaller.params < base.params
    cm.count(fn)  # warm up
    start = time.perf_counter()
    for _ in range(100):
        cm.count(fn)
    per_call = (time.perf_counter() - start) / 100
    assert per_call < 5e-3, f"count() took {per_call * 1e3:.2f} ms"


def test_missing_shapes_are_reported_not_guessed(caplog):
    """Without shape inference, intermediate shapes are unknown: listed, counted as 0."""
    proto = _resnet_like(blocks=1)
    caplog.set_level("INFO", logger="spa.analysis.cost")
    cm = CostModel(ir.from_proto(proto))  # no ShapeInferencePass
    assert "stem.conv" in cm.unknown
    assert any("have unknown cost" in r.message for r in caplog.records)
    # The weights are initializers with shapes: params do not need inference.
    assert cm.count().params == CostModel(_ir(proto)).count().params


# ---------------------------------------------------------------------------------------
# Executed MACs (issue 11): counts from shapes actually known, checked against ORT's shapes.


def _resnet_nhwc(dims=("batch", "height", "width"), clip: bool = False, blocks: int = 2, width: int = 8) -> onnx.ModelProto:
    """A ResNet-ish model whose NHWC input goes through a Transpose and a Pad with computed
    pads (Shape → Slice → Mod/Sub → Concat → Pad: pad H and W up to a multiple of 32).
    With ``clip``, the pads also pass a Clip, which no shape folding evaluates: only an
    ONNX Runtime run tells the shapes after the Pad."""
    rng = np.random.default_rng(0)
    inits: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def init(name: str, array) -> str:
        inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def conv(inp: str, cin: int, cout: int, k: int, tag: str, stride: int = 1, relu: bool = True) -> str:
        init(f"{tag}.w", (rng.standard_normal((cout, cin, k, k)) * 0.3).astype(np.float32))
        init(f"{tag}.b", (rng.standard_normal(cout) * 0.1).astype(np.float32))
        nodes.append(helper.make_node("Conv", [inp, f"{tag}.w", f"{tag}.b"], [f"{tag}.c"], name=f"{tag}.conv", pads=[k // 2] * 4, strides=[stride] * 2))
        if not relu:
            return f"{tag}.c"
        nodes.append(helper.make_node("Relu", [f"{tag}.c"], [f"{tag}.r"], name=f"{tag}.relu"))
        return f"{tag}.r"

    init("start", np.array([2], np.int64))
    init("end", np.array([4], np.int64))
    init("m32", np.array([32], np.int64))
    init("zeros6", np.zeros(6, np.int64))
    nodes += [
        helper.make_node("Transpose", ["x"], ["t"], name="to_nchw", perm=[0, 3, 1, 2]),
        helper.make_node("Shape", ["t"], ["shp"], name="shape"),
        helper.make_node("Slice", ["shp", "start", "end"], ["hw"], name="hw"),
        helper.make_node("Mod", ["hw", "m32"], ["rem"], name="mod1"),
        helper.make_node("Sub", ["m32", "rem"], ["p0"], name="sub"),
        helper.make_node("Mod", ["p0", "m32"], ["p1"], name="mod2"),
    ]
    last = "p1"
    if clip:
        init("lo", np.array(0, np.int64))
        init("hi", np.array(31, np.int64))
        nodes.append(helper.make_node("Clip", ["p1", "lo", "hi"], ["p2"], name="clip"))
        last = "p2"
    nodes += [
        helper.make_node("Concat", ["zeros6", last], ["pads"], name="pads", axis=0),
        helper.make_node("Pad", ["t", "pads"], ["xp"], name="pad"),
    ]
    cur = conv("xp", 3, 4 * width, 3, "stem", stride=2)
    for i in range(blocks):
        h = conv(cur, 4 * width, width, 1, f"b{i}.1")
        h = conv(h, width, width, 3, f"b{i}.2")
        h = conv(h, width, 4 * width, 1, f"b{i}.3", relu=False)
        nodes.append(helper.make_node("Add", [h, cur], [f"b{i}.add"], name=f"b{i}.add"))
        nodes.append(helper.make_node("Relu", [f"b{i}.add"], [f"b{i}.out"], name=f"b{i}.out"))
        cur = f"b{i}.out"
    init("fc.w", rng.standard_normal((10, 4 * width)).astype(np.float32))
    init("fc.b", np.zeros(10, np.float32))
    nodes += [
        helper.make_node("GlobalAveragePool", [cur], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flat"),
        helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "nhwc", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [*dims, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _canonical(proto: onnx.ModelProto) -> ir.Model:
    from spa.passes.canonicalize import CanonicalizePass

    model = ir.from_proto(proto)
    CanonicalizePass()(model)
    return model


@pytest.mark.parametrize("clip", [False, True], ids=["foldable-pads", "pads-only-ort-knows"])
@pytest.mark.parametrize("dims", [("batch", "height", "width"), (1, 72, 88)], ids=["dynamic", "static"])
def test_costmodel_counts_executed_macs_through_computed_pad(dims, clip):
    proto = _resnet_nhwc(dims, clip)
    model = _canonical(proto)
    cm = CostModel.for_inputs(model)
    assert cm.unknown == []
    feeds = make_feeds(model, cm.input_shapes)
    assert cm.count().macs == executed_macs(proto, feeds)
    # Without the ORT run, a Clip in the pads leaves the shapes after the Pad unknown:
    # reported, never guessed.
    blind = CostModel.for_inputs(model, observe=False)
    if clip:
        assert blind.unknown and blind.unknown_ops["Conv"] == 7
        with pytest.raises(UsageError, match=r"^--flops-target needs .* 18 nodes \(ops: Conv ×7, .*\) have unknown cost"):
            blind.require_known()
    else:
        assert blind.unknown == [] and blind.count() == cm.count()
    cm.require_known()  # all known: no refusal


def test_pruned_costmodel_ratio_matches_executed_ratio():
    import spa

    proto = _resnet_nhwc(clip=True)
    result = spa.prune(proto, ratio=0.5, benchmark=False)
    original = _canonical(proto)
    feeds = make_feeds(original, resolve_input_shapes(original, {}))
    executed = executed_macs(result.model, feeds) / executed_macs(proto, feeds)
    counted = CostModel.for_inputs(result.model).count().macs / CostModel.for_inputs(original).count().macs
    assert executed < 0.9  # something was pruned
    assert abs(counted - executed) <= 0.02 * executed


def test_report_macs_ratio_is_the_executed_ratio():
    import spa

    proto = _resnet_nhwc(clip=True)
    result = spa.prune(proto, ratio=0.5, benchmark=False)
    original = _canonical(proto)
    feeds = make_feeds(original, resolve_input_shapes(original, {}))
    executed = executed_macs(result.model, feeds) / executed_macs(proto, feeds)
    rep = result.report
    assert abs(rep.macs_after / rep.macs_before - executed) <= 0.02 * executed


def _dynamic_convnet() -> onnx.ModelProto:
    """A face-detector-like fully dynamic conv net: x is [N, 3, H, W] with N, H, W symbolic."""
    rng = np.random.default_rng(1)
    inits = [
        numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32), "w1"),
        numpy_helper.from_array((rng.standard_normal((8, 1, 3, 3)) * 0.3).astype(np.float32), "dw"),
        numpy_helper.from_array((rng.standard_normal((4, 8, 1, 1)) * 0.3).astype(np.float32), "w2"),
        numpy_helper.from_array((rng.standard_normal((4, 2, 2, 2)) * 0.3).astype(np.float32), "up"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="c1", pads=[1] * 4, strides=[2, 2]),
        helper.make_node("Relu", ["c1"], ["r1"], name="r1"),
        helper.make_node("Conv", ["r1", "dw"], ["c2"], name="dw", pads=[1] * 4, group=8),
        helper.make_node("Conv", ["c2", "w2"], ["c3"], name="c3"),
        helper.make_node("ConvTranspose", ["c3", "up"], ["y"], name="up", strides=[2, 2]),
    ]
    graph = helper.make_graph(
        nodes, "dyn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_input_shape_reaches_spatial_dims_of_a_fully_dynamic_model():
    proto = _dynamic_convnet()
    model = _canonical(proto)
    counts = {}
    for shape in ([1, 3, 64, 64], [2, 3, 160, 96]):
        cm = CostModel.for_inputs(model, {"x": shape})
        assert cm.unknown == []
        counts[tuple(shape)] = cm.count().macs
        assert counts[tuple(shape)] == executed_macs(proto, make_feeds(model, {"x": shape}))
    # 2 x (160 x 96) / (64 x 64) = 7.5 times the work
    assert counts[(2, 3, 160, 96)] == counts[(1, 3, 64, 64)] * 15 // 2
    # The default (1 on axis 0, 64 elsewhere) is the 1x3x64x64 count.
    assert CostModel.for_inputs(model).count().macs == counts[(1, 3, 64, 64)]
    # A dynamic model counted without its sizes is "unknown", not a small number.
    assert CostModel(model).unknown_ops["Conv"] == 3


def test_search_target_reports_unreachable_targets():
    from spa.allocate import search_target

    # Falls with the ratio until a floor of 0.4 at ratio 0.6 (the min-keep floor).
    def figure(r: float) -> float:
        return max(1.0 - r, 0.4)

    ok = search_target(figure, 0.5)
    assert ok.met and abs(ok.ratio - 0.5) < 1e-4 and ok.reached <= 0.5
    out = search_target(figure, 0.3)
    assert not out.met and out.reached == pytest.approx(0.4)
    assert abs(out.ratio - 0.6) < 1e-4  # the least pruning that reaches the floor, not 0.99
    assert "out of reach" in out.message() and "0.400" in out.message()
    assert search_target(figure, 1.0).ratio == 0.0


def _positional_conv() -> onnx.ModelProto:
    """y = Conv(x + Conv(grid, w_pe), w): the inner conv reads only constants (a positional
    encoding over a fixed grid, as XCiT's), so ONNX Runtime folds it when the session is made."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("grid", (1, 2, 4, 4)), ("w_pe", (8, 2, 1, 1)), ("w", (4, 8, 3, 3)))]
    nodes = [helper.make_node("Conv", ["grid", "w_pe"], ["pe"], name="pe_conv"),
             helper.make_node("Add", ["x", "pe"], ["xp"], name="add"),
             helper.make_node("Conv", ["xp", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_nodes_on_constants_only_cost_nothing_per_inference():
    import spa

    proto = _positional_conv()
    model = ir.from_proto(onnx.shape_inference.infer_shapes(proto))
    cm = CostModel(model)
    assert cm.constant == ["pe_conv"]
    assert cm.count().macs == 1 * 4 * 4 * 4 * 8 * 9  # the outer conv only
    assert executed_macs(proto, make_feeds(model)) == cm.count().macs
    result = spa.prune(proto, ratio=0.5, benchmark=False)
    assert result.report.macs_before == cm.count().macs
    # An overridable input (an initializer listed among the inputs) is not a constant: counted.
    proto.graph.input.append(helper.make_tensor_value_info("grid", TensorProto.FLOAT, [1, 2, 4, 4]))
    assert CostModel(ir.from_proto(onnx.shape_inference.infer_shapes(proto))).count().macs == cm.count().macs + 8 * 2 * 16
