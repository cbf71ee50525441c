"""Checks on a model's protobuf before spa builds its IR: paths, tensors, structure, resources.

spa runs on models downloaded from anywhere. A hostile or broken file must be refused with one
line naming the file and the problem (a :class:`~spa.errors.SpaError`), before anything reads a
weight, allocates a tensor or hands the model to ONNX Runtime. :func:`check_proto` (before the IR is
built) and :func:`check_ops` (after spa.io's domain and opset checks) run on the parsed
``onnx.ModelProto`` (external data not loaded) and check, in this order:

1. **External data paths** (stricter than the ONNX loader's): the location is non-empty, has
   no NUL byte, is relative, has no ``..``; every component from the model's folder on is
   ``lstat``-ed, and a symlink (of the file or of a folder on the way) that resolves outside
   the folder is refused, as is a file with several hard links (onnx-ir refuses those when it
   reads); the file is a regular file (no device, FIFO, socket or folder); offset and length
   are non-negative integers and ``offset + length`` fits in the file. Nothing is opened.
2. **Tensors** (initializers, sparse initializers, Constant/tensor attributes, in every graph
   and function): a known, defined data type; non-negative dims; a payload of exactly the size
   the dims need (an initializer declaring 2^40 elements with no data is refused here, without
   allocating anything: sizes are Python integers).
3. **Structure**, per graph and function, without recursion over nodes: no value produced
   twice, no input or graph output that nothing produces, no cycle (Kahn's algorithm; a node
   with a subgraph depends on the producers of the outer values the subgraph reads), no
   model-local function that calls itself, declared shapes that agree with initializers.
4. **Nodes** of the ONNX domains against their schema (``onnx.checker.check_node``: unknown
   operator, attribute type, input count), and Conv weights against the operator (rank,
   channels x group, bias length).
5. **Memory** (``--max-memory``): the declared sizes of initializers, inputs and every value
   whose shape onnx's shape inference (with data propagation, on a copy without the weights)
   makes static are summed before anything is allocated; a model that needs more than the
   ceiling is refused (:class:`~spa.errors.MemoryLimitError`) naming the largest tensor.
   Shape arithmetic (ConstantOfShape, Expand, Reshape, Tile) is only *inferred*, never run.

Every pass over nodes is linear in their number; subgraph nesting is walked with an explicit
stack. Its depth is bounded anyway by protobuf's own nesting limit (100), far from Python's.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
import stat
from collections import deque
from collections.abc import Iterator

import onnx
from google.protobuf.descriptor import FieldDescriptor
from onnx import TensorProto

from spa.errors import (
    CycleError,
    DanglingValueError,
    DuplicateProducerError,
    InvalidModelError,
    InvalidNodeError,
    MemoryLimitError,
    ShapeMismatchError,
    UnknownDataTypeError,
    UnsafePathError,
    UnsupportedError,
    UsageError,
)

__all__ = [
    "DEFAULT_MEMORY_FRACTION",
    "check_proto",
    "check_ops",
    "check_external_location",
    "default_max_memory",
    "resolve_max_memory",
    "parse_size",
    "human_bytes",
]

logger = logging.getLogger(__name__)

#: ``--max-memory`` default: this fraction of the machine's physical RAM.
DEFAULT_MEMORY_FRACTION = 0.5

_ONNX_DOMAINS = ("", "ai.onnx", "ai.onnx.ml")
_KNOWN_DTYPES = frozenset(v for v in TensorProto.DataType.values() if v != TensorProto.UNDEFINED)
_BITS = {
    TensorProto.FLOAT: 32, TensorProto.UINT8: 8, TensorProto.INT8: 8, TensorProto.UINT16: 16,
    TensorProto.INT16: 16, TensorProto.INT32: 32, TensorProto.INT64: 64, TensorProto.BOOL: 8,
    TensorProto.FLOAT16: 16, TensorProto.DOUBLE: 64, TensorProto.UINT32: 32, TensorProto.UINT64: 64,
    TensorProto.COMPLEX64: 64, TensorProto.COMPLEX128: 128, TensorProto.BFLOAT16: 16,
}
#: Typed payload field of each data type and how many entries one element takes.
_FIELD = {
    TensorProto.FLOAT: ("float_data", 1), TensorProto.COMPLEX64: ("float_data", 2),
    TensorProto.DOUBLE: ("double_data", 1), TensorProto.COMPLEX128: ("double_data", 2),
    TensorProto.INT64: ("int64_data", 1), TensorProto.UINT32: ("uint64_data", 1),
    TensorProto.UINT64: ("uint64_data", 1), TensorProto.STRING: ("string_data", 1),
}
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*", re.IGNORECASE)


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------


def check_proto(model: onnx.ModelProto, *, where: str, base_dir: str | None) -> list[int]:
    """Checks 1-3 (paths, tensors, structure): what must hold before an IR can be built.

    ``base_dir`` is the model's folder (external data must stay inside it); ``None`` for a
    ModelProto handed over in memory, whose external data is then refused. Returns the main
    graph's node indices in a topological order, for :func:`check_ops`.
    """
    _check_text(model, where)
    graphs = list(_graphs(model))
    sizes: dict[str, int] = {}
    for graph, _ in graphs:
        for tensor, what in _graph_tensors(graph):
            _check_tensor(tensor, what, where, base_dir, sizes)
    for function in model.functions:
        for node in _function_nodes(function):
            for tensor, what in _attr_tensors(node):
                _check_tensor(tensor, what, where, base_dir, sizes)
    if model.ir_version < 0:
        raise InvalidModelError(f"{where}: ir_version {model.ir_version} is negative")
    if model.ir_version > onnx.IR_VERSION:
        raise UnsupportedError(f"{where}: ir_version {model.ir_version} is newer than this onnx supports "
                               f"({onnx.IR_VERSION})")
    order: list[int] = []
    for k, (graph, outer) in enumerate(graphs):
        found = _check_graph(graph, outer, where)
        if k == 0:
            order = found
    _check_values(model.graph, where)
    _check_functions(model, where)
    return order


def has_external_data(model: onnx.ModelProto) -> bool:
    """Whether any tensor of the model (initializers, attribute tensors, in every graph and
    function) is stored externally."""
    external = TensorProto.EXTERNAL
    for graph, _ in _graphs(model):
        if any(t.data_location == external for t, _ in _graph_tensors(graph)):
            return True
    return any(t.data_location == external for f in model.functions for n in _function_nodes(f) for t, _ in _attr_tensors(n))


def check_ops(model: onnx.ModelProto, order: list[int], *, where: str, max_memory: int | None) -> None:
    """Checks 4-5 (node schemas, Conv weights, shape inference, memory), once the domains and
    opsets are known to be ones spa handles. ``max_memory`` in bytes (None: not checked)."""
    _check_nodes(model, list(_graphs(model)), where)
    values = _inferred_values(model, order, where)
    dims = {id(v): _static_dims(v) for v in values}  # read once: three checks below need them
    _check_empty_values(values, where, dims)
    _check_conv_inputs(model.graph, values, where, dims)
    if max_memory is not None:
        check_memory(model, values, where=where, max_memory=max_memory, dims=dims)


# --------------------------------------------------------------------------------------------
# walking graphs without recursion
# --------------------------------------------------------------------------------------------


def _graphs(model: onnx.ModelProto) -> Iterator[tuple[onnx.GraphProto, tuple[frozenset[str], ...]]]:
    """Every graph of the model (main, then subgraphs), with the names visible from outside it
    (one set per enclosing graph)."""
    stack: list[tuple[onnx.GraphProto, tuple[frozenset[str], ...]]] = [(model.graph, ())]
    while stack:
        graph, outer = stack.pop()
        yield graph, outer
        inner: tuple[frozenset[str], ...] | None = None
        for node in graph.node:
            if not node.attribute:  # no generator to start for a node without attributes
                continue
            for sub in _subgraphs(node):
                if inner is None:
                    inner = (*outer, _defined(graph))
                stack.append((sub, inner))


def _subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH or a.HasField("g"):
            yield a.g
        yield from a.graphs


def _function_nodes(function: onnx.FunctionProto) -> Iterator[onnx.NodeProto]:
    stack = list(function.node)
    while stack:
        node = stack.pop()
        yield node
        for sub in _subgraphs(node):
            stack.extend(sub.node)


def _defined(graph: onnx.GraphProto) -> frozenset[str]:
    names = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    names.update(s.values.name for s in graph.sparse_initializer)
    for node in graph.node:
        names.update(o for o in node.output if o)
    return frozenset(names)


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[tuple[TensorProto, str]]:
    for t in graph.initializer:
        yield t, f"initializer {t.name!r}"
    for s in graph.sparse_initializer:
        yield s.values, f"sparse initializer {s.values.name!r} (values)"
        yield s.indices, f"sparse initializer {s.values.name!r} (indices)"
    for node in graph.node:
        yield from _attr_tensors(node)


def _attr_tensors(node: onnx.NodeProto) -> Iterator[tuple[TensorProto, str]]:
    for a in node.attribute:
        if a.HasField("t"):
            yield a.t, f"attribute {a.name!r} of node {_node_name(node)}"
        for t in a.tensors:
            yield t, f"attribute {a.name!r} of node {_node_name(node)}"
        if a.HasField("sparse_tensor"):
            yield a.sparse_tensor.values, f"attribute {a.name!r} of node {_node_name(node)}"


def _node_name(node: onnx.NodeProto) -> str:
    return repr(node.name) if node.name else f"{node.op_type or '<no op_type>'}→{node.output[0] if node.output else '?'!r}"


def _check_text(model: onnx.ModelProto, where: str) -> None:
    """Every string field (names, op types, domains, doc strings, external-data entries) is
    valid UTF-8. Protobuf's Python side hands an invalid one over as ``bytes``, which the
    checker's C++ and onnx-ir's serializer then fail on (found by tests/test_fuzz.py)."""
    string = FieldDescriptor.TYPE_STRING
    message = FieldDescriptor.TYPE_MESSAGE
    stack: list = [model]
    while stack:
        msg = stack.pop()
        for fd, value in msg.ListFields():
            if fd.type == string:
                for v in ((value,) if isinstance(value, (str, bytes)) else value):
                    if not isinstance(v, str):
                        owner = fd.containing_type.name if fd.containing_type is not None else "?"
                        raise InvalidModelError(f"{where}: a {owner}.{fd.name} field is not valid UTF-8 "
                                                f"({bytes(v)[:40]!r})")
            elif fd.type == message:
                if hasattr(value, "ListFields"):
                    stack.append(value)
                else:
                    stack.extend(value)


# --------------------------------------------------------------------------------------------
# tensors and external data
# --------------------------------------------------------------------------------------------


def _check_tensor(t: TensorProto, what: str, where: str, base_dir: str | None, sizes: dict[str, int]) -> None:
    if t.data_type not in _KNOWN_DTYPES:
        kind = "UNDEFINED" if t.data_type == TensorProto.UNDEFINED else f"number {t.data_type}, which ONNX does not define"
        raise UnknownDataTypeError(f"{where}: {what} has data type {kind}")
    if any(d < 0 for d in t.dims):
        raise ShapeMismatchError(f"{where}: {what} has a negative dimension {list(t.dims)}")
    numel = math.prod(t.dims)
    if t.data_type == TensorProto.STRING:
        if t.data_location == TensorProto.EXTERNAL or t.HasField("raw_data"):
            raise InvalidModelError(f"{where}: {what} is a string tensor stored as raw or external bytes")
        if len(t.string_data) != numel:
            raise ShapeMismatchError(f"{where}: {what} has {len(t.string_data)} strings but its dims {list(t.dims)} need {numel}")
        return
    bits = _bits(t.data_type)
    nbytes = (numel * bits + 7) // 8
    if t.data_location == TensorProto.EXTERNAL:
        _check_external(t, what, where, base_dir, nbytes, sizes)
        return
    if t.HasField("raw_data"):
        if len(t.raw_data) != nbytes:
            raise ShapeMismatchError(f"{where}: {what} has {len(t.raw_data)} bytes of data but its dims "
                                     f"{list(t.dims)} need {nbytes}")
        return
    field, per = _FIELD.get(t.data_type, ("int32_data", 1))
    count = len(getattr(t, field))
    allowed = {numel * per}
    if bits < 8:  # 4-bit / 2-bit types may be packed into int32_data
        allowed.add((numel * bits + 7) // 8)
    if count not in allowed:
        what_data = "no data" if count == 0 else f"{count} values in {field}"
        raise ShapeMismatchError(f"{where}: {what} declares {numel} elements (dims {list(t.dims)}) but holds {what_data}")


def _bits(data_type: int) -> int:
    if data_type in _BITS:
        return _BITS[data_type]
    import onnx_ir as ir  # the newer small types (float8, int4, float4 …): onnx-ir knows their widths

    try:
        return ir.DataType(data_type).bitwidth
    except (TypeError, ValueError):
        raise UnknownDataTypeError(f"data type {data_type} has no known size") from None


def _check_external(t: TensorProto, what: str, where: str, base_dir: str | None, nbytes: int, sizes: dict[str, int]) -> None:
    info: dict[str, str] = {}
    for entry in t.external_data:
        info[entry.key] = entry.value
    if "location" not in info:
        raise UnsafePathError(f"{where}: {what} is stored externally but names no location")
    location = info["location"]
    offset = _non_negative(info.get("offset", "0"), "offset", what, where)
    length = _non_negative(info["length"], "length", what, where) if "length" in info else None
    if base_dir is None:
        raise UnsafePathError(f"{where}: {what} has external data {location!r}, but an in-memory model has no folder "
                              "to read it from; load the model from its file")
    path = check_external_location(location, base_dir, where=where, what=what)
    if path not in sizes:
        sizes[path] = os.stat(path).st_size
    size = sizes[path]
    if length is not None and length < nbytes:
        raise ShapeMismatchError(f"{where}: {what} declares external length {length} but its dims {list(t.dims)} "
                                 f"need {nbytes} bytes")
    end = offset + max(nbytes, length or 0)
    if end > size:
        raise ShapeMismatchError(f"{where}: external data file {location!r} is too short for {what} (offset "
                                 f"{offset} + length {max(nbytes, length or 0)} = {end} bytes, the file has {size}; "
                                 "truncated?)")


def _non_negative(text: str, key: str, what: str, where: str) -> int:
    if not text.isdigit() or not text.isascii():
        raise InvalidModelError(f"{where}: {what} has external data {key} {text!r}, not a non-negative integer")
    value = int(text)
    if value >= 2**63:
        raise InvalidModelError(f"{where}: {what} has external data {key} {value}, beyond any file size")
    return value


def check_external_location(location: str, base_dir: str, *, where: str, what: str = "external data") -> str:
    """The absolute path of ``location`` inside ``base_dir``, or :class:`UnsafePathError`.

    Refused: an empty name, a NUL byte, an absolute path, a ``..`` component, a symlink (of the
    file or of any folder on the way) that resolves outside ``base_dir``, a file with several
    hard links, anything that is not a regular file. Only ``lstat``/``stat`` are called.
    """
    shown = location.replace("\0", "\\0")
    if not location:
        raise UnsafePathError(f"{where}: {what} has an empty external data location")
    if "\0" in location:
        raise UnsafePathError(f"{where}: {what} has a NUL byte in its external data location {shown!r}")
    if os.path.isabs(location) or location.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", location):
        raise UnsafePathError(f"{where}: {what}: external data {shown!r} is an absolute path, outside the model's folder")
    parts = re.split(r"[\\/]", location)
    if any(p == ".." for p in parts):
        raise UnsafePathError(f"{where}: {what}: external data {shown!r} is outside the model's folder (uses '..')")
    parts = [p for p in parts if p not in ("", ".")]
    if not parts:
        raise UnsafePathError(f"{where}: {what}: external data location {shown!r} names the model's folder, not a file")
    base = os.path.abspath(base_dir)
    base_real = os.path.realpath(base)
    current = base
    for i, part in enumerate(parts):
        current = os.path.join(current, part)
        try:
            st = os.lstat(current)
        except OSError as exc:
            raise InvalidModelError(f"{where}: external data file {shown!r} of {what} is missing or unreadable "
                                    f"({exc.strerror or exc})") from None
        if stat.S_ISLNK(st.st_mode):
            real = os.path.realpath(current)
            if real != base_real and not real.startswith(base_real.rstrip(os.sep) + os.sep):
                kind = "file" if i == len(parts) - 1 else f"folder {part!r} on the way"
                raise UnsafePathError(f"{where}: {what}: external data {shown!r} leaves the model's folder through a "
                                      f"symlink (its {kind} points to {real})")
    try:
        st = os.stat(current)
    except OSError as exc:
        raise InvalidModelError(f"{where}: external data file {shown!r} of {what} is missing or unreadable "
                                f"({exc.strerror or exc})") from None
    if not stat.S_ISREG(st.st_mode):
        raise UnsafePathError(f"{where}: external data {shown!r} of {what} is not a regular file ({file_kind(st.st_mode)})")
    if st.st_nlink > 1:
        raise UnsafePathError(f"{where}: external data {shown!r} of {what} has {st.st_nlink} hard links; a hard link "
                              "can bring a file from outside the model's folder in, so it is refused")
    if not os.access(current, os.R_OK):
        raise InvalidModelError(f"{where}: external data file {shown!r} is not readable")
    return current


def file_kind(mode: int) -> str:
    """What a path that is not a regular file is, in words (for refusals)."""
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a plain file"


# --------------------------------------------------------------------------------------------
# structure
# --------------------------------------------------------------------------------------------


def _check_graph(graph: onnx.GraphProto, outer: tuple[frozenset[str], ...], where: str) -> list[int]:
    """Duplicate producers, dangling values, declared shapes against initializers, cycles.
    Returns the node indices in a topological order."""
    gname = f"graph {graph.name!r}" if graph.name else "the graph"
    producer: dict[str, int] = {}  # value name -> node index (-1: graph input, -2: initializer)
    inits: dict[str, TensorProto] = {}
    for t in graph.initializer:
        if t.name in inits:
            raise DuplicateProducerError(f"{where}: {gname} has two initializers named {t.name!r}")
        inits[t.name] = t
        producer[t.name] = -2
    for s in graph.sparse_initializer:
        producer.setdefault(s.values.name, -2)
    seen_inputs: set[str] = set()
    for v in graph.input:
        if v.name in seen_inputs:
            raise DuplicateProducerError(f"{where}: {gname} has two inputs named {v.name!r}")
        seen_inputs.add(v.name)
        producer[v.name] = -1
    for i, node in enumerate(graph.node):
        for out in node.output:
            if not out:
                continue
            if out in producer:
                prev = producer[out]
                by = ("a graph input" if prev == -1 else "an initializer" if prev == -2
                      else f"node {_node_name(graph.node[prev])}")
                raise DuplicateProducerError(f"{where}: value {out!r} is produced twice, by {by} and by node "
                                             f"{_node_name(node)} ({node.op_type})")
            producer[out] = i

    def visible(name: str) -> bool:
        return name in producer or any(name in scope for scope in outer)

    deps: list[set[int]] = [set() for _ in graph.node]
    for i, node in enumerate(graph.node):
        for name in _reads(node):
            if not name:
                continue
            if not visible(name):
                raise DanglingValueError(f"{where}: node {_node_name(node)} ({node.op_type}) reads {name!r}, "
                                         "which no node, input or initializer produces")
            p = producer.get(name, -1)
            if p >= 0:
                deps[i].add(p)
    for v in graph.output:
        if not visible(v.name):
            raise DanglingValueError(f"{where}: graph output {v.name!r} is produced by no node, input or initializer")
    for v in (*graph.input, *graph.value_info):
        t = inits.get(v.name)
        if t is not None:
            _check_declared(v, t, where)
    return _check_acyclic(graph, deps, where, gname)


#: numpy's limit on the number of dimensions of an array (NPY_MAXDIMS).
MAX_RANK = 64


def _check_values(graph: onnx.GraphProto, where: str) -> None:
    """Declared shapes spa cannot hold: a rank beyond numpy's, an empty graph input."""
    for v in (*graph.input, *graph.output, *graph.value_info):
        if not v.type.HasField("tensor_type") or not v.type.tensor_type.HasField("shape"):
            continue
        dims = v.type.tensor_type.shape.dim
        if len(dims) > MAX_RANK:
            raise UnsupportedError(f"{where}: {v.name!r} has rank {len(dims)}; spa (numpy) handles at most {MAX_RANK}")
    inits = {t.name for t in graph.initializer}
    for v in graph.input:
        if v.name in inits or not v.type.tensor_type.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
        if 0 in dims:
            shown = ["?" if d is None else d for d in dims]
            raise UnsupportedError(f"{where}: input {v.name!r} has a zero-size dimension {shown}: spa analyses and "
                                   "verifies a model on non-empty inputs")
    for t in graph.initializer:
        if len(t.dims) > MAX_RANK:
            raise UnsupportedError(f"{where}: initializer {t.name!r} has rank {len(t.dims)}; spa (numpy) handles at "
                                   f"most {MAX_RANK}")


