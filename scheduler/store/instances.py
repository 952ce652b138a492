"""Several daemons on one database: who is alive (heartbeats) and the rate limits they share.

Liveness. A daemon registers its ``instances`` row at start (:func:`register`), refreshes
``heartbeat_at`` every :data:`HEARTBEAT_INTERVAL` seconds from a :class:`Heartbeat` thread and
sets ``stopped_at`` when it shuts down cleanly (:func:`mark_stopped`). An instance is *alive*
while ``stopped_at`` is null and its heartbeat is younger than :data:`STALE_AFTER`, three
intervals: one late beat is a hiccup (a slow database, a GC pause), three are a dead, frozen or
cut-off process. Liveness only decides who cleans up pending rows (:func:`dead_instances`);
it never decides who fires: a firing is claimed by inserting its first ``attempts`` row, which
the unique firing key lets happen once. So a wrong verdict is cheap: the row says
``interrupted`` until its live owner completes it with the real outcome. Heartbeats carry each
instance's own clock (the time seam), so the hosts' clocks must agree to well within
``STALE_AFTER``, as NTP keeps them.

Shared pacing. Each instance paces itself with its own limiter; on top of that the server's
rate-limit windows are shared through ``rate_limits``, one row per token and bucket. The token
is named by :func:`token_key` (a SHA-256 prefix), never stored. After each answer an instance
publishes what it learned (:func:`publish_limit`): within one window (same ``reset``) the
lowest ``remaining`` wins, a later window replaces an earlier one, and the latest pause wins.
Before sending, an instance reads the others' view (:func:`read_limits`). The trade-off: one
short database round trip per answer (and per read; a limiter may cache reads for a second)
buys a combined view that lags by at most one answer per instance, so the instances together
may overshoot a window only by the calls they have in flight at once, and a 429 seen by one
pauses them all. Exact accounting would need a lock held across each HTTP call: too slow.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from datetime import datetime, timedelta
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy import Connection, Engine
from sqlalchemy.dialects import postgresql, sqlite

from scheduler import clock
from scheduler.errors import DatabaseError
from scheduler.store.db import translate_errors, write_transaction
from scheduler.store.tables import attempts, instances, rate_limits

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL = 10.0  # seconds between heartbeats
STALE_AFTER = timedelta(seconds=3 * HEARTBEAT_INTERVAL)  # no heartbeat for this long: dead
RECENT = timedelta(hours=1)  # the window of status()'s attempts_last_hour
_TOKEN_KEY_DIGITS = 16  # 64 bits of SHA-256: unique per token, useless for recovering one


def heartbeat_interval() -> float:
    """Seconds between heartbeats: 10, or ``TE_SCHEDULER_HEARTBEAT`` (fast failover, tests)."""
    try:
        return max(0.1, float(os.environ.get("TE_SCHEDULER_HEARTBEAT", "")))
    except ValueError:
        return HEARTBEAT_INTERVAL


def stale_after() -> timedelta:
    """An instance silent for three heartbeats is dead."""
    return timedelta(seconds=3 * heartbeat_interval())


# -- liveness ---------------------------------------------------------------------------------
def register(engine: Engine, instance: str, version: str, now: datetime) -> None:
    """Record ``instance`` (host:pid) as started and alive at ``now``, replacing an old row."""
    host, _, pid = instance.rpartition(":")
    values = {
        "instance": instance,
        "host": host or instance,
        "pid": int(pid) if pid.isdigit() else None,
        "version": version[:32],
        "started_at": now,
        "heartbeat_at": now,
        "stopped_at": None,
        "last_clock_jump": None,
    }
    with translate_errors(engine, "registering the instance"), write_transaction(engine) as conn:
        # A restarted container keeps its hostname and pid 1, so the name may be taken.
        _upsert(conn, instances, values, ["instance"], _replace_all(values, ["instance"]))


def heartbeat(engine: Engine, instance: str, now: datetime) -> bool:
    """Refresh ``instance``'s heartbeat; False when it has no running row (gone or stopped)."""
    stmt = (
        sa.update(instances)
        .where(instances.c.instance == instance, instances.c.stopped_at.is_(None))
        .values(heartbeat_at=now)
    )
    with translate_errors(engine, "sending a heartbeat"), write_transaction(engine) as conn:
        return bool(conn.execute(stmt).rowcount)


