"""Read-only queries for the status page (SPEC.md section 8): each one index lookups, no scans.

Every figure a page shows is bounded by the page, never by the history: the job list is paged,
each job's last firings are an index range on ``(job, started_at)`` read newest first with a
limit, its 24 h / 7 d success rates one grouped range on the same index for the page's jobs,
and the header's 24 h counts are index-only ranges (see :func:`header`). The ``results``
table (SPEC section 7) is optional: the functions that read it answer empty without it.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Engine

from scheduler.store.db import translate_errors
from scheduler.store.tables import attempts, instances, rate_limits

log = logging.getLogger(__name__)

STRIP = 20  # firings in a job's strip of marks
# Rows read to find the last STRIP firings: most firings are one attempt, so a few more rows
# than marks usually do; a job that retries a lot is read again with room for four each.
_STRIP_ROWS, _STRIP_ROWS_RETRYING = STRIP + 5, STRIP * 4
_STALE_AFTER = timedelta(seconds=30)  # as scheduler.store.instances: three missed heartbeats
_RECHECK_MISSING = 60.0  # seconds before asking again whether the results table exists
DAY, WEEK = timedelta(days=1), timedelta(days=7)


@dataclass(frozen=True)
class Mark:
    """One firing in a strip: its final attempt's outcome and when it started."""

    outcome: str
    status_code: int | None
    started_at: datetime
    scheduled_for: datetime
    test_id: str


@dataclass(frozen=True)
class LastFiring:
    """A job's latest firing: its final (newest) attempt."""

    id: int
    test_id: str
    outcome: str
    status_code: int | None
    started_at: datetime
    error: str | None


@dataclass(frozen=True)
class Rates:
    """Success rate of decided firings since 24 h and 7 d ago; None when there were none."""

    day: float | None = None
    week: float | None = None
    firings_day: int = 0
    firings_week: int = 0


@dataclass(frozen=True)
class JobActivity:
    """What the overview shows of one job's history."""

    last: LastFiring | None
    strip: list[Mark]
    rates: Rates


@dataclass(frozen=True)
class Header:
    """The overview's header: instances alive, 24 h counts, rate limits (None: unknown)."""

    instances_alive: int
    attempts_day: int
    rate_limited_day: int
    rate_limits: dict[str, int | None] | None = None


@dataclass(frozen=True)
class AgentResult:
    """One agent's row of a run's round (SPEC section 7, table ``results``)."""

    attempt_id: int
    agent_name: str | None
    ok: bool | None
    error: str | None
    loss: float | None
    latency_ms: float | None
    response_code: int | None
    app_link: str | None


@dataclass(frozen=True)
class ResultSummary:
    """Agents ok out of all, and the headline figure (median latency, else worst loss)."""

    ok: int
    total: int
    headline: str | None = None


@dataclass
class _Schema:
    has_results: bool = False
    checked_at: float = field(default=-1e18)
    attempt_columns: frozenset[str] = frozenset()


_schemas: weakref.WeakKeyDictionary[Engine, _Schema] = weakref.WeakKeyDictionary()
_schema_lock = threading.Lock()


def header(engine: Engine, now: datetime) -> Header:
    """Instances alive, attempts and 429s started in the 24 h before ``now``.

    Attempts are counted on ``ix_attempts_started_at`` alone. The 429s are the rows of outcome
    ``rate_limited`` (the outcome of a 429) from the first row of the window on: ids grow
    with inserts and a row is inserted when its call starts, so ``id >= first id`` is the
    window, and ``(outcome, id)`` is ``ix_attempts_outcome`` itself (an index-only count
    instead of a table read per row of the day).
    """
    a, i = attempts.c, instances.c
    since = now - DAY
    alive = sa.select(sa.func.count()).where(
        i.stopped_at.is_(None), i.heartbeat_at >= now - _STALE_AFTER
    )
    with translate_errors(engine, "reading the status"), engine.connect() as conn:
        first_id = conn.scalar(
            sa.select(a.id).where(a.started_at >= since).order_by(a.started_at).limit(1)
        )
        day = conn.scalar(sa.select(sa.func.count()).where(a.started_at >= since)) or 0
        limited: int | None = 0
        if first_id is not None:
            limited = conn.scalar(
                sa.select(sa.func.count()).where(a.outcome == "rate_limited", a.id >= first_id)
            )
        return Header(int(conn.scalar(alive) or 0), int(day), int(limited or 0))


