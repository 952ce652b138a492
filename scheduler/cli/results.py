"""``te-scheduler results``: the agents' results of accepted runs (SPEC 7), and the summaries
that ``history`` shows in its ``results`` column."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import click
from sqlalchemy import Engine

from scheduler import clock
from scheduler.cli.base import (
    State,
    cli,
    emit,
    format_option,
    limit_option,
    pass_state,
    time_option,
)
from scheduler.store import results as store
from scheduler.timing.cron import format_duration

RESULTS_COLUMNS = (
    "id",
    "attempt_id",
    "job",
    "test_id",
    "endpoint",
    "round_id",
    "agent_id",
    "agent_name",
    "date",
    "ok",
    "error",
    "loss",
    "latency_ms",
    "response_code",
    "data",
    "app_link",
)
RESULTS_CSV = tuple(c for c in RESULTS_COLUMNS if c != "data")  # data only in JSON
RESULTS_TABLE = (
    "date",
    "job",
    "test_id",
    "endpoint",
    "agent_name",
    "ok",
    "loss",
    "latency_ms",
    "response_code",
    "error",
)


@cli.command(name="results")
@click.option("--job", help="Only this job.")
@click.option("--test", "test_id", metavar="ID", help="Only this test id.")
@click.option("--since", metavar="T", help="Rounds that started at or after T.")
@click.option("--until", metavar="T", help="Rounds that started before T.")
@limit_option
@format_option
@pass_state
def results_cmd(
    state: State,
    job: str | None,
    test_id: str | None,
    since: str | None,
    until: str | None,
    limit: int,
    fmt: str,
) -> None:
    """Each agent's result of the accepted runs' rounds, newest round first.

    \b
    Examples:
      te-scheduler results --job dns-business-hours --since 24h
      te-scheduler results --test 281 --format json
    """
    now = clock.now()
    since_at = time_option(since, now, "--since") if since else None
    until_at = time_option(until, now, "--until") if until else None
    engine = state.engine()
    rows = store.query(
        engine, job=job, test_id=test_id, since=since_at, until=until_at, limit=limit or None
    )
    if fmt != "json":
        rows = [{k: v for k, v in row.items() if k != "data"} for row in rows]
    emit(rows, fmt, RESULTS_TABLE, RESULTS_COLUMNS if fmt == "json" else RESULTS_CSV)


def summarized(engine: Engine, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``history`` rows with ``results`` as a table cell: ``3/3 ok, 41 ms``, ``none after 5m``."""
    ids = [row["id"] for row in rows if row.get("results")]
    if not ids:
        return rows
    counts = store.summaries(engine, ids)
    ends = store.deadlines(engine, ids)
    out = []
    for row in rows:
        state = row.get("results")
        if state:
            wait = ""
            if row["id"] in ends and row.get("finished_at") is not None:
                sent = row["finished_at"] - timedelta(milliseconds=row.get("duration_ms") or 0)
                span = ends[row["id"]] - sent
                wait = format_duration(timedelta(seconds=round(span.total_seconds())))
            row = {**row, "results": store.summary_text(state, counts.get(row["id"]), wait)}
        out.append(row)
    return out
