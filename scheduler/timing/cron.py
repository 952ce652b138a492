"""Cron expressions: check them, expand @aliases, and the cronsim iterator the triggers use.

A leaf: it imports nothing of te-scheduler's, so config checks and triggers can both use it.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from cronsim import CronSim, CronSimError

from scheduler.clock import EPOCH, micros

CRON_ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}


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


def fixed_hour_form(fields: str) -> str:
    """Spell out a wildcard minute when the hour is fixed (``*/20 2 * * *`` -> ``0,20,40 2``).

    cronsim applies Debian's fixed-time DST rules only when neither the minute nor the hour
    field starts with ``*``; SPEC section 5 applies them to every cron with a fixed hour.
    """
    minute, hour, rest = fields.split(" ", 2)
    if not minute.startswith("*") or hour.startswith("*"):
        return fields
    minutes = sorted(CronSim(fields, EPOCH).minutes)
    return f"{','.join(str(m) for m in minutes)} {hour} {rest}"


def _fires_in_some_month(fields: str) -> bool:
    """True when ``fields`` is valid once its month is ``*`` (so only the date is impossible)."""
    minute, hour, day, month, weekday = fields.split()
    try:
        CronSim(f"{minute} {hour} {day} * {weekday}", EPOCH)
        CronSim(f"0 0 1 {month} *", EPOCH)
    except (CronSimError, ValueError):
        return False
    return True


class StepwiseCronSim(CronSim):
    """cronsim that steps minute by minute in elapsed-time mode.

    cronsim (2.7 to 2.9 at least) jumps whole minutes and hours of elapsed time when a
    wildcard-hour schedule advances; across a 30-minute DST shift (Australia/Lord_Howe) that
    jumps over wall times that exist. Fixed-time mode iterates naive wall time and is
    unaffected. This overrides cronsim internals, hence the pin in pyproject.toml.
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


def format_duration(delta: timedelta) -> str:
    """``timedelta(hours=6)`` -> ``6h``; the largest unit that divides it exactly."""
    total = micros(delta)
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if total and total % (size * 1_000_000) == 0:
            return f"{total // (size * 1_000_000)}{unit}"
    return f"{total / 1000:g}ms"
