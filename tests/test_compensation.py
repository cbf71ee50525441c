"""Compensation (spa.compensation, spa.passes.compensate) and the statistics criteria.

Numbers are checked against numpy least squares on samples and against ONNX Runtime runs of
the models, never against hand-copied figures.
"""

from __future__ import annotations

import dataclasses
import pathlib
import tempfile

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import spa
from spa import verify
from spa.analysis.moments import Moments, bn_proxy
from spa.compensation import PairMoments, refit
from spa.criteria import CRITERIA, CriterionInputs
from spa.criteria.fpgm import distance_sums
from spa.errors import UsageError
from tests.rules._graphs import model

# X → Conv(W1, no bias) → Relu → Conv(W2, no bias, 3×3) → Relu → Conv(W3) → Y
_CHAIN = """
agraph (float[N, 4, 8, 8] X) => (float[N, 5, 8, 8] Y) {
    a = Conv <kernel_shape = [1, 1]> (X, W1)
    b = Relu (a)
    c = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (b, W2)
    d = Relu (c)
    Y = Conv <kernel_shape = [1, 1]> (d, W3, B3)
}
"""


_SHORT = """
agraph (float[N, 4, 8, 8] X) => (float[N, 8, 8, 8] Y) {
    a = Conv <kernel_shape = [1, 1]> (X, W1)
    b = Relu (a)
    Y = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (b, W2)
}
"""


def _chain(duplicate: bool = True, dead: int | None = None, short: bool = False) -> onnx.ModelProto:
    """Channels 4–7 of W1 are twice channels 0–3: after Relu the small ones are *exactly*
    half the large ones, so l1 removes 0–3 and calibration can rebuild them. ``short``: only
    W1's channels are prunable (W2's are the graph output)."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((8, 4, 1, 1)).astype(np.float32)
    if duplicate:
        w1[4:] = 2.0 * w1[:4]
    if dead is not None:
        w1[dead] = -np.abs(w1[dead]) - 0.1  # negative weights on positive inputs: always 0 after Relu
    if short:
        w2 = rng.standard_normal((8, 8, 3, 3)).astype(np.float32)
        w2[:, :4] *= 0.3  # so that l1 certainly removes the small copies 0–3
        return model(_SHORT, W1=w1, W2=w2)
    return model(_CHAIN, W1=w1, W2=(8, 8, 3, 3), W3=(5, 8, 1, 1), B3=(5,))


def _feeds(n: int, seed: int = 1, positive: bool = False) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
        out.append({"X": np.abs(x) if positive else x})
    return out


def _error(original: onnx.ModelProto, pruned: ir.Model, feeds) -> float:
    with tempfile.TemporaryDirectory() as d:
        a, b = pathlib.Path(d) / "a.onnx", pathlib.Path(d) / "b.onnx"
        onnx.save(original, a)
        onnx.save(ir.to_proto(pruned), b)
        sa, sb = verify.session(a), verify.session(b)
        num = den = 0.0
        for f in feeds:
            y0, y1 = verify.run(sa, f)[0], verify.run(sb, f)[0]
            num += float(((y0 - y1) ** 2).sum())
            den += float((y0**2).sum())
    return (num / den) ** 0.5


# -- the least-squares core ------------------------------------------------------------------


def _pair(X: np.ndarray, Xh: np.ndarray) -> PairMoments:
    n = X.shape[1]
    return PairMoments(Xh @ Xh.T / n, Xh.mean(1), X @ Xh.T / n, X @ X.T / n, X.mean(1), "calibration")


def test_refit_is_least_squares_on_samples() -> None:
    """Against numpy lstsq on the samples, for x̂ = x and for a perturbed upstream x̂."""
    rng = np.random.default_rng(3)
    A = rng.standard_normal((6, 6))
    X = A @ rng.standard_normal((6, 5000)) + rng.standard_normal((6, 1))  # correlated, non-zero mean
    W = rng.standard_normal((3, 6))
    keep = np.array([0, 2, 3, 5])
    for Xh in (X, X + 0.3 * rng.standard_normal(X.shape)):
        WK, beta, before, after, energy = refit(W, keep, _pair(X, Xh), damp=0.0)
        design = np.vstack([Xh[keep], np.ones((1, X.shape[1]))]).T
        sol = np.linalg.lstsq(design, (W @ X).T, rcond=None)[0]
        np.testing.assert_allclose(WK, sol[:-1].T, rtol=1e-4, atol=1e-6)  # float32 products
        np.testing.assert_allclose(beta, sol[-1], rtol=1e-4, atol=1e-6)
        n = X.shape[1]
        np.testing.assert_allclose(after, (((W @ X).T - design @ sol) ** 2).sum() / n, rtol=1e-4)
        np.testing.assert_allclose(before, ((W @ X - W[:, keep] @ Xh[keep]) ** 2).sum() / n, rtol=1e-4)
        np.testing.assert_allclose(energy, ((W @ X) ** 2).sum() / n, rtol=1e-5)


def test_independent_channels_reduce_to_mean_shift() -> None:
    mean = np.array([0.5, 1.0, 2.0])
    var = np.array([1.0, 0.25, 4.0])
    second = np.outer(mean, mean) + np.diag(var)
    W = np.array([[1.0, 2.0, 3.0]])
    WK, beta, *_ = refit(W, np.array([0, 2]), PairMoments.same(Moments(mean, second, mean, 0, "bn-proxy")), damp=0.0)
    np.testing.assert_allclose(WK, W[:, [0, 2]], atol=1e-12)
    np.testing.assert_allclose(beta, [2.0 * 1.0], atol=1e-12)


def test_independent_refit_equals_the_dense_solve() -> None:
    """The BN proxy's closed form (diag + rank one) against the dense ridge solve, dead channel
    included, with and without a bias column."""
    rng = np.random.default_rng(4)
    C = 12
    mean, var = rng.standard_normal(C), rng.uniform(0.1, 2.0, C)
    mean[3] = var[3] = 0.0  # a dead kept channel: the unit diagonal path
    second = np.outer(mean, mean) + np.diag(var)
    W = rng.standard_normal((7, C))
    keep = np.array([0, 1, 3, 5, 6, 8, 11])
    for with_bias in (True, False):
        fast = refit(W, keep, PairMoments.same(Moments(mean, second, mean, 0, "bn-proxy", independent=True)), with_bias=with_bias)
        dense = refit(W, keep, PairMoments.same(Moments(mean, second, mean, 0, "bn-proxy")), with_bias=with_bias)
        for a, b in zip(fast, dense):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        assert fast[3] < fast[2]  # the mean shift helps


def test_independent_update_in_the_weights_layout_equals_the_stacked_refit() -> None:
    """compensate_model's closed form applied in place on [rows, C, taps] (no stacking of the
    taps into rows) against _refit_independent on the stacked rows: the same weights (to float64
    rounding: W μ is summed in another order), removed columns zeroed, the same bias shift and errors."""
    from spa.compensation import _refit_independent, _update_independent

    rng = np.random.default_rng(7)
    rows, C, r = 6, 10, 9
    mean, var = rng.standard_normal(C), rng.uniform(0.1, 2.0, C)
    mean[4] = var[4] = 0.0  # a dead kept channel
    p = PairMoments.same(Moments(mean, np.outer(mean, mean) + np.diag(var), mean, 0, "bn-proxy", independent=True))
    keep = np.array([0, 2, 3, 4, 7, 9])
    drop = np.setdiff1d(np.arange(C), keep)
    M3 = rng.standard_normal((rows, C, r))
    for with_bias in (True, False):
        stacked = M3.transpose(2, 0, 1).reshape(r * rows, C)
        WK, beta, *errors = _refit_independent(stacked, keep, p, damp=0.01, with_bias=with_bias)
        got = M3.copy()
        beta2, *errors2 = _update_independent(got, keep, p, damp=0.01, with_bias=with_bias)
        np.testing.assert_allclose(got[:, keep, :], WK.reshape(r, rows, len(keep)).transpose(1, 2, 0), rtol=1e-12, atol=1e-15)
        assert not got[:, drop, :].any()
        np.testing.assert_allclose(beta2, beta.reshape(r, rows).T, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(errors2, errors, rtol=1e-12)
        assert with_bias == bool(beta2.any())


def test_bn_proxy_moments_match_monte_carlo() -> None:
    proto = model(
        """
