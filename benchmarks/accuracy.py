"""Accuracy after pruning without fine-tuning: spa's criteria and compensations against peers.

    python benchmarks/accuracy.py [--tasks digits,ocr,minilm] [--cuts 0.1,0.3,0.5] [--samples 128]
                                  [--methods spa-l1,spa-random,...] [--quick] [--json OUT]

A separate command (not part of pytest), offline. Three tasks (``benchmarks/_accuracy_tasks.py``):
a small CNN trained on scikit-learn's digits (top-1 accuracy; ``digits-folded``, not run by
default: the same CNN exported with BatchNorm folded, for the data-free synthetic fallback), the PP-OCRv4 recognizer of
``rapidocr-onnxruntime`` on rendered text lines (line and character accuracy), MiniLM-L6 sentence
embeddings (cosine to the original embeddings, nearest-neighbour agreement). Models and data
are cached under ``~/.cache/spa-bench``.

For every task and FLOPs cut ``c`` (FLOPs target ``1 - c``) the methods are:

* spa through its Python API, ``spa.prune(path, flops_target=1-c, criterion=..., compensate=...,
  calibration=feeds, calibration_samples=n, benchmark=False)``: ``l1``, ``random``, ``l1`` with
  data-free and with calibration compensation, ``obs`` with each compensation (and, with
  ``--methods``, the criteria ``fpgm``, ``bn``, ``activation``). A variant whose option or
  criterion this spa does not have is a row "n/a (not in this spa)" (detected from
  ``dataclasses.fields(spa.pipeline.PruneOptions)`` and ``spa.criteria.CRITERIA``); a spa error
  is a row with its one-line message.
* Torch-Pruning (digits: the same torch model) — ``MetaPruner`` with ``MagnitudeImportance(p=1)``
  and with ``BNScaleImportance``, no fine-tuning, the pruning ratio bisected until
  ``tp.utils.count_ops_and_params`` gives the MACs target; exported like the original.
* onnxsim's ONNX-native pruning — ``apply_structured_pruning_cpp(importance_norm="l1")`` with the
  sparsity bisected to the FLOPs target (spa's cost model), alone and followed by
  ``apply_pruning_finetune`` (its ridge-regression refit of MatMul/Gemm layers) on the same
  calibration samples; run in a subprocess (a C++ extension: a crash is a row, not the end).

Every row: FLOPs ratio reached (spa's cost model, ``spa.analyze(path).cost.count()``, on every
file so rows compare), the metrics, and the wall time of the pruning call (for the peers, the
final call at the ratio found; the search is in the JSON). The calibration set (a list of
batch-1 feed dicts from a split disjoint from the evaluation set) is the same for every method.

``--synthetic KIND[:N]`` sets the data-free fallback's synthetic inputs for every spa row
(``spa.passes.compensate.SYNTHETIC`` / ``SYNTHETIC_SAMPLES``: what an image-like input gets,
one of ``spa.calibration.SYNTHETIC_KINDS``, and how many feeds), to compare them side by side
with spa's default; the report's ``options.statistics.by_source`` names the kind used.

Prints one markdown table; writes JSON (``--json``, default ``~/.cache/spa-bench/accuracy.json``,
rewritten after every row).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import logging
import os
import pathlib
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from typing import Any

import _common  # noqa: F401  (sys.path: repo root)
import _accuracy_tasks as T

import numpy as np

log = logging.getLogger("accuracy")
HERE = pathlib.Path(__file__).resolve().parent
NA = "n/a (not in this spa)"


@dataclasses.dataclass(frozen=True)
class Method:
    id: str
    label: str
    kind: str  # spa | tp | onnxsim
    criterion: str = "l1"
    compensate: str = "none"
    calibration: bool = False
    importance: str = ""
    finetune: bool = False
    default: bool = True
    data_free_method: str = ""  # spa's PruneOptions.data_free_method ("" = spa's default)


METHODS = (
    Method("spa-l1", "spa l1", "spa", "l1"),
    Method("spa-random", "spa random", "spa", "random"),
    Method("spa-l1-df", "spa l1 + data-free", "spa", "l1", "data-free"),
    Method("spa-l1-cal", "spa l1 + calibration", "spa", "l1", "calibration", calibration=True),
    Method("spa-obs-df", "spa obs + data-free", "spa", "obs", "data-free"),
    Method("spa-obs-cal", "spa obs + calibration", "spa", "obs", "calibration", calibration=True),
    Method("spa-l1-udfc", "spa l1 + data-free udfc", "spa", "l1", "data-free", data_free_method="udfc"),
    Method("spa-obs-udfc", "spa obs + data-free udfc", "spa", "obs", "data-free", data_free_method="udfc"),
    Method("spa-fpgm", "spa fpgm", "spa", "fpgm", default=False),
    Method("spa-bn", "spa bn", "spa", "bn", default=False),
    Method("spa-activation", "spa activation", "spa", "activation", calibration=True, default=False),
    Method("tp-l1", "torch-pruning l1", "tp", importance="l1"),
    Method("tp-bn", "torch-pruning bn-scale", "tp", importance="bn"),
    Method("onnxsim", "onnxsim l1", "onnxsim"),
    Method("onnxsim-ridge", "onnxsim l1 + ridge", "onnxsim", finetune=True),
)
BY_ID = {m.id: m for m in METHODS}
LEGEND = {
    "digits": ("top-1 accuracy", ""),
    "digits-folded": ("top-1 accuracy", ""),
    "ocr": ("line accuracy", "char accuracy"),
    "minilm": ("cosine to original", "NN agreement"),
}


# ================================================================================================
# helpers
# ================================================================================================


def one_line(e: BaseException, limit: int = 300) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:limit]


def cost(path_or_model, shapes: dict[str, list[int]]) -> dict[str, int]:
    import spa

    c = spa.analyze(path_or_model, input_shapes=shapes).cost.count()
    return {"macs": int(c.macs), "flops": int(c.flops), "params": int(c.params)}


def spa_features() -> dict[str, Any]:
    import spa
    import spa.criteria
    import spa.pipeline

    fields = sorted(f.name for f in dataclasses.fields(spa.pipeline.PruneOptions))
    return {"version": getattr(spa, "__version__", "?"), "options": fields, "criteria": sorted(spa.criteria.CRITERIA)}


def git_head() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(HERE.parent), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(HERE.parent), "status", "--porcelain", "--", "spa"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + ("+dirty(spa/)" if dirty.stdout.strip() else "")
    except Exception:  # noqa: BLE001
        return None


def dist_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def save_feeds(feeds: list[dict[str, np.ndarray]], path: pathlib.Path) -> None:
    np.savez(path, **{f"{i}/{k}": v for i, f in enumerate(feeds) for k, v in f.items()})


def load_feeds(path: str | os.PathLike) -> list[dict[str, np.ndarray]]:
    z = np.load(path)
    out: dict[int, dict[str, np.ndarray]] = {}
    for key in z.files:
        i, name = key.split("/", 1)
        out.setdefault(int(i), {})[name] = z[key]
    return [out[i] for i in sorted(out)]


class RowTimeout(BaseException):
    """Not an Exception: a library's ``except Exception`` must not swallow it."""


