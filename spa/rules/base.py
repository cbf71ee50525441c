"""The channel-rule contract, and every per-op fact a rule author must know.

A rule answers two questions about one node (DESIGN.md, "The channel-rule contract"):

1. ``couplings(node, ctx)``: which channel dimensions ``Dim(value, axis)`` of the node's inputs,
   outputs and weights index the *same* channels, and how (identity, offset, range, block).
   It records these with ``ctx.tie(...)``; anything it cannot prove it ``ctx.block(...)``s.
   It may not mutate anything.
2. ``rewrite(node, ctx)``: given the kept indices of every dimension it touches, which
   attributes and constant inputs (group, split sizes, shape constants …) must change.
   It records these with ``ctx.set_attr``/``ctx.set_const`` and does not mutate either:
   the rewrites become part of the plan and the surgery pass executes them. A rule of an op
   without channel-dependent attributes mixes in :class:`NoRewrite` (or leaves it out).

Couplings are element-exact: ``tie`` unions individual channel indices ("atoms"), so Concat
offsets, Split ranges, Flatten blocks and grouped convolutions all use the same mechanism.
A dimension a node touches but does not mention is treated as opaque by the analysis (the
channels it holds are frozen), so a rule that forgets an axis is safe, never wrong.

Per-op facts, and where each lives (a new op may need more than its rule):

- **The rule** and its key ``(domain, op_type)``: ``@register(...)`` in
  ``spa/rules/<family>.py``; a custom op's rule can instead be passed per call
  (``analyze_channels(model, rules=...)``) or installed as a plug-in (entry-point group
  ``spa.rules``): see :mod:`spa.rules.registry`. ``"ai.onnx"`` is the default domain.
- **Weight look-through** (:data:`LOOK_THROUGH`, here): ops an exporter puts between a
  constant weight and its consumer (DequantizeLinear, Cast, Identity, Transpose). A weight
  read through them is still a constant weight; the op's own rule must tie its input to
  its output axis for axis. Add one with :func:`register_look_through`.
- **Subgraphs**: a rule that maps its bodies' inputs/outputs itself sets
  ``owns_subgraphs = True`` (``If``, ``spa/rules/control_flow.py``); otherwise every value
  crossing a body boundary is frozen (SUBGRAPH).
- **Inexact ops** (LayerNorm over the channel axis …): block CHANNEL_MIXING, or, when
  ``ctx.allow_inexact``, tie and ``ctx.mark_inexact``: the oracle then reports, not asserts.
- **Quantized weights' zero points** (the oracle masks a removed column with its zero
  point, not 0): ``ZERO_POINT_OF`` / ``weight_zero_point`` in ``spa/rules/quantize.py``.
- **Cost** (FLOPs/MACs/params per op): the formulas live in ``spa/analysis/cost.py``
  (``_PER_OUTPUT``, ``_CONV_XW``, ``_MATMUL_AB`` …); an op without one is counted as
  unknown and named in the report, it never counts as free.
- **Consumers** (which nodes read a group's channels through a weight, for compensation):
  ``spa/analysis/consumers.py`` re-runs the rules; it names conv/matmul kinds and bias inputs.
- **Graph facts** every rule may use (constant test, opset, attributes, subgraphs, domain):
  :mod:`spa.graph`.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import logging
from collections.abc import Callable, Iterable
from typing import NamedTuple, Protocol

import numpy as np
import onnx_ir as ir

from spa.graph import attr as graph_attr
from spa.graph import canonical_domain
from spa.rules.registry import get_rule, register, register_rule, registered_ops, resolve_rules

__all__ = [
    "Dim",
    "BlockCode",
    "Blocked",
    "Role",
    "Tie",
    "ChannelRule",
    "CouplingContext",
    "RewriteContext",
    "AttrRewrite",
    "ConstRewrite",
    "NoRewrite",
    "LookThrough",
    "LOOK_THROUGH",
    "look_through",
    "register_look_through",
    "is_weight_input",
    "register",
    "register_rule",
    "get_rule",
    "registered_ops",
    "resolve_rules",
]

logger = logging.getLogger(__name__)


class Dim(NamedTuple):
    """One axis of one tensor (activation or initializer), addressed by value name.

    A named tuple, not a dataclass: the analysis hashes and compares millions of these (1.4
    million hashes on a 30 000-node chain), and a tuple's hash and equality run in C where a
    frozen dataclass's run Python code on every call. Hash, equality and order are those of
    ``(value, axis)``, as the dataclass's were (a Dim also equals the plain tuple)."""

    value: str
    axis: int

    def __str__(self) -> str:
        return f"{self.value}[{self.axis}]"


