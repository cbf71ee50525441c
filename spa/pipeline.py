"""The pipeline, readable top to bottom in one place (:func:`default_steps`).

    load → canonicalize → analyze → statistics → gradients → score → allocate → plan │ snapshot → check-upgrade
         → compensate → prune → measure → check → oracle → error → fold → lowrank → benchmark → restore-opset → report → save

Every entry is a :class:`~spa.passes.manager.Step` run by the pass manager over one
:class:`State`; later stages (lowrank, fold, emit) are new entries in that list, as compensation's three
steps (statistics, compensate, error; ``spa.passes.compensate``) are.
``spa.plan`` runs the steps up to ``plan`` (no surgery); ``spa.prune`` runs them all;
``spa.apply`` replaces score/allocate/plan by a saved plan.

The model before surgery stays readable after it: ``State.analysis`` (the canonical input
model with its channel graph and cost) is never mutated — surgery works on a copy read back
from the snapshot on disk — so verification, and compensation later, can read the original
consumer weights and the removed slices.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from spa import io
from spa import verify as verify_mod
from spa.allocate import allocate, search_target
from spa.analysis.channels import ChannelGraph, analyze_channels
from spa.analysis.cost import Cost, CostModel
from spa.criteria import CriterionInputs, get_criterion, score_groups
from spa.errors import PlanMismatchError, UnsupportedError, UsageError
from spa.graph import add_note, all_initializers, notes as model_notes
from spa.compensation import DAMP
from spa.passes import compensate as compensate_mod
from spa.passes import gradients as gradients_mod
from spa import latency_target
from spa.passes import emit as emit_mod
from spa.passes import upgrade_opset
from spa.passes.canonicalize import CanonicalizePass
from spa.passes.compensate import COMPENSATE, DATA_FREE_METHODS
from spa.passes.manager import PassManager, Step, TimingInstrument
from spa.passes.prune import PrunePass
from spa.passes import fold as fold_mod
from spa.passes import lowrank_step as lowrank_mod
from spa.factorize import LOWRANK_MODES, check_energy, check_rank
from spa.plan_schema import PLAN_OPTION_KEYS
from spa.planning import Plan, build_plan
from spa.report import Report, Timer
from spa.rules.base import Role
from spa.rules.registry import resolve_rules

__all__ = [
    "PruneOptions",
    "PruneResult",
    "Analysis",
    "State",
    "default_steps",
    "explain",
    "load",
    "analyze",
    "prune",
    "plan",
    "apply",
    "lowrank",
]

logger = logging.getLogger(__name__)

ModelSource = str | os.PathLike | onnx.ModelProto | ir.Model
VERIFY_LEVELS = ("full", "check", "none")


@dataclasses.dataclass
class PruneOptions:
    ratio: float = 0.5
    criterion: str = "l1"
    allocation: str = "uniform"
    min_keep: float = 0.1
    #: Kept channel counts are multiples of this; None: 1, or the target's vector width with --target.
    round_to: int | None = None
    flops_target: float | None = None
    seed: int = 0
    input_shapes: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    input_values: dict[str, float] = dataclasses.field(default_factory=dict)
    allow_inexact: bool = False
    verify: str = "full"
    benchmark: bool = True
    #: Write the output at the input's opset (7–10) where the version converter can go back.
    keep_opset: bool = False
    #: Keep initializers that are also graph inputs as overridable inputs (their channels frozen).
    keep_weight_inputs: bool = False
    #: Repair the consumers of removed channels: none | data-free | calibration (spa.compensation).
    compensate: str = "none"
    #: Calibration data (a .npz, a folder of .npy files, or an iterable of feed dicts).
    calibration: Any = None
    calibration_samples: int = 128
    #: sequential: refit layer by layer from the repaired upstream (default); parallel: every
    #: layer from the original's statistics in one pass (faster, measured worse: docs/compensation.md).
    calibration_order: str = "sequential"
    #: Ridge damping of the compensation's least squares, relative to mean(diag H).
    damp: float = DAMP
    #: Data-free statistics: moments (channels independent) | udfc (correlated as the
    #: producing layer's filters say; spa.passes.compensate.DATA_FREE_METHODS).
    data_free_method: str = "moments"
    #: Per-call channel rules for custom ops (any form ``spa.rules.registry.resolve_rules``
    #: accepts); looked up before the registry. Not a plan option: a plan records their effect.
    rules: Sequence[Any] | Mapping[Any, Any] | None = None
    #: Keep ≤ F of the original parameters (``--lowrank auto`` only: the combined allocator).
    params_target: float | None = None
    #: Low-rank factorization: none | energy (every layer at ``lowrank_energy``) | auto (the
    #: combined allocator meets --flops-target/--params-target; spa.lowrank_alloc).
    lowrank: str = "none"
    lowrank_energy: float = 0.95
    #: weight name → rank: the allocator's choice, recorded in the plan so ``apply`` replays it.
    lowrank_ranks: dict[str, int] | None = None
    #: Exact folding passes after surgery (BN, per-channel Mul/Add, linear pairs, no-ops).
    fold: bool = False
    #: Memory ceiling for analysis in bytes (``--max-memory``): a model whose declared tensors
    #: need more is refused at load (spa.safety). None: half of the machine's RAM.
    max_memory: int | None = None
    #: Emit for a device (spa.kernels): onnx (the ONNX file only) | llvm [-mcpu=…] | cuda [-arch=…] | …
    target: str = "onnx"
    #: MetaSchedule trials for the whole model (0: default schedules); records in ``tuning_db``.
    tune_trials: int = 0
    tuning_db: str | None = None
    #: A TVM RPC tracker (HOST:PORT) and device key: tuning and latency runs on that device.
    rpc_tracker: str | None = None
    rpc_key: str | None = None
    #: Keep the predicted latency on the target ≤ this many ms (the ratio is searched from a
    #: measured per-layer table: spa.latency_target). A plan option.
    latency_target: float | None = None

    def validate(self) -> None:
        if self.latency_target is not None and not self.latency_target > 0:
            raise UsageError(f"latency-target must be > 0 ms, got {self.latency_target}")
        emit_mod.validate_options(self)
        if self.round_to is None:
            self.round_to = emit_mod.default_round_to(self)
        if not 0.0 <= self.ratio < 1.0:
            raise UsageError(f"ratio must be in [0, 1), got {self.ratio}")
        if self.flops_target is not None and not 0.0 < self.flops_target <= 1.0:
            raise UsageError(f"flops-target must be in (0, 1], got {self.flops_target}")
        if self.verify not in VERIFY_LEVELS:
            raise UsageError(f"verify must be one of {', '.join(VERIFY_LEVELS)}")
        if self.compensate not in COMPENSATE:
            raise UsageError(f"compensate must be one of {', '.join(COMPENSATE)}, got {self.compensate!r}")
        if self.calibration_order not in ("sequential", "parallel"):
            raise UsageError(f"calibration_order must be sequential or parallel, got {self.calibration_order!r}")
        if self.calibration_samples < 1:
            raise UsageError(f"calibration-samples must be ≥ 1, got {self.calibration_samples}")
        if self.data_free_method not in DATA_FREE_METHODS:
            raise UsageError(f"data_free_method must be one of {', '.join(DATA_FREE_METHODS)}, got {self.data_free_method!r}")
        if not 0.0 <= self.damp < 1e6:
            raise UsageError(f"damp must be ≥ 0, got {self.damp}")
        get_criterion(self.criterion)
        resolve_rules(self.rules)  # a custom rule that is not one is refused before any work
        if self.max_memory is not None and self.max_memory < 1:
            raise UsageError(f"max-memory must be at least one byte, got {self.max_memory}")
        if self.lowrank not in LOWRANK_MODES:
            raise UsageError(f"lowrank must be one of {', '.join(LOWRANK_MODES)}, got {self.lowrank!r}")
        check_energy(self.lowrank_energy)
        if self.params_target is not None and not 0.0 < self.params_target <= 1.0:
            raise UsageError(f"params-target must be in (0, 1], got {self.params_target}")
        if self.params_target is not None and self.lowrank != "auto":
            raise UsageError("--params-target needs --lowrank auto (pruning alone searches --flops-target)")
        if self.lowrank == "auto" and self.lowrank_ranks is None and (self.flops_target is None) == (self.params_target is None):
            raise UsageError("--lowrank auto needs one of --flops-target or --params-target")
        for w, r in (self.lowrank_ranks or {}).items():
            check_rank(r, f"lowrank rank for '{w}'")

    def plan_options(self) -> dict[str, Any]:
        """The options that decide the plan (recorded in it; verification ones are not)."""
        return {k: getattr(self, k) for k in PLAN_OPTION_KEYS}


@dataclasses.dataclass
class PruneResult:
    model: ir.Model
    report: Report
    plan: Plan
    #: ``target=`` other than onnx: the compiled library (``save`` writes it beside the ONNX,
    #: named ``OUT.<target>.so``; ``spa.kernels.load`` runs it).
    module: emit_mod.ModuleArtifact | None = None

    def save(self, path: str | os.PathLike, **kw) -> pathlib.Path:
        written = io.save_model(self.model, path, **kw)
        if self.module is not None:
            self.module.write(emit_mod.module_path_for(pathlib.Path(os.path.abspath(path)), self.module.suffix))
        return written


@dataclasses.dataclass
class Analysis:
    """The canonical input model with its channel graph and cost model. Nothing mutates it:
    it describes the model before surgery for as long as it lives."""

    model: ir.Model
    source: str
    sha256: str | None
    channels: ChannelGraph
    cost: CostModel


@dataclasses.dataclass
class State:
    """Everything the steps share. Steps read what earlier steps wrote, in list order."""

    source: ModelSource
    options: PruneOptions
    plan: Plan | None = None
    #: Where ``save`` writes (the CLI's -o and --report); nothing is written when None.
    output_path: pathlib.Path | None = None
    report_path: pathlib.Path | None = None
    source_path: str | None = None
    in_place: bool = False
    #: The model the next step works on: the canonical input, then (after ``prune``) a pruned copy.
    model: ir.Model | None = None
    source_desc: str = ""
    sha256: str | None = None
    analysis: Analysis | None = None
    scores: dict[str, np.ndarray] | None = None
    removed: dict[str, np.ndarray] | None = None
    notes: dict[str, Any] = dataclasses.field(default_factory=dict)
    warnings: list[str] = dataclasses.field(default_factory=list)
    workdir: pathlib.Path | None = None
    snapshot_path: pathlib.Path | None = None
    pruned_path: pathlib.Path | None = None
    feeds: dict[str, np.ndarray] | None = None
    cost_after: Cost | None = None
    oracle: dict[str, Any] | None = None
    latency: verify_mod.Latency | None = None
    report: Report | None = None
    #: Compensation: the consumer view and activation moments (``statistics``), the result of
    #: ``compensate``, the reference it wrote (surgery slices it, the oracle proves against
    #: it), the plan surgery runs (the plan plus created biases), the measured errors.
    consumers: Any = None
    moments: dict[str, Any] | None = None
    #: Gradient criteria: per weight, the quantity the criterion needs (``gradients`` step).
    gradients: dict[str, np.ndarray] | None = None
    calibration: Any = None
    compensation: Any = None
    reference_path: pathlib.Path | None = None
    #: The same reference in memory (``reference_path`` written only if the oracle needs the
    #: file): ``prune`` slices a clone of it, the oracle masks another.
    reference_model: ir.Model | None = None
    #: Outputs on ``feeds`` already run: the canonical model's (``original``, snapshot) and the
    #: pruned model's (``pruned``, oracle), so the error step need not run them again.
    feeds_outputs: dict[str, list[np.ndarray]] = dataclasses.field(default_factory=dict)
    surgery_plan: Plan | None = None
    compensation_report: dict[str, Any] | None = None
    #: ``fold`` and ``lowrank`` steps: what they did, per pass / per layer.
    fold_report: dict[str, Any] | None = None
    lowrank_report: dict[str, Any] | None = None
    #: --lowrank auto: the allocator's ranks (weight → rank), written into the plan's options.
    lowrank_ranks: dict[str, int] | None = None
    #: --target: the checked emit options (``preflight``), a progress callback for tuning, the
    #: report's ``target`` section, and the built library in the scratch folder.
    emit_options: Any = None
    emit_progress: Any = None
    target_report: dict[str, Any] | None = None
    module: emit_mod.ModuleArtifact | None = None
    #: Seconds per step so far (the timing instrument writes it; the report copies it).
    timer: Timer = dataclasses.field(default_factory=Timer)
    _cache: dict[str, Any] = dataclasses.field(default_factory=dict)

    # -- analyses of the current model, cached until a step changes it -------------------------
    def invalidate(self) -> None:
        self._cache.clear()

    def channels(self) -> ChannelGraph:
        if "channels" not in self._cache:
            o = self.options
            self._cache["channels"] = analyze_channels(self.model, allow_inexact=o.allow_inexact, rules=o.rules)
        return self._cache["channels"]

    def cost(self) -> CostModel:
        if "cost" not in self._cache:
            o = self.options  # counted on a copy specialised to the inputs' shapes (executed MACs)
            self._cache["cost"] = CostModel.for_inputs(self.model, o.input_shapes, seed=o.seed, values=o.input_values)
        return self._cache["cost"]

    def scratch(self, name: str) -> pathlib.Path:
        """``workdir/name/model.onnx`` (a folder per file: external data goes beside it)."""
        if self.workdir is None:
            self.workdir = pathlib.Path(tempfile.mkdtemp(prefix="spa-"))
        folder = self.workdir / name
        folder.mkdir(exist_ok=True)
        return folder / "model.onnx"

    def close(self) -> None:
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None


# ---------------------------------------------------------------------------------------------
# The steps. Each is small and delegates; the list in ``default_steps`` is the pipeline.
# ---------------------------------------------------------------------------------------------


def load(source: ModelSource, *, max_memory: int | None = None) -> tuple[ir.Model, str, str | None]:
    """Load into an IR the caller does not own: (model, description, sha256 of the file)."""
    if isinstance(source, (str, os.PathLike)):
        model = io.load_model(source, max_memory=max_memory)
        return model, str(source), io.model_sha256(source)
    if isinstance(source, ir.Model):
        # Never mutate the caller's model: work on a copy.
        model = ir.from_proto(ir.to_proto(source))
        io.check_model_structure(model)
        return model, "<onnx_ir.Model>", None
    return io.load_model(source, max_memory=max_memory), "<onnx.ModelProto>", None


def _load(s: State) -> bool:
    s.model, s.source_desc, s.sha256 = load(s.source, max_memory=s.options.max_memory)
    if s.source_path is None and isinstance(s.source, (str, os.PathLike)):
        s.source_path = os.fspath(s.source)
    return True


def _canonicalize(s: State) -> bool:
    return CanonicalizePass(keep_weight_inputs=s.options.keep_weight_inputs)(s.model).modified


def _analyze(s: State) -> bool:
    s.analysis = Analysis(s.model, s.source_desc, s.sha256, s.channels(), s.cost())
    return False


def _score(s: State) -> bool:
    crit = get_criterion(s.options.criterion)
    inputs = CriterionInputs(weight=_weight_reader(s.model), seed=s.options.seed, model=s.model, consumers=s.consumers, moments=s.moments,
                             gradients=s.gradients)
    s.scores = score_groups(s.analysis.channels, crit, inputs)
    return False


def _allocate(s: State) -> bool:
    o, cg = s.options, s.analysis.channels
    scores, method, lat = s.scores, o.allocation, None
    if o.latency_target is not None or o.allocation == "latency":
        lat = latency_target.prepare(s)  # measured on the runtime the model will run on
        s.notes["latency_allocation"] = lat.notes()
        if o.allocation == "latency":
            scores, method = lat.weighted(cg.groups, s.scores, lambda rem: _size_fn(cg, rem)), "global"

    def removed_at(ratio: float) -> dict[str, np.ndarray]:
        return allocate(cg.groups, scores, ratio=ratio, method=method, min_keep=o.min_keep, round_to=o.round_to)

    ratio = o.ratio
    if o.latency_target is not None:
        ratio = latency_target.search(s, lat, lambda r: _size_fn(cg, removed_at(r)), removed_at)
        s.notes["searched_ratio"] = ratio
    if o.lowrank == "auto" and o.lowrank_ranks is None:
        return _allocate_combined(s, removed_at)
    if o.flops_target is not None:
        cost = s.analysis.cost
        cost.require_known("--flops-target")
        base = cost.count().flops
        found = search_target(lambda r: cost.count(_size_fn(cg, removed_at(r))).flops / max(base, 1), o.flops_target)
        if not found.met:
            raise UsageError(found.message())
        ratio = found.ratio
        s.notes["searched_ratio"] = ratio
    s.removed = removed_at(ratio)
    return False


def _allocate_combined(s: State, removed_at: Callable[[float], dict[str, np.ndarray]]) -> bool:
    """--lowrank auto: prune ratio and per-layer ranks together (``spa.lowrank_alloc``); the
    ranks become an option, so the plan records them and ``spa apply`` replays them."""
    from spa.lowrank_alloc import allocate_combined

    o, cg, cost = s.options, s.analysis.channels, s.analysis.cost
    figure, target = ("flops", o.flops_target) if o.flops_target is not None else ("params", o.params_target)
    if figure == "flops":
        cost.require_known("--flops-target")
    base = max(getattr(cost.count(), figure), 1)
    alone = search_target(lambda r: getattr(cost.count(_size_fn(cg, removed_at(r))), figure) / base, target)
    measure = None
    if o.verify != "none":  # check the best estimates and both single methods in ORT, keep the least measured error
        measure = lowrank_mod.allocation_measure(s, cg, removed_at)  # built as the result will be; held-out calibration samples
    choice = allocate_combined(s.model, cg, cost, removed_at, lambda rem: _size_fn(cg, rem), target=target, figure=figure,
                               round_to=o.round_to, prune_ratio=alone.ratio, measure=measure)
    s.removed = removed_at(choice.ratio)
    s.lowrank_ranks = dict(sorted(choice.ranks.items()))
    s.notes["searched_ratio"] = choice.ratio
    s.notes["lowrank_allocation"] = {"figure": figure, "target": target, "estimated_error": round(choice.error, 6),
                                     "estimated_prune_error": round(choice.prune_error, 6), "estimated_lowrank_error": round(choice.lowrank_error, 6),
                                     "tried": choice.tried}
    return False


def _plan(s: State) -> bool:
    options = s.options.plan_options() | ({"lowrank_ranks": s.lowrank_ranks} if s.lowrank_ranks is not None else {})
    s.plan = build_plan(s.model, s.analysis.channels, s.removed, scores=s.scores, options=options, model_sha256=s.sha256)
    return False


def _check_plan(s: State) -> bool:
    """A saved plan only replays on the model it was made for (sha256, when both know it)."""
    if s.plan.model_sha256 and s.sha256 and s.plan.model_sha256 != s.sha256:
        raise PlanMismatchError(f"the plan was made for a model with sha256 {s.plan.model_sha256[:12]}…, this one is {s.sha256[:12]}…")
    return False


def _snapshot(s: State) -> bool:
    """Write the canonical model (the reference of every later comparison) and, when ORT is
    needed, make the verification inputs and fail fast if ORT can't run the input."""
    foreign = _foreign_ops(s)
    if foreign:  # custom-domain ops: ORT has no kernel, so the oracle cannot run
        ops = ", ".join(foreign)
        if s.options.verify == "full":
            raise UnsupportedError(f"{s.source_desc}: ONNX Runtime has no kernel for the custom op {ops}, so the pruned model "
                                   "cannot be checked against the original (--verify full); --verify check (ONNX checker only) "
                                   "or --verify none prunes it, the custom op's channels frozen")
        add_note(s.analysis.model, f"custom op {ops}: no channel rule, so its channels are frozen; ONNX Runtime has no kernel "
                                   f"for it, so the pruned model was not run (no oracle, no latency; --verify {s.options.verify})")
    s.snapshot_path = s.scratch("original")
    io.save_model(s.model, s.snapshot_path, durable=False)
    if _needs_ort(s):
        sess = verify_mod.session(s.snapshot_path)
        s.feeds = verify_mod.make_inputs(sess, s.options.input_shapes, s.options.seed, s.options.input_values)
        s.feeds_outputs["original"] = verify_mod.run(sess, s.feeds)
    return False


