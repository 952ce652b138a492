"""The exceptions te-scheduler raises on purpose; the CLI maps each to an exit code."""

from __future__ import annotations

from enum import IntEnum


class ExitStatus(IntEnum):
    """Every command's exit codes (SPEC section 2), and the shell's code for SIGINT."""

    OK = 0
    FAILED = 1  # a job or check failed
    BAD_USAGE = 2  # bad command line or bad config
    DATABASE = 3  # database unreachable or not migrated
    INTERRUPTED = 130  # 128 + SIGINT, as shells report it


class SchedulerError(Exception):
    """Base class: a problem the user can fix, reported as one line without a traceback."""

    exit_code = ExitStatus.FAILED


class UsageError(SchedulerError):
    """A bad command-line value (a time, a duration, a job name that does not exist)."""

    exit_code = ExitStatus.BAD_USAGE


class ConfigError(SchedulerError):
    """One or more problems in jobs.yaml, each located at FILE:LINE:COL."""

    exit_code = ExitStatus.BAD_USAGE

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

    exit_code = ExitStatus.BAD_USAGE


class DatabaseError(SchedulerError):
    """The history database is unreachable, unwritable or not migrated to head."""

    exit_code = ExitStatus.DATABASE
