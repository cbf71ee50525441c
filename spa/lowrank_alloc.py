"""The combined allocator (``--lowrank auto``): keep, prune, factorize or both, per layer.

For a budget (``--flops-target`` or ``--params-target``, a fraction of the input's figure) it
searches the pruning ratio ``p`` on a grid from 0 (low-rank only) to the ratio pruning alone
needs (prune only) and, at every ``p``, closes the remaining gap with factorizations chosen
greedily by least added error per FLOP (or param) saved. Both single methods are points of that
search. Without a ``measure`` it keeps the ``p`` whose estimated output error is least; with one
(the pipeline passes one from :func:`spa.passes.lowrank_step.allocation_measure` unless
``--verify none``) the best estimates and both
single methods are built and run in ONNX Runtime and the least measured error wins, so the
choice is never worse than either single method on those inputs (or, where the measure says
``rank_by = "product"``, the least measured × estimated error: :data:`RANK_BY`).

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
(:func:`spa.passes.lowrank_step.allocation_measure`). :data:`ERROR_KINDS` are the errors it can
compare by: without data a token model's candidates are compared by the per-position cosine on
:func:`synthetic_token_feeds` (ids from the model's embedding rows, prefix masks), which orders
MiniLM's candidates as real sentences do where the relative error and one random input did not
(``benchmarks/lowrank_inputs.py``); other models' candidates are measured on synthetic images
(or one random input) by the relative error and ranked by that times the estimate
(:data:`RANK_BY`).
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

__all__ = ["Choice", "allocate_combined", "output_error_fn", "built_error_fn", "output_error", "real_positions", "MASK_NAMES", "GRID", "MEASURED",
           "embedding_tables", "synthetic_token_feeds", "ERROR_KINDS", "RANK_BY"]

logger = logging.getLogger(__name__)

#: Pruning ratios tried, as fractions of the ratio pruning alone needs.
GRID = 9
#: Candidates with the least estimated error that are also measured (with ``measure``), unless
#: the ``measure`` says otherwise by a ``candidates`` attribute (a copy measured without data is
#: cheap: :func:`output_error_fn` measures every candidate of the grid).
MEASURED = 2
#: How the measured candidates are ranked (``measure.rank_by``): ``measured``: the least
#: measured error; ``product``: the least measured error × estimated error, the geometric mean
#: of two independent relative errors, each trusted as much as the other (no constant to tune).
#: Without data an image model's measurement is on synthetic inputs the estimate does not
#: share: on the digits CNN, the measurement alone (any synthetic input, any error) or the
#: estimate alone was worse than the better single method somewhere, the product on none of
#: nine input schemes (``benchmarks/lowrank_inputs.py``, docs/lowrank.md).
RANK_BY = ("measured", "product")
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
    is never worse than either single method on those inputs. ``measure.candidates``, where
    set, replaces :data:`MEASURED`; ``measure.rank_by`` (:data:`RANK_BY`), where ``"product"``,
    ranks the measured candidates by their measured error times their estimate instead."""
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
        picks = {id(c): c for c in (feasible[0], feasible[-1], *by_estimate[:int(getattr(measure, "candidates", MEASURED))])}
        measured = {}
        for c in picks.values():
            measured[id(c)] = float(measure(c.ratio, c.ranks))
            next(t for t in tried if t["ratio"] == c.ratio)["measured_error"] = round(measured[id(c)], 6)
        if getattr(measure, "rank_by", "measured") == "product":  # measured error × estimate (RANK_BY)
            for c in picks.values():
                next(t for t in tried if t["ratio"] == c.ratio)["score"] = round(measured[id(c)] * c.error, 8)
            best = min(picks.values(), key=lambda c: (measured[id(c)] * c.error, c.error))
        else:
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


#: :func:`output_error` kinds: ``relative``: ``sqrt(Σ (g − r)² / Σ r²)``; ``cosine``: 1 − the
#: mean cosine of each real position's output vector (its trailing dims) to the original's;
#: ``pooled``: 1 − the cosine of each batch row's output averaged over its real positions (a
#: sentence embedding's mean pooling). Outputs without a matching mask: one vector per batch row.
ERROR_KINDS = ("relative", "cosine", "pooled")


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    num = (a * b).sum(axis=-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.where(np.linalg.norm(a - b, axis=-1) == 0, 1.0, 0.0))


