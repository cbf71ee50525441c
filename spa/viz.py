"""Draw a model's graph and its channel groups as one self-contained HTML page.

Why: ``spa inspect`` prints groups as a table, but a table cannot show *where* a group lives
in the network or *which* op froze it. The page draws every top-level op, filled with the
colour of the candidate group (a group with a weighted source) that its output channels
belong to; a hatch marks frozen channels, and an op that blocks channels gets a thick red
border and a ⊘, with its reason codes on hover and in a side table grouped by code.

Only blocks that freeze a candidate group are drawn: groups without a weighted source
(spatial axes, batch, sequence) are not channels, and their blocks would paint every op red.

No graphviz and nothing fetched: the layered layout (longest-path layers, dummy nodes on
long edges, barycenter ordering, least-squares x placement) is computed here with networkx
and plain Python, and the page carries its own CSS and a little JS (wheel zoom, drag pan,
group highlight), so the file opens offline and can be attached to a bug report.
"""

from __future__ import annotations

import colorsys
import dataclasses
import html
import itertools
import math
import re
from collections import defaultdict
from typing import TYPE_CHECKING

import networkx as nx
import onnx_ir as ir

from spa.analysis.channels import ChannelGraph, Group
from spa.analysis.cost import Cost
from spa.report import human
from spa.rules.base import Blocked, Role

if TYPE_CHECKING:
    from spa.pipeline import Analysis

__all__ = ["render_html"]

_BOX_H = 34.0
_LAYER_H = 64.0
_GAP = 16.0
_DUMMY_W = 6.0
_MARGIN = 40.0
_COL_GAP = 110.0
_ASPECT = 1.3  # width : height the wrapped drawing aims for (the page's graph pane)


@dataclasses.dataclass
class _Box:
    """One drawn vertex: an op, a graph input or a graph output."""

    key: str
    kind: str  # "op" | "in" | "out"
    label: str
    sub: str
    title: str
    width: float
    group: Group | None = None
    reads: Group | None = None
    blocks: list[Blocked] = dataclasses.field(default_factory=list)
    name: str = ""


def render_html(analysis: Analysis) -> str:
    """The whole page for ``analysis`` (from :func:`spa.pipeline.analyze`) as one HTML string."""
    model, cg = analysis.model, analysis.channels
    candidates = cg.candidates
    colours = {g.id: _colour(i) for i, g in enumerate(candidates)}
    reasons = _candidate_reasons(candidates)
    per_node = analysis.cost.count(per_node=True)
    boxes, dag = _boxes(model.graph, cg, reasons, per_node.per_node or {})
    lay = _layout(dag, {k: b.width for k, b in boxes.items()})
    svg = _svg(boxes, dag, lay, cg, colours)
    side = _sidebar(analysis, boxes, candidates, colours, reasons, per_node)
    title = html.escape(f"spa inspect — {analysis.source}")
    parts = {"title": title, "svg": svg, "side": side}
    return re.sub(r"\{(title|svg|side)\}", lambda m: parts[m.group(1)], _PAGE)


# ----------------------------------------------------------------------------------------
# what to draw


def _colour(i: int) -> tuple[str, str]:
    """A distinct (fill, stroke) for candidate group ``i``: golden-angle hues, two lightnesses."""
    hue = (i * 0.6180339887) % 1.0
    light = (0.80, 0.70)[i % 2]
    fill = colorsys.hls_to_rgb(hue, light, 0.70)
    stroke = colorsys.hls_to_rgb(hue, 0.35, 0.60)
    return tuple("#" + "".join(f"{round(c * 255):02x}" for c in rgb) for rgb in (fill, stroke))  # type: ignore[return-value]


def _status(g: Group) -> str:
    return "blocked" if not g.prunable else ("partly frozen" if g.frozen.any() else "prunable")


def _candidate_reasons(candidates: list[Group]) -> dict[Blocked, list[str]]:
    """Every distinct block that freezes a candidate group → the ids of the groups it freezes."""
    out: dict[Blocked, list[str]] = {}
    for g in candidates:
        for b in g.reasons:
            out.setdefault(b, [])
            if g.id not in out[b]:
                out[b].append(g.id)
    return out


