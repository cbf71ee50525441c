"""benchmarks/cuda_coverage.py: the resumable cache, the failure classification and the summary,
on fake results (no torch, TVM or nvcc run here)."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

import pytest

BENCH = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def cc():
    name = "spa_benchmarks_cuda_coverage"
    spec = importlib.util.spec_from_file_location(name, BENCH / "cuda_coverage.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _args(arch="sm_80", ratio=0.5):
    import argparse

    return argparse.Namespace(arch=arch, ratio=ratio)


def test_cache_roundtrip_and_key(cc, tmp_path):
    path = tmp_path / "out" / "results.json"
    key = cc.cache_key(_args())
    rows = {"resnet18": {"model": "resnet18", "status": "built", "kernels": 38}}
    cc.save_cache(path, key, rows)
    assert cc.load_cache(path, key) == rows
    # Other settings: nothing is reused.
    assert cc.load_cache(path, cc.cache_key(_args(arch="sm_90"))) == {}
    assert cc.load_cache(path, cc.cache_key(_args(ratio=0.3))) == {}
    # Missing or corrupt cache: empty, no exception.
    assert cc.load_cache(tmp_path / "none.json", key) == {}
    path.write_text("{not json")
    assert cc.load_cache(path, key) == {}


def test_to_run_skips_done(cc):
    cached = {
        "a": {"status": "built"},
        "b": {"status": "TVM can't import"},
        "c": {"status": "timeout"},
        "d": {"status": "export failed"},
    }
    names = ["a", "b", "c", "d", "e"]
    assert cc.to_run(names, cached, redo_failed=False) == ["e"]
    assert cc.to_run(names, cached, redo_failed=True) == ["b", "c", "e"]


def test_classify_and_op(cc):
    msg = "TVM's ONNX importer has no converter for LSTM"
    assert cc.classify_target_error(msg) == cc.IMPORT
    assert cc._op_named(msg, {"Conv", "LSTM"}) == "LSTM"
    msg = "TVM cannot import the model: Unsupported: GridSample with mode bicubic"
    assert cc.classify_target_error(msg) == cc.IMPORT
    assert cc._op_named(msg, {"Conv", "GridSample", "Add"}) == "GridSample"
    assert cc._op_named("TVM cannot import the model: something", {"Conv"}) is None
    # Named in lower case and plural (the Pad converter's message): found case-insensitively.
    msg = "TVM cannot import the model: Dynamic pads are not supported yet."
    assert cc._op_named(msg, {"Conv", "Pad", "Add"}) == "Pad"
    assert cc._op_named(msg, {"Conv", "Add"}) is None
    assert cc.classify_target_error("nvcc cannot compile the generated CUDA code for sm_80: error") == "nvcc failed"
    assert cc.classify_target_error("TVM cannot build the model for cuda: x") == "TVM build failed"


def test_rerun_uses_cache_and_counts(cc, tmp_path, capsys):
    """A second run over cached models runs nothing and reports the cached figures."""
    out = tmp_path / "out"
    rows = {
        "resnet18": {"model": "resnet18", "family": "cnn", "status": "built", "kernels": 38, "fatbin_bytes": 189 * 1024, "wall_s": 24.0},
        "resnet50": {"model": "resnet50", "family": "cnn", "status": "TVM can't import", "op": "Foo",
                     "detail": "TVM's ONNX importer has no converter for Foo", "wall_s": 5.0},
        "vit_tiny_patch16_224": {"model": "vit_tiny_patch16_224", "family": "vit", "status": "export failed", "detail": "x"},
    }
    cc.save_cache(out / "results.json", cc.cache_key(_args()), rows)
    before = (out / "results.json").read_text()
    assert cc.main(["--out", str(out), "--only", "resnet18,resnet50,vit_tiny_patch16_224"]) == 0
    printed = capsys.readouterr().out
    assert "3 cached" in printed and "0 to run" in printed
    assert json.loads((out / "results.json").read_text()) == json.loads(before)
    md = (out / "results.md").read_text()
    assert "| resnet18 | cnn | built | 38 | 189 |" in md
    assert "**1/2 exported models built" in md
    assert "TVM can't import: 1 (resnet50; ops: Foo ×1)" in md
    assert "export failed (torch; not counted): 1 (vit_tiny_patch16_224)" in md


def test_unknown_model_refused(cc, tmp_path, capsys):
    assert cc.main(["--out", str(tmp_path), "--only", "no_such_model"]) == 2
    assert "not in the coverage set: no_such_model" in capsys.readouterr().err


def test_fill_op_from_the_model(cc, tmp_path):
    """A cached import failure without an op gets it from the exported model's op types."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    pads = helper.make_tensor("pads", TensorProto.INT64, [4], [0, 1, 0, 1])
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Pad", ["r", "pads"], ["y"])],
                          "g", [x], [y], [pads])
    onnx.save(helper.make_model(g), tmp_path / "m.onnx")
    row = {"model": "m", "status": cc.IMPORT, "detail": "TVM cannot import the model: Dynamic pads are not supported yet."}
    cc.fill_op(row, tmp_path)
    assert row["op"] == "Pad"
    built = {"model": "m", "status": cc.BUILT}
    cc.fill_op(built, tmp_path)
    assert "op" not in built


def test_describe_primfunc(cc):
    """The one-line summary of a TIR function a dlight rule fails on (TVMScript as TVM 0.27 prints it)."""
    script = '''
@T.prim_func(private=True, s_tir=True)
def main(lv434: T.Buffer((T.int64(1), T.int64(4), T.int64(1), T.int64(1)), "float32")):
    # with T.sblock("root"):
    for i0, i1, i2, i3, k in T.grid(T.int64(1), T.int64(4), T.int64(1), T.int64(32), T.int64(1)):
        with T.sblock("matmul"):
            pass
    for ax0, ax1 in T.grid(T.int64(4), T.int64(32)):
        with T.sblock("T_add"):
            pass
'''

    class Func:
        def script(self):
            return script

    assert cc._describe_primfunc(Func()) == "matmul [1x4x1x32x1], T_add [4x32]"