agraph (float[1, 3, 4, 4] X) => (float[1, 3, 4, 4] Y) {
    a = BatchNormalization (X, S, B, M, V)
    Y = Relu (a)
}
""",
        S=np.array([1.0, -0.5, 2.0], np.float32),
        B=np.array([0.3, -1.0, 0.0], np.float32),
        M=np.zeros(3, np.float32),
        V=np.ones(3, np.float32),
    )
    m_ir = ir.from_proto(proto)
    y = m_ir.graph.outputs[0]
    m = bn_proxy(y, 1)
    assert m is not None and m.source == "bn-proxy"
    rng = np.random.default_rng(0)
    u = np.array([0.3, -1.0, 0.0])[:, None] + np.array([1.0, 0.5, 2.0])[:, None] * rng.standard_normal((3, 400_000))
    x = np.maximum(u, 0)
    np.testing.assert_allclose(m.mean, x.mean(1), rtol=0.02, atol=2e-3)
    np.testing.assert_allclose(np.diag(m.second), (x**2).mean(1), rtol=0.02, atol=2e-3)
    assert bn_proxy(m_ir.graph.node(0).inputs[0], 1) is None  # a graph input has no BN behind it


# -- end to end ------------------------------------------------------------------------------


def test_calibration_rebuilds_exactly_redundant_channels() -> None:
    proto = _chain(short=True)
    calib = _feeds(8)
    plain = spa.prune(proto, ratio=0.5, benchmark=False)
    comp = spa.prune(proto, ratio=0.5, benchmark=False, compensate="calibration", calibration=calib)
    assert comp.report.oracle["passed"] and comp.report.oracle["asserted"]
    test = _feeds(4, seed=9)
    before, after = _error(proto, plain.model, test), _error(proto, comp.model, test)
    assert before > 0.05
    assert sorted(next(g for g in comp.plan.groups if g.removed).removed) == [0, 1, 2, 3]
    assert after < 0.05 * before, (before, after)  # exact up to the 1 % ridge damping
    tight = spa.prune(proto, ratio=0.5, benchmark=False, compensate="calibration", calibration=calib, damp=1e-7)
    assert _error(proto, tight.model, test) < 1e-3 * before
    c = comp.report.compensation
    assert c["method"] == "calibration" and c["statistics"] == {"calibration": c["consumers_compensated"]}
    measured = c["measured"]["calibration"]
    assert measured["error_after"] < measured["error_before"]


def test_created_bias_is_sliced_with_its_rows() -> None:
    """W2 has no bias and its own rows are pruned too: the bias compensation creates must be
    cut with them (else the model would not load) — the oracle proves it."""
    proto = _chain(duplicate=False)
    res = spa.prune(proto, ratio=0.5, benchmark=False, compensate="calibration", calibration=_feeds(8))
    fixes = {f["node"]: f for f in res.report.compensation["consumers"]}
    created = [f for f in fixes.values() if f["bias_created"]]
    assert created, fixes
    assert res.report.oracle["passed"]
    inits = {v.name: v for v in res.model.graph.initializers.values()}
    for f in created:
        w2 = next(n for n in res.model.graph if n.name == f["node"]).inputs[1]
        assert inits[f["bias"]].const_value.shape[0] == w2.shape[0] < 8


def test_data_free_without_batchnorm_uses_synthetic_inputs_and_helps() -> None:
    from spa.calibration import synthetic_feeds
    from spa.passes.compensate import SYNTHETIC

    proto = _chain(short=True)
    plain = spa.prune(proto, ratio=0.5, benchmark=False)
    res = spa.prune(proto, ratio=0.5, benchmark=False, compensate="data-free")
    assert res.report.oracle["passed"]
    assert set(res.report.options["statistics"]["by_source"]) == {f"synthetic-{SYNTHETIC}"}  # X is a [N, 4, 8, 8] image
    # the synthetic inputs' distribution (other seeds): the fallback's best case
    test = list(synthetic_feeds(ir.from_proto(proto), {"X": [1, 4, 8, 8]}, kind=SYNTHETIC, samples=4, seed=50))
    assert _error(proto, res.model, test) < 0.5 * _error(proto, plain.model, test)


# -- the synthetic fallback's inputs -----------------------------------------------------------


def test_image_layout() -> None:
    from spa.calibration import image_layout

    assert image_layout([1, 3, 48, 320]) == "NCHW"
    assert image_layout([2, 64, 16, 16]) == "NCHW"  # a feature-map input: channels first
    assert image_layout([1, 224, 224, 3]) == "NHWC"
    assert image_layout([1, 3, 4, 320]) is None  # too short to be an image
    assert image_layout([1, 16]) is None and image_layout([1, 3, 8, 8, 8]) is None


def test_synthetic_feeds_are_deterministic_and_normal_is_the_white_noise_fallback() -> None:
    from spa.calibration import SYNTHETIC_KINDS, synthetic_feeds
    from spa.inputs import make_feeds

    m = ir.from_proto(_chain())
    shapes = {"X": [1, 4, 8, 8]}
    for kind in SYNTHETIC_KINDS:
        a = list(synthetic_feeds(m, shapes, kind=kind, samples=3, seed=7))
        b = list(synthetic_feeds(m, shapes, kind=kind, samples=3, seed=7))
        c = list(synthetic_feeds(m, shapes, kind=kind, samples=3, seed=8))
        assert len(a) == 3 and all(f["X"].shape == (1, 4, 8, 8) and f["X"].dtype == np.float32 for f in a)
        for fa, fb, fc in zip(a, b, c):
            np.testing.assert_array_equal(fa["X"], fb["X"])
            assert not np.array_equal(fa["X"], fc["X"])
        assert not np.array_equal(a[0]["X"], a[1]["X"])  # each feed its own draw
    normal = list(synthetic_feeds(m, shapes, kind="normal", samples=3, seed=7))
    for k, f in enumerate(normal):
        np.testing.assert_array_equal(f["X"], make_feeds(m, shapes, seed=7 + 1 + k)["X"])
    with pytest.raises(UsageError, match="unknown kind"):
        next(synthetic_feeds(m, shapes, kind="plaid", samples=1, seed=0))


def _lag1(x: np.ndarray) -> float:
    """Correlation of horizontally adjacent pixels of a [H, W] image."""
    return float(np.corrcoef(x[:, :-1].ravel(), x[:, 1:].ravel())[0, 1])


def test_pink_noise_has_a_one_over_f_squared_spectrum() -> None:
    from spa.calibration import synthetic_image

    x = synthetic_image("pink", [4, 3, 64, 64], "NCHW", np.random.default_rng(0))
    np.testing.assert_allclose(x.mean(), 0.0, atol=1e-9)
    np.testing.assert_allclose(x.std(axis=(1, 2, 3)), 1.0, rtol=1e-9)  # per image
    # radially averaged power against frequency, fitted on a log-log scale: slope ≈ -2
    power = np.abs(np.fft.fft2(x)) ** 2
    f = np.hypot(*np.meshgrid(np.fft.fftfreq(64), np.fft.fftfreq(64), indexing="ij"))
    bins = np.linspace(0.03, 0.45, 12)
    idx = np.digitize(f, bins)
    fm = [f[idx == i].mean() for i in range(1, len(bins))]
    pm = [power[..., idx == i].mean() for i in range(1, len(bins))]
    slope = np.polyfit(np.log(fm), np.log(pm), 1)[0]
    assert -2.3 < slope < -1.7, slope
    white = synthetic_image("normal", [1, 3, 64, 64], "NCHW", np.random.default_rng(0))
    assert _lag1(x[0, 0]) > 0.5 > 0.1 > abs(_lag1(white[0, 0]))
    assert np.corrcoef(x[:, 0].ravel(), x[:, 1].ravel())[0, 1] > 0.9  # channels nearly agree, as RGB does


def test_dead_leaves_are_constant_patches_on_minus_one_one() -> None:
    from spa.calibration import synthetic_image

    x = synthetic_image("leaves", [2, 3, 32, 48], "NCHW", np.random.default_rng(1))
    assert x.min() >= -1.0 and x.max() <= 1.0
    same = np.mean(x[:, :, :, 1:] == x[:, :, :, :-1])  # neighbours inside one leaf are equal
    assert same > 0.5, same
    assert len(np.unique(x[0, 0])) > 10  # many leaves, not one colour
    nhwc = synthetic_image("leaves", [2, 32, 48, 3], "NHWC", np.random.default_rng(1))
    np.testing.assert_array_equal(nhwc, x.transpose(0, 2, 3, 1))


_MLP = """
agraph (float[N, 16] X) => (float[N, 4] Y) {
    a = Gemm <transB = 1> (X, W1, B1)
    b = Relu (a)
    Y = Gemm <transB = 1> (b, W2, B2)
}
"""


@pytest.mark.parametrize("kind", ["normal", "uniform", "pink", "leaves"])
def test_every_synthetic_kind_is_named_and_passes_the_oracle(kind, monkeypatch) -> None:
    from spa.passes import compensate as comp_mod

    monkeypatch.setattr(comp_mod, "SYNTHETIC", kind)
    res = spa.prune(_chain(short=True), ratio=0.5, benchmark=False, compensate="data-free")
    assert res.report.oracle["passed"]
    assert res.report.options["statistics"]["by_source"] == {"synthetic" if kind == "normal" else f"synthetic-{kind}": 1}
    assert res.report.compensation["consumers_compensated"] == 1
    for v in res.model.graph.initializers.values():
        assert np.isfinite(v.const_value.numpy()).all(), v.name


def test_a_non_image_input_keeps_the_white_noise_fallback() -> None:
    res = spa.prune(model(_MLP, W1=(32, 16), B1=(32,), W2=(4, 32), B2=(4,)), ratio=0.5, benchmark=False, compensate="data-free")
    assert res.report.oracle["passed"]
    assert res.report.options["statistics"]["by_source"] == {"synthetic": 1}


def test_dead_channels_give_finite_weights() -> None:
    """A channel that is always 0 makes X·Xᵀ singular: damping keeps the solve regular."""
    proto = _chain(duplicate=False, dead=6)
    res = spa.prune(proto, ratio=0.5, benchmark=False, compensate="calibration", calibration=_feeds(8, positive=True))
    for v in res.model.graph.initializers.values():
        assert np.isfinite(v.const_value.numpy()).all(), v.name
    assert res.report.oracle["passed"]


@pytest.mark.parametrize(
    "feeds, words",
    [
        ([{"Z": np.zeros((1, 4, 8, 8), np.float32)}], "not inputs of the model"),
        ([{"X": np.zeros((1, 4, 8, 8), np.int64)}], "int64"),
        ([{"X": np.zeros((1, 3, 8, 8), np.float32)}], "axis 1"),
        ([{"X": np.full((1, 4, 8, 8), np.nan, np.float32)}], "NaN"),
        ([], "no samples"),
    ],
)
def test_bad_calibration_is_one_usage_error(feeds, words) -> None:
    with pytest.raises(UsageError, match=words):
        spa.prune(_chain(), ratio=0.5, benchmark=False, compensate="calibration", calibration=feeds)


def test_calibration_files_and_cli(tmp_path) -> None:
    from click.testing import CliRunner

    from spa.cli import cli

    path = tmp_path / "m.onnx"
    onnx.save(_chain(), path)
    x = np.concatenate([f["X"] for f in _feeds(8)])
    np.savez(tmp_path / "calib.npz", X=x)
    folder = tmp_path / "npy"
    folder.mkdir()
    np.save(folder / "X.npy", x)
    (tmp_path / "empty").mkdir()
    runner = CliRunner()
    for data in (tmp_path / "calib.npz", folder):
        out = tmp_path / f"out-{data.name}.onnx"
        r = runner.invoke(cli, ["prune", str(path), "--compensate", "calibration", "--calibration", str(data), "--no-bench", "-o", str(out), "--report", str(out) + ".json"])
        assert r.exit_code == 0, r.output
        assert out.exists()
    r = runner.invoke(cli, ["prune", str(path), "--compensate", "calibration", "--calibration", str(tmp_path / "empty"), "-o", str(tmp_path / "x.onnx")])
    assert r.exit_code == 2 and "no .npy files" in r.output and not (tmp_path / "x.onnx").exists()
    r = runner.invoke(cli, ["prune", str(path), "--compensate", "calibration", "-o", str(tmp_path / "y.onnx")])
    assert r.exit_code == 2 and "needs --calibration" in r.output


# -- criteria --------------------------------------------------------------------------------


def test_fpgm_distance_sums_by_hand() -> None:
    w = np.array([[0.0, 0.0], [3.0, 4.0], [0.0, 1.0]])
    np.testing.assert_allclose(distance_sums(w, 0), [5 + 1, 5 + np.sqrt(18), 1 + np.sqrt(18)])


def test_bn_criterion_ranks_by_scale() -> None:
    proto = model(
        """
