"""Load and run a compiled module like an ONNX Runtime session: ``spa.kernels.load(path)``.

The library's sidecar (``PATH.json``, written by :func:`spa.kernels.build.export`) gives the
input names and the outputs' names, so a caller feeds a dict of numpy arrays and gets a list of
numpy arrays back, in the ONNX graph's output order.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from spa.errors import InvalidModelError, UsageError
from spa.kernels.build import Signature, sidecar
from spa.kernels.errors import CompileError, first_line

__all__ = ["CompiledModel", "load", "from_built"]


def _flatten(out: Any) -> list[np.ndarray]:
    import tvm

    if isinstance(out, tvm.runtime.Tensor):
        return [out.numpy()]
    if isinstance(out, (list, tuple)) or hasattr(out, "__len__"):
        flat: list[np.ndarray] = []
        for o in out:
            flat.extend(_flatten(o))
        return flat
    return [np.asarray(out)]


def device(kind: str, remote: Any = None):
    """Device 0 of the target kind, here or on an RPC session."""
    import tvm

    dev = remote if remote is not None else tvm
    if kind == "llvm":
        return dev.cpu(0)
    if kind == "cuda":
        return dev.cuda(0)
    return dev.device(kind, 0)


class CompiledModel:
    """A compiled module bound to a device: ``run(None, feeds)`` like ``InferenceSession.run``."""

    def __init__(self, module: Any, signature: Signature, kind: str, *, remote: Any = None) -> None:
        import tvm
        from tvm import relax

        self.signature = signature
        self.kind = kind
        self.device = device(kind, remote)
        if not self.device.exist:
            raise CompileError(f"no {kind} device here to run the module on")
        self._vm = relax.VirtualMachine(module, self.device)
        self._main = self._vm["main"]
        self._tensor = tvm.runtime.tensor

    @property
    def input_names(self) -> list[str]:
        return [n for n, _, _ in self.signature.inputs]

    @property
    def output_names(self) -> list[str]:
        return list(self.signature.outputs)

    def _args(self, feeds: Mapping[str, np.ndarray]) -> list[Any]:
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise UsageError(f"missing input(s) {', '.join(missing)} (the module takes {', '.join(self.input_names)})")
        args = []
        for name, shape, dtype in self.signature.inputs:
            arr = np.ascontiguousarray(feeds[name], dtype=dtype)
            if list(arr.shape) != list(shape):
                raise UsageError(f"input '{name}' has shape {list(arr.shape)}; the module was compiled for {shape}")
            args.append(self._tensor(arr, self.device))
        return args

    def run(self, output_names: Sequence[str] | None, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        outs = _flatten(self._main(*self._args(feeds)))
        if output_names is None:
            return outs
        index = {n: i for i, n in enumerate(self.output_names)}
        return [outs[index[n]] for n in output_names]

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return self.run(None, feeds)

    def timer(self, feeds: Mapping[str, np.ndarray]):
        """A callable running the module once on device tensors prepared beforehand (what a
        latency measurement times: not the host→device copies)."""
        args = self._args(feeds)
        sync = self.device.sync

        def once() -> None:
            self._main(*args)
            sync()

        return once


def load(path: str | os.PathLike, *, remote: Any = None) -> CompiledModel:
    """Load a library written by ``spa compile`` / ``spa prune --target`` (``remote``: an RPC
    session to run it on a remote device instead; the file is uploaded)."""
    import tvm

    path = pathlib.Path(path)
    meta_path = sidecar(path)
    if not path.is_file():
        raise InvalidModelError(f"{path}: no such compiled module")
    try:
        meta = json.loads(meta_path.read_text())
        signature = Signature.from_json(meta)
        kind = meta["target_config"]["kind"]
    except FileNotFoundError:
        raise InvalidModelError(f"{path}: its sidecar {meta_path.name} is missing (written beside the library by spa)") from None
    except (ValueError, KeyError, TypeError) as e:
        raise InvalidModelError(f"{meta_path}: not a spa module description ({e})") from None
    if meta.get("tvm_version") != tvm.__version__:
        raise InvalidModelError(f"{path} was built with TVM {meta.get('tvm_version')}, this is TVM {tvm.__version__}: compile it again")
    try:
        if remote is not None:
            remote.upload(str(path))
            module = remote.load_module(path.name)
        else:
            module = tvm.runtime.load_module(str(path))
    except Exception as e:  # noqa: BLE001
        raise CompileError(f"{path}: cannot load the module here: {first_line(e)}") from None
    return CompiledModel(module, signature, kind, remote=remote)


def from_built(built: Any) -> CompiledModel:
    """Run a freshly built module without exporting it first."""
    return CompiledModel(built.executable, built.signature, built.target.kind)
