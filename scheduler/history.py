"""The history schema (``attempts`` of SPEC.md section 4, ``instances``, ``rate_limits``) and
the few ``attempts`` queries the runner and the CLI need (scheduler.instances has the rest)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Engine, Row
from sqlalchemy.dialects import postgresql, sqlite

from scheduler.db import translate_errors, write_transaction
from scheduler.outcomes import OUTCOMES, TRIGGERS

log = logging.getLogger(__name__)

_FIRING_KEY = ("job", "test_id", "scheduled_for", "attempt")
_CHUNK = 500  # ids per UPDATE ... IN (...), well under every driver's parameter limit


class UTCDateTime(sa.TypeDecorator[datetime]):
    """Aware UTC datetimes in and out: naive UTC text on SQLite, ``timestamptz`` elsewhere."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.utcoffset() is None:
            raise ValueError(f"naive datetime {value!r}: history times must be timezone-aware")
        value = value.astimezone(timezone.utc)
        # SQLite has no time zones: store UTC wall time so sqlite3 shows readable UTC.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


metadata = sa.MetaData()

attempts = sa.Table(
    "attempts",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.String(36), nullable=False),
    sa.Column("job", sa.String(100), nullable=False),
    sa.Column("test_id", sa.String(32), nullable=False),
    sa.Column("aid", sa.String(32), nullable=True),
    sa.Column("trigger", sa.String(16), nullable=False),
    sa.Column("scheduled_for", UTCDateTime(), nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("started_at", UTCDateTime(), nullable=False),
    sa.Column("finished_at", UTCDateTime(), nullable=True),
    sa.Column("status_code", sa.Integer, nullable=True),
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("duration_ms", sa.Integer, nullable=True),
    sa.Column("instance", sa.String(200), nullable=False),
    # Claiming a firing = inserting its first row; this key makes that happen once.
    sa.UniqueConstraint(*_FIRING_KEY, name="uq_attempts_firing"),
    sa.Index("ix_attempts_job_started_at", "job", "started_at"),
    sa.Index("ix_attempts_test_id_started_at", "test_id", "started_at"),
    sa.Index("ix_attempts_started_at", "started_at"),
    sa.Index("ix_attempts_outcome", "outcome"),
    sqlite_autoincrement=True,
)


# Every daemon sharing the database, for liveness (heartbeats) and `te-scheduler status`.
instances = sa.Table(
    "instances",
    metadata,
    sa.Column("instance", sa.String(200), primary_key=True),  # host:pid, as in attempts
    sa.Column("host", sa.String(255), nullable=False),
    sa.Column("pid", sa.Integer, nullable=True),
    sa.Column("version", sa.String(32), nullable=False),
    sa.Column("started_at", UTCDateTime(), nullable=False),
    sa.Column("heartbeat_at", UTCDateTime(), nullable=False),
    sa.Column("stopped_at", UTCDateTime(), nullable=True),  # null while running
)

# The server's rate-limit windows as last seen by any instance, per token and bucket.
rate_limits = sa.Table(
    "rate_limits",
    metadata,
    sa.Column("token_key", sa.String(64), primary_key=True),  # SHA-256 prefix, never the token
    sa.Column("bucket", sa.String(32), primary_key=True),
    sa.Column("remaining", sa.Integer, nullable=True),
    sa.Column("reset", sa.Double, nullable=True),  # Unix seconds, as the Reset headers
    sa.Column("paused_until", sa.Double, nullable=True),  # Unix seconds
    sa.Column("updated_at", UTCDateTime(), nullable=False),
    sa.Column("updated_by", sa.String(200), nullable=False),
)


@dataclass(frozen=True)
class AttemptKey:
    """What identifies one attempt of one firing of one test, and who makes it."""

    run_id: str
    job: str
    test_id: str
    aid: str | None
    trigger: str
    scheduled_for: datetime
    attempt: int
    instance: str


def start_attempt(engine: Engine, key: AttemptKey, started_at: datetime) -> int | None:
    """Insert ``key`` as a committed 'pending' row; its id, or None if the key is taken."""
    return _insert_unless_taken(engine, _key_values(key, started_at, "pending", None, None))


def finish_attempt(
    engine: Engine,
    attempt_id: int,
    *,
    finished_at: datetime,
    outcome: str,
    status_code: int | None,
    error: str | None,
    duration_ms: int | None,
) -> None:
    """Complete a row that start_attempt inserted."""
    _check_finished(outcome)
    values = {
        "finished_at": finished_at,
        "outcome": outcome,
        "status_code": status_code,
        "error": error,
        "duration_ms": duration_ms,
    }
    with translate_errors(engine, "finishing an attempt"), write_transaction(engine) as conn:
        changed = conn.execute(
            sa.update(attempts).where(attempts.c.id == attempt_id).values(values)
        ).rowcount
    if not changed:
        log.warning("Attempt row %s no longer exists; outcome %r not recorded", attempt_id, outcome)


