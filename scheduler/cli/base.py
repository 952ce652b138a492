"""The command group, its global options and the state every command reads; shared helpers."""

from __future__ import annotations

import difflib
import sys
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn

import click

from scheduler import __version__
from scheduler import config as config_mod
from scheduler.cli import render
from scheduler.config.model import Config
from scheduler.errors import ConfigError, DatabaseError, SchedulerError, UsageError
from scheduler.logs import FORMATS as LOG_FORMATS
from scheduler.logs import LEVELS, setup_logging

HISTORY_COLUMNS = (
    "id",
    "run_id",
    "job",
    "test_id",
    "aid",
    "trigger",
    "scheduled_for",
    "attempt",
    "started_at",
    "finished_at",
    "status_code",
    "outcome",
    "error",
    "duration_ms",
    "instance",
    "results",
)
HISTORY_TABLE = (
    "started_at",
    "job",
    "test_id",
    "trigger",
    "attempt",
    "status_code",
    "outcome",
    "duration_ms",
    "results",
    "error",
)
STATS_COLUMNS = (  # every format shows these, in this order (and any the store adds, after)
    "job",
    "test_id",
    "firings",
    "attempts",
    "successes",
    "success_rate",
    "last_success",
    "last_failure",
    "p50_ms",
    "p95_ms",
    "rate_limited",
    "retries",
    "agents_ok_rate",
    "latency_p50_ms",
    "latency_p95_ms",
    "last_error",
)

EPILOG = """\b
Examples:
  te-scheduler validate                     check ./jobs.yaml
  te-scheduler plan --count 10              the next ten calls
  te-scheduler run --simulate               the daemon against a built-in fake API
  THOUSANDEYES_TOKEN=... te-scheduler run   the daemon for real
  te-scheduler history --since 24h --outcome http_error
  te-scheduler trigger dns-business-hours   run one job now

Times (--since, --until, --from) are ISO-8601 (UTC unless an offset is given) or a
duration back from now: 15m, 24h, 7d (plan looks ahead: there a duration counts
forward). Exit codes: 0 ok, 1 a job or check failed,
2 bad usage or config, 3 database unreachable or not migrated.
"""


class State:
    """What the global options say, handed to every command."""

    def __init__(
        self, config: str, db_url: str | None, log_level: str | None, log_format: str, debug: bool
    ) -> None:
        self.config_path = Path(config)
        self.db_url = db_url
        self.log_level = log_level
        self.log_format = log_format
        self.debug = debug

    def load(self) -> Config:
        """The validated config, with ``--db`` applied."""
        loaded = config_mod.load(self.config_path)
        if self.db_url:
            loaded = replace(loaded, history=replace(loaded.history, url=self.db_url))
        return loaded

    def database_url(self) -> str:
        """``--db`` when given (then jobs.yaml is not needed at all), else ``history.url``."""
        return self.db_url or self.load().history.url

    def engine(self, config: Config | None = None, *, migrate: bool = False) -> Any:
        """The history database, migrated (``migrate``) or checked to exist and be at head.

        Commands that only read never create a database: a mistyped path gets an error
        naming it, not a new empty file and advice to migrate it.
        """
        from scheduler.store import db

        url = config.history.url if config else self.database_url()
        if not migrate:
            require_existing_sqlite(url)
        engine = db.make_engine(url)
        if migrate:
            db.upgrade(engine)
        else:
            db.ensure_ready(engine)
        return engine

    def logging(self, default: str = "warning") -> None:
        setup_logging(self.log_level or default, self.log_format)


pass_state = click.make_pass_decorator(State)

# Options several listing commands share, spelled once.
limit_option = click.option(
    "--limit",
    type=click.IntRange(0, 10**9),
    default=100,
    show_default=True,
    help="At most N rows; 0 for all.",
)
format_option = click.option(
    "--format", "fmt", type=click.Choice(render.FORMATS), default="table", show_default=True
)


