"""The single time seam: every "now" in te-scheduler comes from :func:`now`.

Tests replace the clock with :func:`set_clock` (a :class:`FakeClock`), and waits go through
a ``threading.Event`` so shutdown is prompt and nothing sleeps blindly. APScheduler reads the
time through ``datetime.now``; :func:`patch_apscheduler` routes that through this seam too.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone, tzinfo
from typing import Protocol

log = logging.getLogger(__name__)

# A file holding seconds to add to the system's wall clock, re-read when it changes: the seam
# that tests use to step the wall clock under a running daemon while monotonic time runs on.
# (libfaketime would be the natural tool, but on this Python it breaks time.sleep and
# monotonic waits.) Unset in production, where it costs nothing.
WALL_OFFSET_FILE_ENV = "TE_SCHEDULER_TEST_WALL_OFFSET_FILE"

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

    def __init__(self) -> None:
        self._offset_file = os.environ.get(WALL_OFFSET_FILE_ENV) or None
        self._offset, self._offset_stamp = 0.0, 0.0

    def now(self) -> datetime:
        if self._offset_file is None:
            return datetime.now(timezone.utc)
        return datetime.now(timezone.utc) + timedelta(seconds=self._read_offset())

    def _read_offset(self) -> float:
        try:
            stamp = os.stat(self._offset_file).st_mtime_ns  # type: ignore[arg-type]
            if stamp != self._offset_stamp:
                with open(self._offset_file) as handle:  # type: ignore[arg-type]
                    self._offset, self._offset_stamp = float(handle.read().strip() or 0), stamp
        except (OSError, ValueError):
            pass  # keep the last offset: a half-written file must not jump the clock
        return self._offset

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


def boottime() -> float:
    """Seconds since boot, counting time suspended (monotonic time stops while suspended)."""
    return time.clock_gettime(getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC))


@dataclass(frozen=True)
class Jump:
    """The wall clock moved ``seconds`` (negative: back) against time really elapsed.

    ``step`` is a clock step (NTP, an operator, a VM restored from a snapshot): the wall clock
    moved and time did not pass. Otherwise the machine was suspended: monotonic time stood
    still while the wall clock (and boot time) went on.
    """

    seconds: float
    step: bool
    at: datetime  # the wall time just after the jump

    def describe(self) -> str:
        way = "forward" if self.seconds > 0 else "back"
        what = "the wall clock stepped" if self.step else "the machine was suspended and resumed,"
        return f"{what} {way} by {_span(abs(self.seconds))} at {self.at.isoformat()}"


class JumpWatch:
    """Notices the wall clock jumping: its distance to monotonic and boot time changes.

    Thread-safe and cheap. ``check()`` (the daemon's main loop) hands out each jump once,
    however it was noticed; ``explain()`` (a firing that came late) may notice one first,
    and the jump still reaches ``check()``. The last ten stay in ``recent``.
    """

    THRESHOLD = 2.0  # seconds; smaller moves are NTP slewing, scheduling noise or rounding

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._base = self._read()
        self.recent: list[Jump] = []
        self._unreported: list[Jump] = []

    @staticmethod
    def _read() -> tuple[float, float]:
        wall = now().timestamp()
        return wall - time.monotonic(), wall - boottime()

    def check(self) -> Jump | None:
        """The oldest jump not handed out yet (moves of THRESHOLD or more), or None."""
        with self._lock:
            self._detect()
            return self._unreported.pop(0) if self._unreported else None

    def explain(self, since: datetime) -> Jump | None:
        """The latest forward jump after ``since``, to say why a slot came late."""
        with self._lock:
            self._detect()
            return next((j for j in reversed(self.recent) if j.at > since and j.seconds > 0), None)

    def _detect(self) -> None:
        """Compare with the last reading (the caller holds the lock)."""
        mono, boot = self._read()
        moved = mono - self._base[0]
        stepped = abs(boot - self._base[1]) >= self.THRESHOLD
        # Re-based on every reading, so NTP's slow slewing never adds up to a "jump".
        self._base = (mono, boot)
        if abs(moved) >= self.THRESHOLD:
            jump = Jump(round(moved, 3), stepped, now())
            self.recent = [*self.recent[-9:], jump]
            self._unreported.append(jump)


def _span(seconds: float) -> str:
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{seconds:.1f}s"


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

    base.datetime = _SeamDatetime
