"""Thin helpers over onnx_ir (never a second IR): the one home of graph facts.

What every analysis, rule and pass asks of a graph, answered once:

- :func:`canonical_domain` / :data:`DEFAULT_DOMAINS`: ``"ai.onnx"`` is the default domain too;
- :func:`default_opset`: the default-domain opset of a model, whichever spelling it imports;
- :func:`is_constant`: a tensor whose content is fixed (an initializer no caller overrides);
- :func:`subgraphs`: the If/Loop/Scan bodies a node holds; :func:`all_nodes`: every node,
  bodies included, as a list (fast where there are no bodies);
- :func:`attr`: an attribute's value, or a default;
- :func:`all_initializers`: initializers of a graph and of every body;
- :func:`add_note` / :func:`notes`: what passes tell the user through the report;
- :func:`gc_paused`: no cyclic garbage collection while a big IR is built or walked.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator, Mapping
from typing import Any

import onnx_ir as ir

__all__ = [
    "DEFAULT_DOMAINS",
    "canonical_domain",
    "default_opset",
    "is_constant",
    "subgraphs",
    "has_subgraphs",
    "all_nodes",
    "attr",
    "all_initializers",
    "add_note",
    "notes",
    "gc_paused",
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


def has_subgraphs(graph: ir.Graph) -> bool:
    """Whether any node of ``graph`` holds a body (If/Loop/Scan)."""
    graph_types = (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
    for node in graph:
        attrs = node.attributes
        # ``Attributes`` is a ``UserDict``: its ``data`` dict answers without a Python-level
        # ``__len__``/``values()`` per node (this runs several times per load on every node).
        for a in getattr(attrs, "data", attrs).values():
            if a.type in graph_types:
                return True
    return False


def all_nodes(graph: ir.Graph) -> list[ir.Node]:
    """The nodes of ``graph`` and of every body, in ``graph.all_nodes()`` order, as a list.

    ``all_nodes()`` is a recursive generator that costs microseconds a node even where there
    are no bodies (most models); a graph without any is just its own node list.
    """
    if has_subgraphs(graph):
        return list(graph.all_nodes())
    return list(graph)


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
    if not has_subgraphs(graph):
        return found
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


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector for the block (nested uses are fine).

    Loading and analysing a model allocates millions of objects that all stay alive (nodes,
    values, shapes, dims, ties). Each allocation burst triggers collections that walk every
    live object again without freeing anything: a quarter of the analysis time of a
    100 000-node chain. These steps make next to no cyclic garbage, so the collector waits
    until the block ends (and runs as usual afterwards)."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
