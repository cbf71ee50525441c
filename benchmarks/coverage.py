"""Coverage benchmark: spa on a zoo of timm architectures, side by side with Torch-Pruning.

    python benchmarks/coverage.py [--models a,b,c] [--family cnn,vit,hybrid,mlp] [--ratio 0.5]
                                  [--timeout 240] [--tp-timeout 60] [--jobs 1] [--no-tp]
                                  [--models-dir /tmp/coverage_models] [--reexport] [--out results.json]

Needs (a benchmark-only setup, not a dependency of spa):

    pip install --no-deps timm
    pip install huggingface_hub safetensors pyyaml pillow torch-pruning

timm imports torchvision, which does not import beside the CPU torch used here: this script
puts a stub ``torchvision`` (``benchmarks/_stubs``) on the path of its torch worker processes
only. No hub downloads: every model is ``timm.create_model(name, pretrained=False)``.

For every model of the zoo (random weights made to look trained: constant norm, bias and
layer-scale parameters re-randomised so no two tensors are identical and every residual
branch counts, BatchNorm statistics measured on one random batch; see ``_randomize`` and
``_calibrate``):

1. **export** (torch worker): ``torch.onnx.export(model, x, dynamo=False, opset_version=17)``
   at a small input (64x64 unless the architecture needs more) into ``--models-dir``
   (reused on the next run unless ``--reexport``). A model that fails to export is reported
   as "export failed" and left out of spa's percentages: it is not spa's fault.
2. **spa** (own subprocess, ``--timeout``): ``spa.prune(path, ratio, benchmark=False)`` (the
   mask-equivalence oracle runs), the pruned model saved beside the original, then both run
   in ONNX Runtime on the same input to compare output shapes and dtypes. Status:
   ``pruned`` (MACs went down), ``nothing prunable`` (with the dominant block reasons),
   ``refused`` (a ``SpaError``: the message), ``BROKEN`` (``VerificationError``, any other
   exception, a crash, a timeout, an output model ORT cannot load or whose output shapes
   changed: every one of these is a bug in spa).
3. **Torch-Pruning** (same torch worker, after the export; ``--tp-timeout``): ``MetaPruner`` with
   ``MagnitudeImportance(p=1)`` at the same ratio, the classifier head ignored, configured as
   its own timm example does (``num_heads`` of every ``qkv`` projection, unfused attention),
   no per-architecture forward rewrites. Status:
   ``valid``, ``crashed`` (an exception while pruning), ``broken`` (the pruned module's forward
   fails or its output shape changed), ``hung`` (timeout).

Columns: "oracle max|Δ|" is spa's mask-equivalence difference (pruned vs the original with
the removed consumer slices zeroed); "Δ vs orig" is how much pruning moved the output
(max |Δ| / max |output|): near 0 the oracle could not have seen a wrong slice either.
"executed" is the MACs ratio ONNX Runtime actually executes (``spa.analysis.cost.executed_macs``
on both files, same default inputs: formulas from the real arrays' shapes, independent of
the report's cost model), marked ok when the report's ratio is within 2 % (relative) of it.
Prints a rich table and a summary; ``--out`` writes every row as JSON. Exit status 1 when
any model is BROKEN in spa.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import importlib.util
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from typing import Any

from _common import spa_failure, spa_figures  # noqa: E402 (benchmarks/ is sys.path[0])

HERE = pathlib.Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
STUBS = HERE / "_stubs"
INSTALL = "pip install --no-deps timm && pip install huggingface_hub safetensors pyyaml pillow torch-pruning"
OPSET = 17
WEIGHTS = "random, seed 0, norms and layer scales re-randomised, BN statistics from one random batch"  # cache key


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    family: str  # cnn | vit | hybrid | mlp
    size: int = 64
    kwargs: tuple[tuple[str, Any], ...] = ()


def _e(name: str, family: str, size: int = 64, **kwargs: Any) -> Entry:
    return Entry(name, family, size, tuple(sorted(kwargs.items())))


# Transformers and MLPs with a learned position embedding or token-mixing weights take their
# input size at construction (img_size); the rest are fully convolutional or interpolate.
ZOO: list[Entry] = [
    # --- CNNs -------------------------------------------------------------------------
    _e("resnet18", "cnn"),
    _e("resnet50", "cnn"),
    _e("resnext50_32x4d", "cnn"),
    _e("seresnext26d_32x4d", "cnn"),
    _e("ecaresnet26t", "cnn"),
    _e("skresnet18", "cnn"),
    _e("res2net50_26w_4s", "cnn"),
    _e("resnest14d", "cnn"),
    _e("nf_resnet26", "cnn"),
    _e("mobilenetv2_100", "cnn"),
    _e("mobilenetv3_large_100", "cnn"),
    _e("mobilenetv3_small_100", "cnn"),
    _e("mnasnet_100", "cnn"),
    _e("lcnet_050", "cnn"),
    _e("efficientnet_b0", "cnn"),
    _e("efficientnetv2_rw_t", "cnn"),
    _e("mixnet_s", "cnn"),
    _e("ghostnet_100", "cnn"),
    _e("ghostnetv2_100", "cnn"),
    _e("rexnet_100", "cnn"),
    _e("regnetx_002", "cnn"),
    _e("regnety_002", "cnn"),
    _e("densenet121", "cnn"),
    _e("dla34", "cnn"),
    _e("dpn68", "cnn"),
    _e("hrnet_w18_small", "cnn"),
    _e("cspresnet50", "cnn"),
    _e("cs3darknet_s", "cnn"),
    _e("convnext_atto", "cnn"),
    _e("repvgg_a0", "cnn"),
    _e("mobileone_s0", "cnn"),
    _e("gernet_s", "cnn"),
    _e("ese_vovnet19b_dw", "cnn"),
    _e("selecsls42b", "cnn"),
    _e("xception41", "cnn"),
    _e("inception_v3", "cnn", 96),
    _e("hgnetv2_b0", "cnn"),
    _e("rdnet_tiny", "cnn"),
    _e("starnet_s1", "cnn"),
    # --- transformers -----------------------------------------------------------------
    _e("vit_tiny_patch16_224", "vit", img_size=64),
    _e("deit_tiny_patch16_224", "vit", img_size=64),
    _e("deit_tiny_distilled_patch16_224", "vit", img_size=64),
    _e("cait_xxs24_224", "vit", img_size=64),
    _e("xcit_nano_12_p16_224", "vit", img_size=64),
    _e("convit_tiny", "vit", img_size=64),
    _e("pit_ti_224", "vit", img_size=64),
    _e("crossvit_tiny_240", "vit"),
    _e("swin_tiny_patch4_window7_224", "vit", img_size=64),
    _e("swinv2_cr_tiny_224", "vit", img_size=64),
    _e("pvt_v2_b0", "vit"),
    _e("twins_svt_small", "vit", img_size=64),
    _e("levit_128s", "vit", img_size=64),
    _e("coat_lite_tiny", "vit", img_size=64),
    _e("visformer_tiny", "vit", img_size=64),
    _e("gcvit_xxtiny", "vit", img_size=64),
    _e("maxvit_rmlp_pico_rw_256", "vit", img_size=64),
    _e("mvitv2_tiny", "vit", img_size=64),
    _e("tiny_vit_5m_224", "vit"),
    # --- hybrids ----------------------------------------------------------------------
    _e("mobilevit_xxs", "hybrid", img_size=64),
    _e("mobilevitv2_050", "hybrid", img_size=64),
    _e("efficientformer_l1", "hybrid", 224),
    _e("efficientformerv2_s0", "hybrid", img_size=64),
    _e("efficientvit_b0", "hybrid"),
    _e("efficientvit_m0", "hybrid", img_size=64),
    _e("fastvit_t8", "hybrid"),
    _e("edgenext_xx_small", "hybrid"),
    _e("poolformer_s12", "hybrid"),
    _e("poolformerv2_s12", "hybrid"),
    _e("repvit_m1", "hybrid", img_size=64),
    _e("coatnet_nano_rw_224", "hybrid", img_size=64),
    _e("inception_next_tiny", "hybrid"),
    _e("shvit_s1", "hybrid"),
    _e("mambaout_femto", "hybrid"),
    # --- MLPs -------------------------------------------------------------------------
    _e("mixer_s16_224", "mlp", img_size=64),
    _e("resmlp_12_224", "mlp", img_size=64),
    _e("gmlp_ti16_224", "mlp", img_size=64),
    _e("gmixer_12_224", "mlp", img_size=64),
    _e("sequencer2d_s", "mlp", img_size=64),
    _e("convmixer_768_32", "mlp"),
]
BY_NAME = {e.name: e for e in ZOO}
# The Torch-Pruning 1.6.1 baseline (36 timm models: 22 valid) names these.
TP_BASELINE = {
    "crashed": ["cspresnet50", "edgenext_xx_small", "fastvit_t8", "efficientformer_l1", "efficientvit_b0", "levit_128s"],
    "broken": ["mixnet_s", "poolformer_s12", "pvt_v2_b0", "swin_tiny_patch4_window7_224"],
    "hung": ["rexnet_100"],
}


# ====================================================================================
# Workers (run in subprocesses; each writes one JSON result file)
# ====================================================================================


def _write(path: str, obj: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


def _randomize(model) -> None:
    """Make random-init weights look trained: no all-equal tensor, no two identical tensors.

    timm initialises norm weights to 1, biases to 0, some BN gammas to 0 (``zero_init_last``)
    and layer scales to a tiny constant (1e-5: every residual branch then hardly reaches the
    output, and neither would a wrong slice inside it). Exported with BN folded, such convs get identical weights
    (all zero) and biases, which the exporter deduplicates into one initializer plus Identity
    nodes, and magnitude criteria see ties everywhere. Real checkpoints have neither.
    """
    import torch

    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.numel() > 1 and p.dtype.is_floating_point and bool((p == p.reshape(-1)[0]).all()):
                v = float(p.reshape(-1)[0])
                noise = torch.rand(p.shape, generator=g) - 0.5
                if v == 0.0:
                    p.copy_(noise * 0.2)
                elif abs(v) < 0.1:  # layer scale (1e-5, 1e-6): residual branches would not count
                    p.copy_(1.0 + noise)
                else:
                    p.copy_(v * (1.0 + noise))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_((torch.rand(b.shape, generator=g) - 0.5) * 0.2)
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))


def _calibrate(model, size: int) -> bool:
    """Set every BatchNorm's running statistics from one batch of random images.

    Random weights with unit running variance let activations grow layer after layer (outputs
    of 1e7 and more), which makes output differences meaningless. Statistics measured on
    data keep each layer normalised, as in a trained model.
    """
    import torch

    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return False
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.momentum) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: one batch sets the statistics
    x = torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(2))
    try:
        model.train()
        with torch.no_grad():
            model(x)
        return True
    except Exception:  # noqa: BLE001  (keep the randomised statistics)
        with torch.no_grad():
            for m, (mean, var, mom) in zip(bns, saved):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
        return False
    finally:
        for m, (_, _, mom) in zip(bns, saved):
            m.momentum = mom
        model.eval()


def _build(entry: Entry):
    sys.path.insert(0, str(STUBS))  # the stub torchvision, in this worker process only
    import timm
    import torch

    torch.manual_seed(0)
    model = timm.create_model(entry.name, pretrained=False, **dict(entry.kwargs)).eval()
    _randomize(model)
    calibrated = _calibrate(model, entry.size)
    return model, calibrated


def _flat_outputs(y) -> list:
    import torch

    if isinstance(y, torch.Tensor):
        return [y]
    if isinstance(y, (list, tuple)):
        return [t for x in y for t in _flat_outputs(x)]
    if isinstance(y, dict):
        return [t for x in y.values() for t in _flat_outputs(x)]
    return []


def worker_torch(args) -> int:
    """Export (unless cached), then Torch-Pruning; results to <onnx>.export.json / <onnx>.tp.json."""
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(max(1, args.threads))
    entry = BY_NAME.get(args.model) or Entry(args.model, "?", args.size, ())
    onnx_path = pathlib.Path(args.onnx)
    export_json = f"{onnx_path}.export.json"
    tp_json = f"{onnx_path}.tp.json"
    info: dict[str, Any] = {"model": entry.name, "size": entry.size, "kwargs": dict(entry.kwargs), "opset": OPSET,
                            "weights": WEIGHTS}
    try:
        t0 = time.perf_counter()
        model, info["bn_calibrated"] = _build(entry)
        info["build_s"] = round(time.perf_counter() - t0, 3)
    except Exception as e:  # noqa: BLE001
        info |= {"ok": False, "error": f"build: {type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc()[-4000:]}
        _write(export_json, info)
        return 0
    example = torch.randn(1, 3, entry.size, entry.size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = _flat_outputs(model(example))
    ref_shapes = [list(t.shape) for t in ref]
    cached = onnx_path.exists() and not args.reexport and _cached_ok(export_json, info)
    if cached:
        info = json.loads(pathlib.Path(export_json).read_text())
    else:
        try:
            t0 = time.perf_counter()
            tmp = onnx_path.with_suffix(".tmp.onnx")
            with torch.no_grad():
                torch.onnx.export(
                    model, (example,), str(tmp), dynamo=False, opset_version=OPSET,
                    input_names=["input"], do_constant_folding=True,
                )
            os.replace(tmp, onnx_path)
            info |= {"ok": True, "export_s": round(time.perf_counter() - t0, 3), "torch_output_shapes": ref_shapes,
                     "onnx_mb": round(onnx_path.stat().st_size / 2**20, 2),
                     "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3)}
        except Exception as e:  # noqa: BLE001
            info |= {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc()[-4000:]}
        _write(export_json, info)
    if args.no_tp:
        return 0
    # ---- Torch-Pruning on the same (randomised) module ----
    tp_info: dict[str, Any] = {"status": "crashed"}
    _write(tp_json, {"status": "hung", "detail": "started, no result"})  # overwritten unless it hangs
    try:
        import torch_pruning as tp

        tp_info["version"] = tp.__version__
        macs0, params0 = tp.utils.count_ops_and_params(model, example)
        # As Torch-Pruning's own timm example does: ignore every classifier Linear, give it
        # the head count of each qkv projection, and use the unfused attention path.
        ignored, num_heads = _tp_config(model)
        t0 = time.perf_counter()
        pruner = tp.pruner.MetaPruner(
            model, example, importance=tp.importance.MagnitudeImportance(p=1),
            pruning_ratio=args.ratio, ignored_layers=ignored, num_heads=num_heads,
        )
        pruner.step()
        for m in model.modules():
            qkv = getattr(m, "qkv", None)
            if qkv is not None and qkv in num_heads:
                m.num_heads = num_heads[qkv]
                if hasattr(m, "head_dim"):
                    m.head_dim = qkv.out_features // (3 * m.num_heads)
        tp_info["prune_s"] = round(time.perf_counter() - t0, 3)
    except Exception as e:  # noqa: BLE001
        tp_info |= {"status": "crashed", "detail": f"{type(e).__name__}: {e}"[:500], "traceback": traceback.format_exc()[-3000:]}
        _write(tp_json, tp_info)
        return 0
    try:
        with torch.no_grad():
            out = _flat_outputs(model.eval()(example))
        shapes = [list(t.shape) for t in out]
        if shapes != ref_shapes:
            tp_info |= {"status": "broken", "detail": f"output shape {shapes} != {ref_shapes}"}
        else:
            macs1, params1 = tp.utils.count_ops_and_params(model, example)
            tp_info |= {"status": "valid", "macs_ratio": macs1 / macs0 if macs0 else None,
                        "params_ratio": params1 / params0 if params0 else None}
    except Exception as e:  # noqa: BLE001
        tp_info |= {"status": "broken", "detail": f"forward fails: {type(e).__name__}: {e}"[:500]}
    _write(tp_json, tp_info)
    return 0


def _tp_config(model):
    import torch

    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    heads = list(head) if isinstance(head, (list, tuple)) else [head]
    ignored = [h for h in heads if isinstance(h, torch.nn.Module) and not isinstance(h, torch.nn.Identity)]
    n_cls = getattr(model, "num_classes", None)
    num_heads = {}
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and n_cls and m.out_features == n_cls and m not in ignored:
            ignored.append(m)
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
        qkv = getattr(m, "qkv", None)
        if isinstance(getattr(m, "num_heads", None), int) and isinstance(qkv, torch.nn.Linear):
            num_heads[qkv] = m.num_heads
    return ignored, num_heads


def _cached_ok(export_json: str, want: dict) -> bool:
    try:
        have = json.loads(pathlib.Path(export_json).read_text())
    except (OSError, ValueError):
        return False
    return bool(have.get("ok")) and all(have.get(k) == want[k] for k in ("size", "kwargs", "opset", "weights"))


def _ort_outputs(path: pathlib.Path, seed: int = 0):
    import numpy as np
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    types = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
             "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}
    feeds = {}
    for i in sess.get_inputs():
        shape = [d if isinstance(d, int) else 1 for d in i.shape]
        feeds[i.name] = rng.standard_normal(shape).astype(types.get(i.type, np.float32))
    outs = sess.run(None, feeds)
    return [(o.name, list(v.shape), str(v.dtype), v) for o, v in zip(sess.get_outputs(), outs)]


MACS_TOLERANCE = 0.02  # relative: the report's MACs ratio vs the executed one


def _macs_check(original: pathlib.Path, pruned: pathlib.Path, reported: float | None) -> dict[str, Any]:
    """The report's MACs ratio against the MACs ONNX Runtime executes (``executed_macs``: every
    value an output, formulas from the real arrays' shapes) on the same default inputs."""
    try:
        import onnx_ir as ir

        from spa.analysis.cost import executed_macs
        from spa.inputs import make_feeds

        feeds = make_feeds(ir.load(str(original)))
        before, after = executed_macs(original, feeds), executed_macs(pruned, feeds)
    except Exception as e:  # noqa: BLE001  (reported, not a spa failure)
        return {"macs_exec_error": f"{type(e).__name__}: {str(e)[:200]}"}
    ratio = after / before if before else None
    ok = None if ratio is None or reported is None else abs(reported - ratio) <= MACS_TOLERANCE * ratio
    return {"macs_exec_before": before, "macs_exec_after": after, "macs_exec_ratio": ratio, "macs_check": ok}


