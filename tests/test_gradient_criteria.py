"""Gradient criteria on the ONNX model itself (spa.autodiff + spa.criteria.gradient).

Each criterion's group scores are compared with a hand computation in numpy (the analytic
gradients of a two-layer MLP); the interpreter's outputs are compared with ONNX Runtime and its
gradients with finite differences.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import spa
from spa.autodiff import OPS, TorchGraph, require_torch
from spa.errors import UnsupportedError

torch = pytest.importorskip("torch")

D_IN, HIDDEN, CLASSES, N = 4, 6, 3, 10


def mlp(seed: int = 0, tail: str | None = None) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits = {
        "W1": rng.standard_normal((D_IN, HIDDEN)).astype(np.float32),
        "B1": rng.standard_normal(HIDDEN).astype(np.float32) * 0.1,
        "W2": rng.standard_normal((HIDDEN, CLASSES)).astype(np.float32),
        "B2": rng.standard_normal(CLASSES).astype(np.float32) * 0.1,
    }
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["m1"], name="mm1"),
        helper.make_node("Add", ["m1", "B1"], ["h"], name="add1"),
        helper.make_node("Relu", ["h"], ["a"], name="relu"),
        helper.make_node("MatMul", ["a", "W2"], ["m2"], name="mm2"),
        helper.make_node("Add", ["m2", "B2"], ["y" if tail is None else "z"], name="add2"),
    ]
    if tail is not None:
        nodes.append(helper.make_node(tail, ["z"], ["y"], name="tail"))
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, D_IN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, CLASSES])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def params(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}


def data(seed: int = 1):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((N, 1, D_IN)).astype(np.float32), rng.integers(0, CLASSES, N)


# -- hand computation (numpy, float64) ------------------------------------------------------------


def per_sample_grads(p, x, target, kind):
    """Gradient of one sample's loss (``ce`` with ``target``, or ``norm``: ½‖y‖²)."""
    h = x @ p["W1"] + p["B1"]
    a = np.maximum(h, 0)
    y = a @ p["W2"] + p["B2"]
    if kind == "norm":
        dy = y
    else:
        e = np.exp(y - y.max())
        dy = e / e.sum()
        dy[target] -= 1
    da = p["W2"] @ dy
    dh = da * (h > 0)
    return {"W1": np.outer(x, dh), "B1": dh, "W2": np.outer(a, dy), "B2": dy}


def mean_grad(p, X, labels, kind):
    gs = [per_sample_grads(p, X[i, 0].astype(np.float64), labels[i], kind) for i in range(len(X))]
    return {k: np.mean([g[k] for g in gs], axis=0) for k in p}, gs


def hessian_grad(p, X, labels, kind, eps=1e-6):
    g, _ = mean_grad(p, X, labels, kind)
    up = mean_grad({k: p[k] + eps * g[k] for k in p}, X, labels, kind)[0]
    down = mean_grad({k: p[k] - eps * g[k] for k in p}, X, labels, kind)[0]
    return {k: (up[k] - down[k]) / (2 * eps) for k in p}


def expected_group(p, q, per_weight, signed=False):
    """The hidden group's scores: mean over W1 (columns), B1, W2 (rows) of the channel sums."""
    s1 = per_weight(p["W1"], q["W1"]).sum(axis=0)
    s2 = per_weight(p["B1"], q["B1"])
    s3 = per_weight(p["W2"], q["W2"]).sum(axis=1)
    score = (s1 + s2 + s3) / 3
    norm = np.abs(score).mean() if signed else score.mean()
    return score / norm


def hidden_scores(model, criterion, calibration):
    plan = spa.plan(model, criterion=criterion, ratio=0.5, calibration=calibration)
    (group,) = [g for g in plan.groups if g.units == HIDDEN and g.scores is not None]
    return np.array(group.scores)


ABS = lambda w, q: np.abs(w * q)  # noqa: E731


