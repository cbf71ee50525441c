"""First and second moments of the activations that consumers read (METHODS.md §3.4, §5).

Compensation (``spa.compensation``) and the compensation-aware criterion need, for every
activation tensor ``x`` a consumer reads along a channel axis, ``E[x]`` (per channel) and
``E[x xᵀ]`` (channels × channels), averaged over samples *and* positions. Three sources, all
giving a :class:`Moments`:

- :func:`collect`: ONNX Runtime runs the model with the activations exposed as extra outputs
  on calibration feeds; sums are accumulated in float64 one batch at a time, so memory is
  bounded by the layers' widths (C×C per tensor), never by the number of samples.
- :func:`bn_proxy`: no data. If ``x = f(BatchNorm(z))`` channel by channel, the BN output is
  taken as ``N(β, γ²)`` per channel (the normalisation the network was trained with), pushed
  through ``f`` (and max/average pooling) on a fine Gaussian quadrature grid; channels are taken as independent, so
  ``E[x xᵀ] = diag(Var) + μμᵀ``. With that H the least-squares update of the kept columns is
  zero and compensation reduces to absorbing the removed channels' mean into the bias (§4.1).
- synthetic feeds (``collect`` on :func:`spa.calibration.synthetic_feeds`: 1/f noise images for
  image-like inputs, standard-normal noise for other float inputs): the documented fallback
  for activations that no BatchNorm precedes (a BN folded into its conv at export).

:func:`filter_correlation` gives the BN proxy correlations (``--data-free-method udfc``): those
of the producing layer's filters. :class:`OriginalCache` serves the sequential calibration
refit: the original's sampled activations, computed once, on disk.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import onnx_ir as ir

from spa.graph import all_initializers

__all__ = ["Moments", "PairMoments", "OriginalCache", "collect_pairs", "exposing_session", "collect", "bn_proxy", "filter_correlation", "with_filter_correlation", "activation_function", "MAX_POSITIONS"]

#: Positions (batch × spatial) sampled per tensor per batch: E[x xᵀ] converges long before
#: a 56×56 map's 3136 positions, and C×C×positions is the cost of a batch.
MAX_POSITIONS = 256


@dataclasses.dataclass
class Moments:
    """Per-channel moments of one activation along one axis."""

    mean: np.ndarray  # [C]
    second: np.ndarray  # [C, C]  E[x xᵀ]
    abs_mean: np.ndarray  # [C]  E[|x|] (the ``activation`` criterion)
    count: int  # positions averaged
    source: str  # calibration | bn-proxy | synthetic[-KIND] (spa.calibration.synthetic_source)
    #: ``second`` is exactly ``diag(variance) + mean·meanᵀ`` (independent channels, the BN
    #: proxy): the refit then has a closed form (``spa.compensation``), O(rows·C), not O(C³).
    independent: bool = False

    @property
    def variance(self) -> np.ndarray:
        return np.maximum(np.diag(self.second) - self.mean**2, 0.0)


@dataclasses.dataclass
class PairMoments:
    """Moments of a consumer's input ``x`` in the original model and ``x̂`` in the model being
    compensated (upstream layers already pruned and repaired). Without a second model
    (data-free, or all layers at once) ``x̂ = x``: :meth:`same`."""

    second: np.ndarray  # E[x̂ x̂ᵀ]
    mean: np.ndarray  # E[x̂]
    cross: np.ndarray  # E[x x̂ᵀ]
    orig_second: np.ndarray  # E[x xᵀ]
    orig_mean: np.ndarray  # E[x]
    source: str
    #: x̂ = x with independent channels (see :attr:`Moments.independent`).
    independent: bool = False

    @classmethod
    def same(cls, m: Moments) -> PairMoments:
        return cls(m.second, m.mean, m.second, m.second, m.mean, m.source, m.independent)


class _Accumulator:
    def __init__(self, channels: int) -> None:
        self.s1 = np.zeros(channels)
        self.s2 = np.zeros((channels, channels))
        self.sa = np.zeros(channels)
        self.n = 0
        self._pending: list[np.ndarray] = []
        self._pending_n = 0

    def add(self, x: np.ndarray) -> None:  # x: [C, positions]
        x32 = np.asarray(x, dtype=np.float32)
        self.s1 += x32.sum(axis=1, dtype=np.float64)
        self.sa += np.abs(x32).sum(axis=1, dtype=np.float64)
        self.n += x32.shape[1]
        self._pending.append(x32)
        self._pending_n += x32.shape[1]
        # One x·xᵀ product per C positions gathered (at least a batch): a product per batch of 49
        # positions (a 7×7 map) and then a float64 add into a 2048×2048 sum cost ResNet-50's
        # data-free statistics more than the products; the gathered positions never take more
        # memory than the sum itself.
        if self._pending_n >= max(len(self.s1), MAX_POSITIONS):
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            x32 = np.ascontiguousarray(np.concatenate(self._pending, axis=1))
            self.s2 += x32 @ x32.T  # float32 BLAS per product, float64 sums across
        self._pending, self._pending_n = [], 0

    def moments(self, source: str) -> Moments:
        """The moments so far (the accumulator is spent: its sums are divided in place)."""
        self._flush()
        n = max(self.n, 1)
        self.s2 /= n
        return Moments(self.s1 / n, self.s2, self.sa / n, self.n, source)


def _positions(arrays: list[np.ndarray], axis: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Same-shape activations as [C, positions], at most MAX_POSITIONS positions, the same
    seeded sample of positions for all of them."""
    xs = [np.moveaxis(np.asarray(a), axis, 0).reshape(a.shape[axis], -1) for a in arrays]
    if xs[0].shape[1] > MAX_POSITIONS:
        pick = np.sort(rng.choice(xs[0].shape[1], MAX_POSITIONS, replace=False))
        xs = [x[:, pick] for x in xs]
    return xs


