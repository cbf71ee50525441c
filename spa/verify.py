"""Verification: the ONNX checker, ONNX Runtime, and the mask-equivalence oracle.

The oracle (DESIGN.md): in the *original* model, zero the slices of every consumer weight
that reads a removed channel (the IN axes of the plan); run it and the pruned model in ONNX
Runtime on the same seeded random inputs; the outputs must match. This proves the surgery
exact for any architecture without labels. (ORT's ``SessionOptions.add_initializer`` does not
override a plain initializer — measured — so the masked reference is written as a model.)

Differences are measured against the scale of each output: ``|p - m| <= atol + rtol·max|m|``
(element-wise relative error is meaningless next to zero crossings of large activations).
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import pathlib
import re
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from spa.errors import NonFiniteOutputError, UnsupportedError, UsageError, VerificationError
from spa.planning import Plan
from spa.graph import all_initializers
from spa.rules.quantize import weight_zero_point

__all__ = [
    "OracleResult",
    "parse_input_shapes",
    "parse_input_values",
    "make_inputs",
    "session",
    "run",
    "run_oracle",
    "check_model_file",
    "measure_latency",
    "measure_side_by_side",
    "Latency",
    "check_pruned",
    "prove",
    "blame",
]

logger = logging.getLogger(__name__)

RTOL = 1e-4
ATOL = 1e-5

@dataclasses.dataclass
class OracleResult:
    max_abs_diff: float
    max_scaled_diff: float
    passed: bool
    per_output: dict[str, float]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def parse_input_shapes(specs: Sequence[str]) -> dict[str, list[int]]:
    """``["x:1x3x224x224", …]`` → ``{"x": [1, 3, 224, 224]}`` (UsageError on bad syntax)."""
    out: dict[str, list[int]] = {}
    for spec in specs:
        m = re.fullmatch(r"\s*([^:]+):(\d+(?:[x,]\d+)*)\s*", spec)
        if not m:
            raise UsageError(f"--input-shape '{spec}' is not NAME:DxDx… (e.g. input:1x3x224x224)")
        out[m.group(1)] = [int(d) for d in re.split(r"[x,]", m.group(2))]
    return out


def parse_input_values(specs: Sequence[str]) -> dict[str, float]:
    """``["sr=16000"]`` → ``{"sr": 16000.0}``: inputs filled with a constant (a sample rate, a flag)."""
    out: dict[str, float] = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        try:
            if not sep or not name.strip():
                raise ValueError
            out[name.strip()] = float(value)
        except ValueError:
            raise UsageError(f"--input-value '{spec}' is not NAME=NUMBER (e.g. sr=16000)") from None
    return out


def session(path: str | os.PathLike, threads: int = 0, *, pruned: bool = False):
    """An ORT CPU session on a model file (a path: external data works at any size).

    A model ORT cannot load is the input's fault (UnsupportedError: verify with
    ``--verify check`` instead) or, for a pruned model, a verification failure.
    """
    import onnxruntime as ort  # imported when verifying only: it is ~20 MB of resident memory

    ort.set_default_logger_severity(3)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    # Idle worker threads spin by default; with sessions alternating on few cores a spinning
    # session steals CPU from the one being timed.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        so.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        if pruned:
            raise VerificationError(f"ONNX Runtime cannot load the pruned model: {first}") from e
        raise UnsupportedError(f"ONNX Runtime cannot load the model, so it cannot be verified ({first}); use --verify check") from e


def run(sess, feeds: Mapping[str, np.ndarray], *, pruned: bool = False) -> list[np.ndarray]:
    try:
        return sess.run(None, dict(feeds))
    except Exception as e:  # noqa: BLE001
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        if pruned:
            raise VerificationError(f"ONNX Runtime fails to run the pruned model: {first}") from e
        raise UsageError(f"ONNX Runtime fails to run the model on random inputs ({first}); give --input-shape NAME:DxD…") from e


def make_inputs(
    sess, shapes: Mapping[str, Sequence[int]] | None = None, seed: int = 0, values: Mapping[str, float] | None = None
) -> dict[str, np.ndarray]:
    """Seeded random inputs for an ORT session's inputs: :mod:`spa.inputs` decides every size
    (``resolve_input_shapes``: one value per symbol, 1 when first seen on axis 0 and 64
    elsewhere, given shapes checked) and draws the values (``make_feeds``)."""
    from spa.inputs import make_feeds, resolve_input_shapes

    ort_inputs = sess.get_inputs()
    graph = ir.Graph(
        inputs=[ir.Value(name=i.name, shape=_ort_shape(i.shape)) for i in ort_inputs], outputs=[], nodes=[], name="inputs"
    )
    resolved = resolve_input_shapes(graph, shapes)
    return make_feeds({i.name: i.type for i in ort_inputs}, resolved, seed, values)


def _ort_shape(dims) -> ir.Shape | None:
    """ORT's ``NodeArg.shape`` (ints, symbol strings, None) as an ``ir.Shape``."""
    if dims is None:
        return None
    return ir.Shape([d if isinstance(d, int) and d >= 0 else (d if isinstance(d, str) and d else None) for d in dims])


