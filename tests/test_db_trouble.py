"""A real daemon whose history database misbehaves: locked, full, deleted, replaced, stopped."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import wait_until, write_config
from tests.test_operations import free_port

pytestmark = pytest.mark.slow

LOCK_SECONDS = 12.0  # longer than SQLite's 10 s busy timeout: writes fail, not just wait


def healthz(port: int) -> tuple[int, dict[str, Any]]:
    """/healthz's status code and JSON body (a probe that cannot connect is a 0)."""
    try:
        answer = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=10)
    except requests.RequestException as exc:
        return 0, {"error": str(exc)}
    return answer.status_code, answer.json()


def wait_health(port: int, code: int, timeout: float, what: str = "") -> dict[str, Any]:
    """Poll /healthz until it answers ``code``; its body then."""
    seen: list[tuple[int, dict[str, Any]]] = []

    def answered() -> bool:
        seen.append(healthz(port))
        return seen[-1][0] == code

    try:
        wait_until(answered, timeout=timeout, what=what or f"/healthz {code}")
    except AssertionError:
        raise AssertionError(f"/healthz never answered {code}; last: {seen[-1:]}") from None
    return seen[-1][1]


def sqlite_rows(path: Path) -> list[dict[str, Any]]:
    """Every attempts row of the history file, read with the stdlib."""
    connection = sqlite3.connect(path, timeout=30)
    connection.row_factory = sqlite3.Row
    try:
        return [dict(row) for row in connection.execute("SELECT * FROM attempts ORDER BY id")]
    finally:
        connection.close()


class Locker:
    """Another process's ``BEGIN EXCLUSIVE`` on the history file (python sqlite3)."""

    def __init__(self, path: Path) -> None:
        self.connection = sqlite3.connect(path, timeout=30, isolation_level=None)
        self.connection.execute("BEGIN EXCLUSIVE")
        self.since = time.monotonic()

    def release(self) -> None:
        self.connection.rollback()
        self.connection.close()


def pulse_config(
    tmp_path: Path, simulator: Any, db_url: str, port: int, every: str = "1s", **extra: str
) -> Path:
    return write_config(
        tmp_path / "jobs.yaml",
        f"""\
metrics:
  listen: 127.0.0.1:{port}
jobs:
  - name: pulse
    tests: [105]
    schedule: {{every: {every}}}
    retry: {{attempts: 1}}
""",
        base_url=simulator.url,
        db_url=db_url,
        **extra,
    )


def no_lost_call(rows: list[dict[str, Any]], received: int) -> None:
    """Every call the simulator received has its row, with the status it answered."""
    answered = [r for r in rows if r["status_code"] is not None]
    assert len(answered) == received, (received, rows)
    assert all(r["status_code"] == 200 and r["outcome"] == "success" for r in answered), rows
    assert not [r for r in rows if r["outcome"] in ("pending", "interrupted")], rows


# -- 1. writes fail while /healthz used to say ok ------------------------------------------
def test_a_locked_sqlite_file_turns_healthz_503_until_the_backlog_is_written(
    tmp_path: Path, simulator: Any, db_url: str, start_daemon: Callable[..., Any]
) -> None:
    port = free_port()
    path = Path(db_url.removeprefix("sqlite:///"))
    daemon = start_daemon(pulse_config(tmp_path, simulator, db_url, port))
    daemon.wait_for_log("outcome=success")
    wait_health(port, 200, 10)

    locker = Locker(path)
    body = wait_health(port, 503, LOCK_SECONDS - 1, "/healthz 503 while the file is locked")
    assert "history" in body and "history writes" in body["history"], body
    failing_after = time.monotonic() - locker.since
    time.sleep(max(0.0, LOCK_SECONDS - (time.monotonic() - locker.since)))
    locker.release()
    healthy = wait_health(port, 200, 20, "/healthz 200 once the backlog is written")
    assert "history" not in healthy, healthy
    assert daemon.stop(signal.SIGTERM) == 0
    no_lost_call(sqlite_rows(path), simulator.counts().get("105", 0))
    assert "Traceback" not in daemon.log
    print(f"503 after {failing_after:.1f}s of the lock")