def collect(
    model: ir.Model,
    tensors: Mapping[str, int],
    feeds: Iterable[Mapping[str, np.ndarray]],
    *,
    path: Any,
    max_samples: int | None = None,
    source: str = "calibration",
    seed: int = 0,
) -> tuple[dict[str, Moments], int]:
    """Moments of ``tensors`` (name → channel axis) over ``feeds`` run by ONNX Runtime.

    ``path`` is a scratch file for the copy of ``model`` with the tensors exposed as outputs.
    A sample is one feed's batch entry; feeding stops after ``max_samples`` of them.
    Returns the moments and the number of samples used.
    """
    names = list(tensors)
    sess = exposing_session(model, names, path)
    accs: dict[str, _Accumulator] = {}
    rng = np.random.default_rng(seed)
    samples = 0
    for feed in feeds:
        if max_samples is not None and samples >= max_samples:
            break
        outs = sess.run(names, dict(feed))
        for name, out in zip(names, outs):
            out = np.asarray(out)
            if out.dtype.kind != "f" or out.ndim == 0:
                continue
            axis = tensors[name] % out.ndim
            acc = accs.setdefault(name, _Accumulator(out.shape[axis]))
            acc.add(*_positions([out], axis, rng))
        first = next(iter(feed.values()), None)
        samples += int(first.shape[0]) if first is not None and np.ndim(first) else 1
    return {n: a.moments(source) for n, a in accs.items()}, samples


class _PairAccumulator:
    def __init__(self, channels: int) -> None:
        self.s = np.zeros(channels)
        self.sh = np.zeros(channels)
        self.ss = np.zeros((channels, channels))
        self.shh = np.zeros((channels, channels))
        self.sx = np.zeros((channels, channels))
        self.n = 0

    def add(self, x: np.ndarray, xh: np.ndarray) -> None:  # [C, positions], the same positions
        x = np.ascontiguousarray(x, dtype=np.float32)
        xh = np.ascontiguousarray(xh, dtype=np.float32)
        self.s += x.sum(1, dtype=np.float64)
        self.sh += xh.sum(1, dtype=np.float64)
        self.ss += x @ x.T  # float32 BLAS per batch, float64 sums across batches
        self.shh += xh @ xh.T
        self.sx += x @ xh.T
        self.n += x.shape[1]

    def moments(self) -> PairMoments:
        n = max(self.n, 1)
        return PairMoments(self.shh / n, self.sh / n, self.sx / n, self.ss / n, self.s / n, "calibration")


