"""The daemon on a fake clock through DST changes fires exactly what `plan` forecasts.

APScheduler runs unmodified; only its notion of "now" comes from the clock seam, and the
test steps that clock from one wake-up to the next instead of sleeping.
"""

from __future__ import annotations

import concurrent.futures
import logging
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa
from apscheduler.schedulers.base import BaseScheduler

from scheduler import clock, config
from scheduler.daemon import LOG_EACH_JOB_UP_TO, Daemon, entries_of
from scheduler.executor import FiringExecutor
from scheduler.store import history
from scheduler.timing.planner import build_plan
from scheduler.web.server import MetricsServer
from tests.conftest import TOKEN, write_config
from tests.test_metrics import next_fires

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


def stepped_daemon(
    cfg: config.Config,
    engine: Any,
    sim_url: str,
    scheduler_cls: type[SteppedScheduler] = SteppedScheduler,
) -> tuple[Daemon, SteppedScheduler]:
    """A Daemon (not started) whose APScheduler the test steps with :func:`step_until`."""
    scheduler = scheduler_cls(
        timezone=timezone.utc,
        executors={"default": FiringExecutor(InlinePool())},  # type: ignore[arg-type]
        job_defaults={"coalesce": False, "misfire_grace_time": None, "max_instances": 1_000_000},
    )
    return Daemon(cfg, engine, simulated=(sim_url, TOKEN), scheduler=scheduler), scheduler


def step_until(scheduler: SteppedScheduler, fake: clock.FakeClock, end: datetime) -> None:
    """Run every firing due before ``end``, moving the clock from one wake-up to the next."""
    while True:
        wait = scheduler._process_jobs()
        if wait is None or fake.now() + timedelta(seconds=wait) >= end:
            break
        fake.advance(wait)


def run_daemon(
    cfg: config.Config,
    engine: Any,
    sim_url: str,
    start: datetime,
    end: datetime,
    fake: clock.FakeClock,
) -> None:
    daemon, scheduler = stepped_daemon(cfg, engine, sim_url)
    fake.set(start)
    daemon.start()
    step_until(scheduler, fake, end)
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


# -- start-up: the cut between catch-up and the schedule --------------------------------------


def every_second_jobs(count: int) -> str:
    return "jobs:\n" + "".join(
        f"  - name: pulse-{i}\n    tests: [{i}]\n    schedule: {{every: 1s}}\n"
        for i in range(count)
    )


