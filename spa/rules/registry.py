"""Where rules are found: built-in, plug-in and per-call rules, keyed by ``(domain, op_type)``.

Three sources, looked up in this order:

1. **Per-call rules** (``analyze_channels(model, rules=...)``, ``build_plan(..., rules=...)``,
   and ``spa.prune(..., rules=...)``): a custom op's rule without editing spa, the way
   Torch-Pruning takes ``customized_pruners``. :func:`resolve_rules` turns what the caller
   passes into the overlay mapping; per-call rules win over every other source.
2. **Built-in rules**: ``spa/rules/<family>.py`` modules register with the :func:`register`
   class decorator (``spa.rules`` imports them all; a test pins the key set).
3. **Plug-ins**: the entry-point group :data:`ENTRY_POINT_GROUP` (``spa.rules``), loaded once
   at the first lookup. An entry point names a module (importing it registers its rules with
   :func:`register`) or a callable taking no arguments that either registers rules itself and
   returns None, or returns rules in any form :func:`resolve_rules` accepts. A plug-in that
   fails to load, or claims an op that already has a rule, is skipped with a warning: an op
   without a rule blocks its channels, which is always safe.

The domain ``"ai.onnx"`` is the default domain ``""`` everywhere (:func:`spa.graph.canonical_domain`).
"""

from __future__ import annotations

import importlib.metadata
import logging
import types
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from spa.errors import UsageError
from spa.graph import canonical_domain

if TYPE_CHECKING:
    from spa.rules.base import ChannelRule

__all__ = [
    "ENTRY_POINT_GROUP",
    "RuleKey",
    "register",
    "register_rule",
    "get_rule",
    "registered_ops",
    "resolve_rules",
    "load_plugins",
]

logger = logging.getLogger(__name__)

#: The importlib.metadata entry-point group plug-in rule packages declare.
ENTRY_POINT_GROUP = "spa.rules"

RuleKey = tuple[str, str]  # (canonical domain, op_type)

_REGISTRY: dict[RuleKey, ChannelRule] = {}
_plugins_loaded = False


def register(*op_types: str, domain: str = "") -> Callable[[type], type]:
    """Class decorator: register one instance of the rule for each ``(domain, op_type)``."""

    def deco(cls: type) -> type:
        register_rule(cls(), *op_types, domain=domain)
        return cls

    return deco


def register_rule(rule: ChannelRule, *op_types: str, domain: str = "") -> None:
    """Register a rule *instance* for each ``(domain, op_type)`` (RuntimeError on a second rule)."""
    _check_rule(rule)
    keys = [(canonical_domain(domain), op) for op in op_types]
    for key in keys:
        if key in _REGISTRY:
            raise RuntimeError(f"two rules registered for {key}")
    for key in keys:
        _REGISTRY[key] = rule


def get_rule(domain: str, op_type: str, overlay: Mapping[RuleKey, ChannelRule] | None = None) -> ChannelRule | None:
    """The rule for an op: ``overlay`` (per-call rules, see :func:`resolve_rules`) first, then
    the registry (built-in and plug-in rules). None when no rule knows the op."""
    key = (canonical_domain(domain), op_type)
    if overlay:
        rule = overlay.get(key)
        if rule is not None:
            return rule
    load_plugins()
    return _REGISTRY.get(key)


def registered_ops() -> set[RuleKey]:
    """Keys of the registry (built-in and plug-in rules; per-call rules are not registered)."""
    load_plugins()
    return set(_REGISTRY)


