"""Initializers that are also graph inputs: weights by default, overridable inputs on request.

Before IR version 4 every initializer had to be listed among the graph inputs too (the
initializer was only the input's default value). The classic model zoo files are written
that way, and so are some later exports. To spa such a tensor is not a constant — a caller
could feed another one — so every channel it touches would be frozen and nothing pruned.

By default (``keep=False``) they are treated as what they are in practice, weights: they are
removed from the graph inputs (names, values and the graph outputs unchanged) and a note says
how many. The IR version is raised to 4 where it was lower, since an IR 3 model must list its
initializers as inputs.

With ``keep=True`` (``--keep-weight-inputs``) they stay overridable inputs; the channels of
the weights they feed stay frozen, and a note says so. Their names are recorded in
``model.meta["spa.weight_inputs"]`` (both ways) so that the report can name them.
"""

from __future__ import annotations

import logging

import onnx_ir as ir

from spa.graph import add_note

__all__ = ["WeightInputsPass", "WEIGHT_INPUTS_KEY"]

logger = logging.getLogger(__name__)

#: ``model.meta`` key: {"names": [...], "kept": bool} for the initializers that were inputs.
WEIGHT_INPUTS_KEY = "spa.weight_inputs"


class WeightInputsPass(ir.passes.InPlacePass):
    """See module docstring."""

    def __init__(self, keep: bool = False) -> None:
        super().__init__()
        self.keep = keep

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        both = [v for v in graph.inputs if v.is_initializer()]
        if not both:
            return ir.passes.PassResult(model, False)
        names = [v.name for v in both]
        model.meta[WEIGHT_INPUTS_KEY] = {"names": names, "kept": self.keep}
        n = len(both)
        were = "initializer was" if n == 1 else "initializers were"
        if self.keep:
            add_note(model, f"{n} {were} also graph inputs (IR<4 convention) and kept as overridable inputs "
                            "(--keep-weight-inputs): the channels of the weights they feed are frozen")
            return ir.passes.PassResult(model, False)
        keep_inputs = [v for v in graph.inputs if not v.is_initializer()]
        graph.inputs.clear()
        graph.inputs.extend(keep_inputs)
        if model.ir_version is not None and model.ir_version < 4:
            model.ir_version = 4
        add_note(model, f"{n} {were} also graph inputs (IR<4 convention): treated as weights and removed "
                        "from the inputs (--keep-weight-inputs keeps them)")
        logger.info("%d initializers removed from the graph inputs", n)
        return ir.passes.PassResult(model, True)
