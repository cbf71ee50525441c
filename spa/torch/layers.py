"""Fixing the layers after their tensors were sliced, and the modules that replace stock ones
that cannot hold a pruned shape (:class:`PrunedMultiheadAttention`, :class:`PrunedLSTM`,
:class:`PrunedRNN`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from spa.autodiff import require_torch
from spa.errors import UnsupportedError

if TYPE_CHECKING:  # pragma: no cover
    from spa.torch import TorchMapping

__all__ = ["PrunedMultiheadAttention", "PrunedLSTM", "PrunedRNN", "fix_module", "fix_attention_attributes", "submodule"]

logger = logging.getLogger(__name__)


def submodule(module, path: str):
    return module.get_submodule(path) if path else module


_HEADS = ("num_heads", "heads", "n_heads", "n_head", "num_attention_heads")
_KV_HEADS = ("kv_heads", "num_kv_heads", "n_kv_heads", "num_key_value_heads")
_HEAD_DIM = ("head_dim", "attention_head_size", "d_head", "head_size", "d_k")
_Q, _K = ("q", "query", "q_proj", "to_q", "wq"), ("k", "key", "k_proj", "to_k", "wk")


def _first(m, names: tuple[str, ...]) -> str | None:
    return next((n for n in names if isinstance(getattr(m, n, None), int) and not isinstance(getattr(m, n), bool)), None)


def fix_attention_attributes(root, touched: Mapping[str, Mapping[str, Any]], result: TorchMapping) -> None:
    """A hand-written attention module (``heads``/``num_heads`` and ``head_dim`` attributes,
    ``q``/``query``/``q_proj`` … children) whose projections lost whole heads: set its head
    counts. Pruned per-head dims are refused: the module's 1/√head_dim would change."""
    torch = require_torch()
    for path, m in root.named_modules():
        if isinstance(m, torch.nn.MultiheadAttention) or isinstance(m, PrunedMultiheadAttention):
            continue
        heads_attr = _first(m, _HEADS)
        if heads_attr is None:
            continue
        prefix = f"{path}." if path else ""
        q_name = next((n for n in _Q if f"{prefix}{n}" in touched and isinstance(getattr(m, n, None), torch.nn.Linear)), None)
        if q_name is None:
            continue
        dim_attr = _first(m, _HEAD_DIM)
        old_q = touched[f"{prefix}{q_name}"].get("weight", (getattr(m, q_name).weight.shape[0],))[0]
        heads = getattr(m, heads_attr)
        d = getattr(m, dim_attr) if dim_attr else old_q // heads
        new_q = getattr(m, q_name).weight.shape[0]
        if new_q % d:
            raise UnsupportedError(f"'{path}': per-head dims were pruned ({old_q}→{new_q} query features, head_dim {d}); "
                                   "a hand-written attention module can't follow (its 1/√head_dim would change)")
        setattr(m, heads_attr, new_q // d)
        change = f"{heads_attr} {heads}→{new_q // d}"
        kv_attr = _first(m, _KV_HEADS)
        k_name = next((n for n in _K if isinstance(getattr(m, n, None), torch.nn.Linear)), None)
        if kv_attr is not None and k_name is not None:
            before = getattr(m, kv_attr)
            setattr(m, kv_attr, getattr(m, k_name).weight.shape[0] // d)
            change += f", {kv_attr} {before}→{getattr(m, kv_attr)}"
        if isinstance(getattr(m, "all_head_size", None), int):
            m.all_head_size = (new_q // d) * d
        result.modules[path or "<root>"] = f"{type(m).__name__} {change}"


def fix_module(root, path: str, old: dict[str, Any], result: TorchMapping, wanted: Mapping[str, Mapping[int, list[int]]]) -> None:
    """Set the attributes of the layer at ``path`` from its sliced tensors."""
    torch = require_torch()
    nn = torch.nn
    m = submodule(root, path)
    name = path or "<root>"
    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        w = m.weight
        transposed = isinstance(m, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d))
        old_in, old_out, g = m.in_channels, m.out_channels, m.groups
        if g > 1 and g == old_in:
            # one input channel per group (depthwise, maybe with a multiplier): groups follow the channels
            if transposed:
                m.groups = m.in_channels = w.shape[0]
                m.out_channels = w.shape[1] * m.groups
            else:
                m.groups = m.in_channels = w.shape[0] // (old_out // g)
                m.out_channels = w.shape[0]
        else:
            m.in_channels = w.shape[0] if transposed else w.shape[1] * g
            m.out_channels = w.shape[1] * g if transposed else w.shape[0]
        result.modules[name] = f"{type(m).__name__} in {old_in}→{m.in_channels}, out {old_out}→{m.out_channels}, groups {m.groups}"
    elif isinstance(m, nn.Linear):
        before = (m.in_features, m.out_features)
        m.out_features, m.in_features = m.weight.shape
        result.modules[name] = f"Linear in {before[0]}→{m.in_features}, out {before[1]}→{m.out_features}"
    elif isinstance(m, nn.modules.batchnorm._BatchNorm):
        before = m.num_features
        m.num_features = (m.weight if m.affine else m.running_mean).shape[0]
        result.modules[name] = f"{type(m).__name__} {before}→{m.num_features}"
    elif isinstance(m, nn.LayerNorm):
        before = m.normalized_shape
        m.normalized_shape = tuple(m.weight.shape)
        result.modules[name] = f"LayerNorm {tuple(before)}→{m.normalized_shape}"
    elif isinstance(m, nn.GroupNorm):
        before = m.num_channels
        m.num_channels = m.weight.shape[0]
        result.modules[name] = f"GroupNorm {before}→{m.num_channels}"
    elif isinstance(m, nn.Embedding):
        m.embedding_dim = m.weight.shape[1]
        result.modules[name] = f"Embedding dim → {m.embedding_dim}"
    elif isinstance(m, (nn.LSTM, nn.GRU, nn.RNN)):
        before = (m.input_size, m.hidden_size)
        hidden = [m.get_parameter(f"weight_hh_l{i}").shape[1] for i in range(m.num_layers)]
        if m.bidirectional:
            rev = [m.get_parameter(f"weight_hh_l{i}_reverse").shape[1] for i in range(m.num_layers)]
            if rev != hidden:
                raise UnsupportedError(f"'{name}': the two directions of the {type(m).__name__} were pruned to different hidden sizes "
                                       f"(forward {hidden}, reverse {rev} per layer): a torch {type(m).__name__} layer has one size")
        m.input_size = m.weight_ih_l0.shape[1]
        if len(set(hidden)) == 1:
            m.hidden_size = hidden[0]
            m._init_flat_weights()
            result.modules[name] = f"{type(m).__name__} input {before[0]}→{m.input_size}, hidden {before[1]}→{m.hidden_size}"
        else:
            _replace_recurrent(root, path, m, hidden, result)
    elif isinstance(m, nn.MultiheadAttention):
        rows = wanted.get(f"{path}.in_proj_weight" if path else "in_proj_weight", {}).get(0)
        _replace_attention(root, path, m, result, rows)
    else:
        result.modules[name] = f"{type(m).__name__}: tensors sliced, attributes left as they are (not a layer spa.torch knows)"
        logger.warning("spa.torch: %s is a %s; its tensors were sliced but its attributes not updated", name, type(m).__name__)


# -- LSTM / GRU / RNN layers of different sizes ----------------------------------------------------


def _replace_recurrent(root, path: str, m, hidden: list[int], result: TorchMapping) -> None:
    """An nn.LSTM / nn.GRU / nn.RNN whose layers were pruned to different hidden sizes →
    PrunedLSTM / PrunedRNN (one single-layer module of the same kind per layer, in sequence)."""
    torch = require_torch()
    kind = type(m).__name__
    layers = []
    sfx = ["", "_reverse"] if m.bidirectional else [""]
    dirs = len(sfx)
    extra = {"nonlinearity": m.nonlinearity} if isinstance(m, torch.nn.RNN) else {}
    for i, h in enumerate(hidden):
        size = m.get_parameter(f"weight_ih_l{i}").shape[1]
        layer = type(m)(size, h, 1, bias=m.bias, batch_first=m.batch_first, bidirectional=m.bidirectional, **extra)
        with torch.no_grad():
            for x in sfx:
                for t in ("weight_ih", "weight_hh") + (("bias_ih", "bias_hh") if m.bias else ()):
                    getattr(layer, f"{t}_l0{x}").copy_(m.get_parameter(f"{t}_l{i}{x}"))
        layers.append(layer)
    lstm = isinstance(m, torch.nn.LSTM)
    new = (PrunedLSTM if lstm else PrunedRNN).create(layers, dropout=m.dropout)
    parent_path, _, attr_name = path.rpartition(".")
    setattr(submodule(root, parent_path), attr_name, new)
    why = (f"nn.{kind} has one hidden_size for all layers; its {len(hidden)} layers were pruned to {hidden} (×{dirs} directions): "
           f"replaced by spa.torch.{'PrunedLSTM' if lstm else 'PrunedRNN'} (same output; "
           f"{'h_n and c_n are tuples' if lstm else 'h_n is a tuple'}, one per layer)")
    result.replaced[path or "<root>"] = why
    result.modules[path or "<root>"] = f"{kind} hidden {m.hidden_size}→{hidden}"
    logger.warning("spa.torch: %s: %s", path, why)


class _LazyStack(type):
    """Builds the stacked nn.Module subclass on first use (importing spa.torch needs no torch)."""

    _cls = None
    _cell_state = True

    def create(cls, *args, **kw):
        if cls._cls is None:
            cls._cls = _build_stack_class(cls.__name__, cls._cell_state)
        return cls._cls(*args, **kw)

    def __instancecheck__(cls, obj):
        return cls._cls is not None and isinstance(obj, cls._cls)


class PrunedLSTM(metaclass=_LazyStack):
    """A stack of single-layer LSTMs of different hidden sizes (``create(layers, dropout)``),
    called like nn.LSTM; ``h_n``/``c_n`` are tuples with one tensor per layer."""

    _cell_state = True


class PrunedRNN(metaclass=_LazyStack):
    """A stack of single-layer GRUs (or RNNs) of different hidden sizes (``create(layers,
    dropout)``), called like nn.GRU / nn.RNN; ``h_n`` is a tuple with one tensor per layer."""

    _cell_state = False


def _build_stack_class(name: str, cell_state: bool):
    torch = require_torch()

    class _Stack(torch.nn.Module):
        def __init__(self, layers, dropout=0.0):
            super().__init__()
            self.layers = torch.nn.ModuleList(layers)
            self.dropout = dropout

        def forward(self, x, hx=None):
            hs, cs = [], []
            for i, layer in enumerate(self.layers):
                if cell_state:
                    x, (h, c) = layer(x, None if hx is None else (hx[0][i], hx[1][i]))
                    cs.append(c)
                else:
                    x, h = layer(x, None if hx is None else hx[i])
                if self.dropout and self.training and i < len(self.layers) - 1:
                    x = torch.nn.functional.dropout(x, self.dropout, True)
                hs.append(h)
            return x, ((tuple(hs), tuple(cs)) if cell_state else tuple(hs))

    _Stack.__name__ = _Stack.__qualname__ = name
    return _Stack


# -- attention ---------------------------------------------------------------------------------


def _replace_attention(root, path: str, m, result: TorchMapping, kept_rows: list[int] | None) -> None:
    """nn.MultiheadAttention with sliced in_proj/out_proj → PrunedMultiheadAttention. The
    heads come from the kept in_proj rows (original indices): q rows [0, E), k [E, 2E), v [2E, 3E)."""
    if not m._qkv_same_embed_dim:
        raise UnsupportedError(f"'{path}': MultiheadAttention with kdim/vdim ≠ embed_dim is not mapped")
    E, h = m.embed_dim, m.num_heads
    d = E // h
    rows = np.asarray(kept_rows if kept_rows is not None else np.arange(3 * E))
    parts = [rows[(rows >= i * E) & (rows < (i + 1) * E)] - i * E for i in range(3)]
    heads_of = [set((p // d).tolist()) for p in parts]
    per_head = [np.bincount(p // d, minlength=h) for p in parts]
    if heads_of[0] != heads_of[1] or heads_of[0] != heads_of[2] or any(len(set(c[c > 0].tolist())) > 1 for c in per_head):
        raise UnsupportedError(f"'{path}': the kept in_proj rows do not form whole heads of one size (q, k, v per head: "
                               f"{[c.tolist() for c in per_head]})")
    heads = len(heads_of[0])
    qk, inner = len(parts[0]), len(parts[2])
    if len(parts[1]) != qk or m.out_proj.weight.shape[1] != inner:
        raise UnsupportedError(f"'{path}': q, k, v and out_proj were not sliced alike")
    new = PrunedMultiheadAttention.create(E, heads, qk // heads, inner // heads, scale=1.0 / np.sqrt(d),
                                          batch_first=m.batch_first, dropout=m.dropout, bias=m.in_proj_bias is not None)
    torch = require_torch()
    with torch.no_grad():
        new.in_proj_weight.copy_(m.in_proj_weight)
        if m.in_proj_bias is not None:
            new.in_proj_bias.copy_(m.in_proj_bias)
        new.out_proj.weight.copy_(m.out_proj.weight)
        if m.out_proj.bias is not None:
            new.out_proj.bias.copy_(m.out_proj.bias)
    parent_path, _, attr_name = path.rpartition(".")
    setattr(submodule(root, parent_path), attr_name, new)
    why = (f"nn.MultiheadAttention holds embed_dim = num_heads·head_dim; pruned to {heads} heads of q/k {qk // heads}, "
           f"v {inner // heads} (embed_dim {E}): replaced by spa.torch.PrunedMultiheadAttention, same forward")
    result.replaced[path or "<root>"] = why
    result.modules[path or "<root>"] = f"MultiheadAttention heads {h}→{heads}"
    logger.warning("spa.torch: %s: %s", path, why)


class _Lazy(type):
    """Builds the nn.Module subclass on first use, so that importing spa.torch needs no torch."""

    _cls = None

    def create(cls, *args, **kw):
        if cls._cls is None:
            cls._cls = _build_attention_class()
        return cls._cls(*args, **kw)

    def __instancecheck__(cls, obj):
        return cls._cls is not None and isinstance(obj, cls._cls)


class PrunedMultiheadAttention(metaclass=_Lazy):
    """Multi-head attention whose inner width need not equal ``embed_dim`` (``create(...)``):
    ``num_heads`` heads of query/key size ``qk_dim`` and value size ``v_dim``, logits scaled by
    ``scale`` (the original 1/√head_dim), with nn.MultiheadAttention's call signature."""


def _build_attention_class():
    torch = require_torch()
    nn, F = torch.nn, torch.nn.functional

    class _PrunedMultiheadAttention(nn.Module):
        def __init__(self, embed_dim, num_heads, qk_dim, v_dim, *, scale, batch_first=False, dropout=0.0, bias=True):
            super().__init__()
            self.embed_dim, self.num_heads, self.qk_dim, self.v_dim = embed_dim, num_heads, qk_dim, v_dim
            self.scale, self.batch_first, self.dropout = float(scale), batch_first, dropout
            self._qkv_same_embed_dim = False  # keeps nn.TransformerEncoderLayer off its fused fast path
            rows = num_heads * (2 * qk_dim + v_dim)
            self.in_proj_weight = nn.Parameter(torch.empty(rows, embed_dim))
            self.in_proj_bias = nn.Parameter(torch.zeros(rows)) if bias else None
            self.out_proj = nn.Linear(num_heads * v_dim, embed_dim, bias=bias)

        def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                    average_attn_weights=True, is_causal=False):
            if not self.batch_first:
                query, key, value = (t.transpose(0, 1) for t in (query, key, value))
            h, a, b = self.num_heads, self.num_heads * self.qk_dim, 2 * self.num_heads * self.qk_dim
            w, bias = self.in_proj_weight, self.in_proj_bias
            pb = (lambda s: None) if bias is None else (lambda s: bias[s])
            q = F.linear(query, w[:a], pb(slice(0, a)))
            k = F.linear(key, w[a:b], pb(slice(a, b)))
            v = F.linear(value, w[b:], pb(slice(b, None)))
            B, L, S = q.shape[0], q.shape[1], k.shape[1]
            q = q.reshape(B, L, h, self.qk_dim).transpose(1, 2)
            k = k.reshape(B, S, h, self.qk_dim).transpose(1, 2)
            v = v.reshape(B, S, h, self.v_dim).transpose(1, 2)
            logits = (q @ k.transpose(-2, -1)) * self.scale
            if attn_mask is not None:
                mask = attn_mask if attn_mask.dim() == 2 else attn_mask.reshape(B, h, L, S)
                logits = logits.masked_fill(mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
            if key_padding_mask is not None:
                kpm = key_padding_mask.reshape(B, 1, 1, S)
                logits = logits.masked_fill(kpm, float("-inf")) if kpm.dtype == torch.bool else logits + kpm
            if is_causal and attn_mask is None:
                logits = logits.masked_fill(torch.ones(L, S, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
            attn = torch.softmax(logits, dim=-1)
            attn_d = F.dropout(attn, self.dropout, self.training) if self.dropout else attn
            out = (attn_d @ v).transpose(1, 2).reshape(B, L, h * self.v_dim)
            out = self.out_proj(out)
            if not self.batch_first:
                out = out.transpose(0, 1)
            weights = (attn.mean(dim=1) if average_attn_weights else attn) if need_weights else None
            return out, weights

    _PrunedMultiheadAttention.__name__ = _PrunedMultiheadAttention.__qualname__ = "PrunedMultiheadAttention"
    return _PrunedMultiheadAttention
