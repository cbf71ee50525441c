"""Matching ONNX initializers to ``state_dict`` keys (``spa.torch``'s docstring lists the rules).

Each planned ONNX tensor becomes a list of :class:`Target` records: a state_dict key and, per ONNX
axis, the torch axis and the map from ONNX index to torch index (−1: the index belongs to
another target, as the two halves of an LSTM bias do).

The rules compare candidates built from the module with a :data:`Probe` of each ONNX tensor:
the tensor itself (``model=``, compared whole) or the plan's :class:`Fingerprint` of it (no
file). Both answer the same questions, so the two ways map alike.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import weakref
from collections.abc import Mapping
from typing import Any

import numpy as np

from spa.autodiff import require_torch
from spa.torch.fingerprint import Fingerprint, graph_facts

__all__ = ["Target", "Matched", "map_initializers", "plan_feeds"]

logger = logging.getLogger(__name__)

#: Per recurrent module: ONNX gate k is torch gate GATES[k]. LSTM: ONNX i, o, f, c; torch
#: i, f, g, o. GRU: ONNX z, r, h; torch r, z, n. RNN: one gate.
_ONNX_TO_TORCH_GATE = {"LSTM": (0, 3, 1, 2), "GRU": (1, 0, 2), "RNN": (0,)}


@dataclasses.dataclass
class Target:
    """One state_dict tensor an ONNX tensor maps to: ONNX axis → (torch axis, index map)."""

    key: str
    axes: dict[int, tuple[int, np.ndarray]]  # index map: ONNX index → torch index, −1: not this tensor


class _Exact:
    """A planned ONNX tensor read from the model (``model=``): compared whole."""

    exact = True

    def __init__(self, value: np.ndarray, conv=None, batchnorm=None):
        self.value = value
        self.shape = tuple(value.shape)
        self.conv, self.batchnorm = conv, batchnorm

    def matches(self, cand: np.ndarray) -> bool:
        return _close(self.value, cand)

    @property
    def constant(self) -> bool:
        a = self.value
        return bool(a.size and np.all(a == a.reshape(-1)[0]))


#: What the rules read of one ONNX tensor: ``shape``, ``matches(candidate)``, ``constant``,
#: ``conv`` (bias name, BatchNormalization reads it) and ``batchnorm`` (index, Conv weight).
Probe = _Exact | Fingerprint


@dataclasses.dataclass
class _OnnxSide:
    """What the mapping knows of the ONNX model: one probe per tensor (the names plans use),
    and seeded inputs for the forward pass that pairs Conv and BatchNorm modules."""

    probes: dict[str, Probe]
    feeds: dict[str, np.ndarray]


def _onnx_side(model: Any) -> _OnnxSide:
    from spa.graph import all_initializers
    from spa.inputs import make_feeds, resolve_input_shapes
    from spa.passes.canonicalize import CanonicalizePass
    from spa.pipeline import load

    canonical, _, _ = load(model)
    CanonicalizePass()(canonical)  # the pipeline's canonical form: the names a plan uses
    g = canonical.graph
    conv, bn_param = graph_facts(g)
    probes: dict[str, Probe] = {
        n: _Exact(np.array(v.const_value.numpy()), conv.get(n), bn_param.get(n))
        for n, v in all_initializers(g).items() if v.const_value is not None
    }
    try:
        feeds = make_feeds(canonical, resolve_input_shapes(canonical, {}), seed=0)
    except Exception:  # noqa: BLE001 - a dynamic input shape: no structural probe, values only
        feeds = {}
    return _OnnxSide(probes, feeds)


def plan_feeds(inputs: list[Mapping[str, Any]] | None) -> dict[str, np.ndarray]:
    """The seeded inputs ``make_feeds`` makes for the model, from a plan's recorded ``inputs``."""
    from spa.inputs import make_feeds

    if not inputs:
        return {}
    dtypes = {i["name"]: np.dtype(i["dtype"]) for i in inputs}
    return make_feeds(dtypes, {i["name"]: i["shape"] for i in inputs}, seed=0)


