"""The prune report: what was removed, what was refused and why, and what it bought.

A plain dataclass with a JSON round trip; the CLI renders it as a rich table, build scripts
read the JSON (``--json`` / ``--report``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["Report", "Timer", "human"]


@dataclasses.dataclass
class Report:
    input: str
    output: str | None
    options: dict[str, Any]
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    macs_before: int
    macs_after: int
    groups_total: int
    groups_pruned: int
    groups_blocked: int
    groups_partial: int
    blocked: list[dict[str, Any]]
    layers: list[dict[str, Any]]
    oracle: dict[str, Any] | None
    latency_ms_before: float | None
    latency_ms_after: float | None
    timings: dict[str, float]
    spa_version: str
    #: p10–p90 of each model's latency (ms): the spread the medians above come with.
    latency_p10_p90_ms: list[list[float]] | None = None
    #: Whether the pruned model's latency differs from the input's beyond that spread.
    latency_significant: bool | None = None
    #: What passes did that the user should know (opset upgraded, weights that were inputs …).
    notes: list[str] = dataclasses.field(default_factory=list)
    #: Things that look wrong for what was asked (nothing pruned, a target not reached …).
    warnings: list[str] = dataclasses.field(default_factory=list)
    #: --compensate: what was repaired where, predicted errors per group, and the measured
    #: output error against the original before (plain pruning) and after compensation.
    compensation: dict[str, Any] | None = None
    #: --fold: nodes each folding pass removed, and the ORT check of the folded model.
    fold: dict[str, Any] | None = None
    #: --lowrank: per layer the action, rank, FLOPs and relative output error; the full-rank
    #: oracle and the model's output error against the original.
    lowrank: dict[str, Any] | None = None
    #: --target: the module built (path, target, compile/tuning time), its check against ORT,
    #: and TVM vs ORT latency of the pruned model side by side with the faster one named; or
    #: the error when compiling failed (the ONNX is still written; the CLI exits 3).
    target: dict[str, Any] | None = None

    @property
    def speedup(self) -> float | None:
        if self.latency_ms_before and self.latency_ms_after:
            return self.latency_ms_before / self.latency_ms_after
        return None

    @property
    def flops_ratio(self) -> float:
        return self.flops_after / self.flops_before if self.flops_before else 1.0

    @property
    def params_ratio(self) -> float:
        return self.params_after / self.params_before if self.params_before else 1.0

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["speedup"] = self.speedup
        d["flops_ratio"] = self.flops_ratio
        d["params_ratio"] = self.params_ratio
        return d

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Report:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


class Timer:
    """Instrument that times pipeline stages (the stages never time themselves).

    ``on_stage(name)`` is called as each stage starts, so the CLI can show progress.
    """

    def __init__(self, on_stage: Callable[[str], None] | None = None) -> None:
        self.timings: dict[str, float] = {}
        self._on_stage = on_stage

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        if self._on_stage is not None:
            self._on_stage(stage)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] = round(self.timings.get(stage, 0.0) + time.perf_counter() - t0, 4)


def human(n: float) -> str:
    """1234567 → '1.23M' (params, FLOPs in tables)."""
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.3g}{unit}"
        n /= 1000
    return f"{n:.3g}P"