def note_clock_jump(engine: Engine, instance: str, jump: str) -> None:
    """Keep the latest wall-clock jump ``instance`` noticed, for ``te-scheduler status``."""
    stmt = sa.update(instances).where(instances.c.instance == instance).values(last_clock_jump=jump)
    with translate_errors(engine, "noting a clock jump"), write_transaction(engine) as conn:
        conn.execute(stmt)


def mark_stopped(engine: Engine, instance: str, now: datetime) -> None:
    """Record that ``instance`` shut down cleanly at ``now`` (its row stays, for status)."""
    stmt = (
        sa.update(instances)
        .where(instances.c.instance == instance)
        .values(stopped_at=now, heartbeat_at=now)
    )
    with translate_errors(engine, "stopping the instance"), write_transaction(engine) as conn:
        conn.execute(stmt)


def dead_instances(engine: Engine, now: datetime, stale_after: timedelta = STALE_AFTER) -> set[str]:
    """Instances whose pending attempts nobody will finish: see the rules below.

    * a registered instance with ``stopped_at`` set, or whose ``heartbeat_at`` is older than
      ``now - stale_after``;
    * an instance that owns pending attempts but has no ``instances`` row (a te-scheduler
      older than revision 0002, or a forgotten row) once its newest pending attempt started
      before ``now - stale_after``.

    Rows pending under the caller's own name when it starts (before it fires anything) were
    left by an earlier process with the same host:pid; the caller should add its own name then.
    """
    cutoff = now - stale_after
    c, a = instances.c, attempts.c
    owners = (
        sa.select(a.instance, sa.func.max(a.started_at).label("newest"))
        .where(a.outcome == "pending")
        .group_by(a.instance)
    )
    with translate_errors(engine, "reading instances"), engine.connect() as conn:
        registered = conn.execute(sa.select(c.instance, c.heartbeat_at, c.stopped_at)).all()
        pending = conn.execute(owners).all()
    dead = {
        row.instance
        for row in registered
        if row.stopped_at is not None or row.heartbeat_at < cutoff
    }
    known = {row.instance for row in registered}
    dead |= {row.instance for row in pending if row.instance not in known and row.newest < cutoff}
    return dead


def status(
    engine: Engine, now: datetime, stale_after: timedelta = STALE_AFTER
) -> list[dict[str, Any]]:
    """Every registered instance, live ones first, for ``te-scheduler status``.

    Keys: instance, host, pid, version, started_at, heartbeat_at, stopped_at, alive (bool),
    state (``running``, ``stale`` or ``stopped``), last_attempt_at (its newest attempt's
    started_at, or None), attempts_last_hour, pending (its attempts still pending).
    """
    with translate_errors(engine, "reading instances"), engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(sa.select(instances))]
        since = min((r["started_at"] for r in rows), default=now)
        activity = {r.instance: r for r in conn.execute(_activity(since, now - RECENT))}
    for row in rows:
        row["state"] = _state(row, now - stale_after)
        row["alive"] = row["state"] == "running"
        seen = activity.get(row["instance"])
        row["last_attempt_at"] = seen.last_attempt_at if seen else None
        row["attempts_last_hour"] = int(seen.recent or 0) if seen else 0
        row["pending"] = int(seen.pending or 0) if seen else 0
    rows.sort(key=lambda r: (not r["alive"], r["instance"]))
    return rows


def _activity(since: datetime, recent: datetime) -> sa.Select[Any]:
    """Per instance: newest started_at, attempts since ``recent``, pending attempts."""
    a = attempts.c
    # No instance has attempts from before it started, so older rows need not be read.
    return (
        sa.select(
            a.instance,
            sa.func.max(a.started_at).label("last_attempt_at"),
            sa.func.sum(sa.case((a.started_at >= recent, 1), else_=0)).label("recent"),
            sa.func.sum(sa.case((a.outcome == "pending", 1), else_=0)).label("pending"),
        )
        .where(a.started_at >= since)
        .group_by(a.instance)
    )


