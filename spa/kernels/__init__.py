"""The compile/measure backend (Apache TVM): ``--target``, ``spa compile``, ``spa bench``.

TVM is the optional extra ``spa[tvm]``; nothing here imports it until a target other than
``onnx`` is asked for, and then a missing TVM is a one-line refusal (exit 2) saying how to
install it.

- :mod:`.target`: parse ``--target`` strings into TVM's dict form (host CPU filled in).
- :mod:`.build`: ONNX → Relax (static shapes) → build → export ``.so``/``.tar`` + sidecar.
- :mod:`.tune`: MetaSchedule with a reusable database folder.
- :mod:`.runtime`: :func:`load` a module and run it with numpy inputs like an ORT session.
- :mod:`.rpc`: devices behind a TVM RPC tracker.
- :mod:`.emit`: compile + check against ORT + latency side by side (the pipeline's step).
- :mod:`.threads`: TVM's CPU thread count, set to the physical cores on import (TVM's own
  default halves the cores on x86, which left one of the CI machine's two cores idle).
"""

from __future__ import annotations

from spa.kernels.errors import CompileError, RPCError, TuningDatabaseError, TVMMissingError
from spa.kernels.target import TargetSpec, parse_target
from spa.kernels.threads import configure as _configure_threads

# Before any TVM kernel runs in this process or a child (MetaSchedule workers inherit it).
TVM_THREADS = _configure_threads()

__all__ = [
    "CompileError", "RPCError", "TuningDatabaseError", "TVMMissingError",
    "TargetSpec", "parse_target", "load", "compile_onnx", "EmitOptions",
]


def load(path, *, remote=None):
    """Load a module written by ``spa compile`` / ``spa prune --target`` (see :mod:`.runtime`)."""
    from spa.kernels.runtime import load as _load

    return _load(path, remote=remote)


def __getattr__(name: str):
    if name in ("compile_onnx", "EmitOptions"):
        from spa.kernels import emit

        return getattr(emit, name)
    raise AttributeError(name)
