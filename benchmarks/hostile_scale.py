"""Analysis time and peak memory against node count: Identity chains of 1k / 10k / 100k nodes.

    python benchmarks/hostile_scale.py [--sizes 1000 10000 100000] [--timeout 900] [--mlp-gib 0]

Each chain is ``x -> Conv -> Relu -> Identity x N -> Conv -> y`` (the corpus model of
tests/test_hostile.py with N Identity nodes in the middle). Each measurement runs in a fresh
subprocess:

* ``checks``: spa's load-time checks alone (``spa.io.load_model``: protobuf parse, external
  data, tensors, structure, node schemas, shape inference for the memory ceiling);
* ``analysis``: ``spa.pipeline.analyze`` (load → canonicalize → analyze: what ``spa inspect``
  and the first three steps of ``spa prune`` do), with its per-step timings.

Time is measured around the call (imports excluded), as wall-clock and as the process's CPU
time (``time.process_time``: on a shared machine the wall-clock time also counts the other jobs'
turns, the CPU time much less); peak RSS is the subprocess's ``VmHWM``. The last columns are CPU
time per node, so linear scaling shows as a flat column.

With ``--mlp-gib G`` (> 0) it also builds, with ``benchmarks/scale.py``'s generator, an MLP
whose external-data weights total about G GiB, and times the same two measurements on it.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import _common  # noqa: F401  (sys.path: repo root and models/)
from _common import REPO_ROOT, fmt, table


def build_chain(path: pathlib.Path, n: int) -> None:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "W1"),
        numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "B1"),
        numpy_helper.from_array(rng.standard_normal((4, 8, 1, 1)).astype(np.float32), "W2"),
    ]
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["id0"], name="relu1")]
    nodes += [helper.make_node("Identity", [f"id{i}"], [f"id{i + 1}"], name=f"id{i + 1}") for i in range(n)]
    nodes.append(helper.make_node("Conv", [f"id{n}", "W2"], ["y"], name="conv2"))
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)


def _hwm_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def child(mode: str, src: str) -> None:
    import spa
    from spa import io
    from spa.report import Timer

    t0, c0 = time.perf_counter(), time.process_time()
    timings: dict = {}
    if mode == "checks":
        io.load_model(src)
    else:
        timer = Timer()
        spa.pipeline.analyze(src, timer=timer)
        timings = dict(timer.timings)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    print("RESULT " + json.dumps({"time_s": elapsed, "cpu_s": cpu, "hwm_kib": _hwm_kib(), "timings": timings}), flush=True)


def _wall_cpu(res: dict) -> str:
    if "error" in res:
        return res["error"]
    return f"{res['time_s']:.2f} ({res['cpu_s']:.2f})"


def measure(mode: str, src: pathlib.Path, timeout: float) -> dict:
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--child", mode, str(src)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1][:120]}
    return json.loads(lines[-1][len("RESULT "):])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per subprocess")
    ap.add_argument("--mlp-gib", type=float, default=0.0, help="also an external-data MLP of about this many GiB")
    ap.add_argument("--json", type=pathlib.Path, help="also write the results here")
    args = ap.parse_args(argv)

    work = pathlib.Path(tempfile.mkdtemp(prefix="spa-hostile-scale-"))
    rows, results = [], []
    try:
        models = []
        for n in args.sizes:
            path = work / f"chain{n}" / "model.onnx"
            path.parent.mkdir()
            build_chain(path, n)
            models.append((f"chain {n:,}", n + 3, path))
        if args.mlp_gib > 0:
            from scale import build_mlp

            width, layers = 4096, max(1, round(args.mlp_gib * 2**30 / (4096 * 4096 * 4)))
            path = work / "mlp" / "model.onnx"
            path.parent.mkdir()
            wbytes = build_mlp(path, width, layers)
            models.append((f"MLP {wbytes / 2**30:.2f} GiB ext.", 2 * layers + layers // 2, path))
        for name, nodes, path in models:
            res = {"model": name, "nodes": nodes}
            for mode in ("checks", "analysis"):
                res[mode] = measure(mode, path, args.timeout)
            results.append(res)
            c, a = res["checks"], res["analysis"]
            t = a.get("timings", {})
            rows.append([
                name, f"{nodes:,}",
                _wall_cpu(c),
                fmt(c.get("hwm_kib", 0) / 1024, ".0f") if "error" not in c else "",
                _wall_cpu(a),
                " / ".join(fmt(t.get(k), ".1f") for k in ("load", "canonicalize", "analyze")) if t else "",
                fmt(a.get("hwm_kib", 0) / 1024, ".0f") if "error" not in a else "",
                fmt(1e6 * c["cpu_s"] / nodes, ".0f") if "cpu_s" in c else "",
                fmt(1e6 * a["cpu_s"] / nodes, ".0f") if "cpu_s" in a else "",
            ])
            print(f"{name}: {json.dumps(res)}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(table(["model", "nodes", "checks s (CPU)", "checks peak MiB", "analysis s (CPU)", "load / canon. / analyze s",
                 "analysis peak MiB", "checks CPU µs/node", "analysis CPU µs/node"], rows,
                title="spa load-time checks and analysis against node count (fresh process each)"))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3])
    else:
        sys.exit(main())
