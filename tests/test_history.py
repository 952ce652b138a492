"""The history queries on a real SQLite file migrated by Alembic."""

from __future__ import annotations

import json
import logging
import random
import sqlite3
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa

from scheduler.store import db, history, recovery, tables
from scheduler.store import results as results_store
from scheduler.store.history import AttemptKey
from tests.conftest import T0, key, run_cli

COLUMNS = [
    "id", "run_id", "job", "test_id", "aid", "trigger", "scheduled_for", "attempt",
    "started_at", "finished_at", "status_code", "outcome", "error", "duration_ms", "instance",
    "results",
]  # fmt: skip


NO_RESULTS = {"agents_ok_rate": None, "latency_p50_ms": None, "latency_p95_ms": None}


@pytest.fixture
def db_file(tmp_path: Path) -> Path:
    return tmp_path / "history.db"


@pytest.fixture
def engine(db_file: Path) -> Iterator[sa.Engine]:
    eng = db.make_engine(f"sqlite:///{db_file}")
    db.upgrade(eng)
    yield eng
    eng.dispose()


def add(
    engine: sa.Engine,
    k: AttemptKey,
    at: datetime,
    outcome: str,
    *,
    status: int | None = None,
    ms: int | None = None,
    error: str | None = None,
) -> int:
    """One finished row (or a pending one) as the runner would leave it."""
    if outcome == "pending":
        row_id = history.start_attempt(engine, k, at)
    else:
        row_id = history.record_attempt(
            engine,
            k,
            started_at=at,
            outcome=outcome,
            error=error,
            status_code=status,
            duration_ms=ms,
        )
    assert row_id is not None
    return row_id


def test_start_attempt_claims_a_key_once(engine: sa.Engine) -> None:
    first = history.start_attempt(engine, key(), T0)
    assert isinstance(first, int)
    assert history.start_attempt(engine, key(run_id="other-instance"), T0) is None
    second = history.start_attempt(engine, key(attempt=2), T0 + timedelta(seconds=5))
    assert second is not None and second != first
    rows = history.query(engine, limit=0)
    assert [(r["id"], r["attempt"], r["outcome"], r["finished_at"]) for r in rows] == [
        (second, 2, "pending", None),
        (first, 1, "pending", None),
    ]


def test_finish_attempt_completes_the_row(engine: sa.Engine) -> None:
    row_id = history.start_attempt(engine, key(), T0)
    assert row_id is not None
    history.finish_attempt(
        engine,
        row_id,
        finished_at=T0 + timedelta(seconds=1),
        outcome="http_error",
        status_code=404,
        error="Not Found: test 105 does not exist",
        duration_ms=812,
    )
    [row] = history.query(engine)
    assert row == {
        "id": row_id,
        "run_id": "run-1",
        "job": "dns",
        "test_id": "105",
        "aid": "1234",
        "trigger": "schedule",
        "scheduled_for": T0,
        "attempt": 1,
        "started_at": T0,
        "finished_at": T0 + timedelta(seconds=1),
        "status_code": 404,
        "outcome": "http_error",
        "error": "Not Found: test 105 does not exist",
        "duration_ms": 812,
        "instance": "host-a:100",
        "results": None,
    }
    assert list(row) == COLUMNS


def test_finish_attempt_of_a_vanished_row_only_warns(
    engine: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="scheduler.store.history"):
        history.finish_attempt(
            engine,
            999,
            finished_at=T0,
            outcome="success",
            status_code=200,
            error=None,
            duration_ms=5,
        )
    assert "Attempt row 999 no longer exists" in caplog.text