def _upgraded_from(s: State) -> int | None:
    """The default-domain opset (7–10) the input had before ``upgrade_opset`` upgraded it."""
    return None if s.analysis is None else s.analysis.model.meta.get(upgrade_opset.UPGRADED_FROM_KEY)


def _check_upgrade(s: State) -> bool:
    """The oracle proves pruning, not the conversion: the input file and the upgraded canonical
    snapshot must give the same outputs in ORT (``check_upgrade`` refuses otherwise)."""
    original = s.source if not isinstance(s.source, ir.Model) else ir.to_proto(s.source)
    diff = upgrade_opset.check_upgrade(original, s.snapshot_path, s.feeds)
    old = _upgraded_from(s)
    s.notes["upgrade_check"] = {"from_opset": old, "to_opset": upgrade_opset.TARGET_OPSET, "max_abs_diff": diff}
    add_note(s.analysis.model, f"the opset {old} → {upgrade_opset.TARGET_OPSET} upgrade was checked in ONNX Runtime "
                               f"against the input: same outputs (max |diff| {diff:.3g})")
    return False


def _restore_opset(s: State) -> bool:
    """--keep-opset: the output at the input's opset (``io.at_opset``), or a warning and the
    upgraded opset where the converter cannot go back or the result fails in ORT."""
    old = _upgraded_from(s)
    converted, why = io.at_opset(s.model, old, reference=s.pruned_path, feeds=s.feeds)
    if converted is None:
        s.warnings.append(f"--keep-opset: the output stays at opset {upgrade_opset.TARGET_OPSET}: {why}")
        return False
    s.model = converted
    add_note(s.analysis.model, f"written back at the input's opset {old} (--keep-opset): it loads in ONNX Runtime"
                               + (" and gives the pruned model's outputs" if s.pruned_path is not None and s.feeds is not None else ""))
    return True


