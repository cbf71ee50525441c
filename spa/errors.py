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
    "UnsafePathError",
    "CycleError",
    "DanglingValueError",
    "DuplicateProducerError",
    "ShapeMismatchError",
    "UnknownDataTypeError",
    "InvalidNodeError",
    "MemoryLimitError",
    "NonFiniteOutputError",
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


# -- refusals of hostile or malformed models (spa.safety); each names the file and the problem --


class UnsafePathError(InvalidModelError):
    """An external-data location that leaves the model's folder (``..``, an absolute path, a
    symlink of the file or of a folder on the way, a hard link), or is empty, holds a NUL byte,
    or names a device, FIFO or folder."""


class CycleError(InvalidModelError):
    """A graph whose nodes depend on each other in a loop, or a model-local function that
    (directly or not) calls itself."""


class DanglingValueError(InvalidModelError):
    """A node input or graph output that nothing produces (no node, input or initializer)."""


class DuplicateProducerError(InvalidModelError):
    """A value produced twice (two nodes, or a node and an input or initializer)."""


class ShapeMismatchError(InvalidModelError):
    """Declared dims that disagree with the data: a tensor whose payload is not the size its
    dims need, negative dims, or a declared shape that contradicts an initializer's."""


class UnknownDataTypeError(InvalidModelError):
    """A tensor or value of data type UNDEFINED or of a number ONNX does not define."""


class InvalidNodeError(InvalidModelError):
    """A node its operator's schema refuses (unknown operator, wrong attribute type, wrong
    number of inputs) or whose weights cannot fit the operator (a Conv weight of the wrong rank)."""


class MemoryLimitError(UnsupportedError):
    """The model's declared tensor sizes exceed the memory ceiling for analysis (``--max-memory``)."""


class NonFiniteOutputError(UnsupportedError):
    """The original model already produces NaN or inf on the verification inputs, so no
    comparison can prove the pruned model right. The message names the output."""
