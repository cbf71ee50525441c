"""What a plan document must contain: the plan options and the JSON structure, checked.

A plan is a file people edit (DESIGN.md: "saved, reviewed, edited and replayed"), so reading
one checks every field and refuses with a :class:`~spa.errors.PlanError` that names it
(``groups[3].removed is missing``, ``options.ratio must be a number in [0, 1), got 1.5``),
never a KeyError.

:data:`PLAN_OPTIONS` is the one list of the options a plan records (the ones that decide it);
``PruneOptions.plan_options`` writes exactly these keys. A new plan option is one entry here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

from spa.errors import PlanError

__all__ = ["PlanOption", "PLAN_OPTIONS", "PLAN_OPTION_KEYS", "check_plan_options", "check_plan_document"]


@dataclasses.dataclass(frozen=True)
class PlanOption:
    """One plan option: the JSON types it takes, a range/choice check, and the words for both."""

    types: tuple[type, ...]
    expect: str
    check: Callable[[Any], bool] = lambda v: True
    nullable: bool = False

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is not acceptable, or None."""
        if value is None and self.nullable:
            return None
        ok_type = isinstance(value, self.types) and (bool in self.types or not isinstance(value, bool))
        if isinstance(value, float) and not math.isfinite(value):
            ok_type = False
        if not ok_type or not self.check(value):
            return f"must be {self.expect}, got {value!r}"
        return None


def _known_criterion(name: str) -> bool:
    from spa.criteria import CRITERIA  # the registry of criteria, filled when spa.criteria imports

    return name in CRITERIA


def _known_allocation(name: str) -> bool:
    from spa.allocate import ALLOCATIONS

    return name in ALLOCATIONS


def _ranks(value: Mapping[str, Any]) -> bool:
    return all(isinstance(k, str) and isinstance(r, int) and not isinstance(r, bool) and r >= 1 for k, r in value.items())


_NUMBER = (int, float)

#: The options a plan records, in the order a plan writes them.
PLAN_OPTIONS: dict[str, PlanOption] = {
    "ratio": PlanOption(_NUMBER, "a number in [0, 1)", lambda v: 0.0 <= v < 1.0),
    "criterion": PlanOption((str,), "a known criterion name", _known_criterion),
    "allocation": PlanOption((str,), "'uniform', 'global' or 'latency'", _known_allocation),
    "min_keep": PlanOption(_NUMBER, "a number in [0, 1]", lambda v: 0.0 <= v <= 1.0),
    "round_to": PlanOption((int,), "an integer ≥ 1", lambda v: v >= 1),
    "flops_target": PlanOption(_NUMBER, "null or a number in (0, 1]", lambda v: 0.0 < v <= 1.0, nullable=True),
    "seed": PlanOption((int,), "an integer ≥ 0", lambda v: v >= 0),
    "allow_inexact": PlanOption((bool,), "true or false"),
    # low-rank factorization and folding (spa.factorize, spa.passes.lowrank_step, spa.passes.fold)
    "params_target": PlanOption(_NUMBER, "null or a number in (0, 1]", lambda v: 0.0 < v <= 1.0, nullable=True),
    "lowrank": PlanOption((str,), "'none', 'energy' or 'auto'", lambda v: v in ("none", "energy", "auto")),
    "lowrank_energy": PlanOption(_NUMBER, "a number in (0, 1]", lambda v: 0.0 < v <= 1.0),
    "lowrank_ranks": PlanOption((dict,), "null or an object of weight name → rank ≥ 1", lambda v: _ranks(v), nullable=True),
    "fold": PlanOption((bool,), "true or false"),
    # latency-aware allocation (spa.latency_target)
    "latency_target": PlanOption(_NUMBER, "null or a number of ms > 0", lambda v: v > 0, nullable=True),
}

#: Names of :data:`PLAN_OPTIONS` (what ``PruneOptions.plan_options`` records).
PLAN_OPTION_KEYS: tuple[str, ...] = tuple(PLAN_OPTIONS)


def _fail(path: str, problem: str) -> NoReturn:
    raise PlanError(f"{path} {problem}")


def check_plan_options(options: Any, path: str = "options") -> None:
    """Refuse an options mapping with an unknown key or a value of the wrong type or range.

    Keys may be missing (a plan made by ``build_plan`` without options records none)."""
    if not isinstance(options, Mapping):
        _fail(path, f"must be an object, got {type(options).__name__}")
    for key, value in options.items():
        spec = PLAN_OPTIONS.get(key)
        if spec is None:
            _fail(f"{path}.{key}", f"is not a plan option (known: {', '.join(PLAN_OPTION_KEYS)})")
        problem = spec.problem(value)
        if problem:
            _fail(f"{path}.{key}", problem)


def check_plan_document(d: Any) -> None:
    """Check every field of a plan document except its version (``Plan.from_json`` does that)."""
    if not isinstance(d, Mapping):
        _fail("the plan", f"must be a JSON object, got {type(d).__name__}")
    sha = d.get("model_sha256")
    if sha is not None and not isinstance(sha, str):
        _fail("model_sha256", f"must be a string or null, got {sha!r}")
    check_plan_options(d.get("options", {}))
    for i, g in enumerate(_list(d, "groups", "")):
        _group(g, f"groups[{i}]")
    for i, t in enumerate(_list(d, "tensors", "")):
        _tensor(t, f"tensors[{i}]")
    for i, r in enumerate(_list(d, "rewrites", "")):
        _rewrite(r, f"rewrites[{i}]")
    if "inputs" in d:  # optional (spa.torch.fingerprint): plans made before it have none
        from spa.torch.fingerprint import check_inputs

        check_inputs(d["inputs"])


