"""Value fingerprints: what a plan carries so that ``spa.torch.apply_plan`` can find each
planned ONNX tensor in a ``state_dict`` without the ONNX file.

Exporters rename and transform weights (``onnx::Conv_30``, dynamo's ``val_N``, folded
BatchNorm, transposed MatMul weights, LSTM gates reordered), so ``spa.torch.match`` matches
by value. With ``model=`` it compares whole tensors. A fingerprint lets it compare without
the file. ``build_plan`` writes one per planned tensor (``tensors[i].fingerprint``):

- ``rows``, ``cols``: a seeded sample of at most 8 rows and 8 columns of the tensor viewed as
  ``[shape[0], rest]`` (indices stored, so no random stream has to be reproduced);
- ``sample``: those rows × cols values, base64 of little-endian float32 (compact and exact);
- ``norm``: the L2 norm of the whole tensor (float64). It is invariant under the axis
  permutations, leading 1-axes and gate reorders the rules try, and it catches a candidate
  that agrees on the sample only;
- ``constant``: every element equal (an exporter's zero initial LSTM state, a filled constant);
- ``conv`` / ``batchnorm``: the graph facts the BatchNorm rules need: for a Conv weight, its
  bias input and whether a BatchNormalization reads the Conv; for a BatchNormalization
  parameter, its input index (1–4) and the weight of the Conv that feeds it.

The rows are not normalised per output channel: a BN-folded Conv weight is matched by
recomputing the fold from the module (conv weight × γ/√(var+ε) of its BatchNorm, all in the
module), so the raw sample compares exactly. A plan also records its graph ``inputs``
(concrete shapes and dtypes), the seeded probe that pairs each Conv with its BatchNorm.

Pure numpy and onnx-ir: building a plan needs no torch.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Mapping
from typing import Any, NoReturn

import numpy as np

from spa.errors import PlanError

__all__ = ["Fingerprint", "make_fingerprint", "value_fingerprint", "graph_facts", "facts_json", "plan_inputs", "check_fingerprint", "check_inputs", "MAX_ROWS", "MAX_COLS"]

MAX_ROWS = 8
MAX_COLS = 8
#: Two fingerprinted values agree when |a − b| ≤ RTOL·max|b| + ATOL (the ``model=`` rule's tolerance).
RTOL, ATOL = 1e-5, 1e-7


def _view(shape: tuple[int, ...]) -> tuple[int, int]:
    n0 = shape[0] if shape else 1
    rest = math.prod(shape[1:]) if len(shape) > 1 else 1
    return n0, rest


class Fingerprint:
    """A planned ONNX tensor as the matcher sees it without the ONNX file."""

    exact = False

    def __init__(self, shape, rows, cols, sample, norm, constant, conv=None, batchnorm=None):
        self.shape = tuple(int(s) for s in shape)
        self.rows = np.asarray(rows, dtype=np.int64)
        self.cols = np.asarray(cols, dtype=np.int64)
        self.sample = np.asarray(sample, dtype=np.float32).reshape(len(self.rows), len(self.cols))
        self.norm = float(norm)
        self.constant = bool(constant)
        self.conv = conv  # (bias name or None, whether a BatchNormalization reads the Conv) or None
        self.batchnorm = batchnorm  # (input index 1–4, the feeding Conv's weight or None) or None

    def matches(self, cand: np.ndarray) -> bool:
        """Whether ``cand`` (a tensor in the ONNX layout) agrees with the fingerprint."""
        if tuple(cand.shape) != self.shape:
            return False
        flat = cand.reshape(_view(self.shape))
        scale = max(float(np.abs(cand).max()) if cand.size else 0.0, 1e-12)
        got = flat[np.ix_(self.rows, self.cols)].astype(np.float64)
        if got.size and np.abs(got - self.sample).max() > RTOL * scale + ATOL:
            return False
        norm = _norm(cand.reshape(-1))
        return abs(norm - self.norm) <= RTOL * max(norm, self.norm) + ATOL * math.sqrt(max(cand.size, 1))

    @classmethod
    def from_json(cls, d: Mapping[str, Any], shape) -> Fingerprint:
        sample = np.frombuffer(base64.b64decode(d["sample"]), dtype="<f4")
        conv = d.get("conv")
        bn = d.get("batchnorm")
        return cls(shape, d["rows"], d["cols"], sample, d["norm"], d["constant"],
                   None if conv is None else (conv["bias"], bool(conv["batchnorm"])),
                   None if bn is None else (int(bn["input"]), bn["conv"]))


def _norm(flat: np.ndarray) -> float:
    """L2 norm accumulated in float64 (pairwise), without a float64 copy of the tensor."""
    if flat.dtype.kind != "f" or flat.dtype.itemsize < 4:
        flat = flat.astype(np.float32)  # float16 squares would round (and overflow) in float16
    return float(np.sqrt(np.add.reduce(np.square(flat), dtype=np.float64)))


def make_fingerprint(value: np.ndarray, facts: Mapping[str, Any] | None = None, seed: int = 0) -> dict[str, Any] | None:
    """The JSON fingerprint of one initializer (None for a non-numeric or empty tensor)."""
    a = np.asarray(value)
    if a.ndim == 0 or a.size == 0 or a.dtype.kind not in "biuf" and a.dtype.name not in ("bfloat16",):
        return None
    if a.dtype.kind != "f" or a.dtype.itemsize < 4:
        a = a.astype(np.float32)  # ints, float16, bfloat16: exact in float32
    n0, rest = _view(a.shape)
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n0, size=min(MAX_ROWS, n0), replace=False))
    cols = np.sort(rng.choice(rest, size=min(MAX_COLS, rest), replace=False))
    sample = a.reshape(n0, rest)[np.ix_(rows, cols)].astype("<f4")
    flat = a.reshape(-1)
    fp: dict[str, Any] = {
        "rows": [int(i) for i in rows],
        "cols": [int(i) for i in cols],
        "sample": base64.b64encode(sample.tobytes()).decode("ascii"),
        "norm": _norm(flat),
        # a full pass only when the sample already is one value
        "constant": bool(np.all(sample == sample.flat[0]) and np.all(flat == flat[0])),
    }
    fp.update(facts or {})
    return fp


def value_fingerprint(value, facts: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """:func:`make_fingerprint` of an initializer (``ir.Value``); an external tensor's file
    mapping is released afterwards, as the pipeline's weight reader does."""
    import onnx_ir as ir

    tensor = value.const_value
    fp = make_fingerprint(tensor.numpy(), facts)
    if isinstance(tensor, ir.ExternalTensor):
        tensor.release()
    return fp


