"""spa on the classic ImageNet models shipped in onnx's own test data (issue 17).

    python benchmarks/classic_zoo.py [--ratio 0.5] [--only alexnet,resnet50] [--no-random-weights]

The nine ``onnx/backend/test/data/light/light_*.onnx`` files (AlexNet, DenseNet-121,
Inception v1/v2, ResNet-50, ShuffleNet, SqueezeNet, VGG-19, ZFNet-512) are written the old
way: default-domain opset 9, IR version 3 (every initializer also a graph input), and every
weight produced by a ``ConstantOfShape`` node (the "light" files replace the weights by a
constant 0.02 to stay small). spa upgrades them to opset 13, treats the initializers as
weights and folds the ConstantOfShape weights into initializers; this prints, per model, a
markdown table:

- opset before → after; groups total / pruned (and why the others stay);
- MACs after / before from spa's report, and the same ratio recomputed here from the shapes
  ONNX shape inference gives the two models (Conv, Gemm and MatMul only) as a cross-check;
- the oracle's max |difference| on the model as shipped, and again with the weights replaced
  multiplied by seeded random factors in [0.5, 1.5) (all-equal weights make every channel
  alike, so a wrong slice could not show on the shipped model); the "random" run prunes
  spa's canonical form of the model, which is the same graph;
- wall time of ``spa.prune`` on the shipped file (load, canonicalize, plan, surgery, oracle).
"""

from __future__ import annotations

import argparse
import collections
import os
import pathlib
import time

import _common  # noqa: F401 - puts the repository on sys.path
import numpy as np
import onnx
import onnx_ir as ir

import spa
from spa import io
from spa.passes.canonicalize import CanonicalizePass

LIGHT = pathlib.Path(os.path.dirname(onnx.__file__)) / "backend" / "test" / "data" / "light"
NAMES = ["bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50", "shufflenet", "squeezenet",
         "vgg19", "zfnet512"]


def conv_gemm_macs(proto: onnx.ModelProto) -> int:
    """Multiply-accumulates of Conv/Gemm/MatMul from the shapes ONNX shape inference gives."""
    light = onnx.ModelProto()
    light.CopyFrom(proto)
    g = light.graph
    shapes = {t.name: list(t.dims) for t in g.initializer}
    for t in g.initializer:  # shapes, not bytes: inference needs no weights
        g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    del g.initializer[:]
    inferred = onnx.shape_inference.infer_shapes(light, strict_mode=True)
    for vi in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output):
        shapes[vi.name] = [d.dim_value for d in vi.type.tensor_type.shape.dim]
    total = 0
    for n in proto.graph.node:
        out = shapes.get(n.output[0])
        if out is None:
            continue
        if n.op_type == "Conv":
            w = shapes[n.input[1]]
            total += int(np.prod(out)) * int(np.prod(w[1:]))
        elif n.op_type == "Gemm":
            a = shapes[n.input[0]]
            trans_a = next((x.i for x in n.attribute if x.name == "transA"), 0)
            total += int(np.prod(out)) * (a[0] if trans_a else a[1])
        elif n.op_type == "MatMul":
            total += int(np.prod(out)) * shapes[n.input[0]][-1]
    return total


def random_weights(path: pathlib.Path, seed: int = 0) -> onnx.ModelProto:
    """spa's canonical form of the model (weights folded), every float weight multiplied by a
    seeded random factor in [0.5, 1.5): channels differ, scales and signs stay (fully random
    weights overflow AlexNet's activations to inf)."""
    model = io.load_model(path)
    CanonicalizePass()(model)
    rng = np.random.default_rng(seed)
    for value in model.graph.initializers.values():
        t = value.const_value
        if t is not None and t.dtype.is_floating_point():
            jitter = rng.uniform(0.5, 1.5, t.shape.numpy())
            value.const_value = ir.tensor((t.numpy() * jitter).astype(t.dtype.numpy()), name=value.name)
    return ir.to_proto(model)


def frozen_summary(result) -> str:
    """Why the groups left unpruned stay, as ``reason ×n`` counts."""
    blocked = {b["group"]: b for b in result.report.blocked}
    counts: collections.Counter[str] = collections.Counter()
    for g in result.plan.groups:
        if g.removed:
            continue
        b = blocked.get(g.id)
        if b is not None and b["frozen"] >= b["units"] and b["reasons"]:
            first = b["reasons"][0]
            op = first["reason"].split(" ", 1)[0] if first["code"] == "channel_mixing" else ""
            counts[f"{first['code']}{' ' + op if op else ''}"] += 1
        elif g.units == 1:
            counts["one channel unit"] += 1
        else:
            counts["not chosen"] += 1
    return ", ".join(f"{k} ×{v}" if v > 1 else k for k, v in sorted(counts.items())) or "—"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--only", default="", help="comma-separated substrings of the model names")
    ap.add_argument("--no-random-weights", action="store_true", help="skip the random-weights oracle run")
    args = ap.parse_args()
    names = [n for n in NAMES if not args.only or any(s in n for s in args.only.split(","))]

    rows = []
    for name in names:
        path = LIGHT / f"light_{name}.onnx"
        before = onnx.load(path, load_external_data=False)
        opset_before = next(o.version for o in before.opset_import if o.domain in ("", "ai.onnx"))
        t0 = time.perf_counter()
        result = spa.prune(path, ratio=args.ratio, benchmark=False)
        wall = time.perf_counter() - t0
        rep = result.report
        canonical = io.load_model(path)
        CanonicalizePass()(canonical)
        shape_ratio = conv_gemm_macs(ir.to_proto(result.model)) / conv_gemm_macs(ir.to_proto(canonical))
        del canonical
        random_diff = "—"
        if not args.no_random_weights:
            rnd = spa.prune(random_weights(path), ratio=args.ratio, benchmark=False).report.oracle
            random_diff = f"{rnd['max_abs_diff']:.2g}{'' if rnd['passed'] else ' FAIL'}"
        oracle = rep.oracle
        rows.append([
            name,
            f"{opset_before} → {result.model.opset_imports['']}",
            f"{rep.groups_total} / {rep.groups_pruned}",
            f"{rep.macs_after / rep.macs_before:.3f}",
            f"{shape_ratio:.3f}",
            f"{oracle['max_abs_diff']:.2g}{'' if oracle['passed'] else ' FAIL'}",
            random_diff,
            f"{wall:.1f}",
            frozen_summary(result),
        ])
        print(f"  {name}: done in {wall:.1f} s", flush=True)
        del result

    headers = ["model", "opset", "groups total / pruned", "MACs ratio (report)", "MACs ratio (conv+gemm, shapes)",
               "oracle max diff (shipped)", "oracle max diff (random weights)", "time s", "groups that stay"]
    print()
    print(f"ratio {args.ratio}, `spa.prune(path, ratio={args.ratio}, benchmark=False)`, onnx {onnx.__version__}")
    print()
    print("| " + " | ".join(headers) + " |")
    print("|" + "|".join("---" for _ in headers) + "|")
    for r in rows:
        print("| " + " | ".join(str(c) for c in r) + " |")


if __name__ == "__main__":
    main()
