"""The daemon: APScheduler fires one job per (job, test); signals, reload, catch-up, shutdown.

Signal handlers only set flags (huey's habit); the main loop notices them, reloads or
drains, and exits 0. APScheduler decides *when*; everything about *what happens* (claims,
pacing, retries, history) is the runner's.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import signal
import threading
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from apscheduler.executors.base import BaseExecutor
from apscheduler.job import Job as ApsJob
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.schedulers.base import BaseScheduler
from sqlalchemy.engine import Engine

from scheduler import __version__, clock, db, history
from scheduler.catchup import plan_catch_up
from scheduler.client import Caller, CallResult
from scheduler.config import ApiConfig, Config, Job, load, load_token
from scheduler.errors import ConfigError, SchedulerError
from scheduler.limiter import Limiter
from scheduler.logs import add_secret
from scheduler.runner import Firing, Runner, instance_name
from scheduler.triggers import SpreadTrigger, build_trigger, spread_offsets

log = logging.getLogger(__name__)

DRAIN_SECONDS = 30.0
LOOP_SECONDS = 0.5


class FiringExecutor(BaseExecutor):
    """Hands APScheduler's run times to us (its own executors drop them) on a thread pool."""

    def __init__(self, pool: concurrent.futures.ThreadPoolExecutor) -> None:
        super().__init__()
        self._pool = pool

    def _do_submit_job(self, job: ApsJob, run_times: list[datetime]) -> None:
        submitted = clock.now()
        future = self._pool.submit(job.func, *job.args, run_times, submitted)
        future.add_done_callback(lambda f: self._done(job.id, f))

    def _done(self, job_id: str, future: concurrent.futures.Future[Any]) -> None:
        if future.cancelled():
            self._run_job_success(job_id, [])
        elif future.exception() is not None:
            log.error("Firing of %s failed unexpectedly: %r", job_id, future.exception())
            self._run_job_error(job_id, future.exception())
        else:
            self._run_job_success(job_id, [])

    def shutdown(self, wait: bool = True) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=not wait)


@dataclass(frozen=True)
class Entry:
    """One scheduled (job, test): what APScheduler knows about it, to diff on reload."""

    job: Job
    test_id: str
    offset: timedelta

    @property
    def id(self) -> str:
        return f"{self.job.name}/{self.test_id}"

    @property
    def timing(self) -> tuple[Any, ...]:
        return (self.job.schedule, self.offset)


def entries_of(config: Config) -> dict[str, Entry]:
    """Every enabled (job, test) with its spread offset, keyed by APScheduler job id."""
    result = {}
    for job in config.enabled_jobs:
        offsets = spread_offsets(job)
        for test in job.tests:
            entry = Entry(job, test, offsets[test])
            result[entry.id] = entry
    return result


def build_scheduler(
    pool_size: int,
    scheduler_cls: type[BaseScheduler] = BackgroundScheduler,
) -> BaseScheduler:
    """An APScheduler scheduler in UTC whose jobs get their run times (see FiringExecutor).

    ``coalesce`` is off and ``misfire_grace_time`` unlimited because lateness is decided
    here, with the job's ``catch_up`` window, and recorded as ``missed`` rows; overlap is
    the runner's (a ``skipped`` row), so APScheduler's instance cap is out of the way.
    """
    pool = concurrent.futures.ThreadPoolExecutor(pool_size, thread_name_prefix="firing")
    return scheduler_cls(
        timezone=timezone.utc,
        executors={"default": FiringExecutor(pool)},
        job_defaults={"coalesce": False, "misfire_grace_time": None, "max_instances": 1_000_000},
    )


