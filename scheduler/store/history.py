"""The ``attempts`` writes and queries the runner and the CLI need (SPEC.md section 4); the
tables are in scheduler.store.tables, the other tables' queries in scheduler.store.instances."""

from __future__ import annotations

import bisect
import functools
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Engine

from scheduler.outcomes import NEVER_SENT, OUTCOMES, QUEUED, TRIGGERS, Outcome
from scheduler.store.db import translate_errors, write_transaction
from scheduler.store.results import results
from scheduler.store.tables import FIRING_KEY, UNUSUAL, UTCDateTime, attempts
from scheduler.store.writes import PreparedWrites, prepared_writes

log = logging.getLogger(__name__)

_CHUNK = 500  # ids per UPDATE ... IN (...), well under every driver's parameter limit
PRUNE_BATCH_SECONDS = 0.005  # how long one prune batch may hold the write lock
PRUNE_MIN_PAUSE, PRUNE_MAX_PAUSE = 0.005, 0.05  # seconds between batches on SQLite
_PRUNE_FIRST_BATCH, _PRUNE_MIN_BATCH, _PRUNE_MAX_BATCH = 200, 20, 5000


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


_KEY_FIELDS = tuple(field.name for field in fields(AttemptKey))


STOPPED_WHILE_QUEUED = (
    NEVER_SENT + "te-scheduler stopped while the call waited for the rate limiter"
)


def start_attempt(
    engine: Engine, key: AttemptKey, started_at: datetime, *, queued: bool = False
) -> int | None:
    """Insert ``key`` as a committed 'pending' row; its id, or None if the key is taken.

    ``queued``: the call still waits for the rate limiter, so the row says so (``QUEUED``)
    until :func:`mark_sent`; a process that dies meanwhile leaves a call known never sent.
    """
    values = _key_values(key, started_at, "pending", QUEUED if queued else None, None)
    return _insert_unless_taken(engine, values)


def mark_sent(engine: Engine, attempt_id: int, started_at: datetime) -> None:
    """A queued row's call is leaving now: its ``started_at`` is now and it is no longer queued."""
    with translate_errors(engine, "marking an attempt sent"):
        _prepared(engine).sent(started_at, attempt_id)


def finish_attempt(
    engine: Engine,
    attempt_id: int,
    *,
    finished_at: datetime,
    outcome: str,
    status_code: int | None,
    error: str | None,
    duration_ms: int | None,
    results: str | None = None,
) -> None:
    """Complete a row that start_attempt inserted (``results='waiting'``: read its round)."""
    _check_finished(outcome)
    values = {
        "finished_at": finished_at,
        "outcome": outcome,
        "status_code": status_code,
        "error": error,
        "duration_ms": duration_ms,
        "results": results,
    }
    with translate_errors(engine, "finishing an attempt"):
        changed = _prepared(engine).finish(values, attempt_id)
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
    engine: Engine,
    *,
    where_instance: Callable[[str], bool],
    finished_at: datetime,
    error: str,
    never_sent: str = STOPPED_WHILE_QUEUED,
) -> int:
    """End the pending rows of the instances ``where_instance`` accepts; returns how many.

    A row still ``QUEUED`` never sent its call: it becomes ``missed`` (``never_sent``), so a
    restart may catch its slot up. Any other may have reached the API: ``interrupted``
    (``error``).
    """
    rows = [r for r in pending_rows(engine) if where_instance(r["instance"])]
    queued = [r["id"] for r in rows if r["error"] == QUEUED]
    sent = [r["id"] for r in rows if r["error"] != QUEUED]
    changed = _end_pending(engine, queued, finished_at, Outcome.MISSED, never_sent)
    return changed + _end_pending(engine, sent, finished_at, Outcome.INTERRUPTED, error)


def _end_pending(
    engine: Engine, ids: list[int], finished_at: datetime, outcome: Outcome, error: str
) -> int:
    changed = 0
    for chunk in _chunks(ids, _CHUNK):
        # Re-checking 'pending' in the UPDATE makes a concurrent sweep count each row once.
        stmt = (
            sa.update(attempts)
            .where(attempts.c.id.in_(chunk), attempts.c.outcome == "pending")
            .values(outcome=outcome, finished_at=finished_at, error=error)
        )
        with translate_errors(engine, "interrupting attempts"), write_transaction(engine) as conn:
            changed += conn.execute(stmt).rowcount
    return changed