def _state(row: dict[str, Any], cutoff: datetime) -> str:
    if row["stopped_at"] is not None:
        return "stopped"
    return "stale" if row["heartbeat_at"] < cutoff else "running"


def forget_instances(engine: Engine, before: datetime) -> int:
    """Delete instance rows silent since before ``before`` (stopped or dead); how many."""
    stmt = sa.delete(instances).where(instances.c.heartbeat_at < before)
    with translate_errors(engine, "forgetting instances"), write_transaction(engine) as conn:
        return int(conn.execute(stmt).rowcount)


class Heartbeat:
    """A daemon thread that calls :func:`heartbeat` every ``interval`` seconds until stopped.

    It never raises: a failed beat is logged and retried at the next interval, and a missing
    row (forgotten by another instance's cleanup) is registered again. The wait is real time
    on purpose: heartbeats measure real time, even under a test's fake clock.
    """

    def __init__(
        self, engine: Engine, instance: str, version: str, interval: float = HEARTBEAT_INTERVAL
    ) -> None:
        self.engine, self.instance, self.version, self.interval = (
            engine,
            instance,
            version,
            interval,
        )
        self.last_beat: datetime | None = None  # when a heartbeat was last written
        self._stop = threading.Event()
        self._failing = False
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        """Start beating (the first beat comes one interval from now); returns self."""
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop beating and wait up to ``timeout`` seconds for the thread to end."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def beat(self) -> bool:
        """Write one heartbeat now; True when written. Logs failures instead of raising."""
        now = clock.now()
        try:
            written = heartbeat(self.engine, self.instance, now)
            if not written and not self._stop.is_set():  # after a clean stop: stay stopped
                log.warning("Instance %s had no running row; registering it again", self.instance)
                register(self.engine, self.instance, self.version, now)
                written = True
        except Exception as exc:  # the thread must outlive any database trouble
            if not self._failing:
                log.warning("Heartbeat of %s failed (will retry): %s", self.instance, exc)
            self._failing = True
            return False
        if self._failing:
            log.info("Heartbeat of %s works again", self.instance)
        self._failing = False
        if written:
            self.last_beat = now
        return written

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.beat()


# -- shared rate limits -------------------------------------------------------------------
class SharedLimit(NamedTuple):
    """One bucket as the instances together last saw it; None where unknown or expired."""

    remaining: int | None
    reset: float | None  # Unix seconds when the window closes
    paused_until: float | None  # Unix seconds; a 429 pauses every call on the token until then


def token_key(token: str) -> str:
    """The name of ``token`` in ``rate_limits``: a SHA-256 prefix, never the token itself."""
    return hashlib.sha256(token.encode()).hexdigest()[:_TOKEN_KEY_DIGITS]


def publish_limit(
    engine: Engine,
    token_key: str,
    bucket: str,
    remaining: int | None,
    reset: float | None,
    paused_until: float | None,
    now: datetime,
    instance: str,
) -> None:
    """Merge one answer's view of ``bucket`` into the shared row (see the module docstring)."""
    values = {
        "token_key": token_key,
        "bucket": bucket,
        "remaining": remaining,
        "reset": reset,
        "paused_until": paused_until,
        "updated_at": now,
        "updated_by": instance,
    }
    with translate_errors(engine, "sharing rate limits"), write_transaction(engine) as conn:
        _upsert(conn, rate_limits, values, ["token_key", "bucket"], _merge_limit)


def _merge_limit(new: Any) -> dict[str, Any]:
    """SET clauses merging the proposed row ``new`` (EXCLUDED) into the stored one."""
    old = rate_limits.c
    newer = sa.or_(new.reset > old.reset, sa.and_(old.reset.is_(None), new.reset.is_not(None)))
    same = new.reset.is_not_distinct_from(old.reset)
    lower = sa.or_(old.remaining.is_(None), new.remaining < old.remaining)
    later = sa.or_(old.paused_until.is_(None), new.paused_until > old.paused_until)
    return {
        "remaining": sa.case(
            (newer, new.remaining), (sa.and_(same, lower), new.remaining), else_=old.remaining
        ),
        "reset": sa.case((newer, new.reset), else_=old.reset),
        "paused_until": sa.case((later, new.paused_until), else_=old.paused_until),
        "updated_at": new.updated_at,
        "updated_by": new.updated_by,
    }


