"""ONNX → Relax → a module for the target: import, (tune,) build, export, check.

Import goes through TVM's Relax ONNX frontend on a copy specialised to concrete input shapes
(``spa.inputs.specialize``: shape arithmetic folded, so Reshape targets are constants), since
the frontend needs static shapes for most of what real exports contain. A model it cannot
import is a :class:`CompileError` naming the op; the caller decides what that means (``spa
prune --target`` still writes the pruned ONNX).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import io
import json
import logging
import os
import pathlib
import re
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from spa.kernels.errors import CompileError, first_line
from spa.kernels.layout import block_convs
from spa.kernels.target import TargetSpec

__all__ = ["Signature", "Built", "import_onnx", "build", "export", "check_against_ort", "TOLERANCE"]

logger = logging.getLogger(__name__)

#: TVM vs ONNX Runtime on the same inputs (the issue's numeric check).
TOLERANCE = {"atol": 1e-4, "rtol": 1e-3}


@dataclasses.dataclass
class Signature:
    """What a caller needs to feed the compiled module: input names, shapes and dtypes in the
    order the module takes them, and the output names (the ONNX graph's)."""

    inputs: list[tuple[str, list[int], str]]
    outputs: list[str]

    def to_json(self) -> dict[str, Any]:
        return {"inputs": [{"name": n, "shape": s, "dtype": d} for n, s, d in self.inputs], "outputs": self.outputs}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Signature:
        return cls([(i["name"], list(i["shape"]), i["dtype"]) for i in d["inputs"]], list(d["outputs"]))


@dataclasses.dataclass
class Built:
    executable: Any
    signature: Signature
    target: TargetSpec
    compile_s: float
    tuning: dict[str, Any] | None = None
    #: CUDA only: the generated source compiled ahead of time with nvcc (``check_cuda_source``).
    cuda_check: dict[str, Any] | None = None
    #: The convs' layout (``spa.kernels.layout.block_convs``): NCHW, or NCHW{b}c on x86 CPUs.
    layout: dict[str, Any] | None = None


def _unsupported_ops(model: onnx.ModelProto) -> list[str]:
    """Ops of the model that the Relax ONNX frontend has no converter for."""
    try:
        from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

        known = set(_get_convert_map())
    except Exception:  # noqa: BLE001 - a private helper; without it the frontend's message stands
        return []
    ops = {n.op_type for n in model.graph.node if n.domain in ("", "ai.onnx")}
    return sorted(ops - known)


#: Folding rounds after specialising, at most: each round's constants can unlock the next.
IMPORT_FOLD_ROUNDS = 16


def _fold_to_fixpoint(model: ir.Model) -> ir.Model:
    """Fold shape arithmetic until nothing changes. ``specialize`` stops folding once every
    shape is known (ONNX Runtime fills in the rest), but the importer needs the *values* such
    arithmetic computes to be constants too: timm's Swin computes its later stages' Pad amounts
    by Shape → Gather → Mod, each stage's fold unlocking the next, and was refused ("Dynamic
    pads are not supported") after the two rounds ``specialize`` runs. Constant-only chains
    are folded too (``FoldConstantsPass``, as the pruning pipeline does): hgnetv2's stem builds
    its pads by Concat → Reshape → Slice → Transpose → Reshape → Cast of constants, which made
    ``spa compile`` refuse a model that ``spa prune --target`` built."""
    import onnx_ir.passes.common as common

    from spa.inputs import fold_rounds

    common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)  # as canonicalize does: folding reads initializers
    fold_rounds(model, IMPORT_FOLD_ROUNDS, constants=True)
    return model


@contextlib.contextmanager
def _frontend_output_to_log():
    """TVM's ONNX frontend prints to stdout where a converter fails ("Error converting operator
    Pad, with inputs: …", which would corrupt ``--json``), and its C++ BlockBuilder warns on
    stderr when the failed import is collected: both go to the debug log instead, and the
    failure is one line (the CompileError)."""
    printed = io.StringIO()  # Python-level prints (whatever sys.stdout is: a CLI runner's too)
    with tempfile.TemporaryFile(mode="w+b") as sink:  # C++ writes to the process's fds 1 and 2
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        saved = [os.dup(1), os.dup(2)]
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
                try:
                    yield
                finally:
                    gc.collect()  # the failed import's BlockBuilder warns when it is destroyed: here, not later
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
        sink.seek(0)
        text = (printed.getvalue() + sink.read().decode(errors="replace")).strip()
    if text:
        logger.debug("TVM's frontend printed: %s", text)