#: ``Dim``/``Tie`` built by ``tuple.__new__`` directly, in C: the named tuples' own ``__new__``
#: is a Python function, and ``tie`` builds three of them per tied axis pair.
_new_dim = functools.partial(tuple.__new__, Dim)


class BlockCode(str, enum.Enum):
    """Why channels are frozen. Stable strings: reports and tests depend on them."""

    NO_RULE = "no_rule"
    GRAPH_IO = "graph_io"
    DYNAMIC_SHAPE = "dynamic_shape"
    DATA_DEPENDENT = "data_dependent"
    UNMAPPED_AXIS = "unmapped_axis"
    CHANNEL_MIXING = "channel_mixing"
    UNSUPPORTED_ATTRIBUTE = "unsupported_attribute"
    SUBGRAPH = "subgraph"
    NON_CONSTANT_WEIGHT = "non_constant_weight"
    INDIVISIBLE = "indivisible"
    #: An initializer that is also a graph input, kept overridable (``--keep-weight-inputs``):
    #: a caller may feed another tensor of the same shape, so its channels are the interface.
    WEIGHT_INPUT = "weight_input"


@dataclasses.dataclass(frozen=True)
class Blocked:
    """A refusal: the channels of ``dim`` (or every axis of ``value`` when axis is None) stay."""

    code: BlockCode
    reason: str
    node: str | None = None
    value: str | None = None

    def to_json(self) -> dict[str, str | None]:
        return {"code": self.code.value, "reason": self.reason, "node": self.node, "value": self.value}


class Role(str, enum.Enum):
    """What a weight axis does with the channels of its group.

    OUT: slices along this axis *produce* output channels (Conv W axis 0). A group needs one.
    IN: slices along this axis *read* input channels (Conv W axis 1). The mask oracle zeroes
        exactly these slices in the original model.
    PARAM: a per-channel parameter (bias, BN statistics, PRelu slope, per-channel constant).
    """

    OUT = "out"
    IN = "in"
    PARAM = "param"


class Tie(NamedTuple):
    """``a[a_index[k]]`` and ``b[b_index[k]]`` are the same channel, for every k.

    Immutable like the frozen dataclass it was, but built without a Python ``__init__`` (one
    per tie, four per element-wise node). Identity ties share one read-only ``arange`` per
    size (:func:`_arange`)."""

    a: Dim
    b: Dim
    a_index: np.ndarray
    b_index: np.ndarray
    node: str


@dataclasses.dataclass(frozen=True)
class AttrRewrite:
    node: str
    name: str
    value: int | float | list[int] | list[float]

    def to_json(self) -> dict:
        return {"kind": "attribute", "node": self.node, "name": self.name, "value": self.value}


@dataclasses.dataclass(frozen=True)
class ConstRewrite:
    """Replace constant input ``index`` of ``node`` (a shape/split/slice constant) by ``value``."""

    node: str
    index: int
    value: list[int]

    def to_json(self) -> dict:
        return {"kind": "constant", "node": self.node, "input": self.index, "value": self.value}


