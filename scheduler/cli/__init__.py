"""The command line: parse, load the config, make one core call, map errors to exit codes.

This is the only module that prints or exits. Exit codes: 0 success, 1 a job or check
failed, 2 bad usage or bad config, 3 database unreachable or not migrated.
"""

from __future__ import annotations

import difflib
import re
import secrets
import signal
import sys
import threading
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn

import click

from scheduler import __version__, clock
from scheduler import config as config_mod
from scheduler.cli import render
from scheduler.config.model import Config
from scheduler.config.wording import short
from scheduler.errors import ConfigError, DatabaseError, SchedulerError, UsageError
from scheduler.logs import FORMATS as LOG_FORMATS
from scheduler.logs import LEVELS, setup_logging
from scheduler.outcomes import OUTCOMES

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
    "error",
)
STATS_COLUMNS = (
    "job",
    "test_id",
    "firings",
    "success_rate",
    "last_success",
    "last_failure",
    "p50_ms",
    "p95_ms",
    "rate_limited",
    "retries",
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
duration back from now: 15m, 24h, 7d. Exit codes: 0 ok, 1 a job or check failed,
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
            _require_existing_sqlite(url)
        engine = db.make_engine(url)
        if migrate:
            db.upgrade(engine)
        else:
            db.ensure_ready(engine)
        return engine

    def logging(self, default: str = "warning") -> None:
        setup_logging(self.log_level or default, self.log_format)


pass_state = click.make_pass_decorator(State)


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


@cli.command()
@click.option(
    "--simulate",
    is_flag=True,
    help="Start the built-in simulated API on loopback and call it (no token needed).",
)
@click.option(
    "--watch",
    is_flag=True,
    help="Also reload when the config file changes (SIGHUP always reloads).",
)
@pass_state
def run(state: State, simulate: bool, watch: bool) -> None:
    """Run the daemon in the foreground until SIGTERM or SIGINT.

    Applies pending database migrations first. SIGHUP re-reads the config; a bad config
    is logged and the running schedule stays.
    """
    from scheduler.api.simulator import Simulator
    from scheduler.daemon import Daemon, connection_of

    state.logging("info")
    config = state.load()
    simulated = None
    if simulate:
        token = secrets.token_urlsafe(24)
        sim = Simulator(
            token=token,
            instant_limit=config.api.rate_limit.count,
            window=config.api.rate_limit.period,
        ).start()
        simulated = (sim.url, token)
    connection_of(config, simulated)  # fail now (exit 2) when the token cannot be read
    engine = state.engine(config, migrate=True)
    code = Daemon(config, engine, simulated=simulated, watch=watch).run()
    # Stopped and recorded: a late SIGTERM/SIGINT (a supervisor repeating itself) must not turn
    # this clean exit into a kill while the interpreter winds down; Python restores the
    # default handlers then, but leaves an explicit SIG_IGN alone.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(code)


@cli.command()
@pass_state
def validate(state: State) -> None:
    """Check the config; print one line per job, or every error as FILE:LINE:COL."""
    from scheduler.timing.planner import build_plan
    from scheduler.timing.triggers import build_trigger, describe

    config = state.load()
    now = clock.now()
    rows = []
    next_fires: dict[Any, datetime | None] = {}  # by schedule: big files repeat a few of them
    for job in config.jobs:
        if job.enabled and job.schedule not in next_fires:
            next_fires[job.schedule] = build_trigger(job.schedule).get_next_fire_time(None, now)
        rows.append(
            {
                "job": job.name,
                "tests": _short_list(job.tests),
                "schedule": describe(job.schedule),
                "next": next_fires[job.schedule] if job.enabled else "disabled",
            }
        )
    click.echo(render.table(rows, ("job", "tests", "schedule", "next")))
    for warning in build_plan(config, now).warnings:
        click.echo(f"warning: {warning}", err=True)


@cli.command()
@click.option("--from", "start", metavar="T", help="Start (inclusive). Default: now.")
@click.option("--until", metavar="T", help="End (exclusive). Default: 24 h after --from.")
@click.option("--count", type=click.IntRange(1, 1_000_000), help="Stop after N calls.")
@click.option("--job", help="Only this job.")
@click.option(
    "--format", "fmt", type=click.Choice(("table", "json")), default="table", show_default=True
)
@pass_state
def plan(
    state: State, start: str | None, until: str | None, count: int | None, job: str | None, fmt: str
) -> None:
    """Upcoming calls and whether they fit the API's rate limits.

    \b
    Examples:
      te-scheduler plan --count 20
      te-scheduler plan --from 2026-10-24T22:00Z --until 2026-10-25T08:00Z \\
                        --job nightly-path-sweep
    """
    from scheduler.timing.planner import build_plan, format_rate, peak_calls

    if until and count:
        raise UsageError("--until and --count are exclusive; give one")
    config = state.load()
    now = clock.now()
    begin = _when(start, now, "--from") if start else now
    end = _when(until, now, "--until") if until else None
    if job:
        _require_job(config, job)
    result = build_plan(config, begin, until=end, count=count, job=job)
    if fmt == "json":
        click.echo(render.json_text(result.to_json()))
        return
    rows = [
        {
            "job": c.job,
            "test": c.test_id,
            "local": render.local_time(c.at, c.timezone),
            "utc": c.at,
            "slot": c.scheduled_for,
        }
        for c in result.calls
    ]
    click.echo(render.table(rows, ("job", "test", "local", "utc", "slot")))
    budget = config.api.rate_limit
    peak, at = peak_calls([c.at for c in result.calls], budget.period)
    if peak:
        click.echo(
            f"peak: {peak} call(s) in one {format_rate(budget).split('/')[1]} window "
            f"(from {render.cell(at)}); budget {format_rate(budget)}"
        )
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)


