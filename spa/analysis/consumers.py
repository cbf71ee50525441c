"""The consumer view: for every channel group, the nodes that *read* its channels through a weight.

A consumer is one (node, weight axis) pair whose axis has the IN role in a group: exactly the
slices the mask oracle zeroes, and exactly what compensation edits (METHODS.md §3–§4). For each
consumer the view says

- which initializer and axis hold its input columns (``weight``, ``axis``; the name is the input
  model's, also when the node reads it through Transpose/DequantizeLinear/Cast/Identity, whose
  node names are in ``weight_path``), which axis holds its rows (``out_axis``), its bias;
- which activation tensor carries the channels into the node and along which axis
  (``activation``, ``activation_axis``): the tensor whose X·Xᵀ compensation collects;
- the column layout: which weight index along ``axis`` every activation channel meets
  (``channel``/``column`` pairs), which unit of the group every weight index belongs to
  (``unit_of_column``), how many taps each column has (``receptive``: kH·kW for a conv) and,
  for grouped convs, which block of outputs each channel feeds (``row_blocks``).

Nothing here is a second table of op layouts: the pairs come from re-running the node's own
channel rule (its ties between the activation axis and the weight axis), units from the
analysis (``Group.unit_of``), rows from the rule's OUT role. Only names (``kind``), conv
groups and which input is a bias are read from the op.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import onnx_ir as ir

from spa.analysis.channels import ChannelGraph, Group, is_constant
from spa.errors import UnsupportedError
from spa.graph import all_initializers
from spa.rules import base as rules_base
from spa.rules.base import CouplingContext, Dim, Role

try:  # the look-through registry (ops between a constant weight and its reader)
    from spa.rules.base import look_through as _look_through
except ImportError:  # pragma: no cover - older rule base: the fixed list below
    _look_through = None

__all__ = ["Consumer", "ConsumerView", "consumers_of", "consumer_view"]

#: Ops a weight may pass through before its consumer, when the rule base has no registry.
_THROUGH = ("DequantizeLinear", "Cast", "Identity", "Transpose")
_CONV = ("Conv", "QLinearConv", "ConvInteger")
_CONV_T = ("ConvTranspose",)
_MATMUL = ("MatMul", "QLinearMatMul", "MatMulInteger")
_RECURRENT = ("LSTM", "GRU", "RNN")
#: Input position of the bias, for ops that carry one.
_BIAS_INPUT = {"Conv": 2, "ConvTranspose": 2, "QLinearConv": 8, "Gemm": 2}


@dataclasses.dataclass(frozen=True, eq=False)
class Consumer:
    """One node reading one group's channels through one weight axis.

    ``channel[k]`` (an index along ``activation_axis`` of ``activation``) is multiplied by the
    weight slice ``column[k]`` along ``axis`` of ``weight``; for a grouped conv only by the
    rows of block ``row_block(channel[k])``. ``unit_of_column[i]`` is the group unit that
    removing takes weight index ``i`` away with it.
    """

    group: str
    node: str
    op_type: str
    domain: str
    #: conv | conv_grouped | conv_transpose | conv_transpose_grouped | gemm | matmul |
    #: recurrent | attention | <op_type lower-cased>
    kind: str
    #: column: one weight index per unit; block: a unit owns several (a Flatten's H·W columns
    #: per conv channel, a head's head_dim columns); per_group: a grouped conv, where a unit is
    #: the same position in every group.
    layout: str
    weight: str
    axis: int
    out_axis: int | None
    weight_shape: tuple[int, ...]
    #: The value the node reads (``weight`` itself, or the end of ``weight_path``) and its axis.
    weight_input: str
    weight_input_axis: int
    weight_path: tuple[str, ...]
    #: Their op types (a DequantizeLinear means ``weight`` holds quantized integers).
    weight_path_ops: tuple[str, ...]
    #: The node input whose channels meet the columns (None: a recurrent weight reading the
    #: node's own hidden state).
    activation: str | None
    activation_axis: int | None
    #: Size of the activation's channel axis (0 without an activation).
    activation_size: int
    bias: str | None
    bias_axis: int | None
    #: The node that adds ``bias``: the consumer itself, or the Add after a MatMul.
    bias_node: str | None
    #: Gemm's alpha and beta (the weight and bias enter the output scaled by them); 1 otherwise.
    weight_scale: float
    bias_scale: float
    #: Taps per column: prod of the weight's axes other than ``axis``/``out_axis`` (kH·kW).
    receptive: int
    #: Conv groups: channel c feeds only the outputs of block c // (C / row_blocks).
    row_blocks: int
    unit_of_column: np.ndarray
    channel: np.ndarray
    column: np.ndarray

    # -- derived ---------------------------------------------------------------------------
    @property
    def units(self) -> np.ndarray:
        """Ascending ids of the group units this consumer reads."""
        return np.unique(self.unit_of_column)

    @property
    def columns_per_unit(self) -> int | None:
        """Weight indices along ``axis`` per unit (1, H·W after Flatten, head_dim …); None if uneven."""
        counts = np.bincount(self.unit_of_column)
        counts = counts[counts > 0]
        return int(counts[0]) if counts.size and (counts == counts[0]).all() else None

    def columns_of(self, unit: int) -> np.ndarray:
        """Ascending weight indices along ``axis`` that belong to ``unit``."""
        return np.flatnonzero(self.unit_of_column == unit)

    def channels_of(self, unit: int) -> np.ndarray:
        """Ascending activation channels that meet the columns of ``unit``."""
        return np.unique(self.channel[np.isin(self.column, self.columns_of(unit))])

    def column_of(self, channel: int) -> int:
        """The weight index along ``axis`` that activation ``channel`` meets."""
        hit = np.flatnonzero(self.channel == channel)
        if not hit.size:
            raise KeyError(f"{self.node}: channel {channel} of '{self.activation}' is not read through '{self.weight}'")
        return int(self.column[hit[0]])

    def row_block(self, channel: int) -> int:
        """Which conv group's outputs ``channel`` feeds (0 when not grouped)."""
        if self.row_blocks == 1 or not self.activation_size:
            return 0
        return int(channel) // (self.activation_size // self.row_blocks)

    def rows_of_block(self, block: int) -> np.ndarray:
        """Weight indices along ``out_axis`` computed from block ``block``'s channels.

        Conv: the block's M/g filters. ConvTranspose keeps one [M/g] set of rows that every
        block uses (its blocks differ in their columns), so all rows.
        """
        if self.out_axis is None:
            return np.zeros(0, dtype=np.int64)
        m = self.weight_shape[self.out_axis]
        if self.row_blocks == 1 or self.kind.startswith("conv_transpose"):
            return np.arange(m)
        per = m // self.row_blocks
        return np.arange(block * per, (block + 1) * per)

    def matrix_columns_of(self, unit: int) -> np.ndarray:
        """Columns of ``as_matrix(W)`` that belong to ``unit`` (each weight index owns
        ``receptive`` consecutive columns, in the weight's own (kh, kw) order)."""
        cols = self.columns_of(unit)
        r = self.receptive
        return (cols[:, None] * r + np.arange(r)[None, :]).reshape(-1)

    def as_matrix(self, weight: np.ndarray) -> np.ndarray:
        """The weight as [rows, columns] (rows: ``out_axis``; columns: ``axis`` × taps).

        Conv W[M, C/g, kH, kW] → [M, C/g·kH·kW]; Gemm/MatMul → [N, K]. The layout of
        METHODS.md §0: input index i owns columns i·receptive … (i+1)·receptive − 1.
        """
        weight = np.asarray(weight)
        if tuple(weight.shape) != self.weight_shape:
            raise ValueError(f"{self.node}: expected '{self.weight}' of shape {self.weight_shape}, got {weight.shape}")
        if self.out_axis is None or (self.receptive != _rest(self.weight_shape, self.axis, self.out_axis)):
            raise UnsupportedError(f"{self.node} ({self.kind}): '{self.weight}' has no [rows, columns] form")
        moved = np.moveaxis(weight, (self.out_axis, self.axis), (0, 1))
        return moved.reshape(moved.shape[0], -1)

    def from_matrix(self, matrix: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`as_matrix`: a [rows, columns] matrix back in the weight's layout."""
        if self.out_axis is None:
            raise UnsupportedError(f"{self.node} ({self.kind}): '{self.weight}' has no [rows, columns] form")
        shape = list(self.weight_shape)
        moved_shape = [shape[self.out_axis], shape[self.axis]] + [s for i, s in enumerate(shape) if i not in (self.out_axis, self.axis)]
        return np.moveaxis(np.asarray(matrix).reshape(moved_shape), (0, 1), (self.out_axis, self.axis))

    def describe(self) -> str:
        """One line: node, weight axis, activation axis, layout."""
        via = f" via {'→'.join(self.weight_path_ops)}" if self.weight_path else ""
        act = f"{self.activation}[{self.activation_axis}]" if self.activation is not None else "(own state)"
        per = self.columns_per_unit
        bias = f", bias {self.bias}" if self.bias else ""
        return (
            f"{self.group}: {self.kind} '{self.node}' reads {act} through {self.weight}[{self.axis}]{via}"
            f" — {self.layout}, {len(self.units)} units × {per if per is not None else '?'} columns × {self.receptive} taps{bias}"
        )

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, np.ndarray):
                v = [int(x) for x in v]
            elif isinstance(v, tuple):
                v = list(v)
            d[f.name] = v
        d["columns_per_unit"] = self.columns_per_unit
        return d


