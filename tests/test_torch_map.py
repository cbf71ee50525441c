"""spa.torch.apply_plan: a plan made on the ONNX export slices the torch module it came from.

For each model and both exporters: export, prune with spa, apply the plan to the module,
export the sliced module again, and compare it with spa's pruned ONNX in ONNX Runtime.
"""

from __future__ import annotations

import io
import json
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import spa
from spa.errors import UnsupportedError

torch = pytest.importorskip("torch")
pytest.importorskip("onnxscript")  # the dynamo exporter
import spa.torch as st  # noqa: E402

nn = torch.nn


class CNN(nn.Module):
    """Conv-BN (folded by both exporters), a residual block, a strided conv, GAP, Linear."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c3, self.fc = nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.Linear(16, 5)

    def forward(self, x):
        h = torch.relu(self.b1(self.c1(x)))
        h = torch.relu(h + self.b2(self.c2(h)))
        return self.fc(torch.relu(self.c3(h)).mean((2, 3)))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(10, 32), nn.Linear(32, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.l3(torch.relu(self.l2(torch.relu(self.l1(x)))))


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True)

    def forward(self, x):
        return self.layer(x)


class LSTMNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm, self.fc = nn.LSTM(6, 12, batch_first=True), nn.Linear(12, 3)

    def forward(self, x):
        y, _ = self.lstm(x)
        return self.fc(y[:, -1])


MODELS = {"cnn": (CNN, (2, 3, 8, 8)), "mlp": (MLP, (2, 10)), "encoder": (Encoder, (1, 5, 16)), "lstm": (LSTMNet, (1, 7, 6))}


def build(name: str):
    torch.manual_seed(0)
    cls, shape = MODELS[name]
    m = cls().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # no two tensors alike (exporters share equal ones)
        for b in m.modules():
            if isinstance(b, nn.BatchNorm2d):
                b.running_mean.uniform_(-0.5, 0.5)
                b.running_var.uniform_(0.5, 2.0)
    return m, torch.randn(*shape)


def export(m, x, dynamo: bool) -> onnx.ModelProto:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            prog = torch.onnx.export(m, (x,), input_names=["x"], output_names=["y"], dynamo=True, verbose=False)
            return prog.model_proto
        torch.onnx.export(m, (x,), buf, input_names=["x"], output_names=["y"], dynamo=False)
    return onnx.load_from_string(buf.getvalue())


def run(model: onnx.ModelProto, x) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x.numpy()})[0]


CASES = [(n, d) for n in MODELS for d in (False, True)]


@pytest.mark.parametrize("name, dynamo", CASES, ids=[f"{n}-{'dynamo' if d else 'torchscript'}" for n, d in CASES])
def test_sliced_module_computes_the_pruned_onnx(name: str, dynamo: bool) -> None:
    m, x = build(name)
    exported = export(m, x, dynamo)
    result = spa.prune(exported, ratio=0.5, verify="check", benchmark=False)
    assert result.plan.tensors, "nothing was pruned: the test would prove nothing"
    import onnx_ir as ir

    pruned = ir.to_proto(result.model)
    mapping = st.apply_plan(m, result.plan, model=exported)
    again = export(m, x, False)  # the sliced module, exported again
    want = run(pruned, x)
    np.testing.assert_allclose(run(again, x), want, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(want).max())))
    sizes = {k: v for k, v in m.state_dict().items()}
    for key, shape in mapping.sliced.items():
        assert list(sizes[key].shape) == shape
    if name == "encoder":
        assert mapping.replaced and isinstance(m.layer.self_attn, st.PrunedMultiheadAttention)
    if name == "lstm":
        assert mapping.constants and m.lstm.hidden_size < 12  # the exporter's zero initial state is skipped
    if name == "cnn":
        assert m.b1.num_features == m.c1.out_channels < 8  # folded BatchNorm found and sliced
    assert mapping.max_abs_diff is not None and mapping.max_abs_diff < 1e-4  # apply_plan's own check ran
    # the module still trains: a backward pass through the sliced shapes
    m.train()
    m(x).sum().backward()


def test_plan_as_path_dict_and_names_only(tmp_path) -> None:
    m, x = build("mlp")
    exported = export(m, x, False)
    plan = spa.plan(exported, ratio=0.5)
    path = tmp_path / "plan.json"
    path.write_text(plan.dumps())
    for form in (path, json.loads(plan.dumps())):
        fresh, _ = build("mlp")
        st.apply_plan(fresh, form)  # TorchScript keeps the MLP's names: no model needed
        assert fresh.l2.out_features == fresh.l3.in_features == 8


def test_unmappable_tensors_are_named() -> None:
    m, x = build("cnn")
    exported = export(m, x, False)
    plan = spa.plan(exported, ratio=0.5)
    with pytest.raises(UnsupportedError, match=r"onnx::Conv_\d+.*model="):
        st.apply_plan(build("cnn")[0], plan)  # folded names, no model to match values against
    other = MLP()
    with pytest.raises(UnsupportedError, match="cannot map 7 planned tensors"):
        st.apply_plan(other, plan, model=exported)


def _zoo_cases():
    import zoo  # models/ is put on sys.path by conftest.py

    return [n for n in zoo.NAMES]


@pytest.mark.slow
@pytest.mark.parametrize("name", _zoo_cases())
def test_zoo_models_map_back(name: str, tmp_path) -> None:
    """Every zoo model: spa's plan, mapped to the torch module and exported again, computes
    spa's pruned ONNX (ShuffleNet's forward splits into equal halves itself: refused)."""
    import onnx_ir as ir
    import zoo

    m, shape = zoo.build(name)
    m.eval()
    x = zoo.sample_input(name, shape, seed=0)
    path = zoo.export(name, tmp_path / "m.onnx")
    proto = onnx.load(path)
    result = spa.prune(proto, ratio=0.5, verify="check", benchmark=False)
    if name == "shufflenet":
        with pytest.raises(UnsupportedError, match="does not run"):
            st.apply_plan(m, result.plan, model=proto)
        return
    mapping = st.apply_plan(m, result.plan, model=proto)
    assert mapping.max_abs_diff is not None
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (x,), buf, input_names=["input"], output_names=["output"], dynamo=False)
    feed = {"input": x.numpy()}
    want = ort.InferenceSession(ir.to_proto(result.model).SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    got = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(want).max())))


class HardCoded(nn.Module):
    """A forward that reshapes with a size it computed itself: the plan can't reach it."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(10, 32), nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.l1(x))
        return self.l2(h.reshape(x.shape[0], 2, 16).sum(1))


def test_a_module_whose_code_fixes_the_sizes_is_refused() -> None:
    torch.manual_seed(0)
    m = HardCoded().eval()
    x = torch.randn(2, 10)
    exported = export(m, x, False)
    plan = spa.plan(exported, ratio=0.5)
    assert plan.tensors
    with pytest.raises(UnsupportedError, match="sliced module"):
        st.apply_plan(m, plan, model=exported)
