"""``spa bench``: ORT and TVM latency of several models, measured side by side in one run.

Every runner (each model under ORT, and under TVM when a target is given) is warmed up, then
all are timed round-robin with the order rotated every round (``verify.time_side_by_side``),
ORT's thread spinning off, so the machine's noise and one session's idle threads hit every
model alike. Ratios are against the first model under ORT.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["BenchRow", "bench_models"]


@dataclasses.dataclass
class BenchRow:
    model: str
    runtime: str  # "onnxruntime" or the TVM target
    median_ms: float
    p10_p90_ms: tuple[float, float]
    vs_first: float  # median / the first model's ORT median
    compile_s: float | None = None
    tuned: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def bench_models(
    paths: Sequence[str | pathlib.Path],
    feeds: Mapping[str, np.ndarray],
    *,
    emit: Any = None,
    budget_s: float = 5.0,
    scratch: pathlib.Path,
) -> list[BenchRow]:
    """Rows for each model under ORT (and TVM when ``emit`` names a target), in input order.
    TVM modules are checked against ORT before they are timed (a mismatch is a CompileError)."""
    from spa import verify
    from spa.kernels.build import build, check_against_ort
    from spa.kernels.emit import _tuning
    from spa.kernels.runtime import from_built

    runners: list[tuple[str, str, Any, dict[str, Any]]] = []
    for i, path in enumerate(paths):
        sess = verify.session(path)
        expected = verify.run(sess, feeds)
        runners.append((str(path), "onnxruntime", lambda s=sess: s.run(None, dict(feeds)), {}))
        if emit is not None:
            built = build(path, emit.target, feeds, tuning=_tuning(emit, scratch / f"m{i}"))
            module = from_built(built)
            check_against_ort(module.run(None, feeds), expected, module.output_names)
            runner = module.timer(feeds)
            runner()
            runners.append((str(path), emit.target.text, runner, {"compile_s": round(built.compile_s, 2), "tuned": built.tuning}))
    m = verify.time_side_by_side([r for _, _, r, _ in runners], budget_s=budget_s)
    first = m.median_ms[0]
    return [
        BenchRow(name, runtime, med, tuple(spread), round(med / first, 4) if first else float("nan"), **extra)
        for (name, runtime, _, extra), med, spread in zip(runners, m.median_ms, m.p10_p90_ms)
    ]
