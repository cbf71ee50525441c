"""Thin helpers over onnx_ir (never a second IR): the one home of graph facts.

What every analysis, rule and pass asks of a graph, answered once:

- :func:`canonical_domain` / :data:`DEFAULT_DOMAINS`: ``"ai.onnx"`` is the default domain too;
- :func:`default_opset`: the default-domain opset of a model, whichever spelling it imports;
- :func:`is_constant`: a tensor whose content is fixed (an initializer no caller overrides);
- :func:`subgraphs`: the If/Loop/Scan bodies a node holds;
- :func:`attr`: an attribute's value, or a default;
- :func:`all_initializers`: initializers of a graph and of every body;
- :func:`add_note` / :func:`notes`: what passes tell the user through the report.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import onnx_ir as ir

__all__ = [
    "DEFAULT_DOMAINS",
    "canonical_domain",
    "default_opset",
    "is_constant",
    "subgraphs",
    "attr",
    "all_initializers",
    "add_note",
    "notes",
]

#: The two spellings of the default ONNX operator domain.
DEFAULT_DOMAINS = ("", "ai.onnx")


def canonical_domain(domain: str | None) -> str:
    """``""`` for the default domain in either spelling (``"ai.onnx"``); other domains as given."""
    return "" if domain in (None, *DEFAULT_DOMAINS) else domain


def default_opset(model: ir.Model | Mapping[str, int], default: int = 0) -> int:
    """The default-domain opset version of ``model`` (or of an opset-import mapping).

    A model may import the default domain as ``""`` or as ``"ai.onnx"``; both count. When it
    imports neither, ``default`` (0: "no default-domain ops").
    """
    opsets = model.opset_imports if isinstance(model, ir.Model) else model
    for domain in DEFAULT_DOMAINS:
        if domain in opsets:
            return int(opsets[domain])
    return default


def is_constant(value: ir.Value) -> bool:
    """A tensor whose content is fixed: an initializer that no caller can override."""
    return value.is_initializer() and not value.is_graph_input() and value.const_value is not None


def subgraphs(node: ir.Node) -> list[ir.Graph]:
    """The graphs held in ``node``'s attributes (If branches, Loop/Scan bodies), in order."""
    graphs: list[ir.Graph] = []
    for a in node.attributes.values():
        if a.type == ir.AttributeType.GRAPH:
            graphs.append(a.as_graph())
        elif a.type == ir.AttributeType.GRAPHS:
            graphs.extend(a.as_graphs())
    return graphs


def attr(node: ir.Node, name: str, default: Any = None) -> Any:
    """The value of attribute ``name`` of ``node`` (an int, float, string, list …), or ``default``."""
    a = node.attributes.get(name)
    return default if a is None else a.value


def all_initializers(graph: ir.Graph) -> dict[str, ir.Value]:
    """Initializers of the graph and of every If/Loop/Scan body, by name.

    Bodies keep their own constants (ONNX shape inference needs a body's Unsqueeze axes or
    Reshape targets *inside* the body to shape it), so surgery, plans and the oracle look up
    weights in all of them. Names are unique across a model (SSA).
    """
    found = dict(graph.initializers)
    for node in graph.all_nodes():
        for sub in subgraphs(node):
            for name, value in sub.initializers.items():
                found.setdefault(name, value)
    return found


_NOTES_KEY = "spa.notes"


def add_note(model: ir.Model, text: str) -> None:
    """Record something a pass did that the user should read in the report ("upgraded from
    opset 9", "269 weights were graph inputs"). Kept in ``model.meta``: never serialized."""
    model.meta.setdefault(_NOTES_KEY, []).append(text)


def notes(model: ir.Model) -> list[str]:
    """The notes passes recorded on ``model`` (see :func:`add_note`), in order."""
    return list(model.meta.get(_NOTES_KEY, []))
