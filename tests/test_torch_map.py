"""spa.torch.apply_plan: a plan made on the ONNX export slices the torch module it came from.

For each model and both exporters: export, prune with spa, apply the plan to the module,
export the sliced module again, and compare it with spa's pruned ONNX in ONNX Runtime. The
plan alone (its fingerprints, no ONNX file) must slice a fresh copy exactly as ``model=`` does.
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
from spa.errors import PlanError, UnsupportedError
from spa.planning import Plan

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


class RecurrentNet(nn.Module):
    """nn.GRU (ONNX gate order z, r, h; torch r, z, n) or nn.RNN (dynamo unrolls it and folds
    ``linear(h0 = 0, W_hh, b_hh)`` into a [1, 1, H] copy of b_hh)."""

    def __init__(self, kind: str = "GRU", layers: int = 1, bidirectional: bool = False):
        super().__init__()
        self.rnn = getattr(nn, kind)(6, 12, num_layers=layers, bidirectional=bidirectional, batch_first=True)
        self.fc = nn.Linear(12 * (2 if bidirectional else 1), 3)

    def forward(self, x):
        y, _ = self.rnn(x)
        return self.fc(y[:, -1])


MODELS = {"cnn": (CNN, (2, 3, 8, 8)), "mlp": (MLP, (2, 10)), "encoder": (Encoder, (1, 5, 16)), "lstm": (LSTMNet, (1, 7, 6)),
          "gru": (RecurrentNet, (1, 7, 6)), "rnn": (lambda: RecurrentNet("RNN"), (1, 7, 6))}


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
    if name == "gru":
        assert mapping.constants and m.rnn.hidden_size < 12 and isinstance(m.rnn, nn.GRU)
    if name == "rnn":
        assert m.rnn.hidden_size < 12 and isinstance(m.rnn, nn.RNN)
    if name == "cnn":
        assert m.b1.num_features == m.c1.out_channels < 8  # folded BatchNorm found and sliced
    assert mapping.max_abs_diff is not None and mapping.max_abs_diff < 1e-4  # apply_plan's own check ran
    # the plan alone, through its JSON (no ONNX file): the same keys, the same sliced state_dict
    alone, _ = build(name)
    from_plan = st.apply_plan(alone, Plan.loads(result.plan.dumps()))
    assert from_plan.matched_by == "fingerprints" and from_plan.max_abs_diff is None
    assert "not compared with ONNX Runtime" in from_plan.summary()
    assert from_plan.mapped == mapping.mapped and from_plan.constants == mapping.constants
    assert from_plan.sliced == mapping.sliced and from_plan.replaced.keys() == mapping.replaced.keys()
    _assert_same_state(alone, m)
    # the module still trains: a backward pass through the sliced shapes
    m.train()
    m(x).sum().backward()


def test_gru_layers_of_different_sizes_become_a_pruned_rnn() -> None:
    """A 2-layer bidirectional GRU whose layers the global allocation prunes to different
    sizes: replaced by PrunedRNN, checked in ORT, and the plan alone does the same."""

    def make():
        torch.manual_seed(0)
        m = RecurrentNet("GRU", 2, True).eval()
        with torch.no_grad():
            for n, p in m.named_parameters():
                p.mul_(5.0 if "_l1" in n else 1.0)  # layer 1 matters more: it keeps more units
        return m

    m, x = make(), torch.randn(1, 7, 6)
    exported = export(m, x, False)
    result = spa.prune(exported, ratio=0.5, allocation="global", verify="check", benchmark=False)
    mapping = st.apply_plan(m, result.plan, model=exported)
    assert isinstance(m.rnn, st.PrunedRNN) and "rnn" in mapping.replaced and mapping.max_abs_diff < 1e-4
    sizes = [layer.hidden_size for layer in m.rnn.layers]
    assert len(set(sizes)) == 2
    import onnx_ir as ir

    want = run(ir.to_proto(result.model), x)
    got = m(x).detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(want).max())))
    alone = make()
    st.apply_plan(alone, Plan.loads(result.plan.dumps()))
    _assert_same_state(alone, m)


def test_directions_pruned_apart_are_refused() -> None:
    """dynamo unrolls a bidirectional nn.RNN: spa prunes each direction on its own, which a
    torch RNN layer can't hold."""
    torch.manual_seed(0)
    m = RecurrentNet("RNN", 1, True).eval()
    x = torch.randn(1, 7, 6)
    exported = export(m, x, True)
    plan = spa.plan(exported, ratio=0.5, allocation="global")
    with pytest.raises(UnsupportedError, match="two directions of the RNN were pruned to different hidden sizes") as e:
        st.apply_plan(m, plan)
    assert "\n" not in str(e.value)


