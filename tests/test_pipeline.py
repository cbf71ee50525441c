"""The pass manager and the default pipeline: order, caching, instruments, the untouched input."""

from __future__ import annotations

import pathlib

import numpy as np
import onnx
import pytest

import spa
from spa.passes.manager import DumpInstrument, PassManager, Step, TimingInstrument
from spa.passes.prune import PrunePass
from spa.pipeline import PruneOptions, State, default_steps, run_pipeline
from spa.report import Timer

REPO = pathlib.Path(__file__).resolve().parent.parent
DEMO = REPO / "models" / "demo.onnx"


class _Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, bool | None]] = []

    def before(self, step, state) -> None:
        self.events.append(("before", step.name, None))

    def after(self, step, state, modified) -> None:
        self.events.append(("after", step.name, modified))


class _Toy:
    """A state with one cached analysis, to watch invalidation."""

    def __init__(self) -> None:
        self.cache: dict[str, int] = {}
        self.invalidations = 0

    def invalidate(self) -> None:
        self.invalidations += 1
        self.cache.clear()


def test_steps_run_in_order_and_a_change_invalidates_analyses() -> None:
    seen: list[str] = []

    def step(name: str, modified: bool):
        def run(state: _Toy) -> bool:
            seen.append(name)
            state.cache[name] = 1
            return modified

        return Step(name, run, f"the {name} step")

    state = _Toy()
    rec = _Recorder()
    PassManager([step("a", False), step("b", True), step("c", False)], [rec]).run(state)
    assert seen == ["a", "b", "c"]
    assert state.invalidations == 1
    assert state.cache == {"c": 1}  # a and b were cached before b's change
    assert rec.events == [
        ("before", "a", None), ("after", "a", False),
        ("before", "b", None), ("after", "b", True),
        ("before", "c", None), ("after", "c", False),
    ]


def test_disabled_steps_are_skipped_and_explained() -> None:
    ran: list[str] = []
    steps = [
        Step("x", lambda s: ran.append("x") or False, "does x"),
        Step("y", lambda s: ran.append("y") or False, "does y", when=lambda s: False, skip_reason=lambda s: "--no-y"),
    ]
    manager = PassManager(steps)
    manager.run(_Toy())
    assert ran == ["x"]
    assert manager.explain(_Toy()) == [("x", True, "does x"), ("y", False, "skipped: --no-y")]


def test_duplicate_step_names_are_refused() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        PassManager([Step("a", lambda s: False, ""), Step("a", lambda s: False, "")])


def test_timing_covers_a_failing_step() -> None:
    timer = Timer()

    def boom(state) -> bool:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        PassManager([Step("boom", boom, "")], [TimingInstrument(timer)]).run(_Toy())
    assert "boom" in timer.timings


def test_default_pipeline_order_is_the_documented_one() -> None:
    names = [s.name for s in default_steps(mode="prune")]
    assert names == ["load", "canonicalize", "analyze", "statistics", "gradients", "score", "allocate", "plan", "snapshot",
                     "check-upgrade", "compensate", "prune", "measure", "check", "oracle", "error", "fold", "lowrank", "benchmark", "compile",
                     "restore-opset", "report", "save"]
    assert [s.name for s in default_steps(mode="plan")] == names[:8]
    assert "check-plan" in [s.name for s in default_steps(mode="apply")]


def test_explain_follows_the_options() -> None:
    rows = {name: (on, why) for name, on, why in spa.explain(PruneOptions(verify="check", benchmark=False))}
    assert rows["oracle"] == (False, "skipped: --verify check")
    assert rows["benchmark"] == (False, "skipped: --no-bench")
    assert rows["check"][0] is True


def test_the_analysis_still_describes_the_input_after_surgery() -> None:
    state = run_pipeline(State(source=str(DEMO), options=PruneOptions(ratio=0.5, benchmark=False)), mode="prune")
    original = {t.name: list(t.dims) for t in onnx.load(DEMO).graph.initializer}
    analysed = {name: [int(d) for d in v.shape] for name, v in state.analysis.model.graph.initializers.items()}
    pruned = {name: [int(d) for d in v.shape] for name, v in state.model.graph.initializers.items()}
    for name, dims in analysed.items():
        assert original.get(name, dims) == dims, name
    assert any(pruned[n] != analysed[n] for n in pruned if n in analysed)
    assert state.workdir is None  # scratch files are gone


def test_dump_dir_writes_the_model_after_each_changing_step(tmp_path: pathlib.Path) -> None:
    spa.prune(str(DEMO), ratio=0.5, benchmark=False, verify="none", instruments=[DumpInstrument(tmp_path)])
    names = sorted(p.name for p in tmp_path.glob("*.onnx"))
    assert names[0].startswith("01-load") and any("prune" in n for n in names)
    for p in tmp_path.glob("*.onnx"):
        onnx.checker.check_model(str(p))


def test_prune_pass_reports_whether_it_changed_the_model() -> None:
    plan0 = spa.plan(str(DEMO), ratio=0.0)
    plan5 = spa.plan(str(DEMO), ratio=0.5)
    assert PrunePass(plan0)(spa.analyze(str(DEMO)).model).modified is False
    assert PrunePass(plan5)(spa.analyze(str(DEMO)).model).modified is True


def test_nothing_pruned_is_a_warning_with_the_reason() -> None:
    report = spa.prune(str(DEMO), ratio=0.0, benchmark=False).report
    assert report.warnings == ["nothing was pruned: ratio is 0"]
    assert not spa.prune(str(DEMO), ratio=0.5, benchmark=False).report.warnings


def test_latency_inside_its_spread_is_not_significant() -> None:
    from spa.verify import Latency

    assert Latency([1.0, 1.0], [(0.9, 1.1), (0.9, 1.1)], (0.95, 1.06)).significant is False
    assert Latency([1.0, 0.5], [(0.9, 1.1), (0.45, 0.55)], (1.8, 2.2)).significant is True


def test_report_round_trips() -> None:
    report = spa.prune(str(DEMO), ratio=0.5).report
    assert spa.Report.from_json(report.to_json()) == report
    assert report.latency_p10_p90_ms is not None and report.latency_significant is not None
    lo, hi = report.latency_p10_p90_ms[0]
    assert lo <= report.latency_ms_before <= hi
    assert np.isfinite(report.latency_ms_after)


def test_the_readme_lists_every_step_in_order() -> None:
    """README's step table (the ``--explain`` list) names every step of the pipeline, in order."""
    import re

    text = (REPO / "README.md").read_text()
    section = text.split("### The steps", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^\| `([a-z-]+)` \|", section, flags=re.M)
    assert listed == [s.name for s in default_steps(mode="prune")]
    assert "docs/consumer-view.md" in section
