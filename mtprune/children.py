"""Child processes that never outlive the mtprune that started them, and the search for ones that did.

A killed ``mtprune proxy`` must not leave its fairseq-train running: an orphan would go on writing
checkpoints into a unit folder whose lock is gone, beside the next run that resumes there. So:

- every child mtprune starts gets ``MTPRUNE_PARENT_PID`` (and, for a trainer, ``MTPRUNE_WRITES_INTO``:
  the folder it writes) in its environment; children that are mtprune's own code (fairseq-train through
  ``fairseq_backend``, its per-GPU workers, `score --shard` processes, fairseq-preprocess through
  ``python -m mtprune.children``) call ``die_with_parent`` first, which asks Linux to SIGKILL them when
  their parent exits, however it exits (``prctl(PR_SET_PDEATHSIG)``);
- before a unit runs, ``stop_strays`` finds processes whose environment says they write into its
  folder (left by an mtprune killed before this was in place, or on a system without the parent-death
  signal) and stops them. The caller holds the unit's lock, so any such process is a stray.

Both are Linux-only (``/proc``, ``prctl``); elsewhere they do nothing.
"""

from __future__ import annotations

import ctypes
import logging
import os
import runpy
import signal
import socket
import sys
import time
from pathlib import Path

log = logging.getLogger("mtprune")

PARENT_PID = "MTPRUNE_PARENT_PID"
WRITES_INTO = "MTPRUNE_WRITES_INTO"
_PR_SET_PDEATHSIG = 1


def _me() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def child_env(env: dict[str, str], writes_into: Path | None = None) -> dict[str, str]:
    """``env`` for a child of this process: names this process (host and pid) as its parent, and the folder
    the child writes."""
    out = dict(env)
    out[PARENT_PID] = _me()
    if writes_into is not None:
        out[WRITES_INTO] = str(Path(writes_into).resolve())
    return out


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def die_with_parent() -> None:
    """Be killed (SIGKILL) when the parent named by ``MTPRUNE_PARENT_PID`` exits; exit now if it already has.

    When this process was started through a wrapper (``srun`` inside a multi-node job), its parent is the
    wrapper, not mtprune: nothing is asked then (the wrapper's own job control ends it); on another node of
    such a job the variable names a process of the first node and is ignored. Afterwards the
    variable names this process, so that its own children (fairseq's per-GPU workers) do the same."""
    host, _, expected = os.environ.get(PARENT_PID, "").rpartition(":")
    if not sys.platform.startswith("linux") or not expected.isdigit() or host != socket.gethostname():
        return  # a task of a multi-node job on another node: the pid names a process of the first one
    parent = int(expected)
    if os.getppid() == parent:
        if not die_with(parent):
            return
    elif not pid_alive(parent):  # started by mtprune, which is gone already
        os._exit(1)
    os.environ[PARENT_PID] = _me()


def die_with(parent: int) -> bool:
    """Be killed (SIGKILL) when ``parent``, the process that started this one, exits; exit now if it already has.
    For children mtprune starts itself with the pid at hand (a prepare part's encoding workers). False where the
    kernel cannot be asked (not Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - every Linux libc has prctl
        return False
    if os.getppid() != parent:  # the parent exited before the request was made
        os._exit(1)
    return True


def writers_into(*folders: Path) -> list[int]:
    """Processes of this host (other than this one) whose environment says they write into one of ``folders``."""
    if not Path("/proc").is_dir():
        return []
    wanted = {f"{WRITES_INTO}={Path(folder).resolve()}".encode() for folder in folders}
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            env = (d / "environ").read_bytes()
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z" and wanted.intersection(env.split(b"\0")):
            out.append(int(d.name))
    return sorted(out)


def stop_strays(folders: list[Path], what: str, grace: float = 10.0) -> list[int]:
    """Stop processes still writing into one of ``folders`` (SIGTERM, then SIGKILL after ``grace`` seconds) and
    wait until they are gone; returns their pids. The caller holds the folders' lock: a writer found is a stray."""
    pids = writers_into(*folders)
    if not pids:
        return []
    log.warning("%s: %d process(es) left by a killed run still write into %s (pid %s); stopping them first",
                what, len(pids), " or ".join(map(str, folders)), ", ".join(map(str, pids)))
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, grace)):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and writers_into(*folders):
            time.sleep(0.1)
        if not writers_into(*folders):
            return pids
    from .errors import StageError

    raise StageError(f"{what}: process(es) {', '.join(map(str, writers_into(*folders)))} still write into "
                     f"{' or '.join(map(str, folders))} and could not be stopped; stop them, then rerun")


def main() -> None:
    """``python -m mtprune.children MODULE ARGS...``: run MODULE as ``python -m`` would, dying with the parent."""
    die_with_parent()
    module = sys.argv[1]
    sys.argv = [module, *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
