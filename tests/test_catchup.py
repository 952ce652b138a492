"""Catch-up after downtime: the pure decision (a table, like Kubernetes' TestMostRecentScheduleTime)
and real restarts of a `te-scheduler run` subprocess."""

from __future__ import annotations

import math
import time
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from scheduler import history
from scheduler.catchup import MAX_COUNTED, CatchUp, plan_catch_up
from scheduler.config import Schedule
from scheduler.runner import instance_name
from tests.conftest import wait_until, write_config
from tests.test_reliability import finished, of, rows, rows_so_far

T = datetime(2026, 11, 27, 12, 0, tzinfo=timezone.utc)  # a Friday
M, H, D = timedelta(minutes=1), timedelta(hours=1), timedelta(days=1)
S = timedelta(seconds=1)
EVERY_15M = Schedule(every=15 * M)
BERLIN = "Europe/Berlin"


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=timezone.utc)


# name, schedule, last slot that fired, now, catch_up window, expected verdict
CASES: list[tuple[str, Schedule, datetime | None, datetime, timedelta, CatchUp]] = [
    ("never fired", EVERY_15M, None, T + H, H, CatchUp(None)),
    ("nothing missed yet", EVERY_15M, T, T + 10 * M, H, CatchUp(None)),
    ("a slot due right now is the scheduler's", EVERY_15M, T, T + 15 * M, H, CatchUp(None)),
    ("one missed, recent", EVERY_15M, T, T + 20 * M, H, CatchUp(T + 15 * M)),
    ("one missed, too old", EVERY_15M, T, T + 20 * M, M,
     CatchUp(None, T + 15 * M, T + 15 * M, 1)),
    ("the window's edge is inside", EVERY_15M, T, T + 20 * M, 5 * M, CatchUp(T + 15 * M)),
    ("several missed, the latest runs", EVERY_15M, T, T + 50 * M, H,
     CatchUp(T + 45 * M, T + 15 * M, T + 30 * M, 2)),
    ("several missed, none recent", EVERY_15M, T, T + 50 * M, 4 * M,
     CatchUp(None, T + 15 * M, T + 45 * M, 3)),
    ("catch_up 0s runs nothing", EVERY_15M, T, T + 50 * M, timedelta(0),
     CatchUp(None, T + 15 * M, T + 45 * M, 3)),
    ("the clock went back", EVERY_15M, T + H, T, H, CatchUp(None)),
    ("every with a start anchor", Schedule(every=10 * M, start=T + 3 * M), T + 3 * M,
     T + 35 * M, H, CatchUp(T + 33 * M, T + 13 * M, T + 23 * M, 2)),
    ("weekdays over a weekend", Schedule(cron="0 9 * * mon-fri"), utc(2026, 11, 27, 9),
     utc(2026, 11, 30, 10), 2 * H, CatchUp(utc(2026, 11, 30, 9))),
    # Europe/Berlin leaves summer time on 25 Oct 2026: 02:30 happens twice but is one slot.
    ("a fixed hour over the autumn change counts once", Schedule(BERLIN, cron="30 2 * * *"),
     utc(2026, 10, 24, 0, 30), utc(2026, 10, 26, 12), H,
     CatchUp(None, utc(2026, 10, 25, 0, 30), utc(2026, 10, 26, 1, 30), 2)),
    # ... and enters it on 29 Mar 2026: 02:30 does not exist, the slot is 03:00 CEST.
    ("a skipped hour fires after the gap", Schedule(BERLIN, cron="30 2 * * *"),
     utc(2026, 3, 28, 1, 30), utc(2026, 3, 29, 1, 30), H, CatchUp(utc(2026, 3, 29, 1))),
    ("a one-off that fired", Schedule(at=T), T, T + D, H, CatchUp(None)),
    ("a one-off that never fired", Schedule(at=T), None, T + D, H, CatchUp(None)),
    ("hourly, down for a day, 1h window", Schedule(cron="@hourly"), T - D, T + 30 * M, H,
     CatchUp(T, T - D + H, T - H, 23)),
]


