"""The single time seam: every "now" in te-scheduler comes from :func:`now`.

Tests replace the clock with :func:`set_clock` (a :class:`FakeClock`), and waits go through
a ``threading.Event`` so shutdown is prompt and nothing sleeps blindly. APScheduler reads the
time through ``datetime.now``; :func:`patch_apscheduler` routes that through this seam too.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone, tzinfo
from typing import Protocol

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
ONE_US = timedelta(microseconds=1)  # the smallest step: "just after" a slot


def micros(delta: timedelta) -> int:
    """``delta`` in whole microseconds, exactly (no float rounding)."""
    return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds


class Clock(Protocol):
    def now(self) -> datetime: ...

    def wait(self, event: threading.Event, seconds: float) -> bool: ...

    def wait_on(self, condition: threading.Condition, seconds: float) -> None: ...


class SystemClock:
    """Wall-clock time in UTC; waits block on the event for real."""

    def now(self) -> datetime:
        return datetime.now(timezone.utc)

    def wait(self, event: threading.Event, seconds: float) -> bool:
        return event.wait(max(0.0, seconds))

    def wait_on(self, condition: threading.Condition, seconds: float) -> None:
        condition.wait(max(0.0, seconds))


class FakeClock:
    """A clock that only moves when told to; waits advance it instead of sleeping."""

    def __init__(self, start: datetime) -> None:
        self._now = start.astimezone(timezone.utc)
        self._lock = threading.Lock()
        self.waits: list[float] = []

    def now(self) -> datetime:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += timedelta(seconds=seconds)

    def set(self, when: datetime) -> None:
        with self._lock:
            self._now = when.astimezone(timezone.utc)

    def wait(self, event: threading.Event, seconds: float) -> bool:
        """Record the wait and jump the clock forward by it, unless the event is already set."""
        if event.is_set():
            return True
        self.waits.append(seconds)
        self.advance(max(0.0, seconds))
        return event.is_set()

    def wait_on(self, condition: threading.Condition, seconds: float) -> None:
        """Jump forward by ``seconds``, briefly letting other threads take the condition."""
        self.waits.append(seconds)
        self.advance(max(0.0, seconds))
        condition.wait(0.001)


_clock: Clock = SystemClock()


def now() -> datetime:
    """The current time, timezone-aware, in UTC."""
    return _clock.now()


def wait(event: threading.Event, seconds: float) -> bool:
    """Wait up to ``seconds`` or until ``event`` is set; True when the event was set."""
    return _clock.wait(event, seconds)


def wait_on(condition: threading.Condition, seconds: float) -> None:
    """Wait on a held ``condition`` for up to ``seconds`` (or until notified)."""
    _clock.wait_on(condition, seconds)


def epoch() -> float:
    """The current time as Unix seconds (for comparing with rate-limit ``Reset`` headers)."""
    return now().timestamp()


def monotonic() -> float:
    """A monotonic reading for measuring durations (never faked: durations are real)."""
    return time.monotonic()


def set_clock(clock: Clock) -> Clock:
    """Install ``clock`` as the time seam and return the previous one (for tests)."""
    global _clock
    previous, _clock = _clock, clock
    return previous


class _SeamDatetime(datetime):
    """``datetime`` whose ``now()`` reads the seam, handed to APScheduler."""

    @classmethod
    def now(cls, tz: tzinfo | None = None) -> datetime:  # type: ignore[override]
        current = now()
        return current.astimezone(tz) if tz else current.astimezone().replace(tzinfo=None)


def patch_apscheduler() -> None:
    """Make APScheduler's scheduler loop read time through this seam."""
    import apscheduler.schedulers.base as base

    base.datetime = _SeamDatetime  # type: ignore[misc]