@dataclasses.dataclass(frozen=True)
class LookThrough:
    """An op that keeps a weight's channels between the constant and its consumer.

    Output axis ``k`` of the op is axis ``perm(node, rank)[k]`` of its input 0 (identity when
    ``perm`` is None). Both directions are derived from it: ``weight_source`` walks from a
    consumer back to the constant, ``spa.analysis.consumers`` from the constant forward.
    """

    perm: Callable[[ir.Node, int], list[int]] | None = None

    def input_axis(self, node: ir.Node, out_axis: int, rank: int) -> int:
        """The input-0 axis that becomes output axis ``out_axis``."""
        return out_axis if self.perm is None else self.perm(node, rank)[out_axis]

    def output_axis(self, node: ir.Node, in_axis: int, rank: int) -> int:
        """The output axis that input-0 axis ``in_axis`` becomes."""
        return in_axis if self.perm is None else self.perm(node, rank).index(in_axis)


_new_tie = functools.partial(tuple.__new__, Tie)


def _transpose_perm(node: ir.Node, rank: int) -> list[int]:
    perm = graph_attr(node, "perm")
    return list(range(rank))[::-1] if perm is None else [int(p) % rank for p in perm]


#: The weight look-through registry, keyed by ``(domain, op_type)``: the ops exporters put
#: between a constant weight and the op that reads it. ``CouplingContext.weight_source`` /
#: ``weight`` see through them (QDQ models, torch Linear exported as ``MatMul(x, Transpose(W))``),
#: so a weight behind them is still a constant weight and its role lands on the initializer.
#: Each op here also needs a rule tying its input 0 to its output, axis for axis.
LOOK_THROUGH: dict[tuple[str, str], LookThrough] = {
    ("", "DequantizeLinear"): LookThrough(),
    ("", "Cast"): LookThrough(),
    ("", "Identity"): LookThrough(),
    ("", "Transpose"): LookThrough(_transpose_perm),
}


def look_through(node: ir.Node) -> LookThrough | None:
    """How ``node`` keeps a weight's axes, when it is a look-through op (:data:`LOOK_THROUGH`)."""
    return LOOK_THROUGH.get((canonical_domain(node.domain), node.op_type))


def register_look_through(op_type: str, *, domain: str = "", perm: Callable[[ir.Node, int], list[int]] | None = None) -> None:
    """Add an op to :data:`LOOK_THROUGH` (``perm(node, rank)``: see :class:`LookThrough`)."""
    LOOK_THROUGH[(canonical_domain(domain), op_type)] = LookThrough(perm)


def is_weight_input(value: ir.Value | None) -> bool:
    """An initializer that is also a graph input (the IR<4 convention, kept by
    ``--keep-weight-inputs``): a weight to the rules (it gives its group a source, so the
    report lists the group), but overridable, so the analysis freezes it (WEIGHT_INPUT)."""
    return value is not None and value.is_initializer() and value.is_graph_input()


_ARANGES: dict[int, np.ndarray] = {}


def _arange(n: int) -> np.ndarray:
    """``np.arange(n)`` as int64, read-only and shared: the index of every identity tie of
    that size (a chain of 100 000 element-wise nodes would otherwise allocate 400 000)."""
    r = _ARANGES.get(n)
    if r is None:
        r = np.arange(n, dtype=np.int64)
        r.flags.writeable = False
        if len(_ARANGES) < 4096 and n <= 1 << 16:  # bounded: a model has few distinct sizes
            _ARANGES[n] = r
    return r


def _normalize_axis(axis: int, rank: int) -> int:
    if not -rank <= axis < rank:
        raise IndexError(f"axis {axis} out of range for rank {rank}")
    return axis % rank


