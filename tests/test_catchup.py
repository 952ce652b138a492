"""Catch-up after downtime: the pure decision (a table, like Kubernetes' TestMostRecentScheduleTime)
and real restarts of a `te-scheduler run` subprocess."""

from __future__ import annotations

import math
import random
import signal
import time
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from scheduler import clock, config
from scheduler.api.simulator import Simulator
from scheduler.config import Schedule
from scheduler.daemon import Daemon
from scheduler.runner import instance_name
from scheduler.store import history, recovery, tables
from scheduler.timing.catchup import MAX_COUNTED, CatchUp, plan_catch_up
from tests.conftest import TOKEN, key, wait_until, write_config
from tests.test_daemon_clock import SteppedScheduler
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
    ("one missed, too old", EVERY_15M, T, T + 20 * M, M, CatchUp(None, T + 15 * M, T + 15 * M, 1)),
    ("the window's edge is inside", EVERY_15M, T, T + 20 * M, 5 * M, CatchUp(T + 15 * M)),
    (
        "several missed, the latest runs",
        EVERY_15M,
        T,
        T + 50 * M,
        H,
        CatchUp(T + 45 * M, T + 15 * M, T + 30 * M, 2),
    ),
    (
        "several missed, none recent",
        EVERY_15M,
        T,
        T + 50 * M,
        4 * M,
        CatchUp(None, T + 15 * M, T + 45 * M, 3),
    ),
    (
        "catch_up 0s runs nothing",
        EVERY_15M,
        T,
        T + 50 * M,
        timedelta(0),
        CatchUp(None, T + 15 * M, T + 45 * M, 3),
    ),
    ("the clock went back", EVERY_15M, T + H, T, H, CatchUp(None)),
    (
        "every with a start anchor",
        Schedule(every=10 * M, start=T + 3 * M),
        T + 3 * M,
        T + 35 * M,
        H,
        CatchUp(T + 33 * M, T + 13 * M, T + 23 * M, 2),
    ),
    (
        "weekdays over a weekend",
        Schedule(cron="0 9 * * mon-fri"),
        utc(2026, 11, 27, 9),
        utc(2026, 11, 30, 10),
        2 * H,
        CatchUp(utc(2026, 11, 30, 9)),
    ),
    # Europe/Berlin leaves summer time on 25 Oct 2026: 02:30 happens twice but is one slot.
    (
        "a fixed hour over the autumn change counts once",
        Schedule(BERLIN, cron="30 2 * * *"),
        utc(2026, 10, 24, 0, 30),
        utc(2026, 10, 26, 12),
        H,
        CatchUp(None, utc(2026, 10, 25, 0, 30), utc(2026, 10, 26, 1, 30), 2),
    ),
    # ... and enters it on 29 Mar 2026: 02:30 does not exist, the slot is 03:00 CEST.
    (
        "a skipped hour fires after the gap",
        Schedule(BERLIN, cron="30 2 * * *"),
        utc(2026, 3, 28, 1, 30),
        utc(2026, 3, 29, 1, 30),
        H,
        CatchUp(utc(2026, 3, 29, 1)),
    ),
    ("a one-off that fired", Schedule(at=T), T, T + D, H, CatchUp(None)),
    ("a one-off that never fired", Schedule(at=T), None, T + D, H, CatchUp(None)),
    (
        "hourly, down for a day, 1h window",
        Schedule(cron="@hourly"),
        T - D,
        T + 30 * M,
        H,
        CatchUp(T, T - D + H, T - H, 23),
    ),
]