def _prune(s: State) -> bool:
    # A copy read back from the snapshot: ``s.analysis.model`` must keep describing the input.
    if s.reference_model is not None:  # clones share tensors; surgery replaces them, never writes into them
        s.model = s.reference_model.clone()
        if s.options.verify != "full":
            s.reference_model = None  # no oracle will read it
    else:
        s.model = io.load_model(s.reference_path or s.snapshot_path)
    PrunePass(s.surgery_plan or s.plan)(s.model)
    return True


def _measure(s: State) -> bool:
    s.cost_after = s.cost().count()
    if s.options.verify != "none" or s.options.benchmark:
        s.pruned_path = s.scratch("pruned")
        io.save_model(s.model, s.pruned_path, durable=False)
    return False


def _check(s: State) -> bool:
    note = verify_mod.check_pruned(s.snapshot_path, s.pruned_path)
    if note:
        s.notes["checker"] = note
    return False


def _oracle(s: State) -> bool:
    plan, reference = s.surgery_plan or s.plan, s.reference_path or s.snapshot_path
    s.oracle = verify_mod.prove(s.analysis, plan, reference, s.pruned_path, s.feeds, s.scratch, outputs=s.feeds_outputs, model=s.reference_model)
    s.reference_model = None
    return False


def _benchmark(s: State) -> bool:
    s.latency = verify_mod.measure_side_by_side([s.snapshot_path, s.pruned_path], s.feeds)
    lat = s.latency
    if lat.ratio_p10_p90[1] < 1.0 and s.options.round_to < emit_mod.ORT_ROUND_TO:
        # ORT's CPU kernels block channels by 8/16: odd widths leave the fast paths, and a
        # lightly pruned model can run slower than its input (docs/target.md, "Rounding")
        s.warnings.append(f"the pruned model ran slower than the input in ONNX Runtime ({lat.median_ms[1]:.3f} vs {lat.median_ms[0]:.3f} ms): "
                          f"kept widths that are not multiples of {emit_mod.ORT_ROUND_TO} leave its fast kernels; try --round-to {emit_mod.ORT_ROUND_TO}")
    return False


