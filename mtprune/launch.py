"""Running a stage's independent work units (proxy seeds, retraining runs) on this machine.

A unit is done when its folder holds ``done.json`` with the unit's key (the settings its result
depends on) and every output file it lists is still there with its recorded size and (when its
mtime moved) its recorded sha256; a missing or damaged output is redone. Finished work is never
destroyed before its replacement is complete: a unit whose folder holds finished work (for other
settings, or damaged) runs in a staging folder next to it (``.<name>.next/``, resumed if
interrupted with the same key) that is swapped into place only once its outputs are complete.
An unfinished unit with the same key resumes in its own folder.

Whoever runs a unit holds its lock (see ``lock.py``) and makes sure that no plain stage command
holds the run lock, unless that is this very process.

On GPUs each running unit holds a group of ``launch.gpus_per_run`` GPUs (``gpus.py``), and as many
units run at once as there are groups; ``score_on_gpus`` scores one shard per GPU in child processes.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import gpus
from .children import stop_strays
from .config import Config, is_speed_only
from .cpus import usable_cpus
from .errors import StageError
from .faults import crash_point
from .lock import RunLock, check_free, holding, unit_lock_path
from .manifest import atomic_write_text, file_sha256

log = logging.getLogger("mtprune")

DONE = "done.json"
KEY = "unit.json"
INPUTS = "inputs.json"


@dataclass
class Unit:
    name: str  # "<stage> <folder name>": "proxy seed2", "train el2n-high-0.3"
    folder: Path
    key: dict[str, Any]
    work: Callable[[Path, int], dict[str, Any]]  # (folder to write in, threads) -> result recorded in done.json
    outputs: list[str]  # files the work leaves in its folder; the unit is done only while they are intact
    run_lock: Path  # the run directory's lock: a unit never runs beside a plain stage command of another process
    # digests of input files the result depends on beyond ``key`` (the training source side, the validation
    # set). Kept apart from the key so that units finished before they were recorded stay done
    inputs: dict[str, str] = field(default_factory=dict)


def unit_settings(cfg: Config, *sections: str, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """Config sections as plain data less speed-only settings and the dotted keys in ``exclude``
    (settings that select units rather than change one): what a unit's result depends on.

    Settings left at null (off: e.g. ``tokens_per_update``) are left out too, so an optional setting
    added to mtprune later does not change the key of units trained before it existed."""

    def drop(tree: dict[str, Any], prefix: str) -> dict[str, Any]:
        out = {}
        for k, v in tree.items():
            key = prefix + k
            if is_speed_only(key) or key in exclude or v is None:
                continue
            out[k] = drop(v, key + ".") if isinstance(v, dict) else v
        return out

    return drop(cfg.section(*sections), "")


def staging_dir(folder: Path) -> Path:
    return folder.with_name(f".{folder.name}.next")


def _aside_dir(folder: Path) -> Path:
    return folder.with_name(f".{folder.name}.old")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def fingerprint(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": file_sha256(path)}


def unit_state(u: Unit, folder: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(result, None) when ``folder`` holds ``u`` finished with its current key and intact outputs;
    (None, problem) when it was finished with this key but on other input data, or an output is missing or
    damaged; (None, None) when it holds no finished work for this key."""
    done = _read_json(folder / DONE)
    if not isinstance(done, dict) or done.get("key") != u.key:
        return None, None
    changed = _changed_inputs(u, done.get("inputs"))
    if changed:
        return None, f"finished on other training or validation data ({', '.join(changed)} changed)"
    recorded = done.get("outputs")
    if not isinstance(recorded, dict):
        return None, f"{DONE} does not record its outputs (written by an older mtprune)"
    for name in u.outputs:
        p, entry = folder / name, recorded.get(name)
        try:
            st = p.stat()
        except OSError:
            return None, f"{name} is missing"
        if not isinstance(entry, dict) or "bytes" not in entry:
            return None, f"{name} is not recorded in {DONE}"
        if st.st_size != entry["bytes"]:
            return None, f"{name} is damaged ({st.st_size} bytes, {entry['bytes']} when it was written)"
        if st.st_mtime_ns != entry.get("mtime_ns") and file_sha256(p) != entry.get("sha256"):
            return None, f"{name} is damaged (its content changed since it was written)"
    result = done.get("result")
    return (result if isinstance(result, dict) else {}), None


