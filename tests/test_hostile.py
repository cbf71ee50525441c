"""A corpus of malformed and hostile models, run through ``spa prune`` as a user would.

Every case is built here (onnx.helper or raw bytes, nothing downloaded) in its own folder and
run as its own process: the CLI's ``main`` in a child forked from a worker that imported spa
once (a fresh ``python -m spa.cli`` costs ~4 s of imports per case; the fork keeps the corpus
inside the default suite). Each child gets ``TMPDIR`` pointed at a fresh empty folder and an
audit hook (``sys.addaudithook``) that logs every file the Python side opens. For every case:

* the exit status (2 for a refusal; some valid-but-unusual models may prune: 0);
* stderr is one line, ``spa: error: …``, naming the file, without "Traceback";
* it answers within ``LIMIT_S`` seconds;
* no file in the model's folder is created or changed, and the temporary folder is empty;
* for external-data escapes, the file outside the folder was never opened.

A few cases also run as a real ``python -m spa.cli`` process (the exit status a build script
sees), and SIGTERM mid-run is checked to leave no temporary files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

LIMIT_S = 10.0
REPO = pathlib.Path(__file__).resolve().parent.parent
SECRET = "secret.bin"  # the file outside the model's folder that must never be opened

# --------------------------------------------------------------------------------------------
# the worker: imports spa once, forks one child per case
# --------------------------------------------------------------------------------------------

WORKER = r'''
import json, os, sys, time, signal
import spa.cli, spa.pipeline, spa.io, onnx, onnx_ir, numpy, onnxruntime  # imported once
for line in sys.stdin:
    req = json.loads(line)
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        os.chdir(req["cwd"])
        os.environ["TMPDIR"] = req["tmpdir"]
        import tempfile
        tempfile.tempdir = None
        out = os.open(req["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        err = os.open(req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        log = open(req["audit"], "w", buffering=1)
        os.dup2(out, 1); os.dup2(err, 2)
        os.close(0)
        def hook(event, args, _log=log):
            if event == "open" and args and isinstance(args[0], (str, bytes)):
                _log.write(os.fsdecode(args[0]).replace("\n", "\\n") + "\n")
        sys.addaudithook(hook)
        sys.argv = ["spa", *req["args"]]
        code = 0
        try:
            spa.cli.main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            import traceback; traceback.print_exc(); code = 1
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code)
    deadline = t0 + req["timeout"]
    status = None
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.01)
    else:
        os.kill(pid, signal.SIGKILL); os.waitpid(pid, 0); status = None
    elapsed = time.monotonic() - t0
    rc = None if status is None else (os.waitstatus_to_exitcode(status))
    print(json.dumps({"rc": rc, "elapsed": elapsed}), flush=True)
'''


class Worker:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            cwd=REPO,
        )

    def run(self, args: list[str], case_dir: pathlib.Path, timeout: float) -> Result:
        io_dir = case_dir.parent / f"{case_dir.name}-io"
        io_dir.mkdir()
        tmp = case_dir.parent / f"{case_dir.name}-tmp"
        tmp.mkdir()
        req = {
            "args": args, "cwd": str(case_dir), "tmpdir": str(tmp), "timeout": timeout,
            "stdout": str(io_dir / "stdout"), "stderr": str(io_dir / "stderr"), "audit": str(io_dir / "audit"),
        }
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        reply = json.loads(self.proc.stdout.readline())
        return Result(
            rc=reply["rc"], elapsed=reply["elapsed"],
            stdout=(io_dir / "stdout").read_text(errors="replace"),
            stderr=(io_dir / "stderr").read_text(errors="replace"),
            opened=[ln for ln in (io_dir / "audit").read_text(errors="replace").splitlines() if ln],
            tmp_left=sorted(p.name for p in tmp.iterdir()),
        )

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(timeout=30)


@dataclasses.dataclass
class Result:
    rc: int | None
    elapsed: float
    stdout: str
    stderr: str
    opened: list[str]
    tmp_left: list[str]


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    yield w
    w.close()


# --------------------------------------------------------------------------------------------
# model builders
# --------------------------------------------------------------------------------------------

RNG = np.random.default_rng(0)


def f32(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def conv_model(*, w1: np.ndarray | None = None, x_shape=(1, 3, 8, 8), opset: int = 17, dtype=TensorProto.FLOAT,
               extra_inits=(), extra_nodes=(), mutate=None) -> onnx.ModelProto:
    """x -> Conv(W1, B1) -> Relu -> Conv(W2) -> y: one prunable group of 8 channels."""
    np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
    w1 = f32(8, 3, 3, 3) if w1 is None else w1
    inits = [
        numpy_helper.from_array(w1.astype(np_dtype), "W1"),
        numpy_helper.from_array(f32(8).astype(np_dtype), "B1"),
        numpy_helper.from_array(f32(4, 8, 1, 1).astype(np_dtype), "W2"),
        *extra_inits,
    ]
    nodes = [
        helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "W2"], ["y"], name="conv2"),
        *extra_nodes,
    ]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", dtype, list(x_shape))],
                          [helper.make_tensor_value_info("y", dtype, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    if mutate is not None:
        mutate(m)
    return m


def save(m: onnx.ModelProto, d: pathlib.Path, name: str = "model.onnx") -> pathlib.Path:
    p = d / name
    p.write_bytes(m.SerializeToString())
    return p


def raw(data: bytes) -> Callable[[pathlib.Path], pathlib.Path]:
    def build(d: pathlib.Path) -> pathlib.Path:
        p = d / "model.onnx"
        p.write_bytes(data)
        return p
    return build


def proto(make: Callable[[], onnx.ModelProto]) -> Callable[[pathlib.Path], pathlib.Path]:
    return lambda d: save(make(), d)


def _external(m: onnx.ModelProto, name: str, location: str, offset: int | str | None = 0,
              length: int | str | None = None) -> onnx.ModelProto:
    """Point initializer ``name`` at external data ``location`` (its bytes dropped)."""
    t = next(i for i in m.graph.initializer if i.name == name)
    nbytes = len(numpy_helper.to_array(t).tobytes())
    t.ClearField("raw_data")
    t.ClearField("float_data")
    t.data_location = TensorProto.EXTERNAL
    del t.external_data[:]
    entries = [("location", location)]
    if offset is not None:
        entries.append(("offset", str(offset)))
    entries.append(("length", str(nbytes if length is None else length)))
    for k, v in entries:
        e = t.external_data.add()
        e.key, e.value = k, v
    return m


def external_case(location: str | Callable[[pathlib.Path], str], *, setup=None, offset=0, length=None,
                  data_bytes: int = 8 * 3 * 3 * 3 * 4):
    """A model whose W1 is read from ``location``; ``setup(case_dir)`` prepares files."""

    def build(d: pathlib.Path) -> pathlib.Path:
        if setup is not None:
            setup(d)
        loc = location(d) if callable(location) else location
        return save(_external(conv_model(), "W1", loc, offset, length), d)

    return build


def outside(d: pathlib.Path) -> pathlib.Path:
    """A folder beside the model's, holding the file that must never be opened."""
    o = d.parent / f"{d.name}-outside"
    o.mkdir(exist_ok=True)
    (o / SECRET).write_bytes(b"\1" * 4096)
    return o