def _report(s: State) -> bool:
    s.report = _make_report(s)
    s.report.timings = dict(s.timer.timings)  # every step before this one; saving is not timed here
    return False


def _save(s: State) -> bool:
    """Write the report, then the model, so that a failure leaves neither behind."""
    if s.output_path is not None:
        s.report.output = str(pathlib.Path(os.path.abspath(s.output_path)))
        if s.module is not None:
            s.report.target["module"] = str(_module_path(s))
    written_report = None
    if s.report_path is not None:
        written_report = io.write_text_atomic(s.report_path, s.report.dumps() + "\n")
    if s.output_path is not None:
        try:
            io.save_model(s.model, s.output_path, source_path=s.source_path, in_place=s.in_place)
            if s.module is not None:
                s.module.write(_module_path(s))
        except BaseException:
            if written_report is not None:  # the report alone would describe a file that is not there
                written_report.unlink(missing_ok=True)
            raise
    return False


def _module_path(s: State) -> pathlib.Path:
    return emit_mod.module_path_for(pathlib.Path(os.path.abspath(s.output_path)), s.module.suffix)


def _needs_ort(s: State) -> bool:
    return (s.options.verify == "full" or s.options.benchmark) and not _foreign_ops(s)


def _foreign_ops(s: State) -> list[str]:
    """The input's custom-domain ops (``io.foreign_ops``), once analysed; ORT cannot run them."""
    return io.foreign_ops(s.analysis.model) if s.analysis is not None else []


