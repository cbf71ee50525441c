"""FLOPs / MACs / parameter counting over a shape-inferred onnx_ir model.

Why our own counter: the pruner must predict the cost of a *plan* (which channels go) many
times while it allocates, without doing the surgery. So :class:`CostModel` reads the graph
once and compiles every node into a tiny formula: a sum of terms ``coef * prod(dims)``, where
each dim is a reference ``(value name, axis)`` into the graph. :meth:`CostModel.count` then
only evaluates those products; an optional :data:`SizeFn` says what size an axis *will* have
after pruning (``None`` = keep the static size). A ResNet-50-sized graph counts in well under
a millisecond or two per call.

Which dims a formula reads matters to a SizeFn, so it is fixed and documented here. Weights
are read where that is the natural home of a channel count, so a SizeFn must answer for
every ``(value, axis)`` of a pruned channel space, weights included (the channel analysis
lists exactly those):

* Conv / ConvInteger / QLinearConv (1-D/2-D/3-D, grouped, depthwise):
  ``Y[0] * prod(W[:]) * prod(Y[2:])`` — that is N·M·(C/group)·prod(kernel)·out-spatial,
  because ``W`` is ``[M, C/group, k...]``.
* ConvTranspose: ``X[0] * prod(W[:]) * prod(X[2:])`` (``W`` is ``[C, M/group, k...]``), the
  convention of fvcore and ``torch.utils.flop_counter``.
* Gemm: ``Y[0] * Y[1] * K`` with K read from ``B`` (axis 0, or 1 when ``transB``).
* MatMul / MatMulInteger / QLinearMatMul: ``prod(Y[:]) * K`` (batch·M·N·K; broadcasting and
  1-D operands handled by reading the output) with K read from ``B`` (axis -2, or 0 if 1-D).
  Works for activation × activation (attention).
* Einsum with explicit ``->`` and no ellipsis: product of every index's size, once per extra
  operand.
* LSTM / GRU / RNN: ``seq * batch * (prod(W[:]) + prod(R[:]))`` MACs (one input and one
  recurrent matvec per gate per step), plus 3 flops per gate element per step for the
  element-wise gate math.

Conventions for ``flops`` (documented so reports are comparable):

* ``flops = 2 * macs`` for the ops above; bias additions are not counted (neither does
  ``torch.utils.flop_counter`` nor fvcore), so for Conv/Gemm/MatMul ``flops == 2 * macs``.
* element-wise arithmetic, comparisons, activations, Clip, Where, Resize, Quantize/Dequantize:
  one flop per output element (two for Quantize/Dequantize; k-1 for variadic Sum/Max/Min of k
  inputs, k for Mean).
* BatchNormalization: 2 per element (a folded scale and shift); LayerNormalization,
  InstanceNormalization, GroupNormalization, MeanVarianceNormalization: 5 per element (mean,
  subtract, variance, normalize, affine); LpNormalization and RMSNormalization: 3.
* Softmax / LogSoftmax: 3 per element (exp, sum, divide); Hardmax: 1.
* MaxPool / AveragePool / LpPool: prod(kernel_shape) per output element; global pools,
  reductions, ArgMax/ArgMin, CumSum, TopK: one per *input* element.
* data movement (Reshape, Transpose, Concat, Slice, Gather, Cast, Pad, Shape, ...): 0.
* ops we know nothing about: 0, and listed in :attr:`CostModel.uncounted`.
* a node that reads no graph input, directly or through other nodes (a positional-encoding
  conv over a fixed grid, a Swin's relative-position MLP): 0, and listed in
  :attr:`CostModel.constant`. It computes the same tensor on every run, which ONNX Runtime's
  constant folding computes once when the session is created: it is not an executed cost.
* If: both branches are counted (an upper bound); Loop/Scan bodies count one iteration.

Params: the elements of every constant tensor that is a weight, i.e. every initializer and
every Constant-node tensor (both counted once, however many nodes use them) whose dtype is
floating point or an integer of at most 8 bits (quantized weights), and whose rank is at least
1. Excluded on purpose: int16/32/64 tensors (shapes, axes, indices, int32 quantized biases),
bool/string, rank-0 scalars (eps, exponents, quantization scales and zero points — literals,
not learned weights), and float constants used only as Resize roi/scales, Upsample scales,
Pad value or Clip bounds. BatchNormalization running mean/var are initializers, so they *are*
counted: ``params`` of a torch export equals ``sum(p.numel() for p in m.parameters())`` plus
the BN running statistics (``m.buffers()`` minus ``num_batches_tracked``), like onnx-tool and
Netron. ``param_bytes`` uses the dtype's bit width (4-bit types pack two per byte).

Which sizes are counted: the figures are the *executed* ones only when every dim a formula
reads is known. Build the model with :meth:`CostModel.for_inputs` (or on
:func:`spa.inputs.specialize` of the model): a copy whose inputs have the ``--input-shape``
sizes (defaults for the rest) and whose intermediate shapes are inferred again, with ONNX
Runtime's shapes where inference cannot tell. A dim that is still symbolic (and not given a
value by ``dim_values``) or a value without a shape makes its node *unknown*: listed in
:attr:`CostModel.unknown` / :attr:`CostModel.unknown_ops`, and counted as a lower bound (an
unresolved dim counts as 1, a missing shape as 0). :meth:`CostModel.require_known` refuses
(``UsageError``) where a decision such as ``--flops-target`` would rest on such figures.

:func:`executed_macs` is an independent check: it runs the model in ONNX Runtime with every
value as an output and computes the MACs of Conv/ConvTranspose/Gemm/MatMul/Einsum/LSTM/GRU/RNN
(and their quantized forms) from the arrays' actual shapes; it shares no formula code with
:class:`CostModel`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from spa.errors import UsageError
from spa.graph import gc_paused

__all__ = ["Cost", "CostModel", "SizeFn", "count_cost", "executed_macs", "executed_macs_by_node"]

logger = logging.getLogger(__name__)

SizeFn = Callable[[str, int], int | None]
"""``size(value_name, axis) -> int | None``: the size an axis will have after pruning.

