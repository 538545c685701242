"""The GPUs this process may use, and how they are shared out among work that runs at once.

``visible()`` lists the GPUs as the ids a child process is given in ``CUDA_VISIBLE_DEVICES``: the
parent's own ``CUDA_VISIBLE_DEVICES`` entries when it has one (a Slurm job's or a user's
selection: ``"2,5"`` gives ``["2", "5"]``), else ``"0"`` .. ``"N-1"``; in-process, torch numbers
the same GPUs ``cuda:0`` .. ``cuda:N-1``. ``device_count`` is the one function that asks torch how
many there are (tests replace it).

``plan_groups`` is the pure plan for proxy seeds and retraining runs: groups of
``launch.gpus_per_run`` GPUs, ``floor(N / g)`` of them, so that many runs train at once, each
fairseq-train process seeing only its own group (its world size is ``g`` whatever the node has).
While a work unit runs, its thread holds its group (``using``) and ``assigned`` tells
``fairseq_backend`` which GPUs that unit's subprocess may see and how many it trains on.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import UsageError

_local = threading.local()


def device_count() -> int:
    """GPUs torch can use in this process (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def visible() -> list[str]:
    """The ids of the GPUs this process may use, in torch's order (``cuda:i`` is entry ``i``)."""
    n = device_count()
    if n <= 0:
        return []
    listed = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if len(listed) >= n:  # CUDA ignores entries after an invalid one; torch counted the valid ones
        return listed[:n]
    return [str(i) for i in range(n)]


def plan_groups(gpus: list[str], gpus_per_run: int) -> list[tuple[str, ...]]:
    """Disjoint groups of ``gpus_per_run`` consecutive GPUs, as many as fit; leftover GPUs stay idle.

    ``gpus_per_run`` larger than the GPUs present is a UsageError naming the setting."""
    if gpus_per_run < 1:
        raise UsageError(f"launch.gpus_per_run: must be at least 1, got {gpus_per_run}")
    if gpus_per_run > len(gpus):
        shown = ",".join(gpus) if gpus else "none"
        raise UsageError(f"launch.gpus_per_run: {gpus_per_run} GPUs per run, but this machine lets mtprune use "
                         f"{len(gpus)} (CUDA_VISIBLE_DEVICES: {shown}); lower it or run where there are more")
    return [tuple(gpus[k:k + gpus_per_run]) for k in range(0, len(gpus) - gpus_per_run + 1, gpus_per_run)]


def assigned() -> tuple[str, ...] | None:
    """The GPU group of the work unit running on this thread; None outside one (or on CPU)."""
    return getattr(_local, "group", None)


@contextmanager
def using(group: tuple[str, ...] | None) -> Iterator[None]:
    """Run the block as the holder of ``group`` (this thread only)."""
    before = assigned()
    _local.group = group
    try:
        yield
    finally:
        _local.group = before


def cuda_visible_devices(group: tuple[str, ...]) -> str:
    return ",".join(group)