def pending_rows(engine: Engine) -> list[dict[str, Any]]:
    """id, instance, started_at, job, test_id and error of every row still 'pending'."""
    c = attempts.c
    stmt = (
        sa.select(c.id, c.instance, c.started_at, c.job, c.test_id, c.error)
        .where(c.outcome == "pending")
        .order_by(c.id)
    )
    return _fetch(engine, stmt)


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
    """One summary per (job, test_id) of the rows started since ``since``, computed in SQL.

    A firing is one run of a test (its attempts share a run_id and a slot) with a row in the
    window; it succeeded when one of its attempts did, and failed when its last attempt
    ended otherwise (skipped, missed and interrupted firings included); success_rate =
    successes / (successes + failed firings), firings still pending left out.
    last_failure/last_error come from the last attempt of the latest failed firing;
    p50_ms/p95_ms are nearest-rank percentiles of the attempts' durations. The results
    columns (SPEC section 7) cover the window's accepted runs: agents_ok_rate = agents ok /
    agents with a result, latency_p50_ms/latency_p95_ms nearest-rank of their latency_ms.

    Test by test, each a range of two indexes (see _window_durations and _unusual_counts):
    about a second for the 3.3 million rows of 30 days in ten million, where one grouped
    scan of the window sorted them all (9.6 s) and fetching the rows took minutes.
    """
    with translate_errors(engine, "reading history"), engine.connect() as conn:
        agents = _results_stats(conn, since)
        pending = _pending_counts(conn, since)
        result = []
        for job, test_id in _pairs(conn):
            summary = _pair_stats(conn, job, test_id, since, pending.get((job, test_id), 0))
            if summary is not None:
                summary.update(agents.get((job, test_id), _NO_RESULTS))
                result.append(summary)
        return sorted(result, key=lambda row: (row["job"], row["test_id"]))


_NO_RESULTS = {"agents_ok_rate": None, "latency_p50_ms": None, "latency_p95_ms": None}
# A run's round starts at most 5 s before its call was sent (SPEC 7); an hour's margin makes
# the round_id bound a safe pre-filter whatever the clocks did, the attempt decides exactly.
_ROUND_MARGIN_S = 3600


def _pairs(conn: sa.Connection) -> Iterable[tuple[str, str]]:
    """Every (job, test_id) in the table, in index order: one seek each, not a scan."""
    c = attempts.c
    after = sa.bindparam("after", type_=sa.String)
    next_job = sa.select(sa.func.min(c.job)).where(c.job > after)
    job = sa.bindparam("job", type_=sa.String)
    next_test = sa.select(sa.func.min(c.test_id)).where(c.job == job, c.test_id > after)
    found_job = conn.scalar(next_job, {"after": ""})
    while found_job is not None:
        test_id = conn.scalar(next_test, {"job": found_job, "after": ""})
        while test_id is not None:
            yield found_job, test_id
            test_id = conn.scalar(next_test, {"job": found_job, "after": test_id})
        found_job = conn.scalar(next_job, {"after": found_job})


def _pending_counts(conn: sa.Connection, since: datetime | None) -> dict[tuple[str, str], int]:
    """Rows still pending per (job, test_id) in the window: few, found by ix_attempts_outcome."""
    c = attempts.c
    stmt = (
        sa.select(c.job, c.test_id, sa.func.count())
        .where(c.outcome == "pending", *_time_filter(since, None))
        .group_by(c.job, c.test_id)
    )
    return {(job, test_id): count for job, test_id, count in conn.execute(stmt)}


def _pair_stats(
    conn: sa.Connection, job: str, test_id: str, since: datetime | None, pending: int
) -> dict[str, Any] | None:
    """The summary of one test's window (``pending`` rows in it), None when it has none."""
    windowed = since is not None
    params = {"job": job, "test_id": test_id} | ({"since": since} if windowed else {})
    durations = conn.execute(_window_durations(windowed), params).all()  # not row by row
    total = sum(count for _, count in durations)
    if not total:
        return None
    unusual = conn.execute(_unusual_counts(windowed), params).one()
    successes = total - pending - (unusual.finished_otherwise or 0)
    final_failures = unusual.final_failures or 0
    decided = successes + final_failures
    last_failed = (
        conn.execute(_last_failure(windowed), params).first() if final_failures > 0 else None
    )
    p50, p95 = _percentiles([row for row in durations if row[0] is not None], (50, 95))
    return {
        "job": job,
        "test_id": test_id,
        "firings": total - (unusual.continued or 0),
        "attempts": total,
        "successes": successes,
        "success_rate": successes / decided if decided > 0 else None,
        "last_success": conn.scalar(_last_success(windowed), params) if successes else None,
        "last_failure": last_failed.started_at if last_failed else None,
        "last_error": last_failed.error if last_failed else None,
        "rate_limited": unusual.rate_limited or 0,
        "retries": unusual.retries or 0,
        "p50_ms": p50,
        "p95_ms": p95,
    }


# The per-test statements are built once (their construction cost more than running them)
# and take the parameters job, test_id and, when ``windowed``, since.
_SINCE = sa.bindparam("since", type_=UTCDateTime())