@pytest.mark.parametrize(("schedule", "last", "now", "window", "expected"),
                         [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_plan_catch_up(schedule: Schedule, last: datetime | None, now: datetime,
                       window: timedelta, expected: CatchUp) -> None:
    assert in_utc(plan_catch_up(schedule, last, now, window)) == expected


def in_utc(verdict: CatchUp) -> CatchUp:
    """The verdict with UTC times: Python never finds a time in a repeated hour equal to a
    time in another zone, even the same instant."""
    def convert(moment: datetime | None) -> datetime | None:
        return moment.astimezone(timezone.utc) if moment else None

    return replace(verdict, run=convert(verdict.run), missed_first=convert(verdict.missed_first),
                   missed_last=convert(verdict.missed_last))


def test_the_missed_error_says_how_many_and_from_when_to_when() -> None:
    verdict = plan_catch_up(EVERY_15M, T, T + 50 * M, H)
    assert verdict.missed_error == (
        "2 firing(s) missed from 2026-11-27T12:15:00+00:00 to 2026-11-27T12:30:00+00:00 "
        "while te-scheduler was not running")


@pytest.mark.parametrize(("window", "run"), [(H, T - S), (timedelta(0), None)])
def test_a_long_outage_of_a_fast_schedule_still_finds_the_latest_slot(window, run) -> None:
    # Two days of `every: 1s` is more than MAX_COUNTED slots: the count becomes a lower bound,
    # but the slot that runs (and the last one given up) must still be the real latest ones.
    verdict = plan_catch_up(Schedule(every=S), T - 2 * D, T, window)
    assert verdict.run == run
    assert verdict.missed_first == T - 2 * D + S
    assert verdict.missed_last == (T - 2 * S if run else T - S)
    assert verdict.missed_count >= MAX_COUNTED - 1 and not verdict.counted_all
    assert verdict.missed_error.startswith("at least ")


# -- real restarts ------------------------------------------------------------------------
TWO_SECONDS = """\
jobs:
  - name: kept
    tests: [105]
    schedule: {every: 2s}
  - name: strict
    tests: [106]
    schedule: {every: 2s}
    catch_up: 0s
"""
NEWCOMER = """\
  - name: newcomer
    tests: [107]
    schedule: {every: 2s}
"""
TWO = 2 * S


def latest(found: list[dict[str, Any]], job: str) -> datetime:
    return max(r["scheduled_for"] for r in of(found, job=job))


def first_scheduled_after(found: list[dict[str, Any]], job: str, after: datetime) -> datetime:
    return min(r["scheduled_for"] for r in of(found, job=job, trigger="schedule")
               if r["outcome"] != "missed" and r["scheduled_for"] > after)


def fired_since(db_url: str, job: str, moment: float) -> bool:
    return any(r["job"] == job and r["trigger"] == "schedule" and r["outcome"] == "success"
               and r["scheduled_for"].timestamp() > moment for r in rows_so_far(db_url))


@pytest.mark.slow
def test_a_restart_runs_the_latest_missed_slot_once_and_sums_up_the_rest(
    tmp_path, simulator, db_url, start_daemon
):
    cfg = write_config(tmp_path / "jobs.yaml", TWO_SECONDS, base_url=simulator.url,
                       db_url=db_url)
    first = start_daemon(cfg)
    wait_until(lambda: finished(db_url, "105") and finished(db_url, "106"), what="first firings")
    assert first.stop() == 0
    before = rows(db_url)
    last = {job: latest(before, job) for job in ("kept", "strict")}
    # Down for at least two slots; the newcomer appears in the config meanwhile.
    write_config(cfg, TWO_SECONDS + NEWCOMER, base_url=simulator.url, db_url=db_url)
    wait_until(lambda: time.time() > max(last.values()).timestamp() + 4.2, timeout=10)
    restarted = time.time()
    second = start_daemon(cfg)
    wait_until(lambda: all(fired_since(db_url, job, restarted)
                           for job in ("kept", "strict", "newcomer")), what="slots after restart")
    wait_until(lambda: of(rows_so_far(db_url), trigger="catch-up", outcome="success"),
               what="the catch-up call")
    assert second.stop() == 0
    found = rows(db_url)

    # kept (catch_up 1h): the latest missed slot ran once, the earlier ones are one missed row.
    [catch_up] = of(found, job="kept", trigger="catch-up")
    [missed] = of(found, job="kept", outcome="missed")
    resumed = first_scheduled_after(found, "kept", last["kept"])
    assert catch_up["scheduled_for"] == resumed - TWO  # no slot between catch-up and schedule
    assert missed["scheduled_for"] == last["kept"] + TWO
    count = (catch_up["scheduled_for"] - missed["scheduled_for"]) // TWO
    assert count >= 1
    assert missed["error"] == (
        f"{count} firing(s) missed from {missed['scheduled_for'].isoformat()} to "
        f"{(catch_up['scheduled_for'] - TWO).isoformat()}: te-scheduler was not running")
    assert (catch_up["outcome"], missed["status_code"]) == ("success", None)

    # strict (catch_up 0s): nothing ran, every missed slot is in its one missed row.
    assert not of(found, job="strict", trigger="catch-up")
    [missed] = of(found, job="strict", outcome="missed")
    resumed = first_scheduled_after(found, "strict", last["strict"])
    count = (resumed - missed["scheduled_for"]) // TWO
    assert missed["scheduled_for"] == last["strict"] + TWO and count >= 2
    assert missed["error"].startswith(
        f"{count} firing(s) missed from {missed['scheduled_for'].isoformat()} to "
        f"{(resumed - TWO).isoformat()}")

    # newcomer never fired before: nothing to catch up.
    assert {r["trigger"] for r in of(found, job="newcomer")} == {"schedule"}
    assert not of(found, job="newcomer", outcome="missed")

    # Slots are aligned to the epoch, so both runs agree on them; one row per slot and test.
    assert all(r["scheduled_for"].timestamp() % 2 == 0 for r in found)
    keys = [(r["test_id"], r["scheduled_for"], r["attempt"]) for r in found]
    assert len(keys) == len(set(keys))
    # Only calls for slots that were run reached the API: one per non-missed, non-skipped row.
    sent = [r for r in found if r["outcome"] not in ("missed", "skipped")]
    assert len(simulator.requests) == len(sent)


HOURLY = """\
jobs:
  - name: {name}
    tests: [{test}]
    schedule: {{every: 1h, start: "{start}"}}
    catch_up: {catch_up}
"""


def hourly(name: str, test: str, start: datetime, catch_up: str) -> str:
    return HOURLY.format(name=name, test=test, start=start.isoformat(), catch_up=catch_up)


def seed(engine: Any, job: str, test: str, slot: datetime, outcome: str) -> None:
    """A row as an earlier run of the daemon would have left it."""
    key = history.AttemptKey(f"seed-{job}", job, test, None, "schedule", slot, 1, "gone:1")
    history.record_attempt(engine, key, started_at=slot, outcome=outcome, error="seeded")


def anchor() -> datetime:
    """Slots at anchor, +1h, +2h (half an hour ago); the next one is half an hour away."""
    return datetime.fromtimestamp(math.floor(time.time()), tz=timezone.utc) - 2.5 * H


@pytest.mark.slow
def test_a_second_restart_does_not_report_the_same_missed_slots_again(
    tmp_path, simulator, engine, db_url, start_daemon
):
    start = anchor()
    seed(engine, "daily", "105", start, "success")
    cfg = write_config(tmp_path / "jobs.yaml", hourly("daily", "105", start, "0s"),
                       base_url=simulator.url, db_url=db_url)
    for _ in range(2):
        daemon = start_daemon(cfg)
        daemon.wait_for_log("Scheduled job")  # logged once catch-up has decided
        assert daemon.stop() == 0
    [missed] = of(rows(db_url), outcome="missed")
    assert missed["scheduled_for"] == start + H
    assert missed["error"].startswith(
        f"2 firing(s) missed from {(start + H).isoformat()} to {(start + 2 * H).isoformat()}")
    assert simulator.requests == []


@pytest.mark.slow
def test_an_interrupted_call_is_not_repeated_by_catch_up(tmp_path, simulator, engine, db_url,
                                                         start_daemon):
    start = anchor()
    # "cut" was interrupted on its latest slot; "older" on the slot before the latest.
    seed(engine, "cut", "105", start + 2 * H, "interrupted")
    seed(engine, "older", "106", start + H, "interrupted")
    body = hourly("cut", "105", start, "2h") + hourly("older", "106", start, "2h")[5:]
    cfg = write_config(tmp_path / "jobs.yaml", body, base_url=simulator.url, db_url=db_url)
    daemon = start_daemon(cfg)
    wait_until(lambda: of(rows_so_far(db_url), trigger="catch-up", outcome="success"),
               what="the catch-up of the later slot")
    daemon.wait_for_log("Scheduled job")
    assert daemon.stop() == 0
    found = rows(db_url)
    assert [(r["trigger"], r["outcome"]) for r in of(found, job="cut")] == [
        ("schedule", "interrupted")]
    [caught] = of(found, job="older", trigger="catch-up")
    assert caught["scheduled_for"] == start + 2 * H  # the later slot, not the interrupted one
    assert len(simulator.requests) == 1
    assert instance_name() not in {r["instance"] for r in found}
