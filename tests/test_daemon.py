"""A real `te-scheduler run` subprocess against the simulator: firings, signals, history."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from scheduler.store import db, history
from tests.conftest import cli_env, wait_until, write_config

pytestmark = pytest.mark.slow

EVERY_SECOND = """\
jobs:
  - name: pulse
    tests: [105, 106]
    schedule: {every: 1s}
"""


def attempts(db_url: str) -> list[dict]:
    engine = db.make_engine(db_url)
    try:
        return history.query(engine, limit=None)
    finally:
        engine.dispose()


def test_fires_every_second_and_exits_0_on_sigterm(tmp_path: Path, simulator, db_url, start_daemon):
    config = write_config(
        tmp_path / "jobs.yaml", EVERY_SECOND, base_url=simulator.url, db_url=db_url
    )
    daemon = start_daemon(config)
    wait_until(lambda: len(simulator.requests) >= 6, what="six calls")
    assert daemon.stop(signal.SIGTERM) == 0
    rows = attempts(db_url)
    # Exactly one row per HTTP attempt, each with its status code, none left open.
    assert len(rows) == len(simulator.requests)
    assert {r["outcome"] for r in rows} == {"success"}
    assert {r["status_code"] for r in rows} == {200}
    assert {r["test_id"] for r in rows} == {"105", "106"}
    # Slots are whole seconds (aligned to the epoch), one firing per slot and test.
    slots = [(r["test_id"], r["scheduled_for"]) for r in rows]
    assert len(slots) == len(set(slots))
    assert all(r["scheduled_for"].microsecond == 0 for r in rows)
    assert "Stopped" in daemon.log and "Traceback" not in daemon.log
    assert 'job="pulse" test=105 attempt=1 status=200 outcome=success' in daemon.log


def test_run_without_a_token_exits_2_naming_the_variable(tmp_path: Path, db_url, start_daemon):
    config = write_config(tmp_path / "jobs.yaml", EVERY_SECOND, db_url=db_url)
    env = cli_env()
    del env["TE_TEST_TOKEN"]
    daemon = start_daemon(config, env=env)
    assert daemon.proc.wait(timeout=30) == 2
    assert "TE_TEST_TOKEN" in daemon.log and "Traceback" not in daemon.log


def test_run_simulate_needs_no_token(tmp_path: Path, db_url, start_daemon):
    config = write_config(tmp_path / "jobs.yaml", EVERY_SECOND, db_url=db_url)
    env = cli_env()
    del env["TE_TEST_TOKEN"]
    daemon = start_daemon(config, "--simulate", env=env)
    daemon.wait_for_log("outcome=success")
    assert daemon.stop(signal.SIGINT) == 0
    assert any(r["outcome"] == "success" for r in attempts(db_url))