def exposing_session(model: ir.Model, names: Iterable[str], path: Any) -> Any:
    """Save ``model`` with ``names`` added as graph outputs; an ORT session on it."""
    import onnx

    from spa import verify

    proto = ir.to_proto(model)
    have = {o.name for o in proto.graph.output}
    for name in names:
        if name not in have:
            proto.graph.output.append(onnx.ValueInfoProto(name=name))
    onnx.save(proto, str(path))
    del proto
    return verify.session(path)


def collect_pairs(
    original: Any,
    current: ir.Model,
    tensors: Mapping[str, int],
    feeds: Iterable[Mapping[str, np.ndarray]],
    *,
    path: Any,
    seed: int = 0,
) -> dict[str, PairMoments]:
    """Joint moments of ``tensors`` in ``original`` (an ORT session exposing them) and in
    ``current`` (saved to ``path`` with them exposed), on the same feeds and positions."""
    names = list(tensors)
    sess = exposing_session(current, names, path)
    accs: dict[str, _PairAccumulator] = {}
    rng = np.random.default_rng(seed)
    for feed in feeds:
        xs = original.run(names, dict(feed))
        xhs = sess.run(names, dict(feed))
        for name, x, xh in zip(names, xs, xhs):
            x, xh = np.asarray(x), np.asarray(xh)
            if x.dtype.kind != "f" or x.ndim == 0 or x.shape != xh.shape:
                continue
            axis = tensors[name] % x.ndim
            a, b = _positions([x, xh], axis, rng)
            accs.setdefault(name, _PairAccumulator(a.shape[0])).add(a, b)
    return {n: acc.moments() for n, acc in accs.items()}


class OriginalCache:
    """The original model's activations at the sampled positions, run once for every level of
    the sequential refit and kept on disk, so each level runs only the model being repaired.

    ``levels`` is one ``{tensor: channel axis}`` per level, in order. One pass over ``feeds``
    runs the original with every tensor exposed; per level, positions are drawn exactly as
    :func:`collect_pairs` draws them (a generator seeded with ``seed`` per level, in feed and
    tensor order), and each sampled ``[C, positions]`` block and its position indices are
    appended to that level's scratch file under ``directory``. Memory holds one feed's outputs
    at a time and an index of offsets: it does not grow with the number of samples; the disk
    use does (C × MAX_POSITIONS × 4 bytes per tensor and sample).
    """

    def __init__(self, original: Any, levels: list[Mapping[str, int]], feeds: Iterable[Mapping[str, np.ndarray]], directory: Any, *, seed: int = 0) -> None:
        import pathlib

        self.levels = [dict(lv) for lv in levels]
        self.directory = pathlib.Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        names = list(dict.fromkeys(n for lv in self.levels for n in lv))
        rngs = [np.random.default_rng(seed) for _ in self.levels]
        files = [open(self._file(k), "wb") for k in range(len(self.levels))]  # noqa: SIM115 - closed below
        #: per level, per feed: {tensor: (offset, C, positions, picked)}
        self.index: list[list[dict[str, tuple[int, int, int, bool]]]] = [[] for _ in self.levels]
        try:
            for feed in feeds:
                outs = dict(zip(names, original.run(names, dict(feed)))) if names else {}
                for k, level in enumerate(self.levels):
                    entry: dict[str, tuple[int, int, int, bool]] = {}
                    for name, axis in level.items():
                        x = np.asarray(outs[name])
                        if x.dtype.kind != "f" or x.ndim == 0:
                            continue
                        x = np.moveaxis(x, axis % x.ndim, 0)
                        x = x.reshape(x.shape[0], -1)
                        picked = x.shape[1] > MAX_POSITIONS
                        pick = np.sort(rngs[k].choice(x.shape[1], MAX_POSITIONS, replace=False)) if picked else None
                        block = np.ascontiguousarray(x[:, pick] if picked else x, dtype=np.float32)
                        entry[name] = (files[k].tell(), block.shape[0], block.shape[1], picked)
                        files[k].write(block.tobytes())
                        if picked:
                            files[k].write(pick.astype(np.int64).tobytes())
                    self.index[k].append(entry)
                del outs
        finally:
            for f in files:
                f.close()

    def _file(self, k: int) -> Any:
        return self.directory / f"level{k}.bin"

    def pairs(self, k: int, current: ir.Model, feeds: Iterable[Mapping[str, np.ndarray]], *, path: Any) -> dict[str, PairMoments]:
        """:func:`collect_pairs` for level ``k`` against the cached original: ``current``
        (saved to ``path`` with the level's tensors exposed) is run on the same ``feeds``."""
        level = self.levels[k]
        names = list(level)
        sess = exposing_session(current, names, path)
        accs: dict[str, _PairAccumulator] = {}
        with open(self._file(k), "rb") as f:
            for entry, feed in zip(self.index[k], feeds):
                xhs = sess.run(names, dict(feed))
                for name, xh in zip(names, xhs):
                    if name not in entry:
                        continue
                    offset, c, n, picked = entry[name]
                    f.seek(offset)
                    x = np.fromfile(f, dtype=np.float32, count=c * n).reshape(c, n)
                    xh = np.asarray(xh)
                    xh = np.moveaxis(xh, level[name] % xh.ndim, 0)
                    xh = xh.reshape(xh.shape[0], -1)
                    if picked:
                        xh = xh[:, np.fromfile(f, dtype=np.int64, count=n)]
                    if xh.shape != x.shape:
                        continue
                    accs.setdefault(name, _PairAccumulator(c)).add(x, xh)
        return {n: acc.moments() for n, acc in accs.items()}

    def close(self) -> None:
        for k in range(len(self.levels)):
            self._file(k).unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------
