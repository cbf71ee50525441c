"""Compensation: repair the consumers of removed channels without fine-tuning (METHODS §3–§5).

For a consumer ``y = W x + b`` whose input channels ``S`` are removed and ``K`` kept, the kept
columns and the bias are refitted by ridge least squares (:func:`refit`)::

    min E‖W x − (W'_K x̂_K + β)‖²  →  [W'_K, β] = W·[E[x x̂_Kᵀ], E[x]] · G⁻¹,
    G = [[E[x̂_K x̂_Kᵀ] + λ·mean(diag)·I, E[x̂_K]], [E[x̂_K]ᵀ, 1]]        b' = b + β,  W'_S = 0

where ``x`` is the consumer's input in the original model and ``x̂`` in the model being
compensated. With ``x̂ = x`` (data-free, or every layer from the original's statistics) this is
``W'_K = W_K + W_S·B_Kᵀ`` with ``x_S ≈ B_Kᵀ x_K + b₀`` — the least-squares form of the OBS
update (§3.1) with the bias as a column that is never removed — and, with data-free BatchNorm
moments (independent channels), exactly the mean shift of §4.1 (``B_K = 0``, ``β = W_S μ_S``).
With calibration data, layers are refitted in topological order from ``x̂`` of the already
repaired upstream (:func:`spa.passes.compensate.compensate_step`, as OBC/SparseGPT do). Statistics are per *channel* (C×C, shared by a conv's
kH·kW taps: the UDFC/LBYL form, exact for 1×1 convs, Gemm and MatMul); each tap's columns get
the same update.

The edits are made on a copy of the canonical input model (the *reference*), before surgery:
surgery then slices the compensated weights, and the mask oracle proves the pruned model
equals the reference with the removed slices zeroed — the proof is unchanged. Where a
consumer has no bias one is created (Conv ``B``, Gemm ``C``) and added to the plan, so
surgery slices it with the consumer's rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx_ir as ir

from spa.analysis.consumers import Consumer, ConsumerView
from spa.analysis.moments import Moments, PairMoments
from spa.graph import all_initializers
from spa.planning import Plan, TensorEdit

__all__ = ["DAMP", "Fix", "Compensation", "PairMoments", "refit", "compensate_model", "removed_columns", "removed_units", "consumers_by_weight", "consumer_refusal", "quadratic_trace"]

#: Ridge damping, relative to the mean of diag(H_KK) (SparseGPT/OBC use 1 %).
DAMP = 0.01

_KINDS = ("conv", "gemm", "matmul")


@dataclasses.dataclass
class Fix:
    """What compensation did (or why not) at one consumer weight."""

    node: str
    weight: str
    groups: list[str]
    removed: int
    kept: int
    source: str | None = None
    bias: str | None = None  # bias written (existing or created)
    bias_created: bool = False
    #: Predicted output error per position, relative to the output's energy (channel-level stats).
    error_before: float | None = None
    error_after: float | None = None
    skipped: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Compensation:
    fixes: list[Fix]
    #: Plan edits for biases compensation created (sliced with their consumer's rows).
    new_edits: list[TensorEdit]

    def per_group(self) -> dict[str, dict[str, float]]:
        """Predicted relative error before/after, summed over each group's fixed consumers."""
        out: dict[str, dict[str, float]] = {}
        for f in self.fixes:
            if f.error_before is None:
                continue
            for g in f.groups:
                e = out.setdefault(g, {"before": 0.0, "after": 0.0})
                e["before"] += f.error_before
                e["after"] += f.error_after or 0.0
        return out

    def summary(self) -> dict[str, Any]:
        done = [f for f in self.fixes if f.skipped is None]
        skipped: dict[str, int] = {}
        for f in self.fixes:
            if f.skipped:
                skipped[f.skipped] = skipped.get(f.skipped, 0) + 1
        sources: dict[str, int] = {}
        for f in done:
            sources[f.source or "?"] = sources.get(f.source or "?", 0) + 1
        return {
            "consumers_compensated": len(done),
            "biases_created": sum(f.bias_created for f in done),
            "statistics": sources,
            "skipped": skipped,
            "per_group_predicted": self.per_group(),
            "consumers": [f.to_json() for f in self.fixes],
        }


