"""The device target (spa.kernels): what pruning and compiling each bring, tuning-database reuse,
and CUDA compilation over the zoo.

    python benchmarks/target.py [--parts resnet50,reuse,cuda,latency] [--trials 0] [--tuning-db DIR]
                                [--model resnet50] [--ratio 0.5] [--budget 10] [--arch sm_80]

* ``resnet50``: the zoo's ResNet-50 (``--model``), pruned by spa at ``--ratio``; one side-by-side
  run (order rotated, ORT spinning off) of ORT on the original, ORT on the pruned model, TVM
  untuned on the pruned model, and — with ``--trials N`` — TVM tuned with N MetaSchedule trials
  (records kept in ``--tuning-db``). Every TVM module is checked against ORT on the pruned model
  (atol 1e-4, rtol 1e-3) before it is timed.
* ``reuse``: tunes ``--reuse-model`` with ``--reuse-trials`` trials into a fresh database, then
  builds again from it: the first and second run's wall time and tasks tuned.
* ``latency``: ``--latency-models`` pruned to 0.8 and 0.6 of their measured ORT latency by
  ``--latency-target`` with uniform and with latency-aware (``--allocation latency``) allocation:
  predicted and measured latency (one side-by-side run) and relative output error.
* ``cuda``: every zoo model (models/zoo.py) imported into TVM and built for ``cuda -arch``; the
  generated CUDA C compiled ahead of time by nvcc. Count, and the failures with their op.

Prints one table per part; nothing is hard-coded.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import sys
import tempfile
import time

import _common  # noqa: F401  (sys.path: repo root and models/)
from _common import table

import spa
from spa import verify
from spa.kernels import CompileError, parse_target
from spa.kernels.build import build, check_against_ort
from spa.kernels.runtime import from_built
from spa.kernels.tune import Tuning


def _export(name: str, folder: pathlib.Path) -> pathlib.Path:
    import zoo

    return zoo.export(name, folder / f"{name}.onnx")


def part_resnet50(args, folder: pathlib.Path) -> None:
    original = _export(args.model, folder)
    pruned = folder / f"{args.model}.spa.onnx"
    t0 = time.perf_counter()
    result = spa.prune(original, ratio=args.ratio, benchmark=False)
    result.save(pruned)
    prune_s = time.perf_counter() - t0
    feeds = verify.make_inputs(verify.session(original))
    expected = verify.run(verify.session(pruned), feeds)
    target = parse_target("llvm")
    builds = [("TVM untuned", build(pruned, target, feeds))]
    if args.trials > 0:
        db = pathlib.Path(args.tuning_db) if args.tuning_db else folder / "db"
        builds.append((f"TVM tuned ({args.trials} trials)", build(pruned, target, feeds, tuning=Tuning(db, trials=args.trials))))
    runners, names, notes = [], [], []
    for label, path in (("ORT original", original), ("ORT pruned", pruned)):
        sess = verify.session(path)
        sess.run(None, dict(feeds))
        runners.append(lambda s=sess: s.run(None, dict(feeds)))
        names.append(label)
    for label, b in builds:
        module = from_built(b)
        check = check_against_ort(module.run(None, feeds), expected, module.output_names)
        timer = module.timer(feeds)
        timer()
        runners.append(timer)
        names.append(label)
        tuned = b.tuning or {}
        notes.append(f"{label}: built in {b.compile_s:.1f} s; max |diff| vs ORT pruned {check['max_abs_diff']:.3g}"
                     + (f"; tuning {tuned.get('tune_s', 0):.0f} s, {tuned.get('tasks_tuned')} tasks tuned, {tuned.get('tasks_from_database')} from the database" if tuned else ""))
    m = verify.time_side_by_side(runners, budget_s=args.budget)
    base = m.median_ms[0]
    rows = [[n, f"{med:.2f}", f"{lo:.2f}–{hi:.2f}", f"{base / med:.2f}×"] for n, med, (lo, hi) in zip(names, m.median_ms, m.p10_p90_ms)]
    print(f"\n{args.model}: ratio {args.ratio}, FLOPs {result.report.flops_ratio:.3f} of the original, pruned in {prune_s:.1f} s")
    print(table(["runtime / model", "median ms", "p10–p90", "speedup vs ORT original"], rows))
    for n in notes:
        print("  " + n)


def part_reuse(args, folder: pathlib.Path) -> None:
    model = _export(args.reuse_model, folder)
    feeds = verify.make_inputs(verify.session(model))
    db = folder / "reuse-db"
    target = parse_target("llvm")
    rows = []
    for run in ("first", "second"):
        t0 = time.perf_counter()
        b = build(model, target, feeds, tuning=Tuning(db, trials=args.reuse_trials))
        wall = time.perf_counter() - t0
        t = b.tuning
        rows.append([run, f"{wall:.1f}", f"{t['tune_s']:.1f}", str(t["tasks"]), str(t["tasks_tuned"]), str(t["tasks_from_database"])])
    print(f"\ntuning database reuse: {args.reuse_model}, {args.reuse_trials} trials, search {b.tuning['search']}")
    print(table(["run", "wall s", "tuning s", "tasks", "tuned", "from database"], rows))


def part_cuda(args, folder: pathlib.Path) -> None:
    import zoo

    target = parse_target(f"cuda -arch={args.arch}")
    rows, ok, failed = [], 0, []
    for name in zoo.NAMES:
        try:
            path = _export(name, folder)
        except Exception as e:  # noqa: BLE001 - an export problem is not TVM's
            rows.append([name, "export failed", str(e).splitlines()[0][:60]])
            continue
        feeds = verify.make_inputs(verify.session(path))
        t0 = time.perf_counter()
        try:
            b = build(path, target, feeds)
            c = b.cuda_check or {}
            ok += 1
            rows.append([name, "ok", f"{c.get('kernels')} kernels, fatbin {c.get('fatbin_bytes', 0) // 1024} KiB, {time.perf_counter() - t0:.1f} s"])
        except CompileError as e:
            failed.append(name)
            rows.append([name, "failed", str(e)[:90]])
    print(f"\nCUDA ({args.arch}) compilation of the zoo: {ok}/{len(zoo.NAMES)} built and compiled by nvcc; failed: {', '.join(failed) or 'none'}")
    print(table(["model", "result", "detail"], rows))


def part_latency(args, folder: pathlib.Path) -> None:
    """Latency-aware allocation vs uniform at the same latency targets: predicted and measured
    latency (all pruned models and the original timed side by side in one ORT run) and the
    relative output error against the original on the same inputs."""
    import numpy as np

    for name in args.latency_models.split(","):
        original = _export(name, folder)
        feeds = verify.make_inputs(verify.session(original))
        want = verify.run(verify.session(original), feeds)[0]
        db = folder / f"lat-{name}"
        base = None
        made = []
        for frac in (0.8, 0.6):
            for allocation in ("uniform", "latency"):
                if base is None:  # the first run measures the table; the others read it from db
                    probe = spa.prune(original, ratio=0.0, allocation="latency", benchmark=False, verify="none", tuning_db=str(db), target="onnx")
                    base = probe.report.options["latency_allocation"]["measured_ms_before"]
                out = folder / f"{name}-{allocation}-{frac}.onnx"
                try:
                    r = spa.prune(original, latency_target=base * frac, allocation=allocation, benchmark=False, tuning_db=str(db))
                except spa.errors.SpaError as e:
                    print(f"  {name} {allocation} {frac}: {e}")
                    continue
                r.save(out)
                got = verify.run(verify.session(out), feeds)[0]
                err = float(np.linalg.norm(got - want) / np.linalg.norm(want))
                la = r.report.options["latency_allocation"]
                made.append((f"{allocation} @ {frac:.1f}×", out, f"{la['predicted_ms_after']:.3f} / {la['measured_ms_after']:.3f} ({len(la['rounds'])})", err, r.report.flops_ratio))
        sessions = [verify.session(original)] + [verify.session(m[1]) for m in made]
        for sess in sessions:
            sess.run(None, dict(feeds))
        m = verify.time_side_by_side([lambda s=s: s.run(None, dict(feeds)) for s in sessions], budget_s=args.budget)
        rows = [["original", "", f"{m.median_ms[0]:.3f}", "1.000", "0"]]
        for (label, _, pred, err, flops), med in zip(made, m.median_ms[1:]):
            rows.append([label, pred, f"{med:.3f}", f"{flops:.3f}", f"{err:.4f}"])
        print(f"\nlatency-aware allocation, {name} (ORT; table measured once: base {base:.3f} ms)")
        print(table(["allocation @ target", "search: predicted / measured ms (rounds)", "measured ms, side by side", "FLOPs ratio", "rel. output error"], rows))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="resnet50,reuse,cuda")
    p.add_argument("--model", default="resnet50")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--trials", type=int, default=0)
    p.add_argument("--tuning-db", default=None)
    p.add_argument("--budget", type=float, default=10.0)
    p.add_argument("--reuse-model", default="resnet")
    p.add_argument("--reuse-trials", type=int, default=16)
    p.add_argument("--arch", default="sm_80")
    p.add_argument("--latency-models", default="mobilenetv2,resnet")
    args = p.parse_args()
    folder = pathlib.Path(tempfile.mkdtemp(prefix="spa-target-"))
    try:
        for part in args.parts.split(","):
            {"resnet50": part_resnet50, "reuse": part_reuse, "cuda": part_cuda, "latency": part_latency}[part](args, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