def _in_window(windowed: bool) -> list[Any]:
    c = attempts.c
    conditions = [
        c.job == sa.bindparam("job", type_=sa.String),
        c.test_id == sa.bindparam("test_id", type_=sa.String),
    ]
    return conditions + ([c.started_at >= _SINCE] if windowed else [])


@functools.cache
def _window_durations(windowed: bool) -> Any:
    """(duration_ms, rows) of the window: ix_attempts_stats alone, no table row read."""
    c = attempts.c
    return (
        sa.select(c.duration_ms, sa.func.count())
        .where(*_in_window(windowed))
        .group_by(c.duration_ms)
        .order_by(c.duration_ms)  # what SQLite's grouping gives anyway; PostgreSQL may hash
    )


@functools.cache
def _last_success(windowed: bool) -> Any:
    """The newest success: ix_attempts_stats walked back from the window's end."""
    c = attempts.c
    return (
        sa.select(c.started_at)
        .where(*_in_window(windowed), c.outcome == "success")
        .order_by(c.started_at.desc())
        .limit(1)
    )


@functools.cache
def _unusual_counts(windowed: bool) -> Any:
    """Counts over the window's unusual rows (tables.UNUSUAL), from their partial index.

    Every other row is a first attempt that succeeded or is still pending: one firing, one
    success or none (_pending_counts), nothing more. Of the unusual: a retry whose attempt
    before it is in the window continues a firing already counted; a failed row that no
    retry followed is a failed firing (a firing's rows in the window are always its last
    attempts: the window has no end, and a prune removes older rows first). Each check is an
    index lookup on the firing key.
    """
    c = attempts.c

    def count_if(*whens: Any) -> Any:
        return sa.func.sum(sa.case(*whens, else_=0))

    return sa.select(
        count_if((c.outcome.not_in(("success", "pending")), 1)).label("finished_otherwise"),
        count_if((c.status_code == 429, 1)).label("rate_limited"),
        count_if((c.attempt > 1, 1)).label("retries"),
        count_if((sa.and_(c.attempt > 1, _neighbour(-1, _SINCE if windowed else None)), 1)).label(
            "continued"
        ),
        count_if((c.outcome.in_(("success", "pending")), 0), (~_neighbour(+1, None), 1)).label(
            "final_failures"
        ),
    ).where(*_in_window(windowed), _unusual())


def _unusual() -> Any:
    """tables.UNUSUAL as a WHERE term: SQLite uses a partial index only for its very words."""
    return sa.text(f"({UNUSUAL})")


def _results_stats(
    conn: sa.Connection, since: datetime | None
) -> dict[tuple[str, str], dict[str, Any]]:
    """agents_ok_rate and latency percentiles per (job, test_id), over the window's runs."""
    r = results.c
    c = attempts.c
    ok = sa.func.sum(sa.case((r.ok, 1), else_=0))
    stmt = sa.select(r.job, r.test_id, r.latency_ms, sa.func.count(), ok).group_by(
        r.job, r.test_id, r.latency_ms
    )
    if since is not None:
        started = sa.select(c.started_at).where(c.id == r.attempt_id).scalar_subquery()
        stmt = stmt.where(r.round_id >= int(since.timestamp()) - _ROUND_MARGIN_S, started >= since)
    found: dict[tuple[str, str], list[tuple[Any, int, int]]] = {}
    for job, test_id, latency, count, oks in conn.execute(stmt):
        found.setdefault((job, test_id), []).append((latency, count, oks or 0))
    summaries = {}
    for pair, groups in found.items():
        agents = sum(count for _, count, _ in groups)
        latencies = sorted((ms, count) for ms, count, _ in groups if ms is not None)
        p50, p95 = _percentiles(latencies, (50, 95))
        summaries[pair] = {
            "agents_ok_rate": sum(oks for _, _, oks in groups) / agents,
            "latency_p50_ms": p50,
            "latency_p95_ms": p95,
        }
    return summaries


def _neighbour(step: int, since: Any) -> Any:
    """EXISTS: the attempt ``step`` away in the same firing (started since ``since``)."""
    c = attempts.c
    other = attempts.alias("neighbour")
    conditions = [
        other.c.job == c.job,
        other.c.test_id == c.test_id,
        other.c.scheduled_for == c.scheduled_for,
        other.c.attempt == c.attempt + step,
    ]
    if since is not None:
        conditions.append(other.c.started_at >= since)
    return sa.exists().where(*conditions)


@functools.cache
def _last_failure(windowed: bool) -> Any:
    """The newest failed attempt of (job, test_id) that no retry followed."""
    c = attempts.c
    retried = _neighbour(+1, None)
    return (
        sa.select(c.started_at, c.error)
        .where(
            *_in_window(windowed),
            c.outcome.not_in(("success", "pending")),
            ~retried,
        )
        .order_by(c.started_at.desc(), c.id.desc())
        .limit(1)
    )