def _symlink_data(d: pathlib.Path) -> None:
    os.symlink(outside(d) / SECRET, d / "weights.bin")


def _symlink_folder(d: pathlib.Path) -> None:
    os.symlink(outside(d), d / "sub")


def _relative_symlink(d: pathlib.Path) -> None:
    outside(d)
    os.symlink(f"../{d.name}-outside/{SECRET}", d / "weights.bin")


def _fifo(d: pathlib.Path) -> None:
    os.mkfifo(d / "weights.bin")


def _device_link(d: pathlib.Path) -> None:
    os.symlink("/dev/zero", d / "weights.bin")


def _data_dir(d: pathlib.Path) -> None:
    (d / "weights.bin").mkdir()


def _data_file(size: int) -> Callable[[pathlib.Path], None]:
    return lambda d: (d / "weights.bin").write_bytes(b"\0" * size)


def _set_init(m: onnx.ModelProto, name: str, **fields) -> None:
    t = next(i for i in m.graph.initializer if i.name == name)
    for k, v in fields.items():
        if k == "dims":
            del t.dims[:]
            t.dims.extend(v)
        else:
            setattr(t, k, v)


def _m(fn: Callable[[onnx.ModelProto], None], **kw) -> Callable[[], onnx.ModelProto]:
    return lambda: conv_model(mutate=fn, **kw)


def _cycle(m: onnx.ModelProto) -> None:
    # relu1 reads the output of conv2's new twin, which reads relu1: a loop through two nodes
    m.graph.node[1].input[0] = "loop"
    m.graph.node.append(helper.make_node("Add", ["r1", "c1"], ["loop"], name="back"))


def _self_loop(m: onnx.ModelProto) -> None:
    m.graph.node[1].input[0] = "r1"


def _dangling(m: onnx.ModelProto) -> None:
    m.graph.node[1].input[0] = "nobody_makes_this"


def _dangling_output(m: onnx.ModelProto) -> None:
    m.graph.output.append(helper.make_tensor_value_info("ghost", TensorProto.FLOAT, None))


def _duplicate_producer(m: onnx.ModelProto) -> None:
    m.graph.node.insert(2, helper.make_node("Sigmoid", ["c1"], ["r1"], name="twin"))


def _init_shadows_output(m: onnx.ModelProto) -> None:
    m.graph.initializer.append(numpy_helper.from_array(f32(8), "c1"))


def _huge_no_data(m: onnx.ModelProto) -> None:
    t = TensorProto(name="Huge", data_type=TensorProto.FLOAT, dims=[2**20, 2**20])
    m.graph.initializer.append(t)
    m.graph.node.append(helper.make_node("Identity", ["Huge"], ["h_out"]))
    m.graph.output.append(helper.make_tensor_value_info("h_out", TensorProto.FLOAT, None))


def _huge_conv_weight(m: onnx.ModelProto) -> None:
    _set_init(m, "W1", dims=[2**20, 2**20, 1, 1], raw_data=b"")


def _float_data_short(m: onnx.ModelProto) -> None:
    t = next(i for i in m.graph.initializer if i.name == "B1")
    t.ClearField("raw_data")
    t.float_data.extend([1.0, 2.0])


def _negative_dim(m: onnx.ModelProto) -> None:
    _set_init(m, "B1", dims=[-8])


def _undefined_dtype(m: onnx.ModelProto) -> None:
    _set_init(m, "B1", data_type=TensorProto.UNDEFINED)


def _unknown_dtype(m: onnx.ModelProto) -> None:
    _set_init(m, "B1", data_type=77)


def _string_weight(m: onnx.ModelProto) -> None:
    t = helper.make_tensor("W1", TensorProto.STRING, [8, 3, 3, 3], [b"a"] * 216)
    m.graph.initializer[0].CopyFrom(t)


def _vi_disagrees(m: onnx.ModelProto) -> None:
    m.graph.value_info.append(helper.make_tensor_value_info("W1", TensorProto.FLOAT, [5, 3, 3, 3]))


def _input_init_disagree(m: onnx.ModelProto) -> None:
    m.graph.input.append(helper.make_tensor_value_info("W2", TensorProto.FLOAT, [4, 9, 1, 1]))


def _conv_rank(m: onnx.ModelProto) -> None:
    m.graph.initializer[0].CopyFrom(numpy_helper.from_array(f32(8, 27), "W1"))


def _conv_channels(m: onnx.ModelProto) -> None:
    m.graph.initializer[0].CopyFrom(numpy_helper.from_array(f32(8, 5, 3, 3), "W1"))


def _bias_len(m: onnx.ModelProto) -> None:
    m.graph.initializer[1].CopyFrom(numpy_helper.from_array(f32(7), "B1"))


def _group_zero(m: onnx.ModelProto) -> None:
    m.graph.node[0].attribute.append(helper.make_attribute("group", 0))


def _kernel_attr_type(m: onnx.ModelProto) -> None:
    m.graph.node[0].attribute.append(helper.make_attribute("kernel_shape", "3x3"))