def _masked(array: np.ndarray, edit, zero: tuple[np.ndarray, int] | None = None) -> np.ndarray:
    """Copy of ``array`` with its removed IN slices set to the value that means zero.

    For a float weight that is 0; for a quantized weight it is the zero point (per tensor, or
    per channel along ``zero[1]``), so the slice dequantizes to exactly 0.
    """
    out = np.array(array, copy=True)
    for a, roles in edit.roles.items():
        if "in" not in roles:
            continue
        removed = np.setdiff1d(np.arange(edit.shape[a]), np.asarray(edit.kept[a], dtype=np.int64))
        idx = [slice(None)] * out.ndim
        idx[a] = removed
        fill = np.zeros((), out.dtype)
        if zero is not None:
            zp, zp_axis = zero
            if zp.ndim == 0 or zp.size == 1:
                fill = zp.reshape(()).astype(out.dtype)
            else:
                shape = [1] * out.ndim
                shape[zp_axis] = zp.size
                fill = np.broadcast_to(zp.reshape(shape).astype(out.dtype), out.shape)[tuple(idx)]
        out[tuple(idx)] = fill
    return out


def _zero_point(value: ir.Value) -> tuple[np.ndarray, int] | None:
    for node, index in value.uses():
        spec = weight_zero_point(node, index)  # the per-op table lives with the quantize rules
        if spec is None:
            continue
        zp_index, axis = spec
        zp = node.inputs[zp_index] if zp_index < len(node.inputs) else None
        if zp is None or zp.const_value is None:
            return None
        rank = len(value.shape)
        return zp.const_value.numpy(), axis % rank
    return None


def masked_weights(plan: Plan, load) -> dict[str, np.ndarray]:
    """Original float initializers with every removed IN slice zeroed (the oracle's reference)."""
    return {e.name: _masked(load(e.name), e) for e in plan.tensors if any("in" in r for r in e.roles.values())}


def mask_model(model: ir.Model, plan: Plan) -> None:
    """Zero every removed IN slice of ``model``'s initializers, lazily: each masked tensor is
    computed when it is saved, so only one is in memory at a time."""
    inits = all_initializers(model.graph)
    for edit in plan.tensors:
        if not any("in" in r for r in edit.roles.values()):
            continue
        value = inits[edit.name]
        source = value.const_value
        zero = _zero_point(value)

        def compute(source=source, edit=edit, zero=zero) -> ir.Tensor:
            return ir.tensor(_masked(source.numpy(), edit, zero), name=edit.name)

        value.const_value = ir.LazyTensor(compute, dtype=source.dtype, shape=source.shape, name=edit.name)


def run_oracle(
    reference_path: str | os.PathLike,
    pruned_path: str | os.PathLike,
    feeds: Mapping[str, np.ndarray],
    *,
    rtol: float = RTOL,
    atol: float = ATOL,
    outputs: dict[str, list[np.ndarray]] | None = None,
) -> OracleResult:
    """``outputs``, when given, receives the pruned model's outputs under ``pruned``."""
    reference = session(reference_path)
    names = [o.name for o in reference.get_outputs()]
    ref_out = run(reference, feeds)
    del reference  # one model in memory at a time
    got_out = run(session(pruned_path, pruned=True), feeds, pruned=True)
    if outputs is not None:
        outputs["pruned"] = got_out
    per_output = {}
    worst_abs = worst_scaled = 0.0
    passed = True
    for name, r, g in zip(names, ref_out, got_out):
        r = np.asarray(r)
        g = np.asarray(g)
        if r.shape != g.shape or r.dtype != g.dtype:
            raise VerificationError(f"output '{name}' changed from {r.dtype}{list(r.shape)} to {g.dtype}{list(g.shape)}")
        if r.dtype.kind not in "fc":
            diff = float(np.count_nonzero(r != g))
            scaled = diff
            ok = diff == 0
        else:
            rr, gg = r.astype(np.float64), g.astype(np.float64)
            diff = float(np.max(np.abs(rr - gg))) if r.size else 0.0
            scale = float(np.max(np.abs(rr))) if r.size else 0.0
            scaled = diff / max(scale, 1e-30)
            ok = bool(np.isfinite(diff) and diff <= atol + rtol * scale)
        per_output[name] = diff
        worst_abs = max(worst_abs, diff)
        worst_scaled = max(worst_scaled, scaled)
        passed &= ok
    return OracleResult(worst_abs, worst_scaled, passed, per_output)