def _rest(shape: tuple[int, ...], *skip: int) -> int:
    return math.prod(s for i, s in enumerate(shape) if i not in skip)


@dataclasses.dataclass
class ConsumerView:
    """Consumers of every group that has any, in graph order (``view["g3"]``)."""

    by_group: dict[str, list[Consumer]]

    def __getitem__(self, group_id: str) -> list[Consumer]:
        return self.by_group.get(group_id, [])

    def __iter__(self) -> Iterator[Consumer]:
        for consumers in self.by_group.values():
            yield from consumers

    def __len__(self) -> int:
        return sum(len(c) for c in self.by_group.values())

    def of_node(self, node: str) -> list[Consumer]:
        return [c for c in self if c.node == node]

    def to_json(self) -> dict[str, Any]:
        return {"groups": [{"id": gid, "consumers": [c.to_json() for c in cs]} for gid, cs in self.by_group.items()]}


# ---------------------------------------------------------------------------------------------


def _unpack(source: Any, cg: ChannelGraph | None) -> tuple[ir.Model, ChannelGraph]:
    if cg is None:
        if hasattr(source, "model") and hasattr(source, "channels"):
            return source.model, source.channels
        raise TypeError("consumers: pass an Analysis (spa.analyze), or an onnx_ir.Model and its ChannelGraph")
    return source, cg