def _empty_conv_output(m: onnx.ModelProto) -> None:
    # a 3x3 kernel dilated 5x spans 11 pixels of the 10 (8 + padding): the output is [1, 8, 0, 0]
    m.graph.node[0].attribute.append(helper.make_attribute("dilations", [5, 5]))


def _empty_op(m: onnx.ModelProto) -> None:
    m.graph.node[1].op_type = ""


def _unknown_op(m: onnx.ModelProto) -> None:
    m.graph.node[1].op_type = "NoSuchOperator"


def _empty_names(m: onnx.ModelProto) -> None:
    m.graph.node[1].output[0] = ""


def _opset_huge(m: onnx.ModelProto) -> None:
    m.opset_import[0].version = 2**62


def _ir_version_huge(m: onnx.ModelProto) -> None:
    m.ir_version = 2**40


def _ir_version_negative(m: onnx.ModelProto) -> None:
    m.ir_version = -1


def _dup_output(m: onnx.ModelProto) -> None:
    m.graph.output.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, None))


def _huge_input(m: onnx.ModelProto) -> None:
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2**40


def _rank_huge(m: onnx.ModelProto) -> None:
    dims = m.graph.input[0].type.tensor_type.shape.dim
    for _ in range(100):
        dims.add().dim_value = 1


def _shape_op(op: str) -> Callable[[onnx.ModelProto], None]:
    """A node whose constant arguments build a 2^40-element tensor, if anything evaluated it."""
    def mutate(m: onnx.ModelProto) -> None:
        big = numpy_helper.from_array(np.array([2**20, 2**20], np.int64), "big")
        m.graph.initializer.append(big)
        if op == "ConstantOfShape":
            node = helper.make_node("ConstantOfShape", ["big"], ["huge"])
        elif op == "Expand":
            m.graph.initializer.append(numpy_helper.from_array(np.ones((1, 1), np.float32), "one"))
            node = helper.make_node("Expand", ["one", "big"], ["huge"])
        elif op == "Tile":
            m.graph.initializer.append(numpy_helper.from_array(np.ones((1, 1), np.float32), "one"))
            node = helper.make_node("Tile", ["one", "big"], ["huge"])
        else:  # Reshape of a ConstantOfShape into [2^40]
            m.graph.initializer.append(numpy_helper.from_array(np.array([2**40], np.int64), "flat"))
            m.graph.node.append(helper.make_node("ConstantOfShape", ["big"], ["pre"]))
            node = helper.make_node("Reshape", ["pre", "flat"], ["huge"])
        m.graph.node.append(node)
        m.graph.node.append(helper.make_node("ReduceSum", ["huge"], ["total"], keepdims=0))
        m.graph.output.append(helper.make_tensor_value_info("total", TensorProto.FLOAT, None))
    return mutate


def _recursive_function(m: onnx.ModelProto) -> None:
    f = helper.make_function("local", "Loopy", ["a"], ["b"], [helper.make_node("Loopy", ["a"], ["b"], domain="local")],
                             [helper.make_opsetid("", 17), helper.make_opsetid("local", 1)])
    m.functions.append(f)
    m.opset_import.append(helper.make_opsetid("local", 1))
    m.graph.node[1].op_type = "Loopy"
    m.graph.node[1].domain = "local"