def graph_facts(graph) -> tuple[dict[str, tuple[str | None, bool]], dict[str, tuple[int, str | None]]]:
    """(Conv weight → (its bias input or None, whether a BatchNormalization reads the Conv),
    BatchNormalization parameter → (input index 1–4, the weight of the Conv that feeds it))."""
    conv: dict[str, tuple[str | None, bool]] = {}
    bn_param: dict[str, tuple[int, str | None]] = {}
    for node in graph.all_nodes():
        ins = list(node.inputs)
        if node.op_type in ("Conv", "ConvTranspose") and len(ins) > 1 and ins[1] is not None:
            bias = ins[2].name if len(ins) > 2 and ins[2] is not None else None
            followed = any(u.node.op_type == "BatchNormalization" for u in node.outputs[0].uses())
            conv[ins[1].name] = (bias, followed)
        if node.op_type == "BatchNormalization":
            prod = ins[0].producer() if ins[0] is not None else None
            w = prod.inputs[1].name if prod is not None and prod.op_type in ("Conv", "ConvTranspose") and prod.inputs[1] is not None else None
            for i in range(1, 5):
                if len(ins) > i and ins[i] is not None:
                    bn_param[ins[i].name] = (i, w)
    return conv, bn_param


def facts_json(name: str, conv: Mapping[str, tuple[str | None, bool]], bn_param: Mapping[str, tuple[int, str | None]]) -> dict[str, Any]:
    """The ``conv``/``batchnorm`` entries of ``name``'s fingerprint."""
    out: dict[str, Any] = {}
    if name in conv:
        out["conv"] = {"bias": conv[name][0], "batchnorm": conv[name][1]}
    if name in bn_param:
        out["batchnorm"] = {"input": bn_param[name][0], "conv": bn_param[name][1]}
    return out


def plan_inputs(model) -> list[dict[str, Any]] | None:
    """The graph inputs with the concrete shapes ``make_feeds`` uses (None when one is unknown)."""
    from spa.inputs import graph_inputs, resolve_input_shapes

    try:
        shapes = resolve_input_shapes(model, {})
        return [{"name": v.name, "shape": [int(d) for d in shapes[v.name]], "dtype": np.dtype(v.dtype.numpy()).name} for v in graph_inputs(model)]
    except Exception:  # noqa: BLE001 - a dynamic or untyped input: no probe, values only
        return None


