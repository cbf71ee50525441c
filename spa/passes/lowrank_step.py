"""The ``lowrank`` stage of the pipeline: choose ranks, factorize, verify, report.

After surgery and the mask oracle (which proves the pruning) and after ``fold``:

1. ranks: the allocator's (``--lowrank auto``, recorded in the plan as ``lowrank_ranks`` so
   ``spa apply`` replays them) or, per layer, the smallest rank holding ``--lowrank-energy`` of
   the (whitened, with calibration data) singular energy, rounded up to ``--round-to``; a layer
   is factorized only where that rank pays (r < m·n/(m+n)). A layer whose weight holds NaN/inf
   or whose SVD does not converge is left as it was, with the reason in the report;
2. :class:`~spa.passes.lowrank.LowRankPass`; with calibration data, Gemm/MatMul layers use the
   activation-whitened SVD (E[x xᵀ] from ``spa.analysis.moments.collect`` on the model being
   factorized; over the real-token positions only where the feeds have an attention mask,
   ``spa.lowrank_alloc.real_positions``);
3. verification (``--verify full``): the *full-rank* factorization of the same layers must give
   the model's outputs (the oracle of the rewrite), then each truncated layer's relative output
   error ‖(W − W_r) x‖ / ‖W x + b‖ is measured on its real input x (ORT, the verification
   inputs), and the whole model's relative output error against the model before the step and
   against the original.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import onnx_ir as ir

from spa import io
from spa import verify as verify_mod
from spa.analysis.moments import MAX_POSITIONS, collect, exposing_session
from spa.calibration import open_calibration
from spa.errors import UsageError
from spa.graph import all_initializers, attr
from spa.factorize import Layer, break_even, energy_rank, factor, find_layers, pays, round_rank, spectrum, truncation_error, weight_from_matrices, whitener
from spa.passes.fold import _checked_swap, assert_same
from spa.lowrank_alloc import MASK_NAMES, real_positions
from spa.passes.lowrank import LowRankPass

if TYPE_CHECKING:  # pragma: no cover
    from spa.pipeline import State

__all__ = ["lowrank_step", "choose_ranks", "relative_error", "allocation_feeds", "allocation_measure", "IMAGE_SAMPLES", "IMAGE_KIND", "IMAGE_RANK_BY", "held_out_split", "HELD_OUT",
           "SYNTHETIC_SAMPLES", "SYNTHETIC_IDS", "SYNTHETIC_MASK", "DATA_FREE_ERROR"]

logger = logging.getLogger(__name__)


def relative_error(ref: list[np.ndarray], got: list[np.ndarray]) -> float:
    num = den = 0.0
    for r, g in zip(ref, got):
        r, g = np.asarray(r, dtype=np.float64), np.asarray(g, dtype=np.float64)
        if r.dtype.kind != "f" or r.shape != g.shape:
            continue
        num += float(np.sum((r - g) ** 2))
        den += float(np.sum(r**2))
    return float(np.sqrt(num / den)) if den > 0 else float(np.sqrt(num))


def _activation(model: ir.Model, layer: Layer) -> tuple[str, int] | None:
    """(input name, channel axis) of a Gemm/MatMul layer, for whitening."""
    node = next(n for n in model.graph if n.name == layer.node)
    if layer.op_type == "Conv" or (layer.op_type == "Gemm" and int(attr(node, "transA", 0))):
        return None
    x = node.inputs[0]
    return (x.name, -1 if layer.op_type == "MatMul" else 1) if x is not None else None


def _whiteners(s: State, layers: list[Layer], rows: dict[str, dict[str, Any]]) -> dict[str, np.ndarray]:
    o = s.options
    calib = s.calibration or open_calibration(o.calibration, s.model, o.calibration_samples)
    if calib is None:
        return {}
    wanted = {l.weight: _activation(s.model, l) for l in layers}
    tensors = {a[0]: a[1] for a in wanted.values() if a is not None}
    if not tensors:
        return {}
    masked = _has_mask(calib)
    if masked:
        seconds, used = _real_second_moments(s.model, tensors, calib, s.scratch("lowrank-statistics"), o.calibration_samples, o.seed)
    else:
        moments, used = collect(s.model, tensors, calib, path=s.scratch("lowrank-statistics"), max_samples=o.calibration_samples, seed=o.seed)
        seconds = {n: m.second for n, m in moments.items()}
    out = {}
    for weight, a in wanted.items():
        H = seconds.get(a[0]) if a is not None else None
        if H is None:
            continue
        try:
            out[weight] = whitener(H, o.damp if o.damp > 0 else 1e-6)
        except np.linalg.LinAlgError:
            rows[weight]["note"] = "E[x xᵀ] is not positive definite: plain SVD"
    s.notes.setdefault("lowrank_statistics", {"tensors": len(tensors), "samples": used,
                                              "positions": "attention mask == 1" if masked else "all"})
    return out


def _has_mask(calib: Any) -> bool:
    first = next(iter(calib), None)
    return first is not None and any(name.lower().endswith(MASK_NAMES) for name in first)


def _real_second_moments(model: ir.Model, tensors: Mapping[str, int], feeds: Any, path: Any, max_samples: int, seed: int) -> tuple[dict[str, np.ndarray], int]:
    """E[x xᵀ] of each tensor over the real positions of its feed (``real_positions``: the
    attention mask, where the tensor's leading dims are [B, S]; all positions otherwise), at
    most ``MAX_POSITIONS`` per feed, seeded, as ``collect`` samples them. Padding positions are
    not data: fitted to them, the factors would spend their rank on what no user reads."""
    names = list(tensors)
    sess = exposing_session(model, names, path)
    rng = np.random.default_rng(seed)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    rows: dict[str, list[np.ndarray]] = {}

    def flush(name: str) -> None:  # one float32 GEMM per ~4096 positions, float64 sums across
        x = np.concatenate(rows.pop(name))
        sums[name] = sums.get(name, 0.0) + (x.T @ x).astype(np.float64)
        counts[name] = counts.get(name, 0) + x.shape[0]

    samples = 0
    for feed in feeds:
        if samples >= max_samples:
            break
        for name, out in zip(names, sess.run(names, dict(feed))):
            out = np.asarray(out)
            if out.dtype.kind != "f" or out.ndim == 0:
                continue
            x = np.moveaxis(out, tensors[name] % out.ndim, -1)  # [..., C]
            keep = real_positions(feed, x.shape[:-1]) if x.ndim >= 3 else None
            x = x[keep] if keep is not None else x.reshape(-1, x.shape[-1])  # [positions, C]
            if x.shape[0] > MAX_POSITIONS:
                x = x[np.sort(rng.choice(x.shape[0], MAX_POSITIONS, replace=False))]
            rows.setdefault(name, []).append(np.asarray(x, dtype=np.float32))
            if sum(r.shape[0] for r in rows[name]) >= 4096:
                flush(name)
        first = next(iter(feed.values()), None)
        samples += int(first.shape[0]) if first is not None and np.ndim(first) else 1
    for name in list(rows):
        flush(name)
    return {n: sums[n] / max(counts[n], 1) for n in sums}, samples


#: Calibration feeds held out from the fitting to measure the allocator's candidates on: a
#: quarter of them, at least one, at most this many.
HELD_OUT = 8


def held_out_split(n: int, seed: int) -> tuple[list[int], list[int]]:
    """(fit, held out) indices of ``n`` calibration feeds: a seeded quarter held out (1 to
    ``HELD_OUT``); with one feed there is nothing to hold out and both are ``[0]``."""
    if n < 2:
        return list(range(n)), list(range(n))
    h = max(1, min(HELD_OUT, n // 4))
    held = sorted(int(i) for i in np.random.default_rng(seed).permutation(n)[:h])
    return [i for i in range(n) if i not in held], held


#: Without calibration data, a model with token-id inputs (``spa.lowrank_alloc.embedding_tables``)
#: is measured on this many seeded synthetic feeds (``o.seed``, ``o.seed + 1``, …): one random
#: feed (ids 0/1, a random 0/1 mask) ranked MiniLM's candidates in nearly the reverse order of
#: real sentences (docs/lowrank.md, ``benchmarks/lowrank_inputs.py``). Other models: one
#: seeded random feed here (data-free compensation); with nothing fitted see ``IMAGE_SAMPLES``.
SYNTHETIC_SAMPLES = 8
#: Token ids and attention masks of those feeds (``spa.lowrank_alloc.synthetic_token_feeds``):
#: ids drawn from the embedding rows in proportion to their norm, masks ones then zeros.
SYNTHETIC_IDS, SYNTHETIC_MASK = "norm", "prefix"
#: What the allocator compares a token model's candidates by without data
#: (``spa.lowrank_alloc.ERROR_KINDS``): the per-position cosine, which on synthetic and on real
#: MiniLM inputs orders candidates as the embeddings' cosine on real sentences does; the
#: relative squared error does not, even on real sentences. Other models: ``relative``.
DATA_FREE_ERROR = "cosine"


#: Without calibration data and with nothing fitted, a model without token inputs whose input
#: is an image (``spa.calibration.synthetic_source``: float, 4-D, both spatial dims ≥ 8) is
#: measured on this many seeded ``IMAGE_KIND`` images (``spa.calibration.synthetic_feeds``,
#: 1/f "pink" noise), other such models on one seeded random input; both by the relative error,
#: the candidates ranked by measured error × estimate (``IMAGE_RANK_BY``,
#: ``spa.lowrank_alloc.RANK_BY``): on the digits CNN the measurement alone on one random input
#: chose pruning (accuracy 0.538) over low rank (0.974) at FLOPs 0.6 with --round-to 8, and no
#: synthetic input or error measure alone was never worse than the better single method; the
#: product was, on every input scheme tried (docs/lowrank.md, ``benchmarks/lowrank_inputs.py``).
IMAGE_SAMPLES, IMAGE_KIND, IMAGE_RANK_BY = 8, "pink", "product"


def _image_feeds(s: State) -> list[dict[str, np.ndarray]] | None:
    """``IMAGE_SAMPLES`` seeded ``IMAGE_KIND`` feeds where the model has an image input, else None."""
    from spa.calibration import synthetic_feeds, synthetic_source
    from spa.inputs import resolve_input_shapes

    o = s.options
    shapes = resolve_input_shapes(s.model, o.input_shapes)
    if synthetic_source(s.model, shapes, IMAGE_KIND, o.input_values) == "synthetic":
        return None
    return list(synthetic_feeds(s.model, shapes, kind=IMAGE_KIND, samples=IMAGE_SAMPLES, seed=o.seed, values=o.input_values))


def _token_model(s: State) -> bool:
    from spa.lowrank_alloc import embedding_tables

    return bool(embedding_tables(s.model))


def allocation_feeds(s: State) -> list[dict[str, np.ndarray]]:
    """What the allocator measures on without calibration data: for a model with token-id
    inputs, ``SYNTHETIC_SAMPLES`` seeded feeds from its own weights
    (``spa.lowrank_alloc.synthetic_token_feeds``: ids by embedding-row norm, prefix attention
    masks, other inputs as ``spa.inputs.make_feeds`` makes them); otherwise one seeded random
    feed (``make_feeds``), as the verification inputs are made."""
    from spa.inputs import resolve_input_shapes
    from spa.lowrank_alloc import synthetic_token_feeds

    o = s.options
    shapes = resolve_input_shapes(s.model, o.input_shapes)
    n = SYNTHETIC_SAMPLES if _token_model(s) else 1
    return synthetic_token_feeds(s.model, shapes, seed=o.seed, samples=n, ids=SYNTHETIC_IDS, mask=SYNTHETIC_MASK, values=o.input_values)


def _synthetic_note(s: State) -> str:
    from spa.lowrank_alloc import embedding_tables

    tokens = embedding_tables(s.model)
    if not tokens:
        return "one seeded random input"
    return f"{SYNTHETIC_SAMPLES} seeded synthetic feeds: token ids ({', '.join(tokens)}) by embedding-row norm, attention masks a prefix of ones"


def allocation_measure(s: State, cg: Any, removed_at: Any) -> Any:
    """``measure`` for the combined allocator (``spa.lowrank_alloc``), and how it measures in
    ``s.notes["lowrank_measurement"]``.

    Nothing fitted to data (no calibration, ``--compensate none``): each candidate pruned and
    factorized on a copy; for a token model every candidate of the grid, on
    :func:`allocation_feeds`, by the per-position cosine (``DATA_FREE_ERROR``); otherwise the
    usual four, on ``IMAGE_SAMPLES`` synthetic images (an image input) or one random input, by
    the relative error, ranked by measured × estimated error (``IMAGE_RANK_BY``). Otherwise each candidate is built by the pipeline
    (``spa.apply``: compensation, the whitened SVD, folding, as the result will be); with
    calibration data, fitted on three quarters of the samples and measured on the quarter held
    out (:func:`held_out_split`) by the relative output error, since a fit measured on its own
    samples looks better than it is; without (data-free compensation), on
    :func:`allocation_feeds`, by the cosine for a token model. Outputs are compared on real positions where the
    feeds have an attention mask."""
    import dataclasses
    import itertools

    from spa.lowrank_alloc import GRID, built_error_fn, output_error_fn

    o = s.options
    calib = s.calibration or open_calibration(o.calibration, s.model, o.calibration_samples)
    tokens = calib is None and _token_model(s)
    if calib is None and o.compensate == "none":
        images = None if tokens else _image_feeds(s)
        feeds = images or allocation_feeds(s)
        kind = DATA_FREE_ERROR if tokens else "relative"
        rank_by = "measured" if tokens else IMAGE_RANK_BY
        inputs = f"{IMAGE_SAMPLES} seeded synthetic {IMAGE_KIND}-noise images" if images else _synthetic_note(s)
        s.notes["lowrank_measurement"] = {"built": "pruned and factorized copy (nothing fitted)", "inputs": inputs,
                                          "positions": _positions_note(feeds), "error": kind,
                                          "candidates": "every one of the grid" if tokens else "both single methods and the least estimates",
                                          "ranked_by": "measured error" if tokens else "measured error × estimated error"}
        return output_error_fn(s.model, cg, removed_at, feeds, s.scratch, kind=kind, candidates=GRID if tokens else None, rank_by=rank_by)
    fit: list[dict[str, np.ndarray]] | None = None
    kind = "relative"
    if calib is None:
        feeds = allocation_feeds(s)
        inputs, kind = _synthetic_note(s), DATA_FREE_ERROR if tokens else "relative"
    else:
        data = list(itertools.islice(iter(calib), o.calibration_samples))
        fit_i, held_i = held_out_split(len(data), o.seed)
        fit, feeds = [data[i] for i in fit_i], [data[i] for i in held_i]
        inputs = (f"{len(feeds)} held-out calibration feeds (candidates fitted on the other {len(fit)})" if fit_i != held_i
                  else "the one calibration feed, also fitted on (nothing to hold out)")
    options = dataclasses.replace(o, calibration=fit, verify="none", benchmark=False, target="onnx", keep_opset=False, tune_trials=0,
                                  latency_target=None)
    s.notes["lowrank_measurement"] = {"built": "by the pipeline (spa.apply: compensation, whitened factors, fold as requested)",
                                      "inputs": inputs, "positions": _positions_note(feeds), "error": kind}
    return built_error_fn(s.model, cg, removed_at, feeds, s.scratch, options, kind=kind)


def _positions_note(feeds: list[dict[str, np.ndarray]]) -> str:
    return "attention mask == 1 (outputs with leading [B, S] dims)" if feeds and any(n.lower().endswith(MASK_NAMES) for n in feeds[0]) else "all"


def choose_ranks(s: State, layers: list[Layer], whiteners: Mapping[str, np.ndarray], rows: dict[str, dict[str, Any]]) -> dict[str, int]:
    """Rank per weight (see the module docstring); rows get the reason for every layer kept."""
    o = s.options
    ranks: dict[str, int] = {}
    by_weight = {l.weight: l for l in layers}
    chosen = s.lowrank_ranks if s.lowrank_ranks is not None else o.lowrank_ranks
    if chosen is not None:
        for weight, r in chosen.items():
            layer = by_weight.get(weight)
            if layer is None:
                raise UsageError(f"lowrank_ranks names '{weight}', which is not the weight of a factorable layer of this model")
            if not 1 <= r <= layer.full_rank:
                raise UsageError(f"lowrank_ranks: rank {r} for '{weight}' is out of range [1, {layer.full_rank}]")
            ranks[weight] = r
        for weight, row in rows.items():
            if weight not in ranks:
                row.setdefault("reason", "the allocator keeps it")
        return ranks
    inits = all_initializers(s.model.graph)
    for layer in layers:
        row = rows[layer.weight]
        try:
            spec = spectrum(layer, inits[layer.weight].const_value.numpy(), whiteners.get(layer.weight))
        except ValueError as e:
            row["reason"] = f"left as it was: {e}"
            continue
        r = round_rank(energy_rank(spec, o.lowrank_energy), o.round_to, layer.full_rank)
        row["energy_rank"] = r
        if not pays(layer, r):
            row["reason"] = f"rank {r} for {o.lowrank_energy:g} of the energy does not pay (break-even {break_even(layer.m, layer.n):.1f})"
            continue
        ranks[layer.weight] = r
    return ranks


def lowrank_step(s: State) -> bool:
    o = s.options
    layers, refused = find_layers(s.model)
    per_node = s.cost().count(per_node=True).per_node
    rows: dict[str, dict[str, Any]] = {}
    for l in layers:
        flops = int(per_node.get(l.node, (0, 0))[1])
        rows[l.weight] = {"layer": l.node, "weight": l.weight, "op": l.op_type, "shape": list(l.weight_shape), "groups": l.groups,
                          "full_rank": l.full_rank, "break_even": round(break_even(l.m, l.n), 2), "action": "keep", "rank": None,
                          "flops_before": flops, "flops_after": flops}
    sliced = {t.name for t in (s.surgery_plan or s.plan).tensors} if s.plan is not None else set()
    for row in rows.values():
        if row["weight"] in sliced:
            row["action"] = "prune"  # its channels were cut by the plan (before any factorization)
    chosen = s.lowrank_ranks if s.lowrank_ranks is not None else o.lowrank_ranks
    whiteners = _whiteners(s, [l for l in layers if chosen is None or l.weight in chosen], rows)  # given ranks: only their layers
    ranks = choose_ranks(s, layers, whiteners, rows)
    report: dict[str, Any] = {"mode": o.lowrank, "energy": o.lowrank_energy if o.lowrank == "energy" else None,
                              "whitened": sorted(w for w in ranks if w in whiteners), "layers": list(rows.values()),
                              "refused": [{"layer": n, "reason": r} for n, r in refused.items()]}
    s.lowrank_report = report
    if not ranks:
        return False
    by_weight = {l.weight: l for l in layers}
    inits = all_initializers(s.model.graph)
    dense: dict[str, tuple[Layer, np.ndarray, np.ndarray]] = {}
    factors: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for w, r in ranks.items():
        layer = by_weight[w]
        W = inits[w].const_value.numpy()
        w2, w1 = factor(layer, W, r, whiteners.get(w))
        factors[w] = (w2, w1)
        dense[w] = (layer, W, weight_from_matrices(layer, w2 @ w1).astype(W.dtype))
        spec = spectrum(layer, W, whiteners.get(w))
        row = rows[w]
        row.update(action="both" if row["action"] == "prune" else "factorize", rank=r, flops_after=int(round(row["flops_before"] * layer.macs_ratio(r))),
                   estimated_error=round(truncation_error(spec, r), 6))
    before = s.pruned_path
    LowRankPass(ranks, whiteners, factors)(s.model)
    _checked_swap(s, "lowrank", "low-rank factorization", report, exact=False)
    if before is not None and o.verify == "full" and s.feeds is not None:
        _verify(s, before, ranks, whiteners, dense, rows, report)
    return True


def _verify(s: State, before, ranks, whiteners, dense, rows, report) -> None:
    full = io.load_model(before)
    LowRankPass({w: dense[w][0].full_rank for w in ranks}, whiteners)(full)
    path = s.scratch("lowrank-full-rank")
    io.save_model(full, path, durable=False)
    del full
    ref = verify_mod.run(verify_mod.session(before), s.feeds)
    got = verify_mod.run(verify_mod.session(path, pruned=True), s.feeds, pruned=True)
    report["full_rank_max_abs_diff"] = assert_same(ref, got, "full-rank factorization (the rewrite's oracle)")
    final = verify_mod.run(verify_mod.session(s.pruned_path, pruned=True), s.feeds, pruned=True)
    report["output_error_vs_before"] = round(relative_error(ref, final), 6)
    original = verify_mod.run(verify_mod.session(s.snapshot_path), s.feeds)
    report["output_error_vs_original"] = round(relative_error(original, final), 6)
    pre = io.load_model(before)
    names = {}
    for w in ranks:
        node = next(n for n in pre.graph if n.name == dense[w][0].node)
        names[w] = node.inputs[0].name
    unique = list(dict.fromkeys(names.values()))
    xs = dict(zip(unique, exposing_session(pre, unique, s.scratch("lowrank-inputs")).run(unique, dict(s.feeds))))
    for w in ranks:
        node = next(n for n in pre.graph if n.name == dense[w][0].node)
        layer, W, Wr = dense[w]
        rows[w]["error"] = round(_layer_error(node, xs[names[w]], W, Wr), 6)


def _layer_error(node: ir.Node, x: np.ndarray, W: np.ndarray, Wr: np.ndarray) -> float:
    """‖node(x; W − W_r, no bias)‖ / ‖node(x; W, bias)‖ in ORT, a one-node model each."""
    proto = ir.serde.serialize_node(node)
    inputs = [i.name if i is not None else "" for i in node.inputs]
    bias = {}
    for k, v in enumerate(node.inputs[2:], start=2):
        if v is not None and v.const_value is not None:
            bias[inputs[k]] = v.const_value.numpy()

    def run(weight: np.ndarray, with_bias: bool) -> np.ndarray:
        n = onnx.NodeProto()
        n.CopyFrom(proto)
        del n.input[:]
        n.input.extend([inputs[0], inputs[1]] + ([i for i in inputs[2:]] if with_bias else []))
        n.output[:] = ["y"]
        inits = [onnx.numpy_helper.from_array(weight, inputs[1])]
        if with_bias:
            inits += [onnx.numpy_helper.from_array(b, k) for k, b in bias.items()]
        g = onnx.helper.make_graph([n], "layer", [onnx.helper.make_tensor_value_info(inputs[0], onnx.helper.np_dtype_to_tensor_dtype(x.dtype), list(x.shape))],
                                   [onnx.helper.make_tensor_value_info("y", onnx.helper.np_dtype_to_tensor_dtype(x.dtype), None)], inits)
        m = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 17)])
        import onnxruntime as ort

        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {inputs[0]: x})[0]

    y = run(W, True).astype(np.float64)
    e = run((W.astype(np.float64) - Wr.astype(np.float64)).astype(W.dtype), False).astype(np.float64)
    den = float(np.linalg.norm(y))
    return float(np.linalg.norm(e) / den) if den > 0 else float(np.linalg.norm(e))
