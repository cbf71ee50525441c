"""Prune any time, on sklearn's digits: before training, after training with fine-tuning,
after training without it — the "any time" table of the SPA paper, on a task anyone can rerun.

    python examples/anytime_digits.py --seeds 0 1 2     # a few minutes on two CPU cores

A small CNN (three Conv-BN-ReLU, GAP, Linear) is trained in seconds. Every pruned model
removes the channels spa chooses for a 50 % FLOPs cut (``flops_target=0.5``), measured by
spa's cost model on the ONNX export; accuracy is on the held-out test split (450 images).

- before training: SNIP / GraSP / CroP (or ``random``, ``l1``) on the *initial* weights,
  gradients computed by spa on the ONNX export; the plan alone is mapped back to the torch
  module (``spa.torch.apply_plan``, by the plan's fingerprints) and the smaller model is trained
  from those initial weights with the original's schedule;
- after training, with fine-tuning: the plan (``l1``, ``taylor``) is mapped to the trained
  module (with ``model=``, so also checked in ONNX Runtime), which is fine-tuned for
  ``FT_EPOCHS`` epochs;
- after training, without fine-tuning: spa's pruned ONNX as it comes out (``--compensate
  none | data-free | calibration``), evaluated in ONNX Runtime.

Requires torch, onnxscript, scikit-learn (``pip install 'spa[torch]' scikit-learn``).
"""

from __future__ import annotations

import argparse
import copy
import io
import time
import warnings

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import spa
import spa.torch as spa_torch

EPOCHS, FT_EPOCHS, BATCH, LR = 15, 3, 32, 3e-3
CALIBRATION = 256  # training images spa sees (gradients, compensation)


class Net(nn.Module):
    def __init__(self, width: int = 32) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(),
        )
        self.head = nn.Linear(2 * w, 10)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def data(seed: int):
    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    return train_test_split(x, d.target.astype(np.int64), test_size=450, random_state=seed, stratify=d.target)


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, lr: float, seed: int) -> float:
    """Adam with a cosine schedule; returns the wall time in seconds."""
    start = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * int(np.ceil(len(x) / BATCH))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    X, Y = torch.from_numpy(x), torch.from_numpy(y)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(X), generator=g).split(BATCH):
            opt.zero_grad()
            nn.functional.cross_entropy(model(X[idx]), Y[idx]).backward()
            opt.step()
            sched.step()
    model.eval()
    return time.perf_counter() - start


def accuracy_torch(model: nn.Module, x, y) -> float:
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def accuracy_onnx(model: onnx.ModelProto, x, y) -> float:
    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    logits = np.concatenate([sess.run(None, {"x": x[i : i + 1]})[0] for i in range(len(x))])
    return float((logits.argmax(1) == y).mean())


def export(model: nn.Module) -> onnx.ModelProto:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.zeros(1, 1, 8, 8),), buf, input_names=["x"], output_names=["y"], dynamo=False)
    return onnx.load_from_string(buf.getvalue())