agraph (float[1, 2, 4, 4] X) => (float[1, 3, 4, 4] Y) {
    a = Conv <kernel_shape = [1, 1]> (X, W)
    b = BatchNormalization (a, S, B, M, V)
    c = Relu (b)
    Y = Conv <kernel_shape = [1, 1]> (c, W2)
}
""",
        W=(4, 2, 1, 1),
        S=np.array([0.1, -3.0, 1.0, 0.5], np.float32),
        B=np.zeros(4, np.float32),
        M=np.zeros(4, np.float32),
        V=np.ones(4, np.float32),
        W2=(3, 4, 1, 1),
    )
    plan = spa.plan(proto, ratio=0.5, criterion="bn")
    (g,) = [g for g in plan.groups if g.removed]
    assert sorted(g.removed) == [0, 3]
    np.testing.assert_allclose(np.array(g.scores) / np.mean(g.scores), np.array([0.1, 3.0, 1.0, 0.5]) / 1.15, rtol=1e-5)


def test_obs_criterion_is_the_refit_error() -> None:
    """obs of one channel = output error of the best refit without it (LS on the samples),
    relative to the output energy."""
    from spa.analysis.consumers import consumer_view
    from spa.analysis.moments import collect
    from spa.criteria.statistics import obs_unit_errors

    proto = _chain(duplicate=False)
    analysis = spa.analyze(proto)
    view = consumer_view(analysis)
    c = next(c for c in view if c.op_type == "Conv" and c.receptive == 1 and c.weight == "W3")
    feeds = _feeds(4)

    with tempfile.TemporaryDirectory() as d:
        moments, _ = collect(analysis.model, {c.activation: 1}, feeds, path=pathlib.Path(d) / "s.onnx")
        sess = verify.session(_save(analysis.model, pathlib.Path(d) / "m.onnx", c.activation))
        X = np.concatenate([np.moveaxis(sess.run([c.activation], f)[0], 1, 0).reshape(8, -1) for f in feeds], axis=1)
    m = moments[c.activation]
    W = analysis.model.graph.initializers["W3"].const_value.numpy().reshape(5, 8).astype(np.float64)
    errors = obs_unit_errors(c, m, analysis.model.graph.initializers["W3"].const_value.numpy(), 8, damp=1e-9)
    total = float(((W @ X) ** 2).sum())
    for ch in range(8):
        keep = [k for k in range(8) if k != ch]
        design = np.vstack([X[keep], np.ones((1, X.shape[1]))])
        Y = W @ X
        sol = np.linalg.lstsq(design.T, Y.T, rcond=None)[0]
        refit = float(((Y - sol.T @ design) ** 2).sum())
        assert errors[ch] == pytest.approx(refit / total, rel=1e-3, abs=1e-9)


def test_obs_on_synthetic_statistics_takes_channels_as_independent() -> None:
    """On synthetic statistics ``obs`` scores from ``diag(Var) + μμᵀ``: a channel that is an exact
    copy of another costs (nearly) nothing on calibration statistics, and on synthetic ones
    what the mean shift leaves, ``Σ_rows w² · Var`` over the energy with independent channels
    (numpy on the samples)."""
    from spa.analysis.consumers import consumer_view
    from spa.criteria.statistics import criterion_moments

    proto = _chain(duplicate=False)
    analysis = spa.analyze(proto)
    view = consumer_view(analysis)
    c = next(c for c in view if c.weight == "W3")
    group = next(g for g in analysis.channels.groups if g.id == c.group)
    rng = np.random.default_rng(5)
    X = rng.standard_normal((8, 4000)) + rng.uniform(0.5, 1.5, (8, 1))
    X[1] = 2.0 * X[0]  # channel 1 is channel 0, scaled
    n = X.shape[1]
    W3 = analysis.model.graph.initializers["W3"].const_value.numpy()
    W = W3.reshape(5, 8).astype(np.float64)
    inputs = lambda source: CriterionInputs(weight=lambda name: analysis.model.graph.initializers[name].const_value.numpy(), consumers=view,  # noqa: E731
                                            moments={c.activation: Moments(X.mean(1), X @ X.T / n, np.abs(X).mean(1), n, source)})
    cal = CRITERIA["obs"].group_scores(group, inputs("calibration"), 0)[c.unit_of_column]
    syn = CRITERIA["obs"].group_scores(group, inputs("synthetic-pink"), 0)[c.unit_of_column]
    var = X.var(axis=1)
    energy = float(((W @ X.mean(1)) ** 2).sum() + ((W**2) @ var).sum())  # E‖W x‖² with independent channels
    assert cal[1] < 0.05 * syn[1]  # the copy is rebuilt from channel 0 only when correlations are trusted
    np.testing.assert_allclose(syn, (W**2).sum(0) * var / energy, rtol=0.05)  # the mean shift's error (damped)
    m = Moments(X.mean(1), X @ X.T / n, np.abs(X).mean(1), n, "synthetic-pink")
    ind = criterion_moments(m)
    assert ind.independent
    real = dataclasses.replace(m, source="calibration")
    assert criterion_moments(real) is real  # calibration statistics keep their correlations
    np.testing.assert_allclose(ind.second, np.diag(var) + np.outer(X.mean(1), X.mean(1)), rtol=1e-10, atol=1e-12)


def test_synthetic_feed_count_follows_the_compute_budget(monkeypatch) -> None:
    """``SYNTHETIC_MACS`` / the model's MACs (spa's cost model), clamped to ``SYNTHETIC_RANGE``;
    ``SYNTHETIC_SAMPLES`` overrides; the report's ``statistics.samples`` is what ran."""
    import spa.passes.compensate as comp

    proto = _chain(short=True)
    macs = spa.analyze(proto).cost.count().macs
    for budget, want in ((macs * 10, 10), (macs * 1000, comp.SYNTHETIC_RANGE[1]), (macs, comp.SYNTHETIC_RANGE[0])):
        monkeypatch.setattr(comp, "SYNTHETIC_MACS", budget)
        monkeypatch.setattr(comp, "SYNTHETIC_RANGE", (8, 32))
        res = spa.prune(proto, ratio=0.5, benchmark=False, compensate="data-free", verify="none")
        assert res.report.options["statistics"]["samples"] == want
    monkeypatch.setattr(comp, "SYNTHETIC_SAMPLES", 3)
    assert spa.prune(proto, ratio=0.5, benchmark=False, compensate="data-free", verify="none").report.options["statistics"]["samples"] == 3


