"""Refusals of the compile backend (each a one-line message, exit 2, like every SpaError)."""

from __future__ import annotations

from spa.errors import SpaError, UnsupportedError, UsageError

__all__ = ["TVMMissingError", "CompileError", "RPCError", "TuningDatabaseError"]

INSTALL_HINT = 'pip install "spa[tvm]"  (apache-tvm 0.27 with apache-tvm-ffi 0.1.14.post1)'


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
