"""Thin helpers over onnx_ir (never a second IR)."""

from __future__ import annotations

import onnx_ir as ir

__all__ = ["all_initializers", "add_note", "notes"]


def all_initializers(graph: ir.Graph) -> dict[str, ir.Value]:
    """Initializers of the graph and of every If/Loop/Scan body, by name.

    Bodies keep their own constants (ONNX shape inference needs a body's Unsqueeze axes or
    Reshape targets *inside* the body to shape it), so surgery, plans and the oracle look up
    weights in all of them. Names are unique across a model (SSA).
    """
    found = dict(graph.initializers)
    for node in graph.all_nodes():
        for attr in node.attributes.values():
            subs = [attr.as_graph()] if attr.type == ir.AttributeType.GRAPH else attr.as_graphs() if attr.type == ir.AttributeType.GRAPHS else []
            for sub in subs:
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
