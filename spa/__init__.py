"""spa — Structurally Prune Anything: exact structured pruning of ONNX models.

    import spa
    result = spa.prune("model.onnx", ratio=0.5)        # or spa.plan(...) then spa.apply(...)
    result.save("model.spa.onnx")
    print(result.report.flops_ratio, result.report.oracle)
"""

from __future__ import annotations

__version__ = "0.1.0"

from spa import rules as _rules  # noqa: F401  (registers every channel rule)
from spa.errors import (
    InvalidModelError,
    OutputError,
    PlanError,
    PlanMismatchError,
    SpaError,
    UnsupportedError,
    UsageError,
    VerificationError,
)
from spa.io import load_model as load
from spa.pipeline import Analysis, PruneOptions, PruneResult, analyze, apply, explain, lowrank, plan, prune
from spa.planning import Plan
from spa.report import Report

#: ``spa.inspect(model)``: the channel analysis (groups, what is frozen and why), no changes.
inspect = analyze

__all__ = [
    "__version__",
    "prune",
    "plan",
    "apply",
    "lowrank",
    "analyze",
    "inspect",
    "load",
    "explain",
    "PruneOptions",
    "PruneResult",
    "Analysis",
    "Plan",
    "Report",
    "SpaError",
    "InvalidModelError",
    "UnsupportedError",
    "UsageError",
    "OutputError",
    "VerificationError",
    "PlanMismatchError",
    "PlanError",
]
