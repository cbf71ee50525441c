"""Small rewiring helpers the folding passes share (no pass lives here).

``bypass`` is onnx-ir's identity elimination for any node whose output equals one of its
values: readers (and a graph output, renamed) move to that value, then the node goes.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

__all__ = ["bypass", "const_array", "only_reader", "set_const", "can_edit", "drop_unused_initializers", "Weight", "weight_of", "remove_dead"]


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The constant behind ``value`` (an initializer or a folded constant), else None."""
    if value is None or value.const_value is None or value.is_graph_input():
        return None
    return np.asarray(value.const_value.numpy())


def only_reader(value: ir.Value | None) -> ir.Node | None:
    """The single node reading ``value`` once, when it is not a graph output."""
    if value is None or value.is_graph_output():
        return None
    uses = value.uses()
    if len(uses) != 1:
        return None
    return uses[0].node


def can_edit(value: ir.Value | None) -> bool:
    """An initializer read by one node only, not a graph input or output: safe to rewrite."""
    return value is not None and value.is_initializer() and not value.is_graph_input() and not value.is_graph_output() and len(value.uses()) == 1


def set_const(value: ir.Value, array: np.ndarray) -> None:
    """Give an initializer new contents (its name kept; dtype as before)."""
    dtype = value.const_value.numpy().dtype if value.const_value is not None else array.dtype
    array = np.ascontiguousarray(np.asarray(array).astype(dtype))
    value.const_value = ir.tensor(array, name=value.name)
    value.shape = ir.Shape(array.shape)


def bypass(node: ir.Node, keep: ir.Value) -> bool:
    """Remove ``node`` (one output), whose output equals ``keep``. False (nothing done) where
    the output is a graph output that ``keep`` cannot take the name of."""
    out = node.outputs[0]
    graph = node.graph
    was_output = out.is_graph_output()
    if was_output and (keep.is_graph_input() or keep.is_initializer() or keep.is_graph_output()):
        return False
    if keep.shape is None:
        keep.shape = out.shape
    if keep.type is None:
        keep.type = out.type
    ir.convenience.replace_all_uses_with(out, keep, replace_graph_outputs=True)
    if was_output:
        name = out.name
        out.name = f"{name}__removed"
        keep.name = name
    graph.remove(node, safe=True)
    return True


def drop_unused_initializers(graph: ir.Graph) -> int:
    """Remove initializers nothing reads any more (not graph inputs or outputs); how many."""
    gone = [name for name, v in graph.initializers.items() if not v.uses() and not v.is_graph_input() and not v.is_graph_output()]
    for name in gone:
        graph.initializers.pop(name)
    return len(gone)


@dataclasses.dataclass
class Weight:
    """A constant weight as the node multiplies it, possibly read through a ``Transpose`` of
    an initializer (torch exports without constant folding): ``write`` stores a new value in
    the initializer's own layout, so the initializer keeps its name and meaning."""

    value: ir.Value
    array: np.ndarray
    perm: list[int] | None = None
    transpose: ir.Node | None = None

    @property
    def name(self) -> str:
        return self.value.name

    def write(self, new: np.ndarray) -> None:
        if self.perm is None:
            set_const(self.value, new)
            return
        set_const(self.value, np.transpose(new, np.argsort(self.perm)))
        self.transpose.outputs[0].shape = ir.Shape(np.shape(new))


def weight_of(v: ir.Value | None) -> Weight | None:
    """The editable weight behind a node input (see :class:`Weight`), else None."""
    if v is None:
        return None
    if can_edit(v) and const_array(v) is not None:
        return Weight(v, const_array(v))
    node = v.producer()
    if node is None or node.op_type != "Transpose" or node.domain not in ("", "ai.onnx") or v.is_graph_output() or len(v.uses()) != 1:
        return None
    src = node.inputs[0]
    if not can_edit(src) or const_array(src) is None:
        return None
    a = const_array(src)
    perm_attr = node.attributes.get("perm")
    perm = [int(p) for p in perm_attr.value] if perm_attr is not None else list(range(a.ndim))[::-1]
    return Weight(src, np.transpose(a, perm), perm, node)


def remove_dead(graph: ir.Graph) -> None:
    """Drop nodes whose outputs nobody reads (a weight's Transpose after a merge) and the
    initializers they read."""
    changed = True
    while changed:
        changed = False
        for node in list(graph)[::-1]:
            if all(not o.uses() and not o.is_graph_output() for o in node.outputs) and not node.op_type.startswith(("If", "Loop", "Scan")):
                graph.remove(node, safe=True)
                changed = True
    drop_unused_initializers(graph)
