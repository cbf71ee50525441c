"""Latency-aware allocation: ``--latency-target MS`` and ``--allocation latency``.

The allocate step asks this module for a :class:`LatencyModel` of the input on the runtime
it will run on (ORT for ``--target onnx``, the TVM module otherwise): the whole model's measured
latency plus the per-layer lookup table of :mod:`spa.analysis.latency`. Then

- ``--latency-target MS`` searches the ratio whose predicted latency is ≤ MS (as
  ``--flops-target`` searches FLOPs), with any allocation;
- ``--allocation latency`` divides every group's scores by the latency its units save, so
  one global threshold removes first what costs the least score per millisecond saved.

The prediction and the model's measured latency after pruning are both in the report
(``options.latency_allocation`` and the latency rows), so a wrong table is visible.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from collections.abc import Callable
from typing import Any

from spa.analysis import latency as lut
from spa.errors import UsageError

__all__ = ["LatencyModel", "prepare"]


@dataclasses.dataclass
class LatencyModel:
    runtime: str
    base_ms: float
    table: lut.LatencyTable
    layers: list[lut.Layer]
    build_s: float
    #: The input on the runtime, built once for every round of ``measure_removed`` (with TVM
    #: a build of the whole model).
    base_runner: Callable[[], Any] | None = dataclasses.field(default=None, repr=False)

    def predict(self, size: Callable[[str, int], int | None]) -> float:
        return self.base_ms - lut.saving(self.table, self.layers, size)

    def weighted(self, groups, scores, size_of) -> dict[str, Any]:
        prunable = [g for g in groups if g.prunable and g.id in scores]
        return {**scores, **lut.latency_weighted({g.id: scores[g.id] for g in prunable}, lut.group_savings(self.table, self.layers, prunable, scores, size_of))}

    def notes(self) -> dict[str, Any]:
        return {"runtime": self.runtime, "measured_ms_before": round(self.base_ms, 4), "layers": len(self.layers),
                "layer_shapes": len({layer.key for layer in self.layers}), "shapes_measured_now": self.table.measured,
                "layers_ms_sum": round(sum(self.table.at(layer, 1.0, 1.0) for layer in self.layers), 4),
                "table_s": round(self.build_s, 2), "table": str(self.table.cache) if self.table.cache else None}


def _runner(s: Any, runtime: str, path: pathlib.Path, feeds) -> Callable[[], Any]:
    """One warmed-up run of the model file on the runtime."""
    from spa import verify

    if runtime == "onnxruntime":
        sess = verify.session(path)
        sess.run(None, dict(feeds))
        return lambda: sess.run(None, dict(feeds))
    from spa.kernels.build import build
    from spa.kernels.runtime import from_built

    once = from_built(build(path, s.emit_options.target, feeds)).timer(feeds)
    once()
    return once


def _whole_model_ms(s: Any, runtime: str) -> float:
    """The input model's median latency on the runtime (fixed seeded inputs)."""
    from spa import io, verify
    from spa.passes.emit import feeds_for

    path = s.scratch("latency-base")
    io.save_model(s.model, path, durable=False)
    return verify.time_side_by_side([_runner(s, runtime, path, feeds_for(s.model, s.options))], budget_s=2.0).median_ms[0]


def measure_removed(s: Any, model: LatencyModel, removed) -> float:
    """The latency a removal really gives: the pruned copy and the input timed side by side,
    their ratio applied to the input's cached latency (so machine noise between the two
    measurements cancels)."""
    import onnx_ir as ir

    from spa import io, verify
    from spa.passes.emit import feeds_for
    from spa.passes.prune import PrunePass
    from spa.planning import build_plan

    pruned = ir.from_proto(ir.to_proto(s.model))
    PrunePass(build_plan(s.model, s.analysis.channels, removed))(pruned)
    feeds = feeds_for(s.model, s.options)
    if model.base_runner is None:
        base_path = s.scratch("latency-base")
        if not base_path.exists():
            io.save_model(s.model, base_path, durable=False)
        model.base_runner = _runner(s, model.runtime, base_path, feeds)
    path = s.scratch("latency-candidate")
    io.save_model(pruned, path, durable=False)
    m = verify.time_side_by_side([model.base_runner, _runner(s, model.runtime, path, feeds)], budget_s=2.0)
    return model.base_ms * m.median_ms[1] / m.median_ms[0]


def prepare(s: Any) -> LatencyModel:
    """Measure (or read from the cache) what latency allocation needs."""
    from spa.inputs import resolve_input_shapes

    o = s.options
    if o.flops_target is not None and o.latency_target is not None:
        raise UsageError("--latency-target and --flops-target are two budgets for one choice: give one")
    started = time.perf_counter()
    if s.emit_options is not None and not s.emit_options.target.is_onnx:
        target = s.emit_options.target
        if target.cross or target.is_gpu:
            raise UsageError(f"--latency-target measures on this machine; {target.text} does not run here (use --rpc-tracker later, or --target onnx)")
        runtime, measure = f"tvm:{target.text}", lut.tvm_measure(target)
    else:
        runtime, measure = "onnxruntime", lut.ort_measure()
    cache = pathlib.Path(o.tuning_db) / lut.CACHE_NAME if o.tuning_db else None
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
    table = lut.LatencyTable(runtime, measure, cache)
    layers = lut.layers_of(s.model, resolve_input_shapes(s.model, o.input_shapes))
    for layer in layers:
        table.grid(layer)
    # The whole model's latency is cached beside the layers (by the input's sha256): one noisy
    # measurement then serves every later run, so their predictions share one baseline.
    key = f"model:{s.sha256}:{sorted(o.input_shapes.items())}" if s.sha256 else None
    base = table.entries.get(key) if key else None
    if base is None:
        base = _whole_model_ms(s, runtime)
        if key:
            table.entries[key] = base
    table.save()
    return LatencyModel(runtime, float(base), table, layers, time.perf_counter() - started)