def _reads(node: onnx.NodeProto) -> Iterator[str]:
    """The node's inputs, then every name its subgraphs read (outer-scope captures among them)."""
    yield from node.input
    if not node.attribute:
        return
    stack = list(_subgraphs(node))
    while stack:
        sub = stack.pop()
        local = _defined(sub)
        for n in sub.node:
            for name in n.input:
                if name and name not in local:
                    yield name
            stack.extend(_subgraphs(n))
        for v in sub.output:
            if v.name not in local:
                yield v.name


def _check_declared(v: onnx.ValueInfoProto, t: TensorProto, where: str) -> None:
    tt = v.type.tensor_type
    if not v.type.HasField("tensor_type"):
        return
    if tt.elem_type and tt.elem_type != t.data_type:
        raise ShapeMismatchError(f"{where}: {v.name!r} is declared {_dtype(tt.elem_type)} but its initializer is "
                                 f"{_dtype(t.data_type)}")
    if not tt.HasField("shape"):
        return
    declared = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
    if len(declared) != len(t.dims) or any(d is not None and d != a for d, a in zip(declared, t.dims)):
        shown = ["?" if d is None else d for d in declared]
        raise ShapeMismatchError(f"{where}: {v.name!r} is declared with shape {shown} but its initializer has "
                                 f"{list(t.dims)}")


