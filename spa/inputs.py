"""Input shapes: the one place that decides what size every graph input has.

Every figure spa reports (MACs, FLOPs, latency, the oracle's difference) is measured on
concrete inputs. Those sizes come from here, so they are the same everywhere:

- :func:`resolve_input_shapes` gives every graph input (initializers excluded) a concrete
  shape. Shapes given by ``--input-shape`` are checked (a name that is no input, a wrong rank,
  a static dim contradicted, two values for one symbol: :class:`~spa.errors.UsageError`).
  A symbolic dim gets *one* value per symbol on every input: from a given shape where an input
  with that symbol was given, else the default, decided by the symbol's first appearance
  (inputs in graph order): 1 on axis 0 (a batch), 64 elsewhere (divisible by the strides of
  detection nets, long enough for most sequences). Unnamed dims each get that default.
- :func:`make_feeds` makes the seeded random inputs (``numpy.random.default_rng(seed)``;
  floats ``standard_normal``, integers ``integers(0, 2)``; ``--input-value`` constants).
- :func:`specialize` makes a copy of the model whose inputs have those shapes and whose
  intermediate shapes are inferred again (then shape arithmetic folded, then inferred once
  more), so cost counting sees static sizes. Where shapes stay unknown (a Pad with pads
  computed by an op nothing folds, a custom op), they are taken from one ONNX Runtime run of
  the copy on the feeds, every still-unknown value made a graph output.
"""

from __future__ import annotations

import logging
import pathlib
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from spa.errors import UsageError

__all__ = [
    "DEFAULT_BATCH",
    "DEFAULT_SIZE",
    "graph_inputs",
    "describe_inputs",
    "resolve_input_shapes",
    "make_feeds",
    "specialize",
    "fold_rounds",
    "observe_shapes",
]

logger = logging.getLogger(__name__)

DEFAULT_BATCH = 1
"""Size of a symbolic dim first seen on axis 0."""
DEFAULT_SIZE = 64
"""Size of a symbolic dim first seen on any other axis."""

# numpy dtype of each input type spa can generate (ir.DataType and ORT's type strings).
_NP_OF_IR = {
    ir.DataType.FLOAT: np.float32, ir.DataType.DOUBLE: np.float64, ir.DataType.FLOAT16: np.float16,
    ir.DataType.INT64: np.int64, ir.DataType.INT32: np.int32, ir.DataType.INT16: np.int16,
    ir.DataType.INT8: np.int8, ir.DataType.UINT8: np.uint8, ir.DataType.UINT16: np.uint16,
    ir.DataType.UINT32: np.uint32, ir.DataType.UINT64: np.uint64, ir.DataType.BOOL: np.bool_,
}
_NP_OF_ORT = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16,
    "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32, "tensor(uint64)": np.uint64, "tensor(bool)": np.bool_,
}


def graph_inputs(model: ir.Model | ir.Graph) -> list[ir.Value]:
    """The graph inputs a caller must feed: those not backed by an initializer, in order."""
    graph = model.graph if isinstance(model, ir.Model) else model
    return [v for v in graph.inputs if v.name not in graph.initializers]


def _dims_text(value: ir.Value) -> str:
    if value.shape is None:
        return "no shape"
    return "[" + ", ".join(str(d) if isinstance(d, int) else (d.value or "?") for d in value.shape.dims) + "]"


def _is_static(dim: object) -> bool:
    return isinstance(dim, int) and dim >= 0


def describe_inputs(model: ir.Model | ir.Graph, *, dynamic_only: bool = True) -> str:
    """``"x [batch, 3, height, width], mask (no shape)"``: the inputs (dynamic ones only by
    default) and their dims, for messages that ask for ``--input-shape``."""
    parts = []
    for v in graph_inputs(model):
        if dynamic_only and v.shape is not None and all(_is_static(d) for d in v.shape.dims):
            continue
        parts.append(f"{v.name} {_dims_text(v)}" if v.shape is not None else f"{v.name} (no shape)")
    return ", ".join(parts) or "none"


def _default(axis: int) -> int:
    return DEFAULT_BATCH if axis == 0 else DEFAULT_SIZE


