"""The commands: run, validate, plan, trigger, history, stats, status, prune, simulate."""

from __future__ import annotations

import secrets
import signal
import sys
import threading
from datetime import datetime
from typing import Any

import click

from scheduler import clock
from scheduler import config as config_mod
from scheduler.cli import checks, render
from scheduler.cli.base import (
    HISTORY_COLUMNS,
    HISTORY_TABLE,
    STATS_COLUMNS,
    State,
    ahead_option,
    cli,
    duration_option,
    emit,
    format_option,
    limit_option,
    pass_state,
    require_job,
    short_list,
    time_option,
)
from scheduler.errors import ExitStatus, UsageError
from scheduler.outcomes import OUTCOMES, FiringEnd, Outcome, Trigger


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
@click.option(
    "--online",
    is_flag=True,
    help="Also ask the API (one GET /tests per aid) whether it accepts the token.",
)
@pass_state
def validate(state: State, online: bool) -> None:
    """Check the config and that the token can be read; print one line per job.

    Errors go to stderr as FILE:LINE:COL (exit 2); an unreadable token is exit 2 too.
    --online makes one cheap read per aid: a refused token is exit 2, an API that cannot
    be reached exit 1.
    """
    from scheduler.timing.planner import build_plan
    from scheduler.timing.triggers import build_trigger, describe

    config = state.load()
    token = config_mod.load_token(config.api)
    now = clock.now()
    rows = []
    next_fires: dict[Any, datetime | None] = {}  # by schedule: big files repeat a few of them
    for job in config.jobs:
        if job.enabled and job.schedule not in next_fires:
            next_fires[job.schedule] = build_trigger(job.schedule).get_next_fire_time(None, now)
        rows.append(
            {
                "job": job.name,
                "tests": short_list(job.tests),
                "schedule": describe(job.schedule),
                "next": next_fires[job.schedule] if job.enabled else "disabled",
            }
        )
    click.echo(render.table(rows, ("job", "tests", "schedule", "next")))
    for warning in checks.past_at_warnings(config, now) + build_plan(config, now).warnings:
        click.echo(f"warning: {warning}", err=True)
    if online:
        click.echo(checks.check_online(config, token), err=True)


