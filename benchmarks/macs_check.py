"""Executed-MACs check: spa's reported MACs against an independent count from ONNX Runtime.

    python benchmarks/macs_check.py [--models a,b,c] [--models-dir /tmp/coverage_models]
                                    [--ratio 0.5] [--budget 900] [--export] [--json out.json]
                                    [--markdown docs/macs-check.md]

The models are the coverage benchmark's timm exports (``benchmarks/coverage.py``; files
``<models-dir>/<name>.onnx``). With ``--export`` a missing one is exported first by
coverage.py's own torch worker (needs its benchmark-only setup: ``pip install --no-deps timm``
and the packages named in coverage.py's header); without it, missing models are skipped.

For every model:

1. ``spa.prune(model, ratio, benchmark=False, verify="none")``: the report's ``macs_before``
   and ``macs_after`` (spa's cost model, :mod:`spa.analysis.cost`);
2. the original file and the pruned model are each run **once** in ONNX Runtime (CPU, graph
   optimisations off, so every node of the file runs as written) with every input and output
   of every Conv / ConvTranspose / Gemm / MatMul / LSTM / GRU node (and Einsum / RNN) made a
   graph output, on seeded random inputs of the sizes spa counts at
   (``spa.inputs.resolve_input_shapes``: the only thing taken from spa);
3. the MACs of each such node are computed here from the *real* arrays' shapes, by formulas
   written in this file (no code shared with spa's cost model):

   - Conv: ``prod(Y) · prod(W[1:])`` (each output element: C/group · kernel multiply-adds);
   - ConvTranspose: ``prod(X) · prod(W[1:])`` (each input element scattered into M/group · kernel);
   - Gemm: ``prod(Y) · K`` (K = A's column count, its row count with transA);
   - MatMul: ``prod(Y) · K`` (K = A's last axis; batch broadcasting read off Y);
   - LSTM / GRU / RNN: ``seq · batch · directions · gates · hidden · (input + hidden)``
     (gates 4 / 3 / 1: one input and one recurrent mat-vec per gate row and step);
   - Einsum (explicit ``->``, no ellipsis): the product of every index's size, once per extra
     operand;

   a node none of whose inputs depends on a graph input computes a constant: ONNX Runtime's
   constant folding runs it once when the session is created, so its MACs are not
   per-inference and are shown apart (spa's canonicalization folds such nodes too);

4. the report's figure and the executed one must agree within ``--tolerance`` (2 %,
   relative); a model off by more is flagged ``OFF``. Nodes inside If/Loop/Scan bodies are
   not seen by this count; the table says how many there were.

Prints a table and a summary; ``--markdown`` writes them (with the command line that produced
them) as a Markdown page, ``--json`` every row. Exit status 1 when any model is off.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any

import numpy as np
import onnx

HERE = pathlib.Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
TOLERANCE = 0.02

#: The ops counted here (the issue's list, and Einsum / RNN, which spa's cost model counts too).
MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "LSTM", "GRU", "RNN", "Einsum")
_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


# ---------------------------------------------------------------------------------------------
# the independent count
# ---------------------------------------------------------------------------------------------


def _prod(xs) -> int:
    return int(math.prod(int(x) for x in xs))


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def node_macs(node: onnx.NodeProto, shape) -> int | None:
    """MACs of one node from the real shapes (``shape(name) -> tuple | None``); None: unknown."""
    op = node.op_type
    ins = [shape(n) if n else None for n in node.input]
    y = shape(node.output[0]) if node.output and node.output[0] else None

    def arg(i: int):
        return ins[i] if i < len(ins) else None

    if op == "Conv":
        w = arg(1)
        return None if y is None or w is None else _prod(y) * _prod(w[1:])
    if op == "ConvTranspose":
        x, w = arg(0), arg(1)
        return None if x is None or w is None else _prod(x) * _prod(w[1:])
    if op == "Gemm":
        a = arg(0)
        if y is None or a is None or len(a) != 2:
            return None
        k = a[0] if _attr(node, "transA", 0) else a[1]
        return _prod(y) * int(k)
    if op == "MatMul":
        a = arg(0)
        if y is None or a is None or not len(a):
            return None
        return _prod(y) * int(a[-1])
    if op in _GATES:
        x, w, r = arg(0), arg(1), arg(2)
        if x is None or w is None or r is None:
            return None
        seq, batch = (x[1], x[0]) if _attr(node, "layout", 0) else (x[0], x[1])
        directions, rows, hidden = w[0], w[1], r[2]  # W: [dirs, gates·hidden, input]; R: [dirs, gates·hidden, hidden]
        if rows != _GATES[op] * hidden:
            return None
        return int(seq) * int(batch) * int(directions) * int(rows) * (int(x[-1]) + int(hidden))
    if op == "Einsum":
        eq = _attr(node, "equation", b"")
        eq = (eq.decode() if isinstance(eq, bytes) else str(eq)).replace(" ", "")
        if "->" not in eq or "..." in eq:
            return None
        terms = eq.split("->")[0].split(",")
        sizes: dict[str, int] = {}
        for i, term in enumerate(terms):
            s = arg(i)
            if s is None or len(s) != len(term):
                return None
            sizes.update(zip(term, (int(d) for d in s)))
        return _prod(sizes.values()) * (len(terms) - 1)
    return None


def executed_macs(path: str | os.PathLike, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
    """Run ``path`` once in ORT with every input/output of every MAC op exposed; count."""
    import onnxruntime as ort

    model = onnx.load(os.fspath(path))
    g = model.graph
    inits = {t.name: tuple(t.dims) for t in g.initializer}
    targets = [n for n in g.node if n.op_type in MAC_OPS and n.domain in ("", "ai.onnx")]
    in_bodies = sum(
        1
        for n in g.node
        for a in n.attribute
        if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
        for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs))
        for m in sub.node
        if m.op_type in MAC_OPS
    )
    wanted = {name for n in targets for name in (*n.input, *n.output) if name and name not in inits}
    declared = {o.name for o in g.output}
    graph_inputs = {i.name for i in g.input}
    for name in sorted(wanted - declared - graph_inputs):
        g.output.append(onnx.ValueInfoProto(name=name))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    with tempfile.TemporaryDirectory(prefix="macs-check-") as tmp:
        # through a file: a model over protobuf's 2 GB limit, or with external data, still loads
        p = pathlib.Path(tmp) / "m.onnx"
        onnx.save(model, p, save_as_external_data=model.ByteSize() > 2**31 - 2**24)
        sess = ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        takes = {i.name for i in sess.get_inputs()}
        arrays = sess.run(names, {k: v for k, v in feeds.items() if k in takes})
    shapes: dict[str, tuple[int, ...]] = {n: tuple(np.shape(a)) for n, a in zip(names, arrays)}
    del arrays
    shapes.update(inits)
    shapes.update({k: tuple(np.shape(v)) for k, v in feeds.items()})
    # Nodes that read no graph input (directly or not) compute the same constant on every run:
    # ORT's constant folding does them once, when the session is made (a Swin's relative
    # position MLP over fixed coordinates). They are not per-inference MACs: counted apart.
    varying = {i.name for i in g.input if i.name not in inits}
    for n in g.node:  # topological order (ONNX requires it of the main graph)
        if any(name in varying for name in n.input) or n.op_type in ("RandomNormal", "RandomUniform"):
            varying.update(o for o in n.output if o)
    total, constant, unknown, by_op = 0, 0, [], {}
    for n in targets:
        m = node_macs(n, shapes.get)
        if m is None:
            unknown.append(n.name or n.op_type)
            continue
        if not any(name in varying for name in n.input):
            constant += m
            continue
        total += m
        by_op[n.op_type] = by_op.get(n.op_type, 0) + m
    return {"macs": total, "constant_macs": constant, "nodes": len(targets), "unknown": unknown, "by_op": by_op,
            "in_bodies": in_bodies}


def _feeds(path: pathlib.Path, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded inputs at the sizes spa counts at (spa.inputs resolves them; values are ours)."""
    import onnx_ir as ir

    from spa.inputs import graph_inputs, resolve_input_shapes

    model = ir.load(str(path))
    shapes = resolve_input_shapes(model)
    rng = np.random.default_rng(seed)
    feeds = {}
    for v in graph_inputs(model):
        dtype = v.dtype.numpy() if v.dtype is not None else np.float32
        shape = shapes[v.name]
        feeds[v.name] = rng.standard_normal(shape).astype(dtype) if np.issubdtype(dtype, np.floating) else np.zeros(shape, dtype)
    return feeds


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------