def _if_missing_branch(m: onnx.ModelProto) -> None:
    cond = numpy_helper.from_array(np.array(True), "cond")
    m.graph.initializer.append(cond)
    then = helper.make_graph([helper.make_node("Identity", ["r1"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    m.graph.node[2].input[0] = "branch"
    m.graph.node.insert(2, helper.make_node("If", ["cond"], ["branch"], then_branch=then))


def _sparse_init(m: onnx.ModelProto) -> None:
    values = numpy_helper.from_array(np.array([1.0, 2.0], np.float32), "S")
    indices = numpy_helper.from_array(np.array([0, 10**12], np.int64), "S_idx")
    m.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [8]))


def _nested_bytes(depth: int) -> bytes:
    """Raw protobuf: ModelProto.graph → GraphProto.node → NodeProto.attribute → AttributeProto.g → …"""
    def ld(field: int, payload: bytes) -> bytes:
        key = (field << 3) | 2
        return _varint(key) + _varint(len(payload)) + payload
    inner = b""
    for _ in range(depth):
        attr = ld(1, b"then_branch") + _varint((20 << 3) | 0) + _varint(5) + ld(6, inner)  # name, type=GRAPH, g
        node = ld(4, b"If") + ld(5, attr)  # op_type, attribute
        inner = ld(1, node)  # GraphProto.node
    model = _varint((1 << 3) | 0) + _varint(8) + ld(7, inner) + ld(8, ld(1, b"") + _varint((2 << 3) | 0) + _varint(17))
    return model


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _huge_length_prefix() -> bytes:
    return _varint((7 << 3) | 2) + _varint(2**62) + b"\0" * 16


def _bn_negative_var() -> onnx.ModelProto:
    m = conv_model()
    m.graph.node[1].input[0] = "bn"
    m.graph.node.insert(1, helper.make_node("BatchNormalization", ["c1", "g", "b", "mu", "var"], ["bn"], name="bn1"))
    m.graph.initializer.extend([
        numpy_helper.from_array(np.ones(8, np.float32), "g"), numpy_helper.from_array(np.zeros(8, np.float32), "b"),
        numpy_helper.from_array(np.zeros(8, np.float32), "mu"),
        numpy_helper.from_array(-np.ones(8, np.float32), "var"),
    ])
    return m


def _identity_chain(n: int) -> Callable[[pathlib.Path], pathlib.Path]:
    def build(d: pathlib.Path) -> pathlib.Path:
        m = conv_model()
        m.graph.node[2].input[0] = f"id{n}"
        chain = [helper.make_node("Identity", ["r1" if i == 0 else f"id{i}"], [f"id{i + 1}"]) for i in range(n)]
        nodes = list(m.graph.node)
        del m.graph.node[:]
        m.graph.node.extend(nodes[:2] + chain + nodes[2:])
        return save(m, d)
    return build


def _deep_if(depth: int) -> onnx.ModelProto:
    m = conv_model()
    m.graph.initializer.append(numpy_helper.from_array(np.array(True), "cond"))
    body_out = "r1"
    inner = None
    for level in range(depth):
        out = f"if{level}"
        if inner is None:
            then = helper.make_graph([helper.make_node("Identity", ["r1"], [out + "_t"])], f"t{level}", [],
                                     [helper.make_tensor_value_info(out + "_t", TensorProto.FLOAT, None)])
        else:
            then = inner
        els = helper.make_graph([helper.make_node("Identity", ["r1"], [out + "_e"])], f"e{level}", [],
                                [helper.make_tensor_value_info(out + "_e", TensorProto.FLOAT, None)])
        node = helper.make_node("If", ["cond"], [out], then_branch=then, else_branch=els)
        inner = helper.make_graph([node], f"g{level}", [], [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)])
        body_out = out
    m.graph.node.insert(2, inner.node[0])
    m.graph.node[3].input[0] = body_out
    return m


def _weights_as_inputs() -> onnx.ModelProto:
    m = conv_model()
    for t in m.graph.initializer:
        m.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return m


def _custom_op() -> onnx.ModelProto:
    m = conv_model()
    m.graph.node[1].op_type = "FancyRelu"
    m.graph.node[1].domain = "com.example"
    m.opset_import.append(helper.make_opsetid("com.example", 1))
    return m


def _custom_no_import(m: onnx.ModelProto) -> None:
    m.graph.node[1].op_type = "MyOp"
    m.graph.node[1].domain = "com.vendor"


def _custom_op_in_function() -> onnx.ModelProto:
    m = conv_model()
    f = helper.make_function("com.example", "FancyRelu", ["a"], ["b"], [helper.make_node("Relu", ["a"], ["b"])],
                             [helper.make_opsetid("", 17)])
    m.functions.append(f)
    m.opset_import.append(helper.make_opsetid("com.example", 1))
    m.graph.node[1].op_type = "FancyRelu"
    m.graph.node[1].domain = "com.example"
    return m


def _vendor_op() -> onnx.ModelProto:
    """x → Conv → Relu → Conv → com.vendor::MyOp → Conv → y: the first group is prunable, the
    one through the custom op (which spa has no rule for, ORT no kernel for) is frozen."""
    inits = [numpy_helper.from_array(f32(8, 3, 3, 3), "W1"), numpy_helper.from_array(f32(8), "B1"),
             numpy_helper.from_array(f32(6, 8, 3, 3), "W2"), numpy_helper.from_array(f32(4, 6, 1, 1), "W3")]
    nodes = [
        helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "W2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("MyOp", ["c2"], ["m2"], name="myop", domain="com.vendor", alpha=0.5),
        helper.make_node("Conv", ["m2", "W3"], ["y"], name="conv3"),
    ]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.vendor", 1)],
                             ir_version=8)


# --------------------------------------------------------------------------------------------
# the corpus
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Case:
    build: Callable[[pathlib.Path], pathlib.Path]
    #: "refused": exit 2; "either": exit 0 (pruned, written) or 2 (refused with a reason);
    #: "pruned": exit 0 (pruned, written).
    expect: str = "refused"
    #: the message must match this (lower-cased substring), beyond naming the file
    says: str | None = None
    #: the file outside the folder must never be opened
    escape: bool = False
    args: tuple[str, ...] = ()


W1_BYTES = 8 * 3 * 3 * 3 * 4