class CouplingContext:
    """What a rule may ask about its node, and where it records ties, roles and blocks."""

    def __init__(
        self,
        node: ir.Node,
        *,
        opset: int,
        is_constant: Callable[[ir.Value], bool],
        is_channel: Callable[[Dim], bool] = lambda d: False,
        allow_inexact: bool = False,
    ) -> None:
        self.node = node
        self.opset = opset
        self._is_constant = is_constant
        self._is_channel = is_channel
        #: The user accepts inexact couplings (see ``mark_inexact``); rules that would block
        #: CHANNEL_MIXING may then tie and mark instead.
        self.allow_inexact = allow_inexact
        self.ties: list[Tie] = []
        self.roles: list[tuple[Dim, Role]] = []
        self.blocks: list[tuple[str, int | None, Blocked]] = []
        self.mentioned: set[Dim] = set()
        # Whether removing channels on this node's dims changes results beyond the removed
        # channels themselves (LayerNorm over the axis …): the oracle reports, not asserts.
        self.inexact: list[tuple[Dim, str]] = []

    # -- queries -------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.node.name or f"<{self.node.op_type}>"

    def input(self, i: int) -> ir.Value | None:
        return self.node.inputs[i] if i < len(self.node.inputs) else None

    def output(self, i: int) -> ir.Value | None:
        return self.node.outputs[i] if i < len(self.node.outputs) else None

    def attr(self, name: str, default=None):
        return graph_attr(self.node, name, default)

    @staticmethod
    def rank(value: ir.Value | None) -> int | None:
        if value is None or value.shape is None:
            return None
        return len(value.shape)

    @staticmethod
    def size(value: ir.Value | None, axis: int) -> int | None:
        """Static size of ``value``'s axis, or None when unknown or symbolic."""
        if value is None or value.shape is None:
            return None
        dims = value.shape.dims  # the tuple itself: this runs once per tied axis
        if not -len(dims) <= axis < len(dims):
            return None
        d = dims[axis]
        return d if isinstance(d, int) and d >= 0 else None

    def shape(self, value: ir.Value | None) -> tuple[int | None, ...] | None:
        if value is None or value.shape is None:
            return None
        return tuple(d if isinstance(d, int) else None for d in value.shape)

    def const(self, value: ir.Value | None) -> np.ndarray | None:
        """The value of a constant input (initializer not overridable as a graph input)."""
        if value is None or not self._is_constant(value):
            return None
        return value.const_value.numpy()

    def is_constant(self, value: ir.Value | None) -> bool:
        return value is not None and self._is_constant(value)

    def weight_source(self, value: ir.Value | None, axis: int) -> tuple[ir.Value, int] | None:
        """The constant initializer axis behind a weight axis, seen through the ops exporters
        put between a weight and its consumer (:data:`LOOK_THROUGH`: DequantizeLinear in QDQ
        models, Cast, Identity, and Transpose — a torch Linear exported without constant
        folding reads ``Transpose(W)``; the axis is permuted back). An overridable
        initializer (:func:`is_weight_input`) is a weight here too; the analysis freezes it."""
        depth = 0
        while value is not None and depth < 8:
            if self.is_constant(value) or is_weight_input(value):
                return value, axis % max(1, len(value.shape))
            src = value.producer()
            through = None if src is None else look_through(src)
            if through is None:
                return None
            nxt = src.inputs[0] if src.inputs else None
            rank = self.rank(value)
            if nxt is None or rank is None or self.rank(nxt) != rank:
                return None
            axis = through.input_axis(src, axis % rank, rank)
            value, depth = nxt, depth + 1
        return None

    def is_weight(self, value: ir.Value | None) -> bool:
        """A constant, or a constant seen through the ops of ``weight_source``."""
        return value is not None and self.rank(value) is not None and self.weight_source(value, 0) is not None

    def is_channel(self, value: ir.Value | None, axis: int) -> bool:
        """Whether ``value[axis]`` is already tied to a weight by the nodes before this one.

        Nodes are analysed in topological order, so this tells a Reshape that merges axes
        which of its input axes carries the channels from upstream (NCHW vs NHWC Flatten).
        """
        if value is None or self.rank(value) is None:
            return False
        return self._is_channel(self.dim(value, axis))

    # -- records -------------------------------------------------------------------------
    def dim(self, value: ir.Value, axis: int) -> Dim:
        rank = self.rank(value)
        assert rank is not None, "dim() needs a value of known rank"
        return Dim(value.name, _normalize_axis(axis, rank))

    def tie(
        self,
        a: ir.Value | None,
        a_axis: int,
        b: ir.Value | None,
        b_axis: int,
        a_index: Iterable[int] | np.ndarray | None = None,
        b_index: Iterable[int] | np.ndarray | None = None,
    ) -> bool:
        """Record that channels of ``a[a_axis]`` and ``b[b_axis]`` correspond.

        Without indices the two axes must have equal size (identity). With indices, element k
        of ``a_index`` and of ``b_index`` are the same channel (broadcast: one side may be a
        scalar). If a side's size is unknown, the other side is blocked instead: a channel
        we cannot follow must not be removed. Returns whether the tie was recorded.
        """
        na, nb = self.size(a, a_axis), self.size(b, b_axis)
        if na is None or nb is None:
            for v, ax, n in ((a, a_axis, na), (b, b_axis, nb)):
                if v is not None and n is not None:
                    other = b if v is a else a
                    self.block(
                        v,
                        ax,
                        BlockCode.DYNAMIC_SHAPE,
                        f"{self.node.op_type} '{self.name}': the matching axis of "
                        f"'{other.name if other is not None else '?'}' has no static size",
                    )
            return False
        # Both sizes known: both axes are in range, so ``% rank`` is ``_normalize_axis``.
        da, db = _new_dim((a.name, a_axis % len(a.shape))), _new_dim((b.name, b_axis % len(b.shape)))
        if a_index is None and b_index is None:
            if na != nb:
                self.block(a, a_axis, BlockCode.UNMAPPED_AXIS, f"{self.node.op_type} '{self.name}': sizes {na} and {nb} differ")
                self.block(b, b_axis, BlockCode.UNMAPPED_AXIS, f"{self.node.op_type} '{self.name}': sizes {na} and {nb} differ")
                return False
            ia = ib = _arange(na)
        else:
            ia = np.arange(na, dtype=np.int64) if a_index is None else np.asarray(a_index, dtype=np.int64)
            ib = np.arange(nb, dtype=np.int64) if b_index is None else np.asarray(b_index, dtype=np.int64)
            ia, ib = np.broadcast_arrays(ia, ib)
            if ia.size and (ia.min() < 0 or ia.max() >= na or ib.min() < 0 or ib.max() >= nb):
                raise IndexError(f"tie index out of range on {da} or {db} at node {self.name}")
            ia, ib = np.ascontiguousarray(ia), np.ascontiguousarray(ib)
        mentioned = self.mentioned
        mentioned.add(da)
        mentioned.add(db)
        self.ties.append(_new_tie((da, db, ia, ib, self.name)))
        return True

    def tie_axes(self, a: ir.Value | None, b: ir.Value | None, axes: Iterable[int]) -> None:
        """``tie(a, ax, b, ax)`` for each ``ax`` in ``axes``, in order, with the same records.

        The element-wise rules' call (four ties per node of a 4-D model): axes of equal static
        size are tied here with the shapes read once; any other axis (unknown or differing
        size, out of range) goes through :meth:`tie`, which blocks it as it says."""
        sa = None if a is None or a.shape is None else a.shape.dims
        sb = None if b is None or b.shape is None else b.shape.dims
        if sa is None or sb is None:
            for ax in axes:
                self.tie(a, ax, b, ax)
            return
        ra, rb = len(sa), len(sb)
        na_, nb_ = a.name, b.name
        node = self.name
        mentioned, ties = self.mentioned, self.ties
        for ax in axes:
            n = sa[ax] if 0 <= ax < ra else None
            if type(n) is int and n >= 0 and 0 <= ax < rb and sb[ax] == n and type(sb[ax]) is int:
                r = _arange(n)
                da, db = _new_dim((na_, ax)), _new_dim((nb_, ax))
                mentioned.add(da)
                mentioned.add(db)
                ties.append(_new_tie((da, db, r, r, node)))
            else:
                self.tie(a, ax, b, ax)

    def allow(self, value: ir.Value | None, axis: int) -> None:
        """Say that this node is indifferent to the size of ``value[axis]`` (reads only its dtype …)."""
        if value is not None and self.rank(value) is not None:
            self.mentioned.add(self.dim(value, axis))

    def weight(self, value: ir.Value | None, axis: int, role: Role) -> bool:
        """Declare a weight axis. Weights must be constants: a computed weight blocks its axis.

        A weight reached through the ops of :data:`LOOK_THROUGH` counts as the constant
        behind it (``weight_source``): the role goes on that initializer's axis, which
        those ops' rules tie to the weight axis.
        """
        if value is None:
            return False
        if not self.is_constant(value) and self.rank(value) is not None:
            found = self.weight_source(value, axis)
            if found is not None:
                self.roles.append((self.dim(*found), role))
                return True
        if not self.is_constant(value):
            self.block(value, axis, BlockCode.NON_CONSTANT_WEIGHT, f"{self.node.op_type} '{self.name}': weight '{value.name}' is not a constant initializer")
            return False
        self.roles.append((self.dim(value, axis), role))
        return True

    def block(self, value: ir.Value | None, axis: int | None, code: BlockCode, reason: str) -> None:
        """Freeze the channels of ``value[axis]`` (every axis when axis is None)."""
        if value is None:
            return
        rank = self.rank(value)
        ax = None if axis is None or rank is None else _normalize_axis(axis, rank)
        if ax is not None:
            self.mentioned.add(Dim(value.name, ax))
        elif rank is not None:
            self.mentioned.update(Dim(value.name, i) for i in range(rank))
        self.blocks.append((value.name, ax, Blocked(code, reason, self.name, value.name)))

    def block_all(self, code: BlockCode, reason: str) -> None:
        """Freeze every axis of every input and output of this node."""
        for v in (*self.node.inputs, *self.node.outputs):
            self.block(v, None, code, reason)

    def mark_inexact(self, value: ir.Value, axis: int, why: str) -> None:
        self.inexact.append((self.dim(value, axis), why))