def _rel(a: int | None, b: int | None) -> float | None:
    if a is None or b is None:
        return None
    if b == 0:
        return 0.0 if a == 0 else math.inf
    return abs(a - b) / b


def check_model(path: pathlib.Path, ratio: float, tolerance: float) -> dict[str, Any]:
    import spa

    row: dict[str, Any] = {"model": path.name.removesuffix(".onnx")}
    t0 = time.perf_counter()
    try:
        result = spa.prune(str(path), ratio=ratio, benchmark=False, verify="none")
    except Exception as e:  # noqa: BLE001
        return row | {"status": "spa failed", "detail": f"{type(e).__name__}: {str(e)[:200]}"}
    row["spa_s"] = round(time.perf_counter() - t0, 2)
    rep = result.report
    row |= {"spa_before": rep.macs_before, "spa_after": rep.macs_after}
    with tempfile.TemporaryDirectory(prefix="macs-check-") as tmp:
        pruned = result.save(pathlib.Path(tmp) / "pruned.onnx")
        del result
        t0 = time.perf_counter()
        try:
            feeds = _feeds(path)
            before = executed_macs(path, feeds)
            after = executed_macs(pruned, feeds)
        except Exception as e:  # noqa: BLE001
            return row | {"status": "count failed", "detail": f"{type(e).__name__}: {str(e)[:200]}",
                          "traceback": traceback.format_exc()[-2000:]}
    row["count_s"] = round(time.perf_counter() - t0, 2)
    row |= {"exec_before": before["macs"], "exec_after": after["macs"],
            "unknown": before["unknown"] + after["unknown"], "in_bodies": before["in_bodies"],
            "constant_before": before["constant_macs"], "constant_after": after["constant_macs"],
            "exec_by_op_before": before["by_op"]}
    row["diff_before"] = _rel(rep.macs_before, before["macs"])
    row["diff_after"] = _rel(rep.macs_after, after["macs"])
    off = any(d is None or d > tolerance for d in (row["diff_before"], row["diff_after"])) or bool(row["unknown"])
    row["status"] = "OFF" if off else "ok"
    return row