def test_slots_that_pass_while_history_is_read_are_neither_missed_nor_late(
    tmp_path: Path, simulator, engine, fake_clock
):
    # A big history takes a while to read. The schedule must start where catch-up stopped
    # looking, so the read's duration is no one's loss: before, the cut came first and every
    # `every: 1s` job found a backlog of slots "too late" when the scheduler started.
    clock.patch_apscheduler()
    cfg = config.load(
        write_config(tmp_path / "jobs.yaml", every_second_jobs(6), base_url=simulator.url)
    )

    def slow_history_read(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "attempts" in statement:
            fake_clock.advance(0.5)

    daemon, scheduler = stepped_daemon(cfg, engine, simulator.url)
    sa.event.listen(engine, "before_cursor_execute", slow_history_read)
    try:
        daemon.start()
    finally:
        sa.event.remove(engine, "before_cursor_execute", slow_history_read)
    started = fake_clock.now()
    step_until(scheduler, fake_clock, started + timedelta(seconds=1))
    scheduler.shutdown()

    rows = history.query(engine, limit=None)
    assert {(r["trigger"], r["outcome"]) for r in rows} == {("schedule", "success")}
    assert sorted(r["job"] for r in rows) == [f"pulse-{i}" for i in range(6)]
    assert all(started <= r["scheduled_for"] < started + timedelta(seconds=1) for r in rows)


def test_slots_that_pass_while_jobs_are_added_fire_late_and_the_rest_say_why(
    tmp_path: Path, simulator, engine, fake_clock
):
    clock.patch_apscheduler()
    cfg = config.load(
        write_config(tmp_path / "jobs.yaml", every_second_jobs(4), base_url=simulator.url)
    )

    class SlowAdds(SteppedScheduler):
        def add_job(self, *args: Any, **kwargs: Any) -> Any:
            fake_clock.advance(0.75)  # four adds: three seconds of start-up
            return super().add_job(*args, **kwargs)

    daemon, scheduler = stepped_daemon(cfg, engine, simulator.url, SlowAdds)
    cut = fake_clock.now()
    daemon.start()
    scheduler._process_jobs()
    scheduler.shutdown()

    rows = history.query(engine, limit=None)
    fired = sorted((r["job"], r["scheduled_for"]) for r in rows if r["outcome"] == "success")
    # Each job's latest slot fires late, as a normal firing...
    assert fired == [(f"pulse-{i}", cut + timedelta(seconds=3)) for i in range(4)]
    # ... and the ones before it are summed up as missed, saying why.
    missed = sorted(
        (r["job"], r["scheduled_for"], r["error"]) for r in rows if r["outcome"] == "missed"
    )
    error = (
        f"3 firing(s) missed from {cut.isoformat()} to "
        f"{(cut + timedelta(seconds=2)).isoformat()}: te-scheduler was starting"
    )
    assert missed == [(f"pulse-{i}", cut, error) for i in range(4)]


# -- the next-fire gauge --------------------------------------------------------------------

GAUGED = """\
jobs:
  - name: pulse
    tests: [1, 2]
    schedule: {every: 10s}
    spread: 4s
  - name: nightly
    tests: [3]
    schedule: {cron: "30 2 * * *"}
  - name: once
    tests: [4]
    schedule: {at: "2026-11-27T12:00:05+00:00"}
"""
REGAUGED = """\
jobs:
  - name: pulse
    tests: [1, 2]
    schedule: {every: 20s}
    spread: 4s
  - name: once
    tests: [4]
    schedule: {at: "2026-11-27T12:00:05+00:00"}
  - name: fresh
    tests: [5]
    schedule: {every: 1h}
"""


def test_the_next_fire_gauge_follows_firings_and_reloads_with_no_loop_running(
    tmp_path: Path, simulator, engine, fake_clock
):
    # The main loop used to copy every job's next fire time into the gauge twice a second;
    # now a scrape reads the schedule. The loop (Daemon._tick) never runs here.
    clock.patch_apscheduler()
    path = write_config(tmp_path / "jobs.yaml", GAUGED, base_url=simulator.url)
    daemon, scheduler = stepped_daemon(config.load(path), engine, simulator.url)
    server = MetricsServer(daemon.metrics, ("127.0.0.1", 0), lambda: (True, {})).start()
    base = f"http://127.0.0.1:{server.port}"
    noon = fake_clock.now()

    def at(seconds: float) -> float:
        return (noon + timedelta(seconds=seconds)).timestamp()

    try:
        daemon.start()
        nightly = datetime(2026, 11, 28, 2, 30, tzinfo=timezone.utc).timestamp()
        # pulse: the sooner of its two tests (spread offsets 0 s and 2 s).
        assert next_fires(base) == {"pulse": at(0), "nightly": nightly, "once": at(5)}

        step_until(scheduler, fake_clock, noon + timedelta(seconds=6))
        # pulse fired both tests for 12:00:00; once fired and has nothing left.
        assert next_fires(base) == {"pulse": at(10), "nightly": nightly}

        write_config(path, REGAUGED, base_url=simulator.url)
        assert daemon.reload("test")
        # pulse changed schedule: its next 20 s slot; nightly is gone; fresh is new.
        assert next_fires(base) == {"pulse": at(20), "fresh": at(3600)}

        # Removing the one-off that already fired (APScheduler dropped it) is an ordinary
        # reload, not a JobLookupError that ends the daemon.
        once = '  - name: once\n    tests: [4]\n    schedule: {at: "2026-11-27T12:00:05+00:00"}\n'
        assert once in REGAUGED
        write_config(path, REGAUGED.replace(once, ""), base_url=simulator.url)
        assert daemon.reload("test")
        assert next_fires(base) == {"pulse": at(20), "fresh": at(3600)}
    finally:
        server.stop()
        scheduler.shutdown()


def test_start_up_sums_up_a_big_schedule_in_one_line(
    tmp_path: Path, simulator, engine, fake_clock, caplog: pytest.LogCaptureFixture
):
    clock.patch_apscheduler()
    body = "jobs:\n" + "".join(
        f"  - name: hourly-{i:03d}\n    tests: [{i}]\n"
        f"    schedule: {{every: 1h, start: '2026-11-27T00:{i % 60:02d}:00+00:00'}}\n"
        for i in range(LOG_EACH_JOB_UP_TO + 1)
    )
    daemon, scheduler = stepped_daemon(
        config.load(write_config(tmp_path / "jobs.yaml", body, base_url=simulator.url)),
        engine,
        simulator.url,
    )
    with caplog.at_level(logging.INFO, logger="scheduler.daemon"):
        daemon.start()
    scheduler.shutdown()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Scheduled")]
    assert lines == [
        f"Scheduled {LOG_EACH_JOB_UP_TO + 1} jobs ({LOG_EACH_JOB_UP_TO + 1} tests); the soonest "
        'firing is job "hourly-000" at 2026-11-27T12:00:00+00:00; `te-scheduler plan` lists '
        "them all"
    ]


def test_a_firing_whose_job_a_reload_removed_while_it_waited_is_recorded_missed(
    tmp_path: Path, simulator, engine, fake_clock
):
    # A due firing can wait for a free thread; a reload that removes its job meanwhile must
    # neither call the API for it nor lose the slot without a row.
    clock.patch_apscheduler()
    path = write_config(tmp_path / "jobs.yaml", GAUGED, base_url=simulator.url)
    daemon, scheduler = stepped_daemon(config.load(path), engine, simulator.url)
    try:
        daemon.start()
        waiting = entries_of(daemon.config)["nightly/3"]
        write_config(path, REGAUGED, base_url=simulator.url)  # nightly is gone
        assert daemon.reload("test")
        slot = datetime(2026, 11, 28, 2, 30, tzinfo=timezone.utc)
        daemon._on_due("nightly/3", waiting, [slot], slot)
    finally:
        scheduler.shutdown()
    [row] = [r for r in history.query(engine) if r["job"] == "nightly"]
    assert (row["outcome"], row["scheduled_for"]) == ("missed", slot)
    assert row["error"].endswith("its job was removed or disabled before the firing began")
    assert not [r for r in simulator.requests if r.path == "/v7/tests/3/run"]
