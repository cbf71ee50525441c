"""Tests for spa.io: every refusal has the right class, saves are atomic and lossless."""

from __future__ import annotations

import os
import pathlib
import threading

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from spa.errors import InvalidModelError, OutputError, SpaError, UnsupportedError
from spa.io import (
    default_output_path,
    load_model,
    model_sha256,
    save_model,
)

RNG = np.random.default_rng(0)
X = RNG.standard_normal((2, 16)).astype(np.float32)


def make_model(opset: int = 17, *, extra_nodes=(), extra_opsets=()) -> onnx.ModelProto:
    """x[2,16] -> MatMul W[16,32] -> Add b -> Relu -> y; W is 2 KiB, so it goes external."""
    w = numpy_helper.from_array(RNG.standard_normal((16, 32)).astype(np.float32), "W")
    b = numpy_helper.from_array(RNG.standard_normal(32).astype(np.float32), "b")
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"]),
        helper.make_node("Add", ["h", "b"], ["a"]),
        helper.make_node("Relu", ["a"], ["y"]),
        *extra_nodes,
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 32])],
        [w, b],
    )
    opsets = [helper.make_opsetid("", opset), *extra_opsets]
    return helper.make_model(graph, opset_imports=opsets, ir_version=8)


def write(path: pathlib.Path, model: onnx.ModelProto) -> pathlib.Path:
    path.write_bytes(model.SerializeToString())
    return path


def run_ort(path: os.PathLike[str] | str) -> np.ndarray:
    sess = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": X})[0]


@pytest.fixture
def model_path(tmp_path: pathlib.Path) -> pathlib.Path:
    return write(tmp_path / "model.onnx", make_model())


@pytest.fixture
def ext_model_path(tmp_path: pathlib.Path) -> pathlib.Path:
    src = tmp_path / "ext"
    src.mkdir()
    path = src / "model.onnx"
    onnx.save(make_model(), path, save_as_external_data=True, location="weights.bin",
              size_threshold=256)
    return path


# ---------------------------------------------------------------------------------- refusals


def test_errors_are_spa_errors() -> None:
    assert issubclass(InvalidModelError, SpaError) and issubclass(OutputError, SpaError)


def test_missing_path(tmp_path: pathlib.Path) -> None:
    with pytest.raises(InvalidModelError, match="no such file"):
        load_model(tmp_path / "nope.onnx")


def test_missing_parent_is_a_file(model_path: pathlib.Path) -> None:
    with pytest.raises(InvalidModelError, match="no such file"):
        load_model(model_path / "inner.onnx")


def test_directory(tmp_path: pathlib.Path) -> None:
    with pytest.raises(InvalidModelError, match="directory"):
        load_model(tmp_path)


def test_empty_file(tmp_path: pathlib.Path) -> None:
    p = tmp_path / "empty.onnx"
    p.touch()
    with pytest.raises(InvalidModelError, match="empty"):
        load_model(p)


def test_empty_modelproto_serializes_to_empty_file(tmp_path: pathlib.Path) -> None:
    p = tmp_path / "m.onnx"
    p.write_bytes(onnx.ModelProto().SerializeToString())
    with pytest.raises(InvalidModelError):
        load_model(p)


def test_model_without_graph(tmp_path: pathlib.Path) -> None:
    p = tmp_path / "m.onnx"
    p.write_bytes(onnx.ModelProto(ir_version=8, producer_name="x").SerializeToString())
    with pytest.raises(InvalidModelError, match="no graph"):
        load_model(p)
    with pytest.raises(InvalidModelError, match="no graph"):
        load_model(onnx.ModelProto(ir_version=8))


@pytest.mark.parametrize("content", [
    b"hello, this is not a model\n" * 10,
    b"<html><body>404</body></html>",
    bytes(RNG.integers(0, 256, 4096, dtype=np.uint8)),
])
def test_not_onnx(tmp_path: pathlib.Path, content: bytes) -> None:
    p = tmp_path / "junk.onnx"
    p.write_bytes(content)
    with pytest.raises(InvalidModelError) as info:
        load_model(p)
    assert "\n" not in str(info.value) and str(p) in str(info.value)


