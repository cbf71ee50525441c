"""The combined allocator (``--lowrank auto``): keep, prune, factorize or both, per layer.

For a budget (``--flops-target`` or ``--params-target``, a fraction of the input's figure) it
searches the pruning ratio ``p`` on a grid from 0 (low-rank only) to the ratio pruning alone
needs (prune only) and, at every ``p``, closes the remaining gap with factorizations chosen
greedily by least added error per FLOP (or param) saved. Both single methods are points of that
search. Without a ``measure`` it keeps the ``p`` whose estimated output error is least; with one
(the pipeline passes one from :func:`spa.passes.lowrank_step.allocation_measure` unless
``--verify none``) the best estimates and both
single methods are built and run in ONNX Runtime and the least measured error wins, so the
choice is never worse than either single method on those inputs.

The estimate, one number per layer added over layers (relative squared output error for white
inputs, METHODS.md §3/§6), uses the same currency for both methods:

- pruning: for every weight that *reads* removed channels (an IN-role axis), the energy of
  the removed input slices over the weight's energy (what zeroing those inputs costs the
  layer's output);
- factorizing at rank r: the discarded singular energy over the total, from the spectrum of
  the weight *as pruned* at that ``p`` (its kept rows and columns).

Layers are those of :func:`spa.factorize.find_layers`; a grouped conv whose weight is sliced by
pruning is not factorized at that ``p`` (its group count may change).

Measuring (:func:`output_error`): the relative L2 error of the float outputs, on the real
positions only where the feed has an attention mask (:func:`real_positions`): padding positions
are not data, and on MiniLM two thirds of every calibration sentence is padding. Two builders of
``measure``: :func:`output_error_fn` prunes and factorizes a copy (exact when nothing is fitted
to data), :func:`built_error_fn` builds each candidate with the pipeline itself (``spa.apply``:
compensation, activation-whitened factors, folding, as the result will be built), for the
pipeline to call on calibration samples held out from that fitting
(:func:`spa.passes.lowrank_step.allocation_measure`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import onnx_ir as ir

from spa.analysis.channels import ChannelGraph
from spa.analysis.cost import CostModel
from spa.errors import UsageError
from spa.graph import all_initializers
from spa.factorize import Layer, find_layers, rank_options, spectrum
from spa.rules.base import Role

__all__ = ["Choice", "allocate_combined", "output_error_fn", "built_error_fn", "output_error", "real_positions", "MASK_NAMES", "GRID", "MEASURED"]

logger = logging.getLogger(__name__)

#: Pruning ratios tried, as fractions of the ratio pruning alone needs.
GRID = 9
#: Candidates with the least estimated error that are also measured (with ``measure``).
MEASURED = 2
#: Input names (lower case, matched at the end of the name) read as an attention mask: a [B, S]
#: integer or bool input of 0/1, 1 on real tokens (Hugging Face's ``attention_mask``, BERT's
#: ``input_mask``). Outputs (and activations) whose leading dims are [B, S] are measured on the
#: positions where it is 1.
MASK_NAMES = ("attention_mask", "input_mask")


@dataclasses.dataclass
class Choice:
    ratio: float
    ranks: dict[str, int]
    figure: float
    prune_error: float
    lowrank_error: float
    #: every (ratio, estimated error, figure reached) tried, for the report
    tried: list[dict[str, float]] = dataclasses.field(default_factory=list)

    @property
    def error(self) -> float:
        return self.prune_error + self.lowrank_error


def _kept(cg: ChannelGraph, removed: Mapping[str, np.ndarray]) -> dict[tuple[str, int], np.ndarray]:
    out: dict[tuple[str, int], np.ndarray] = {}
    by_id = {g.id: g for g in cg.groups}
    for gid, units in removed.items():
        if len(units) == 0:
            continue
        g = by_id[gid]
        for d in g.dims:
            out[(d.value, d.axis)] = g.kept_indices(d, units)
    return out


def _prune_error(cg: ChannelGraph, removed: Mapping[str, np.ndarray], read: Callable[[str], np.ndarray], memo: dict) -> float:
    """Σ over weights reading removed channels of removed-slice energy / weight energy."""
    total = 0.0
    by_id = {g.id: g for g in cg.groups}
    for gid, units in removed.items():
        if len(units) == 0:
            continue
        g = by_id[gid]
        for d in g.weight_dims(Role.IN):
            key = (d.value, d.axis)
            if key not in memo:
                w = np.asarray(read(d.value), dtype=np.float64)
                axes = tuple(a for a in range(w.ndim) if a != d.axis)
                memo[key] = (w**2).sum(axis=axes) if w.ndim > 1 else w**2
            per = memo[key]
            if per.sum() <= 0:
                continue
            gone = ~np.isin(np.arange(per.size), g.kept_indices(d, units))
            total += float(per[gone].sum() / per.sum())
    return total


def _sliced_layer(layer: Layer, kept: Mapping[tuple[str, int], np.ndarray], read: Callable[[str], np.ndarray]) -> tuple[Layer, np.ndarray] | None:
    w = read(layer.weight)
    axes = {a: kept[(layer.weight, a)] for a in range(w.ndim) if (layer.weight, a) in kept}
    if not axes:
        return layer, w
    if layer.groups > 1:
        return None
    for a, idx in axes.items():
        w = np.take(w, idx, axis=a)
    shape = tuple(int(s) for s in w.shape)
    if layer.op_type == "Conv":
        m, n = shape[0], int(np.prod(shape[1:]))
    elif layer.op_type == "Gemm" and layer.trans_b:
        m, n = shape
    else:
        n, m = shape
    return dataclasses.replace(layer, weight_shape=shape, m=m, n=n), w


def _fill(layers: list[tuple[Layer, np.ndarray, float]], need: float, round_to: int, spectra: dict) -> tuple[dict[str, int], float, float] | None:
    """Greedy: factorizations that save ``need`` (FLOPs or params) at least added error.
    ``layers``: (layer as pruned, its weight, its figure). Returns (ranks, error, saved)."""
    opts = []
    for layer, w, fig in layers:
        ranks = rank_options(layer, round_to)
        if not ranks or fig <= 0:
            continue
        key = (layer.weight, layer.weight_shape)
        if key not in spectra:
            try:
                spectra[key] = spectrum(layer, w)
            except ValueError as e:
                logger.info("not factorized: %s", e)
                spectra[key] = None
        spec = spectra[key]
        if spec is None:
            continue
        e = spec.energy
        total = float(e.sum()) or 1.0
        tail = np.concatenate([np.cumsum(e[::-1])[::-1], [0.0]]) / total  # tail[r] = discarded energy at rank r
        opts.append((layer, [(r, float(tail[r]), fig * (1 - layer.macs_ratio(r))) for r in ranks]))
    cur = [-1] * len(opts)
    arrays = [(np.array([o[1] for o in options]), np.array([o[2] for o in options])) for _, options in opts]

    def best_move(i: int) -> tuple[float, int]:
        """(added error per unit saved, option index) of layer i's best next rank."""
        errs, saves = arrays[i]
        e0, s0 = (errs[cur[i]], saves[cur[i]]) if cur[i] >= 0 else (0.0, 0.0)
        de, ds = errs[cur[i] + 1:] - e0, saves[cur[i] + 1:] - s0
        ok = ds > 0
        if not ok.any():
            return math.inf, -1
        score = np.where(ok, de / np.where(ok, ds, 1.0), np.inf)
        j = int(np.argmin(score))
        return float(score[j]), cur[i] + 1 + j

    moves = [best_move(i) for i in range(len(opts))]
    err = saved = 0.0
    while saved < need:
        i = min(range(len(opts)), key=lambda k: moves[k][0], default=None)
        if i is None or moves[i][1] < 0:
            return None
        j = moves[i][1]
        errs, saves = arrays[i]
        e0, s0 = (errs[cur[i]], saves[cur[i]]) if cur[i] >= 0 else (0.0, 0.0)
        err += float(errs[j] - e0)
        saved += float(saves[j] - s0)
        cur[i] = j
        moves[i] = best_move(i)
    ranks = {opts[i][0].weight: opts[i][1][c][0] for i, c in enumerate(cur) if c >= 0}
    return ranks, err, saved


