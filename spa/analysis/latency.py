"""Latency on the target as a function of each layer's width: a measured lookup table.

FLOPs are a poor guide to speed (a 1×1 conv and a depthwise conv with the same FLOPs run at
very different speeds, and runtimes jump at SIMD or tile widths), so ``--latency-target`` is
allocated from measurements. Every Conv/Gemm/MatMul with a constant weight is benchmarked
alone — a one-node model at that layer's shapes — with its input and output channels kept at
fractions :data:`GRID` of their width, on the runtime the model will run on (ORT for
``--target onnx``, a TVM module otherwise). Layers of one shape share an entry, and entries
are cached in a JSON file (in ``--tuning-db`` when given), so a second run, or another model
with the same layer shapes, measures nothing.

A pruned model's latency is then predicted as the measured latency of the whole original
model minus, per layer, what its narrower version saves (bilinear in the two kept fractions).
What the table cannot see — memory traffic between layers, fusion — stays in the whole-model
term; the prediction is checked against the measured pruned model in the report.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper

__all__ = ["GRID", "Layer", "LatencyTable", "layers_of"]

logger = logging.getLogger(__name__)

#: Kept fractions of a layer's input and output channels that are measured.
GRID = (0.25, 0.5, 0.75, 1.0)
CACHE_NAME = "latency-table-v2.json"  # v2: per-call overhead subtracted


class Layer:
    """One Conv/Gemm/MatMul: its node name, the (value, axis) of its input channels and of its
    weight's output channels (what a plan's sizes say), and a shape key for the table."""

    def __init__(self, node: ir.Node, x_shape: list[int], w_shape: list[int]) -> None:
        self.node = node.name
        self.op = node.op_type
        self.x_shape = x_shape
        self.w_shape = w_shape
        self.attrs = {k: (a.value if not isinstance(a.value, (list, tuple)) else list(a.value)) for k, a in node.attributes.items()
                      if k in ("strides", "pads", "dilations", "group", "kernel_shape", "auto_pad", "transB", "transA")}
        self.x = node.inputs[0].name
        self.w = node.inputs[1].name
        if self.op == "Conv":
            self.in_axis, self.out_axis = 1, 0
        elif self.op == "Gemm":
            self.in_axis, self.out_axis = len(x_shape) - 1, (0 if self.attrs.get("transB") else 1)
        else:  # MatMul x[..., K] @ W[K, N]
            self.in_axis, self.out_axis = len(x_shape) - 1, 1

    @property
    def key(self) -> str:
        return json.dumps([self.op, self.x_shape, self.w_shape, sorted(self.attrs.items())], default=str)

    def identity(self) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
        """An Identity on this layer's input: what one call costs with no work in it. It
        carries a dummy initializer ``w`` so that it is fed and measured like the layer."""
        w = helper.make_tensor("w", TensorProto.FLOAT, [1], [0.0])
        graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, self.x_shape)],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
        x = np.random.default_rng(0).standard_normal(self.x_shape).astype(np.float32)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), {"x": x}

    def model(self, fi: float, fo: float) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
        """A one-node model of this layer with its channels kept at fractions (fi, fo)."""
        x_shape, w_shape = list(self.x_shape), list(self.w_shape)
        group = int(self.attrs.get("group", 1))
        cin = x_shape[self.in_axis]
        if self.op == "Conv" and group > 1:
            attrs = dict(self.attrs)
            if group == cin:  # depthwise: its channels are its groups, in and out in step
                keep = max(1, round(cin * min(fi, fo)))
                x_shape[1] = keep
                w_shape[0] = keep * (self.w_shape[0] // group)
                attrs["group"] = keep
        else:
            x_shape[self.in_axis] = max(1, round(cin * fi))
            w_in_axis = 1 if self.op == "Conv" or (self.op == "Gemm" and self.attrs.get("transB")) else 0
            w_shape[w_in_axis] = x_shape[self.in_axis]
            w_shape[self.out_axis] = max(1, round(self.w_shape[self.out_axis] * fo))
            attrs = dict(self.attrs)
        rng = np.random.default_rng(0)
        w = helper.make_tensor("w", TensorProto.FLOAT, w_shape, rng.standard_normal(int(np.prod(w_shape))).astype(np.float32))
        node = helper.make_node(self.op, ["x", "w"], ["y"], **{k: v for k, v in attrs.items() if v is not None})
        graph = helper.make_graph([node], "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        return proto, {"x": rng.standard_normal(x_shape).astype(np.float32)}


def layers_of(model: ir.Model, shapes: Mapping[str, list[int]]) -> list[Layer]:
    """The model's Conv/Gemm/MatMul with a constant weight and static shapes."""
    from spa.graph import all_initializers
    from spa.inputs import specialize

    static = specialize(model, shapes)
    inits = all_initializers(static.graph)
    out = []
    for node in static.graph:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.inputs) < 2 or node.inputs[1] is None:
            continue
        x, w = node.inputs[0], node.inputs[1]
        if w.name not in inits or x is None or x.shape is None or not all(isinstance(d, int) for d in x.shape):
            continue
        w_shape = list(inits[w.name].const_value.shape)
        if node.op_type != "Conv" and len(w_shape) != 2:
            continue
        out.append(Layer(node, [int(d) for d in x.shape], w_shape))
    return out


