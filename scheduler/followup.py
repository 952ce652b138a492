"""The results reader: a daemon thread that reads each accepted run's round back (SPEC 7).

Each pass (:meth:`FollowupReader.step`) takes the ``waiting`` follow-ups from the store,
claims the unowned ones (its own runs, or those of instances no longer alive), and reads the
due ones: the first read when a round is likely, then every 15 s while agents trickle in,
backing off while there is none, until the agent set settles (or matches the test's last
complete round) or ``results.wait`` ends. Failures are data: 401/403/404 end it as
``error``, 429 waits for the limiter, 5xx and bad answers are retried up to
:data:`MAX_FAILURES` times. Nothing here raises out of the thread.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from sqlalchemy import Engine

from scheduler import clock
from scheduler.api.client import RateLimitBucket
from scheduler.api.limiter import Limiter
from scheduler.api.results import Read, ResultsReader, endpoint_of, first_read_after
from scheduler.config.model import Job, ResultsConfig
from scheduler.notify import Notifier
from scheduler.store import instances
from scheduler.store import results as store
from scheduler.store.recovery import is_dead_process

log = logging.getLogger(__name__)

FIRST_PASS_DELAY = 2.0  # seconds after start before the first pass over follow-ups

POLL = 5.0  # seconds between passes at most (a new follow-up's first read is >= 20 s away)
SETTLE = timedelta(seconds=15)  # the same agents this far apart: the round is complete
MAX_BACKOFF = 120.0  # seconds between reads of a round not there yet, at most
MAX_FAILURES = 5  # failed reads in a row (5xx, bad answers) before ending as ``error``
LATE = timedelta(seconds=30)  # a follow-up found this far past its wait ends without a read
TYPES_TTL = 3600.0  # a test missing from GET /tests is looked for again after this
GATE_TRIES = 20  # waits of 0.25 s for room in the organization bucket, per request
_DEFAULT = ResultsConfig()


class ResultMetrics:
    """``te_scheduler_result_reads_total{code}`` and ``te_scheduler_results_total{job,state}``."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.reads = Counter(
            "te_scheduler_result_reads",
            "Results API requests, by HTTP status (none: no response).",
            ["code"],
            registry=registry,
        )
        self.results = Counter(
            "te_scheduler_results",
            "Follow-ups ended, by job and results state.",
            ["job", "state"],
            registry=registry,
        )


class _Gate:
    """The limiter's low-priority path: a request goes only when no run call needs the room."""

    def __init__(self, limiter: Limiter, stop: threading.Event) -> None:
        self.limiter, self.stop = limiter, stop

    def before(self) -> bool:
        for _ in range(GATE_TRIES):
            if self.stop.is_set():
                return False
            if self.limiter.try_read():
                return True
            self.stop.wait(0.25)
        return False

    def after(self, status: int | None, buckets: tuple[RateLimitBucket, ...]) -> None:
        self.limiter.complete_read(status, buckets)


