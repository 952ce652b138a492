"""kill -9 while follow-ups wait, then a restart: the survivor of the wait is read, the other ends.

Real daemon subprocesses against the in-process simulator (which outlives them, rounds and
all). The first daemon fires two jobs once and claims their follow-ups; it is killed before
its first read (20 s after a network test's run). The restarted daemon's wall clock is put
40 s ahead (the clock seam's offset file: the daemon was down that long), so the job with
``wait: 1s`` is past its wait and ends ``none`` without a read, while the one with ``wait:
5m`` is read at once and ends ``complete`` with its agents' rows.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from scheduler import clock
from scheduler.api.simulator import Simulator
from scheduler.clock import WALL_OFFSET_FILE_ENV
from scheduler.store import db, history
from scheduler.store import results as store
from scheduler.store.tables import attempts
from tests.conftest import TOKEN, DaemonProcess, cli_env, wait_until, write_config

pytestmark = pytest.mark.slow

JOBS = """\
defaults:
  retry: {{attempts: 1}}
jobs:
  - name: keep
    tests: [108]
    schedule: {{every: 1h, start: "{start}"}}
    results: {{type: agent-to-server, wait: 5m}}
  - name: late
    tests: [120]
    schedule: {{every: 1h, start: "{start}"}}
    results: {{type: agent-to-server, wait: 1s}}
"""
DOWNTIME = 40  # seconds the restarted daemon's clock is ahead: past ``late``'s wait + 30 s


def seed_known_agents(engine: sa.Engine, test_id: str, agents: list[str]) -> None:
    """An older complete round of ``test_id`` (another job): its agents are the known set."""
    at = clock.now() - timedelta(days=1)
    key = history.AttemptKey(
        run_id="old",
        job="old-job",
        test_id=test_id,
        aid=None,
        trigger="manual",
        scheduled_for=at,
        attempt=1,
        instance="old-host:1",
    )
    row_id = history.start_attempt(engine, key, at)
    assert row_id is not None
    history.finish_attempt(
        engine,
        row_id,
        finished_at=at,
        outcome="success",
        status_code=200,
        error=None,
        duration_ms=0,
        results="complete",
    )
    item = store.Followup(row_id, "old-job", test_id, None, "old-host:1", at)
    rows = [
        store.AgentRow(int(at.timestamp()), a, None, at, True, None, 0.0, 1.0, None, None, None)
        for a in agents
    ]
    store.store_round(engine, item, "network", rows)


def state_of(engine: sa.Engine) -> dict[str, Any]:
    """Per job of this test: (attempts.results, followups.owner)."""
    stmt = (
        sa.select(attempts.c.job, attempts.c.results, store.followups.c.owner)
        .select_from(
            attempts.outerjoin(store.followups, store.followups.c.attempt_id == attempts.c.id)
        )
        .where(attempts.c.job.in_(["keep", "late"]))
    )
    with engine.connect() as conn:
        return {job: (results, owner) for job, results, owner in conn.execute(stmt)}


def test_kill_9_while_waiting_then_restart_finishes_the_follow_ups(
    tmp_path: Path, db_url: str, start_daemon: Callable[..., DaemonProcess]
) -> None:
    sim = Simulator(token=TOKEN, results_delay=2.0, agents=3).start()
    engine = db.make_engine(db_url)
    try:
        db.upgrade(engine)
        seed_known_agents(engine, "108", ["1001", "1002", "1003"])
        start = (datetime.now(timezone.utc) + timedelta(seconds=4)).replace(microsecond=0)
        config = write_config(
            tmp_path / "jobs.yaml",
            JOBS.format(start=start.isoformat().replace("+00:00", "Z")),
            base_url=sim.url,
            db_url=db_url,
        )
        first = start_daemon(config)
        wait_until(
            lambda: {owner for _, owner in state_of(engine).values()} == {first_instance(first)},
            timeout=30,
            what="both follow-ups claimed by the first daemon",
        )
        assert state_of(engine) == {
            "keep": ("waiting", first_instance(first)),
            "late": ("waiting", first_instance(first)),
        }
        first.send(signal.SIGKILL)
        first.proc.wait(10)
        assert not [r for r in sim.requests if "/test-results/" in r.path]  # not read yet

        offset = tmp_path / "wall-offset"
        offset.write_text(f"{DOWNTIME}\n")
        second = start_daemon(config, env=cli_env(**{WALL_OFFSET_FILE_ENV: str(offset)}))
        wait_until(
            lambda: all(s != "waiting" for s, _ in state_of(engine).values()),
            timeout=30,
            what="both follow-ups ended",
        )
        me = first_instance(second)
        assert state_of(engine) == {"keep": ("complete", me), "late": ("none", me)}
        kept = store.query(engine, test_id="108", limit=0)
        assert sorted(r["agent_id"] for r in kept if r["job"] == "keep") == ["1001", "1002", "1003"]
        assert not store.query(engine, test_id="120")
        reads = [r.path for r in sim.requests if "/test-results/" in r.path]
        assert reads and all("/108/" in path for path in reads)  # 120 was never read
        second.wait_for_log('Results of job "keep" test 108')
        second.wait_for_log("its wait ended while no instance was reading it")
        assert "Took over the results follow-up" in second.log
        assert second.stop() == 0
        runs = [r for r in sim.requests if r.path.endswith("/run")]
        assert len(runs) == 2  # the restart fired nothing again
    finally:
        engine.dispose()
        sim.stop()


def first_instance(daemon: DaemonProcess) -> str:
    """The daemon's instance name (host:pid), as its rows carry it."""
    import socket

    return f"{socket.gethostname()}:{daemon.proc.pid}"