def output_error(ref: list[np.ndarray], got: list[np.ndarray], feed: Mapping[str, np.ndarray], kind: str = "relative") -> float:
    """The error of ``got`` against ``ref`` (float outputs; :data:`ERROR_KINDS`), each output
    counted on the real positions of :func:`real_positions` when the feed has a mask matching
    its leading dims."""
    num = den = 0.0
    dists: list[float] = []
    for r, g in zip(ref, got):
        r, g = np.asarray(r), np.asarray(g)
        if r.dtype.kind != "f" or r.shape != g.shape:
            continue
        r, g = r.astype(np.float64), g.astype(np.float64)
        keep = real_positions(feed, r.shape[:2]) if r.ndim >= 2 else None
        if kind == "relative":
            if keep is not None:
                r, g = r[keep], g[keep]  # [real positions, ...]
            num += float(((g - r) ** 2).sum())
            den += float((r**2).sum())
        elif keep is not None and r.ndim >= 3:
            r, g = r.reshape(*r.shape[:2], -1), g.reshape(*g.shape[:2], -1)  # [B, S, features]
            if kind == "cosine":
                dists.append(1.0 - float(_cosines(r[keep], g[keep]).mean()))
            else:
                w = keep[..., None].astype(np.float64)
                pool = lambda x: (x * w).sum(1) / np.maximum(w.sum(1), 1.0)  # noqa: E731
                dists.append(1.0 - float(_cosines(pool(r), pool(g)).mean()))
        else:
            lead = r.shape[0] if r.ndim >= 2 else 1
            dists.append(1.0 - float(_cosines(r.reshape(lead, -1), g.reshape(lead, -1)).mean()))
    if kind == "relative":
        return math.sqrt(num / den) if den > 0 else math.sqrt(num)
    if kind not in ERROR_KINDS:
        raise ValueError(f"error kind '{kind}' is not one of {', '.join(ERROR_KINDS)}")
    return float(np.mean(dists)) if dists else 0.0


def _reference(model: ir.Model, feeds: list[dict[str, np.ndarray]], scratch: Callable[[str], Any]) -> tuple[Any, list[list[np.ndarray]]]:
    from spa import io
    from spa import verify as verify_mod

    ref_path = scratch("allocate-original")
    io.save_model(model, ref_path, durable=False)
    ref_sess = verify_mod.session(ref_path)
    return ref_path, [verify_mod.run(ref_sess, f) for f in feeds]


def _mean_error(path: Any, feeds: list[dict[str, np.ndarray]], refs: list[list[np.ndarray]], kind: str = "relative") -> float:
    from spa import verify as verify_mod

    sess = verify_mod.session(path, pruned=True)
    errors = [output_error(ref, verify_mod.run(sess, f, pruned=True), f, kind) for f, ref in zip(feeds, refs)]
    return sum(errors) / max(len(errors), 1)


def output_error_fn(model: ir.Model, cg: ChannelGraph, removed_at: Callable[[float], dict[str, np.ndarray]],
                    feeds: list[dict[str, np.ndarray]], scratch: Callable[[str], Any], kind: str = "relative",
                    candidates: int | None = None, rank_by: str = "measured") -> Callable[[float, dict[str, int]], float]:
    """``measure`` for :func:`allocate_combined`: prune a copy at ``ratio``, factorize it at
    ``ranks`` (plain SVD), and return its mean :func:`output_error` (``kind``) against ``model``
    in ORT. What the pipeline builds when nothing is fitted to data (no calibration, no
    compensation). ``candidates``: how many of the least estimates the allocator measures
    (its ``MEASURED`` when None); ``rank_by``: how it ranks them (:data:`RANK_BY`)."""
    from spa import io
    from spa.passes.lowrank import LowRankPass
    from spa.passes.prune import PrunePass
    from spa.planning import build_plan

    if rank_by not in RANK_BY:
        raise ValueError(f"rank_by '{rank_by}' is not one of {', '.join(RANK_BY)}")
    _, refs = _reference(model, feeds, scratch)

    def measure(ratio: float, ranks: dict[str, int]) -> float:
        copy = ir.from_proto(ir.to_proto(model))
        PrunePass(build_plan(copy, cg, removed_at(ratio), fingerprints=False))(copy)
        LowRankPass(ranks)(copy)
        path = scratch("allocate-candidate")
        io.save_model(copy, path, durable=False)
        del copy
        return _mean_error(path, feeds, refs, kind)

    if candidates is not None:
        measure.candidates = candidates  # type: ignore[attr-defined]
    measure.rank_by = rank_by  # type: ignore[attr-defined]
    return measure


def built_error_fn(model: ir.Model, cg: ChannelGraph, removed_at: Callable[[float], dict[str, np.ndarray]],
                   feeds: list[dict[str, np.ndarray]], scratch: Callable[[str], Any], options: Any,
                   kind: str = "relative") -> Callable[[float, dict[str, int]], float]:
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
        return _mean_error(path, feeds, refs, kind)

    return measure


# ---------------------------------------------------------------------------------------
# Data-free inputs for token models: what the allocator measures on without calibration data.


def embedding_tables(model: ir.Model) -> dict[str, np.ndarray]:
    """Integer graph input → the 2-D float table its ids index: the data of a ``Gather`` (axis
    0) whose indices are the input, directly or through ``Cast``/``Unsqueeze``/``Reshape``/
    ``Squeeze``/``Flatten`` (a token-id input and its word-embedding rows)."""
    from spa.inputs import graph_inputs

    inits = all_initializers(model.graph)
    out: dict[str, np.ndarray] = {}
    passthrough = {"Cast", "Unsqueeze", "Reshape", "Squeeze", "Flatten", "Identity"}
    for v in graph_inputs(model):
        if v.dtype is None or not v.dtype.is_integer():
            continue
        frontier, seen = [v], set()
        while frontier and v.name not in out:
            x = frontier.pop()
            if x.name in seen:
                continue
            seen.add(x.name)
            for node, k in x.uses():
                if node.op_type == "Gather" and k == 1 and int(node.attributes.get_int("axis", 0)) == 0:
                    data = node.inputs[0]
                    init = inits.get(data.name) if data is not None else None
                    arr = init.const_value.numpy() if init is not None and init.const_value is not None else None
                    if arr is not None and arr.ndim == 2 and arr.dtype.kind == "f":
                        out[v.name] = np.asarray(arr)
                        break
                elif node.op_type in passthrough and k == 0:
                    frontier.extend(o for o in node.outputs if o is not None)
    return out