# -- validation (spa.plan_schema calls these) ----------------------------------------------------


def _fail(path: str, problem: str) -> NoReturn:
    raise PlanError(f"{path} {problem}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _indices(v: Any, path: str, size: int, what: str) -> int:
    if not isinstance(v, list) or not v:
        _fail(path, f"must be a non-empty list of ascending indices, got {v!r}")
    prev = -1
    for i, x in enumerate(v):
        if not _is_int(x) or not 0 <= x < size or x <= prev:
            _fail(f"{path}[{i}]", f"must be an ascending index in [0, {size}) ({what}), got {x!r}")
        prev = x
    return len(v)


def check_fingerprint(d: Any, shape: list[int], path: str) -> None:
    """Refuse a malformed fingerprint with a PlanError naming the field."""
    if not isinstance(d, Mapping):
        _fail(path, f"must be an object, got {type(d).__name__}")
    for key in ("rows", "cols", "sample", "norm", "constant"):
        if key not in d:
            _fail(f"{path}.{key}", "is missing")
    if not shape or 0 in shape:
        _fail(path, f"is for a tensor of shape {shape}; only non-empty tensors of rank ≥ 1 have one")
    n0, rest = _view(tuple(shape))
    n = _indices(d["rows"], f"{path}.rows", n0, "rows of the tensor")
    m = _indices(d["cols"], f"{path}.cols", rest, "elements per row")
    s = d["sample"]
    try:
        raw = base64.b64decode(s, validate=True) if isinstance(s, str) else None
    except (binascii.Error, ValueError):
        raw = None
    if raw is None or len(raw) != 4 * n * m:
        _fail(f"{path}.sample", f"must be base64 of {n}×{m} float32 values ({4 * n * m} bytes)")
    if not np.all(np.isfinite(np.frombuffer(raw, dtype="<f4"))):
        _fail(f"{path}.sample", "holds a value that is not finite")
    norm = d["norm"]
    if not isinstance(norm, (int, float)) or isinstance(norm, bool) or not math.isfinite(norm) or norm < 0:
        _fail(f"{path}.norm", f"must be a finite number ≥ 0, got {norm!r}")
    if not isinstance(d["constant"], bool):
        _fail(f"{path}.constant", f"must be true or false, got {d['constant']!r}")
    conv = d.get("conv")
    if conv is not None:
        if not isinstance(conv, Mapping) or not (conv.get("bias") is None or isinstance(conv.get("bias"), str)) or not isinstance(conv.get("batchnorm"), bool):
            _fail(f"{path}.conv", f"must be {{\"bias\": a name or null, \"batchnorm\": true/false}}, got {conv!r}")
    bn = d.get("batchnorm")
    if bn is not None:
        if not isinstance(bn, Mapping) or not _is_int(bn.get("input")) or not 1 <= bn["input"] <= 4 or not (bn.get("conv") is None or isinstance(bn.get("conv"), str)):
            _fail(f"{path}.batchnorm", f"must be {{\"input\": 1–4, \"conv\": a name or null}}, got {bn!r}")
    unknown = sorted(set(d) - {"rows", "cols", "sample", "norm", "constant", "conv", "batchnorm"})
    if unknown:
        _fail(f"{path}.{unknown[0]}", "is not a fingerprint field (known: rows, cols, sample, norm, constant, conv, batchnorm)")


def check_inputs(v: Any, path: str = "inputs") -> None:
    """Refuse a malformed ``inputs`` list (name, concrete shape, numpy dtype name per input)."""
    if v is None:
        return
    if not isinstance(v, list):
        _fail(path, f"must be null or a list, got {type(v).__name__}")
    for i, x in enumerate(v):
        p = f"{path}[{i}]"
        if not isinstance(x, Mapping):
            _fail(p, f"must be an object, got {type(x).__name__}")
        if not isinstance(x.get("name"), str):
            _fail(f"{p}.name", f"must be a string, got {x.get('name')!r}")
        shape = x.get("shape")
        if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
            _fail(f"{p}.shape", f"must be a list of integers ≥ 0, got {shape!r}")
        dtype = x.get("dtype")
        try:
            ok = isinstance(dtype, str) and np.dtype(dtype).kind in "biuf"
        except TypeError:
            ok = False
        if not ok:
            _fail(f"{p}.dtype", f"must be a numeric numpy dtype name (float32, int64 …), got {dtype!r}")
