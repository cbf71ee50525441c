"""MetaSchedule tuning with a database reused across runs and models.

Tasks (one per distinct fused kernel) are extracted from the model; a task whose workload
already has a measured record in ``--tuning-db`` is not tuned again, so a second run of the
same model — or a pruned model that shares layer shapes with one tuned before — only builds.
The rest are tuned one task at a time (for a progress bar that means something) with the trial
budget split by task weight. The database folder carries a ``spa-tuning.json`` naming the TVM
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


def _lower(mod, tgt):
    """Lower Relax to PrimFuncs the way MetaSchedule expects (the static-shape pipeline's start)."""
    import tvm
    from tvm import relax

    with tgt:
        return tvm.transform.Sequential(
            [relax.transform.DecomposeOpsForInference(), relax.transform.CanonicalizeBindings(), relax.get_pipeline("zero")]
        )(mod)


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


def _budgets(tasks, trials: int) -> list[int]:
    """Trials per task, by weight (how often the kernel runs), at least one batch each."""
    total = sum(t.weight for t in tasks) or 1
    return [max(8, math.ceil(trials * t.weight / total)) for t in tasks]


def tune_and_build(mod, tgt, tuning: Tuning) -> tuple[Any, dict[str, Any]]:
    """Tune what the database lacks, then build from it. Returns (executable, info)."""
    import tvm.s_tir.meta_schedule as ms
    from tvm.s_tir.meta_schedule.relax_integration import (
        compile_relax,
        extract_tasks,
        extracted_tasks_to_tune_contexts,
        tune_tasks,
    )

    from spa.kernels._worker import fast_build

    db = open_database(tuning.database)
    lowered = _lower(mod, tgt)
    tasks = extract_tasks(lowered, tgt)
    todo = [t for t in tasks if not _has_record(db, t, tgt)] if tuning.trials > 0 else []
    strategy, cost_model = _search()
    started = time.perf_counter()
    for i, (task, budget) in enumerate(zip(todo, _budgets(todo, tuning.trials))):
        if tuning.progress:
            tuning.progress(task.task_name, i, len(todo))
        contexts, weights = extracted_tasks_to_tune_contexts([task], work_dir=str(tuning.database), strategy=strategy, seed=tuning.seed)
        runner = tuning.rpc.runner() if tuning.rpc is not None else ms.runner.LocalRunner()
        _quiet_console()
        tune_tasks(
            tasks=contexts, task_weights=weights, work_dir=str(tuning.database), max_trials_global=budget,
            num_trials_per_iter=min(budget, 16), builder=ms.builder.LocalBuilder(max_workers=os.cpu_count() or 1, f_build=fast_build),
            runner=runner, database=db, cost_model=cost_model,
        )
    if tuning.progress and todo:
        tuning.progress("", len(todo), len(todo))
    tune_s = time.perf_counter() - started
    executable = compile_relax(db, lowered, tgt, params=None)
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