def resolve_input_shapes(
    model: ir.Model | ir.Graph, given: Mapping[str, Sequence[int]] | None = None
) -> dict[str, list[int]]:
    """A concrete shape for every graph input (see the module docstring for the rules).

    Raises:
        UsageError: a given name is not an input; a given shape has the wrong rank or
            contradicts a static dim; two given shapes give one symbol different values; an
            input without a shape (rank unknown) is not given.
    """
    given = dict(given or {})
    inputs = graph_inputs(model)
    names = [v.name for v in inputs]
    unknown = [n for n in given if n not in names]
    if unknown:
        graph = model.graph if isinstance(model, ir.Model) else model
        what = "initializers, not inputs" if all(n in graph.initializers for n in unknown) else "not inputs of the model"
        raise UsageError(
            f"--input-shape names {', '.join(repr(n) for n in unknown)}, {what} "
            f"(inputs: {', '.join(f'{v.name} {_dims_text(v)}' for v in inputs) or 'none'})"
        )
    symbols: dict[str, int] = {}
    bound_by: dict[str, str] = {}
    # 1. given shapes: checked, and they bind their symbols
    for v in inputs:
        if v.name not in given:
            continue
        shape = [int(d) for d in given[v.name]]
        if any(d < 0 for d in shape):
            raise UsageError(f"--input-shape {v.name}: sizes must be non-negative, got {shape}")
        if v.shape is None:
            continue
        dims = list(v.shape.dims)
        if len(dims) != len(shape):
            raise UsageError(
                f"--input-shape {v.name} has {len(shape)} dims, but the input has rank {len(dims)} {_dims_text(v)}"
            )
        for axis, (d, n) in enumerate(zip(dims, shape)):
            if _is_static(d):
                if d != n:
                    raise UsageError(
                        f"--input-shape {v.name}: axis {axis} is {d} in the model, not {n} {_dims_text(v)}"
                    )
            elif isinstance(d, ir.SymbolicDim) and d.value:
                sym = str(d.value)
                if sym in symbols and symbols[sym] != n:
                    raise UsageError(
                        f"--input-shape gives the dim '{sym}' two values: {symbols[sym]} on {bound_by[sym]} and {n} on {v.name}"
                    )
                symbols.setdefault(sym, n)
                bound_by.setdefault(sym, v.name)
    # 2. every input: its given shape, or its dims with symbols resolved
    out: dict[str, list[int]] = {}
    for v in inputs:
        if v.name in given:
            out[v.name] = [int(d) for d in given[v.name]]
            continue
        if v.shape is None:
            raise UsageError(
                f"input '{v.name}' has no shape (its rank is unknown): give --input-shape {v.name}:D1xD2x… "
                f"(dynamic inputs: {describe_inputs(model)})"
            )
        shape = []
        for axis, d in enumerate(v.shape.dims):
            if _is_static(d):
                shape.append(int(d))
            elif isinstance(d, ir.SymbolicDim) and d.value:
                shape.append(symbols.setdefault(str(d.value), _default(axis)))
            else:
                shape.append(_default(axis))
        out[v.name] = shape
    return out


def _np_dtype(name: str, dtype: object) -> type:
    if isinstance(dtype, ir.DataType):
        np_dtype = _NP_OF_IR.get(dtype)
    elif isinstance(dtype, str):
        np_dtype = _NP_OF_ORT.get(dtype)
        if np_dtype is None:
            try:
                np_dtype = np.dtype(dtype).type
            except TypeError:
                np_dtype = None
    elif dtype is None:
        np_dtype = None
    else:
        np_dtype = np.dtype(dtype).type  # type: ignore[arg-type]
    if np_dtype is None:
        raise UsageError(f"cannot generate a value for input '{name}' of type {dtype}")
    return np_dtype