def _save(m: ir.Model, path, extra: str):
    proto = ir.to_proto(m)
    proto.graph.output.append(onnx.ValueInfoProto(name=extra))
    onnx.save(proto, path)
    return path


def test_activation_criterion_reads_abs_means() -> None:
    proto = _chain(duplicate=False)
    analysis = spa.analyze(proto)
    from spa.analysis.consumers import consumer_view

    view = consumer_view(analysis)
    c = next(c for c in view if c.weight == "W3")
    abs_mean = np.arange(1.0, 9.0)
    moments = {c.activation: Moments(abs_mean, np.eye(8), abs_mean, 1, "calibration")}
    group = next(g for g in analysis.channels.groups if g.id == c.group)
    inputs = CriterionInputs(weight=lambda n: analysis.model.graph.initializers[n].const_value.numpy(), consumers=view, moments=moments)
    scores = CRITERIA["activation"].group_scores(group, inputs, 0)
    np.testing.assert_allclose(scores[c.unit_of_column], abs_mean / abs_mean.mean())


def test_data_free_with_token_ids_refuses_the_synthetic_fallback() -> None:
    """Random ids say nothing about real activations: no compensation, and a warning saying so."""
    proto = model(
        """
agraph (int64[1, 6] ids) => (float[1, 6, 4] Y) {
    e = Gather (E, ids)
    a = MatMul (e, W1)
    b = Relu (a)
    Y = MatMul (b, W2)
}
""",
        E=(10, 4),
        W1=(4, 8),
        W2=(8, 4),
    )
    res = spa.prune(proto, ratio=0.5, benchmark=False, compensate="data-free")
    assert res.report.oracle["passed"]
    assert any("integer inputs (ids)" in w and "--calibration" in w for w in res.report.warnings), res.report.warnings
    c = res.report.compensation
    assert c["consumers_compensated"] == 0 and c["skipped"] == {"no statistics for its input": len(c["consumers"])}


