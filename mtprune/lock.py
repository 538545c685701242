"""Who may write where in a run directory: the run lock and the unit locks, on ``filelock``.

- The run lock (``<run>/.lock``) is held by a plain stage command or ``sweep`` for as long as it runs:
  one of them at a time.
- A unit lock (``<stage dir>/.lock-<unit>``) is held by whoever runs that unit (proxy seed,
  retraining run, score shard): the plain stage command for each unit it runs, or ``--unit`` /
  ``--shard``. Job-array tasks run side by side, so they do not hold the run lock; each takes its
  unit lock and *then* checks that no plain command holds the run lock, while a plain command takes
  the run lock and then checks that no unit lock is held. Whichever order two commands start in,
  one of them sees the other.

filelock locks with ``flock``: the kernel releases a lock when its process dies, however it dies, so
there is no stale lock to recognise or take over, and an empty or leftover lock file means nothing.
The holder writes who it is next to the lock (``<lock>.holder``) for the message that a refused
command prints.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from filelock import FileLock, Timeout

from .children import pid_alive
from .errors import MtpruneError, UsageError
from .manifest import atomic_write_text

HOLDER_SUFFIX = ".holder"
UNIT_LOCK_PREFIX = ".lock-"
# How long a refused command waits for a holder that has not said who it is: one that has just
# taken the lock and not yet written its .holder file, or a command merely checking the lock.
UNKNOWN_HOLDER_WAIT_S = 3.0

_held: dict[Path, str] = {}  # locks this process holds -> the command that holds them


class RunLocked(MtpruneError):
    exit_code = 1


def holder_file(path: Path) -> Path:
    return path.with_name(path.name + HOLDER_SUFFIX)


def unit_lock_path(folder: Path) -> Path:
    """The lock of the unit whose outputs live in ``folder`` (``03_proxy/.lock-seed2``)."""
    return folder.with_name(UNIT_LOCK_PREFIX + folder.name)


def holding(path: Path) -> str | None:
    """The command for which this process holds the lock at ``path``, if it does."""
    return _held.get(path.absolute())


def _live_holder(path: Path) -> dict[str, Any] | None:
    """Who holds ``path``, from its .holder file; None when unknown or when that process is gone."""
    try:
        h = json.loads(holder_file(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(h, dict):
        return None
    if h.get("host") == socket.gethostname() and not pid_alive(int(h.get("pid", -1))):
        return None  # written by a process that died; the lock's real holder has not written yet
    return h


class RunLock:
    """``with RunLock(path, "proxy"):`` holds the lock or fails at once with a clear message.

    ``subject`` names what is locked in that message (default: the run directory). With
    ``record=False`` the holder is not written down (a lock taken only to check that it is free).
    """

    def __init__(self, path: Path, command: str, subject: str | None = None, record: bool = True) -> None:
        self.path, self.command, self.record = path, command, record
        self.subject = subject or f"run directory {path.parent}"
        self.held = False
        self._lock = FileLock(str(path), timeout=0)

    def __enter__(self) -> RunLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._take()
            if self.record:
                me = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command}
                atomic_write_text(holder_file(self.path), json.dumps(me))
        except PermissionError as e:
            self._release()
            raise UsageError(f"run directory {self.path.parent} is not writable ({e.strerror}: {e.filename})") from None
        except BaseException:
            self._release()
            raise
        if self.record:
            _held[self.path.absolute()] = self.command
        return self

    def _take(self) -> None:
        deadline = time.monotonic() + UNKNOWN_HOLDER_WAIT_S
        while True:
            try:
                self._lock.acquire(timeout=0)
                self.held = True
                return
            except Timeout:
                holder = _live_holder(self.path)
                if holder is not None or time.monotonic() > deadline:
                    raise RunLocked(self._busy(holder)) from None
                time.sleep(0.05)

    def _busy(self, holder: dict[str, Any] | None) -> str:
        return f"{self.subject} is in use by {describe_holder(holder)}; wait for it to finish"

    def _release(self) -> None:
        if self.held:
            _held.pop(self.path.absolute(), None)
            if self.record:
                holder_file(self.path).unlink(missing_ok=True)
            self._lock.release()
            self.held = False

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self._release()


def describe_holder(holder: dict[str, Any] | None) -> str:
    """``mtprune proxy` (pid 4242 on node7)``, or what is known when the holder has not said who it is."""
    if not holder:
        return "another process (it has not said which)"
    return f"`mtprune {holder.get('command')}` (pid {holder.get('pid')} on {holder.get('host')})"


def _locked_by_another(path: Path) -> bool | None:
    """Whether another process holds the lock at ``path`` now; None when that cannot be told (no permission).

    Asked with a shared flock on a read-only descriptor, released at once: nothing is created or truncated, so
    ``status`` may look at a run directory it cannot write. filelock takes its locks with flock too."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return None
    finally:
        os.close(fd)  # closing the descriptor releases the probe's lock
    return False


def held_by(path: Path, wait: float = 0.5) -> dict[str, Any] | None:
    """Who holds the lock at ``path`` now, for a reader (``status``, a dry run) that takes nothing: the holder's
    record (pid, host, command; ``{}`` while it has not said who it is), or None when the lock is free or
    held by this very process.

    A holder that has just taken the lock writes its record a moment later, and a command that only checks a
    lock (``check_free``) holds it for an instant: ``wait`` seconds are given for either to settle."""
    if holding(path) is not None:
        return None
    deadline = time.monotonic() + wait
    while True:
        locked = _locked_by_another(path)
        if locked is False:
            return None
        holder = _live_holder(path)
        if locked is None:  # the lock cannot be asked: trust a record whose process is alive
            return holder
        if holder is not None or time.monotonic() > deadline:
            return holder or {}
        time.sleep(0.05)


def check_free(path: Path, subject: str | None = None) -> None:
    """Raise RunLocked if another process holds the lock at ``path``; hold nothing afterwards."""
    if holding(path) is not None:
        return
    with RunLock(path, "", subject, record=False):
        pass


def check_no_units_running(stage_dir: Path) -> None:
    """Raise RunLocked if a ``--unit`` / ``--shard`` job holds the lock of one of the stage's units."""
    if not stage_dir.is_dir():
        return
    for p in sorted(stage_dir.glob(UNIT_LOCK_PREFIX + "*")):
        if not p.name.endswith(HOLDER_SUFFIX) and p.is_file():
            check_free(p, f"{stage_dir.name}/{p.name[len(UNIT_LOCK_PREFIX):]}")


def unit_holders(stage_dir: Path) -> list[tuple[str, dict[str, Any]]]:
    """The units of a stage that another process runs now (a ``--unit`` / ``--shard`` job, or a plain command
    running them): (unit name, holder record) for each, by name."""
    if not stage_dir.is_dir():
        return []
    out = []
    for p in sorted(stage_dir.glob(UNIT_LOCK_PREFIX + "*")):
        if not p.name.endswith(HOLDER_SUFFIX) and p.is_file():
            holder = held_by(p)
            if holder is not None:
                out.append((p.name[len(UNIT_LOCK_PREFIX):], holder))
    return out
