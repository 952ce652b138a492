"""jobs.yaml -> a frozen, validated :class:`Config`; every problem located at FILE:LINE:COL.

The public types below are what the rest of te-scheduler reads; ``load()`` is the only way
to build them from a file. The work is split: :mod:`scheduler.yamlsource` reads the file into
values with positions, :mod:`scheduler.schema` checks each section through the
:class:`Checker` here, with the converters of :mod:`scheduler.values` and
:mod:`scheduler.addresses`. ``parse_duration``, ``parse_rate`` and ``parse_when`` are
re-exported for the CLI.
"""

from __future__ import annotations

import gc
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from scheduler.errors import ConfigError, ConfigProblem, TokenError
from scheduler.messages import Key, describe, is_secret, path_text, unknown_key
from scheduler.notify import NotifyConfig
from scheduler.values import Convert, Invalid, Rate, T, parse_duration, parse_rate, parse_when
from scheduler.yamlsource import MAX_PROBLEMS, Doc, Where, read_document

__all__ = ["ApiConfig", "Config", "HistoryConfig", "Job", "MetricsConfig",
           "Rate", "RetryPolicy", "Schedule", "load", "load_token", "parse_duration",
           "parse_rate", "parse_when"]

log = logging.getLogger(__name__)

MAX_TOKEN_BYTES = 64 * 1024
DEFAULT_TOKEN_ENV = "THOUSANDEYES_TOKEN"
_DEFAULT_RATE = Rate(24, 60.0)  # 24/min, the default of SPEC section 3


# -- the public types -----------------------------------------------------------------------------

@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 4  # total HTTP attempts for one firing, the first included
    backoff: float = 2.0  # seconds; attempt n waits up to backoff * 2**(n-1), full jitter
    max_backoff: float = 300.0


@dataclass(frozen=True)
class Schedule:
    """Exactly one of ``cron``, ``every`` or ``at`` is set."""

    timezone: str = "UTC"
    cron: str | None = None  # 5 fields, or an @alias (@daily ...), as written
    every: timedelta | None = None
    start: datetime | None = None  # anchor for ``every`` (aware); None means the Unix epoch
    at: datetime | None = None  # aware

    @property
    def kind(self) -> str:
        return "cron" if self.cron else "every" if self.every else "at"


@dataclass(frozen=True)
class Job:
    name: str
    tests: tuple[str, ...]
    schedule: Schedule
    aid: str | None = None
    enabled: bool = True
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    catch_up: timedelta = timedelta(hours=1)
    spread: timedelta = timedelta(0)
    notify: NotifyConfig = field(default_factory=NotifyConfig)
    line: int = 0  # where the job starts in the file, for log messages


@dataclass(frozen=True)
class ApiConfig:
    base_url: str = "https://api.thousandeyes.com/v7"
    token_env: str | None = "THOUSANDEYES_TOKEN"
    token_file: Path | None = None  # absolute (resolved against the config file's folder)
    timeout: float = 30.0
    concurrency: int = 8
    rate_limit: Rate = _DEFAULT_RATE
    verify_tls: bool = True
    proxy: str | None = None


@dataclass(frozen=True)
class HistoryConfig:
    url: str = "sqlite:///history.db"  # relative sqlite paths already resolved to absolute
    retention: timedelta | None = timedelta(days=90)


@dataclass(frozen=True)
class MetricsConfig:
    listen: tuple[str, int] | None = None  # (host, port)


@dataclass(frozen=True)
class Config:
    path: Path
    api: ApiConfig
    history: HistoryConfig
    metrics: MetricsConfig
    jobs: tuple[Job, ...]

    @property
    def enabled_jobs(self) -> tuple[Job, ...]:
        return tuple(j for j in self.jobs if j.enabled)

    def job(self, name: str) -> Job | None:
        return next((j for j in self.jobs if j.name == name), None)


# -- loading --------------------------------------------------------------------------------------


