"""One firing of one test: claim it, pace, send, and write one history row per HTTP attempt.

A firing is claimed by inserting attempt 1 as ``pending`` (the unique key makes that happen
once, whichever instance gets there first); each later attempt gets its own row before its
request leaves, so a crash always leaves evidence. Retries follow SPEC section 5: 5xx,
network errors and timeouts back off exponentially with full jitter up to
``retry.attempts``; a 429 waits for the limiter's pause and does not use up an attempt;
other 4xx are final; nothing is retried past the firing's deadline (the job's next firing).
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum
from typing import Any, Final, Literal, TypeVar

from sqlalchemy.engine import Engine

from scheduler import clock
from scheduler.api.client import Caller, CallResult
from scheduler.api.limiter import Limiter, Permit, SharedView
from scheduler.backlog import Backlog, Item
from scheduler.config.model import ApiConfig, Job
from scheduler.outcomes import NEVER_SENT, FiringEnd, NotRun, Outcome, Trigger
from scheduler.store import history

log = logging.getLogger(__name__)

ONE_OFF_DEADLINE = timedelta(hours=1)
_WRITE_RETRY_PAUSES = (0.2, 1.0, 3.0)
_R = TypeVar("_R")


class _WriteFailed(Enum):
    """A history write that failed after its retries (a typed sentinel, see ``_write``)."""

    FAILED = "failed"


_FAILED: Final = _WriteFailed.FAILED
_Failed = Literal[_WriteFailed.FAILED]


def instance_name() -> str:
    """This process's name in the ``instance`` column: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def build_runner(
    engine: Engine,
    api: ApiConfig,
    token: str,
    stop: threading.Event,
    *,
    instance: str | None = None,
    hooks: Hooks | None = None,
    shared: SharedView | None = None,
    backlog: Backlog | None = None,
) -> Runner:
    """The one way to build a runner, for the daemon and ``te-scheduler trigger`` alike.

    ``shared`` lets several instances pace one token together (PostgreSQL only).
    """
    limiter = Limiter(api.rate_limit, stop, shared)
    runner = Runner(
        engine,
        Caller(api, token).send,
        limiter,
        stop,
        concurrency=api.concurrency,
        instance=instance,
        hooks=hooks,
        backlog=backlog,
    )
    return runner


@dataclass
class _Turn:
    """What a call holds before it may leave: a limiter permit and one of the connections."""

    permit: Permit | None = None
    slot: bool = False

    @property
    def ready(self) -> bool:
        return self.permit is not None and self.slot


@dataclass(frozen=True)
class Firing:
    """What to run: one test of one job for one slot."""

    job: Job
    test_id: str
    scheduled_for: datetime
    trigger: Trigger = Trigger.SCHEDULE
    deadline: datetime | None = None  # no attempt starts after this
    offset: timedelta = timedelta(0)  # the test's spread offset within the slot
    first_attempt: int = 1  # 2 for a catch-up of a slot whose attempt 1 was never sent

    @property
    def key(self) -> tuple[str, str]:
        return (self.job.name, self.test_id)


class Hooks:
    """What the runner tells the outside world (metrics, notifications); no-ops by default.

    Hooks are called on the firing's thread and must not raise or block for long.
    """

    def claimed(self, firing: Firing) -> None:
        """This instance owns the firing (attempt 1 is recorded); its first call comes next."""

    def attempted(self, firing: Firing, attempt: int, result: CallResult, lag: float) -> None:
        """One HTTP attempt finished; ``lag`` is its start minus the planned moment."""

    def finished(self, firing: Firing, outcome: FiringEnd, error: str | None) -> None:
        """The firing ended: ``outcome`` is its last row's, or a :class:`NotRun` reason."""


