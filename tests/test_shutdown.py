"""Shutdown: SIGTERM/SIGINT stop new firings, drain calls in flight, record the rest, exit 0."""

from __future__ import annotations

import signal
import time

import pytest

from scheduler import config, daemon
from scheduler.daemon import Daemon
from scheduler.store import history
from tests.conftest import TOKEN, wait_until, write_config
from tests.test_reliability import calls_to, finished, of, rows, rows_so_far

pytestmark = pytest.mark.slow

PAIR = """\
jobs:
  - name: pair
    tests: [105, 106]
    schedule: {every: 1s}
"""
SLOW = """\
jobs:
  - name: slow
    tests: [105]
    schedule: {every: 1s}
"""


def test_sigterm_lets_the_call_in_flight_finish_and_starts_nothing_new(
    tmp_path, simulator, db_url, start_daemon
):
    cfg = write_config(tmp_path / "jobs.yaml", PAIR, base_url=simulator.url, db_url=db_url)
    daemon_ = start_daemon(cfg)
    wait_until(lambda: finished(db_url, "105") and finished(db_url, "106"), what="first calls")
    simulator.add_rule("105", 200, delay=3)
    before = len(calls_to(simulator, "105"))
    wait_until(lambda: len(calls_to(simulator, "105")) > before, what="the slow call")
    signalled = time.time()
    daemon_.send(signal.SIGTERM)
    assert daemon_.proc.wait(timeout=20) == 0
    took = time.time() - signalled
    assert 1.5 < took < 10, f"exited {took:.1f}s after SIGTERM"  # it waited for the call
    found = rows(db_url)
    slow = max(of(found, test_id="105"), key=lambda r: r["duration_ms"] or 0)
    assert (slow["outcome"], slow["status_code"]) == ("success", 200)
    assert slow["duration_ms"] >= 2900
    assert not of(found, outcome="pending") and not of(found, outcome="interrupted")
    # Nothing new left after the signal (a call already on its way may land a moment later).
    assert [r for r in simulator.requests if r.received_at > signalled + 0.3] == []
    assert "Shutting down: no new firings" in daemon_.log and "Stopped" in daemon_.log


def test_a_second_sigint_stops_at_once_and_records_the_call_interrupted(
    tmp_path, simulator, db_url, start_daemon
):
    simulator.add_rule("105", 200, delay=20, times=None)
    cfg = write_config(tmp_path / "jobs.yaml", SLOW, base_url=simulator.url, db_url=db_url)
    daemon_ = start_daemon(cfg)
    wait_until(
        lambda: simulator.requests and of(rows_so_far(db_url), outcome="pending"),
        what="a call in flight",
    )
    daemon_.send(signal.SIGINT)
    daemon_.wait_for_log("Shutting down")
    time.sleep(0.3)  # well inside the 30 s drain
    assert daemon_.proc.poll() is None
    second = time.time()
    daemon_.send(signal.SIGINT)
    assert daemon_.proc.wait(timeout=15) == 0
    assert time.time() - second < 3, "a second SIGINT must not wait for the call"
    [row] = of(rows(db_url), test_id="105", attempt=1)
    assert (row["outcome"], row["status_code"]) == ("interrupted", None)
    assert row["finished_at"] is not None
    assert row["error"] == "te-scheduler stopped before the call finished"
    assert len(simulator.requests) == 1


def test_signals_repeated_while_the_process_exits_keep_exit_code_zero(
    tmp_path, simulator, db_url, start_daemon
):
    # Supervisors repeat themselves; once "Stopped" is logged, a late signal must not turn the
    # clean exit into a kill (-15) while the interpreter winds down.
    cfg = write_config(tmp_path / "jobs.yaml", PAIR, base_url=simulator.url, db_url=db_url)
    daemon_ = start_daemon(cfg)
    wait_until(lambda: finished(db_url, "105"), what="a first call")
    daemon_.send(signal.SIGTERM)
    daemon_.wait_for_log("Stopped")
    while daemon_.proc.poll() is None:
        daemon_.send(signal.SIGTERM)
        time.sleep(0.001)
    assert daemon_.proc.returncode == 0


def test_a_call_still_open_when_the_drain_ends_is_recorded_interrupted(
    tmp_path, simulator, engine, monkeypatch
):
    # The drain's 30 s, shortened in-process; the subprocess tests above cover the signals.
    monkeypatch.setattr(daemon, "DRAIN_SECONDS", 1.0)
    monkeypatch.setenv("TE_TEST_TOKEN", TOKEN)
    simulator.add_rule("105", 200, delay=20, times=None)
    cfg = config.load(write_config(tmp_path / "jobs.yaml", SLOW, base_url=simulator.url))
    running = Daemon(cfg, engine)
    running.start()
    try:
        wait_until(lambda: simulator.requests, what="a call in flight")
    finally:
        started = time.monotonic()
        running.shutdown()
    assert time.monotonic() - started < 5
    [row] = history.query(engine, limit=None)
    assert (row["outcome"], row["status_code"]) == ("interrupted", None)
    assert row["error"] == "te-scheduler stopped before the call finished"