def test_record_attempt_inserts_a_finished_row_once(engine: sa.Engine) -> None:
    k = key(trigger="schedule")
    row_id = history.record_attempt(
        engine, k, started_at=T0, outcome="skipped", error="previous firing still running"
    )
    assert row_id is not None
    assert history.record_attempt(engine, k, started_at=T0, outcome="missed", error="x") is None
    [row] = history.query(engine)
    assert (row["outcome"], row["finished_at"], row["status_code"], row["duration_ms"]) == (
        "skipped",
        T0,
        None,
        None,
    )
    with pytest.raises(ValueError, match="outcome 'pending' is not one of"):
        history.record_attempt(engine, key(attempt=2), started_at=T0, outcome="pending", error=None)
    with pytest.raises(ValueError, match="trigger 'cron' is not one of"):
        history.start_attempt(engine, key(trigger="cron"), T0)


def test_interrupt_pending_marks_only_the_chosen_instances(engine: sa.Engine) -> None:
    a1 = add(engine, key(instance="host-a:1"), T0, "pending")
    a2 = add(engine, key(test_id="106", instance="host-a:2"), T0, "pending")
    b3 = add(engine, key(test_id="107", instance="host-b:3"), T0, "pending")
    done = add(engine, key(test_id="108", instance="host-a:1"), T0, "success", status=200)
    later = T0 + timedelta(minutes=3)
    count = history.interrupt_pending(
        engine,
        where_instance=lambda i: i.startswith("host-a:"),
        finished_at=later,
        error="te-scheduler stopped",
    )
    assert count == 2
    rows = {r["id"]: r for r in history.query(engine, limit=0)}
    for row_id in (a1, a2):
        assert (rows[row_id]["outcome"], rows[row_id]["finished_at"], rows[row_id]["error"]) == (
            "interrupted",
            later,
            "te-scheduler stopped",
        )
    assert rows[b3]["outcome"] == "pending" and rows[done]["outcome"] == "success"
    assert [
        (r["id"], r["instance"], r["started_at"], r["job"], r["test_id"])
        for r in history.pending_rows(engine)
    ] == [(b3, "host-b:3", T0, "dns", "107")]


def test_interrupt_pending_counts_each_row_once_when_two_sweep_at_once(engine: sa.Engine) -> None:
    for n in range(6):
        add(engine, key(test_id=str(n), instance="dead:1"), T0, "pending")
    other: list[int] = []

    def predicate(instance: str) -> bool:
        if not other:  # the other process sweeps between our read and our update
            other.append(
                history.interrupt_pending(
                    engine, where_instance=lambda i: True, finished_at=T0, error="by the other"
                )
            )
        return True

    mine = history.interrupt_pending(
        engine, where_instance=predicate, finished_at=T0, error="by me"
    )
    assert (mine, other) == (0, [6])
    assert {r["error"] for r in history.query(engine, limit=0)} == {"by the other"}


def test_last_accounted_ignores_manual_rows(engine: sa.Engine) -> None:
    # (history.last_scheduled_for, which only tests used, gave way to recovery.last_accounted)
    assert recovery.last_accounted(engine) == {}
    add(engine, key("r1"), T0, "success", status=200)
    add(
        engine,
        key("r2", trigger="catch-up", scheduled_for=T0 + timedelta(hours=1)),
        T0 + timedelta(hours=1),
        "success",
        status=200,
    )
    add(
        engine,
        key("r3", scheduled_for=T0 + timedelta(hours=2)),
        T0 + timedelta(hours=3),
        "missed",
        error="3 firings missed",
    )
    add(
        engine,
        key("r4", trigger="manual", scheduled_for=T0 + timedelta(hours=5)),
        T0 + timedelta(hours=5),
        "success",
        status=200,
    )
    add(
        engine,
        key("r5", job="other", scheduled_for=T0 + timedelta(hours=9)),
        T0 + timedelta(hours=9),
        "pending",
    )
    accounted = recovery.last_accounted(engine)
    # The missed row (slot T0+2h) accounts for everything before it was written, T0+3h; the
    # manual run at T0+5h is no slot.
    assert accounted[("dns", "105")].until == T0 + timedelta(hours=3, microseconds=-1)
    assert set(accounted) == {("dns", "105"), ("other", "105")}


