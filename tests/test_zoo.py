"""The torch zoo itself: every model exports and ONNX Runtime agrees with torch."""

from __future__ import annotations

import pathlib
from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")
import zoo  # noqa: E402  (models/ is put on sys.path by conftest.py)

PARAMS = [
    pytest.param(name, marks=pytest.mark.slow) if name in zoo.SLOW else name for name in zoo.NAMES
]


def _ort_vs_torch(path: pathlib.Path, name: str, batch: int = 1) -> None:
    model, shape = zoo.build(name)
    x = zoo.sample_input(name, (batch, *shape[1:]), seed=1)
    with torch.no_grad():
        expected = model(x).numpy()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = sess.run(["output"], {"input": x.numpy()})
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", PARAMS)
def test_zoo_export_matches_torch(zoo_onnx: Callable[..., pathlib.Path], name: str) -> None:
    path = zoo_onnx(name)
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["output"]
    _ort_vs_torch(path, name)


def test_zoo_dynamic_batch(zoo_onnx: Callable[..., pathlib.Path]) -> None:
    path = zoo_onnx("shufflenet", dynamic_batch=True)
    dim = onnx.load(path).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_param == "batch"
    _ort_vs_torch(path, "shufflenet", batch=3)


def test_zoo_builders_are_deterministic() -> None:
    a, _ = zoo.build("resnet")
    b, _ = zoo.build("resnet")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)


def test_zoo_batchnorms_are_not_identity() -> None:
    model, _ = zoo.build("densenet")
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns
    for bn in bns:
        assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))
        assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
        assert bool((bn.running_var > 0).all())
        assert not torch.allclose(bn.weight, torch.ones_like(bn.weight))


def test_zoo_unknown_name() -> None:
    with pytest.raises(KeyError, match="unknown zoo model"):
        zoo.build("nope")
