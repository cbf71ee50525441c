"""Low-rank factorization: the pass against ONNX Runtime, the error formula, the pipeline,
the combined allocator, the CLI and bad input."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper

import spa
from spa.cli import cli
from spa.factorize import energy_rank, find_layers, round_rank, spectrum, truncation_error, whitener
from spa.passes.lowrank import LowRankPass

ort = pytest.importorskip("onnxruntime")
REPO = pathlib.Path(__file__).resolve().parent.parent
DEMO = REPO / "models" / "demo.onnx"


def _session(proto: onnx.ModelProto):
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def _model(nodes, inputs, inits, opset: int = 17) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "t", inputs, [helper.make_tensor_value_info("y", 1, None)],
                          [numpy_helper.from_array(a, n) for n, a in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _mixed(rng: np.random.Generator) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """Conv (stride 2, pad 1, bias) → grouped conv → Flatten → Gemm (transB, α, β) → Gemm (no
    transB) → MatMul on a rank-3 input."""
    f = lambda *s: rng.normal(size=s).astype(np.float32)  # noqa: E731
    inits = {"W": f(8, 3, 3, 3), "B": f(8), "Wg": f(8, 4, 3, 3), "G": f(10, 128), "Gb": f(10), "G2": f(10, 12), "M": f(12, 6)}
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2], name="conv"),
        helper.make_node("Conv", ["c1", "Wg"], ["c2"], pads=[1, 1, 1, 1], group=2, name="gconv"),
        helper.make_node("Flatten", ["c2"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "G", "Gb"], ["g"], transB=1, alpha=0.5, beta=2.0, name="gemm"),
        helper.make_node("Gemm", ["g", "G2"], ["g2"], name="gemm2"),
        helper.make_node("Unsqueeze", ["g2", "axes"], ["u"], name="unsq"),
        helper.make_node("MatMul", ["u", "M"], ["y"], name="mm"),
    ]
    proto = _model(nodes, [helper.make_tensor_value_info("x", 1, [2, 3, 8, 8])], {**inits, "axes": np.array([0], np.int64)})
    return proto, {"x": rng.normal(size=(2, 3, 8, 8)).astype(np.float32)}


def test_full_rank_factorization_reproduces_every_layer_kind() -> None:
    rng = np.random.default_rng(0)
    proto, feeds = _mixed(rng)
    model = ir.from_proto(proto)
    layers, refused = find_layers(model)
    assert {l.op_type for l in layers} == {"Conv", "Gemm", "MatMul"} and not refused
    result = LowRankPass({l.weight: l.full_rank for l in layers})(model)
    assert result.modified
    out = ir.to_proto(model)
    onnx.checker.check_model(out, full_check=True)
    ref, got = _session(proto).run(None, feeds)[0], _session(out).run(None, feeds)[0]
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * float(np.abs(ref).max()))
    assert sum(n.op_type == "Conv" for n in out.graph.node) == 4  # every layer became two
    assert "W" not in {t.name for t in out.graph.initializer} and "W.lowrank_in" in {t.name for t in out.graph.initializer}


def test_a_wrong_factor_fails_the_full_rank_check() -> None:
    """The comparison above can fail: one rank short is not exact."""
    rng = np.random.default_rng(0)
    proto, feeds = _mixed(rng)
    model = ir.from_proto(proto)
    LowRankPass({"G2": 9})(model)
    ref, got = _session(proto).run(None, feeds)[0], _session(ir.to_proto(model)).run(None, feeds)[0]
    assert np.abs(got - ref).max() > 1e-3 * np.abs(ref).max()


@pytest.mark.parametrize("rank", [1, 4, 9])
def test_rank_r_error_is_the_discarded_singular_energy(rank: int) -> None:
    """y = x·B: with the basis vectors as inputs the outputs are B's rows, so the squared
    output error of rank r is ‖B − B_r‖² = Σ_{i>r} s_i² (Eckart–Young), measured in ORT."""
    rng = np.random.default_rng(1)
    B = (rng.normal(size=(16, 12)) * np.linspace(3, 0.1, 12)[None, :]).astype(np.float32)
    proto = _model([helper.make_node("MatMul", ["x", "B"], ["y"], name="mm")], [helper.make_tensor_value_info("x", 1, [16, 16])], {"B": B})
    eye = {"x": np.eye(16, dtype=np.float32)}
    model = ir.from_proto(proto)
    LowRankPass({"B": rank})(model)
    err = _session(ir.to_proto(model)).run(None, eye)[0] - _session(proto).run(None, eye)[0]
    s = np.linalg.svd(B.astype(np.float64), compute_uv=False)
    np.testing.assert_allclose(float((err.astype(np.float64) ** 2).sum()), float((s[rank:] ** 2).sum()), rtol=1e-3)
    layer = find_layers(ir.from_proto(proto))[0][0]
    assert truncation_error(spectrum(layer, B), rank) == pytest.approx(np.sqrt((s[rank:] ** 2).sum() / (s**2).sum()), rel=1e-9)


def test_whitened_error_is_the_discarded_energy_of_w_l_and_beats_plain_svd() -> None:
    rng = np.random.default_rng(2)
    n, m, samples = 12, 10, 400
    mix = rng.normal(size=(n, n)) * np.linspace(2, 0.05, n)[None, :]
    X = (rng.normal(size=(samples, n)) @ mix.T).astype(np.float32)  # correlated inputs
    B = rng.normal(size=(n, m)).astype(np.float32)
    proto = _model([helper.make_node("MatMul", ["x", "B"], ["y"], name="mm")], [helper.make_tensor_value_info("x", 1, [samples, n])], {"B": B})
    H = X.astype(np.float64).T @ X.astype(np.float64) / samples
    L = whitener(H, damp=1e-12)
    ref = _session(proto).run(None, {"x": X})[0].astype(np.float64)
    errs = {}
    for name, wh in (("plain", {}), ("whitened", {"B": L})):
        model = ir.from_proto(proto)
        LowRankPass({"B": 4}, wh)(model)
        got = _session(ir.to_proto(model)).run(None, {"x": X})[0].astype(np.float64)
        errs[name] = float(((got - ref) ** 2).sum() / samples)
    s = np.linalg.svd(B.T.astype(np.float64) @ L, compute_uv=False)
    assert errs["whitened"] == pytest.approx(float((s[4:] ** 2).sum()), rel=1e-2)
    assert errs["whitened"] < errs["plain"]


def test_rank_choice_by_energy_and_rounding() -> None:
    layer = find_layers(ir.from_proto(_model([helper.make_node("MatMul", ["x", "B"], ["y"], name="mm")],
                                             [helper.make_tensor_value_info("x", 1, [1, 4])], {"B": np.diag([3.0, 2.0, 1.0, 0.5]).astype(np.float32)})))[0][0]
    spec = spectrum(layer, np.diag([3.0, 2.0, 1.0, 0.5]))
    total = 9 + 4 + 1 + 0.25
    assert energy_rank(spec, 9 / total) == 1 and energy_rank(spec, 13 / total) == 2 and energy_rank(spec, 13.01 / total) == 3
    assert energy_rank(spec, 1.0) == 4
    assert round_rank(3, 4, 100) == 4 and round_rank(5, 4, 6) == 6 and round_rank(3, 1, 100) == 3


def test_energy_mode_in_the_pipeline_round_trips_through_ort(tmp_path: pathlib.Path) -> None:
    result = spa.prune(str(DEMO), ratio=0.0, lowrank="energy", lowrank_energy=0.9, benchmark=False)
    lr = result.report.lowrank
    done = [l for l in lr["layers"] if l["action"] == "factorize"]
    assert done and all(l["rank"] < l["break_even"] for l in done)
    assert all("reason" in l for l in lr["layers"] if l["action"] == "keep")
    assert lr["full_rank_max_abs_diff"] <= 1e-5
    assert 0 < lr["output_error_vs_original"] < 1 and all(0 <= l["error"] < 1 for l in done)
    assert result.report.flops_after < result.report.flops_before
    path = result.save(tmp_path / "out.onnx")
    onnx.checker.check_model(str(path), full_check=True)
    original, factored = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (DEMO, path))
    x = np.random.default_rng(0).normal(size=(1, 3, 32, 32)).astype(np.float32)
    assert [o.shape for o in original.run(None, {"input": x})] == [o.shape for o in factored.run(None, {"input": x})]
    assert result.report.warnings == []  # "nothing was pruned" is not a warning when layers were factorized


def test_torch_export_round_trips(tmp_path: pathlib.Path, zoo_onnx) -> None:
    path = zoo_onnx("resnet")
    result = spa.prune(str(path), ratio=0.3, lowrank="energy", lowrank_energy=0.8, fold=True, benchmark=False)
    actions = {l["action"] for l in result.report.lowrank["layers"]}
    assert "both" in actions or {"prune", "factorize"} <= actions  # pruned, factorized, or both, per layer
    out = result.save(tmp_path / "r.onnx")
    a, b = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (path, out))
    feeds = {i.name: np.random.default_rng(0).normal(size=[d if isinstance(d, int) else 1 for d in i.shape]).astype(np.float32) for i in a.get_inputs()}
    assert [o.shape for o in a.run(None, feeds)] == [o.shape for o in b.run(None, feeds)]


def test_auto_meets_the_target_and_apply_replays_it(tmp_path: pathlib.Path) -> None:
    plan = spa.plan(str(DEMO), ratio=0.5, lowrank="auto", flops_target=0.5)
    ranks = plan.options["lowrank_ranks"]
    assert ranks and all(isinstance(r, int) for r in ranks.values())
    doc = json.loads(plan.dumps())
    assert spa.Plan.from_json(doc).options["lowrank_ranks"] == ranks
    pruned = spa.prune(str(DEMO), ratio=0.5, lowrank="auto", flops_target=0.5, benchmark=False)
    assert pruned.report.flops_ratio <= 0.5
    tried = pruned.report.options["lowrank_allocation"]["tried"]
    measured = [t for t in tried if "measured_error" in t]
    assert tried[0] in measured and tried[-1] in measured  # low-rank only (ratio 0) and prune only are measured
    chosen = next(t for t in tried if t["ratio"] == pruned.report.options["searched_ratio"])
    # without data an image model's candidates are ranked by measured × estimated error
    assert chosen["score"] == min(t["score"] for t in measured) and all(
        t["score"] == pytest.approx(t["measured_error"] * t["estimated_error"], rel=1e-4) for t in measured)
    replayed = spa.apply(str(DEMO), plan, benchmark=False)
    x = {"input": np.random.default_rng(3).normal(size=(1, 3, 32, 32)).astype(np.float32)}
    y1, y2 = (_session(ir.to_proto(r.model)).run(None, x)[0] for r in (pruned, replayed))
    np.testing.assert_allclose(y1, y2, rtol=1e-5, atol=1e-6)


def test_params_target_with_auto() -> None:
    r = spa.prune(str(DEMO), ratio=0.5, lowrank="auto", params_target=0.6, benchmark=False, verify="check")
    assert r.report.params_ratio <= 0.6


def test_nan_weights_leave_the_layer_with_a_reason() -> None:
    rng = np.random.default_rng(0)
    B = rng.normal(size=(32, 32)).astype(np.float32)
    B[0, 0] = np.nan
    C = rng.normal(size=(32, 32)).astype(np.float32)
    proto = _model([helper.make_node("MatMul", ["x", "B"], ["t"], name="bad"), helper.make_node("MatMul", ["t", "C"], ["y"], name="good")],
                   [helper.make_tensor_value_info("x", 1, [2, 32])], {"B": B, "C": C})
    r = spa.prune(proto, ratio=0.0, lowrank="energy", lowrank_energy=0.5, benchmark=False, verify="check")
    rows = {l["layer"]: l for l in r.report.lowrank["layers"]}
    assert rows["bad"]["action"] == "keep" and "NaN or inf" in rows["bad"]["reason"]
    assert rows["good"]["action"] == "factorize"


def test_calibration_whitens_matmul_layers() -> None:
    rng = np.random.default_rng(4)
    mix = rng.normal(size=(24, 24)) * np.linspace(2, 0.01, 24)[None, :]
    feeds = [{"x": (rng.normal(size=(8, 24)) @ mix.T).astype(np.float32)} for _ in range(8)]
    B = rng.normal(size=(24, 24)).astype(np.float32)
    proto = _model([helper.make_node("MatMul", ["x", "B"], ["y"], name="mm")], [helper.make_tensor_value_info("x", 1, [8, 24])], {"B": B})
    kw = dict(ratio=0.0, lowrank="energy", lowrank_energy=0.8, benchmark=False)
    plain = spa.prune(proto, **kw).report.lowrank
    whitened = spa.prune(proto, calibration=feeds, **kw).report.lowrank
    assert whitened["whitened"] == ["B"] and plain["whitened"] == []
    assert whitened["full_rank_max_abs_diff"] <= 1e-4


def test_cli_lowrank_writes_the_model_and_the_table(tmp_path: pathlib.Path) -> None:
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    res = CliRunner().invoke(cli, ["lowrank", str(DEMO), "--energy", "0.9", "-o", str(out), "--report", str(report), "--no-bench"], catch_exceptions=False)
    assert res.exit_code == 0, res.stderr
    assert "factorize" in res.stdout and "full-rank factorization" in res.stdout
    doc = json.loads(report.read_text())
    assert doc["lowrank"]["mode"] == "energy" and doc["groups_pruned"] == 0
    onnx.checker.check_model(str(out), full_check=True)


@pytest.mark.parametrize("args, words", [
    (["lowrank", str(DEMO), "--energy", "1.5"], "energy"),
    (["lowrank", str(DEMO), "--energy", "0"], "energy"),
    (["prune", str(DEMO), "--lowrank", "auto"], "--flops-target"),
    (["prune", str(DEMO), "--params-target", "0.5"], "--lowrank auto"),
    (["prune", str(DEMO), "--lowrank", "auto", "--flops-target", "0.001"], "out of reach"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path: pathlib.Path, args: list[str], words: str) -> None:
    res = CliRunner().invoke(cli, [*args, "-o", str(tmp_path / "o.onnx"), "--no-bench"], catch_exceptions=False)
    assert res.exit_code == 2
    assert words in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_a_plan_rank_out_of_range_is_refused(tmp_path: pathlib.Path) -> None:
    plan = json.loads(spa.plan(str(DEMO), ratio=0.3, lowrank="auto", flops_target=0.6).dumps())
    weight = next(iter(plan["options"]["lowrank_ranks"]))
    for bad, words in ((0, "lowrank_ranks"), (10_000, "out of range")):
        plan["options"]["lowrank_ranks"][weight] = bad
        p = tmp_path / "p.json"
        p.write_text(json.dumps(plan))
        res = CliRunner().invoke(cli, ["apply", str(DEMO), str(p), "-o", str(tmp_path / "o.onnx")], catch_exceptions=False)
        assert res.exit_code == 2 and words in res.stderr, res.stderr


def test_fold_is_recorded_in_the_plan_and_replayed(tmp_path: pathlib.Path) -> None:
    plan = spa.plan(str(DEMO), ratio=0.3, fold=True)
    assert plan.options["fold"] is True
    r = spa.apply(str(DEMO), plan, benchmark=False)
    assert r.report.fold is not None and "removed_nodes" in r.report.fold


def test_python_lowrank_factorizes_without_pruning() -> None:
    r = spa.lowrank(str(DEMO), energy=0.9, benchmark=False, verify="check")
    assert r.report.groups_pruned == 0 and r.plan.options["lowrank"] == "energy"
    assert any(l["rank"] for l in r.report.lowrank["layers"]) and r.report.flops_after < r.report.flops_before
    with pytest.raises(spa.UsageError, match="energy"):
        spa.lowrank(str(DEMO), energy=0.0)


def test_output_error_counts_the_real_positions_of_an_attention_mask() -> None:
    from spa.lowrank_alloc import output_error

    rng = np.random.default_rng(5)
    ref, got = rng.normal(size=(2, 6, 4)), rng.normal(size=(2, 6, 4))
    mask = (rng.random((2, 6)) < 0.5).astype(np.int64)
    mask[:, 0] = 1
    keep = mask.astype(bool)
    want = np.sqrt(((got - ref)[keep] ** 2).sum() / (ref[keep] ** 2).sum())
    assert output_error([ref], [got], {"attention_mask": mask}) == pytest.approx(want, rel=1e-12)
    whole = np.sqrt(((got - ref) ** 2).sum() / (ref**2).sum())
    assert output_error([ref], [got], {"flags": mask}) == pytest.approx(whole, rel=1e-12)  # not a mask by name
    assert output_error([ref[:, :5]], [got[:, :5]], {"attention_mask": mask}) == pytest.approx(
        np.sqrt(((got - ref)[:, :5] ** 2).sum() / (ref[:, :5] ** 2).sum()), rel=1e-12)  # leading dims are not [B, S]
    assert output_error([ref], [got], {"attention_mask": mask * 2}) == pytest.approx(whole, rel=1e-12)  # not 0/1


def test_held_out_split() -> None:
    from spa.passes.lowrank_step import HELD_OUT, held_out_split

    for n in (2, 7, 32, 100):
        fit, held = held_out_split(n, seed=0)
        assert sorted(fit + held) == list(range(n)) and 1 <= len(held) <= HELD_OUT and len(held) == max(1, min(HELD_OUT, n // 4))
        assert held_out_split(n, seed=0) == (fit, held)
    assert held_out_split(1, seed=0) == ([0], [0])


def _masked_toy(mask_name: str, S: int = 8, D: int = 16, seed: int = 0, samples: int = 8):
    """x·A·B + mask with A = diag(s)·Q, B = Qᵀ (y = x·diag(s) + mask): 4 strong input
    directions, 12 weak ones. Real tokens (mask 1) use the strong ones, which a rank-4
    factorization of A keeps and pruning hidden units loses in part; padding positions are
    large along the weak ones, which low rank drops: on the whole output pruning measures
    better, on the real positions low rank is exact."""
    rng = np.random.default_rng(seed)
    s = np.array([1.0] * 4 + [0.05] * (D - 4))
    Q, _ = np.linalg.qr(rng.normal(size=(D, D)))
    nodes = [helper.make_node("MatMul", ["x", "A"], ["h"], name="mm1"), helper.make_node("MatMul", ["h", "B"], ["z"], name="mm2"),
             helper.make_node("Cast", [mask_name], ["mf"], to=1, name="cast"), helper.make_node("Unsqueeze", ["mf", "ax"], ["mu"], name="unsq"),
             helper.make_node("Add", ["z", "mu"], ["y"], name="add")]
    proto = _model(nodes, [helper.make_tensor_value_info("x", 1, [1, S, D]), helper.make_tensor_value_info(mask_name, 7, [1, S])],
                   {"A": (s[:, None] * Q).astype(np.float32), "B": Q.T.astype(np.float32), "ax": np.array([2], np.int64)})
    feeds = []
    for _ in range(samples):
        x = np.zeros((1, S, D), np.float32)
        x[0, :3, :4] = rng.normal(size=(3, 4))
        x[0, 3:, 4:] = 1000 * rng.normal(size=(S - 3, D - 4))
        m = np.zeros((1, S), np.int64)
        m[0, :3] = 1
        feeds.append({"x": x, mask_name: m})
    return proto, feeds


def test_allocator_measures_real_positions_on_held_out_calibration_samples() -> None:
    from spa.lowrank_alloc import output_error

    kw = dict(lowrank="auto", flops_target=0.8, benchmark=False)
    proto, feeds = _masked_toy("attention_mask")
    r = spa.prune(proto, calibration=feeds, **kw)
    how = r.report.options["lowrank_measurement"]
    assert "2 held-out" in how["inputs"] and "fitted on the other 6" in how["inputs"] and how["positions"].startswith("attention mask")
    assert r.report.options["lowrank_statistics"]["positions"] == "attention mask == 1"
    assert r.report.options["searched_ratio"] == 0.0 and r.plan.options["lowrank_ranks"]  # low rank only
    pruned = spa.prune(proto, flops_target=0.8, benchmark=False)  # pruning alone at the same budget
    fresh = _masked_toy("attention_mask", seed=1)[1]  # new samples, the same recipe
    ref, lr, pr = (_session(p) for p in (proto, ir.to_proto(r.model), ir.to_proto(pruned.model)))
    err = lambda sess: np.mean([output_error(ref.run(None, f), sess.run(None, f), f) for f in fresh])  # noqa: E731
    assert err(lr) < 1e-3 < 0.1 < err(pr)  # the choice is the better one on the real tokens
    # The same model without a mask input by name: every position counts, and pruning wins there.
    proto2, feeds2 = _masked_toy("flags")
    r2 = spa.prune(proto2, calibration=feeds2, **kw)
    assert r2.report.options["lowrank_measurement"]["positions"] == "all"
    tried = r2.report.options["lowrank_allocation"]["tried"]
    assert r2.report.options["searched_ratio"] > 0.0
    assert tried[0]["measured_error"] > tried[-1]["measured_error"]  # low rank only measures worse on the whole output


def _token_toy(V: int = 50, S: int = 12, D: int = 8) -> tuple[onnx.ModelProto, np.ndarray]:
    """ids (through a Cast) → Gather(E) → MatMul, + the attention mask: rows 0..9 of E are zero
    (never trained), rows 10..19 small."""
    rng = np.random.default_rng(3)
    E = rng.normal(size=(V, D)).astype(np.float32)
    E[:10] = 0.0
    E[10:20] *= 0.1
    nodes = [helper.make_node("Cast", ["input_ids"], ["ids"], to=7, name="cast"), helper.make_node("Gather", ["E", "ids"], ["e"], name="gather"),
             helper.make_node("MatMul", ["e", "W"], ["h"], name="mm"), helper.make_node("Cast", ["attention_mask"], ["mf"], to=1, name="castm"),
             helper.make_node("Unsqueeze", ["mf", "ax"], ["mu"], name="unsq"), helper.make_node("Mul", ["h", "mu"], ["y"], name="mul")]
    proto = _model(nodes, [helper.make_tensor_value_info("input_ids", 6, [2, S]), helper.make_tensor_value_info("attention_mask", 7, [2, S])],
                   {"E": E, "W": rng.normal(size=(D, D)).astype(np.float32), "ax": np.array([2], np.int64)})
    return proto, E


def test_synthetic_token_feeds_prefix_masks_ids_in_range_seeded() -> None:
    from spa.inputs import make_feeds, resolve_input_shapes
    from spa.lowrank_alloc import embedding_tables, synthetic_token_feeds

    proto, E = _token_toy()
    model = ir.from_proto(proto)
    tables = embedding_tables(model)
    assert list(tables) == ["input_ids"] and np.array_equal(tables["input_ids"], E)  # found through the Cast
    shapes = resolve_input_shapes(model)
    feeds = synthetic_token_feeds(model, shapes, seed=4, samples=6, ids="norm", mask="prefix")
    assert len(feeds) == 6
    norms = np.linalg.norm(E, axis=1)
    for f in feeds:
        ids, m = f["input_ids"], f["attention_mask"]
        assert ids.dtype == np.int32 and m.dtype == np.int64 and ids.shape == m.shape == (2, 12)
        for row_ids, row in zip(ids, m):
            n = int(row.sum())
            assert 12 // 4 <= n <= 12 and row[:n].all() and not row[n:].any()  # ones, then zeros: a tokenizer's padding
            assert (row_ids[n:] == 0).all() and (norms[row_ids[:n]] > 0).all()  # zero-norm rows never drawn
        assert ((0 <= ids) & (ids < E.shape[0])).all()
    again = synthetic_token_feeds(model, shapes, seed=4, samples=6, ids="norm", mask="prefix")
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(feeds, again) for k in a)  # seeded
    other = synthetic_token_feeds(model, shapes, seed=5, samples=1, ids="norm", mask="prefix")[0]
    assert not np.array_equal(other["input_ids"], feeds[0]["input_ids"])
    assert np.array_equal(other["input_ids"], feeds[1]["input_ids"])  # sample k is seed + k
    trim = np.concatenate([f["input_ids"][f["attention_mask"].astype(bool)] for f in synthetic_token_feeds(model, shapes, seed=0, samples=20, ids="trim", mask="ones")])
    assert (norms[trim] >= 0.5 * np.median(norms)).all() and len(np.unique(trim)) > 10
    ones = synthetic_token_feeds(model, shapes, seed=0, samples=2, ids="uniform", mask="ones")
    assert all(f["attention_mask"].all() for f in ones)
    plain = synthetic_token_feeds(model, shapes, seed=7, samples=1, ids="binary", mask="random")[0]
    want = make_feeds(model, shapes, seed=7)
    assert all(np.array_equal(plain[k], want[k]) for k in want)  # binary/random is spa.inputs' feed
    with pytest.raises(spa.UsageError):
        synthetic_token_feeds(model, shapes, seed=0, ids="words")
    # Position and segment inputs (by name) count positions and are 0, whatever the id scheme.
    E2 = np.random.default_rng(0).normal(size=(16, 8)).astype(np.float32)
    ins = [helper.make_tensor_value_info(n, 7, [1, 12]) for n in ("input_ids", "position_ids", "token_type_ids")]
    nodes = [helper.make_node("Gather", [t, n], [f"e{k}"], name=f"g{k}") for k, (t, n) in enumerate(zip(("E", "P", "T"), ("input_ids", "position_ids", "token_type_ids")))]
    nodes += [helper.make_node("Add", ["e0", "e1"], ["s"], name="a0"), helper.make_node("Add", ["s", "e2"], ["y"], name="a1")]
    m3 = ir.from_proto(_model(nodes, ins, {"E": E, "P": E2, "T": E2[:2]}))
    assert set(embedding_tables(m3)) == {"input_ids", "position_ids", "token_type_ids"}
    f3 = synthetic_token_feeds(m3, resolve_input_shapes(m3), seed=0, ids="uniform", mask="prefix")[0]
    assert np.array_equal(f3["position_ids"], np.arange(12)[None]) and not f3["token_type_ids"].any() and f3["input_ids"].any()


def test_cosine_output_errors_on_real_positions() -> None:
    from spa.lowrank_alloc import output_error

    rng = np.random.default_rng(6)
    ref, got = rng.normal(size=(2, 5, 4)), rng.normal(size=(2, 5, 4))
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], np.int64)
    keep = mask.astype(bool)
    cos = lambda a, b: (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)  # noqa: E731
    feed = {"attention_mask": mask}
    assert output_error([ref], [got], feed, "cosine") == pytest.approx(1 - cos(ref[keep], got[keep]).mean(), rel=1e-12)
    pool = lambda x: (x * keep[..., None]).sum(1) / keep.sum(1, keepdims=True)  # noqa: E731
    assert output_error([ref], [got], feed, "pooled") == pytest.approx(1 - cos(pool(ref), pool(got)).mean(), rel=1e-12)
    assert output_error([ref], [3.0 * ref], feed, "cosine") == pytest.approx(0.0, abs=1e-12)  # scale-free
    assert output_error([ref], [3.0 * ref], feed, "relative") == pytest.approx(2.0, rel=1e-12)
    flat = lambda a, b: 1 - cos(a.reshape(2, -1), b.reshape(2, -1)).mean()  # noqa: E731
    assert output_error([ref], [got], {"flags": mask}, "cosine") == pytest.approx(flat(ref, got), rel=1e-12)  # no mask: a vector per batch row
    with pytest.raises(ValueError):
        output_error([ref], [got], feed, "cosines")


def test_allocator_without_data_measures_every_candidate_by_cosine_on_synthetic_tokens() -> None:
    proto, _ = _token_toy()
    r = spa.prune(proto, lowrank="auto", flops_target=0.7, benchmark=False)
    how = r.report.options["lowrank_measurement"]
    assert how["error"] == "cosine" and "8 seeded synthetic feeds" in how["inputs"] and "input_ids" in how["inputs"]
    assert how["positions"].startswith("attention mask")
    tried = [t for t in r.report.options["lowrank_allocation"]["tried"] if np.isfinite(t["estimated_error"])]
    assert len(tried) > 2 and all("measured_error" in t for t in tried)  # every candidate of the grid, not 4
    best = min(tried, key=lambda t: t["measured_error"])
    assert r.report.options["searched_ratio"] == best["ratio"]
    assert how["ranked_by"] == "measured error"
    # A model without token inputs: synthetic images, the relative error, ranked with the estimate.
    plain = spa.prune(str(DEMO), lowrank="auto", flops_target=0.7, benchmark=False).report.options["lowrank_measurement"]
    assert plain["inputs"] == "8 seeded synthetic pink-noise images" and plain["error"] == "relative"
    assert plain["ranked_by"] == "measured error × estimated error"


def test_allocator_without_data_ranks_image_candidates_by_measured_times_estimated_error(monkeypatch) -> None:
    """An image model without data: the candidates are measured on IMAGE_SAMPLES pink-noise
    images (spa.calibration.synthetic_feeds) and the least measured × estimated error wins,
    not the least measured error."""
    from spa import lowrank_alloc as LA
    from spa.calibration import synthetic_feeds
    from spa.inputs import resolve_input_shapes
    from spa.passes import lowrank_step as LS

    model = ir.load(str(DEMO))
    want = list(synthetic_feeds(model, resolve_input_shapes(model), kind="pink", samples=LS.IMAGE_SAMPLES, seed=0))
    seen: list = []
    real = LA.output_error_fn

    def fake(model, cg, removed_at, feeds, scratch, **kw):
        seen.append((feeds, kw))
        inner = real(model, cg, removed_at, feeds, scratch, **kw)
        # low rank alone measures worst, more pruning a little better: the measurement alone prunes
        measure = lambda ratio, ranks: 1.0 if ratio == 0.0 else 0.9 - 0.01 * ratio  # noqa: E731
        measure.__dict__.update(inner.__dict__)
        return measure

    monkeypatch.setattr(LA, "output_error_fn", fake)
    picked = {}
    for rank_by in ("measured", "product"):
        monkeypatch.setattr(LS, "IMAGE_RANK_BY", rank_by)
        r = spa.prune(str(DEMO), lowrank="auto", flops_target=0.7, benchmark=False)
        tried = [t for t in r.report.options["lowrank_allocation"]["tried"] if "measured_error" in t]
        assert len(tried) >= 3
        key = (lambda t: t["measured_error"]) if rank_by == "measured" else (lambda t: t["measured_error"] * t["estimated_error"])
        assert r.report.options["searched_ratio"] == min(tried, key=key)["ratio"]
        picked[rank_by] = r.report.options["searched_ratio"]
    assert picked["measured"] > 0.0 == picked["product"]  # the two rules disagree here
    feeds, kw = seen[-1]
    assert kw["rank_by"] == "product" and kw["kind"] == "relative" and len(feeds) == LS.IMAGE_SAMPLES
    assert all(np.array_equal(a["input"], b["input"]) for a, b in zip(feeds, want))  # the pink images, seeded by --seed
    with pytest.raises(ValueError):
        real(model, None, None, [], None, rank_by="estimate")
