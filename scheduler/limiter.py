"""Per-token pacing: the configured budget, lowered by what the server's rate-limit headers say.

The ThousandEyes windows are fixed and open with the first request of a batch, so a token
bucket that refills continuously would draw 429s. The limiter instead mirrors the windows:

* the configured budget (``api.rate_limit``) is a local fixed window: at most ``count`` calls
  per ``period``, the window opening with the first call after the previous one closed;
* each server bucket (organization, instant-test) is tracked from the latest response: its
  ``Remaining`` minus the calls sent since, until its ``Reset`` passes;
* while nothing is known about a server bucket, one call goes first as a probe, so a burst is
  never fired blind;
* a 429 pauses every call on the token until the later ``Reset`` of the two header sets.

Waiters are served strictly in the order of their ``order`` key (the firing's scheduled
time), so a burst queues in schedule order and nothing is dropped.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from scheduler import clock
from scheduler.client import CallResult, RateLimitBucket
from scheduler.config import Rate

# The server rounds Reset to whole seconds and its window opens when our first request
# arrives, slightly after we sent it; waiting this much past a Reset avoids racing it.
RESET_MARGIN = 0.25
# How long a 429 pauses the token when the answer carries no usable Reset header.
FALLBACK_PAUSE = 60.0
# Cap on any single wait, so a wild Reset (a year ahead) cannot freeze the daemon.
MAX_PAUSE = 3600.0


@dataclass
class _ServerBucket:
    limit: int | None = None
    remaining: int | None = None  # estimate: last reported Remaining minus calls sent since
    reset: float | None = None  # when the current window closes (reported, or estimated)
    opened: float | None = None  # when we sent the first call of the current window
    period: float = 60.0  # the window's length, learned from Reset; the API documents 1 min
    reset_guessed: bool = False  # reset is our estimate (now + period), not yet reported

    def allows(self, now: float) -> bool:
        if self.reset is None or now >= self.reset + RESET_MARGIN:
            # Rolled over (the next call opens a new window), or no Reset was ever reported:
            # then only the budget paces us and a 429 will tell us more.
            return True
        return self.remaining is None or self.remaining > 0

    def blocked_until(self) -> float:
        return (self.reset or 0.0) + RESET_MARGIN

    def on_send(self, now: float) -> None:
        if self.reset is not None and now >= self.reset + RESET_MARGIN:
            # A new window opens with this call. Its size is the last known limit; until an
            # answer reports its Reset, assume it lasts as long as the previous one.
            self.remaining, self.opened = self.limit, now
            self.reset, self.reset_guessed = now + self.period, True
        if self.remaining is not None:
            self.remaining -= 1

    def on_answer(self, info: RateLimitBucket, in_flight: int, now: float) -> None:
        if info.limit is not None:
            self.limit = info.limit
        if info.reset is not None and info.reset + RESET_MARGIN <= now:
            # A window that has already closed (a stale answer, a proxy's cached headers): its
            # Remaining says nothing about the current one and must not freeze the token.
            return
        # Within a window we know about, our own count (decremented on every send) is exact
        # for our calls and answers arrive out of order, so the estimate only goes down. An
        # answer from a window we did not see open (another client rolled it) replaces the
        # estimate, less the calls still in flight that it may not count yet.
        unseen = info.reset is not None and (
            self.reset is None or (not self.reset_guessed and info.reset > self.reset + 1)
        )
        if info.remaining is not None:
            if self.remaining is None or unseen:
                self.remaining = max(0, info.remaining - in_flight)
            else:
                self.remaining = min(self.remaining, info.remaining)
        if info.reset is not None and (unseen or self.reset_guessed):
            if self.opened is not None and info.reset > self.opened:
                self.period = info.reset - self.opened
            self.reset, self.reset_guessed = info.reset, False
        if self.opened is None:
            self.opened = now


class SharedView(Protocol):
    """Rate-limit state shared with other instances (``instances.SharedLimits``)."""

    def publish(self, buckets: Iterable[RateLimitBucket], paused_until: float | None) -> None: ...

    def read(self) -> Mapping[str, Any]: ...


@dataclass
class Permit:
    """One granted call; hand it back to :meth:`Limiter.complete` with the result."""

    order: tuple[datetime, int]
    sent_at: float = 0.0


@dataclass(order=True)
class _Waiter:
    order: tuple[datetime, int]
    ready: threading.Event = field(compare=False, default_factory=threading.Event)


class Limiter:
    """Paces every call that shares one token."""

    def __init__(
        self, budget: Rate, stop: threading.Event, shared: SharedView | None = None
    ) -> None:
        self.budget = budget
        self._stop = stop
        self._shared = shared
        self._lock = threading.Condition()
        self._queue: list[_Waiter] = []
        self._seq = itertools.count()
        self._window_start: float | None = None
        self._window_used = 0
        self._buckets: dict[str, _ServerBucket] = {}
        self._in_flight = 0
        self._answered = False  # has any call on this token been answered yet?
        self._paused_until = 0.0

    # -- public -----------------------------------------------------------------------
    def acquire(self, scheduled_for: datetime) -> Permit | None:
        """Block until this call may be sent; None when the daemon is stopping."""
        waiter = _Waiter((scheduled_for, next(self._seq)))
        with self._lock:
            heapq.heappush(self._queue, waiter)
            try:
                while not self._stop.is_set():
                    if self._queue[0] is not waiter:
                        self._lock.wait(1.0)  # not our turn; notified when the head moves
                        continue
                    if self._is_probing() and self._in_flight:
                        self._lock.wait(1.0)  # the probe's answer notifies us
                        continue
                    self._merge_shared(clock.epoch())
                    delay = self._delay(clock.epoch())
                    if delay <= 0:
                        return self._grant(waiter)
                    clock.wait_on(self._lock, min(delay, 1.0))
                return None
            finally:
                if waiter in self._queue:
                    self._queue.remove(waiter)
                    heapq.heapify(self._queue)
                self._lock.notify_all()

    def complete(self, permit: Permit, result: CallResult | None) -> None:
        """Learn from the answer (headers, 429) and free the in-flight slot."""
        limited = result is not None and result.status_code == 429
        with self._lock:
            self._in_flight -= 1
            if result is not None and result.status_code is not None:
                self._answered = True
                self._learn(result.buckets)
                if limited:
                    self._pause(result.buckets)
            paused_until = self._paused_until if limited else None
            self._lock.notify_all()
        if self._shared and result is not None and (result.buckets or limited):
            self._shared.publish(result.buckets, paused_until)  # outside the lock: a DB write

    def wake(self) -> None:
        """Make waiters re-check (used on shutdown)."""
        with self._lock:
            self._lock.notify_all()

    def paused_until(self) -> float:
        with self._lock:
            return self._paused_until

    def snapshot(self) -> dict[str, int | None]:
        """Remaining calls per bucket as last estimated, for the metrics gauge."""
        with self._lock:
            view: dict[str, int | None] = {name: b.remaining for name, b in self._buckets.items()}
            view["budget"] = self.budget.count - self._window_used
            return view

    # -- internals (caller holds the lock) ---------------------------------------------
    def _delay(self, now: float) -> float:
        """Seconds until the head of the queue may go; 0 or less means now."""
        waits = [self._paused_until - now]
        if self._window_start is not None and now < self._window_start + self.budget.period:
            if self._window_used >= self.budget.count:
                waits.append(self._window_start + self.budget.period - now)
        for bucket in self._buckets.values():
            if not bucket.allows(now):
                waits.append(bucket.blocked_until() - now)
        return max(waits)

    def _is_probing(self) -> bool:
        # Nothing learned yet about the server's limits: one call at a time until one answers.
        return not self._answered

    def _grant(self, waiter: _Waiter) -> Permit:
        now = clock.epoch()
        if self._window_start is None or now >= self._window_start + self.budget.period:
            self._window_start, self._window_used = now, 0
        self._window_used += 1
        for bucket in self._buckets.values():
            bucket.on_send(now)
        self._in_flight += 1
        heapq.heappop(self._queue)
        return Permit(waiter.order, now)

    def _learn(self, reported: Iterable[RateLimitBucket]) -> None:
        now = clock.epoch()
        for info in reported:
            self._buckets.setdefault(info.name, _ServerBucket()).on_answer(
                info, self._in_flight, now
            )

    def _merge_shared(self, now: float) -> None:
        """Fold in what other instances on this token learned (their answers and 429s)."""
        if self._shared is None:
            return
        for name, view in self._shared.read().items():
            if view.paused_until is not None and view.paused_until > now:
                self._paused_until = max(self._paused_until, min(view.paused_until,
                                                                 now + MAX_PAUSE))
            if view.remaining is not None and view.reset is not None and name != "pause":
                bucket = self._buckets.setdefault(name, _ServerBucket())
                info = RateLimitBucket(name, None, view.remaining, view.reset)
                bucket.on_answer(info, self._in_flight, now)

    def _pause(self, reported: Iterable[RateLimitBucket]) -> None:
        now = clock.epoch()
        resets = [b.reset for b in reported if b.reset is not None and b.reset > now]
        until = max(resets) + RESET_MARGIN if resets else now + min(FALLBACK_PAUSE, MAX_PAUSE)
        self._paused_until = max(self._paused_until, min(until, now + MAX_PAUSE))