def _dtype(code: int) -> str:
    try:
        return TensorProto.DataType.Name(code)
    except ValueError:
        return str(code)


def _check_acyclic(graph: onnx.GraphProto, deps: list[set[int]], where: str, gname: str) -> list[int]:
    """Kahn's algorithm (returns the order); on a cycle, name the nodes of one loop."""
    n = len(deps)
    users: list[list[int]] = [[] for _ in range(n)]
    indegree = [0] * n
    for i, d in enumerate(deps):
        indegree[i] = len(d)
        for p in d:
            users[p].append(i)
    ready = deque(i for i in range(n) if indegree[i] == 0)
    order: list[int] = []
    while ready:
        i = ready.popleft()
        order.append(i)
        for u in users[i]:
            indegree[u] -= 1
            if indegree[u] == 0:
                ready.append(u)
    if len(order) == n:
        return order
    left = {i for i in range(n) if indegree[i] > 0}
    # walk backwards along dependencies that are still left until a node repeats: that is a loop
    start = min(left)
    path, index = [start], {start: 0}
    while True:
        nxt = next(p for p in deps[path[-1]] if p in left)
        if nxt in index:
            loop = path[index[nxt]:] + [nxt]
            break
        index[nxt] = len(path)
        path.append(nxt)
    shown = " ← ".join(_node_name(graph.node[i]) for i in loop[:8]) + (" ← …" if len(loop) > 8 else "")
    raise CycleError(f"{where}: {gname} has a cycle: {shown}")