@pytest.mark.parametrize(
    ("schedule", "last", "now", "window", "expected"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_plan_catch_up(
    schedule: Schedule, last: datetime | None, now: datetime, window: timedelta, expected: CatchUp
) -> None:
    assert in_utc(plan_catch_up(schedule, last, now, window)) == expected


def in_utc(verdict: CatchUp) -> CatchUp:
    """The verdict with UTC times: Python never finds a time in a repeated hour equal to a
    time in another zone, even the same instant."""

    def convert(moment: datetime | None) -> datetime | None:
        return moment.astimezone(timezone.utc) if moment else None

    return replace(
        verdict,
        run=convert(verdict.run),
        missed_first=convert(verdict.missed_first),
        missed_last=convert(verdict.missed_last),
    )


def test_the_missed_verdict_says_how_many_and_from_when_to_when() -> None:
    # The row's text is recovery.record_missed's (pinned by the restart tests below).
    verdict = plan_catch_up(EVERY_15M, T, T + 50 * M, H)
    assert verdict.missed_count == 2 and verdict.counted_all
    assert verdict.missed_first.isoformat() == "2026-11-27T12:15:00+00:00"
    assert verdict.missed_last.isoformat() == "2026-11-27T12:30:00+00:00"


@pytest.mark.parametrize(("window", "run"), [(H, T - S), (timedelta(0), None)])
def test_a_long_outage_of_a_fast_schedule_still_finds_the_latest_slot(window, run) -> None:
    # Two days of `every: 1s` is more than MAX_COUNTED slots: the count becomes a lower bound,
    # but the slot that runs (and the last one given up) must still be the real latest ones.
    verdict = plan_catch_up(Schedule(every=S), T - 2 * D, T, window)
    assert verdict.run == run
    assert verdict.missed_first == T - 2 * D + S
    assert verdict.missed_last == (T - 2 * S if run else T - S)
    assert verdict.missed_count >= MAX_COUNTED - 1 and not verdict.counted_all


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
    return min(
        r["scheduled_for"]
        for r in of(found, job=job, trigger="schedule")
        if r["outcome"] != "missed" and r["scheduled_for"] > after
    )


def fired_since(db_url: str, job: str, moment: float) -> bool:
    return any(
        r["job"] == job
        and r["trigger"] == "schedule"
        and r["outcome"] == "success"
        and r["scheduled_for"].timestamp() > moment
        for r in rows_so_far(db_url)
    )


@pytest.mark.slow
def test_a_restart_runs_the_latest_missed_slot_once_and_sums_up_the_rest(
    tmp_path, simulator, db_url, start_daemon
):
    cfg = write_config(tmp_path / "jobs.yaml", TWO_SECONDS, base_url=simulator.url, db_url=db_url)
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
    wait_until(
        lambda: all(fired_since(db_url, job, restarted) for job in ("kept", "strict", "newcomer")),
        what="slots after restart",
    )
    wait_until(
        lambda: of(rows_so_far(db_url), trigger="catch-up", outcome="success"),
        what="the catch-up call",
    )
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
        f"{(catch_up['scheduled_for'] - TWO).isoformat()}: te-scheduler was not running"
    )
    assert (catch_up["outcome"], missed["status_code"]) == ("success", None)

    # strict (catch_up 0s): nothing ran, every missed slot is in its one missed row.
    assert not of(found, job="strict", trigger="catch-up")
    [missed] = of(found, job="strict", outcome="missed")
    resumed = first_scheduled_after(found, "strict", last["strict"])
    count = (resumed - missed["scheduled_for"]) // TWO
    assert missed["scheduled_for"] == last["strict"] + TWO and count >= 2
    assert missed["error"].startswith(
        f"{count} firing(s) missed from {missed['scheduled_for'].isoformat()} to "
        f"{(resumed - TWO).isoformat()}"
    )

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
    k = key(f"seed-{job}", job=job, test_id=test, aid=None, scheduled_for=slot, instance="gone:1")
    history.record_attempt(engine, k, started_at=slot, outcome=outcome, error="seeded")


def anchor() -> datetime:
    """Slots at anchor, +1h, +2h (half an hour ago); the next one is half an hour away."""
    return datetime.fromtimestamp(math.floor(time.time()), tz=timezone.utc) - 2.5 * H


@pytest.mark.slow
def test_a_second_restart_does_not_report_the_same_missed_slots_again(
    tmp_path, simulator, engine, db_url, start_daemon
):
    start = anchor()
    seed(engine, "daily", "105", start, "success")
    cfg = write_config(
        tmp_path / "jobs.yaml",
        hourly("daily", "105", start, "0s"),
        base_url=simulator.url,
        db_url=db_url,
    )
    for _ in range(2):
        daemon = start_daemon(cfg)
        daemon.wait_for_log("Scheduled job")  # logged once catch-up has decided
        assert daemon.stop() == 0
    [missed] = of(rows(db_url), outcome="missed")
    assert missed["scheduled_for"] == start + H
    assert missed["error"].startswith(
        f"2 firing(s) missed from {(start + H).isoformat()} to {(start + 2 * H).isoformat()}"
    )
    assert simulator.requests == []


@pytest.mark.slow
def test_an_interrupted_call_is_not_repeated_by_catch_up(
    tmp_path, simulator, engine, db_url, start_daemon
):
    start = anchor()
    # "cut" was interrupted on its latest slot; "older" on the slot before the latest.
    seed(engine, "cut", "105", start + 2 * H, "interrupted")
    seed(engine, "older", "106", start + H, "interrupted")
    body = hourly("cut", "105", start, "2h") + hourly("older", "106", start, "2h")[5:]
    cfg = write_config(tmp_path / "jobs.yaml", body, base_url=simulator.url, db_url=db_url)
    daemon = start_daemon(cfg)
    wait_until(
        lambda: of(rows_so_far(db_url), trigger="catch-up", outcome="success"),
        what="the catch-up of the later slot",
    )
    daemon.wait_for_log("Scheduled job")
    assert daemon.stop() == 0
    found = rows(db_url)
    assert [(r["trigger"], r["outcome"]) for r in of(found, job="cut")] == [
        ("schedule", "interrupted")
    ]
    [caught] = of(found, job="older", trigger="catch-up")
    assert caught["scheduled_for"] == start + 2 * H  # the later slot, not the interrupted one
    assert len(simulator.requests) == 1
    assert instance_name() not in {r["instance"] for r in found}


# -- many jobs at once: one history read, the same decisions ---------------------------------


def random_history(seed: int, jobs: int, end: datetime) -> list[dict[str, Any]]:
    """Rows as daemons leave them: firings with retries, manual runs, catch-ups, missed rows,
    some still pending; jobs whose only rows are manual runs never fired on schedule."""
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    for j in range(jobs):
        for test in map(str, range(rng.randint(1, 3))):
            minutes = sorted(rng.sample(range(1, 14 * 24 * 60), rng.randint(0, 6)))
            for minute in minutes:
                slot = end - minute * M
                trigger = rng.choice(("schedule", "schedule", "catch-up", "manual"))
                outcome = rng.choice(
                    ("success", "http_error", "interrupted", "pending", "skipped", "missed")
                )
                error, attempts = None, rng.choice((1, 1, 2))
                if outcome == "missed" and rng.random() < 0.5:  # a call that never left
                    trigger, started, attempts = "schedule", slot + rng.randint(0, 90) * S, 1
                    error = "never sent: te-scheduler shut down while the call waited"
                elif outcome == "missed":  # written at a later start, about earlier slots
                    trigger, started = "schedule", slot + rng.randint(1, 3000) * M
                    error = "2 firing(s) missed"
                else:
                    started = slot + rng.randint(0, 90) * S
                for attempt in range(1, attempts + 1):
                    rows.append(
                        {
                            "run_id": f"r{j}-{test}-{minute}",
                            "job": f"job-{j:03d}",
                            "test_id": test,
                            "aid": None,
                            "trigger": trigger,
                            "scheduled_for": slot,
                            "attempt": attempt,
                            "started_at": started + attempt * S,
                            "finished_at": None,
                            "status_code": None,
                            "outcome": outcome,
                            "error": error,
                            "duration_ms": None,
                            "instance": "gone:1",
                        }
                    )
    return rows


def accounted_by_definition(
    rows: list[dict[str, Any]],
) -> dict[tuple[str, str], recovery.Accounted]:
    """What the per-test queries must answer: the latest schedule or catch-up slot, or the
    moment before the latest missed summary row was written, whichever is later; and that
    slot as ``unsent`` when its only row is an attempt 1 whose call never left."""
    until: dict[tuple[str, str], datetime] = {}
    for row in rows:
        pair = (row["job"], row["test_id"])
        candidates = []
        if row["trigger"] in ("schedule", "catch-up"):
            candidates.append(row["scheduled_for"])
        never_sent = (row["error"] or "").startswith("never sent: ")
        if row["outcome"] == "missed" and not never_sent:
            candidates.append(row["started_at"] - timedelta(microseconds=1))
        for moment in candidates:
            until[pair] = max(moment, until.get(pair, moment))
    result = {}
    for pair, moment in until.items():
        at_slot = [
            (r["attempt"], r["outcome"], (r["error"] or "").startswith("never sent: "))
            for r in rows
            if (r["job"], r["test_id"]) == pair
            and r["scheduled_for"] == moment
            and r["trigger"] in ("schedule", "catch-up")
        ]
        result[pair] = recovery.Accounted(
            moment, moment if at_slot == [(1, "missed", True)] else None
        )
    return result


def test_last_accounted_answers_for_every_test_at_once(any_engine: sa.Engine) -> None:
    rows = random_history(7, 150, T)
    with any_engine.begin() as conn:
        conn.execute(tables.attempts.insert(), rows)
    expected = accounted_by_definition(rows)
    pairs = {(row["job"], row["test_id"]) for row in rows}
    assert 0 < len(expected) < len(pairs)  # some only ran by hand
    assert any(a.unsent for a in expected.values())  # the never-sent case is exercised
    assert recovery.last_accounted(any_engine) == expected


def test_last_accounted_of_an_empty_history(any_engine: sa.Engine) -> None:
    assert recovery.last_accounted(any_engine) == {}


SCHEDULES = [
    "{every: 15m}",
    "{every: 1h, start: '2026-11-01T00:07:00+00:00'}",
    "{cron: '*/20 * * * *'}",
    "{cron: '0 3 * * *', timezone: Europe/Berlin}",
]
WINDOWS = ["0s", "10m", "1h", "1d"]


def test_catch_up_of_many_jobs_decides_as_each_job_alone_would(
    tmp_path: Path, engine: sa.Engine, fake_clock: clock.FakeClock
) -> None:
    rng = random.Random(11)
    now = fake_clock.now()
    body = "jobs:\n" + "".join(
        f"  - name: job-{j:03d}\n    tests: [{', '.join(str(t) for t in range(1 + j % 2))}]\n"
        f"    schedule: {SCHEDULES[j % 4]}\n    catch_up: {WINDOWS[j // 4 % 4]}\n"
        for j in range(96)
    )
    rows_by_job: dict[str, list[dict[str, Any]]] = {}
    for row in random_history(3, 96, now):
        rows_by_job.setdefault(row["job"], []).append(row)
    # About one job in seven has no history at all: new in the config, nothing to catch up.
    kept = [row for job in rows_by_job.values() if rng.random() < 0.85 for row in job]
    with engine.begin() as conn:
        conn.execute(tables.attempts.insert(), kept)
    sim = Simulator(token=TOKEN, org_limit=100_000, instant_limit=100_000).start()
    try:
        path = write_config(
            tmp_path / "jobs.yaml", body, base_url=sim.url, api_extra="  rate_limit: 100000/min\n"
        )
        cfg = config.load(path)
        expected = expected_catch_up(cfg, accounted_by_definition(kept), now)
        assert any(r[2] == "catch-up" for r in expected) and any(r[4] == "missed" for r in expected)
        daemon = Daemon(
            cfg,
            engine,
            simulated=(sim.url, TOKEN),
            scheduler=SteppedScheduler(timezone=timezone.utc),
        )  # never stepped
        daemon.start()
        catch_ups = sum(1 for r in expected if r[2] == "catch-up")
        wait_until(
            lambda: len(written(engine, daemon.instance, "success")) == catch_ups,
            what="the catch-up calls",
        )
        daemon.shutdown()
    finally:
        sim.stop()
    assert set(written(engine, daemon.instance)) == expected
    assert len(sim.requests) == catch_ups


def expected_catch_up(
    cfg: config.Config, accounted: dict[tuple[str, str], recovery.Accounted], now: datetime
) -> set[tuple[Any, ...]]:
    """The rows catch-up writes, from plan_catch_up of each test on its own: a test without
    rows in a job that fired owes the job's latest slot; a latest slot never sent runs again
    when nothing later was missed."""
    rows = set()
    for job in cfg.enabled_jobs:
        known = [accounted[(job.name, t)].until for t in job.tests if (job.name, t) in accounted]
        if not known:
            continue
        for test in job.tests:
            found = accounted.get((job.name, test))
            last = found.until if found else max(known) - timedelta(microseconds=1)
            verdict = plan_catch_up(job.schedule, last, now, job.catch_up)
            if verdict.missed_count:
                assert verdict.missed_first and verdict.missed_last
                more = "" if verdict.counted_all else "at least "
                error = (
                    f"{more}{verdict.missed_count} firing(s) missed from "
                    f"{verdict.missed_first.isoformat()} to "
                    f"{verdict.missed_last.isoformat()}: te-scheduler was not running"
                )
                rows.add((job.name, test, "schedule", verdict.missed_first, "missed", error))
            run = verdict.run
            if run is None and found and found.unsent and not verdict.missed_count:
                run = found.unsent if now - found.unsent <= job.catch_up else None
            if run:
                rows.add((job.name, test, "catch-up", run, "success", None))
    return rows


def written(engine: sa.Engine, instance: str, outcome: str | None = None) -> list[tuple[Any, ...]]:
    return [
        (r["job"], r["test_id"], r["trigger"], r["scheduled_for"], r["outcome"], r["error"])
        for r in history.query(engine, outcome=outcome, limit=None)
        if r["instance"] == instance
    ]


@pytest.mark.slow
def test_catch_ups_still_queued_at_shutdown_are_recorded_missed(
    tmp_path, simulator, engine, db_url, start_daemon
):
    start = anchor()
    names = [("a", "105"), ("b", "106"), ("c", "107"), ("d", "108")]
    for job, test in names:
        seed(engine, job, test, start, "success")  # each owes a catch-up of start + 2h
    body = "".join(
        hourly(job, test, start, "2h")[0 if n == 0 else 5 :] for n, (job, test) in enumerate(names)
    )
    cfg = write_config(
        tmp_path / "jobs.yaml",
        body,
        base_url=simulator.url,
        db_url=db_url,
        api_extra="  concurrency: 1\n",
    )
    for _, test in names:
        simulator.add_rule(test, 200, delay=2.0)
    daemon = start_daemon(cfg)
    wait_until(lambda: simulator.requests, what="the first catch-up call")
    daemon.send(signal.SIGTERM)  # the call in flight finishes; the queued ones never start
    assert daemon.proc.wait(timeout=40) == 0
    found = [r for r in rows(db_url) if r["started_at"] > start + H]
    assert len(of(found, trigger="catch-up")) == len(simulator.requests) >= 1
    # (start + 1h is summed up as missed at start-up, as always; only the latest slot runs.)
    queued = [r for r in of(found, outcome="missed") if r["scheduled_for"] == start + 2 * H]
    assert len(queued) + len(simulator.requests) == len(names)
    for row in queued:
        assert row["error"].endswith("te-scheduler stopped before its catch-up ran")