def make_feeds(
    source: ir.Model | ir.Graph | Mapping[str, object],
    shapes: Mapping[str, Sequence[int]] | None = None,
    seed: int = 0,
    values: Mapping[str, float] | None = None,
) -> dict[str, np.ndarray]:
    """Seeded random inputs, one per graph input, in input order.

    ``source`` is the model (its graph inputs, initializers excluded) or a mapping input name →
    dtype (``np.float32``, ``ir.DataType.FLOAT`` or ORT's ``"tensor(float)"``), e.g.
    ``{i.name: i.type for i in session.get_inputs()}``. ``shapes`` defaults to
    :func:`resolve_input_shapes` of the model. ``values`` fills an input with a constant
    (``--input-value sr=16000``). The random stream is the one ``verify.make_inputs`` always
    used: ``rng = np.random.default_rng(seed)``, then per input in order floats
    ``rng.standard_normal(shape)``, integers and bools ``rng.integers(0, 2, shape)`` (valid ids,
    masks and flags); a constant input draws nothing.
    """
    if isinstance(source, (ir.Model, ir.Graph)):
        if shapes is None:
            shapes = resolve_input_shapes(source)
        dtypes = {v.name: v.dtype for v in graph_inputs(source)}
    else:
        dtypes = dict(source)
        if shapes is None:
            raise UsageError("make_feeds needs shapes when given dtypes only")
    values = dict(values or {})
    stray = [n for n in values if n not in dtypes]
    if stray:
        raise UsageError(
            f"--input-value names {', '.join(repr(n) for n in stray)}, not inputs of the model (inputs: {', '.join(dtypes) or 'none'})"
        )
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for name, dtype in dtypes.items():
        if name not in shapes:
            raise UsageError(f"no shape for input '{name}': give --input-shape {name}:D1xD2x…")
        shape = [int(d) for d in shapes[name]]
        np_dtype = _np_dtype(name, dtype)
        if name in values:
            feeds[name] = np.full(shape, values[name], dtype=np_dtype)
        elif np.issubdtype(np_dtype, np.floating):
            feeds[name] = rng.standard_normal(shape).astype(np_dtype)
        else:  # ids, masks, flags: small non-negative integers are valid for all of them
            feeds[name] = rng.integers(0, 2, shape).astype(np_dtype)
    return feeds


# ---------------------------------------------------------------------------------------
# Specialisation: a copy with concrete input shapes and re-inferred intermediate shapes.

FOLD_ROUNDS = 2
"""Rounds of fold-then-infer before ONNX Runtime is asked (timm's Swin needs 8 to resolve
everything by folding alone, 1.7 s; 2 rounds then one ORT run take 1.5 s and always finish)."""


def fold_rounds(model: ir.Model, rounds: int, *, constants: bool = False, done: Callable[[], bool] | None = None) -> None:
    """Fold shape arithmetic (and, with ``constants``, constant-only chains:
    ``FoldConstantsPass``), then infer shapes again, at most ``rounds`` times: each round's
    constants can unlock the next Shape → Reshape. Stops when a round folds nothing, or before
    a round when ``done()`` says enough is known."""
    import onnx_ir.passes.common as common

    from spa.passes.canonicalize import infer_shapes
    from spa.passes.fold_constants import FoldConstantsPass
    from spa.passes.fold_shapes import FoldShapesPass

    for _ in range(rounds):
        if done is not None and done():
            break
        modified = FoldShapesPass()(model).modified
        if constants:
            modified = FoldConstantsPass()(model).modified or modified
        if not modified:
            break
        common.RemoveUnusedNodesPass()(model)
        infer_shapes(model)


def _node_outputs(graph: ir.Graph, *, recursive: bool) -> list[ir.Value]:
    nodes = graph.all_nodes() if recursive else graph
    return [v for n in nodes for v in n.outputs if v is not None and v.name]


def _static(value: ir.Value) -> bool:
    return value.shape is not None and all(_is_static(d) for d in value.shape.dims)


def _unresolved(graph: ir.Graph) -> list[ir.Value]:
    """Top-level tensor values whose shapes are still not static."""
    out = []
    for v in _node_outputs(graph, recursive=False):
        if _static(v):
            continue
        if v.type is not None and not isinstance(v.type, ir.TensorType):
            continue  # sequences, optionals: not a shape ORT reports
        out.append(v)
    return out


def already_specialized(model: ir.Model, shapes: Mapping[str, Sequence[int]]) -> bool:
    """Whether :func:`specialize` of ``model`` for ``shapes`` would only copy it: every graph
    input already has exactly that static shape and every value (bodies too) a static shape
    and a type, so re-inferring finds nothing new. True for any canonicalized model with
    static inputs; a read-only user (the cost model) can then skip the copy and the
    inference, which on a 100 000-node chain take seconds."""
    for v in graph_inputs(model):
        want = shapes.get(v.name)
        if want is None or not _static(v) or list(v.shape.dims) != [int(d) for d in want]:
            return False
    for g in model.graphs():
        for v in g.initializers.values():
            if v.shape is None or v.dtype is None:
                return False
    return all(_static(v) and v.dtype is not None for v in _node_outputs(model.graph, recursive=True))


