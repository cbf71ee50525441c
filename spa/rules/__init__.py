"""Channel rules, one module per op family; importing this package registers them all."""

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
    Blocked,
    BlockCode,
    ChannelRule,
    CouplingContext,
    Dim,
    RewriteContext,
    Role,
    get_rule,
    register,
    registered_ops,
)

__all__ = [
    "Blocked",
    "BlockCode",
    "ChannelRule",
    "CouplingContext",
    "Dim",
    "RewriteContext",
    "Role",
    "get_rule",
    "register",
    "registered_ops",
]