@pytest.mark.parametrize(
    "criterion, quantity, per_weight, signed",
    [
        ("taylor", "grad", ABS, False),
        ("snip", "grad", ABS, False),
        ("hessian", "fisher", lambda w, q: w * w * q, False),
        ("grasp", "hg", lambda w, q: w * q, True),
        ("crop", "hg", ABS, False),
    ],
)
def test_criterion_matches_hand_computation(criterion, quantity, per_weight, signed) -> None:
    model = mlp()
    p = params(model)
    X, labels = data()
    g, per_sample = mean_grad(p, X, labels, "ce")
    if quantity == "grad":
        q = g
    elif quantity == "fisher":
        q = {k: np.mean([s[k] ** 2 for s in per_sample], axis=0) for k in p}
    else:
        q = hessian_grad(p, X, labels, "ce")
    want = expected_group(p, q, per_weight, signed)
    got = hidden_scores(model, criterion, {"x": X, "labels": labels})
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-5)


def test_label_free_objectives() -> None:
    """Without labels: snip uses ½‖y‖²; taylor the cross-entropy to the model's own argmax."""
    model = mlp()
    p = params(model)
    X, _ = data()
    g, _ = mean_grad(p, X, [None] * N, "norm")
    np.testing.assert_allclose(hidden_scores(model, "snip", {"x": X}), expected_group(p, g, ABS), rtol=2e-3, atol=2e-5)
    own = np.array([np.argmax(np.maximum(X[i, 0] @ p["W1"] + p["B1"], 0) @ p["W2"] + p["B2"]) for i in range(N)])
    np.testing.assert_allclose(hidden_scores(model, "taylor", {"x": X}), hidden_scores(model, "taylor", {"x": X, "labels": own}), rtol=1e-6)


def test_grasp_sign_follows_the_reference_code() -> None:
    """GraSP removes the largest −θ·Hg: spa's keep score θ·Hg must rank the other way round
    from −θ·Hg (and differ from crop's |θ·Hg| when signs are mixed)."""
    model = mlp()
    p = params(model)
    X, labels = data()
    hg = hessian_grad(p, X, labels, "ce")
    S = -expected_group(p, hg, lambda w, q: w * q, signed=True)  # the reference's score
    got = hidden_scores(model, "grasp", {"x": X, "labels": labels})
    assert np.argmax(S) == np.argmin(got) and np.argmin(S) == np.argmax(got)


def test_interpreter_matches_onnxruntime_and_finite_differences() -> None:
    model = mlp()
    X, labels = data()
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    graph = TorchGraph(ir.from_proto(model))
    for i in range(3):
        (y,) = graph({"x": X[i]})
        np.testing.assert_allclose(y.detach().numpy(), sess.run(None, {"x": X[i]})[0], rtol=1e-5, atol=1e-6)

    g64 = TorchGraph(ir.from_proto(model), dtype=torch.float64)
    leaves = g64.leaves(["W1", "B1", "W2"])

    def loss(ps, x):
        (y,) = g64({"x": x}, ps)
        return torch.nn.functional.cross_entropy(y, torch.tensor([int(labels[0])]))

    (gw1, gb1, gw2) = torch.autograd.grad(loss(leaves, X[0]), list(leaves.values()))
    eps = 1e-6
    for name, grad in (("W1", gw1), ("B1", gb1), ("W2", gw2)):
        flat = grad.reshape(-1)
        for j in range(0, flat.numel(), 5):
            bumped = {k: v.detach().clone() for k, v in leaves.items()}
            bumped[name].view(-1)[j] += eps
            up = loss(bumped, X[0]).item()
            bumped[name].view(-1)[j] -= 2 * eps
            fd = (up - loss(bumped, X[0]).item()) / (2 * eps)
            assert abs(fd - flat[j].item()) < 1e-7 + 1e-6 * abs(fd), (name, j)
    # the same gradient, in float32, against finite differences of ONNX Runtime's own outputs
    w1 = params(model)["W1"].astype(np.float32)
    j, eps32 = (0, 1), 1e-2
    outs = []
    for sign in (1, -1):
        m = onnx.ModelProto.FromString(model.SerializeToString())
        w = w1.copy()
        w[j] += sign * eps32
        m.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "W1"))
        y = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": X[0]})[0]
        outs.append(float(torch.nn.functional.cross_entropy(torch.from_numpy(y).double(), torch.tensor([int(labels[0])]))))
    assert abs((outs[0] - outs[1]) / (2 * eps32) - gw1[j].item()) < 1e-3


