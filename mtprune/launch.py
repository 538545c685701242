"""Running a stage's independent work units (proxy seeds, retraining runs) on this machine.

A unit is done when its folder holds ``done.json`` with the unit's key; a unit whose folder
holds another key (the config changed) is cleared and redone; an unfinished one resumes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .faults import crash_point
from .manifest import atomic_write_text

log = logging.getLogger("mtprune")


@dataclass
class Unit:
    name: str
    folder: Path
    key: dict[str, Any]
    work: Callable[[int], dict[str, Any]]  # threads -> result recorded in done.json


def unit_result(folder: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    try:
        done = json.loads((folder / "done.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return done.get("result") if done.get("key") == key else None


def _prepare_folder(unit: Unit) -> None:
    key_file = unit.folder / "unit.json"
    try:
        old = json.loads(key_file.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        old = None
    if old != unit.key and unit.folder.exists():
        log.info("%s: settings changed, starting over", unit.name)
        shutil.rmtree(unit.folder)
    unit.folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(key_file, json.dumps(unit.key, sort_keys=True))


def plan_parallel(n_units: int, parallel: int, use_cuda: bool) -> tuple[int, int]:
    """(processes at once, torch threads each): on CPU one thread per process beats oversubscription."""
    cores = os.cpu_count() or 1
    if parallel <= 0:
        parallel = 1 if use_cuda else max(1, min(n_units, cores))
    parallel = max(1, min(parallel, n_units))
    return parallel, max(1, cores // parallel)


def run_units(units: list[Unit], parallel: int, use_cuda: bool) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    todo = []
    for u in units:
        r = unit_result(u.folder, u.key)
        if r is not None:
            log.info("%s: already done, skipping", u.name)
            results[u.name] = r
        else:
            todo.append(u)
    if not todo:
        return results
    procs, threads = plan_parallel(len(todo), parallel, use_cuda)
    log.info("running %d unit(s), %d at a time with %d thread(s) each", len(todo), procs, threads)

    def one(u: Unit) -> tuple[str, dict[str, Any]]:
        _prepare_folder(u)
        result = u.work(threads)
        crash_point(f"unit-done:{u.name}")
        atomic_write_text(u.folder / "done.json", json.dumps({"key": u.key, "result": result}, sort_keys=True))
        return u.name, result

    with ThreadPoolExecutor(max_workers=procs) as pool:
        for name, result in pool.map(one, todo):
            results[name] = result
    return results
