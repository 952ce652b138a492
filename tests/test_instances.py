"""Several instances on one database: registration, heartbeats, dead peers, status, shared
rate limits (on SQLite and PostgreSQL), and OS processes racing for firings on one SQLite file."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa

from scheduler import clock
from scheduler.store import db, history, instances, tables
from scheduler.store.instances import SharedLimit
from tests.conftest import key

REPO = Path(__file__).resolve().parent.parent
T0 = datetime(2026, 11, 27, 12, 0, tzinfo=timezone.utc)
S = timedelta(seconds=1)


@pytest.fixture
def engine(any_engine: sa.Engine) -> sa.Engine:
    """The tests below run on SQLite and on PostgreSQL."""
    return any_engine


def attempt(
    engine: sa.Engine, instance: str, started: datetime, outcome: str = "success", n: int = 0
) -> None:
    k = key(f"r{n}", test_id=str(n), aid=None, scheduled_for=started, instance=instance)
    if outcome == "pending":
        assert history.start_attempt(engine, k, started) is not None
    else:
        history.record_attempt(engine, k, started_at=started, outcome=outcome, error=None)


def row(engine: sa.Engine, instance: str) -> dict[str, object] | None:
    with engine.connect() as conn:
        found = conn.execute(
            sa.select(tables.instances).where(tables.instances.c.instance == instance)
        ).first()
    return dict(found._mapping) if found else None


def wait_until(predicate: object, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


# -- liveness -----------------------------------------------------------------------------------
def test_register_heartbeat_stop_and_register_again(engine: sa.Engine) -> None:
    instances.register(engine, "web-1.example:4242", "0.1.0", T0)
    assert row(engine, "web-1.example:4242") == {
        "instance": "web-1.example:4242",
        "host": "web-1.example",
        "pid": 4242,
        "version": "0.1.0",
        "started_at": T0,
        "heartbeat_at": T0,
        "stopped_at": None,
        "last_clock_jump": None,
    }
    assert instances.heartbeat(engine, "web-1.example:4242", T0 + 10 * S)
    assert row(engine, "web-1.example:4242")["heartbeat_at"] == T0 + 10 * S  # type: ignore[index]
    instances.mark_stopped(engine, "web-1.example:4242", T0 + 15 * S)
    assert not instances.heartbeat(engine, "web-1.example:4242", T0 + 20 * S)  # stays stopped
    assert not instances.heartbeat(engine, "never:1", T0)
    stopped = row(engine, "web-1.example:4242")
    assert stopped and stopped["stopped_at"] == stopped["heartbeat_at"] == T0 + 15 * S
    # A restarted container keeps host and pid 1: the same name registers again.
    instances.register(engine, "web-1.example:4242", "0.2.0", T0 + 60 * S)
    again = row(engine, "web-1.example:4242")
    assert again and (again["version"], again["started_at"], again["stopped_at"]) == (
        "0.2.0",
        T0 + 60 * S,
        None,
    )


def test_dead_instances_follow_the_documented_rules(engine: sa.Engine) -> None:
    now = T0 + 10 * 60 * S
    stale_after = 30 * S
    instances.register(engine, "alive:1", "0.1.0", now - 29 * S)
    instances.register(engine, "stale:2", "0.1.0", now - 31 * S)
    instances.register(engine, "stopped:3", "0.1.0", now - 5 * S)
    instances.mark_stopped(engine, "stopped:3", now - 1 * S)
    instances.register(engine, "idle-alive:4", "0.1.0", now)
    attempt(engine, "alive:1", now - 20 * 60 * S, "pending", 1)  # long call: owner still alive
    attempt(engine, "stale:2", now - 40 * S, "pending", 2)
    attempt(engine, "old-version:5", now - 31 * S, "pending", 5)  # unregistered, silent
    attempt(engine, "old-version:6", now - 29 * S, "pending", 6)  # unregistered, recent
    attempt(engine, "finished:7", now - 60 * 60 * S, "success", 7)  # nothing pending
    assert instances.dead_instances(engine, now, stale_after) == {
        "stale:2",
        "stopped:3",
        "old-version:5",
    }
    assert instances.dead_instances(engine, now + 60 * S, stale_after) == {
        "alive:1",
        "stale:2",
        "stopped:3",
        "idle-alive:4",
        "old-version:5",
        "old-version:6",
    }
    assert instances.STALE_AFTER == timedelta(seconds=3 * instances.HEARTBEAT_INTERVAL)


def test_status_lists_instances_live_first_with_their_activity(engine: sa.Engine) -> None:
    now = T0 + 3 * 60 * 60 * S
    instances.register(engine, "b-host:2", "0.1.0", T0)  # alive, busy
    instances.heartbeat(engine, "b-host:2", now - 5 * S)
    instances.register(engine, "a-host:1", "0.1.0", T0)  # silent for a minute: stale
    instances.heartbeat(engine, "a-host:1", now - 60 * S)
    instances.register(engine, "c-host:3", "0.0.9", T0)
    instances.mark_stopped(engine, "c-host:3", T0 + 60 * S)
    attempt(engine, "b-host:2", now - 2 * 60 * 60 * S, n=1)
    attempt(engine, "b-host:2", now - 30 * 60 * S, n=2)
    attempt(engine, "b-host:2", now - 10 * S, "pending", n=3)
    attempt(engine, "a-host:1", now - 90 * 60 * S, n=4)
    attempt(engine, "elsewhere:9", now - 60 * S, n=5)
    rows = instances.status(engine, now)
    brief = [
        (r["instance"], r["state"], r["alive"], r["attempts_last_hour"], r["pending"]) for r in rows
    ]
    assert brief == [
        ("b-host:2", "running", True, 2, 1),
        ("a-host:1", "stale", False, 0, 0),
        ("c-host:3", "stopped", False, 0, 0),
    ]
    assert [r["last_attempt_at"] for r in rows] == [now - 10 * S, now - 90 * 60 * S, None]
    assert set(rows[0]) == {
        "instance", "host", "pid", "version", "started_at", "heartbeat_at", "stopped_at",
        "last_clock_jump", "alive", "state", "last_attempt_at", "attempts_last_hour", "pending",
    }  # fmt: skip
    assert (rows[0]["host"], rows[0]["pid"], rows[0]["heartbeat_at"]) == ("b-host", 2, now - 5 * S)
    assert instances.status(engine, now, stale_after=2 * 60 * S)[1]["alive"]


def test_forget_instances_drops_long_silent_rows(engine: sa.Engine) -> None:
    instances.register(engine, "old:1", "0.1.0", T0 - timedelta(days=30))
    instances.register(engine, "new:2", "0.1.0", T0)
    assert instances.forget_instances(engine, T0 - timedelta(days=7)) == 1
    assert [r["instance"] for r in instances.status(engine, T0)] == ["new:2"]


def test_heartbeat_thread_beats_survives_errors_and_registers_again(
    tmp_path: Path, fake_clock: clock.FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    eng = db.make_engine(f"sqlite:///{tmp_path / 'h.db'}")  # not migrated yet: beats fail
    beat = instances.Heartbeat(eng, "me:7", "0.1.0", interval=0.02).start()
    try:
        with caplog.at_level(logging.INFO, logger="scheduler.store.instances"):
            wait_until(lambda: "Heartbeat of me:7 failed (will retry)" in caplog.text, "a failure")
            assert beat.last_beat is None and beat._thread.is_alive()
            db.upgrade(eng)  # the database comes back; the row is missing: registered again
            wait_until(lambda: beat.last_beat is not None, "a beat")
            assert "Instance me:7 had no running row; registering it again" in caplog.text
            assert "Heartbeat of me:7 works again" in caplog.text
            assert caplog.text.count("failed (will retry)") == 1  # one line per outage
            fake_clock.advance(60)
            wait_until(
                lambda: (row(eng, "me:7") or {}).get("heartbeat_at") == T0 + 60 * S, "the beat"
            )
    finally:
        beat.stop()
    assert not beat._thread.is_alive()
    instances.mark_stopped(eng, "me:7", clock.now())
    assert not beat.beat()  # a beat after a clean stop does not resurrect the instance
    assert (row(eng, "me:7") or {})["stopped_at"] is not None
    eng.dispose()


# -- shared rate limits ---------------------------------------------------------------------
def test_token_key_names_the_token_without_revealing_it() -> None:
    key = instances.token_key("secret-token-123")
    assert len(key) == 16 and int(key, 16) >= 0
    assert key == instances.token_key("secret-token-123") != instances.token_key("other")
    assert "secret" not in key


def test_publish_merges_windows_and_read_ignores_expired_ones(engine: sa.Engine) -> None:
    tok, at = instances.token_key("t"), T0.timestamp()
    r1, r2 = at + 60, at + 120

    def publish(remaining: int | None, reset: float | None, paused: float | None = None) -> None:
        instances.publish_limit(engine, tok, "org", remaining, reset, paused, T0, "a:1")

    publish(100, r1)
    publish(120, r1)  # same window, a late or stale answer: the lower count stands
    assert instances.read_limits(engine, tok, T0) == {"org": SharedLimit(100, r1, None)}
    publish(90, r1)
    publish(5, at + 30)  # an answer from an earlier window changes nothing
    assert instances.read_limits(engine, tok, T0) == {"org": SharedLimit(90, r1, None)}
    publish(230, r2, at + 90)  # the next window replaces the count; a 429's pause is shared
    publish(None, None, at + 70)  # an earlier pause does not shorten it
    assert instances.read_limits(engine, tok, T0) == {"org": SharedLimit(230, r2, at + 90)}
    instances.publish_limit(engine, tok, "instant-test", 3, r1, None, T0, "b:2")
    assert instances.read_limits(engine, "another-token", T0) == {}
    later = T0 + 100 * S  # the pause has ended and instant-test's window has closed
    assert instances.read_limits(engine, tok, later) == {"org": SharedLimit(230, r2, None)}
    assert instances.read_limits(engine, tok, T0 + 121 * S) == {}
    with engine.connect() as conn:
        stored = conn.execute(sa.select(tables.rate_limits)).all()
    assert {(r.bucket, r.updated_by) for r in stored} == {("org", "a:1"), ("instant-test", "b:2")}


def test_racing_publishers_keep_the_lowest_remaining(engine: sa.Engine) -> None:
    tok, reset = instances.token_key("t"), T0.timestamp() + 60
    counts = [[200 - 7 * n - 13 * i for i in range(15)] for n in range(4)]
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def publish(n: int) -> None:
        try:
            barrier.wait()
            for remaining in counts[n]:
                instances.publish_limit(engine, tok, "org", remaining, reset, None, T0, f"h:{n}")
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=publish, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    lowest = min(min(c) for c in counts)
    assert instances.read_limits(engine, tok, T0) == {"org": SharedLimit(lowest, reset, None)}


# -- several processes on one SQLite file ----------------------------------------------------
CLAIMER = """
import json, os, sys, time
from datetime import datetime, timedelta, timezone
from scheduler.store import db
from scheduler.store import history
path, me, go = sys.argv[1], sys.argv[2], sys.argv[3]
engine = db.make_engine("sqlite:///" + path)
history.pending_rows(engine)  # connected and ready
open(go + "." + me.replace(":", "-"), "w").close()
t0 = datetime(2026, 11, 27, 12, 0, tzinfo=timezone.utc)
while not os.path.exists(go):
    time.sleep(0.001)
won = []
for n in range(30):
    key = history.AttemptKey(
        "run-" + me, "dns", str(n % 3), None, "schedule", t0 + timedelta(minutes=n // 3), 1, me
    )
    if history.start_attempt(engine, key, t0) is not None:
        won.append(n)
print(json.dumps(won))
"""


def test_processes_racing_on_one_sqlite_file_claim_each_firing_once(tmp_path: Path) -> None:
    path = tmp_path / "history.db"
    eng = db.make_engine(f"sqlite:///{path}")
    db.upgrade(eng)
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CLAIMER, str(path), f"proc:{n}", str(go)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(2)
    ]
    ready = [tmp_path / f"go.proc-{n}" for n in range(2)]
    wait_until(lambda: all(r.exists() for r in ready), "the claimers to start", timeout=30)
    go.touch()  # both have the file open: release them together
    won = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        won.append(set(json.loads(out)))
    assert set().union(*won) == set(range(30))
    assert sum(len(w) for w in won) == 30  # disjoint: nobody fired a slot twice
    rows = history.query(eng, limit=0)
    assert len(rows) == 30
    by_key = {(r["test_id"], r["scheduled_for"]): r["instance"] for r in rows}
    assert len(by_key) == 30
    eng.dispose()
