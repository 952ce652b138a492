"""The results follow-up against a real local HTTP server and a real SQLite file, on fake time."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import sqlalchemy as sa

from scheduler import clock
from scheduler.api.limiter import Limiter
from scheduler.api.results import ResultsReader
from scheduler.config.model import ApiConfig, Job, Rate, ResultsConfig, Schedule
from scheduler.followup import FollowupReader
from scheduler.store import history
from scheduler.store import results as store
from scheduler.store.tables import attempts

T0 = datetime(2026, 11, 27, 12, 0, tzinfo=timezone.utc)
R0 = int(T0.timestamp())
ME = "host-a:1"

Answer = tuple[int, dict[str, Any]]


class Api:
    """A stdlib server answering GET /v7/test-results/... from a programmable function."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, list[str]]]] = []
        self.answer: Callable[[str, dict[str, list[str]]], Answer] = lambda p, q: (200, {})
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                query = parse_qs(parts.query)
                api.requests.append((parts.path, query))
                status, doc = api.answer(parts.path, query)
                body = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v7"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def result_reads(self) -> int:
        return sum(1 for path, _ in self.requests if "/test-results/" in path)


@pytest.fixture
def api() -> Iterator[Api]:
    server = Api()
    yield server
    server.server.shutdown()


def result(round_id: int, agent: int, **extra: Any) -> dict[str, Any]:
    return {
        "roundId": round_id,
        "date": datetime.fromtimestamp(round_id, timezone.utc).isoformat(),
        "agent": {"agentId": str(agent), "agentName": f"agent {agent}"},
        "avgLatency": 10.0 * agent,
        "loss": 0.0,
        "_links": {"appLink": f"https://app.example/{round_id}/{agent}"},
        **extra,
    }


def make_reader(engine: sa.Engine, api: Api, wait: str = "5m") -> FollowupReader:
    config = ResultsConfig(fetch=True, type="agent-to-server", wait=_duration(wait))
    job = Job(name="net", tests=("105",), schedule=Schedule(every=timedelta(minutes=15)))
    job = Job(**{**job.__dict__, "results": config})
    api_config = ApiConfig(base_url=api.url, timeout=5.0)
    stop = threading.Event()
    return FollowupReader(
        engine,
        ResultsReader(api_config, "tok"),
        Limiter(Rate(24, 60.0), stop),
        stop,
        instance=ME,
        jobs=lambda: {"net": job},
    )


def _duration(text: str) -> timedelta:
    return timedelta(minutes=int(text[:-1])) if text.endswith("m") else timedelta(seconds=1)


def accepted_run(engine: sa.Engine, at: datetime, slot: int = 0) -> int:
    key = history.AttemptKey(
        run_id=f"run-{slot}",
        job="net",
        test_id="105",
        aid=None,
        trigger="schedule",
        scheduled_for=T0 + timedelta(minutes=slot),
        attempt=1,
        instance=ME,
    )
    row_id = history.start_attempt(engine, key, at)
    assert row_id is not None
    history.finish_attempt(
        engine,
        row_id,
        finished_at=at + timedelta(milliseconds=200),
        outcome="success",
        status_code=200,
        error=None,
        duration_ms=200,
        results="waiting",
    )
    return row_id


def state(engine: sa.Engine, attempt_id: int) -> str | None:
    with engine.connect() as conn:
        return conn.scalar(sa.select(attempts.c.results).where(attempts.c.id == attempt_id))


def run_until_done(
    reader: FollowupReader, fake: clock.FakeClock, engine: sa.Engine, attempt_id: int
) -> None:
    for _ in range(200):
        delay = reader.step()
        if state(engine, attempt_id) != "waiting":
            return
        fake.advance(max(delay, 0.5))
    raise AssertionError("the follow-up never ended")


def test_late_round_trickling_agents_settle_into_complete(
    engine: sa.Engine, api: Api, fake_clock: clock.FakeClock
) -> None:
    attempt_id = accepted_run(engine, T0)
    later = accepted_run(engine, T0 + timedelta(seconds=100), slot=1)

    def answer(path: str, query: dict[str, list[str]]) -> Answer:
        age = clock.epoch() - R0
        rows = [result(R0 - 60, 9)]  # an older round, answered because it began just before
        if age >= 40:
            rows.append(result(R0 + 1, 1))
        if age >= 60:
            rows.append(result(R0 + 1, 2, errorType="Connect", errorDetails="timed out"))
        rows.append(result(R0 + 100, 7))  # the later run's round
        return 200, {"results": rows, "test": {"testId": "105"}}

    api.answer = answer
    reader = make_reader(engine, api)
    with engine.begin() as conn:  # only the first run is read here
        conn.execute(sa.update(attempts).where(attempts.c.id == later).values(results=None))
    run_until_done(reader, fake_clock, engine, attempt_id)
    assert state(engine, attempt_id) == "complete"
    rows = store.query(engine)
    assert {(r["round_id"], r["agent_id"], r["ok"]) for r in rows} == {
        (R0 + 1, "1", True),
        (R0 + 1, "2", False),
    }
    assert {r["error"] for r in rows} == {None, "Connect: timed out"}
    first = api.requests[0][1]
    assert first["startDate"] == ["2026-11-27T11:59:55Z"]
    # empty at 20 s and 35 s, one agent at 65 s, two later, the same two 15 s after that
    assert 3 <= api.result_reads() <= 6