def _plan_side(fingerprints: Mapping[str, Fingerprint], inputs: list[Mapping[str, Any]] | None) -> _OnnxSide:
    """The same, from a plan's fingerprints and recorded inputs (no ONNX file)."""
    return _OnnxSide(dict(fingerprints), plan_feeds(inputs))


def _conv_bn_pairs(module, feeds: Mapping[str, np.ndarray]) -> dict[str, str]:
    """Conv module name → the BatchNorm module that reads its output, found by running the
    module once (eval mode, no grad) with forward hooks. Empty when the module can't run on
    the ONNX inputs in order."""
    torch = require_torch()
    convs = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)
    norms = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)
    # id(output) → (a weak reference to it, conv name): a freed output's id is reused by later
    # tensors, so a match counts only while the very tensor is alive
    produced: dict[int, tuple[Any, str]] = {}
    pairs: dict[str, str] = {}
    hooks = []
    for name, m in module.named_modules():
        if isinstance(m, convs):
            hooks.append(m.register_forward_hook(lambda mod, i, o, name=name: produced.__setitem__(id(o), (weakref.ref(o), name))))
        elif isinstance(m, norms):
            def pre(mod, inputs, name=name):
                hit = produced.get(id(inputs[0]))
                if hit is not None and hit[0]() is inputs[0]:
                    pairs[hit[1]] = name
            hooks.append(m.register_forward_pre_hook(pre))
    was_training = module.training
    try:
        module.eval()
        with torch.no_grad():
            module(*[torch.from_numpy(v) for v in feeds.values()])
    except Exception:  # noqa: BLE001 - the probe is a help, not a requirement
        logger.debug("spa.torch: the module did not run on the ONNX inputs; BatchNorm pairs from values only")
        pairs.clear()
    finally:
        module.train(was_training)
        for h in hooks:
            h.remove()
    return pairs


# -- candidates built from the module -----------------------------------------------------------


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    if a.shape != b.shape:
        return False
    scale = max(float(np.abs(b).max()) if b.size else 0.0, 1e-12)
    return bool(np.abs(a.astype(np.float64) - b).max() <= 1e-5 * scale + 1e-7)


def _identity_axes(perm: tuple[int, ...], shape: tuple[int, ...]) -> dict[int, tuple[int, np.ndarray]]:
    return {i: (p, np.arange(shape[i])) for i, p in enumerate(perm)}


def _recurrent_candidates(module, sd: Mapping[str, np.ndarray]) -> list[tuple[np.ndarray, list[Target]]]:
    """ONNX-layout W, R, B of every nn.LSTM / nn.GRU / nn.RNN layer (ONNX gate order; the two
    biases concatenated)."""
    torch = require_torch()
    out = []
    for mname, m in module.named_modules():
        kind = next((k for k in ("LSTM", "GRU") if isinstance(m, getattr(torch.nn, k))), "RNN" if isinstance(m, torch.nn.RNN) else None)
        if kind is None or getattr(m, "proj_size", 0):
            continue
        h = m.hidden_size
        perm = np.concatenate([np.arange(h) + g * h for g in _ONNX_TO_TORCH_GATE[kind]])  # ONNX row → torch row
        prefix = f"{mname}." if mname else ""
        for layer in range(m.num_layers):
            sfx = [f"_l{layer}"] + ([f"_l{layer}_reverse"] if m.bidirectional else [])  # ONNX axis 0: directions
            ih, hh = [prefix + f"weight_ih{x}" for x in sfx], [prefix + f"weight_hh{x}" for x in sfx]
            w = np.stack([sd[k][perm] for k in ih])
            r = np.stack([sd[k][perm] for k in hh])
            out.append((w, [Target(k, {1: (0, perm), 2: (1, np.arange(w.shape[2]))}) for k in ih]))
            out.append((r, [Target(k, {1: (0, perm), 2: (1, np.arange(r.shape[2]))}) for k in hh]))
            if m.bias:
                bi, bh = [prefix + f"bias_ih{x}" for x in sfx], [prefix + f"bias_hh{x}" for x in sfx]
                b = np.stack([np.concatenate([sd[i][perm], sd[j][perm]]) for i, j in zip(bi, bh)])
                n = len(perm)
                idx_i = np.concatenate([perm, np.full(n, -1)])
                idx_h = np.concatenate([np.full(n, -1), perm])
                out.append((b, [t for i, j in zip(bi, bh) for t in (Target(i, {1: (0, idx_i)}), Target(j, {1: (0, idx_h)}))]))
    return out


