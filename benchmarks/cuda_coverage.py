"""CUDA compilation of the coverage zoo: every model of benchmarks/coverage.py, pruned by spa
and built for ``cuda -arch`` through spa's own ``--target`` path, without a GPU.

    python -u benchmarks/cuda_coverage.py --out DIR [--only a,b,c] [--jobs 1] [--arch sm_80]
                                          [--ratio 0.5] [--timeout 900] [--export-timeout 300]
                                          [--models-dir DIR/models] [--redo-failed] [--report-only] [--diagnose]

The model list (``coverage.ZOO``), the export (``coverage.worker_torch``: timm model with random
weights made to look trained, ``torch.onnx.export`` at opset 17, cached with its
``.export.json``) and the subprocess runner with a time limit (``coverage._run``, which kills
the worker's whole process group) are imported from benchmarks/coverage.py, not copied.

For each model, two subprocesses:

1. **export** (``--export-timeout``; skipped when the cached export is still valid).
2. **cuda** (``--timeout``): ``spa.prune(onnx, ratio=R, benchmark=False, target="cuda -arch=A")``,
   the same call ``spa prune model.onnx --ratio R --target "cuda -arch=A"`` makes: prune (the
   mask-equivalence oracle runs), then the pipeline's compile step (``spa.passes.emit.compile_step``
   → ``spa.kernels.emit.compile_onnx``): import into TVM's Relax ONNX frontend at static shapes,
   build with the default GPU schedules (dlight), export the library, and compile the generated
   CUDA C ahead of time with nvcc to a fatbin for the architecture. No GPU is needed (nor used:
   the module is not run here). Kept widths are rounded to 8 (the cuda target's default).

Result per model: ``built`` (nvcc compiled the kernels: kernel count and fatbin size),
``TVM can't import`` (the op), ``TVM build failed`` / ``nvcc failed`` (first line of the
error), ``spa error`` (an exception that is not a one-line ``SpaError``: a traceback, a spa bug
to report), ``prune refused`` (a ``SpaError`` before compiling), ``export failed`` (torch could
not export: left out of the count, as in coverage.py), ``timeout``, ``crashed``.

Results are cached in ``DIR/results.json`` after every model; a rerun skips the models already
there (``--redo-failed`` runs the ones that did not build again). Prints a markdown table and a
summary count; the table is also written to ``DIR/results.md``.

``--diagnose`` (after the run, for each ``TVM build failed`` or ``TVM can't import`` row not yet
diagnosed): an import failure is imported again with ``spa.inputs.FOLD_ROUNDS`` raised to
``DIAGNOSE_FOLD_ROUNDS`` (does folding shape arithmetic further make the pads/shapes constant?);
then which TIR functions TVM's default GPU schedules (dlight) raise on, and whether the model
compiles when only those functions get ``dlight.gpu.Fallback`` (a patch of dlight's rule loop in
the worker). It says what a fix in spa's build would buy; that module is neither spa's output
nor run, and the figures are not counted as built.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import importlib.util
import json
import os
import pathlib
import re
import sys
import threading
import time
import traceback
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))  # coverage.py imports _common from benchmarks/


def _coverage():
    """benchmarks/coverage.py as a module (by path: PyPI's ``coverage`` package may already
    own the name ``coverage`` in this interpreter, e.g. under pytest-cov)."""
    name = "spa_benchmarks_coverage"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, HERE / "coverage.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


#: Result statuses, and which summary bucket each belongs to.
BUILT = "built"
IMPORT = "TVM can't import"
BUCKET = {
    BUILT: "built",
    IMPORT: "TVM can't import",
    "TVM build failed": "other failure",
    "nvcc failed": "other failure",
    "not compiled": "other failure",
    "spa error": "other failure",
    "prune refused": "other failure",
    "timeout": "other failure",
    "crashed": "other failure",
    "export failed": "export failed",
}
CACHE_VERSION = 1
#: ``--diagnose`` of an import failure: shape folding rounds of ``spa.inputs.specialize``
#: (spa's FOLD_ROUNDS is 2) — whether folding to a fixpoint would make the model importable.
DIAGNOSE_FOLD_ROUNDS = 10


# ====================================================================================
# Workers (subprocesses; each writes one JSON file)
# ====================================================================================


def _write(path: str | os.PathLike, obj: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


def worker_export(args) -> int:
    """coverage.py's torch worker, without Torch-Pruning: <onnx> and <onnx>.export.json."""
    cov = _coverage()
    entry = cov.BY_NAME[args.model]
    ns = argparse.Namespace(model=entry.name, onnx=args.onnx, size=entry.size, threads=args.threads,
                            reexport=False, no_tp=True, ratio=args.ratio)
    return cov.worker_torch(ns)