def prune(
    engine: Engine,
    *,
    before: datetime,
    batch_size: int | None = None,
    dry_run: bool = False,
    stop: threading.Event | None = None,
) -> int:
    """Delete finished rows started before ``before``, batch by batch; how many (would) go.

    ``batch_size`` None sizes batches to hold the write lock ~5 ms each; ``stop`` set ends the
    prune early (between batches).
    """
    if batch_size is not None and batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    c = attempts.c
    old = (c.started_at < before, c.outcome != "pending")
    if dry_run:
        with translate_errors(engine, "counting old rows"), engine.connect() as conn:
            return int(
                conn.scalar(sa.select(sa.func.count()).select_from(attempts).where(*old)) or 0
            )
    # SKIP LOCKED (PostgreSQL; SQLite ignores it and serialises writers anyway) gives two
    # instances pruning at once disjoint batches, so neither sees a short batch and stops early.
    limit = sa.bindparam("limit", type_=sa.Integer)
    batch = (
        sa.select(c.id).where(*old).order_by(c.id).limit(limit).with_for_update(skip_locked=True)
    )
    stmt = sa.delete(attempts).where(c.id.in_(batch))
    pace = _PrunePace(batch_size, yields_lock=engine.dialect.name == "sqlite")
    deleted = 0
    while stop is None or not stop.is_set():
        size = pace.size
        began = time.monotonic()
        with translate_errors(engine, "pruning history"), write_transaction(engine) as conn:
            count = conn.execute(stmt, {"limit": size}).rowcount
        deleted += count
        if count < size:
            break
        pace.after_batch(time.monotonic() - began)
        if pace.yields_lock:
            _checkpoint(engine)
    return deleted


def _checkpoint(engine: Engine) -> None:
    """Copy the WAL back into the database file now, on the pruner's time.

    A batch dirties pages all over the indexes; left to SQLite, the commit that takes the WAL
    past 1,000 pages runs the checkpoint, and that is as likely a firing's insert (tens of ms
    at ten million rows). PASSIVE waits for nobody and holds no write lock.
    """
    with translate_errors(engine, "pruning history"), engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")


class _PrunePace:
    """Short batches with room between them, so the daemon's writes are not held up.

    SQLite has one writer at a time: a 5,000-row batch held the lock ~0.3 s and a firing's
    insert waited behind it. Batches are sized to hold the lock ~PRUNE_BATCH_SECONDS, and on
    SQLite each is followed by a pause as long as the batch, long enough for a writer polling
    in its busy handler (1, 2, 5 ms ...) to get in. PostgreSQL locks rows, so it only sizes.
    """

    def __init__(self, fixed: int | None, *, yields_lock: bool) -> None:
        self.fixed = fixed
        self.size = fixed or _PRUNE_FIRST_BATCH
        self.yields_lock = yields_lock

    def after_batch(self, seconds: float) -> None:
        if self.fixed is None:
            wanted = self.size * PRUNE_BATCH_SECONDS / max(seconds, 1e-4)
            # Grow gently (a slow batch costs the daemon), shrink at once.
            self.size = int(min(max(wanted, _PRUNE_MIN_BATCH), self.size * 2, _PRUNE_MAX_BATCH))
        if self.yields_lock:
            time.sleep(min(max(seconds, PRUNE_MIN_PAUSE), PRUNE_MAX_PAUSE))


def _percentiles(histogram: Sequence[Sequence[Any]], percents: Sequence[int]) -> list[Any]:
    """Nearest-rank percentiles of (value, count) pairs in ascending value order."""
    cumulative = list(itertools.accumulate(row[1] for row in histogram))
    if not cumulative or not cumulative[-1]:
        return [None for _ in percents]
    total = cumulative[-1]
    # The first value whose running count reaches the rank (ceil without float rounding).
    return [
        histogram[bisect.bisect_left(cumulative, max(-(-percent * total // 100), 1))][0]
        for percent in percents
    ]


def _insert_unless_taken(engine: Engine, values: dict[str, Any]) -> int | None:
    """INSERT ... ON CONFLICT (firing key) DO NOTHING; the new id or None."""
    with translate_errors(engine, "recording an attempt"):
        return _prepared(engine).insert(values)


def _prepared(engine: Engine) -> PreparedWrites:
    """The statements that write ``attempts`` rows (scheduler.store.writes says why not Core)."""
    return prepared_writes(engine, attempts, conflict_key=FIRING_KEY)


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
        # Shallow on purpose: dataclasses.asdict deep-copies, ~0.1 ms an attempt for nothing.
        **{name: getattr(key, name) for name in _KEY_FIELDS},
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
