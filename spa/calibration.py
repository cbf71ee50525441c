"""Calibration data: ``--calibration DATA`` as feed dicts, checked against the model's inputs.

Accepted forms (a *sample* is one entry along the first axis):

- a ``.npz`` file keyed by input name; every array holds the samples stacked on axis 0 —
  either with the model's own rank (axis 0 is the batch: samples are fed one at a time as
  batches of 1) or with one more axis (each ``array[i]`` is a whole feed);
- a folder of ``.npy`` files: ``NAME.npy`` per input, stacked as above; for a model with one
  input, any ``*.npy`` files, each one feed or a stack of them (sorted by file name);
- from Python, any iterable of feed dicts ``{input name: array}``.

Everything is checked before ONNX Runtime sees it: names, dtypes, ranks and static dims,
and NaN/inf, each a one-line :class:`~spa.errors.UsageError`. Feeds are produced lazily, so a
large calibration set is never in memory at once beyond what the ``.npz`` reader maps.

Without data, :func:`synthetic_feeds` makes the data-free fallback's seeded inputs: for an
image-like input (float, 4-D NCHW or NHWC, both spatial dims ≥ 8) spatially correlated images
(1/f "pink" noise, or "dead leaves" — random overlapping discs and rectangles of constant
colour, Baradad et al. 2021), white noise for everything else.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import onnx_ir as ir

from spa.errors import UsageError
from spa.inputs import graph_inputs, make_feeds

__all__ = ["Calibration", "LABELS", "open_calibration", "SYNTHETIC_KINDS", "image_layout", "synthetic_image", "synthetic_feeds", "synthetic_source"]

#: The key of optional labels in calibration data (one per sample, stacked like the inputs):
#: the gradient criteria's cross-entropy reads them; everything else never sees them.
LABELS = "labels"


class Calibration:
    """A re-iterable source of checked feed dicts for one model."""

    def __init__(self, source: Any, model: ir.Model, *, limit: int | None = None) -> None:
        self.source = source
        self.limit = limit
        self.specs = {v.name: v for v in graph_inputs(model)}
        self.describe = source if isinstance(source, (str, os.PathLike)) else "<calibration feeds>"
        if isinstance(source, (str, os.PathLike)):
            p = pathlib.Path(source)
            if not p.exists():
                raise UsageError(f"--calibration {p}: no such file or folder")
            if p.is_dir() and not any(p.glob("*.npy")):
                raise UsageError(f"--calibration {p}: the folder holds no .npy files")
            if p.is_file() and p.suffix != ".npz":
                raise UsageError(f"--calibration {p}: expected a .npz file or a folder of .npy files")
        first = next(iter(self), None)
        if first is None:
            raise UsageError(f"--calibration {self.describe}: no samples")

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for feed, _ in self.labelled():
            yield feed

    def labelled(self) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray | None]]:
        """(feed, its labels or None) per sample: the ``labels`` entry is kept out of the feed."""
        n = 0
        for feed in self._raw():
            if self.limit is not None and n >= self.limit:
                return
            labels = feed.pop(LABELS, None) if LABELS not in self.specs else None  # an input called "labels" stays an input
            yield self._check(feed, n), None if labels is None else np.atleast_1d(np.asarray(labels))
            n += 1

    # -- reading ----------------------------------------------------------------------------
    def _raw(self) -> Iterator[dict[str, np.ndarray]]:
        src = self.source
        if isinstance(src, (str, os.PathLike)):
            p = pathlib.Path(src)
            if p.is_dir():
                yield from self._folder(p)
            else:
                try:
                    data = np.load(p, allow_pickle=False)
                except Exception as e:  # noqa: BLE001 - numpy raises many kinds
                    raise UsageError(f"--calibration {p}: not a readable .npz file ({e})") from None
                with data:
                    yield from self._stacked({k: data[k] for k in data.files}, str(p))
            return
        if isinstance(src, Mapping):
            yield from self._stacked(dict(src), "<calibration arrays>")
            return
        for item in src:
            if not isinstance(item, Mapping):
                raise UsageError(f"calibration feeds must be dicts of input name → array, got {type(item).__name__}")
            yield {k: np.asarray(v) for k, v in item.items()}

    def _folder(self, p: pathlib.Path) -> Iterator[dict[str, np.ndarray]]:
        named = {f.stem: f for f in p.glob("*.npy") if f.stem in self.specs or f.stem == LABELS}
        if set(named) == {LABELS}:
            named = {}
        if named:
            yield from self._stacked({k: np.load(f, mmap_mode="r", allow_pickle=False) for k, f in named.items()}, str(p))
            return
        if len(self.specs) != 1:
            raise UsageError(f"--calibration {p}: name the files after the inputs ({', '.join(f'{n}.npy' for n in self.specs)})")
        (name,) = self.specs
        for f in sorted(f for f in p.glob("*.npy") if f.stem != LABELS):
            yield from self._stacked({name: np.load(f, allow_pickle=False)}, str(f))

    def _stacked(self, arrays: Mapping[str, np.ndarray], where: str) -> Iterator[dict[str, np.ndarray]]:
        self._names(arrays, where)
        counts = {k: len(a) if np.ndim(a) else 0 for k, a in arrays.items()}
        if len(set(counts.values())) > 1:
            raise UsageError(f"--calibration {where}: inputs hold different numbers of samples ({counts})")
        total = next(iter(counts.values()), 0)
        for i in range(total):
            feed = {}
            for k, a in arrays.items():
                if k == LABELS and k not in self.specs:
                    feed[k] = np.atleast_1d(np.asarray(a[i]))
                    continue
                rank = len(self.specs[k].shape) if self.specs[k].shape is not None else np.ndim(a)
                feed[k] = np.asarray(a[i : i + 1] if np.ndim(a) == rank else a[i])
            yield feed

    # -- checking ---------------------------------------------------------------------------
    def _names(self, feed: Mapping[str, Any], where: str) -> None:
        missing = [n for n in self.specs if n not in feed]
        extra = [n for n in feed if n not in self.specs and n != LABELS]  # labels: kept apart by ``labelled``
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing {', '.join(missing)}")
            if extra:
                parts.append(f"not inputs of the model: {', '.join(extra)}")
            raise UsageError(f"--calibration {where}: {'; '.join(parts)} (inputs: {', '.join(self.specs)})")

    def _check(self, feed: dict[str, np.ndarray], k: int) -> dict[str, np.ndarray]:
        self._names(feed, f"{self.describe} sample {k}")
        out = {}
        for name, arr in feed.items():
            spec = self.specs[name]
            want = spec.dtype.numpy() if spec.dtype is not None else None
            if want is not None and arr.dtype != want:
                if arr.dtype.kind == np.dtype(want).kind and arr.dtype.kind in "f":
                    arr = arr.astype(want)  # float64 data for a float32 input is common and safe
                else:
                    raise UsageError(f"--calibration sample {k}: input '{name}' is {arr.dtype}, the model wants {np.dtype(want)}")
            if spec.shape is not None:
                dims = list(spec.shape)
                if arr.ndim != len(dims):
                    raise UsageError(f"--calibration sample {k}: input '{name}' has rank {arr.ndim}, the model wants {len(dims)} ({list(spec.shape)})")
                for i, (have, d) in enumerate(zip(arr.shape, dims)):
                    if isinstance(d, int) and d != have:
                        raise UsageError(f"--calibration sample {k}: input '{name}' has {list(arr.shape)}, the model wants {d} on axis {i}")
            if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
                raise UsageError(f"--calibration sample {k}: input '{name}' holds NaN or inf")
            out[name] = np.ascontiguousarray(arr)
        return out


def open_calibration(source: Any, model: ir.Model, samples: int | None) -> Calibration | None:
    """The checked calibration source (None when ``source`` is None)."""
    if source is None:
        return None
    if isinstance(source, Calibration):
        return source
    return Calibration(source, model, limit=samples)


# ------------------------------------------------------------------------------------------
# Synthetic inputs (no data)

#: ``normal``: standard normal per element (what :func:`spa.inputs.make_feeds` draws);
#: ``uniform``: uniform on [-1, 1] per element; ``pink``: 1/f noise (power ∝ 1/f², the
#: spectrum of natural images) standardised per image; ``leaves``: dead-leaves images, colours
#: on [-1, 1]. The image kinds apply to image-like inputs only; other float inputs get
#: ``normal``, integer inputs what ``make_feeds`` draws.
SYNTHETIC_KINDS = ("normal", "uniform", "pink", "leaves")
#: Minimum height and width of an image-like input.
MIN_SPATIAL = 8
#: Channels of an image are correlated (natural RGB nearly so): each channel is ``mix`` times
#: a shared field plus ``1 - mix`` times its own.
CHANNEL_MIX = 0.9


def image_layout(shape: list[int] | tuple[int, ...]) -> str | None:
    """``"NCHW"`` or ``"NHWC"`` for an image-like 4-D shape, None otherwise. NCHW unless only
    the last axis looks like colour channels (≤ 4) and the middle two are spatial."""
    if len(shape) != 4:
        return None
    _, a, b, c = (int(d) for d in shape)
    if b >= MIN_SPATIAL and c >= MIN_SPATIAL and (a <= 4 or c > 4):
        return "NCHW"
    if a >= MIN_SPATIAL and b >= MIN_SPATIAL and c <= 4:
        return "NHWC"
    return None


def _pink(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """One [h, w] field with amplitude ∝ 1/f (power ∝ 1/f²), zero mean, unit variance."""
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    f = np.sqrt(fx**2 + fy**2)
    f[0, 0] = np.inf  # no DC: zero mean
    spec = np.fft.rfft2(rng.standard_normal((h, w))) / f
    x = np.fft.irfft2(spec, s=(h, w))
    return (x - x.mean()) / max(float(x.std()), 1e-12)


def _leaves(rng: np.random.Generator, h: int, w: int, channels: int, mix: float) -> np.ndarray:
    """One [channels, h, w] dead-leaves image: discs and axis-aligned rectangles, sizes with
    density ∝ r⁻³ between 1 px and half the shorter side, laid front to back until the canvas
    is covered (at most 4000 shapes; the rest takes a last colour); colours on [-1, 1]."""
    img = np.zeros((channels, h, w))
    free = np.ones((h, w), dtype=bool)
    yy, xx = np.mgrid[0:h, 0:w]
    rmin, rmax = 1.0, max(min(h, w) / 2.0, 1.0)
    for _ in range(4000):
        if not free.any():
            break
        u = rng.random()
        r = (rmin**-2 - u * (rmin**-2 - rmax**-2)) ** -0.5  # inverse CDF of ∝ r⁻³
        cy, cx = rng.random() * h, rng.random() * w
        y0, y1 = max(int(cy - r), 0), min(int(cy + r) + 1, h)
        x0, x1 = max(int(cx - r), 0), min(int(cx + r) + 1, w)
        if y0 >= y1 or x0 >= x1:
            continue
        if rng.random() < 0.5:
            shape = (yy[y0:y1, x0:x1] - cy) ** 2 + (xx[y0:y1, x0:x1] - cx) ** 2 <= r * r
        else:
            ry, rx = r * rng.uniform(0.3, 1.0), r * rng.uniform(0.3, 1.0)
            shape = (np.abs(yy[y0:y1, x0:x1] - cy) <= ry) & (np.abs(xx[y0:y1, x0:x1] - cx) <= rx)
        paint = shape & free[y0:y1, x0:x1]
        colour = mix * rng.uniform(-1.0, 1.0) + (1.0 - mix) * rng.uniform(-1.0, 1.0, channels)
        img[:, y0:y1, x0:x1][:, paint] = colour[:, None]
        free[y0:y1, x0:x1] &= ~paint
    if free.any():
        img[:, free] = (mix * rng.uniform(-1.0, 1.0) + (1.0 - mix) * rng.uniform(-1.0, 1.0, channels))[:, None]
    return img


def synthetic_image(kind: str, shape: list[int] | tuple[int, ...], layout: str, rng: np.random.Generator, *, mix: float | None = None) -> np.ndarray:
    """A float64 batch of ``shape`` (``layout`` NCHW or NHWC) of the image ``kind``; ``mix``
    defaults to :data:`CHANNEL_MIX`."""
    mix = CHANNEL_MIX if mix is None else mix
    n, *rest = (int(d) for d in shape)
    c, h, w = rest if layout == "NCHW" else (rest[2], rest[0], rest[1])
    if kind == "normal":
        out = rng.standard_normal((n, c, h, w))
    elif kind == "uniform":
        out = rng.uniform(-1.0, 1.0, (n, c, h, w))
    elif kind == "pink":
        out = np.stack([mix * _pink(rng, h, w)[None] + (1.0 - mix) * np.stack([_pink(rng, h, w) for _ in range(c)]) for _ in range(n)])
        out = out / np.maximum(out.std(axis=(1, 2, 3), keepdims=True), 1e-12)  # per image
    elif kind == "leaves":
        out = np.stack([_leaves(rng, h, w, c, mix) for _ in range(n)])
    else:
        raise UsageError(f"synthetic inputs: unknown kind {kind!r} (one of {', '.join(SYNTHETIC_KINDS)})")
    return out if layout == "NCHW" else out.transpose(0, 2, 3, 1)


def synthetic_source(model: ir.Model, shapes: Mapping[str, list[int]], kind: str, values: Mapping[str, float] | None = None) -> str:
    """The statistics' source name for :func:`synthetic_feeds` of ``kind`` on ``model``:
    ``synthetic`` (white normal noise) or ``synthetic-KIND`` where an image input gets ``kind``."""
    if kind == "normal":
        return "synthetic"
    fixed = set(values or {})
    images = [v for v in graph_inputs(model)
              if v.dtype is not None and v.dtype.is_floating_point() and v.name in shapes and v.name not in fixed and image_layout(shapes[v.name])]
    return f"synthetic-{kind}" if images else "synthetic"


def synthetic_feeds(model: ir.Model, shapes: Mapping[str, list[int]], *, kind: str, samples: int, seed: int, values: Mapping[str, float] | None = None) -> Iterator[dict[str, np.ndarray]]:
    """``samples`` seeded feeds (deterministic in ``seed``): :func:`spa.inputs.make_feeds`
    with seed ``seed + 1 + k`` for feed ``k`` (so ``kind="normal"`` is exactly the white-noise
    fallback), then every image-like float input not fixed by ``values`` replaced by a
    ``kind`` image drawn from its own generator (seeded by ``seed``, ``k`` and the input's
    position)."""
    if kind not in SYNTHETIC_KINDS:
        raise UsageError(f"synthetic inputs: unknown kind {kind!r} (one of {', '.join(SYNTHETIC_KINDS)})")
    fixed = set(values or {})
    inputs = graph_inputs(model)
    for k in range(samples):
        feed = make_feeds(model, shapes, seed=seed + 1 + k, values=values)
        if kind != "normal":
            for i, v in enumerate(inputs):
                layout = image_layout(shapes.get(v.name, ())) if v.name in shapes else None
                if v.name in fixed or layout is None or feed[v.name].dtype.kind != "f":
                    continue
                rng = np.random.default_rng([seed, k, i])
                feed[v.name] = synthetic_image(kind, shapes[v.name], layout, rng).astype(feed[v.name].dtype)
        yield feed