def test_cnn_ops_match_onnxruntime() -> None:
    """A torch CNN (Conv, BN, residual Add, pools, Flatten, Gemm) exported to ONNX runs the
    same in the interpreter as in ORT, after spa's canonicalisation."""
    from spa.passes.canonicalize import CanonicalizePass
    from spa.pipeline import load

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(8)
            self.c2 = torch.nn.Conv2d(8, 8, 3, padding=1, groups=2)
            self.pool = torch.nn.MaxPool2d(2)
            self.fc = torch.nn.Linear(8 * 4 * 4, 5)

        def forward(self, x):
            h = torch.relu(self.bn(self.c1(x)))
            h = self.pool(h + torch.nn.functional.hardswish(self.c2(h)))
            return torch.nn.functional.log_softmax(self.fc(h.flatten(1)), dim=1)

    torch.manual_seed(0)
    net = Net().eval()
    net.bn.running_mean.uniform_(-1, 1)
    net.bn.running_var.uniform_(0.5, 2)
    import io as _io

    buf = _io.BytesIO()
    torch.onnx.export(net, (torch.randn(1, 3, 8, 8),), buf, input_names=["x"], output_names=["y"], dynamo=False)
    canonical, _, _ = load(onnx.load_from_string(buf.getvalue()))
    CanonicalizePass()(canonical)
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    want = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    (got,) = TorchGraph(canonical)({"x": x})
    np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-4, atol=1e-5)


def test_a_model_it_cannot_differentiate_is_refused_naming_the_op(tmp_path) -> None:
    model = mlp(tail="Hardmax")
    assert "Hardmax" not in OPS
    with pytest.raises(UnsupportedError, match="tail \\(Hardmax\\)"):
        spa.plan(model, criterion="taylor", ratio=0.5)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    proc = subprocess.run([sys.executable, "-m", "spa.cli", "prune", str(path), "--criterion", "snip", "--ratio", "0.5"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Hardmax" in proc.stderr and "Traceback" not in proc.stderr


def test_labels_come_from_the_calibration_file(tmp_path) -> None:
    model = mlp()
    X, labels = data()
    path, calib = tmp_path / "m.onnx", tmp_path / "c.npz"
    onnx.save(model, path)
    np.savez(calib, x=X, labels=labels)
    proc = subprocess.run([sys.executable, "-m", "spa.cli", "prune", str(path), "--criterion", "taylor", "--ratio", "0.5",
                           "--calibration", str(calib), "--compensate", "calibration", "--json", "--no-bench"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    notes = json.loads(proc.stdout)["options"]["gradients"]
    assert notes["objective"] == "ce" and notes["samples"] == N and notes["source"] == "calibration"


def test_without_torch_the_refusal_is_one_line(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(UnsupportedError, match=r"spa\[torch\]"):
        require_torch()


def test_calibration_keeps_labels_apart(tmp_path) -> None:
    from spa.calibration import open_calibration

    model = ir.from_proto(mlp())
    X, labels = data()
    np.save(tmp_path / "x.npy", X)
    np.save(tmp_path / "labels.npy", labels)
    for source in ({"x": X, "labels": labels}, tmp_path):
        calib = open_calibration(source, model, None)
        assert all(set(feed) == {"x"} for feed in calib)  # compensation never sees the labels
        pairs = list(calib.labelled())
        assert [int(lab[0]) for _, lab in pairs] == labels.tolist()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet", "densenet", "mobilenetv2", "shufflenet", "se", "unet", "nhwc", "conv1d", "conv3d",
                                  "transformer", "gqa", "bert", "resnet50"])
def test_interpreter_runs_the_zoo(name, tmp_path) -> None:
    """The zoo's CNNs and transformers run in the interpreter as in ONNX Runtime; its LSTM is refused."""
    import zoo  # models/ is put on sys.path by conftest.py
    from spa.passes.canonicalize import CanonicalizePass
    from spa.pipeline import load

    m, shape = zoo.build(name)
    x = zoo.sample_input(name, shape, seed=0).numpy()
    path = zoo.export(name, tmp_path / "m.onnx")
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    canonical, _, _ = load(path)
    CanonicalizePass()(canonical)
    (got,) = TorchGraph(canonical)({"input": x})
    np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(want).max())))


@pytest.mark.slow
def test_interpreter_refuses_the_zoo_lstm(tmp_path) -> None:
    import zoo

    canonical, _, _ = __import__("spa.pipeline", fromlist=["load"]).load(zoo.export("lstm", tmp_path / "m.onnx"))
    with pytest.raises(UnsupportedError, match=r"\(LSTM\)"):
        TorchGraph(canonical)
