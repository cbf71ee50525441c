"""Tiny graphs for the rule tests, and the one assertion they all share.

``model(text, **inits)`` parses a graph written in ONNX text syntax and attaches seeded
initializers; ``prune_and_check`` prunes it through the whole pipeline and asserts the
mask-equivalence oracle (ORT numbers, never hand-copied expectations), output shapes, and
that the named weights really lost channels. ``codes``/``group_codes`` read the analysis's
block codes (never the prose).
"""

from __future__ import annotations

import pathlib
import tempfile
from collections.abc import Iterable, Mapping

import numpy as np
import onnx
import onnx.numpy_helper
import onnx.parser
import onnx_ir as ir

import spa
from spa import verify
from spa.rules.base import BlockCode, Dim

__all__ = [
    "header",
    "model",
    "prune_and_check",
    "pruned_init",
    "node_of",
    "const_input",
    "kept_of",
    "codes",
    "group_codes",
    "group_of",
]

IR_VERSION = 10


def header(opset: int = 17, *extra: str) -> str:
    """The ``<ir_version, opset_import>`` line of a model in text syntax."""
    imports = ", ".join([f'"" : {opset}', *extra])
    return f"<ir_version: {IR_VERSION}, opset_import: [{imports}]>"


InitSpec = tuple[int, ...] | list[int] | np.ndarray


def model(text: str, *, opset: int = 17, seed: int = 0, check: bool = True, **inits: InitSpec) -> onnx.ModelProto:
    """Parse a graph (``text`` without header, or with one) and add initializers.

    An initializer given as a shape (tuple) is seeded standard-normal float32; an array is
    used as is (int64 arrays for shape/axes constants, positive floats for BN variances …).
    ``check=False`` skips the ONNX checker (it refuses deprecated ops such as
    GroupNormalization-18 that ONNX Runtime still runs).
    """
    if not text.lstrip().startswith("<"):
        text = header(opset) + "\n" + text
    proto = onnx.parser.parse_model(text)
    rng = np.random.default_rng(seed)
    for name, spec in inits.items():
        if isinstance(spec, np.ndarray):
            arr = spec
        else:
            arr = rng.standard_normal(tuple(spec)).astype(np.float32)
        proto.graph.initializer.append(onnx.numpy_helper.from_array(arr, name))
    if check:
        onnx.checker.check_model(proto)
    return proto


def _io_types(proto: onnx.ModelProto) -> list[tuple[str, int, list]]:
    out = []
    for v in proto.graph.output:
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim]
        out.append((v.name, t.elem_type, dims))
    return out


def prune_and_check(
    proto: onnx.ModelProto,
    ratio: float = 0.5,
    *,
    sliced: Mapping[str, int | Iterable[int]] | None = None,
    kept: Mapping[str, int | Iterable[int]] | None = None,
    own_oracle: bool = False,
    **kw,
) -> spa.PruneResult:
    """Prune through the whole pipeline and assert it was exact and did something.

    - the mask-equivalence oracle ran, passed and was asserted (no inexact group);
    - at least one group lost channels;
    - the pruned model's outputs have the original's names, dtypes and shapes;
    - every ``sliced[name]`` axis of that initializer shrank;
    - every ``kept[name]`` axis of that initializer kept its size.

    ``own_oracle=True`` runs the pipeline without its verification and applies the same
    mask-equivalence oracle here (for models the ONNX checker refuses but ORT runs).
    """
    if own_oracle:
        res = spa.prune(proto, ratio=ratio, benchmark=False, verify="none", **kw)
        _mask_oracle(proto, res)
    else:
        res = spa.prune(proto, ratio=ratio, benchmark=False, **kw)
        oracle = res.report.oracle
        assert oracle is not None, "the oracle did not run"
        assert oracle["passed"] and oracle["asserted"], oracle
    assert res.report.groups_pruned >= 1, res.plan.dumps()
    pruned = ir.to_proto(res.model)
    assert _io_types(pruned) == _io_types(proto)
    before = {t.name: list(t.dims) for t in proto.graph.initializer}
    for name, axes in (sliced or {}).items():
        after = list(pruned_init(res, name).shape)
        for ax in [axes] if isinstance(axes, int) else axes:
            assert after[ax] < before[name][ax], f"{name} axis {ax}: {before[name]} -> {after}"
    for name, axes in (kept or {}).items():
        after = list(pruned_init(res, name).shape)
        for ax in [axes] if isinstance(axes, int) else axes:
            assert after[ax] == before[name][ax], f"{name} axis {ax}: {before[name]} -> {after}"
    return res


def _mask_oracle(proto: onnx.ModelProto, res: spa.PruneResult) -> None:
    """The pipeline's oracle, run here: masked original vs pruned model in ORT."""
    originals = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    masked = onnx.ModelProto()
    masked.CopyFrom(proto)
    arrays = verify.masked_weights(res.plan, originals.__getitem__)
    for t in masked.graph.initializer:
        if t.name in arrays:
            t.CopyFrom(onnx.numpy_helper.from_array(arrays[t.name], t.name))
    with tempfile.TemporaryDirectory() as d:
        masked_path, pruned_path = pathlib.Path(d, "masked.onnx"), pathlib.Path(d, "pruned.onnx")
        onnx.save(masked, masked_path)
        ir.save(res.model, pruned_path)
        feeds = verify.make_inputs(verify.session(masked_path))
        result = verify.run_oracle(masked_path, pruned_path, feeds)
    assert result.passed, result


def pruned_init(res: spa.PruneResult, name: str) -> np.ndarray:
    """An initializer of the pruned model, as numpy."""
    return res.model.graph.initializers[name].const_value.numpy()


def node_of(res_or_model: spa.PruneResult | ir.Model, output: str) -> ir.Node:
    """The node producing value ``output`` (nodes in text syntax have no names of their own)."""
    m = res_or_model.model if isinstance(res_or_model, spa.PruneResult) else res_or_model
    for node in m.graph:
        if any(v.name == output for v in node.outputs):
            return node
    raise KeyError(output)


def const_input(res: spa.PruneResult, output: str, index: int) -> list[int]:
    """Constant input ``index`` of the node producing ``output``, as a list."""
    v = node_of(res, output).inputs[index]
    return [int(x) for x in v.const_value.numpy().reshape(-1)]


def kept_of(res: spa.PruneResult, name: str, axis: int) -> list[int] | None:
    """The plan's kept indices of one initializer axis (None if the plan leaves it)."""
    for t in res.plan.tensors:
        if t.name == name:
            return t.kept.get(axis)
    return None


def codes(proto: onnx.ModelProto) -> set[BlockCode]:
    """Block codes of every channel group (groups with a weighted source)."""
    cg = spa.analyze(proto).channels
    return {r.code for g in cg.candidates for r in g.reasons}


def group_of(proto: onnx.ModelProto, value: str, axis: int):
    return spa.analyze(proto).channels.group_of(Dim(value, axis))


def group_codes(proto: onnx.ModelProto, value: str, axis: int) -> set[BlockCode]:
    """Block codes of the group holding ``value[axis]`` (empty set when it is free)."""
    g = group_of(proto, value, axis)
    assert g is not None, f"{value}[{axis}] is in no group"
    return {r.code for r in g.reasons}