def test_truncated_protobuf_every_cut(tmp_path: pathlib.Path) -> None:
    """Every prefix is refused, including cuts on a field boundary that *do* parse."""
    data = make_model().SerializeToString()
    p = tmp_path / "cut.onnx"
    parsed_anyway = 0
    for cut in range(1, len(data)):
        p.write_bytes(data[:cut])
        try:
            onnx.ModelProto().ParseFromString(data[:cut])
            parsed_anyway += 1
        except Exception:
            pass
        with pytest.raises(InvalidModelError):
            load_model(p)
    # protobuf accepts the cut just before opset_import: the structural check refuses it
    assert parsed_anyway >= 1


def test_truncated_before_opset_import(tmp_path: pathlib.Path) -> None:
    m = make_model()
    del m.opset_import[:]
    with pytest.raises(InvalidModelError, match="opset_import"):
        load_model(write(tmp_path / "m.onnx", m))


def test_unknown_domain_node_loads_as_a_custom_op(tmp_path: pathlib.Path) -> None:
    """A vendor's op loads (the analysis freezes its channels); foreign_ops names it, for the
    steps that would need ONNX Runtime to run it."""
    from spa.io import foreign_ops

    node = helper.make_node("Foo", ["y"], ["z"], domain="my.custom")
    m = make_model(extra_nodes=[node], extra_opsets=[helper.make_opsetid("my.custom", 1)])
    model = load_model(write(tmp_path / "m.onnx", m))
    assert foreign_ops(model) == ["my.custom::Foo"]
    assert foreign_ops(load_model(write(tmp_path / "plain.onnx", make_model()))) == []


def test_unknown_domain_without_opset_import(tmp_path: pathlib.Path) -> None:
    node = helper.make_node("Foo", ["y"], ["z"], domain="my.custom")
    m = make_model(extra_nodes=[node])
    with pytest.raises(InvalidModelError, match="my.custom"):
        load_model(write(tmp_path / "m.onnx", m))


def test_unknown_domain_unused_is_fine(tmp_path: pathlib.Path) -> None:
    m = make_model(extra_opsets=[helper.make_opsetid("my.custom", 1)])
    assert len(load_model(write(tmp_path / "m.onnx", m)).graph) == 3


def test_known_extra_domain(tmp_path: pathlib.Path) -> None:
    node = helper.make_node("Gelu", ["y"], ["z"], domain="com.microsoft")
    m = make_model(extra_nodes=[node], extra_opsets=[helper.make_opsetid("com.microsoft", 1)])
    load_model(write(tmp_path / "m.onnx", m))
    del m.opset_import[1]
    with pytest.raises(InvalidModelError, match="com.microsoft"):
        load_model(write(tmp_path / "m.onnx", m))


@pytest.mark.parametrize("opset", [5, 6, 24, 30])  # 7..10 are upgraded: tests/test_classic_zoo.py
def test_unsupported_opset(tmp_path: pathlib.Path, opset: int) -> None:
    with pytest.raises(UnsupportedError, match=f"opset {opset}"):
        load_model(write(tmp_path / "m.onnx", make_model(opset)))


@pytest.mark.parametrize("opset", [11, 23])
def test_supported_opset_bounds(tmp_path: pathlib.Path, opset: int) -> None:
    load_model(write(tmp_path / "m.onnx", make_model(opset)))


def _load_with_timeout(path: str, timeout: float = 5.0) -> BaseException | None:
    """Run load_model in a daemon thread so a blocking open() fails the test, not hangs it."""
    result: list[BaseException | None] = []

    def target() -> None:
        try:
            load_model(path)
            result.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            result.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"load_model({path!r}) blocked"
    return result[0]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_fifo_does_not_hang(tmp_path: pathlib.Path) -> None:
    fifo = tmp_path / "pipe.onnx"
    os.mkfifo(fifo)
    exc = _load_with_timeout(str(fifo))
    assert isinstance(exc, InvalidModelError) and "FIFO" in str(exc)


@pytest.mark.parametrize("device", ["/dev/null", "/dev/zero"])
def test_char_device(device: str) -> None:
    if not os.path.exists(device):
        pytest.skip(f"{device} missing")
    exc = _load_with_timeout(device)
    assert isinstance(exc, InvalidModelError) and "not a regular file" in str(exc)