``None`` means "unchanged": the static (or ``dim_values``-resolved) size is used. Axes are
non-negative. Called at most once per referenced ``(value, axis)`` per :meth:`CostModel.count`.
"""


@dataclasses.dataclass(frozen=True)
class Cost:
    """Result of one count.

    ``per_node`` maps node name → ``(macs, flops)`` and is ``None`` unless asked for, because
    building it costs more than the totals and the allocator calls :meth:`CostModel.count`
    hundreds of times.
    """

    macs: int
    flops: int
    params: int
    param_bytes: int
    per_node: dict[str, tuple[int, int]] | None = None

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form for reports."""
        out: dict[str, object] = {
            "macs": self.macs,
            "flops": self.flops,
            "params": self.params,
            "param_bytes": self.param_bytes,
        }
        if self.per_node is not None:
            out["per_node"] = {k: list(v) for k, v in self.per_node.items()}
        return out


# A term: (macs coefficient, flops coefficient, dim-reference indices). It adds
# coef * prod(vals[i] for i in idxs) to macs and to flops respectively.
_Term = tuple[int, int, tuple[int, ...]]

_STD_DOMAINS = frozenset({"", "ai.onnx"})
_MS_DOMAIN = "com.microsoft"

# Flops per output element.
_PER_OUTPUT: dict[str, int] = {
    **dict.fromkeys(
        (
            # arithmetic
            "Add", "Sub", "Mul", "Div", "Pow", "Mod", "Neg", "Abs", "Reciprocal", "Sqrt",
            "Exp", "Log", "Sin", "Cos", "Tan", "Asin", "Acos", "Atan", "Sinh", "Cosh", "Tanh",
            "Asinh", "Acosh", "Atanh", "Erf", "Floor", "Ceil", "Round", "Sign", "BitShift",
            "BitwiseAnd", "BitwiseOr", "BitwiseXor", "BitwiseNot",
            # comparisons / logic / selection
            "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "And", "Or", "Xor",
            "Not", "Where", "IsNaN", "IsInf", "Clip",
            # activations
            "Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Sigmoid", "HardSigmoid",
            "HardSwish", "Softplus", "Softsign", "Gelu", "Mish", "ThresholdedRelu", "Shrink",
            "Swish",
            # resampling
            "Resize", "Upsample", "GridSample",
        ),
        1,
    ),
    "QuantizeLinear": 2,
    "DequantizeLinear": 2,
    "DynamicQuantizeLinear": 2,
    "BatchNormalization": 2,
    "LayerNormalization": 5,
    "InstanceNormalization": 5,
    "GroupNormalization": 5,
    "MeanVarianceNormalization": 5,
    "LpNormalization": 3,
    "RMSNormalization": 3,
    "Softmax": 3,
    "LogSoftmax": 3,
    "Hardmax": 1,
}

# Flops per *input* element (reductions).
_PER_INPUT: dict[str, int] = dict.fromkeys(
    (
        "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "ReduceSum", "ReduceMean",
        "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum",
        "ReduceLogSumExp", "ReduceSumSquare", "ArgMax", "ArgMin", "CumSum", "TopK",
    ),
    1,
)