def test_query_filters_orders_and_limits(engine: sa.Engine) -> None:
    ids = {}
    for n, (job, test, outcome) in enumerate(
        [
            ("dns", "105", "success"),
            ("dns", "106", "http_error"),
            ("web", "105", "success"),
            ("dns", "105", "timeout"),
            ("dns", "105", "success"),
        ]
    ):
        at = T0 + timedelta(minutes=10 * n)
        ids[n] = add(engine, key(f"r{n}", job=job, test_id=test, scheduled_for=at), at, outcome)
    # Same started_at as row 4: the id breaks the tie, newest first.
    ids[5] = add(
        engine,
        key("r5", job="web", test_id="999", scheduled_for=T0 + timedelta(1)),
        T0 + timedelta(minutes=40),
        "success",
    )

    def found(**filters: Any) -> list[int]:
        return [ids_by_row[r["id"]] for r in history.query(engine, **filters)]

    ids_by_row = {row_id: n for n, row_id in ids.items()}
    assert found() == [5, 4, 3, 2, 1, 0]
    assert found(job="dns") == [4, 3, 1, 0]
    assert found(test_id="105") == [4, 3, 2, 0]
    assert found(job="dns", test_id="105", outcome="success") == [4, 0]
    assert found(since=T0 + timedelta(minutes=20)) == [5, 4, 3, 2]
    assert found(until=T0 + timedelta(minutes=20)) == [1, 0]
    assert found(since=T0 + timedelta(minutes=10), until=T0 + timedelta(minutes=30)) == [2, 1]
    assert found(limit=2) == [5, 4]
    assert found(limit=0) == found(limit=None) == [5, 4, 3, 2, 1, 0]
    berlin = (T0 + timedelta(minutes=30)).astimezone(ZoneInfo("Europe/Berlin"))
    assert found(since=berlin) == [5, 4, 3]


def test_stats_numbers_on_a_known_history(engine: sa.Engine) -> None:
    s = timedelta(seconds=1)
    h = timedelta(hours=1)
    # dns/105: r1 succeeds on its retry; r2 fails after two 429s and a timeout; r3 is skipped;
    # r4 is still running; r5 succeeds at once.
    add(
        engine,
        key("r1", scheduled_for=T0 + 5 * h),
        T0 + 5 * h,
        "http_error",
        status=502,
        ms=100,
        error="Bad Gateway",
    )
    add(
        engine,
        key("r1", scheduled_for=T0 + 5 * h, attempt=2),
        T0 + 5 * h + 10 * s,
        "success",
        status=200,
        ms=200,
    )
    for n, (outcome, status, ms) in enumerate(
        [("rate_limited", 429, 50), ("rate_limited", 429, 60), ("timeout", None, 30000)], 1
    ):
        add(
            engine,
            key("r2", scheduled_for=T0 + h, attempt=n),
            T0 + h + 60 * n * s,
            outcome,
            status=status,
            ms=ms,
            error="timed out after 30s" if status is None else "429",
        )
    add(
        engine,
        key("r3", scheduled_for=T0 + 2 * h),
        T0 + 2 * h,
        "skipped",
        error="previous firing still running",
    )
    add(engine, key("r4", scheduled_for=T0 + 3 * h), T0 + 3 * h, "pending")
    add(engine, key("r5", scheduled_for=T0 + 4 * h), T0 + 4 * h, "success", status=200, ms=400)
    # dns/106: one manual success. web/1: only a pending attempt.
    add(engine, key("m1", test_id="106", trigger="manual"), T0, "success", status=200, ms=10)
    add(engine, key("w1", job="web", test_id="1"), T0, "pending")

    assert history.stats(engine) == [
        {
            "job": "dns",
            "test_id": "105",
            "firings": 5,
            "attempts": 8,
            "successes": 2,
            "success_rate": 0.5,
            "last_success": T0 + 5 * h + 10 * s,
            # the latest failed firing is r3 (r1's 502 was followed by a success)
            "last_failure": T0 + 2 * h,
            "last_error": "previous firing still running",
            "rate_limited": 2,
            "retries": 3,
            "p50_ms": 100,
            "p95_ms": 30000,
            **NO_RESULTS,
        },
        {
            "job": "dns",
            "test_id": "106",
            "firings": 1,
            "attempts": 1,
            "successes": 1,
            "success_rate": 1.0,
            "last_success": T0,
            "last_failure": None,
            "last_error": None,
            "rate_limited": 0,
            "retries": 0,
            "p50_ms": 10,
            "p95_ms": 10,
            **NO_RESULTS,
        },
        {
            "job": "web",
            "test_id": "1",
            "firings": 1,
            "attempts": 1,
            "successes": 0,
            "success_rate": None,
            "last_success": None,
            "last_failure": None,
            "last_error": None,
            "rate_limited": 0,
            "retries": 0,
            "p50_ms": None,
            "p95_ms": None,
            **NO_RESULTS,
        },
    ]
    [recent] = [r for r in history.stats(engine, since=T0 + 2 * h) if r["test_id"] == "105"]
    assert (recent["firings"], recent["attempts"], recent["success_rate"]) == (4, 5, 2 / 3)
    assert recent["p50_ms"] == 200 and recent["p95_ms"] == 400