def read_limits(engine: Engine, token_key: str, now: datetime) -> dict[str, SharedLimit]:
    """The shared view of every bucket of ``token_key`` whose window or pause still lasts."""
    c, at = rate_limits.c, now.timestamp()
    stmt = sa.select(c.bucket, c.remaining, c.reset, c.paused_until).where(
        c.token_key == token_key, sa.or_(c.reset > at, c.paused_until > at)
    )
    with translate_errors(engine, "reading shared rate limits"), engine.connect() as conn:
        rows = conn.execute(stmt).all()
    result = {}
    for row in rows:
        window_open = row.reset is not None and row.reset > at
        paused = (
            row.paused_until if row.paused_until is not None and row.paused_until > at else None
        )
        result[row.bucket] = SharedLimit(
            row.remaining if window_open else None, row.reset if window_open else None, paused
        )
    return result


# -- helpers --------------------------------------------------------------------------------
def _replace_all(values: dict[str, Any], keys: list[str]) -> Any:
    """SET clauses that overwrite every non-key column with the proposed row."""
    return lambda new: {name: getattr(new, name) for name in values if name not in keys}


def _upsert(
    conn: Connection, table: sa.Table, values: dict[str, Any], keys: list[str], set_: Any
) -> None:
    """INSERT ``values``, or on a key conflict UPDATE with ``set_(excluded)``, atomically."""
    name = conn.dialect.name
    if name not in ("sqlite", "postgresql"):
        raise DatabaseError(f"te-scheduler shares state on SQLite and PostgreSQL, not {name}")
    insert = sqlite.insert if name == "sqlite" else postgresql.insert
    stmt = insert(table).values(values)
    conn.execute(stmt.on_conflict_do_update(index_elements=keys, set_=set_(stmt.excluded)))


class SharedLimits:
    """The limiter's window onto :func:`publish_limit` and :func:`read_limits` for one token.

    Reads are cached for ``cache_seconds`` so pacing costs at most one query a second, and
    database trouble is logged once and otherwise ignored: pacing then falls back to this
    instance's own view, which is still safe on its own.
    """

    def __init__(
        self, engine: Engine, token: str, instance: str, cache_seconds: float = 1.0
    ) -> None:
        self.engine, self.key, self.instance = engine, token_key(token), instance
        self.cache_seconds = cache_seconds
        self._cached: dict[str, SharedLimit] = {}
        self._read_at = float("-inf")
        self._failing = False

    def publish(self, buckets: Any, paused_until: float | None) -> None:
        """Share one answer: each bucket's Remaining and Reset, and a 429's pause."""
        now = clock.now()
        reported = [(b.name, b.remaining, b.reset) for b in buckets] or [("pause", None, None)]
        for name, remaining, reset in reported:
            if remaining is None and reset is None and paused_until is None:
                continue
            self._guard(
                publish_limit,
                self.engine,
                self.key,
                name,
                remaining,
                reset,
                paused_until,
                now,
                self.instance,
            )

    def read(self) -> dict[str, SharedLimit]:
        """The other instances' view, at most ``cache_seconds`` old."""
        if clock.monotonic() - self._read_at >= self.cache_seconds:
            self._read_at = clock.monotonic()
            fresh = self._guard(read_limits, self.engine, self.key, clock.now())
            self._cached = fresh if fresh is not None else {}
        return self._cached

    def _guard(self, action: Any, *args: Any) -> Any:
        try:
            result = action(*args)
        except Exception as exc:  # sharing is an optimisation; never fail a call over it
            if not self._failing:
                log.warning("Sharing rate limits through the database failed: %s", exc)
            self._failing = True
            return None
        self._failing = False
        return result
