"""MetaSchedule tuning with a database reused across runs and models.

Tasks (one per distinct fused kernel) are extracted from the model, and the trial budget is
split among them by their share of the model's FLOPs. A task the database already holds its
share of trials for is not tuned again, so a second run of the same model — or a pruned model
that shares layer shapes with one tuned before — only builds; a larger budget tops the tasks
up from their best records. The rest are tuned one task at a time (for a progress bar that
means something), with MetaSchedule's evolutionary search and XGBoost cost model
(``xgboost-cpu`` comes with ``spa[tvm]``). The database folder carries a ``spa-tuning.json`` naming the TVM
version that wrote it: records of another version are refused rather than silently misread.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pathlib
import time
from collections.abc import Callable
from typing import Any

from spa.kernels.errors import TuningDatabaseError, first_line

__all__ = ["Tuning", "tune_and_build", "open_database"]

MARKER = "spa-tuning.json"
#: Candidates measured per search round. Each round of evolutionary search costs about 30 s of
#: evolution on 2 cores whatever its size (measured: 16 candidates took 40 s a round, 11 s of it
#: measuring), so rounds of 64 (MetaSchedule's default) spend the time on measurements.
TRIALS_PER_ROUND = 64


@dataclasses.dataclass
class Tuning:
    """Options of a tuning run. ``trials`` is the budget for the whole model."""

    database: pathlib.Path
    trials: int = 0
    rpc: Any = None  # spa.kernels.rpc.Remote: measure candidates on a tracker's device
    progress: Callable[[str, int, int], None] | None = None  # (task, done, total)
    seed: int = 0


def open_database(folder: str | os.PathLike):
    """The JSON database in ``folder`` (created if absent); refuses another TVM's records."""
    import tvm
    import tvm.s_tir.meta_schedule as ms

    folder = pathlib.Path(folder)
    if folder.exists() and not folder.is_dir():
        raise TuningDatabaseError(f"--tuning-db {folder}: is a file, not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / MARKER
    if marker.exists():
        try:
            written_by = json.loads(marker.read_text()).get("tvm_version")
        except ValueError:
            raise TuningDatabaseError(f"--tuning-db {folder}: {MARKER} is not valid JSON") from None
        if written_by != tvm.__version__:
            raise TuningDatabaseError(
                f"--tuning-db {folder}: written by TVM {written_by}, this is TVM {tvm.__version__}; use a new folder"
            )
    elif any(folder.glob("database_*.json")):
        raise TuningDatabaseError(f"--tuning-db {folder}: a tuning database spa did not write (no {MARKER}); use a new folder")
    else:
        marker.write_text(json.dumps({"tvm_version": tvm.__version__}) + "\n")
    try:
        return ms.database.JSONDatabase(work_dir=str(folder))
    except Exception as e:  # noqa: BLE001 - a corrupt record file
        raise TuningDatabaseError(f"--tuning-db {folder}: cannot read its records ({first_line(e)})") from None


def _prepare(mod, tgt):
    """The Relax module as ``compile_relax`` takes it: decomposed for inference, not yet fused.
    ``compile_relax`` legalises and fuses it itself and then looks each fused PrimFunc up in the
    database; handing it an already fused module fuses twice, no record matches, and the build
    silently falls back to default schedules (tuned ResNet-50 measured as slow as untuned)."""
    import tvm
    from tvm import relax

    with tgt:
        return tvm.transform.Sequential([relax.transform.DecomposeOpsForInference(), relax.transform.CanonicalizeBindings()])(mod)


def _lower(prepared, tgt):
    """Fused PrimFuncs the way MetaSchedule extracts tasks (the static-shape pipeline's start),
    which are the functions ``compile_relax`` makes of ``prepared``."""
    import tvm
    from tvm import relax

    with tgt:
        return relax.get_pipeline("zero")(prepared)


def _search():
    """Evolutionary search with the XGBoost cost model when xgboost is installed; otherwise
    replay-trace with a random model (evolutionary search without xgboost saved no records in
    one run, with no error: NOTES-LIBS)."""
    try:
        import xgboost  # noqa: F401

        return "evolutionary", "xgb"
    except ImportError:
        return "replay-trace", "random"


def _quiet_console() -> None:
    """MetaSchedule copies its logger's level to a console handler on stdout (which would
    corrupt ``--json``) each time it sets up logging; its full logs still go to DB/logs/."""
    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.ERROR)


def _has_record(db, task, tgt) -> bool:
    return db.query_tuning_record(task.dispatched[0], tgt, task.task_name) is not None


