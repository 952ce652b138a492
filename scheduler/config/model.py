"""The frozen types of a loaded config; this module imports nothing of te-scheduler's.

Everything else reads these; only :func:`scheduler.config.loader.load` builds them from a file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit


@dataclass(frozen=True)
class Rate:
    """``count`` calls per ``period`` seconds (``24/min`` -> Rate(24, 60.0))."""

    count: int
    period: float

    def __str__(self) -> str:
        return f"{self.count}/{self.period:g}s"


@dataclass(frozen=True)
class NotifyConfig:
    """``notify:`` of a job (or of ``defaults``); every field optional."""

    webhook: str | None = None  # POSTed a Slack-compatible JSON message
    after: int = 3  # consecutive failed firings before the ``failing`` message
    ping_url: str | None = None  # healthchecks.io-style: /start, success, /fail
    timeout: float = 10.0  # seconds per send
    results: bool = False  # a follow-up ending with any agent not ok is a failed firing too

    def problems(self) -> list[tuple[str, str]]:
        """(key, message) for each invalid field, for config.py to locate in the file."""
        found = []
        for key in ("webhook", "ping_url"):
            url = getattr(self, key)
            if url is not None and not _is_http_url(url):
                found.append((key, "must be an http:// or https:// URL"))
        if isinstance(self.after, bool) or not isinstance(self.after, int) or self.after < 1:
            found.append(("after", "must be a whole number of failed firings, 1 or more"))
        if not self.timeout > 0:
            found.append(("timeout", "must be a duration above 0 like 10s"))
        return found


def _is_http_url(url: str) -> bool:
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


RESULT_TYPES = (
    "agent-to-server",
    "agent-to-agent",
    "http-server",
    "page-load",
    "web-transactions",
    "api",
    "ftp-server",
    "dns-server",
    "dns-trace",
    "dnssec",
    "sip-server",
    "voice",
)


@dataclass(frozen=True)
class ResultsConfig:
    """``results:`` of a job (or of ``defaults``): read each accepted run's round back."""

    fetch: bool = True  # false: only the run call is made
    type: str = "auto"  # "auto" (read GET /tests) or one of RESULT_TYPES
    wait: timedelta = timedelta(minutes=5)  # give up waiting for agents' rows after this


DEFAULT_TOKEN_ENV = "THOUSANDEYES_TOKEN"
_DEFAULT_RATE = Rate(24, 60.0)  # 24/min, the default of SPEC section 3


# -- the sections -----------------------------------------------------------------------------


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
    results: ResultsConfig = field(default_factory=ResultsConfig)
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
