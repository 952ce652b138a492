"""Runs through the runner against the simulator, their rounds read back: the API cost."""

from __future__ import annotations

import threading
from dataclasses import replace
from datetime import timedelta

import sqlalchemy as sa

from scheduler import clock
from scheduler.api.results import ResultsReader
from scheduler.api.simulator import Simulator
from scheduler.config.model import ApiConfig, Job, Rate, ResultsConfig, Schedule
from scheduler.followup import FollowupReader
from scheduler.runner import Firing, build_runner
from scheduler.store import history
from scheduler.store import results as store

TOKEN = "sim-token"


def test_each_run_is_read_back_in_few_reads(engine: sa.Engine, fake_clock: clock.FakeClock) -> None:
    sim = Simulator(token=TOKEN, results_delay=5.0, agents=3).start()
    try:
        api = ApiConfig(base_url=sim.url, rate_limit=Rate(24, 60.0), timeout=5.0)
        stop = threading.Event()
        runner = build_runner(engine, api, TOKEN, stop, instance="host:1")
        job = Job(name="j", tests=("108", "110"), schedule=Schedule(every=timedelta(minutes=2)))
        job = replace(job, results=ResultsConfig())
        reader = FollowupReader(
            engine,
            ResultsReader(api, TOKEN),
            runner.limiter,
            stop,
            instance="host:1",
            jobs=lambda: {"j": job},
        )
        runs = 0
        for slot in range(5):
            start = clock.now()
            for test in job.tests:
                assert runner.fire(Firing(job, test, start)).value == "success"
                runs += 1
            while clock.now() < start + timedelta(minutes=2):
                fake_clock.advance(max(reader.step(), 0.5))
        for _ in range(100):
            if not store.waiting(engine):
                break
            fake_clock.advance(max(reader.step(), 0.5))
        states = [row["results"] for row in history.query(engine)]
        assert states == ["complete"] * runs
        requests = [r for r in sim.requests if "/test-results/" in r.path]
        per_run = len(requests) / runs
        with engine.connect() as conn:
            reads = conn.scalar(sa.select(sa.func.sum(store.followups.c.reads))) / runs
        print(f"round reads per run {reads:.2f}, results requests per run {per_run:.2f}")
        assert reads <= 1.5  # 2 for a test's first run, then 1: its agents are known
        assert per_run <= 3.0
        assert len(store.query(engine, limit=0)) == 3 * runs
        tests_calls = [r for r in sim.requests if r.path.rstrip("/") == "/v7/tests"]
        assert len(tests_calls) == 1  # types cached
    finally:
        sim.stop()
