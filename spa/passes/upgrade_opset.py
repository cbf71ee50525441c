"""Upgrade default-domain opsets 7–10 on load, check the upgrade, and go back on save.

The classic model zoo (AlexNet, VGG, ResNet-50, Inception, DenseNet, ShuffleNet, SqueezeNet,
ZFNet — the ``light_*`` models in ``onnx``'s own test data) is written at opset 7–9. spa's
channel rules are written and tested for opsets ``11..23`` (``spa.io.SUPPORTED_OPSETS``), so
such a model is converted with ``onnx.version_converter`` when it is loaded.

Target: opset 13 (:data:`TARGET_OPSET`). It is inside the supported range and is the opset
most exporters wrote for years (torch's default for 1.x releases), so it is what the rules are
exercised on most; going further adds only adapters (Split/Squeeze/Reduce axes as inputs are
already at 13) with no gain for pruning. Measured on the nine ``light_*`` models: 9 → 11, 13
and 17 all convert and give bit-identical ONNX Runtime outputs.

The IR version is raised to the lowest one that carries the new opset (7 for opset 13): the
converter keeps the old one (3 for the zoo files), which declares an opset-13 model invalid.

- :func:`upgrade` (called from ``spa.io.load_model``) converts an ``ir.Model`` and records
  ``model.meta["spa.upgraded_from"]`` and a note (``spa.graph.add_note``);
- :func:`check_upgrade` runs the original and the upgraded model in ONNX Runtime and refuses
  an upgrade that changed the outputs (the oracle only proves pruning, not conversion);
- :func:`downgrade` converts a pruned model back to the input's opset (``--keep-opset``),
  or returns ``None`` (reason logged) where the converter cannot go back.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Mapping

import numpy as np
import onnx
import onnx.version_converter
import onnx_ir as ir

from spa.errors import UnsupportedError
from spa.graph import add_note

__all__ = ["TARGET_OPSET", "UPGRADABLE_OPSETS", "UPGRADED_FROM_KEY", "upgrade", "check_upgrade", "downgrade", "downgrade_or_reason"]

logger = logging.getLogger(__name__)

#: The default-domain opset models in ``UPGRADABLE_OPSETS`` are converted to (see module doc).
TARGET_OPSET = 13
#: Default-domain opsets upgraded on load (older ones are refused: the converter's adapters
#: below 7 are incomplete and no model spa was tested on uses them).
UPGRADABLE_OPSETS = range(7, 11)
#: ``model.meta`` key holding the original default-domain opset (an int) of an upgraded model.
UPGRADED_FROM_KEY = "spa.upgraded_from"

RTOL = 1e-4
ATOL = 1e-5

_DEFAULT_DOMAINS = ("", "ai.onnx")



def external_tensors(model: ir.Model) -> dict[str, ir.ExternalTensor]:
    """The model's lazy external weights by name (kept out of a conversion, see :func:`carry_over`)."""
    return {
        name: v.const_value
        for g in model.graphs()
        for name, v in g.initializers.items()
        if isinstance(v.const_value, ir.ExternalTensor)
    }


def carry_over(model: ir.Model, converted: ir.Model, external: dict[str, ir.ExternalTensor]) -> None:
    """Give ``converted`` (a version-converted copy of ``model``) back the very same external
    tensor objects where the converter left them unchanged, and ``model``'s metadata."""
    for g in converted.graphs():
        for name, v in g.initializers.items():
            tensor = external.get(name)
            if tensor is not None and v.const_value is not None and v.const_value.shape == tensor.shape and v.const_value.dtype == tensor.dtype:
                v.const_value = tensor
    for key, value in model.meta.items():
        converted.meta[key] = list(value) if isinstance(value, list) else value


def default_opset(model: ir.Model | onnx.ModelProto) -> int | None:
    if isinstance(model, onnx.ModelProto):
        opsets = {o.domain: o.version for o in model.opset_import}
    else:
        opsets = dict(model.opset_imports)
    for domain in _DEFAULT_DOMAINS:
        if domain in opsets:
            return int(opsets[domain])
    return None


