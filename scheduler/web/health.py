"""/healthz: whether the scheduler runs and the history database answers, within a deadline."""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections.abc import Callable
from urllib.parse import quote

from sqlalchemy import text
from sqlalchemy.engine import Engine

from scheduler.store.db import one_line

log = logging.getLogger(__name__)

HEALTH_TIMEOUT = 5.0  # seconds a /healthz request waits for the health callable

Health = Callable[[], tuple[bool, dict[str, str]]]


def database_health(engine: Engine) -> tuple[bool, str]:
    """Whether the history database answers: ``SELECT 1`` and a read of ``attempts``.

    For a SQLite file the read also goes through a fresh connection, because a pooled one
    keeps reading a file that was deleted, moved or overwritten under it.
    """
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
            connection.execute(text("SELECT 1 FROM attempts LIMIT 1"))
        path = engine.url.database if engine.dialect.name == "sqlite" else None
        if path and path != ":memory:" and not engine.url.query.get("uri"):
            _check_sqlite_file(path)
    except Exception as exc:  # a health check reports every failure, it never raises
        return False, one_line(exc, engine.url)[:200]
    return True, "ok"


def _check_sqlite_file(path: str) -> None:
    uri = "file:" + quote(os.path.abspath(path)) + "?mode=rw"  # rw: never create it anew
    connection = sqlite3.connect(uri, uri=True, timeout=2.0)
    try:
        connection.execute("SELECT 1 FROM attempts LIMIT 1").fetchall()
    finally:
        connection.close()


def build_health(
    is_running: Callable[[], bool],
    engine: Engine,
    history: Callable[[], str | None] = lambda: None,
) -> Health:
    """The daemon's /healthz callable: the scheduler runs, the database answers, and history
    writes work (``history`` says why they do not, e.g. the daemon's write backlog)."""

    def health() -> tuple[bool, dict[str, str]]:
        running = is_running()
        db_ok, db_detail = database_health(engine)
        writes = history()
        detail = {"scheduler": "running" if running else "stopped", "database": db_detail}
        if writes is not None:
            detail["history"] = writes
        return running and db_ok and writes is None, detail

    return health


class HealthCheck:
    """Runs a ``Health`` callable with a deadline: a raise or a hang is a failure, never an error.

    Calling it returns ``(ok, body)`` with ``body["status"]`` ``"ok"`` or ``"fail"`` first.
    The callable runs on its own thread, and at most one run is in flight: requests that
    arrive while it runs wait for that run instead of starting another, so a database that
    hangs costs one stuck thread, not one per probe.
    """

    def __init__(self, health: Health, timeout: float = HEALTH_TIMEOUT) -> None:
        self.health, self.timeout = health, timeout
        self._lock = threading.Lock()
        self._run: _Run | None = None

    def __call__(self) -> tuple[bool, dict[str, str]]:
        run = self._current_run()
        if not run.done.wait(self.timeout):
            ok, detail = False, {"health": f"check took over {self.timeout:g}s"}
        else:
            ok, detail = run.result
        return ok, {"status": "ok" if ok else "fail", **detail}

    def _current_run(self) -> _Run:
        with self._lock:
            if self._run is None or self._run.done.is_set():
                self._run = _Run(self.health)
            return self._run


class _Run:
    """One call of the health callable on a daemon thread; ``done`` is set when it returns."""

    def __init__(self, health: Health) -> None:
        self.done = threading.Event()
        self.result: tuple[bool, dict[str, str]] = (False, {})
        threading.Thread(target=self._call, args=(health,), name="healthz", daemon=True).start()

    def _call(self, health: Health) -> None:
        try:
            ok, detail = health()
            self.result = (bool(ok), {k: str(v) for k, v in detail.items()})
        except Exception as exc:
            log.warning("Health check raised: %r", exc)
            self.result = (False, {"health": f"check raised {type(exc).__name__}: {exc}"})
        finally:
            self.done.set()