def run(seed: int, flops_target: float) -> tuple[list[tuple[str, str, float, float, float]], dict[str, list[float]], tuple[float, ...]]:
    """One seed: the "any time" rows (when, method, accuracy, FLOPs kept, seconds) and the
    criteria-alone sweep (criterion → accuracy per FLOPs target)."""
    torch.manual_seed(seed)
    xtr, xte, ytr, yte = data(seed)
    calib = {"x": xtr[:CALIBRATION]}
    labelled = {**calib, "labels": ytr[:CALIBRATION]}
    common = dict(flops_target=flops_target, verify="check", benchmark=False, seed=seed)
    rows: list[tuple[str, str, float, float, float]] = []

    init = Net()
    trained = copy.deepcopy(init)
    t_train = train(trained, xtr, ytr, EPOCHS, LR, seed)
    base = export(trained)
    rows.append(("—", "original (no pruning)", accuracy_torch(trained, xte, yte), 1.0, t_train))

    def pruned_flops(result) -> float:
        return result.report.flops_after / result.report.flops_before

    # -- before training: prune at initialisation, map to torch, train the smaller model -----
    init_onnx = export(init)
    for crit in ("snip", "grasp", "crop", "l1", "random"):
        t0 = time.perf_counter()
        result = spa.prune(init_onnx, criterion=crit, calibration=labelled, **common)
        small = copy.deepcopy(init)
        spa_torch.apply_plan(small, result.plan)  # the plan alone: its fingerprints find the (BN-folded) tensors
        t = time.perf_counter() - t0 + train(small, xtr, ytr, EPOCHS, LR, seed)
        rows.append(("before training", f"{crit} at init → train {EPOCHS} epochs", accuracy_torch(small, xte, yte), pruned_flops(result), t))

    # -- after training, with fine-tuning: map the plan, fine-tune a few epochs ---------------
    for crit in ("l1", "taylor"):
        t0 = time.perf_counter()
        result = spa.prune(base, criterion=crit, calibration=labelled, **common)
        tuned = copy.deepcopy(trained)
        spa_torch.apply_plan(tuned, result.plan, model=base)  # with the ONNX file: also checked in ONNX Runtime
        t = time.perf_counter() - t0 + train(tuned, xtr, ytr, FT_EPOCHS, LR / 3, seed)
        rows.append(("after, fine-tuned", f"{crit} → fine-tune {FT_EPOCHS} epochs", accuracy_torch(tuned, xte, yte), pruned_flops(result), t))

    # -- after training, without fine-tuning: spa's ONNX as it comes out ----------------------
    for crit, comp in (("l1", "none"), ("taylor", "none"), ("hessian", "none"), ("l1", "data-free"), ("l1", "calibration"),
                       ("taylor", "calibration")):
        t0 = time.perf_counter()
        cal = labelled if crit in ("taylor", "hessian") else (calib if comp == "calibration" else None)
        result = spa.prune(base, criterion=crit, compensate=comp, calibration=cal, **common)
        t = time.perf_counter() - t0
        rows.append(("after, no fine-tuning", f"{crit}, --compensate {comp}", accuracy_onnx(ir.to_proto(result.model), xte, yte), pruned_flops(result), t))

    # -- the criteria alone (no compensation, no fine-tuning) at milder cuts -------------------
    targets = (0.85, 0.7, flops_target)
    sweep: dict[str, list[float]] = {}
    for crit in ("l1", "l2", "fpgm", "taylor", "hessian"):
        for target in targets:
            result = spa.prune(base, criterion=crit, calibration=labelled if crit in ("taylor", "hessian") else None,
                               **{**common, "flops_target": target})
            sweep.setdefault(crit, []).append(accuracy_onnx(ir.to_proto(result.model), xte, yte))
    return rows, sweep, targets


def _cell(values: list[float]) -> str:
    v = 100 * np.asarray(values)
    return f"{v.mean():.1f} %" if len(v) == 1 else f"{v.mean():.1f} % ({v.min():.1f}–{v.max():.1f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed (data split, init, training order)")
    ap.add_argument("--flops-target", type=float, default=0.5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    table: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    sweeps: dict[str, list[list[float]]] = {}
    for seed in args.seeds:
        rows, sweep, targets = run(seed, args.flops_target)
        for when, method, acc, flops, t in rows:
            table.setdefault((when, method), []).append((acc, flops, t))
        for crit, accs in sweep.items():
            sweeps.setdefault(crit, []).append(accs)
    print(f"digits: 1347 train / 450 test images, Net(32), flops_target={args.flops_target}, seeds {args.seeds}; "
          "accuracy: mean (min–max) over seeds; wall time: mean, including training")
    print()
    print("| when | method | test accuracy | FLOPs kept | wall time |")
    print("|---|---|---|---|---|")
    for (when, method), runs in table.items():
        accs, flops, ts = zip(*runs)
        print(f"| {when} | {method} | {_cell(list(accs))} | {100 * np.mean(flops):.0f} % | {np.mean(ts):.1f} s |")
    print()
    print("criteria alone: after training, --compensate none, no fine-tuning (test accuracy)")
    print()
    print("| criterion | " + " | ".join(f"FLOPs target {t:.2f}" for t in targets) + " |")
    print("|---|" + "---|" * len(targets))
    for crit, runs in sweeps.items():
        print(f"| {crit} | " + " | ".join(_cell([r[i] for r in runs]) for i in range(len(targets))) + " |")


if __name__ == "__main__":
    main()