def upgrade(model: ir.Model, *, where: str = "model", target: int = TARGET_OPSET) -> ir.Model:
    """A copy of ``model`` converted to default-domain opset ``target`` (see module docstring).

    Lazy external weights are not read: they are handed to the converter as external
    references and the very same tensor objects are put back afterwards. ``model.meta`` is
    carried over, with ``spa.upgraded_from`` and a note added.

    Raises:
        UnsupportedError: the converter cannot convert an op (one line naming it).
    """
    old = default_opset(model)
    if old is None or old >= target:
        return model
    # The converter works on protos. External tensors serialize as references (no bytes);
    # remember them by name to re-attach the lazy originals.
    external = external_tensors(model)
    proto = ir.to_proto(model)
    try:
        converted = onnx.version_converter.convert_version(proto, target)
    except Exception as exc:  # noqa: BLE001 - the converter raises RuntimeError/InferenceError …
        raise UnsupportedError(f"{where}: {_converter_failure(exc, proto, old, target)}") from exc
    del proto
    min_ir = onnx.helper.find_min_ir_version_for(list(converted.opset_import), ignore_unknown=True)
    converted.ir_version = max(converted.ir_version, min_ir)
    try:
        upgraded = ir.from_proto(converted)
    except Exception as exc:  # noqa: BLE001
        raise UnsupportedError(f"{where}: the opset {old} → {target} upgrade gave an unreadable model ({_one_line(exc)})") from exc
    del converted
    carry_over(model, upgraded, external)
    upgraded.meta[UPGRADED_FROM_KEY] = old
    add_note(upgraded, f"upgraded from default-domain opset {old} to {target} with onnx.version_converter "
                       f"(spa's channel rules cover opsets 11..23)")
    logger.info("%s: upgraded opset %d → %d", where, old, target)
    return upgraded


def _converter_failure(exc: BaseException, proto: onnx.ModelProto, old: int, target: int) -> str:
    """One line naming the op the converter failed on (its messages name it in several ways)."""
    text = _one_line(exc)
    ops = {n.op_type for n in proto.graph.node}
    op = None
    m = re.search(r"(?:op_type:|No Previous Version of |No Adapter (?:From|For) [^ ]* ?(?:for )?|Op )\s*([A-Za-z_]\w*)", text)
    if m and m.group(1) in ops:
        op = m.group(1)
    else:
        op = next((o for o in sorted(ops, key=len, reverse=True) if re.search(rf"\b{re.escape(o)}\b", text)), None)
    short = re.sub(r"^.*?(?:Assertion `false` failed: |\] )", "", text)
    if op:
        return f"the opset {old} → {target} upgrade cannot convert op {op} ({short})"
    return f"the opset {old} → {target} upgrade failed ({short})"


def check_upgrade(
    original: onnx.ModelProto | str | os.PathLike[str],
    upgraded_path: str | os.PathLike[str],
    feeds: Mapping[str, np.ndarray],
) -> float:
    """Run the original and the upgraded model in ONNX Runtime (CPU) on ``feeds``.

    Returns the largest absolute output difference. Outputs are matched by name (an upgrade
    never renames them) and compared like the oracle does: ``|u - o| <= atol + rtol·max|o|``
    with rtol 1e-4 and atol 1e-5. Feeds the original does not take (none, normally) are left
    out; the original's initializers-as-inputs keep their defaults.

    Raises:
        UnsupportedError: the upgrade changed an output's shape or values.
    """
    from spa import verify  # late: verify imports planning, the loading path must not

    tmp = None
    try:
        if isinstance(original, onnx.ModelProto):
            fd, tmp = tempfile.mkstemp(suffix=".onnx", prefix="spa-original-")
            os.close(fd)
            onnx.save_model(original, tmp)
            original_path = tmp
        else:
            original_path = os.fspath(original)
        sess_o = verify.session(original_path)
        sess_u = verify.session(upgraded_path)
        names_o = [o.name for o in sess_o.get_outputs()]
        names_u = [o.name for o in sess_u.get_outputs()]
        takes = {i.name for i in sess_o.get_inputs()}
        out_o = dict(zip(names_o, verify.run(sess_o, {k: v for k, v in feeds.items() if k in takes})))
        takes_u = {i.name for i in sess_u.get_inputs()}
        out_u = dict(zip(names_u, verify.run(sess_u, {k: v for k, v in feeds.items() if k in takes_u})))
    finally:
        if tmp is not None:
            os.unlink(tmp)
    worst = 0.0
    for name, a in out_o.items():
        b = out_u.get(name)
        if b is None:
            raise UnsupportedError(f"the opset upgrade changed the outputs: output '{name}' is missing")
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:
            raise UnsupportedError(f"the opset upgrade changed the outputs: '{name}' has shape {list(b.shape)}, was {list(a.shape)}")
        if a.size == 0:
            continue
        if a.dtype.kind in "fc" or b.dtype.kind in "fc":
            diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
            diff = np.where(np.isnan(a) & np.isnan(b), 0.0, diff)
            d = float(np.nan_to_num(diff, nan=np.inf).max())
            scale = float(np.nan_to_num(np.abs(a.astype(np.float64)), nan=0.0, posinf=0.0, neginf=0.0).max())
        else:
            d = 0.0 if np.array_equal(a, b) else float("inf")
            scale = 0.0
        worst = max(worst, d)
        if d > ATOL + RTOL * scale:
            raise UnsupportedError(
                f"the opset upgrade changed the outputs: '{name}' differs by {d:.3g} "
                f"(allowed {ATOL + RTOL * scale:.3g}); the model cannot be pruned at its opset"
            )
    return worst


