"""How many CPUs this process may use: its affinity mask, narrowed by Slurm's allocation.

``os.cpu_count()`` counts the node's CPUs, not the ones a Slurm job (cgroup / cpuset) or ``taskset``
gave the process, so a job on 8 of 128 CPUs would start 128 threads. Every thread count and every
"one process per core" decision in mtprune comes from ``usable_cpus()``.
"""

from __future__ import annotations

import os


def usable_cpus() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        n = os.cpu_count() or 1
    slurm = os.environ.get("SLURM_CPUS_PER_TASK")
    if slurm and os.environ.get("SLURM_JOB_ID"):
        try:
            n = min(n, int(slurm))
        except ValueError:
            pass
    return max(1, n)