@cli.command()
@click.argument("job_name", metavar="JOB")
@click.option("--test", "test_id", metavar="ID", help="Only this test of the job.")
@pass_state
def trigger(state: State, job_name: str, test_id: str | None) -> None:
    """Run one job now, as the daemon would (limits, retries, history, trigger=manual).

    Exit 0 when every test was accepted, 1 otherwise.
    """
    from scheduler.api.client import Caller
    from scheduler.api.limiter import Limiter
    from scheduler.runner import Firing, Runner

    state.logging()
    config = state.load()
    job = _require_job(config, job_name)
    tests = job.tests
    if test_id:
        if test_id not in job.tests:
            raise UsageError(
                f"job {job.name!r} has no test {test_id!r}; it has {', '.join(job.tests)}"
            )
        tests = (test_id,)
    token = config_mod.load_token(config.api)
    from scheduler.logs import add_secret

    add_secret(token)
    engine = state.engine(config, migrate=True)
    stop = threading.Event()
    caller = Caller(config.api, token)
    runner = Runner(
        engine,
        caller.send,
        Limiter(config.api.rate_limit, stop),
        stop,
        concurrency=config.api.concurrency,
    )
    now = clock.now()
    outcomes: dict[str, str] = {}

    def fire(test: str) -> None:
        outcomes[test] = runner.fire(Firing(job, test, now, "manual"))

    threads = [threading.Thread(target=fire, args=(t,)) for t in tests]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    failed = {t: o for t, o in outcomes.items() if o != "success"}
    for test, outcome in failed.items():
        click.echo(f"te-scheduler: job {job.name!r} test {test}: {outcome}", err=True)
    sys.exit(1 if failed or len(outcomes) != len(tests) else 0)


@cli.command(name="history")
@click.option("--job", help="Only this job.")
@click.option("--test", "test_id", metavar="ID", help="Only this test id.")
@click.option("--since", metavar="T", help="Started at or after T.")
@click.option("--until", metavar="T", help="Started before T.")
@click.option("--outcome", type=click.Choice(OUTCOMES), help="Only this outcome.")
@click.option(
    "--limit",
    type=click.IntRange(0, 10**9),
    default=100,
    show_default=True,
    help="At most N rows; 0 for all.",
)
@click.option(
    "--format", "fmt", type=click.Choice(render.FORMATS), default="table", show_default=True
)
@pass_state
def history_cmd(
    state: State,
    job: str | None,
    test_id: str | None,
    since: str | None,
    until: str | None,
    outcome: str | None,
    limit: int,
    fmt: str,
) -> None:
    """Attempts, newest first.

    \b
    Examples:
      te-scheduler history --job dns-business-hours --since 7d
      te-scheduler history --outcome rate_limited --format csv > 429s.csv
    """
    from scheduler.store import history

    now = clock.now()
    since_at = _when(since, now, "--since") if since else None
    until_at = _when(until, now, "--until") if until else None
    engine = state.engine()
    rows = history.query(
        engine,
        job=job,
        test_id=test_id,
        since=since_at,
        until=until_at,
        outcome=outcome,
        limit=limit or None,
    )
    _emit(rows, fmt, HISTORY_TABLE, HISTORY_COLUMNS)