def _cost(task) -> float:
    """How much of the model's time a task is likely to be: its FLOPs times how often it runs
    (one unit for a kernel without arithmetic, such as a reshape)."""
    from tvm.s_tir.analysis import estimate_tir_flops

    try:
        flops = float(estimate_tir_flops(task.dispatched[0]))
    except Exception:  # noqa: BLE001 - an op the estimator does not know
        flops = 0.0
    return max(flops, 1.0) * task.weight


def _budgets(tasks, trials: int) -> list[int]:
    """Trials per task for the whole model's budget, by share of the model's FLOPs (a 7×7 conv
    run once needs more search than a cheap 1×1 conv run six times), at least one batch each."""
    costs = [_cost(t) for t in tasks]
    total = sum(costs) or 1.0
    return [max(8, math.ceil(trials * c / total)) for c in costs]


def _records(db, task, tgt) -> int:
    """Measured records the database holds for the task (about the trials once spent on it)."""
    if not _has_record(db, task, tgt):
        return 0
    return len(db.get_top_k(db.commit_workload(task.dispatched[0]), 1 << 20))


def _task_key(task, tgt) -> str:
    from tvm_ffi import structural_hash

    return f"{tgt}|{task.task_name}|{structural_hash(task.dispatched[0])}"


def _spent(folder: pathlib.Path) -> dict[str, int]:
    """Trials already spent per task (target, name, structural hash), kept in the marker: a
    budget the database already holds is not tuned again, a larger one tops it up."""
    return dict(json.loads((folder / MARKER).read_text()).get("trials", {}))


def _record_spent(folder: pathlib.Path, key: str, trials: int) -> None:
    marker = folder / MARKER
    data = json.loads(marker.read_text())
    data.setdefault("trials", {})[key] = trials
    marker.write_text(json.dumps(data, indent=1) + "\n")


def tune_and_build(mod, tgt, tuning: Tuning) -> tuple[Any, dict[str, Any]]:
    """Tune what the database lacks (tasks never tuned, or tuned with fewer trials than this
    budget gives them), then build from it. Returns (executable, info)."""
    import tvm.s_tir.meta_schedule as ms
    from tvm.s_tir.meta_schedule.relax_integration import (
        compile_relax,
        extract_tasks,
        extracted_tasks_to_tune_contexts,
        tune_tasks,
    )

    from spa.kernels._worker import fast_build

    db = open_database(tuning.database)
    prepared = _prepare(mod, tgt)
    lowered = _lower(prepared, tgt)
    tasks = extract_tasks(lowered, tgt)
    folder = pathlib.Path(tuning.database)
    spent = _spent(folder)
    todo = []  # (task, key, trials spent so far, this run's budget for it)
    if tuning.trials > 0:
        for task, budget in zip(tasks, _budgets(tasks, tuning.trials)):
            key = _task_key(task, tgt)
            done = spent[key] if key in spent else _records(db, task, tgt)  # records from before spa counted trials
            if budget - done >= 8:  # less than one batch short: what is there will do
                todo.append((task, key, done, budget))
    todo.sort(key=lambda item: -_cost(item[0]))  # the model's most expensive kernels first: a stopped run has tuned what matters
    strategy, cost_model = _search()
    started = time.perf_counter()
    for i, (task, key, done, budget) in enumerate(todo):
        if tuning.progress:
            tuning.progress(task.task_name, i, len(todo))
        contexts, weights = extracted_tasks_to_tune_contexts([task], work_dir=str(tuning.database), strategy=strategy, seed=tuning.seed)
        runner = tuning.rpc.runner() if tuning.rpc is not None else ms.runner.LocalRunner()
        _quiet_console()
        tune_tasks(
            tasks=contexts, task_weights=weights, work_dir=str(tuning.database), max_trials_global=budget - done,
            num_trials_per_iter=min(budget - done, TRIALS_PER_ROUND), builder=ms.builder.LocalBuilder(max_workers=os.cpu_count() or 1, f_build=fast_build),
            runner=runner, database=db, cost_model=cost_model,
        )
        _record_spent(folder, key, budget)  # after each task: an interrupted run resumes from here
    if tuning.progress and todo:
        tuning.progress("", len(todo), len(todo))
    tune_s = time.perf_counter() - started
    executable = compile_relax(db, prepared, tgt, params=None)
    info = {
        "database": str(tuning.database),
        "tasks": len(tasks),
        "tasks_tuned": len(todo),
        "tasks_from_database": len(tasks) - len(todo),
        "tasks_without_record": sum(1 for t in tasks if not _has_record(db, t, tgt)),
        "trials": tuning.trials,
        "tune_s": round(tune_s, 2),
        "search": f"{strategy}/{cost_model}",
    }
    return executable, info
