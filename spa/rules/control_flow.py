"""If: each output is the matching output of whichever branch runs.

Output k of the If and output k of both branches are tied axis by axis, so a channel pruned
after the If is pruned inside both branches alike (or frozen if either cannot follow). Values
a branch reads from the outer graph are mapped by the branch's own nodes. Loop and Scan have
no rule: their carried values and scan axes are frozen, while channels wholly inside a body
are still pruned (the analysis walks bodies and freezes only what crosses them).
"""

from __future__ import annotations

import onnx_ir as ir

from spa.rules.base import CouplingContext, NoRewrite, register

__all__ = ["IfRule"]


@register("If")
class IfRule(NoRewrite):
    owns_subgraphs = True

    def couplings(self, node: ir.Node, ctx: CouplingContext) -> None:
        branches = [node.attributes[name].as_graph() for name in ("then_branch", "else_branch")]
        for k, y in enumerate(node.outputs):
            rank = ctx.rank(y)
            if rank is None:
                continue
            for branch in branches:
                out = branch.outputs[k] if k < len(branch.outputs) else None
                if ctx.rank(out) != rank:
                    continue
                for ax in range(rank):
                    ctx.tie(y, ax, out, ax)
