"""`spa inspect --html`: one self-contained page that draws the graph, its groups and its blocks."""

from __future__ import annotations

import html.parser
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import onnx
import onnx.numpy_helper
import onnx.parser
import pytest

from spa.pipeline import Analysis, analyze
from spa.viz import render_html

REPO = pathlib.Path(__file__).resolve().parent.parent
DEMO = REPO / "models" / "demo.onnx"
VOID = {"meta", "input", "br", "hr", "img", "link"}


class Page(html.parser.HTMLParser):
    """Parses the page strictly: every non-void element closes, in order; records what it saw."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.text: list[str] = []
        self.feed(text)
        self.close()
        if self.stack:
            self.errors.append(f"unclosed: {self.stack}")

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {k: v or "" for k, v in attrs}))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def with_class(self, tag: str, cls: str) -> list[dict[str, str]]:
        return [a for t, a in self.tags if t == tag and cls in a.get("class", "").split()]


def build_blocked(path: pathlib.Path) -> pathlib.Path:
    """Conv → Relu → DepthToSpace → Conv: DepthToSpace has no channel rule, so it blocks."""
    model = onnx.parser.parse_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1,3,8,8] x) => (float[1,4,4,4] y) {
          a = Conv <kernel_shape=[3,3], pads=[1,1,1,1]> (x, w1)
          r = Relu (a)
          d = DepthToSpace <blocksize=2> (r)
          y = Conv <kernel_shape=[1,1], strides=[4,4]> (d, w2)
        }"""
    )
    rng = np.random.default_rng(0)
    model.graph.initializer.extend(
        [
            onnx.numpy_helper.from_array(rng.standard_normal((16, 3, 3, 3)).astype(np.float32), "w1"),
            onnx.numpy_helper.from_array(rng.standard_normal((4, 4, 1, 1)).astype(np.float32), "w2"),
        ]
    )
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def demo() -> tuple[Analysis, str]:
    a = analyze(DEMO)
    return a, render_html(a)


@pytest.fixture(scope="module")
def blocked(tmp_path_factory: pytest.TempPathFactory) -> tuple[Analysis, str]:
    a = analyze(build_blocked(tmp_path_factory.mktemp("viz") / "blocked.onnx"))
    return a, render_html(a)


def check_page(a: Analysis, text: str) -> Page:
    """What every page must have: well-formed, one SVG, one box per op, every candidate in the legend."""
    page = Page(text)
    assert page.errors == []
    assert sum(1 for t, _ in page.tags if t == "svg" and _.get("id") == "graph") == 1
    ops = page.with_class("g", "op")
    assert len(ops) == len(list(a.model.graph))
    assert sorted(o["data-node"] for o in ops) == sorted(n.name for n in a.model.graph)
    legend = [r["data-group"] for r in page.with_class("tr", "grp")]
    assert legend == [g.id for g in a.channels.candidates]
    # Self-contained: nothing to fetch (the only URL is the SVG namespace).
    assert not [t for t, at in page.tags if t in {"script", "img", "link", "iframe"} and (at.get("src") or at.get("href"))]
    assert set(re.findall(r"https?://[^\s\"']+", text)) <= {"http://www.w3.org/2000/svg"}
    return page


def test_demo_page(demo: tuple[Analysis, str]) -> None:
    a, text = demo
    page = check_page(a, text)
    # Each op is coloured by the group of the channels it produces: every Conv has one.
    by_node = {o["data-node"]: o for o in page.with_class("g", "op")}
    for node in a.model.graph:
        if node.op_type == "Conv":
            assert by_node[node.name].get("data-group") in {g.id for g in a.channels.candidates}, node.name
    # The only block of the demo (its logits are the graph output) sits on the output terminal.
    assert [io["data-node"] for io in page.with_class("g", "blk")] == ["output"]
    assert "graph_io" in "".join(page.text)