def _bn_modules(module) -> list[tuple[str, Any]]:
    torch = require_torch()
    norms = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)
    return [(n, m) for n, m in module.named_modules() if isinstance(m, norms) and m.running_var is not None]


def _bn_targets(prefix: str, m, size: int) -> list[Target]:
    names = ["running_mean", "running_var"] + (["weight", "bias"] if m.affine else [])
    return [Target(f"{prefix}{n}", {0: (0, np.arange(size))}) for n in names]


def _bn_scale(m) -> np.ndarray:
    gamma = m.weight.detach().double().numpy() if m.affine else np.ones(m.num_features)
    return gamma / np.sqrt(m.running_var.detach().double().numpy() + m.eps)


def _value_matches(a: Probe, n: str, sd: Mapping[str, np.ndarray], by_numel: Mapping[int, list[str]]) -> tuple[list[Target], list[np.ndarray]]:
    """State_dict tensors equal to ``a``, possibly with permuted axes or leading 1-axes added
    (dynamo folds an RNN's ``linear(h0 = 0, W_hh, b_hh)`` into a [1, 1, H] copy of b_hh);
    with each, the candidate in the ONNX layout."""
    found: list[Target] = []
    cands: list[np.ndarray] = []
    shape = a.shape
    keys = sorted(by_numel.get(int(np.prod(shape, dtype=np.int64)), []), key=lambda k: k != n)  # the same name first
    ones = next((i for i, d in enumerate(shape) if d != 1), len(shape) - 1)  # leading 1-axes that may be added
    for k in keys:
        t = sd[k]
        for lead in range(ones + 1):
            src = shape[lead:]
            if len(src) != t.ndim or sorted(src) != sorted(t.shape):
                continue
            for perm in itertools.permutations(range(t.ndim)) if t.ndim <= 4 else [tuple(range(t.ndim))]:
                if tuple(t.shape[p] for p in perm) != src:
                    continue
                cand = np.transpose(t, perm).reshape(shape)
                if a.matches(cand):
                    found.append(Target(k, {i + lead: (p, np.arange(src[i])) for i, p in enumerate(perm)}))
                    cands.append(cand)
                    break
        if found and found[0].key == n:
            return found[:1], cands[:1]  # the exporter kept the name and the value: that is the tensor
    return found, cands


def _differ(cands: list[np.ndarray]) -> bool:
    """Candidates a fingerprint can't tell apart that are not equal to each other. (Equal ones
    are an exporter's deduplication: one initializer for several equal module tensors.)"""
    return any(not _close(c, cands[0]) for c in cands[1:])


@dataclasses.dataclass
class Matched:
    """``map_initializers``' answer: targets per planned tensor, the exporter constants it
    skipped, and why each of the rest could not be mapped."""

    mapped: dict[str, list[Target]]
    constants: list[str]
    failed: dict[str, str]  # ONNX name → why


