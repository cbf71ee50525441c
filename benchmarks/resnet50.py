"""ResNet-50 at ratio 0.5: spa vs Torch-Pruning vs onnxsim's structured pruning.

    python benchmarks/resnet50.py [--ratio 0.5] [--runs 30] [--threads 2] [--no-tp] [--no-onnxsim]

Exports the zoo's from-scratch ResNet-50 (random weights, BN folded), then prunes it three
ways at the same ratio:

* spa on the ONNX file (criterion l1, uniform allocation, verify full: the oracle runs);
* Torch-Pruning on the same torch module (``MetaPruner``, ``MagnitudeImportance(p)``, the
  final ``fc`` ignored), the pruned module exported to ONNX like the zoo exports;
* onnxsim's ONNX-native ``apply_structured_pruning_cpp`` (when the installed onnxsim has it).

Every ONNX file is costed the same way (onnx-ir ``ShapeInferencePass`` + spa's
``CostModel``) and timed side by side in one ONNX Runtime run: the same 1x3x224x224 input,
``--threads`` intra-op threads, runs interleaved round-robin, median of ``--runs`` runs each
after ``--warmup`` warm-up runs.

Exit status 1 if a target is missed: spa's FLOPs ≤ ``--flops-target`` of the original and
spa's speedup ≥ ``--speedup-target``. Columns where spa is worse than Torch-Pruning are
listed (and fail the run only with ``--fail-if-worse-than-tp``).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
import tempfile
import time
import warnings

import _common  # noqa: F401  (sys.path: repo root and models/)
from _common import fmt, latency_side_by_side, table

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

import spa
from spa.analysis.cost import CostModel


def onnx_cost(path: pathlib.Path) -> dict[str, float]:
    model = ir.load(str(path))
    ShapeInferencePass()(model)
    cm = CostModel(model)
    c = cm.count()
    if cm.unknown:
        print(f"warning: {path.name}: {len(cm.unknown)} node(s) without shapes, counted as 0", file=sys.stderr)
    return {"macs": c.macs, "flops": c.flops, "params": c.params}


def _dist_version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"


def run_spa(src: pathlib.Path, out: pathlib.Path, args) -> dict:
    t0 = time.perf_counter()
    result = spa.prune(
        str(src), ratio=args.ratio, criterion="l1", allocation="uniform", verify="full", benchmark=False
    )
    result.save(out)
    wall = time.perf_counter() - t0
    rep = result.report
    return {
        "wall_s": wall,
        "max_diff": (rep.oracle or {}).get("max_abs_diff"),
        "oracle_passed": (rep.oracle or {}).get("passed"),
        "timings": rep.timings,
        "groups": f"{rep.groups_pruned}/{rep.groups_total} pruned, {rep.groups_blocked} blocked, {rep.groups_partial} partial",
    }


def run_tp(out: pathlib.Path, args) -> dict:
    import torch
    import torch_pruning as tp
    import zoo

    model, shape = zoo.build("resnet50")
    example = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    pruner = tp.pruner.MetaPruner(
        model,
        example,
        importance=tp.importance.MagnitudeImportance(p=args.tp_p),
        pruning_ratio=args.ratio,
        ignored_layers=[model.fc],
    )
    pruner.step()
    prune_s = time.perf_counter() - t0
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            torch.onnx.export(
                model, (example,), str(out), dynamo=False, do_constant_folding=True, opset_version=17,
                input_names=["input"], output_names=["output"],
            )
    return {"wall_s": time.perf_counter() - t0, "prune_s": prune_s, "version": _dist_version("torch-pruning")}


def run_onnxsim(src: pathlib.Path, out: pathlib.Path, args) -> dict:
    try:
        import onnxsim
    except ImportError:
        return {"available": False, "why": "onnxsim not installed"}
    version = _dist_version("onnxsim")
    fn = getattr(onnxsim, "apply_structured_pruning_cpp", None)
    if fn is None:
        return {"available": False, "why": f"onnxsim {version} has no apply_structured_pruning_cpp"}
    import onnx

    t0 = time.perf_counter()
    model = fn(str(src), sparsity=args.ratio, importance_norm="l1", global_sparsity=False)
    onnx.save(model, str(out))
    return {"available": True, "wall_s": time.perf_counter() - t0, "version": version}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--runs", type=int, default=30, help="timed runs per model (at least 20)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="ORT intra-op threads")
    ap.add_argument("--tp-p", type=int, default=1, choices=(1, 2), help="MagnitudeImportance norm")
    ap.add_argument("--no-tp", action="store_true", help="skip Torch-Pruning")
    ap.add_argument("--no-onnxsim", action="store_true", help="skip onnxsim")
    ap.add_argument("--flops-target", type=float, default=0.30)
    ap.add_argument("--speedup-target", type=float, default=1.8)
    ap.add_argument("--fail-if-worse-than-tp", action="store_true")
    ap.add_argument("--tp-tolerance", type=float, default=0.05,
                    help="relative slack before spa counts as worse than Torch-Pruning")
    ap.add_argument("--json", type=pathlib.Path, help="also write the results here")
    ap.add_argument("--keep", type=pathlib.Path, help="keep the ONNX files in this folder")
    args = ap.parse_args(argv)
    if args.runs < 20:
        ap.error("--runs must be at least 20")

    import zoo

    work = pathlib.Path(tempfile.mkdtemp(prefix="spa-bench-r50-", dir="/tmp"))
    try:
        paths = {"original": work / "resnet50.onnx"}
        t0 = time.perf_counter()
        zoo.export("resnet50", paths["original"])
        print(f"exported ResNet-50 in {time.perf_counter() - t0:.1f}s")

        info: dict[str, dict] = {}
        paths["spa"] = work / "resnet50.spa.onnx"
        info["spa"] = run_spa(paths["original"], paths["spa"], args)
        print(f"spa: {info['spa']['wall_s']:.2f}s ({info['spa']['groups']})")
        if not args.no_tp:
            try:
                paths["torch-pruning"] = work / "resnet50.tp.onnx"
                info["torch-pruning"] = run_tp(paths["torch-pruning"], args)
                print(f"torch-pruning {info['torch-pruning']['version']}: {info['torch-pruning']['wall_s']:.2f}s "
                      f"(prune {info['torch-pruning']['prune_s']:.2f}s + ONNX export)")
            except ImportError:
                paths.pop("torch-pruning")
                print("torch-pruning: not installed (pip install torch-pruning)")
        if not args.no_onnxsim:
            r = run_onnxsim(paths["original"], work / "resnet50.onnxsim.onnx", args)
            if r["available"]:
                paths["onnxsim"] = work / "resnet50.onnxsim.onnx"
                info["onnxsim"] = r
                print(f"onnxsim {r['version']} apply_structured_pruning_cpp: {r['wall_s']:.2f}s")
            else:
                print(f"onnxsim: not available ({r['why']})")

        costs = {n: onnx_cost(p) for n, p in paths.items()}
        rng = np.random.default_rng(0)
        feeds = {"input": rng.standard_normal((1, 3, 224, 224)).astype(np.float32)}
        lat = latency_side_by_side(paths, feeds, threads=args.threads, warmup=args.warmup, runs=args.runs)

        base_c, base_l = costs["original"], lat["original"]["median"]
        rows, results = [], {}
        for n in paths:
            c, l = costs[n], lat[n]
            res = {
                "macs": c["macs"], "macs_ratio": c["macs"] / base_c["macs"],
                "flops_ratio": c["flops"] / base_c["flops"],
                "params": c["params"], "params_ratio": c["params"] / base_c["params"],
                "latency_ms": l["median"], "latency_p10": l["p10"], "latency_p90": l["p90"],
                "speedup": base_l / l["median"], "paired_speedup": l["paired_speedup"],
                "prune_s": info.get(n, {}).get("wall_s"),
                "max_diff": info.get(n, {}).get("max_diff"),
            }
            results[n] = res
            rows.append([
                n, f"{c['macs'] / 1e9:.3f}", f"{res['macs_ratio']:.3f}", f"{c['params'] / 1e6:.2f}",
                f"{res['params_ratio']:.3f}", f"{l['median']:.1f} [{l['p10']:.1f}-{l['p90']:.1f}]",
                f"{res['speedup']:.2f}x", f"{res['paired_speedup']:.2f}x", fmt(res["prune_s"], ".2f"),
                "n/a" if res["max_diff"] is None else f"{res['max_diff']:.2e}",
            ])
        print()
        print(table(
            ["model", "GMACs", "MACs ratio", "Mparams", "params ratio", "ORT ms median [p10-p90]",
             "speedup", "paired", "prune s", "oracle max diff"],
            rows,
            title=f"ResNet-50, ratio {args.ratio}, ORT {args.threads} threads, "
                  f"{args.runs} interleaved runs each (median), input 1x3x224x224",
        ))
        print("speedup = original median / model median; paired = median over rounds of the "
              "same-round ratio (less sensitive to load drifting between rounds)")
        print(f"\nspa timings (s): {json.dumps(info['spa']['timings'])}")

        failed = []
        s = results["spa"]
        print()
        checks = [
            (f"spa FLOPs ratio {s['flops_ratio']:.3f} <= {args.flops_target}", s["flops_ratio"] <= args.flops_target),
            (f"spa ORT speedup {s['speedup']:.2f}x >= {args.speedup_target}x", s["speedup"] >= args.speedup_target),
            ("spa oracle passed", bool(info["spa"]["oracle_passed"])),
        ]
        for text, ok in checks:
            print(f"{'PASS' if ok else 'MISS'}  {text}")
            if not ok:
                failed.append(text)
        if "torch-pruning" in results:
            t, tol = results["torch-pruning"], args.tp_tolerance
            worse = []
            for key, label, lower_better in (("macs_ratio", "MACs ratio", True), ("params_ratio", "params ratio", True),
                                             ("latency_ms", "latency", True), ("speedup", "speedup", False)):
                a, b = s[key], t[key]
                if (a > b * (1 + tol)) if lower_better else (a < b * (1 - tol)):
                    worse.append(f"{label}: spa {a:.3f} vs torch-pruning {b:.3f}")
            if worse:
                print("WORSE than torch-pruning (beyond {:.0%}): ".format(tol) + "; ".join(worse))
                if args.fail_if_worse_than_tp:
                    failed.extend(worse)
            else:
                print(f"spa is on par with or better than torch-pruning on every column (tolerance {tol:.0%})")
        if args.json:
            args.json.write_text(json.dumps({"results": results, "info": info}, indent=1, default=str))
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            for p in paths.values():
                shutil.copy2(p, args.keep / p.name)
        if failed:
            print(f"\n{len(failed)} target(s) missed", file=sys.stderr)
            return 1
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
