"""History bookkeeping around downtime: orphaned ``pending`` rows and ``missed`` slots.

A call whose process died may have reached the API, so it is never repeated: its row
becomes ``interrupted``. Whose rows are orphans is decided by three rules, any one enough:
the owner is a process of this host that no longer exists; the owner stopped or stopped
sending heartbeats (``instances.dead_instances``); or the row is older than any call of
ours could stay open.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from scheduler.clock import ONE_US
from scheduler.config.model import Job
from scheduler.outcomes import NEVER_SENT, Outcome
from scheduler.store import history, instances
from scheduler.store.db import translate_errors
from scheduler.store.tables import attempts

log = logging.getLogger(__name__)

# A pending row older than the request timeout plus this is an orphan even when its owner
# cannot be checked (another host, no heartbeats): no call of ours stays open that long.
ORPHAN_MARGIN = timedelta(hours=1)
INTERRUPTED = (
    "te-scheduler stopped before the call finished; the call may have reached the API and "
    "is not repeated"
)


def interrupt_orphans(
    engine: Engine,
    *,
    me: str,
    now: datetime,
    timeout: float,
    starting: bool,
    stale_after: timedelta = instances.STALE_AFTER,
) -> int:
    """End the pending rows of dead owners; returns how many.

    A row whose call may have left becomes ``interrupted``; one still queued for the rate
    limiter (never sent) becomes ``missed``, so that its slot can be caught up.

    ``starting``: nothing of ours is in flight yet, so rows under our own name were left by
    an earlier process with the same host:pid (a restarted container is PID 1 again).
    """
    margin = timedelta(seconds=timeout) + ORPHAN_MARGIN
    pending = history.pending_rows(engine)
    dead = instances.dead_instances(engine, now, stale_after)
    dead |= {
        row["instance"]
        for row in pending
        if is_dead_process(row["instance"]) or now - row["started_at"] > margin
    }
    if starting:
        dead.add(me)
    else:
        dead.discard(me)
    owners = sorted({row["instance"] for row in pending if row["instance"] in dead})
    if not owners:
        return 0
    marked = history.interrupt_pending(
        engine, where_instance=dead.__contains__, finished_at=now, error=INTERRUPTED
    )
    if marked:
        # Only the owners whose rows these were: the new instance is named only when an
        # earlier process left rows under the same host:pid.
        log.warning(
            "Ended %d attempt(s) left pending by %s: interrupted where the call may have "
            "been sent, missed where it still waited for the rate limiter",
            marked,
            ", ".join(owners),
        )
    return marked


def is_dead_process(instance: str) -> bool:
    """True when ``instance`` (host:pid) names a process of this host that no longer exists."""
    host, _, pid = instance.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # it exists, as another user
        return False
    return False


@dataclass(frozen=True)
class Accounted:
    """What the history says of one (job, test) at start-up.

    ``until``: every slot up to it is fired, caught up or reported missed. ``unsent``: that
    latest slot was recorded ``missed`` because its call was never sent (the daemon stopped
    while it waited), so it may still run as a catch-up, with attempt 2.
    """

    until: datetime
    unsent: datetime | None = None


def last_accounted(engine: Engine) -> dict[tuple[str, str], Accounted]:
    """Per (job, test) with rows: the latest slot history accounts for, and if it went unsent.

    A ``missed`` row carries the earliest slot it sums up, but it accounts for every slot
    before it was written; without this a second restart reported them again. A never-sent
    row accounts only for its own slot. Pairs absent from the result never fired.

    Two queries however many jobs there are (start-up needs every one; two queries per job
    took 33 s for 10,000 jobs), each led by an index rather than reading the rows:
    ``_LATEST_FIRED`` walks the firing key's unique index (job, test_id, scheduled_for, ...)
    once for the distinct pairs and then down from the newest slot of each pair, joined back
    to that slot's rows; ``_LAST_MISSED`` reads only the ``missed`` rows through the outcome
    index. On a 1M-row SQLite file that is 0.25 s where one GROUP BY over the table took 2.2 s.
    """
    newest: dict[tuple[str, str], datetime] = {}
    at_newest: dict[tuple[str, str], list[tuple[int, str, str | None]]] = {}
    covered: dict[tuple[str, str], datetime] = {}
    with translate_errors(engine, "reading history"), engine.connect() as conn:
        for job, test, slot, attempt, outcome, error in conn.execute(_LATEST_FIRED):
            if slot is not None:
                newest[(job, test)] = slot
                at_newest.setdefault((job, test), []).append((attempt, outcome, error))
        for job, test, missed_at in conn.execute(_LAST_MISSED):
            if missed_at is not None:
                covered[(job, test)] = missed_at - ONE_US
    result = {}
    for pair in newest.keys() | covered.keys():
        slot = newest.get(pair)
        until = max(d for d in (slot, covered.get(pair)) if d is not None)
        unsent = slot if slot == until and _never_sent(at_newest.get(pair, [])) else None
        result[pair] = Accounted(until, unsent)
    return result


def _never_sent(rows: list[tuple[int, str, str | None]]) -> bool:
    """The slot's rows are one attempt 1, recorded missed because its call never left."""
    return len(rows) == 1 and rows[0][0] == 1 and is_never_sent(rows[0][1], rows[0][2])


