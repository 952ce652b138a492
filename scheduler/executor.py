"""APScheduler plumbing: a scheduler in UTC whose jobs receive their run times.

APScheduler's own executors call the job function without telling it which run time it is
for; te-scheduler needs the slot (it is ``scheduled_for`` and the claim key), so
:class:`FiringExecutor` passes it, and :class:`DaemonThreadPool` runs firings on daemon
threads so a call stuck in flight can never hold the process at exit.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, Protocol

from apscheduler.executors.base import BaseExecutor
from apscheduler.job import Job as ApsJob
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.schedulers.base import BaseScheduler

from scheduler import clock

log = logging.getLogger(__name__)


class Pool(Protocol):
    """What FiringExecutor needs of a thread pool."""

    def submit(self, fn: Callable[..., Any], /, *args: Any) -> concurrent.futures.Future[Any]: ...

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None: ...


Dropped = Callable[[tuple[Any, ...], list[datetime]], None]


class FiringExecutor(BaseExecutor):
    """Hands APScheduler's run times to us (its own executors drop them) on a thread pool.

    ``on_dropped(job_args, run_times)`` hears of every firing cancelled before it began
    (still queued for a thread at shutdown), so none vanishes without a row.
    """

    def __init__(self, pool: Pool, on_dropped: Dropped | None = None) -> None:
        super().__init__()
        self._pool = pool
        self._on_dropped = on_dropped

    def _do_submit_job(self, job: ApsJob, run_times: list[datetime]) -> None:
        submitted = clock.now()
        future = self._pool.submit(job.func, *job.args, run_times, submitted)
        future.add_done_callback(lambda f: self._done(job.id, f, job.args, run_times))

    def _done(
        self,
        job_id: str,
        future: concurrent.futures.Future[Any],
        args: tuple[Any, ...],
        run_times: list[datetime],
    ) -> None:
        if future.cancelled():
            if self._on_dropped is not None:
                try:
                    self._on_dropped(args, run_times)
                except Exception as exc:  # it runs inside APScheduler's shutdown
                    log.error("Recording a dropped firing of %s failed: %r", job_id, exc)
            self._run_job_success(job_id, [])
        elif future.exception() is not None:
            log.error("Firing of %s failed unexpectedly: %r", job_id, future.exception())
            self._run_job_error(job_id, future.exception())
        else:
            self._run_job_success(job_id, [])

    def shutdown(self, wait: bool = True) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=not wait)


class DaemonThreadPool:
    """Runs submitted calls on up to ``size`` reused *daemon* threads.

    concurrent.futures.ThreadPoolExecutor joins its workers at interpreter exit, so one
    request stuck in flight held the process long after the drain had given up on it and
    recorded it as ``interrupted`` (or after a second SIGINT). Daemon workers do not.
    """

    def __init__(self, size: int, name: str = "firing") -> None:
        self._size, self._name = size, name
        self._work: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._workers: list[threading.Thread] = []
        self._idle = 0  # workers done with their last call (as ThreadPoolExecutor counts)
        self._closed = False

    def submit(self, fn: Callable[..., Any], /, *args: Any) -> concurrent.futures.Future[Any]:
        """Queue ``fn(*args)``; a worker is started when none is idle and the cap allows."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot submit a firing after shutdown")
            self._work.put((future, fn, args))
            if self._idle:
                self._idle -= 1
            elif len(self._workers) < self._size:
                worker = threading.Thread(
                    target=self._serve, name=f"{self._name}-{len(self._workers)}", daemon=True
                )
                self._workers.append(worker)
                worker.start()
        return future

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        """Stop taking work; optionally cancel what has not started and wait for the rest."""
        with self._lock:
            self._closed = True
            workers = list(self._workers)
        while cancel_futures:
            try:
                work = self._work.get_nowait()
            except queue.Empty:
                break
            if work is not None:
                work[0].cancel()
        for _ in workers:
            self._work.put(None)
        if wait:
            for worker in workers:
                worker.join()

    def _serve(self) -> None:
        while (work := self._work.get()) is not None:
            future, fn, args = work
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as exc:  # handed to the future, as the stdlib pool does
                    future.set_exception(exc)
            del work, future
            with self._lock:
                self._idle += 1


_Work = tuple["concurrent.futures.Future[Any]", "Callable[..., Any]", "tuple[Any, ...]"]


def build_scheduler(
    pool_size: int,
    scheduler_cls: type[BaseScheduler] = BackgroundScheduler,
    on_dropped: Dropped | None = None,
) -> BaseScheduler:
    """An APScheduler scheduler in UTC whose jobs get their run times (see FiringExecutor).

    ``coalesce`` is off and ``misfire_grace_time`` unlimited because lateness is decided
    here, with the job's ``catch_up`` window, and recorded as ``missed`` rows; overlap is
    the runner's (a ``skipped`` row), so APScheduler's instance cap is out of the way.
    """
    return scheduler_cls(
        timezone=timezone.utc,
        executors={"default": FiringExecutor(DaemonThreadPool(pool_size), on_dropped)},
        job_defaults={"coalesce": False, "misfire_grace_time": None, "max_instances": 1_000_000},
    )
