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
import functools
import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

import networkx as nx
import numpy as np
import onnx_ir as ir
import scipy.sparse
import scipy.sparse.csgraph

from spa.graph import all_initializers, all_nodes, default_opset, gc_paused, is_constant, subgraphs
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
    #: The per-call rules the analysis ran with (``analyze_channels(rules=...)``), normalised;
    #: later readers of the rules (``build_plan``, consumers) look up through :meth:`rule`.
    rules: dict[RuleKey, ChannelRule] = dataclasses.field(default_factory=dict)
    #: The ties as (dims in first-tie order, index of a, index of b, node) for :attr:`graph`.
    _tie_dims: list[Dim] = dataclasses.field(default_factory=list, repr=False)
    _tie_a: list[int] = dataclasses.field(default_factory=list, repr=False)
    _tie_b: list[int] = dataclasses.field(default_factory=list, repr=False)
    _tie_node: list[str] = dataclasses.field(default_factory=list, repr=False)

    @functools.cached_property
    def graph(self) -> nx.Graph:
        """Dims as nodes, an edge per tied pair (attribute ``nodes``: the ops that tied them, in
        order). Built on first use: the groups are computed without it (a networkx edge per
        tie costs seconds on a 100 000-node model, and nothing in the pipeline reads it)."""
        g = nx.Graph()
        g.add_nodes_from(self._tie_dims)
        dims = self._tie_dims
        for a, b, node in zip(self._tie_a, self._tie_b, self._tie_node):
            da, db = dims[a], dims[b]
            if g.has_edge(da, db):
                g.edges[da, db]["nodes"].append(node)
            else:
                g.add_edge(da, db, nodes=[node])
        return g

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
    with gc_paused():
        return _analyze(model, allow_inexact, rules)


def _analyze(model: ir.Model, allow_inexact: bool, rules: Mapping[Any, ChannelRule] | Iterable[ChannelRule] | None) -> ChannelGraph:
    graph = model.graph
    opset = default_opset(model)
    overlay = resolve_rules(rules)
    nodes = all_nodes(graph)
    ties: list[Tie] = []
    tie_a: list[int] = []  # order index of each tie's a and b, kept so that no Dim is hashed twice
    tie_b: list[int] = []
    roles: dict[Dim, set[Role]] = defaultdict(set)
    blocks: list[tuple[str, int | None, Blocked]] = []
    inexact: list[tuple[Dim, str]] = []
    node_dims: dict[str, set[Dim]] = {}
    order: dict[Dim, int] = {}
    rule_of: dict[tuple[str, str], ChannelRule | None] = {}
    canon: dict[Dim, Dim] = {}

    def lookup(node: ir.Node) -> ChannelRule | None:
        key = (node.domain, node.op_type)
        if key not in rule_of:
            rule_of[key] = get_rule(node.domain, node.op_type, overlay)
        return rule_of[key]

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
    for node in nodes:
        subs = subgraphs(node) if node.attributes else ()
        if not subs or getattr(lookup(node), "owns_subgraphs", False):
            continue
        for sub in subs:
            for v in (*sub.inputs, *sub.outputs):
                blocks.append((v.name, None, Blocked(BlockCode.SUBGRAPH, f"'{v.name}' crosses the boundary of a {node.op_type} body ('{node.name}')", node.name, v.name)))

    hint = _WeightedDims(order)
    for node in nodes:
        ctx = CouplingContext(node, opset=opset, is_constant=is_constant, is_channel=hint.weighted, allow_inexact=allow_inexact)
        rule = lookup(node)
        if rule is None:
            ctx.block_all(BlockCode.NO_RULE, f"no channel rule for {node.domain + '::' if node.domain else ''}{node.op_type} ('{ctx.name}')")
        else:
            rule.couplings(node, ctx)
        # Any static axis the rule did not mention is opaque to this node. ``Dim`` is a named
        # tuple, so a plain ``(name, axis)`` finds it in ``mentioned`` (no Dim built per axis);
        # block() mentions the axis, so a second read of the value is not blocked again.
        mentioned = ctx.mentioned
        for v in (*node.inputs, *node.outputs):
            if v is None or v.shape is None:
                continue
            name = v.name
            for ax, size in enumerate(v.shape.dims):
                if isinstance(size, int) and (name, ax) not in mentioned:
                    ctx.block(v, ax, BlockCode.UNMAPPED_AXIS, f"{node.op_type} '{ctx.name}' does not map axis {ax} of '{name}'")
        ties.extend(ctx.ties)
        for d, r in ctx.roles:
            roles[d].add(r)
        blocks.extend(ctx.blocks)
        inexact.extend(ctx.inexact)
        # One Dim object per axis across all nodes (the next node's input is this one's output):
        # half the objects that outlive the analysis on a chain.
        node_dims[node.name] = {canon.setdefault(d, d) for d in mentioned}
        if ctx.ties:
            hint.add_ties(ctx.ties, tie_a, tie_b)
        for d, _ in ctx.roles:
            hint.mark(d)

    cg = _build_groups(graph, nodes, ties, tie_a, tie_b, roles, blocks, inexact, node_dims, order)
    cg.rules = overlay
    return cg