def refit(W: np.ndarray, keep: np.ndarray, p: PairMoments, *, damp: float = DAMP, with_bias: bool = True) -> tuple[np.ndarray, np.ndarray, float, float, float]:
    """Least-squares refit of one tap's columns: minimise E‖W x − (W'_K x̂_K + β)‖² + λ‖W'_K − W_K‖².

    ``W`` is [rows, C] (all input channels). Returns (W'_K [rows, |K|], β [rows] (zeros
    without bias), error before (W_K unchanged, no β), error after, output energy E‖W x‖²),
    the errors summed over rows. Ridge ``damp·mean(diag)`` on the kept channels; a dead kept
    channel (zero second moment) gets a unit diagonal so the system stays regular.
    """
    k = len(keep)
    if getattr(p, "independent", False):
        return _refit_independent(W, keep, p, damp=damp, with_bias=with_bias)
    A = p.second[np.ix_(keep, keep)]
    diag = np.diag(A).copy()
    dead = diag <= 1e-12 * max(float(diag.max(initial=0.0)), 1e-30)
    scale = float(diag[~dead].mean()) if (~dead).any() else 1.0
    size = k + 1 if with_bias else k
    G0 = np.zeros((size, size))
    G0[:k, :k] = A
    W32 = W.astype(np.float32)  # the rows·C² products in float32 BLAS; solves in float64
    R = (W32 @ p.cross[:, keep].astype(np.float32)).astype(np.float64)
    if with_bias:
        G0[:k, k] = G0[k, :k] = p.mean[keep]
        G0[k, k] = 1.0
        R = np.hstack([R, (W @ p.orig_mean)[:, None]])
    G = G0.copy()
    ridge = damp * scale + dead * scale
    G[np.arange(k), np.arange(k)] += ridge
    if with_bias:
        G[k, k] += damp  # keeps G regular when x̂_K's mean spans the constant
    # The ridge pulls W'_K towards W_K (not towards 0): with x̂ = x the solution is then
    # W_K + W_S·H_SK·(H_KK + λI)⁻¹, the damped OBS update, and never shrinks what is kept.
    pull = R.copy()
    pull[:, :k] += W[:, keep] * ridge
    try:
        sol = np.linalg.solve(G, pull.T).T
    except np.linalg.LinAlgError:
        sol = np.linalg.lstsq(G, pull.T, rcond=None)[0].T
    if not np.isfinite(sol).all():
        sol = np.hstack([W[:, keep], np.zeros((W.shape[0], size - k))])
    gram = (W32.T @ W32).astype(np.float64)  # one rows·C² product: the energy and the error before
    WK = W[:, keep]
    energy = float(np.vdot(gram, p.orig_second))
    before = energy - 2.0 * float(np.vdot(R[:, :k], WK)) + float(np.vdot(gram[np.ix_(keep, keep)], A))
    # E‖W x − sol·[x̂_K; 1]‖² = energy − 2⟨R, sol⟩ + ⟨sol·G0, sol⟩, and sol·G = pull, G − G0 diagonal
    penalty = float((sol[:, :k] ** 2 * ridge).sum()) + (damp * float((sol[:, k] ** 2).sum()) if with_bias else 0.0)
    after = energy - 2.0 * float(np.vdot(R, sol)) + float(np.vdot(pull, sol)) - penalty
    beta = sol[:, k] if with_bias else np.zeros(W.shape[0])
    return sol[:, :k], beta, max(before, 0.0), max(after, 0.0), energy


