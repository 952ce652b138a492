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
from cronsim import CronSim, CronSimError

from scheduler.config import Job, Schedule

CRON_ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_ONE_US = timedelta(microseconds=1)


def expand_cron(expr: str) -> str:
    """The five-field form of ``expr`` (an @alias expanded, whitespace normalised)."""
    text = " ".join(expr.split())
    return CRON_ALIASES.get(text.lower(), text)


def check_cron(expr: str) -> str:
    """Return the five-field form of ``expr`` or raise ValueError saying what is wrong."""
    fields = expand_cron(expr)
    if expr.strip().startswith("@") and fields == " ".join(expr.split()):
        raise ValueError(f"unknown alias {expr.strip()!r}; use one of {', '.join(CRON_ALIASES)}")
    if len(fields.split()) != 5:
        raise ValueError(
            f"cron needs 5 fields (minute hour day-of-month month day-of-week), "
            f"got {len(fields.split())}"
        )
    try:
        first = next(CronSim(fields, datetime(2000, 1, 1, tzinfo=timezone.utc)))
    except (CronSimError, StopIteration, ValueError, OverflowError) as exc:
        if _fires_in_some_month(fields):
            raise ValueError(
                f"cron expression {expr!r} can never fire: that day of the month does not "
                "exist in the months it names"
            ) from None
        raise ValueError(f"invalid cron expression {expr!r}: {exc or 'can never fire'}") from None
    if first.year > 2100:
        raise ValueError(f"cron expression {expr!r} can never fire")
    return fields


def _fixed_hour_form(fields: str) -> str:
    """Spell out a wildcard minute when the hour is fixed (``*/20 2 * * *`` -> ``0,20,40 2``).

    cronsim applies Debian's fixed-time DST rules only when neither the minute nor the hour
    field starts with ``*``; SPEC section 5 applies them to every cron with a fixed hour.
    """
    minute, hour, rest = fields.split(" ", 2)
    if not minute.startswith("*") or hour.startswith("*"):
        return fields
    minutes = sorted(CronSim(fields, _EPOCH).minutes)
    return f"{','.join(str(m) for m in minutes)} {hour} {rest}"


def _fires_in_some_month(fields: str) -> bool:
    """True when ``fields`` is valid once its month is ``*`` (so only the date is impossible)."""
    minute, hour, day, month, weekday = fields.split()
    try:
        CronSim(f"{minute} {hour} {day} * {weekday}", _EPOCH)
        CronSim(f"0 0 1 {month} *", _EPOCH)
    except (CronSimError, ValueError):
        return False
    return True


class _CronSim(CronSim):
    """cronsim that steps minute by minute in elapsed-time mode.

    cronsim 2.8 jumps whole minutes and hours of elapsed time when a wildcard-hour schedule
    advances; across a 30-minute DST shift (Australia/Lord_Howe) that jumps over wall times
    that exist. Fixed-time mode iterates naive wall time and is unaffected.
    """

    def advance_minute(self) -> bool:
        if self.fixup_tz is not None:
            return bool(super().advance_minute())
        if self.dt.minute in self.minutes:
            return False
        self.dt = self.dt.replace(second=0)
        while self.dt.minute not in self.minutes:
            self.tick(seconds=60)
            if self.dt.minute == 0:
                break  # re-check month, day and hour
        return True

    def advance_hour(self) -> bool:
        if self.fixup_tz is not None:
            return bool(super().advance_hour())
        if self.dt.hour in self.hours:
            return False
        self.dt = self.dt.replace(second=0)
        while self.dt.hour not in self.hours:
            self.tick(seconds=60)
            if self.dt.hour == 0:
                break  # re-check month and day
        return True


class CronScheduleTrigger(BaseTrigger):
    """Fires on a five-field cron expression in a timezone, with Debian cron's DST rules."""

    def __init__(self, expr: str, tz: str) -> None:
        self.expr = _fixed_hour_form(check_cron(expr))
        self.tz = ZoneInfo(tz)

    def get_next_fire_time(
        self, previous_fire_time: datetime | None, now: datetime
    ) -> datetime | None:
        # cronsim yields times strictly after its start; "now" itself may be a fire time.
        after_utc = _utc(previous_fire_time) if previous_fire_time else _utc(now) - _ONE_US
        times = _CronSim(self.expr, after_utc.astimezone(self.tz))
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
        self.anchor = _utc(start) if start else _EPOCH

    def get_next_fire_time(
        self, previous_fire_time: datetime | None, now: datetime
    ) -> datetime | None:
        step = _micros(self.every)
        if previous_fire_time is not None:
            k = (_micros(_utc(previous_fire_time) - self.anchor) // step) + 1
        else:
            # Ceiling division: the first slot at or after now.
            k = -(-_micros(_utc(now) - self.anchor) // step)
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


def format_duration(delta: timedelta) -> str:
    """``timedelta(hours=6)`` -> ``6h``; the largest unit that divides it exactly."""
    micros = _micros(delta)
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if micros and micros % (size * 1_000_000) == 0:
            return f"{micros // (size * 1_000_000)}{unit}"
    return f"{micros / 1000:g}ms"


def _utc(moment: datetime) -> datetime:
    # Aware arithmetic within one zone is wall-clock arithmetic in Python (and drops fold),
    # so every computation here happens in UTC.
    return moment.astimezone(timezone.utc)


def _micros(delta: timedelta) -> int:
    return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds


def _stable_hash(job: str, test: str) -> bytes:
    return hashlib.sha256(f"{job}\0{test}".encode()).digest()
