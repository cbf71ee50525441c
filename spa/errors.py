"""Exception hierarchy.

`SpaError` and its subclasses are *user-facing* refusals: the CLI prints their message on one
line and exits 2. Anything else that escapes is a bug (exit 1, traceback kept for the report).
"""

from __future__ import annotations

__all__ = [
    "SpaError",
    "InvalidModelError",
    "UnsupportedError",
    "UsageError",
    "OutputError",
    "VerificationError",
    "PlanMismatchError",
    "PlanError",
]


class SpaError(Exception):
    """Base of every error spa raises on purpose."""


class InvalidModelError(SpaError):
    """The input is not a loadable ONNX model (missing, truncated, not a file, no graph …)."""


class UnsupportedError(SpaError):
    """A valid model or option spa cannot handle (unknown domain or opset, unknown criterion …)."""


class UsageError(SpaError):
    """Options that contradict each other or are out of range (ratio outside [0, 1) …)."""


class OutputError(SpaError):
    """The output cannot be written (unwritable folder, would overwrite the input …)."""


class VerificationError(SpaError):
    """The pruned model failed verification; nothing was written.

    Not a user error: the CLI exits 1 for it, naming the group that failed.
    """

    def __init__(self, message: str, *, group: str | None = None, max_diff: float | None = None):
        super().__init__(message)
        self.group = group
        self.max_diff = max_diff


class PlanMismatchError(SpaError):
    """A plan was replayed on a model it was not made for (sha256 or structure differ)."""


class PlanError(UsageError):
    """A plan document that is not a valid spa plan (a missing key, a wrong type, an unknown
    or out-of-range option, an unsupported version). The message names the field."""
