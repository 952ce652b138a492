"""The exceptions te-scheduler raises on purpose; the CLI maps each to an exit code."""

from __future__ import annotations


class SchedulerError(Exception):
    """Base class: a problem the user can fix, reported as one line without a traceback."""

    exit_code = 1


class UsageError(SchedulerError):
    """A bad command-line value (a time, a duration, a job name that does not exist)."""

    exit_code = 2


class ConfigError(SchedulerError):
    """One or more problems in jobs.yaml, each located at FILE:LINE:COL."""

    exit_code = 2

    def __init__(self, problems: list[ConfigProblem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class ConfigProblem:
    """One located problem: ``FILE:LINE:COL: path.to.key: message``."""

    def __init__(self, file: str, line: int, col: int, path: str, message: str) -> None:
        self.file, self.line, self.col, self.path, self.message = file, line, col, path, message

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        return f"{self.file}:{self.line}:{self.col}: {where}{self.message}"

    def __repr__(self) -> str:
        return f"ConfigProblem({str(self)!r})"


class TokenError(SchedulerError):
    """The API token could not be read (unset variable, unreadable file)."""

    exit_code = 2


class DatabaseError(SchedulerError):
    """The history database is unreachable, unwritable or not migrated to head."""

    exit_code = 3