def test_wrong_type() -> None:
    with pytest.raises(InvalidModelError):
        load_model(42)  # type: ignore[arg-type]


def test_external_data_missing(ext_model_path: pathlib.Path) -> None:
    (ext_model_path.parent / "weights.bin").unlink()
    with pytest.raises(InvalidModelError, match="weights.bin"):
        load_model(ext_model_path)


def test_external_data_truncated(ext_model_path: pathlib.Path) -> None:
    data = ext_model_path.parent / "weights.bin"
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(InvalidModelError, match="too short"):
        load_model(ext_model_path)


def test_external_data_outside_folder(ext_model_path: pathlib.Path) -> None:
    m = onnx.load(ext_model_path, load_external_data=False)
    for init in m.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                entry.value = "../weights.bin"
    with pytest.raises(InvalidModelError, match="outside"):
        load_model(write(ext_model_path, m))


# ----------------------------------------------------------------------------------- loading


def test_load_sources(model_path: pathlib.Path) -> None:
    from_path = load_model(str(model_path))
    from_proto = load_model(onnx.load(model_path))
    assert len(from_path.graph) == len(from_proto.graph) == 3
    assert load_model(from_path) is from_path


def test_external_data_stays_lazy(ext_model_path: pathlib.Path) -> None:
    model = load_model(ext_model_path)
    w = model.graph.initializers["W"].const_value
    assert isinstance(w, ir.ExternalTensor)
    assert w.raw is None  # nothing mapped yet


# ------------------------------------------------------------------------------------ saving


def test_round_trip_keeps_numbers(model_path: pathlib.Path, tmp_path: pathlib.Path) -> None:
    out = save_model(load_model(model_path), tmp_path / "out.onnx", source_path=model_path)
    assert out == tmp_path / "out.onnx"
    assert not (tmp_path / "out.onnx.data").exists()
    np.testing.assert_array_equal(run_ort(out), run_ort(model_path))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_external_round_trip(ext_model_path: pathlib.Path, tmp_path: pathlib.Path) -> None:
    expected = run_ort(ext_model_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = save_model(load_model(ext_model_path), out_dir / "pruned.onnx",
                     source_path=ext_model_path)
    assert (out_dir / "pruned.onnx.data").stat().st_size >= 16 * 32 * 4
    np.testing.assert_array_equal(run_ort(out), expected)
    # and once more from the saved copy
    again = save_model(load_model(out), out_dir / "again.onnx")
    assert (out_dir / "again.onnx.data").exists()
    np.testing.assert_array_equal(run_ort(again), expected)
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "again.onnx", "again.onnx.data", "pruned.onnx", "pruned.onnx.data"]


def test_force_external_and_inline(model_path: pathlib.Path, ext_model_path: pathlib.Path,
                                   tmp_path: pathlib.Path) -> None:
    ext = save_model(load_model(model_path), tmp_path / "e.onnx", external_data=True)
    assert (tmp_path / "e.onnx.data").exists()
    np.testing.assert_array_equal(run_ort(ext), run_ort(model_path))
    model = load_model(ext_model_path)
    inline = save_model(model, tmp_path / "i.onnx", external_data=False)
    assert not (tmp_path / "i.onnx.data").exists()
    np.testing.assert_array_equal(run_ort(inline), run_ort(ext_model_path))
    # the caller's model is left with its lazy tensors
    assert isinstance(model.graph.initializers["W"].const_value, ir.ExternalTensor)


def test_refuses_overwriting_source(model_path: pathlib.Path) -> None:
    before = model_path.read_bytes()
    with pytest.raises(OutputError, match="overwrite the input"):
        save_model(load_model(model_path), model_path, source_path=model_path)
    # also through another spelling of the same path
    other = model_path.parent / "." / model_path.name
    with pytest.raises(OutputError):
        save_model(load_model(model_path), other, source_path=str(model_path))
    assert model_path.read_bytes() == before