def allocate_combined(
    model: ir.Model,
    cg: ChannelGraph,
    cost: CostModel,
    removed_at: Callable[[float], dict[str, np.ndarray]],
    size_fn: Callable[[dict[str, np.ndarray]], Callable[[str, int], int | None]],
    *,
    target: float,
    figure: str = "flops",
    round_to: int = 1,
    prune_ratio: float,
    measure: Callable[[float, dict[str, int]], float] | None = None,
) -> Choice:
    """See the module docstring. ``prune_ratio``: the ratio pruning alone needs (or its floor).

    ``measure(ratio, ranks) -> relative output error`` (ORT on real or seeded inputs): when
    given, the candidates with the least estimates and both single methods (the smallest and
    the largest feasible ratio) are measured and the least *measured* error wins, so the choice
    is never worse than either single method on those inputs."""
    read = _reader(model)
    layers, _ = find_layers(model)
    base = float(getattr(cost.count(), figure))
    goal = target * base
    memo: dict = {}
    spectra: dict = {}
    feasible: list[Choice] = []
    tried = []
    seen: set = set()
    for p in sorted({round(float(x), 6) for x in np.linspace(0.0, prune_ratio, GRID)}):
        removed = removed_at(p)
        key = tuple(sorted((g, tuple(int(u) for u in units)) for g, units in removed.items() if len(units)))
        if key in seen:  # the same removal as a smaller ratio (the --min-keep floor): nothing new
            continue
        seen.add(key)
        counted = cost.count(size_fn(removed), per_node=True)
        now = float(getattr(counted, figure))
        perr = _prune_error(cg, removed, read, memo)
        kept = _kept(cg, removed)
        cands = []
        for layer in layers:
            sl = _sliced_layer(layer, kept, read)
            if sl is None:
                continue
            macs = counted.per_node.get(layer.node, (0, 0))[1] if figure == "flops" else int(np.prod(sl[0].weight_shape))
            cands.append((sl[0], sl[1], float(macs)))
        if now <= goal:
            got = ({}, 0.0, 0.0)
        else:
            got = _fill(cands, now - goal, round_to, spectra)
        if got is None:
            tried.append({"ratio": p, "estimated_error": math.inf, "figure": now / base})
            continue
        ranks, lerr, saved = got
        if now <= goal:
            saved = 0.0
        c = Choice(p, ranks, (now - saved) / base, perr, lerr)
        tried.append({"ratio": p, "estimated_error": round(c.error, 6), "figure": round(c.figure, 6), "factorized": len(ranks)})
        feasible.append(c)
    if not feasible:
        raise UsageError(f"the {figure} target {target:g} is out of reach: pruning as far as --min-keep allows and factorizing "
                         f"every layer at its lowest rank that pays leaves more")
    best = min(feasible, key=lambda c: c.error)
    if measure is not None and len(feasible) > 1:
        by_estimate = sorted(feasible, key=lambda c: c.error)
        picks = {id(c): c for c in (feasible[0], feasible[-1], *by_estimate[:MEASURED])}
        measured = {}
        for c in picks.values():
            measured[id(c)] = float(measure(c.ratio, c.ranks))
            next(t for t in tried if t["ratio"] == c.ratio)["measured_error"] = round(measured[id(c)], 6)
        best = min(picks.values(), key=lambda c: measured[id(c)])
    best.tried = tried
    return best