def import_onnx(model: ir.Model | onnx.ModelProto, feeds: Mapping[str, np.ndarray]):
    """(Relax IRModule, Signature) for ``model`` at the shapes of ``feeds``."""
    from spa.inputs import specialize

    from tvm.relax.frontend.onnx import from_onnx

    if isinstance(model, onnx.ModelProto):
        model = ir.from_proto(model)
    shapes = {k: list(v.shape) for k, v in feeds.items()}
    static = _fold_to_fixpoint(specialize(model, shapes, feeds=feeds))
    proto = ir.to_proto(static)
    missing = _unsupported_ops(proto)
    if missing:
        raise CompileError(f"TVM's ONNX importer has no converter for {', '.join(missing)}")
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    error = None
    with _frontend_output_to_log():
        try:
            mod = from_onnx(proto, shape_dict=shapes, dtype_dict={k: str(v.dtype) for k, v in feeds.items()}, opset=opset)
        except Exception as e:  # noqa: BLE001 - the frontend raises many types; the op is in the text
            error = first_line(e)  # the exception (and the frontend state its traceback holds) dies here, inside the redirect
    if error is not None:
        raise CompileError(f"TVM cannot import the model: {error}")
    names = [v.name for v in static.graph.inputs if v.name in feeds]
    signature = Signature([(n, list(feeds[n].shape), str(feeds[n].dtype)) for n in names], [v.name for v in static.graph.outputs])
    return mod, signature


def build(
    model: ir.Model | onnx.ModelProto | str | os.PathLike,
    target: TargetSpec,
    feeds: Mapping[str, np.ndarray],
    *,
    tuning: Any = None,
) -> Built:
    """Compile ``model`` for ``target`` at the shapes of ``feeds``.

    ``tuning`` (a :class:`spa.kernels.tune.Tuning`) tunes with MetaSchedule first and builds from
    its database; without it the default schedules are used (dlight on GPUs; on CPUs the default
    pipeline only legalises and fuses, which is why untuned TVM is far slower than ORT there).
    On x86 CPUs convs are built channel-blocked (:func:`~spa.kernels.layout.block_convs`); where
    TVM cannot convert or build that, the NCHW module is built instead and ``layout`` says why.
    """
    if isinstance(model, (str, os.PathLike)):
        model = ir.load(os.fspath(model))
    start = time.perf_counter()
    mod, signature = import_onnx(model, feeds)
    tgt = target.tvm()
    try:
        blocked, layout = block_convs(mod, target)
    except Exception as e:  # noqa: BLE001 - a layout TVM cannot convert: NCHW builds as before
        logger.debug("conv blocking failed", exc_info=True)
        blocked, layout = mod, {"conv_layout": "NCHW", "blocking_failed": first_line(e)}
    try:
        executable, info = _compile(blocked, tgt, target, tuning)
    except Exception as e:  # noqa: BLE001 - TVM's types; a blocked module TVM cannot build is built in NCHW
        if blocked is mod or isinstance(e, CompileError):
            raise _build_error(e, target) from None
        logger.debug("building with blocked convs failed; building NCHW", exc_info=True)
        layout = {"conv_layout": "NCHW", "blocking_failed": first_line(e)}
        try:
            executable, info = _compile(mod, tgt, target, tuning)
        except Exception as e2:  # noqa: BLE001
            raise _build_error(e2, target) from None
    built = Built(executable, signature, target, time.perf_counter() - start, info, layout=layout)
    if target.kind == "cuda":
        built.cuda_check = check_cuda_source(built)
    return built


def _compile(mod, tgt, target: TargetSpec, tuning: Any) -> tuple[Any, dict[str, Any] | None]:
    """(executable, tuning info) of ``mod``: tuned and built from the database, or built with
    the default schedules (dlight's on CUDA)."""
    import tvm

    if tuning is not None:
        from spa.kernels.tune import tune_and_build

        return tune_and_build(mod, tgt, tuning)
    if target.kind == "cuda":
        return tvm.compile(mod, target=tgt, relax_pipeline=_cuda_pipeline(tgt)), None
    return tvm.compile(mod, target=tgt), None


def _build_error(e: BaseException, target: TargetSpec) -> CompileError:
    if isinstance(e, CompileError):
        return e
    return CompileError(f"TVM cannot build the model for {target.text}: {first_line(e)}")


def _guarded(rule):
    """A dlight rule that declines (None) where it raises, so the next rule gets the function.

    TVM's default GPU rules assert on degenerate shapes instead of declining: GEMV on a grouped
    conv with a 1×1 output (GhostNetV2), Matmul on K=1 attention over one token (LeViT,
    MobileViT), a conv with a Pad fused after it (HGNetV2's stem). Seven of the 79 coverage
    models failed to build for CUDA that way; with the failing functions left to the next rule
    (``Fallback`` last) all seven build and compile with nvcc (docs/cuda-coverage.md).
    """
    from tvm.s_tir.dlight.base import ScheduleRule

    class Guarded(ScheduleRule):
        def apply(self, func, target, tunable):
            try:
                return rule.apply(func, target, tunable)
            except Exception as e:  # noqa: BLE001 - TVM's rules raise assertion and schedule errors alike
                name = func.attrs.get("global_symbol", "?") if func.attrs is not None else "?"
                logger.debug("dlight %s declined %s: %s", type(rule).__name__, name, first_line(e))
                return None

        def is_target_available(self, target) -> bool:
            return rule.is_target_available(target)

    Guarded.__name__ = f"Guarded{type(rule).__name__}"
    return Guarded()


