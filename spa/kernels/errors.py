"""Refusals of the compile backend (each a one-line message, exit 2, like every SpaError)."""

from __future__ import annotations

from spa.errors import SpaError, UnsupportedError, UsageError

__all__ = ["TVMMissingError", "CompileError", "RPCError", "TuningDatabaseError", "first_line"]

INSTALL_HINT = 'pip install "spa[tvm]"  (apache-tvm 0.27 with apache-tvm-ffi 0.1.14.post1)'


def first_line(e: BaseException) -> str:
    """The first line of an exception's text that is not traceback (TVM's FFI errors carry
    their C++ stack above the message), or its type's name."""
    for line in str(e).strip().splitlines():
        line = line.strip()
        if line and not line.startswith(("File ", "Traceback")):
            return line
    return type(e).__name__


class TVMMissingError(UnsupportedError):
    def __init__(self, target: str) -> None:
        super().__init__(f"--target {target} needs Apache TVM, which is not installed: {INSTALL_HINT}")


class CompileError(SpaError):
    """TVM could not import or build the model (the message names the op where it can).

    ``spa prune --target`` still writes the pruned ONNX when this happens (exit 3).
    """


class RPCError(SpaError):
    """The RPC tracker is unreachable, or no device with the key is free."""


class TuningDatabaseError(UsageError):
    """A ``--tuning-db`` folder that is not one, or was written by another TVM version."""