class Daemon:
    """``te-scheduler run``."""

    def __init__(
        self,
        config: Config,
        engine: Engine,
        *,
        simulated: tuple[str, str] | None = None,
        watch: bool = False,
        scheduler: BaseScheduler | None = None,
    ) -> None:
        self.config = config
        self.engine = engine
        self.watch = watch
        self._simulated = simulated
        self._connection = connection_of(config, simulated)
        self._caller = Caller(*self._connection)
        self.stop = threading.Event()
        self.limiter = Limiter(config.api.rate_limit, self.stop)
        self.runner = Runner(
            engine,
            self._call,
            self.limiter,
            self.stop,
            concurrency=config.api.concurrency,
            instance=instance_name(),
        )
        self.scheduler = scheduler or build_scheduler(max(32, 4 * config.api.concurrency))
        self._entries: dict[str, Entry] = {}
        self._wake = threading.Event()
        self._stop_requested = False
        self._force = False
        self._reload_requested = False
        self._file_state = _file_state(config.path)
        self._next_prune = clock.now()

    # -- lifecycle --------------------------------------------------------------------
    def run(self) -> int:
        """Run until SIGTERM/SIGINT; returns the exit code."""
        self._install_signals()
        self.start()
        try:
            while not self._stop_requested:
                self._wake.wait(LOOP_SECONDS)
                self._wake.clear()
                self._tick()
        finally:
            self.shutdown()
        return 0

    def start(self) -> None:
        """Clean up after a dead predecessor, catch up, and start firing."""
        log.info(
            'te-scheduler %s starting: config "%s", database %s, instance %s',
            __version__,
            self.config.path,
            db.describe_url(str(self.engine.url)),
            self.runner.instance,
        )
        self._interrupt_orphans()
        self._catch_up()
        self.scheduler.start()
        self._apply(entries_of(self.config))
        for entry in self._entries.values():
            aps = self.scheduler.get_job(entry.id)
            next_at = aps.next_run_time.isoformat() if aps and aps.next_run_time else "never"
            log.info(
                'Scheduled job "%s" test %s: next firing at %s',
                entry.job.name,
                entry.test_id,
                next_at,
            )
        if not self._entries:
            log.warning("No enabled jobs in %s; waiting for a reload", self.config.path)

    def shutdown(self) -> None:
        """Stop new firings, give calls in flight up to 30 s, mark the rest interrupted."""
        log.info(
            "Shutting down: no new firings; waiting up to %.0fs for %d firing(s)",
            DRAIN_SECONDS,
            self.runner.running(),
        )
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)
        self.stop.set()
        self.limiter.wake()
        waited = 0.0
        while not self._force and waited < DRAIN_SECONDS and not self.runner.wait_idle(0.5):
            waited += 0.5
        marked = history.interrupt_pending(
            self.engine,
            where_instance=lambda owner: owner == self.runner.instance,
            finished_at=clock.now(),
            error="te-scheduler stopped before the call finished",
        )
        if marked:
            log.warning("Marked %d unfinished attempt(s) as interrupted", marked)
        log.info("Stopped")

    # -- the main loop ----------------------------------------------------------------
    def _tick(self) -> None:
        if self._reload_requested:
            self._reload_requested = False
            self.reload("SIGHUP")
        elif self.watch and _file_state(self.config.path) != self._file_state:
            self.reload("file change")
        if self.config.history.retention and clock.now() >= self._next_prune:
            self._prune()

    def reload(self, why: str) -> bool:
        """Re-read the config; on error keep the running schedule. True when applied."""
        self._file_state = _file_state(self.config.path)
        try:
            config = load(self.config.path)
            connection = connection_of(config, self._simulated)
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("Reload (%s) rejected, keeping the running schedule: %s", why, problem)
            return False
        except SchedulerError as exc:
            log.error("Reload (%s) rejected, keeping the running schedule: %s", why, exc)
            return False
        self.config = replace(config, history=self.config.history)  # the database stays
        if connection != self._connection:
            # Calls in flight keep the old session; it is closed by the garbage collector.
            self._connection, self._caller = connection, Caller(*connection)
        self.limiter.budget = config.api.rate_limit
        changed = self._apply(entries_of(config))
        log.info(
            "Reloaded %s (%s): %d job(s), %d schedule change(s)",
            config.path,
            why,
            len(config.enabled_jobs),
            changed,
        )
        return True

    def _apply(self, wanted: dict[str, Entry]) -> int:
        """Make APScheduler's jobs match ``wanted``; unchanged timings keep their next fire."""
        changes = 0
        for job_id in set(self._entries) - set(wanted):
            self.scheduler.remove_job(job_id)
            changes += 1
        for job_id, entry in wanted.items():
            old = self._entries.get(job_id)
            if old is not None and old.timing == entry.timing:
                continue
            trigger = SpreadTrigger(build_trigger(entry.job.schedule), entry.offset)
            self.scheduler.add_job(
                self._on_due,
                trigger=trigger,
                args=(job_id,),
                id=job_id,
                name=job_id,
                replace_existing=True,
            )
            changes += 1
        self._entries = wanted
        return changes

    # -- firing -----------------------------------------------------------------------
    def _call(self, test_id: str, aid: str | None) -> CallResult:
        return self._caller.send(test_id, aid)

    def _on_due(
        self, job_id: str, run_times: list[datetime] | None = None,
        submitted: datetime | None = None,
    ) -> None:
        # run_times and submitted come from FiringExecutor; they default to None only because
        # APScheduler's add_job checks that every parameter is supplied or has a default.
        entry = self._entries.get(job_id)
        if entry is None or not run_times or submitted is None or self.stop.is_set():
            return  # removed by a reload, or shutting down
        # In UTC: subtracting from a zone-aware time is wall-clock arithmetic and drops fold.
        slots = [run_time.astimezone(timezone.utc) - entry.offset for run_time in run_times]
        latest = slots[-1]
        late = submitted - (latest + entry.offset)
        grace = max(entry.job.catch_up, timedelta(minutes=1))
        given_up = slots[:-1] if late <= grace else slots
        if given_up:
            self._record_missed(
                entry,
                given_up[0],
                given_up[-1],
                len(given_up),
                "te-scheduler was too late (suspended or overloaded)",
            )
        if late <= grace:
            self.runner.fire(
                Firing(
                    entry.job,
                    entry.test_id,
                    latest,
                    "schedule",
                    self._deadline(entry, latest),
                    entry.offset,
                )
            )

    def _deadline(self, entry: Entry, slot: datetime) -> datetime | None:
        """No retry of a firing starts after the job's next firing (None: one-off, 1 h)."""
        return build_trigger(entry.job.schedule).get_next_fire_time(slot, slot)

    def _catch_up(self) -> None:
        now = clock.now()
        for job in self.config.enabled_jobs:
            last = history.last_scheduled_for(self.engine, job.name)
            verdict = plan_catch_up(job.schedule, last, now, job.catch_up)
            for test in job.tests:
                entry = Entry(job, test, timedelta(0))
                if verdict.missed_count:
                    assert verdict.missed_first and verdict.missed_last
                    self._record_missed(
                        entry,
                        verdict.missed_first,
                        verdict.missed_last,
                        verdict.missed_count,
                        "te-scheduler was not running",
                    )
                if verdict.run:
                    log.info(
                        'Catching up job "%s" test %s for the slot at %s',
                        job.name,
                        test,
                        verdict.run.isoformat(),
                    )
                    firing = Firing(
                        job, test, verdict.run, "catch-up", self._deadline(entry, verdict.run)
                    )
                    threading.Thread(
                        target=self.runner.fire,
                        args=(firing,),
                        name=f"catch-up {entry.id}",
                        daemon=True,
                    ).start()

    def _record_missed(
        self, entry: Entry, first: datetime, last: datetime, count: int, why: str
    ) -> None:
        error = f"{count} firing(s) missed from {first.isoformat()} to {last.isoformat()}: {why}"
        key = history.AttemptKey(
            run_id=_new_run_id(),
            job=entry.job.name,
            test_id=entry.test_id,
            aid=entry.job.aid,
            trigger="schedule",
            scheduled_for=first,
            attempt=1,
            instance=self.runner.instance,
        )
        now = clock.now()
        history.record_attempt(
            self.engine, key, started_at=now, finished_at=now, outcome="missed", error=error
        )
        log.warning('Missed job "%s" test %s: %s', entry.job.name, entry.test_id, error)

    # -- housekeeping -----------------------------------------------------------------
    def _interrupt_orphans(self) -> None:
        """Rows left ``pending`` by a dead process become ``interrupted`` (never re-sent)."""
        now = clock.now()
        margin = timedelta(seconds=self.config.api.timeout) + ORPHAN_MARGIN
        dead = {
            row["instance"]
            for row in history.pending_rows(self.engine)
            if _is_dead(row["instance"]) or now - row["started_at"] > margin
        }
        if not dead:
            return
        marked = history.interrupt_pending(
            self.engine,
            where_instance=dead.__contains__,
            finished_at=now,
            error="te-scheduler stopped before the call finished; the call may have "
            "reached the API and is not repeated",
        )
        log.warning(
            "Marked %d attempt(s) left pending by %s as interrupted",
            marked,
            ", ".join(sorted(dead)),
        )

    def _prune(self) -> None:
        retention = self.config.history.retention
        assert retention is not None
        now = clock.now()
        self._next_prune = now + timedelta(days=1)
        try:
            deleted = history.prune(self.engine, before=now - retention)
        except Exception as exc:  # housekeeping must never stop the daemon
            log.error("Pruning history failed: %s", exc)
            return
        if deleted:
            log.info("Pruned %d history row(s) older than %s", deleted, retention)

    def _install_signals(self) -> None:
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        if hasattr(signal, "SIGHUP"):
            signal.signal(signal.SIGHUP, self._on_reload_signal)

    def _on_stop_signal(self, signum: int, frame: object) -> None:
        if self._stop_requested:
            self._force = True  # a second signal: stop waiting for calls in flight
        self._stop_requested = True
        self._wake.set()

    def _on_reload_signal(self, signum: int, frame: object) -> None:
        self._reload_requested = True
        self._wake.set()


# A pending row older than the request timeout plus this is an orphan even when its owner
# cannot be checked (another host): no call of ours stays open that long.
ORPHAN_MARGIN = timedelta(hours=1)


def _is_dead(instance: str) -> bool:
    """True when ``instance`` (host:pid) is a process on this host that no longer exists."""
    import socket

    host, _, pid = instance.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _file_state(path: Path) -> tuple[Any, ...]:
    """What changes when a config file is edited, renamed over, or its symlink swapped."""
    try:
        stat = path.stat()  # follows symlinks, so a ConfigMap's ..data swap shows up
        return (os.path.realpath(path), stat.st_ino, stat.st_mtime_ns, stat.st_size)
    except OSError:
        return ("missing",)


def _new_run_id() -> str:
    import uuid

    return uuid.uuid4().hex


def connection_of(config: Config, simulated: tuple[str, str] | None) -> tuple[ApiConfig, str]:
    """The API settings and token to call with; the token is read on every (re)load.

    ``simulated`` is (base_url, token) of the built-in simulator for ``run --simulate``.
    """
    if simulated:
        base_url, token = simulated
        api = replace(config.api, base_url=base_url)
    else:
        api, token = config.api, load_token(config.api)
    add_secret(token)
    return api, token