def test_prune_deletes_old_finished_rows_in_batches(engine: sa.Engine) -> None:
    old = [
        add(
            engine,
            key(f"o{n}", scheduled_for=T0 + timedelta(minutes=n)),
            T0 + timedelta(minutes=n),
            "success",
        )
        for n in range(5)
    ]
    stuck = add(engine, key("p", test_id="106"), T0, "pending")
    new = add(
        engine, key("n", scheduled_for=T0 + timedelta(days=2)), T0 + timedelta(days=2), "success"
    )
    cutoff = T0 + timedelta(days=1)
    assert history.prune(engine, before=cutoff, dry_run=True) == 5
    assert len(history.query(engine, limit=0)) == 7

    deletes: list[str] = []

    def count_deletes(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("DELETE"):
            deletes.append(statement)

    sa.event.listen(engine, "before_cursor_execute", count_deletes)
    try:
        assert history.prune(engine, before=cutoff, batch_size=2) == 5
    finally:
        sa.event.remove(engine, "before_cursor_execute", count_deletes)
    assert len(deletes) == 3  # 2 + 2 + 1
    assert sorted(r["id"] for r in history.query(engine, limit=0)) == [stuck, new]
    assert not set(old) & {r["id"] for r in history.query(engine, limit=0)}
    assert history.prune(engine, before=cutoff) == 0


def test_aware_times_round_trip_as_the_same_instant_in_utc(
    engine: sa.Engine, db_file: Path
) -> None:
    berlin = datetime(2026, 7, 1, 8, 0, 0, 250000, tzinfo=ZoneInfo("Europe/Berlin"))  # CEST
    add(engine, key(scheduled_for=berlin), berlin, "success")
    [row] = history.query(engine)
    assert row["scheduled_for"] == berlin
    assert row["scheduled_for"].tzinfo == timezone.utc
    assert row["scheduled_for"] == datetime(2026, 7, 1, 6, 0, 0, 250000, tzinfo=timezone.utc)
    assert recovery.last_accounted(engine)[("dns", "105")].until == berlin
    raw = sqlite3.connect(db_file).execute("SELECT scheduled_for, started_at FROM attempts")
    assert raw.fetchone() == ("2026-07-01 06:00:00.250000", "2026-07-01 06:00:00.250000")
    with pytest.raises(sa.exc.StatementError, match="naive datetime"):
        history.start_attempt(engine, key(attempt=2), datetime(2026, 7, 1, 8, 0))


def test_two_instances_claiming_the_same_firing_get_one_id(
    db_file: Path, engine: sa.Engine
) -> None:
    # Two engines are two connection pools, like two daemons on one file.
    engines = [db.make_engine(f"sqlite:///{db_file}") for _ in range(2)]
    barrier = threading.Barrier(2)
    results: list[list[int | None]] = [[], []]
    errors: list[BaseException] = []

    def claim(n: int) -> None:
        try:
            for slot in range(20):
                k = key(
                    f"run-{n}-{slot}",
                    scheduled_for=T0 + timedelta(minutes=slot),
                    instance=f"host:{n}",
                )
                barrier.wait()
                results[n].append(history.start_attempt(engines[n], k, T0))
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=claim, args=(n,)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    for mine, theirs in zip(*results):
        assert (mine is None) != (theirs is None)
    assert len(history.query(engine, limit=0)) == 20
    for eng in engines:
        eng.dispose()


def _fill_old(engine: sa.Engine, count: int) -> None:
    """``count`` finished rows a year before T0, written in one statement."""
    base = key()
    rows = [
        {
            "run_id": f"r{n}",
            "job": base.job,
            "test_id": base.test_id,
            "aid": None,
            "trigger": "schedule",
            "scheduled_for": T0 - timedelta(days=365, minutes=n),
            "attempt": 1,
            "started_at": T0 - timedelta(days=365, minutes=n),
            "outcome": "success",
            "instance": base.instance,
        }
        for n in range(count)
    ]
    with engine.begin() as conn:
        conn.execute(sa.insert(tables.attempts), rows)


def test_prune_sizes_its_own_batches_and_deletes_every_old_row(engine: sa.Engine) -> None:
    _fill_old(engine, 3000)
    keep = add(engine, key("new"), T0, "success")
    sizes: list[int] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("DELETE"):
            sizes.append(cursor.rowcount)

    sa.event.listen(engine, "after_cursor_execute", record)
    try:
        assert history.prune(engine, before=T0 - timedelta(days=1)) == 3000
    finally:
        sa.event.remove(engine, "after_cursor_execute", record)
    assert [r["id"] for r in history.query(engine, limit=0)] == [keep]
    # Small first, then sized by how long each took; never a batch beyond the cap.
    assert len(sizes) >= 2 and sizes[0] == 200 and max(sizes) <= 5000


def test_prune_stops_between_batches_when_asked(engine: sa.Engine) -> None:
    _fill_old(engine, 50)
    stop = threading.Event()

    def stop_after_first(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("DELETE"):
            stop.set()

    sa.event.listen(engine, "after_cursor_execute", stop_after_first)
    try:
        assert history.prune(engine, before=T0, batch_size=20, stop=stop) == 20
    finally:
        sa.event.remove(engine, "after_cursor_execute", stop_after_first)
    assert len(history.query(engine, limit=0)) == 30


def reference_stats(rows: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """The stats of SPEC's definitions, the slow obvious way: firing by firing (run_id)."""
    result = {}
    for pair in sorted({(r["job"], r["test_id"]) for r in rows}):
        mine = sorted(
            (r for r in rows if (r["job"], r["test_id"]) == pair),
            key=lambda r: (r["started_at"], r["id"]),
        )
        runs: dict[str, list[dict[str, Any]]] = {}
        for r in mine:
            runs.setdefault(r["run_id"], []).append(r)
        finished = [run for run in runs.values() if all(r["outcome"] != "pending" for r in run)]
        won = [run for run in finished if any(r["outcome"] == "success" for r in run)]
        lost = [run[-1] for run in finished if run not in won]
        latest = max(lost, key=lambda r: (r["started_at"], r["id"]), default=None)
        durations = sorted(r["duration_ms"] for r in mine if r["duration_ms"] is not None)

        def pct(p: int, d: list[int] = durations) -> int | None:
            return d[max(-(-p * len(d) // 100), 1) - 1] if d else None

        result[pair] = {
            "firings": len(runs),
            "attempts": len(mine),
            "successes": len(won),
            "success_rate": len(won) / len(finished) if finished else None,
            "last_success": max(
                (r["started_at"] for r in mine if r["outcome"] == "success"), default=None
            ),
            "last_failure": latest["started_at"] if latest else None,
            "last_error": latest["error"] if latest else None,
            "rate_limited": sum(r["status_code"] == 429 for r in mine),
            "retries": sum(r["attempt"] > 1 for r in mine),
            "p50_ms": pct(50),
            "p95_ms": pct(95),
            **NO_RESULTS,  # the randomized histories have no results rows
        }
    return result


def fill_random_history(engine: sa.Engine, rng: random.Random) -> None:
    """Firings of tests a/1..b/3 a minute apart: retries, pending, failed and skipped ones."""
    for n in range(rng.randint(1, 60)):
        job, test = rng.choice(["a", "b"]), rng.choice(["1", "2", "3"])
        slot = T0 + timedelta(minutes=n)
        tries = rng.randint(1, 4)
        last = rng.choice(["success", "success", "pending", "http_error", "skipped", "timeout"])
        at = slot
        for attempt in range(1, tries + 1):
            at += timedelta(seconds=rng.randint(0, 9))  # attempts follow one another
            final = attempt == tries
            outcome = last if final else rng.choice(["http_error", "rate_limited", "timeout"])
            if outcome == "skipped" and attempt > 1:
                outcome = "interrupted"
            status = {"success": 200, "http_error": 503, "rate_limited": 429}.get(outcome)
            add(
                engine,
                key(f"{job}{test}-{n}", job=job, test_id=test, scheduled_for=slot, attempt=attempt),
                at,
                outcome,
                status=status,
                ms=rng.choice([None, rng.randint(1, 40)]),
                error=f"e{n}.{attempt}",
            )


@pytest.mark.parametrize("seed", range(12))
def test_stats_in_sql_agree_with_counting_firing_by_firing(engine: sa.Engine, seed: int) -> None:
    rng = random.Random(seed)
    fill_random_history(engine, rng)
    expected = reference_stats(history.query(engine, limit=0))
    got = {(s.pop("job"), s.pop("test_id")): s for s in history.stats(engine)}
    assert got == expected
    # A window that cuts a firing between its attempts counts what is inside it.
    rows = history.query(engine, limit=0)
    started = {(r["run_id"], r["attempt"]): r["started_at"] for r in rows}
    cuts = [
        r["started_at"]
        for r in rows
        if r["attempt"] > 1 and started[(r["run_id"], r["attempt"] - 1)] < r["started_at"]
    ]
    since = rng.choice(cuts) if cuts else T0 + timedelta(minutes=rng.randint(0, 30))
    expected = reference_stats(history.query(engine, since=since, limit=0))
    got = {(s.pop("job"), s.pop("test_id")): s for s in history.stats(engine, since=since)}
    assert got == expected


def test_recovery_ends_queued_rows_missed_and_names_only_the_owners(
    engine: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    # A dead process left two rows: one whose call had left (may have reached the API) and
    # one still queued for the rate limiter (never sent). The new instance left none.
    sent = history.start_attempt(engine, key("r1", instance="gone-host:1"), T0)
    queued = history.start_attempt(
        engine, key("r2", test_id="106", instance="gone-host:1"), T0, queued=True
    )
    with caplog.at_level(logging.WARNING, logger="scheduler.store.recovery"):
        ended = recovery.interrupt_orphans(
            engine,
            me="new-host:2",
            now=T0 + timedelta(hours=3),
            timeout=30,
            starting=True,
        )
    assert ended == 2
    by_id = {r["id"]: r for r in history.query(engine, limit=0)}
    assert by_id[sent]["outcome"] == "interrupted"
    assert by_id[queued]["outcome"] == "missed"
    assert by_id[queued]["error"].startswith("never sent: ")
    [line] = [r.getMessage() for r in caplog.records if "left pending by" in r.getMessage()]
    assert "gone-host:1" in line and "new-host:2" not in line


def accepted_run_with_results(
    engine: sa.Engine, run: str, at: datetime, agents: list[tuple[bool, float | None]], **key_: Any
) -> None:
    """An accepted run at ``at`` and its round (starting 5 s before it) of ``agents`` rows."""
    attempt_id = add(engine, key(run, scheduled_for=at, **key_), at, "success", status=201, ms=5)
    item = results_store.Followup(
        attempt_id, key_.get("job", "dns"), key_.get("test_id", "105"), None, "host-a:100", at
    )
    rows = [
        results_store.AgentRow(
            int(at.timestamp()) - 5, f"agent-{n}", None, at, ok, None, None, ms, None, None, None
        )
        for n, (ok, ms) in enumerate(agents)
    ]
    results_store.store_round(engine, item, "http-server", rows)


def test_stats_results_columns_cover_the_window_accepted_runs(engine: sa.Engine) -> None:
    h = timedelta(hours=1)
    accepted_run_with_results(engine, "old", T0, [(True, 10.0), (True, 20.0)])
    # The round of the run at the window's start began 5 s before it: it counts.
    accepted_run_with_results(engine, "b", T0 + h, [(True, 30.0), (False, None), (True, 50.0)])
    accepted_run_with_results(engine, "c", T0 + 2 * h, [(True, 40.0), (False, 90.0)])
    accepted_run_with_results(engine, "w", T0 + 2 * h, [(True, 7.5)], job="web", test_id="1")
    add(engine, key("m", test_id="106"), T0 + 2 * h, "success", status=201, ms=5)

    def columns(since: datetime | None) -> dict[str, tuple[Any, ...]]:
        return {
            s["test_id"]: (s["agents_ok_rate"], s["latency_p50_ms"], s["latency_p95_ms"])
            for s in history.stats(engine, since=since)
        }

    assert columns(T0 + h) == {
        "105": (3 / 5, 40.0, 90.0),  # latencies 30 40 50 90; the failed agent's is unknown
        "106": (None, None, None),  # no results read
        "1": (1.0, 7.5, 7.5),
    }
    assert columns(None)["105"] == (5 / 7, 30.0, 90.0)  # 10 20 30 40 50 90
    assert columns(T0 + 3 * h) == {}


def test_stats_command_prints_the_results_columns_in_every_format(
    engine: sa.Engine, db_file: Path, tmp_path: Path
) -> None:
    accepted_run_with_results(engine, "b", T0, [(True, 30.0), (False, 90.0)])
    url = f"sqlite:///{db_file}"
    args = ("--db", url, "stats", "--since", T0.isoformat(), "--format")
    [row] = json.loads(run_cli(*args, "json", cwd=tmp_path).stdout)
    assert (row["agents_ok_rate"], row["latency_p50_ms"], row["latency_p95_ms"]) == (0.5, 30, 90)
    header, line = run_cli(*args, "csv", cwd=tmp_path).stdout.splitlines()
    csv_row = dict(zip(header.split(","), line.split(","), strict=True))
    # CSV and the table write numbers alike (30, not 30.0): one formatting for both
    assert (csv_row["agents_ok_rate"], csv_row["latency_p50_ms"]) == ("0.5", "30")
    table = run_cli(*args, "table", cwd=tmp_path).stdout.splitlines()
    assert table[0].split()[-4:] == [
        "agents_ok_rate",
        "latency_p50_ms",
        "latency_p95_ms",
        "last_error",
    ]
    assert table[1].split()[-4:] == ["0.5", "30", "90", "-"]