def consumer_view(
    source: Any, cg: ChannelGraph | None = None, *, groups: Iterable[Group | str] | None = None, rules: Any = None
) -> ConsumerView:
    """The consumers of every group (or of ``groups``) of an analysed model.

    ``source`` is an :class:`spa.Analysis`, or the analysed (canonical) ``onnx_ir.Model`` with
    its ``ChannelGraph`` as ``cg``. The consumers' own rules are re-run to read their ties: the
    ones the analysis used (``ChannelGraph.rule``), or ``rules`` when given. Read-only.
    """
    model, cg = _unpack(source, cg)
    finder = _Finder(model, cg, rules)
    chosen = cg.groups if groups is None else [finder.group(g) for g in groups]
    by_group = {}
    for g in chosen:
        found = finder.consumers(g)
        if found or groups is not None:
            by_group[g.id] = found
    return ConsumerView(by_group)


def consumers_of(source: Any, group: Group | str, cg: ChannelGraph | None = None, *, rules: Any = None) -> list[Consumer]:
    """The consumers of one group (by id or object), in graph order. See :func:`consumer_view`."""
    model, cg = _unpack(source, cg)
    finder = _Finder(model, cg, rules)
    return finder.consumers(finder.group(group))


class _Finder:
    def __init__(self, model: ir.Model, cg: ChannelGraph, rules: Any = None) -> None:
        self.model = model
        self.cg = cg
        self.overlay = _overlay(rules)
        self.opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
        self.initializers = all_initializers(model.graph)
        self.order = {id(n): k for k, n in enumerate(model.graph.all_nodes())}
        self.by_id = {g.id: g for g in cg.groups}
        self.allow_inexact = any(g.inexact for g in cg.groups)

    def group(self, g: Group | str) -> Group:
        if isinstance(g, Group):
            return g
        try:
            return self.by_id[g]
        except KeyError:
            raise KeyError(f"no group {g!r} in this analysis") from None

    def _rule(self, node: ir.Node):
        """The rule the analysis used: explicit ``rules`` first, else the ChannelGraph's own."""
        if self.overlay:
            return rules_base.get_rule(node.domain, node.op_type, self.overlay)
        if hasattr(self.cg, "rule"):
            return self.cg.rule(node)  # remembers the per-call rules of the analysis
        return rules_base.get_rule(node.domain, node.op_type)

    def _is_channel(self, d: Dim) -> bool:
        g = self.cg.group_of(d)
        return g is not None and g.has_source

    def consumers(self, group: Group) -> list[Consumer]:
        found: list[tuple[int, str, Consumer]] = []
        for dim in group.weight_dims(Role.IN):
            value = self.initializers.get(dim.value)
            if value is None:
                continue
            for node, index, seen, seen_axis, path in _readers(value, dim.axis, ()):
                c = self._consumer(group, dim, value, node, index, seen, seen_axis, path)
                if c is not None:
                    found.append((self.order.get(id(node), -1), dim.value, c))
        found.sort(key=lambda t: (t[0], t[1]))
        return [c for _, _, c in found]

    def _consumer(
        self,
        group: Group,
        dim: Dim,
        weight: ir.Value,
        node: ir.Node,
        index: int,
        seen: ir.Value,
        seen_axis: int,
        path: tuple[tuple[str, str], ...],
    ) -> Consumer | None:
        rule = self._rule(node)
        if rule is None:
            return None
        ctx = CouplingContext(node, opset=self.opset, is_constant=is_constant, is_channel=self._is_channel, allow_inexact=self.allow_inexact)
        rule.couplings(node, ctx)
        if (dim, Role.IN) not in ctx.roles:
            return None  # the node reads the initializer, but not as this group's columns
        out_axes = [d.axis for d, r in ctx.roles if d.value == dim.value and r == Role.OUT]
        out_axis = out_axes[0] if out_axes else None
        seen_dim = ctx.dim(seen, seen_axis)
        act, channel, column = self._activation(node, index, ctx, seen_dim)
        shape = tuple(int(s) for s in weight.shape)
        kind, blocks = _kind(node, ctx)
        receptive = _rest(shape, dim.axis, out_axis) if kind.startswith("conv") and out_axis is not None else 1
        unit_of_column = group.unit_of[dim]
        layout = "per_group" if blocks > 1 else "column"
        if layout == "column":
            counts = np.bincount(unit_of_column)
            if (counts > 1).any():
                layout = "block"
        bias, bias_axis, bias_node = self._bias(node, ctx, dim.value, out_axis)
        scale = float(ctx.attr("alpha", 1.0)) if node.op_type == "Gemm" else 1.0
        bscale = float(ctx.attr("beta", 1.0)) if node.op_type == "Gemm" else 1.0
        return Consumer(
            group=group.id,
            node=node.name,
            op_type=node.op_type,
            domain=node.domain,
            kind=kind,
            layout=layout,
            weight=dim.value,
            axis=dim.axis,
            out_axis=out_axis,
            weight_shape=shape,
            weight_input=seen.name,
            weight_input_axis=seen_dim.axis,
            weight_path=tuple(n for n, _ in path),
            weight_path_ops=tuple(op for _, op in path),
            activation=None if act is None else act.value,
            activation_axis=None if act is None else act.axis,
            activation_size=0 if act is None else int(self.cg.dim_size.get(act, 0)),
            bias=bias,
            bias_axis=bias_axis,
            bias_node=bias_node,
            weight_scale=scale,
            bias_scale=bscale,
            receptive=receptive,
            row_blocks=blocks,
            unit_of_column=unit_of_column,
            channel=channel,
            column=column,
        )

    def _activation(self, node: ir.Node, index: int, ctx: CouplingContext, seen_dim: Dim) -> tuple[Dim | None, np.ndarray, np.ndarray]:
        """The node input tied to the weight axis by the node's rule, with the index pairs."""
        inputs = {v.name: k for k, v in enumerate(node.inputs) if v is not None and k != index}
        if node.op_type in _RECURRENT:
            inputs = {n: k for n, k in inputs.items() if k == 0}  # R reads the node's own state
        pairs: dict[Dim, list[tuple[np.ndarray, np.ndarray]]] = {}
        for t in ctx.ties:
            for here, there, hi, ti in ((t.a, t.b, t.a_index, t.b_index), (t.b, t.a, t.b_index, t.a_index)):
                if here != seen_dim or there == seen_dim or there.value not in inputs:
                    continue
                v = node.inputs[inputs[there.value]]
                if ctx.is_weight(v):
                    continue
                pairs.setdefault(there, []).append((ti, hi))
        if not pairs:
            return None, np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        act = min(pairs, key=lambda d: inputs[d.value])
        ch = np.concatenate([p[0] for p in pairs[act]])
        col = np.concatenate([p[1] for p in pairs[act]])
        both = np.unique(np.stack([ch, col], axis=1), axis=0)  # sorted by channel, then column
        return act, both[:, 0].astype(np.int64), both[:, 1].astype(np.int64)

    def _bias(self, node: ir.Node, ctx: CouplingContext, weight: str, out_axis: int | None) -> tuple[str | None, int | None, str | None]:
        y = node.outputs[0] if node.outputs else None
        if y is None or ctx.rank(y) is None:
            return None, None, None
        at = _BIAS_INPUT.get(node.op_type)
        if at is not None:
            b = ctx.input(at)
            if b is None:
                return None, None, None
            channels = ctx.size(y, 1)
            shape = ctx.shape(b)
            if shape is None or not shape or shape[-1] != channels or any(s != 1 for s in shape[:-1]):
                return None, None, None  # Gemm's C of [M, N] or [M, 1] is no per-output bias
            found = ctx.weight_source(b, len(shape) - 1)
            return (found[0].name, found[1], node.name) if found is not None else (None, None, None)
        if node.op_type != "MatMul" or out_axis is None:
            return None, None, None
        uses = list(y.uses())
        if len(uses) != 1 or uses[0][0].op_type != "Add" or uses[0][0].domain not in ("", "ai.onnx"):
            return None, None, None
        add, k = uses[0]
        other = add.inputs[1 - k] if len(add.inputs) == 2 else None
        shape = ctx.shape(other)
        ry = ctx.rank(y)
        if other is None or shape is None or not shape or len(shape) > ry or ctx.shape(add.outputs[0]) != ctx.shape(y):
            return None, None, None
        if shape[-1] != ctx.size(y, -1) or any(s != 1 for s in shape[:-1]):
            return None, None, None
        found = ctx.weight_source(other, len(shape) - 1)
        if found is None:
            return None, None, None
        # Proof that it is a per-output bias: the analysis put it in the group of the rows.
        bias_dim = Dim(found[0].name, found[1])
        rows = self.cg.group_of(Dim(weight, out_axis))
        if rows is None or self.cg.group_of(bias_dim) is not rows:
            return None, None, None
        return found[0].name, found[1], add.name


