"""How spa scales: pruning time and peak memory against a plain ONNX load + save.

    python benchmarks/scale.py [--width 4096] [--layers 17] [--skip-resnet50] [--skip-large]

Two models:

(a) the zoo's ResNet-50 (~100 MB of weights inside the .onnx file);
(b) a generated MLP with ≥ 1 GiB of fp32 weights in external data (``--layers`` square
    ``--width`` x ``--width`` layers, alternating ``MatMul`` + ``Add`` and ``Gemm(transB=1)``
    with a ``Relu`` between), written with onnx.helper and streamed to disk one layer at a
    time (no torch). Every hidden width is a prunable channel group for spa.

For each model, every measurement runs in a fresh Python subprocess, with the model's
files read once beforehand so every run finds them in the page cache:

* baseline: ``onnx.load(path)`` + ``onnx.save(model, out, save_as_external_data=<as input>)``;
* spa: ``spa.prune(path, ratio, verify="none", benchmark=False)`` + ``result.save(out)``;
* spa with ``verify="full"`` (reference only: ORT loads both models for the oracle).

Time is measured inside the subprocess around the work (imports excluded; the subprocess's
whole wall time is printed too). Peak RSS is the subprocess's own ``VmHWM`` (the kernel's
high-water mark; not ``ru_maxrss``, which inherits the parent's RSS at fork), with the peak of
anonymous memory (``RssAnon``, polled from /proc every 5 ms) beside it: file-backed pages of a
memory-mapped external data file count in RSS but are reclaimable.

Targets (verify="none"): time ≤ ``--time-target`` x baseline, peak RSS ≤ ``--rss-target`` x the
weights' size; and the generated model must actually get pruned. Exit status 1 if one is
missed.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import _common  # noqa: F401  (sys.path: repo root and models/)
from _common import REPO_ROOT, fmt, mib, table

# ---------------------------------------------------------------------------------------------
# the generated large model
# ---------------------------------------------------------------------------------------------


def build_mlp(path: pathlib.Path, width: int, layers: int, seed: int = 0) -> int:
    """Write the MLP to ``path`` (+ ``path.data``); return the weights' size in bytes.

    Weights are drawn one layer at a time and appended to the data file, so building a
    multi-GB model needs one layer's worth of memory.
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed)
    data_name = path.name + ".data"
    nodes, inits = [], []
    offset = 0
    scale = np.float32(1.0 / np.sqrt(width))

    def external(name: str, arr: np.ndarray, f) -> TensorProto:
        nonlocal offset
        pad = (-offset) % 4096  # page-aligned, like onnx's own writer with alignment on
        if pad:
            f.write(b"\0" * pad)
            offset += pad
        f.write(arr.tobytes())
        t = TensorProto()
        t.name = name
        t.data_type = TensorProto.FLOAT
        t.dims.extend(arr.shape)
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(arr.nbytes))):
            e = t.external_data.add()
            e.key, e.value = k, v
        offset += arr.nbytes
        return t

    total = 0
    x = "x"
    with open(path.parent / data_name, "wb") as f:
        for i in range(layers):
            w = rng.standard_normal((width, width), dtype=np.float32) * scale
            b = rng.standard_normal(width, dtype=np.float32) * np.float32(0.1)
            total += w.nbytes + b.nbytes
            y = f"h{i}" if i < layers - 1 else "y_pre"
            if i % 2 == 0:  # MatMul with W as [in, out], then a bias Add
                inits += [external(f"w{i}", w, f), external(f"b{i}", b, f)]
                nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"mm{i}"], name=f"matmul{i}"))
                nodes.append(helper.make_node("Add", [f"mm{i}", f"b{i}"], [y], name=f"add{i}"))
            else:  # Gemm with W as [out, in]
                inits += [external(f"w{i}", w, f), external(f"b{i}", b, f)]
                nodes.append(helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [y], name=f"gemm{i}", transB=1))
            if i < layers - 1:
                nodes.append(helper.make_node("Relu", [y], [f"r{i}"], name=f"relu{i}"))
                x = f"r{i}"
            del w, b
    nodes.append(helper.make_node("Identity", ["y_pre"], ["y"], name="out"))
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, width])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="spa-bench")
    model.ir_version = 8
    onnx.save(model, str(path))
    return total


def weights_bytes(path: pathlib.Path) -> tuple[int, bool]:
    """(total bytes of the initializers, whether any is stored externally), without loading data."""
    import numpy as np
    import onnx
    from onnx import helper

    model = onnx.load(str(path), load_external_data=False)
    total, ext = 0, False
    for t in model.graph.initializer:
        total += int(np.prod(t.dims, dtype=np.int64)) * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        ext |= t.data_location == onnx.TensorProto.EXTERNAL
    return total, ext


# ---------------------------------------------------------------------------------------------
# the measured subprocess
# ---------------------------------------------------------------------------------------------


def _self_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _rss_kib() -> int:
    return _self_status_kib("VmRSS")


