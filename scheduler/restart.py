"""After downtime: every slot that passed while no daemon ran is run once or recorded missed.

The verdict for each test is :func:`scheduler.timing.catchup.plan_catch_up`'s; this module
carries it out. The latest slot within ``catch_up`` runs as a ``catch-up`` firing on a small
pool of its own (thousands of jobs back from downtime must not need thousands of threads);
the slots before it become one ``missed`` row per test.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from datetime import datetime, timedelta
from typing import Any, Protocol

from scheduler.clock import ONE_US
from scheduler.config.model import Job
from scheduler.executor import DaemonThreadPool
from scheduler.outcomes import FiringEnd, Trigger
from scheduler.runner import Firing
from scheduler.store.recovery import Accounted
from scheduler.timing.catchup import CatchUp, plan_catch_up

log = logging.getLogger(__name__)


class RecordMissed(Protocol):
    """The daemon's way to write one ``missed`` row (and tell metrics and notifications)."""

    def __call__(
        self,
        job: Job,
        test_id: str,
        first: datetime,
        last: datetime,
        count: int,
        why: str,
        counted_all: bool = True,
        never_sent: bool = False,
    ) -> None: ...


class CatchUps:
    """Catch-up firings of one start, run on ``size`` threads."""

    def __init__(
        self,
        fire: Callable[[Firing], FiringEnd],
        record_missed: RecordMissed,
        deadline: Callable[[Job, datetime], datetime | None],
        size: int,
    ) -> None:
        self._fire, self._record_missed, self._deadline = fire, record_missed, deadline
        self._pool = DaemonThreadPool(max(1, size), "catch-up")

    def start(
        self, jobs: Iterable[Job], now: datetime, accounted: Mapping[tuple[str, str], Accounted]
    ) -> None:
        """Run or give up on the slots before ``now``, test by test (recovery.last_accounted)."""
        for job in jobs:
            found_all = {test: accounted.get((job.name, test)) for test in job.tests}
            known = [found.until for found in found_all.values() if found is not None]
            if not known:
                continue  # the job never fired: nothing to catch up
            for test, found in found_all.items():
                # A test without a row in a job that fired owes the job's latest slot: its
                # firing never began (the process died while it waited for a thread).
                last = found.until if found else max(known) - ONE_US
                verdict = plan_catch_up(job.schedule, last, now, job.catch_up)
                self._carry_out(job, test, verdict, found, now)

    def shutdown(self) -> None:
        """Cancel the catch-ups still queued; each is recorded missed (see ``_done``)."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _carry_out(
        self, job: Job, test: str, verdict: CatchUp, found: Accounted | None, now: datetime
    ) -> None:
        if verdict.missed_count:
            assert verdict.missed_first and verdict.missed_last
            self._record_missed(
                job,
                test,
                verdict.missed_first,
                verdict.missed_last,
                verdict.missed_count,
                "te-scheduler was not running",
                verdict.counted_all,
            )
        slot, attempt = verdict.run, 1
        if slot is None and found and found.unsent and not verdict.missed_count:
            if now - found.unsent <= job.catch_up:
                # Its call never left before the stop: run it now, after its missed row.
                slot, attempt = found.unsent, 2
        if slot is None:
            return
        log.info(
            'Catching up job "%s" test %s for the slot at %s', job.name, test, slot.isoformat()
        )
        firing = Firing(
            job,
            test,
            slot,
            Trigger.CATCH_UP,
            self._deadline(job, slot),
            timedelta(0),
            first_attempt=attempt,
        )
        future = self._pool.submit(self._fire, firing)
        future.add_done_callback(functools.partial(self._done, firing=firing))

    def _done(self, future: Future[Any], firing: Firing) -> None:
        if future.cancelled():
            # Still queued at shutdown: say so, or the next start (whose history already has
            # later slots of this job) would never account for it.
            try:
                self._record_missed(
                    firing.job,
                    firing.test_id,
                    firing.scheduled_for,
                    firing.scheduled_for,
                    1,
                    "te-scheduler stopped before its catch-up ran",
                    never_sent=True,
                )
            except Exception as exc:  # it runs inside the shutdown
                log.error("Recording a cancelled catch-up failed: %s", exc)
        elif future.exception() is not None:
            log.error("Catch-up firing failed unexpectedly: %r", future.exception())