def is_never_sent(outcome: str, error: str | None) -> bool:
    """A row whose call never left this process (so its slot may still be caught up)."""
    return outcome == Outcome.MISSED and (error or "").startswith(NEVER_SENT)


def _latest_fired_query() -> Any:
    """Per (job, test_id) with rows: its latest slot fired on schedule or caught up, with that
    slot's rows (attempt, outcome, error)."""
    c = attempts.c
    pairs = sa.select(c.job, c.test_id).distinct().subquery("pairs")
    fired = attempts.alias("fired")
    newest = (
        sa.select(fired.c.scheduled_for)
        .where(
            fired.c.job == pairs.c.job,
            fired.c.test_id == pairs.c.test_id,
            fired.c.trigger.in_(("schedule", "catch-up")),
        )  # a manual run is no slot
        .order_by(fired.c.scheduled_for.desc())
        .limit(1)
        .scalar_subquery()
    )
    latest = sa.select(pairs.c.job, pairs.c.test_id, newest.label("slot")).subquery("latest")
    at = attempts.alias("at_slot")
    on_slot = sa.and_(
        at.c.job == latest.c.job,
        at.c.test_id == latest.c.test_id,
        at.c.scheduled_for == latest.c.slot,
        at.c.trigger.in_(("schedule", "catch-up")),
    )
    return sa.select(
        latest.c.job, latest.c.test_id, latest.c.slot, at.c.attempt, at.c.outcome, at.c.error
    ).select_from(latest.outerjoin(at, on_slot))


def _last_missed_query() -> Any:
    """Per (job, test_id): when its latest ``missed`` summary row was written (a never-sent
    row speaks only for its own slot, so it does not count here)."""
    c = attempts.c
    return (
        sa.select(c.job, c.test_id, sa.func.max(c.started_at))
        .where(c.outcome == "missed", sa.not_(c.error.startswith(NEVER_SENT)))
        .group_by(c.job, c.test_id)
    )


_LATEST_FIRED = _latest_fired_query()
_LAST_MISSED = _last_missed_query()


def record_missed(
    engine: Engine,
    *,
    job: Job,
    test_id: str,
    instance: str,
    now: datetime,
    first: datetime,
    last: datetime,
    count: int,
    why: str,
    counted_all: bool = True,
    never_sent: bool = False,
) -> str:
    """Write one ``missed`` row summing up ``count`` slots; returns its ``error`` text.

    ``never_sent``: the slots came due but the daemon stopped before their calls left; the
    error then starts with ``NEVER_SENT`` so that a restart may still catch the slot up.
    """
    more = "" if counted_all else "at least "
    error = f"{more}{count} firing(s) missed from {first.isoformat()} to {last.isoformat()}: {why}"
    if never_sent:
        error = NEVER_SENT + error
    key = history.AttemptKey(
        run_id=uuid.uuid4().hex,
        job=job.name,
        test_id=test_id,
        aid=job.aid,
        trigger="schedule",
        scheduled_for=first,
        attempt=1,
        instance=instance,
    )
    history.record_attempt(
        engine, key, started_at=now, finished_at=now, outcome="missed", error=error
    )
    log.warning('Missed job "%s" test %s: %s', job.name, test_id, error)
    return error