def _op_named(message: str, ops: set[str]) -> str | None:
    """The ONNX op type a TVM message names (the first of the model's op types that appears
    in it as a word), if any."""
    m = re.search(r"no converter for ([\w, ]+)", message)
    if m:
        return m.group(1).strip()
    for flags in (0, re.IGNORECASE):  # "Pad" as written, else "Dynamic pads are not supported"
        hits = [(m.start(), op) for op in ops if (m := re.search(rf"\b{re.escape(op)}s?\b", message, flags))]
        if hits:
            return min(hits)[1]
    return None


def _model_ops(onnx_path: str | os.PathLike) -> set[str]:
    import onnx

    return {n.op_type for n in onnx.load(str(onnx_path), load_external_data=False).graph.node}


def fill_op(row: dict[str, Any], models_dir: str | os.PathLike) -> None:
    """Name the op of a cached import failure that has none (rows made before the op was
    looked for case-insensitively), from the exported model's op types."""
    if row.get("status") != IMPORT or row.get("op"):
        return
    path = pathlib.Path(models_dir) / f"{row['model']}.onnx"
    if path.exists():
        row["op"] = _op_named(str(row.get("detail", "")), _model_ops(path))


def classify_target_error(message: str) -> str:
    """Status of a compile failure from spa's one-line ``CompileError`` message."""
    if message.startswith(("TVM's ONNX importer has no converter", "TVM cannot import")):
        return IMPORT
    if message.startswith("nvcc cannot compile"):
        return "nvcc failed"
    return "TVM build failed"


def worker_cuda(args) -> int:
    """spa.prune(…, target="cuda -arch=…") on the exported model: the --target cuda path."""
    import logging

    logging.disable(logging.WARNING)
    res: dict[str, Any] = {"status": "crashed"}
    t0 = time.perf_counter()
    try:
        import spa

        ops = _model_ops(args.onnx)
        result = spa.prune(args.onnx, ratio=args.ratio, benchmark=False, target=f"cuda -arch={args.arch}")
    except Exception as e:  # noqa: BLE001
        wall = time.perf_counter() - t0
        import spa

        tb = traceback.format_exc()
        if isinstance(e, spa.SpaError):
            res |= {"status": "prune refused", "detail": f"{type(e).__name__}: {e}"}
        else:
            # Not a one-line refusal: where it was raised, for the report.
            frames = [ln.strip() for ln in tb.splitlines() if ln.strip().startswith("File ")]
            res |= {"status": "spa error", "detail": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:500],
                    "raised_at": frames[-1] if frames else None, "traceback_tail": tb[-3000:]}
        res["wall_s"] = round(wall, 2)
        _write(args.result, res)
        return 0
    wall = time.perf_counter() - t0
    rep = result.report
    tgt = rep.target or {}
    res |= {"wall_s": round(wall, 2), "timings": {k: round(v, 3) for k, v in rep.timings.items()},
            "macs_ratio": rep.macs_after / rep.macs_before if rep.macs_before else None,
            "groups_pruned": rep.groups_pruned, "groups_total": rep.groups_total,
            "compile_s": tgt.get("compile_s"), "target_notes": tgt.get("notes")}
    if tgt.get("error"):
        msg = str(tgt["error"])
        res |= {"status": classify_target_error(msg), "detail": msg, "op": _op_named(msg, ops)}
    else:
        check = tgt.get("cuda_check") or {}
        if check.get("compiled"):
            res |= {"status": BUILT, "kernels": check.get("kernels"), "fatbin_bytes": check.get("fatbin_bytes"),
                    "nvcc_s": check.get("nvcc_s"), "arch": check.get("arch"),
                    "library_bytes": len(result.module.library) if result.module is not None else None,
                    "detail": tgt.get("run")}
        else:
            res |= {"status": "not compiled", "detail": str(check.get("why") or "no cuda_check in the report")}
    _write(args.result, res)
    return 0


