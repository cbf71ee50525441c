"""Fuzzing ``spa.prune`` with hypothesis over protobuf-level mutations of small models.

Property: whatever the bytes, ``spa.prune(path, …)`` returns a result or raises a
:class:`~spa.errors.SpaError` (a one-line refusal); never anything else, never longer than
``LIMIT_S`` per model, and it leaves nothing in the temporary folder.

Mutations start from a small Conv/BN/Relu/Gemm model built with onnx.helper and from the
shipped ``models/demo.onnx``; they are either *structural* (a field of a node, tensor,
attribute, value info or opset set to a hostile value, nodes dropped, duplicated or
rewired) or *raw bytes* (flips, cuts, insertions in the serialized model).

Budgets:

* default suite: ``FUZZ_EXAMPLES`` examples per test (12), derandomized, a few seconds;
* long run: ``python -m pytest -m slow tests/test_fuzz.py`` (``SPA_FUZZ_LONG`` examples per
  test, 400 by default, random seeds). ``SPA_FUZZ_EXAMPLES=N`` also raises the default budget.

Every crash the fuzzer finds is added to the corpus in ``tests/test_hostile.py``.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile
import time
from datetime import timedelta

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import spa
from spa.errors import SpaError

LIMIT_S = 10.0
REPO = pathlib.Path(__file__).resolve().parent.parent
FUZZ_EXAMPLES = int(os.environ.get("SPA_FUZZ_EXAMPLES", "12"))
LONG_EXAMPLES = int(os.environ.get("SPA_FUZZ_LONG", "400"))


def _base_conv() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    inits = [
        numpy_helper.from_array(f(8, 3, 3, 3), "W1"), numpy_helper.from_array(f(8), "B1"),
        numpy_helper.from_array(np.abs(f(8)) + 1, "s"), numpy_helper.from_array(f(8), "b"),
        numpy_helper.from_array(f(8), "m"), numpy_helper.from_array(np.abs(f(8)) + 1, "v"),
        numpy_helper.from_array(f(4, 8, 1, 1), "W2"), numpy_helper.from_array(f(4 * 4 * 4, 5), "G"),
        numpy_helper.from_array(np.array([1, -1], np.int64), "shape"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2], name="conv1"),
        helper.make_node("BatchNormalization", ["c1", "s", "b", "m", "v"], ["n1"], name="bn1"),
        helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "W2"], ["c2"], name="conv2"),
        helper.make_node("Reshape", ["c2", "shape"], ["flat"], name="flatten"),
        helper.make_node("MatMul", ["flat", "G"], ["y"], name="fc"),
    ]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


BASES = {"conv": _base_conv().SerializeToString(), "demo": (REPO / "models" / "demo.onnx").read_bytes()}

# values a hostile file would put in a field
INTS = st.one_of(st.integers(-3, 10), st.sampled_from([0, -1, 2**31 - 1, 2**31, 2**40, 2**62, -(2**62)]))
NAMES = st.one_of(st.sampled_from(["", "x", "y", "W1", "c1", "r1", "ghost", "\0", "../x"]), st.text(max_size=6))


@st.composite
def structural(draw) -> bytes:
    m = onnx.ModelProto()
    m.ParseFromString(BASES[draw(st.sampled_from(sorted(BASES)))])
    g = m.graph
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["node_input", "node_output", "op_type", "drop_node", "dup_node", "dims",
                                     "dtype", "raw", "attr", "opset", "input_dim", "external", "swap", "ir"]))
        nodes, inits = g.node, g.initializer
        if kind in ("node_input", "node_output", "op_type", "drop_node", "dup_node", "attr", "swap") and not nodes:
            continue
        if kind in ("dims", "dtype", "raw", "external") and not inits:
            continue
        if kind == "node_input":
            n = nodes[draw(st.integers(0, len(nodes) - 1))]
            if n.input:
                n.input[draw(st.integers(0, len(n.input) - 1))] = draw(NAMES)
        elif kind == "node_output":
            n = nodes[draw(st.integers(0, len(nodes) - 1))]
            if n.output:
                n.output[0] = draw(NAMES)
        elif kind == "op_type":
            nodes[draw(st.integers(0, len(nodes) - 1))].op_type = draw(
                st.sampled_from(["", "Conv", "Relu", "Identity", "Gemm", "If", "Loop", "NoSuchOp", "Reshape", "Concat"]))
        elif kind == "drop_node":
            del nodes[draw(st.integers(0, len(nodes) - 1))]
        elif kind == "dup_node":
            nodes.append(nodes[draw(st.integers(0, len(nodes) - 1))])
        elif kind == "swap":
            i, j = draw(st.integers(0, len(nodes) - 1)), draw(st.integers(0, len(nodes) - 1))
            a, b = onnx.NodeProto(), onnx.NodeProto()
            a.CopyFrom(nodes[i])
            b.CopyFrom(nodes[j])
            nodes[i].CopyFrom(b)
            nodes[j].CopyFrom(a)
        elif kind == "dims":
            t = inits[draw(st.integers(0, len(inits) - 1))]
            if t.dims and draw(st.booleans()):
                t.dims[draw(st.integers(0, len(t.dims) - 1))] = draw(INTS)
            else:
                t.dims.append(draw(INTS))
        elif kind == "dtype":
            inits[draw(st.integers(0, len(inits) - 1))].data_type = draw(st.integers(0, 30))
        elif kind == "raw":
            t = inits[draw(st.integers(0, len(inits) - 1))]
            t.raw_data = t.raw_data[: draw(st.integers(0, max(len(t.raw_data), 1)))]
        elif kind == "attr":
            n = nodes[draw(st.integers(0, len(nodes) - 1))]
            name = draw(st.sampled_from(["group", "axis", "kernel_shape", "pads", "strides", "dilations", "epsilon", "perm"]))
            del n.attribute[:]
            if draw(st.booleans()):
                n.attribute.append(helper.make_attribute(name, draw(INTS)))
            else:
                n.attribute.append(helper.make_attribute(name, draw(st.lists(INTS, min_size=1, max_size=5))))
        elif kind == "opset":
            m.opset_import[0].version = draw(INTS)
        elif kind == "input_dim":
            dims = g.input[0].type.tensor_type.shape.dim
            if dims:
                dims[draw(st.integers(0, len(dims) - 1))].dim_value = draw(INTS)
        elif kind == "external":
            t = inits[draw(st.integers(0, len(inits) - 1))]
            t.data_location = TensorProto.EXTERNAL
            for key, value in (("location", draw(NAMES)), ("offset", str(draw(INTS))), ("length", str(draw(INTS)))):
                e = t.external_data.add()
                e.key, e.value = key, value
        elif kind == "ir":
            m.ir_version = draw(INTS)
    try:
        return m.SerializeToString()
    except Exception:  # noqa: BLE001 - protobuf refuses some values (an int out of range): use the bytes as they were
        return BASES["conv"]


@st.composite
def byte_level(draw) -> bytes:
    data = bytearray(BASES[draw(st.sampled_from(sorted(BASES)))])
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "set"]))
        pos = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del data[pos:pos + draw(st.integers(1, 64))]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        else:
            data[pos] = draw(st.integers(0, 255))
        if not data:
            data = bytearray(b"\0")
    return bytes(data)


def check_one(data: bytes, verify: str) -> None:
    """The property, on one serialized model."""
    work = pathlib.Path(tempfile.mkdtemp(prefix="spa-fuzz-"))
    scratch = work / "tmp"
    scratch.mkdir()
    model = work / "model" / "m.onnx"
    model.parent.mkdir()
    model.write_bytes(data)
    old = tempfile.tempdir
    tempfile.tempdir = str(scratch)
    try:
        t0 = time.monotonic()
        try:
            spa.prune(str(model), ratio=0.5, benchmark=False, verify=verify)
        except SpaError as e:
            assert "\n" not in str(e).strip(), f"a refusal of several lines: {e}"
        elapsed = time.monotonic() - t0
        assert elapsed < LIMIT_S, f"took {elapsed:.1f} s"
        assert not list(scratch.iterdir()), f"left in the temporary folder: {list(scratch.iterdir())}"
        assert sorted(p.name for p in model.parent.iterdir()) == ["m.onnx"] and model.read_bytes() == data
    finally:
        tempfile.tempdir = old
        shutil.rmtree(work, ignore_errors=True)


def _settings(n: int, **kw):
    return settings(max_examples=n, deadline=timedelta(seconds=LIMIT_S * 2), database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], **kw)


@_settings(FUZZ_EXAMPLES, derandomize=True)
@given(structural(), st.sampled_from(["none", "full"]))
def test_structural_mutations(data: bytes, verify: str) -> None:
    check_one(data, verify)


@_settings(FUZZ_EXAMPLES, derandomize=True)
@given(byte_level(), st.sampled_from(["none", "full"]))
def test_byte_mutations(data: bytes, verify: str) -> None:
    check_one(data, verify)


@pytest.mark.slow
@_settings(LONG_EXAMPLES)
@given(structural(), st.sampled_from(["none", "check", "full"]))
def test_structural_mutations_long(data: bytes, verify: str) -> None:
    check_one(data, verify)


@pytest.mark.slow
@_settings(LONG_EXAMPLES)
@given(byte_level(), st.sampled_from(["none", "check", "full"]))
def test_byte_mutations_long(data: bytes, verify: str) -> None:
    check_one(data, verify)