_BN_CHAIN = """
agraph (float[1, 4, 6, 6] X) => (float[1, 5, 6, 6] Y) {
    a = Conv <kernel_shape = [1, 1]> (X, W1)
    b = BatchNormalization (a, S, B, M, V)
    c = Relu (b)
    Y = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (c, W2, B2)
}
"""


def _bn_chain() -> onnx.ModelProto:
    rng = np.random.default_rng(2)
    return model(_BN_CHAIN, W1=(8, 4, 1, 1), S=rng.uniform(0.5, 2.0, 8).astype(np.float32), B=rng.standard_normal(8).astype(np.float32),
                 M=np.zeros(8, np.float32), V=np.ones(8, np.float32), W2=(5, 8, 3, 3), B2=(5,))


def test_data_free_bn_model_uses_the_closed_form_and_its_errors_match_ort(monkeypatch) -> None:
    """On a BN model data-free takes the independent-channel path; the report's measured error
    of plain pruning (the masked copy handed to ORT as bytes) equals the one from a masked copy
    written to disk."""
    from spa.passes import compensate as comp_mod

    proto = _bn_chain()
    res = spa.prune(proto, ratio=0.5, benchmark=False, compensate="data-free")
    assert res.report.oracle["passed"]
    assert res.report.options["statistics"]["by_source"] == {"bn-proxy": 1}
    fast = res.report.compensation["measured"]["verification"]
    monkeypatch.setattr(comp_mod, "_in_memory_session", lambda model: None)
    slow = spa.prune(proto, ratio=0.5, benchmark=False, compensate="data-free").report.compensation["measured"]["verification"]
    assert fast["error_before"] > 0
    np.testing.assert_allclose(fast["error_before"], slow["error_before"], rtol=1e-6)
    np.testing.assert_allclose(fast["error_after"], slow["error_after"], rtol=1e-6)
    assert fast["error_after"] < fast["error_before"]