def _op_group(node: ir.Node, cg: ChannelGraph) -> Group | None:
    """The candidate group of the channels ``node`` produces, or None."""
    dims = sorted(cg.node_dims.get(node.name, ()))
    inputs = {v.name for v in node.inputs if v is not None}
    for d in dims:  # a weight this op reads along the axis that produces channels (Conv W[0])
        g = cg.group_of(d)
        if g is not None and g.has_source and d.value in inputs and Role.OUT in g.roles.get(d, ()):
            return g
    first = node.outputs[0].name if node.outputs else None
    for d in dims:  # else: the first output's channel-like axis
        g = cg.group_of(d)
        if d.value == first and g is not None and g.has_source:
            return g
    return None


def _tensor_groups(cg: ChannelGraph) -> dict[str, Group]:
    out: dict[str, Group] = {}
    for g in cg.candidates:
        for d in g.dims:
            out.setdefault(d.value, g)
    return out


def _short(name: str, limit: int = 26) -> str:
    parts = [p for p in name.split("/") if p]
    s = "/".join(parts[-2:]) if parts else name
    return s if len(s) <= limit else "…" + s[-(limit - 1) :]


def _shape(v: ir.Value) -> str:
    return "?" if v.shape is None else "×".join(str(d) for d in v.shape) or "scalar"


def _boxes(
    graph: ir.Graph, cg: ChannelGraph, reasons: dict[Blocked, list[str]], flops: dict[str, tuple[int, int]]
) -> tuple[dict[str, _Box], nx.DiGraph]:
    """Boxes keyed ``i<k>``/``n<k>``/``o<k>`` and the DAG between them (edge attribute ``tensors``)."""
    by_node: dict[str, list[Blocked]] = defaultdict(list)
    by_value: dict[str, list[Blocked]] = defaultdict(list)
    for b in reasons:
        (by_node[b.node] if b.node is not None else by_value[b.value or ""]).append(b)
    tgroup = _tensor_groups(cg)
    boxes: dict[str, _Box] = {}
    producer: dict[str, str] = {}
    dag = nx.DiGraph()

    def add(box: _Box) -> None:
        boxes[box.key] = box
        dag.add_node(box.key)

    def link(tensor: str, consumer: str) -> None:
        src = producer.get(tensor)
        if src is None:
            return
        if dag.has_edge(src, consumer):
            dag.edges[src, consumer]["tensors"].add(tensor)
        else:
            dag.add_edge(src, consumer, tensors={tensor})

    for i, v in enumerate(v for v in graph.inputs if not v.is_initializer()):
        blocks = by_value.get(v.name, [])
        add(_Box(f"i{i}", "in", v.name, _shape(v), f"graph input {v.name}: {_shape(v)}" + _why(blocks), _text_w(v.name, _shape(v), 80), tgroup.get(v.name), None, blocks, v.name))
        producer[v.name] = f"i{i}"
    for i, node in enumerate(graph):
        key = f"n{i}"
        group = _op_group(node, cg)
        data = [v for v in node.inputs if v is not None and v.name in producer]
        reads = tgroup.get(data[0].name) if data else None
        blocks = by_node.get(node.name, []) if node.name else []
        outs = ", ".join(f"{o.name} [{_shape(o)}]" for o in node.outputs)
        lines = [f"{node.op_type}  {node.name}", f"outputs: {outs}"]
        if group is not None:
            lines.append(f"channels: group {group.id} — {group.n_units} units, {_status(group)}")
        if reads is not None and reads is not group:
            lines.append(f"reads: group {reads.id}")
        if node.name in flops and flops[node.name][1]:
            lines.append(f"FLOPs: {human(flops[node.name][1])}")
        label = node.op_type if not node.domain else f"{node.domain}::{node.op_type}"
        add(_Box(key, "op", label, _short(node.name or ""), "\n".join(lines) + _why(blocks), _text_w(label, _short(node.name or ""), 90), group, reads, blocks, node.name))
        for v in data:
            link(v.name, key)
        for o in node.outputs:
            producer[o.name] = key
    for i, v in enumerate(graph.outputs):
        key = f"o{i}"
        blocks = by_value.get(v.name, [])
        add(_Box(key, "out", v.name, _shape(v), f"graph output {v.name}: {_shape(v)}" + _why(blocks), _text_w(v.name, _shape(v), 80), tgroup.get(v.name), None, blocks, v.name))
        link(v.name, key)
    return boxes, dag


def _why(blocks: list[Blocked]) -> str:
    return "".join(f"\n⊘ BLOCKS [{b.code.value}] {b.reason}" for b in blocks)


def _text_w(label: str, sub: str, least: float) -> float:
    """Box width that fits the bold label (12px) with the group tag, and the mono sub-line (10px)."""
    return max(least, min(240.0, max(7.6 * len(label) + 50, 6.2 * len(sub) + 24)))


