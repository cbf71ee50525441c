"""Matching ONNX initializers to ``state_dict`` keys (``spa.torch``'s docstring lists the rules).

Each planned ONNX tensor becomes a list of :class:`Target` records: a state_dict key and, per ONNX
axis, the torch axis and the map from ONNX index to torch index (−1: the index belongs to
another target, as the two halves of an LSTM bias do).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from spa.autodiff import require_torch

__all__ = ["Target", "map_initializers"]

logger = logging.getLogger(__name__)

#: ONNX LSTM gate k (i, o, f, c) is torch gate _ONNX_TO_TORCH_GATE[k] (i, f, g, o).
_ONNX_TO_TORCH_GATE = (0, 3, 1, 2)


@dataclasses.dataclass
class Target:
    """One state_dict tensor an ONNX tensor maps to: ONNX axis → (torch axis, index map)."""

    key: str
    axes: dict[int, tuple[int, np.ndarray]]  # index map: ONNX index → torch index, −1: not this tensor



@dataclasses.dataclass
class _OnnxSide:
    """What the mapping reads from the canonical ONNX model (the names plans use)."""

    values: dict[str, np.ndarray]
    #: Conv weight → (its bias input or None, whether a BatchNormalization reads the Conv's output)
    conv: dict[str, tuple[str | None, bool]]
    #: BatchNormalization parameter → (index 1–4, the weight of the Conv that feeds it or None)
    bn_param: dict[str, tuple[int, str | None]]
    feeds: dict[str, np.ndarray]


def _onnx_side(model: Any) -> _OnnxSide:
    from spa.graph import all_initializers
    from spa.inputs import make_feeds, resolve_input_shapes
    from spa.passes.canonicalize import CanonicalizePass
    from spa.pipeline import load

    canonical, _, _ = load(model)
    CanonicalizePass()(canonical)  # the pipeline's canonical form: the names a plan uses
    g = canonical.graph
    values = {n: np.array(v.const_value.numpy()) for n, v in all_initializers(g).items() if v.const_value is not None}
    conv, bn_param = {}, {}
    for node in g.all_nodes():
        ins = list(node.inputs)
        if node.op_type in ("Conv", "ConvTranspose") and len(ins) > 1 and ins[1] is not None:
            bias = ins[2].name if len(ins) > 2 and ins[2] is not None else None
            followed = any(u.node.op_type == "BatchNormalization" for u in node.outputs[0].uses())
            conv[ins[1].name] = (bias, followed)
        if node.op_type == "BatchNormalization":
            prod = ins[0].producer() if ins[0] is not None else None
            w = prod.inputs[1].name if prod is not None and prod.op_type in ("Conv", "ConvTranspose") and prod.inputs[1] is not None else None
            for i in range(1, 5):
                if len(ins) > i and ins[i] is not None:
                    bn_param[ins[i].name] = (i, w)
    try:
        feeds = make_feeds(canonical, resolve_input_shapes(canonical, {}), seed=0)
    except Exception:  # noqa: BLE001 - a dynamic input shape: no structural probe, values only
        feeds = {}
    return _OnnxSide(values, conv, bn_param, feeds)


def _conv_bn_pairs(module, feeds: Mapping[str, np.ndarray]) -> dict[str, str]:
    """Conv module name → the BatchNorm module that reads its output, found by running the
    module once (eval mode, no grad) with forward hooks. Empty when the module can't run on
    the ONNX inputs in order."""
    torch = require_torch()
    convs = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)
    norms = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)
    produced: dict[int, str] = {}
    pairs: dict[str, str] = {}
    hooks = []
    for name, m in module.named_modules():
        if isinstance(m, convs):
            hooks.append(m.register_forward_hook(lambda mod, i, o, name=name: produced.__setitem__(id(o), name)))
        elif isinstance(m, norms):
            def pre(mod, inputs, name=name):
                src = produced.get(id(inputs[0]))
                if src is not None:
                    pairs[src] = name
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


def _lstm_candidates(module, sd: Mapping[str, np.ndarray]) -> list[tuple[np.ndarray, list[Target]]]:
    """ONNX-layout W, R, B of every nn.LSTM layer (gate order i, o, f, c; biases concatenated)."""
    torch = require_torch()
    out = []
    for mname, m in module.named_modules():
        if not isinstance(m, torch.nn.LSTM) or m.proj_size:
            continue
        h = m.hidden_size
        perm = np.concatenate([np.arange(h) + g * h for g in _ONNX_TO_TORCH_GATE])  # ONNX row → torch row
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
                n = 4 * h
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


def _value_matches(a: np.ndarray, n: str, sd: Mapping[str, np.ndarray], by_numel: Mapping[int, list[str]]) -> list[Target]:
    """State_dict tensors equal to ``a``, possibly with permuted axes or a leading 1 added."""
    found: list[Target] = []
    keys = sorted(by_numel.get(a.size, []), key=lambda k: k != n)  # the same name first
    squeezed = a.reshape(a.shape[1:]) if a.ndim > 1 and a.shape[0] == 1 else None
    for k in keys:
        t = sd[k]
        for src, lead in ((a, 0), (squeezed, 1)):
            if src is None or src.ndim != t.ndim or sorted(src.shape) != sorted(t.shape):
                continue
            for perm in itertools.permutations(range(t.ndim)) if t.ndim <= 4 else [tuple(range(t.ndim))]:
                if tuple(t.shape[p] for p in perm) == src.shape and _close(src, np.transpose(t, perm)):
                    found.append(Target(k, {i + lead: (p, np.arange(src.shape[i])) for i, p in enumerate(perm)}))
                    break
        if found and found[0].key == n:
            return found[:1]  # the exporter kept the name and the value: that is the tensor
    return found


def map_initializers(module, names: list[str], model: Any = None) -> tuple[dict[str, list[Target]], list[str], list[str]]:
    """ONNX initializer → state_dict targets, for ``names``. Returns (mapped, constants, failed)."""
    sd = {k: v.detach().cpu().numpy() for k, v in module.state_dict().items() if v.is_floating_point()}
    mapped: dict[str, list[Target]] = {}
    constants, failed = [], []
    if model is None:
        for n in names:
            if n in sd:
                mapped[n] = [Target(n, _identity_axes(tuple(range(sd[n].ndim)), sd[n].shape))]
            else:
                failed.append(n)
        return mapped, constants, failed
    side = _onnx_side(model)
    modules = dict(module.named_modules())
    pairs = _conv_bn_pairs(module, side.feeds)
    lstm = _lstm_candidates(module, sd)
    bns = _bn_modules(module)
    by_numel: dict[int, list[str]] = {}
    for k, v in sd.items():
        by_numel.setdefault(v.size, []).append(k)
    folded_bias: dict[str, list[Target]] = {}
    conv_of: dict[str, str] = {}  # ONNX Conv weight → torch conv module

    def fold(n: str, a: np.ndarray) -> list[Target]:
        """``a`` is torch conv weight × a BatchNorm's scale per output channel (BN folding)."""
        cands = [(c, pairs[c]) for c in pairs] if pairs else [(k[: -len(".weight")], b) for k in sd if k.endswith("weight") for b, _ in bns]
        for conv_name, bn_name in cands:
            w = sd.get(f"{conv_name}.weight" if conv_name else "weight")
            bn = modules.get(bn_name)
            if w is None or bn is None or w.shape != a.shape or bn.num_features != a.shape[0]:
                continue
            rows = w.reshape(w.shape[0], -1).astype(np.float64) * _bn_scale(bn)[:, None]
            if not _close(a.reshape(a.shape[0], -1), rows):
                continue
            prefix = f"{bn_name}." if bn_name else ""
            per_out = _bn_targets(prefix, bn, a.shape[0])
            conv_of[n] = conv_name
            bias = side.conv[n][0]
            if bias is not None:
                conv_b = f"{conv_name}.bias" if conv_name else "bias"
                folded_bias[bias] = ([Target(conv_b, {0: (0, np.arange(a.shape[0]))})] if conv_b in sd else []) + per_out
            return [Target(f"{conv_name}.weight" if conv_name else "weight", _identity_axes(tuple(range(a.ndim)), a.shape)), *per_out]
        return []

    for n in names:
        a = side.values.get(n)
        if a is None:
            failed.append(n)
            continue
        found: list[Target] = []
        if n in side.conv and not side.conv[n][1]:
            found = fold(n, a)  # an ONNX Conv no BatchNormalization reads: its BN may be folded in
        if not found and n in side.bn_param and pairs:
            index, w = side.bn_param[n]  # an unfolded BatchNormalization: name it through its Conv
            conv = _value_matches(side.values[w], w, sd, by_numel) if w in side.values else []
            conv_name = conv[0].key.rpartition(".")[0] if len(conv) == 1 else None
            bn_name = pairs.get(conv_name) if conv_name is not None else None
            if bn_name is not None:
                attr = ("weight", "bias", "running_mean", "running_var")[index - 1]
                key = f"{bn_name}.{attr}" if bn_name else attr
                if key in sd and sd[key].shape == a.shape:
                    found = [Target(key, {0: (0, np.arange(a.shape[0]))})]
        if not found:
            found = _value_matches(a, n, sd, by_numel)
        if not found:
            for value, targets in lstm:
                if _close(a, value):
                    found = targets
                    break
        if found:
            mapped[n] = found
        elif a.size and np.all(a == a.reshape(-1)[0]):
            constants.append(n)
        else:
            failed.append(n)
    for b, targets in folded_bias.items():  # a folded Conv's bias: known once its weight matched
        if b in names:
            mapped[b] = targets
            for lst in (failed, constants):
                if b in lst:
                    lst.remove(b)
    return mapped, constants, failed