def worker_spa(args) -> int:
    sys.path.insert(0, str(REPO_ROOT))
    import logging

    logging.disable(logging.WARNING)
    onnx_path = pathlib.Path(args.onnx)
    out_path = onnx_path.with_name(onnx_path.name.removesuffix(".onnx") + ".spa.onnx")
    res: dict[str, Any] = {"status": "BROKEN"}
    t0 = time.perf_counter()
    try:
        import spa

        result = spa.prune(str(onnx_path), ratio=args.ratio, benchmark=False)
    except Exception as e:  # noqa: BLE001
        import spa

        wall = time.perf_counter() - t0
        res |= spa_failure(e)
        res |= {"traceback": traceback.format_exc()[-6000:], "wall_s": round(wall, 3)}
        _write(args.result, res)
        return 0
    wall = time.perf_counter() - t0
    rep = result.report
    res |= spa_figures(rep, wall)
    try:
        result.save(out_path)
        res["pruned_path"] = str(out_path)
    except Exception as e:  # noqa: BLE001
        res |= {"status": "BROKEN", "detail": f"save failed: {type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
        _write(args.result, res)
        return 0
    try:
        before = _ort_outputs(onnx_path)
        import numpy as np

        vals = [np.asarray(v[3], dtype=np.float64) for v in before if np.issubdtype(v[3].dtype, np.floating)]
        # An oracle difference only means something next to the outputs' own size (and finite).
        res["output_absmax"] = max((float(np.abs(v).max()) for v in vals if v.size), default=None)
        res["output_finite"] = all(bool(np.isfinite(v).all()) for v in vals)
    except Exception as e:  # noqa: BLE001  (ORT cannot run the original: not spa's doing)
        res["shapes"] = f"original does not run in ORT: {type(e).__name__}: {str(e)[:200]}"
        before = None
    try:
        after = _ort_outputs(out_path)
        if before is not None and res.get("output_absmax"):
            import numpy as np

            # How much pruning changed the output (the oracle compares with the *masked*
            # original): near 0, the oracle could not see a wrong slice either.
            change = max((float(np.abs(np.asarray(a[3], np.float64) - np.asarray(b[3], np.float64)).max())
                          for a, b in zip(before, after) if a[3].shape == b[3].shape and a[3].size), default=None)
            res["change_vs_original"] = None if change is None else change / res["output_absmax"]
        if before is not None:
            res["shapes_ok"] = [s[1:3] for s in before] == [s[1:3] for s in after]
            if not res["shapes_ok"]:
                res["shapes"] = f"{[s[:3] for s in before]} -> {[s[:3] for s in after]}"
    except Exception as e:  # noqa: BLE001
        res |= {"shapes_ok": False, "shapes": f"pruned model does not run in ORT: {type(e).__name__}: {str(e)[:500]}"}
    res |= _macs_check(onnx_path, out_path, res.get("macs_ratio"))
    oracle = res["oracle"]
    if res.get("shapes_ok") is False:
        res |= {"status": "BROKEN", "detail": res["shapes"]}
    elif oracle and oracle.get("passed") is False:
        res |= {"status": "BROKEN" if oracle.get("asserted", True) else "pruned (inexact)",
                "detail": f"oracle max diff {oracle.get('max_abs_diff')}"}
    elif rep.macs_after < rep.macs_before:
        res["status"] = "pruned"
    else:
        res["status"] = "nothing prunable"
        res["detail"] = "; ".join(f"{k} x{n}" for k, n, _ in res["reasons"][:3]) or "no group"
    _write(args.result, res)
    return 0


# ====================================================================================
# Driver
# ====================================================================================


def _run(cmd: list[str], timeout: float, phase: pathlib.Path | None = None, then: float = 0.0) -> tuple[int | None, str]:
    """Run a worker; (returncode or None on timeout, tail of its stderr).

    With ``phase``: the limit is ``timeout`` until that file appears, then ``then`` more
    seconds from that moment (the export and Torch-Pruning get separate limits).
    """
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True, text=True)
        deadline = time.monotonic() + timeout
        phased = phase is None
        rc: int | None = None
        while True:
            try:
                rc = proc.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                pass
            if not phased and phase.exists():
                phased = True
                deadline = time.monotonic() + then
            if time.monotonic() > deadline:
                os.killpg(proc.pid, 9)
                proc.wait()
                rc = None
                break
        err.seek(0)
        return rc, err.read()[-3000:]


