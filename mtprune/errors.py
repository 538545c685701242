"""Errors a user can act on. The CLI prints ``str(error)`` as one line and exits with ``exit_code``."""

from __future__ import annotations


class MtpruneError(Exception):
    """Base class; exit code 1 means the job itself failed."""

    exit_code = 1


class UsageError(MtpruneError):
    """Bad config, bad input file or stages run out of order (exit code 2)."""

    exit_code = 2


class ConfigError(UsageError):
    """One or more config problems; the message lists every one with its dotted key."""

    def __init__(self, problems: list[str], source: str = "config") -> None:
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))


class InputError(UsageError):
    """A data file that cannot be used as it is (names the file and, where known, the line)."""


class StageError(MtpruneError):
    """A stage failed while running (exit code 1)."""