def _describe_primfunc(func) -> str:
    """A TIR function in one line: its blocks and their loop extents (from its script)."""
    text = func.script()
    grids = re.findall(r"in T\.grid\((.*)\):", text)
    blocks = [b for b in re.findall(r'T\.sblock\("([^"]+)"\)', text) if b != "root"]
    ext = ["x".join(re.findall(r"T\.int64\((\d+)\)", g)) for g in grids]
    return ", ".join(f"{b} [{e}]" for b, e in zip(blocks, ext)) or text[:200]


def worker_diagnose(args) -> int:
    """For a model whose CUDA build failed: which TIR functions TVM's default GPU schedules
    (dlight) fail on, and whether the build compiles with ``dlight.gpu.Fallback`` for just those
    functions. Prunes as the cuda worker does (kept widths rounded to 8, the cuda target's
    default), then builds outside spa's compile path, patching dlight's rule loop; nothing in
    spa is changed. A diagnosis, not a result: the fallback module is not numerically checked."""
    import logging

    logging.disable(logging.WARNING)
    res: dict[str, Any] = {}
    try:
        import tvm
        from tvm.s_tir import dlight
        from tvm.s_tir.dlight.base import transform as dl

        import spa
        from spa.inputs import make_feeds, resolve_input_shapes
        from spa.kernels import parse_target
        from spa.kernels.build import Built, check_cuda_source, import_onnx
        from spa.kernels.errors import first_line
        from spa.kernels.target import vector_width

        if args.fold_rounds:
            import spa.inputs

            res["fold_rounds"] = spa.inputs.FOLD_ROUNDS = args.fold_rounds  # import_onnx → specialize reads it
        target = parse_target(f"cuda -arch={args.arch}")
        result = spa.prune(args.onnx, ratio=args.ratio, benchmark=False, verify="none", round_to=vector_width(target))
        feeds = make_feeds(result.model, resolve_input_shapes(result.model, {}), 0)
        try:
            mod, signature = import_onnx(result.model, feeds)
        except Exception as e:  # noqa: BLE001
            res["imports"] = False
            raise
        res["imports"] = True
        failing: list[dict[str, str]] = []
        apply_rules = dl._apply_rules

        def patched(func, tgt, rules, tunable):
            try:
                return apply_rules(func, tgt, rules, tunable)
            except Exception as e:  # noqa: BLE001 - what this worker is here to see
                line = first_line(e) if str(e).strip() else ""
                why = line if line.startswith(type(e).__name__) else type(e).__name__ + (f": {line}" if line else "")
                failing.append({"function": _describe_primfunc(func), "error": why})
                return apply_rules(func, tgt, [dlight.gpu.Fallback()], tunable)

        dl._apply_rules = patched
        t0 = time.perf_counter()
        executable = tvm.compile(mod, target=target.tvm())
        check = check_cuda_source(Built(executable, signature, target, time.perf_counter() - t0))
        res |= {"dlight_failures": failing, "fallback_compiled": bool(check.get("compiled")), "fallback_kernels": check.get("kernels"),
                "fallback_fatbin_bytes": check.get("fatbin_bytes")}
    except Exception as e:  # noqa: BLE001
        res |= {"diagnose_error": f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"}
    _write(args.result, res)
    return 0


# ====================================================================================
# Cache
# ====================================================================================


def cache_key(args) -> dict[str, Any]:
    """What a cached row depends on: a row made with other settings is not reused."""
    return {"version": CACHE_VERSION, "arch": args.arch, "ratio": args.ratio}


def load_cache(path: pathlib.Path, key: dict[str, Any]) -> dict[str, dict]:
    """The cached rows made with ``key`` (empty when there is no cache, it is unreadable, or it
    was made with other settings)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("key") != key or not isinstance(data.get("rows"), dict):
        return {}
    return data["rows"]


def save_cache(path: pathlib.Path, key: dict[str, Any], rows: dict[str, dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _write(path, {"key": key, "rows": rows})


def to_run(names: list[str], cached: dict[str, dict], redo_failed: bool) -> list[str]:
    """The models a run still has to do: those not cached (and, with ``redo_failed``, the
    cached ones that did not build; an export failure is torch's and stays)."""
    out = []
    for n in names:
        row = cached.get(n)
        if row is None or (redo_failed and row.get("status") not in (BUILT, "export failed")):
            out.append(n)
    return out


# ====================================================================================
# Driver
# ====================================================================================


def run_model(entry, args) -> dict[str, Any]:
    cov = _coverage()
    d = pathlib.Path(args.models_dir)
    onnx_path = d / f"{entry.name}.onnx"
    me = [sys.executable, "-u", str(pathlib.Path(__file__).resolve())]
    common = ["--model", entry.name, "--onnx", str(onnx_path), "--ratio", str(args.ratio), "--threads", str(args.threads)]
    row: dict[str, Any] = {"model": entry.name, "family": entry.family, "size": entry.size}
    t_model = time.perf_counter()
    # 1. export (coverage.py's worker; its cached export reused when still valid)
    want = {"size": entry.size, "kwargs": dict(entry.kwargs), "opset": cov.OPSET, "weights": cov.WEIGHTS}
    t0 = time.perf_counter()
    if onnx_path.exists() and cov._cached_ok(f"{onnx_path}.export.json", want):
        rc, err = 0, ""
        row["export_cached"] = True
    else:
        rc, err = cov._run(me + ["--worker", "export", *common], args.export_timeout)
    row["export_s"] = round(time.perf_counter() - t0, 2)
    exp = cov._read(f"{onnx_path}.export.json")
    if rc is None:
        exp = {"ok": False, "error": f"export timeout after {args.export_timeout:.0f} s"}
    elif exp is None:
        exp = {"ok": False, "error": f"export worker exit {rc}: {(err.strip().splitlines() or [''])[-1][:300]}"}
    if not exp.get("ok"):
        row |= {"status": "export failed", "detail": str(exp.get("error", "")).splitlines()[0][:300]}
        row["total_s"] = round(time.perf_counter() - t_model, 2)
        return row
    # 2. prune + compile for cuda (spa's --target path)
    result = d / f"{entry.name}.cuda.json"
    result.unlink(missing_ok=True)
    t0 = time.perf_counter()
    rc, err = cov._run(me + ["--worker", "cuda", *common, "--arch", args.arch, "--result", str(result)], args.timeout)
    res = cov._read(result)
    if res is None:
        if rc is None:
            res = {"status": "timeout", "detail": f"prune + compile not done after {args.timeout:.0f} s"}
        else:
            lines = [ln for ln in err.strip().splitlines() if ln.strip()]
            res = {"status": "crashed", "detail": f"worker exit {rc}: {lines[-1][:300] if lines else ''}", "stderr_tail": err[-1500:]}
    row |= res
    row["cuda_worker_s"] = round(time.perf_counter() - t0, 2)
    row["total_s"] = round(time.perf_counter() - t_model, 2)
    return row


def _cell(x: Any) -> str:
    return "" if x is None else str(x).replace("|", "\\|").replace("\n", " ")


def render(rows: list[dict], args) -> str:
    """The markdown table and the summary lines."""
    head = ["model", "family", "result", "kernels", "fatbin KiB", "prune + compile s", "of which TVM import + build s", "nvcc s", "op / detail"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        st = r.get("status", "?")
        fat = r.get("fatbin_bytes")
        if st == BUILT:
            detail = ""
        elif st == IMPORT:
            detail = f"**{r['op']}**: {r.get('detail', '')}" if r.get("op") else r.get("detail", "")
        else:
            detail = r.get("detail", "")
            if r.get("raised_at"):
                detail += f" (raised at {r['raised_at']})"
        lines.append("| " + " | ".join(_cell(c) for c in [
            r["model"], r.get("family"), st, r.get("kernels"), None if fat is None else f"{fat / 1024:.0f}",
            r.get("wall_s"), r.get("compile_s"), r.get("nvcc_s"), detail[:300]]) + " |")
    s = summarize(rows)
    lines.append("")
    lines.extend(summary_lines(s, args))
    diagnosed = [r for r in rows if r.get("diagnosis")]
    if diagnosed:
        lines += ["", "Failures, diagnosed (`--diagnose`: import failures imported again with more shape-folding rounds; "
                  "the TIR functions TVM's dlight schedules fail on, and the build again with `dlight.gpu.Fallback` "
                  "for those functions only, compiled by nvcc, not run):", "",
                  "| model | diagnosis | dlight fails on (function: error) | with Fallback there |", "|---|---|---|---|"]
        for r in diagnosed:
            d = r["diagnosis"]
            how = (f"shape folding rounds {d['fold_rounds']}: " + ("imports" if d.get("imports") else "still not importable")) if d.get("fold_rounds") else ""
            if d.get("diagnose_error"):
                lines.append(f"| {r['model']} | {_cell(how)} | {_cell(d['diagnose_error'])} | |")
                continue
            fails = "; ".join(f"{f['function']}: {f['error']}" for f in d.get("dlight_failures", [])) or "none"
            fb = (f"compiled: {d.get('fallback_kernels')} kernels, {(d.get('fallback_fatbin_bytes') or 0) / 1024:.0f} KiB"
                  if d.get("fallback_compiled") else "not compiled")
            lines.append(f"| {r['model']} | {_cell(how)} | {_cell(fails)[:600]} | {fb} |")
    return "\n".join(lines)


def summarize(rows: list[dict]) -> dict[str, Any]:
    buckets: dict[str, list[str]] = collections.defaultdict(list)
    for r in rows:
        buckets[BUCKET.get(r.get("status"), "other failure")].append(r["model"])
    exported = [r for r in rows if r.get("status") != "export failed"]
    import_ops = collections.Counter(r.get("op") or "?" for r in rows if r.get("status") == IMPORT)
    built = [r for r in rows if r.get("status") == BUILT]
    times = [r["wall_s"] for r in exported if r.get("wall_s") is not None]
    return {
        "models": len(rows), "exported": len(exported), "built": len(buckets["built"]),
        "cant_import": buckets["TVM can't import"], "import_ops": dict(import_ops),
        "other_failure": [(r["model"], r.get("status")) for r in rows if BUCKET.get(r.get("status"), "other failure") == "other failure"],
        "export_failed": buckets["export failed"],
        "kernels_total": sum(r.get("kernels") or 0 for r in built),
        "fatbin_total_bytes": sum(r.get("fatbin_bytes") or 0 for r in built),
        "max_wall": max(((r["wall_s"], r["model"]) for r in exported if r.get("wall_s") is not None), default=None),
        "total_wall_s": round(sum(times), 1),
        "by_family": {f: [sum(1 for r in exported if r.get("family") == f and r.get("status") == BUILT),
                          sum(1 for r in exported if r.get("family") == f)] for f in dict.fromkeys(r.get("family") for r in rows)},
    }


def summary_lines(s: dict[str, Any], args) -> list[str]:
    out = [f"**{s['built']}/{s['exported']} exported models built for cuda -arch={args.arch} and compiled by nvcc** "
           f"({s['models']} models in the set; ratio {args.ratio})."]
    out.append("- built by family: " + ", ".join(f"{f} {b}/{n}" for f, (b, n) in s["by_family"].items()))
    ops = ", ".join(f"{op} ×{n}" for op, n in sorted(s["import_ops"].items()))
    out.append(f"- TVM can't import: {len(s['cant_import'])}" + (f" ({', '.join(s['cant_import'])}; ops: {ops})" if s["cant_import"] else ""))
    out.append(f"- other failure: {len(s['other_failure'])}" + (" (" + ", ".join(f"{m}: {st}" for m, st in s["other_failure"]) + ")" if s["other_failure"] else ""))
    out.append(f"- export failed (torch; not counted): {len(s['export_failed'])}" + (f" ({', '.join(s['export_failed'])})" if s["export_failed"] else ""))
    if s["built"]:
        out.append(f"- built: {s['kernels_total']} kernels, {s['fatbin_total_bytes'] / 2**20:.1f} MiB of fatbin in all")
    if s["max_wall"]:
        out.append(f"- prune + compile: {s['total_wall_s']:.0f} s in all, slowest {s['max_wall'][1]} {s['max_wall'][0]:.0f} s")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=pathlib.Path, help="folder of the result cache (results.json) and results.md")
    ap.add_argument("--only", help="comma-separated model names of the coverage set")
    ap.add_argument("--jobs", type=int, default=1, help="models in flight at once")
    ap.add_argument("--arch", default="sm_80")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--timeout", type=float, default=900, help="seconds for prune + compile of one model")
    ap.add_argument("--export-timeout", type=float, default=300, help="seconds for one torch export")
    ap.add_argument("--models-dir", help="exported ONNX files (default OUT/models; coverage.py's --models-dir is reusable)")
    ap.add_argument("--redo-failed", action="store_true", help="run again the cached models that did not build")
    ap.add_argument("--report-only", action="store_true", help="print the table from the cache; run nothing")
    ap.add_argument("--diagnose", action="store_true",
                    help="for each TVM build failure: the TIR functions dlight fails on, and whether a per-function Fallback compiles")
    # worker mode (internal)
    ap.add_argument("--worker", choices=("export", "cuda", "diagnose"), help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--onnx", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--fold-rounds", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker == "export":
        return worker_export(args)
    if args.worker == "cuda":
        return worker_cuda(args)
    if args.worker == "diagnose":
        return worker_diagnose(args)
    if args.out is None:
        ap.error("--out DIR is required")

    cov = _coverage()
    entries = list(cov.ZOO)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in cov.BY_NAME]
        if unknown:
            print(f"not in the coverage set: {', '.join(unknown)}", file=sys.stderr)
            return 2
        entries = [cov.BY_NAME[n] for n in names]
    if args.jobs < 1:
        print("--jobs must be ≥ 1", file=sys.stderr)
        return 2
    args.models_dir = args.models_dir or str(args.out / "models")
    pathlib.Path(args.models_dir).mkdir(parents=True, exist_ok=True)
    args.threads = max(1, (os.cpu_count() or 1) // args.jobs)
    for var in ("OMP_NUM_THREADS", "TVM_NUM_THREADS"):
        os.environ.setdefault(var, str(args.threads))
    cache = args.out / "results.json"
    key = cache_key(args)
    rows = load_cache(cache, key)
    todo = [] if args.report_only else to_run([e.name for e in entries], rows, args.redo_failed)
    print(f"{len(entries)} models; {len(entries) - len(todo)} cached in {cache}, {len(todo)} to run; "
          f"cuda -arch={args.arch}, ratio {args.ratio}, jobs {args.jobs}, timeout {args.timeout:.0f} s", flush=True)
    lock = threading.Lock()
    t_start = time.perf_counter()
    done = [0]

    def one(name: str) -> None:
        entry = cov.BY_NAME[name]
        try:
            row = run_model(entry, args)
        except Exception as e:  # noqa: BLE001 - a driver bug: keep going
            row = {"model": name, "family": entry.family, "status": "crashed", "detail": f"driver: {type(e).__name__}: {e}"}
        with lock:
            rows[name] = row
            save_cache(cache, key, rows)
            done[0] += 1
            extra = (f"{row.get('kernels')} kernels, fatbin {(row.get('fatbin_bytes') or 0) / 1024:.0f} KiB" if row.get("status") == BUILT
                     else str(row.get("detail", ""))[:200])
            print(f"[{done[0]}/{len(todo)} {time.perf_counter() - t_start:.0f} s] {name}: {row.get('status')} "
                  f"({row.get('total_s', 0):.0f} s) {extra}", flush=True)

    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(one, todo))
    if args.diagnose and not args.report_only:
        wanted = [e.name for e in entries if rows.get(e.name, {}).get("status") in ("TVM build failed", IMPORT)
                  and (args.redo_failed or "diagnosis" not in rows[e.name])]
        print(f"diagnosing {len(wanted)} failures: {', '.join(wanted)}", flush=True)

        def diagnose(name: str) -> None:
            d = pathlib.Path(args.models_dir)
            result = d / f"{name}.diagnose.json"
            result.unlink(missing_ok=True)
            me = [sys.executable, "-u", str(pathlib.Path(__file__).resolve())]
            rc, err = cov._run(me + ["--worker", "diagnose", "--model", name, "--onnx", str(d / f"{name}.onnx"), "--ratio", str(args.ratio),
                                     "--arch", args.arch, "--result", str(result)]
                               + (["--fold-rounds", str(DIAGNOSE_FOLD_ROUNDS)] if rows[name]["status"] == IMPORT else []), args.timeout)
            diag = cov._read(result) or {"diagnose_error": "timeout" if rc is None else f"worker exit {rc}"}
            with lock:
                rows[name]["diagnosis"] = diag
                save_cache(cache, key, rows)
                print(f"  {name}: {diag}", flush=True)

        with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
            list(pool.map(diagnose, wanted))
    ordered = [rows[e.name] for e in entries if e.name in rows]
    for row in ordered:
        fill_op(row, args.models_dir)
    text = render(ordered, args)
    print()
    print(text)
    (args.out / "results.md").write_text(text + "\n")
    missing = [e.name for e in entries if e.name not in rows]
    if missing:
        print(f"\nnot run yet: {', '.join(missing)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
