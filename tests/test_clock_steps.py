"""Wall-clock steps under a real daemon: noticed, logged with their size, counted, and honest.

The wall clock is stepped through the clock seam's offset file (what an NTP step or a VM
restore does to CLOCK_REALTIME); monotonic and boot time run on untouched, as they would.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa

from scheduler import clock
from scheduler.clock import WALL_OFFSET_FILE_ENV, Jump, JumpWatch
from scheduler.store import db
from tests.conftest import cli_env, run_cli, wait_until, write_config
from tests.test_operations import free_port, scrape, value

JOBS = """\
metrics:
  listen: 127.0.0.1:{port}
defaults:
  retry: {{attempts: 1}}
jobs:
  - name: pulse
    tests: [105]
    schedule: {{every: 2s}}
  - name: minutely
    tests: [106]
    schedule: {{cron: "* * * * *"}}
"""


def rows(db_url: str) -> list[dict[str, object]]:
    engine = db.make_engine(db_url)
    try:
        with engine.connect() as conn:
            result = conn.execute(sa.text("SELECT * FROM attempts ORDER BY id"))
            return [dict(r._mapping) for r in result]
    finally:
        engine.dispose()


def start(tmp_path: Path, simulator, db_url: str, start_daemon):  # type: ignore[no-untyped-def]
    offset = tmp_path / "wall-offset"
    offset.write_text("0\n")
    port = free_port()
    config = write_config(
        tmp_path / "jobs.yaml", JOBS.format(port=port), base_url=simulator.url, db_url=db_url
    )
    daemon = start_daemon(config, env=cli_env(**{WALL_OFFSET_FILE_ENV: str(offset)}))
    daemon.wait_for_log('job="pulse"', timeout=20)  # it fires: the schedule is running
    return daemon, offset, port


@pytest.mark.slow
def test_a_step_back_is_logged_counted_and_the_next_fires_come_from_the_new_time(
    tmp_path: Path, simulator, db_url: str, start_daemon
) -> None:
    daemon, offset, port = start(tmp_path, simulator, db_url, start_daemon)
    offset.write_text("-600\n")  # the wall clock goes back ten minutes
    daemon.wait_for_log("Clock: the wall clock stepped back by 10m00s", timeout=10)
    stepped_at = time.time() - 600

    def next_pulse() -> float:
        family = scrape(port)["te_scheduler_next_fire_timestamp_seconds"]
        return value(family, "te_scheduler_next_fire_timestamp_seconds", job="pulse")

    # Before the fix APScheduler kept the slot it had computed before the step, 600 s ahead.
    wait_until(lambda: next_pulse() < stepped_at + 10, timeout=10, what="pulse re-timed")
    steps = scrape(port)["te_scheduler_clock_step_seconds"]
    total = value(steps, "te_scheduler_clock_step_seconds_total", kind="step", direction="back")
    assert total == pytest.approx(600, abs=1)
    time.sleep(3)  # slots replayed by the step come due again: the firing key refuses them
    assert daemon.stop() == 0
    status = run_cli("--db", db_url, "status", "--format", "json")
    assert status.returncode == 0, status.stderr
    [instance] = json.loads(status.stdout)
    assert "the wall clock stepped back by 10m00s" in instance["last_clock_jump"]
    keys = [(r["job"], r["test_id"], r["scheduled_for"], r["attempt"]) for r in rows(db_url)]
    assert len(keys) == len(set(keys))


@pytest.mark.slow
def test_a_step_forward_gives_one_missed_row_that_names_the_step(
    tmp_path: Path, simulator, db_url: str, start_daemon
) -> None:
    daemon, offset, _ = start(tmp_path, simulator, db_url, start_daemon)
    offset.write_text("3600\n")
    daemon.wait_for_log("Clock: the wall clock stepped forward by 1h00m00s", timeout=10)

    def missed() -> list[dict[str, object]]:
        return [r for r in rows(db_url) if r["outcome"] == "missed" and r["job"] == "pulse"]

    wait_until(missed, timeout=15, what="the missed row of pulse")
    assert daemon.stop() == 0
    [row] = missed()
    assert "the wall clock stepped forward by 1h00m00s" in str(row["error"])
    assert "too late" not in str(row["error"])


# -- the watch itself, on the seam ------------------------------------------------------------
class _Stepped(clock.SystemClock):
    def __init__(self) -> None:
        super().__init__()
        self.offset = 0.0

    def now(self) -> datetime:
        return datetime.now(timezone.utc) + timedelta(seconds=self.offset)


def test_the_watch_tells_a_step_and_ignores_small_moves() -> None:
    stepped = _Stepped()
    previous = clock.set_clock(stepped)
    try:
        watch = JumpWatch()
        assert watch.check() is None
        stepped.offset = 1.0  # below the threshold: slewing or noise
        assert watch.check() is None
        stepped.offset = -299.0
        jump = watch.check()
        assert isinstance(jump, Jump) and jump.step and jump.seconds == pytest.approx(-300, abs=0.1)
        assert jump.describe().startswith("the wall clock stepped back by 5m00s at ")
        assert watch.check() is None  # reported once
        stepped.offset = 3301.0
        forward = watch.explain(since=datetime.now(timezone.utc) - timedelta(minutes=1))
        assert forward is not None and forward.seconds == pytest.approx(3600, abs=0.1)
    finally:
        clock.set_clock(previous)


def test_a_jump_a_late_firing_noticed_first_still_reaches_the_main_loop() -> None:
    # explain() runs on a firing's thread and may see the jump before the main loop's
    # check(); the loop must still get it, or it would neither log, count nor re-time.
    stepped = _Stepped()
    previous = clock.set_clock(stepped)
    try:
        watch = JumpWatch()
        stepped.offset = 600.0
        assert watch.explain(since=datetime.now(timezone.utc) - timedelta(minutes=1))
        jump = watch.check()
        assert jump is not None and jump.seconds == pytest.approx(600, abs=0.1)
        assert watch.check() is None
    finally:
        clock.set_clock(previous)
