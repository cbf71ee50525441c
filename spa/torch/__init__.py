"""The way back to PyTorch: apply a spa plan to the ``nn.Module`` the ONNX model came from.

``apply_plan(module, plan)`` slices the module's parameters and buffers in place, as the plan
sliced the ONNX initializers, and fixes the layers' attributes (``layers``: Conv in/out
channels and groups, Linear features, BatchNorm/GroupNorm/LayerNorm sizes, LSTM/GRU/RNN
sizes, the head counts of hand-written attention). A stock module that can't hold the pruned
shape is *replaced*, and the result says so: ``nn.MultiheadAttention`` that lost heads by
:class:`PrunedMultiheadAttention`, an ``nn.LSTM`` whose layers differ by :class:`PrunedLSTM`,
an ``nn.GRU``/``nn.RNN`` whose layers differ by :class:`PrunedRNN`. The user then fine-tunes
and re-exports.

Mapping ONNX initializers to ``state_dict`` keys (``match``). Exporters rename and transform
weights: TorchScript folds BatchNorm into the Conv before it (``onnx::Conv_30``) and stores
Linear weights transposed for MatMul (``onnx::MatMul_166``); the dynamo exporter keeps
``c1.weight`` as the name of the *folded* weight and names the rest ``val_N``; both reorder
LSTM gates (ONNX i,o,f,c; torch i,f,g,o) and GRU gates (ONNX z,r,h; torch r,z,n) and
concatenate the two biases. So names are never trusted alone: every planned tensor is matched
by value against the state_dict — against the ONNX model's tensors with ``model`` (the ONNX
model the plan was made for), else against the value fingerprint the plan carries for it
(``fingerprint``: a seeded 8×8 sample and the L2 norm) — in this order:

1. the weight of an ONNX Conv that no BatchNormalization reads: the torch Conv's weight scaled
   per output channel by the γ/√(var+ε) of the BatchNorm that reads it in torch (found by one
   forward pass with hooks) — BN folding; it maps to the Conv weight and that BatchNorm, and
   the Conv's bias input to the Conv bias (if any) and the same BatchNorm;
2. a parameter of an unfolded ONNX BatchNormalization: named through the Conv that feeds it;
3. equal to a state_dict tensor, or to one with its axes permuted (Transpose, MatMul weights);
4. equal to an LSTM's, GRU's or RNN's W, R or B in ONNX gate order;
5. every element equal (the exporter's zero initial LSTM state, a filled constant) and no
   tensor above: an exporter constant, recognised and skipped.

Anything else raises :class:`~spa.errors.UnsupportedError` naming every tensor it could not
map, and why; so does a fingerprint that matches several different tensors. A plan made
before fingerprints existed, without ``model``, is matched by names: each planned tensor must
be a state_dict key of the planned shape. With ``model``, the sliced module is then checked
against the ONNX model pruned by the same plan in ONNX Runtime; without it, it is run on the
plan's recorded input shapes and must keep its output shapes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from spa.autodiff import require_torch
from spa.errors import UnsupportedError
from spa.planning import Plan
from spa.torch.fingerprint import Fingerprint
from spa.torch.layers import PrunedLSTM, PrunedMultiheadAttention, PrunedRNN, fix_attention_attributes, fix_module, submodule
from spa.torch.match import Matched, Target, map_initializers, plan_feeds

__all__ = ["apply_plan", "TorchMapping", "PrunedMultiheadAttention", "PrunedLSTM", "PrunedRNN", "map_initializers", "Matched", "Target", "Fingerprint"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class TorchMapping:
    """What ``apply_plan`` did: which keys each planned tensor became, what it skipped."""

    mapped: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    constants: list[str] = dataclasses.field(default_factory=list)
    sliced: dict[str, list[int]] = dataclasses.field(default_factory=dict)  # key → new shape
    modules: dict[str, str] = dataclasses.field(default_factory=dict)  # module → what changed
    replaced: dict[str, str] = dataclasses.field(default_factory=dict)  # module → why replaced
    #: Max |torch − ORT| against the ONNX model pruned by the plan (``check``), or None.
    max_abs_diff: float | None = None
    #: What the planned tensors were matched against: "model" (the ONNX file, whole tensors),
    #: "fingerprints" (the plan's own, no file) or "names" (an old plan without fingerprints).
    matched_by: str = "model"
    #: What ``apply_plan`` checked afterwards, in words.
    checked: str = "not checked"

    def summary(self) -> str:
        how = {"model": "the ONNX model's tensors", "fingerprints": "the plan's fingerprints", "names": "names"}[self.matched_by]
        parts = [f"{len(self.sliced)} tensors sliced in {len(self.modules)} modules (matched by {how}; {self.checked})"]
        if self.replaced:
            parts.append("replaced: " + "; ".join(f"{m} ({why})" for m, why in self.replaced.items()))
        if self.constants:
            parts.append(f"exporter constants skipped: {', '.join(self.constants)}")
        return ", ".join(parts)


# -- applying a plan ----------------------------------------------------------------------------


def _plan(plan: Plan | Mapping[str, Any] | str | os.PathLike) -> Plan:
    if isinstance(plan, Plan):
        return plan
    if isinstance(plan, Mapping):
        return Plan.from_json(plan)
    return Plan.load(plan)


def apply_plan(module, plan: Plan | Mapping[str, Any] | str | os.PathLike, *, model: Any = None, check: bool = True) -> TorchMapping:
    """Slice ``module`` in place as ``plan`` slices the ONNX model. Returns what was mapped,
    sliced, skipped and replaced.

    The plan alone is enough: each planned tensor carries a value fingerprint
    (``spa.torch.fingerprint``) that finds it in the state_dict however the exporter renamed
    or folded it. ``model`` (that ONNX model: a path, ``onnx.ModelProto`` or
    ``onnx_ir.Model``) compares whole tensors instead, and with ``check`` (the default) the
    sliced module is then run on seeded inputs and compared with the ONNX model pruned by
    the same plan (``spa.apply``, ONNX Runtime): a module whose own code computes sizes the
    plan changed (ShuffleNet's split into equal halves, a hard-coded reshape) is refused
    here rather than found later. Without ``model`` there is no such check, and the
    summary says so.
    """
    torch = require_torch("spa.torch.apply_plan")
    p = _plan(plan)
    if model is not None and not isinstance(model, (str, os.PathLike)):
        import onnx_ir as ir

        if isinstance(model, ir.Model):
            model = ir.to_proto(model)
    edits = {t.name: t for t in p.tensors}
    before = feeds = None
    if model is None and check and p.inputs:  # no ONNX model to compare with: at least the shapes, before and after
        feeds = plan_feeds(p.inputs)
        before = _output_shapes(module, feeds)
    fingerprints = {} if model is not None else _fingerprints(p)
    match = map_initializers(module, sorted(edits), model, fingerprints=fingerprints, inputs=p.inputs,
                             shapes={n: e.shape for n, e in edits.items()})
    mapped, constants, failed = match.mapped, match.constants, match.failed
    if failed:
        hint = "" if model is not None or fingerprints else " (the plan has no fingerprints: pass model=the ONNX file it was made for)"
        raise UnsupportedError(f"cannot map {len(failed)} planned tensors to the module's state_dict: "
                               f"{'; '.join(f'{n} ({why})' for n, why in failed.items())}{hint}")
    # torch key → {torch axis: kept indices}
    wanted: dict[str, dict[int, list[int]]] = {}
    for name, targets in mapped.items():
        edit = edits[name]
        for t in targets:
            for axis, kept in edit.kept.items():
                if axis not in t.axes:
                    continue  # the target does not extend along this axis (a BatchNorm of a folded Conv's IN axis)
                taxis, index = t.axes[axis]
                k = sorted(int(index[i]) for i in kept if index[i] >= 0)
                prev = wanted.setdefault(t.key, {}).get(taxis)
                if prev is not None and prev != k:
                    raise UnsupportedError(f"'{t.key}' axis {taxis}: two planned tensors ask for different channels (one is '{name}')")
                wanted[t.key][taxis] = k
    result = TorchMapping(mapped={n: [t.key for t in ts] for n, ts in mapped.items()}, constants=constants,
                          matched_by="model" if model is not None else "fingerprints" if fingerprints else "names")
    sd = module.state_dict()
    touched: dict[str, dict[str, Any]] = {}
    with torch.no_grad():
        for key, axes in wanted.items():
            old = sd[key]
            new = old
            for axis, kept in axes.items():
                if len(kept) != old.shape[axis]:
                    new = new.index_select(axis, torch.tensor(kept, dtype=torch.long))
            if new is old:
                continue
            mpath, _, attr_name = key.rpartition(".")
            owner = submodule(module, mpath)
            touched.setdefault(mpath, {})[attr_name] = old.shape
            current = getattr(owner, attr_name)
            if isinstance(current, torch.nn.Parameter):
                setattr(owner, attr_name, torch.nn.Parameter(new.clone(), requires_grad=current.requires_grad))
            else:
                setattr(owner, attr_name, new.clone())
            result.sliced[key] = list(new.shape)
    for mpath, old_shapes in touched.items():
        fix_module(module, mpath, old_shapes, result, wanted)
    fix_attention_attributes(module, touched, result)
    if model is not None and check:
        result.max_abs_diff = _check_against_onnx(module, model, p)
        result.checked = f"checked against the ONNX model pruned by the plan in ONNX Runtime, max |diff| {result.max_abs_diff:.3g}"
    elif before is not None:
        _check_shapes(module, feeds, before)
        result.checked = "ran on the plan's input shapes and kept its output shapes; not compared with ONNX Runtime (pass model=)"
    elif check:
        result.checked = ("not checked: " + ("the module did not run on the plan's input shapes before slicing" if p.inputs
                                             else "the plan records no input shapes") + " (pass model= for the ONNX Runtime check)")
    logger.info("spa.torch.apply_plan: %s", result.summary())
    return result


def _fingerprints(plan: Plan) -> dict[str, Fingerprint]:
    return {t.name: Fingerprint.from_json(t.fingerprint, t.shape) for t in plan.tensors if t.fingerprint is not None}


def _forward(module, feeds: Mapping[str, np.ndarray]):
    """The module's outputs on ``feeds`` (eval mode, no grad), as a flat list of tensors."""
    torch = require_torch()
    was_training = module.training
    try:
        module.eval()
        with torch.no_grad():
            got = module(*[torch.from_numpy(v) for v in feeds.values()])
    finally:
        module.train(was_training)
    return [got] if isinstance(got, torch.Tensor) else [t for t in torch.utils._pytree.tree_leaves(got) if isinstance(t, torch.Tensor)]


def _forward_sliced(module, feeds: Mapping[str, np.ndarray]):
    try:
        return _forward(module, feeds)
    except Exception as e:  # noqa: BLE001 - a user module: say what happened in one line
        raise UnsupportedError(f"the sliced module does not run ({type(e).__name__}: {str(e).splitlines()[0]}): its forward "
                               "computes a size from its own code that the plan changed (e.g. a split into equal halves)") from e


def _output_shapes(module, feeds: Mapping[str, np.ndarray]) -> list[list[int]] | None:
    """Output shapes before slicing; None when the module does not take the ONNX inputs."""
    try:
        return [list(t.shape) for t in _forward(module, feeds)]
    except Exception:  # noqa: BLE001 - its forward takes other arguments than the export's inputs
        logger.debug("spa.torch: the module does not run on the plan's inputs; no shape check")
        return None


def _check_shapes(module, feeds: Mapping[str, np.ndarray], before: list[list[int]]) -> None:
    """Without the ONNX model: the sliced module must run and keep its output shapes (pruning
    never changes a graph output's shape)."""
    after = [list(t.shape) for t in _forward_sliced(module, feeds)]
    if after != before:
        raise UnsupportedError(f"the sliced module's outputs have shapes {after}, {before} before slicing: "
                               "its forward depends on sizes the plan changed")


def _check_against_onnx(module, model: Any, plan: Plan) -> float:
    """Max |torch − ONNX Runtime| of the sliced module against the ONNX model pruned by
    ``plan``, on seeded inputs; refuses when the module fails or computes something else."""
    import onnx
    import onnx_ir as ir
    import onnxruntime as ort

    from spa.pipeline import apply as spa_apply

    source = onnx.load(os.fspath(model)) if isinstance(model, (str, os.PathLike)) else model
    plan = dataclasses.replace(plan, model_sha256=None)  # the file may be loaded from memory here
    pruned = ir.to_proto(spa_apply(source, plan, verify="none", benchmark=False).model)
    sess = ort.InferenceSession(pruned.SerializeToString(), providers=["CPUExecutionProvider"])
    from spa.inputs import make_feeds

    feeds = make_feeds(ir.from_proto(pruned), None, seed=0)
    want = sess.run(None, feeds)
    flat = _forward_sliced(module, feeds)
    diff = 0.0
    for w, g in zip(want, flat):
        g = g.detach().cpu().numpy()
        if g.shape != w.shape:
            raise UnsupportedError(f"the sliced module's output has shape {list(g.shape)}, the pruned ONNX model's {list(w.shape)}")
        scale = max(1.0, float(np.abs(w).max()) if w.size else 1.0)
        d = float(np.abs(g.astype(np.float64) - w).max()) if w.size else 0.0
        if d > 1e-4 * scale:
            raise UnsupportedError(f"the sliced module computes something else than the ONNX model pruned by the plan "
                                   f"(max |diff| {d:.3g}): its forward depends on sizes the plan changed")
        diff = max(diff, d)
    return diff
