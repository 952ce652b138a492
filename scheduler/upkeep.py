"""The daemon's care of its history: the write backlog, the file it writes, pruning, shutdown.

Each job here runs off the main loop's back: the backlog's flusher and the daily prune on
threads of their own (a database that hangs must not hold the loop and its signals), the
file watch in one ``stat`` per tick, and the clean-up at shutdown within a bounded time.
"""

from __future__ import annotations

import logging
import os
import threading
from datetime import datetime, timedelta

from sqlalchemy.engine import Engine

from scheduler import clock
from scheduler.backlog import Backlog
from scheduler.store import history, instances

log = logging.getLogger(__name__)

BACKLOG_RETRY_SECONDS = 2.0  # how often writes kept for the database are tried again
SHUTDOWN_WRITE_PAUSES = (1.0, 2.0, 3.0, 4.0, 0.0)  # shutdown's clean-up retries
SHUTDOWN_WRITE_SECONDS = 10.0  # ... for this long at most, so a stop ends within systemd's 90 s


class HistoryUpkeep:
    """What one daemon does for its history besides recording attempts."""

    def __init__(
        self, engine: Engine, backlog: Backlog, instance: str, stop: threading.Event
    ) -> None:
        self.engine, self.backlog, self.instance, self.stop = engine, backlog, instance, stop
        self._file = sqlite_identity(engine)  # (device, inode) of a SQLite history file
        self.lost: str | None = None  # why history cannot be kept: nothing may be sent
        self._flusher: threading.Thread | None = None
        self._pruner: threading.Thread | None = None

    def start(self) -> None:
        """Write the backlog out whenever the database answers again, from now on."""
        self._flusher = threading.Thread(target=self._flush_loop, name="backlog", daemon=True)
        self._flusher.start()

    def problem(self) -> str | None:
        """Why history writes fail now (for /healthz), or None."""
        return self.lost or self.backlog.problem()

    def check_file(self) -> str | None:
        """The reason, once, when the SQLite file was deleted or replaced under us: its
        connections would go on writing into a file nobody can read."""
        if self._file is None or self.lost is not None:
            return None
        current = sqlite_identity(self.engine)
        if current == self._file:
            return None
        path = self.engine.url.database
        what = "was deleted" if current is None else "was replaced by another file"
        self.lost = f"the history file {path} {what}; restart te-scheduler to use it"
        log.error("History: %s. No call is sent until then.", self.lost)
        return self.lost

    def prune(self, now: datetime, retention: timedelta) -> None:
        """Start a prune on its own thread (a big first prune, paced to leave the writer lock
        free, takes a while); nothing when the last one is still going."""
        if self._pruner is not None and self._pruner.is_alive():
            return
        self._pruner = threading.Thread(
            target=self._prune_now, args=(now, retention), name="prune", daemon=True
        )
        self._pruner.start()

    def close(self) -> bool:
        """Write what waits in the backlog, then end this instance's open rows; retried for
        ``SHUTDOWN_WRITE_SECONDS`` when the database is away (one try may add SQLite's busy
        timeout), then whatever could not be recorded is logged row by row. True when done."""
        if self._pruner is not None:
            self._pruner.join(5.0)  # it stops between batches once the stop event is set
        deadline = clock.monotonic() + SHUTDOWN_WRITE_SECONDS
        for pause in SHUTDOWN_WRITE_PAUSES:
            try:
                if self.backlog.flush():
                    self._end_open_rows()
                    return True
            except Exception as exc:  # the database is away: try again, then say what is lost
                log.warning("History clean-up at shutdown failed (%s); retrying", exc)
            left = deadline - clock.monotonic()
            if left <= 0:
                break
            clock.wait(threading.Event(), min(pause, left))
        for what in self.backlog.give_up():
            log.error("Not recorded (the history database did not answer): %s", what)
        log.error(
            "Rows this instance left pending stay pending until the next start ends them; "
            "the lines above say how each call ended"
        )
        return False

    def _end_open_rows(self) -> None:
        marked = history.interrupt_pending(
            self.engine,
            where_instance=lambda owner: owner == self.instance,
            finished_at=clock.now(),
            error="te-scheduler stopped before the call finished",
        )
        if marked:
            log.warning("Ended %d unfinished attempt(s) at shutdown", marked)

    def _flush_loop(self) -> None:
        while not self.stop.is_set():
            # Real time, not the clock seam: a retry interval, not a schedule.
            self.stop.wait(BACKLOG_RETRY_SECONDS)
            if len(self.backlog) and not self.stop.is_set():
                self.backlog.flush()

    def _prune_now(self, now: datetime, retention: timedelta) -> None:
        try:
            deleted = history.prune(self.engine, before=now - retention, stop=self.stop)
            instances.forget_instances(self.engine, now - max(retention, timedelta(days=7)))
        except Exception as exc:  # housekeeping: log it, try again tomorrow
            log.error("Pruning the history failed: %s", exc)
            return
        if deleted:
            log.info("Pruned %d history row(s) older than %s", deleted, retention)


def sqlite_identity(engine: Engine) -> tuple[int, int] | None:
    """(device, inode) of a SQLite history file; None for other databases or no file."""
    path = engine.url.database if engine.dialect.name == "sqlite" else None
    if not path or path == ":memory:" or engine.url.query.get("uri"):
        return None
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (stat.st_dev, stat.st_ino)
