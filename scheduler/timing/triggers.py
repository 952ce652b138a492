"""Schedule spec -> APScheduler trigger, with Debian cron's rules on DST days.

APScheduler 3.11's own CronTrigger works in wall-clock time, so ``30 2 * * *`` fires twice
on an autumn change in Europe/Berlin. te-scheduler's cron trigger is built on cronsim (the
engine behind healthchecks.io), which follows Debian cron: a job with a fixed hour fires once
per matching local day, a time inside a spring gap fires at the first instant after the gap,
a time inside an autumn repeat fires on its first pass only, and a wildcard hour follows
elapsed time. APScheduler stays the engine that fires jobs; only the arithmetic is ours.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

from apscheduler.triggers.base import BaseTrigger

from scheduler.clock import EPOCH, ONE_US, micros
from scheduler.config.model import Job, Schedule
from scheduler.timing.cron import (
    StepwiseCronSim,
    check_cron,
    fixed_hour_form,
    format_duration,
)


class CronScheduleTrigger(BaseTrigger):
    """Fires on a five-field cron expression in a timezone, with Debian cron's DST rules."""

    def __init__(self, expr: str, tz: str) -> None:
        self.expr = fixed_hour_form(check_cron(expr))
        self.tz = ZoneInfo(tz)

    def get_next_fire_time(
        self, previous_fire_time: datetime | None, now: datetime
    ) -> datetime | None:
        # cronsim yields times strictly after its start; "now" itself may be a fire time.
        after_utc = _utc(previous_fire_time) if previous_fire_time else _utc(now) - ONE_US
        times = StepwiseCronSim(self.expr, after_utc.astimezone(self.tz))
        for candidate in times:
            # In fixed-hour mode cronsim iterates wall time; a start inside the second pass of
            # a repeated hour can yield the (earlier) first pass again, which already happened.
            if candidate.astimezone(timezone.utc) > after_utc:
                return candidate
        return None  # pragma: no cover - CronSim iterates forever

    def __str__(self) -> str:
        return f"cron[{self.expr!r}, {self.tz.key}]"


class EveryTrigger(BaseTrigger):
    """Elapsed-time slots ``anchor + k * interval``; the anchor is ``start`` or the Unix epoch."""

    def __init__(self, every: timedelta, start: datetime | None = None) -> None:
        self.every = every
        self.start = start
        self.anchor = _utc(start) if start else EPOCH

    def get_next_fire_time(
        self, previous_fire_time: datetime | None, now: datetime
    ) -> datetime | None:
        step = micros(self.every)
        if previous_fire_time is not None:
            k = (micros(_utc(previous_fire_time) - self.anchor) // step) + 1
        else:
            # Ceiling division: the first slot at or after now.
            k = -(-micros(_utc(now) - self.anchor) // step)
        if self.start is not None:
            k = max(k, 0)
        return self.anchor + timedelta(microseconds=k * step)

    def __str__(self) -> str:
        return f"every[{self.every}, anchor={self.anchor.isoformat()}]"


class AtTrigger(BaseTrigger):
    """Fires once at ``at``; a time already past never fires (catch-up decides about those)."""

    def __init__(self, at: datetime) -> None:
        self.at = at

    def get_next_fire_time(
        self, previous_fire_time: datetime | None, now: datetime
    ) -> datetime | None:
        if previous_fire_time is not None or _utc(self.at) < _utc(now):
            return None
        return self.at

    def __str__(self) -> str:
        return f"at[{self.at.isoformat()}]"


class SpreadTrigger(BaseTrigger):
    """Another trigger's slots shifted by a fixed ``offset`` (one test's share of a spread)."""

    def __init__(self, inner: BaseTrigger, offset: timedelta) -> None:
        self.inner = inner
        self.offset = offset

    def get_next_fire_time(
        self, previous_fire_time: datetime | None, now: datetime
    ) -> datetime | None:
        previous_slot = _utc(previous_fire_time) - self.offset if previous_fire_time else None
        slot = self.inner.get_next_fire_time(previous_slot, _utc(now) - self.offset)
        # Elapsed time: adding to a zone-aware slot would be wall-clock arithmetic.
        return (_utc(slot) + self.offset).astimezone(slot.tzinfo) if slot else None

    def __str__(self) -> str:
        return f"{self.inner} + {self.offset}"


def build_trigger(schedule: Schedule) -> BaseTrigger:
    """The trigger whose fire times are the schedule's slots (spread not applied)."""
    if schedule.cron:
        return CronScheduleTrigger(schedule.cron, schedule.timezone)
    if schedule.every:
        return EveryTrigger(schedule.every, schedule.start)
    assert schedule.at is not None
    return AtTrigger(schedule.at)


def spread_offsets(job: Job) -> dict[str, timedelta]:
    """Each test's start offset within the job's spread window: ``i * spread / n``.

    The order is a stable hash of job and test, so every instance and every restart agree.
    """
    order = sorted(job.tests, key=lambda test: _stable_hash(job.name, test))
    return {test: job.spread * i / len(order) for i, test in enumerate(order)}


def iter_slots(schedule: Schedule, start: datetime, end: datetime) -> Iterator[datetime]:
    """The schedule's slots from ``start`` (inclusive) to ``end`` (exclusive)."""
    trigger = build_trigger(schedule)
    slot = trigger.get_next_fire_time(None, start)
    while slot is not None and _utc(slot) < _utc(end):
        yield slot
        slot = trigger.get_next_fire_time(slot, start)


def describe(schedule: Schedule) -> str:
    """The schedule in words, for ``validate`` and the startup log."""
    if schedule.cron:
        return f"cron '{schedule.cron}' in {schedule.timezone}"
    if schedule.every:
        anchor = schedule.start.isoformat() if schedule.start else "the Unix epoch"
        return f"every {format_duration(schedule.every)} (aligned to {anchor})"
    assert schedule.at is not None
    return f"once at {schedule.at.isoformat()}"


def _utc(moment: datetime) -> datetime:
    # Aware arithmetic within one zone is wall-clock arithmetic in Python (and drops fold),
    # so every computation here happens in UTC.
    return moment.astimezone(timezone.utc)


def _stable_hash(job: str, test: str) -> bytes:
    return hashlib.sha256(f"{job}\0{test}".encode()).digest()
