"""The compensation stage of the pipeline: statistics → compensate → output error.

Three steps over the pipeline's ``State`` (``spa.pipeline``), each small:

- :func:`statistics_step` (after *analyze*): the consumer view of the analysed model and the
  moments of every activation a consumer reads — from ``--calibration`` data, or without data
  from BatchNorm statistics, with seeded synthetic inputs (1/f noise images for image inputs,
  ``spa.calibration.synthetic_feeds``) for activations no BatchNorm precedes. The
  compensation-aware and activation criteria read them too.
- :func:`compensate_step` (after *snapshot*, before *prune*): a copy of the canonical model
  with the consumers repaired (``spa.compensation``) becomes the *reference* that surgery
  slices and the mask oracle proves against. With calibration data the consumers are refitted
  level by level (:func:`consumer_levels`), each from what it reads in the reference repaired
  so far against the original's activations (run once and cached on disk,
  ``OriginalCache``); without, all at once from the moments.
- :func:`error_step` (after *oracle*): the measured output error of plain pruning and of the
  compensated pruned model against the original, on the verification inputs and on up to
  ``ERROR_SAMPLES`` calibration samples.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from spa import io
from spa import verify as verify_mod
from spa.analysis.consumers import consumer_view
from spa.analysis.moments import Moments, OriginalCache, bn_proxy, collect, consumer_tensors, exposing_session, filter_correlation, with_filter_correlation
from spa.calibration import open_calibration, synthetic_feeds, synthetic_source
from spa.compensation import Compensation, compensate_model, consumers_by_weight, removed_units
from spa.criteria import get_criterion
from spa.errors import UsageError
from spa.inputs import graph_inputs, resolve_input_shapes

if TYPE_CHECKING:  # pragma: no cover
    from spa.pipeline import State

__all__ = ["COMPENSATE", "DATA_FREE_METHODS", "SYNTHETIC_SAMPLES", "SYNTHETIC_MACS", "SYNTHETIC_RANGE", "synthetic_samples", "ERROR_SAMPLES", "statistics_step", "compensate_step", "error_step", "needs_statistics"]

COMPENSATE = ("none", "data-free", "calibration")
#: Data-free statistics: ``moments`` — the BatchNorm proxy's independent channels (synthetic
#: inputs as measured where no BN precedes); ``udfc`` — the BN proxy's marginals correlated as
#: the producing layer's filters say (UDFC: a removed channel rebuilt from the kept ones it
#: resembles); synthetic statistics keep their measured correlations.
DATA_FREE_METHODS = ("moments", "udfc")
#: Seeded synthetic feeds for the data-free fallback (activations without BatchNorm): how many,
#: and what an image-like input gets (``spa.calibration.SYNTHETIC_KINDS``; other float inputs
#: get standard-normal noise). 1/f noise was measured best (docs/compensation.md, "Synthetic
#: inputs"). ``SYNTHETIC_SAMPLES`` None: as many feeds as ``SYNTHETIC_MACS`` of the model's
#: compute buy, within ``SYNTHETIC_RANGE`` (PP-OCRv4 rec, 0.7 GMAC: 32 feeds, which the
#: refit needed; ResNet-50, 4.1 GMAC: 8, the cost it had). The benchmark's ``--synthetic`` sets these.
SYNTHETIC_SAMPLES: int | None = None
SYNTHETIC_MACS = 24e9
SYNTHETIC_RANGE = (8, 32)
SYNTHETIC = "pink"
#: Calibration samples the output error is also measured on.
ERROR_SAMPLES = 16


def needs_statistics(s: State) -> bool:
    return s.options.compensate != "none" or "moments" in get_criterion(s.options.criterion).needs


def statistics_step(s: State) -> bool:
    o = s.options
    model = s.analysis.model
    s.consumers = consumer_view(s.analysis)
    prunable = {g.id for g in s.analysis.channels.groups if g.prunable}  # nothing else is scored or refitted
    wanted = {c.activation: c.activation_axis for c in s.consumers if c.activation is not None and c.group in prunable}
    calib = open_calibration(o.calibration, model, o.calibration_samples)
    if o.compensate == "calibration" and calib is None:
        raise UsageError("--compensate calibration needs --calibration DATA (a .npz, a folder of .npy files, or feeds from Python)")
    s.calibration = calib
    moments: dict[str, Moments] = {}
    used = 0
    sequential = o.compensate == "calibration" and o.calibration_order == "sequential"
    if calib is not None and sequential and "moments" not in get_criterion(o.criterion).needs:
        pass  # the sequential refit collects its own statistics, layer by layer
    elif calib is not None and o.compensate != "data-free":
        moments, used = collect(model, wanted, calib, path=s.scratch("statistics"), max_samples=o.calibration_samples, seed=o.seed)
    else:
        moments, used = _data_free_moments(s, wanted)
    s.moments = moments
    sources: dict[str, int] = {}
    for m in moments.values():
        sources[m.source] = sources.get(m.source, 0) + 1
    s.notes["statistics"] = {"tensors": len(wanted), "by_source": sources, "samples": used}
    return False


def _data_free_moments(s: State, wanted: Mapping[str, int]) -> tuple[dict[str, Moments], int]:
    """BatchNorm statistics where they reach; seeded synthetic inputs for the rest, except on
    models with integer inputs. Returns the moments and the synthetic samples run."""
    o, model = s.options, s.analysis.model
    values = consumer_tensors(model, wanted.items())
    memo: dict[str, Any] = {}
    moments: dict[str, Moments] = {}
    for name, axis in wanted.items():
        v = values.get(name)
        m = bn_proxy(v, axis, memo) if v is not None else None
        if m is not None:
            moments[name] = m
    rest = {n: a for n, a in wanted.items() if n not in moments}
    integer = [v.name for v in graph_inputs(model) if v.dtype is not None and not v.dtype.is_floating_point()]
    if rest and not integer:
        shapes = resolve_input_shapes(model, o.input_shapes)
        feeds = synthetic_feeds(model, shapes, kind=SYNTHETIC, samples=synthetic_samples(s), seed=o.seed, values=o.input_values)
        source = synthetic_source(model, shapes, SYNTHETIC, o.input_values)
        found, used = collect(model, rest, feeds, path=s.scratch("statistics"), source=source, seed=o.seed)
        moments.update(found)
    else:
        used = 0
    if o.data_free_method == "udfc":
        # Only where the statistics carry no correlations (the BN proxy's independent channels):
        # synthetic inputs measure them, and replacing those by the filters' was worse on PP-OCR.
        for name, m in list(moments.items()):
            R = filter_correlation(values[name], wanted[name]) if name in values and m.independent else None
            if R is not None and R.shape[0] == m.mean.shape[0]:
                moments[name] = with_filter_correlation(m, R)
    if rest and integer:
        # Random token ids / masks say nothing about real activations: measured on MiniLM,
        # compensating from them made the embeddings worse than not compensating at all.
        s.warnings.append(
            f"data-free: {len(rest)} consumer inputs have no BatchNorm statistics and the model has integer inputs "
            f"({', '.join(integer)}), so no synthetic fallback: they are not compensated (give --calibration)"
        )
    return moments, used


def synthetic_samples(s: State) -> int:
    """How many synthetic feeds the data-free fallback runs: ``SYNTHETIC_SAMPLES`` when set,
    else ``SYNTHETIC_MACS`` / the model's MACs, clamped to ``SYNTHETIC_RANGE`` (the low end
    where the cost is unknown)."""
    if SYNTHETIC_SAMPLES is not None:
        return int(SYNTHETIC_SAMPLES)
    lo, hi = SYNTHETIC_RANGE
    try:
        macs = int(s.analysis.cost.count().macs)
    except Exception:  # noqa: BLE001 - an unknown cost (dynamic shapes) is no reason to fail
        return lo
    return int(min(max(SYNTHETIC_MACS // max(macs, 1), lo), hi))


def compensate_step(s: State) -> bool:
    # A clone of the canonical model (what the snapshot holds) rather than the snapshot read
    # back: it shares the tensors, which compensation replaces and never writes into.
    reference = s.model.clone()
    if s.calibration is not None and s.options.compensate == "calibration" and s.options.calibration_order == "sequential":
        result = _sequential(s, reference)
    else:
        result = compensate_model(reference, s.plan, s.consumers, s.moments, damp=s.options.damp)
    s.compensation = result
    if result.new_edits:
        s.surgery_plan = dataclasses.replace(s.plan, tensors=[*s.plan.tensors, *result.new_edits])
    # Kept in memory: prune slices a clone and the oracle masks another; the file at
    # reference_path is written only if the oracle must cut parts from it (verify.prove).
    s.reference_path = s.scratch("compensated")
    s.reference_model = reference
    return True


def consumer_levels(model: ir.Model, keys: Iterable[tuple[str, str]], activation: Mapping[tuple[str, str], str | None]) -> dict[tuple[str, str], int]:
    """How many refitted consumers lie on the longest path to each consumer's input: the
    consumers of one level do not feed each other, so one ORT pass serves them all."""
    refitted = {node for node, _ in keys}
    depth: dict[str, int] = {}
    for node in model.graph:
        d = max((depth.get(v.name, 0) for v in node.inputs if v is not None), default=0)
        for out in node.outputs:
            depth[out.name] = d + (node.name in refitted)
    return {k: depth.get(activation[k] or "", 0) for k in keys}


def _sequential(s: State, reference: ir.Model) -> Compensation:
    """Refit the consumers level by level, each from the inputs it sees in the reference
    repaired so far (x̂) against the original's (x) on the calibration data (OBC/SparseGPT's
    sequential order: upstream error is compensated downstream, not compounded).

    The original runs once: its sampled activations for every level are cached on disk
    (:class:`~spa.analysis.moments.OriginalCache`), so a level runs only the reference."""
    keys = consumers_by_weight(s.consumers, removed_units(s.plan))
    activation = {k: cs[0].activation for k, cs in keys.items()}
    axis = {k: cs[0].activation_axis for k, cs in keys.items()}
    levels = consumer_levels(reference, keys, activation)
    order = sorted(set(levels.values()))
    batches = [sorted(k for k, lv in levels.items() if lv == level) for level in order]
    tensors = [{activation[k]: axis[k] for k in batch if activation[k] is not None} for batch in batches]
    wanted = {n: a for lv in tensors for n, a in lv.items()}
    original = exposing_session(s.analysis.model, wanted, s.scratch("sequential-original"))
    cache = OriginalCache(original, tensors, s.calibration, s.scratch("sequential-cache").parent, seed=s.options.seed)
    del original
    fixes, edits = [], []
    try:
        for k, batch in enumerate(batches):
            pairs = cache.pairs(k, reference, s.calibration, path=s.scratch("sequential"))
            part = compensate_model(reference, s.plan, s.consumers, pairs, damp=s.options.damp, only=set(batch))
            fixes += part.fixes
            edits += part.new_edits
    finally:
        cache.close()
    s.notes["compensation_levels"] = len(order)
    return Compensation(fixes, edits)


def _relative_error(ref: list[np.ndarray], got: list[np.ndarray]) -> float:
    num = den = 0.0
    for r, g in zip(ref, got):
        r = np.asarray(r, dtype=np.float64)
        g = np.asarray(g, dtype=np.float64)
        if r.dtype.kind != "f" or r.shape != g.shape:
            continue
        num += float(np.sum((r - g) ** 2))
        den += float(np.sum(r**2))
    return float(np.sqrt(num / den)) if den > 0 else float(np.sqrt(num))


#: Below this many bytes of weights the masked scratch model goes to ORT as bytes, not through
#: a file (protobuf's 2 GiB cap): the write is a large part of a scratch save on a ResNet-50.
#: (``SessionOptions.add_initializer`` on the snapshot would avoid the copy, but ORT's
#: ENABLE_ALL layout transforms ignore it for Conv weights: measured, the override is lost.)
IN_MEMORY_BYTES = 1 << 30


def _in_memory_session(model: ir.Model) -> Any | None:
    """An ORT session on ``model`` serialized in memory (``verify.session``'s options), or None
    when the model is too large for one protobuf message or ORT refuses it (the caller then
    writes a file, whose failure ``verify.session`` names)."""
    import onnxruntime as ort

    tensors = [v.const_value for v in model.graph.initializers.values() if v.const_value is not None]
    if sum(int(t.nbytes) for t in tensors) > IN_MEMORY_BYTES:
        return None
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(ir.to_proto(model).SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception:  # noqa: BLE001 - ORT's own types
        return None


def error_step(s: State) -> bool:
    """Relative L2 output error ‖y − y₀‖/‖y₀‖ of plain pruning (the original with the removed
    slices zeroed) and of the compensated pruned model, against the original.

    The outputs on the verification inputs that the snapshot (original) and the oracle
    (pruned) already ran are reused (``State.feeds_outputs``); the other sessions open only
    for calibration samples."""
    plain = s.analysis.model.clone()  # the snapshot's model; mask_model replaces tensors, never writes them
    verify_mod.mask_model(plain, s.plan)
    masked = _in_memory_session(plain)
    if masked is None:
        plain_path = s.scratch("plain-masked")
        io.save_model(plain, plain_path, durable=False)
        masked = verify_mod.session(plain_path)
    del plain
    opened: dict[str, Any] = {}

    def outputs(which: str, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        known = s.feeds_outputs.get(which)
        if feed is s.feeds and known is not None:
            return known
        if which not in opened:
            opened[which] = verify_mod.session(s.snapshot_path if which == "original" else s.pruned_path)
        return verify_mod.run(opened[which], feed)

    sets: dict[str, list[dict[str, np.ndarray]]] = {"verification": [s.feeds]} if s.feeds else {}
    if s.calibration is not None:
        sets["calibration"] = list(itertools.islice(iter(s.calibration), ERROR_SAMPLES))
    out: dict[str, Any] = {}
    for label, feeds in sets.items():
        before = after = 0.0
        for feed in feeds:
            y0, y1, y2 = outputs("original", feed), verify_mod.run(masked, feed), outputs("pruned", feed)
            before += _relative_error(y0, y1)
            after += _relative_error(y0, y2)
        n = max(len(feeds), 1)
        out[label] = {"samples": len(feeds), "error_before": before / n, "error_after": after / n}
    summary = s.compensation.summary()
    summary["measured"] = out
    summary["method"] = s.options.compensate
    s.compensation_report = summary
    return False