def _independent_terms(p: PairMoments, keep: np.ndarray, damp: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """The BN proxy's per-channel quantities both closed forms share: mean, variance,
    ``w = Δ⁻¹μ_K`` (``Δ = diag(v_K + ridge)``) and ``t = μ_Kᵀ w``."""
    mu = p.mean.astype(np.float64)
    diag = np.diag(p.second)
    var = diag.astype(np.float64) - mu**2
    second = diag[keep]
    dead = second <= 1e-12 * max(float(second.max(initial=0.0)), 1e-30)
    scale = float(second[~dead].mean()) if (~dead).any() else 1.0
    ridge = damp * scale + dead * scale
    muK = mu[keep]
    w = muK / (var[keep] + ridge)
    return mu, var, w, float(muK @ w)


def _independent_shift(mS: np.ndarray, t: float, damp: float, with_bias: bool) -> tuple[np.ndarray, np.ndarray]:
    """(β, u) of the closed form from ``m_S = W_S μ_S`` (per stacked row)."""
    if with_bias:
        beta = mS / (1.0 + damp * (1.0 + t))
        return beta, damp * beta
    return np.zeros_like(mS), mS / (1.0 + t)


def _refit_independent(W: np.ndarray, keep: np.ndarray, p: PairMoments, *, damp: float, with_bias: bool) -> tuple[np.ndarray, np.ndarray, float, float, float]:
    """:func:`refit` for ``x̂ = x`` with ``H = diag(v) + μμᵀ`` (the BN proxy), in closed form.

    The ridge system is diagonal plus rank one, so (derived by substitution, and tested
    against the dense solve) with ``Δ = diag(v_K + ridge)``, ``t = μ_Kᵀ Δ⁻¹ μ_K`` and
    ``m_S = W_S μ_S``:  with a bias ``β = m_S / (1 + damp·(1 + t))``, ``W'_K = W_K + damp·β ⊗ Δ⁻¹μ_K``;
    without, ``W'_K = W_K + m_S ⊗ Δ⁻¹μ_K / (1 + t)``. Errors from the same moments, O(rows·C)
    instead of the dense path's O(rows·C² + C³). :func:`compensate_model` applies the same
    update in the weight's own layout (:func:`_update_independent`).
    """
    mu, var, w, t = _independent_terms(p, keep, damp)
    drop = np.setdiff1d(np.arange(len(mu)), keep)
    WK, WS = W[:, keep], W[:, drop]
    muK, vK, muS, vS = mu[keep], var[keep], mu[drop], var[drop]
    mS = WS @ muS
    beta, u = _independent_shift(mS, t, damp, with_bias)
    sol = WK + np.outer(u, w)
    if not np.isfinite(sol).all() or not np.isfinite(beta).all():
        sol, beta, u = WK.copy(), np.zeros(W.shape[0]), np.zeros(W.shape[0])
    # E‖W x − W'_K x_K − β‖² with independent channels: ‖mean‖² + Σ variances.
    removed_var = float(((WS**2) @ vS).sum())
    energy = float(((WK**2) @ vK).sum()) + removed_var + float(((WK @ muK + mS) ** 2).sum())
    before = removed_var + float((mS**2).sum())
    # W_K − W'_K = −u ⊗ w: its mean term is −u·t, its variance term u²·Σ w² v_K.
    err_mean = mS - beta - u * t
    after = float((err_mean**2).sum() + (u**2).sum() * float(w**2 @ vK)) + removed_var
    return sol, beta, max(before, 0.0), max(after, 0.0), energy


def _update_independent(M3: np.ndarray, keep: np.ndarray, p: PairMoments, *, damp: float, with_bias: bool) -> tuple[np.ndarray, float, float, float]:
    """:func:`_refit_independent` on a weight ``M3`` [rows, C, taps] in place (kept columns
    updated, removed ones zeroed), without stacking the taps into rows: the gathers,
    transposes and scatters of the stacked form were most of data-free's time on ResNet-50.
    Returns (β [rows, taps], error before, error after, energy), the errors as there."""
    rows, C, r = M3.shape
    mu, var, w, t = _independent_terms(p, keep, damp)
    drop = np.setdiff1d(np.arange(C), keep)
    P = np.zeros((C, 2))
    P[:, 0] = mu
    P[drop, 1] = mu[drop]
    m = np.tensordot(M3, P, axes=([1], [0]))  # [rows, r, 2]: W μ and W_S μ_S per (row, tap)
    mW, mS = m[..., 0], m[..., 1]
    beta, u = _independent_shift(mS, t, damp, with_bias)
    if not np.isfinite(u).all() or not np.isfinite(w).all() or not np.isfinite(beta).all():
        beta, u = np.zeros_like(mS), np.zeros_like(mS)
    q = np.einsum("rct,rct->c", M3, M3)  # Σ over rows and taps of W², per channel
    removed_var = float(q[drop] @ var[drop])
    energy = float(q[keep] @ var[keep]) + removed_var + float((mW**2).sum())
    before = removed_var + float((mS**2).sum())
    err_mean = mS - beta - u * t
    after = float((err_mean**2).sum() + (u**2).sum() * float(w**2 @ var[keep])) + removed_var
    full = np.zeros(C)
    full[keep] = w
    M3 += u[:, None, :] * full[None, :, None]
    M3[:, drop, :] = 0.0
    return beta, max(before, 0.0), max(after, 0.0), energy


def _arrays(m: Moments | PairMoments) -> list[np.ndarray]:
    return [m.second, m.mean] + ([m.cross, m.orig_second, m.orig_mean] if isinstance(m, PairMoments) else [])


def _finite(m: Moments | PairMoments, memo: dict[int, bool]) -> bool:
    """No NaN/inf in the statistics; each array checked once (consumers of one activation share
    its moments, and ``x̂ = x`` shares them within a PairMoments)."""
    for a in _arrays(m):
        if id(a) not in memo:
            memo[id(a)] = bool(np.isfinite(a).all())
        if not memo[id(a)]:
            return False
    return True


def quadratic_trace(W: np.ndarray, H: np.ndarray) -> float:
    """tr(W H Wᵀ) through BLAS (a three-operand einsum is a naive loop: minutes on ResNet-50)."""
    return float(np.vdot(W @ H, W))


def removed_units(plan: Plan) -> dict[str, np.ndarray]:
    return {g.id: np.asarray(g.removed, dtype=np.int64) for g in plan.groups if g.removed}


def consumers_by_weight(view: ConsumerView, removed: Mapping[str, np.ndarray]) -> dict[tuple[str, str], list[Consumer]]:
    """The consumers of removed units keyed by (node, weight): one weight may read several
    groups' channels (a Concat of two branches); it is refitted once for all of them."""
    by_key: dict[tuple[str, str], list[Consumer]] = {}
    for c in view:
        if c.group in removed:
            by_key.setdefault((c.node, c.weight), []).append(c)
    return by_key


def removed_columns(consumers: list[Consumer], removed: Mapping[str, np.ndarray]) -> np.ndarray:
    """Ascending weight indices along the consumers' axis that the plan removes."""
    # ``Consumer.columns_of`` for every removed unit at once (thousands of units on ResNet-50)
    cols = [np.flatnonzero(np.isin(c.unit_of_column, removed[c.group])) for c in consumers if len(removed.get(c.group, ()))]
    return np.unique(np.concatenate(cols)).astype(np.int64, copy=False) if cols else np.zeros(0, dtype=np.int64)


def consumer_refusal(c: Consumer) -> str | None:
    """Why this consumer's layout is outside what the per-channel update handles."""
    if c.kind not in _KINDS:
        return f"{c.kind} consumer"
    if c.weight_path:
        return "weight read through " + "→".join(c.weight_path_ops)
    if c.out_axis is None or c.activation is None:
        return "no [rows, columns] form"
    if c.activation_size != c.weight_shape[c.axis] or not np.array_equal(c.channel, c.column):
        return "columns are not the activation's channels one to one"
    return None


def compensate_model(
    model: ir.Model,
    plan: Plan,
    view: ConsumerView,
    moments: Mapping[str, Moments | PairMoments],
    *,
    damp: float = DAMP,
    only: set[tuple[str, str]] | None = None,
) -> Compensation:
    """Edit ``model`` (a copy of the analysed model) so the consumers make up for the removed
    channels; removed columns are zeroed. Returns what was done and the plan edits for
    created biases. Weights read by more than one node are left alone (an edit would change
    the other reader)."""
    removed = removed_units(plan)
    inits = all_initializers(model.graph)
    edits = {e.name: e for e in plan.tensors}
    by_key = consumers_by_weight(view, removed)
    nodes = {n.name: n for n in model.graph.all_nodes()}
    fixes: list[Fix] = []
    new_edits: list[TensorEdit] = []
    finite: dict[int, bool] = {}
    for (node_name, weight_name), cs in by_key.items():
        if only is not None and (node_name, weight_name) not in only:
            continue
        c = cs[0]
        drop = removed_columns(cs, removed)
        fix = Fix(node_name, weight_name, sorted({x.group for x in cs}), len(drop), c.weight_shape[c.axis] - len(drop))
        fixes.append(fix)
        if not len(drop):
            fix.skipped = "nothing removed here"
            continue
        reason = consumer_refusal(c) or next((consumer_refusal(x) for x in cs[1:] if consumer_refusal(x)), None)
        value = inits.get(weight_name)
        if reason is None and (value is None or value.const_value is None):
            reason = "weight is not an initializer"
        if reason is None and len(list(value.uses())) != 1:
            reason = "weight shared by several nodes"
        m = moments.get(c.activation)
        if reason is None and (m is None or m.mean.shape[0] != c.activation_size):
            reason = "no statistics for its input"
        if reason is None and not _finite(m, finite):
            reason = "statistics hold NaN/inf"
        if reason is not None:
            fix.skipped = reason
            continue
        node = nodes[node_name]
        bias_target = _bias_target(c, node, model, inits)
        keep = np.setdiff1d(np.arange(c.activation_size), drop)
        p = m if isinstance(m, PairMoments) else PairMoments.same(m)
        W = value.const_value.numpy()
        M = c.as_matrix(W).astype(np.float64)
        r, rows = c.receptive, M.shape[0]
        # One solve for all taps: they share the channel statistics, so stack their rows
        # (column ``channel·r + tap`` of M; tap-major rows in ``stacked``).
        M3 = M.reshape(rows, c.activation_size, r)
        if getattr(p, "independent", False):  # the closed form, in place in the weight's layout
            beta, before, after, total = _update_independent(M3, keep, p, damp=damp, with_bias=bias_target is not None)
            delta = np.ascontiguousarray(beta.T).sum(axis=0)
        else:
            stacked = M3.transpose(2, 0, 1).reshape(r * rows, c.activation_size)
            WK, beta, before, after, total = refit(stacked, keep, p, damp=damp, with_bias=bias_target is not None)
            M3[:, keep, :] = WK.reshape(r, rows, len(keep)).transpose(1, 2, 0)
            M3[:, drop, :] = 0.0
            delta = beta.reshape(r, rows).sum(axis=0)
        M = M3.reshape(rows, -1)
        new = c.from_matrix(M).astype(W.dtype)
        if not np.isfinite(new).all():
            fix.skipped = "update not finite"
            continue
        value.const_value = ir.tensor(new, name=weight_name)
        fix.source = m.source
        fix.error_before = before / max(total, 1e-30)
        fix.error_after = after / max(total, 1e-30)
        if bias_target is not None:
            name, created = bias_target(delta * (c.weight_scale / c.bias_scale))
            fix.bias, fix.bias_created = name, created
            if created and weight_name in edits and c.out_axis in edits[weight_name].kept:
                rows = edits[weight_name].kept[c.out_axis]
                new_edits.append(TensorEdit(name=name, shape=[M.shape[0]], kept={0: list(rows)}, roles={0: ["out"]}))
    return Compensation(fixes, new_edits)


def _bias_target(c: Consumer, node: ir.Node, model: ir.Model, inits: Mapping[str, ir.Value]):
    """A function adding a delta to the consumer's per-row bias (creating one if the op has an
    optional bias input), returning (bias name, created); None where no bias can be had."""
    if c.bias is not None:
        value = inits.get(c.bias)
        if value is None or value.const_value is None or len(list(value.uses())) != 1:
            return None
        if c.bias_scale == 0:
            return None

        def add(delta: np.ndarray, value=value) -> tuple[str, bool]:
            b = value.const_value.numpy()
            shape = b.shape
            flat = b.reshape(-1).astype(np.float64) + delta
            value.const_value = ir.tensor(flat.reshape(shape).astype(b.dtype), name=value.name)
            return value.name, False

        return add
    if node.op_type not in ("Conv", "Gemm"):
        return None
    if node.op_type == "Gemm":
        beta = node.attributes.get("beta")
        if beta is not None and float(beta.value) == 0.0:
            return None
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            return None  # a C that is not a per-row bias
    elif len(node.inputs) > 2 and node.inputs[2] is not None:
        return None

    def create(delta: np.ndarray) -> tuple[str, bool]:
        W = inits[c.weight].const_value
        dtype = W.dtype.numpy()
        name = f"{node.name}.spa_bias"
        taken = set(inits)
        k = 1
        while name in taken:
            name, k = f"{node.name}.spa_bias{k}", k + 1
        value = ir.Value(name=name, shape=ir.Shape([len(delta)]), type=ir.TensorType(W.dtype), const_value=ir.tensor(delta.astype(dtype), name=name))
        model.graph.register_initializer(value)
        if len(node.inputs) < 3:
            node.resize_inputs(3)
        node.replace_input_with(2, value)
        return name, True

    return create