@contextlib.contextmanager
def time_limit(seconds: float | None):
    """Raise RowTimeout in the main thread after ``seconds`` (SIGALRM; a no-op without it)."""
    import signal

    if not seconds or not hasattr(signal, "SIGALRM"):
        yield
        return

    def handler(signum, frame):
        raise RowTimeout(f"timed out after {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# ================================================================================================
# spa
# ================================================================================================


def spa_unavailable(m: Method, feats: dict[str, Any]) -> str | None:
    opts, crits = set(feats["options"]), set(feats["criteria"])
    if m.criterion not in crits:
        return f"{NA}: criterion {m.criterion!r}"
    if m.compensate != "none" and "compensate" not in opts:
        return f"{NA}: compensate"
    if m.calibration and "calibration" not in opts:
        return f"{NA}: calibration"
    if m.data_free_method and "data_free_method" not in opts:
        return f"{NA}: data_free_method"
    return None


def run_spa(task: T.Task, m: Method, cut: float, out: pathlib.Path, feats: dict[str, Any], args) -> dict[str, Any]:
    import spa

    opts = set(feats["options"])
    kw: dict[str, Any] = dict(flops_target=round(1.0 - cut, 6), criterion=m.criterion, input_shapes=task.input_shapes,
                              benchmark=False, seed=args.seed)
    if args.verify:
        kw["verify"] = args.verify
    if "compensate" in opts:
        kw["compensate"] = m.compensate
    if m.data_free_method:
        kw["data_free_method"] = m.data_free_method
    if m.calibration:
        kw["calibration"] = task.calibration
        if "calibration_samples" in opts:
            kw["calibration_samples"] = len(task.calibration)
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings(), time_limit(args.row_timeout):
            warnings.simplefilter("ignore")
            res = spa.prune(str(task.model), **kw)
        wall = time.perf_counter() - t0
        res.save(out)
    except (Exception, RowTimeout) as e:  # noqa: BLE001 - a spa failure is a row
        if isinstance(e, RowTimeout):
            return {"status": "timeout", "detail": f"spa.prune {e}", "time_s": round(time.perf_counter() - t0, 3)}
        kind = "refused" if isinstance(e, spa.SpaError) and not isinstance(e, spa.VerificationError) else "error"
        return {"status": kind, "detail": one_line(e), "time_s": round(time.perf_counter() - t0, 3),
                "traceback": traceback.format_exc(limit=6) if kind == "error" else None}
    rep = res.report
    rj = rep.to_json()
    slim = {k: v for k, v in rj.items() if k not in ("layers", "blocked")}
    note = f"{rep.groups_pruned}/{rep.groups_total} groups"
    oracle = rep.oracle or {}
    if oracle and oracle.get("passed") is False:
        note += ", oracle FAILED"
    comp = rj.get("compensation") or {}
    meas = comp.get("measured") or {}
    if isinstance(meas, dict):
        src = "calibration" if isinstance(meas.get("calibration"), dict) else "verification"
        e = meas.get(src)
        if isinstance(e, dict) and e.get("error_before") is not None and e.get("error_after") is not None:
            note += f", output error {e['error_before']:.3g} → {e['error_after']:.3g} ({src})"
    sources = ((rj.get("options") or {}).get("statistics") or {}).get("by_source")
    if m.compensate == "data-free" and sources:
        note += ", statistics " + ", ".join(f"{k} {v}" for k, v in sources.items())
    if rep.warnings:
        note += f", warning: {rep.warnings[0][:80]}"
    return {"status": "ok", "time_s": round(wall, 3), "note": note, "report": slim}


# ================================================================================================
# Torch-Pruning
# ================================================================================================


def run_tp(task: T.Task, m: Method, cut: float, out: pathlib.Path, args) -> dict[str, Any]:
    import copy

    import torch
    import torch_pruning as tp

    torch.set_num_threads(args.threads)
    base = task.torch_model
    ex = task.example_input
    base_macs = tp.utils.count_ops_and_params(base, ex)[0]
    target = 1.0 - cut
    with torch.no_grad():
        out_shape = tuple(base(ex).shape)

    def prune_at(r: float):
        model = copy.deepcopy(base).eval()
        # the classifier's outputs are the classes: ignore the copy's last Linear (not base's)
        last_linear = [mod for mod in model.modules() if isinstance(mod, torch.nn.Linear)][-1:]
        imp = tp.importance.MagnitudeImportance(p=1) if m.importance == "l1" else tp.importance.BNScaleImportance()
        t0 = time.perf_counter()
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            pruner = tp.pruner.MetaPruner(model, ex, importance=imp, pruning_ratio=r, ignored_layers=last_linear)
            pruner.step()
        dt = time.perf_counter() - t0
        with torch.no_grad():
            if tuple(model(ex).shape) != out_shape:
                raise RuntimeError(f"output shape {tuple(model(ex).shape)} != {out_shape} at ratio {r:.3f}")
        return model, tp.utils.count_ops_and_params(model, ex)[0] / base_macs, dt

    t_search = time.perf_counter()
    lo, hi, best = 0.0, 0.95, None
    for _ in range(14):
        r = (lo + hi) / 2
        _, ratio, _ = prune_at(r)
        if best is None or abs(ratio - target) < abs(best[1] - target):
            best = (r, ratio)
        if ratio > target:
            lo = r
        else:
            hi = r
    search_s = time.perf_counter() - t_search
    model, ratio, dt = prune_at(best[0])
    model.eval()
    exp = task.export(model, out)
    return {"status": "ok", "time_s": round(dt, 3), "search_s": round(search_s, 3), "pruning_ratio": round(best[0], 4),
            "tp_macs_ratio": round(ratio, 4), "bn_nodes": exp.get("bn_nodes"),
            "note": f"ratio {best[0]:.3f}, TP MACs {ratio:.3f}"}


# ================================================================================================
# onnxsim (subprocess worker)
# ================================================================================================


def onnxsim_worker(spec: dict[str, Any]) -> dict[str, Any]:
    import onnx
    import onnxsim

    logging.getLogger("onnx_ir").setLevel(logging.CRITICAL)

    src, shapes, target = spec["src"], spec["input_shapes"], spec["target"]
    base = cost(src, shapes)["flops"]

    def prune(s: float):
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            model = onnxsim.apply_structured_pruning_cpp(src, sparsity=s, importance_norm="l1")
        return model, time.perf_counter() - t0

    def ratio_of(model) -> float:
        return cost(model, shapes)["flops"] / base

    t_search = time.perf_counter()
    tried: list[tuple[float, float]] = []
    hi_model, _ = prune(0.95)
    r_hi = ratio_of(hi_model)
    tried.append((0.95, r_hi))
    if r_hi > target:  # not reachable: take the deepest cut it makes
        s_best = 0.95
    else:
        lo, hi = 0.0, 0.95
        for _ in range(12):
            s = (lo + hi) / 2
            r = ratio_of(prune(s)[0])
            tried.append((s, r))
            if r > target:
                lo = s
            else:
                hi = s
        s_best = min(tried, key=lambda t: abs(t[1] - target))[0]
    search_s = time.perf_counter() - t_search
    model, dt = prune(s_best)
    onnx.save(model, spec["out_plain"])
    probe = None
    if spec.get("probe_src"):  # what it does to the task's own model at the same sparsity
        with contextlib.redirect_stdout(io.StringIO()):
            pm = onnxsim.apply_structured_pruning_cpp(spec["probe_src"], sparsity=s_best, importance_norm="l1")
        probe = cost(pm, shapes)["flops"] / cost(spec["probe_src"], shapes)["flops"]
    res: dict[str, Any] = {"sparsity": round(s_best, 4), "time_s": round(dt, 3), "search_s": round(search_s, 3),
                           "reachable": r_hi <= target, "tried": [(round(a, 4), round(b, 4)) for a, b in tried],
                           "src": src, "flops_ratio_on_task_model": probe}
    def shapes_of(mp) -> list:  # every weight's shape: initializers and Constant nodes
        out = [(i.name, tuple(i.dims)) for i in mp.graph.initializer]
        out += [(n.output[0], tuple(a.t.dims)) for n in mp.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
        return sorted(out)

    res["pruned_nothing"] = shapes_of(model) == shapes_of(onnx.load(src))
    if spec.get("out_ridge") and res["pruned_nothing"]:
        onnx.save(model, spec["out_ridge"])  # nothing removed: nothing to refit (and a refit of every layer costs minutes)
        res["ridge_skipped"] = "onnxsim pruned nothing"
    elif spec.get("out_ridge"):
        feeds = load_feeds(spec["calib"])
        t0 = time.perf_counter()
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                ft = onnxsim.apply_pruning_finetune(src, model, calibration_data=feeds)
            res["ridge_time_s"] = round(time.perf_counter() - t0, 3)
            onnx.save(ft, spec["out_ridge"])
            a = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
            b = {i.name: onnx.numpy_helper.to_array(i) for i in ft.graph.initializer}
            res["ridge_changed_initializers"] = sum(
                1 for k, v in b.items() if k not in a or a[k].shape != v.shape or not np.array_equal(a[k], v))
        except Exception as e:  # noqa: BLE001
            res["ridge_error"] = one_line(e)
    return res


def run_onnxsim(task: T.Task, cut: float, outs: dict[str, pathlib.Path], calib_npz: pathlib.Path, args) -> dict[str, Any]:
    src, _ = task.peer_models.get("onnxsim", (task.model, ""))
    spec = {"src": str(src), "probe_src": str(task.model) if src != task.model else None,
            "input_shapes": task.input_shapes, "target": 1.0 - cut,
            "out_plain": str(outs["onnxsim"]), "out_ridge": str(outs["onnxsim-ridge"]) if "onnxsim-ridge" in outs else None,
            "calib": str(calib_npz)}
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--onnxsim-worker", json.dumps(spec)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.peer_timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"status": "error", "detail": f"onnxsim hung (> {args.peer_timeout:.0f} s)"}
    line = (proc.stdout.strip().splitlines() or [""])[-1]
    if proc.returncode != 0 or not line.startswith("{"):
        tail = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        return {"status": "error", "detail": f"onnxsim crashed (exit {proc.returncode}): {tail[:250]}"}
    return {"status": "ok", **json.loads(line)}


# ================================================================================================
# the run
# ================================================================================================


def evaluate_row(task: T.Task, path: pathlib.Path, base_cost: dict[str, int], row: dict[str, Any]) -> None:
    try:
        c = cost(str(path), task.input_shapes)
        row["flops_ratio"] = c["flops"] / base_cost["flops"]
        row["macs_ratio"] = c["macs"] / base_cost["macs"]
        row["params_ratio"] = c["params"] / base_cost["params"]
    except Exception as e:  # noqa: BLE001
        row["cost_error"] = one_line(e)
    try:
        row["metrics"] = task.evaluate(path)
    except Exception as e:  # noqa: BLE001 - a model ORT cannot run is a result
        row["status"] = "broken"
        row["detail"] = f"evaluation failed: {one_line(e)}"


def run(args) -> dict[str, Any]:
    feats = spa_features()
    methods = [BY_ID[x] for x in args.methods]
    result: dict[str, Any] = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "spa": {**feats, "git": git_head()},
        "versions": {n: dist_version(n) for n in ("torch", "torch-pruning", "onnxsim", "onnxruntime", "onnx", "rapidocr-onnxruntime", "transformers")},
        "args": {k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in vars(args).items() if k != "onnxsim_worker"},
        "tasks": {}, "rows": [],
    }
    workroot = pathlib.Path(args.keep_models) if args.keep_models else pathlib.Path(tempfile.mkdtemp(prefix="spa-acc-"))
    workroot.mkdir(parents=True, exist_ok=True)

    def flush() -> None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, default=str))

    try:
        for tname in args.tasks:
            t0 = time.perf_counter()
            try:
                task = T.build(tname, args.samples, args.quick)
            except Exception as e:  # noqa: BLE001 - a task that cannot be built is a row
                log.error("%s: cannot build the task: %s", tname, one_line(e))
                result["tasks"][tname] = {"error": one_line(e), "traceback": traceback.format_exc(limit=8)}
                result["rows"].append({"task": tname, "cut": None, "method": "original", "status": "error", "detail": f"task: {one_line(e)}"})
                flush()
                continue
            base_cost = cost(str(task.model), task.input_shapes)
            orig = {"task": tname, "cut": 0.0, "method": "original", "label": "original", "status": "ok", "flops_ratio": 1.0,
                    "macs_ratio": 1.0, "params_ratio": 1.0, "time_s": None}
            orig["metrics"] = task.evaluate(task.model)
            result["tasks"][tname] = {"model": str(task.model), "input_shapes": task.input_shapes, "cost": base_cost,
                                      "metrics": task.metrics, "legend": LEGEND[tname], "n_calibration": len(task.calibration),
                                      "original": orig["metrics"], "build_s": round(time.perf_counter() - t0, 2), **task.info}
            result["rows"].append(orig)
            log.info("%s: original %s (%s MACs)", tname, _fmt_metrics(orig["metrics"], task.metrics), f"{base_cost['macs']:,}")
            flush()
            work = workroot / tname
            work.mkdir(exist_ok=True)
            calib_npz = work / "calibration.npz"
            save_feeds(task.calibration, calib_npz)
            peer_cost = None
            if "onnxsim" in task.peer_models:  # FLOPs ratios of onnxsim rows: against the file it was given
                ppath, why = task.peer_models["onnxsim"]
                peer_cost = cost(str(ppath), task.input_shapes)
                result["tasks"][tname]["onnxsim_model"] = {"path": str(ppath), "why": why, "cost": peer_cost,
                                                           "metrics": task.evaluate(ppath)}
            for cut in args.cuts:
                peer_cache: dict[str, Any] | None = None
                for m in methods:
                    if m.kind == "tp" and task.torch_model is None:
                        continue
                    if m.kind == "onnxsim" and tname not in args.onnxsim_tasks:
                        continue
                    row: dict[str, Any] = {"task": tname, "cut": cut, "method": m.id, "label": m.label}
                    out = work / f"{m.id}-{int(round(cut * 100))}.onnx"
                    t_row = time.perf_counter()
                    if m.kind == "spa":
                        why = spa_unavailable(m, feats)
                        if why:
                            row.update(status="n/a", detail=why)
                        else:
                            row.update(run_spa(task, m, cut, out, feats, args))
                    elif m.kind == "tp":
                        try:
                            with time_limit(args.row_timeout):
                                row.update(run_tp(task, m, cut, out, args))
                        except (Exception, RowTimeout) as e:  # noqa: BLE001
                            row.update(status="error", detail=f"torch-pruning: {one_line(e)}", traceback=traceback.format_exc(limit=6))
                    else:
                        if peer_cache is None:
                            wanted = [x.id for x in methods if x.kind == "onnxsim"]
                            outs = {i: work / f"{i}-{int(round(cut * 100))}.onnx" for i in wanted}
                            peer_cache = run_onnxsim(task, cut, outs, calib_npz, args)
                        pc = dict(peer_cache)
                        if pc.get("status") == "ok":
                            note = f"sparsity {pc['sparsity']:.2f}" + ("" if pc.get("reachable", True) else " (its deepest; target unreachable)")
                            if "onnxsim" in task.peer_models:
                                note += f"; {task.peer_models['onnxsim'][1]}"
                                if pc.get("flops_ratio_on_task_model") is not None:
                                    note += f" (task's file itself: FLOPs {pc['flops_ratio_on_task_model']:.3f})"
                            if m.finetune:
                                if "ridge_error" in pc:
                                    row.update(status="error", detail=f"apply_pruning_finetune: {pc['ridge_error']}")
                                else:
                                    refit = (f", no refit ({pc['ridge_skipped']})" if pc.get("ridge_skipped")
                                             else f", ridge refit {pc.get('ridge_changed_initializers', '?')} tensors")
                                    row.update(status="ok", time_s=round(pc["time_s"] + pc.get("ridge_time_s", 0.0), 3),
                                               note=note + refit, onnxsim=pc)
                            else:
                                row.update(status="ok", time_s=pc["time_s"], note=note, onnxsim=pc)
                        else:
                            row.update(status=pc.get("status", "error"), detail=pc.get("detail"))
                    if row.get("status") == "ok":
                        evaluate_row(task, out, peer_cost if m.kind == "onnxsim" and peer_cost else base_cost, row)
                    if not args.keep_models:
                        out.unlink(missing_ok=True)
                    row["row_s"] = round(time.perf_counter() - t_row, 2)
                    result["rows"].append(row)
                    log.info("%s cut %.0f%% %-24s %s", tname, cut * 100, m.label,
                             _fmt_metrics(row.get("metrics"), task.metrics) + f" FLOPs {row['flops_ratio']:.3f}" if row.get("metrics") and "flops_ratio" in row
                             else f"{row.get('status')}: {row.get('detail')}")
                    flush()
    finally:
        result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        flush()
        if not args.keep_models:
            import shutil

            shutil.rmtree(workroot, ignore_errors=True)
    return result


