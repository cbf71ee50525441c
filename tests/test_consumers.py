"""The consumer view (spa.analysis.consumers): every node that reads a group's channels through a
weight, with the exact column layout compensation needs.

The central check is numeric and model-independent: for every consumer and unit u, running the
consumer (with its weight path and bias Add) in ONNX Runtime with the columns the view names for
u zeroed gives the same output as zeroing the activation channels the view names for u. For
grouped convs the same holds per channel with only the rows of the channel's block zeroed.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import onnx.helper
import onnx.numpy_helper
import onnx.parser
import onnx_ir as ir
import onnxruntime as ort
import pytest

import spa
from spa.analysis.consumers import Consumer, consumer_view, consumers_of
from spa.rules.base import Dim, Role

OPSET = '<ir_version: 10, opset_import: ["" : 17]>'


def _model(text: str, seed: int = 0, **inits) -> onnx.ModelProto:
    proto = onnx.parser.parse_model(OPSET + "\n" + text)
    rng = np.random.default_rng(seed)
    for name, spec in inits.items():
        arr = spec if isinstance(spec, np.ndarray) else rng.standard_normal(spec).astype(np.float32)
        proto.graph.initializer.append(onnx.numpy_helper.from_array(arr, name))
    onnx.checker.check_model(proto)
    return proto


def _bn(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        f"s{seed}": rng.uniform(0.5, 1.5, n).astype(np.float32),
        f"t{seed}": rng.standard_normal(n).astype(np.float32),
        f"m{seed}": rng.standard_normal(n).astype(np.float32) * 0.1,
        f"v{seed}": rng.uniform(0.5, 2, n).astype(np.float32),
    }


# -- models ---------------------------------------------------------------------------------


def cnn() -> onnx.ModelProto:
    """Conv → BN → Relu → Conv (no bias) → Relu, a residual Add read by a 3×3 and a 1×1 conv."""
    return _model(
        """
        g (float[1,3,8,8] x) => (float[1,6,8,8] y, float[1,5,8,8] z) {
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          n = BatchNormalization (a, s1, t1, m1, v1)
          r = Relu (n)
          c = Conv <pads=[1,1,1,1]> (r, w2)
          r2 = Relu (c)
          s = Add (r, r2)
          y = Conv <pads=[1,1,1,1]> (s, w3, b3)
          z = Conv (s, w4, b4)
        }""",
        w1=(8, 3, 3, 3), b1=(8,), w2=(8, 8, 3, 3), w3=(6, 8, 3, 3), b3=(6,), w4=(5, 8, 1, 1), b4=(5,), **_bn(8, 1),
    )


def concat() -> onnx.ModelProto:
    """Two convs (5 and 3 channels) concatenated and read by a conv."""
    return _model(
        """
        g (float[1,3,6,6] x) => (float[1,4,6,6] y) {
          a = Conv <pads=[1,1,1,1]> (x, wa, ba)
          b = Conv <pads=[1,1,1,1]> (x, wb, bb)
          ra = Relu (a)
          rb = Relu (b)
          c = Concat <axis=1> (ra, rb)
          y = Conv <pads=[1,1,1,1]> (c, wc, bc)
        }""",
        wa=(5, 3, 3, 3), ba=(5,), wb=(3, 3, 3, 3), bb=(3,), wc=(4, 8, 3, 3), bc=(4,),
    )


def flatten_gemm(trans_b: int) -> onnx.ModelProto:
    """Conv (4 channels of 3×3) → Relu → Flatten → Gemm: each channel owns 9 Gemm columns."""
    wg = (5, 36) if trans_b else (36, 5)
    return _model(
        f"""
        g (float[1,3,6,6] x) => (float[1,5] y) {{
          a = Conv <pads=[1,1,1,1], strides=[2,2]> (x, w1, b1)
          r = Relu (a)
          f = Flatten <axis=1> (r)
          y = Gemm <transB={trans_b}, alpha=0.5, beta=2.0> (f, wg, bg)
        }}""",
        w1=(4, 3, 3, 3), b1=(4,), wg=wg, bg=(5,),
    )


def grouped() -> onnx.ModelProto:
    """Conv → grouped conv (2 groups of 4) → depthwise conv → pointwise conv."""
    return _model(
        """
        g (float[1,3,6,6] x) => (float[1,4,6,6] y) {
          a = Conv <pads=[1,1,1,1]> (x, w1, b1)
          r = Relu (a)
          gc = Conv <group=2, pads=[1,1,1,1]> (r, wg, bg)
          rg = Relu (gc)
          d = Conv <group=6, pads=[1,1,1,1]> (rg, wd, bd)
          rd = Relu (d)
          y = Conv (rd, wp, bp)
        }""",
        w1=(8, 3, 3, 3), b1=(8,), wg=(6, 4, 3, 3), bg=(6,), wd=(6, 1, 3, 3), bd=(6,), wp=(4, 6, 1, 1), bp=(4,),
    )


def through() -> onnx.ModelProto:
    """MatMul reading Transpose(W) with a bias Add, then a MatMul reading a DequantizeLinear weight."""
    rng = np.random.default_rng(3)
    return _model(
        """
        g (float[1,4,6] x) => (float[1,4,5] y) {
          t = Transpose <perm=[1,0]> (w)
          m = MatMul (x, t)
          h = Add (b, m)
          r = Relu (h)
          q = DequantizeLinear (wq, sc, zp)
          y = MatMul (r, q)
        }""",
        w=(5, 6), b=(5,),
        wq=rng.integers(-100, 100, (5, 5)).astype(np.int8), sc=np.array(0.01, np.float32), zp=np.array(0, np.int8),
    )


# -- running pieces of a model in ONNX Runtime ----------------------------------------------


def _session(proto: onnx.ModelProto) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _feeds(proto: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    inits = {i.name for i in proto.graph.initializer}
    out = {}
    for v in proto.graph.input:
        if v.name in inits:
            continue
        shape = [d.dim_value for d in v.type.tensor_type.shape.dim]
        out[v.name] = rng.standard_normal(shape).astype(np.float32)
    return out


class Runner:
    """The canonical model as a proto, its initializers, and every intermediate value."""

    def __init__(self, analysis: spa.Analysis, seed: int = 0) -> None:
        self.analysis = analysis
        self.proto = ir.serde.serialize_model(analysis.model)
        self.inits = {t.name: onnx.numpy_helper.to_array(t) for t in self.proto.graph.initializer}
        self.nodes = {n.name: n for n in self.proto.graph.node}
        feeds = _feeds(self.proto, seed)
        full = onnx.ModelProto()
        full.CopyFrom(self.proto)
        have = {o.name for o in full.graph.output}
        for n in full.graph.node:
            for o in n.output:
                if o and o not in have:
                    full.graph.output.append(onnx.ValueInfoProto(name=o))
        names = [o.name for o in full.graph.output]
        self.values = {**feeds, **dict(zip(names, _session(full).run(names, feeds)))}

    def piece(self, c: Consumer) -> tuple[ort.InferenceSession, list[str], str]:
        """The consumer alone (with its weight path and bias Add); weight and bias are inputs."""
        node_names = [*c.weight_path, c.node]
        if c.bias_node is not None and c.bias_node != c.node:
            node_names.append(c.bias_node)
        nodes = [self.nodes[n] for n in node_names]
        produced = {o for n in nodes for o in n.output}
        as_input = {c.weight} | ({c.bias} if c.bias else set())
        inputs, inits = [], []
        for n in nodes:
            for i in n.input:
                if not i or i in produced or i in inputs or any(t.name == i for t in inits):
                    continue
                if i in self.inits and i not in as_input:
                    inits.append(onnx.numpy_helper.from_array(self.inits[i], i))
                else:
                    inputs.append(i)
        arrays = {i: self._value(i) for i in inputs}
        out = nodes[-1].output[0]
        graph = onnx.helper.make_graph(
            nodes,
            "piece",
            [onnx.helper.make_tensor_value_info(i, onnx.helper.np_dtype_to_tensor_dtype(a.dtype), a.shape) for i, a in arrays.items()],
            [onnx.ValueInfoProto(name=out)],
            inits,
        )
        proto = onnx.helper.make_model(graph, opset_imports=self.proto.opset_import, ir_version=self.proto.ir_version)
        return _session(proto), inputs, out

    def _value(self, name: str) -> np.ndarray:
        return self.inits[name] if name in self.inits else self.values[name]


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    scale = max(float(np.abs(a).max()), float(np.abs(b).max()), 1.0)
    return bool(np.abs(a - b).max() <= 1e-5 * scale)


def _zero_along(arr: np.ndarray, axis: int, index: np.ndarray) -> np.ndarray:
    out = arr.copy()
    sl = [slice(None)] * arr.ndim
    sl[axis] = index
    out[tuple(sl)] = 0
    return out


def check_exact(runner: Runner, c: Consumer, max_units: int | None = None) -> None:
    """Zeroing the view's columns of unit u == zeroing the view's activation channels of u."""
    assert c.activation is not None
    sess, inputs, out = runner.piece(c)
    base = {i: runner._value(i) for i in inputs}
    x, w = base[c.activation], base[c.weight]
    assert x.shape[c.activation_axis] == c.activation_size
    assert w.shape == c.weight_shape
    y0 = sess.run([out], base)[0]
    units = c.units
    if max_units is not None:  # the units whose channels carry the most signal (not dead ReLUs)
        xm = np.moveaxis(np.abs(x), c.activation_axis, 0).reshape(x.shape[c.activation_axis], -1).sum(axis=1)
        units = sorted(units, key=lambda u: -xm[c.channels_of(u)].sum())[:max_units]
    moved = 0
    for u in units:
        cols, chans = c.columns_of(u), c.channels_of(u)
        assert cols.size and chans.size
        ya = sess.run([out], {**base, c.weight: _zero_along(w, c.axis, cols)})[0]
        yb = sess.run([out], {**base, c.activation: _zero_along(x, c.activation_axis, chans)})[0]
        assert _close(ya, yb), f"{c.node}: unit {u} columns {cols} vs channels {chans}"
        moved += not _close(ya, y0)
    assert moved, f"{c.node}: zeroing no unit changed the output (vacuous check)"
    if c.bias is not None:
        b = base[c.bias]
        delta = np.random.default_rng(1).standard_normal(b.shape).astype(b.dtype)
        yb = sess.run([out], {**base, c.bias: b + delta})[0]
        flat = delta.reshape(-1)
        shape = [1] * y0.ndim
        channel_axis = 1 if c.kind.startswith("conv") else y0.ndim - 1
        shape[channel_axis] = flat.size
        assert _close(yb, y0 + c.bias_scale * flat.reshape(shape))


def _all_consumers(analysis) -> list[Consumer]:
    return list(consumer_view(analysis))


def _check_complete(analysis) -> None:
    """Every IN weight axis of every group has a consumer in that group, and nothing else does."""
    view = consumer_view(analysis)
    for g in analysis.channels.groups:
        ins = {(d.value, d.axis) for d in g.weight_dims(Role.IN)}
        seen = {(c.weight, c.axis) for c in view[g.id]}
        assert seen == ins, g.id
        for c in view[g.id]:
            assert c.group == g.id
            np.testing.assert_array_equal(c.unit_of_column, g.unit_of[Dim(c.weight, c.axis)])
            if c.activation is not None:
                # The pairs agree with the analysis: a channel and its column are one unit.
                act_units = g.unit_of[Dim(c.activation, c.activation_axis)]
                np.testing.assert_array_equal(act_units[c.channel], c.unit_of_column[c.column])


# -- tests ----------------------------------------------------------------------------------


def test_cnn_residual_consumers_are_exact() -> None:
    a = spa.analyze(cnn())
    _check_complete(a)
    runner = Runner(a)
    w1_group = a.channels.group_of(Dim("w1", 0))
    cs = consumers_of(a, w1_group.id)
    # The residual sum and the Relu before it are one group: the conv after the Relu and both
    # convs after the Add read it.
    assert {c.weight for c in cs} == {"w2", "w3", "w4"}
    assert [c.weight for c in cs] == ["w2", "w3", "w4"]  # graph order
    by_w = {c.weight: c for c in cs}
    assert by_w["w2"].activation == "r" and by_w["w3"].activation == "s" and by_w["w4"].activation == "s"
    assert (by_w["w3"].receptive, by_w["w4"].receptive) == (9, 1)
    assert by_w["w2"].bias is None and by_w["w3"].bias == "b3"
    for c in cs:
        assert (c.kind, c.layout, c.axis, c.out_axis, c.activation_axis) == ("conv", "column", 1, 0, 1)
        check_exact(runner, c)


def _im2col(x: np.ndarray, kh: int, kw: int, pad: int) -> np.ndarray:
    """[N, C, H, W] → [N·H·W, C·kh·kw] with columns in (c, kh, kw) order (stride 1)."""
    n, ch, h, w = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    cols = np.stack([xp[:, :, i : i + h, j : j + w] for i in range(kh) for j in range(kw)], axis=2)  # N, C, k, H, W
    return cols.reshape(n, ch * kh * kw, h * w).transpose(0, 2, 1).reshape(n * h * w, ch * kh * kw)


def test_conv_matrix_form_is_the_im2col_layout() -> None:
    a = spa.analyze(cnn())
    runner = Runner(a)
    for c in consumers_of(a, a.channels.group_of(Dim("w1", 0))):
        w = runner.inits[c.weight]
        m = c.as_matrix(w)
        assert m.shape == (w.shape[0], w.shape[1] * c.receptive)
        np.testing.assert_array_equal(c.from_matrix(m), w)
        k = w.shape[2]
        x = runner.values[c.activation]
        y = runner.values[runner.nodes[c.node].output[0]]
        bias = runner.inits[c.bias] if c.bias else 0
        pred = _im2col(x, k, k, k // 2) @ m.T + bias
        np.testing.assert_allclose(pred, y.transpose(0, 2, 3, 1).reshape(-1, y.shape[1]), rtol=1e-4, atol=1e-4)
        # matrix_columns_of(u) are exactly the matrix columns that zeroing the unit's weight slice zeroes.
        u = c.units[-1]
        zeroed = c.as_matrix(_zero_along(w, c.axis, c.columns_of(u)))
        np.testing.assert_array_equal(np.flatnonzero((zeroed == 0).all(axis=0) & (m != 0).any(axis=0)), c.matrix_columns_of(u))


def test_concat_consumer_maps_each_producer_channel() -> None:
    a = spa.analyze(concat())
    _check_complete(a)
    cg = a.channels
    (c,) = consumers_of(a, cg.group_of(Dim("wc", 1)))
    assert cg.group_of(Dim("wa", 0)) is cg.group_of(Dim("wb", 0)) is cg.group_of(Dim("wc", 1))
    g = cg.group_of(Dim("wc", 1))
    # The Concat offset: producer b's channel j is the consumer's column 5 + j.
    for prod, offset in (("wa", 0), ("wb", 5)):
        for j, u in enumerate(g.unit_of[Dim(prod, 0)]):
            assert c.columns_of(u).tolist() == [offset + j]
    assert c.activation == "c" and c.layout == "column"
    check_exact(Runner(a), c)


@pytest.mark.parametrize("trans_b", [1, 0])
def test_flatten_gemm_owns_hw_block_per_channel(trans_b: int) -> None:
    a = spa.analyze(flatten_gemm(trans_b))
    _check_complete(a)
    runner = Runner(a)
    g = a.channels.group_of(Dim("w1", 0))
    (c,) = consumers_of(a, g)
    assert (c.kind, c.layout, c.columns_per_unit, c.activation) == ("gemm", "block", 9, "f")
    assert (c.axis, c.out_axis) == ((1, 0) if trans_b else (0, 1))
    assert (c.bias, c.weight_scale, c.bias_scale) == ("bg", 0.5, 2.0)
    check_exact(runner, c)
    # Upstream of the Flatten: zeroing conv channel k (the unit of w1's row k) equals zeroing
    # the unit's columns, whole model.
    sess, inputs, out = runner.piece(c)
    base = {i: runner._value(i) for i in inputs}
    r = runner.values["r"]
    for k in range(4):
        u = g.unit_of[Dim("w1", 0)][k]
        flat = _zero_along(r, 1, np.array([k])).reshape(1, -1)
        yb = sess.run([out], {**base, "f": flat})[0]
        ya = sess.run([out], {**base, c.weight: _zero_along(base[c.weight], c.axis, c.columns_of(u))})[0]
        assert _close(ya, yb)
        assert c.columns_of(u).tolist() == list(range(9 * k, 9 * k + 9))  # NCHW: channel k's H·W block
    # The matrix form: y = alpha · f · Mᵀ + beta · bias.
    m = c.as_matrix(runner.inits["wg"])
    pred = c.weight_scale * runner.values["f"] @ m.T + c.bias_scale * runner.inits["bg"]
    np.testing.assert_allclose(pred, runner.values[runner.proto.graph.output[0].name], rtol=1e-5, atol=1e-5)


def test_grouped_conv_reads_per_group_and_depthwise_is_no_consumer() -> None:
    a = spa.analyze(grouped())
    _check_complete(a)
    runner = Runner(a)
    cg = a.channels
    (gc,) = consumers_of(a, cg.group_of(Dim("w1", 0)))
    assert (gc.kind, gc.layout, gc.row_blocks, gc.columns_per_unit) == ("conv_grouped", "per_group", 2, 1)
    assert len(gc.units) == 4  # position j of both groups is one unit
    for u in gc.units:
        assert gc.channels_of(u).tolist() == [gc.columns_of(u)[0], gc.columns_of(u)[0] + 4]
    check_exact(runner, gc)
    # Per channel: channel ch meets column column_of(ch) in the rows of its block only.
    sess, inputs, out = runner.piece(gc)
    base = {i: runner._value(i) for i in inputs}
    x, w = base["r"], base["wg"]
    for ch in range(8):
        rows = gc.rows_of_block(gc.row_block(ch))
        wz = w.copy()
        wz[np.ix_(rows, [gc.column_of(ch)])] = 0
        ya = sess.run([out], {**base, "wg": wz})[0]
        yb = sess.run([out], {**base, "r": _zero_along(x, 1, np.array([ch]))})[0]
        assert _close(ya, yb), ch
    # The depthwise conv passes channels through (its filters are the group's rows, not
    # columns): the pointwise conv after it is the consumer of the grouped conv's channels.
    (pw,) = consumers_of(a, cg.group_of(Dim("wg", 0)))
    assert pw.weight == "wp" and pw.activation == "rd"
    assert all(c.weight != "wd" for c in consumer_view(a))
    check_exact(runner, pw)


def test_weights_through_transpose_and_dequantize() -> None:
    a = spa.analyze(through())
    _check_complete(a)
    runner = Runner(a)
    view = consumer_view(a)
    (mm,) = [c for c in view if c.activation == "x"]
    (dq,) = [c for c in view if c.activation == "r"]
    # Whatever canonicalization folded, the record names the input model's initializer axis.
    if mm.weight_path:
        assert (mm.weight, mm.axis, mm.out_axis, mm.weight_path_ops) == ("w", 1, 0, ("Transpose",))
        assert (mm.weight_input, mm.weight_input_axis) == (runner.nodes[mm.node].input[1], 0)
    assert (mm.bias, mm.bias_node) == ("b", runner.nodes[mm.bias_node].name)
    assert runner.nodes[mm.bias_node].op_type == "Add"
    check_exact(runner, mm)
    assert (dq.weight, dq.axis, dq.weight_path_ops) == ("wq", 0, ("DequantizeLinear",))
    assert dq.bias is None  # no Add after it
    check_exact(runner, dq)  # symmetric int8: a zeroed integer dequantizes to 0


def test_resnet_zoo_consumers_are_exact(zoo_onnx) -> None:
    a = spa.analyze(zoo_onnx("resnet"))
    _check_complete(a)
    runner = Runner(a)
    kinds = set()
    for c in _all_consumers(a):
        kinds.add((c.kind, c.receptive))
        check_exact(runner, c, max_units=2)
    assert {("conv", 9), ("conv", 1), ("gemm", 1)} <= kinds


def test_transformer_zoo_consumers_are_exact(zoo_onnx) -> None:
    a = spa.analyze(zoo_onnx("transformer"))
    _check_complete(a)
    runner = Runner(a)
    cs = _all_consumers(a)
    assert {c.kind for c in cs} == {"matmul"}
    assert all(c.bias is not None and runner.nodes[c.bias_node].op_type == "Add" for c in cs)
    heads = [c for c in cs if c.layout == "block"]
    # The output projections read whole heads: 4 heads × head_dim 8 columns.
    assert len(heads) == 2 and all((len(c.units), c.columns_per_unit) == (4, 8) for c in heads)
    for c in cs:
        check_exact(runner, c, max_units=2)
        m = c.as_matrix(runner.inits[c.weight])
        x = runner.values[c.activation]
        np.testing.assert_allclose(
            x.reshape(-1, x.shape[-1]) @ m.T + runner.inits[c.bias],
            runner.values[runner.nodes[c.bias_node].output[0]].reshape(-1, m.shape[0]),
            rtol=1e-4, atol=1e-5,
        )


def test_densenet_zoo_concat_consumers_are_exact(zoo_onnx) -> None:
    a = spa.analyze(zoo_onnx("densenet"))
    _check_complete(a)
    runner = Runner(a)
    for c in _all_consumers(a):
        check_exact(runner, c, max_units=2)


def test_lstm_recurrent_weight_has_no_activation(zoo_onnx) -> None:
    a = spa.analyze(zoo_onnx("lstm"))
    _check_complete(a)
    rec = [c for c in _all_consumers(a) if c.kind == "recurrent"]
    assert rec and any(c.activation is None for c in rec) and any(c.activation is not None for c in rec)
    with pytest.raises(spa.UnsupportedError):
        rec[0].as_matrix(np.zeros(rec[0].weight_shape, np.float32))


def test_json_form_round_trips() -> None:
    a = spa.analyze(flatten_gemm(1))
    view = consumer_view(a)
    doc = json.loads(json.dumps(view.to_json()))
    (g,) = [g for g in doc["groups"] if g["consumers"] and g["consumers"][0]["weight"] == "wg"]
    (c,) = g["consumers"]
    rec = view[g["id"]][0]
    assert c["node"] == rec.node and c["layout"] == "block" and c["columns_per_unit"] == 9
    assert c["unit_of_column"] == rec.unit_of_column.tolist() and len(c["channel"]) == len(c["column"]) == 36
    assert c["weight_shape"] == [5, 36] and c["weight_path"] == []
    assert rec.describe().startswith(f"{rec.group}: gemm")


def test_accepts_model_and_channel_graph_and_rejects_unknown_group() -> None:
    a = spa.analyze(cnn())
    gid = a.channels.group_of(Dim("w1", 0)).id
    assert [c.node for c in consumers_of(a.model, gid, a.channels)] == [c.node for c in consumers_of(a, gid)]
    assert [c.node for c in a.channels.consumers(a.model, gid)] == [c.node for c in consumers_of(a, gid)]
    with pytest.raises(KeyError):
        consumers_of(a, "nope")
    with pytest.raises(TypeError):
        consumer_view(a.model)


def test_the_check_catches_a_wrong_layout() -> None:
    """A view that pairs channels with the wrong columns (off by one) fails the numeric check."""
    a = spa.analyze(flatten_gemm(1))
    runner = Runner(a)
    (c,) = consumers_of(a, a.channels.group_of(Dim("w1", 0)))
    wrong = dataclasses.replace(c, column=np.roll(c.column, 1))
    with pytest.raises(AssertionError):
        check_exact(runner, wrong)
