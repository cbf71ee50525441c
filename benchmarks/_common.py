"""Helpers shared by the benchmark scripts (not part of the ``spa`` package).

Each benchmark runs as ``python benchmarks/<name>.py`` from anywhere: importing this module
puts the repository root (for ``import spa`` without installing) and ``models/`` (for
``import zoo``) on ``sys.path``.
"""

from __future__ import annotations

import collections
import math
import os
import re
import pathlib
import sys
import time
from collections.abc import Mapping, Sequence

import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
for _p in (REPO_ROOT, REPO_ROOT / "models"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], title: str | None = None) -> str:
    """A plain fixed-width text table (right-aligned except the first column)."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    out = []
    if title:
        out.append(title)
    out.append(line(cells[0]))
    out.append("  ".join("-" * w for w in widths))
    out.extend(line(r) for r in cells[1:])
    return "\n".join(out)


def fmt(x: float | None, spec: str = ".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:,.1f} MiB"


def ort_session(path: str | os.PathLike, threads: int):
    """A CPU ORT session with ``threads`` intra-op threads, sequential execution, no spinning."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Side by side, several sessions each own a thread pool; a pool that spin-waits after
    # its run steals the cores from the next model's run (on 2 cores it doubles latencies
    # and scatters them: ResNet-50 82.6 ms [p10 75.8, p90 92.2] spinning vs 42.8 [41.9, 45.4]).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def latency_side_by_side(
    paths: Mapping[str, str | os.PathLike],
    feeds: Mapping[str, object],
    *,
    threads: int = 2,
    warmup: int = 3,
    runs: int = 20,
) -> dict[str, dict[str, float]]:
    """Median/p10/p90 latency (ms) of each model, runs interleaved round-robin, and the
    paired speedup of each against the first model.

    Every model gets the same feeds; each round runs every model once, the starting model
    rotating from round to round so no model is always first (cache-cold) or last.
    """
    import numpy as np

    names = list(paths)
    sessions = {n: ort_session(paths[n], threads) for n in names}
    for _ in range(warmup):
        for n in names:
            sessions[n].run(None, dict(feeds))
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(runs):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            t0 = time.perf_counter()
            sessions[n].run(None, dict(feeds))
            times[n].append((time.perf_counter() - t0) * 1e3)
    first = np.asarray(times[names[0]])
    return {
        n: {
            "median": float(np.median(t)),
            "p10": float(np.percentile(t, 10)),
            "p90": float(np.percentile(t, 90)),
            "runs": len(t),
            # median over rounds of (first model's time / this model's time) in the same round:
            # robust to machine load that drifts between rounds
            "paired_speedup": float(np.median(first / np.asarray(t))),
            "times": [round(x, 3) for x in t],
        }
        for n, t in times.items()
    }


def reasons(blocked: list[dict]) -> list[list]:
    """Block reasons of the frozen groups: [code (op), groups, units], most units first."""
    units: collections.Counter = collections.Counter()
    groups: collections.Counter = collections.Counter()
    for g in blocked:
        seen = set()
        for r in g.get("reasons") or []:
            code = r.get("code", "?")
            text = r.get("reason") or ""
            m = re.search(r"rule for (\w+)", text)
            op = m.group(1) if m else (text.split(" '", 1)[0] if " '" in text else "")
            key = f"{code} ({op})" if op and " " not in op else code
            if key not in seen:
                seen.add(key)
                units[key] += int(g.get("frozen") or 0)
                groups[key] += 1
    return [[k, groups[k], units[k]] for k, _ in units.most_common()]


def spa_failure(e: BaseException) -> dict:
    """How a spa run that raised is classified: a refusal (SpaError) is a reason; anything else,
    a VerificationError included, is a spa bug (BROKEN)."""
    import spa

    if isinstance(e, spa.VerificationError):
        return {"status": "BROKEN", "detail": f"VerificationError: {e}", "group": e.group, "max_diff": e.max_diff}
    if isinstance(e, spa.SpaError):
        return {"status": "refused", "detail": f"{type(e).__name__}: {e}"}
    return {"status": "BROKEN", "detail": f"{type(e).__name__}: {e}"[:1000]}


def spa_figures(rep, wall: float) -> dict:
    """The figures of a spa report that the coverage tables show."""
    verify_stages = {"snapshot", "verify", "benchmark"}
    return {
        "wall_s": round(wall, 3),
        "prune_s": round(sum(v for k, v in rep.timings.items() if k not in verify_stages), 3),
        "timings": rep.timings,
        "macs_before": rep.macs_before, "macs_after": rep.macs_after,
        "flops_before": rep.flops_before, "flops_after": rep.flops_after,
        "params_before": rep.params_before, "params_after": rep.params_after,
        "macs_ratio": rep.macs_after / rep.macs_before if rep.macs_before else None,
        "flops_ratio": rep.flops_ratio,
        "params_ratio": rep.params_ratio,
        "groups_total": rep.groups_total, "groups_pruned": rep.groups_pruned,
        "groups_blocked": rep.groups_blocked, "groups_partial": rep.groups_partial,
        "oracle": {k: v for k, v in (rep.oracle or {}).items() if k != "per_output"},
        "reasons": reasons(rep.blocked),
    }


# -- OCR helpers shared by real_models.py and accuracy.py ------------------------------------

FONT_PATHS = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
)


def edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def load_font(size: int):
    from PIL import ImageFont

    for p in FONT_PATHS:
        if os.path.exists(p):
            return ImageFont.truetype(p, size)
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def render_line(text: str, size: int = 32) -> np.ndarray:
    """A text line, black on white, tightly cropped with a small margin: HxWx3 uint8."""
    from PIL import Image, ImageDraw

    font = load_font(size)
    left, top, right, bottom = font.getbbox(text)
    pad_x, pad_y = size // 3, size // 4
    img = Image.new("RGB", (right - left + 2 * pad_x, bottom - top + 2 * pad_y), "white")
    ImageDraw.Draw(img).text((pad_x - left, pad_y - top), text, fill=(20, 20, 20), font=font)
    return np.asarray(img)


def resize_norm(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """rapidocr's resize_norm_img: resize to ``height`` keeping the ratio (≤ ``width``),
    (x/255 - 0.5)/0.5, CHW, zero-pad on the right to ``width``."""
    from PIL import Image

    h, w = img.shape[:2]
    resized_w = min(width, int(math.ceil(height * w / float(h))))
    resized = np.asarray(Image.fromarray(img).resize((resized_w, height), Image.BILINEAR), np.float32)
    resized = (resized.transpose(2, 0, 1) / 255.0 - 0.5) / 0.5
    out = np.zeros((3, height, width), np.float32)
    out[:, :, :resized_w] = resized
    return out


def ctc_decode(probs: np.ndarray, chars: list[str]) -> list[str]:
    texts = []
    for seq in probs.argmax(axis=2):
        keep = np.ones(len(seq), bool)
        keep[1:] = seq[1:] != seq[:-1]
        keep &= seq != 0
        texts.append("".join(chars[i] for i in seq[keep]))
    return texts


def minilm_encoder(model_dir):
    """The sentence transformer at ``model_dir`` as a module (input_ids, attention_mask) →
    last_hidden_state: what the MiniLM benchmarks export to ONNX."""
    import torch
    from transformers import AutoModel

    class Encoder(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            return self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    return Encoder(AutoModel.from_pretrained(str(model_dir)).eval()).eval()