def default_steps(*, mode: str = "prune") -> list[Step]:
    """The pipeline. ``mode``: ``plan`` (decide only), ``prune`` (decide and do), ``apply``
    (do a plan given in ``State.plan``)."""
    o = lambda s: s.options  # noqa: E731 - reads better in the table below
    comp = lambda s: o(s).compensate != "none"  # noqa: E731
    statistics = Step("statistics", compensate_mod.statistics_step, "consumer view; activation moments (calibration data, or BatchNorm statistics / synthetic inputs)",
                      when=compensate_mod.needs_statistics, skip_reason=lambda s: "--compensate none and a weight-only criterion")
    gradients = Step("gradients", gradients_mod.gradients_step, "gradients of the loss in torch (spa.autodiff), on calibration data with its labels or synthetic inputs",
                     when=gradients_mod.needs_gradients, skip_reason=lambda s: "a criterion that needs no gradients")
    decide = [
        statistics,
        gradients,
        Step("score", _score, "score every unit of every group with the criterion"),
        Step("allocate", _allocate, "choose the units each group loses (ratio, or searched for --flops-target)"),
        Step("plan", _plan, "turn the choice into tensor slices and attribute/constant rewrites"),
    ]
    head = [
        Step("load", _load, "read the file safely (size/type checks, external data)"),
        Step("canonicalize", _canonicalize, "inline functions, lift constants, name and sort nodes, infer shapes, fold shape arithmetic"),
        Step("analyze", _analyze, "channel rules → units and coupled groups; FLOPs/params cost model"),
    ]
    if mode == "plan":
        return head + decide
    do = [
        Step("snapshot", _snapshot, "keep the canonical model on disk; make seeded inputs and run it in ONNX Runtime"),
        Step("check-upgrade", _check_upgrade, "an input upgraded from opset 7–10: its outputs and the upgraded model's match in ONNX Runtime",
             when=lambda s: o(s).verify == "full" and _upgraded_from(s) is not None,
             skip_reason=lambda s: f"--verify {o(s).verify}" if o(s).verify != "full" else "runs only for an input upgraded from opset 7–10"),
        Step("compensate", compensate_mod.compensate_step, "repair the consumers of removed channels on a copy (least squares on the moments, bias absorption)",
             when=comp, skip_reason=lambda s: "--compensate none"),
        Step("prune", _prune, "surgery on a copy: slice every planned tensor, rewrite attributes and shape constants"),
        Step("measure", _measure, "FLOPs/params of the pruned model"),
        Step("check", _check, "ONNX checker (full check) on the pruned model",
             when=lambda s: o(s).verify != "none", skip_reason=lambda s: "--verify none"),
        Step("oracle", _oracle, "mask-equivalence oracle in ONNX Runtime (names the failing group)",
             when=lambda s: o(s).verify == "full", skip_reason=lambda s: f"--verify {o(s).verify}"),
        Step("error", compensate_mod.error_step, "output error against the original: plain pruning vs compensated",
             when=lambda s: comp(s) and _needs_ort(s) and s.feeds is not None, skip_reason=lambda s: "--compensate none" if not comp(s) else "no ONNX Runtime run"),
        Step("fold", fold_mod.fold_step, "exact folding: no-ops, BatchNorm and per-channel Mul/Add into weights, linear pairs merged where cheaper (checked in ORT)",
             when=lambda s: o(s).fold, skip_reason=lambda s: "no --fold"),
        Step("lowrank", lowrank_mod.lowrank_step, "factorize layers where it pays (SVD; rank by energy or the allocator); full-rank oracle, per-layer and model output error",
             when=lambda s: o(s).lowrank != "none", skip_reason=lambda s: "--lowrank none"),
        Step("benchmark", _benchmark, "ORT latency of the input and the pruned model, side by side",
             when=lambda s: o(s).benchmark and not _foreign_ops(s),
             skip_reason=lambda s: "--no-bench" if not o(s).benchmark else "ONNX Runtime has no kernel for the custom ops"),
        Step("compile", emit_mod.compile_step, "--target: build the pruned model with TVM (tuned with --tune-trials), check it against ORT, time both",
             when=lambda s: emit_mod.wants_module(o(s)), skip_reason=lambda s: "--target onnx (the default)"),
        Step("restore-opset", _restore_opset, "--keep-opset: convert the output back to the input's opset 7–10 (checked in ONNX Runtime)",
             when=lambda s: o(s).keep_opset and _upgraded_from(s) is not None,
             skip_reason=lambda s: "runs only for an input upgraded from opset 7–10" if o(s).keep_opset else "no --keep-opset"),
        Step("report", _report, "params, FLOPs, groups, oracle, latency, timings"),
        Step("save", _save, "write the model and the report atomically",
             when=lambda s: s.output_path is not None or s.report_path is not None, skip_reason=lambda s: "no output path (Python API: result.save)"),
    ]
    middle = [Step("check-plan", _check_plan, "the plan was made for this model (sha256)"), statistics] if mode == "apply" else decide
    return head + middle + do