def test_measured_error_reuses_the_runs_already_made_and_matches_ort() -> None:
    """The error step takes the original's and the pruned model's outputs on the verification
    inputs from the snapshot and oracle runs: they must be what ORT gives for the input and for
    the pruned model written out (error_after), and error_before the masked original's."""
    from spa.passes.compensate import _relative_error

    proto = _bn_chain()
    res = spa.prune(proto, ratio=0.5, benchmark=False, compensate="data-free")
    measured = res.report.compensation["measured"]["verification"]
    import onnxruntime as ort

    orig = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = verify.make_inputs(orig)
    y0 = orig.run(None, feeds)
    pruned = ort.InferenceSession(ir.to_proto(res.model).SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(measured["error_after"], _relative_error(y0, pruned.run(None, feeds)), rtol=1e-6)
    plain = ir.from_proto(proto)
    verify.mask_model(plain, res.plan)
    masked = ort.InferenceSession(ir.to_proto(plain).SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(measured["error_before"], _relative_error(y0, masked.run(None, feeds)), rtol=1e-6)
    assert measured["error_after"] < measured["error_before"]


def test_oracle_on_an_in_memory_reference_writes_the_file_when_it_fails(tmp_path) -> None:
    """prove(model=…) masks the reference in memory; when the comparison fails, the reference
    file the blame search cuts groups from is written first (compensation hands the oracle its
    reference that way)."""
    import onnxruntime as ort

    from spa.errors import VerificationError

    proto = _bn_chain()
    res = spa.prune(proto, ratio=0.5, benchmark=False)
    analysis = spa.analyze(proto)
    bad = res.model.clone()
    w = bad.graph.initializers["W2"]
    w.const_value = ir.tensor(w.const_value.numpy() * 1.5, name="W2")
    pruned = tmp_path / "pruned.onnx"
    ir.save(bad, str(pruned))
    feeds = verify.make_inputs(ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]))

    def scratch(name: str) -> pathlib.Path:
        (tmp_path / name).mkdir(exist_ok=True)
        return tmp_path / name / "model.onnx"

    good = tmp_path / "good.onnx"
    ir.save(res.model, str(good))
    outputs: dict = {}
    ok = verify.prove(analysis, res.plan, tmp_path / "unwritten.onnx", good, feeds, scratch, outputs=outputs, model=analysis.model)
    assert ok["passed"] and not (tmp_path / "unwritten.onnx").exists() and len(outputs["pruned"]) == 1
    reference = tmp_path / "reference.onnx"
    with pytest.raises(VerificationError):
        verify.prove(analysis, res.plan, reference, pruned, feeds, scratch, model=analysis.model)
    assert reference.exists()