def _changed_inputs(u: Unit, recorded: Any) -> list[str]:
    """The inputs of ``u`` whose digests differ from ``recorded``, those of the work done. Work that recorded
    none (an mtprune from before they were recorded) is judged by its key alone, as it was then."""
    if recorded is None or recorded == u.inputs:
        return []
    was = recorded if isinstance(recorded, dict) else {}
    return [k for k in u.inputs if was.get(k) != u.inputs[k]] or ["its input files"]


def _swap_in(u: Unit, staged: Path) -> None:
    """Replace the unit's folder by ``staged`` (complete, with done.json); the old one is removed last."""
    aside = _aside_dir(u.folder)
    shutil.rmtree(aside, ignore_errors=True)
    if u.folder.exists():
        os.replace(u.folder, aside)
    crash_point(f"unit-swap:{u.name}")
    os.replace(staged, u.folder)
    shutil.rmtree(aside, ignore_errors=True)


def _recover(u: Unit) -> None:
    """Finish a swap that a killed run left halfway, and swap in a staged unit that finished."""
    aside, staged = _aside_dir(u.folder), staging_dir(u.folder)
    if not u.folder.exists() and aside.exists():
        if (staged / DONE).exists():
            os.replace(staged, u.folder)
        else:
            os.replace(aside, u.folder)
    shutil.rmtree(aside, ignore_errors=True)
    if staged.exists() and unit_state(u, staged)[0] is not None:
        log.info("%s: finished in %s before a stop, moving it into place", u.name, staged.name)
        _swap_in(u, staged)


def _work_folder(u: Unit, redo: bool) -> Path:
    """Where to run ``u``: its own folder unless that holds finished work, then the staging folder.
    A folder whose unit.json names other settings holds unfinished work of those: it starts over."""
    target = u.folder
    if redo or (u.folder / DONE).exists():
        target = staging_dir(u.folder)
    if target.exists() and _read_json(target / KEY) != u.key:
        if target == u.folder:
            log.info("%s: settings changed, starting over", u.name)
        shutil.rmtree(target)
    elif target.exists() and _changed_inputs(u, _read_json(target / INPUTS) if (target / INPUTS).exists() else None):
        log.info("%s: its training data changed, starting over", u.name)
        shutil.rmtree(target)
    target.mkdir(parents=True, exist_ok=True)
    atomic_write_text(target / KEY, json.dumps(u.key, sort_keys=True))
    atomic_write_text(target / INPUTS, json.dumps(u.inputs, sort_keys=True))
    return target


def _run_one(u: Unit, threads: int) -> dict[str, Any]:
    stop_strays([u.folder, staging_dir(u.folder)], u.name)  # a trainer that outlived a killed run writes no more
    _recover(u)
    result, problem = unit_state(u, u.folder)
    if result is not None:
        return result
    if problem:
        log.warning("%s: %s, redoing it", u.name, problem)
    folder = _work_folder(u, redo=problem is not None)
    if folder != u.folder:
        log.info("%s: running in %s; %s stays as it is until this run is complete",
                 u.name, folder.name, u.folder.name)
    result = u.work(folder, threads)
    missing = [n for n in u.outputs if not (folder / n).is_file()]
    if missing:
        raise StageError(f"{u.name}: finished without writing {', '.join(missing)} (see {folder / 'train.log'})")
    crash_point(f"unit-done:{u.name}")
    done = {"key": u.key, "inputs": u.inputs, "result": result,
            "outputs": {n: fingerprint(folder / n) for n in u.outputs}}
    atomic_write_text(folder / DONE, json.dumps(done, sort_keys=True))
    if folder != u.folder:
        _swap_in(u, folder)
    return result