# Variadic element-wise ops: flops per output element = len(inputs) - _VARIADIC[op].
_VARIADIC: dict[str, int] = {"Sum": 1, "Max": 1, "Min": 1, "Mean": 0}

_POOLS = frozenset({"MaxPool", "AveragePool", "LpPool"})

# Ops that move or reinterpret data: zero flops by convention (not "uncounted").
_FREE = frozenset(
    {
        "Reshape", "Transpose", "Concat", "Split", "Slice", "Gather", "GatherElements",
        "GatherND", "Scatter", "ScatterElements", "ScatterND", "Squeeze", "Unsqueeze",
        "Flatten", "Identity", "Cast", "CastLike", "Shape", "Size", "Constant",
        "ConstantOfShape", "Expand", "Tile", "Pad", "Dropout", "DepthToSpace", "SpaceToDepth",
        "Range", "NonZero", "OneHot", "Compress", "ReverseSequence", "Trilu", "EyeLike",
        "If", "Loop", "Scan", "SequenceConstruct", "SequenceAt", "SequenceInsert",
        "SequenceLength", "SplitToSequence", "ConcatFromSequence", "Optional",
        "OptionalGetElement", "OptionalHasElement", "RandomNormal", "RandomUniform",
        "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli", "NonMaxSuppression",
        "Unique", "Col2Im", "MaxUnpool", "CenterCropPad", "StringNormalizer",
    }
)

# (op_type, input index) slots that read a float constant that is not a weight.
_NON_WEIGHT_SLOTS = frozenset(
    {("Resize", 1), ("Resize", 2), ("Upsample", 1), ("Pad", 2), ("Clip", 1), ("Clip", 2)}
)

# Input index of (X, W) for conv-like ops, and of (A, B) for matmul-like ops.
_CONV_XW = {"Conv": (0, 1), "ConvInteger": (0, 1), "QLinearConv": (0, 3)}
_MATMUL_AB = {"MatMul": (0, 1), "MatMulInteger": (0, 1), "QLinearMatMul": (0, 3)}
_RECURRENT = frozenset({"LSTM", "GRU", "RNN"})


class _Compiler:
    """Collects unique ``(value, axis)`` references while nodes are compiled."""

    def __init__(self, dim_values: Mapping[str, int]):
        self.dim_values = dim_values
        self.index: dict[tuple[str, int], int] = {}
        self.refs: list[tuple[str, int]] = []
        self.defaults: list[int] = []
        self.known: list[bool] = []

    def resolve(self, dim: int | ir.SymbolicDim) -> tuple[int, bool]:
        """(size, known): a static size, or a symbol ``dim_values`` names; else (1, False)."""
        if isinstance(dim, int):
            return (dim, True) if dim >= 0 else (1, False)
        name = dim.value
        if name is not None and name in self.dim_values:
            return int(self.dim_values[name]), True
        return 1, False

    def ref(self, value: ir.Value, axis: int) -> int | None:
        """Index of ``value[axis]``, or None when the value has no shape (or no such axis)."""
        shape = value.shape
        if shape is None:
            return None
        rank = len(shape)
        if axis < 0:
            axis += rank
        if not 0 <= axis < rank:
            return None
        key = (value.name or "", axis)
        idx = self.index.get(key)
        if idx is None:
            idx = len(self.refs)
            self.index[key] = idx
            self.refs.append(key)
            size, known = self.resolve(shape[axis])
            self.defaults.append(size)
            self.known.append(known)
        return idx

    def refs_of(
        self, value: ir.Value | None, axes: Iterable[int] | None = None
    ) -> tuple[int, ...] | None:
        """References for several axes of ``value`` (all axes by default); None if unknown."""
        if value is None or value.shape is None:
            return None
        if axes is None:
            axes = range(len(value.shape))
        out = []
        for a in axes:
            r = self.ref(value, a)
            if r is None:
                return None
            out.append(r)
        return tuple(out)


def _input(node: ir.Node, i: int) -> ir.Value | None:
    return node.inputs[i] if i < len(node.inputs) else None


def _output(node: ir.Node, i: int = 0) -> ir.Value | None:
    return node.outputs[i] if i < len(node.outputs) else None