@cli.command()
@click.option(
    "--since",
    metavar="T",
    default="30d",
    show_default=True,
    help="Only attempts started at or after T.",
)
@click.option(
    "--format", "fmt", type=click.Choice(render.FORMATS), default="table", show_default=True
)
@pass_state
def stats(state: State, since: str, fmt: str) -> None:
    """Per job and test: firings, success rate, last success and failure, p50/p95 duration."""
    from scheduler.store import history

    since_at = _when(since, clock.now(), "--since")
    engine = state.engine()
    rows = history.stats(engine, since=since_at)
    _emit(rows, fmt, STATS_COLUMNS, STATS_COLUMNS)


STATUS_COLUMNS = (
    "instance",
    "state",
    "version",
    "started_at",
    "heartbeat_at",
    "last_attempt_at",
    "attempts_last_hour",
    "pending",
)


@cli.command()
@click.option(
    "--format", "fmt", type=click.Choice(("table", "json")), default="table", show_default=True
)
@pass_state
def status(state: State, fmt: str) -> None:
    """Daemons sharing the history database: alive or not, last heartbeat, what they ran.

    An instance is `stale` when it has not sent a heartbeat for 30 s (three heartbeats; its
    pending calls are then marked interrupted by a survivor) and `stopped` after a clean
    shutdown.
    """
    from scheduler.store import instances

    engine = state.engine()
    rows = instances.status(engine, clock.now(), instances.stale_after())
    _emit(rows, fmt, STATUS_COLUMNS, tuple(rows[0]) if rows else STATUS_COLUMNS)


@cli.group(name="db")
def db_group() -> None:
    """Alembic migrations of the history database."""


@db_group.command()
@pass_state
def upgrade(state: State) -> None:
    """Migrate the history database to the newest schema (creates it if missing)."""
    from scheduler.store import db

    engine = db.make_engine(state.database_url())
    db.upgrade(engine)


@db_group.command()
@pass_state
def current(state: State) -> None:
    """Print the database's schema revision (and whether it is the newest)."""
    from scheduler.store import db

    url = state.database_url()
    _require_existing_sqlite(url)
    engine = db.make_engine(url)
    revision = db.current(engine)
    marker = "(head)" if revision == db.head() else f"(head is {db.head()})"
    click.echo(f"{revision or 'empty'} {marker}")


@db_group.command()
@click.argument("revision")
@pass_state
def downgrade(state: State, revision: str) -> None:
    """Migrate the history database down to REVISION ('base' removes every table).

    REVISION is a revision id (see `te-scheduler db current`), `base`, or `-N` for N steps
    down (after `--`: `te-scheduler db downgrade -- -1`).
    """
    from scheduler.store import db

    scripts = _migration_scripts()
    chain = [script.revision for script in scripts.walk_revisions()]  # newest first, one line
    target = _downgrade_target(scripts, revision, chain)  # exit 2 before any database work
    url = state.database_url()
    _require_existing_sqlite(url)
    engine = db.make_engine(url)
    _require_below(revision, target, db.current(engine), chain)
    db.downgrade(engine, revision)


@cli.command()
@click.option(
    "--older-than",
    "older_than",
    required=True,
    metavar="DURATION",
    help="Delete attempts that started longer ago than this (90d, 12w).",
)
@click.option("--dry-run", is_flag=True, help="Only say how many rows would be deleted.")
@pass_state
def prune(state: State, older_than: str, dry_run: bool) -> None:
    """Delete old attempts (the daemon also does this daily from history.retention)."""
    from scheduler.store import history

    age = _duration(older_than, "--older-than")
    engine = state.engine()
    count = history.prune(engine, before=clock.now() - age, dry_run=dry_run)
    click.echo(f"{count} row(s) {'would be ' if dry_run else ''}deleted")


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@click.option("--token", help="Accept only this bearer token (default: any).")
@click.option("--org-limit", type=click.IntRange(min=1), default=240, show_default=True)
@click.option("--instant-limit", type=click.IntRange(min=1), default=24, show_default=True)
@click.option(
    "--window",
    type=click.FloatRange(min=0.1),
    default=60.0,
    show_default=True,
    help="Seconds per rate-limit window.",
)
@click.option(
    "--fail-rate",
    type=click.FloatRange(0, 1),
    default=0.0,
    show_default=True,
    help="Fraction of calls answered 500/502.",
)
@click.option(
    "--latency",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Seconds before each answer.",
)
def simulate(
    host: str,
    port: int,
    token: str | None,
    org_limit: int,
    instant_limit: int,
    window: float,
    fail_rate: float,
    latency: float,
) -> None:
    """Serve the simulated ThousandEyes API (POST /v7/tests/{id}/run) until Ctrl-C.

    \b
    Example:
      te-scheduler simulate --port 8080 --instant-limit 5 --window 4
      # then in jobs.yaml: api: {base_url: http://127.0.0.1:8080/v7}
    """
    from scheduler.api.simulator import Simulator

    sim = Simulator(
        host=host,
        port=port,
        token=token,
        org_limit=org_limit,
        instant_limit=instant_limit,
        window=window,
        fail_rate=fail_rate,
        latency=latency,
    ).start()  # UsageError when the port is taken
    click.echo(f"Simulated ThousandEyes API at {sim.url} (Ctrl-C stops)", err=True)
    try:
        sim.serve_forever()
    finally:
        sim.stop()


