"""Several daemons on one PostgreSQL: each firing exactly once; survivors keep the schedule."""

from __future__ import annotations

import itertools
import json
import os
import signal
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest

from scheduler import clock
from scheduler.api.simulator import Simulator
from scheduler.store import db, history
from tests.conftest import TOKEN, cli_env, run_cli, wait_until, write_config

pytestmark = pytest.mark.slow
HELD = timedelta(seconds=1)

JOBS = """\
jobs:
  - name: pulse
    tests: [101, 102]
    schedule: {every: 1s}
    retry: {attempts: 1}
"""


def rows(url: str) -> list[dict]:
    engine = db.make_engine(url)
    try:
        return history.query(engine, limit=None)
    finally:
        engine.dispose()


def test_three_daemons_fire_each_slot_once_and_survive_a_kill(
    tmp_path: Path,
    postgres_url: str,
    start_daemon,
):
    sim = Simulator(token=TOKEN, org_limit=10**6, instant_limit=10**6).start()
    try:
        engine = db.make_engine(postgres_url)
        db.upgrade(engine)
        config = write_config(
            tmp_path / "jobs.yaml",
            JOBS,
            base_url=sim.url,
            db_url=postgres_url,
            api_extra="  rate_limit: 1000/min\n",
        )
        env = cli_env(TE_SCHEDULER_HEARTBEAT="0.5")
        daemons = [start_daemon(config, env=env) for _ in range(3)]
        for daemon in daemons:
            daemon.wait_for_log("next firing at")
        wait_until(lambda: len(sim.requests) >= 8, what="a few slots")

        # Hold the next call of test 101 for 4 s and kill -9 whichever daemon makes it.
        sim.add_rule("101", 200, delay=4.0)

        def slow_call() -> list[dict]:
            # Ordinary calls are pending for milliseconds; the held one for seconds.
            return [
                r
                for r in rows(postgres_url)
                if r["outcome"] == "pending"
                and r["test_id"] == "101"
                and r["started_at"] < clock.now() - HELD
            ]

        wait_until(slow_call, what="the slow call in flight")
        [pending] = slow_call()
        pid = int(pending["instance"].rsplit(":", 1)[1])
        [victim] = [d for d in daemons if d.proc.pid == pid]
        victim.kill()
        survivors = [d for d in daemons if d is not victim]

        # A survivor notices the silence (3 heartbeats) and marks the orphan interrupted.
        def orphan_interrupted() -> bool:
            row = next(r for r in rows(postgres_url) if r["id"] == pending["id"])
            return row["outcome"] == "interrupted"

        wait_until(orphan_interrupted, what="the killed instance's row to be interrupted")
        killed_at = len(sim.requests)
        wait_until(lambda: len(sim.requests) >= killed_at + 8, what="survivors keep firing")

        status = run_cli("-c", str(config), "status", "--format", "json", env=env)
        assert status.returncode == 0, status.stderr
        alive = {s["instance"]: s["alive"] for s in json.loads(status.stdout)}
        assert alive[pending["instance"]] is False
        assert sum(alive.values()) == 2

        for daemon in survivors:
            daemon.send(signal.SIGTERM)
        # Wait, not stop(): a second SIGTERM during interpreter exit would kill with -15.
        codes = [d.proc.wait(timeout=40) for d in survivors]
        assert codes == [0, 0], "\n".join(d.log[-2000:] for d in survivors)
    finally:
        sim.stop()

    found = rows(postgres_url)
    firings = [(r["test_id"], r["scheduled_for"]) for r in found if r["attempt"] == 1]
    assert len(firings) == len(set(firings)), "a slot was fired twice"
    # Every row but the skipped ones and those interrupted before their call was sent stands for
    # exactly one request the API received, the killed instance's interrupted row included.
    calls = Counter(r.path.split("/")[3] for r in sim.requests)
    recorded = Counter(
        r["test_id"]
        for r in found
        if r["outcome"] not in ("skipped", "missed", "pending")
        and r["error"] != "shut down before the call was sent"
    )
    assert calls == recorded
    # No gap longer than one slot, the kill included.
    for test in ("101", "102"):
        slots = sorted(s for t, s in firings if t == test)
        gaps = [b - a for a, b in itertools.pairwise(slots)]
        assert max(gaps) <= timedelta(seconds=2), f"test {test}: gap of {max(gaps)}"
    owners = {r["instance"] for r in found}
    assert len(owners) == 3, "all three instances took a share of the firings"
    assert os.getpid() not in {int(o.rsplit(":", 1)[1]) for o in owners}