CORPUS: dict[str, Case] = {
    # ---- raw bytes
    "empty file": Case(raw(b""), says="empty"),
    "text file": Case(raw(b"hello, I am not a model\n" * 10), says="not a valid onnx model"),
    "random bytes": Case(raw(bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8))), says="not a valid onnx"),
    "truncated": Case(lambda d: (d / "model.onnx").write_bytes(conv_model().SerializeToString()[:300]) and d / "model.onnx"),
    "huge length prefix": Case(raw(_huge_length_prefix())),
    "nested 2000 deep": Case(raw(_nested_bytes(2000))),
    "nested 60 deep": Case(raw(_nested_bytes(60))),
    "no graph": Case(raw(onnx.ModelProto(ir_version=8).SerializeToString())),
    # found by tests/test_fuzz.py: an op_type whose bytes are not UTF-8 (the checker's C++ choked)
    "op_type not UTF-8": Case(raw(_bn_negative_var().SerializeToString().replace(b"BatchNormalization", b"\x80atchNormalization")),
                              says="utf-8"),
    # found by tests/test_fuzz.py: a node name whose bytes are not UTF-8 (onnx-ir's serializer choked)
    "node name not UTF-8": Case(raw(_bn_negative_var().SerializeToString().replace(b"\x03bn1", b"\x03\x80n1")),
                                says="utf-8"),
    # ---- file types
    "fifo model": Case(lambda d: (os.mkfifo(d / "model.onnx"), d / "model.onnx")[1], says="fifo"),
    "directory model": Case(lambda d: ((d / "model.onnx").mkdir(), d / "model.onnx")[1], says="directory"),
    # ---- external data: escapes
    "external absolute path": Case(external_case(lambda d: str(outside(d) / SECRET)), says="outside", escape=True),
    "external dot-dot": Case(external_case(lambda d: f"../{outside(d).name}/{SECRET}"), says="outside", escape=True),
    "external dot-dot inside": Case(external_case(lambda d: f"sub/../../{outside(d).name}/{SECRET}",
                                                  setup=lambda d: (d / "sub").mkdir()), says="outside", escape=True),
    "external symlinked file": Case(external_case("weights.bin", setup=_symlink_data), says="symlink", escape=True),
    "external relative symlink": Case(external_case("weights.bin", setup=_relative_symlink), says="symlink", escape=True),
    "external symlinked folder": Case(external_case(f"sub/{SECRET}", setup=_symlink_folder), says="symlink", escape=True),
    "external NUL in location": Case(external_case("weights.bin\0../../etc/passwd", setup=_data_file(W1_BYTES)), says="nul"),
    "external empty location": Case(external_case("", setup=_data_file(W1_BYTES)), says="empty"),
    "external location is dot": Case(external_case(".", setup=_data_file(W1_BYTES))),
    "external fifo": Case(external_case("weights.bin", setup=_fifo), says="fifo"),
    "external device symlink": Case(external_case("weights.bin", setup=_device_link)),
    "external directory": Case(external_case("weights.bin", setup=_data_dir), says="not a regular file"),
    "external missing": Case(external_case("weights.bin"), says="missing"),
    "external offset past end": Case(external_case("weights.bin", setup=_data_file(W1_BYTES), offset=10**6), says="too short"),
    "external negative offset": Case(external_case("weights.bin", setup=_data_file(W1_BYTES), offset=-64), says="offset"),
    "external offset not a number": Case(external_case("weights.bin", setup=_data_file(W1_BYTES), offset="abc"), says="offset"),
    "external offset 2^63": Case(external_case("weights.bin", setup=_data_file(W1_BYTES), offset=2**63), says="offset"),
    "external length short": Case(external_case("weights.bin", setup=_data_file(W1_BYTES), length=10), says="length"),
    "external length huge": Case(external_case("weights.bin", setup=_data_file(W1_BYTES), length=2**62), says="length"),
    "external file short": Case(external_case("weights.bin", setup=_data_file(100)), says="too short"),
    # ---- structure
    "cycle": Case(proto(_m(_cycle)), says="cycle"),
    "self loop": Case(proto(_m(_self_loop)), says="cycle"),
    "dangling input": Case(proto(_m(_dangling)), says="nobody_makes_this"),
    "dangling graph output": Case(proto(_m(_dangling_output)), says="ghost"),
    "duplicate producer": Case(proto(_m(_duplicate_producer)), says="r1"),
    "initializer shadows a node output": Case(proto(_m(_init_shadows_output)), says="c1"),
    "duplicate graph output": Case(proto(_m(_dup_output)), expect="either"),
    "empty value name": Case(proto(_m(_empty_names))),
    "recursive local function": Case(proto(_m(_recursive_function)), says="recurs"),
    "If without else branch": Case(proto(_m(_if_missing_branch)), says="else_branch"),
    # ---- tensors
    "2^40 initializer without data": Case(proto(_m(_huge_no_data)), says="huge"),
    "2^40 conv weight without data": Case(proto(_m(_huge_conv_weight)), says="w1"),
    "float_data too short": Case(proto(_m(_float_data_short)), says="b1"),
    "negative dim": Case(proto(_m(_negative_dim)), says="b1"),
    "UNDEFINED dtype": Case(proto(_m(_undefined_dtype)), says="b1"),
    "unknown dtype 77": Case(proto(_m(_unknown_dtype)), says="b1"),
    "string conv weight": Case(proto(_m(_string_weight)), says="w1"),
    "sparse initializer out of range": Case(proto(_m(_sparse_init)), expect="either"),
    "value_info disagrees with initializer": Case(proto(_m(_vi_disagrees)), says="w1"),
    "graph input disagrees with initializer": Case(proto(_m(_input_init_disagree)), says="w2"),
    # ---- ops
    "conv weight of wrong rank": Case(proto(_m(_conv_rank)), says="conv1"),
    "conv weight channels mismatch": Case(proto(_m(_conv_channels)), says="conv1"),
    "conv bias length": Case(proto(_m(_bias_len)), says="conv1"),
    "conv group 0": Case(proto(_m(_group_zero)), says="conv1"),
    "attribute of wrong type": Case(proto(_m(_kernel_attr_type)), says="kernel_shape"),
    "empty op type": Case(proto(_m(_empty_op))),
    "unknown op": Case(proto(_m(_unknown_op)), says="nosuchoperator"),
    "opset 2^62": Case(proto(_m(_opset_huge)), says="opset"),
    "ir_version 2^40": Case(proto(_m(_ir_version_huge)), says="ir_version"),
    # found by tests/test_fuzz.py: a negative ir_version crashed onnx's checker binding (TypeError)
    "ir_version -1": Case(proto(_m(_ir_version_negative)), says="ir_version"),
    # ---- resources
    "input dim 2^40": Case(proto(_m(_huge_input)), says="x"),
    "input rank 104": Case(proto(_m(_rank_huge)), expect="either"),
    # found by tests/test_fuzz.py: an intermediate that shape inference makes empty crashed the analysis
    "Conv output inferred empty": Case(proto(_m(_empty_conv_output)), says="empty"),
    "ConstantOfShape 2^40": Case(proto(_m(_shape_op("ConstantOfShape"))), expect="either"),
    "Expand 2^40": Case(proto(_m(_shape_op("Expand"))), expect="either"),
    "Tile 2^40": Case(proto(_m(_shape_op("Tile"))), expect="either"),
    "Reshape 2^40": Case(proto(_m(_shape_op("Reshape"))), expect="either"),
    # ---- valid but unusual: prune (unknown parts frozen) or refuse with a reason
    "zero-size batch": Case(proto(lambda: conv_model(x_shape=(0, 3, 8, 8))), expect="either"),
    "BN negative variance": Case(proto(_bn_negative_var), says="nan"),
    "custom op": Case(proto(_custom_op), expect="either"),
    "custom op as local function": Case(proto(_custom_op_in_function), expect="either"),
    # ORT has no kernel for a vendor's op, so the default --verify full cannot run: refused, saying
    # what to pass instead; --verify check / none prune it (see test_custom_op_prunes_around_it)
    "custom op, --verify full": Case(proto(_vendor_op), says="custom op com.vendor::myop"),
    "custom op, --verify check": Case(proto(_vendor_op), expect="pruned", args=("--verify", "check")),
    "custom op, --verify none": Case(proto(_vendor_op), expect="pruned", args=("--verify", "none")),
    "custom op without opset import": Case(proto(_m(_custom_no_import)), says="com.vendor"),
    "deep If nesting": Case(proto(lambda: _deep_if(20)), expect="either"),
    "weights as graph inputs": Case(proto(_weights_as_inputs), expect="either"),
    "fp16": Case(proto(lambda: conv_model(dtype=TensorProto.FLOAT16)), expect="either"),
    "identity chain 1k": Case(_identity_chain(1_000), expect="either"),
}