def _fmt_metrics(metrics: dict[str, float] | None, keys) -> str:
    if not metrics:
        return ""
    return ", ".join(f"{k} {metrics[k]:.3f}" for k in keys if k in metrics)


def markdown(result: dict[str, Any]) -> str:
    lines = []
    legend = "; ".join(f"{t}: m1 = {a}" + (f", m2 = {b}" if b else "") for t, (a, b) in LEGEND.items() if t in result["tasks"])
    lines.append(f"Metrics — {legend}. Δ m1 in points against the original. FLOPs = after/before (spa's cost model). "
                 f"Calibration: {result['args']['samples']} samples from a split disjoint from the evaluation set.")
    lines.append("")
    hdr = ["task", "cut", "method", "FLOPs", "m1", "m2", "Δ m1", "prune s", "note"]
    lines.append("| " + " | ".join(hdr) + " |")
    lines.append("|" + "|".join(["---"] * 3 + ["---:"] * 5 + ["---"]) + "|")
    base: dict[str, float] = {}
    for r in result["rows"]:
        t = r["task"]
        keys = (result["tasks"].get(t) or {}).get("metrics") or ()
        mets = r.get("metrics") or {}
        m1 = mets.get(keys[0]) if keys else None
        m2 = mets.get(keys[1]) if len(keys) > 1 else None
        if r["method"] == "original" and m1 is not None:
            base[t] = m1
        delta = f"{100 * (m1 - base[t]):+.1f}" if m1 is not None and t in base and r["method"] != "original" else ""
        if r.get("status") == "ok":
            note = r.get("note", "")
        elif r.get("status") == "n/a":
            note = r.get("detail", NA)
        else:
            note = f"**{r.get('status')}**: {r.get('detail', '')}"
        note = note.replace("|", "\\|").replace("\n", " ")
        cut = "" if r.get("cut") is None else f"{100 * r['cut']:.0f} %"
        fl = f"{r['flops_ratio']:.3f}" if r.get("flops_ratio") is not None else ""
        lines.append("| " + " | ".join([
            t, cut, r.get("label", r["method"]), fl,
            "" if m1 is None else f"{m1:.3f}", "" if m2 is None else f"{m2:.3f}", delta,
            "" if r.get("time_s") is None else f"{r['time_s']:.2f}", note,
        ]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default="digits,ocr,minilm", help="comma list of " + ",".join(T.TASKS))
    ap.add_argument("--cuts", default="0.1,0.3,0.5", help="FLOPs cuts (target = 1 - cut)")
    ap.add_argument("--samples", type=int, default=None,
                    help="calibration samples, the same for every method (default 128; 32 with --quick)")
    ap.add_argument("--methods", default="default",
                    help="comma list of " + ",".join(BY_ID) + "; 'default' (all but spa-fpgm/bn/activation) or 'all'")
    ap.add_argument("--onnxsim-tasks", default="digits,ocr",
                    help="tasks onnxsim runs on (on minilm's export it prunes nothing; its refit alone takes minutes)")
    ap.add_argument("--quick", action="store_true",
                    help="smaller evaluation sets (ocr 96 lines, minilm 80 sentences) and 32 calibration samples")
    ap.add_argument("--row-timeout", type=float, default=1200,
                    help="seconds one spa or Torch-Pruning call may take before its row is marked timed out (0: none)")
    ap.add_argument("--verify", default=None, help="spa's verify option (default: spa's own)")
    ap.add_argument("--seed", type=int, default=0, help="spa's seed (the random criterion)")
    ap.add_argument("--synthetic", default=None, metavar="KIND[:N]",
                    help="data-free fallback's synthetic inputs for spa rows (normal, uniform, pink, leaves; N feeds); default: spa's")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peer-timeout", type=float, default=1200, help="seconds for one onnxsim run (search + refit)")
    ap.add_argument("--json", type=pathlib.Path, default=T.CACHE / "accuracy.json")
    ap.add_argument("--keep-models", default=None, metavar="DIR", help="keep every pruned model in DIR")
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("--onnxsim-worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.onnxsim_worker:
        print(json.dumps(onnxsim_worker(json.loads(args.onnxsim_worker))))
        return 0
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    for name in ("spa", "onnxscript", "torch_pruning", "transformers"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # onnx_ir's shape inference logs a traceback (and carries on) on peers' stale value_info
    logging.getLogger("onnx_ir").setLevel(logging.CRITICAL)
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    bad = [t for t in args.tasks if t not in T.TASKS]
    if bad:
        ap.error(f"unknown task(s) {bad}; choose from {', '.join(T.TASKS)}")
    args.cuts = [float(c) for c in args.cuts.split(",") if c.strip()]
    if any(not 0 < c < 1 for c in args.cuts):
        ap.error("cuts are fractions in (0, 1)")
    if args.samples is None:
        args.samples = 32 if args.quick else 128
    if args.samples < 1:
        ap.error("--samples must be positive")
    if args.methods == "default":
        args.methods = [m.id for m in METHODS if m.default]
    elif args.methods == "all":
        args.methods = [m.id for m in METHODS]
    else:
        args.methods = [x.strip() for x in args.methods.split(",") if x.strip()]
        bad = [x for x in args.methods if x not in BY_ID]
        if bad:
            ap.error(f"unknown method(s) {bad}; choose from {', '.join(BY_ID)}")
    args.onnxsim_tasks = [t.strip() for t in args.onnxsim_tasks.split(",") if t.strip()]
    if args.synthetic:
        import spa.calibration
        import spa.passes.compensate as comp

        kind, _, n = args.synthetic.partition(":")
        if kind not in spa.calibration.SYNTHETIC_KINDS or (n and not n.isdigit()):
            ap.error(f"--synthetic KIND[:N], KIND one of {', '.join(spa.calibration.SYNTHETIC_KINDS)}")
        comp.SYNTHETIC = kind
        comp.SYNTHETIC_SAMPLES = int(n) if n else comp.SYNTHETIC_SAMPLES
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    t0 = time.perf_counter()
    result = run(args)
    result["total_s"] = round(time.perf_counter() - t0, 1)
    args.json.write_text(json.dumps(result, indent=1, default=str))
    print(markdown(result))
    print(f"\n(total {result['total_s']:.0f} s; JSON: {args.json})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
