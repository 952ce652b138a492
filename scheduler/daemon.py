"""The daemon: APScheduler fires one job per (job, test); signals, reload, catch-up, shutdown.

Signal handlers only set flags (huey's habit); the main loop notices them, reloads or
drains, and exits 0. APScheduler decides *when*; everything about *what happens* (claims,
pacing, retries, history) is the runner's.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import signal
import threading
from collections import Counter
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.base import BaseScheduler
from apscheduler.triggers.base import BaseTrigger
from sqlalchemy.engine import Engine

from scheduler import __version__, clock
from scheduler.api.results import ResultsReader
from scheduler.backlog import Backlog
from scheduler.config.loader import load, load_token
from scheduler.config.model import ApiConfig, Config, Job, Schedule
from scheduler.errors import ConfigError, ExitStatus, SchedulerError
from scheduler.executor import build_scheduler
from scheduler.followup import FollowupReader, ResultMetrics
from scheduler.logs import add_secret
from scheduler.metrics import Metrics
from scheduler.notify import Notifier, sd_notify, watchdog_seconds
from scheduler.observe import Observers
from scheduler.outcomes import Trigger
from scheduler.restart import CatchUps
from scheduler.runner import Firing, build_runner, instance_name
from scheduler.store import db, instances, recovery
from scheduler.timing.triggers import SpreadTrigger, build_trigger, spread_offsets
from scheduler.upkeep import HistoryUpkeep
from scheduler.web.api import status_routes
from scheduler.web.health import build_health
from scheduler.web.server import MetricsServer

log = logging.getLogger(__name__)

DRAIN_SECONDS = 30.0
LOOP_SECONDS = 0.5
# Threads that run firings. Each firing claims its row (QUEUED while it waits for the limiter
# or a connection) as soon as it comes due, so a killed process leaves a trace of every
# firing that had a thread; firings beyond this many wait in memory (and a restart after a
# kill catches them up test by test). More threads make a burst slower: they all contend
# for one GIL and one SQLite writer.
FIRING_THREADS = 256
_NO_OFFSET = timedelta(0)
LOG_EACH_JOB_UP_TO = 100  # start-up logs a line per job up to this many, then one summary


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


def _name_some(names: list[str], most: int = 10) -> str:
    """``a, b, c``; past ``most`` names, ``... and N more``."""
    shown = ", ".join(names[:most])
    return f"{shown} and {len(names) - most} more" if len(names) > most else shown


def entries_of(config: Config) -> dict[str, Entry]:
    """Every enabled (job, test) with its spread offset, keyed by APScheduler job id."""
    result = {}
    for job in config.enabled_jobs:
        offsets = spread_offsets(job) if job.spread and len(job.tests) > 1 else None
        for test in job.tests:
            entry = Entry(job, test, offsets[test] if offsets else _NO_OFFSET)
            result[entry.id] = entry
    return result


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
        clock.patch_apscheduler()
        self.config = config
        self.engine = engine
        self.watch = watch
        self.instance = instance_name()
        self._simulated = simulated
        self._connection = connection_of(config, simulated)
        self.stop = threading.Event()
        self.metrics = Metrics()
        self.observers = Observers(self.metrics, Notifier(instance=self.instance))
        # History writes that failed wait here until the database answers (see backlog.py).
        self.backlog = Backlog()
        self.runner = build_runner(
            engine,
            *self._connection,
            self.stop,
            instance=self.instance,
            hooks=self.observers,
            shared=self._shared_limits(),
            backlog=self.backlog,
        )
        self.limiter = self.runner.limiter
        self.observers.read_rate_limits = self.limiter.snapshot
        self.metrics.track_in_progress(self.runner.running)
        self.scheduler = scheduler or build_scheduler(FIRING_THREADS, on_dropped=self._on_dropped)
        self.heartbeat = instances.Heartbeat(
            engine, self.instance, __version__, instances.heartbeat_interval()
        )
        self._metrics_server: MetricsServer | None = None
        self._entries: dict[str, Entry] = {}
        self._wake = threading.Event()
        self._stop_requested = False
        self._force = False
        self._reload_requested = False
        self._file_state = _file_state(config.path)
        self._next_prune = clock.now()
        self._next_sweep = clock.now()
        self._schedule_started: datetime | None = None
        self._catch_ups = CatchUps(
            self.runner.fire, self._record_missed, self._deadline, config.api.concurrency
        )
        self._watchdog = watchdog_seconds()  # systemd's WatchdogSec=, halved; None when off
        self._jumps = clock.JumpWatch()
        self.upkeep = HistoryUpkeep(engine, self.backlog, self.instance, self.stop)
        # results (SPEC 7): reads accepted runs' rounds back, from start() to shutdown().
        self.results = FollowupReader(
            engine,
            ResultsReader(*self._connection),
            self.limiter,
            self.stop,
            instance=self.instance,
            jobs=lambda: {job.name: job for job in self.config.jobs},
            metrics=ResultMetrics(self.metrics.registry),
            notifier=self.observers.notifier,  # notify.results streaks
        )
        self._next_watchdog = clock.monotonic()

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
        return ExitStatus.OK

    def start(self) -> None:
        """Clean up after a dead predecessor, catch up, and start firing."""
        log.info(
            'te-scheduler %s starting: config "%s", database %s, instance %s',
            __version__,
            self.config.path,
            db.describe_url(str(self.engine.url)),
            self.instance,
        )
        now = clock.now()
        recovery.interrupt_orphans(
            self.engine,
            me=self.instance,
            now=now,
            starting=True,
            timeout=self.config.api.timeout,
            stale_after=instances.stale_after(),
        )
        instances.register(self.engine, self.instance, __version__, now)
        self.heartbeat.start()
        accounted = recovery.last_accounted(self.engine)
        # Catch-up owns the slots before the cut, the scheduler those from it on. Only adding
        # the jobs separates the cut from the scheduler running: the history read comes
        # before it and catch-up's writes after, so few slots pass in between, and those
        # fire late (see _on_due) rather than being missed.
        cut = clock.now()
        self._apply(entries_of(self.config), since=cut)
        self._schedule_started = clock.now()
        self.scheduler.start()  # after the adds: each add to a running scheduler wakes it
        self._catch_ups.start(self.config.enabled_jobs, cut, accounted)
        self.upkeep.start()
        self.results.start()  # results: after the scheduler, so run calls come first
        self.metrics.track_next_fires(self._next_fires)
        self._log_schedule()
        self._serve_metrics()
        sd_notify("READY=1")

    def shutdown(self) -> None:
        """Stop new firings, give calls in flight up to 30 s, mark the rest interrupted."""
        sd_notify("STOPPING=1")
        log.info(
            "Shutting down: no new firings; waiting up to %.0fs for %d firing(s)",
            DRAIN_SECONDS,
            self.runner.running(),
        )
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)
        # Catch-ups still queued are recorded missed (see _catch_up_done).
        self._catch_ups.shutdown()
        self.stop.set()
        self.limiter.wake()
        waited = 0.0
        while not self._force and waited < DRAIN_SECONDS and not self.runner.wait_idle(0.5):
            waited += 0.5
        closed = self.upkeep.close()
        self.results.join()  # results: ends between requests once self.stop is set
        self.heartbeat.stop()
        if closed:  # else the database did not answer: another wait would only delay the exit
            self._quietly(instances.mark_stopped, self.engine, self.instance, clock.now())
        self.observers.notifier.close(5.0)
        if self._metrics_server:
            self._metrics_server.stop()
        log.info("Stopped")

    # -- the main loop ----------------------------------------------------------------
    def _tick(self) -> None:
        if self._watchdog and clock.monotonic() >= self._next_watchdog:
            # From the main loop, so a loop stuck in a reload or a lock stops the pings.
            self._next_watchdog = clock.monotonic() + self._watchdog
            sd_notify("WATCHDOG=1")
        jump = self._jumps.check()
        if jump is not None:
            self._on_clock_jump(jump)
        lost = self.upkeep.check_file()
        if lost is not None:
            self.runner.halt(lost)
            if self.scheduler.running:
                self.scheduler.pause()
        if self._reload_requested:
            self._reload_requested = False
            self.reload("SIGHUP")
        elif self.watch and _file_state(self.config.path) != self._file_state:
            self.reload("file change")
        now = clock.now()
        if now >= self._next_sweep:
            # Look for peers that died mid-call once per heartbeat.
            self._next_sweep = now + timedelta(seconds=instances.heartbeat_interval())
            self._quietly(
                recovery.interrupt_orphans,
                self.engine,
                me=self.instance,
                now=now,
                starting=False,
                timeout=self.config.api.timeout,
                stale_after=instances.stale_after(),
            )
        if self.config.history.retention and now >= self._next_prune:
            self._next_prune = now + timedelta(days=1)
            self.upkeep.prune(now, self.config.history.retention)

    def reload(self, why: str) -> bool:
        """Re-read the config; on error keep the running schedule. True when applied."""
        self._file_state = _file_state(self.config.path)
        try:
            config = load(self.config.path)
            connection = connection_of(config, self._simulated)
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("Reload (%s) rejected, keeping the running schedule: %s", why, problem)
            self.metrics.config_reload(False)
            return False
        except SchedulerError as exc:
            log.error("Reload (%s) rejected, keeping the running schedule: %s", why, exc)
            self.metrics.config_reload(False)
            return False
        self.config = replace(config, history=self.config.history)  # the database stays
        if connection != self._connection:
            # Calls in flight keep the old session; it is closed by the garbage collector.
            self._connection = connection
        self.runner.reconnect(*self._connection)
        self.results.reconnect(ResultsReader(*self._connection))  # results: types reread
        for name in {e.job.name for e in self._entries.values()} - {j.name for j in config.jobs}:
            self.metrics.forget_job(name)  # a removed job keeps no gauge
        changed = self._apply(entries_of(config))
        self.metrics.config_reload(True)
        log.info(
            "Reloaded %s (%s): %d job(s) (%d enabled), %d schedule change(s)%s",
            config.path,
            why,
            len(config.jobs),
            len(config.enabled_jobs),
            len(changed),
            f": {_name_some(sorted(changed))}" if changed else "",
        )
        return True

    def _apply(self, wanted: dict[str, Entry], since: datetime | None = None) -> set[str]:
        """Make APScheduler's jobs match ``wanted``; unchanged timings keep their next fire.
        Returns the names of the jobs added, removed or re-timed.

        ``since`` (at start) is the moment catch-up decided up to: new jobs begin with the
        first slot at or after it, even one that passed while they were being added, so no
        slot falls between catch-up and the schedule.
        """
        changes: set[str] = set()
        previous = self._entries
        for job_id in set(previous) - set(wanted):
            with contextlib.suppress(JobLookupError):  # a one-off that already fired
                self.scheduler.remove_job(job_id)
            changes.add(previous[job_id].job.name)
        # Known from now on (_on_due drops firings of jobs it does not know), so a job added
        # below may fire before the adds are done.
        self._entries = wanted
        triggers = _Triggers(since)
        for job_id, entry in wanted.items():
            old = previous.get(job_id)
            if old is not None and old.timing == entry.timing:
                if old != entry:  # same slots, other settings (aid, retry ...): keep next fire
                    with contextlib.suppress(JobLookupError):  # a one-off that already fired
                        self.scheduler.modify_job(job_id, args=(job_id, entry))
                continue
            trigger, first = triggers.of(entry)
            # The entry rides with its trigger: a firing of the old trigger of a job this
            # reload re-times still computes its slot with the old spread offset.
            self.scheduler.add_job(
                self._on_due,
                trigger=trigger,
                args=(job_id, entry),
                id=job_id,
                name=job_id,
                replace_existing=True,
                **first,
            )
            changes.add(entry.job.name)
        return changes

    # -- firing -----------------------------------------------------------------------
    def _on_due(
        self,
        job_id: str,
        entry: Entry | None = None,
        run_times: list[datetime] | None = None,
        submitted: datetime | None = None,
    ) -> None:
        # run_times and submitted come from FiringExecutor; they default to None only because
        # APScheduler's add_job checks that every parameter is supplied or has a default.
        if entry is None or not run_times or submitted is None:
            return
        if self.stop.is_set():
            self._record_unsent(entry, run_times, "te-scheduler shut down before the firing began")
            return
        # In UTC: subtracting from a zone-aware time is wall-clock arithmetic and drops fold.
        slots = [run_time.astimezone(timezone.utc) - entry.offset for run_time in run_times]
        current = self._entries.get(job_id)
        if current is None:  # removed or disabled by a reload while this waited for a thread
            why = "its job was removed or disabled before the firing began"
            self._record_unsent(entry, run_times, why, never_sent=False)
            return
        if current.timing == entry.timing:
            entry = current  # the latest settings (aid, retry ...) for the same slots
        latest = slots[-1]
        late = submitted - (latest + entry.offset)
        grace = max(entry.job.catch_up, timedelta(minutes=1))
        given_up = slots[:-1] if late <= grace else slots
        if given_up:
            self._record_missed(
                entry.job,
                entry.test_id,
                given_up[0],
                given_up[-1],
                len(given_up),
                self._why_late(given_up[-1]),
            )
        if late <= grace:
            self.runner.fire(
                Firing(
                    entry.job,
                    entry.test_id,
                    latest,
                    Trigger.SCHEDULE,
                    self._deadline(entry.job, latest),
                    entry.offset,
                )
            )

    # APScheduler's add_job inspects the function's signature for every job it adds, a third
    # of adding 10,000 jobs; inspect.signature returns a __signature__ it finds instead.
    _on_due.__signature__ = inspect.signature(_on_due)  # type: ignore[attr-defined]

    def _on_dropped(self, args: tuple[Any, ...], run_times: list[datetime]) -> None:
        """A firing still waiting for a thread when the scheduler shut down."""
        entry = args[1] if len(args) > 1 else None
        if isinstance(entry, Entry) and run_times:
            self._record_unsent(entry, run_times, "te-scheduler shut down before the firing began")

    def _record_unsent(
        self, entry: Entry, run_times: list[datetime], why: str, *, never_sent: bool = True
    ) -> None:
        """One ``missed`` row for firings that never began; ``never_sent``: a restart may
        still catch the slot up (not so for a job a reload removed)."""
        slots = [run_time.astimezone(timezone.utc) - entry.offset for run_time in run_times]
        self._quietly(
            self._record_missed,
            entry.job,
            entry.test_id,
            slots[0],
            slots[-1],
            len(slots),
            why,
            never_sent=never_sent,
        )

    def _why_late(self, slot: datetime) -> str:
        if self._schedule_started and slot < self._schedule_started:
            return "te-scheduler was starting"  # the slot passed while the jobs were added
        jump = self._jumps.explain(since=slot)
        if jump is not None:
            return jump.describe()
        # Neither a clock step nor a suspension: the process itself did not keep up.
        return "te-scheduler was too late (overloaded, or stopped by a signal or debugger)"

    def _on_clock_jump(self, jump: clock.Jump) -> None:
        """Log a wall-clock jump; after a step, time every job's next firing from the new time.

        APScheduler sleeps until the next fire time it computed before the step, by elapsed
        time: after a step back of ten minutes it would stay silent for ten minutes. Slots that
        come due again after a step back were claimed already; the unique firing key keeps
        them from running twice.
        """
        log.warning("Clock: %s; next fire times recomputed from the new time", jump.describe())
        self.metrics.clock_jump(jump.seconds, jump.step)
        self._quietly(instances.note_clock_jump, self.engine, self.instance, jump.describe())
        if not jump.step or jump.seconds > 0:
            # Forward: the slots passed are due now and _on_due says why they came late.
            self.scheduler.wakeup()
            return
        now = clock.now()
        for job in self.scheduler.get_jobs():
            with contextlib.suppress(JobLookupError):  # a one-off that fired meanwhile
                job.modify(next_run_time=job.trigger.get_next_fire_time(None, now))

    def _deadline(self, job: Job, slot: datetime) -> datetime | None:
        """No retry of a firing starts after the job's next firing (None: one-off, 1 h)."""
        next_fire: datetime | None = _trigger_of(job.schedule).get_next_fire_time(slot, slot)
        return next_fire

    def _record_missed(
        self,
        job: Job,
        test_id: str,
        first: datetime,
        last: datetime,
        count: int,
        why: str,
        counted_all: bool = True,
        never_sent: bool = False,
    ) -> None:
        error = recovery.record_missed(
            self.engine,
            job=job,
            test_id=test_id,
            instance=self.instance,
            now=clock.now(),
            first=first,
            last=last,
            count=count,
            why=why,
            counted_all=counted_all,
            never_sent=never_sent,
        )
        self.observers.missed(job, test_id, first, error)

    # -- housekeeping -----------------------------------------------------------------
    def _log_schedule(self) -> None:
        if not self._entries:
            log.warning("No enabled jobs in %s; waiting for a reload", self.config.path)
            return
        tests = Counter(entry.job.name for entry in self._entries.values())
        fires = self._next_fires()
        each = logging.INFO
        if len(fires) > LOG_EACH_JOB_UP_TO:
            # Thousands of lines at every start drown the log (and journald's rate limit
            # drops them); `te-scheduler plan` lists the firings when someone needs them.
            each = logging.DEBUG
            soonest = min(((when, job) for job, when in fires.items() if when), default=None)
            log.info(
                'Scheduled %d jobs (%d tests); the soonest firing is job "%s" at %s; '
                "`te-scheduler plan` lists them all",
                len(fires),
                len(self._entries),
                soonest[1] if soonest else "-",
                soonest[0].isoformat() if soonest else "never",
            )
        if log.isEnabledFor(each):
            for job, when in fires.items():
                log.log(
                    each,
                    'Scheduled job "%s" (%d test(s)): next firing at %s',
                    job,
                    tests[job],
                    when.isoformat() if when else "never",
                )

    def _next_fires(self) -> dict[str, datetime | None]:
        """Each job's soonest next firing over its tests (spread included); None: no more.

        Read at scrape time by the metrics server's thread, so it takes one snapshot of
        APScheduler's jobs (one lock) rather than a lookup per test.
        """
        entries = self._entries
        soonest: dict[str, datetime | None] = dict.fromkeys(
            entry.job.name for entry in entries.values()
        )
        for aps in self.scheduler.get_jobs():
            entry = entries.get(aps.id)
            when = getattr(aps, "next_run_time", None)  # unset on a job still pending
            if entry is None or when is None:
                continue
            current = soonest.get(entry.job.name)
            if current is None or when < current:
                soonest[entry.job.name] = when
        return soonest

    def _serve_metrics(self) -> None:
        if not self.config.metrics.listen:
            return
        health = build_health(
            lambda: self.scheduler.running and not self.stop.is_set(),
            self.engine,
            history=self.upkeep.problem,
        )
        # The status page reads the live config (reloads show) and the limiter's own view.
        pages = status_routes(self.engine, lambda: self.config, self.limiter.snapshot)
        self._metrics_server = MetricsServer(
            self.metrics, self.config.metrics.listen, health, routes=pages
        ).start()

    def _shared_limits(self) -> instances.SharedLimits | None:
        # Only several instances need it, and they need PostgreSQL; a single SQLite daemon
        # should not pay a write per answer.
        if self.engine.dialect.name == "sqlite":
            return None
        return instances.SharedLimits(self.engine, self._connection[1], self.instance)

    def _quietly(self, action: Any, *args: Any, **kwargs: Any) -> Any:
        """Housekeeping: log a failure, never let it stop the daemon."""
        try:
            return action(*args, **kwargs)
        except Exception as exc:
            log.error("%s failed: %s", getattr(action, "__name__", action), exc)
            return None

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