# ----------------------------------------------------------------------------------------
# layout: Sugiyama-style, kept small


@dataclasses.dataclass
class _Layout:
    """Where everything goes. Tall graphs wrap into columns at cuts crossed by few tensors."""

    pos: dict[str, tuple[float, float]]  # box, dummy and portal centres
    routes: dict[tuple[str, str], list[str]]  # (source, target) → every vertex the edge passes
    column: dict[str, int]
    portal: dict[tuple[str, int], tuple[str, int]]  # (vertex, column it enters) → (portal, lane)
    bottom: list[float]  # lowest box edge per column
    right: list[float]  # right edge per column


def _layout(dag: nx.DiGraph, widths: dict[str, float]) -> _Layout:
    topo = list(nx.topological_sort(dag))
    layer: dict[str, int] = {}
    for n in topo:  # longest path from the inputs
        layer[n] = 1 + max((layer[p] for p in dag.predecessors(n)), default=-1)
    for n in reversed(topo):  # ops that read only constants sit just above their first reader
        if dag.in_degree(n) == 0 and not n.startswith("i") and dag.out_degree(n):
            layer[n] = min(layer[s] for s in dag.successors(n)) - 1
    # One dummy chain per source box, shared by all its long edges (drawn as one bundle).
    lg = nx.DiGraph()
    lg.add_nodes_from(topo)
    routes: dict[tuple[str, str], list[str]] = {}
    w = dict(widths)
    for u in topo:
        succ = sorted(dag.successors(u), key=layer.__getitem__)
        if not succ:
            continue
        chain = [f"~{u}:{k}" for k in range(layer[u] + 1, layer[succ[-1]])]
        for k, d in enumerate(chain):
            layer[d] = layer[u] + 1 + k
            w[d] = _DUMMY_W
            lg.add_edge(chain[k - 1] if k else u, d, weight=8 if k else 2)
        for v in succ:
            via = chain[: layer[v] - layer[u] - 1]
            lg.add_edge(via[-1] if via else u, v, weight=2 if via else 1)
            routes[(u, v)] = [u, *via, v]
    rows: list[list[str]] = [[] for _ in range(max(layer.values(), default=0) + 1)]
    for n in _dfs_order(lg, topo):
        rows[layer[n]].append(n)
    rows = _order(lg, rows)
    spans = _columns(lg, rows, w)
    out = _Layout({}, routes, {}, {}, [], [])
    left = _MARGIN
    shift = _LAYER_H if len(spans) > 1 else 0.0
    for c, (a, b) in enumerate(spans):
        crows = rows[a : b + 1]
        if c:  # a portal per vertex whose edges cross the cut: the column's entry point
            portals = []
            for lane, src in enumerate(n for n in rows[a - 1] if any(layer[m] == a for m in lg.successors(n))):
                p = f"^{src}"
                portals.append(p)
                w[p] = _DUMMY_W
                lg.add_edges_from((p, m, {"weight": 8}) for m in list(lg.successors(src)) if layer[m] == a)
                out.portal[(src, c)] = (p, lane)
            crows = [portals, *crows]
        x = _place(lg, crows, w)
        top = _MARGIN + _BOX_H / 2 + shift - (_LAYER_H if c else 0.0)
        for r, row in enumerate(crows):
            for n in row:
                out.pos[n] = (left + x[n], top + r * _LAYER_H)
                out.column[n] = c
        out.right.append(left + max((x[n] + w[n] / 2 for n in x), default=0.0))
        out.bottom.append(max((out.pos[n][1] for n in x), default=0.0) + _BOX_H / 2)
        left = out.right[-1] + _COL_GAP
    return out


def _columns(lg: nx.DiGraph, rows: list[list[str]], w: dict[str, float]) -> list[tuple[int, int]]:
    """Row spans of the columns: cut a tall graph where at most 3 vertices feed the next row."""
    n = len(rows)
    width = max((sum(w[v] + _GAP for v in row) for row in rows), default=0.0) + _COL_GAP
    if n * _LAYER_H <= 1.5 * width or n < 12:
        return [(0, n - 1)]
    k = max(1, round(math.sqrt(_ASPECT * n * _LAYER_H / width)))
    target = n / k
    feeds = {b: sum(1 for v in rows[b - 1] if lg.out_degree(v)) for b in range(2, n - 2)}
    clean = [b for b, f in feeds.items() if 0 < f <= 3]
    spans, start = [], 0
    while n - start > 1.4 * target:
        ok = [b for b in clean if b - start >= target / 2 and n - b >= target / 2]
        if not ok:
            break
        cut = min(ok, key=lambda b: abs(b - start - target) + (feeds[b] - 1) * target / 4)
        spans.append((start, cut - 1))
        start = cut
    return [*spans, (start, n - 1)]