def _read(path: str | os.PathLike) -> dict | None:
    try:
        return json.loads(pathlib.Path(path).read_text())
    except (OSError, ValueError):
        return None


def run_model(entry: Entry, args, on_stage) -> dict[str, Any]:
    d = pathlib.Path(args.models_dir)
    onnx_path = d / f"{entry.name}.onnx"
    row: dict[str, Any] = {"model": entry.name, "family": entry.family, "size": entry.size}
    me = [sys.executable, str(pathlib.Path(__file__).resolve())]
    common = ["--model", entry.name, "--onnx", str(onnx_path), "--ratio", str(args.ratio), "--threads", str(args.threads)]
    # 1. export + Torch-Pruning (one torch process: one import of torch and timm)
    on_stage(entry.name, "export" + ("" if args.no_tp else " + torch-pruning"))
    for stale in (f"{onnx_path}.tp.json",):
        pathlib.Path(stale).unlink(missing_ok=True)
    if args.reexport:
        pathlib.Path(f"{onnx_path}.export.json").unlink(missing_ok=True)
    flags = (["--no-tp"] if args.no_tp else []) + (["--reexport"] if args.reexport else [])
    t0 = time.perf_counter()
    want = {"size": entry.size, "kwargs": dict(entry.kwargs), "opset": OPSET, "weights": WEIGHTS}
    if args.no_tp and not args.reexport and onnx_path.exists() and _cached_ok(f"{onnx_path}.export.json", want):
        rc, err = 0, ""  # the cached export is reused: no torch process at all
    else:
        tp_marker = pathlib.Path(f"{onnx_path}.tp.json")  # written as Torch-Pruning starts
        rc, err = _run(me + ["--worker", "torch", *common, *flags], args.timeout, tp_marker, args.tp_timeout)
    row["torch_wall_s"] = round(time.perf_counter() - t0, 2)
    exp = _read(f"{onnx_path}.export.json")
    if exp is None or (rc is None and not exp.get("ok")):
        exp = {"ok": False, "error": "timeout" if rc is None else f"worker exit {rc}: {err.strip().splitlines()[-1:] }"}
    row["export"] = {k: v for k, v in exp.items() if k != "traceback"}
    if not args.no_tp:
        tpr = _read(f"{onnx_path}.tp.json")
        if tpr is None and str(exp.get("error", "")).startswith("build:"):
            tpr = {"status": "n/a", "detail": "model does not build"}
        elif tpr is None:
            tpr = {"status": "crashed", "detail": f"worker exit {rc}: {err.strip()[-300:]}"}
        elif tpr.get("status") == "hung" and rc is not None:
            tpr = {"status": "crashed", "detail": f"worker died (exit {rc}): {err.strip()[-300:]}"}
        row["tp"] = {k: v for k, v in tpr.items() if k != "traceback"}
        if tpr.get("traceback"):
            row["tp"]["traceback_tail"] = tpr["traceback"][-800:]
    if not exp.get("ok"):
        row["spa"] = {"status": "export failed", "detail": exp.get("error", "")}
        return row
    # 2. spa
    on_stage(entry.name, "spa")
    result = d / f"{entry.name}.spa.json"
    result.unlink(missing_ok=True)
    t0 = time.perf_counter()
    rc, err = _run(me + ["--worker", "spa", *common, "--result", str(result)], args.timeout)
    spa_res = _read(result)
    if spa_res is None:
        why = f"timeout after {args.timeout:.0f} s" if rc is None else f"worker crashed (exit {rc})"
        spa_res = {"status": "BROKEN", "detail": why, "stderr_tail": err[-2000:], "wall_s": round(time.perf_counter() - t0, 2)}
    row["spa"] = spa_res
    return row