def snapshot(folder: pathlib.Path) -> dict[str, tuple]:
    out = {}
    for p in sorted(folder.rglob("*")):
        st = os.lstat(p)
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink() else None
        out[str(p.relative_to(folder))] = (st.st_mode, st.st_size, st.st_mtime_ns, digest)
    return out


def run_case(worker: Worker, tmp_path: pathlib.Path, case: Case, args: tuple[str, ...] = ()) -> tuple[Result, pathlib.Path]:
    d = tmp_path / "case"
    d.mkdir()
    model = case.build(d)
    before = snapshot(d)
    out = tmp_path / "out" / "pruned.onnx"
    out.parent.mkdir()
    cli_args = ["prune", str(model), "-o", str(out), "--no-bench", "--quiet", *case.args, *args]
    res = worker.run(cli_args, d, timeout=LIMIT_S * 3)
    assert snapshot(d) == before, "the model's folder changed"
    assert res.tmp_left == [], f"left in the temporary folder: {res.tmp_left}"
    if res.rc != 0:
        assert not out.parent.exists() or not list(out.parent.iterdir()), "a failed run wrote output"
    return res, model


def assert_one_line_refusal(res: Result, model: pathlib.Path) -> str:
    assert res.rc == 2, f"exit {res.rc}: {res.stderr[-3000:]}"
    assert "Traceback" not in res.stderr, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("spa: error:"), lines[0]
    assert str(model) in lines[0] or model.name in lines[0], f"the message does not name the file: {lines[0]}"
    return lines[0]


@pytest.mark.parametrize("name", list(CORPUS))
def test_corpus(worker: Worker, tmp_path: pathlib.Path, name: str) -> None:
    case = CORPUS[name]
    res, model = run_case(worker, tmp_path, case)
    assert res.elapsed < LIMIT_S, f"took {res.elapsed:.1f} s"
    if case.expect == "refused" or (res.rc != 0 and case.expect != "pruned"):
        line = assert_one_line_refusal(res, model)
        if case.says:
            assert case.says in line.lower(), line
    else:
        assert res.rc == 0 and (tmp_path / "out" / "pruned.onnx").exists(), res.stderr
    if case.escape:
        secret = [p for p in res.opened if SECRET in p]
        assert not secret, f"opened outside the folder: {secret}"
    strays = [p for p in res.opened if p.startswith(str(tmp_path)) and not (
        p.startswith(str(tmp_path / "case") + os.sep) or p.startswith(str(tmp_path / "out"))
        or p.startswith(str(tmp_path / "case-io")) or p.startswith(str(tmp_path / "case-tmp")))]
    assert not strays, f"opened outside the model's folder: {strays}"


def test_corpus_is_large_enough() -> None:
    assert len(CORPUS) >= 40


# --------------------------------------------------------------------------------------------
# the named errors, in-process
# --------------------------------------------------------------------------------------------

NAMED = {
    "external symlinked file": "UnsafePathError",
    "external symlinked folder": "UnsafePathError",
    "external NUL in location": "UnsafePathError",
    "external dot-dot": "UnsafePathError",
    "cycle": "CycleError",
    "recursive local function": "CycleError",
    "dangling input": "DanglingValueError",
    "duplicate producer": "DuplicateProducerError",
    "2^40 initializer without data": "ShapeMismatchError",
    "value_info disagrees with initializer": "ShapeMismatchError",
    "UNDEFINED dtype": "UnknownDataTypeError",
    "unknown dtype 77": "UnknownDataTypeError",
    "conv weight of wrong rank": "InvalidNodeError",
    "input dim 2^40": "MemoryLimitError",
    "BN negative variance": "NonFiniteOutputError",
}


@pytest.mark.parametrize("name", list(NAMED))
def test_named_error_class(tmp_path: pathlib.Path, name: str) -> None:
    import spa
    from spa import errors

    d = tmp_path / "case"
    d.mkdir()
    model = CORPUS[name].build(d)
    with pytest.raises(getattr(errors, NAMED[name])) as info:
        spa.prune(str(model), ratio=0.5, benchmark=False)
    assert "\n" not in str(info.value)


def test_nan_output_is_named(worker: Worker, tmp_path: pathlib.Path) -> None:
    res, model = run_case(worker, tmp_path, CORPUS["BN negative variance"])
    line = assert_one_line_refusal(res, model)
    assert "already produces nan/inf on output 'y'" in line.lower()


def test_max_memory_flag(worker: Worker, tmp_path: pathlib.Path) -> None:
    """A model that fits by default is refused under a small ceiling, naming the flag."""
    res, model = run_case(worker, tmp_path, Case(proto(conv_model)), args=("--max-memory", "2K"))
    line = assert_one_line_refusal(res, model)
    assert "--max-memory" in line and "2.0 KiB" in line


def test_max_memory_bad_size(worker: Worker, tmp_path: pathlib.Path) -> None:
    res, _ = run_case(worker, tmp_path, Case(proto(conv_model)), args=("--max-memory", "lots"))
    assert res.rc == 2 and "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_unusual_but_valid_models_prune(worker: Worker, tmp_path: pathlib.Path) -> None:
    """fp16 and weights-as-inputs models are pruned, not refused (they are valid)."""
    for name in ("fp16", "weights as graph inputs"):
        sub = tmp_path / name.replace(" ", "-")
        sub.mkdir()
        res, _ = run_case(worker, sub, CORPUS[name])
        assert res.rc == 0, res.stderr


def _as_relu(m: onnx.ModelProto) -> onnx.ModelProto:
    """The model with com.vendor::MyOp read as a plain Relu, so that ONNX Runtime runs it."""
    m = onnx.ModelProto.FromString(m.SerializeToString())
    for node in m.graph.node:
        if node.domain == "com.vendor":
            node.domain, node.op_type = "", "Relu"
            del node.attribute[:]
    return m