def downgrade(proto: onnx.ModelProto, opset: int) -> onnx.ModelProto | None:
    """``proto`` converted back to default-domain ``opset`` (``--keep-opset``), or ``None``.

    onnx's converter is tried first. It has no way back for most ops whose only change since
    ``opset`` is a wider type list (Relu, Mul, Add … at 13 gained bfloat16), so where it fails
    the model is *relabelled* instead (:func:`_relabel`): inputs that later opsets added are
    turned back into the attributes they were (Unsqueeze/Squeeze/Reduce axes, Split sizes,
    Dropout ratio, Clip bounds), negative axes are made positive below opset 11, Softmax is
    accepted only over the last axis (where opset 13 changed nothing), and the result must
    pass the ONNX checker with strict shape inference at ``opset``.

    ``None`` (reason logged as a warning) where neither works; the caller then writes the
    upgraded opset. The caller should still compare outputs (``check_upgrade(result_path,
    pruned_path, feeds)``): the checker proves the result valid, not equivalent.
    """
    back, why = downgrade_or_reason(proto, opset)
    if back is None:
        logger.warning("cannot write opset %d (keeping opset %s): %s", opset, default_opset(proto), why)
    return back


def downgrade_or_reason(proto: onnx.ModelProto, opset: int) -> tuple[onnx.ModelProto | None, str | None]:
    """:func:`downgrade`, with the reason instead of a log line: ``(model, None)`` or ``(None, why)``."""
    current = default_opset(proto)
    if current is None or current == opset:
        return proto, None
    try:
        back = onnx.version_converter.convert_version(proto, opset)
        onnx.checker.check_model(back, full_check=True)
        return back, None
    except Exception as exc:  # noqa: BLE001
        first = _converter_failure(exc, proto, current, opset)
    try:
        return _relabel(proto, opset), None
    except _CannotDowngrade as exc:
        return None, f"{first}; {exc}"


class _CannotDowngrade(Exception):
    pass


#: Ops whose ``axes`` input (opset 13, Reduce* 18) was an attribute before.
_AXES_INPUT = {"Unsqueeze": 13, "Squeeze": 13, "ReduceSum": 13, "ReduceMean": 18, "ReduceMax": 18, "ReduceMin": 18,
               "ReduceProd": 18, "ReduceL1": 18, "ReduceL2": 18, "ReduceLogSum": 18, "ReduceLogSumExp": 18,
               "ReduceSumSquare": 18}
#: Softmax-like ops whose ``axis`` meant "flatten from here" before opset 13.
_COERCED_AXIS = ("Softmax", "LogSoftmax", "Hardmax")


