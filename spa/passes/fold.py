"""The ``fold`` stage: the exact folding passes in sequence, to a fixpoint, and its pipeline step.

Order (each pass its own module): remove no-ops → BatchNorm into Conv/Gemm → per-channel
Mul/Add into weights → merge linear pairs where cheaper. Repeated until nothing changes (a
removed Identity can expose a BN, a folded Mul a linear pair), at most :data:`MAX_ROUNDS`.

The step runs after surgery and the oracle (folding changes weight values, so the mask oracle
proves the surgery first), is recorded in the plan options (``fold``) so ``spa apply`` replays
it, and checks itself: the folded model must compute what it computed before in ONNX Runtime
(|diff| ≤ 1e-5 + 1e-4·max|output|), else a VerificationError (a bug: nothing is written).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from spa import io
from spa import verify as verify_mod
from spa.errors import VerificationError
from spa.passes.canonicalize import infer_shapes
from spa.passes.fold_affine import FoldAffinePass
from spa.passes.fold_batchnorm import FoldBatchNormPass
from spa.passes.merge_linear import MergeLinearPass
from spa.passes.remove_identity import RemoveIdentityPass

if TYPE_CHECKING:  # pragma: no cover
    from spa.pipeline import State

__all__ = ["FOLD_PASSES", "MAX_ROUNDS", "fold_model", "fold_step", "max_diff", "assert_same"]

logger = logging.getLogger(__name__)

FOLD_PASSES = (
    ("remove-identity", RemoveIdentityPass),
    ("fold-batchnorm", FoldBatchNormPass),
    ("fold-affine", FoldAffinePass),
    ("merge-linear", MergeLinearPass),
)
MAX_ROUNDS = 4


def fold_model(model: ir.Model) -> dict[str, int]:
    """Run the folding passes to a fixpoint; nodes each pass removed (0 for passes that did nothing)."""
    removed = {name: 0 for name, _ in FOLD_PASSES}
    for _ in range(MAX_ROUNDS):
        changed = False
        for name, cls in FOLD_PASSES:
            before = len(model.graph)
            if cls()(model).modified:
                changed = True
                removed[name] += before - len(model.graph)
        if not changed:
            break
    if any(removed.values()):
        infer_shapes(model)
    return removed


def max_diff(ref: list[np.ndarray], got: list[np.ndarray]) -> tuple[float, float]:
    """(max |diff|, max |ref|) over float outputs."""
    diff = scale = 0.0
    for r, g in zip(ref, got):
        r, g = np.asarray(r), np.asarray(g)
        if r.dtype.kind != "f" or r.size == 0:
            continue
        diff = max(diff, float(np.max(np.abs(r.astype(np.float64) - g.astype(np.float64)))))
        scale = max(scale, float(np.max(np.abs(r))))
    return diff, scale


def assert_same(ref: list[np.ndarray], got: list[np.ndarray], what: str) -> float:
    """The oracle's tolerance (1e-5 + 1e-4·max|output|); VerificationError naming ``what``."""
    if [np.shape(r) for r in ref] != [np.shape(g) for g in got]:
        raise VerificationError(f"{what}: output shapes changed")
    diff, scale = max_diff(ref, got)
    if not diff <= 1e-5 + 1e-4 * scale:
        raise VerificationError(f"{what}: outputs differ by {diff:.3g} (max |output| {scale:.3g})", max_diff=diff)
    return diff


def fold_step(s: State) -> bool:
    removed = fold_model(s.model)
    report: dict[str, Any] = {"removed_nodes": removed}
    s.fold_report = report
    if not any(removed.values()):
        return False
    _checked_swap(s, "folded", "folding", report)
    return True


def _checked_swap(s: State, name: str, what: str, report: dict[str, Any], *, exact: bool = True) -> None:
    """Save the changed model, check it (the checker; with ``exact``, the same outputs as the
    model before in ORT), recount its cost, and make it the model later steps measure."""
    before = s.pruned_path
    s.invalidate()
    s.cost_after = s.cost().count()
    if before is None:
        return
    path = s.scratch(name)
    io.save_model(s.model, path, durable=False)
    if s.options.verify != "none":
        verify_mod.check_model_file(path)
    if exact and s.options.verify == "full" and s.feeds is not None:
        ref = verify_mod.run(verify_mod.session(before), s.feeds)
        got = verify_mod.run(verify_mod.session(path, pruned=True), s.feeds, pruned=True)
        report["max_abs_diff"] = assert_same(ref, got, what)
    s.pruned_path = path
