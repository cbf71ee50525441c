"""The ``compile`` step of ``spa prune --target``: the pruned model built for the device.

Runs after every step that changes the model (surgery, folding, factorization) and after the
ORT benchmark, so the module is built from exactly the ONNX that is written. A model TVM
cannot import or build is not a failed prune: the pruned ONNX is still written, the report's
``target`` section carries the error, and the CLI exits 3 (documented in the README).
Everything that can be refused before any work — the target string, the tracker and its key,
the tuning database — is checked by :func:`preflight` first (exit 2).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
from typing import Any

from spa.errors import UsageError

__all__ = ["validate_options", "default_round_to", "preflight", "compile_step", "wants_module", "module_path_for", "ModuleArtifact"]

logger = logging.getLogger(__name__)


def wants_module(options: Any) -> bool:
    return (options.target or "onnx") != "onnx"


def validate_options(options: Any) -> None:
    """Cheap checks (no TVM import): numbers and option combinations."""
    if options.tune_trials < 0:
        raise UsageError(f"tune-trials must be ≥ 0, got {options.tune_trials}")
    if not wants_module(options):
        latency = options.latency_target is not None or options.allocation == "latency"  # its table is cached in --tuning-db
        for name, flag in (("tune_trials", "--tune-trials"), ("tuning_db", "--tuning-db"), ("rpc_tracker", "--rpc-tracker"), ("rpc_key", "--rpc-key")):
            if getattr(options, name) and not (name == "tuning_db" and latency):
                raise UsageError(f"{flag} needs --target (llvm, cuda, …)" + (" or latency allocation" if name == "tuning_db" else ""))


#: Kept channels are rounded to this when the ONNX file's *latency* is the objective
#: (``--latency-target`` / ``--allocation latency`` without ``--target``): ONNX Runtime's CPU
#: kernels block channels by 8 or 16, and widths off those blocks leave their fast paths —
#: measured here (docs/target.md, "Rounding"), ResNet-50 at ratio 0.3 ran 47.9 ms with widths
#: rounded to 1 and 34.9 ms rounded to 8, MobileNetV2 at ratio 0.1 ran 2× *slower* than the
#: original with widths rounded to 1. 8 is also what GPU tensor cores want.
ORT_ROUND_TO = 8


def default_round_to(options: Any) -> int:
    """``--round-to`` when not given: the target's vector width with ``--target``; for the ONNX
    file 1 (shapes as the ratio says, as Torch-Pruning gives them), or :data:`ORT_ROUND_TO`
    when latency is the objective."""
    if not wants_module(options):
        latency_objective = getattr(options, "latency_target", None) is not None or getattr(options, "allocation", None) == "latency"
        return ORT_ROUND_TO if latency_objective else 1
    from spa.kernels.target import parse_target, vector_width

    return vector_width(parse_target(options.target))


def preflight(options: Any) -> Any:
    """Parse the target (TVM must be installed), reach the tracker, open the tuning database:
    every refusal here comes before any work. Returns the emit options."""
    from spa.kernels.emit import EmitOptions
    from spa.kernels.rpc import Remote
    from spa.kernels.target import parse_target
    from spa.kernels.tune import open_database

    target = parse_target(options.target)
    remote = Remote.from_options(options.rpc_tracker, options.rpc_key)
    if remote is not None:
        remote.check()
    db = pathlib.Path(options.tuning_db) if options.tuning_db else None
    if db is not None:
        open_database(db)
    return EmitOptions(target=target, tune_trials=options.tune_trials, tuning_db=db, remote=remote, bench=options.benchmark)


def compile_step(s: Any) -> bool:
    from spa import io
    from spa.kernels.emit import compile_onnx, failure
    from spa.kernels.errors import CompileError

    emit = s.emit_options or preflight(s.options)
    emit.progress = s.emit_progress
    # The model as it is now (after folding/factorization, if any ran): what is written is what is built.
    onnx_path = s.scratch("emit")
    io.save_model(s.model, onnx_path, durable=False)
    feeds = s.feeds if s.feeds is not None else feeds_for(s.model, s.options)
    folder = onnx_path.parent
    try:
        s.target_report = compile_onnx(onnx_path, feeds, folder / f"model{emit.target.suffix}", emit, scratch=folder)
    except CompileError as e:
        s.target_report = failure(emit.target, e)
        s.warnings.append(f"compiling for {emit.target.text} failed: {e} — the pruned ONNX is still written")
        return False
    s.module = ModuleArtifact.read(pathlib.Path(s.target_report["module"]), emit.target.suffix)
    return False


def feeds_for(model: Any, options: Any):
    """Seeded inputs at the shapes the module is built for (``--input-shape``)."""
    from spa.inputs import make_feeds, resolve_input_shapes

    return make_feeds(model, resolve_input_shapes(model, options.input_shapes), options.seed, options.input_values)


def module_path_for(onnx_output: pathlib.Path, suffix: str) -> pathlib.Path:
    """``out.spa.onnx`` → ``out.spa.llvm.so`` (the library is named beside the ONNX output)."""
    stem = onnx_output.name[: -len(".onnx")] if onnx_output.name.endswith(".onnx") else onnx_output.name
    return onnx_output.with_name(stem + suffix)


@dataclasses.dataclass
class ModuleArtifact:
    """The built library and its sidecar, held in memory once the scratch folder is gone (the
    Python API returns it in ``PruneResult.module``; ``save`` writes it beside the ONNX)."""

    suffix: str
    library: bytes
    sidecar: str

    @classmethod
    def read(cls, path: pathlib.Path, suffix: str) -> ModuleArtifact:
        from spa.kernels.build import sidecar

        return cls(suffix, path.read_bytes(), sidecar(path).read_text())

    def write(self, dest: str | os.PathLike) -> pathlib.Path:
        """Write library and sidecar, each to a temporary name then renamed (nothing half
        written is left under the final names)."""
        from spa.io import write_text_atomic
        from spa.kernels.build import sidecar

        dest = pathlib.Path(dest)
        tmp = dest.with_name(f".{dest.name}.tmp")
        try:
            tmp.write_bytes(self.library)
            write_text_atomic(sidecar(dest), self.sidecar)
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            sidecar(dest).unlink(missing_ok=True)
            raise
        return dest