class _WeightedDims:
    """Dim-level union-find that knows which dims are (so far) tied to a weight.

    Fed in topological order, it answers ``CouplingContext.is_channel`` for later rules. Dims
    are numbered in first-tie order (``order``, shared with the caller: the analysis's dim
    order), so the forest is two lists of ints; a dim marked before any tie names it waits in
    ``_lonely`` until it gets a number.
    """

    def __init__(self, order: dict[Dim, int]) -> None:
        self._order = order
        self._parent: list[int] = []
        self._weighted: list[bool] = []
        self._lonely: set[Dim] = set()

    def index(self, d: Dim) -> int:
        """``d``'s number, given on first sight (what ``order.setdefault`` did)."""
        i = self._order.get(d)
        if i is None:
            i = self._order[d] = len(self._parent)
            self._parent.append(i)
            self._weighted.append(bool(self._lonely) and d in self._lonely)
        return i

    def add_ties(self, ties: list[Tie], tie_a: list[int], tie_b: list[int]) -> None:
        """``index`` both dims of each tie, append the numbers to ``tie_a``/``tie_b`` and
        ``union`` them: the per-tie work of the analysis loop, with the lookups inlined."""
        order, parent, weighted, lonely = self._order, self._parent, self._weighted, self._lonely
        find = self._find
        for t in ties:
            da, db = t.a, t.b
            a = order.get(da)
            if a is None:
                a = order[da] = len(parent)
                parent.append(a)
                weighted.append(bool(lonely) and da in lonely)
            b = order.get(db)
            if b is None:
                b = order[db] = len(parent)
                parent.append(b)
                weighted.append(bool(lonely) and db in lonely)
            tie_a.append(a)
            tie_b.append(b)
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[rb] = ra
                if weighted[rb]:
                    weighted[ra] = True

    def _find(self, i: int) -> int:
        parent = self._parent
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:
            parent[i], i = root, parent[i]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self._find(a), self._find(b)
        if ra != rb:
            self._parent[rb] = ra
            if self._weighted[rb]:
                self._weighted[ra] = True

    def mark(self, d: Dim) -> None:
        i = self._order.get(d)
        if i is None:
            self._lonely.add(d)
        else:
            self._weighted[self._find(i)] = True

    def weighted(self, d: Dim) -> bool:
        i = self._order.get(d)
        if i is None:
            return d in self._lonely
        return self._weighted[self._find(i)]