class LatencyTable:
    """Measured latency (ms) of each layer shape on the GRID of kept fractions."""

    def __init__(self, runtime: str, measure: Callable[[onnx.ModelProto, dict[str, np.ndarray]], float], cache: pathlib.Path | None = None) -> None:
        self.runtime = runtime
        self.measure = measure
        self.cache = cache
        self.entries: dict[str, list[list[float]]] = {}
        self.measured = 0
        if cache is not None and cache.is_file():
            try:
                self.entries = json.loads(cache.read_text()).get(runtime, {})
            except ValueError:
                logger.warning("latency table %s is not JSON: measuring again", cache)

    def grid(self, layer: Layer) -> np.ndarray:
        """The layer's own ms on the grid: each one-node run minus an Identity's on the same
        input (the runtime's per-call cost, which a layer inside a model does not pay; without
        this, tiny layers sum to more than the whole model)."""
        if layer.key not in self.entries:
            overhead = self.measure(*layer.identity())
            self.entries[layer.key] = [[max(self.measure(*layer.model(fi, fo)) - overhead, 0.0) for fo in GRID] for fi in GRID]
            self.measured += 1
        return np.asarray(self.entries[layer.key])

    def at(self, layer: Layer, fi: float, fo: float) -> float:
        """Bilinear interpolation on the grid (clamped to its smallest fraction)."""
        g = self.grid(layer)
        pts = np.asarray(GRID)
        fi, fo = float(np.clip(fi, pts[0], 1.0)), float(np.clip(fo, pts[0], 1.0))
        i = min(int(np.searchsorted(pts, fi, side="right")) - 1, len(pts) - 2)
        j = min(int(np.searchsorted(pts, fo, side="right")) - 1, len(pts) - 2)
        ti = (fi - pts[i]) / (pts[i + 1] - pts[i])
        tj = (fo - pts[j]) / (pts[j + 1] - pts[j])
        return float((1 - ti) * (1 - tj) * g[i, j] + ti * (1 - tj) * g[i + 1, j] + (1 - ti) * tj * g[i, j + 1] + ti * tj * g[i + 1, j + 1])

    def save(self) -> None:
        if self.cache is None:
            return
        data: dict[str, Any] = {}
        if self.cache.is_file():
            try:
                data = json.loads(self.cache.read_text())
            except ValueError:
                data = {}
        data[self.runtime] = self.entries
        tmp = self.cache.with_name(self.cache.name + ".tmp")
        tmp.write_text(json.dumps(data) + "\n")
        os.replace(tmp, self.cache)


def saving(table: LatencyTable, layers: list[Layer], size: Callable[[str, int], int | None]) -> float:
    """Predicted ms saved by the widths ``size`` gives (``pipeline._size_fn``): Σ per layer of
    its full latency minus its latency at the kept fractions."""
    total = 0.0
    for layer in layers:
        kin = size(layer.x, layer.in_axis)
        kout = size(layer.w, layer.out_axis)
        if kin is None and kout is None:
            continue
        fi = (kin if kin is not None else layer.x_shape[layer.in_axis]) / layer.x_shape[layer.in_axis]
        fo = (kout if kout is not None else layer.w_shape[layer.out_axis]) / layer.w_shape[layer.out_axis]
        total += table.at(layer, 1.0, 1.0) - table.at(layer, fi, fo)
    return total


def ort_measure(budget_s: float = 0.05) -> Callable[[onnx.ModelProto, dict[str, np.ndarray]], float]:
    """Median ms of a one-node model in ORT (spinning off, as every spa measurement)."""
    import onnxruntime as ort

    from spa import verify

    def measure(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> float:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
        sess.run(None, feeds)
        return verify.time_side_by_side([lambda: sess.run(None, feeds)], budget_s=budget_s, min_runs=5).median_ms[0]

    return measure


def tvm_measure(target: Any, budget_s: float = 0.05) -> Callable[[onnx.ModelProto, dict[str, np.ndarray]], float]:
    """Median ms of a one-node model built by TVM for ``target`` (default schedules, or the
    tuning database's when the caller built with one)."""
    from spa import verify
    from spa.kernels.build import build
    from spa.kernels.runtime import from_built

    def measure(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> float:
        module = from_built(build(proto, target, feeds))
        once = module.timer(feeds)
        once()
        return verify.time_side_by_side([once], budget_s=budget_s, min_runs=5).median_ms[0]

    return measure


def group_savings(table: LatencyTable, layers: list[Layer], groups, scores, size_of) -> dict[str, float]:
    """Predicted ms saved per removed unit of each group, when its lowest-scored half goes
    alone (``size_of(removed)`` → a size function)."""
    out: dict[str, float] = {}
    for g in groups:
        free = np.flatnonzero(~g.frozen)
        if not len(free):
            continue
        order = free[np.argsort(np.asarray(scores[g.id])[free], kind="stable")]
        half = order[: max(1, len(order) // 2)]
        out[g.id] = saving(table, layers, size_of({g.id: half})) / len(half)
    return out


def latency_weighted(scores, savings: Mapping[str, float]) -> dict[str, np.ndarray]:
    """Scores divided by each group's latency saved per unit (relative to the mean saving):
    global allocation then removes first what costs least error per millisecond saved."""
    positive = [v for v in savings.values() if v > 0]
    mean = float(np.mean(positive)) if positive else 1.0
    floor = mean * 1e-3
    return {gid: np.asarray(sc, dtype=np.float64) / (max(savings.get(gid, 0.0), floor) / mean) for gid, sc in scores.items()}
