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

    def __init__(self, problems: list[str], source: str = "config", overridden: tuple[str, ...] = ()) -> None:
        """``overridden``: the dotted keys given with ``--set``; a problem of one of them is said to be of
        ``--set``, not of the config file."""
        self.problems = problems

        def by_set(problem: str) -> bool:
            key = problem.split(":", 1)[0]
            # the key itself, a value inside it, or a section above it that only --set named (nosuch.key=1)
            return any(key == k or key.startswith((k + ".", k + "[")) or k.startswith(key + ".") for k in overridden)

        from_set = [p for p in problems if by_set(p)]
        from_file = [p for p in problems if not by_set(p)]
        parts = ([f"{source}: " + "; ".join(from_file)] if from_file else []) + [f"--set {p}" for p in from_set]
        super().__init__("; ".join(parts))


class InputError(UsageError):
    """A data file that cannot be used as it is (names the file and, where known, the line)."""


class StageError(MtpruneError):
    """A stage failed while running (exit code 1)."""