@cli.command()
@click.option(
    "--from", "start", metavar="T", help="Start (inclusive): ISO time, or a duration ahead of now."
)
@click.option(
    "--until",
    metavar="T",
    help="End (exclusive): ISO time, or a duration ahead of --from. Default: 24h.",
)
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

    Times are ISO-8601 (UTC unless an offset is given) or, as plan looks ahead, a duration
    counted forward: --from 1h starts an hour from now, --until 2h ends two hours after
    --from (or now). The peak and any warnings go to stderr, the table to stdout.

    \b
    Examples:
      te-scheduler plan --count 20
      te-scheduler plan --until 2h
      te-scheduler plan --from 2026-10-24T22:00Z --until 2026-10-25T08:00Z \\
                        --job nightly-path-sweep
    """
    from scheduler.timing.planner import build_plan, format_rate, peak_calls

    if until and count:
        raise UsageError("--until and --count are exclusive; give one")
    config = state.load()
    now = clock.now()
    begin = ahead_option(start, now, "--from") if start else now
    end = ahead_option(until, begin, "--until") if until else None
    if job:
        require_job(config, job)
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
            f"(from {render.cell(at)}); budget {format_rate(budget)}",
            err=True,
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
    from scheduler.logs import add_secret
    from scheduler.runner import Firing, build_runner

    state.logging()
    config = state.load()
    job = require_job(config, job_name)
    if not job.enabled:  # asked for by name: run it, but a surprise must not pass unsaid
        click.echo(
            f"te-scheduler: note: job {job.name!r} is disabled (enabled: false); "
            "running it anyway, as asked",
            err=True,
        )
    tests = job.tests
    if test_id:
        if test_id not in job.tests:
            raise UsageError(
                f"job {job.name!r} has no test {test_id!r}; it has {', '.join(job.tests)}"
            )
        tests = (test_id,)
    token = config_mod.load_token(config.api)
    add_secret(token)
    engine = state.engine(config, migrate=True)
    runner = build_runner(engine, config.api, token, threading.Event())
    now = clock.now()
    outcomes: dict[str, FiringEnd] = {}

    def fire(test: str) -> None:
        outcomes[test] = runner.fire(Firing(job, test, now, Trigger.MANUAL))

    threads = [threading.Thread(target=fire, args=(t,)) for t in tests]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    failed = {t: o for t, o in outcomes.items() if o is not Outcome.SUCCESS}
    for test, outcome in failed.items():
        click.echo(f"te-scheduler: job {job.name!r} test {test}: {outcome}", err=True)
    sys.exit(ExitStatus.FAILED if failed or len(outcomes) != len(tests) else ExitStatus.OK)


@cli.command(name="history")
@click.option("--job", help="Only this job.")
@click.option("--test", "test_id", metavar="ID", help="Only this test id.")
@click.option("--since", metavar="T", help="Started at or after T.")
@click.option("--until", metavar="T", help="Started before T.")
@click.option("--outcome", type=click.Choice(OUTCOMES), help="Only this outcome.")
@limit_option
@format_option
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
    since_at = time_option(since, now, "--since") if since else None
    until_at = time_option(until, now, "--until") if until else None
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
    if fmt == "table":  # results: the follow-up's summary instead of its bare state
        from scheduler.cli.results import summarized

        rows = summarized(engine, rows)
    emit(rows, fmt, HISTORY_TABLE, HISTORY_COLUMNS)
    if job is not None and not rows:
        note = checks.unknown_job_note(state, engine, job)
        if note:
            click.echo(f"te-scheduler: note: {note}", err=True)


@cli.command()
@click.option(
    "--since",
    metavar="T",
    default="30d",
    show_default=True,
    help="Only attempts started at or after T.",
)
@format_option
@pass_state
def stats(state: State, since: str, fmt: str) -> None:
    """Per job and test: firings, success rate, last success and failure, p50/p95 duration,
    and of the runs' results the agents ok and their latency p50/p95."""
    from scheduler.store import history

    since_at = time_option(since, clock.now(), "--since")
    engine = state.engine()
    rows = history.stats(engine, since=since_at)
    # One set of columns for every format: the contract's, then any the store adds.
    extra = [k for k in (rows[0] if rows else {}) if k not in STATS_COLUMNS]
    columns = (*STATS_COLUMNS, *extra)
    rows = render.with_columns(rows, columns)
    if fmt != "json":  # table and CSV print numbers alike (JSON keeps them numbers)
        rows = [{k: render.number(v) for k, v in row.items()} for row in rows]
    emit(rows, fmt, columns, columns)


STATUS_COLUMNS = (
    "instance",
    "state",
    "version",
    "started_at",
    "heartbeat_at",
    "last_attempt_at",
    "attempts_last_hour",
    "pending",
    "last_clock_jump",
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
    emit(rows, fmt, STATUS_COLUMNS, tuple(rows[0]) if rows else STATUS_COLUMNS)


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

    age = duration_option(older_than, "--older-than")
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
@click.option(
    "--agents",
    type=click.IntRange(min=0),
    default=3,
    show_default=True,
    help="Agents in each accepted run's round.",
)
@click.option(
    "--results-delay",
    type=click.FloatRange(min=0),
    default=5.0,
    show_default=True,
    help="Seconds before a round's results can be read.",
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
    agents: int,
    results_delay: float,
) -> None:
    """Serve the simulated ThousandEyes API (POST /v7/tests/{id}/run) until Ctrl-C.

    Also GET /v7/tests and GET /v7/test-results/{id}/{endpoint}: each accepted run makes a
    round of --agents results, readable after --results-delay seconds.

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
        agents=agents,
        results_delay=results_delay,
    ).start()  # UsageError when the port is taken
    click.echo(f"Simulated ThousandEyes API at {sim.url} (Ctrl-C stops)", err=True)
    try:
        sim.serve_forever()
    finally:
        sim.stop()


# -- helpers ---------------------------------------------------------------------------