def _dfs_order(lg: nx.DiGraph, topo: list[str]) -> list[str]:
    seen: set[str] = set()
    out: list[str] = []
    for root in topo:
        if lg.in_degree(root) == 0:
            for n in nx.dfs_preorder_nodes(lg, root):
                if n not in seen:
                    seen.add(n)
                    out.append(n)
    return out + [n for n in lg if n not in seen]


def _crossings(lg: nx.DiGraph, rows: list[list[str]]) -> int:
    total = 0
    for upper, lower in itertools.pairwise(rows):
        at = {n: i for i, n in enumerate(lower)}
        ends = sorted((i, at[v]) for i, u in enumerate(upper) for v in lg.successors(u) if v in at)
        tree = [0] * (len(lower) + 1)  # Fenwick tree: count inversions of the lower ends
        for k, (_, j) in enumerate(ends):
            seen, i = 0, j + 1
            while i > 0:
                seen, i = seen + tree[i], i - (i & -i)
            total += k - seen
            i = j + 1
            while i <= len(lower):
                tree[i], i = tree[i] + 1, i + (i & -i)
    return total


def _order(lg: nx.DiGraph, rows: list[list[str]], rounds: int = 6) -> list[list[str]]:
    """Barycenter sweeps down and up; keeps the ordering with the fewest crossings."""
    best, best_c = [r[:] for r in rows], _crossings(lg, rows)
    for r in range(rounds):
        down = r % 2 == 0
        seq = range(1, len(rows)) if down else range(len(rows) - 2, -1, -1)
        for li in seq:
            ref = {n: i for i, n in enumerate(rows[li - 1 if down else li + 1])}
            cur = {n: i for i, n in enumerate(rows[li])}

            def bary(n: str, ref=ref, cur=cur) -> float:
                nb = [ref[m] for m in (lg.predecessors(n) if down else lg.successors(n)) if m in ref]
                return sum(nb) / len(nb) if nb else cur[n] * len(ref) / max(1, len(cur))

            rows[li].sort(key=bary)
        c = _crossings(lg, rows)
        if c < best_c:
            best, best_c = [row[:] for row in rows], c
    return best


def _place(lg: nx.DiGraph, rows: list[list[str]], w: dict[str, float]) -> dict[str, float]:
    """x per vertex (left edge 0): each row in order, as close as it may be to its neighbours' mean."""
    x: dict[str, float] = {}
    for row in rows:
        x.update(zip(row, _pack([0.0] * len(row), [w[n] for n in row])))
    for sweep in range(8):
        mode = ("down", "up", "both", "both")[sweep % 4]
        for row in rows if mode != "up" else rows[::-1]:
            want = []
            for n in row:
                nb = [(a, wt) for a, _, wt in lg.in_edges(n, data="weight") if a in x] if mode != "up" else []
                nb += [(b, wt) for _, b, wt in lg.out_edges(n, data="weight") if b in x] if mode != "down" else []
                tw = sum(wt for _, wt in nb)
                want.append(sum(x[m] * wt for m, wt in nb) / tw if tw else x[n])
            x.update(zip(row, _pack(want, [w[n] for n in row])))
    left = min((x[n] - w[n] / 2 for n in x), default=0.0)
    return {n: v - left for n, v in x.items()}