def _cuda_pipeline(tgt):
    """TVM's default CUDA pipeline (``relax.backend.cuda.pipeline``) with its dlight rules
    guarded (:func:`_guarded`); ``Fallback``, the last, is left as it is so a function nothing
    schedules still fails the build with its own message."""
    import tvm
    from tvm.relax.backend.cuda import pipeline as cuda
    from tvm.s_tir import dlight as dl

    rules = [_guarded(r) for r in (dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction())] + [dl.gpu.Fallback()]
    legalize = [p for p in cuda.legalize_passes(tgt) if not isinstance(p, dl.ApplyDefaultSchedule)] + [dl.ApplyDefaultSchedule(*rules)]

    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod, _ctx):
        with tgt:
            return tvm.transform.Sequential(
                cuda.library_dispatch_passes(tgt) + legalize + cuda.dataflow_lower_passes(tgt) + cuda.finalize_passes(tgt)
            )(mod)

    return _pipeline


def _cuda_source(executable: Any) -> str | None:
    """The generated CUDA C (VMExecutable → llvm host module → cuda module: NOTES-LIBS)."""
    stack = [executable.mod]
    while stack:
        m = stack.pop()
        if getattr(m, "kind", None) == "cuda" or getattr(m, "type_key", None) == "cuda":
            return m.inspect_source("")
        stack.extend(getattr(m, "imports", []))
    return None


def check_cuda_source(built: Built) -> dict[str, Any]:
    """Compile the generated CUDA C to a fatbin with nvcc, ahead of time, so a module built
    here without a GPU is known to compile for its architecture (the library itself carries
    the source and compiles it where it is loaded)."""
    import shutil

    from tvm.support import nvcc

    source = _cuda_source(built.executable)
    if source is None:
        return {"compiled": None, "why": "no CUDA kernels in the module"}
    if shutil.which("nvcc") is None:
        return {"compiled": None, "why": "nvcc not found: the CUDA source was not compiled ahead of time"}
    arch = built.target.config.get("arch", "sm_80")
    started = time.perf_counter()
    try:
        with built.target.tvm():
            fatbin = nvcc.compile_cuda(source, target_format="fatbin", compiler="nvcc", arch=arch)
    except Exception as e:  # noqa: BLE001 - nvcc's diagnostics are in the message
        raise CompileError(f"nvcc cannot compile the generated CUDA code for {arch}: {first_line(e)}") from None
    return {"compiled": True, "arch": arch, "fatbin_bytes": len(fatbin), "nvcc_s": round(time.perf_counter() - started, 2),
            "kernels": source.count("__global__")}


def export(built: Built, path: str | os.PathLike) -> pathlib.Path:
    """Write the library and its sidecar ``PATH.json`` (signature, target, versions).

    ``.so`` needs a host-compatible compiler; a cross target is written as ``.tar`` (objects, to
    link on the device). Both are written to a temporary name and renamed, so a failure leaves
    nothing behind.
    """
    import tvm

    from spa import __version__
    from spa.io import write_text_atomic

    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    try:
        built.executable.export_library(str(tmp))
        meta = {
            "format": "spa-tvm-module",
            "version": 1,
            "target": built.target.text,
            "target_config": built.target.config,
            "tvm_version": tvm.__version__,
            "spa_version": __version__,
            **built.signature.to_json(),
        }
        write_text_atomic(sidecar(path), json.dumps(meta, indent=1) + "\n")
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        sidecar(path).unlink(missing_ok=True)
        if isinstance(e, Exception) and not isinstance(e, OSError):
            raise CompileError(f"cannot export the module for {built.target.text}: {first_line(e)}") from None
        raise
    return path


def sidecar(path: str | os.PathLike) -> pathlib.Path:
    path = pathlib.Path(path)
    return path.with_name(path.name + ".json")


def check_against_ort(outputs: Sequence[np.ndarray], expected: Sequence[np.ndarray], names: Sequence[str]) -> dict[str, Any]:
    """The numeric check (atol 1e-4, rtol 1e-3) of TVM's outputs against ORT's; raises
    CompileError naming the output that differs."""
    worst = 0.0
    for name, got, want in zip(names, outputs, expected, strict=True):
        got, want = np.asarray(got), np.asarray(want)
        if got.shape != want.shape:
            raise CompileError(f"TVM's output '{name}' has shape {list(got.shape)}, ONNX Runtime's {list(want.shape)}")
        if want.size == 0:
            continue
        diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
        worst = max(worst, float(np.nanmax(diff)) if diff.size else 0.0)
        if not np.allclose(got, want, equal_nan=True, **TOLERANCE):
            raise CompileError(
                f"TVM's output '{name}' differs from ONNX Runtime's by up to {float(np.nanmax(diff)):.3g} "
                f"(tolerance atol {TOLERANCE['atol']}, rtol {TOLERANCE['rtol']})"
            )
    return {"max_abs_diff": worst, **TOLERANCE}


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)