def _overlay(rules: Any) -> dict | None:
    """Per-call rules as the registry's overlay mapping (None: the registry alone)."""
    if not rules:
        return None
    resolve = getattr(rules_base, "resolve_rules", None)
    if resolve is None:
        raise TypeError("this rule base has no per-call rules")
    return resolve(rules)


def _readers(
    value: ir.Value, axis: int, path: tuple[tuple[str, str], ...], depth: int = 0
) -> Iterator[tuple[ir.Node, int, ir.Value, int, tuple[tuple[str, str], ...]]]:
    """(node, input index, value it reads, axis there, nodes passed) for every reader of
    ``value[axis]``, looking through the ops of ``CouplingContext.weight_source``."""
    for node, index in sorted(value.uses(), key=lambda u: (u[0].name, u[1])):
        out = node.outputs[0] if node.outputs else None
        if index == 0 and depth < 8 and out is not None and out.shape is not None and value.shape is not None and len(out.shape) == len(value.shape):
            nxt = _through_axis(node, axis, len(value.shape))
            if nxt is not None:
                yield from _readers(out, nxt, (*path, (node.name, node.op_type)), depth + 1)
                continue
        yield node, index, value, axis, path


def _through_axis(node: ir.Node, axis: int, rank: int) -> int | None:
    """The output axis that input axis ``axis`` of a look-through op becomes (None: not one)."""
    if _look_through is not None:
        lt = _look_through(node)
        return None if lt is None else lt.output_axis(node, axis, rank)
    if node.op_type not in _THROUGH or node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type != "Transpose":
        return axis
    perm_attr = node.attributes.get("perm")
    perm = list(range(rank))[::-1] if perm_attr is None else [int(p) % rank for p in perm_attr.value]
    return perm.index(axis)


def _kind(node: ir.Node, ctx: CouplingContext) -> tuple[str, int]:
    """A name for the node's column layout, and its number of conv groups."""
    op = node.op_type
    if op in _CONV or op in _CONV_T:
        g = int(ctx.attr("group", 1))
        base = "conv" if op in _CONV else "conv_transpose"
        return (f"{base}_grouped", g) if g > 1 else (base, 1)
    if op == "Gemm":
        return "gemm", 1
    if op in _MATMUL:
        return "matmul", 1
    if op in _RECURRENT:
        return "recurrent", 1
    if op == "Attention":
        return "attention", 1
    return op.lower(), 1
