"""A small pass manager: an ordered list of named steps over one pipeline state.

Why not onnx-ir's ``PassManager`` alone: spa's stages are not all IR → IR (scoring and
allocation decide, verification measures), and they share cached analyses and the plan. So a
:class:`Step` is a named function of the :class:`~spa.pipeline.State` that returns whether it
changed the model, as onnx-ir's ``PassResult.modified`` does; the IR rewrites inside steps
*are* onnx-ir passes.

What surrounds the steps — timing, progress, dumping the model after each step — are
:class:`Instrument`\\ s, the way TVM separates pass instrumentation from passes: a step never
times, prints or dumps itself. When a step reports a change, the state's cached analyses are
invalidated before the next step runs.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
from collections.abc import Callable, Sequence
from typing import Any, Protocol

__all__ = ["Step", "Instrument", "PassManager", "TimingInstrument", "ProgressInstrument", "DumpInstrument"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Step:
    """One entry of a pipeline.

    ``run(state) -> bool`` says whether the model changed. ``when(state)`` (default: always)
    decides from the options whether the step runs; ``--explain`` lists both.
    """

    name: str
    run: Callable[[Any], bool]
    doc: str
    when: Callable[[Any], bool] | None = None
    #: Why a step is skipped, shown by ``--explain`` (e.g. "--verify none").
    skip_reason: Callable[[Any], str] | None = None

    def enabled(self, state: Any) -> bool:
        return self.when is None or bool(self.when(state))


class Instrument(Protocol):
    """Observes steps; never changes the state."""

    def before(self, step: Step, state: Any) -> None: ...

    def after(self, step: Step, state: Any, modified: bool) -> None: ...


class PassManager:
    """Run steps in order; instruments see each one; analyses are invalidated on change."""

    def __init__(self, steps: Sequence[Step], instruments: Sequence[Instrument] = ()) -> None:
        names = [s.name for s in steps]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate step names in {names}")
        self.steps = list(steps)
        self.instruments = list(instruments)

    def explain(self, state: Any) -> list[tuple[str, bool, str]]:
        """(name, runs, what it does or why not) for every step, in order."""
        rows = []
        for s in self.steps:
            on = s.enabled(state)
            why = s.doc if on else f"skipped: {s.skip_reason(state) if s.skip_reason else 'not needed for these options'}"
            rows.append((s.name, on, why))
        return rows

    def run(self, state: Any) -> Any:
        for step in self.steps:
            if not step.enabled(state):
                continue
            for ins in self.instruments:
                ins.before(step, state)
            modified = False
            try:
                modified = bool(step.run(state))
            finally:
                for ins in reversed(self.instruments):
                    ins.after(step, state, modified)
            if modified:
                state.invalidate()
        return state


class TimingInstrument:
    """Seconds per step, into ``timer`` (a :class:`spa.report.Timer`)."""

    def __init__(self, timer) -> None:
        self.timer = timer
        self._open: dict[str, Any] = {}

    def before(self, step: Step, state: Any) -> None:
        cm = self.timer(step.name)
        cm.__enter__()
        self._open[step.name] = cm

    def after(self, step: Step, state: Any, modified: bool) -> None:
        self._open.pop(step.name).__exit__(None, None, None)


class ProgressInstrument:
    """Calls ``on_step(name)`` as each step starts (the CLI's spinner)."""

    def __init__(self, on_step: Callable[[str], None]) -> None:
        self.on_step = on_step

    def before(self, step: Step, state: Any) -> None:
        self.on_step(step.name)

    def after(self, step: Step, state: Any, modified: bool) -> None:
        return None


class DumpInstrument:
    """Write the model after every step that changed it: ``DIR/NN-step.onnx`` (for debugging
    a vendor model: which step made the graph look like this)."""

    def __init__(self, directory: str | pathlib.Path) -> None:
        self.directory = pathlib.Path(directory)
        self._n = 0

    def before(self, step: Step, state: Any) -> None:
        return None

    def after(self, step: Step, state: Any, modified: bool) -> None:
        model = getattr(state, "model", None)
        if not modified or model is None:
            return
        from spa import io  # late: io imports onnx-ir's serializer

        self._n += 1
        path = self.directory / f"{self._n:02d}-{step.name}.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        io.save_model(model, path, durable=False)
        logger.info("dumped the model after %s to %s", step.name, path)