def resolve_rules(rules: Iterable[Any] | Mapping[Any, Any] | None) -> dict[RuleKey, ChannelRule]:
    """Normalise user rules into ``{(domain, op_type): rule}`` (the per-call overlay).

    Accepts:

    - None → ``{}``;
    - a mapping whose keys are ``(domain, op_type)`` tuples, ``"domain::op_type"`` or a bare
      ``"op_type"`` (default domain), and whose values are rules;
    - an iterable of rules that carry ``op_types`` (a string or strings) and, optionally,
      ``domain`` (default ``""``) attributes.

    A rule is an object with a ``couplings(node, ctx)`` method and, when it changes
    attributes or constant inputs, ``rewrite(node, ctx)`` (see :mod:`spa.rules.base`); a class
    is instantiated once. Anything else, or two rules for one op, is a UsageError.
    """
    if rules is None:
        return {}
    out: dict[RuleKey, ChannelRule] = {}

    def put(key: RuleKey, rule: Any) -> None:
        if key in out and out[key] is not rule:
            raise UsageError(f"two custom rules given for {_show(key)}")
        out[key] = rule

    if isinstance(rules, Mapping):
        for raw_key, raw_rule in rules.items():
            rule = _instance(raw_rule)
            put(_key(raw_key), rule)
        return out
    if isinstance(rules, (str, bytes)) or not isinstance(rules, Iterable):
        raise UsageError(f"rules must be a list of rules or a mapping (domain, op_type) → rule, got {type(rules).__name__}")
    for raw_rule in rules:
        rule = _instance(raw_rule)
        op_types = getattr(rule, "op_types", None)
        if isinstance(op_types, str):
            op_types = (op_types,)
        if not op_types or not all(isinstance(op, str) and op for op in op_types):
            raise UsageError(f"custom rule {_name(rule)} has no op_types (a string or strings naming the ops it handles)")
        domain = getattr(rule, "domain", "") or ""
        if not isinstance(domain, str):
            raise UsageError(f"custom rule {_name(rule)}: domain must be a string, got {domain!r}")
        for op in op_types:
            put((canonical_domain(domain), op), rule)
    return out


def load_plugins(entry_points: Iterable[importlib.metadata.EntryPoint] | None = None) -> list[RuleKey]:
    """Load the ``spa.rules`` entry points (once; later calls do nothing) and return the keys
    they added. ``entry_points`` replaces the installed ones (tests)."""
    global _plugins_loaded
    if _plugins_loaded and entry_points is None:
        return []
    _plugins_loaded = True
    before = set(_REGISTRY)
    eps = _entry_points() if entry_points is None else list(entry_points)
    for ep in eps:
        try:
            _load_one(ep)
        except Exception as e:  # a broken plug-in leaves its ops without a rule (blocked), never half-registered
            logger.warning("spa.rules entry point %r (%s) was skipped: %s: %s", ep.name, ep.value, type(e).__name__, e)
    added = sorted(set(_REGISTRY) - before)
    if added:
        logger.info("plug-in rules: %s", ", ".join(_show(k) for k in added))
    return added


# ---------------------------------------------------------------------------------------------


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    return list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


def _load_one(ep: importlib.metadata.EntryPoint) -> None:
    obj = ep.load()
    if isinstance(obj, types.ModuleType):
        return  # importing it registered its rules
    if hasattr(obj, "couplings") and not isinstance(obj, type):
        found: Any = [obj]
    elif callable(obj):
        found = obj()
        if found is None:
            return
        if hasattr(found, "couplings"):
            found = [found]
    else:
        raise TypeError(f"{ep.value} is neither a module, a rule nor a callable")
    resolved = resolve_rules(found)
    clash = sorted(k for k in resolved if k in _REGISTRY and _REGISTRY[k] is not resolved[k])
    if clash:
        raise RuntimeError(f"it claims ops that already have a rule: {', '.join(_show(k) for k in clash)}")
    _REGISTRY.update(resolved)


def _instance(rule: Any) -> Any:
    if isinstance(rule, type):
        rule = rule()
    _check_rule(rule)
    return rule


def _check_rule(rule: Any) -> None:
    if not callable(getattr(rule, "couplings", None)):
        raise UsageError(f"custom rule {_name(rule)} has no couplings(node, ctx) method")
    rewrite = getattr(rule, "rewrite", None)
    if rewrite is not None and not callable(rewrite):
        raise UsageError(f"custom rule {_name(rule)}: rewrite is not a method")


def _key(raw: Any) -> RuleKey:
    if isinstance(raw, tuple) and len(raw) == 2 and all(isinstance(p, str) for p in raw) and raw[1]:
        return canonical_domain(raw[0]), raw[1]
    if isinstance(raw, str) and raw:
        domain, sep, op = raw.rpartition("::")
        if op:
            return canonical_domain(domain if sep else ""), op
    raise UsageError(f"a custom rule's key must be (domain, op_type) or 'domain::op_type', got {raw!r}")


def _show(key: RuleKey) -> str:
    return f"{key[0]}::{key[1]}" if key[0] else key[1]


def _name(rule: Any) -> str:
    return repr(getattr(rule, "__name__", None) or type(rule).__name__)