# The BatchNorm proxy (no data)

def _hardsigmoid(alpha: float, beta: float) -> Callable[[np.ndarray], np.ndarray]:
    return lambda u: np.clip(alpha * u + beta, 0.0, 1.0)


def activation_function(node: ir.Node) -> Callable[[np.ndarray], np.ndarray] | None:
    """``f`` of a one-input element-wise activation node (None: not one the proxy knows)."""
    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        return None
    a = {k: v.value for k, v in node.attributes.items()}
    if op == "Relu":
        return lambda u: np.maximum(u, 0.0)
    if op == "LeakyRelu":
        s = float(a.get("alpha", 0.01))
        return lambda u: np.where(u > 0, u, s * u)
    if op == "Sigmoid":
        return lambda u: 1.0 / (1.0 + np.exp(-u))
    if op == "Tanh":
        return np.tanh
    if op == "HardSigmoid":
        return _hardsigmoid(float(a.get("alpha", 0.2)), float(a.get("beta", 0.5)))
    if op == "HardSwish":
        return lambda u: u * np.clip(u / 6.0 + 0.5, 0.0, 1.0)
    if op == "Elu":
        s = float(a.get("alpha", 1.0))
        return lambda u: np.where(u > 0, u, s * (np.exp(np.minimum(u, 0)) - 1))
    if op == "Gelu":
        from scipy.special import erf

        return lambda u: 0.5 * u * (1 + erf(u / math.sqrt(2)))
    if op == "Clip":
        lo, hi = _clip_bounds(node)
        if lo is None and hi is None:
            return None
        return lambda u: np.clip(u, -np.inf if lo is None else lo, np.inf if hi is None else hi)
    if op == "Identity":
        return lambda u: u
    return None


def _clip_bounds(node: ir.Node) -> tuple[float | None, float | None]:
    if "min" in node.attributes or "max" in node.attributes:  # opset < 11
        lo = node.attributes.get("min")
        hi = node.attributes.get("max")
        return (None if lo is None else float(lo.value)), (None if hi is None else float(hi.value))
    bounds = []
    for k in (1, 2):
        v = node.inputs[k] if len(node.inputs) > k else None
        if v is None:
            bounds.append(None)
        elif v.const_value is None:
            return None, None
        else:
            bounds.append(float(v.const_value.numpy().reshape(-1)[0]))
    return bounds[0], bounds[1]


def _silu_tail(mul: ir.Node, x: ir.Value) -> bool:
    """``mul`` computes x·Sigmoid(x) (SiLU/Swish as exported)."""
    if mul.op_type != "Mul" or len(mul.inputs) != 2 or x not in mul.inputs:
        return False
    other = mul.inputs[1] if mul.inputs[0] is x else mul.inputs[0]
    prod = other.producer() if other is not None else None
    return prod is not None and prod.op_type == "Sigmoid" and prod.inputs[0] is x