def _pack(want: list[float], widths: list[float]) -> list[float]:
    """Least-squares positions in the given order with no overlaps (isotonic regression, PAVA)."""
    offset, at = [], 0.0
    for i in range(len(want)):
        at += (widths[i - 1] + widths[i]) / 2 + _GAP if i else 0.0
        offset.append(at)
    blocks: list[list[float]] = []  # [sum, count]
    for t in (a - o for a, o in zip(want, offset)):
        blocks.append([t, 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            s, c = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += c
    y = [s / c for s, c in blocks for _ in range(int(c))]
    return [a + o for a, o in zip(y, offset)]


# ----------------------------------------------------------------------------------------
# drawing


def _esc(s: object) -> str:
    return html.escape(str(s), quote=True)


def _svg(boxes: dict[str, _Box], dag: nx.DiGraph, lay: _Layout, cg: ChannelGraph, colours: dict[str, tuple[str, str]]) -> str:
    tgroup = _tensor_groups(cg)
    pos = lay.pos
    width = max(lay.right, default=0.0) + _MARGIN
    height = max(lay.bottom, default=0.0) + _MARGIN + 30
    # Spread the edges entering a box along its top edge, ordered by where they come from.
    port: dict[tuple[str, str], float] = {}
    incoming: dict[str, list[tuple[float, tuple[str, str]]]] = defaultdict(list)
    for (u, v), via in lay.routes.items():
        prev = via[-2]
        if lay.column[prev] != lay.column[v]:
            prev = lay.portal[(prev, lay.column[v])][0]
        incoming[v].append((pos[prev][0], (u, v)))
    for v, ins in incoming.items():
        ins.sort()
        step = min(12.0, (boxes[v].width - 16) / max(1, len(ins)))
        for k, (_, e) in enumerate(ins):
            port[e] = (k - (len(ins) - 1) / 2) * step
    out: list[str] = [
        f'<svg id="graph" xmlns="http://www.w3.org/2000/svg" data-w="{width:.0f}" data-h="{height:.0f}">',
        _DEFS,
        '<g id="vp"><g class="edges">',
    ]
    trunk: dict[str, list[str]] = {}  # a source's dummy chain, drawn once; edges branch off it
    for (u, _), via in lay.routes.items():
        if len(via) - 1 > len(trunk.get(u, [u])):
            trunk[u] = via[:-1]
    for (u, v), via in [*((k, t) for k, t in lay.routes.items()), *(((u, ""), t) for u, t in trunk.items())]:
        carried = sorted(dag.edges[u, v]["tensors"] if v else {t for (a, b) in dag.out_edges(u) for t in dag.edges[a, b]["tensors"]})
        g = next((tgroup[t] for t in carried if t in tgroup), None)
        stroke = colours[g.id][1] if g is not None else "#a0a4a8"
        attrs = f' class="edge ch" data-group="{g.id}"' if g is not None else ' class="edge"'
        d = _edge_path(via[-2:] if v else via, port.get((u, v), 0.0), lay, boxes)
        out.append(f'<path{attrs} d="{d}" stroke="{stroke}"><title>{_esc(", ".join(carried))}</title></path>')
    out.append("</g>")
    out.extend(_box_svg(b, pos[k], colours) for k, b in boxes.items())
    out.append("</g></svg>")
    return "\n".join(out)


def _edge_path(via: list[str], port: float, lay: _Layout, boxes: dict[str, _Box]) -> str:
    """SVG path data: smooth curves between rows, an orthogonal connector where a column wraps."""
    x, y = lay.pos[via[0]]
    y += _BOX_H / 2 if via[0] in boxes else 0.0
    d = [f"M{x:.1f},{y:.1f}"]
    for prev, nxt in itertools.pairwise(via):
        c = lay.column[nxt]
        if lay.column[prev] != c:  # down below this column, over the gap, into the next one's top
            p, lane = lay.portal[(prev, c)]
            low = lay.bottom[c - 1] + 16 + 7 * lane
            gap = lay.right[c - 1] + _COL_GAP / 2 + 7 * lane
            high = _MARGIN - 14 + 7 * lane
            x, y = lay.pos[p]
            d.append(f"V{low:.1f} H{gap:.1f} V{high:.1f} H{x:.1f} V{y:.1f}")
        bx, by = lay.pos[nxt]
        if nxt in boxes:
            bx, by = bx + port, by - _BOX_H / 2
        my = (y + by) / 2
        d.append(f"C{x:.1f},{my:.1f} {bx:.1f},{my:.1f} {bx:.1f},{by:.1f}")
        x, y = bx, by
    return " ".join(d)


def _box_svg(b: _Box, at: tuple[float, float], colours: dict[str, tuple[str, str]]) -> str:
    x, y = at[0] - b.width / 2, at[1] - _BOX_H / 2
    fill, stroke = colours[b.group.id] if b.group is not None else ("#ffffff", "#8a9099")
    cls = {"op": "op", "in": "io in", "out": "io out"}[b.kind] + (" blk" if b.blocks else "")
    group = f' data-group="{b.group.id}"' if b.group is not None else ""
    rx = _BOX_H / 2 if b.kind != "op" else 5
    parts = [
        f'<g class="{cls}"{group} data-node="{_esc(b.name)}" data-x="{at[0]:.0f}" data-y="{at[1]:.0f}" transform="translate({x:.1f},{y:.1f})">',
        f"<title>{_esc(b.title)}</title>",
        f'<rect class="box" width="{b.width:.0f}" height="{_BOX_H:.0f}" rx="{rx:.0f}" fill="{fill}" stroke="{stroke}"/>',
    ]
    if b.group is not None and b.group.frozen.any():
        hatch = "hatch-full" if not b.group.prunable else "hatch-part"
        parts.append(f'<rect width="{b.width:.0f}" height="{_BOX_H:.0f}" rx="{rx:.0f}" fill="url(#{hatch})" pointer-events="none"/>')
    if b.reads is not None and b.reads is not b.group:
        parts.append(f'<rect class="reads" x="6" y="1.5" width="{b.width - 12:.0f}" height="4" rx="2" fill="{colours[b.reads.id][1]}"/>')
    tx = 10 if b.kind == "op" else 14
    parts.append(f'<text class="t1" x="{tx:.0f}" y="15">{_esc(b.label)}</text>')
    parts.append(f'<text class="t2" x="{tx:.0f}" y="28">{_esc(b.sub)}</text>')
    if b.group is not None and b.kind == "op":
        parts.append(f'<text class="gid" x="{b.width - 8:.0f}" y="15">{b.group.id}</text>')
    if b.blocks:
        parts.append(f'<circle class="stop" cx="{b.width:.0f}" cy="0" r="9"/><text class="stopg" x="{b.width:.0f}" y="4.5">⊘</text>')
    parts.append("</g>")
    return "".join(parts)


def _legend_title(g: Group) -> str:
    weights = sorted({d.value for d in g.weight_dims(Role.OUT)})
    lines = [f"{g.id}: {g.n_units} units from {', '.join(weights[:4])}{' …' if len(weights) > 4 else ''}"]
    lines += [f"⊘ [{b.code.value}] {b.reason}" for b in g.reasons[:3]]
    lines += [f"inexact: {w}" for w in g.inexact[:2]]
    return "\n".join(lines)


def _sidebar(
    analysis: Analysis,
    boxes: dict[str, _Box],
    candidates: list[Group],
    colours: dict[str, tuple[str, str]],
    reasons: dict[Blocked, list[str]],
    cost: Cost,
) -> str:
    n_ops = sum(1 for b in boxes.values() if b.kind == "op")
    status = defaultdict(int)
    for g in candidates:
        status[_status(g)] += 1
    ops_of = defaultdict(int)
    for b in boxes.values():
        if b.group is not None and b.kind == "op":
            ops_of[b.group.id] += 1
    s = [
        f"<h1>{_esc(analysis.source)}</h1>",
        f'<p class="sum">{n_ops} ops · {len(candidates)} channel groups: '
        f'{status["prunable"]} prunable, {status["partly frozen"]} partly frozen, {status["blocked"]} blocked'
        f" · params {human(cost.params)} · FLOPs {human(cost.flops)}</p>",
        '<p class="keys"><span class="k"><svg width="22" height="14"><rect x="1" y="1" width="20" height="12" rx="3" fill="#fff" stroke="#8a9099"/></svg>no channel group</span>'
        '<span class="k"><svg width="22" height="14"><rect x="1" y="1" width="20" height="12" rx="3" fill="#ccc" stroke="#777"/><rect x="1" y="1" width="20" height="12" rx="3" fill="url(#hatch-full)"/></svg>frozen</span>'
        '<span class="k"><svg width="22" height="14"><rect x="2" y="2" width="18" height="10" rx="3" fill="#fff" stroke="#d11" stroke-width="3"/></svg>⊘ blocks channels</span>'
        '<span class="k"><svg width="22" height="14"><rect x="1" y="1" width="20" height="12" rx="3" fill="#fff" stroke="#8a9099"/><rect x="4" y="2" width="14" height="3" rx="1.5" fill="#555"/></svg>band: group it reads</span></p>',
        "<h2>Channel groups</h2>",
        '<table class="legend"><tr><th></th><th>group</th><th>units</th><th>frozen</th><th>ops</th><th>status</th></tr>',
    ]
    for g in candidates:
        fill, stroke = colours[g.id]
        st = _status(g)
        s.append(
            f'<tr class="grp" data-group="{g.id}" title="{_esc(_legend_title(g))}"><td><span class="sw" style="background:{fill};border-color:{stroke}"></span></td>'
            f'<td>{g.id}</td><td class="n">{g.n_units}</td><td class="n">{int(g.frozen.sum())}</td><td class="n">{ops_of[g.id]}</td>'
            f'<td class="st {st.split()[0]}">{st}</td></tr>'
        )
    s.append("</table>")
    s.append("<h2>Why channels are frozen</h2>")
    if not reasons:
        s.append('<p class="none">Nothing blocks: every channel group is free to prune.</p>')
    by_code: dict[str, list[Blocked]] = defaultdict(list)
    for b in reasons:
        by_code[b.code.value].append(b)
    for code, items in sorted(by_code.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        s.append(f'<details{" open" if len(items) <= 10 else ""}><summary><code>{_esc(code)}</code> <span class="cnt">×{len(items)}</span></summary><table class="why">')
        for b in items:
            where = b.node if b.node is not None else b.value
            s.append(
                f'<tr class="rsn" data-node="{_esc(where or "")}" title="{_esc(where or "")}"><td>{_esc(b.reason)}'
                f'<div class="gs">at <code>{_esc(_short(where or "—", 40))}</code> · freezes {", ".join(reasons[b])}</div></td></tr>'
            )
        s.append("</table></details>")
    return "\n".join(s)


_DEFS = """<defs>
<pattern id="hatch-full" width="7" height="7" patternUnits="userSpaceOnUse" patternTransform="rotate(45)"><rect width="3.5" height="7" fill="#000" fill-opacity="0.22"/></pattern>
<pattern id="hatch-part" width="9" height="9" patternUnits="userSpaceOnUse" patternTransform="rotate(45)"><rect width="1.5" height="9" fill="#000" fill-opacity="0.18"/></pattern>
</defs>"""

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
html, body { margin: 0; height: 100%; font: 13px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1f2328; }
body { display: flex; }
main { flex: 1; position: relative; min-width: 0; background: #f6f7f9; }
#graph { width: 100%; height: 100vh; display: block; cursor: grab; user-select: none; }
#graph.drag { cursor: grabbing; }
.bar { position: absolute; top: 8px; left: 8px; display: flex; gap: 6px; align-items: center; background: #fffe; padding: 5px 8px; border-radius: 6px; box-shadow: 0 1px 3px #0003; }
.bar button { font: inherit; padding: 2px 8px; border: 1px solid #c4c8cc; background: #fff; border-radius: 4px; cursor: pointer; }
.bar input { font: inherit; width: 12em; padding: 2px 6px; border: 1px solid #c4c8cc; border-radius: 4px; }
.bar .hint { color: #666; font-size: 12px; }
aside { width: 400px; flex: none; height: 100vh; overflow: auto; padding: 10px 14px; box-sizing: border-box; border-left: 1px solid #d0d4d8; background: #fff; }
h1 { font-size: 15px; margin: 2px 0 4px; word-break: break-all; }
h2 { font-size: 13px; margin: 14px 0 4px; text-transform: uppercase; letter-spacing: .04em; color: #555; }
.sum { margin: 0 0 6px; }
.keys { display: flex; flex-wrap: wrap; gap: 4px 12px; color: #444; font-size: 12px; margin: 4px 0; }
.keys .k { display: inline-flex; align-items: center; gap: 4px; }
table { border-collapse: collapse; width: 100%; }
th { text-align: left; font-weight: 600; color: #555; border-bottom: 1px solid #ddd; padding: 2px 4px; }
td { padding: 2px 4px; vertical-align: top; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
tr.grp, tr.rsn { cursor: pointer; }
tr.grp:hover, tr.rsn:hover, tr.on { background: #eef3ff; }
.sw { display: inline-block; width: 14px; height: 14px; border: 2px solid; border-radius: 3px; vertical-align: middle; }
.st.prunable { color: #1a7f37; } .st.partly { color: #9a6700; } .st.blocked { color: #cf222e; font-weight: 600; }
details { margin: 4px 0 8px; } summary { cursor: pointer; } summary code { color: #cf222e; font-weight: 600; }
.cnt { color: #666; }
table.why td { border-bottom: 1px solid #eee; }
.gs { color: #666; font-size: 11px; }
.none { color: #1a7f37; }
.edge { fill: none; stroke-width: 1.3; stroke-opacity: .55; }
.edge.ch { stroke-width: 1.8; stroke-opacity: .8; }
.box { stroke-width: 1.3; }
.blk .box { stroke: #d11 !important; stroke-width: 3.5; }
.t1 { font: 600 12px system-ui, sans-serif; fill: #111; }
.t2 { font: 10px ui-monospace, monospace; fill: #333; }
.gid { font: 600 10px system-ui, sans-serif; fill: #222; text-anchor: end; }
.stop { fill: #d11; stroke: #fff; stroke-width: 1.5; }
.stopg { font: bold 14px system-ui, sans-serif; fill: #fff; text-anchor: middle; }
.io .box { stroke-dasharray: 4 2; }
#graph.dim .op, #graph.dim .io, #graph.dim .edge { opacity: .15; }
#graph.dim .hl { opacity: 1 !important; }
.flash .box { stroke: #0969da !important; stroke-width: 5; }
</style>
</head>
<body>
<main>
{svg}
<div class="bar"><button id="fit" title="whole graph">fit</button><button id="fitw" title="fit the width, from the top">width</button><button id="one">100%</button>
<input id="find" placeholder="find op (name or type)…"><span class="hint">wheel: zoom · drag: pan · click a row to find it</span></div>
</main>
<aside>
{side}
</aside>
<script>
(() => {
  const svg = document.getElementById("graph"), vp = document.getElementById("vp");
  const W = +svg.dataset.w, H = +svg.dataset.h;
  let s = 1, tx = 0, ty = 0, pinned = null;
  const show = () => vp.setAttribute("transform", `translate(${tx},${ty}) scale(${s})`);
  const view = () => svg.getBoundingClientRect();
  function fit(all) {
    const r = view(), sw = r.width / W, sh = r.height / H;
    s = Math.min(1, sw, sh);
    if (!all && s < 0.45) s = Math.min(1, sw);
    tx = (r.width - W * s) / 2; ty = 40; show();
  }
  svg.addEventListener("wheel", e => {
    e.preventDefault();
    const r = view(), mx = e.clientX - r.left, my = e.clientY - r.top;
    const ns = Math.min(4, Math.max(0.03, s * Math.exp(-e.deltaY * 0.0015)));
    tx = mx - (mx - tx) * ns / s; ty = my - (my - ty) * ns / s; s = ns; show();
  }, { passive: false });
  let drag = null;
  svg.addEventListener("pointerdown", e => { drag = [e.clientX - tx, e.clientY - ty]; svg.classList.add("drag"); svg.setPointerCapture(e.pointerId); });
  svg.addEventListener("pointermove", e => { if (drag) { tx = e.clientX - drag[0]; ty = e.clientY - drag[1]; show(); } });
  svg.addEventListener("pointerup", () => { drag = null; svg.classList.remove("drag"); });
  const nodes = [...svg.querySelectorAll(".op, .io")], edges = [...svg.querySelectorAll(".edge")];
  function highlight(test) {
    if (!test) { svg.classList.remove("dim"); [...nodes, ...edges].forEach(n => n.classList.remove("hl")); return; }
    svg.classList.add("dim");
    [...nodes, ...edges].forEach(n => n.classList.toggle("hl", test(n)));
  }
  function focus(el) {
    const r = view();
    s = Math.max(s, 0.9); tx = r.width / 2 - el.dataset.x * s; ty = r.height / 2 - el.dataset.y * s; show();
    el.classList.add("flash"); setTimeout(() => el.classList.remove("flash"), 1600);
  }
  document.querySelectorAll("tr.grp").forEach(row => {
    const g = row.dataset.group, test = n => n.dataset.group === g;
    row.addEventListener("mouseenter", () => { if (!pinned) highlight(test); });
    row.addEventListener("mouseleave", () => { if (!pinned) highlight(null); });
    row.addEventListener("click", () => {
      document.querySelectorAll("tr.on").forEach(r => r.classList.remove("on"));
      pinned = pinned === g ? null : g; highlight(pinned ? test : null);
      if (pinned) { row.classList.add("on"); const first = nodes.find(test); if (first) focus(first); }
    });
  });
  document.querySelectorAll("tr.rsn").forEach(row => row.addEventListener("click", () => {
    const el = nodes.find(n => n.dataset.node === row.dataset.node); if (el) focus(el);
  }));
  const find = document.getElementById("find"); let hits = [], at = 0;
  find.addEventListener("input", () => {
    const q = find.value.trim().toLowerCase(); at = 0;
    hits = q ? nodes.filter(n => (n.dataset.node + " " + n.querySelector(".t1").textContent).toLowerCase().includes(q)) : [];
    highlight(q ? n => hits.includes(n) : null);
  });
  find.addEventListener("keydown", e => { if (e.key === "Enter" && hits.length) focus(hits[at++ % hits.length]); });
  document.getElementById("fit").onclick = () => fit(true);
  document.getElementById("fitw").onclick = () => fit(false);
  document.getElementById("one").onclick = () => { const r = view(); s = 1; tx = (r.width - W) / 2; ty = 40; show(); };
  fit(location.hash === "#fit");
})();
</script>
</body>
</html>
"""