def map_initializers(module, names: list[str], model: Any = None, *, fingerprints: Mapping[str, Fingerprint] | None = None,
                     inputs: list[Mapping[str, Any]] | None = None, shapes: Mapping[str, list[int]] | None = None) -> Matched:
    """ONNX initializer → state_dict targets, for ``names``: by value against ``model`` when
    given, else against ``fingerprints`` (a plan's, with its recorded ``inputs``); a name
    with neither must be a state_dict key of its planned shape (``shapes``, when given)."""
    sd = {k: v.detach().cpu().numpy() for k, v in module.state_dict().items() if v.is_floating_point()}
    mapped: dict[str, list[Target]] = {}
    constants: list[str] = []
    failed: dict[str, str] = {}
    side = _onnx_side(model) if model is not None else _plan_side(fingerprints or {}, inputs)
    by_name = [n for n in names if n not in side.probes]
    for n in by_name:  # no value to match against: trust the name
        if n in sd and (shapes is None or n not in shapes or list(sd[n].shape) == list(shapes[n])):
            mapped[n] = [Target(n, _identity_axes(tuple(range(sd[n].ndim)), sd[n].shape))]
        elif n in sd:
            failed[n] = f"the state_dict's '{n}' has shape {list(sd[n].shape)}, the plan's {list(shapes[n])}"
        else:
            failed[n] = "not in the model" if model is not None else "no fingerprint in the plan and no state_dict key of that name"
    names = [n for n in names if n in side.probes]
    if not names:
        return Matched(mapped, constants, failed)
    modules = dict(module.named_modules())
    pairs = _conv_bn_pairs(module, side.feeds)
    recurrent = _recurrent_candidates(module, sd)
    bns = _bn_modules(module)
    by_numel: dict[int, list[str]] = {}
    for k, v in sd.items():
        by_numel.setdefault(v.size, []).append(k)
    folded_bias: dict[str, list[Target]] = {}

    def fold(a: Probe) -> list[Target]:
        """``a`` is torch conv weight × a BatchNorm's scale per output channel (BN folding)."""
        cands = [(c, pairs[c]) for c in pairs] if pairs else [(k[: -len(".weight")], b) for k in sd if k.endswith("weight") for b, _ in bns]
        for conv_name, bn_name in cands:
            w = sd.get(f"{conv_name}.weight" if conv_name else "weight")
            bn = modules.get(bn_name)
            if w is None or bn is None or tuple(w.shape) != a.shape or bn.num_features != a.shape[0]:
                continue
            folded = (w.reshape(w.shape[0], -1).astype(np.float64) * _bn_scale(bn)[:, None]).reshape(w.shape)
            if not a.matches(folded):
                continue
            prefix = f"{bn_name}." if bn_name else ""
            per_out = _bn_targets(prefix, bn, a.shape[0])
            bias = a.conv[0]
            if bias is not None:
                conv_b = f"{conv_name}.bias" if conv_name else "bias"
                folded_bias[bias] = ([Target(conv_b, {0: (0, np.arange(a.shape[0]))})] if conv_b in sd else []) + per_out
            return [Target(f"{conv_name}.weight" if conv_name else "weight", _identity_axes(tuple(range(len(a.shape))), a.shape)), *per_out]
        return []

    for n in names:
        a = side.probes[n]
        found: list[Target] = []
        if a.conv is not None and not a.conv[1]:
            found = fold(a)  # an ONNX Conv no BatchNormalization reads: its BN may be folded in
        if not found and a.batchnorm is not None and pairs:
            index, w = a.batchnorm  # an unfolded BatchNormalization: name it through its Conv
            conv = _value_matches(side.probes[w], w, sd, by_numel)[0] if w in side.probes else []
            conv_name = conv[0].key.rpartition(".")[0] if len(conv) == 1 else None
            bn_name = pairs.get(conv_name) if conv_name is not None else None
            if bn_name is not None:
                attr = ("weight", "bias", "running_mean", "running_var")[index - 1]
                key = f"{bn_name}.{attr}" if bn_name else attr
                if key in sd and tuple(sd[key].shape) == a.shape:
                    found = [Target(key, {0: (0, np.arange(a.shape[0]))})]
        if not found:
            found, cands = _value_matches(a, n, sd, by_numel)
            if len(found) > 1 and not a.exact and _differ(cands):
                failed[n] = f"its fingerprint matches {', '.join(t.key for t in found)}, which differ (pass model= to compare whole tensors)"
                continue
        if not found:
            for value, targets in recurrent:
                if a.matches(value):
                    found = targets
                    break
        if found:
            mapped[n] = found
        elif a.constant:
            constants.append(n)
        else:
            failed[n] = "no state_dict tensor has its value" + ("" if a.exact else " (by its fingerprint)")
    for b, targets in folded_bias.items():  # a folded Conv's bias: known once its weight matched
        if b in names:
            mapped[b] = targets
            failed.pop(b, None)
            if b in constants:
                constants.remove(b)
    return Matched(mapped, constants, failed)
