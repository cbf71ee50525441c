"""Shared pytest fixtures.

The repository's ``models/`` folder (the torch zoo, ``zoo.py``) is put on ``sys.path`` so
tests can ``import zoo``; ``zoo_onnx`` exports zoo models once per session.
"""

from __future__ import annotations

import pathlib
import sys
from collections.abc import Callable
from typing import Any

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
MODELS_DIR = REPO_ROOT / "models"
if str(MODELS_DIR) not in sys.path:
    sys.path.insert(0, str(MODELS_DIR))


@pytest.fixture(scope="session")
def zoo_onnx(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., pathlib.Path]:
    """A function ``zoo_onnx(name, **kw) -> Path`` exporting zoo model ``name`` to ONNX.

    ``kw`` goes to ``zoo.export`` (``opset``, ``dynamic_batch``). Each (name, kw) is exported
    once per session into a temporary folder; treat the returned file as read-only (copy it
    before changing it). Skips the test when torch is not installed.
    """
    pytest.importorskip("torch")
    import zoo

    root = tmp_path_factory.mktemp("zoo")
    cache: dict[tuple[str, tuple[tuple[str, Any], ...]], pathlib.Path] = {}

    def export(name: str, **kw: Any) -> pathlib.Path:
        key = (name, tuple(sorted(kw.items())))
        if key not in cache:
            suffix = "".join(f"-{k}={v}" for k, v in key[1])
            cache[key] = zoo.export(name, root / f"{name}{suffix}.onnx", **kw)
        return cache[key]

    return export