def _check_functions(model: onnx.ModelProto, where: str) -> None:
    """A model-local function that calls itself, directly or not, would inline forever."""
    keys = {(f.domain, f.name) for f in model.functions}
    if not keys:
        return
    calls = {(f.domain, f.name): {(n.domain, n.op_type) for n in _function_nodes(f)} & keys for f in model.functions}
    state: dict[tuple[str, str], int] = {}  # 1: on the stack, 2: done
    for root in calls:
        if state.get(root):
            continue
        stack = [(root, iter(sorted(calls[root])))]
        state[root] = 1
        while stack:
            key, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                state[key] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                chain = [k for k, _ in stack][[k for k, _ in stack].index(nxt):] + [nxt]
                shown = " → ".join(f"{d}::{n}" for d, n in chain)
                raise CycleError(f"{where}: model-local functions call themselves: {shown}")
            elif not state.get(nxt):
                state[nxt] = 1
                stack.append((nxt, iter(sorted(calls[nxt]))))


# --------------------------------------------------------------------------------------------
# nodes
# --------------------------------------------------------------------------------------------


def _check_nodes(model: onnx.ModelProto, graphs, where: str) -> None:
    """ONNX-domain nodes against their schema; Conv weights against the operator."""
    opsets = {o.domain: o.version for o in model.opset_import}
    if "" not in opsets and "ai.onnx" in opsets:
        opsets[""] = opsets["ai.onnx"]
    ctx = onnx.checker.C.CheckerContext()
    ctx.ir_version = model.ir_version if 0 < model.ir_version <= onnx.IR_VERSION else onnx.IR_VERSION
    # (an absurd version is left to spa.io's opset check, which names it)
    ctx.opset_imports = {d: v for d, v in opsets.items() if d in _ONNX_DOMAINS and 0 < v < 2**31}
    functions = {(f.domain, f.name) for f in model.functions}
    for graph, _ in graphs:
        inits = {t.name: t for t in graph.initializer}
        for node in graph.node:
            if node.domain not in _ONNX_DOMAINS or (node.domain, node.op_type) in functions:
                continue
            if (node.domain or "") not in ctx.opset_imports and not (node.domain == "" and "ai.onnx" in opsets):
                continue  # the domain check in spa.io names the missing opset import
            checked = node
            if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
                checked = _without_subgraphs(node)  # subgraph nodes are checked as their own graph's
            try:
                onnx.checker.check_node(checked, ctx)
            except UnicodeDecodeError:
                raise InvalidNodeError(f"{where}: a node's name, operator type or attribute is not valid UTF-8") from None
            except onnx.checker.ValidationError as exc:
                text = " ".join(str(exc).split())
                if "deprecated" in text.lower():
                    continue  # ORT still runs some deprecated ops; spa converts or freezes them
                raise InvalidNodeError(f"{where}: node {_node_name(node)} ({node.op_type}) is invalid: "
                                       f"{text[:200]}") from None
            _check_input_types(node, inits, ctx.opset_imports, where)
            if node.op_type == "Conv" and node.domain in ("", "ai.onnx"):
                _check_conv(node, inits, where)


