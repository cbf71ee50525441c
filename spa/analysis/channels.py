"""Channel dependency analysis: rules → element-exact units → coupled groups.

Every node's rule records *ties* between individual channel indices ("atoms") of the dims it
touches. Connected atoms form a **unit**: the smallest set of channels that must be removed
together (one conv filter with its BN entries and every consumer column reading it; a block
of Flatten columns; the same position in every group of a grouped conv). Dims connected by
any tie form a **group** (networkx components): the units of a group compete for one budget.

Freezing is per unit, not per group: a blocked dim freezes the units that own its atoms, so a
Concat of a prunable conv and a graph input still prunes the conv's part. Blocking is always
safe; the analysis never guesses. A node that touches a dim without mentioning it in its rule
freezes that dim (UNMAPPED_AXIS): a forgotten axis can make a rule useless, never wrong.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

import networkx as nx
import numpy as np
import onnx_ir as ir
import scipy.sparse
import scipy.sparse.csgraph

from spa.graph import all_initializers, default_opset, is_constant, subgraphs
from spa.rules.base import Blocked, BlockCode, ChannelRule, CouplingContext, Dim, Role, Tie, is_weight_input
from spa.rules.registry import RuleKey, get_rule, resolve_rules

__all__ = ["Group", "ChannelGraph", "analyze_channels", "is_constant"]  # is_constant: re-exported from spa.graph

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Group:
    """Coupled channel dims that are pruned as one decision space.

    ``unit_of[dim][i]`` is the unit that channel ``i`` of ``dim`` belongs to; removing a unit
    removes all of its channels from every dim of the group.
    """

    id: str
    dims: list[Dim]
    unit_of: dict[Dim, np.ndarray]
    n_units: int
    frozen: np.ndarray  # bool [n_units]
    reasons: list[Blocked]
    roles: dict[Dim, tuple[Role, ...]]
    inexact: list[str]

    @property
    def has_source(self) -> bool:
        """Whether any weight produces these channels: only such groups are channels at all."""
        return any(Role.OUT in r for r in self.roles.values())

    @property
    def n_free(self) -> int:
        return int((~self.frozen).sum())

    @property
    def prunable(self) -> bool:
        return self.has_source and self.n_free > 0

    def weight_dims(self, role: Role | None = None) -> list[Dim]:
        return [d for d, rs in self.roles.items() if role is None or role in rs]

    def kept_indices(self, dim: Dim, removed_units: np.ndarray) -> np.ndarray:
        """Ascending channel indices of ``dim`` that survive removing ``removed_units``."""
        return np.flatnonzero(~np.isin(self.unit_of[dim], removed_units))


@dataclasses.dataclass
class ChannelGraph:
    """Result of the channel analysis (an analysis: read-only over the model)."""

    groups: list[Group]
    dim_size: dict[Dim, int]
    node_dims: dict[str, set[Dim]]
    graph: nx.Graph  # dims as nodes, an edge per tie (attribute ``nodes``: which ops tied them)
    #: The per-call rules the analysis ran with (``analyze_channels(rules=...)``), normalised;
    #: later readers of the rules (``build_plan``, consumers) look up through :meth:`rule`.
    rules: dict[RuleKey, ChannelRule] = dataclasses.field(default_factory=dict)

    def group_of(self, dim: Dim) -> Group | None:
        return self._by_dim.get(dim)

    def rule(self, node: ir.Node) -> ChannelRule | None:
        """The rule the analysis used for ``node``: a per-call rule first, then the registry."""
        return get_rule(node.domain, node.op_type, self.rules)

    def __post_init__(self) -> None:
        self._by_dim = {d: g for g in self.groups for d in g.dims}

    @property
    def candidates(self) -> list[Group]:
        """Groups that are channels (have a weighted source), prunable or blocked."""
        return [g for g in self.groups if g.has_source]

    def consumers(self, model: ir.Model, group: Group | str) -> list:
        """The nodes that read ``group``'s channels through a weight, as
        ``spa.analysis.consumers.Consumer`` records (``model``: the analysed model)."""
        from spa.analysis.consumers import consumers_of

        return consumers_of(model, group, self)


def _static_rank_dims(value: ir.Value) -> list[int]:
    if value.shape is None:
        return []
    return [i for i, d in enumerate(value.shape) if isinstance(d, int)]


def analyze_channels(
    model: ir.Model,
    *,
    allow_inexact: bool = False,
    rules: Mapping[Any, ChannelRule] | Iterable[ChannelRule] | None = None,
) -> ChannelGraph:
    """Run every node's rule and build units and groups. Expects canonicalized, shape-inferred IR.

    ``allow_inexact`` lets rules couple through ops that mix channels without weights
    (LayerNorm over the hidden axis, RMSNorm's mean of squares): such groups are marked
    inexact and the oracle reports them instead of asserting.

    ``rules`` adds rules for this call (custom ops; see ``spa.rules.registry.resolve_rules``
    for the forms accepted): they are looked up before the registry, so they may also replace
    a built-in rule. The result remembers them (``ChannelGraph.rules``).
    """
    graph = model.graph
    opset = default_opset(model)
    overlay = resolve_rules(rules)
    ties: list[Tie] = []
    roles: dict[Dim, set[Role]] = defaultdict(set)
    blocks: list[tuple[str, int | None, Blocked]] = []
    inexact: list[tuple[Dim, str]] = []
    node_dims: dict[str, set[Dim]] = {}
    order: dict[Dim, int] = {}

    for io_value in (*graph.inputs, *graph.outputs):
        if is_weight_input(io_value) and not io_value.is_graph_output():
            why = Blocked(
                BlockCode.WEIGHT_INPUT,
                f"weight '{io_value.name}' is also a graph input, kept overridable (--keep-weight-inputs): "
                "a caller may feed another tensor, so its shape is the model's interface",
                None,
                io_value.name,
            )
        else:
            why = Blocked(BlockCode.GRAPH_IO, f"'{io_value.name}' is a graph input or output: its shape is the model's interface", None, io_value.name)
        blocks.append((io_value.name, None, why))
    # Subgraph bodies are walked like the main graph (a value an inner node reads is mapped by
    # that node's rule). What crosses a body's own inputs/outputs is frozen, unless the op's
    # rule maps it (``owns_subgraphs``: If ties each branch output to its own output).
    for node in graph.all_nodes():
        rule = get_rule(node.domain, node.op_type, overlay)
        if getattr(rule, "owns_subgraphs", False):
            continue
        for sub in subgraphs(node):
            for v in (*sub.inputs, *sub.outputs):
                blocks.append((v.name, None, Blocked(BlockCode.SUBGRAPH, f"'{v.name}' crosses the boundary of a {node.op_type} body ('{node.name}')", node.name, v.name)))

    hint = _WeightedDims()
    for node in graph.all_nodes():
        ctx = CouplingContext(node, opset=opset, is_constant=is_constant, is_channel=hint.weighted, allow_inexact=allow_inexact)
        rule = get_rule(node.domain, node.op_type, overlay)
        if rule is None:
            ctx.block_all(BlockCode.NO_RULE, f"no channel rule for {node.domain + '::' if node.domain else ''}{node.op_type} ('{ctx.name}')")
        else:
            rule.couplings(node, ctx)
        # Any static axis the rule did not mention is opaque to this node.
        for v in (*node.inputs, *node.outputs):
            if v is None:
                continue
            for ax in _static_rank_dims(v):
                if Dim(v.name, ax) not in ctx.mentioned:
                    ctx.block(v, ax, BlockCode.UNMAPPED_AXIS, f"{node.op_type} '{ctx.name}' does not map axis {ax} of '{v.name}'")
        ties.extend(ctx.ties)
        for d, r in ctx.roles:
            roles[d].add(r)
        blocks.extend(ctx.blocks)
        inexact.extend(ctx.inexact)
        node_dims[node.name] = set(ctx.mentioned)
        for t in ctx.ties:
            order.setdefault(t.a, len(order))
            order.setdefault(t.b, len(order))
            hint.union(t.a, t.b)
        for d, _ in ctx.roles:
            hint.mark(d)

    cg = _build_groups(graph, ties, roles, blocks, inexact, node_dims, order)
    cg.rules = overlay
    return cg


class _WeightedDims:
    """Dim-level union-find that knows which dims are (so far) tied to a weight.

    Fed in topological order, it answers ``CouplingContext.is_channel`` for later rules.
    """

    def __init__(self) -> None:
        self._parent: dict[Dim, Dim] = {}
        self._weighted: set[Dim] = set()

    def _find(self, d: Dim) -> Dim:
        root = d
        while self._parent.get(root, root) != root:
            root = self._parent[root]
        while d != root:
            self._parent[d], d = root, self._parent.get(d, d)
        return root

    def union(self, a: Dim, b: Dim) -> None:
        ra, rb = self._find(a), self._find(b)
        if ra != rb:
            self._parent[rb] = ra
            if rb in self._weighted:
                self._weighted.add(ra)

    def mark(self, d: Dim) -> None:
        self._weighted.add(self._find(d))

    def weighted(self, d: Dim) -> bool:
        return self._find(d) in self._weighted


def _build_groups(
    graph: ir.Graph,
    ties: list[Tie],
    roles: dict[Dim, set[Role]],
    blocks: list[tuple[str, int | None, Blocked]],
    inexact: list[tuple[Dim, str]],
    node_dims: dict[str, set[Dim]],
    order: dict[Dim, int],
) -> ChannelGraph:
    values = {v.name: v for v in _all_values(graph)}
    dims = sorted(order, key=order.__getitem__)
    size = {d: int(values[d.value].shape[d.axis]) for d in dims}
    offset: dict[Dim, int] = {}
    total = 0
    for d in dims:
        offset[d] = total
        total += size[d]

    # Units: connected components over atoms (vectorised; a ResNet-50 has ~10^5 atoms).
    if ties:
        rows = np.concatenate([offset[t.a] + t.a_index for t in ties])
        cols = np.concatenate([offset[t.b] + t.b_index for t in ties])
    else:
        rows = cols = np.zeros(0, dtype=np.int64)
    adjacency = scipy.sparse.coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(total, total))
    _, atom_label = scipy.sparse.csgraph.connected_components(adjacency, directed=False)

    # Groups: connected components over dims.
    g = nx.Graph()
    g.add_nodes_from(dims)
    for t in ties:
        if g.has_edge(t.a, t.b):
            g.edges[t.a, t.b]["nodes"].append(t.node)
        else:
            g.add_edge(t.a, t.b, nodes=[t.node])

    frozen_atoms = np.zeros(total, dtype=bool)
    reasons_by_dim: dict[Dim, list[Blocked]] = defaultdict(list)
    for value_name, axis, blocked in blocks:
        v = values.get(value_name)
        if v is None or v.shape is None:
            continue
        axes = range(len(v.shape)) if axis is None else (axis,)
        for ax in axes:
            d = Dim(value_name, ax)
            if d in offset:
                frozen_atoms[offset[d] : offset[d] + size[d]] = True
                reasons_by_dim[d].append(blocked)
    inexact_by_dim: dict[Dim, list[str]] = defaultdict(list)
    for d, why in inexact:
        inexact_by_dim[d].append(why)

    groups: list[Group] = []
    components = sorted((sorted(c, key=order.__getitem__) for c in nx.connected_components(g)), key=lambda c: order[c[0]])
    for gi, members in enumerate(components):
        labels = np.concatenate([atom_label[offset[d] : offset[d] + size[d]] for d in members])
        uniq, first = np.unique(labels, return_index=True)
        # Number units in order of first appearance so ids are stable and readable.
        ranked = uniq[np.argsort(first)]
        lut = np.zeros(int(ranked.max()) + 1, dtype=np.int64)
        lut[ranked] = np.arange(len(ranked))
        unit_of = {d: lut[atom_label[offset[d] : offset[d] + size[d]]] for d in members}
        n_units = len(ranked)
        frozen = np.zeros(n_units, dtype=bool)
        reasons: list[Blocked] = []
        for d in members:
            fa = frozen_atoms[offset[d] : offset[d] + size[d]]
            if fa.any():
                frozen[unit_of[d][fa]] = True
                reasons.extend(reasons_by_dim[d])
        groups.append(
            Group(
                id=f"g{gi}",
                dims=members,
                unit_of=unit_of,
                n_units=n_units,
                frozen=frozen,
                reasons=_dedupe(reasons),
                roles={d: tuple(sorted(roles[d], key=lambda r: r.value)) for d in members if roles.get(d)},
                inexact=sorted({w for d in members for w in inexact_by_dim.get(d, [])}),
            )
        )
    logger.info("channel analysis: %d dims, %d atoms, %d groups", len(dims), total, len(groups))
    return ChannelGraph(groups=groups, dim_size=size, node_dims=node_dims, graph=g)


def _dedupe(reasons: list[Blocked]) -> list[Blocked]:
    seen: set[tuple[str, str]] = set()
    out = []
    for r in reasons:
        key = (r.code.value, r.reason)
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def _all_values(graph: ir.Graph):
    yield from graph.inputs
    yield from all_initializers(graph).values()
    for node in graph.all_nodes():
        for v in node.outputs:
            yield v
        for v in node.inputs:
            if v is not None:
                yield v