# -- helpers ---------------------------------------------------------------------------
def _emit(
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


def _require_existing_sqlite(url: str) -> None:
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


def _migration_scripts() -> Any:
    """Alembic's ScriptDirectory of te-scheduler's migrations."""
    from alembic.script import ScriptDirectory

    from scheduler.store import db

    return ScriptDirectory.from_config(db.alembic_config())


def _downgrade_target(scripts: Any, revision: str, chain: list[str]) -> str | None:
    """The revision id REVISION names (None for base, or for -N until the database is read).

    Alembic would say the same after connecting and then fail as a database error (exit 3);
    a revision that does not exist is a bad argument (exit 2).
    """
    if revision == "base" or re.fullmatch(r"-[1-9][0-9]{0,5}", revision):
        return None
    try:
        found = scripts.get_revision(revision) if revision else None
    except Exception:  # CommandError, RevisionError, even AssertionError for "@": all "no such"
        found = None
    if found is None or found.revision not in chain:
        raise UsageError(
            f"unknown revision {short(revision, 40)}; known: base, "
            f"{', '.join(reversed(chain))} (or -N for N steps down)"
        )
    return str(found.revision)


def _require_below(revision: str, target: str | None, at: str | None, chain: list[str]) -> None:
    """Refuse a downgrade REVISION that is not at or below the database's revision ``at``.

    A database at a revision these scripts do not know is left to Alembic (exit 3).
    """
    if at is not None and at not in chain:
        return
    below = chain[chain.index(at) :] if at is not None else []  # ``at`` and what lies under it
    if revision.startswith("-"):
        if int(revision[1:]) > len(below):
            raise UsageError(
                f"cannot go {revision[1:]} step(s) down: the database is at "
                f"{at or 'base'}, {len(below)} step(s) above base"
            )
    elif target is not None and target not in below:
        raise UsageError(
            f"the database is at {at or 'base'}, below {target}; downgrade only "
            "goes down (`te-scheduler db upgrade` goes up)"
        )


def _short_list(items: tuple[str, ...], most: int = 4) -> str:
    if len(items) <= most:
        return ",".join(items)
    return f"{','.join(items[: most - 1])},... ({len(items)} tests)"


def _when(text: str, now: datetime, option: str) -> datetime:
    try:
        return config_mod.parse_when(text, now)
    except ValueError as exc:
        raise UsageError(f"{option}: {exc}") from None


def _duration(text: str, option: str) -> timedelta:
    try:
        return config_mod.parse_duration(text)
    except ValueError as exc:
        raise UsageError(f"{option}: {exc}") from None


def _require_job(config: Config, name: str) -> Any:
    job = config.job(name)
    if job is None:
        names = [j.name for j in config.jobs]
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; jobs: {', '.join(names)}"
        raise UsageError(f"no job named {name!r} in {config.path}{hint}")
    return job


def _fail(error: SchedulerError) -> NoReturn:
    if isinstance(error, ConfigError):
        for problem in error.problems:
            click.echo(str(problem), err=True)
    else:
        click.echo(f"te-scheduler: error: {error}", err=True)
    sys.exit(error.exit_code)


def main() -> None:
    """Console entry point: run the CLI and turn known errors into one line and an exit code."""
    try:
        cli.main(prog_name="te-scheduler", standalone_mode=False)
    except SchedulerError as error:
        _fail(error)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.UsageError as error:
        command = error.ctx.command_path if error.ctx else "te-scheduler"
        click.echo(
            f"te-scheduler: error: {error.format_message()} (see `{command} --help`)", err=True
        )
        sys.exit(error.exit_code)
    except click.ClickException as error:
        click.echo(f"te-scheduler: error: {error.format_message()}", err=True)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)
    except Exception as error:  # a bug: one line, unless the user asked for the traceback
        if "--debug" in sys.argv:
            raise
        click.echo(
            f"te-scheduler: internal error: {error!r} (rerun with --debug for the "
            "traceback, and please report it)",
            err=True,
        )
        sys.exit(1)
