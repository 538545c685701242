"""One writer per run directory: a lock file naming the holder's pid and host."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from types import TracebackType

from .errors import MtpruneError, UsageError


class RunLocked(MtpruneError):
    exit_code = 1


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """``with RunLock(path, "prune"):`` fails at once with a clear message if another live process holds it.

    A lock left by a dead process on this host is taken over; one from another host is only
    reported (we cannot tell whether that process still runs).
    """

    def __init__(self, path: Path, command: str) -> None:
        self.path, self.command = path, command
        self.held = False

    def __enter__(self) -> RunLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return self._take()
        except PermissionError as e:
            raise UsageError(f"run directory {self.path.parent} is not writable ({e.strerror}: {e.filename})") from None

    def _take(self) -> RunLock:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None or (holder.get("host") == me["host"] and not _alive(int(holder.get("pid", -1)))):
                    self.path.unlink(missing_ok=True)  # stale: its process is gone
                    continue
                raise RunLocked(
                    f"run directory {self.path.parent} is in use by `mtprune {holder.get('command')}` "
                    f"(pid {holder.get('pid')} on {holder.get('host')}); wait for it to finish, or delete "
                    f"{self.path} if that process is gone") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise RunLocked(f"could not take the lock {self.path}")

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError, ValueError):
            return None

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