def specialize(
    model: ir.Model,
    shapes: Mapping[str, Sequence[int]],
    *,
    observe: bool | Mapping[str, Sequence[int]] = True,
    feeds: Mapping[str, np.ndarray] | None = None,
    seed: int = 0,
    values: Mapping[str, float] | None = None,
) -> ir.Model:
    """A copy of ``model`` (tensors shared, never modified) whose graph inputs have ``shapes``
    and whose intermediate shapes are inferred for them.

    Steps: clone; set the input shapes; forget every intermediate shape that is not static;
    :func:`spa.passes.canonicalize.infer_shapes`; fold shape arithmetic that is now constant
    (``FoldShapesPass``) and infer again (:data:`FOLD_ROUNDS` times at most); then, with
    ``observe`` true, take the shapes still unknown from one ONNX Runtime run on ``feeds``
    (default: :func:`make_feeds` with ``seed`` and ``values``). ``observe`` may also be a mapping value name → shape from a run made elsewhere
    (:func:`observe_shapes`). If ORT cannot run the model the shapes stay unknown (logged):
    the cost model reports those nodes as unknown.

    Value and node names are the original's, so a SizeFn over ``(value, axis)`` of the
    original's channel analysis applies to the copy unchanged.
    """
    from spa.passes.canonicalize import infer_shapes

    copy = model.clone()
    for v in graph_inputs(copy):
        if v.name not in shapes:
            raise UsageError(f"no shape for input '{v.name}' (inputs: {describe_inputs(copy, dynamic_only=False)})")
        v.shape = ir.Shape([int(d) for d in shapes[v.name]])
    for v in _node_outputs(copy.graph, recursive=True):
        if not _static(v):
            v.shape = None
    infer_shapes(copy)
    fold_rounds(copy, FOLD_ROUNDS, done=lambda: not _unresolved(copy.graph))
    pending = _unresolved(copy.graph)
    if pending and observe is not False:
        if observe is True:
            if feeds is None:
                feeds = make_feeds(copy, shapes, seed, values)
            try:
                observed = observe_shapes(copy, feeds, [v.name for v in pending])
            except Exception as e:  # noqa: BLE001 - best effort: the nodes stay "unknown"
                logger.info("shapes from ONNX Runtime unavailable: %s", str(e).splitlines()[0] if str(e) else type(e).__name__)
                observed = {}
        else:
            observed = dict(observe)
        filled = _fill(pending, observed)
        if filled:
            logger.info("%d intermediate shape(s) taken from an ONNX Runtime run", filled)
            if sum(1 for _ in copy.graph.all_nodes()) != len(copy.graph):
                infer_shapes(copy)  # bodies of If/Loop read outer values now shaped
                _fill(pending, observed)  # inference must not take back what was observed
    return copy


def _fill(values: Sequence[ir.Value], observed: Mapping[str, Sequence[int]]) -> int:
    n = 0
    for v in values:
        shape = observed.get(v.name)
        if shape is not None:
            v.shape = ir.Shape([int(d) for d in shape])
            n += 1
    return n


def observe_shapes(
    model: ir.Model | str | pathlib.Path,
    feeds: Mapping[str, np.ndarray],
    names: Sequence[str] | None = None,
) -> dict[str, list[int]]:
    """Shapes of top-level values (``names``, default every node output) from one ONNX Runtime
    run on ``feeds``, each made a graph output of a scratch copy written to a temporary folder
    (graph optimisations off, so the values are the graph's own). Raises what ORT raises."""
    import onnxruntime as ort

    from spa import io

    if not isinstance(model, ir.Model):
        model = ir.load(str(model))  # external tensors stay lazy
    work = model.clone()
    graph = work.graph
    produced = {v.name: v for v in _node_outputs(graph, recursive=False)}
    wanted = list(dict.fromkeys(names if names is not None else produced))
    for name in wanted:
        v = produced.get(name)
        if v is not None and not v.is_graph_output():
            graph.outputs.append(v)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="spa-shapes-"))
    try:
        path = io.save_model(work, tmp / "model.onnx", durable=False)
        so = ort.SessionOptions()
        so.log_severity_level = 4  # a failed run raises; ORT need not print it too
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        outs = [o.name for o in sess.get_outputs() if o.name in produced]
        keep = set(wanted)
        arrays = sess.run(outs, {k: np.asarray(v) for k, v in feeds.items()})
        return {n: list(np.shape(a)) for n, a in zip(outs, arrays) if n in keep}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