def _check_input_types(node: onnx.NodeProto, inits: dict[str, TensorProto], opsets: dict[str, int], where: str) -> None:
    """An initializer whose data type the operator's schema does not accept (a string Conv weight)."""
    if not any(name in inits for name in node.input):
        return
    domain = "" if node.domain == "ai.onnx" else node.domain
    found = _schema_types(node.op_type, domain, opsets.get(domain, opsets.get("", 1)))
    if found is None:
        return
    formal, allowed = found
    for i, name in enumerate(node.input):
        t = inits.get(name)
        if t is None:
            continue
        param = formal[min(i, len(formal) - 1)]
        types = allowed.get(param.type_str)
        if types is None:
            types = {param.type_str} if param.type_str.startswith("tensor(") else None
        if not types or not any(x.startswith("tensor(") for x in types):
            continue
        got = f"tensor({_type_name(t.data_type)})"
        if got not in types:
            raise InvalidNodeError(f"{where}: node {_node_name(node)} ({node.op_type}) input {i} {name!r} is a "
                                   f"{got}; the operator takes {', '.join(sorted(types))}")


@functools.lru_cache(maxsize=1024)
def _schema_types(op_type: str, domain: str, version: int):
    """(formal inputs, type constraint → allowed type strings) of an operator, or None."""
    try:
        schema = onnx.defs.get_schema(op_type, version, domain)
    except onnx.defs.SchemaError:
        return None
    if not schema.inputs:
        return None
    return list(schema.inputs), {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}


