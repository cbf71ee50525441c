"""``--target`` strings: ``onnx``, ``llvm [-mcpu=… -mattr=… -mtriple=…]``, ``cuda [-arch=sm_80]``,
any other TVM target kind, or a JSON dict (TVM's own form).

TVM 0.27 refuses its old CLI string form (``Target("cuda -arch=sm_80")`` is a ValueError), so
the familiar flags are parsed here into the dict form it accepts. Two fixes users would not
guess (NOTES-LIBS): ``-mcpu=native`` is ignored by TVM's LLVM (it builds generic code), so it
becomes the host CPU's name; MetaSchedule needs ``num-cores`` on llvm, so it is filled in.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
from typing import Any

from spa.errors import UsageError

__all__ = ["TargetSpec", "parse_target", "vector_width", "ONNX"]

ONNX = "onnx"
#: Attributes that TVM types as arrays (a comma-separated flag value becomes a list).
_LIST_ATTRS = {"mattr", "keys", "libs", "cl-opt"}
#: The default CUDA architecture where no GPU is here to ask (A100; any sm_XX is accepted).
DEFAULT_CUDA_ARCH = "sm_80"
#: Limits every CUDA GPU since sm_50 has; TVM assumes the same values when they are absent.
_CUDA_LIMITS = {"max_shared_memory_per_block": 49152, "max_threads_per_block": 1024, "thread_warp_size": 32}


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    """A parsed target. ``config`` is TVM's dict form (None for ``onnx``)."""

    text: str
    kind: str
    config: dict[str, Any] | None = None
    notes: tuple[str, ...] = ()

    @property
    def is_onnx(self) -> bool:
        return self.kind == ONNX

    @property
    def is_gpu(self) -> bool:
        return self.kind in ("cuda", "rocm", "vulkan", "opencl", "metal")

    @property
    def cross(self) -> bool:
        """An llvm target for another machine: its library can be built (``.tar`` of objects)
        but not loaded or run here."""
        triple = (self.config or {}).get("mtriple")
        return self.kind == "llvm" and triple is not None and not triple.startswith(_host_arch())

    def tvm(self):
        """The ``tvm.target.Target`` (GPU targets get an llvm host)."""
        from tvm.target import Target

        config = dict(self.config or {})
        host = config.pop("host", None)
        if self.is_gpu and host is None:
            host = {"kind": "llvm"}
        return Target(config, host=host) if host is not None else Target(config)

    @property
    def suffix(self) -> str:
        """What the compiled library is called beside the ONNX output: ``.llvm.so``,
        ``.cuda.so``, ``.llvm-aarch64.tar`` for a cross target."""
        if self.cross:
            return f".llvm-{(self.config or {})['mtriple'].split('-')[0]}.tar"
        return f".{self.kind}.so"


def _host_arch() -> str:
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def _value(key: str, raw: str) -> Any:
    if key in _LIST_ATTRS:
        return [v for v in raw.split(",") if v]
    try:
        return int(raw)
    except ValueError:
        return raw


def _parse_flags(text: str) -> dict[str, Any]:
    kind, *flags = text.split()
    config: dict[str, Any] = {"kind": kind}
    for flag in flags:
        if not flag.startswith("-") or "=" not in flag:
            raise UsageError(f"--target {text!r}: expected KIND followed by -key=value flags, got {flag!r}")
        key, raw = flag.lstrip("-").split("=", 1)
        config[key] = _value(key, raw)
    return config


def _host_cpu() -> str | None:
    try:
        from tvm.target import codegen

        return str(codegen.llvm_get_system_cpu())
    except Exception:  # noqa: BLE001 - an old or partial TVM: let LLVM choose
        return None


def _cuda_arch() -> tuple[str, str | None]:
    """The GPU's sm_XX if one is here, else the default with a note saying so."""
    try:
        import tvm

        dev = tvm.cuda(0)
        if dev.exist:
            return "sm_" + str(dev.compute_version).replace(".", ""), None
    except Exception:  # noqa: BLE001 - no CUDA runtime here
        pass
    return DEFAULT_CUDA_ARCH, f"no GPU here to ask: compiled for {DEFAULT_CUDA_ARCH} (pass -arch=sm_XX for another)"


def parse_target(text: str | None) -> TargetSpec:
    """Parse and complete a target; ``UsageError`` (exit 2) names what is wrong."""
    text = (text or ONNX).strip()
    if not text:
        raise UsageError("--target is empty")
    if text == ONNX:
        return TargetSpec(text, ONNX)
    if text.startswith("{"):
        try:
            config = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"--target: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(config, dict) or "kind" not in config:
            raise UsageError("--target: a JSON target must be an object with a \"kind\"")
    else:
        config = _parse_flags(text)
    notes: list[str] = []
    kind = str(config["kind"])
    if kind == "llvm":
        if config.get("mcpu") in (None, "native") and "mtriple" not in config:
            cpu = _host_cpu()
            if cpu:
                config["mcpu"] = cpu
        config.setdefault("num-cores", os.cpu_count() or 1)
    elif kind == "cuda":
        if "arch" not in config:
            config["arch"], note = _cuda_arch()
            if note:
                notes.append(note)
        for key, value in _CUDA_LIMITS.items():  # TVM warns on stderr for each one missing
            config.setdefault(key, value)
    spec = TargetSpec(text, kind, config, tuple(notes))
    _validate(spec)
    return spec


def _validate(spec: TargetSpec) -> None:
    try:
        import tvm  # noqa: F401
    except ImportError:
        from spa.kernels.errors import TVMMissingError

        raise TVMMissingError(spec.text) from None
    try:
        spec.tvm()
    except Exception as e:  # noqa: BLE001 - TVM's message names the bad kind or key
        from spa.kernels.errors import first_line

        raise UsageError(f"--target {spec.text!r}: TVM does not accept it: {first_line(e)}") from None


def vector_width(spec: TargetSpec) -> int:
    """How many fp32 channels the target computes at once: what kept channel counts are
    rounded to by default with ``--target`` (a width that is not a multiple leaves lanes idle
    in every vectorised loop over channels). CUDA: 8 (tensor-core fragments are multiples of 8)."""
    if spec.is_onnx:
        return 1
    if spec.kind == "cuda":
        return 8
    if spec.kind != "llvm":
        return 1
    from tvm.target import codegen

    tgt = spec.tvm()

    def has(feature: str) -> bool:
        try:
            return bool(codegen.target_has_features(feature, tgt))
        except Exception:  # noqa: BLE001 - a feature name this LLVM does not know
            return False

    if has("avx512f"):
        return 16
    if has("avx2") or has("avx"):
        return 8
    return 4  # SSE, NEON, and what else: 128-bit vectors