def explain(options: PruneOptions, *, mode: str = "prune", output: bool = True) -> list[tuple[str, bool, str]]:
    """(step, runs, what it does or why it is skipped) for these options."""
    state = State(source="", options=options, output_path=pathlib.Path("out.onnx") if output else None)
    return PassManager(default_steps(mode=mode)).explain(state)


def run_pipeline(state: State, *, mode: str, timer: Timer | None = None, instruments: Sequence[Any] = ()) -> State:
    """Run the default steps for ``mode`` on ``state``; scratch files are removed afterwards."""
    state.options.validate()
    if emit_mod.wants_module(state.options) and mode != "plan" and state.emit_options is None:
        state.emit_options = emit_mod.preflight(state.options)  # bad target/tracker/database: before any work
    if timer is not None:
        state.timer = timer
    manager = PassManager(default_steps(mode=mode), [TimingInstrument(state.timer), *instruments])
    try:
        manager.run(state)
    finally:
        state.close()
    return state


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def _options(kwargs: dict[str, Any], base: Mapping[str, Any] | None = None) -> PruneOptions:
    options = kwargs.pop("options", None) or PruneOptions(**{**(base or {}), **kwargs})
    options.validate()
    return options


def analyze(
    source: ModelSource,
    timer: Timer | None = None,
    *,
    allow_inexact: bool = False,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
) -> Analysis:
    """Load, canonicalize and analyze (``spa inspect``): nothing is pruned."""
    options = PruneOptions(allow_inexact=allow_inexact, input_shapes=dict(input_shapes or {}))
    state = State(source=source, options=options)
    manager = PassManager(default_steps(mode="plan")[:3], [TimingInstrument(timer or Timer())])
    manager.run(state)
    return state.analysis