# -- pieces ----------------------------------------------------------------------------------


def _obj(value: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        _fail(path, f"must be an object, got {type(value).__name__}")
    return value


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _get(d: Mapping[str, Any], key: str, path: str) -> Any:
    if key not in d:
        _fail(_join(path, key), "is missing")
    return d[key]


def _list(d: Mapping[str, Any], key: str, path: str) -> list[Any]:
    value = _get(d, key, path)
    if not isinstance(value, list):
        _fail(_join(path, key), f"must be a list, got {type(value).__name__}")
    return value


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(d: Mapping[str, Any], key: str, path: str, *, lo: int = 0) -> int:
    v = _get(d, key, path)
    if not _is_int(v) or v < lo:
        _fail(f"{path}.{key}", f"must be an integer ≥ {lo}, got {v!r}")
    return v


def _str(d: Mapping[str, Any], key: str, path: str) -> str:
    v = _get(d, key, path)
    if not isinstance(v, str):
        _fail(f"{path}.{key}", f"must be a string, got {v!r}")
    return v


def _strs(d: Mapping[str, Any], key: str, path: str) -> list[str]:
    v = _list(d, key, path)
    for i, s in enumerate(v):
        if not isinstance(s, str):
            _fail(f"{path}.{key}[{i}]", f"must be a string, got {s!r}")
    return v


def _indices(d: Mapping[str, Any], key: str, path: str, size: int, what: str) -> list[int]:
    """Ascending, distinct integers in [0, size)."""
    v = _list(d, key, path)
    prev = -1
    for i, x in enumerate(v):
        if not _is_int(x):
            _fail(f"{path}.{key}[{i}]", f"must be an integer, got {x!r}")
        if not 0 <= x < size:
            _fail(f"{path}.{key}[{i}]", f"= {x} is out of range ({what} {size})")
        if x <= prev:
            _fail(f"{path}.{key}", "must be ascending without repeats")
        prev = x
    return v


def _group(g: Any, path: str) -> None:
    g = _obj(g, path)
    _str(g, "id", path)
    _strs(g, "members", path)
    _strs(g, "layers", path)
    units = _int(g, "units", path)
    frozen = _int(g, "frozen", path)
    if frozen > units:
        _fail(f"{path}.frozen", f"= {frozen} exceeds units ({units})")
    removed = _indices(g, "removed", path, units, "the group has units")
    if len(removed) > units - frozen:
        _fail(f"{path}.removed", f"removes {len(removed)} units but only {units - frozen} are free")
    scores = _get(g, "scores", path)
    if scores is not None:
        if not isinstance(scores, list):
            _fail(f"{path}.scores", f"must be null or a list of numbers, got {type(scores).__name__}")
        for i, s in enumerate(scores):
            if not isinstance(s, (int, float)) or isinstance(s, bool):
                _fail(f"{path}.scores[{i}]", f"must be a number, got {s!r}")
    for i, b in enumerate(_list(g, "blocked", path)):
        _obj(b, f"{path}.blocked[{i}]")
    _strs(g, "inexact", path)


def _tensor(t: Any, path: str) -> None:
    t = _obj(t, path)
    _str(t, "name", path)
    shape = _list(t, "shape", path)
    for i, s in enumerate(shape):
        if not _is_int(s) or s < 0:
            _fail(f"{path}.shape[{i}]", f"must be an integer ≥ 0, got {s!r}")
    seen: set[int] = set()
    for i, a in enumerate(_list(t, "axes", path)):
        ap = f"{path}.axes[{i}]"
        a = _obj(a, ap)
        axis = _int(a, "axis", ap)
        if axis >= len(shape):
            _fail(f"{ap}.axis", f"= {axis} is out of range (the tensor has rank {len(shape)})")
        if axis in seen:
            _fail(f"{ap}.axis", f"= {axis} appears twice")
        seen.add(axis)
        _strs(a, "roles", ap)
        _indices(a, "kept", ap, shape[axis], "the axis has size")
    if t.get("fingerprint") is not None:  # optional (spa.torch.fingerprint): older plans have none
        from spa.torch.fingerprint import check_fingerprint

        check_fingerprint(t["fingerprint"], shape, f"{path}.fingerprint")


def _rewrite(r: Any, path: str) -> None:
    r = _obj(r, path)
    kind = _get(r, "kind", path)
    _str(r, "node", path)
    if kind == "attribute":
        _str(r, "name", path)
        v = _get(r, "value", path)
        scalar = (int, float)
        ok = v is None or (isinstance(v, scalar) and not isinstance(v, bool)) or (
            isinstance(v, list) and all(isinstance(x, scalar) and not isinstance(x, bool) for x in v)
        )
        if not ok:
            _fail(f"{path}.value", f"must be null, a number or a list of numbers, got {v!r}")
    elif kind == "constant":
        _int(r, "input", path)
        v = _list(r, "value", path)
        for i, x in enumerate(v):
            if not _is_int(x):
                _fail(f"{path}.value[{i}]", f"must be an integer, got {x!r}")
    else:
        _fail(f"{path}.kind", f"must be 'attribute' or 'constant', got {kind!r}")
