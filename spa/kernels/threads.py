"""How many threads TVM's CPU runtime runs on, fixed before its thread pool starts.

TVM sizes its pool once, on the first parallel kernel, from ``TVM_NUM_THREADS``, else
``OMP_NUM_THREADS``, else ``std::thread::hardware_concurrency() / 2`` on x86 — the halving
assumes every core carries two hyper-threads (``src/runtime/threading_backend.cc``). On a VM
whose vCPUs are one thread per core, such as the 2-core CI machine, that leaves half the cores
idle: tuned, pruned ResNet-50 ran 22.9 ms on TVM's default of 1 thread and 12.5 ms on 2, while
ONNX Runtime, which counts physical cores itself, used both — a 2× handicap that looked like
kernel quality. So spa counts the physical cores it may run on (the distinct cores behind this
process's CPU affinity, from sysfs) and exports ``TVM_NUM_THREADS`` before any TVM kernel runs;
subprocesses (MetaSchedule's builders and runners, a local RPC server) inherit it, so tuning
measures schedules on the same thread count the module later runs with. A variable the user set
(either of the two) is left alone.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterable

__all__ = ["physical_cores", "configure", "runtime_threads"]

_SYS_CPU = pathlib.Path("/sys/devices/system/cpu")


def physical_cores(cpus: Iterable[int] | None = None, sys_cpu: pathlib.Path = _SYS_CPU) -> int:
    """Distinct physical cores among ``cpus`` (default: the CPUs this process may run on).

    Hyper-threads of one core share a ``thread_siblings_list``; where sysfs has no topology
    (not Linux, a container hiding it) every allowed CPU counts as a core."""
    if cpus is None:
        try:
            cpus = sorted(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cpus = range(os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        try:
            cores.add((sys_cpu / f"cpu{cpu}" / "topology" / "thread_siblings_list").read_text().strip())
        except OSError:
            cores.add(f"cpu{cpu}")
    return max(1, len(cores))


def configure() -> int:
    """Export ``TVM_NUM_THREADS`` = physical cores unless the user set it or ``OMP_NUM_THREADS``;
    returns the thread count TVM will use. Only effective before TVM's pool first starts."""
    for var in ("TVM_NUM_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(var, "").strip()
        if value:
            try:
                return max(1, int(value))
            except ValueError:  # TVM's atoi reads garbage as 0 and then uses 1 thread
                return 1
    n = physical_cores()
    os.environ["TVM_NUM_THREADS"] = str(n)
    return n


def runtime_threads() -> int:
    """The thread count TVM's pool in this process actually has (starts the pool)."""
    import tvm

    return int(tvm.get_global_func("runtime.NumThreads")())
