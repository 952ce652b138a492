"""Per-token pacing: the configured budget, lowered by what the server's rate-limit headers say.

The ThousandEyes windows are fixed and open with the first request of a batch, so a token
bucket that refills continuously would draw 429s. The limiter instead mirrors the windows:

* the configured budget (``api.rate_limit``) is a local fixed window: at most ``count`` calls
  per ``period``, the window opening with the first call after the previous one closed;
* each server bucket (organization, instant-test) is tracked from the latest response: its
  ``Remaining`` minus the calls sent since, until the window ends: by its ``Reset`` (a whole
  second, so up to a second late) or, once the window's length is known, by that length
  after our first answer counted in it (see ``_ServerBucket``);
* while nothing is known about a server bucket, one call goes first as a probe, so a burst is
  never fired blind; a ``Reset`` more than a window ahead is not waited for past one window,
  after which one call probes it;
* a 429 pauses every call on the token until the later ``Reset`` of the two header sets; a
  ``Reset`` more than two windows ahead (years, ``1e308``) is not believed and pauses for one
  window (the API's minute, or ``rate_limit``'s period when longer), with a warning.

Waiters are served strictly in the order of their ``order`` key (the firing's scheduled
time), so a burst queues in schedule order and nothing is dropped.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from scheduler import clock
from scheduler.api.client import CallResult, RateLimitBucket
from scheduler.config.model import Rate

log = logging.getLogger(__name__)

# Past a Reset: the server rounds Reset to whole seconds and its window opens when our first
# request arrives, slightly after we sent it; waiting this much past a Reset avoids racing it.
RESET_MARGIN = 0.25
# Past the early end of a window (see _ServerBucket.closes_at): only clock drift and the
# server's timestamp granularity are left to cover there.
EARLY_MARGIN = 0.1
# How long a 429 pauses the token when the answer carries no usable Reset header.
FALLBACK_PAUSE = 60.0
# Organization-bucket slots a results read leaves to run calls (SPEC 7: reads never delay one).
READ_RESERVE = 2
# The API's documented window for both buckets (one minute).
API_WINDOW = 60.0


@dataclass
class _ServerBucket:
    """One server bucket as seen from this token's answers.

    A window ends by its ``Reset``, and, when the window's length ``W`` is known, no later than
    ``W`` after our earliest answer counted in it: the window began when its first call
    arrived, before any answer counted in it was sent. Whole-second Resets make the first
    bound up to a second late; the second has no rounding in it and reads only our own clock.
    It assumes what the API documents, a window lasting W from its first request's arrival;
    a server that ran its windows to the whole-second Reset would answer the early call with
    a 429, after which this bucket waits for Reset again.
    """

    limit: int | None = None
    remaining: int | None = None  # estimate: last reported Remaining minus calls sent since
    reset: float | None = None  # when the current window closes (reported, or estimated)
    reset_guessed: bool = False  # reset is our estimate (now + period), not yet reported
    first_answer: float | None = None  # our earliest answer counted in the current window
    # Bounds on the window length proven by windows our own call opened (Remaining was
    # Limit - 1): it arrived after we sent it and before we read the answer, and the whole-
    # second Reset is at most a second after the true end.
    longest: float | None = None
    shortest: float = 0.0
    early: bool = True  # may windows close before Reset? Off after a 429 that followed one
    opened_early: bool = False  # the current window was opened before its Reset
    probe_at: float | None = None  # a Reset too far ahead is not waited for past this
    probing: bool = False  # a probe through a far Reset is out: its answer is believed as is
    opened_at: float | None = None  # when our call opened the current window
    closed: float | None = None  # the Reset of the window that call closed
    straddling: int = 0  # calls in flight when it opened, each holding a slot until answered

    @property
    def period(self) -> float:
        """The window length to assume for a window we opened and know nothing else about."""
        return self.longest if self.longest is not None else API_WINDOW

    def window(self, configured: float) -> float | None:
        """The window length that may bound a window's end, or None while not known.

        The configured period is believed unless a window we opened proved the server's
        longer (the period then differs from the server's); the proven bound holds either way.
        """
        if self.longest is None:
            return None
        length = min(configured, self.longest) if configured > self.shortest else self.longest
        return length if length >= 1.0 else None  # below 1 s, Resets cannot tell windows apart

    def closes_at(self, configured: float, in_flight: int) -> float | None:
        """When the next call opens a new window; None when no window is known."""
        if self.reset is None:
            return None
        closes = self.reset + RESET_MARGIN
        length = self.window(configured)
        # Early only with nothing in flight: a call sent before the end but arriving after it
        # would count in the next window without our knowing.
        if self.early and length and self.first_answer is not None and in_flight == 0:
            closes = min(closes, self.first_answer + length + EARLY_MARGIN)
        return closes

    def wait(self, now: float, configured: float, in_flight: int) -> float:
        """Seconds until this bucket lets the next call go; 0 or less means now."""
        closes = self.closes_at(configured, in_flight)
        if closes is None or now >= closes or self.remaining is None or self.remaining > 0:
            # Rolled over (the next call opens a new window), room left, or nothing known:
            # then only the budget paces us and a 429 would tell us more.
            return 0.0
        if self.probe_at is not None:
            return min(closes, self.probe_at) - now
        return closes - now

    def on_send(self, now: float, configured: float, in_flight: int) -> None:
        closes = self.closes_at(configured, in_flight)
        if closes is not None and now >= closes:
            # A new window opens with this call. Its size is the last known limit; until an
            # answer reports its Reset, assume it lasts as long as windows do.
            assert self.reset is not None
            self.opened_early, self.closed = now < self.reset + RESET_MARGIN, self.reset
            self.first_answer, self.probe_at = None, None
            self.reset, self.reset_guessed = now + self.period, True
            # Calls still in flight may reach the server after the old window ended and count
            # in this one: each keeps a slot until its answer says which window it was in.
            self.remaining = None if self.limit is None else self.limit - in_flight
            self.opened_at, self.straddling = now, in_flight
        elif self._may_probe(now):
            # One call through a Reset too far ahead to be believed; its answer tells.
            self.probing, self.probe_at = True, now + _far(configured)
            return
        if self.remaining is not None:
            self.remaining -= 1

    def _may_probe(self, now: float) -> bool:
        exhausted = self.remaining is not None and self.remaining <= 0
        return exhausted and self.probe_at is not None and now >= self.probe_at

    def on_answer(
        self,
        info: RateLimitBucket,
        in_flight: int,
        now: float,
        sent_at: float | None,
        configured: float,
    ) -> None:
        """Learn from one answer; ``sent_at`` is None for another instance's (shared) answer."""
        if info.limit is not None:
            self.limit = info.limit
        if sent_at is not None:
            self._settle_straddler(info, sent_at)
        if info.reset is not None and (
            info.reset + RESET_MARGIN <= now
            or (self.closed is not None and info.reset <= self.closed)
        ):
            # A window that has already closed (a stale answer, a proxy's cached headers, an
            # instance's answer from before we opened the next): its Remaining says nothing
            # about the current one and must not freeze the token.
            return
        own = sent_at is not None
        if sent_at is not None:
            self._measure(info, sent_at, now, configured)
        # Within a window we know about, our own count (decremented on every send) is exact
        # for our calls and answers arrive out of order, so the estimate only goes down. An
        # answer from a window we did not see open (another client rolled it) replaces the
        # estimate, less the calls still in flight that it may not count yet; so does the
        # answer to a probe.
        unseen = info.reset is not None and (
            self.reset is None or (not self.reset_guessed and info.reset > self.reset + 1)
        )
        believe = unseen or (own and self.probing)
        if info.remaining is not None:
            if self.remaining is None or believe:
                self.remaining = max(0, info.remaining - in_flight)
            else:
                self.remaining = min(self.remaining, info.remaining)
        if info.reset is not None and (believe or self.reset_guessed):
            self.reset, self.reset_guessed = info.reset, False
            self.first_answer = now if own else None
            far = _far(configured)
            self.probe_at = now + far if info.reset - now > far else None
        elif own and info.reset is not None and self.reset is not None:
            if abs(info.reset - self.reset) <= 1 and self.first_answer is None:
                self.first_answer = now
        if own:
            self.probing = False

    def _settle_straddler(self, info: RateLimitBucket, sent_at: float) -> None:
        """Free the slot a call in flight at the window's opening held, if it counted before."""
        if not self.straddling or self.opened_at is None or sent_at >= self.opened_at:
            return
        self.straddling -= 1
        earlier = info.reset is not None and self.reset is not None and info.reset < self.reset - 1
        if earlier and self.remaining is not None:
            self.remaining += 1

    def _measure(
        self, info: RateLimitBucket, sent_at: float, now: float, configured: float
    ) -> None:
        """Narrow the window length's bounds when this answer's call opened its window."""
        limit = info.limit if info.limit is not None else self.limit
        if limit is None or info.remaining != limit - 1 or info.reset is None:
            return
        if info.reset - now > _far(configured):
            return  # a wild Reset proves nothing
        longest = info.reset - sent_at
        self.longest = longest if self.longest is None else min(self.longest, longest)
        self.shortest = max(self.shortest, info.reset - 1 - now)


def _far(configured: float) -> float:
    """How far ahead a believable Reset can be: one window (configured or documented)."""
    return max(configured, API_WINDOW) + 1 + RESET_MARGIN


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
    """A call waiting for its turn; ``turn`` is notified when it may be at the head."""

    order: tuple[datetime, int]
    turn: threading.Condition = field(compare=False)


class Limiter:
    """Paces every call that shares one token."""

    def __init__(
        self, budget: Rate, stop: threading.Event, shared: SharedView | None = None
    ) -> None:
        self.budget = budget
        self._stop = stop
        self._shared = shared
        # One lock; a condition per waiter on it, so a grant or an answer wakes only the
        # head of the queue. A shared notify_all woke every waiting firing thread on every
        # call (dozens of GIL hand-offs per attempt in a burst of 1,000).
        self._mutex = threading.RLock()
        self._lock = threading.Condition(self._mutex)
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
        waiter = _Waiter((scheduled_for, next(self._seq)), threading.Condition(self._mutex))
        with self._lock:
            heapq.heappush(self._queue, waiter)
            try:
                while not self._stop.is_set():
                    if self._queue[0] is not waiter:
                        waiter.turn.wait(1.0)  # not our turn; woken on becoming the head
                        continue
                    if self._is_probing() and self._in_flight:
                        waiter.turn.wait(1.0)  # the probe's answer wakes the head
                        continue
                    self._merge_shared(clock.epoch())
                    delay = self._delay(clock.epoch())
                    if delay <= 0:
                        return self._grant(waiter)
                    clock.wait_on(waiter.turn, min(delay, 1.0))
                return None
            finally:
                if waiter in self._queue:  # stopping (granted waiters are already popped)
                    self._queue.remove(waiter)
                    heapq.heapify(self._queue)
                self._wake_head()

    def try_acquire(self, scheduled_for: datetime) -> Permit | None:
        """A permit now if one is free without waiting (nobody queued, room left), else None."""
        with self._lock:
            if self._stop.is_set() or self._queue or (self._is_probing() and self._in_flight):
                return None
            self._merge_shared(clock.epoch())
            if self._delay(clock.epoch()) > 0:
                return None
            waiter = _Waiter((scheduled_for, next(self._seq)), threading.Condition(self._mutex))
            heapq.heappush(self._queue, waiter)
            return self._grant(waiter)

    def complete(self, permit: Permit, result: CallResult | None) -> None:
        """Learn from the answer (headers, 429) and free the in-flight slot."""
        limited = result is not None and result.status_code == 429
        with self._lock:
            self._in_flight -= 1
            if result is not None and result.status_code is not None:
                self._answered = True
                self._learn(result.buckets, permit.sent_at)
                if limited:
                    self._distrust_early()
                    self._pause(result.buckets)
            paused_until = self._paused_until if limited else None
            self._wake_head()
        if self._shared and result is not None and (result.buckets or limited):
            self._shared.publish(result.buckets, paused_until)  # outside the lock: a DB write

    def wake(self) -> None:
        """Make waiters re-check (used on shutdown)."""
        with self._lock:
            for waiter in self._queue:
                waiter.turn.notify()

    def paused_until(self) -> float:
        with self._lock:
            return self._paused_until

    def snapshot(self) -> dict[str, int | None]:
        """Remaining calls per bucket as last estimated, for the metrics gauge."""
        with self._lock:
            view: dict[str, int | None] = {name: b.remaining for name, b in self._buckets.items()}
            view["budget"] = self.budget.count - self._window_used
            return view

    # -- results reads (SPEC 7): the organization bucket only, below every run call -------
    def try_read(self) -> bool:
        """Take an organization-bucket slot for a results read, now or never; never blocks.

        A read goes only when no run call waits, the token is not paused and the bucket
        keeps READ_RESERVE slots for run calls, so a read never delays one.
        """
        with self._lock:
            now = clock.epoch()
            if self._queue or self._paused_until > now:
                return False
            self._merge_shared(now)
            org = self._buckets.get("organization")
            if org is None:
                return True
            closes = org.closes_at(self.budget.period, self._in_flight)
            is_open = closes is not None and now < closes
            if is_open and org.remaining is not None and org.remaining <= READ_RESERVE:
                return False
            org.on_send(now, self.budget.period, self._in_flight)
            return True

    def complete_read(self, status: int | None, buckets: Iterable[RateLimitBucket]) -> None:
        """Learn the organization bucket from a read's answer; a 429 pauses the token."""
        org = tuple(b for b in buckets if b.name == "organization")
        limited = status == 429
        with self._lock:
            now = clock.epoch()
            for info in org:
                self._buckets.setdefault(info.name, _ServerBucket()).on_answer(
                    info, self._in_flight, now, None, self.budget.period
                )
            if limited:
                self._pause(org)
            paused_until = self._paused_until if limited else None
        if self._shared and (org or limited):
            self._shared.publish(org, paused_until)  # outside the lock: a DB write

    # -- internals (caller holds the lock) ---------------------------------------------
    def _delay(self, now: float) -> float:
        """Seconds until the head of the queue may go; 0 or less means now."""
        waits = [self._paused_until - now]
        if self._window_start is not None and now < self._window_start + self.budget.period:
            if self._window_used >= self.budget.count:
                waits.append(self._window_start + self.budget.period - now)
        for bucket in self._buckets.values():
            waits.append(bucket.wait(now, self.budget.period, self._in_flight))
        return max(waits)

    def _is_probing(self) -> bool:
        # Nothing learned yet about the server's limits: one call at a time until one answers.
        return not self._answered

    def _wake_head(self) -> None:
        """Let the head of the queue (if any) re-check; call with the lock held."""
        if self._queue:
            self._queue[0].turn.notify()

    def _grant(self, waiter: _Waiter) -> Permit:
        now = clock.epoch()
        if self._window_start is None or now >= self._window_start + self.budget.period:
            self._window_start, self._window_used = now, 0
        self._window_used += 1
        for bucket in self._buckets.values():
            bucket.on_send(now, self.budget.period, self._in_flight)
        self._in_flight += 1
        heapq.heappop(self._queue)
        return Permit(waiter.order, now)

    def _learn(self, reported: Iterable[RateLimitBucket], sent_at: float) -> None:
        now = clock.epoch()
        for info in reported:
            self._buckets.setdefault(info.name, _ServerBucket()).on_answer(
                info, self._in_flight, now, sent_at, self.budget.period
            )

    def _distrust_early(self) -> None:
        """A 429 in a window opened before its Reset: the window length was wrong somehow."""
        for name, bucket in self._buckets.items():
            if bucket.early and bucket.opened_early:
                bucket.early = False
                log.warning(
                    "A 429 followed a %s window opened before its Reset; waiting for Reset "
                    "from now on",
                    name,
                )

    def _merge_shared(self, now: float) -> None:
        """Fold in what other instances on this token learned (their answers and 429s)."""
        if self._shared is None:
            return
        for name, view in self._shared.read().items():
            if view.paused_until is not None and view.paused_until > now:
                # Each instance caps its own pauses (see _pause); this caps an older one's.
                longest = 2 * self._window() + RESET_MARGIN
                self._paused_until = max(self._paused_until, min(view.paused_until, now + longest))
            if view.remaining is not None and view.reset is not None and name != "pause":
                bucket = self._buckets.setdefault(name, _ServerBucket())
                info = RateLimitBucket(name, None, view.remaining, view.reset)
                bucket.on_answer(info, self._in_flight, now, None, self.budget.period)

    def _window(self) -> float:
        """The longest window a 429 may make us wait for: the API's, or the budget's period."""
        return max(API_WINDOW, self.budget.period)

    def _pause(self, reported: Iterable[RateLimitBucket]) -> None:
        now = clock.epoch()
        resets = [b.reset for b in reported if b.reset is not None and b.reset > now]
        until = max(resets) + RESET_MARGIN if resets else now + FALLBACK_PAUSE
        window = self._window()
        if until - now > 2 * window:
            log.warning(
                "A 429's Reset is %.3g s ahead, more than two rate-limit windows; "
                "not believed: pausing the token for one window (%g s) instead",
                until - now,
                window,
            )
            until = now + window + RESET_MARGIN
        self._paused_until = max(self._paused_until, until)