def check_model_file(path: str | os.PathLike) -> None:
    """The ONNX checker with full shape checking, on a path (works for external data)."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:  # noqa: BLE001 - the checker raises several types
        raise VerificationError(f"the pruned model fails the ONNX checker: {str(e).splitlines()[0]}") from e


@dataclasses.dataclass
class Latency:
    """Side-by-side latency of models run round-robin: per-model median and p10–p90 (ms),
    and whether the last model differs from the first beyond the measurement's spread."""

    median_ms: list[float]
    p10_p90_ms: list[tuple[float, float]]
    #: p10–p90 of the per-round ratio first/last (>1: the last model is faster).
    ratio_p10_p90: tuple[float, float]

    @property
    def significant(self) -> bool:
        lo, hi = self.ratio_p10_p90
        return lo > 1.0 or hi < 1.0


def measure_side_by_side(
    paths: Sequence[str | os.PathLike], feeds: Mapping[str, np.ndarray], *, budget_s: float = 2.0, min_runs: int = 5, threads: int = 0
) -> Latency:
    """ORT latency of each model file, measured side by side (:func:`time_side_by_side`).
    Thread spinning is off (see :func:`session`)."""
    sessions = [session(p, threads=threads, pruned=i > 0) for i, p in enumerate(paths)]
    for i, s in enumerate(sessions):  # warm-up, and the first run's errors named properly
        run(s, feeds, pruned=i > 0)
    return time_side_by_side([lambda s=s: s.run(None, dict(feeds)) for s in sessions], budget_s=budget_s, min_runs=min_runs)


def time_side_by_side(runners: Sequence[Callable[[], object]], *, budget_s: float = 2.0, min_runs: int = 5) -> Latency:
    """Latency of each callable (warmed up by the caller), measured side by side: runs
    interleave round-robin and the order rotates every round, so machine noise (and the
    model-after-model slowdown of ORT's thread pools) hits every one alike. The ratio spread
    is first over last."""
    times: list[list[float]] = [[] for _ in runners]
    start = time.perf_counter()
    rounds = 0
    n = len(runners)
    while rounds < min_runs or (time.perf_counter() - start < budget_s and rounds < 1000):
        for k in range(n):
            i = (rounds + k) % n
            t0 = time.perf_counter()
            runners[i]()
            times[i].append((time.perf_counter() - t0) * 1e3)
        rounds += 1
    arr = [np.asarray(t) for t in times]
    ratio = arr[0] / arr[-1]
    return Latency(
        median_ms=[round(float(np.median(t)), 4) for t in arr],
        p10_p90_ms=[(round(float(np.percentile(t, 10)), 4), round(float(np.percentile(t, 90)), 4)) for t in arr],
        ratio_p10_p90=(round(float(np.percentile(ratio, 10)), 4), round(float(np.percentile(ratio, 90)), 4)),
    )


def measure_latency(paths: Sequence[str | os.PathLike], feeds: Mapping[str, np.ndarray], **kw) -> list[float]:
    """Median latency (ms) of each model, side by side (see :func:`measure_side_by_side`)."""
    return measure_side_by_side(paths, feeds, **kw).median_ms


# ---------------------------------------------------------------------------------------------
# The verification stage: checker, oracle, and blame — on files, never through the pipeline.
# ---------------------------------------------------------------------------------------------


def check_pruned(original_path: str | os.PathLike, pruned_path: str | os.PathLike) -> str | None:
    """The ONNX checker on the pruned model. A failure the input model already has (an op the
    checker calls deprecated but ORT runs, …) is returned as a note, not blamed on pruning."""
    try:
        check_model_file(pruned_path)
        return None
    except VerificationError as pruned_error:
        try:
            check_model_file(original_path)
        except VerificationError:
            return f"the input model already fails the ONNX checker ({str(pruned_error).split(': ', 1)[-1]})"
        raise


def oracle_files(original_path: str | os.PathLike, pruned_path: str | os.PathLike, plan: Plan, feeds, masked_path: pathlib.Path, *, outputs=None,
                 model: ir.Model | None = None) -> OracleResult:
    """Write the masked reference (the original with every removed consumer slice zeroed)
    and compare it with the pruned model in ORT. ``model``: the original in memory, used
    instead of reading ``original_path`` (a clone is masked; mask_model replaces tensors)."""
    reference = model.clone() if model is not None else ir.load(os.fspath(original_path))
    mask_model(reference, plan)
    from spa import io  # late: io imports this module's neighbours

    io.save_model(reference, masked_path, durable=False)
    del reference
    gc.collect()  # onnx-ir's reference cycles would keep the masked weights alive
    return run_oracle(masked_path, pruned_path, feeds, outputs=outputs)