@click.group(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "-c",
    "--config",
    default="jobs.yaml",
    show_default=True,
    envvar="TE_SCHEDULER_CONFIG",
    help="The jobs file. Env: TE_SCHEDULER_CONFIG.",
)
@click.option(
    "--db",
    "db_url",
    envvar="TE_SCHEDULER_DB",
    metavar="URL",
    help="SQLAlchemy URL of the history database; overrides history.url. Env: TE_SCHEDULER_DB.",
)
@click.option(
    "--log-level",
    type=click.Choice(LEVELS),
    default=None,
    help="Default: info for run, warning otherwise.",
)
@click.option(
    "--log-format",
    type=click.Choice(LOG_FORMATS),
    default="text",
    show_default=True,
    help="json: one object per line.",
)
@click.option("--debug", is_flag=True, hidden=True, help="Show tracebacks.")
@click.version_option(__version__, prog_name="te-scheduler")
@click.pass_context
def cli(
    ctx: click.Context,
    config: str,
    db_url: str | None,
    log_level: str | None,
    log_format: str,
    debug: bool,
) -> None:
    """Rerun ThousandEyes instant tests on your own schedules.

    Jobs live in a YAML file (see `te-scheduler validate`); every HTTP attempt is recorded
    in the `attempts` table of the history database.
    """
    ctx.obj = State(config, db_url, log_level, log_format, debug)


def emit(
    rows: list[dict[str, Any]],
    fmt: str,
    table_columns: tuple[str, ...],
    all_columns: tuple[str, ...],
) -> None:
    if fmt == "json":
        click.echo(render.json_text(rows))
    elif fmt == "csv":
        click.echo(render.csv_text(rows, all_columns))
    else:
        click.echo(render.table(rows, table_columns))


def require_existing_sqlite(url: str) -> None:
    """Refuse a SQLite URL whose file does not exist (reading must not create it)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        return  # make_engine reports a malformed URL
    path = parsed.database
    if parsed.get_backend_name() == "sqlite" and path and path != ":memory:":
        if not Path(path).exists():
            raise DatabaseError(
                f"no history database at {path} (check --db, TE_SCHEDULER_DB or history.url; "
                "`te-scheduler db upgrade` creates it)"
            )


def short_list(items: tuple[str, ...], most: int = 4) -> str:
    if len(items) <= most:
        return ",".join(items)
    return f"{','.join(items[: most - 1])},... ({len(items)} tests)"


def time_option(text: str, now: datetime, option: str) -> datetime:
    try:
        return config_mod.parse_when(text, now)
    except ValueError as exc:
        raise UsageError(f"{option}: {exc}") from None


def ahead_option(text: str, base: datetime, option: str) -> datetime:
    """For commands that look ahead (plan): a duration counts forward from ``base``."""
    try:
        return base + config_mod.parse_duration(text)
    except ValueError:
        pass  # not a duration: an ISO time, read as everywhere else
    except OverflowError:
        raise UsageError(f"{option}: {text!r} reaches past the year 9999") from None
    try:
        return config_mod.parse_when(text, base)
    except ValueError:
        raise UsageError(
            f"{option}: {text!r} is not a time: use an ISO-8601 time like "
            "2026-01-31T08:00:00Z or a duration ahead like 2h, 7d"
        ) from None


def duration_option(text: str, option: str) -> timedelta:
    try:
        return config_mod.parse_duration(text)
    except ValueError as exc:
        raise UsageError(f"{option}: {exc}") from None


def require_job(config: Config, name: str) -> Any:
    job = config.job(name)
    if job is None:
        names = [j.name for j in config.jobs]
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; jobs: {', '.join(names)}"
        raise UsageError(f"no job named {name!r} in {config.path}{hint}")
    return job


def fail(error: SchedulerError) -> NoReturn:
    if isinstance(error, ConfigError):
        for problem in error.problems:
            click.echo(str(problem), err=True)
    else:
        click.echo(f"te-scheduler: error: {error}", err=True)
    sys.exit(error.exit_code)
