"""``te-scheduler results`` and the ``results`` column of ``history`` (SPEC 7)."""

from __future__ import annotations

import json
import threading
from datetime import timedelta

import sqlalchemy as sa
from click.testing import CliRunner

from scheduler import clock
from scheduler.api.results import ResultsReader
from scheduler.api.simulator import Simulator
from scheduler.cli import cli
from scheduler.config.model import ApiConfig, Job, Schedule
from scheduler.followup import FollowupReader
from scheduler.runner import Firing, build_runner


def test_results_and_history_show_the_read_round(
    engine: sa.Engine, db_url: str, fake_clock: clock.FakeClock
) -> None:
    sim = Simulator(token="t").start()
    try:
        api = ApiConfig(base_url=sim.url, timeout=5.0)
        stop = threading.Event()
        runner = build_runner(engine, api, "t", stop, instance="h:1")
        job = Job(name="j", tests=("108",), schedule=Schedule(every=timedelta(minutes=2)))
        runner.fire(Firing(job, "108", clock.now()))
        reader = FollowupReader(
            engine, ResultsReader(api, "t"), runner.limiter, stop, instance="h:1",
            jobs=lambda: {"j": job},
        )  # fmt: skip
        for _ in range(60):
            fake_clock.advance(max(reader.step(), 0.5))
    finally:
        sim.stop()
    run = CliRunner().invoke
    table = run(cli, ["--db", db_url, "history"])
    assert table.exit_code == 0
    assert "3/3 ok, " in table.output
    as_json = json.loads(run(cli, ["--db", db_url, "history", "--format", "json"]).output)
    assert as_json[0]["results"] == "complete"
    rows = json.loads(run(cli, ["--db", db_url, "results", "--format", "json"]).output)
    assert len(rows) == 3 and {r["agent_name"] for r in rows} == {
        "Simulated Agent 1", "Simulated Agent 2", "Simulated Agent 3"
    }  # fmt: skip
    assert json.loads(rows[0]["data"])["roundId"] == rows[0]["round_id"]
    csv = run(cli, ["--db", db_url, "results", "--format", "csv", "--job", "nope"]).output
    assert csv.splitlines()[0].startswith("id,attempt_id,job,test_id,endpoint,round_id")
    assert "data" not in csv.splitlines()[0].split(",")
