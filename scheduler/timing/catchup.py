"""What to do about slots missed while the daemon was down (or too late to run).

APScheduler's memory job store forgets everything at exit, so the history table is the
record of what ran, as ``lastScheduleTime`` is for a Kubernetes CronJob. The rule (SPEC
section 5): the latest missed slot runs once as ``catch-up`` if it is within ``catch_up``;
every other missed slot is summed up in one ``missed`` row per test.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from datetime import datetime, timedelta

from scheduler.clock import ONE_US
from scheduler.config.model import Schedule
from scheduler.timing.triggers import iter_slots

# Counting missed slots of a fast schedule after a long outage could take a while; past this
# many the count is reported as a lower bound (the latest slots are still found exactly).
MAX_COUNTED = 100_000
_FIRST_LOOK_BACK = timedelta(minutes=1)


@dataclass(frozen=True)
class CatchUp:
    """The verdict for one job: the slot to run now (if any) and the slots given up on."""

    run: datetime | None
    missed_first: datetime | None = None
    missed_last: datetime | None = None
    missed_count: int = 0
    counted_all: bool = True  # False: missed_count is a lower bound


def plan_catch_up(
    schedule: Schedule, last_slot: datetime | None, now: datetime, window: timedelta
) -> CatchUp:
    """Decide for the slots after ``last_slot`` and before ``now``.

    A job that never fired (``last_slot`` None) has nothing to catch up.
    """
    if last_slot is None:
        return CatchUp(run=None)
    return verdict(missed_slots(schedule, last_slot + ONE_US, now), now, window)


@dataclass(frozen=True)
class Missed:
    """A run of missed slots, summarised: the first, the last two, and how many."""

    first: datetime
    before_last: datetime | None
    last: datetime
    count: int
    counted_all: bool = True  # False: count stopped at MAX_COUNTED


def missed_slots(schedule: Schedule, start: datetime, end: datetime) -> Missed | None:
    """Summarise the schedule's slots in [start, end) without keeping them all."""
    first = before_last = last = None
    count = 0
    for slot in iter_slots(schedule, start, end):
        first = first or slot
        before_last, last = last, slot
        count += 1
        if count >= MAX_COUNTED:
            # Stop counting, but the latest slots decide what runs: find them from the end.
            tail = latest_slots(schedule, slot, end)
            if len(tail) == 2:
                before_last, last = tail
            return Missed(first, before_last, last, count, counted_all=len(tail) < 2)
    if first is None or last is None:
        return None
    return Missed(first, before_last, last, count)


def latest_slots(schedule: Schedule, start: datetime, end: datetime) -> list[datetime]:
    """The last two (or fewer) slots in [start, end), looking back from ``end`` in doubling steps.

    Only a stretch holding about two slots is iterated, however long [start, end) is.
    """
    look_back = _FIRST_LOOK_BACK
    while True:
        lower = max(start, end - look_back)
        tail = deque(iter_slots(schedule, lower, end), maxlen=2)
        if len(tail) == 2 or lower == start:
            return list(tail)
        look_back *= 2


def verdict(missed: Missed | None, now: datetime, window: timedelta) -> CatchUp:
    """Run the latest missed slot if it is within ``window``; give up on the rest."""
    if missed is None:
        return CatchUp(run=None)
    run = missed.last if window > timedelta(0) and now - missed.last <= window else None
    given_up = missed.count - (1 if run else 0)
    if given_up == 0:
        return CatchUp(run=run)
    last_given_up = missed.before_last if run else missed.last
    assert last_given_up is not None
    return CatchUp(run, missed.first, last_given_up, given_up, missed.counted_all)
