"""Which data-free input ranks the combined allocator's candidates as real data does?

    python benchmarks/lowrank_inputs.py [--tasks minilm,digits] [--targets 0.8,0.6,0.4] [--samples 8] [--round-to 1]
                                        [--synthetic 64] [--seed 0] [--no-table]

For every task and FLOPs target it runs ``spa.prune(path, lowrank="auto", flops_target=t)``
without calibration data, with every feasible candidate of the allocator's search measured
(``spa.lowrank_alloc.MEASURED`` raised to the grid size), and keeps each candidate (pruning
ratio, ranks: a pruned and factorized copy, as the allocator builds it without data). Each is
then scored

* on real data: the task's metric (``benchmarks/_accuracy_tasks.py``: MiniLM's mean cosine of
  the pooled embeddings on its test sentences, digits' top-1 accuracy) and, for reference, the
  output error on ``--samples`` calibration samples;
* on every synthetic input scheme (:func:`schemes`: the seeded random input of
  ``spa.inputs.make_feeds`` — once, and ``--samples`` seeds —, and for token models
  ``spa.lowrank_alloc.synthetic_token_feeds`` with its id and mask schemes; for image models
  ``spa.calibration.synthetic_feeds``' uniform, pink-noise and dead-leaves images), under every error
  measure of ``spa.lowrank_alloc.ERROR_KINDS`` (relative squared error, per-position cosine,
  pooled cosine; each on the real positions of the mask) and, for image models, of
  :data:`LOGIT_KINDS` on the logits (KL of the softmaxes, top-1 disagreement), on ``--synthetic``
  random, pink and dead-leaves inputs as well; for image models each error is also combined
  with the allocator's estimate (:data:`RULES`: the product the allocator now ranks by, gates,
  the rank sum). ``--seed`` seeds the synthetic inputs.

It prints one table per target (candidates by pruning ratio) and a summary per scheme and
measure: Spearman's rank correlation with the real metric over the candidates, and the real
metric of the candidate the allocator would pick with that measurement (among those it measures:
both single methods and the two least estimates: "of 4") and among all of them (what the
allocator now measures without data: "of all"), next to the best one there; the same for the
allocator's white-input estimate alone. Then per scheme and error the figures over the targets.
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import sys
import tempfile
from typing import Any

import _common  # noqa: F401  (sys.path: repo root)
import _accuracy_tasks as T

import numpy as np
import onnx_ir as ir

import spa
from spa import io, lowrank_alloc as LA, verify
from spa.passes import lowrank_step as LS

log = logging.getLogger("lowrank_inputs")


#: Extra errors for classifier outputs (a 2-D float output [B, classes]), image models only:
#: ``kl``: the mean KL(softmax(original) ‖ softmax(candidate)) per row; ``agree``: 1 − the
#: fraction of rows whose arg-max (top-1 class) is the original's. Both scale-free in the input.
LOGIT_KINDS = ("kl", "agree")


def logit_error(ref: list[np.ndarray], got: list[np.ndarray], kind: str) -> float:
    vals = []
    for r, g in zip(ref, got):
        r, g = np.asarray(r, dtype=np.float64), np.asarray(g, dtype=np.float64)
        if r.ndim != 2 or r.shape != g.shape:
            continue
        if kind == "agree":
            vals.append(1.0 - float((r.argmax(-1) == g.argmax(-1)).mean()))
        else:
            lp = r - r.max(-1, keepdims=True)
            lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
            lq = g - g.max(-1, keepdims=True)
            lq = lq - np.log(np.exp(lq).sum(-1, keepdims=True))
            vals.append(float((np.exp(lp) * (lp - lq)).sum(-1).mean()))
    return float(np.mean(vals)) if vals else 0.0


def schemes(task: T.Task, model: ir.Model, samples: int, synthetic: int, seed: int = 0) -> dict[str, list[dict[str, np.ndarray]]]:
    from spa.inputs import make_feeds, resolve_input_shapes

    shapes = resolve_input_shapes(model, task.input_shapes)
    out = {"random x1": [make_feeds(model, shapes, seed=seed)], f"random x{samples}": [make_feeds(model, shapes, seed=seed + k) for k in range(samples)]}
    if LA.embedding_tables(model):
        for ids in ("uniform", "norm", "trim"):
            for mask in ("ones", "prefix"):
                out[f"{ids}/{mask} x{samples}"] = LA.synthetic_token_feeds(model, shapes, seed=seed, samples=samples, ids=ids, mask=mask)
    else:  # image inputs: the data-free compensation's synthetic images (spa.calibration)
        from spa.calibration import synthetic_feeds, synthetic_source

        for kind in ("uniform", "pink", "leaves"):
            if synthetic_source(model, shapes, kind) != "synthetic":
                out[f"{kind} x{samples}"] = list(synthetic_feeds(model, shapes, kind=kind, samples=samples, seed=seed))
        if synthetic > samples:  # many more inputs: the top-1 agreement needs more than 8 rows to resolve
            out[f"random x{synthetic}"] = [make_feeds(model, shapes, seed=seed + k) for k in range(synthetic)]
            for kind in ("pink", "leaves"):
                if synthetic_source(model, shapes, kind) != "synthetic":
                    out[f"{kind} x{synthetic}"] = list(synthetic_feeds(model, shapes, kind=kind, samples=synthetic, seed=seed))
    out[f"real x{samples}"] = list(task.calibration[:samples])
    return out


def _spearman(a: list[float], b: list[float]) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    if np.std(ra) == 0 or np.std(rb) == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def probe(task: T.Task, t: float, out_dir: pathlib.Path, samples: int, round_to: int = 1, synthetic: int = 0, seed: int = 0) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    records: list[dict[str, Any]] = []
    original = LS.allocation_measure

    def capturing(s, cg, removed_at):
        inner = original(s, cg, removed_at)

        def measure(ratio: float, ranks: dict[str, int]) -> float:
            from spa.passes.lowrank import LowRankPass
            from spa.passes.prune import PrunePass
            from spa.planning import build_plan

            e = inner(ratio, ranks)
            copy = ir.from_proto(ir.to_proto(s.model))
            PrunePass(build_plan(copy, cg, removed_at(ratio), fingerprints=False))(copy)
            LowRankPass(ranks)(copy)
            path = out_dir / f"{task.name}-{t}-r{round_to}-{ratio:.4f}.onnx"
            io.save_model(copy, path)
            records.append({"ratio": ratio, "factorized": len(ranks), "allocator": e, "path": path})
            return e

        measure.__dict__.update(inner.__dict__)  # candidates, rank_by: as the allocator would
        return measure

    LS.allocation_measure, measured = capturing, LA.MEASURED
    LA.MEASURED = LA.GRID
    try:
        r = spa.prune(str(task.model), flops_target=t, input_shapes=task.input_shapes, benchmark=False, lowrank="auto", round_to=round_to)
    finally:
        LS.allocation_measure, LA.MEASURED = original, measured
    alloc = r.report.options.get("lowrank_allocation") or {}
    est = {round(x["ratio"], 6): x.get("estimated_error") for x in alloc.get("tried", [])}
    model = ir.load(str(task.model))
    feeds = schemes(task, model, samples, synthetic, seed)
    kinds = LA.ERROR_KINDS + (() if LA.embedding_tables(model) else LOGIT_KINDS)
    ref = verify.session(task.model)
    refs = {k: [verify.run(ref, f) for f in fs] for k, fs in feeds.items()}
    metric = task.metrics[0]
    for rec in records:
        rec["estimate"] = est.get(round(rec["ratio"], 6))
        rec["real"] = task.evaluate(rec["path"])[metric]
        sess = verify.session(rec["path"], pruned=True)
        for k, fs in feeds.items():
            got = [verify.run(sess, f, pruned=True) for f in fs]
            for kind in kinds:
                if kind in LOGIT_KINDS:
                    rec[(k, kind)] = logit_error([a[0] for a in refs[k]], [b[0] for b in got], kind) if kind == "kl" else \
                        logit_error([np.concatenate([a[0] for a in refs[k]])], [np.concatenate([b[0] for b in got])], kind)
                else:
                    rec[(k, kind)] = float(np.mean([LA.output_error(a, b, f, kind=kind) for a, b, f in zip(refs[k], got, fs)]))
    records.sort(key=lambda x: x["ratio"])
    by_est = sorted(records, key=lambda x: x["estimate"] if x["estimate"] is not None else np.inf)
    picks = {id(x): x for x in (records[0], records[-1], *by_est[:2])}.values()
    return records, {"metric": metric, "picks": list(picks), "keys": [(k, kind) for k in feeds for kind in kinds],
                     "chosen": r.report.options.get("searched_ratio"),
                     "rules": not LA.embedding_tables(model)}


#: Image models: ways to combine a measurement with the allocator's estimate. ``gateF``: the
#: least measured error among candidates whose estimate is within F times the least estimate;
#: ``x est``: the least product of measurement and estimate (``sq x est``: of the measurement squared, the
#: estimate's currency, a squared error); ``ranksum``: the least sum of the two
#: ranks (ties: the estimate).
RULES = ("gate1.5", "gate2", "gate4", "x est", "sq x est", "ranksum")


def report(task: T.Task, t: float, records: list[dict[str, Any]], info: dict[str, Any]) -> list[dict[str, Any]]:
    keys = info["keys"]
    if not info.get("quiet"):
        print(f"\n### {task.name}, FLOPs target {t} ({info['metric']} on real data; errors: mean over feeds)\n")
        print("| ratio | factorized | estimate | " + info["metric"] + " | " + " | ".join(f"{k} {kind}" for k, kind in keys) + " |")
        print("|" + "---:|" * (4 + len(keys)))
        for rec in records:
            mark = "*" if any(rec is p for p in info["picks"]) else ""
            print(f"| {rec['ratio']:.4f}{mark} | {rec['factorized']} | {rec['estimate']} | {rec['real']:.3f} | " + " | ".join(f"{rec[k]:.3f}" for k in keys) + " |")
    summary = []
    picks = info["picks"]
    best = max(p["real"] for p in picks)
    singles = max(picks[0]["real"], picks[1]["real"]) if len(picks) > 1 else picks[0]["real"]
    for rec in records:
        rec[("estimate", "white-input")] = rec["estimate"] if rec["estimate"] is not None else np.inf
    derived = []
    if info.get("rules"):  # image models: the measurement combined with the estimate (RULES)
        est = {id(x): x[("estimate", "white-input")] for x in records}
        least = min(est.values())
        rank_e = dict(zip(map(id, sorted(records, key=lambda x: est[id(x)])), range(len(records))))
        for k in keys:
            rank_m = dict(zip(map(id, sorted(records, key=lambda x: (x[k], est[id(x)]))), range(len(records))))
            for rule in RULES:
                d = (k[0], f"{k[1]} {rule}")
                for x in records:
                    if rule.startswith("gate"):
                        x[d] = x[k] if est[id(x)] <= float(rule[4:]) * least else np.inf
                    elif rule == "x est":
                        x[d] = x[k] * est[id(x)]
                    elif rule == "sq x est":
                        x[d] = x[k] ** 2 * est[id(x)]
                    else:  # rank sum
                        x[d] = rank_m[id(x)] + rank_e[id(x)]
                derived.append(d)
    for k in [("estimate", "white-input"), *keys, *derived]:
        rho = _spearman([-x["real"] for x in records], [x[k] for x in records])
        tie = lambda x: (x[k], x[("estimate", "white-input")])  # noqa: E731  (equal measurements: the estimate decides)
        chosen = min(picks, key=tie)
        anywhere = min(records, key=tie)
        summary.append({"task": task.name, "target": t, "scheme": k[0], "error": k[1], "spearman": rho, "picked": chosen["real"],
                        "picked_all": anywhere["real"], "best": best, "best_all": max(x["real"] for x in records), "singles": singles})
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="minilm,digits")
    ap.add_argument("--targets", default="0.8,0.6,0.4")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--synthetic", type=int, default=64, help="image models: also these many random, pink and dead-leaves inputs")
    ap.add_argument("--seed", type=int, default=0, help="the synthetic inputs' seed (the allocator's --seed)")
    ap.add_argument("--no-table", action="store_true", help="print the summaries only, not the per-candidate tables")
    ap.add_argument("--round-to", type=int, default=1, help="the allocator's --round-to (kept widths and ranks)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    logging.getLogger("spa").setLevel(logging.WARNING)
    out_dir = pathlib.Path(tempfile.mkdtemp(prefix="spa-lowrank-inputs-"))
    summary = []
    for name in args.tasks.split(","):
        task = T.build(name, 32 + args.samples, True)
        task.calibration = task.calibration[32:]  # the samples benchmarks/lowrank.py holds out
        for t in (float(x) for x in args.targets.split(",")):
            records, info = probe(task, t, out_dir, args.samples, args.round_to, args.synthetic, args.seed)
            info["quiet"] = args.no_table
            summary += report(task, t, records, info)
    print("\n### Summary: Spearman (error vs −metric, over all candidates; 1 = same order) and the metric of the candidate picked\n")
    print("| task | target | scheme | error | Spearman | picked of 4 | best of 4 | picked of all | best of all | better single |")
    print("|---|---:|---|---|---:|---:|---:|---:|---:|---:|")
    for s in summary:
        print(f"| {s['task']} | {s['target']} | {s['scheme']} | {s['error']} | {s['spearman']:.2f} | {s['picked']:.3f} | {s['best']:.3f} | "
              f"{s['picked_all']:.3f} | {s['best_all']:.3f} | {s['singles']:.3f} |")
    for name in dict.fromkeys(s["task"] for s in summary):
        rows = [s for s in summary if s["task"] == name]
        targets = list(dict.fromkeys(s["target"] for s in rows))
        ts = " / ".join(str(t) for t in targets)
        first = {t: next(s for s in rows if s["target"] == t) for t in targets}
        joined = lambda xs, nd=3: " / ".join(f"{x:.{nd}f}" for x in xs)  # noqa: E731
        print(f"\n### {name}: per scheme and error, over the targets {ts} (better single: {joined(first[t]['singles'] for t in targets)}; "
              f"best candidate: {joined(first[t]['best_all'] for t in targets)})\n")
        print("| scheme | error | Spearman | picked of 4 | picked of all | never worse than the better single: of 4 / of all |")
        print("|---|---|---|---|---|---|")
        for key in dict.fromkeys((s["scheme"], s["error"]) for s in rows):
            got = [next(s for s in rows if (s["scheme"], s["error"]) == key and s["target"] == t) for t in targets]
            ok = all(g["picked_all"] >= g["singles"] - 1e-9 for g in got)
            ok4 = all(g["picked"] >= g["singles"] - 1e-9 for g in got)
            print(f"| {key[0]} | {key[1]} | {joined((g['spearman'] for g in got), 2)} | {joined(g['picked'] for g in got)} | "
                  f"{joined(g['picked_all'] for g in got)} | {'yes' if ok4 else 'no'} / {'yes' if ok else 'no'} |")
    print(f"\ncommand: python benchmarks/lowrank_inputs.py {' '.join(sys.argv[1:])}")


if __name__ == "__main__":
    main()