def _reader(model: ir.Model) -> Callable[[str], np.ndarray]:
    inits = all_initializers(model.graph)
    return lambda name: np.asarray(inits[name].const_value.numpy())


def real_positions(feed: Mapping[str, np.ndarray], lead: tuple[int, ...]) -> np.ndarray | None:
    """The feed's attention mask as a bool array of shape ``lead`` (a tensor's leading [B, S]
    dims), or None where the feed has no such mask (:data:`MASK_NAMES`: 2-D, integer or bool,
    only 0 and 1, not all 0) or it does not match ``lead``: then every position counts."""
    for name, value in feed.items():
        if not name.lower().endswith(MASK_NAMES):
            continue
        v = np.asarray(value)
        if v.ndim != 2 or v.dtype.kind not in "iub" or tuple(lead[:2]) != v.shape or len(lead) < 2:
            continue
        if not np.isin(v, (0, 1)).all() or not v.any():
            continue
        return v.astype(bool)
    return None


def output_error(ref: list[np.ndarray], got: list[np.ndarray], feed: Mapping[str, np.ndarray]) -> float:
    """``sqrt(Σ (g − r)² / Σ r²)`` over the float outputs, each output counted on the real
    positions of :func:`real_positions` when the feed has a mask matching its leading dims."""
    num = den = 0.0
    for r, g in zip(ref, got):
        r, g = np.asarray(r), np.asarray(g)
        if r.dtype.kind != "f" or r.shape != g.shape:
            continue
        r, g = r.astype(np.float64), g.astype(np.float64)
        keep = real_positions(feed, r.shape[:2]) if r.ndim >= 2 else None
        if keep is not None:
            r, g = r[keep], g[keep]  # [real positions, ...]
        num += float(((g - r) ** 2).sum())
        den += float((r**2).sum())
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)