def prune(source: ModelSource, *, timer: Timer | None = None, instruments: Sequence[Any] = (), **kwargs: Any) -> PruneResult:
    """Prune a model (path, ModelProto or onnx_ir.Model); see :class:`PruneOptions` for kwargs."""
    state = run_pipeline(State(source=source, options=_options(kwargs)), mode="prune", timer=timer, instruments=instruments)
    return PruneResult(model=state.model, report=state.report, plan=state.plan, module=state.module)


def plan(source: ModelSource, *, timer: Timer | None = None, instruments: Sequence[Any] = (), **kwargs: Any) -> Plan:
    """Decide what to prune (analyze → allocate) without surgery; see :class:`PruneOptions`."""
    return run_pipeline(State(source=source, options=_options(kwargs)), mode="plan", timer=timer, instruments=instruments).plan


def lowrank(
    source: ModelSource,
    *,
    energy: float = 0.95,
    flops_target: float | None = None,
    params_target: float | None = None,
    timer: Timer | None = None,
    instruments: Sequence[Any] = (),
    **kwargs: Any,
) -> PruneResult:
    """Factorize without pruning (``spa lowrank``): every layer at the smallest rank holding
    ``energy`` of its singular energy where that pays, or, with a target, the allocator's
    ranks (``ratio=0``, ``min_keep=1``: nothing is pruned). Other kwargs as :func:`prune`."""
    auto = flops_target is not None or params_target is not None
    options = {"ratio": 0.0, "min_keep": 1.0, "lowrank": "auto" if auto else "energy", "lowrank_energy": energy,
               "flops_target": flops_target, "params_target": params_target, **kwargs}
    return prune(source, timer=timer, instruments=instruments, **options)