def _relabel(proto: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """See :func:`downgrade`. Main graph only: a model with subgraphs is refused."""
    current = default_opset(proto)
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    graph = model.graph
    inferred = onnx.shape_inference.infer_shapes(_shapes_only(model))
    ranks = {vi.name: len(vi.type.tensor_type.shape.dim)
             for vi in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)
             if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape")}
    for t in graph.initializer:
        ranks[t.name] = len(t.dims)
    consts = {t.name: t for t in graph.initializer}
    input_names = {i.name for i in graph.input}

    def const(name: str) -> np.ndarray:
        if name not in consts or name in input_names:
            raise _CannotDowngrade(f"'{name}' is not a constant")
        return onnx.numpy_helper.to_array(consts[name])

    for node in graph.node:
        if node.domain not in _DEFAULT_DOMAINS:
            continue
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise _CannotDowngrade(f"{node.op_type} '{node.name}' has a subgraph")
        op = node.op_type
        try:
            onnx.defs.get_schema(op, opset)
        except onnx.defs.SchemaError:
            raise _CannotDowngrade(f"op {op} does not exist at opset {opset}") from None
        if op in _AXES_INPUT and opset < _AXES_INPUT[op] <= current and len(node.input) > 1:
            if node.input[1]:
                node.attribute.append(onnx.helper.make_attribute("axes", [int(a) for a in const(node.input[1]).reshape(-1)]))
            del node.input[1:]
        elif op == "Split" and opset < 13 <= current and len(node.input) > 1:
            if node.input[1]:
                node.attribute.append(onnx.helper.make_attribute("split", [int(a) for a in const(node.input[1]).reshape(-1)]))
            del node.input[1:]
        elif op == "Dropout" and opset < 12 <= current:
            if len(node.input) > 2 and node.input[2] and bool(const(node.input[2]).reshape(-1)[0]):
                raise _CannotDowngrade(f"Dropout '{node.name}' is in training mode")
            ratio = float(const(node.input[1]).reshape(-1)[0]) if len(node.input) > 1 and node.input[1] else 0.5
            del node.input[1:]
            _set_attr(node, "ratio", ratio)
            _drop_attr(node, "seed")
        elif op == "Clip" and opset < 11 <= current:
            for k, attr in ((1, "min"), (2, "max")):
                if len(node.input) > k and node.input[k]:
                    _set_attr(node, attr, float(const(node.input[k]).reshape(-1)[0]))
            del node.input[1:]
        elif op in _COERCED_AXIS and opset < 13 <= current:
            rank = ranks.get(node.input[0])
            axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
            if rank is None or axis % rank != rank - 1:
                raise _CannotDowngrade(f"{op} '{node.name}' is not over the last axis (its meaning changed at opset 13)")
        if opset < 11:
            _positive_axes(node, ranks)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    for o in model.opset_import:
        if o.domain in _DEFAULT_DOMAINS:
            o.version = opset
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:  # noqa: BLE001
        raise _CannotDowngrade(f"the relabelled model fails the ONNX checker ({_one_line(exc)})") from exc
    return model


def _shapes_only(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph with its large initializers as typed inputs (shape inference needs no bytes)."""
    light = onnx.ModelProto()
    light.CopyFrom(model)
    g = light.graph
    keep = []
    for t in g.initializer:
        if int(np.prod(t.dims)) > 64:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            keep.append(t)
    del g.initializer[:]
    g.initializer.extend(keep)
    return light


def _set_attr(node: onnx.NodeProto, name: str, value) -> None:
    _drop_attr(node, name)
    node.attribute.append(onnx.helper.make_attribute(name, value))


def _drop_attr(node: onnx.NodeProto, name: str) -> None:
    kept = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend(kept)


def _positive_axes(node: onnx.NodeProto, ranks: dict[str, int]) -> None:
    """Negative ``axis``/``axes`` attributes became legal at opset 11: make them positive."""
    for attr in node.attribute:
        if attr.name not in ("axis", "axes"):
            continue
        values = [attr.i] if attr.type == onnx.AttributeProto.INT else list(attr.ints)
        if all(v >= 0 for v in values):
            continue
        # Unsqueeze's axes count in the output's rank; everything else in the input's.
        ref = node.output[0] if node.op_type == "Unsqueeze" else node.input[0]
        rank = ranks.get(ref)
        if rank is None:
            raise _CannotDowngrade(f"{node.op_type} '{node.name}' has a negative axis on a tensor of unknown rank")
        fixed = [v % rank for v in values]
        if attr.type == onnx.AttributeProto.INT:
            attr.i = fixed[0]
        else:
            del attr.ints[:]
            attr.ints.extend(fixed)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