def test_demo_boxes_do_not_overlap(demo: tuple[Analysis, str]) -> None:
    _, text = demo
    boxes = []
    for m in re.finditer(r'<g class="(?:op|io)[^"]*"[^>]*transform="translate\(([-\d.]+),([-\d.]+)\)">.*?<rect class="box" width="(\d+)" height="(\d+)"', text, re.S):
        x, y, w, h = map(float, m.groups())
        boxes.append((x, y, x + w, y + h))
    assert len(boxes) == len(list(demo[0].model.graph)) + 2  # ops, one input, one output
    for i, p in enumerate(boxes):
        for q in boxes[i + 1 :]:
            assert p[2] <= q[0] or q[2] <= p[0] or p[3] <= q[1] or q[3] <= p[1], (p, q)


def test_blocking_op_is_marked_with_its_reason(blocked: tuple[Analysis, str]) -> None:
    a, text = blocked
    page = check_page(a, text)
    d2s = next(n.name for n in a.model.graph if n.op_type == "DepthToSpace")
    reasons = [b for g in a.channels.candidates for b in g.reasons if b.node == d2s]
    assert reasons, "DepthToSpace no longer blocks: pick another op without a channel rule"
    marked = page.with_class("g", "blk")
    assert d2s in [m["data-node"] for m in marked]
    shown = "".join(page.text)
    for b in reasons:
        assert f"[{b.code.value}]" in shown  # the hover title
        assert b.reason in shown  # the title and the side table
    summaries = re.findall(r"<summary><code>([a-z_]+)</code>", text)
    assert {b.code.value for b in reasons} <= set(summaries)
    assert "⊘" in shown
    # Ops that do not block carry no mark.
    assert {m["data-node"] for m in marked if "op" in m["class"].split()} == {d2s}


def test_render_is_deterministic(demo: tuple[Analysis, str]) -> None:
    a, text = demo
    assert render_html(a) == text


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spa.cli", *args], capture_output=True, text=True, timeout=60, env=dict(os.environ), stdin=subprocess.DEVNULL)


def test_cli_writes_html(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "groups.html"
    proc = run_cli("inspect", str(DEMO), "--html", str(out))
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stderr
    assert "g1" in proc.stdout  # the table is still printed
    page = Page(out.read_text(encoding="utf-8"))
    assert page.errors == []
    assert not list(tmp_path.glob(".*.tmp"))


def test_cli_bad_html_path_is_one_line(tmp_path: pathlib.Path) -> None:
    from click.testing import CliRunner

    from spa.cli import cli

    for bad in (tmp_path / "missing" / "x.html", tmp_path, DEMO):
        result = CliRunner().invoke(cli, ["inspect", str(DEMO), "--html", str(bad)])
        assert result.exit_code == 2, result.output
        lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("spa: error:"), result.stderr
        assert str(bad) in lines[0] or "overwrite" in lines[0]


def test_layout_of_a_tall_graph_wraps_without_overlaps() -> None:
    """600 boxes of residual blocks: placed in well under a second, in columns, no two boxes overlap."""
    import time

    import networkx as nx

    from spa import viz

    dag = nx.DiGraph()
    prev = "i0"
    for b in range(150):  # conv → relu → conv → add(skip)
        a, r, c, s = (f"n{4 * b + k}" for k in range(4))
        dag.add_edges_from([(prev, a), (a, r), (r, c), (c, s), (prev, s)])
        prev = s
    dag.add_edge(prev, "o0")
    for u, v in dag.edges:
        dag.edges[u, v]["tensors"] = {u}
    widths = {n: 90.0 for n in dag}
    start = time.perf_counter()
    lay = viz._layout(dag, widths)
    assert time.perf_counter() - start < 2.0
    assert len(set(lay.column.values())) > 1
    boxes = sorted((lay.pos[n][0] - 45, lay.pos[n][1] - 17, lay.pos[n][0] + 45, lay.pos[n][1] + 17) for n in dag)
    for i, p in enumerate(boxes):
        for q in boxes[i + 1 :]:
            if q[0] >= p[2]:
                break  # sorted by left edge: nothing further right can overlap p
            assert p[3] <= q[1] or q[3] <= p[1], (p, q)