def _assert_same_state(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]), k


def _without_fingerprints(plan: Plan) -> dict:
    """The plan as a plan made before fingerprints existed."""
    d = json.loads(plan.dumps())
    d.pop("inputs")
    for t in d["tensors"]:
        t.pop("fingerprint")
    return d


def test_plan_as_path_dict_and_names_only(tmp_path) -> None:
    m, x = build("mlp")
    exported = export(m, x, False)
    plan = spa.plan(exported, ratio=0.5)
    path = tmp_path / "plan.json"
    path.write_text(plan.dumps())
    # an old plan without fingerprints: TorchScript kept the MLP's names, and names are enough
    for form, by in ((path, "fingerprints"), (json.loads(plan.dumps()), "fingerprints"), (_without_fingerprints(plan), "names")):
        fresh, _ = build("mlp")
        mapping = st.apply_plan(fresh, form)  # no model needed
        assert fresh.l2.out_features == fresh.l3.in_features == 8
        assert mapping.matched_by == by


def test_unmappable_tensors_are_named() -> None:
    m, x = build("cnn")
    exported = export(m, x, False)
    plan = spa.plan(exported, ratio=0.5)
    old = _without_fingerprints(plan)
    with pytest.raises(UnsupportedError, match=r"onnx::Conv_\d+.*no fingerprints.*model="):
        st.apply_plan(build("cnn")[0], old)  # folded names, neither fingerprints nor a model to match values against
    other = MLP()
    with pytest.raises(UnsupportedError, match="cannot map 7 planned tensors") as e:
        st.apply_plan(other, plan, model=exported)
    with pytest.raises(UnsupportedError, match="cannot map 7 planned tensors") as f:
        st.apply_plan(MLP(), plan)  # the same refusal from the fingerprints
    for err in (e, f):
        text = str(err.value)
        assert "\n" not in text and all(t.name in text for t in plan.tensors)  # one line, every tensor named


class Twins(nn.Module):
    """Two weights that agree on a fingerprint's sample and norm but differ elsewhere."""

    def __init__(self, w: np.ndarray, v: np.ndarray):
        super().__init__()
        self.a, self.b = nn.Linear(w.shape[1], w.shape[0], bias=False), nn.Linear(v.shape[1], v.shape[0], bias=False)
        with torch.no_grad():
            self.a.weight.copy_(torch.from_numpy(w))
            self.b.weight.copy_(torch.from_numpy(v))


def test_a_fingerprint_that_cannot_decide_is_refused_and_model_decides() -> None:
    from spa.torch.fingerprint import make_fingerprint

    w = np.random.default_rng(0).standard_normal((16, 12)).astype(np.float32)
    fp = make_fingerprint(w)
    i, j = [(r, c) for r in range(16) for c in range(12) if r not in fp["rows"] or c not in fp["cols"]][:2]
    v = w.copy()
    v[i], v[j] = w[j], w[i]  # two elements outside the sample swapped: same sample, same norm
    f = st.Fingerprint.from_json(fp, w.shape)
    assert f.matches(w) and f.matches(v)  # what a fingerprint can't tell apart …
    v2 = w.copy()
    v2[i] += 0.5
    assert not f.matches(v2)  # … while a changed element outside the sample changes the norm
    match = st.map_initializers(Twins(w, v), ["val_0"], fingerprints={"val_0": f})
    assert list(match.failed) == ["val_0"] and "a.weight, b.weight" in match.failed["val_0"]
    same = st.map_initializers(Twins(w, w.copy()), ["val_0"], fingerprints={"val_0": f})  # an exporter's deduplication
    assert [t.key for t in same.mapped["val_0"]] == ["a.weight", "b.weight"]