def stored_rate_limits(engine: Engine, now: datetime) -> dict[str, int | None] | None:
    """Remaining calls per bucket as the daemons last shared them (table ``rate_limits``).

    A bucket whose window has closed is None (unknown now); None when no row exists. Several
    tokens sharing the database: the lowest remaining of a bucket is shown.
    """
    c = rate_limits.c
    with translate_errors(engine, "reading rate limits"), engine.connect() as conn:
        rows = conn.execute(sa.select(c.bucket, c.remaining, c.reset)).all()
    if not rows:
        return None
    at = now.timestamp()
    view: dict[str, int | None] = {}
    for row in rows:
        current = row.remaining if row.reset is not None and row.reset > at else None
        known = view.get(row.bucket)
        if row.bucket not in view or (current is not None and (known is None or current < known)):
            view[row.bucket] = current
    return dict(sorted(view.items()))


def activity(engine: Engine, jobs: Sequence[str], now: datetime) -> dict[str, JobActivity]:
    """Last firing, strip of the last STRIP firings and success rates of each of ``jobs``."""
    rates = _rates(engine, jobs, now)
    result = {}
    stmt = _recent_rows()
    with translate_errors(engine, "reading the status"), engine.connect() as conn:
        for job in jobs:
            rows = conn.execute(stmt, {"job": job, "rows": _STRIP_ROWS}).all()
            strip = _firings(rows)
            if len(strip) < STRIP and len(rows) == _STRIP_ROWS:
                rows = conn.execute(stmt, {"job": job, "rows": _STRIP_ROWS_RETRYING}).all()
                strip = _firings(rows)
            last = rows[0] if rows else None
            result[job] = JobActivity(
                LastFiring(
                    last.id,
                    last.test_id,
                    last.outcome,
                    last.status_code,
                    last.started_at,
                    last.error,
                )
                if last is not None
                else None,
                strip,
                rates.get(job, Rates()),
            )
    return result


def _recent_rows() -> Any:
    c = attempts.c
    return (
        sa.select(
            c.id,
            c.test_id,
            c.scheduled_for,
            c.attempt,
            c.outcome,
            c.status_code,
            c.started_at,
            c.error,
        )
        .where(c.job == sa.bindparam("job"))
        .order_by(c.started_at.desc(), c.id.desc())
        .limit(sa.bindparam("rows", type_=sa.Integer))
    )


def _firings(rows: Sequence[Any]) -> list[Mark]:
    """Rows newest first -> one mark per firing (its newest attempt), newest first."""
    seen: set[tuple[str, datetime]] = set()
    marks = []
    for row in rows:
        firing = (row.test_id, row.scheduled_for)
        if firing in seen:
            continue
        seen.add(firing)
        marks.append(
            Mark(row.outcome, row.status_code, row.started_at, row.scheduled_for, row.test_id)
        )
        if len(marks) == STRIP:
            break
    return marks


def _rates(engine: Engine, jobs: Sequence[str], now: datetime) -> dict[str, Rates]:
    """Per job: successes / decided firings of the last 24 h and 7 d, one grouped range.

    A firing counts at its first attempt; it succeeded when an attempt did (a success ends
    it), and is undecided while an attempt is pending. Rows are read from the 7 d range of
    ``ix_attempts_job_started_at`` of each job on the page.
    """
    if not jobs:
        return {}
    c = attempts.c
    day = c.started_at >= now - DAY

    def count(*conditions: Any) -> Any:
        return sa.func.sum(sa.case((sa.and_(*conditions), 1), else_=0))

    stmt = (
        sa.select(
            c.job,
            count(c.attempt == 1).label("firings_week"),
            count(c.outcome == "success").label("ok_week"),
            count(c.outcome == "pending").label("pending_week"),
            count(day, c.attempt == 1).label("firings_day"),
            count(day, c.outcome == "success").label("ok_day"),
            count(day, c.outcome == "pending").label("pending_day"),
        )
        .where(c.job.in_(list(jobs)), c.started_at >= now - WEEK)
        .group_by(c.job)
    )
    with translate_errors(engine, "reading the status"), engine.connect() as conn:
        rows = conn.execute(stmt).all()
    return {
        row.job: Rates(
            _ratio(row.ok_day, row.firings_day - row.pending_day),
            _ratio(row.ok_week, row.firings_week - row.pending_week),
            int(row.firings_day),
            int(row.firings_week),
        )
        for row in rows
    }


def _ratio(ok: int, decided: int) -> float | None:
    return min(ok / decided, 1.0) if decided > 0 else None