class FollowupReader:
    """Reads results for the follow-ups this instance owns; one thread, :meth:`start`."""

    def __init__(
        self,
        engine: Engine,
        reader: ResultsReader,
        limiter: Limiter,
        stop: threading.Event,
        *,
        instance: str,
        jobs: Callable[[], Mapping[str, Job]],
        metrics: ResultMetrics | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.engine = engine
        self.reader = reader
        self.limiter = limiter
        self.stop = stop
        self.instance = instance
        self.jobs = jobs
        self.metrics = metrics
        self.notifier = notifier  # told each ending, for ``notify.results`` streaks
        self._gate = _Gate(limiter, stop)
        self._types: dict[str | None, tuple[float, dict[str, str]]] = {}
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> FollowupReader:
        self._thread = threading.Thread(target=self._loop, name="results", daemon=True)
        self._thread.start()
        return self

    def join(self, timeout: float = 5.0) -> None:
        """Wait for the thread after ``stop`` was set (it ends between requests)."""
        if self._thread is not None:
            self._thread.join(timeout)

    def reconnect(self, reader: ResultsReader) -> None:
        """Use new API settings (a reload); test types are read again."""
        self.reader, self._types = reader, {}

    def _loop(self) -> None:
        # No round is readable this early, and start-up's own history reads come first.
        self.stop.wait(FIRST_PASS_DELAY)
        while not self.stop.is_set():
            try:
                delay = self.step()
            except Exception as exc:  # a database outage: try again next pass
                log.warning("Results follow-ups paused: %s", exc)
                delay = POLL
            # Real time on purpose: the stop event ends the wait at once, and tests that
            # fake the clock drive step() themselves.
            self.stop.wait(min(max(delay, 0.05), POLL))

    # -- one pass ----------------------------------------------------------------------------
    def step(self) -> float:
        """Claim and read what is due; seconds until the next follow-up is due (<= POLL)."""
        now = clock.now()
        alive: set[str] | None = None
        soonest = POLL
        for item in store.waiting(self.engine):
            if self.stop.is_set():
                break
            if item.owner != self.instance:
                if alive is None:
                    alive = self._alive(now)
                owned = self._claim(item, now, alive)
                if owned is None:
                    continue
                item = owned
            assert item.next_read_at is not None
            if item.next_read_at <= clock.now():
                self._handle(item)
            else:
                soonest = min(soonest, (item.next_read_at - clock.now()).total_seconds())
        return soonest

    def _alive(self, now: datetime) -> set[str]:
        dead = instances.dead_instances(self.engine, now, instances.stale_after())
        return {
            row["instance"]
            for row in instances.status(self.engine, now, instances.stale_after())
            if row["instance"] not in dead and not is_dead_process(row["instance"])
        } | {self.instance}

    def _claim(self, item: store.Followup, now: datetime, alive: set[str]) -> store.Followup | None:
        """``item`` owned by this instance, or None when someone alive reads it."""
        if item.owner is not None:
            if item.owner in alive or not store.take_over(
                self.engine, item.attempt_id, item.owner, self.instance
            ):
                return None
            log.info(
                "Took over the results follow-up of attempt %d from %s", item.attempt_id, item.owner
            )
            return replace(item, owner=self.instance)
        if item.instance != self.instance and item.instance in alive:
            return None  # its runner's instance claims it on its next pass
        config = self._config(item)
        endpoint = self._endpoint(item, config, lookup=False)
        first = item.sent_at + timedelta(seconds=first_read_after(endpoint or "network"))
        deadline = item.sent_at + config.wait
        if not store.claim(self.engine, item, self.instance, deadline, first):
            return None
        return replace(item, owner=self.instance, deadline=deadline, next_read_at=first)

    # -- reading one -------------------------------------------------------------------------
    def _handle(self, item: store.Followup) -> None:
        now = clock.now()
        assert item.deadline is not None
        if now > item.deadline + LATE:
            self._end_by_rows(item, "its wait ended while no instance was reading it")
            return
        config = self._config(item)
        endpoint = self._endpoint(item, config, lookup=True)
        if endpoint is None:
            self._save(item, next_read_at=now + timedelta(seconds=POLL))
            return
        if endpoint == "":
            self._end(
                item,
                "unknown-type",
                f"test {item.test_id} not found in GET /tests; set results.type for this job",
            )
            return
        later = store.later_run(self.engine, item)
        read = self.reader.round_rows(
            item.test_id, endpoint, item.aid, item.sent_at - timedelta(seconds=5), now, self._gate
        )
        for code in read.codes:
            if self.metrics:
                self.metrics.reads.labels(code=str(code) if code else "none").inc()
        if read.note:
            log.warning("Results of test %s: %s", item.test_id, read.note)
        if read.kind == "ok":
            self._on_rows(item, endpoint, read, later, now)
        else:
            self._on_failure(item, read, now)

    def _on_rows(
        self, item: store.Followup, endpoint: str, read: Read, later: datetime | None, now: datetime
    ) -> None:
        floor0 = math.floor(item.sent_at.timestamp()) - 5
        ceiling = math.floor(later.timestamp()) - 5 if later is not None else None
        rounds = [
            row.round_id
            for row in read.rows
            if row.round_id >= floor0 and (ceiling is None or row.round_id < ceiling)
        ]
        reads = item.reads + 1
        if not rounds:
            if now >= self._deadline(item):
                self._save(item, reads=reads)
                self._end_by_rows(item, "no round after the wait")
                return
            delay = min(15.0 * 2 ** (reads - 1), MAX_BACKOFF)
            self._save(item, reads=reads, failures=0, next_read_at=self._next(item, now, delay))
            return
        chosen = min(rounds)
        by_agent = {row.agent_id: row for row in read.rows if row.round_id == chosen}
        agents = tuple(sorted(by_agent))
        rows = [store.AgentRow(**vars(by_agent[a])) for a in agents]
        store.store_round(self.engine, item, endpoint, rows)
        known = store.known_agents(self.engine, item.test_id, endpoint)
        same = item.agents == agents and item.agents_at is not None
        settled = same and item.agents_at is not None and now - item.agents_at >= SETTLE
        if (known is not None and known <= set(agents)) or settled:
            self._save(item, reads=reads, failures=0, endpoint=endpoint)
            self._end(item, "complete", None)
            return
        seen_at = item.agents_at if same else now
        assert seen_at is not None
        if now >= self._deadline(item):
            self._save(item, reads=reads, endpoint=endpoint)
            self._end(item, "partial", "the agent set was still growing when the wait ended")
            return
        wait = max((seen_at + SETTLE - now).total_seconds(), 1.0)
        self._save(
            item,
            reads=reads,
            failures=0,
            endpoint=endpoint,
            agents=agents,
            agents_at=seen_at,
            next_read_at=self._next(item, now, wait),
        )

    def _on_failure(self, item: store.Followup, read: Read, now: datetime) -> None:
        problem = read.problem or read.kind
        if read.kind == "permanent":
            self._end(item, "error", problem)
        elif read.kind in ("deferred", "limited"):
            resume = max(self.limiter.paused_until() - now.timestamp(), POLL)
            self._save(item, next_read_at=now + timedelta(seconds=resume), note=problem)
        elif item.failures + 1 >= MAX_FAILURES:
            self._end(item, "error", f"{problem} ({MAX_FAILURES} reads failed)")
        elif now >= self._deadline(item):
            self._end_by_rows(item, f"the wait ended; last read: {problem}")
        else:
            delay = min(15.0 * 2**item.failures, MAX_BACKOFF)
            self._save(
                item,
                failures=item.failures + 1,
                note=problem,
                next_read_at=self._next(item, now, delay),
            )

    # -- state -------------------------------------------------------------------------------
    def _next(self, item: store.Followup, now: datetime, delay: float) -> datetime:
        """``delay`` from now, but never past the deadline: the wait ends with a last read."""
        return min(now + timedelta(seconds=delay), self._deadline(item))

    def _deadline(self, item: store.Followup) -> datetime:
        assert item.deadline is not None
        return item.deadline

    def _save(self, item: store.Followup, **values: Any) -> None:
        store.save(self.engine, item.attempt_id, self.instance, **values)

    def _end_by_rows(self, item: store.Followup, why: str) -> None:
        kept = store.count_rows(self.engine, item.attempt_id)
        self._end(item, "partial" if kept else "none", why)

    def _end(self, item: store.Followup, state: str, why: str | None) -> None:
        if not store.end(self.engine, item.attempt_id, self.instance, state, why):
            return  # another instance took it over meanwhile
        if self.metrics:
            self.metrics.results.labels(job=item.job, state=state).inc()
        summary = store.summaries(self.engine, [item.attempt_id]).get(item.attempt_id)
        text = store.summary_text(state, summary) or state
        level = logging.WARNING if state in ("error", "unknown-type") else logging.INFO
        log.log(
            level,
            'Results of job "%s" test %s (attempt %d): %s%s',
            item.job,
            item.test_id,
            item.attempt_id,
            text,
            f" ({why})" if why else "",
            extra={"job": item.job, "test": item.test_id, "results": state},
        )
        self._notify(item, state, summary, text)

    def _notify(
        self, item: store.Followup, state: str, summary: dict[str, Any] | None, text: str
    ) -> None:
        """Feed the job's results streak: any agent not ok fails it, all ok ends it."""
        job = self.jobs().get(item.job)
        if self.notifier is None or job is None or not job.notify.results:
            return
        failed: bool | None = None
        error = None
        if state in ("complete", "partial") and summary:
            failed = summary["ok"] < summary["agents"]
            if failed:
                first = store.first_error(self.engine, item.attempt_id)
                error = f"{text}; {first}" if first else text
        self.notifier.results_finished(
            item.job, item.test_id, failed, error, item.sent_at, job.notify
        )

    # -- configuration and types --------------------------------------------------------------
    def _config(self, item: store.Followup) -> ResultsConfig:
        job = self.jobs().get(item.job)
        return job.results if job is not None else _DEFAULT

    def _endpoint(self, item: store.Followup, config: ResultsConfig, *, lookup: bool) -> str | None:
        """The endpoint; None while the type cannot be read yet, "" when the test is unknown."""
        if config.type != "auto":
            return endpoint_of(config.type)
        fetched, types = self._types.get(item.aid, (None, {}))
        if item.test_id in types:
            return endpoint_of(types[item.test_id])
        if not lookup:
            return None
        if fetched is not None and clock.monotonic() - fetched < TYPES_TTL:
            return ""
        read = self.reader.tests(item.aid, self._gate)
        for code in read.codes:
            if self.metrics:
                self.metrics.reads.labels(code=str(code) if code else "none").inc()
        if read.kind == "permanent":
            log.warning("GET /tests failed: %s; set results.type to skip it", read.problem)
            self._types[item.aid] = (clock.monotonic(), {})
            return ""
        if read.kind != "ok":
            return None
        found = {
            str(test["testId"]): str(test["type"])
            for test in read.items
            if test.get("testId") is not None and isinstance(test.get("type"), str)
        }
        self._types[item.aid] = (clock.monotonic(), found)
        return endpoint_of(found[item.test_id]) if item.test_id in found else ""