def record_attempt(
    engine: Engine,
    key: AttemptKey,
    *,
    started_at: datetime,
    outcome: str,
    error: str | None,
    status_code: int | None = None,
    duration_ms: int | None = None,
    finished_at: datetime | None = None,
) -> int | None:
    """Insert an already finished row (skipped, missed); its id, or None if the key is taken."""
    _check_finished(outcome)
    values = _key_values(key, started_at, outcome, error, finished_at or started_at)
    values.update(status_code=status_code, duration_ms=duration_ms)
    return _insert_unless_taken(engine, values)


def interrupt_pending(
    engine: Engine, *, where_instance: Callable[[str], bool], finished_at: datetime, error: str
) -> int:
    """Mark pending rows of the instances ``where_instance`` accepts as 'interrupted'."""
    ids = [row["id"] for row in pending_rows(engine) if where_instance(row["instance"])]
    changed = 0
    for chunk in _chunks(ids, _CHUNK):
        # Re-checking 'pending' in the UPDATE makes a concurrent sweep count each row once.
        stmt = (
            sa.update(attempts)
            .where(attempts.c.id.in_(chunk), attempts.c.outcome == "pending")
            .values(outcome="interrupted", finished_at=finished_at, error=error)
        )
        with translate_errors(engine, "interrupting attempts"), write_transaction(engine) as conn:
            changed += conn.execute(stmt).rowcount
    return changed


def pending_rows(engine: Engine) -> list[dict[str, Any]]:
    """id, instance, started_at, job and test_id of every row still 'pending'."""
    c = attempts.c
    stmt = (
        sa.select(c.id, c.instance, c.started_at, c.job, c.test_id)
        .where(c.outcome == "pending")
        .order_by(c.id)
    )
    return _fetch(engine, stmt)


def last_scheduled_for(engine: Engine, job: str) -> datetime | None:
    """The latest slot ``job`` fired for on its schedule (any outcome), or None if never."""
    c = attempts.c
    stmt = sa.select(sa.func.max(c.scheduled_for)).where(
        c.job == job, c.trigger.in_(("schedule", "catch-up"))
    )
    with translate_errors(engine, "reading history"), engine.connect() as conn:
        result: datetime | None = conn.scalar(stmt)
        return result


def query(
    engine: Engine,
    *,
    job: str | None = None,
    test_id: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    outcome: str | None = None,
    limit: int | None = 100,
) -> list[dict[str, Any]]:
    """Rows keyed by column name, newest first; ``limit`` None or 0 means all."""
    c = attempts.c
    stmt = (
        sa.select(attempts)
        .where(*_time_filter(since, until))
        .order_by(c.started_at.desc(), c.id.desc())
    )
    for column, value in ((c.job, job), (c.test_id, test_id), (c.outcome, outcome)):
        if value is not None:
            stmt = stmt.where(column == value)
    if limit:
        stmt = stmt.limit(limit)
    return _fetch(engine, stmt)


def stats(engine: Engine, *, since: datetime | None = None) -> list[dict[str, Any]]:
    """One summary per (job, test_id) of the rows started since ``since``.

    A firing is a run_id; it counts as finished when none of its rows is pending, as a success
    when any attempt succeeded, and as a failure when finished without success (skipped and
    missed firings included). last_failure/last_error come from the last attempt of the latest
    failed firing; p50_ms/p95_ms are nearest-rank percentiles of the attempts' durations.
    """
    c = attempts.c
    stmt = (
        sa.select(attempts)
        .where(*_time_filter(since, None))
        .order_by(c.job, c.test_id, c.started_at, c.id)
    )
    with translate_errors(engine, "reading history"), engine.connect() as conn:
        rows = conn.execute(stmt).all()
    groups: dict[tuple[str, str], list[Row[Any]]] = {}
    for row in rows:
        groups.setdefault((row.job, row.test_id), []).append(row)
    return [_summarize(job, test_id, group) for (job, test_id), group in groups.items()]