def _m(x: int | None) -> str:
    return "—" if x is None else f"{x / 1e6:,.2f}"


def _pct(x: float | None) -> str:
    return "—" if x is None else ("inf" if math.isinf(x) else f"{100 * x:.2f} %")


def table(rows: list[dict]) -> list[str]:
    out = [
        "| model | spa MACs before (M) | executed before (M) | Δ | spa MACs after (M) | executed after (M) | Δ | check |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if r["status"] not in ("ok", "OFF"):
            out.append(f"| {r['model']} | — | — | — | — | — | — | {r['status']}: {r.get('detail', '')} |")
            continue
        note = r["status"] + (f" (unknown: {', '.join(r['unknown'][:3])})" if r["unknown"] else "") + (
            f" ({r['in_bodies']} MAC nodes in bodies, not counted)" if r["in_bodies"] else "") + (
            f" (+{_m(r['constant_before'])} M on constants in the input file, folded at load)" if r.get("constant_before") else "")
        out.append(f"| {r['model']} | {_m(r['spa_before'])} | {_m(r['exec_before'])} | {_pct(r['diff_before'])} | "
                   f"{_m(r['spa_after'])} | {_m(r['exec_after'])} | {_pct(r['diff_after'])} | {note} |")
    return out


def summary(rows: list[dict], tolerance: float, skipped: list[str], budget_left: list[str]) -> list[str]:
    checked = [r for r in rows if r["status"] in ("ok", "OFF")]
    off = [r["model"] for r in checked if r["status"] == "OFF"]
    worst = max(checked, key=lambda r: max(r["diff_before"] or 0, r["diff_after"] or 0), default=None)
    lines = [
        f"models checked: {len(checked)}; within {tolerance:.0%} before and after pruning: {len(checked) - len(off)}"
        + (f"; **off: {', '.join(off)}**" if off else ""),
    ]
    if worst is not None:
        lines.append(f"largest difference: {_pct(max(worst['diff_before'] or 0, worst['diff_after'] or 0))} ({worst['model']})")
    failed = [f"{r['model']} ({r['status']})" for r in rows if r["status"] not in ("ok", "OFF")]
    if failed:
        lines.append("not checked: " + ", ".join(failed))
    if skipped:
        lines.append(f"no export in the models folder (skipped): {', '.join(skipped)}")
    if budget_left:
        lines.append(f"left for the time budget: {', '.join(budget_left)}")
    return lines


def _export(name: str, size: int, path: pathlib.Path, timeout: float) -> bool:
    """Export one coverage model with coverage.py's torch worker (its setup, its settings)."""
    cmd = [sys.executable, str(HERE / "coverage.py"), "--worker", "torch", "--no-tp", "--model", name,
           "--size", str(size), "--onnx", str(path), "--threads", str(os.cpu_count() or 1)]
    try:
        subprocess.run(cmd, capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return False
    return path.exists()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", help="comma-separated coverage model names (default: the whole coverage zoo)")
    ap.add_argument("--models-dir", default="/tmp/coverage_models", help="where coverage.py keeps its exports")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--tolerance", type=float, default=TOLERANCE, help="relative difference allowed (default 0.02)")
    ap.add_argument("--budget", type=float, default=900, help="seconds: no new model is started after this")
    ap.add_argument("--export", action="store_true", help="export missing models with coverage.py's torch worker")
    ap.add_argument("--json", type=pathlib.Path, help="write every row as JSON")
    ap.add_argument("--markdown", type=pathlib.Path, help="write the table, the summary and this command as Markdown")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO_ROOT))
    sys.path.insert(0, str(HERE))
    import logging

    logging.disable(logging.WARNING)
    from coverage import ZOO  # noqa: E402  (the coverage zoo: names, families, input sizes)

    entries = {e.name: e for e in ZOO}
    names = [n.strip() for n in args.models.split(",")] if args.models else list(entries)
    d = pathlib.Path(args.models_dir)
    rows, skipped, left = [], [], []
    t_start = time.perf_counter()
    for name in names:
        if time.perf_counter() - t_start > args.budget:
            left.append(name)
            continue
        path = d / f"{name}.onnx"
        if not path.exists() and args.export and name in entries:
            d.mkdir(parents=True, exist_ok=True)
            _export(name, entries[name].size, path, timeout=300)
        if not path.exists():
            skipped.append(name)
            continue
        row = check_model(path, args.ratio, args.tolerance)
        rows.append(row)
        print(f"{row['model']:<34} {row['status']:<12} before {_pct(row.get('diff_before')):>9}  after {_pct(row.get('diff_after')):>9}"
              f"  {row.get('detail', '')}", flush=True)
    elapsed = time.perf_counter() - t_start
    lines = table(rows)
    summ = summary(rows, args.tolerance, skipped, left) + [f"elapsed {elapsed:.0f} s"]
    print("\n".join(["", *lines, "", *summ]))
    if args.json:
        args.json.write_text(json.dumps({"options": vars(args) | {"json": str(args.json), "markdown": str(args.markdown)},
                                         "rows": rows}, indent=1, default=str))
    if args.markdown:
        command = "python benchmarks/macs_check.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
        page = [
            f"<!-- generated: {command.strip()} -->",
            "# Executed MACs: spa's report against ONNX Runtime",
            "",
            "For each coverage model (`benchmarks/coverage.py`'s timm exports, random weights, opset 17; "
            "`--export` makes the missing ones with coverage.py's own exporter), `spa prune --ratio "
            f"{args.ratio}` reports MACs before and after; `benchmarks/macs_check.py` runs the input file and the "
            "pruned model in ONNX Runtime with every input and output of every Conv / ConvTranspose / Gemm / "
            "MatMul / LSTM / GRU (and Einsum / RNN) node exposed and computes those nodes' MACs from the real "
            "arrays' shapes, with formulas of its own (see the script's docstring). `Δ` is |spa − executed| / "
            f"executed; a model is `OFF` above {args.tolerance:.0%} (or when a node's MACs cannot be computed). "
            "Nodes that read no graph input compute a constant, which ONNX Runtime's constant folding does once "
            "when the session is created: their MACs are not per-inference and are noted apart.",
            "",
            "Produced by:",
            "",
            "```",
            command.strip(),
            "```",
            "",
            *lines,
            "",
            *[f"- {s}" for s in summ],
            "",
        ]
        args.markdown.write_text("\n".join(page))
    return 1 if any(r["status"] == "OFF" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
