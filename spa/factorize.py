"""Low-rank factorization math: layers as matrices, spectra, rank choice, factors (METHODS.md §6).

A *layer* is a Gemm, a MatMul with a constant 2-D weight, or a Conv (any group count), read
as ``y = W x`` with ``W`` of ``m × n`` per conv group (§0's im2col layout: a conv group's
``[M/g, C/g·kH·kW]``). ``W ≈ W₂ W₁`` with ``W₂ = U_r S_r^½`` (``m × r``) and
``W₁ = S_r^½ V_rᵀ`` (``r × n``): the balanced split keeps both factors' magnitudes alike.
It pays only where ``r (m + n) < m n`` (params and FLOPs alike, also per conv group).

Data-aware (activation-whitened) SVD for Gemm/MatMul: with ``H = E[x xᵀ] = L Lᵀ`` the SVD of
``W L`` minimises the *output* error ``E‖(W − W_r) x‖²``; the factors are
``W₂ = U_r S_r^½`` and ``W₁ = S_r^½ V_rᵀ L⁻¹``, and the relative output error at rank r is
``sqrt(Σ_{i>r} s_i² / Σ s_i²)`` of that spectrum (without whitening: of W's spectrum, the
output error for white inputs).

Nothing here mutates a model: :func:`find_layers` reads one, :func:`factor` returns arrays.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from spa.errors import UsageError
from spa.graph import all_initializers, attr, is_constant

__all__ = [
    "LOWRANK_MODES",
    "Layer",
    "Spectrum",
    "find_layers",
    "layer_matrices",
    "spectrum",
    "energy_rank",
    "round_rank",
    "pays",
    "break_even",
    "truncation_error",
    "factor",
    "whitener",
    "check_energy",
    "check_rank",
    "rank_options",
    "weight_from_matrices",
]

#: ``--lowrank``: none; energy (every layer at ``--lowrank-energy``); auto (the allocator
#: chooses keep / prune / factorize / both per layer for ``--flops-target``).
LOWRANK_MODES = ("none", "energy", "auto")


def check_energy(energy: float, what: str = "the energy threshold (--lowrank-energy, spa lowrank --energy)") -> float:
    if not isinstance(energy, (int, float)) or isinstance(energy, bool) or not math.isfinite(energy) or not 0.0 < energy <= 1.0:
        raise UsageError(f"{what} must be a number in (0, 1], got {energy!r}")
    return float(energy)


def check_rank(rank: object, what: str) -> int:
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise UsageError(f"{what}: a rank must be an integer ≥ 1, got {rank!r}")
    return rank


@dataclasses.dataclass(frozen=True)
class Layer:
    """One factorable node, read as ``groups`` matrices of ``m × n``."""

    node: str
    op_type: str
    weight: str
    weight_shape: tuple[int, ...]
    groups: int
    m: int
    n: int
    #: Gemm: transB; the matrix is Bᵀ when False.
    trans_b: bool = False

    @property
    def full_rank(self) -> int:
        return min(self.m, self.n)

    def macs_ratio(self, rank: int) -> float:
        """MACs of the factor pair over the layer's (the same for FLOPs and params)."""
        return rank * (self.m + self.n) / (self.m * self.n)


def _weight_value(node: ir.Node, index: int, inits: Mapping[str, ir.Value]) -> ir.Value | None:
    v = node.inputs[index] if len(node.inputs) > index else None
    if v is None or not is_constant(v) or v.name not in inits:
        return None
    return v