def _bn_params(node: ir.Node) -> tuple[np.ndarray, np.ndarray] | None:
    """(β, γ) of a BatchNormalization with constant parameters (inference form)."""
    if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 3:
        return None
    scale, bias = node.inputs[1], node.inputs[2]
    if scale is None or bias is None or scale.const_value is None or bias.const_value is None:
        return None
    return bias.const_value.numpy().astype(np.float64).reshape(-1), scale.const_value.numpy().astype(np.float64).reshape(-1)


_GRID = np.linspace(-8.0, 8.0, 401)
_GRID_W = np.exp(-0.5 * _GRID**2)
_GRID_W = _GRID_W / _GRID_W.sum()


def _pool_size(node: ir.Node) -> int | None:
    ks = node.attributes.get("kernel_shape")
    if ks is None:
        return None
    return int(np.prod([int(k) for k in ks.value]))


def _spatial(value: ir.Value | None) -> int | None:
    if value is None or value.shape is None or len(value.shape) < 3:
        return None
    dims = list(value.shape)[2:]
    return int(np.prod(dims)) if all(isinstance(d, int) for d in dims) else None


@dataclasses.dataclass
class _Dist:
    """Per channel: ``chain`` applied to ``N(beta, sigma²)`` (``chain`` from the Gaussian on)."""

    beta: np.ndarray
    sigma: np.ndarray
    chain: tuple[tuple[str, Any], ...] = ()

    def grid(self) -> tuple[np.ndarray, np.ndarray]:
        values = self.beta[:, None] + self.sigma[:, None] * _GRID[None, :]  # [C, points]
        weights = np.broadcast_to(_GRID_W, values.shape).copy()
        for kind, arg in self.chain:
            if kind == "f":
                values = arg(values)
            else:  # max of ``arg`` independent draws
                order = np.argsort(values, axis=1)
                values = np.take_along_axis(values, order, axis=1)
                cdf = np.cumsum(np.take_along_axis(weights, order, axis=1), axis=1)
                cdf = np.minimum(cdf / cdf[:, -1:], 1.0) ** arg
                weights = np.diff(cdf, axis=1, prepend=0.0)
        return values, weights

    def moments(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(mean, E[x²], E|x|) per channel."""
        values, weights = self.grid()
        return (values * weights).sum(1), (values**2 * weights).sum(1), (np.abs(values) * weights).sum(1)

    def gaussian(self, shrink: int = 1) -> _Dist:
        """The Gaussian with this one's mean and variance / ``shrink`` (sums and averages)."""
        mean, second, _ = self.moments()
        return _Dist(mean, np.sqrt(np.maximum(second - mean**2, 0.0) / shrink))


_PASS_THROUGH = ("Identity", "Dropout")
_MAX_DEPTH = 400


def _dist(value: ir.Value | None, memo: dict[str, _Dist | None], depth: int = 0) -> _Dist | None:
    """The per-channel distribution of a value computed channel by channel from BatchNorms."""
    if value is None or depth > _MAX_DEPTH:
        return None
    if value.name in memo:
        return memo[value.name]
    memo[value.name] = None  # a cycle (never in a DAG) or a failure below stays None
    node = value.producer()
    out: _Dist | None = None
    if node is not None and node.domain in ("", "ai.onnx"):
        op = node.op_type
        first = node.inputs[0] if node.inputs else None
        params = _bn_params(node)
        if params is not None:
            out = _Dist(params[0], np.abs(params[1]))
        elif op in _PASS_THROUGH:
            out = _dist(first, memo, depth + 1)
        elif op in ("Flatten", "Reshape", "Squeeze"):
            out = _dist(first, memo, depth + 1) if _spatial(first) == 1 else None
        elif op == "Add" and len(node.inputs) == 2 and all(i is not None and i.const_value is None for i in node.inputs):
            a, b = node.inputs
            if a.shape is not None and a.shape == b.shape:
                da, db = _dist(a, memo, depth + 1), _dist(b, memo, depth + 1)
                if da is not None and db is not None and da.beta.shape == db.beta.shape:
                    ga, gb = da.gaussian(), db.gaussian()
                    out = _Dist(ga.beta + gb.beta, np.sqrt(ga.sigma**2 + gb.sigma**2))
        elif op in ("GlobalAveragePool", "AveragePool"):
            n = _spatial(first) if op == "GlobalAveragePool" else _pool_size(node)
            d = _dist(first, memo, depth + 1)
            out = d.gaussian(n) if d is not None and n else None
        elif op == "MaxPool":
            n = _pool_size(node)
            d = _dist(first, memo, depth + 1)
            out = _Dist(d.beta, d.sigma, (*d.chain, ("max", n))) if d is not None and n else None
        elif op == "Mul" and len(node.inputs) == 2 and any(i is not None and _silu_tail(node, i) for i in node.inputs):
            x = next(i for i in node.inputs if i is not None and _silu_tail(node, i))
            d = _dist(x, memo, depth + 1)
            out = _Dist(d.beta, d.sigma, (*d.chain, ("f", lambda u: u / (1.0 + np.exp(-u))))) if d is not None else None
        else:
            f = activation_function(node)
            d = _dist(first, memo, depth + 1) if f is not None else None
            out = _Dist(d.beta, d.sigma, (*d.chain, ("f", f))) if d is not None else None
    memo[value.name] = out
    return out


def bn_proxy(value: ir.Value, axis: int, memo: dict[str, Any] | None = None) -> Moments | None:
    """Data-free moments of ``value`` along ``axis`` (1) when it is computed channel by channel
    from BatchNormalizations: BN, element-wise activations (SiLU as ``x·Sigmoid(x)``), max and
    average pooling, residual ``Add`` of two such values, Flatten of a [N, C, 1, 1] map.

    The BN output is ``N(β, γ²)`` per channel (what the network was trained to produce),
    represented on a fine grid; an activation maps the grid, a max pool of ``n`` taps takes the
    max of ``n`` independent draws (CDFⁿ); an average of ``n`` positions and a sum of two
    branches are Gaussians with the summed mean and variance (independent positions and
    branches: spreads are approximate, the means — what bias absorption uses — are exact).
    ``memo`` shares the walk between tensors. None for anything else: the caller then uses
    another source.
    """
    if value.shape is None or axis % max(len(value.shape), 1) != 1:
        return None
    d = _dist(value, {} if memo is None else memo)
    if d is None:
        return None
    mean, second, abs_mean = d.moments()
    full = np.outer(mean, mean)
    np.fill_diagonal(full, second)
    return Moments(mean, full, abs_mean, 0, "bn-proxy", independent=True)


# ------------------------------------------------------------------------------------------
# Producer-filter correlations (UDFC-style, no data)

_CHANNELWISE = ("Identity", "Dropout", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool")


def _filters(node: ir.Node) -> np.ndarray | None:
    """The producer's filters as rows [out channels, fan-in] (Conv with one group, Gemm,
    MatMul by a constant [K, N] matrix), None for anything else."""
    op = node.op_type
    if node.domain not in ("", "ai.onnx") or len(node.inputs) < 2 or node.inputs[1] is None:
        return None
    w = node.inputs[1].const_value
    if w is None:
        return None
    w = w.numpy().astype(np.float64)
    if op == "Conv":
        g = node.attributes.get("group")
        if (g is not None and int(g.value) != 1) or w.ndim < 3:
            return None
        return w.reshape(w.shape[0], -1)
    if op == "Gemm" and w.ndim == 2:
        t = node.attributes.get("transB")
        return w if t is not None and int(t.value) else w.T
    if op == "MatMul" and w.ndim == 2:
        return w.T
    return None


def filter_correlation(value: ir.Value, axis: int) -> np.ndarray | None:
    """Correlation of ``value``'s channels (along ``axis`` 1, or the last axis of a 2-D/3-D
    MatMul/Gemm output) implied by the filters of the layer that produces them, under white
    input: ``R = D⁻¹ F Fᵀ D⁻¹`` (``F`` the filters as rows, ``D = diag‖F_c‖``) — the Gram
    matrix UDFC's reconstruction ``w_c ≈ Σ s_k w_k`` solves with. Walked back through
    per-channel ops (BatchNorm: the sign of γ flips a channel's correlations; element-wise
    activations and pooling are taken to keep them, which a ReLU only approximately does).
    None where no single such producer is reached."""
    rank = len(value.shape) if value.shape is not None else None
    if rank is None or rank < 2:
        return None
    sign: np.ndarray | float = 1.0
    v: ir.Value | None = value
    for _ in range(_MAX_DEPTH):
        node = v.producer() if v is not None else None
        if node is None or node.domain not in ("", "ai.onnx"):
            return None
        first = node.inputs[0] if node.inputs else None
        params = _bn_params(node)
        F = _filters(node)
        if F is not None:
            if axis % rank != (1 if node.op_type == "Conv" else rank - 1):
                return None
            norms = np.linalg.norm(F, axis=1)
            if not (norms > 0).all():
                norms = np.where(norms > 0, norms, 1.0)
            R = (F @ F.T) / np.outer(norms, norms)
            if isinstance(sign, np.ndarray):
                if sign.shape[0] != R.shape[0]:
                    return None
                R = R * np.outer(sign, sign)
            np.fill_diagonal(R, 1.0)
            return R
        if params is not None:
            sign = sign * np.where(params[1] < 0, -1.0, 1.0)
            v = first
        elif node.op_type in _CHANNELWISE or activation_function(node) is not None:
            v = first
        elif node.op_type == "Mul" and len(node.inputs) == 2 and any(i is not None and _silu_tail(node, i) for i in node.inputs):
            v = next(i for i in node.inputs if i is not None and _silu_tail(node, i))
        elif node.op_type in ("Flatten", "Reshape", "Squeeze") and _spatial(first) == 1:
            v = first
        elif node.op_type in ("Add", "Sub", "Mul", "Div") and len(node.inputs) == 2 and all(i is not None for i in node.inputs):
            # element-wise with a constant (a bias, a scale: a negative per-channel factor flips
            # the channel), or two tensors of which the full-size one carries the channels
            # (x·g(x) as exported HardSwish, x·gate of a squeeze-excitation): follow it
            consts = [i for i in node.inputs if i.const_value is not None]
            if len(consts) == 1:
                if node.op_type == "Div" and node.inputs[0] is consts[0]:
                    return None  # c / x is not linear in x
                if node.op_type in ("Mul", "Div"):
                    k = consts[0].const_value.numpy().astype(np.float64)
                    flip = _channel_sign(k, rank)
                    if flip is None:
                        return None
                    sign = sign * flip
                v = next(i for i in node.inputs if i.const_value is None)
            elif not consts and node.op_type == "Mul":
                out = node.outputs[0].shape
                full = [i for i in node.inputs if i.shape is not None and out is not None and i.shape == out]
                if not full:
                    return None
                v = full[0]
            else:
                return None
        else:
            # anything else, a depthwise conv included (crossing it, correlations kept up to
            # each filter's sign, was tried on PP-OCR's synthetic statistics and measured worse)
            return None
    return None


def _channel_sign(k: np.ndarray, rank: int) -> np.ndarray | float | None:
    """Per-channel sign of a constant factor broadcast on axis 1 (a scalar: one sign for all,
    which leaves correlations unchanged); None for any other layout."""
    if k.size == 1:
        return 1.0
    dims = k.shape
    if len(dims) == rank - 1 and all(d == 1 for d in dims[1:]) or len(dims) == rank and dims[0] == 1 and all(d == 1 for d in dims[2:]):
        return np.where(k.reshape(-1) < 0, -1.0, 1.0)
    return None


def with_filter_correlation(m: Moments, R: np.ndarray) -> Moments:
    """``m`` with its channels correlated as ``R`` says: ``E[x xᵀ] = s R s + μμᵀ``, ``s`` the
    per-channel standard deviations (diagonal unchanged)."""
    sd = np.sqrt(np.maximum(np.diag(m.second) - m.mean**2, 0.0))
    second = R * np.outer(sd, sd) + np.outer(m.mean, m.mean)
    np.fill_diagonal(second, np.diag(m.second))
    return Moments(m.mean, second, m.abs_mean, m.count, m.source + "+filters")


def consumer_tensors(model: ir.Model, names: Iterable[tuple[str, int]]) -> dict[str, ir.Value]:
    """The IR values of the named activations (graph inputs, node outputs; not initializers)."""
    wanted = {n for n, _ in names}
    found: dict[str, ir.Value] = {}
    inits = all_initializers(model.graph)
    for v in model.graph.inputs:
        if v.name in wanted and v.name not in inits:
            found[v.name] = v
    for node in model.graph:
        for v in node.outputs:
            if v.name in wanted:
                found[v.name] = v
    return found