def load(path: str | Path) -> Config:
    """Read, parse and validate ``path``; raise ConfigError listing every problem found."""
    from scheduler import schema  # it imports this module's types, so not at the top

    file = str(path)
    absolute = Path(os.path.abspath(path))
    with _collector_paused():
        doc = read_document(absolute, file)
        checker = Checker(file, doc)
        config = schema.build_config(checker, absolute, doc.root) if not doc.fatal else None
    if checker.count or config is None:
        raise ConfigError(checker.report())
    log.debug("Loaded %s: %d jobs", file, len(config.jobs))
    return config


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Pause Python's cycle collector while a config is built.

    Loading makes a few objects per value and frees almost none, which is what sets the
    collector off again and again: it scanned every one of them each time and took 40% of
    the time for 50,000 jobs. The values form no cycles, so there is nothing to collect.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def load_token(api: ApiConfig) -> str:
    """The bearer token from ``api.token_file`` or the ``api.token_env`` variable, stripped."""
    if api.token_file is not None:
        source = f"the token file {api.token_file}"
        token = _read_token_file(api.token_file)
    else:
        name = api.token_env or DEFAULT_TOKEN_ENV
        source = f"the environment variable {name}"
        token = os.environ.get(name, "").strip()
        if not token:
            raise TokenError(
                f"no API token: set {source} to your ThousandEyes bearer token "
                "(or point api.token_file at a file holding it)"
            )
    if not token:
        raise TokenError(f"no API token: {source} is empty")
    if not re.fullmatch(r"[\x21-\x7e]+", token):
        raise TokenError(f"the API token in {source} has spaces or non-ASCII characters inside")
    return token


def _read_token_file(path: Path) -> str:
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_TOKEN_BYTES + 1)
    except OSError as exc:
        raise TokenError(
            f"cannot read the token file {path}: {exc.strerror or exc}; "
            "put the token there (or use api.token_env instead)"
        ) from None
    if len(data) > MAX_TOKEN_BYTES:
        raise TokenError(f"the token file {path} is larger than 64 KiB; is it the right file?")
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise TokenError(f"the token file {path} is not UTF-8 text") from None


# -- the checker ----------------------------------------------------------------------------------


class Checker:
    """Collects located problems while sections are read from the document's values."""

    def __init__(self, file: str, doc: Doc) -> None:
        self.file, self.doc = file, doc
        self.problems = [ConfigProblem(file, line, col, path_text(path), message)
                         for (line, col), path, message in doc.problems]
        if doc.empty and not doc.fatal:
            self.problems.append(ConfigProblem(
                file, 1, 1, "", "the file is empty; it needs at least a jobs: list"))
        self.count = len(self.problems) + doc.hidden  # every problem, shown or not

    def report(self) -> list[ConfigProblem]:
        """The problems in file order, the last one saying how many more were left out."""
        shown = sorted(self.problems, key=lambda p: (p.line, p.col))
        if self.count > len(shown):
            last = shown[-1]
            shown.append(ConfigProblem(self.file, last.line, last.col, "", f"and "
                                       f"{self.count - len(shown)} more problems not shown"))
        return shown

    def where(self, path: Key, *, key: bool = False) -> Where:
        """Where the value (or with ``key``, the key) at ``path`` starts."""
        if key and path in self.doc.keys:
            return self.doc.keys[path]
        while path and path not in self.doc.values:
            path = path[:-1]  # a missing key is reported where its mapping starts
        return self.doc.values.get(path, (1, 1))

    def error(self, path: Key, message: str, *, key: bool = False) -> None:
        """Report ``message`` about the value (or key) at ``path``."""
        if path in self.doc.unreadable:
            return  # its value could not be read, which is reported already
        self.count += 1
        if len(self.problems) < MAX_PROBLEMS:
            line, col = self.where(path, key=key)
            self.problems.append(ConfigProblem(self.file, line, col, path_text(path), message))

    def mapping(self, path: Key, value: Any, allowed: tuple[str, ...]) -> dict[str, Any] | None:
        """``value`` if it is a mapping (its unknown keys reported), else None (reported)."""
        if not isinstance(value, dict):
            got = "text" if isinstance(value, str) and is_secret(path) else describe(value)
            self.error(path, f"must be a mapping with keys {', '.join(allowed)}, got {got}")
            return None
        for key in value:
            if key not in allowed:
                self.error((*path, key), unknown_key(key, allowed), key=True)
        return value

    def section(self, data: dict[str, Any], key: str, allowed: tuple[str, ...]) -> dict[str, Any]:
        """A top-level section: a mapping of ``allowed`` keys; null or a wrong value is {}."""
        value = data.get(key)
        return {} if value is None else self.mapping((key,), value, allowed) or {}

    def convert(self, path: Key, value: Any, convert: Convert[T], default: T) -> T:
        """``convert(value)``, or ``default`` with the problem reported at ``path``."""
        try:
            return convert(value)
        except Invalid as exc:
            message = str(exc)
            if not is_secret(path) and not exc.quoted:
                message += f", got {describe(value)}"
            self.error(path, message)
            return default

    def get(self, path: Key, data: dict[str, Any], key: str, convert: Convert[T],
            default: T) -> T:
        """``data[key]`` converted, or ``default`` when the key is absent or invalid."""
        if key not in data:
            return default
        return self.convert((*path, key), data[key], convert, default)