def _fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _fmt_exec(s: dict) -> str:
    """The executed MACs ratio, and whether the report's is within MACS_TOLERANCE of it."""
    x = s.get("macs_exec_ratio")
    if x is None:
        return "-"
    return f"{x:.3f} " + {True: "ok", False: "[red]DIFF[/]", None: ""}[s.get("macs_check")]


def summarize(rows: list[dict], args) -> dict[str, Any]:
    spa_status = collections.Counter(r["spa"]["status"] for r in rows)
    exported = [r for r in rows if r["spa"]["status"] != "export failed"]
    pruned = [r for r in exported if r["spa"]["status"].startswith("pruned")]

    def ratio(r):
        x = r["spa"].get("macs_ratio")
        return x if x is not None else 1.0

    med = {}
    for fam in ("cnn", "vit", "hybrid", "mlp"):
        xs = [ratio(r) for r in exported if r["family"] == fam]
        med[fam] = statistics.median(xs) if xs else None
    times = [(r["spa"].get("prune_s"), r["model"]) for r in exported if r["spa"].get("prune_s") is not None]
    walls = [(r["spa"].get("wall_s"), r["model"]) for r in exported if r["spa"].get("wall_s") is not None]
    s: dict[str, Any] = {
        "models": len(rows),
        "exported": len(exported),
        "export_failed": [r["model"] for r in rows if r["spa"]["status"] == "export failed"],
        "spa_status": dict(spa_status),
        "pct_lose_macs": 100.0 * len(pruned) / len(exported) if exported else None,
        "median_macs_ratio": med,
        "median_macs_ratio_all": statistics.median([ratio(r) for r in exported]) if exported else None,
        "max_prune_s": max(times) if times else None,
        "max_spa_wall_s": max(walls) if walls else None,
        "oracle_all_passed": all((r["spa"].get("oracle") or {}).get("passed", False) for r in pruned),
        "shape_mismatch": [r["model"] for r in exported if r["spa"].get("shapes_ok") is False],
        "broken": [r["model"] for r in rows if r["spa"]["status"] == "BROKEN"],
        "non_finite_outputs": [r["model"] for r in exported if r["spa"].get("output_finite") is False],
        # Pruned models whose output hardly moved: the oracle proves little there.
        "weak_oracle": [r["model"] for r in pruned if (r["spa"].get("change_vs_original") or 0.0) < 1e-3],
        "nothing_prunable": [r["model"] for r in rows if r["spa"]["status"] == "nothing prunable"],
        "refused": [r["model"] for r in rows if r["spa"]["status"] == "refused"],
        # The report's MACs ratio off the executed one by more than MACS_TOLERANCE (relative).
        "macs_check_failed": [r["model"] for r in exported if r["spa"].get("macs_check") is False],
        "macs_checked": sum(1 for r in exported if r["spa"].get("macs_check") is not None),
    }
    if not args.no_tp:
        tps = collections.Counter(r.get("tp", {}).get("status", "?") for r in rows)
        s["tp_status"] = dict(tps)
        s["tp_valid"] = tps.get("valid", 0)
        tp_cnn = [r["tp"]["macs_ratio"] for r in rows if r["family"] == "cnn" and r.get("tp", {}).get("macs_ratio") is not None]
        s["tp_median_macs_ratio_cnn_valid"] = statistics.median(tp_cnn) if tp_cnn else None
        by = {r["model"]: r.get("tp", {}).get("status") for r in rows}
        named = [(m, want) for want, ms in TP_BASELINE.items() for m in ms if m in by]
        s["tp_baseline_agree"] = [len([1 for m, want in named if by[m] == want]), len(named)]
    return s