def test_original_cache_gives_the_same_pairs_as_running_both(tmp_path) -> None:
    """The sequential refit's cache of the original (one run, on disk) against collect_pairs
    running both models per level: the same moments, position sampling included."""
    from spa.analysis.moments import OriginalCache, collect_pairs, exposing_session

    proto = _chain(duplicate=False)
    original = ir.from_proto(proto)
    current = ir.from_proto(proto)
    w2 = current.graph.initializers["W2"]
    w2.const_value = ir.tensor(w2.const_value.numpy() * 0.7, name="W2")  # a "repaired" upstream
    levels = [{"b": 1}, {"d": 1, "c": 1}]
    rng = np.random.default_rng(0)
    feeds = [{"X": rng.standard_normal((8, 4, 8, 8)).astype(np.float32)} for _ in range(3)]  # 512 positions: sampled
    sess = exposing_session(original, ["b", "c", "d"], tmp_path / "orig.onnx")
    cache = OriginalCache(sess, levels, feeds, tmp_path / "cache", seed=5)
    for k, level in enumerate(levels):
        want = collect_pairs(sess, current, level, feeds, path=tmp_path / "a.onnx", seed=5)
        got = cache.pairs(k, current, feeds, path=tmp_path / "b.onnx")
        assert set(got) == set(want) == set(level)
        for name in level:
            for field in ("second", "mean", "cross", "orig_second", "orig_mean"):
                np.testing.assert_array_equal(getattr(got[name], field), getattr(want[name], field))
    assert not np.array_equal(got["d"].cross, got["d"].orig_second)  # the two models differ
    cache.close()
    assert not list((tmp_path / "cache").iterdir())