def _reference(model: ir.Model, feeds: list[dict[str, np.ndarray]], scratch: Callable[[str], Any]) -> tuple[Any, list[list[np.ndarray]]]:
    from spa import io
    from spa import verify as verify_mod

    ref_path = scratch("allocate-original")
    io.save_model(model, ref_path, durable=False)
    ref_sess = verify_mod.session(ref_path)
    return ref_path, [verify_mod.run(ref_sess, f) for f in feeds]


def _mean_error(path: Any, feeds: list[dict[str, np.ndarray]], refs: list[list[np.ndarray]]) -> float:
    from spa import verify as verify_mod

    sess = verify_mod.session(path, pruned=True)
    errors = [output_error(ref, verify_mod.run(sess, f, pruned=True), f) for f, ref in zip(feeds, refs)]
    return sum(errors) / max(len(errors), 1)


def output_error_fn(model: ir.Model, cg: ChannelGraph, removed_at: Callable[[float], dict[str, np.ndarray]],
                    feeds: list[dict[str, np.ndarray]], scratch: Callable[[str], Any]) -> Callable[[float, dict[str, int]], float]:
    """``measure`` for :func:`allocate_combined`: prune a copy at ``ratio``, factorize it at
    ``ranks`` (plain SVD), and return its mean :func:`output_error` against ``model`` in ORT.
    What the pipeline builds when nothing is fitted to data (no calibration, no compensation)."""
    from spa import io
    from spa.passes.lowrank import LowRankPass
    from spa.passes.prune import PrunePass
    from spa.planning import build_plan

    _, refs = _reference(model, feeds, scratch)

    def measure(ratio: float, ranks: dict[str, int]) -> float:
        copy = ir.from_proto(ir.to_proto(model))
        PrunePass(build_plan(copy, cg, removed_at(ratio), fingerprints=False))(copy)
        LowRankPass(ranks)(copy)
        path = scratch("allocate-candidate")
        io.save_model(copy, path, durable=False)
        del copy
        return _mean_error(path, feeds, refs)

    return measure


def built_error_fn(model: ir.Model, cg: ChannelGraph, removed_at: Callable[[float], dict[str, np.ndarray]],
                   feeds: list[dict[str, np.ndarray]], scratch: Callable[[str], Any], options: Any) -> Callable[[float, dict[str, int]], float]:
    """``measure`` for :func:`allocate_combined` that builds every candidate as the result is
    built: the plan for ``removed_at(ratio)`` with ``ranks`` replayed by ``spa.apply`` on
    ``model`` with ``options`` (a ``PruneOptions``: its compensation, calibration data, fold;
    verification and benchmark off). Returns its mean :func:`output_error` on ``feeds``.

    Calibration compensation and the whitened SVD are least-squares fits to the calibration
    data: measured on the samples they were fitted to, a candidate looks better than it is
    (MiniLM, FLOPs 0.6: pruning with compensation measured 0.12 relative error on its own
    calibration sentences and 0.82 on held-out ones). The caller passes held-out ``feeds``."""
    from spa import io
    from spa.pipeline import apply
    from spa.planning import build_plan

    src, refs = _reference(model, feeds, scratch)

    def measure(ratio: float, ranks: dict[str, int]) -> float:
        opts = dataclasses.replace(options, lowrank="auto", lowrank_ranks=dict(ranks))
        plan = build_plan(model, cg, removed_at(ratio), options=opts.plan_options(), fingerprints=False)
        result = apply(str(src), plan, options=opts)
        path = scratch("allocate-candidate")
        io.save_model(result.model, path, durable=False)
        del result
        return _mean_error(path, feeds, refs)

    return measure