def attempts_page(
    engine: Engine, job: str, *, before: int | None = None, limit: int = 50
) -> list[dict[str, Any]]:
    """``job``'s attempts newest first (started_at, then id), those older than id ``before``.

    Keyset paging on ``ix_attempts_job_started_at``: the ``before`` row's started_at is
    looked up by primary key, so a page costs the same on the first and the thousandth page.
    """
    c = attempts.c
    stmt = sa.select(attempts).where(c.job == job)
    with translate_errors(engine, "reading history"), engine.connect() as conn:
        if before is not None:
            anchor = conn.scalar(sa.select(c.started_at).where(c.id == before))
            if anchor is None:
                stmt = stmt.where(c.id < before)
            else:
                stmt = stmt.where(
                    sa.or_(c.started_at < anchor, sa.and_(c.started_at == anchor, c.id < before))
                )
        stmt = stmt.order_by(c.started_at.desc(), c.id.desc()).limit(limit)
        return [dict(row._mapping) for row in conn.execute(stmt)]


def known_jobs(engine: Engine, job: str) -> bool:
    """Whether the history has any row of ``job`` (one index probe)."""
    c = attempts.c
    with translate_errors(engine, "reading history"), engine.connect() as conn:
        return conn.scalar(sa.select(c.id).where(c.job == job).limit(1)) is not None


# -- results (SPEC section 7), optional ---------------------------------------------------
def has_results(engine: Engine) -> bool:
    """Whether the ``results`` table exists; asked once per engine (again a minute later
    while it does not, so a page started before the migration sees it after)."""
    with _schema_lock:
        schema = _schemas.setdefault(engine, _Schema())
        if schema.has_results or time.monotonic() - schema.checked_at < _RECHECK_MISSING:
            return schema.has_results
        schema.checked_at = time.monotonic()
    try:
        inspector = sa.inspect(engine)
        found = inspector.has_table("results")
        columns = frozenset(col["name"] for col in inspector.get_columns("attempts"))
    except Exception as exc:  # the page shows "—" rather than fail on a schema question
        log.warning("Cannot inspect the history schema: %s", exc)
        return False
    with _schema_lock:
        schema.has_results, schema.attempt_columns = found, columns
    return found


def results_for(engine: Engine, attempt_ids: Iterable[int]) -> dict[int, list[AgentResult]]:
    """Per attempt id, its agents' results in agent-name order; empty without the table."""
    ids = sorted(set(attempt_ids))
    if not ids or not has_results(engine):
        return {}
    table = sa.table(
        "results",
        *(
            sa.column(name)
            for name in (
                "attempt_id",
                "agent_name",
                "ok",
                "error",
                "loss",
                "latency_ms",
                "response_code",
                "app_link",
            )
        ),
    )
    c = table.c
    stmt = (
        sa.select(
            c.attempt_id,
            c.agent_name,
            c.ok,
            c.error,
            c.loss,
            c.latency_ms,
            c.response_code,
            c.app_link,
        )
        .where(c.attempt_id.in_(ids))
        .order_by(c.attempt_id, c.agent_name)
    )
    found: dict[int, list[AgentResult]] = {}
    with translate_errors(engine, "reading results"), engine.connect() as conn:
        for row in conn.execute(stmt):
            found.setdefault(int(row.attempt_id), []).append(
                AgentResult(
                    int(row.attempt_id),
                    row.agent_name,
                    None if row.ok is None else bool(row.ok),
                    row.error,
                    _number(row.loss),
                    _number(row.latency_ms),
                    None if row.response_code is None else int(row.response_code),
                    row.app_link,
                )
            )
    return found


def summary_for(
    engine: Engine,
    attempt_ids: Iterable[int],
    results: dict[int, list[AgentResult]] | None = None,
) -> dict[int, ResultSummary]:
    """Per attempt id with results: agents ok/total and a headline; empty without the table."""
    found = results if results is not None else results_for(engine, attempt_ids)
    return {attempt_id: summarize(rows) for attempt_id, rows in found.items() if rows}


def summarize(rows: Sequence[AgentResult]) -> ResultSummary:
    """Agents ok/total; the headline is the median latency, else the worst loss."""
    ok = sum(1 for row in rows if row.ok)
    latencies = sorted(row.latency_ms for row in rows if row.latency_ms is not None)
    losses = [row.loss for row in rows if row.loss is not None]
    headline = None
    if latencies:
        headline = f"{latencies[(len(latencies) - 1) // 2]:.0f} ms"
    elif losses:
        headline = f"{max(losses):g}% loss"
    return ResultSummary(ok, len(rows), headline)


def _number(value: Any) -> float | None:
    return None if value is None else float(value)