def note_kept_units(stage: str, stage_dir: Path, wanted: set[str]) -> list[str]:
    """Log the unit folders of ``stage_dir`` that the config no longer lists; they are kept, never deleted.

    Finished work is not thrown away because a list got shorter (``proxy.seeds``, ``train.seeds``,
    ``prune.sparsities``, ``proxy.dual``): the manifest lists only the configured units, and a later run
    that lists a kept unit again finds it done (same key) and reuses it. Returns the kept folders' names."""
    kept = sorted(d.name for d in stage_dir.iterdir() if d.is_dir() and not d.name.startswith(".")
                  and d.name not in wanted) if stage_dir.is_dir() else []
    if kept:
        size = sum(f.stat().st_size for k in kept for f in (stage_dir / k).rglob("*") if f.is_file())
        log.info("%s: kept %d folder(s) this config does not list (%s; %.1f MB): a run that lists them again "
                 "reuses what finished; delete them by hand to free the disk", stage, len(kept),
                 ", ".join(kept[:8]) + (", ..." if len(kept) > 8 else ""), size / 1e6)
    return kept


def all_units_done(make_units: Callable[[], list[Unit]]) -> bool:
    """Whether every unit ``make_units`` lists is finished with its current key; False when their training data
    is not there yet (building the units hashes it)."""
    try:
        return all(unit_state(u, u.folder)[0] is not None for u in make_units())
    except OSError:
        return False


def finished_units(stage_dir: Path, expected: dict[str, dict[str, Any]], unchecked: tuple[str, ...] = ()) -> list[str]:
    """The units of ``expected`` (folder name -> key) whose folder holds finished work with that key, the key's
    entries named in ``unchecked`` aside: digests of the training data that only a run computes (a hash pass
    over data-bin is no job for `status`). The outputs are not checked either; the run does both."""
    out = []
    for name, key in expected.items():
        done = _read_json(stage_dir / name / DONE)
        recorded = done.get("key") if isinstance(done, dict) else None
        if isinstance(recorded, dict) and {k: v for k, v in recorded.items() if k not in unchecked} == key:
            out.append(name)
    return out


def units_note(stage_dir: Path, names: list[str], make_units: Callable[[], list[Unit]],
               upstream_runs: list[str]) -> str:
    """For a dry run: which of a stage's units will run and which finished ones are reused. When an upstream
    stage runs first, the units' data is not known yet: say how many have finished work that may be reused."""
    if upstream_runs:
        finished = sum((stage_dir / n / DONE).is_file() for n in names)
        if not finished:
            return f"{len(names)} unit(s) to run"
        return (f"{len(names)} unit(s); which of them run is known once {' and '.join(upstream_runs)} ran "
                f"({finished} hold finished work, reused if their data comes out the same)")
    try:
        units = make_units()
    except OSError:  # an upstream output is missing: the stage will say so itself
        return ""
    todo = [u.folder.name for u in units if unit_state(u, u.folder)[0] is None]
    if not todo:
        return f"all {len(units)} unit(s) finished: reused, only the manifest is written"
    shown = ", ".join(todo[:6]) + (f", +{len(todo) - 6} more" if len(todo) > 6 else "")
    return f"{len(todo)} of {len(units)} unit(s) run ({shown}); {len(units) - len(todo)} finished, reused"