def test_every_page_is_followed(engine: sa.Engine, api: Api, fake_clock: clock.FakeClock) -> None:
    attempt_id = accepted_run(engine, T0)
    rows = [result(R0, agent) for agent in range(1, 8)]

    def answer(path: str, query: dict[str, list[str]]) -> Answer:
        page = int(query.get("cursor", ["0"])[0])
        doc: dict[str, Any] = {"results": rows[page * 2 : page * 2 + 2]}
        if page * 2 + 2 < len(rows):
            doc["_links"] = {"next": {"href": f"{api.url}{path[3:]}?cursor={page + 1}"}}
        return 200, doc

    api.answer = answer
    run_until_done(make_reader(engine, api), fake_clock, engine, attempt_id)
    assert state(engine, attempt_id) == "complete"
    assert len(store.query(engine)) == 7
    assert api.result_reads() == 8  # two reads of four pages


def test_forbidden_ends_as_error_without_retry(
    engine: sa.Engine, api: Api, fake_clock: clock.FakeClock
) -> None:
    attempt_id = accepted_run(engine, T0)
    api.answer = lambda p, q: (403, {"title": "Forbidden", "detail": "no access to test 105"})
    run_until_done(make_reader(engine, api), fake_clock, engine, attempt_id)
    assert state(engine, attempt_id) == "error"
    assert api.result_reads() == 1
    with engine.connect() as conn:
        note = conn.scalar(sa.select(store.followups.c.note))
    assert note == "HTTP 403: Forbidden: no access to test 105"


def test_a_looping_next_link_stops_paging_and_keeps_the_rows(
    engine: sa.Engine, api: Api, fake_clock: clock.FakeClock
) -> None:
    attempt_id = accepted_run(engine, T0)

    def answer(path: str, query: dict[str, list[str]]) -> Answer:
        page = int(query.get("cursor", ["0"])[0])
        nxt = f"{api.url}{path[3:]}?cursor={1 - page}"  # 0 -> 1 -> 0 -> ...
        return 200, {"results": [result(R0, page + 1)], "_links": {"next": {"href": nxt}}}

    api.answer = answer
    run_until_done(make_reader(engine, api), fake_clock, engine, attempt_id)
    assert state(engine, attempt_id) == "complete"
    assert len(store.query(engine)) == 2
    # the first page, cursor 1, cursor 0; then cursor 1 again ends the read: 3 a read
    assert api.result_reads() == 6


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ((200, {"no": "results"}), "answer without a 'results' list"),
        ((502, {"title": "Bad Gateway"}), "HTTP 502: Bad Gateway"),
        ((200, {"results": [], "test": {"testId": "999"}}), "answer is for test 999, not 105"),
    ],
)
def test_bad_answers_are_retried_a_bounded_number_of_times(
    engine: sa.Engine, api: Api, fake_clock: clock.FakeClock, answer: Answer, expected: str
) -> None:
    attempt_id = accepted_run(engine, T0)
    api.answer = lambda p, q: answer
    run_until_done(make_reader(engine, api, wait="60m"), fake_clock, engine, attempt_id)
    assert state(engine, attempt_id) == "error"
    assert api.result_reads() == 5
    with engine.connect() as conn:
        assert expected in str(conn.scalar(sa.select(store.followups.c.note)))


def test_no_round_within_the_wait_ends_as_none(
    engine: sa.Engine, api: Api, fake_clock: clock.FakeClock
) -> None:
    attempt_id = accepted_run(engine, T0)
    api.answer = lambda p, q: (200, {"results": []})
    run_until_done(make_reader(engine, api), fake_clock, engine, attempt_id)
    assert state(engine, attempt_id) == "none"
    assert api.result_reads() <= 8  # backed off: 20 s, then 15, 30, 60, 120 s apart


def test_a_follow_up_found_long_after_its_wait_ends_without_a_read(
    engine: sa.Engine, api: Api, fake_clock: clock.FakeClock
) -> None:
    attempt_id = accepted_run(engine, T0)
    reader = make_reader(engine, api)
    reader.step()  # claimed
    fake_clock.advance(3600)  # the daemon was down for an hour
    reader.step()
    assert state(engine, attempt_id) == "none"
    assert api.result_reads() == 0


def test_a_live_instances_follow_up_is_left_alone_and_a_dead_ones_taken_over(
    engine: sa.Engine, api: Api, fake_clock: clock.FakeClock
) -> None:
    from scheduler.store import instances

    attempt_id = accepted_run(engine, T0)
    other = make_reader(engine, api)
    other.instance = "host-b:2"
    instances.register(engine, "host-b:2", "test", T0)
    instances.register(engine, ME, "test", T0)
    reader = make_reader(engine, api)
    with engine.begin() as conn:  # the run was host-b's
        conn.execute(sa.update(attempts).values(instance="host-b:2"))
    reader.step()
    assert not store.waiting(engine)[0].owner  # host-b is alive: its own to claim
    other.step()
    assert store.waiting(engine)[0].owner == "host-b:2"
    instances.mark_stopped(engine, "host-b:2", T0)
    reader.step()
    assert store.waiting(engine)[0].owner == ME
    api.answer = lambda p, q: (200, {"results": [result(R0, 1)]})
    run_until_done(reader, fake_clock, engine, attempt_id)
    assert state(engine, attempt_id) == "complete"