def _attr_int(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return attr.as_int() if attr is not None else default


def _elementwise(c: _Compiler, value: ir.Value | None, per: int) -> list[_Term] | None:
    if per == 0:
        return []
    idxs = c.refs_of(value)
    return None if idxs is None else [(0, per, idxs)]


class _NoRule:
    """Marker returned for op types this module has no cost rule for."""


_NO_RULE = _NoRule()


def _compile_node(c: _Compiler, node: ir.Node) -> list[_Term] | None | _NoRule:
    """Terms of one node; None when its cost cannot be determined (missing shapes);
    ``_NO_RULE`` for op types this module does not know."""
    op = node.op_type
    domain = node.domain
    if domain == _MS_DOMAIN and op in ("FusedConv", "FusedGemm"):
        op = op[len("Fused"):]
    elif domain not in _STD_DOMAINS:
        return _NO_RULE

    if op in _CONV_XW:
        xi, wi = _CONV_XW[op]
        y, w = _output(node), _input(node, wi)
        n = c.refs_of(y, (0,))
        ws = c.refs_of(w)
        sp = c.refs_of(y, range(2, len(y.shape))) if y is not None and y.shape is not None else None
        if n is None or ws is None or sp is None:
            return None
        return [(1, 2, n + ws + sp)]
    if op == "ConvTranspose":
        x, w = _input(node, 0), _input(node, 1)
        if x is None or x.shape is None:
            return None
        n = c.refs_of(x, (0,))
        ws = c.refs_of(w)
        sp = c.refs_of(x, range(2, len(x.shape)))
        if n is None or ws is None or sp is None:
            return None
        return [(1, 2, n + ws + sp)]
    if op == "Gemm":
        y, b = _output(node), _input(node, 1)
        mn = c.refs_of(y, (0, 1))
        k = c.refs_of(b, (1 if _attr_int(node, "transB", 0) else 0,))
        if mn is None or k is None:
            a = _input(node, 0)
            k = c.refs_of(a, (0 if _attr_int(node, "transA", 0) else 1,))
        if mn is None or k is None:
            return None
        return [(1, 2, mn + k)]
    if op in _MATMUL_AB:
        ai, bi = _MATMUL_AB[op]
        y, a, b = _output(node), _input(node, ai), _input(node, bi)
        out = c.refs_of(y)
        k = None
        if b is not None and b.shape is not None:
            k = c.refs_of(b, (-2 if len(b.shape) >= 2 else 0,))
        if k is None:
            k = c.refs_of(a, (-1,))
        if out is None or k is None:
            return None
        return [(1, 2, out + k)]
    if op == "Einsum":
        return _compile_einsum(c, node)
    if op in _RECURRENT:
        return _compile_recurrent(c, node)
    if op in _POOLS:
        kernel = node.attributes.get("kernel_shape")
        if kernel is None:
            return None
        return _elementwise(c, _output(node), math.prod(kernel.as_ints()))
    if op in _PER_OUTPUT:
        return _elementwise(c, _output(node), _PER_OUTPUT[op])
    if op in _PER_INPUT:
        return _elementwise(c, _input(node, 0), _PER_INPUT[op])
    if op in _VARIADIC:
        k = sum(1 for v in node.inputs if v is not None)
        return _elementwise(c, _output(node), max(k - _VARIADIC[op], 0))
    if op in _FREE:
        return []
    return _NO_RULE


def _compile_einsum(c: _Compiler, node: ir.Node) -> list[_Term] | None:
    eq = node.attributes.get("equation")
    if eq is None:
        return None
    text = eq.as_string().replace(" ", "")
    if "->" not in text or "..." in text:
        return None
    lhs, _ = text.split("->")
    operands = lhs.split(",")
    if len(operands) != len(node.inputs):
        return None
    letters: dict[str, int] = {}
    for term, value in zip(operands, node.inputs):
        if value is None or value.shape is None or len(value.shape) != len(term):
            return None
        for axis, letter in enumerate(term):
            if letter not in letters:
                r = c.ref(value, axis)
                if r is None:
                    return None
                letters[letter] = r
    idxs = tuple(letters.values())
    if len(operands) == 1:  # a reduction / transpose: one op per input element
        return [(0, 1, idxs)]
    extra = len(operands) - 1
    return [(extra, 2 * extra, idxs)]


def _compile_recurrent(c: _Compiler, node: ir.Node) -> list[_Term] | None:
    x, w, r = _input(node, 0), _input(node, 1), _input(node, 2)
    seq_batch = (1, 0) if _attr_int(node, "layout", 0) else (0, 1)
    sb = c.refs_of(x, seq_batch)
    ws, rs = c.refs_of(w), c.refs_of(r)
    if sb is None or ws is None or rs is None:
        return None
    gate_elems = sb + c.refs_of(w, (0, 1))  # type: ignore[operator]
    return [(1, 2, sb + ws), (1, 2, sb + rs), (0, 3, gate_elems)]


# Ops whose output differs from run to run although no input does: never folded.
_NONDETERMINISTIC = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"})


def _load_time_constant_nodes(graph: ir.Graph) -> set[int]:
    """``id`` of the top-level nodes that read no graph input, directly or through other nodes
    (graph inputs backed by an initializer count as inputs: a caller may feed them). Such a
    node computes the same value on every run; ONNX Runtime's constant folding computes it
    once, when the session is created. Nodes with subgraphs and random ops are never folded."""
    varying = {v.name for v in graph.inputs}
    folded: set[int] = set()
    for node in graph:  # topological (ONNX requires it of a graph)
        reads_varying = any(v is not None and v.name in varying for v in node.inputs)
        if reads_varying or node.op_type in _NONDETERMINISTIC or any(True for _ in _subgraphs(node)):
            varying.update(v.name for v in node.outputs if v is not None)
        else:
            folded.add(id(node))
    return folded


def _is_weight_dtype(dtype: ir.DataType | None) -> bool:
    if dtype is None:
        return False
    if dtype.is_floating_point():
        return True
    return dtype.is_integer() and dtype.bitwidth <= 8


def _only_non_weight_uses(value: ir.Value) -> bool:
    uses = list(value.uses())
    return bool(uses) and all((u.node.op_type, u.idx) in _NON_WEIGHT_SLOTS for u in uses)


def _subgraphs(node: ir.Node) -> Iterable[ir.Graph]:
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            yield attr.as_graph()
        elif attr.type == ir.AttributeType.GRAPHS:
            yield from attr.as_graphs()


class CostModel:
    """Precompiled MACs/FLOPs/params formulas of one model; :meth:`count` evaluates them.

    Build it once per (unchanged) model; the model is read, never mutated, and not kept
    alive beyond construction. If the graph changes, build a new one.

    Attributes:
        uncounted: op type → number of nodes counted as 0 because this module does not know
            the op (e.g. a custom domain). A convention, not a gap: see the module docstring.
        unknown: names of nodes of known op types whose cost could not be computed: a value
            they read has no shape, or a dim is still symbolic (build with
            :meth:`for_inputs`). Counted as a lower bound (missing shape 0, unresolved dim 1).
        unknown_ops: op type → how many of :attr:`unknown` have it.
        refs: every ``(value name, axis)`` a formula reads, i.e. every axis a SizeFn can change.
    """

    @classmethod
    def for_inputs(
        cls,
        model: ir.Model,
        input_shapes: Mapping[str, Sequence[int]] | None = None,
        *,
        seed: int = 0,
        values: Mapping[str, float] | None = None,
        observe: bool = True,
    ) -> CostModel:
        """The cost model of ``model`` run on ``input_shapes`` (``--input-shape``; defaults for
        the other inputs): built on :func:`spa.inputs.specialize` of the model, so every shape
        that inference or one ONNX Runtime run (``observe``) can tell is static.

        Raises UsageError for input shapes that do not fit the model (see
        :func:`spa.inputs.resolve_input_shapes`).
        """
        from spa.inputs import already_specialized, resolve_input_shapes, specialize

        shapes = resolve_input_shapes(model, input_shapes or {})
        # Counting never changes the model: one that is already static for these inputs is
        # counted as it is (no copy, no second shape inference).
        with gc_paused():
            static = model if already_specialized(model, shapes) else specialize(model, shapes, observe=observe, seed=seed, values=values)
            cm = cls(static)
        cm.input_shapes = shapes
        return cm

    def __init__(self, model: ir.Model | ir.Graph, *, dim_values: Mapping[str, int] | None = None):
        graph = model.graph if isinstance(model, ir.Model) else model
        c = _Compiler(dict(dim_values or {}))
        self.uncounted: Counter[str] = Counter()
        self.unknown: list[str] = []
        self.unknown_ops: Counter[str] = Counter()
        #: the concrete input shapes counted (set by :meth:`for_inputs`; None otherwise)
        self.input_shapes: dict[str, list[int]] | None = None
        #: nodes that read no graph input (directly or not): they compute a constant, which
        #: ONNX Runtime's constant folding does once when a session is made, so they cost
        #: nothing per inference (a positional-encoding conv over a fixed grid)
        self.constant: list[str] = []
        node_names: list[str] = []
        node_terms: list[tuple[_Term, ...]] = []
        seen_names: set[str] = set()
        graphs: list[ir.Graph] = [graph]
        folded = _load_time_constant_nodes(graph)

        for i, node in enumerate(ir.traversal.RecursiveGraphIterator(graph)):
            graphs.extend(_subgraphs(node))
            name = node.name or f"{node.op_type}_{i}"
            if name in seen_names:
                name = f"{name}#{i}"
            seen_names.add(name)
            terms = _compile_node(c, node)
            if id(node) in folded and not isinstance(terms, _NoRule):
                if terms:
                    self.constant.append(name)
                terms = []
            if isinstance(terms, _NoRule):
                self.uncounted[f"{node.domain or 'ai.onnx'}::{node.op_type}"] += 1
                terms = []
            elif terms is None:
                self.unknown.append(name)
                self.unknown_ops[node.op_type] += 1
                logger.debug("cost of %s (%s) unknown: missing shapes", name, node.op_type)
                terms = []
            elif any(not c.known[i] for t in terms for i in t[2]):
                self.unknown.append(name)
                self.unknown_ops[node.op_type] += 1
                logger.debug("cost of %s (%s) unknown: symbolic dims", name, node.op_type)
            node_names.append(name)
            node_terms.append(tuple(terms))
        if self.uncounted:
            logger.debug("ops counted as 0 flops (no cost rule): %s", dict(self.uncounted))
        if self.unknown:
            logger.info("%s; counted as a lower bound", self.unknown_text())

        params: list[tuple[tuple[int, ...], int, int]] = []  # (refs, bitwidth, static elements)
        seen_params: set[int] = set()
        for g in graphs:
            for value in g.initializers.values():
                self._add_param(c, value, value.dtype, value.const_value, params, seen_params)
            for node in g:
                if node.op_type == "Constant" and node.domain in _STD_DOMAINS and node.outputs:
                    self._add_constant(c, node, params, seen_params)

        self.refs: list[tuple[str, int]] = c.refs
        self._defaults: list[int] = c.defaults
        self._node_names = node_names
        self._node_terms = node_terms
        self._terms: list[_Term] = [t for ts in node_terms for t in ts]
        self._params = params

    # -- construction helpers ------------------------------------------------------------
    @staticmethod
    def _add_param(
        c: _Compiler,
        value: ir.Value,
        dtype: ir.DataType | None,
        tensor: ir.TensorProtocol | None,
        params: list[tuple[tuple[int, ...], int, int]],
        seen: set[int],
    ) -> None:
        if id(value) in seen:
            return
        seen.add(id(value))
        if tensor is not None:
            dtype = tensor.dtype
        if not _is_weight_dtype(dtype) or _only_non_weight_uses(value):
            return
        if value.shape is None and tensor is not None:
            # A Constant-node output may lack a shape if inference was not run: count the
            # tensor's static size (a SizeFn cannot resize what has no shape to refer to).
            dims = tuple(tensor.shape.dims)
            if len(dims) == 0:
                return
            params.append(((), dtype.bitwidth, math.prod(dims)))  # type: ignore[union-attr]
            return
        if value.shape is None or len(value.shape) == 0:
            return
        idxs = c.refs_of(value)
        if idxs is None:
            return
        params.append((idxs, dtype.bitwidth, 1))  # type: ignore[union-attr]

    def _add_constant(
        self,
        c: _Compiler,
        node: ir.Node,
        params: list[tuple[tuple[int, ...], int, int]],
        seen: set[int],
    ) -> None:
        out = node.outputs[0]
        attr = node.attributes.get("value")
        if attr is not None:
            tensor = attr.as_tensor()
            self._add_param(c, out, tensor.dtype, tensor, params, seen)
            return
        floats = node.attributes.get("value_floats")
        if floats is not None and id(out) not in seen:
            seen.add(id(out))
            n = len(floats.as_floats())
            if n and not _only_non_weight_uses(out):
                params.append(((), 32, n))

    # -- what is not known --------------------------------------------------------------
    def unknown_text(self) -> str:
        """``"3 nodes (ops: Conv ×2, Relu) have unknown cost"``, or "" when all are known."""
        if not self.unknown:
            return ""
        ops = ", ".join(f"{op} ×{n}" if n > 1 else op for op, n in self.unknown_ops.most_common())
        n = len(self.unknown)
        return f"{n} node{'s' if n != 1 else ''} (ops: {ops}) {'have' if n != 1 else 'has'} unknown cost"

    def require_known(self, what: str = "--flops-target") -> None:
        """Refuse (UsageError, one line) when some node's cost is unknown: ``what`` would be
        decided on wrong figures."""
        if self.unknown:
            raise UsageError(
                f"{what} needs the cost of every node, but {self.unknown_text()}: shape inference "
                "cannot tell their shapes and no ONNX Runtime run showed them; prune with --ratio "
                "instead (or give --input-shape where inputs are dynamic)"
            )

    def coverage(self) -> dict[str, object]:
        """JSON-ready account of what the figures leave out (for reports)."""
        return {
            "unknown_nodes": len(self.unknown),
            "unknown_ops": dict(self.unknown_ops),
            "uncounted_ops": dict(self.uncounted),
            "input_shapes": self.input_shapes,
        }

    # -- evaluation ----------------------------------------------------------------------
    def sizes(self, size: SizeFn | None = None) -> list[int]:
        """Resolved size of every reference in :attr:`refs` under ``size``."""
        if size is None:
            return list(self._defaults)
        out = []
        for (name, axis), default in zip(self.refs, self._defaults):
            s = size(name, axis)
            out.append(default if s is None else s)
        return out

    def count(self, size: SizeFn | None = None, *, per_node: bool = False) -> Cost:
        """MACs, FLOPs and params of the model, with axes resized by ``size``.

        Cheap by design (only products of precomputed references), so an allocator can call
        it once per candidate plan.
        """
        vals = self._defaults if size is None else self.sizes(size)
        macs = flops = 0
        if per_node:
            table: dict[str, tuple[int, int]] = {}
            for name, terms in zip(self._node_names, self._node_terms):
                m = f = 0
                for cm, cf, idxs in terms:
                    p = 1
                    for i in idxs:
                        p *= vals[i]
                    m += cm * p
                    f += cf * p
                table[name] = (m, f)
                macs += m
                flops += f
        else:
            table = None  # type: ignore[assignment]
            for cm, cf, idxs in self._terms:
                p = 1
                for i in idxs:
                    p *= vals[i]
                macs += cm * p
                flops += cf * p
        n_params = n_bits = 0
        for idxs, bits, static in self._params:
            p = static
            for i in idxs:
                p *= vals[i]
            n_params += p
            n_bits += p * bits
        return Cost(
            macs=macs,
            flops=flops,
            params=n_params,
            param_bytes=(n_bits + 7) // 8,
            per_node=table,
        )


def count_cost(
    model: ir.Model | ir.Graph,
    size: SizeFn | None = None,
    *,
    dim_values: Mapping[str, int] | None = None,
    per_node: bool = False,
) -> Cost:
    """One-shot ``CostModel(model, dim_values=...).count(size, per_node=...)``."""
    return CostModel(model, dim_values=dim_values).count(size, per_node=per_node)


# ---------------------------------------------------------------------------------------
# The independent check: MACs from the shapes ONNX Runtime actually produces.
#
# Deliberately separate from CostModel: it reads an onnx.ModelProto (no onnx_ir, no shape
# inference, no compiled terms) and expresses every formula per *output element* (or per
# input element for ConvTranspose, per step for recurrent ops) from the real arrays' shapes,
# so a wrong dim reference in the compiled formulas cannot hide behind the same mistake here.

# op → input index of the weight (conv-like) / of A (matmul-like)
_EXEC_CONV_W = {"Conv": 1, "ConvInteger": 1, "QLinearConv": 3}
_EXEC_MATMUL_A = {"MatMul": 0, "MatMulInteger": 0, "QLinearMatMul": 0}
_EXEC_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def _prod(dims: Iterable[int]) -> int:
    p = 1
    for d in dims:
        p *= int(d)
    return p


def _exec_node_macs(node, shape_of: Callable[[str], tuple[int, ...] | None]) -> int | None:
    """MACs of one executed node from actual shapes (None: not a MAC op, or a shape missing)."""
    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        return None
    ins = list(node.input)

    def sh(i: int) -> tuple[int, ...] | None:
        return shape_of(ins[i]) if i < len(ins) and ins[i] else None

    y = shape_of(node.output[0]) if node.output and node.output[0] else None
    if op in _EXEC_CONV_W:
        w = sh(_EXEC_CONV_W[op])
        # each output element: C/group · prod(kernel) multiply-adds = prod(W[1:])
        return None if y is None or w is None else _prod(y) * _prod(w[1:])
    if op == "ConvTranspose":
        x, w = sh(0), sh(1)
        # each input element is scattered into M/group · prod(kernel) outputs = prod(W[1:])
        return None if x is None or w is None else _prod(x) * _prod(w[1:])
    if op == "Gemm":
        a = sh(0)
        if y is None or a is None:
            return None
        trans_a = any(at.name == "transA" and at.i for at in node.attribute)
        k = a[0] if trans_a else a[1]
        return _prod(y) * int(k)
    if op in _EXEC_MATMUL_A:
        a = sh(_EXEC_MATMUL_A[op])
        if y is None or a is None or len(a) == 0:
            return None
        return _prod(y) * int(a[-1])
    if op == "Einsum":
        eq = next((at.s.decode() for at in node.attribute if at.name == "equation"), "").replace(" ", "")
        if "->" not in eq or "..." in eq:
            return None
        operands = eq.split("->")[0].split(",")
        sizes: dict[str, int] = {}
        for i, term in enumerate(operands):
            s = sh(i)
            if s is None or len(s) != len(term):
                return None
            sizes.update(zip(term, s))
        return _prod(sizes.values()) * max(len(operands) - 1, 0)
    if op in _EXEC_GATES:
        x, r = sh(0), sh(2)
        if x is None or r is None:
            return None
        layout = any(at.name == "layout" and at.i for at in node.attribute)
        seq, batch = (x[1], x[0]) if layout else (x[0], x[1])
        directions, hidden = r[0], r[-1]
        rows = directions * _EXEC_GATES[op] * hidden  # gate rows of every direction
        # per step and batch row: one input matvec (rows × input) and one recurrent (rows × hidden)
        return int(seq) * int(batch) * int(rows) * (int(x[-1]) + int(hidden))
    return None


def executed_macs_by_node(model, feeds: Mapping[str, np.ndarray] | None = None) -> dict[str, int]:
    """MACs of every top-level Conv/ConvTranspose/Gemm/MatMul/Einsum/LSTM/GRU/RNN node (and
    ConvInteger/QLinearConv/MatMulInteger/QLinearMatMul) as executed by ONNX Runtime on
    ``feeds`` (default: ``spa.inputs.make_feeds`` of the model).

    ``model`` is a path, an ``onnx.ModelProto`` or an ``onnx_ir.Model``. The model runs once
    with every node output made a graph output (graph optimisations off); each formula reads
    the real arrays' shapes. Nodes inside If/Loop/Scan bodies are not seen (logged); nodes
    that read no graph input are left out (ORT's constant folding runs them once, at load).
    """
    import os
    import pathlib
    import tempfile

    import onnx
    import onnxruntime as ort

    if isinstance(model, ir.Model):
        proto = ir.to_proto(model)
    elif isinstance(model, onnx.ModelProto):
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
    else:
        proto = onnx.load(os.fspath(model))
    g = proto.graph
    if feeds is None:
        from spa.inputs import make_feeds

        feeds = make_feeds(ir.from_proto(proto))
    declared = {o.name for o in g.output}
    produced = [o for n in g.node for o in n.output if o]
    g.output.extend(onnx.ValueInfoProto(name=n) for n in dict.fromkeys(produced) if n not in declared)
    so = ort.SessionOptions()
    so.log_severity_level = 4  # a failed run raises; ORT need not print it too
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if proto.ByteSize() < 2**31 - 2**20:
        sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    else:  # pragma: no cover - a >2 GB model: through a file with external data
        tmp = pathlib.Path(tempfile.mkdtemp(prefix="spa-exec-"))
        onnx.save(proto, str(tmp / "m.onnx"), save_as_external_data=True)
        sess = ort.InferenceSession(str(tmp / "m.onnx"), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    arrays = sess.run(names, dict(feeds))
    shapes: dict[str, tuple[int, ...]] = {n: tuple(np.shape(a)) for n, a in zip(names, arrays)}
    del arrays
    shapes.update({t.name: tuple(t.dims) for t in g.initializer})
    shapes.update({k: tuple(np.shape(v)) for k, v in feeds.items()})
    out: dict[str, int] = {}
    varying = {i.name for i in g.input}  # what ORT's constant folding cannot compute at load
    for i, node in enumerate(g.node):
        has_body = any(at.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for at in node.attribute)
        if has_body:
            logger.info("executed_macs: the body of %s (%s) is not counted", node.name, node.op_type)
        if has_body or node.op_type in _NONDETERMINISTIC or any(x in varying for x in node.input):
            varying.update(o for o in node.output if o)
        else:
            continue  # reads constants only: folded when the session is made, not executed per run
        m = _exec_node_macs(node, shapes.get)
        if m is not None:
            out[node.name or f"{node.op_type}_{i}"] = m
    return out


def executed_macs(model, feeds: Mapping[str, np.ndarray] | None = None) -> int:
    """Total MACs ONNX Runtime executes on ``feeds``; see :func:`executed_macs_by_node`."""
    return sum(executed_macs_by_node(model, feeds).values())