def prove(analysis, plan: Plan, original_path: pathlib.Path, pruned_path: pathlib.Path, feeds, scratch, *, outputs=None,
          model: ir.Model | None = None) -> dict:
    """The mask-equivalence oracle over the whole plan, as a report entry.

    ``analysis`` is the (unmutated) analysis of the model at ``original_path``; ``scratch(name)``
    gives a scratch file path. With inexact groups the whole-model comparison is a report, not
    a proof, so the exact groups are proven on their own. A failure names the first group
    that fails alone (each re-planned from ``analysis`` and cut from the original file).
    ``outputs`` (a dict) receives the pruned model's outputs on ``feeds`` (``run_oracle``).
    ``model``: the original in memory, with ``original_path`` not yet written: the whole-model
    comparison masks it directly, and the file is written only where a part must be cut from it.
    """
    result = oracle_files(original_path, pruned_path, plan, feeds, scratch("masked"), outputs=outputs, model=model)
    if model is not None and (not result.passed or any(g.removed and g.inexact for g in plan.groups)):
        from spa import io

        io.save_model(model, original_path, durable=False)
    if not result.passed:
        _refuse_nonfinite(analysis.source, original_path, feeds)
    inexact = sorted({g.id for g in plan.groups if g.removed and g.inexact})
    out = result.to_json() | {"inexact_groups": inexact, "asserted": not inexact}
    if inexact:
        part = _prove_part(analysis, plan, lambda g: not g.inexact, original_path, feeds, scratch)
        out["exact_part"] = None if part is None else {"max_abs_diff": part.max_abs_diff, "passed": part.passed}
        if part is not None and not part.passed:
            raise VerificationError(f"mask-equivalence oracle failed in the exact groups: max difference {part.max_abs_diff:.3g}")
    if not result.passed and not inexact:
        culprit = blame(analysis, plan, original_path, feeds, scratch)
        where = f"group {culprit}" if culprit else "the groups together (each alone passes)"
        raise VerificationError(
            f"mask-equivalence oracle failed in {where}: max difference {result.max_abs_diff:.3g} "
            f"(scaled {result.max_scaled_diff:.3g})",
            group=culprit,
            max_diff=result.max_abs_diff,
        )
    return out


def _refuse_nonfinite(source: str, original_path: pathlib.Path, feeds) -> None:
    """A NaN/inf the original model itself produces is not the surgery's fault, and no
    comparison proves anything on it: say so, naming the output (NonFiniteOutputError)."""
    sess = session(original_path)
    names = [o.name for o in sess.get_outputs()]
    for name, out in zip(names, run(sess, feeds)):
        arr = np.asarray(out)
        if arr.dtype.kind in "fc" and arr.size and not np.all(np.isfinite(arr)):
            bad = int(np.count_nonzero(~np.isfinite(arr)))
            raise NonFiniteOutputError(
                f"{source}: the original model already produces NaN/inf on output '{name}' ({bad} of {arr.size} "
                "values) for the verification inputs, so the oracle cannot compare it with the pruned model "
                "(a BatchNormalization with a negative variance?); fix the model or use --verify check"
            )


def _prove_part(analysis, plan: Plan, keep, original_path: pathlib.Path, feeds, scratch) -> OracleResult | None:
    """The oracle on the sub-plan of the groups ``keep`` accepts (None: nothing to prove, or
    the plan's groups are not this analysis's)."""
    from spa import io
    from spa.passes.prune import PrunePass
    from spa.planning import build_plan

    ids = {g.id for g in analysis.channels.groups}
    chosen = {g.id: np.asarray(g.removed) for g in plan.groups if g.removed and keep(g)}
    if not chosen or not chosen.keys() <= ids:
        return None
    sub = build_plan(analysis.model, analysis.channels, chosen, fingerprints=False)
    model = io.load_model(original_path)
    PrunePass(sub)(model)
    part_path = scratch("part")
    io.save_model(model, part_path, durable=False)
    del model
    return oracle_files(original_path, part_path, sub, feeds, scratch("part-masked"))


def blame(analysis, plan: Plan, original_path: pathlib.Path, feeds, scratch) -> str | None:
    """The first group whose pruning alone fails the oracle."""
    for g in plan.groups:
        if not g.removed:
            continue
        try:
            part = _prove_part(analysis, plan, lambda x, gid=g.id: x.id == gid, original_path, feeds, scratch)
        except VerificationError:
            return g.id
        if part is None:
            return None
        if not part.passed:
            return g.id
    return None