@pytest.mark.parametrize("field, value, says", [
    ("rows", [3, 1], r"fingerprint\.rows\[1\] must be an ascending index"),
    ("rows", [99], r"fingerprint\.rows\[0\] must be an ascending index in \[0, 32\)"),
    ("sample", "not base64!", r"fingerprint\.sample must be base64 of"),
    ("norm", -1, r"fingerprint\.norm must be a finite number"),
    ("constant", "no", r"fingerprint\.constant must be true or false"),
    ("conv", {"bias": 3}, r"fingerprint\.conv must be"),
    ("colour", 1, r"fingerprint\.colour is not a fingerprint field"),
])
def test_a_malformed_fingerprint_is_a_one_line_error(field: str, value, says: str) -> None:
    m, x = build("mlp")
    d = json.loads(spa.plan(export(m, x, False), ratio=0.5).dumps())
    assert all("fingerprint" in t for t in d["tensors"]) and d["inputs"][0]["shape"] == [2, 10]
    d["tensors"][0]["fingerprint"][field] = value
    with pytest.raises(PlanError, match=r"^tensors\[0\]\." + says) as e:
        Plan.from_json(d)
    assert "\n" not in str(e.value)
    d = json.loads(spa.plan(export(m, x, False), ratio=0.5).dumps())
    d["inputs"][0]["dtype"] = "text"
    with pytest.raises(PlanError, match=r"^inputs\[0\]\.dtype must be a numeric numpy dtype"):
        Plan.from_json(d)


def _zoo_cases():
    import zoo  # models/ is put on sys.path by conftest.py

    return [n for n in zoo.NAMES]


@pytest.mark.slow
@pytest.mark.parametrize("name", _zoo_cases())
def test_zoo_models_map_back(name: str, tmp_path) -> None:
    """Every zoo model: spa's plan, mapped to the torch module and exported again, computes
    spa's pruned ONNX (ShuffleNet's forward splits into equal halves itself: refused), and
    the plan alone slices a fresh copy as ``model=`` does."""
    import onnx_ir as ir
    import zoo

    m, shape = zoo.build(name)
    m.eval()
    x = zoo.sample_input(name, shape, seed=0)
    path = zoo.export(name, tmp_path / "m.onnx")
    proto = onnx.load(path)
    result = spa.prune(proto, ratio=0.5, verify="check", benchmark=False)
    text = result.plan.dumps()
    if name == "resnet50":
        assert len(text.encode()) < 1_000_000  # fingerprints included
    alone = zoo.build(name)[0].eval()
    if name == "shufflenet":
        with pytest.raises(UnsupportedError, match="does not run"):
            st.apply_plan(m, result.plan, model=proto)
        with pytest.raises(UnsupportedError, match="does not run"):
            st.apply_plan(alone, Plan.loads(text))  # the plan's input shapes find it too
        return
    mapping = st.apply_plan(m, result.plan, model=proto)
    assert mapping.max_abs_diff is not None
    from_plan = st.apply_plan(alone, Plan.loads(text))
    assert from_plan.matched_by == "fingerprints" and from_plan.mapped == mapping.mapped
    _assert_same_state(alone, m)
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
    torch.manual_seed(0)
    with pytest.raises(UnsupportedError, match="sliced module does not run"):
        st.apply_plan(HardCoded().eval(), plan)  # without the ONNX file: it runs the plan's input shapes