def plan_parallel(n_units: int, parallel: int, use_cuda: bool, n_groups: int = 1) -> tuple[int, int]:
    """(processes at once, torch threads each): on CPU one thread per process beats oversubscription;
    on GPUs one process per GPU group (``n_groups``, see ``plan_gpus``) unless ``parallel`` says otherwise."""
    cores = usable_cpus()
    if parallel <= 0:
        parallel = max(1, n_groups) if use_cuda else max(1, min(n_units, cores))
    parallel = max(1, min(parallel, n_units))
    return parallel, max(1, cores // parallel)


def plan_gpus(n_units: int, parallel: int, gpus_per_run: int) -> tuple[list[tuple[str, ...] | None], int]:
    """(GPU group of each worker slot, torch threads each) for units that train on this machine's GPUs.

    With N GPUs, ``floor(N / gpus_per_run)`` groups of ``gpus_per_run`` GPUs: that many units run at once by
    default, each fairseq-train seeing its own group only (so it trains on exactly ``gpus_per_run`` GPUs:
    DDP when more than one). An explicit ``parallel`` above the number of groups puts several units on a
    group (small models sharing a GPU); slots take the groups in turn."""
    groups = gpus.plan_groups(gpus.visible(), gpus_per_run)
    procs, threads = plan_parallel(n_units, parallel, use_cuda=True, n_groups=len(groups))
    idle = gpus.visible()[len(groups) * gpus_per_run:]
    if idle:
        log.info("GPU(s) %s stay idle (launch.gpus_per_run=%d)", ",".join(idle), gpus_per_run)
    return [groups[k % len(groups)] for k in range(procs)], threads


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class _Progress:
    """One line per unit that starts and finishes: how many are done, the time so far and an estimate of the
    rest (the mean time of a finished unit, times the units left, over the units running at once)."""

    def __init__(self, total: int, at_once: int) -> None:
        self.total, self.at_once, self.done, self.spent = total, max(1, at_once), 0, 0.0
        self.t0 = time.monotonic()
        self.lock = threading.Lock()

    def position(self) -> str:
        with self.lock:
            return f"{self.done} of {self.total} unit(s) done, {_clock(time.monotonic() - self.t0)} so far"

    def finished(self, name: str, seconds: float) -> None:
        with self.lock:
            self.done += 1
            self.spent += seconds
            left = self.total - self.done
            eta = f", about {_clock(self.spent / self.done * left / min(self.at_once, left))} left" if left else ""
            log.info("%s: finished in %s (%d of %d unit(s) done, %s so far%s)", name, _clock(seconds), self.done,
                     self.total, _clock(time.monotonic() - self.t0), eta)


def run_units(units: list[Unit], parallel: int, use_cuda: bool, gpus_per_run: int = 1) -> dict[str, dict[str, Any]]:
    """Run the units not done yet, ``parallel`` at once (0: as many as the CPUs or GPU groups allow);
    on GPUs each running unit holds a group of ``gpus_per_run`` GPUs (``gpus.using``) that its
    fairseq-train subprocess sees as its only GPUs."""
    todo = []
    for u in units:
        result, _ = unit_state(u, u.folder)
        if result is not None:
            log.info("%s: already done, skipping", u.name)
        else:
            todo.append(u)
    slots: queue.Queue[tuple[str, ...] | None] = queue.Queue()
    if todo and use_cuda:  # only work still to do needs GPUs (a finished stage stays done on any machine)
        groups, threads = plan_gpus(len(todo), parallel, gpus_per_run)
        procs = len(groups)
    else:
        procs, threads = plan_parallel(max(1, len(todo)), parallel, use_cuda)
        groups = [None] * procs
    for g in groups:
        slots.put(g)
    if todo:
        where = f" on GPU group(s) {' '.join(','.join(g) for g in dict.fromkeys(groups) if g)}" if use_cuda else ""
        log.info("running %d unit(s), %d at a time with %d thread(s) each%s", len(todo), procs, threads, where)

    progress = _Progress(len(todo), procs)
    running = {id(u) for u in todo}

    def one(u: Unit) -> tuple[str, dict[str, Any]]:
        stage, _, unit = u.name.partition(" ")
        command = holding(u.run_lock) or f"{stage} --unit {unit}"  # the plain command holds the run lock
        with RunLock(unit_lock_path(u.folder), command, subject=u.name):
            check_free(u.run_lock)  # no plain stage command of another process runs now
            group = slots.get()
            try:
                with gpus.using(group):
                    started = time.monotonic()
                    if id(u) in running:
                        log.info("%s: started (%s)", u.name, progress.position())
                    result = _run_one(u, threads)
                    if id(u) in running:
                        progress.finished(u.name, time.monotonic() - started)
                    return u.name, result
            finally:
                slots.put(group)

    results: dict[str, dict[str, Any]] = {}
    pool = ThreadPoolExecutor(max_workers=procs)
    try:
        for name, result in pool.map(one, units):
            results[name] = result
    except KeyboardInterrupt:
        # Ctrl-C: no waiting unit starts; the running ones stop when this process exits (the CLI exits at once,
        # without joining the threads that wait on them, and their trainers die with it: children.py)
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return results