def _type_name(code: int) -> str:
    return {TensorProto.FLOAT: "float", TensorProto.DOUBLE: "double"}.get(code, _dtype(code).lower())


def _without_subgraphs(node: onnx.NodeProto) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.op_type, copy.domain, copy.name = node.op_type, node.domain, node.name
    copy.input.extend(node.input)
    copy.output.extend(node.output)
    for a in node.attribute:
        b = copy.attribute.add()
        if a.type == onnx.AttributeProto.GRAPH:
            b.name, b.type = a.name, a.type
            b.g.name = a.g.name or "sub"
        elif a.type == onnx.AttributeProto.GRAPHS:
            b.name, b.type = a.name, a.type
        else:
            b.CopyFrom(a)
    return copy


def _check_conv(node: onnx.NodeProto, inits: dict[str, TensorProto], where: str) -> None:
    w = inits.get(node.input[1]) if len(node.input) > 1 else None
    if w is None:
        return
    group = next((a.i for a in node.attribute if a.name == "group"), 1)
    name = _node_name(node)
    if group < 1:
        raise InvalidNodeError(f"{where}: Conv {name} has group {group}; it must be at least 1")
    if len(w.dims) < 3:
        raise InvalidNodeError(f"{where}: Conv {name} has a weight {w.name!r} of rank {len(w.dims)} {list(w.dims)}; "
                               "a Conv weight is [out, in/group, k…] (rank ≥ 3)")
    kernel = next((list(a.ints) for a in node.attribute if a.name == "kernel_shape"), None)
    if kernel is not None and len(kernel) != len(w.dims) - 2:
        raise InvalidNodeError(f"{where}: Conv {name} has kernel_shape {kernel} but its weight {w.name!r} is {list(w.dims)}")
    if w.dims[0] % group:
        raise InvalidNodeError(f"{where}: Conv {name}: {w.dims[0]} output channels are not divisible by group {group}")
    if len(node.input) > 2 and node.input[2] in inits:
        b = inits[node.input[2]]
        if list(b.dims) != [w.dims[0]]:
            raise InvalidNodeError(f"{where}: Conv {name} has a bias {b.name!r} of shape {list(b.dims)}; its weight "
                                   f"needs [{w.dims[0]}]")