def _build_groups(
    graph: ir.Graph,
    nodes: list[ir.Node],
    ties: list[Tie],
    tie_a: list[int],
    tie_b: list[int],
    roles: dict[Dim, set[Role]],
    blocks: list[tuple[str, int | None, Blocked]],
    inexact: list[tuple[Dim, str]],
    node_dims: dict[str, set[Dim]],
    order: dict[Dim, int],
) -> ChannelGraph:
    """Units and groups, vectorised over dims and atoms (no per-group Python loop over dims
    beyond building each group's ``unit_of``): linear in the number of ties."""
    values = {v.name: v for v in _all_values(graph, nodes)}
    dims = list(order)  # insertion order is the order index
    n_dims = len(dims)
    size: dict[Dim, int] = {}
    last, shape = None, ()
    for d in dims:  # a value's axes come one after another in first-tie order: read its shape once
        if d.value != last:
            last, shape = d.value, values[d.value].shape.dims
        size[d] = int(shape[d.axis])
    sizes = np.fromiter(size.values(), dtype=np.int64, count=n_dims)
    starts = np.zeros(n_dims, dtype=np.int64)
    if n_dims:
        np.cumsum(sizes[:-1], out=starts[1:])
    total = int(sizes.sum())
    a_idx = np.asarray(tie_a, dtype=np.int64)
    b_idx = np.asarray(tie_b, dtype=np.int64)

    # Units: connected components over atoms (vectorised; a ResNet-50 has ~10^5 atoms).
    if ties:
        lens = np.fromiter((len(t.a_index) for t in ties), dtype=np.int64, count=len(ties))
        rows = np.repeat(starts[a_idx], lens) + np.concatenate([t.a_index for t in ties])
        cols = np.repeat(starts[b_idx], lens) + np.concatenate([t.b_index for t in ties])
    else:
        rows = cols = np.zeros(0, dtype=np.int64)
    adjacency = scipy.sparse.coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(total, total))
    _, atom_label = scipy.sparse.csgraph.connected_components(adjacency, directed=False)

    # Groups: connected components over dims, numbered by their first dim, members in order.
    dim_graph = scipy.sparse.coo_matrix((np.ones(len(a_idx), dtype=np.int8), (a_idx, b_idx)), shape=(n_dims, n_dims))
    _, dim_label = scipy.sparse.csgraph.connected_components(dim_graph, directed=False)
    uniq, first = np.unique(dim_label, return_index=True)
    rank = np.empty(len(uniq), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(uniq))
    group_of_dim = rank[np.searchsorted(uniq, dim_label)] if n_dims else np.zeros(0, dtype=np.int64)
    perm = np.argsort(group_of_dim, kind="stable")  # by group, then by order
    n_groups = len(uniq)
    bounds = np.searchsorted(group_of_dim[perm], np.arange(n_groups + 1))

    # Units numbered per group in order of first appearance (members in order, atoms in
    # order). Atoms of one unit always lie in one group, so first appearance over all groups
    # laid end to end, minus the units of the groups before, is each group's own numbering.
    seq_lens = sizes[perm]
    seq_starts = starts[perm]
    seq = np.repeat(seq_starts - np.concatenate(([0], np.cumsum(seq_lens)[:-1])), seq_lens) + np.arange(total)
    labels_seq = atom_label[seq]
    lab_uniq, lab_first = np.unique(labels_seq, return_index=True)
    ranked = lab_uniq[np.argsort(lab_first, kind="stable")]
    unit_global = np.zeros(int(atom_label.max()) + 1 if total else 0, dtype=np.int64)
    unit_global[ranked] = np.arange(len(ranked))
    atom_unit = unit_global[atom_label]  # global unit number of every atom
    atom_group = np.repeat(group_of_dim, sizes)
    units_per_group = np.bincount(atom_group[np.unique(atom_unit, return_index=True)[1]], minlength=n_groups) if total else np.zeros(n_groups, dtype=np.int64)
    unit_base = np.concatenate(([0], np.cumsum(units_per_group)[:-1])).astype(np.int64)
    atom_unit_local = atom_unit - unit_base[atom_group] if total else atom_unit

    frozen_atoms = np.zeros(total, dtype=bool)
    reasons_by_dim: dict[Dim, list[Blocked]] = defaultdict(list)
    for value_name, axis, blocked in blocks:
        v = values.get(value_name)
        if v is None or v.shape is None:
            continue
        axes = range(len(v.shape)) if axis is None else (axis,)
        for ax in axes:
            d = Dim(value_name, ax)
            i = order.get(d)
            if i is not None:
                frozen_atoms[starts[i] : starts[i] + sizes[i]] = True
                reasons_by_dim[d].append(blocked)
    frozen_units = np.zeros(len(ranked), dtype=bool)
    frozen_units[atom_unit[frozen_atoms]] = True

    # Per-group reasons (members in order, dims with atoms only), roles and inexact notes.
    by_group_reasons: dict[int, list[int]] = defaultdict(list)
    for d in reasons_by_dim:
        i = order[d]
        if sizes[i] > 0:
            by_group_reasons[int(group_of_dim[i])].append(i)
    by_group_roles: dict[int, list[int]] = defaultdict(list)
    for d, rs in roles.items():
        i = order.get(d)
        if i is not None and rs:
            by_group_roles[int(group_of_dim[i])].append(i)
    inexact_by_group: dict[int, set[str]] = defaultdict(set)
    for d, why in inexact:
        i = order.get(d)
        if i is not None:
            inexact_by_group[int(group_of_dim[i])].add(why)

    groups: list[Group] = []
    perm_list = perm.tolist()
    starts_list, sizes_list = starts.tolist(), sizes.tolist()
    units_list, base_list = units_per_group.tolist(), unit_base.tolist()
    for gi in range(n_groups):
        member_idx = perm_list[bounds[gi] : bounds[gi + 1]]
        members = [dims[i] for i in member_idx]
        unit_of = {dims[i]: atom_unit_local[starts_list[i] : starts_list[i] + sizes_list[i]].copy() for i in member_idx}
        reasons: list[Blocked] = []
        for i in sorted(by_group_reasons.get(gi, ())):
            reasons.extend(reasons_by_dim[dims[i]])
        groups.append(
            Group(
                id=f"g{gi}",
                dims=members,
                unit_of=unit_of,
                n_units=units_list[gi],
                frozen=frozen_units[base_list[gi] : base_list[gi] + units_list[gi]].copy(),
                reasons=_dedupe(reasons),
                roles={dims[i]: tuple(sorted(roles[dims[i]], key=lambda r: r.value)) for i in sorted(by_group_roles.get(gi, ()))},
                inexact=sorted(inexact_by_group.get(gi, ())),
            )
        )
    logger.info("channel analysis: %d dims, %d atoms, %d groups", len(dims), total, len(groups))
    return ChannelGraph(groups=groups, dim_size=size, node_dims=node_dims, _tie_dims=dims, _tie_a=tie_a, _tie_b=tie_b,
                        _tie_node=[t.node for t in ties])


def _dedupe(reasons: list[Blocked]) -> list[Blocked]:
    seen: set[tuple[str, str]] = set()
    out = []
    for r in reasons:
        key = (r.code.value, r.reason)
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def _all_values(graph: ir.Graph, nodes: list[ir.Node]):
    yield from graph.inputs
    yield from all_initializers(graph).values()
    for node in nodes:
        for v in node.outputs:
            yield v
        for v in node.inputs:
            if v is not None:
                yield v