def test_refuses_overwriting_external_data_of_source(ext_model_path: pathlib.Path) -> None:
    model = load_model(ext_model_path)
    with pytest.raises(OutputError):
        save_model(model, ext_model_path.parent / "weights.bin")
    # an output whose <name>.data is the file the model reads from
    (ext_model_path.parent / "weights.bin").rename(ext_model_path.parent / "x.onnx.data")
    m = onnx.load(ext_model_path, load_external_data=False)
    for init in m.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                entry.value = "x.onnx.data"
    write(ext_model_path, m)
    with pytest.raises(OutputError, match="reads its weights"):
        save_model(load_model(ext_model_path), ext_model_path.parent / "x.onnx")


def test_in_place(model_path: pathlib.Path) -> None:
    expected = run_ort(model_path)
    out = save_model(load_model(model_path), model_path, source_path=model_path, in_place=True)
    assert out == model_path
    load_model(out)
    np.testing.assert_array_equal(run_ort(out), expected)


def test_in_place_external(tmp_path: pathlib.Path) -> None:
    """The lazy tensors read the very data file being replaced."""
    path = tmp_path / "m.onnx"
    save_model(ir.from_proto(make_model()), path, external_data=True)
    expected = run_ort(path)
    model = load_model(path)
    model.graph.initializers["W"].const_value.numpy()  # one tensor mapped, the other not
    save_model(model, path, source_path=path, in_place=True)
    np.testing.assert_array_equal(run_ort(path), expected)
    with pytest.raises(ValueError, match="invalidated"):
        model.graph.initializers["W"].const_value.numpy()
    np.testing.assert_array_equal(
        load_model(path).graph.initializers["W"].const_value.numpy(),
        onnx.numpy_helper.to_array(onnx.load(path).graph.initializer[0]))


def test_unwritable_targets(model_path: pathlib.Path, tmp_path: pathlib.Path) -> None:
    model = load_model(model_path)
    with pytest.raises(OutputError, match="does not exist"):
        save_model(model, tmp_path / "no" / "such" / "out.onnx")
    with pytest.raises(OutputError, match="not a folder"):
        save_model(model, model_path / "out.onnx")
    with pytest.raises(OutputError, match="directory"):
        save_model(model, tmp_path)


def test_unwritable_folder(model_path: pathlib.Path, tmp_path: pathlib.Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.access(locked, os.W_OK):
        pytest.skip("this user writes into a mode-0500 folder (root ignores the mode)")
    with pytest.raises(OutputError, match="not writable"):
        save_model(load_model(model_path), locked / "out.onnx")
    assert not any(locked.iterdir())


def test_unwritable_folder_is_refused_before_writing(
    model_path: pathlib.Path, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same refusal for every user (root included): the folder's access check says no."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if pathlib.Path(p) == locked else real_access(p, mode, **kw))
    with pytest.raises(OutputError, match="not writable"):
        save_model(load_model(model_path), locked / "out.onnx")
    assert not any(locked.iterdir())


def test_deterministic_bytes(model_path: pathlib.Path, ext_model_path: pathlib.Path,
                             tmp_path: pathlib.Path) -> None:
    a = save_model(load_model(model_path), tmp_path / "a.onnx")
    b = save_model(load_model(model_path), tmp_path / "b.onnx")
    assert a.read_bytes() == b.read_bytes()
    model = load_model(ext_model_path)
    e1 = save_model(model, tmp_path / "e.onnx")
    first = (e1.read_bytes(), (tmp_path / "e.onnx.data").read_bytes())
    e2 = save_model(model, tmp_path / "e.onnx")
    assert (e2.read_bytes(), (tmp_path / "e.onnx.data").read_bytes()) == first
    assert model_sha256(e1) == model_sha256(e2)


def test_sha256(model_path: pathlib.Path) -> None:
    import hashlib

    assert model_sha256(model_path) == hashlib.sha256(model_path.read_bytes()).hexdigest()


def test_default_output_path() -> None:
    assert default_output_path("dir/model.onnx") == pathlib.Path("dir/model.spa.onnx")
    assert default_output_path(pathlib.Path("/a/b.c.onnx")) == pathlib.Path("/a/b.c.spa.onnx")
    assert default_output_path("weights") == pathlib.Path("weights.spa.onnx")
