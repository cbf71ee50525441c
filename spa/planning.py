"""Plans: what surgery will do, as a JSON document that can be saved, reviewed and replayed.

A plan is made from the channel analysis and an allocation (which units each group loses).
It lists, for every initializer that changes, the kept indices per axis (ascending) and the
role of that axis (the mask oracle zeroes the IN axes of the original); the attribute and
shape-constant rewrites the rules asked for; and the groups with members and scores.
Surgery (``spa.passes.prune``) only executes a plan: it never consults the rules again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import onnx_ir as ir

from spa.analysis.channels import ChannelGraph, Group
from spa.errors import PlanError
from spa.graph import all_initializers, default_opset, is_constant
from spa.plan_schema import PLAN_OPTION_KEYS, PLAN_OPTIONS, check_plan_document
from spa.rules.base import AttrRewrite, ChannelRule, ConstRewrite, Dim, RewriteContext, Role
from spa.rules.registry import get_rule, resolve_rules

__all__ = ["PLAN_VERSION", "PLAN_OPTIONS", "PLAN_OPTION_KEYS", "TensorEdit", "GroupPlan", "Plan", "build_plan"]

logger = logging.getLogger(__name__)

PLAN_VERSION = 1


@dataclasses.dataclass
class TensorEdit:
    """Slices of one initializer: ``kept[axis]`` ascending indices, ``roles[axis]`` what it does."""

    name: str
    shape: list[int]
    kept: dict[int, list[int]]
    roles: dict[int, list[str]]
    #: What ``spa.torch.apply_plan`` needs to find the tensor in a state_dict without the ONNX
    #: file (``spa.torch.fingerprint``); None in plans made before it existed.
    fingerprint: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        d = {
            "name": self.name,
            "shape": self.shape,
            "axes": [{"axis": a, "roles": self.roles.get(a, []), "kept": self.kept[a]} for a in sorted(self.kept)],
        }
        if self.fingerprint is not None:
            d["fingerprint"] = self.fingerprint
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> TensorEdit:
        return cls(
            name=d["name"],
            shape=list(d["shape"]),
            kept={int(a["axis"]): [int(i) for i in a["kept"]] for a in d["axes"]},
            roles={int(a["axis"]): list(a["roles"]) for a in d["axes"]},
            fingerprint=d.get("fingerprint"),
        )


@dataclasses.dataclass
class GroupPlan:
    """One coupled group: its members, units, what is frozen and why, and what goes."""

    id: str
    members: list[str]
    layers: list[str]
    units: int
    frozen: int
    removed: list[int]
    scores: list[float] | None
    blocked: list[dict[str, str | None]]
    inexact: list[str]

    @property
    def kept(self) -> int:
        return self.units - len(self.removed)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> GroupPlan:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})


@dataclasses.dataclass
class Plan:
    version: int
    model_sha256: str | None
    options: dict[str, Any]
    groups: list[GroupPlan]
    tensors: list[TensorEdit]
    rewrites: list[AttrRewrite | ConstRewrite]
    #: The graph inputs (name, concrete shape, dtype) of the model the plan was made for:
    #: ``spa.torch`` runs the module once on seeded inputs of these shapes. None if unknown.
    inputs: list[dict[str, Any]] | None = None

    @property
    def empty(self) -> bool:
        return not self.tensors and not self.rewrites

    def to_json(self) -> dict[str, Any]:
        d = {
            "version": self.version,
            "model_sha256": self.model_sha256,
            "options": self.options,
            "groups": [g.to_json() for g in self.groups],
            "tensors": [t.to_json() for t in self.tensors],
            "rewrites": [r.to_json() for r in self.rewrites],
        }
        if self.inputs is not None:
            d["inputs"] = self.inputs
        return d

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1, sort_keys=False)

    @classmethod
    def loads(cls, text: str, *, source: str | None = None) -> Plan:
        """Parse a plan from JSON text (PlanError when it is not JSON or not a valid plan)."""
        try:
            data = json.loads(text)
        except ValueError as e:
            where = f"plan '{source}'" if source else "the plan"
            raise PlanError(f"{where} is not JSON: {e}") from e
        return cls.from_json(data, source=source)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        """Read a plan file (PlanError when it is missing, unreadable, not JSON or not a plan)."""
        p = pathlib.Path(path)
        if not p.is_file():
            raise PlanError(f"plan '{path}' is not a file")
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise PlanError(f"plan '{path}' cannot be read: {e}") from e
        return cls.loads(text, source=str(path))

    @classmethod
    def from_json(cls, d: Mapping[str, Any], *, source: str | None = None) -> Plan:
        """Read a plan document, checking every field (``spa.plan_schema``).

        A document that is not a valid plan raises :class:`~spa.errors.PlanError` naming the
        field ("groups[3].removed is missing"); with ``source`` (a file name) the message
        starts "plan 'p.json': ".
        """
        try:
            if not isinstance(d, Mapping):
                raise PlanError(f"the plan must be a JSON object, got {type(d).__name__}")
            if "version" not in d:
                raise PlanError("version is missing")
            if d["version"] != PLAN_VERSION:
                raise PlanError(f"version {d['version']!r} is not supported (expected {PLAN_VERSION})")
            check_plan_document(d)
        except PlanError as e:
            if source is None:
                raise
            raise PlanError(f"plan '{source}': {e}") from e
        rewrites: list[AttrRewrite | ConstRewrite] = []
        for r in d["rewrites"]:
            if r["kind"] == "attribute":
                rewrites.append(AttrRewrite(r["node"], r["name"], r["value"]))
            else:
                rewrites.append(ConstRewrite(r["node"], int(r["input"]), [int(x) for x in r["value"]]))
        return cls(
            version=d["version"],
            model_sha256=d.get("model_sha256"),
            options=dict(d.get("options", {})),
            groups=[GroupPlan.from_json(g) for g in d["groups"]],
            tensors=[TensorEdit.from_json(t) for t in d["tensors"]],
            rewrites=rewrites,
            inputs=d.get("inputs"),
        )


def _layers(group: Group) -> list[str]:
    """Names of the weights whose output channels this group owns (the "layers" of a report)."""
    return sorted({d.value for d in group.weight_dims(Role.OUT)})


def build_plan(
    model: ir.Model,
    cg: ChannelGraph,
    removed: Mapping[str, np.ndarray],
    *,
    scores: Mapping[str, np.ndarray] | None = None,
    options: Mapping[str, Any] | None = None,
    model_sha256: str | None = None,
    rules: Mapping[Any, ChannelRule] | Iterable[ChannelRule] | None = None,
    fingerprints: bool = True,
) -> Plan:
    """Turn "group → removed units" into tensor slices and rule rewrites (no mutation).

    The rewrites come from the same rules the analysis ran: ``rules`` (per-call rules, as
    for ``analyze_channels``) when given, else those ``cg`` remembers, then the registry.
    With ``fingerprints`` each sliced tensor carries a value fingerprint and the plan its
    graph inputs (``spa.torch.fingerprint``): enough to map it to a torch module alone.
    """
    from spa.torch.fingerprint import facts_json, graph_facts, plan_inputs, value_fingerprint  # numpy only: no torch

    overlay = cg.rules if rules is None else resolve_rules(rules)
    by_id = {g.id: g for g in cg.groups}
    kept_by_dim: dict[Dim, np.ndarray] = {}
    for gid, units in removed.items():
        units = np.asarray(units, dtype=np.int64)
        if not units.size:
            continue
        group = by_id[gid]
        if group.frozen[units].any():
            raise ValueError(f"group {gid}: a frozen unit was selected for removal")
        for d in group.dims:
            k = group.kept_indices(d, units)
            if len(k) != cg.dim_size[d]:
                kept_by_dim[d] = k

    graph = model.graph
    initializers = all_initializers(graph)
    tensors: list[TensorEdit] = []
    facts = graph_facts(graph) if fingerprints else ({}, {})
    for name in sorted({d.value for d in kept_by_dim}):
        value = initializers.get(name)
        if value is None or not is_constant(value):
            continue
        axes = {d.axis: kept_by_dim[d] for d in kept_by_dim if d.value == name}
        roles = {}
        for ax in axes:
            g = cg.group_of(Dim(name, ax))
            roles[ax] = [r.value for r in g.roles.get(Dim(name, ax), ())] if g else []
        tensors.append(
            TensorEdit(
                name=name,
                shape=[int(s) for s in value.shape],
                kept={ax: [int(i) for i in k] for ax, k in sorted(axes.items())},
                roles=roles,
                fingerprint=value_fingerprint(value, facts_json(name, *facts)) if fingerprints else None,
            )
        )

    opset = default_opset(model)  # either spelling of the default domain ("" or "ai.onnx")
    rewrites: list[AttrRewrite | ConstRewrite] = []
    for node in graph.all_nodes():
        if not (cg.node_dims.get(node.name, set()) & kept_by_dim.keys()):
            continue
        rule = get_rule(node.domain, node.op_type, overlay)
        rewrite = getattr(rule, "rewrite", None)
        if rewrite is None:
            continue
        rctx = RewriteContext(node, kept_by_dim.get, opset)
        rewrite(node, rctx)
        rewrites.extend(rctx.rewrites)

    groups = []
    for g in cg.candidates:
        units = np.asarray(removed.get(g.id, []), dtype=np.int64)
        s = None if scores is None or g.id not in scores else [round(float(x), 6) for x in scores[g.id]]
        groups.append(
            GroupPlan(
                id=g.id,
                members=[str(d) for d in g.dims],
                layers=_layers(g),
                units=g.n_units,
                frozen=int(g.frozen.sum()),
                removed=sorted(int(u) for u in units),
                scores=s,
                blocked=[b.to_json() for b in g.reasons],
                inexact=g.inexact,
            )
        )
    return Plan(
        version=PLAN_VERSION,
        model_sha256=model_sha256,
        options=dict(options or {}),
        groups=groups,
        tensors=tensors,
        rewrites=rewrites,
        inputs=plan_inputs(model) if fingerprints and tensors else None,
    )
