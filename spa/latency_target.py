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

__all__ = ["LatencyModel", "prepare", "search"]


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
    PrunePass(build_plan(s.model, s.analysis.channels, removed, fingerprints=False))(pruned)
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
        from spa.kernels import TVM_THREADS

        # A table measured on another thread count (TVM's own default halved it before
        # spa.kernels.threads) is another runtime's: never mixed with this one's.
        runtime, measure = f"tvm:{target.text}:threads={TVM_THREADS}", lut.tvm_measure(target)
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


#: A measured latency this close to the target is taken: below by at most ``UNDER`` (pruning
#: more than asked for costs accuracy), above by at most ``OVER`` (the noise of one
#: side-by-side measurement).
UNDER, OVER = 0.05, 0.02


def search(s: Any, model: LatencyModel, size_at: Callable[[float], Any], removed_at: Callable[[float], Any], rounds: int = 4) -> float:
    """The least pruning ratio whose *measured* latency meets ``--latency-target``.

    The table only places the first guess: per-layer runs over- or under-credit a narrower
    layer (memory traffic, fusions, and in transformers the Softmax/LayerNorm time that also
    shrinks with the heads) by tens of percent, both ways. Each round measures the guess side by
    side with the input (:func:`measure_removed`), and the next guess interpolates the measured
    latency against the ratio between the nearest measured points on either side of the target
    (the input itself is the point at ratio 0), extrapolating while none is below. The result
    is the smallest measured ratio that meets the target, else the fastest one measured, with a
    warning. Where the table says the target is out of reach, the first guess is the most the
    allocation removes, and only a measurement refuses."""
    from spa.allocate import search_target

    target = s.options.latency_target
    if target >= model.base_ms:
        s.notes["latency_allocation"].update(predicted_ms_after=round(model.base_ms, 4), measured_ms_after=round(model.base_ms, 4), rounds=[])
        return 0.0
    first = search_target(lambda r: model.predict(size_at(r)), target)
    most = search_target(lambda r: model.predict(size_at(r)), 0.0).ratio  # the table's floor: removing more changes nothing
    ratio, points, history = first.ratio, [(0.0, model.base_ms)], []
    for _ in range(rounds):
        measured = measure_removed(s, model, removed_at(ratio))
        points.append((ratio, measured))
        history.append({"ratio": round(ratio, 4), "predicted_ms": round(model.predict(size_at(ratio)), 4), "measured_ms": round(measured, 4)})
        if target * (1 - UNDER) <= measured <= target * (1 + OVER):
            break
        meets = [p for p in points if p[1] <= target * (1 + OVER)]
        if not meets:
            if ratio >= most - 1e-6:
                break  # nothing more to remove
            r0, m0 = max(points, key=lambda p: p[0])
            slope = (model.base_ms - m0) / r0 if r0 > 0 and model.base_ms > m0 else 0.0
            nxt = min(most, r0 + (m0 - target) / slope) if slope > 0 else most
            nxt = max(nxt, min(most, r0 + 0.02))
        else:
            hi = min(meets, key=lambda p: p[0])  # the least pruning known to meet the target
            lo = max((p for p in points if p[0] < hi[0] and p[1] > target * (1 + OVER)), key=lambda p: p[0], default=points[0])
            nxt = lo[0] + (hi[0] - lo[0]) * (lo[1] - target) / max(lo[1] - hi[1], 1e-9)
            nxt = min(max(nxt, lo[0]), hi[0])
        if any(abs(nxt - p[0]) < 1e-3 for p in points):
            break  # the interpolation asks for a ratio already measured
        ratio = nxt
    meets = [p for p in points[1:] if p[1] <= target * (1 + OVER)]
    chosen = min(meets, key=lambda p: p[0]) if meets else min(points[1:], key=lambda p: p[1])
    s.notes["latency_allocation"].update(predicted_ms_after=round(model.predict(size_at(chosen[0])), 4), measured_ms_after=round(chosen[1], 4),
                                         rounds=history)
    if not meets:
        if not first.met:
            raise UsageError(f"--latency-target {target} ms is out of reach: the most this allocation removes measured "
                             f"{chosen[1]:.3f} ms (the input: {model.base_ms:.3f} ms on {model.runtime})")
        s.warnings.append(f"--latency-target {target} ms: the fastest choice measured {chosen[1]:.3f} ms after {len(history)} rounds "
                          f"(the table predicted {model.predict(size_at(chosen[0])):.3f} ms): latency here does not follow the pruned widths")
    return chosen[0]
