"""The pipeline, readable top to bottom (DESIGN.md, "The pipeline").

    load → canonicalize → analyze → score → allocate → plan │ prune → verify → report

``make_plan`` runs the left half (no mutation of anything the caller owns) and returns a
:class:`~spa.planning.Plan`; ``execute_plan`` runs the right half on a model. ``prune`` is both.
``apply`` replays a saved plan on the model it was made for.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from spa import io
from spa.allocate import allocate, search_ratio
from spa.analysis.channels import ChannelGraph, analyze_channels
from spa.analysis.cost import CostModel
from spa.criteria import CriterionInputs, get_criterion, score_groups
from spa.errors import PlanMismatchError, UsageError, VerificationError
from spa.passes.canonicalize import CanonicalizePass
from spa.passes.prune import PrunePass
from spa.planning import Plan, build_plan
from spa.report import Report, Timer
from spa.rules.base import Role
from spa import verify as verify_mod
from spa.graph import all_initializers

__all__ = ["PruneOptions", "PruneResult", "Analysis", "load", "analyze", "make_plan", "execute_plan", "prune", "plan", "apply"]

logger = logging.getLogger(__name__)

ModelSource = str | os.PathLike | onnx.ModelProto | ir.Model
VERIFY_LEVELS = ("full", "check", "none")


@dataclasses.dataclass
class PruneOptions:
    ratio: float = 0.5
    criterion: str = "l1"
    allocation: str = "uniform"
    min_keep: float = 0.1
    round_to: int = 1
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

    def validate(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise UsageError(f"ratio must be in [0, 1), got {self.ratio}")
        if self.flops_target is not None and not 0.0 < self.flops_target <= 1.0:
            raise UsageError(f"flops-target must be in (0, 1], got {self.flops_target}")
        if self.verify not in VERIFY_LEVELS:
            raise UsageError(f"verify must be one of {', '.join(VERIFY_LEVELS)}")
        get_criterion(self.criterion)

    def plan_options(self) -> dict[str, Any]:
        """The options that decide the plan (recorded in it; verification ones are not)."""
        keys = ("ratio", "criterion", "allocation", "min_keep", "round_to", "flops_target", "seed", "allow_inexact")
        return {k: getattr(self, k) for k in keys}


@dataclasses.dataclass
class PruneResult:
    model: ir.Model
    report: Report
    plan: Plan

    def save(self, path: str | os.PathLike, **kw) -> pathlib.Path:
        return io.save_model(self.model, path, **kw)


@dataclasses.dataclass
class Analysis:
    """A loaded, canonicalized model with its channel graph and cost model (read-only)."""

    model: ir.Model
    source: str
    sha256: str | None
    channels: ChannelGraph
    cost: CostModel


def load(source: ModelSource) -> tuple[ir.Model, str, str | None]:
    """Load into an IR the caller does not own: (model, description, sha256 of the file)."""
    if isinstance(source, (str, os.PathLike)):
        model = io.load_model(source)
        return model, str(source), io.model_sha256(source)
    if isinstance(source, ir.Model):
        # Never mutate the caller's model: work on a copy.
        model = ir.from_proto(ir.to_proto(source))
        io.check_model_structure(model)
        return model, "<onnx_ir.Model>", None
    return io.load_model(source), "<onnx.ModelProto>", None


def _dim_values(model: ir.Model, input_shapes: Mapping[str, Sequence[int]]) -> dict[str, int]:
    """Symbolic input dims named by ``--input-shape`` (batch, sequence …) for FLOP counts."""
    values: dict[str, int] = {}
    for v in model.graph.inputs:
        given = input_shapes.get(v.name)
        if given is None or v.shape is None or len(given) != len(v.shape):
            continue
        for d, n in zip(v.shape.dims, given):
            if isinstance(d, ir.SymbolicDim) and d.value:
                values[str(d.value)] = int(n)
    return values


def analyze(
    source: ModelSource,
    timer: Timer | None = None,
    *,
    allow_inexact: bool = False,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
) -> Analysis:
    timer = timer or Timer()
    with timer("load"):
        model, desc, sha = load(source)
    with timer("canonicalize"):
        CanonicalizePass()(model)
    with timer("analyze"):
        channels = analyze_channels(model, allow_inexact=allow_inexact)
        cost = CostModel(model, dim_values=_dim_values(model, input_shapes or {}))
    return Analysis(model, desc, sha, channels, cost)


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


def make_plan(analysis: Analysis, options: PruneOptions, timer: Timer | None = None) -> tuple[Plan, dict[str, Any]]:
    """Score, allocate and plan. Returns the plan and notes for the report."""
    timer = timer or Timer()
    options.validate()
    cg = analysis.channels
    notes: dict[str, Any] = {}
    with timer("score"):
        crit = get_criterion(options.criterion)
        scores = score_groups(cg, crit, CriterionInputs(weight=_weight_reader(analysis.model), seed=options.seed))
    with timer("allocate"):

        def removed_at(ratio: float) -> dict[str, np.ndarray]:
            return allocate(cg.groups, scores, ratio=ratio, method=options.allocation, min_keep=options.min_keep, round_to=options.round_to)

        ratio = options.ratio
        if options.flops_target is not None:
            base = analysis.cost.count().flops
            ratio = search_ratio(
                lambda r: analysis.cost.count(_size_fn(cg, removed_at(r))).flops / max(base, 1),
                options.flops_target,
            )
            notes["searched_ratio"] = ratio
        removed = removed_at(ratio)
    with timer("plan"):
        plan = build_plan(
            analysis.model,
            cg,
            removed,
            scores=scores,
            options=options.plan_options(),
            model_sha256=analysis.sha256,
        )
    return plan, notes


def execute_plan(
    analysis: Analysis,
    plan: Plan,
    options: PruneOptions,
    timer: Timer | None = None,
    notes: dict | None = None,
    *,
    blame: bool = True,
) -> PruneResult:
    """Surgery, verification and report. Raises VerificationError if the oracle fails
    (naming the failing group when ``blame``: each group is then re-tried alone)."""
    timer = timer or Timer()
    notes = dict(notes or {})
    model = analysis.model
    cost_before = analysis.cost.count()
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="spa-"))
    try:
        need_ort = options.verify == "full" or options.benchmark
        original_path = workdir / "original" / "model.onnx"
        feeds = None
        if need_ort or options.verify == "check":
            with timer("snapshot"):
                original_path.parent.mkdir()
                io.save_model(model, original_path, durable=False)
        if need_ort:
            with timer("snapshot"):
                # Fail fast (before surgery) if ORT cannot run the input on these shapes.
                sess = verify_mod.session(original_path)
                feeds = verify_mod.make_inputs(sess, options.input_shapes, options.seed, options.input_values)
                verify_mod.run(sess, feeds)
                del sess
        with timer("prune"):
            PrunePass(plan)(model)
        with timer("measure"):
            cost_after = CostModel(model, dim_values=_dim_values(model, options.input_shapes)).count()
        oracle = None
        latency = (None, None)
        if options.verify != "none" or options.benchmark:
            pruned_path = workdir / "pruned" / "model.onnx"
            pruned_path.parent.mkdir()
            io.save_model(model, pruned_path, durable=False)
        if options.verify != "none":
            with timer("verify"):
                checker_note = _check(original_path, pruned_path)
                if checker_note:
                    notes["checker"] = checker_note
                if options.verify == "full":
                    oracle = _oracle(original_path, pruned_path, plan, feeds, options if blame else None)
        if options.benchmark:
            with timer("benchmark"):
                lb, la = verify_mod.measure_latency([original_path, pruned_path], feeds)
                latency = (round(lb, 4), round(la, 4))
        report = _report(analysis, plan, options, cost_before, cost_after, oracle, latency, timer, notes)
        return PruneResult(model=model, report=report, plan=plan)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _check(original_path: pathlib.Path, pruned_path: pathlib.Path) -> str | None:
    """The ONNX checker on the pruned model. A failure the input model already has (an op the
    checker calls deprecated but ORT runs, …) is noted, not blamed on pruning."""
    try:
        verify_mod.check_model_file(pruned_path)
        return None
    except VerificationError as pruned_error:
        try:
            verify_mod.check_model_file(original_path)
        except VerificationError:
            return f"the input model already fails the ONNX checker ({str(pruned_error).split(': ', 1)[-1]})"
        raise


def _oracle(
    original_path: pathlib.Path, pruned_path: pathlib.Path, plan: Plan, feeds: dict[str, np.ndarray], blame: PruneOptions | None
) -> dict[str, Any]:
    # The reference: the original with every removed consumer slice zeroed, written beside it.
    reference = ir.load(original_path)
    verify_mod.mask_model(reference, plan)
    masked_path = original_path.parent.parent / "masked" / "model.onnx"
    masked_path.parent.mkdir()
    io.save_model(reference, masked_path, durable=False)
    del reference
    gc.collect()  # onnx-ir's reference cycles would keep the masked weights alive
    result = verify_mod.run_oracle(masked_path, pruned_path, feeds)
    inexact = sorted({g.id for g in plan.groups if g.removed and g.inexact})
    out = result.to_json() | {"inexact_groups": inexact, "asserted": not inexact}
    if inexact and blame is not None:
        # The inexact groups make the whole-model comparison a report, not a proof: prove the
        # exact groups on their own so an inexact option never hides a wrong slice.
        out["exact_part"] = _exact_part(original_path, plan, blame)
    if not result.passed and not inexact:
        culprit = _blame(original_path, plan, blame) if blame is not None else None
        where = f"group {culprit}" if culprit else "the groups together (each alone passes)"
        raise VerificationError(
            f"mask-equivalence oracle failed in {where}: max difference {result.max_abs_diff:.3g} "
            f"(scaled {result.max_scaled_diff:.3g})",
            group=culprit,
            max_diff=result.max_abs_diff,
        )
    return out


def _replan(original_path: pathlib.Path, plan: Plan, options: PruneOptions, keep: Callable[[Any], bool]) -> tuple[Analysis, Plan] | None:
    """Re-plan the snapshot with only the groups ``keep`` accepts (same group ids: the
    snapshot is the canonical model the plan was made on)."""
    analysis = analyze(original_path, allow_inexact=options.allow_inexact)
    ids = {x.id for x in analysis.channels.groups}
    chosen = {g.id: np.asarray(g.removed) for g in plan.groups if g.removed and keep(g)}
    if not chosen.keys() <= ids:
        return None
    return analysis, build_plan(analysis.model, analysis.channels, chosen)


def _exact_part(original_path: pathlib.Path, plan: Plan, options: PruneOptions) -> dict[str, Any] | None:
    replanned = _replan(original_path, plan, options, lambda g: not g.inexact)
    if replanned is None or replanned[1].empty:
        return None
    quiet = dataclasses.replace(options, verify="full", benchmark=False)
    oracle = execute_plan(*replanned, quiet, blame=False).report.oracle
    return {"max_abs_diff": oracle["max_abs_diff"], "passed": oracle["passed"]}


def _blame(original_path: pathlib.Path, plan: Plan, options: PruneOptions) -> str | None:
    """Name the first group whose pruning alone fails the oracle (re-planned on the snapshot)."""
    quiet = dataclasses.replace(options, verify="full", benchmark=False)
    for g in plan.groups:
        if not g.removed:
            continue
        replanned = _replan(original_path, plan, options, lambda x, gid=g.id: x.id == gid)
        if replanned is None:
            return None
        try:
            execute_plan(*replanned, quiet, blame=False)
        except VerificationError:
            return g.id
    return None


def _report(analysis, plan, options, before, after, oracle, latency, timer, notes) -> Report:
    from spa import __version__

    cands = plan.groups
    layers = []
    for edit in plan.tensors:
        for axis, roles in edit.roles.items():
            if Role.OUT.value in roles:
                layers.append({"weight": edit.name, "axis": axis, "channels": edit.shape[axis], "kept": len(edit.kept[axis])})
    return Report(
        input=analysis.source,
        output=None,
        options=options.plan_options() | {"verify": options.verify, **notes},
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
        oracle=oracle,
        latency_ms_before=latency[0],
        latency_ms_after=latency[1],
        timings=dict(timer.timings),
        spa_version=__version__,
    )


def prune(source: ModelSource, *, timer: Timer | None = None, **kwargs: Any) -> PruneResult:
    """Prune a model (path, ModelProto or onnx_ir.Model); see :class:`PruneOptions` for kwargs."""
    options = kwargs.pop("options", None) or PruneOptions(**kwargs)
    options.validate()
    timer = timer or Timer()
    analysis = analyze(source, timer, allow_inexact=options.allow_inexact, input_shapes=options.input_shapes)
    plan, notes = make_plan(analysis, options, timer)
    return execute_plan(analysis, plan, options, timer, notes)


def plan(source: ModelSource, *, timer: Timer | None = None, **kwargs: Any) -> Plan:
    """Decide what to prune (analyze → allocate) without surgery; see :class:`PruneOptions`."""
    options = kwargs.pop("options", None) or PruneOptions(**kwargs)
    options.validate()
    analysis = analyze(source, timer, allow_inexact=options.allow_inexact, input_shapes=options.input_shapes)
    return make_plan(analysis, options, timer)[0]


def apply(source: ModelSource, plan: Plan, *, timer: Timer | None = None, **kwargs: Any) -> PruneResult:
    """Replay ``plan`` on the model it was made for (checked by sha256 when both know it)."""
    options = kwargs.pop("options", None) or PruneOptions(**{**plan.options, **kwargs})
    timer = timer or Timer()
    analysis = analyze(source, timer, allow_inexact=options.allow_inexact, input_shapes=options.input_shapes)
    if plan.model_sha256 and analysis.sha256 and plan.model_sha256 != analysis.sha256:
        raise PlanMismatchError(
            f"the plan was made for a model with sha256 {plan.model_sha256[:12]}…, this one is {analysis.sha256[:12]}…"
        )
    return execute_plan(analysis, plan, options, timer)