# --------------------------------------------------------------------------------------------
# memory
# --------------------------------------------------------------------------------------------


def default_max_memory() -> int:
    """``DEFAULT_MEMORY_FRACTION`` of the machine's physical RAM (4 GiB where it cannot be read)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 * 2**30
    return int(total * DEFAULT_MEMORY_FRACTION)


def resolve_max_memory(value: int | None) -> int:
    """The ceiling in bytes: ``value``, or the default when it is None."""
    return default_max_memory() if value is None else int(value)


def parse_size(text: str) -> int:
    """``"8G"``, ``"512M"``, ``"1.5GiB"``, ``"1000000"`` → bytes (binary multiples)."""
    m = _SIZE_RE.fullmatch(str(text))
    if not m:
        raise UsageError(f"--max-memory {text!r} is not a size (e.g. 8G, 512M, 1073741824)")
    unit = (m.group(2) or "b").lower()[0]
    value = float(m.group(1)) * {"b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[unit]
    if value < 1:
        raise UsageError(f"--max-memory {text!r} must be at least one byte")
    return int(value)


def human_bytes(n: int) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def check_memory(model: onnx.ModelProto, values: list[onnx.ValueInfoProto], *, where: str, max_memory: int,
                 dims: dict[int, list[int] | None] | None = None) -> None:
    """Refuse a model whose declared tensors need more than ``max_memory`` bytes.

    Counted: every initializer (it is read to be scored or sliced), every graph input with a
    static shape (spa feeds it random data), and the largest value whose shape is static after
    onnx's shape inference with data propagation on a copy of the graph without the weights
    (nothing is evaluated). A single declared dimension product is a Python int, so 2^40 × 2^40
    is a number, never an allocation. ``dims``: ``id(value)`` → its static dims, where the
    caller has read them already.
    """
    graph = model.graph
    weights = sum(_tensor_bytes(t) for t in graph.initializer)
    best: tuple[int, onnx.ValueInfoProto | None] = (0, None)
    inputs = 0
    init_names = {t.name for t in graph.initializer}
    for v in graph.input:
        size = _value_bytes(v)
        if size is not None and v.name not in init_names:
            inputs += size
            if size > best[0]:
                best = (size, v)
    for v in values:
        size = _value_bytes(v, dims[id(v)] if dims is not None else _static_dims(v))
        if size is not None and size > best[0]:
            best = (size, v)
    largest = (best[0], best[1].name if best[1] else "", (_static_dims(best[1]) or []) if best[1] else [],
               best[1].type.tensor_type.elem_type if best[1] else 0)
    need = weights + inputs + largest[0]
    if need <= max_memory:
        return
    size, name, dims, elem = largest
    if size * 2 >= need or size > max_memory:
        detail = f"{name!r} alone is {_dtype(elem).lower()}{dims} = {human_bytes(size)}"
    else:
        detail = f"weights {human_bytes(weights)}, inputs {human_bytes(inputs)}, largest value {name!r} {human_bytes(size)}"
    raise MemoryLimitError(f"{where}: the model's declared tensors need at least {human_bytes(need)} ({detail}), more "
                           f"than the memory ceiling {human_bytes(max_memory)} (--max-memory)")


def _tensor_bytes(t: TensorProto) -> int:
    if t.data_type == TensorProto.STRING:
        return sum(len(s) for s in t.string_data)
    return (math.prod(t.dims) * _bits(t.data_type) + 7) // 8


def _static_dims(v: onnx.ValueInfoProto) -> list[int] | None:
    tt = v.type.tensor_type
    if not tt.HasField("shape"):
        return None
    dims = []
    for d in tt.shape.dim:
        if d.WhichOneof("value") != "dim_value" or d.dim_value < 0:
            return None
        dims.append(d.dim_value)
    return dims


def _value_bytes(v: onnx.ValueInfoProto, dims: list[int] | None | bool = False) -> int | None:
    if dims is False:
        dims = _static_dims(v)
    elem = v.type.tensor_type.elem_type
    if dims is None or elem in (TensorProto.UNDEFINED, TensorProto.STRING) or elem not in _KNOWN_DTYPES:
        return None
    try:
        return (math.prod(dims) * _bits(elem) + 7) // 8
    except UnknownDataTypeError:
        return None


#: Initializers up to this many elements keep their values in the copy given to shape inference
#: (shape constants, axes, pads); larger ones only their type and dims.
_SKELETON_KEEP = 64


def _inferred_values(model: onnx.ModelProto, order: list[int], where: str) -> list[onnx.ValueInfoProto]:
    """Value infos that onnx's shape inference (strict, with data propagation) gives the main
    graph, on a copy without the weights, its nodes in ``order`` (spa accepts unsorted graphs;
    inference reads them in list order). A node the inference refuses (a weight of the wrong
    rank or type, an attribute of the wrong size, an If without a branch) is an
    :class:`InvalidNodeError` naming it."""
    skeleton = onnx.ModelProto()
    skeleton.ir_version = min(max(model.ir_version, 4), onnx.IR_VERSION)
    skeleton.opset_import.extend(o for o in model.opset_import if 0 < o.version < 2**31)
    skeleton.functions.extend(model.functions)
    g, src = skeleton.graph, model.graph
    g.name = src.name
    g.input.extend(src.input)
    g.output.extend(src.output)
    g.value_info.extend(src.value_info)
    declared = {v.name for v in src.input}
    for t in src.initializer:
        if t.data_location != TensorProto.EXTERNAL and math.prod(t.dims) <= _SKELETON_KEEP:
            g.initializer.append(t)
        elif t.name not in declared:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    nodes = src.node
    for i in order:
        node = nodes[i]
        big = [a.t for a in node.attribute if a.HasField("t") and math.prod(a.t.dims) > _SKELETON_KEEP]
        if node.op_type == "Constant" and big and node.output:
            g.input.append(onnx.helper.make_tensor_value_info(node.output[0], big[0].data_type, list(big[0].dims)))
            continue
        g.node.append(node)
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, strict_mode=True, data_prop=True)
    except onnx.shape_inference.InferenceError as exc:
        # Strict mode also reports every node downstream of one whose output type is unknown (an
        # op without a schema, an unshaped output): "Input 0 expected to have type but instead
        # is null". Those say nothing is wrong; only the other errors are refusals.
        text = " ".join(str(exc).split())
        entries = [e.strip() for e in re.split(r"(?=\(op_type:)", text) if e.startswith("(op_type:")]
        real = [e for e in entries if "instead is null" not in e]
        if real or not entries:
            shown = real[0] if real else re.sub(r"^\[ShapeInferenceError\] (Inference error\(s\): )?", "", text)
            raise InvalidNodeError(f"{where}: ONNX shape inference refuses the model: {shown[:300]}") from None
        try:
            inferred = onnx.shape_inference.infer_shapes(skeleton, data_prop=True)
        except Exception as again:  # noqa: BLE001 - a best effort: the counts stay a floor
            logger.debug("shape inference for the structural checks failed: %s", again)
            return []
    except Exception as exc:  # noqa: BLE001 - inference is a best effort here; the counts stay a floor
        logger.debug("shape inference for the structural checks failed: %s", exc)
        return []
    return list(inferred.graph.value_info) + list(inferred.graph.output)


def _check_empty_values(values: list[onnx.ValueInfoProto], where: str, known: dict[int, list[int] | None]) -> None:
    """A value of rank ≥ 2 that shape inference makes empty (a stride or kernel larger than
    the image, found by tests/test_fuzz.py): spa's channel analysis and verification need
    non-empty tensors. Empty 1-D values (Resize's unused roi/scales) are common and fine."""
    for v in values:
        dims = known[id(v)]
        if dims and len(dims) >= 2 and 0 in dims:
            raise UnsupportedError(f"{where}: value {v.name!r} is inferred to be empty (shape {dims}); spa analyses "
                                   "and verifies models on non-empty tensors")


def _check_conv_inputs(graph: onnx.GraphProto, values: list[onnx.ValueInfoProto], where: str,
                       known: dict[int, list[int] | None]) -> None:
    """A Conv whose input channels (inferred) are not its weight's in-channels x group."""
    convs = [n for n in graph.node if n.op_type == "Conv" and n.domain in ("", "ai.onnx") and len(n.input) >= 2]
    if not values or not convs:
        return
    wanted = {n.input[0] for n in convs}
    shapes = {v.name: known[id(v)] if id(v) in known else _static_dims(v) for v in (*graph.input, *values) if v.name in wanted}
    inits = {t.name: t for t in graph.initializer}
    for node in convs:
        w, x = inits.get(node.input[1]), shapes.get(node.input[0])
        if w is None or not x or len(x) < 2 or len(w.dims) < 2:
            continue
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if x[1] != w.dims[1] * group:
            raise InvalidNodeError(f"{where}: Conv {_node_name(node)} reads {x[1]} channels but its weight "
                                   f"{w.name!r} {list(w.dims)} with group {group} takes {w.dims[1] * group}")
