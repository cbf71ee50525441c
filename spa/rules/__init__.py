"""Channel rules, one module per op family; importing this package registers them all.

A rule author starts at :mod:`spa.rules.base`: its docstring lists every per-op fact a new op
may need (the rule, weight look-through, subgraphs, zero points, cost formulas) and where each
lives. Custom ops get rules without editing spa through :mod:`spa.rules.registry` (per-call
``rules=`` or the ``spa.rules`` entry-point group).
"""

from __future__ import annotations

from spa.rules import (  # noqa: F401  (registration)
    attention,
    concat_split,
    control_flow,
    conv,
    elementwise,
    expand,
    gather,
    linear,
    norm,
    quantize,
    recurrent,
    reduce,
    reshape,
    shape,
    spatial,
)
from spa.rules.base import (
    LOOK_THROUGH,
    Blocked,
    BlockCode,
    ChannelRule,
    CouplingContext,
    Dim,
    NoRewrite,
    RewriteContext,
    Role,
    get_rule,
    register,
    register_look_through,
    register_rule,
    registered_ops,
    resolve_rules,
)
from spa.rules.registry import ENTRY_POINT_GROUP

__all__ = [
    "ENTRY_POINT_GROUP",
    "LOOK_THROUGH",
    "Blocked",
    "BlockCode",
    "ChannelRule",
    "CouplingContext",
    "Dim",
    "NoRewrite",
    "RewriteContext",
    "Role",
    "get_rule",
    "register",
    "register_look_through",
    "register_rule",
    "registered_ops",
    "resolve_rules",
]
