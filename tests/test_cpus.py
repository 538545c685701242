import os
import subprocess
import sys

import pytest

from mtprune.cpus import usable_cpus
from mtprune.launch import plan_parallel


def test_slurm_allocation_narrows_the_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert usable_cpus() == 1
    assert plan_parallel(n_units=4, parallel=0, use_cuda=False) == (1, 1)
    monkeypatch.delenv("SLURM_JOB_ID")  # a leftover variable outside a job does not count
    assert usable_cpus() == len(os.sched_getaffinity(0))


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs to narrow the affinity to 1")
def test_affinity_mask_is_what_counts_not_the_node() -> None:
    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from mtprune.cpus import usable_cpus; from mtprune.launch import plan_parallel; "
            "print(usable_cpus(), os.cpu_count(), plan_parallel(3, 0, False))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "1" and int(out[1]) >= 2 and out[2:] == ["(1,", "1)"]
