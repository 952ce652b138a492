"""Two results readers on one PostgreSQL database: each follow-up read by exactly one of them.

Two :class:`FollowupReader` instances step at the same moments on two threads (real
concurrency on the database, fake time), each reading through its own path prefix of one real
local results server, so every request says which instance made it. When one dies (its
heartbeat goes stale), the survivor takes its follow-ups over and finishes them.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timedelta
from urllib.parse import urlsplit

import pytest
import sqlalchemy as sa

from scheduler import clock
from scheduler.api.limiter import Limiter
from scheduler.api.results import ResultsReader
from scheduler.config.model import ApiConfig, Job, Rate, ResultsConfig, Schedule
from scheduler.followup import FollowupReader
from scheduler.store import db, history, instances
from scheduler.store import results as store
from scheduler.store.tables import attempts
from tests.test_results_followup import Answer, Api, result

A, B, GONE = "host-a:1", "host-b:2", "host-gone:3"
PER_OWNER = 6  # follow-ups whose run each of A, B and GONE made


@pytest.fixture
def pg(postgres_url: str) -> Iterator[sa.Engine]:
    engine = db.make_engine(postgres_url)
    db.upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def api() -> Iterator[Api]:
    server = Api()
    yield server
    server.server.shutdown()


def reader_for(engine: sa.Engine, api: Api, instance: str) -> FollowupReader:
    """A reader whose requests go to ``/<a|b>/v7/...`` on ``api``: the server tells them apart."""
    job = replace(
        Job(name="net", tests=("1",), schedule=Schedule(every=timedelta(minutes=15))),
        results=ResultsConfig(fetch=True, type="agent-to-server", wait=timedelta(minutes=10)),
    )
    prefix = instance[5]  # "a" or "b"
    config = ApiConfig(base_url=api.url.replace("/v7", f"/{prefix}/v7"), timeout=5.0)
    stop = threading.Event()
    return FollowupReader(
        engine,
        ResultsReader(config, "tok"),
        Limiter(Rate(24, 60.0), stop),
        stop,
        instance=instance,
        jobs=lambda: {"net": job},
    )


def accepted_run(engine: sa.Engine, test_id: str, instance: str, at: datetime) -> int:
    key = history.AttemptKey(
        run_id=f"run-{test_id}",
        job="net",
        test_id=test_id,
        aid=None,
        trigger="schedule",
        scheduled_for=at,
        attempt=1,
        instance=instance,
    )
    row_id = history.start_attempt(engine, key, at)
    assert row_id is not None
    history.finish_attempt(
        engine,
        row_id,
        finished_at=at + timedelta(milliseconds=100),
        outcome="success",
        status_code=200,
        error=None,
        duration_ms=100,
        results="waiting",
    )
    return row_id


def step_together(*readers: FollowupReader) -> float:
    """One pass of every reader at the same moment, each on its own thread."""
    barrier = threading.Barrier(len(readers))
    delays: list[float] = []
    errors: list[BaseException] = []

    def one(reader: FollowupReader) -> None:
        try:
            barrier.wait()
            delays.append(reader.step())
        except BaseException as exc:  # surfaced below, on the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(r,)) for r in readers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors, errors
    return min(delays)


def reads_by(api: Api) -> dict[str, Counter[str]]:
    """Per test id: how many results requests each instance prefix made."""
    found: dict[str, Counter[str]] = {}
    for path, _ in api.requests:
        parts = urlsplit(path).path.strip("/").split("/")  # a|b, v7, test-results, id, endpoint
        if len(parts) == 5 and parts[2] == "test-results":
            found.setdefault(parts[3], Counter())[parts[0]] += 1
    return found


def test_each_follow_up_is_read_by_one_instance_and_the_survivor_finishes(
    pg: sa.Engine, api: Api, fake_clock: clock.FakeClock
) -> None:
    t0 = clock.now()
    r0 = int(t0.timestamp())
    owners = {f"{3000 + i}": (A, B, GONE)[i % 3] for i in range(3 * PER_OWNER)}
    ids = {test: accepted_run(pg, test, owner, t0) for test, owner in owners.items()}
    for instance in (A, B):
        instances.register(pg, instance, "test", t0)
    released = threading.Event()  # the rounds become readable once set

    def answer(path: str, query: dict[str, list[str]]) -> Answer:
        test = urlsplit(path).path.strip("/").split("/")[3]
        rows = [result(r0 + 1, agent) for agent in (1, 2, 3)] if released.is_set() else []
        return 200, {"results": rows, "test": {"testId": test}}

    api.answer = answer
    a, b = reader_for(pg, api, A), reader_for(pg, api, B)

    # Both alive: they claim and read (nothing there yet) for two minutes.
    while clock.now() < t0 + timedelta(minutes=2):
        fake_clock.advance(max(step_together(a, b), 0.5))
        for instance in (A, B):
            instances.heartbeat(pg, instance, clock.now())
    claimed = {item.attempt_id: item.owner for item in store.waiting(pg)}
    assert set(claimed) == set(ids.values())
    for test, owner in owners.items():
        if owner != GONE:  # a live instance reads its own runs
            assert claimed[ids[test]] == owner
    assert {claimed[ids[t]] for t, o in owners.items() if o == GONE} <= {A, B}
    before = reads_by(api)
    assert set(before) == set(owners)  # every follow-up was read
    for test, by in before.items():
        assert len(by) == 1, f"test {test} read by both: {by}"
        assert by[str(claimed[ids[test]])[5]] >= 2  # and by its owner

    # A dies (no heartbeat, no passes); B takes A's follow-ups over once A's row is stale.
    released.set()
    dead_at = clock.now() + instances.stale_after() + timedelta(seconds=1)
    for _ in range(400):
        if not store.waiting(pg):
            break
        fake_clock.advance(max(b.step(), 0.5))
        instances.heartbeat(pg, B, clock.now())
    assert not store.waiting(pg)
    assert clock.now() > dead_at
    with pg.connect() as conn:
        states = {i: s for i, s in conn.execute(sa.select(attempts.c.id, attempts.c.results))}
        readers = {
            i: o
            for i, o in conn.execute(
                sa.select(store.followups.c.attempt_id, store.followups.c.owner)
            )
        }
    assert set(states.values()) == {"complete"}
    assert set(readers.values()) == {B}
    after = reads_by(api)
    for test, owner in owners.items():
        new = after[test] - before[test]
        assert set(new) == {"b"}, f"test {test}: reads after A died by {dict(new)}"
    rows = store.query(pg, limit=0)
    assert Counter(row["test_id"] for row in rows) == {test: 3 for test in owners}
