"""The second peer of the coverage table: onnxsim's ONNX-native structured pruning.

Runs ``onnxsim.apply_structured_pruning_cpp(model, sparsity=ratio)`` (onnxsim >= 0.8) on every
model ``coverage.py`` exported, each in its own subprocess with a timeout, and records:
``valid`` (loads in ONNX Runtime, runs, same output shapes), ``broken`` (it does not), ``crashed``
(an exception while pruning) or ``hung``; plus its MACs ratio (spa's CostModel on both files).

    python benchmarks/coverage.py --out cov.json
    python benchmarks/onnxsim_peer.py cov.json --out onnxsim.json
    python benchmarks/coverage_markdown.py cov.json real.json onnxsim.json > docs/coverage.md
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parent.parent


def _macs(path: str) -> int:
    sys.path.insert(0, str(REPO))
    import spa

    return spa.analyze(path).cost.count().macs


def worker(src: str, out: str, ratio: float) -> dict:
    import numpy as np
    import onnx
    import onnxruntime as ort
    import onnxsim

    try:
        model = onnxsim.apply_structured_pruning_cpp(src, sparsity=ratio, importance_norm="l1")
        onnx.save(model, out)
    except Exception as e:  # noqa: BLE001 - a peer's crash is a result
        return {"status": "crashed", "detail": f"{type(e).__name__}: {str(e)[:200]}"}
    try:
        shapes = []
        for path in (src, out):
            sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            feeds = {}
            for i in sess.get_inputs():
                shape = [d if isinstance(d, int) else 1 for d in i.shape]
                feeds[i.name] = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
            shapes.append([list(o.shape) for o in sess.run(None, feeds)])
        if shapes[0] != shapes[1]:
            return {"status": "broken", "detail": f"output shapes {shapes[0]} -> {shapes[1]}"}
    except Exception as e:  # noqa: BLE001
        return {"status": "broken", "detail": f"{type(e).__name__}: {str(e)[:200]}"}
    before, after = _macs(src), _macs(out)
    return {"status": "valid", "macs_ratio": after / before if before else 1.0}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("coverage_json", type=pathlib.Path)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--timeout", type=float, default=120)
    ap.add_argument("--out", type=pathlib.Path, required=True)
    ap.add_argument("--models-dir", default="/tmp/coverage_models")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.ratio)))
        return 0
    rows = json.loads(args.coverage_json.read_text())["rows"]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in rows:
            src = pathlib.Path(args.models_dir) / f"{r['model']}.onnx"
            out = pathlib.Path(tmp) / f"{r['model']}.onnxsim.onnx"
            cmd = [sys.executable, __file__, str(args.coverage_json), "--ratio", str(args.ratio), "--out", "-", "--worker", str(src), str(out)]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                line = (proc.stdout.strip().splitlines() or [""])[-1]
                results[r["model"]] = json.loads(line) if line.startswith("{") else {"status": "crashed", "detail": proc.stderr[-200:]}
            except subprocess.TimeoutExpired:
                results[r["model"]] = {"status": "hung"}
            out.unlink(missing_ok=True)
            print(f"{r['model']}: {results[r['model']]}", flush=True)
    counts: dict[str, int] = {}
    for v in results.values():
        counts[v["status"]] = counts.get(v["status"], 0) + 1
    args.out.write_text(json.dumps({"ratio": args.ratio, "summary": counts, "rows": results}, indent=1))
    print("onnxsim:", counts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
