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
from scheduler.api.limiter import Limiter, SharedView
from scheduler.config.model import ApiConfig, Job
from scheduler.outcomes import FiringEnd, NotRun, Outcome, Trigger
from scheduler.store import history

log = logging.getLogger(__name__)

ONE_OFF_DEADLINE = timedelta(hours=1)
_WRITE_RETRY_PAUSES = (0.2, 1.0, 3.0)
_R = TypeVar("_R")


class _WriteFailed(Enum):
    """A history write that failed after its retries (a typed sentinel, see ``_write``)."""

    FAILED = "failed"


_FAILED: Final = _WriteFailed.FAILED


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
    )
    return runner


@dataclass(frozen=True)
class Firing:
    """What to run: one test of one job for one slot."""

    job: Job
    test_id: str
    scheduled_for: datetime
    trigger: Trigger = Trigger.SCHEDULE
    deadline: datetime | None = None  # no attempt starts after this
    offset: timedelta = timedelta(0)  # the test's spread offset within the slot

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
    ) -> None:
        self.engine = engine
        self.send = send
        self.limiter = limiter
        self.stop = stop
        self.instance = instance or instance_name()
        self.hooks = hooks or Hooks()
        self._in_flight = threading.BoundedSemaphore(concurrency)
        self._running: dict[tuple[str, str], str] = {}  # (job, test) -> run_id
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)

    # -- public -----------------------------------------------------------------------
    def reconnect(self, api: ApiConfig, token: str) -> None:
        """Use new API settings and token (a reload) for the calls that start from now on."""
        self.send = Caller(api, token).send
        self.limiter.budget = api.rate_limit

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
            outcome = self._skip(firing, run_id, previous)
            self.hooks.finished(firing, outcome, None)
            return outcome
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
        attempt, failures = 1, 0
        key = self._key(firing, run_id, 1)
        row_id = self._write(history.start_attempt, self.engine, key, clock.now())
        if row_id is _FAILED:
            log.error(
                'Job "%s" test %s scheduled for %s not sent: its history row could not be written',
                firing.job.name,
                firing.test_id,
                firing.scheduled_for.isoformat(),
            )
            return NotRun.NOT_RECORDED, "its history row could not be written"
        if row_id is None:
            log.debug(
                'Firing of job "%s" test %s at %s claimed by another instance',
                firing.job.name,
                firing.test_id,
                firing.scheduled_for.isoformat(),
            )
            return NotRun.CLAIMED_ELSEWHERE, None
        self.hooks.claimed(firing)
        while True:
            result = self._attempt(firing, run_id, row_id, attempt)
            if result is None:
                return Outcome.INTERRUPTED, "shut down before the call was sent"
            done = (Outcome(result.outcome), result.error)
            if result.outcome == Outcome.SUCCESS or not self._should_retry(
                result, failures, firing
            ):
                return done
            if result.status_code != 429:  # a 429 waits in the limiter, free of charge
                failures += 1
                if not self._back_off(firing, failures):
                    return done
            attempt += 1
            row_id = self._start_retry(firing, run_id, attempt)
            if row_id is None:
                return done

    def _attempt(self, firing: Firing, run_id: str, row_id: int, attempt: int) -> CallResult | None:
        permit = self.limiter.acquire(firing.scheduled_for)
        if permit is None:
            self._finish(row_id, Outcome.INTERRUPTED, None, "shut down before the call was sent")
            return None
        lag = clock.epoch() - (firing.scheduled_for + firing.offset).timestamp()
        result = None
        try:
            with self._in_flight:
                result = self.send(firing.test_id, firing.job.aid)
        finally:
            self.limiter.complete(permit, result)
        assert result is not None
        self._log_attempt(firing, run_id, attempt, result, lag)
        # results: an accepted run is followed up (SPEC 7) in the same write that finishes it.
        follow = result.outcome == Outcome.SUCCESS and firing.job.results.fetch
        self._finish(
            row_id,
            result.outcome,
            result.status_code,
            result.error,
            result.duration_ms,
            results="waiting" if follow else None,
        )
        self.hooks.attempted(firing, attempt, result, lag)
        return result

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
        deadline = firing.deadline or firing.scheduled_for + ONE_OFF_DEADLINE
        return epoch < deadline.timestamp()

    def _start_retry(self, firing: Firing, run_id: str, attempt: int) -> int | None:
        key = self._key(firing, run_id, attempt)
        row_id = self._write(history.start_attempt, self.engine, key, clock.now())
        if row_id is _FAILED:
            return None
        if row_id is None:
            log.warning(
                'Attempt %d of job "%s" test %s already recorded; not retrying',
                attempt,
                firing.job.name,
                firing.test_id,
            )
        return row_id

    def _skip(self, firing: Firing, run_id: str, previous: str) -> Outcome:
        reason = f"previous firing (run {previous[:8]}) of this test still running"
        self._write(
            history.record_attempt,
            self.engine,
            self._key(firing, run_id, 1),
            started_at=clock.now(),
            finished_at=clock.now(),
            outcome=Outcome.SKIPPED,
            error=reason,
        )
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
        self._write(
            history.finish_attempt,
            self.engine,
            row_id,
            finished_at=clock.now(),
            outcome=outcome,
            status_code=status,
            error=error,
            duration_ms=duration_ms,
            results=results,
        )

    def _write(
        self, write: Callable[..., _R], *args: Any, **kwargs: Any
    ) -> _R | Literal[_WriteFailed.FAILED]:
        """A history write, retried briefly; on failure logged loudly and ``_FAILED`` returned.

        The attempt's facts are already in the log line, so a database outage loses no facts
        and never takes the daemon down.
        """
        for pause in (*_WRITE_RETRY_PAUSES, None):
            try:
                return write(*args, **kwargs)
            except Exception as exc:  # a database that fails must not kill the daemon
                if pause is None:
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