def find_layers(model: ir.Model) -> tuple[list[Layer], dict[str, str]]:
    """Factorable layers of the main graph, and why each other candidate node is not one
    (node name → reason). Subgraphs are not visited: their weights are left as they are."""
    inits = all_initializers(model.graph)
    layers: list[Layer] = []
    refused: dict[str, str] = {}
    for node in model.graph:
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("Gemm", "MatMul", "Conv"):
            continue
        w = _weight_value(node, 1, inits)
        if w is None:
            if node.op_type != "MatMul":
                refused[node.name] = "its weight is not a constant initializer"
            continue  # activation × activation MatMuls (attention) are not layers
        if len(w.uses()) != 1:
            refused[node.name] = f"weight '{w.name}' is shared with another node"
            continue
        if w.name in {o.name for o in model.graph.outputs}:
            refused[node.name] = f"weight '{w.name}' is a graph output"
            continue
        shape = tuple(int(d) for d in w.shape) if w.shape is not None and all(isinstance(d, int) for d in w.shape) else None
        if shape is None:
            refused[node.name] = f"weight '{w.name}' has no static shape"
            continue
        dtype = w.const_value.dtype if w.const_value is not None else None
        if dtype not in (ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16):
            refused[node.name] = f"weight '{w.name}' is {dtype} (only float weights are factorized)"
            continue
        if node.op_type == "MatMul":
            if len(shape) != 2:
                refused[node.name] = f"weight '{w.name}' has rank {len(shape)} (a batched MatMul weight)"
                continue
            layers.append(Layer(node.name, "MatMul", w.name, shape, 1, shape[1], shape[0]))
        elif node.op_type == "Gemm":
            tb = bool(attr(node, "transB", 0))
            m, n = (shape[0], shape[1]) if tb else (shape[1], shape[0])
            layers.append(Layer(node.name, "Gemm", w.name, shape, 1, m, n, trans_b=tb))
        else:
            if len(shape) < 3:
                refused[node.name] = f"weight '{w.name}' has rank {len(shape)}"
                continue
            g = int(attr(node, "group", 1))
            if shape[0] % g:
                refused[node.name] = f"weight '{w.name}' has {shape[0]} outputs, not a multiple of group {g}"
                continue
            layers.append(Layer(node.name, "Conv", w.name, shape, g, shape[0] // g, int(np.prod(shape[1:]))))
    return layers, refused


def layer_matrices(layer: Layer, weight: np.ndarray) -> np.ndarray:
    """``[groups, m, n]``: the layer's weight as ``y = W x`` matrices (float64)."""
    w = np.asarray(weight, dtype=np.float64)
    if layer.op_type == "Conv":
        return w.reshape(layer.groups, layer.m, layer.n)
    if layer.op_type == "Gemm" and layer.trans_b:
        return w[None]
    return w.T[None]


def weight_from_matrices(layer: Layer, mats: np.ndarray) -> np.ndarray:
    """The inverse of :func:`layer_matrices` (for a dense reconstruction)."""
    if layer.op_type == "Conv":
        return mats.reshape(layer.weight_shape)
    if layer.op_type == "Gemm" and layer.trans_b:
        return mats[0]
    return mats[0].T


@dataclasses.dataclass(frozen=True)
class Spectrum:
    """Singular values per group (``[groups, min(m, n)]``, descending), whitened or not."""

    values: np.ndarray
    whitened: bool = False

    @property
    def energy(self) -> np.ndarray:
        return (self.values**2).sum(axis=0)

    def total(self) -> float:
        return float((self.values**2).sum())


def whitener(H: np.ndarray, damp: float = 1e-6) -> np.ndarray:
    """Lower-triangular ``L`` with ``L Lᵀ = H + damp·mean(diag H)·I`` (Cholesky)."""
    H = np.asarray(H, dtype=np.float64)
    lam = damp * max(float(np.mean(np.diag(H))), 1e-12)
    return np.linalg.cholesky(H + lam * np.eye(H.shape[0]))


def spectrum(layer: Layer, weight: np.ndarray, L: np.ndarray | None = None) -> Spectrum:
    """The layer's singular values (of ``W L`` when a whitener is given). ValueError, with the
    reason, for NaN/inf weights or an SVD that does not converge: the caller keeps the layer."""
    mats = layer_matrices(layer, weight)
    values = []
    for g in range(layer.groups):
        mat = mats[g] @ L if L is not None else mats[g]
        values.append(_singular_values(mat, f"weight '{layer.weight}'"))
    return Spectrum(np.stack(values), whitened=L is not None)


def _singular_values(mat: np.ndarray, what: str) -> np.ndarray:
    """Singular values from the eigenvalues of the smaller Gram matrix (float64): the energy
    split is all rank choice needs, and it is many times faster than an SVD on big layers."""
    if not np.isfinite(mat).all():
        raise ValueError(f"{what} holds NaN or inf")
    gram = mat @ mat.T if mat.shape[0] <= mat.shape[1] else mat.T @ mat
    try:
        ev = np.linalg.eigvalsh(gram)
    except np.linalg.LinAlgError as e:
        raise ValueError(f"the SVD of {what} does not converge ({e})") from e
    return np.sqrt(np.clip(ev[::-1], 0.0, None))


def energy_rank(spec: Spectrum, energy: float) -> int:
    """Smallest r whose leading singular values hold ``energy`` of the total (summed over groups)."""
    cum = np.cumsum(spec.energy)
    total = cum[-1] if cum.size else 0.0
    if total <= 0:
        return 1
    return int(min(np.searchsorted(cum, energy * total * (1 - 1e-12)) + 1, cum.size))


def round_rank(rank: int, round_to: int, full: int) -> int:
    """Up to a multiple of ``round_to`` (never above ``full``): rounding keeps more, never less."""
    if round_to > 1:
        rank = int(math.ceil(rank / round_to) * round_to)
    return max(1, min(rank, full))


def break_even(m: int, n: int) -> float:
    return m * n / (m + n)


def pays(layer: Layer, rank: int) -> bool:
    """Whether rank ``rank`` costs fewer FLOPs than the layer: r < m n / (m + n)."""
    return rank * (layer.m + layer.n) < layer.m * layer.n


def truncation_error(spec: Spectrum, rank: int) -> float:
    """Relative (output, for the whitened spectrum) error of keeping ``rank`` values:
    sqrt(discarded energy / total energy)."""
    e = spec.energy
    total = float(e.sum())
    return float(math.sqrt(max(float(e[rank:].sum()), 0.0) / total)) if total > 0 else 0.0


def factor(layer: Layer, weight: np.ndarray, rank: int, L: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(W₂ [groups, m, r], W₁ [groups, r, n])`` with ``W ≈ W₂ W₁`` per group (float64): the
    rank-r truncated SVD, balanced (``U_r S_r^½`` and ``S_r^½ V_rᵀ``).

    Computed from the eigenvectors of the smaller Gram matrix (``W Wᵀ`` or ``Wᵀ W``): W₂W₁ is
    then ``U_r U_rᵀ W`` (or ``W V_r V_rᵀ``), the Eckart–Young projection, exact at full rank
    however small the last singular values, and many times faster than an SVD of a wide layer."""
    mats = layer_matrices(layer, weight)
    w2s, w1s = [], []
    for g in range(layer.groups):
        mat = mats[g] @ L if L is not None else mats[g]
        if not np.isfinite(mat).all():
            raise ValueError(f"weight '{layer.weight}' holds NaN or inf")
        wide = mat.shape[0] <= mat.shape[1]
        gram = mat @ mat.T if wide else mat.T @ mat
        try:
            ev, vec = np.linalg.eigh(gram)
        except np.linalg.LinAlgError as e:
            raise ValueError(f"the SVD of weight '{layer.weight}' does not converge ({e})") from e
        order = np.argsort(ev)[::-1][:rank]
        s = np.sqrt(np.clip(ev[order], 0.0, None))
        floor = max(float(s[0]) if s.size else 0.0, 1e-30) * 1e-12
        root = np.sqrt(np.maximum(s, floor))
        vec = vec[:, order]
        if wide:  # vec = U_r
            w2 = vec * root[None, :]
            w1 = (vec.T @ mat) / root[:, None]
        else:  # vec = V_r
            w2 = (mat @ vec) / root[None, :]
            w1 = root[:, None] * vec.T
        if L is not None:
            w1 = np.linalg.solve(L.T, w1.T).T  # w1 · L⁻¹
        w2s.append(w2)
        w1s.append(w1)
    return np.stack(w2s), np.stack(w1s)


def rank_options(layer: Layer, round_to: int) -> list[int]:
    """Ranks that pay, descending, multiples of ``round_to`` (all of them when 1)."""
    step = max(1, round_to)
    top = int(math.ceil(break_even(layer.m, layer.n))) - 1
    return [r for r in range(top, 0, -1) if r % step == 0 and pays(layer, r)] or []
