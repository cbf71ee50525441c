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
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import onnx_ir as ir

from spa.errors import UsageError
from spa.inputs import graph_inputs

__all__ = ["Calibration", "LABELS", "open_calibration"]

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