def _ort(m: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@pytest.mark.parametrize("verify", ["check", "none"])
def test_custom_op_prunes_around_it(tmp_path: pathlib.Path, verify: str) -> None:
    """A vendor's op: the model loads and prunes where it can, the channels through the op stay
    (NO_RULE, naming it), the report says why nothing ran in ONNX Runtime; and the pruned model
    is exact: with the op read as Relu in both, it matches the input with the removed channels
    zeroed (numbers from ONNX Runtime)."""
    import spa
    from spa.rules.base import BlockCode, Dim

    original = _vendor_op()
    d = tmp_path / "case"
    d.mkdir()
    path = save(original, d)
    res = spa.prune(str(path), ratio=0.5, verify=verify)  # the latency benchmark is on by default: skipped
    assert any("com.vendor::MyOp" in n and "frozen" in n for n in res.report.notes), res.report.notes
    assert res.report.latency_ms_before is None and res.report.oracle is None

    analysis = spa.pipeline.analyze(str(path))
    through = analysis.channels.group_of(Dim("c2", 1))
    assert through is not None and not through.prunable
    assert any(r.code == BlockCode.NO_RULE and "com.vendor::MyOp" in r.reason for r in through.reasons)

    pruned = ir.to_proto(res.model)
    assert [n.domain for n in pruned.graph.node if n.op_type == "MyOp"] == ["com.vendor"]
    inits = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    w1 = numpy_helper.to_array(next(t for t in original.graph.initializer if t.name == "W1"))
    assert inits["W1"].shape[0] == 4 and inits["W2"].shape == (6, 4, 3, 3) and inits["W3"].shape == (4, 6, 1, 1)
    kept = [int(np.flatnonzero((w1 == row).all(axis=(1, 2, 3)))[0]) for row in inits["W1"]]
    masked = onnx.ModelProto.FromString(original.SerializeToString())
    for t in masked.graph.initializer:
        if t.name in ("W1", "B1"):
            a = numpy_helper.to_array(t).copy()
            a[[i for i in range(8) if i not in kept]] = 0
            t.CopyFrom(numpy_helper.from_array(a, t.name))
    x = f32(1, 3, 8, 8)
    np.testing.assert_allclose(_ort(_as_relu(pruned), x), _ort(_as_relu(masked), x), rtol=1e-5, atol=1e-5)


def test_custom_op_inspect(tmp_path: pathlib.Path) -> None:
    """``spa inspect`` (analysis only, nothing run in ORT) shows the frozen group and the op."""
    import spa

    d = tmp_path / "case"
    d.mkdir()
    path = save(_vendor_op(), d)
    analysis = spa.pipeline.analyze(str(path))
    assert [g.prunable for g in analysis.channels.candidates] == [True, False]


# --------------------------------------------------------------------------------------------
# outputs: never through a symlink onto the input, never onto a data file the model reads
# --------------------------------------------------------------------------------------------


def _ext_model(d: pathlib.Path, data_name: str = "weights.bin") -> pathlib.Path:
    p = d / "model.onnx"
    onnx.save(conv_model(), p, save_as_external_data=True, location=data_name, size_threshold=0)
    return p


@pytest.mark.parametrize("target", ["symlink to the input", "the input's data file", "symlink to the data file",
                                    "output whose .data is the input's data"])
def test_output_never_overwrites_what_the_input_reads(worker: Worker, tmp_path: pathlib.Path, target: str) -> None:
    d = tmp_path / "case"
    d.mkdir()
    data_name = "pruned.onnx.data" if target.startswith("output whose") else "weights.bin"
    model = _ext_model(d, data_name)
    if target == "symlink to the input":
        out = d / "pruned.onnx"
        os.symlink(model, out)
    elif target == "the input's data file":
        out = d / data_name
    elif target == "symlink to the data file":
        out = d / "pruned.onnx"
        os.symlink(d / data_name, out)
    else:
        out = d / "pruned.onnx"
    before = snapshot(d)
    tmp = tmp_path / "tmp"
    res = worker.run(["prune", str(model), "-o", str(out), "--no-bench", "--quiet"], d, timeout=LIMIT_S * 3)
    assert res.rc == 2, res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert snapshot(d) == before
    assert res.tmp_left == []
    del tmp


# --------------------------------------------------------------------------------------------
# real processes: the exit status a build script sees; SIGTERM mid-run
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cycle"])
def test_real_process(tmp_path: pathlib.Path, name: str) -> None:
    d = tmp_path / "case"
    d.mkdir()
    model = CORPUS[name].build(d)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = subprocess.run([sys.executable, "-m", "spa.cli", "prune", str(model), "-o", str(tmp_path / "o.onnx")],
                          capture_output=True, text=True, timeout=120, cwd=REPO, env={**os.environ, "TMPDIR": str(tmp)},
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not list(tmp.iterdir()) and not (tmp_path / "o.onnx").exists()


def test_successful_run_leaves_no_temporary_files(tmp_path: pathlib.Path) -> None:
    """A fresh process (ONNX Runtime imported inside it, unlike the worker's children): a
    successful prune leaves the temporary folder empty (ORT's telemetry file included)."""
    d = tmp_path / "case"
    d.mkdir()
    model = d / "demo.onnx"
    model.write_bytes((REPO / "models" / "demo.onnx").read_bytes())
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    proc = subprocess.run([sys.executable, "-m", "spa.cli", "prune", str(model), "-o", str(tmp_path / "o.onnx"), "--quiet"],
                          capture_output=True, text=True, timeout=180, cwd=REPO, env={**env, "TMPDIR": str(tmp)},
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "o.onnx").exists()
    assert sorted(p.name for p in tmp.iterdir()) == []


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_leaves_no_temporary_files(tmp_path: pathlib.Path, sig: int, code: int) -> None:
    """SIGTERM / Ctrl-C while spa works in its scratch folder: one line, nothing left."""
    d = tmp_path / "case"
    d.mkdir()
    model = _identity_chain(1000)(d)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out = tmp_path / "o.onnx"
    proc = subprocess.Popen([sys.executable, "-m", "spa.cli", "prune", str(model), "-o", str(out), "--no-bench"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "TMPDIR": str(tmp)}, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(tmp.iterdir()) and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "finished before the scratch folder could be seen"
    time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not list(tmp.iterdir()) and not out.exists()


# --------------------------------------------------------------------------------------------
# scale: a 100 000-node chain (slow: `python -m pytest -m slow tests/test_hostile.py`)
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_100k_identity_chain_is_analysed(tmp_path: pathlib.Path) -> None:
    """No recursion depends on depth: the whole analysis of a 100 000-node chain completes.
    (Its time is in docs/safety.md, from benchmarks/hostile_scale.py.)"""
    import spa

    d = tmp_path / "case"
    d.mkdir()
    model = _identity_chain(100_000)(d)
    analysis = spa.pipeline.analyze(str(model))
    assert len(analysis.model.graph) >= 100_000


# --------------------------------------------------------------------------------------------
# scale: the shortcuts that keep the 100 000-node chain fast give the slow paths' results
# --------------------------------------------------------------------------------------------


def _dce_models() -> list[onnx.ModelProto]:
    """Graphs for ``RemoveUnusedNodesPass``'s cases: nothing to remove, a dead node, an unused
    optional output (Dropout's mask), a trailing empty input, a BatchNormalization, an unused
    initializer, and a graph output that is also read by a node."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 3, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, None)
    w = numpy_helper.from_array(np.ones((4, 4, 1, 1), np.float32), "w")
    spare = numpy_helper.from_array(np.ones(3, np.float32), "spare")
    bn = [numpy_helper.from_array(np.ones(4, np.float32), n) for n in ("s", "b", "m", "v")]
    cases = [
        ([helper.make_node("Relu", ["x"], ["r"], name="r"), helper.make_node("Conv", ["r", "w"], ["y"], name="c")], [y], [w]),
        ([helper.make_node("Relu", ["x"], ["y"], name="r"), helper.make_node("Neg", ["x"], ["dead"], name="n")], [y], [w]),
        ([helper.make_node("Dropout", ["x"], ["y", "mask"], name="d")], [y], []),
        ([helper.make_node("Clip", ["x", "", ""], ["y"], name="c")], [y], []),
        ([helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], name="bn", training_mode=0)], [y], bn),
        ([helper.make_node("Relu", ["x"], ["y"], name="r")], [y], [spare]),
        ([helper.make_node("Relu", ["x"], ["y"], name="r"), helper.make_node("Neg", ["y"], ["z"], name="n")], [y, z], []),
    ]
    return [helper.make_model(helper.make_graph(nodes, "g", [x], outs, inits), opset_imports=[helper.make_opsetid("", 17)])
            for nodes, outs, inits in cases]


@pytest.mark.parametrize("k", range(7))
def test_unused_node_removal_shortcut_matches_onnx_ir(k: int) -> None:
    """``canonicalize._remove_unused_nodes`` skips onnx-ir's pass only where it changes
    nothing: on every case the model and the "modified" flag are the pass's."""
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    from spa.passes.canonicalize import _remove_unused_nodes

    proto = _dce_models()[k]
    ours, theirs = ir.from_proto(proto), ir.from_proto(proto)
    modified = _remove_unused_nodes(ours)
    assert modified == RemoveUnusedNodesPass()(theirs).modified
    assert ir.to_proto(ours).SerializeToString() == ir.to_proto(theirs).SerializeToString()


def test_name_fix_shortcut_only_skips_a_no_op() -> None:
    """``_names_unique`` says "nothing to rename" exactly where ``NameFixPass`` renames nothing."""
    from onnx_ir.passes.common import NameFixPass

    from spa.passes.canonicalize import _names_unique

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graphs = {
        "unique": [helper.make_node("Relu", ["x"], ["a"], name="r"), helper.make_node("Neg", ["a"], ["y"], name="n")],
        "unnamed node": [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Neg", ["a"], ["y"], name="n")],
        "two nodes one name": [helper.make_node("Relu", ["x"], ["a"], name="r"), helper.make_node("Neg", ["a"], ["y"], name="r")],
    }
    seen = {}
    for what, nodes in graphs.items():
        model = ir.from_proto(helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)]))
        skip = _names_unique(model)
        seen[what] = skip
        assert skip == (not NameFixPass()(model).modified), what
    assert seen == {"unique": True, "unnamed node": False, "two nodes one name": False}


def test_tie_axes_records_what_tie_records() -> None:
    """``CouplingContext.tie_axes`` (the element-wise fast path) leaves the same ties, blocks
    and mentioned dims as one ``tie`` per axis: equal static sizes, a symbolic size, sizes
    that differ, ranks that differ, an unshaped side."""
    from spa.graph import is_constant
    from spa.rules.base import CouplingContext, Dim

    def val(name: str, dims) -> ir.Value:
        return ir.Value(name=name, shape=None if dims is None else ir.Shape(dims), type=ir.TensorType(ir.DataType.FLOAT))

    pairs = [
        (val("a", [1, 8, 4, 4]), val("b", [1, 8, 4, 4]), range(4)),
        (val("a", [1, "n", 4, 4]), val("b", [1, 8, 4, 4]), range(4)),
        (val("a", [1, 8, 4, 4]), val("b", [1, 8, 5, 4]), [0, 2, 3]),
        (val("a", [1, 8, 4]), val("b", [1, 8, 4, 4]), range(4)),
        (val("a", None), val("b", [1, 8]), range(2)),
    ]
    node = ir.Node("", "Relu", [val("x", [1])], name="n")
    for a, b, axes in pairs:
        slow = CouplingContext(node, opset=17, is_constant=is_constant)
        fast = CouplingContext(node, opset=17, is_constant=is_constant)
        for ax in axes:
            slow.tie(a, ax, b, ax)
        fast.tie_axes(a, b, list(axes))
        assert [(t.a, t.b, t.a_index.tolist(), t.b_index.tolist(), t.node) for t in fast.ties] == \
            [(t.a, t.b, t.a_index.tolist(), t.b_index.tolist(), t.node) for t in slow.ties]
        assert fast.blocks == slow.blocks and fast.mentioned == slow.mentioned
        assert all(type(d) is Dim for d in fast.mentioned)
    assert Dim("a", 1) < Dim("a", 2) < Dim("b", 0) and str(Dim("a", 1)) == "a[1]"