class RewriteContext:
    """Kept indices for the dims a node touches; collects the node's attribute/constant rewrites."""

    def __init__(self, node: ir.Node, kept: Callable[[Dim], np.ndarray | None], opset: int) -> None:
        self.node = node
        self.opset = opset
        self._kept = kept
        self.rewrites: list[AttrRewrite | ConstRewrite] = []

    @property
    def name(self) -> str:
        return self.node.name

    def kept(self, value: ir.Value | None, axis: int) -> np.ndarray | None:
        """Sorted kept indices of ``value[axis]``, or None when that axis is unchanged."""
        if value is None or value.shape is None:
            return None
        return self._kept(Dim(value.name, _normalize_axis(axis, len(value.shape))))

    def new_size(self, value: ir.Value, axis: int) -> int | None:
        """Size of ``value[axis]`` after pruning (the old static size if unchanged)."""
        k = self.kept(value, axis)
        if k is not None:
            return int(len(k))
        d = value.shape[axis] if value.shape is not None else None
        return d if isinstance(d, int) else None

    def changed(self, *values: ir.Value | None) -> bool:
        return any(
            v is not None and v.shape is not None and any(self.kept(v, a) is not None for a in range(len(v.shape)))
            for v in values
        )

    def set_attr(self, name: str, value) -> None:
        self.rewrites.append(AttrRewrite(self.node.name, name, value))

    def set_const(self, index: int, value: Iterable[int], *, node: str | None = None) -> None:
        """Replace constant input ``index`` of this node (or of ``node``, a shape-building
        Concat this node alone reads) by ``value``."""
        self.rewrites.append(ConstRewrite(node or self.node.name, index, [int(x) for x in value]))


class ChannelRule(Protocol):
    """How one op family couples channels (see module docstring)."""

    def couplings(self, node: ir.Node, ctx: CouplingContext) -> None: ...

    def rewrite(self, node: ir.Node, ctx: RewriteContext) -> None: ...


class NoRewrite:
    """Mixin for rules whose ops have no channel-dependent attributes or constants."""

    def rewrite(self, node: ir.Node, ctx: RewriteContext) -> None:  # noqa: D102
        return None