def apply(source: ModelSource, plan: Plan, *, timer: Timer | None = None, instruments: Sequence[Any] = (), **kwargs: Any) -> PruneResult:
    """Replay ``plan`` on the model it was made for (checked by sha256 when both know it)."""
    state = State(source=source, options=_options(kwargs, plan.options), plan=plan)
    state = run_pipeline(state, mode="apply", timer=timer, instruments=instruments)
    return PruneResult(model=state.model, report=state.report, plan=state.plan, module=state.module)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _weight_reader(model: ir.Model) -> Callable[[str], np.ndarray]:
    """Read an initializer for scoring without leaving external weights mapped in memory.

    An external tensor's ``numpy()`` is a view of the memory-mapped file: its pages would stay
    resident until surgery. Copy the one tensor being scored and release the mapping.
    """
    inits = all_initializers(model.graph)

    def read(name: str) -> np.ndarray:
        tensor = inits[name].const_value
        if isinstance(tensor, ir.ExternalTensor):
            array = np.array(tensor.numpy())
            tensor.release()
            return array
        return tensor.numpy()

    return read


def _size_fn(cg: ChannelGraph, removed: Mapping[str, np.ndarray]) -> Callable[[str, int], int | None]:
    sizes: dict[tuple[str, int], int] = {}
    for g in cg.groups:
        units = removed.get(g.id)
        if units is None or not len(units):
            continue
        for d in g.dims:
            sizes[(d.value, d.axis)] = int((~np.isin(g.unit_of[d], units)).sum())
    return lambda name, axis: sizes.get((name, axis))


def _make_report(s: State) -> Report:
    from spa import __version__

    plan, before, after = s.plan, s.analysis.cost.count(), s.cost_after
    layers = []
    for edit in plan.tensors:
        for axis, roles in edit.roles.items():
            if Role.OUT.value in roles:
                layers.append({"weight": edit.name, "axis": axis, "channels": edit.shape[axis], "kept": len(edit.kept[axis])})
    cands = plan.groups
    warnings = list(s.warnings)
    factorized = s.lowrank_report is not None and any(l["rank"] for l in s.lowrank_report["layers"])
    if not any(g.removed for g in cands) and not factorized:
        warnings.append(_nothing_pruned(plan))
    lat = s.latency
    return Report(
        input=s.source_desc,
        output=None,
        options=s.options.plan_options() | {"verify": s.options.verify, "compensate": s.options.compensate, **s.notes},
        params_before=before.params,
        params_after=after.params,
        flops_before=before.flops,
        flops_after=after.flops,
        macs_before=before.macs,
        macs_after=after.macs,
        groups_total=len(cands),
        groups_pruned=sum(1 for g in cands if g.removed),
        groups_blocked=sum(1 for g in cands if g.frozen == g.units),
        groups_partial=sum(1 for g in cands if 0 < g.frozen < g.units),
        blocked=[{"group": g.id, "units": g.units, "frozen": g.frozen, "layers": g.layers, "reasons": g.blocked} for g in cands if g.frozen],
        layers=layers,
        oracle=s.oracle,
        latency_ms_before=lat.median_ms[0] if lat else None,
        latency_ms_after=lat.median_ms[1] if lat else None,
        latency_p10_p90_ms=[list(x) for x in lat.p10_p90_ms] if lat else None,
        latency_significant=lat.significant if lat else None,
        timings={},
        spa_version=__version__,
        notes=model_notes(s.analysis.model),
        compensation=s.compensation_report or (s.compensation.summary() if s.compensation is not None else None),  # meta is not saved: the snapshot's copy has none
        fold=s.fold_report,
        lowrank=s.lowrank_report,
        target=s.target_report,
        warnings=warnings,
    )


def _nothing_pruned(plan: Plan) -> str:
    """Why a run removed nothing, in plain words (the most common reasons first)."""
    if not plan.groups:
        return "nothing was pruned: the model has no channel groups (no weights whose output channels could go)"
    if plan.options.get("ratio", 0) == 0 and plan.options.get("flops_target") is None:
        return "nothing was pruned: ratio is 0"
    counts: dict[str, int] = {}
    for g in plan.groups:
        for b in g.blocked[:1]:
            counts[b["code"]] = counts.get(b["code"], 0) + 1
    if not counts:
        return "nothing was pruned: every group is at its --min-keep floor for this ratio"
    if set(counts) == {"weight_input"}:
        return (
            f"nothing was pruned: the weights of all {counts['weight_input']} groups are graph inputs, kept overridable"
            " by --keep-weight-inputs (without it they are pruned as weights)"
        )
    top = ", ".join(f"{n} groups frozen by {code}" for code, n in sorted(counts.items(), key=lambda kv: -kv[1])[:3])
    return f"nothing was pruned: {top} (spa inspect lists the reasons)"
