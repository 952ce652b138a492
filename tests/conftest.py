"""Shared fixtures and helpers: a fake clock, attempt keys, the simulator, databases, daemons.

Every test module sees these fixtures without importing them, and the PostgreSQL ones of
tests/postgres.py too (``pytest_plugins``): a test file never imports a fixture by name.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from scheduler import clock
from scheduler.api.simulator import Simulator
from scheduler.store import db
from scheduler.store.history import AttemptKey

# The server is started once per session, by the first test that asks for it.
pytest_plugins = ["tests.postgres"]

REPO = Path(__file__).resolve().parent.parent
TOKEN = "test-token-5f2b9c"
FAKE_START = datetime(2026, 11, 27, 12, 0, tzinfo=timezone.utc)  # what fake_clock reads first
T0 = datetime(2026, 11, 27, 6, 0, tzinfo=timezone.utc)  # the slot of key()'s attempts


def key(run_id: str = "run-1", **changes: Any) -> AttemptKey:
    """An AttemptKey of job "dns", test 105, agent 1234, slot T0, attempt 1, by "host-a:100";
    ``changes`` (any AttemptKey field by name) replace those values."""
    base = AttemptKey(
        run_id=run_id,
        job="dns",
        test_id="105",
        aid="1234",
        trigger="schedule",
        scheduled_for=T0,
        attempt=1,
        instance="host-a:100",
    )
    return replace(base, **changes)


@pytest.fixture
def fake_clock() -> Iterator[clock.FakeClock]:
    """Install a FakeClock at FAKE_START for the test, then restore the real one."""
    fake = clock.FakeClock(FAKE_START)
    previous = clock.set_clock(fake)
    yield fake
    clock.set_clock(previous)


@pytest.fixture
def simulator() -> Iterator[Simulator]:
    """The simulated API on a free loopback port, accepting only TOKEN."""
    sim = Simulator(token=TOKEN).start()
    yield sim
    sim.stop()


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'history.db'}"


@pytest.fixture
def engine(db_url: str):  # type: ignore[no-untyped-def]
    """A real SQLite file migrated to head by Alembic."""
    eng = db.make_engine(db_url)
    db.upgrade(eng)
    yield eng
    eng.dispose()


def write_config(
    path: Path,
    body: str,
    *,
    base_url: str | None = None,
    db_url: str | None = None,
    api_extra: str = "",
) -> Path:
    """Write a jobs.yaml with an api section pointing at ``base_url`` and the given jobs."""
    api = f"  base_url: {base_url}\n" if base_url else ""
    api += "  token_env: TE_TEST_TOKEN\n" + api_extra
    history = f"history:\n  url: {db_url}\n" if db_url else ""
    path.write_text(f"version: 1\napi:\n{api}{history}" + textwrap.dedent(body))
    return path


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TE_SCHEDULER")}
    env.update({"TE_TEST_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1"}, **extra)
    return env


def run_cli(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m scheduler ARGS`` as a user would; returns the finished process."""
    return subprocess.run(
        [sys.executable, "-m", "scheduler", *args],
        cwd=cwd,
        env=env or cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class DaemonProcess:
    """A real ``te-scheduler run`` subprocess; its stderr goes to a file we can read."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str]) -> None:
        self.log_path = cwd / f"daemon-{time.monotonic_ns()}.log"
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "scheduler", *args],
            cwd=cwd,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            text=True,
        )

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    def wait_for_log(self, needle: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.log:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.log}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{needle!r} not logged within {timeout}s:\n{self.log}")
            time.sleep(0.05)

    def send(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 40) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout=timeout)
        self._log.close()
        return code

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)
        self._log.close()


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    """Start ``te-scheduler -c CONFIG run ARGS`` subprocesses; all are killed at teardown."""
    started: list[DaemonProcess] = []

    def start(config: Path, *args: str, env: dict[str, str] | None = None) -> DaemonProcess:
        daemon = DaemonProcess(["-c", str(config), "run", *args], tmp_path, env or cli_env())
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        if daemon.proc.poll() is None:
            daemon.kill()


def wait_until(predicate: Callable[[], object], timeout: float = 20, what: str = "") -> None:
    """Poll ``predicate`` (a real-world condition, e.g. rows written) until true."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.05)