_BN_DUP = """
agraph (float[N, 4, 8, 8] X) => (float[N, 6, 8, 8] Y) {
    a = Conv <kernel_shape = [1, 1]> (X, W1)
    b = BatchNormalization (a, S, B, M, V)
    c = Relu (b)
    Y = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (c, W2, B2)
}
"""


def _bn_duplicates(flip: bool = False) -> onnx.ModelProto:
    """W1's filters 4–7 are twice 0–3 and their BatchNorm divides by 2: after BN the channels
    are equal, so the kept copies can stand in for the removed ones exactly. ``flip``: channel
    5's γ is negative (its correlations change sign)."""
    rng = np.random.default_rng(7)
    w1 = rng.standard_normal((8, 4, 1, 1)).astype(np.float32)
    w1[4:] = 2.0 * w1[:4]
    w2 = rng.standard_normal((6, 8, 3, 3)).astype(np.float32)
    w2[:, :4] *= 0.3  # so that l1 removes the copies 0–3
    scale = np.ones(8, np.float32)
    if flip:
        scale[5] = -1.0
    var = np.array([1, 1, 1, 1, 4, 4, 4, 4], np.float32)
    return model(_BN_DUP, W1=w1, S=scale, B=np.zeros(8, np.float32), M=np.zeros(8, np.float32), V=var, W2=w2, B2=(6,))


def test_filter_correlation_is_the_normalized_filter_gram() -> None:
    from spa.analysis.moments import filter_correlation

    proto = _bn_duplicates(flip=True)
    m = ir.from_proto(onnx.shape_inference.infer_shapes(proto))
    relu = next(n for n in m.graph if n.op_type == "Relu")
    R = filter_correlation(relu.outputs[0], 1)
    F = onnx.numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == "W1")).reshape(8, -1).astype(np.float64)
    want = (F @ F.T) / np.outer(np.linalg.norm(F, axis=1), np.linalg.norm(F, axis=1))
    sign = np.ones(8)
    sign[5] = -1.0
    want *= np.outer(sign, sign)
    np.testing.assert_allclose(R, want, atol=1e-12)
    np.testing.assert_allclose(R[1, 5], -1.0, atol=1e-6)  # copy of 1, flipped by γ < 0
    assert filter_correlation(relu.outputs[0], 2) is None  # not the conv's channel axis
    assert filter_correlation(m.graph.inputs[0], 1) is None  # no producer


def test_udfc_rebuilds_removed_copies_from_kept_ones() -> None:
    """Data-free on BatchNorm statistics alone can only shift the mean; with the producer's
    filter correlations (udfc) the kept copies replace the removed channels: measured in ORT."""
    proto = _bn_duplicates()
    plain = spa.prune(proto, ratio=0.5, benchmark=False)
    moments = spa.prune(proto, ratio=0.5, benchmark=False, compensate="data-free")
    udfc = spa.prune(proto, ratio=0.5, benchmark=False, compensate="data-free", data_free_method="udfc")
    assert sorted(next(g for g in udfc.plan.groups if g.removed).removed) == [0, 1, 2, 3]
    assert udfc.report.oracle["passed"] and udfc.report.oracle["asserted"]
    assert udfc.report.options["statistics"]["by_source"] == {"bn-proxy+filters": 1}
    test = _feeds(4, seed=3)
    e_plain, e_moments, e_udfc = (_error(proto, r.model, test) for r in (plain, moments, udfc))
    assert e_udfc < 0.1 * e_plain and e_udfc < 0.2 * e_moments, (e_plain, e_moments, e_udfc)  # the 1 % ridge
    tight = spa.prune(proto, ratio=0.5, benchmark=False, compensate="data-free", data_free_method="udfc", damp=1e-7)
    assert _error(proto, tight.model, test) < 1e-3 * e_plain
    with pytest.raises(UsageError, match="data_free_method"):
        spa.prune(proto, ratio=0.5, benchmark=False, compensate="data-free", data_free_method="nope")


def test_data_free_method_from_the_cli(tmp_path) -> None:
    import json

    from click.testing import CliRunner

    from spa.cli import cli

    path = tmp_path / "m.onnx"
    onnx.save(_bn_duplicates(), path)
    out = tmp_path / "out.onnx"
    r = CliRunner().invoke(cli, ["prune", str(path), "--compensate", "data-free", "--data-free-method", "udfc", "--no-bench", "-o", str(out), "--report", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["options"]["statistics"]["by_source"] == {"bn-proxy+filters": 1}
    r = CliRunner().invoke(cli, ["prune", str(path), "--compensate", "data-free", "--data-free-method", "nope", "-o", str(out)])
    assert r.exit_code == 2