def prune(
    engine: Engine, *, before: datetime, batch_size: int = 5000, dry_run: bool = False
) -> int:
    """Delete finished rows started before ``before``, batch by batch; how many (would) go."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    c = attempts.c
    old = (c.started_at < before, c.outcome != "pending")
    if dry_run:
        with translate_errors(engine, "counting old rows"), engine.connect() as conn:
            return int(
                conn.scalar(sa.select(sa.func.count()).select_from(attempts).where(*old)) or 0
            )
    # Short transactions keep a big prune from holding the write lock the daemon needs.
    # SKIP LOCKED (PostgreSQL; SQLite ignores it and serialises writers anyway) gives two
    # instances pruning at once disjoint batches, so neither sees a short batch and stops early.
    batch = (
        sa.select(c.id)
        .where(*old)
        .order_by(c.id)
        .limit(batch_size)
        .with_for_update(skip_locked=True)
    )
    stmt = sa.delete(attempts).where(c.id.in_(batch))
    deleted = 0
    while True:
        with translate_errors(engine, "pruning history"), write_transaction(engine) as conn:
            count = conn.execute(stmt).rowcount
        deleted += count
        if count < batch_size:
            return deleted


def _summarize(job: str, test_id: str, rows: Sequence[Row[Any]]) -> dict[str, Any]:
    """The stats dict of one (job, test_id) from its rows in (started_at, id) order."""
    runs: dict[str, list[Row[Any]]] = {}
    for row in rows:
        runs.setdefault(row.run_id, []).append(row)
    finished = [run for run in runs.values() if all(r.outcome != "pending" for r in run)]
    succeeded = [run for run in runs.values() if any(r.outcome == "success" for r in run)]
    failed = [run for run in finished if not any(r.outcome == "success" for r in run)]
    last_failed = max((run[-1] for run in failed), key=_newest, default=None)
    durations = sorted(r.duration_ms for r in rows if r.duration_ms is not None)
    finished_ok = sum(1 for run in finished if any(r.outcome == "success" for r in run))
    return {
        "job": job,
        "test_id": test_id,
        "firings": len(runs),
        "attempts": len(rows),
        "successes": len(succeeded),
        "success_rate": finished_ok / len(finished) if finished else None,
        "last_success": max((r.started_at for r in rows if r.outcome == "success"), default=None),
        "last_failure": last_failed.started_at if last_failed else None,
        "last_error": last_failed.error if last_failed else None,
        "rate_limited": sum(1 for r in rows if r.status_code == 429),
        "retries": sum(1 for r in rows if r.attempt > 1),
        "p50_ms": _percentile(durations, 50),
        "p95_ms": _percentile(durations, 95),
    }


def _newest(row: Row[Any]) -> tuple[datetime, int]:
    return (row.started_at, row.id)


def _percentile(ordered: Sequence[int], percent: int) -> int | None:
    """Nearest-rank percentile of an ascending sequence (None when empty)."""
    if not ordered:
        return None
    rank = -(-percent * len(ordered) // 100)  # ceil without float rounding
    return ordered[max(rank, 1) - 1]


def _insert_unless_taken(engine: Engine, values: dict[str, Any]) -> int | None:
    """INSERT ... ON CONFLICT (firing key) DO NOTHING; the new id or None."""
    with translate_errors(engine, "recording an attempt"), write_transaction(engine) as conn:
        name = conn.dialect.name
        if name in ("sqlite", "postgresql"):
            dialect_insert = sqlite.insert if name == "sqlite" else postgresql.insert
            stmt = (
                dialect_insert(attempts)
                .values(values)
                .on_conflict_do_nothing(index_elements=list(_FIRING_KEY))
                .returning(attempts.c.id)
            )
            new_id: int | None = conn.execute(stmt).scalar_one_or_none()
            return new_id
        try:  # other databases: let the unique constraint refuse it inside a savepoint
            with conn.begin_nested():
                result = conn.execute(sa.insert(attempts).values(values))
            return int(result.inserted_primary_key[0])  # type: ignore[index]
        except sa.exc.IntegrityError:
            return None


def _key_values(
    key: AttemptKey,
    started_at: datetime,
    outcome: str,
    error: str | None,
    finished_at: datetime | None,
) -> dict[str, Any]:
    if key.trigger not in TRIGGERS:
        raise ValueError(f"trigger {key.trigger!r} is not one of {', '.join(TRIGGERS)}")
    if key.attempt < 1:
        raise ValueError(f"attempt numbers start at 1, not {key.attempt}")
    return {
        **asdict(key),
        "started_at": started_at,
        "finished_at": finished_at,
        "outcome": outcome,
        "error": error,
    }


def _check_finished(outcome: str) -> None:
    if outcome not in OUTCOMES[1:]:
        raise ValueError(f"outcome {outcome!r} is not one of {', '.join(OUTCOMES[1:])}")


def _time_filter(since: datetime | None, until: datetime | None) -> list[Any]:
    conditions = []
    if since is not None:
        conditions.append(attempts.c.started_at >= since)
    if until is not None:
        conditions.append(attempts.c.started_at < until)
    return conditions


def _fetch(engine: Engine, stmt: Any) -> list[dict[str, Any]]:
    with translate_errors(engine, "reading history"), engine.connect() as conn:
        return [dict(row._mapping) for row in conn.execute(stmt)]


def _chunks(items: list[int], size: int) -> Iterable[list[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