def child(mode: str, src: str, out: str, ratio: float, external: bool) -> None:
    """Runs in the fresh subprocess; prints one JSON line."""
    t_start = time.perf_counter()
    import onnx  # noqa: F401

    if mode == "baseline":
        import onnx

        rss_imports = _rss_kib()
        t0 = time.perf_counter()
        model = onnx.load(src)
        t1 = time.perf_counter()
        if external:
            onnx.save(model, out, save_as_external_data=True, all_tensors_to_one_file=True,
                      location=os.path.basename(out) + ".data")
        else:
            onnx.save(model, out)
        t2 = time.perf_counter()
        res = {"time_s": t2 - t0, "load_s": t1 - t0, "save_s": t2 - t1}
    else:
        import spa

        verify = "full" if mode == "spa-full" else "none"
        rss_imports = _rss_kib()
        t0 = time.perf_counter()
        result = spa.prune(src, ratio=ratio, verify=verify, benchmark=False)
        t1 = time.perf_counter()
        result.save(out)
        t2 = time.perf_counter()
        rep = result.report
        res = {
            "time_s": t2 - t0, "prune_s": t1 - t0, "save_s": t2 - t1, "timings": rep.timings,
            "groups_total": rep.groups_total, "groups_pruned": rep.groups_pruned,
            "flops_ratio": rep.flops_ratio, "params_ratio": rep.params_ratio,
            "oracle_max_diff": (rep.oracle or {}).get("max_abs_diff"),
            "oracle_passed": (rep.oracle or {}).get("passed"),
        }
    res["rss_imports_kib"] = rss_imports
    # VmHWM is the high-water mark of this process image's memory. ru_maxrss is not usable
    # here: Linux carries the parent's RSS at fork() over the exec into the child's maxrss,
    # so a child of a parent that had torch loaded "peaks" at the parent's size.
    res["hwm_kib"] = _self_status_kib("VmHWM")
    res["ru_maxrss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    res["process_s"] = time.perf_counter() - t_start
    print("RESULT " + json.dumps(res), flush=True)


def _status_kib(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "RssAnon", "RssFile"):
                    out[k] = int(v.split()[0])
    except OSError:
        pass
    return out


def warm_cache(path: pathlib.Path) -> None:
    for p in [path, *path.parent.glob(path.name + ".data")]:
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass


def measure(mode: str, src: pathlib.Path, out_dir: pathlib.Path, ratio: float, external: bool,
            timeout: float) -> dict:
    """Run one measurement in a fresh subprocess, polling its memory; return its JSON + peaks."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    out = out_dir / "model.onnx"
    warm_cache(src)
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--child", mode, str(src), str(out),
           str(ratio), "1" if external else "0"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
    while proc.poll() is None:
        for k, v in _status_kib(proc.pid).items():
            peak[k] = max(peak[k], v)
        if time.perf_counter() - t0 > timeout:
            proc.kill()
            break
        time.sleep(0.005)
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    lines = [l for l in stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"{mode} on {src.name} failed (exit {proc.returncode}):\n{tail}")
    res = json.loads(lines[-1][len("RESULT "):])
    res["wall_s"] = wall
    res["peak_rss_bytes"] = max(res["hwm_kib"], peak["VmRSS"]) * 1024
    res["peak_anon_bytes"] = peak["RssAnon"] * 1024
    res["peak_file_bytes"] = peak["RssFile"] * 1024
    res["out_bytes"] = sum(p.stat().st_size for p in out_dir.iterdir())
    shutil.rmtree(out_dir, ignore_errors=True)
    return res


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def bench_model(name: str, path: pathlib.Path, work: pathlib.Path, args, expect_pruned: bool) -> tuple[list, list, dict]:
    wbytes, external = weights_bytes(path)
    print(f"\n== {name}: {mib(wbytes)} of weights, {'external data' if external else 'inline'}")
    runs: dict[str, dict] = {}
    modes = ["baseline", "spa"] + ([] if args.no_full else ["spa-full"])
    for mode in modes:
        best, peaks = None, {}
        for _ in range(args.repeat):
            r = measure(mode, path, work / f"out-{mode}", args.ratio, external, args.timeout)
            best = r if best is None or r["time_s"] < best["time_s"] else best
            for k in ("peak_rss_bytes", "peak_anon_bytes", "peak_file_bytes"):
                peaks[k] = max(peaks.get(k, 0), r[k])
        best = {**best, **peaks}  # the fastest run's times, the worst run's memory
        runs[mode] = best
        extra = ""
        if mode != "baseline":
            extra = (f" prune {best['prune_s']:.2f}s + save {best['save_s']:.2f}s;"
                     f" groups {best['groups_pruned']}/{best['groups_total']} pruned,"
                     f" FLOPs ratio {best['flops_ratio']:.3f}; stages {json.dumps(best['timings'])}")
        else:
            extra = f" load {best['load_s']:.2f}s + save {best['save_s']:.2f}s"
        print(f"  {mode}: {best['time_s']:.2f}s ({extra.strip()})")

    base = runs["baseline"]["time_s"]
    rows = []
    for mode, r in runs.items():
        rows.append([
            f"{name} {mode}", mib(wbytes), f"{base:.2f}", f"{r['time_s']:.2f}", f"{r['time_s'] / base:.2f}x",
            f"{r['wall_s']:.1f}", mib(r["peak_rss_bytes"]), f"{r['peak_rss_bytes'] / wbytes:.2f}x",
            mib(r["peak_anon_bytes"]), mib(r["rss_imports_kib"] * 1024),
            f"{(r['peak_rss_bytes'] - r['rss_imports_kib'] * 1024) / wbytes:.2f}x",
        ])
    s = runs["spa"]
    checks = [
        (f"{name}: spa time {s['time_s']:.2f}s <= {args.time_target}x baseline {base:.2f}s "
         f"(ratio {s['time_s'] / base:.2f})", s["time_s"] <= args.time_target * base),
        (f"{name}: spa peak RSS {mib(s['peak_rss_bytes'])} <= {args.rss_target}x weights {mib(wbytes)} "
         f"(ratio {s['peak_rss_bytes'] / wbytes:.2f}; onnx load+save alone: "
         f"{runs['baseline']['peak_rss_bytes'] / wbytes:.2f}; spa's imports alone: "
         f"{s['rss_imports_kib'] * 1024 / wbytes:.2f})", s["peak_rss_bytes"] <= args.rss_target * wbytes),
    ]
    if expect_pruned:
        checks.append((f"{name}: spa pruned {s['groups_pruned']}/{s['groups_total']} groups "
                       f"(FLOPs ratio {s['flops_ratio']:.3f})", s["groups_pruned"] > 0 and s["flops_ratio"] < 0.9))
    if "spa-full" in runs:
        checks.append((f"{name}: spa verify=full oracle passed (max diff {fmt(runs['spa-full']['oracle_max_diff'], '.2e')})",
                       bool(runs["spa-full"]["oracle_passed"])))
    return rows, checks, {"weights_bytes": wbytes, "runs": runs}


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        mode, src, out, ratio, ext = sys.argv[2:7]
        child(mode, src, out, float(ratio), ext == "1")
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--width", type=int, default=4096, help="generated model: layer width")
    ap.add_argument("--layers", type=int, default=17, help="generated model: number of layers")
    ap.add_argument("--min-gib", type=float, default=1.0, help="refuse a generated model smaller than this")
    ap.add_argument("--skip-resnet50", action="store_true")
    ap.add_argument("--skip-large", action="store_true")
    ap.add_argument("--no-full", action="store_true", help="skip the verify=full reference runs")
    ap.add_argument("--repeat", type=int, default=2,
                    help="runs per measurement: the fastest time and the highest peak memory are kept")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per subprocess")
    ap.add_argument("--time-target", type=float, default=2.0)
    ap.add_argument("--rss-target", type=float, default=1.5)
    ap.add_argument("--json", type=pathlib.Path, help="also write the results here")
    args = ap.parse_args(argv)

    work = pathlib.Path(tempfile.mkdtemp(prefix="spa-bench-scale-", dir="/tmp"))
    rows, checks, results = [], [], {}
    try:
        if not args.skip_resnet50:
            import zoo

            src = zoo.export("resnet50", work / "resnet50.onnx")
            r, c, results["resnet50"] = bench_model("resnet50", src, work, args, expect_pruned=True)
            rows += r
            checks += c
        if not args.skip_large:
            src = work / "mlp" / "mlp.onnx"
            src.parent.mkdir()
            t0 = time.perf_counter()
            total = build_mlp(src, args.width, args.layers)
            print(f"\ngenerated MLP {args.layers} x [{args.width}x{args.width}] in {time.perf_counter() - t0:.1f}s: {mib(total)}")
            if total < args.min_gib * 2**30:
                print(f"note: {mib(total)} is below --min-gib {args.min_gib}", file=sys.stderr)
            name = f"mlp{args.layers}x{args.width}"
            r, c, results[name] = bench_model(name, src, work, args, expect_pruned=True)
            rows += r
            checks += c
        print()
        print(table(
            ["model / run", "weights", "load+save s", "time s", "time ratio", "process s",
             "peak RSS", "RSS ratio", "peak anon", "RSS at start", "net RSS ratio"],
            rows,
            title=f"spa scaling, ratio {args.ratio}; time = work inside a fresh subprocess (imports excluded); "
                  "RSS ratio = peak RSS / weights; net = (peak - RSS after imports) / weights",
        ))
        print()
        failed = 0
        for text, ok in checks:
            print(f"{'PASS' if ok else 'MISS'}  {text}")
            failed += not ok
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
        if failed:
            print(f"\n{failed} target(s) missed", file=sys.stderr)
            return 1
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