class Runner:
    """Runs firings; shared by the daemon and ``te-scheduler trigger``."""

    def __init__(
        self,
        engine: Engine,
        send: Callable[[str, str | None], CallResult],
        limiter: Limiter,
        stop: threading.Event,
        *,
        concurrency: int = 8,
        instance: str | None = None,
        hooks: Hooks | None = None,
        backlog: Backlog | None = None,
    ) -> None:
        self.engine = engine
        # "is None", not "or": an empty Backlog is falsy (it has a length), and a runner with
        # a backlog of its own would hide every failed write from the daemon and /healthz.
        self.backlog = backlog if backlog is not None else Backlog()
        self.send = send
        self.limiter = limiter
        self.stop = stop
        self.instance = instance or instance_name()
        self.hooks = hooks or Hooks()
        self._halted: str | None = None  # why nothing may be sent any more
        self._in_flight = threading.BoundedSemaphore(concurrency)
        self._running: dict[tuple[str, str], str] = {}  # (job, test) -> run_id
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)

    # -- public -----------------------------------------------------------------------
    def reconnect(self, api: ApiConfig, token: str) -> None:
        """Use new API settings and token (a reload) for the calls that start from now on."""
        self.send = Caller(api, token).send
        self.limiter.budget = api.rate_limit

    def halt(self, why: str) -> None:
        """Send nothing from now on (its history cannot be kept); waiting calls end missed."""
        self._halted = why

    def fire(self, firing: Firing) -> FiringEnd:
        """Run one firing to its end and return its final outcome.

        Returns a :class:`NotRun` reason when this process wrote no row of its own for it:
        another instance owns the slot, or the history could not be written (nothing sent).
        """
        run_id = uuid.uuid4().hex
        with self._lock:
            previous = self._running.get(firing.key)
            if previous is None:
                self._running[firing.key] = run_id
        if previous is not None:
            skipped = self._skip(firing, run_id, previous)
            self.hooks.finished(firing, skipped, None)
            return skipped
        outcome: FiringEnd = NotRun.NOT_RECORDED
        error: str | None = None
        try:
            outcome, error = self._run(firing, run_id)
            return outcome
        finally:
            with self._lock:
                del self._running[firing.key]
                self._idle.notify_all()
            self.hooks.finished(firing, outcome, error)

    def running(self) -> int:
        """How many firings are in progress."""
        with self._lock:
            return len(self._running)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no firing runs (or the timeout passes); True when idle."""
        deadline = clock.monotonic() + timeout
        with self._lock:
            while self._running:
                left = deadline - clock.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(min(left, 0.5))
        return True

    # -- one firing -------------------------------------------------------------------
    def _run(self, firing: Firing, run_id: str) -> tuple[FiringEnd, str | None]:
        """The firing's final outcome and the last attempt's error."""
        attempt, failures = firing.first_attempt, 0
        claim = self._claim(firing, run_id, attempt)
        if claim is _FAILED:
            return NotRun.NOT_RECORDED, "its history row could not be written"
        if claim is None:
            log.debug(
                'Firing of job "%s" test %s at %s claimed by another instance',
                firing.job.name,
                firing.test_id,
                firing.scheduled_for.isoformat(),
            )
            return NotRun.CLAIMED_ELSEWHERE, None
        self.hooks.claimed(firing)
        while True:
            row_id, turn = claim
            result = self._attempt(firing, run_id, row_id, attempt, turn)
            if isinstance(result, str):  # never sent: recorded missed, with why
                return Outcome.MISSED, result
            done = (Outcome(result.outcome), result.error)
            if done[0] is Outcome.SUCCESS or not self._should_retry(result, failures, firing):
                return done
            if result.status_code != 429:  # a 429 waits in the limiter, free of charge
                failures += 1
                if not self._back_off(firing, failures):
                    return done
            attempt += 1
            claim = self._claim(firing, run_id, attempt)
            if claim is None or claim is _FAILED:
                if claim is None:
                    log.warning(
                        'Attempt %d of job "%s" test %s already recorded; not retrying',
                        attempt,
                        firing.job.name,
                        firing.test_id,
                    )
                return done

    def _claim(
        self, firing: Firing, run_id: str, attempt: int
    ) -> tuple[int, _Turn] | _Failed | None:
        """Insert the attempt's row, holding whatever turn to send was free at once.

        A call that must still wait (for the limiter or a free connection) gets its row
        written ``QUEUED``: should this process die meanwhile, recovery knows the call never
        left. None: another instance has the row.
        """
        turn = _Turn(self.limiter.try_acquire(firing.scheduled_for))
        turn.slot = turn.permit is not None and self._in_flight.acquire(blocking=False)
        key = self._key(firing, run_id, attempt)
        row_id = self._write(
            history.start_attempt, self.engine, key, clock.now(), queued=not turn.ready
        )
        if isinstance(row_id, int):
            return row_id, turn
        self._give_back(turn, None)
        if row_id is _FAILED:
            self._keep_missed(firing, run_id, attempt)
        return row_id

    def _attempt(
        self, firing: Firing, run_id: str, row_id: int, attempt: int, turn: _Turn
    ) -> CallResult | str:
        """Send one attempt and complete its row; the reason when it was never sent."""
        waited_from = None if turn.ready else clock.now()
        if turn.permit is None:
            turn.permit = self.limiter.acquire(firing.scheduled_for)
        unsent = self._why_not_send(firing, turn.permit, waited_from)
        if unsent is None and not turn.slot:
            turn.slot = self._wait_for_slot()
            if not turn.slot:
                unsent = (
                    NEVER_SENT + "te-scheduler shut down while the call waited for a connection"
                )
        if unsent is None and waited_from is not None:
            # Its row still says QUEUED: a call must not leave while the row says it never
            # did, or a restart after a crash would send it again.
            if self._write(history.mark_sent, self.engine, row_id, clock.now()) is _FAILED:
                unsent = NEVER_SENT + "its history row could not be updated before the call"
        if unsent is not None:
            self._give_back(turn, None)
            self._finish(row_id, Outcome.MISSED, None, unsent)
            log.warning('Job "%s" test %s %s', firing.job.name, firing.test_id, unsent)
            return unsent
        lag = clock.epoch() - (firing.scheduled_for + firing.offset).timestamp()
        result = None
        try:
            result = self.send(firing.test_id, firing.job.aid)
        finally:
            self._give_back(turn, result)
        self._log_attempt(firing, run_id, attempt, result, lag)
        outcome = Outcome(result.outcome)
        # An accepted run is followed up (SPEC 7) in the same write that finishes it.
        follow = outcome is Outcome.SUCCESS and firing.job.results.fetch
        self._finish(
            row_id,
            outcome,
            result.status_code,
            result.error,
            result.duration_ms,
            results="waiting" if follow else None,
        )
        self.hooks.attempted(firing, attempt, result, lag)
        return result

    def _wait_for_slot(self) -> bool:
        """Wait for one of ``concurrency`` connections; False when shutdown comes first."""
        while not self.stop.is_set():
            if self._in_flight.acquire(timeout=0.5):
                return True
        return False

    def _give_back(self, turn: _Turn, result: CallResult | None) -> None:
        """Release what ``turn`` holds; ``result`` teaches the limiter (None: nothing sent)."""
        if turn.permit is not None:
            self.limiter.complete(turn.permit, result)
            turn.permit = None
        if turn.slot:
            self._in_flight.release()
            turn.slot = False

    def _why_not_send(
        self, firing: Firing, permit: Permit | None, waited_from: datetime | None
    ) -> str | None:
        """Why this call must not go out now (None: send it). ``waited_from``: when it began
        to queue for the limiter, a wait that may have taken it past its deadline."""
        if self._halted is not None:
            return NEVER_SENT + self._halted
        if permit is None:
            return NEVER_SENT + "te-scheduler shut down while the call waited for the rate limiter"
        deadline = self._deadline(firing)
        if waited_from is not None and waited_from < deadline <= clock.now():
            return (
                f"{NEVER_SENT}its deadline ({deadline.isoformat()}, the next firing) passed "
                "while it waited for the rate limiter"
            )
        return None

    def _should_retry(self, result: CallResult, failures: int, firing: Firing) -> bool:
        if self.stop.is_set():
            return False
        if result.status_code == 429:
            return self._before_deadline(firing, self.limiter.paused_until())
        return result.is_retryable and failures + 1 < firing.job.retry.attempts

    def _back_off(self, firing: Firing, failures: int) -> bool:
        """Sleep before the next attempt (full jitter); False when shutdown or deadline wins."""
        policy = firing.job.retry
        ceiling = min(policy.max_backoff, policy.backoff * 2 ** (failures - 1))
        delay = random.uniform(0, ceiling)
        if not self._before_deadline(firing, clock.epoch() + delay):
            return False
        return not clock.wait(self.stop, delay)

    def _before_deadline(self, firing: Firing, epoch: float) -> bool:
        return epoch < self._deadline(firing).timestamp()

    @staticmethod
    def _deadline(firing: Firing) -> datetime:
        return firing.deadline or firing.scheduled_for + ONE_OFF_DEADLINE

    def _skip(self, firing: Firing, run_id: str, previous: str) -> Outcome:
        reason = f"previous firing (run {previous[:8]}) of this test still running"
        key, now = self._key(firing, run_id, 1), clock.now()

        def record_skipped() -> None:
            history.record_attempt(
                self.engine,
                key,
                started_at=now,
                finished_at=now,
                outcome=Outcome.SKIPPED,
                error=reason,
            )

        if self._write(record_skipped) is _FAILED:  # kept like every other row, not dropped
            what = (
                f'job "{firing.job.name}" test {firing.test_id} slot '
                f"{firing.scheduled_for.isoformat()}: skipped ({reason})"
            )
            self.backlog.add(Item(what, record_skipped), "the database did not answer")
        log.warning(
            'Skipped job "%s" test %s scheduled for %s: %s',
            firing.job.name,
            firing.test_id,
            firing.scheduled_for.isoformat(),
            reason,
        )
        return Outcome.SKIPPED

    # -- helpers ----------------------------------------------------------------------
    def _key(self, firing: Firing, run_id: str, attempt: int) -> history.AttemptKey:
        return history.AttemptKey(
            run_id=run_id,
            job=firing.job.name,
            test_id=firing.test_id,
            aid=firing.job.aid,
            trigger=firing.trigger,
            scheduled_for=firing.scheduled_for,
            attempt=attempt,
            instance=self.instance,
        )

    def _finish(
        self,
        row_id: int,
        outcome: Outcome,
        status: int | None,
        error: str | None,
        duration_ms: int | None = None,
        results: str | None = None,
    ) -> None:
        def finish_attempt() -> None:
            history.finish_attempt(
                self.engine,
                row_id,
                finished_at=finished_at,
                outcome=outcome,
                status_code=status,
                error=error,
                duration_ms=duration_ms,
                results=results,
            )

        finished_at = clock.now()
        if self._write(finish_attempt) is _FAILED:
            status_text = status if status is not None else "-"
            what = f"row {row_id}: outcome={outcome} status={status_text} error={error!r}"
            self.backlog.add(Item(what, finish_attempt), "the database did not answer")

    def _keep_missed(self, firing: Firing, run_id: str, attempt: int) -> None:
        """A firing whose row could not be written was not sent; record it missed later."""
        key = self._key(firing, run_id, attempt)
        now = clock.now()
        error = NEVER_SENT + "the history database could not be written when it came due"

        def record_missed() -> None:
            history.record_attempt(
                self.engine, key, started_at=now, outcome=Outcome.MISSED, error=error
            )

        what = (
            f'job "{firing.job.name}" test {firing.test_id} slot '
            f"{firing.scheduled_for.isoformat()}: missed ({error})"
        )
        log.error('Job "%s" test %s not sent: %s', firing.job.name, firing.test_id, error)
        self.backlog.add(Item(what, record_missed), "the database did not answer")

    def _write(
        self, write: Callable[..., _R], *args: Any, **kwargs: Any
    ) -> _R | Literal[_WriteFailed.FAILED]:
        """A history write, retried briefly; on failure logged loudly and ``_FAILED`` returned.

        The attempt's facts are already in the log line, so a database outage loses no facts
        and never takes the daemon down.
        """
        for pause in (*_WRITE_RETRY_PAUSES, None):
            try:
                with self.backlog.writing():
                    result = write(*args, **kwargs)
                self.backlog.succeeded()
                return result
            except Exception as exc:  # a database that fails must not kill the daemon
                self.backlog.failed(exc)  # /healthz says so from the first failure
                # At shutdown no retry: each can wait SQLite's 10 s busy timeout, and the
                # backlog and shutdown's own retries take over what failed.
                if pause is None or self.stop.is_set():
                    log.error("History write %s failed for good: %s", write.__name__, exc)
                    return _FAILED
                log.warning("History write %s failed (%s); retrying", write.__name__, exc)
                clock.wait(threading.Event(), pause)
        return _FAILED  # pragma: no cover - the loop always returns

    def _log_attempt(
        self, firing: Firing, run_id: str, attempt: int, result: CallResult, lag: float
    ) -> None:
        level = logging.INFO if result.outcome == Outcome.SUCCESS else logging.WARNING
        log.log(
            level,
            'job="%s" test=%s attempt=%d status=%s outcome=%s duration_ms=%d lag_s=%.3f%s',
            firing.job.name,
            firing.test_id,
            attempt,
            result.status_code if result.status_code is not None else "-",
            result.outcome,
            result.duration_ms,
            lag,
            f' error="{result.error}"' if result.error else "",
            extra={
                "run_id": run_id,
                "job": firing.job.name,
                "test": firing.test_id,
                "attempt": attempt,
                "status": result.status_code,
                "outcome": result.outcome,
                "duration_ms": result.duration_ms,
                "lag_s": round(lag, 3),
                "trigger": firing.trigger,
                "scheduled_for": firing.scheduled_for.isoformat(),
            },
        )