class _Triggers:
    """One trigger, and one first fire time after ``since``, per distinct timing.

    Triggers hold no state, and thousands of jobs often share a few schedules: building
    and asking each once (a cron parse, a cronsim walk) instead of once per test is most
    of what adding 10,000 jobs cost besides APScheduler's own bookkeeping.
    """

    def __init__(self, since: datetime | None) -> None:
        self.since = since
        self._inner: dict[Schedule, BaseTrigger] = {}
        self._spread: dict[tuple[Any, ...], tuple[SpreadTrigger, dict[str, Any]]] = {}

    def of(self, entry: Entry) -> tuple[SpreadTrigger, dict[str, Any]]:
        """The entry's trigger and add_job's ``next_run_time`` argument (none without since)."""
        found = self._spread.get(entry.timing)
        if found is None:
            schedule = entry.job.schedule
            inner = self._inner.get(schedule)
            if inner is None:
                inner = self._inner[schedule] = build_trigger(schedule)
            trigger = SpreadTrigger(inner, entry.offset)
            first = {}
            if self.since is not None:
                first["next_run_time"] = trigger.get_next_fire_time(None, self.since)
            found = self._spread[entry.timing] = (trigger, first)
        return found


def _file_state(path: Path) -> tuple[Any, ...]:
    """What changes when a config file is edited, renamed over, or its symlink swapped."""
    try:
        stat = path.stat()  # follows symlinks, so a ConfigMap's ..data swap shows up
        return (os.path.realpath(path), stat.st_ino, stat.st_mtime_ns, stat.st_size)
    except OSError:
        return ("missing",)


@functools.lru_cache(maxsize=4096)
def _trigger_of(schedule: Schedule) -> BaseTrigger:
    """The trigger of ``schedule``, built once: the deadline of every firing needs one."""
    return build_trigger(schedule)


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
