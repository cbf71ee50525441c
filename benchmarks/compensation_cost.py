"""What compensation costs: time on ResNet-50, and calibration time/memory against the sample count.

    python benchmarks/compensation_cost.py [--repeats 2] [--samples 16,32,64,128] [--sequential-samples 64]
                                           [--skip-resnet50] [--skip-calibration]

1. ResNet-50 (the zoo's, random BatchNorm statistics) exported twice — with its
   BatchNormalization nodes kept (TrainingMode.PRESERVE: the data-free BatchNorm proxy) and
   folded into the convs (the usual export: the synthetic-input fallback) — pruned at ratio 0.5
   without and with ``--compensate data-free``, side by side in one process (after a
   warm-up run, the order rotated each repeat), ``benchmark=False``. Prints the median wall
   time of each and the ratio.
2. ``--compensate calibration`` on the zoo ResNet (CIFAR size) with N random calibration
   samples, each N in its own process: wall time and peak RSS (``ru_maxrss``) of the process.
   Time should grow linearly with N, memory should not grow.
3. The sequential refit with the original's activations cached once (``OriginalCache``) vs
   the original re-run at every level (the implementation before the cache), side by side.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import _common  # noqa: F401  (sys.path)

import numpy as np


def _export(name: str, path: pathlib.Path, keep_bn: bool) -> pathlib.Path:
    import torch
    import zoo

    model, shape = zoo.build(name)
    model.eval()
    x = torch.randn(*shape)
    mode = torch.onnx.TrainingMode.PRESERVE if keep_bn else torch.onnx.TrainingMode.EVAL
    torch.onnx.export(model, (x,), str(path), input_names=["input"], output_names=["output"], opset_version=17,
                      training=mode, do_constant_folding=not keep_bn, dynamo=False)
    return path


def _prune_time(path: pathlib.Path, compensate: str) -> tuple[float, dict]:
    import spa

    t0 = time.perf_counter()
    r = spa.prune(str(path), ratio=0.5, compensate=compensate, benchmark=False)
    wall = time.perf_counter() - t0
    return wall, r.report.options.get("statistics") or {}


def resnet50(repeats: int) -> None:
    import onnx

    d = pathlib.Path(tempfile.mkdtemp(prefix="spa-comp-"))
    for keep_bn in (True, False):
        path = _export("resnet50", d / f"r50-bn{int(keep_bn)}.onnx", keep_bn)
        bn = sum(n.op_type == "BatchNormalization" for n in onnx.load(str(path), load_external_data=False).graph.node)
        times: dict[str, list[float]] = {"none": [], "data-free": []}
        sources = {}
        _prune_time(path, "none")  # warm-up: imports, ORT's first session
        for k in range(repeats):
            for comp in (("none", "data-free") if k % 2 == 0 else ("data-free", "none")):  # order rotated
                wall, stats = _prune_time(path, comp)
                times[comp].append(wall)
                sources = stats.get("by_source", sources) if comp == "data-free" else sources
        a, b = statistics.median(times["none"]), statistics.median(times["data-free"])
        label = "BatchNorm kept" if keep_bn else "BatchNorm folded"
        print(f"ResNet-50, {label} ({bn} BN nodes): prune {a:.1f} s, with data-free {b:.1f} s → {b / a:.2f}× "
              f"(statistics by source: {sources})", flush=True)


def _calibration_child(n: int) -> None:
    import resource

    import spa
    import zoo

    d = pathlib.Path(tempfile.mkdtemp(prefix="spa-cal-"))
    path = zoo.export("resnet", d / "resnet.onnx")
    rng = np.random.default_rng(0)
    feeds = ({"input": rng.standard_normal((1, 3, 32, 32)).astype(np.float32)} for _ in range(n))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    r = spa.prune(str(path), ratio=0.5, compensate="calibration", calibration=list(feeds), calibration_samples=n, benchmark=False)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"n": n, "wall_s": wall, "compensate_s": r.report.timings.get("compensate"), "peak_rss_mib": peak / 1024,
                      "rss_before_mib": before / 1024}))


def calibration(samples: list[int]) -> None:
    rows = []
    for n in samples:
        out = subprocess.run([sys.executable, __file__, "--child", str(n)], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print("\ncalibration on the zoo ResNet (CIFAR size), ratio 0.5, one process per N:")
    print(_common.table(["samples", "wall s", "compensate s", "compensate s / sample", "peak RSS MiB"],
                        [[r["n"], f"{r['wall_s']:.1f}", f"{r['compensate_s']:.2f}", f"{r['compensate_s'] / r['n']:.3f}", f"{r['peak_rss_mib']:.0f}"] for r in rows]))


class _RerunOriginal:
    """The sequential refit before the cache: every level runs the original again
    (``collect_pairs``), with the same interface as ``OriginalCache``."""

    def __init__(self, original, levels, feeds, directory, *, seed=0):
        self.original, self.levels, self.seed = original, levels, seed

    def pairs(self, k, current, feeds, *, path):
        from spa.analysis.moments import collect_pairs

        return collect_pairs(self.original, current, self.levels[k], feeds, path=path, seed=self.seed)

    def close(self):
        pass


def sequential(samples: int, repeats: int) -> None:
    """The level-by-level refit with the original cached once vs re-run at every level,
    side by side (order rotated), on the zoo ResNet (CIFAR size) and the same feeds."""
    import spa
    import spa.passes.compensate as comp
    import zoo

    d = pathlib.Path(tempfile.mkdtemp(prefix="spa-seq-"))
    path = zoo.export("resnet", d / "resnet.onnx")
    rng = np.random.default_rng(0)
    feeds = [{"input": rng.standard_normal((1, 3, 32, 32)).astype(np.float32)} for _ in range(samples)]
    cached = comp.OriginalCache
    times: dict[str, list[float]] = {"cached": [], "rerun": []}
    errors: dict[str, float] = {}
    levels = None
    for k in range(repeats):
        for variant in (("cached", "rerun") if k % 2 == 0 else ("rerun", "cached")):
            comp.OriginalCache = cached if variant == "cached" else _RerunOriginal
            try:
                r = spa.prune(str(path), ratio=0.5, compensate="calibration", calibration=feeds, calibration_samples=samples, benchmark=False)
            finally:
                comp.OriginalCache = cached
            times[variant].append(r.report.timings["compensate"])
            errors[variant] = r.report.compensation["measured"]["calibration"]["error_after"]
            levels = r.report.options.get("compensation_levels")
    a, b = statistics.median(times["rerun"]), statistics.median(times["cached"])
    print(f"\nsequential refit, zoo ResNet, {samples} samples, {levels} levels (compensate step, median of {repeats}): "
          f"original re-run per level {a:.2f} s, cached once {b:.2f} s → {a / b:.2f}× faster; "
          f"output error after {errors['rerun']:.6g} vs {errors['cached']:.6g}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--samples", default="16,32,64,128")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--skip-resnet50", action="store_true")
    ap.add_argument("--skip-calibration", action="store_true")
    ap.add_argument("--sequential-samples", type=int, default=64)
    args = ap.parse_args()
    if args.child is not None:
        _calibration_child(args.child)
        return
    if not args.skip_resnet50:
        resnet50(args.repeats)
    if not args.skip_calibration:
        calibration([int(s) for s in args.samples.split(",")])
    sequential(args.sequential_samples, max(args.repeats, 2))


if __name__ == "__main__":
    main()
