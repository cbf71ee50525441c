"""The emit stage: compile an ONNX file for a target, check it, and measure it against ORT.

One function, :func:`compile_onnx`, shared by ``spa compile`` and the ``compile`` step of
``spa prune --target``. It never reports a module as done before its outputs matched ONNX
Runtime's on the same inputs, and it always puts the module's latency beside ORT's on the same
model, naming the faster one: untuned TVM on a CPU is often far slower than ORT, and the
user should deploy whichever artifact is actually faster.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from spa.kernels.build import build, check_against_ort, export
from spa.kernels.errors import CompileError
from spa.kernels.rpc import Remote
from spa.kernels.target import TargetSpec
from spa.kernels.tune import Tuning

__all__ = ["EmitOptions", "compile_onnx"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class EmitOptions:
    target: TargetSpec
    tune_trials: int = 0
    tuning_db: pathlib.Path | None = None
    remote: Remote | None = None
    check: bool = True
    bench: bool = True
    bench_budget_s: float = 2.0
    progress: Any = None  # (task, done, total) → None


def _tuning(o: EmitOptions, scratch: pathlib.Path) -> Tuning | None:
    if o.tune_trials <= 0 and o.tuning_db is None:
        return None
    # Without --tuning-db the records live in the run's scratch folder and go with it.
    return Tuning(database=o.tuning_db or scratch / "tuning", trials=o.tune_trials, rpc=o.remote, progress=o.progress)


def _runnable_here(target: TargetSpec) -> str | None:
    """Why the module can't run on this machine (None: it can)."""
    from spa.kernels.runtime import device

    if target.cross:
        return f"built for {target.config.get('mtriple')}: it runs on that device, not here"
    try:
        present = device(target.kind).exist
    except Exception:  # noqa: BLE001 - no runtime for that kind compiled in
        present = False
    return None if present else f"no {target.kind} device on this machine (the module is built; run it where there is one)"


def compile_onnx(
    onnx_path: str | os.PathLike,
    feeds: Mapping[str, np.ndarray],
    output: pathlib.Path,
    options: EmitOptions,
    *,
    scratch: pathlib.Path,
) -> dict[str, Any]:
    """Build ``onnx_path`` for the target, export it to ``output`` (+ sidecar), check it against
    ORT and time both. Returns the report's ``target`` section."""
    from spa import verify
    from spa.kernels.runtime import load

    o = options
    if o.remote is not None:
        o.remote.check()
    built = build(onnx_path, o.target, feeds, tuning=_tuning(o, scratch))
    path = export(built, output)
    info: dict[str, Any] = {
        "target": o.target.text,
        "target_config": o.target.config,
        "module": str(path),
        "compile_s": round(built.compile_s, 3),
        "tuning": built.tuning,
        "layout": built.layout,
        "cuda_check": built.cuda_check,
        "notes": list(o.target.notes),
    }
    where = "remote" if o.remote is not None else "local"
    why_not = None if o.remote is not None else _runnable_here(o.target)
    if why_not is not None:
        info.update(check=None, run=why_not)
        info["notes"].append(f"not run: {why_not}")
        return info
    session = o.remote.session() if o.remote is not None else None
    module = load(path, remote=session)
    ort = verify.session(onnx_path)
    expected = verify.run(ort, feeds)
    if o.check:
        info["check"] = check_against_ort(module.run(None, feeds), expected, module.output_names)
    if o.bench:
        info["latency"] = _latency(module, ort, feeds, o, where)
    return info


def _latency(module, ort, feeds, o: EmitOptions, where: str) -> dict[str, Any]:
    """TVM and ORT on the same model, side by side (local), or TVM's remote time_evaluator
    against ORT here (remote: then the two run on different machines, and the report says so)."""
    from spa import verify
    from spa.kernels.threads import runtime_threads

    tvm_run = module.timer(feeds)
    tvm_run()  # warm-up
    if where == "remote":
        evaluator = module._vm.time_evaluator("main", module.device, number=10, repeat=3)
        tvm_ms = float(np.median(evaluator(*module._args(feeds)).results)) * 1e3
        ort_ms = verify.time_side_by_side([lambda: ort.run(None, dict(feeds))], budget_s=o.bench_budget_s).median_ms[0]
        lat = {"tvm_ms": round(tvm_ms, 4), "ort_ms": ort_ms, "tvm_on": "the RPC device", "ort_on": "this machine"}
    else:
        m = verify.time_side_by_side([lambda: ort.run(None, dict(feeds)), tvm_run], budget_s=o.bench_budget_s)
        lat = {"ort_ms": m.median_ms[0], "tvm_ms": m.median_ms[1], "ort_p10_p90_ms": list(m.p10_p90_ms[0]), "tvm_p10_p90_ms": list(m.p10_p90_ms[1])}
        if not o.target.is_gpu:  # TVM's default would have halved it on x86 (spa.kernels.threads)
            lat["tvm_threads"] = runtime_threads()
    lat["faster"] = "tvm" if lat["tvm_ms"] < lat["ort_ms"] else "onnx"
    lat["recommended"] = "the TVM module" if lat["faster"] == "tvm" else "the ONNX file (ONNX Runtime is faster here)"
    return lat


def failure(target: TargetSpec, error: CompileError) -> dict[str, Any]:
    """The report's ``target`` section when compiling failed (the ONNX output is still written)."""
    return {"target": target.text, "target_config": target.config, "module": None, "error": str(error)}