#: ``synthetic_token_feeds`` id schemes: ``binary``: 0/1 (``spa.inputs.make_feeds``);
#: ``uniform``: uniform over the table's rows; ``norm``: rows drawn with probability ∝ their L2
#: norm (rows a model never trained, e.g. BERT's ``[unused]`` tokens, keep small norms);
#: ``trim``: uniform over the rows whose norm is at least half the median row norm.
TOKEN_IDS = ("binary", "uniform", "norm", "trim")
#: mask schemes: ``random``: 0/1 per position (``make_feeds``); ``ones``: every position real;
#: ``prefix``: ones then zeros, as a tokenizer pads, the real length uniform in [S/4, S].
TOKEN_MASKS = ("random", "ones", "prefix")
#: Token-table inputs (lower case, matched at the end of the name) that are not drawn at random
#: by :func:`synthetic_token_feeds` (with any ``ids`` scheme but ``binary``): positions count
#: 0, 1, … along the last axis, segment ids are 0 (one sentence).
POSITION_NAMES = ("position_ids",)
SEGMENT_NAMES = ("token_type_ids", "segment_ids")


def _id_weights(table: np.ndarray, scheme: str) -> np.ndarray | None:
    if scheme == "uniform":
        return None
    norms = np.linalg.norm(np.asarray(table, dtype=np.float64), axis=1)
    if not np.all(np.isfinite(norms)) or norms.sum() <= 0:
        return None
    if scheme == "norm":
        return norms / norms.sum()
    keep = (norms >= 0.5 * np.median(norms)).astype(np.float64)
    return keep / keep.sum()


def synthetic_token_feeds(model: ir.Model, shapes: Mapping[str, Any], *, seed: int, samples: int = 1, ids: str = "norm",
                          mask: str = "prefix", values: Mapping[str, float] | None = None) -> list[dict[str, np.ndarray]]:
    """``samples`` seeded feeds (``seed``, ``seed + 1``, …) for a model without data, from its
    own weights only: token-id inputs (:func:`embedding_tables`) drawn by ``ids``
    (:data:`TOKEN_IDS`; position and segment inputs by name, :data:`POSITION_NAMES`,
    :data:`SEGMENT_NAMES`, count positions and are 0), attention masks (:data:`MASK_NAMES`, [B, S]
    integer or bool) by ``mask`` (:data:`TOKEN_MASKS`; ids at padded positions are 0), every other input as
    ``spa.inputs.make_feeds`` makes it. ``ids="binary", mask="random"`` is ``make_feeds``."""
    from spa.inputs import make_feeds

    if ids not in TOKEN_IDS or mask not in TOKEN_MASKS:
        raise UsageError(f"token ids must be one of {', '.join(TOKEN_IDS)} and masks one of {', '.join(TOKEN_MASKS)}")
    tables = embedding_tables(model) if ids != "binary" else {}
    weights = {name: _id_weights(t, ids) for name, t in tables.items()}
    out = []
    for k in range(samples):
        feed = make_feeds(model, shapes, seed=seed + k, values=values)
        rng = np.random.default_rng([seed + k, 1])
        for name, table in tables.items():
            if values and name in values:
                continue
            v, low = feed[name], name.lower()
            if low.endswith(POSITION_NAMES):
                feed[name] = np.broadcast_to(np.arange(v.shape[-1]) % table.shape[0], v.shape).astype(v.dtype) if v.ndim else v
            elif low.endswith(SEGMENT_NAMES):
                feed[name] = np.zeros_like(v)
            else:
                feed[name] = rng.choice(table.shape[0], size=v.shape, p=weights[name]).astype(v.dtype)
        real = None
        for name, v in list(feed.items()):
            if mask == "random" or not name.lower().endswith(MASK_NAMES) or v.ndim != 2 or v.dtype.kind not in "iub":
                continue
            if values and name in values:
                continue
            b, s = v.shape
            if mask == "ones":
                m = np.ones((b, s), dtype=bool)
            else:
                lengths = rng.integers(max(1, s // 4), s + 1, size=b)
                m = np.arange(s)[None, :] < lengths[:, None]
            feed[name] = m.astype(v.dtype)
            real = m
        if real is not None:
            for name in tables:
                if feed[name].shape == real.shape and not name.lower().endswith(POSITION_NAMES + SEGMENT_NAMES):
                    feed[name] = np.where(real, feed[name], 0).astype(feed[name].dtype)
        out.append(feed)
    return out
