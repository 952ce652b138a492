"""The daemon on a fake clock through DST changes fires exactly what `plan` forecasts.

APScheduler runs unmodified; only its notion of "now" comes from the clock seam, and the
test steps that clock from one wake-up to the next instead of sleeping.
"""

from __future__ import annotations

import concurrent.futures
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from apscheduler.schedulers.base import BaseScheduler

from scheduler import clock, config, history
from scheduler.daemon import Daemon
from scheduler.executor import FiringExecutor
from scheduler.planner import build_plan
from tests.conftest import TOKEN, write_config

ZONE = ZoneInfo("Europe/Berlin")
JOBS = """\
jobs:
  - name: nightly
    tests: [1]
    schedule: {cron: "30 2 * * *", timezone: Europe/Berlin}
  - name: hourly
    tests: [2]
    schedule: {cron: "30 * * * *", timezone: Europe/Berlin}
  - name: new-york
    tests: [3]
    schedule: {cron: "15 1 * * *", timezone: America/New_York}
  - name: interval
    tests: [4]
    schedule: {every: 40m}
  - name: spread
    tests: [5, 6, 7]
    schedule: {cron: "0 2 * * *", timezone: Europe/Berlin}
    spread: 90s
"""

# Both autumn changes of 2026 (Berlin 25 Oct 01:00Z, New York 1 Nov 06:00Z) and Berlin's
# spring change (29 Mar 01:00Z).
WINDOWS = [
    (
        datetime(2026, 10, 24, 21, 0, tzinfo=timezone.utc),
        datetime(2026, 10, 25, 5, 0, tzinfo=timezone.utc),
    ),
    (
        datetime(2026, 10, 31, 23, 0, tzinfo=timezone.utc),
        datetime(2026, 11, 1, 8, 0, tzinfo=timezone.utc),
    ),
    (
        datetime(2026, 3, 28, 22, 0, tzinfo=timezone.utc),
        datetime(2026, 3, 29, 4, 0, tzinfo=timezone.utc),
    ),
]


class InlinePool:
    """Runs a submitted firing at once, so the fake clock cannot move under it."""

    def submit(self, fn: Any, *args: Any) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        future.set_result(fn(*args))
        return future

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass


class SteppedScheduler(BaseScheduler):
    """APScheduler's own job processing, driven by the test instead of a thread."""

    def shutdown(self, wait: bool = True) -> None:
        super().shutdown(wait)

    def wakeup(self) -> None:
        pass


def run_daemon(
    cfg: config.Config,
    engine: Any,
    sim_url: str,
    start: datetime,
    end: datetime,
    fake: clock.FakeClock,
) -> None:
    scheduler = SteppedScheduler(
        timezone=timezone.utc,
        executors={"default": FiringExecutor(InlinePool())},  # type: ignore[arg-type]
        job_defaults={"coalesce": False, "misfire_grace_time": None, "max_instances": 1_000_000},
    )
    daemon = Daemon(cfg, engine, simulated=(sim_url, TOKEN), scheduler=scheduler)
    fake.set(start)
    daemon.start()
    while True:
        wait = scheduler._process_jobs()
        if wait is None or fake.now() + timedelta(seconds=wait) >= end:
            break
        fake.advance(wait)
    scheduler.shutdown()


@pytest.mark.parametrize(
    ("start", "end"), WINDOWS, ids=["berlin-autumn", "new-york-autumn", "berlin-spring"]
)
def test_the_daemon_fires_what_plan_forecasts(
    tmp_path: Path, simulator, engine, fake_clock, start: datetime, end: datetime
):
    clock.patch_apscheduler()
    path = write_config(tmp_path / "jobs.yaml", JOBS, base_url=simulator.url)
    cfg = config.load(path)
    forecast = build_plan(cfg, start, until=end)
    run_daemon(cfg, engine, simulator.url, start, end, fake_clock)

    rows = sorted(history.query(engine, limit=None), key=lambda r: r["id"])
    assert {r["outcome"] for r in rows} == {"success"}
    fired = sorted((r["job"], r["test_id"], r["scheduled_for"]) for r in rows)
    planned = sorted((c.job, c.test_id, c.scheduled_for) for c in forecast.calls)
    assert fired == planned
    # Each call left at the planned moment (spread included), to the second.
    sent = sorted(round(r.received_at) for r in simulator.requests)
    assert sent == sorted(round(c.at.timestamp()) for c in forecast.calls)


def test_berlin_autumn_fires_the_fixed_hour_once_and_the_wildcard_hour_twice(
    tmp_path: Path, simulator, engine, fake_clock
):
    clock.patch_apscheduler()
    path = write_config(tmp_path / "jobs.yaml", JOBS, base_url=simulator.url)
    start, end = WINDOWS[0]
    run_daemon(config.load(path), engine, simulator.url, start, end, fake_clock)
    rows = history.query(engine, limit=None)

    def local(job: str) -> list[str]:
        berlin = sorted(r["scheduled_for"] for r in rows if r["job"] == job)
        return [t.astimezone(ZONE).strftime("%H:%M%z") for t in berlin]

    assert local("nightly") == ["02:30+0200"]
    assert local("hourly") == [
        "23:30+0200",
        "00:30+0200",
        "01:30+0200",
        "02:30+0200",
        "02:30+0100",
        "03:30+0100",
        "04:30+0100",
        "05:30+0100",
    ]