def render(rows: list[dict], summary: dict, args, console) -> None:
    from rich.table import Table

    t = Table(title=f"spa coverage: {len(rows)} timm models, ratio {args.ratio}, opset {OPSET}", show_lines=False)
    for col, just in (("model", "left"), ("fam", "left"), ("in", "right"), ("spa status", "left"), ("groups p/t", "right"),
                      ("oracle max|Δ|", "right"), ("Δ vs orig", "right"), ("shapes", "center"), ("MACs after/before", "right"), ("executed", "right"), ("params", "right"),
                      ("prune s", "right"), ("total s", "right"), ("TP", "left"), ("TP MACs", "right"), ("why / detail", "left")):
        t.add_column(col, justify=just, overflow="fold")
    style = {"pruned": "green", "nothing prunable": "yellow", "refused": "yellow", "BROKEN": "bold red", "export failed": "dim"}
    for r in rows:
        s, tp = r["spa"], r.get("tp", {})
        st = s["status"]
        oracle = s.get("oracle") or {}
        od = oracle.get("max_abs_diff")
        mb, ma = s.get("macs_before"), s.get("macs_after")
        macs = f"{ma / 1e6:,.1f}/{mb / 1e6:,.1f}M ({ma / mb:.2f})" if mb else "-"
        detail = s.get("detail") or ""
        if st == "pruned" and s.get("reasons"):
            detail = "frozen: " + ", ".join(f"{k} x{n}" for k, n, _ in s["reasons"][:2])
        tp_st = tp.get("status", "-")
        tp_style = {"valid": "green", "crashed": "red", "broken": "red", "hung": "red"}.get(tp_st, "")
        t.add_row(
            r["model"], r["family"], str(r["size"]), f"[{style.get(st.split(' (')[0], '')}]{st}[/]",
            f"{s.get('groups_pruned', '-')}/{s.get('groups_total', '-')}",
            "-" if od is None else f"{od:.1e}" + ("" if oracle.get("asserted", True) else " (inexact)"),
            "-" if s.get("change_vs_original") is None else f"{s['change_vs_original']:.2f}",
            {True: "ok", False: "[red]DIFF[/]", None: "-"}[s.get("shapes_ok")],
            macs, _fmt_exec(s), _fmt_ratio(s.get("params_ratio")), _fmt_ratio(s.get("prune_s")), _fmt_ratio(s.get("wall_s")),
            f"[{tp_style}]{tp_st}[/]" if tp_style else tp_st, _fmt_ratio(tp.get("macs_ratio")), detail[:160],
        )
    console.print(t)
    m = summary
    lines = [
        f"models {m['models']}, exported {m['exported']}" + (f" (export failed: {', '.join(m['export_failed'])})" if m["export_failed"] else ""),
        "spa: " + ", ".join(f"{k} {v}" for k, v in sorted(m["spa_status"].items())),
        f"spa: {m['pct_lose_macs']:.1f} % of exported models lose MACs (target ≥ 95 %)" if m["pct_lose_macs"] is not None else "",
        "spa: median MACs ratio " + ", ".join(f"{k} {_fmt_ratio(v)}" for k, v in m["median_macs_ratio"].items())
        + f", all {_fmt_ratio(m['median_macs_ratio_all'])} (target cnn ≤ 0.35)",
        f"spa: max analysis+pruning time {m['max_prune_s'][0]:.2f} s ({m['max_prune_s'][1]}) (target ≤ 10 s); "
        f"max wall incl. oracle {m['max_spa_wall_s'][0]:.2f} s ({m['max_spa_wall_s'][1]})" if m["max_prune_s"] else "",
        f"spa: oracle passed on every pruned model: {m['oracle_all_passed']}; output shapes changed: {', '.join(m['shape_mismatch']) or 'none'}"
        + (f"; [red]original outputs not finite: {', '.join(m['non_finite_outputs'])}[/]" if m["non_finite_outputs"] else ""),
        f"[yellow]pruning hardly changed the output (< 1e-3 relative; a weak oracle test): {', '.join(m['weak_oracle'])}[/]"
        if m["weak_oracle"] else "",
        f"[bold red]spa BROKEN: {', '.join(m['broken'])}[/]" if m["broken"] else "[green]spa BROKEN: none[/]",
        f"spa: report MACs ratio within {MACS_TOLERANCE:.0%} of the executed one on {m['macs_checked'] - len(m['macs_check_failed'])}"
        f"/{m['macs_checked']} models" + (f"; [red]off: {', '.join(m['macs_check_failed'])}[/]" if m["macs_check_failed"] else ""),
    ]
    if "tp_status" in m:
        lines.append(f"Torch-Pruning: {m['tp_valid']}/{m['models']} valid; " + ", ".join(f"{k} {v}" for k, v in sorted(m["tp_status"].items()))
                     + f"; median MACs ratio on valid CNNs {_fmt_ratio(m['tp_median_macs_ratio_cnn_valid'])}"
                     + (f"; the issue's baseline failures reproduced: {m['tp_baseline_agree'][0]}/{m['tp_baseline_agree'][1]}"
                        if m["tp_baseline_agree"][1] else ""))
    for ln in lines:
        if ln:
            console.print(ln)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", help="comma-separated timm names (default: the whole zoo)")
    ap.add_argument("--family", help="comma-separated families to keep: cnn,vit,hybrid,mlp")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--timeout", type=float, default=240, help="seconds per export and per spa run")
    ap.add_argument("--tp-timeout", type=float, default=60, help="extra seconds for Torch-Pruning")
    ap.add_argument("--jobs", type=int, default=1, help="models in flight at once")
    ap.add_argument("--no-tp", action="store_true", help="skip Torch-Pruning")
    ap.add_argument("--models-dir", default="/tmp/coverage_models", help="exported and pruned ONNX files")
    ap.add_argument("--reexport", action="store_true", help="export again even if a cached export exists")
    ap.add_argument("--out", type=pathlib.Path, help="write every row and the summary as JSON")
    # worker mode (internal)
    ap.add_argument("--worker", choices=("torch", "spa"), help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, default=64, help=argparse.SUPPRESS)
    ap.add_argument("--onnx", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker == "torch":
        return worker_torch(args)
    if args.worker == "spa":
        return worker_spa(args)

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(width=None if sys.stdout.isatty() else 250)
    missing = [m for m in ("timm", "torch", "huggingface_hub", "safetensors", "yaml", "PIL") if importlib.util.find_spec(m) is None]
    if not args.no_tp and importlib.util.find_spec("torch_pruning") is None:
        missing.append("torch_pruning")
    if missing:
        console.print(f"[red]missing: {', '.join(missing)}[/]\ninstall the benchmark's packages with:\n  {INSTALL}")
        return 2
    entries = ZOO
    if args.models:
        names = [n.strip() for n in args.models.split(",") if n.strip()]
        entries = [BY_NAME.get(n) or Entry(n, "?") for n in names]
    if args.family:
        fams = set(args.family.split(","))
        entries = [e for e in entries if e.family in fams]
    pathlib.Path(args.models_dir).mkdir(parents=True, exist_ok=True)
    args.threads = max(1, (os.cpu_count() or 1) // max(1, args.jobs))
    console.print(f"{len(entries)} models → {args.models_dir}; ratio {args.ratio}; jobs {args.jobs}; timeout {args.timeout:.0f} s"
                  + ("" if args.no_tp else f" (+{args.tp_timeout:.0f} s Torch-Pruning)"))

    rows: dict[str, dict] = {}
    t_start = time.perf_counter()
    lock = threading.Lock()
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[current]}"), console=console, transient=False) as progress:
        task = progress.add_task("coverage", total=len(entries), current="")
        inflight: dict[str, str] = {}

        def on_stage(name: str, stage: str) -> None:
            with lock:
                inflight[name] = stage
                progress.update(task, current="  ".join(f"{n}: {s}" for n, s in inflight.items()))

        def one(entry: Entry) -> dict:
            try:
                row = run_model(entry, args, on_stage)
            except Exception as e:  # noqa: BLE001  (a driver bug: keep going)
                row = {"model": entry.name, "family": entry.family, "size": entry.size,
                       "spa": {"status": "BROKEN", "detail": f"driver: {type(e).__name__}: {e}"}}
            with lock:
                inflight.pop(entry.name, None)
                st = row["spa"]["status"]
                if st == "BROKEN":
                    progress.console.print(f"[red]BROKEN[/] {entry.name}: {row['spa'].get('detail', '')[:200]}")
                progress.update(task, advance=1, current="  ".join(f"{n}: {s}" for n, s in inflight.items()))
            return row

        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            for row in pool.map(one, entries):
                rows[row["model"]] = row
    ordered = [rows[e.name] for e in entries]
    summary = summarize(ordered, args)
    summary["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    render(ordered, summary, args, console)
    console.print(f"elapsed {summary['elapsed_s']:.0f} s")
    if args.out:
        args.out.write_text(json.dumps({"options": {k: v for k, v in vars(args).items() if k not in ("worker", "out")},
                                        "summary": summary, "rows": ordered}, indent=1, default=str))
        console.print(f"wrote {args.out}")
    return 1 if summary["broken"] else 0


if __name__ == "__main__":
    sys.exit(main())
