"""The runner against the real simulator and a real SQLite file; backoff on a fake clock."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

import pytest

from scheduler import clock
from scheduler.api.client import Caller
from scheduler.api.limiter import Limiter
from scheduler.config import ApiConfig, Job, RetryPolicy, Schedule
from scheduler.config.model import Rate
from scheduler.runner import Firing, Runner
from scheduler.store import history
from tests.conftest import TOKEN, key

SLOT = datetime(2026, 11, 27, 12, 0, tzinfo=timezone.utc)


def make_job(**overrides: object) -> Job:
    values: dict[str, object] = {
        "name": "dns",
        "tests": ("105",),
        "schedule": Schedule(every=timedelta(minutes=15)),
        "aid": "1234",
        "retry": RetryPolicy(attempts=4, backoff=2.0, max_backoff=60.0),
    }
    values.update(overrides)
    return Job(**values)  # type: ignore[arg-type]


@pytest.fixture
def runner(engine, simulator, fake_clock):  # type: ignore[no-untyped-def]
    stop = threading.Event()
    api = ApiConfig(base_url=simulator.url, timeout=2.0)
    caller = Caller(api, TOKEN)
    run = Runner(engine, caller.send, Limiter(Rate(24, 60.0), stop), stop, instance="host:1")
    yield run
    caller.close()


def rows(engine) -> list[dict]:  # type: ignore[no-untyped-def]
    return sorted(history.query(engine, limit=None), key=lambda r: r["id"])


def fire(runner: Runner, job: Job | None = None, **kw: object) -> str:
    firing = Firing(job or make_job(), "105", SLOT, **kw)  # type: ignore[arg-type]
    return runner.fire(firing)


def test_success_writes_one_row_with_the_request_the_api_expects(runner, engine, simulator):
    assert fire(runner) == "success"
    [row] = rows(engine)
    assert (row["outcome"], row["status_code"], row["attempt"], row["trigger"]) == (
        "success",
        200,
        1,
        "schedule",
    )
    assert row["scheduled_for"] == SLOT and row["finished_at"] is not None
    assert row["instance"] == "host:1" and row["aid"] == "1234"
    [request] = simulator.requests
    assert (request.method, request.path, request.query) == (
        "POST",
        "/v7/tests/105/run",
        {"aid": ["1234"]},
    )


def test_server_errors_are_retried_with_one_row_per_attempt(runner, engine, simulator, fake_clock):
    simulator.add_rule("105", 500, '{"title": "Internal Server Error", "detail": "boom"}', times=2)
    assert fire(runner) == "success"
    found = rows(engine)
    assert [(r["attempt"], r["outcome"], r["status_code"]) for r in found] == [
        (1, "http_error", 500),
        (2, "http_error", 500),
        (3, "success", 200),
    ]
    assert len({r["run_id"] for r in found}) == 1
    assert found[0]["error"] == "Internal Server Error: boom"
    # Full jitter: the n-th backoff is uniform in [0, 2s * 2**(n-1)].
    assert len(fake_clock.waits) == 2
    assert 0 <= fake_clock.waits[0] <= 2 and 0 <= fake_clock.waits[1] <= 4


def test_retries_stop_after_the_configured_attempts(runner, engine, simulator):
    simulator.add_rule("105", 502, "<html>Bad Gateway</html>", times=None)
    job = make_job(retry=RetryPolicy(attempts=3, backoff=1.0, max_backoff=1.0))
    assert fire(runner, job) == "http_error"
    assert [r["attempt"] for r in rows(engine)] == [1, 2, 3]
    assert len(simulator.requests) == 3


@pytest.mark.parametrize("status", [401, 403, 404, 400])
def test_client_errors_are_never_retried(runner, engine, simulator, status):
    simulator.add_rule("105", status, '{"title": "No", "detail": "nope"}', times=None)
    assert fire(runner) == "http_error"
    assert [(r["attempt"], r["status_code"]) for r in rows(engine)] == [(1, status)]


def test_a_429_waits_for_the_later_reset_and_does_not_use_up_attempts(
    runner, engine, simulator, fake_clock
):
    now = int(clock.epoch())
    simulator.add_rule(
        "105",
        429,
        '{"title": "Too Many Requests"}',
        headers={
            "X-Organization-Rate-Limit-Limit": "240",
            "X-Organization-Rate-Limit-Remaining": "200",
            "X-Organization-Rate-Limit-Reset": str(now + 10),
            "X-Instant-Test-Rate-Limit-Limit": "24",
            "X-Instant-Test-Rate-Limit-Remaining": "0",
            "X-Instant-Test-Rate-Limit-Reset": str(now + 40),
        },
        times=1,
    )
    job = make_job(retry=RetryPolicy(attempts=1, backoff=1.0, max_backoff=1.0))
    assert fire(runner, job) == "success"
    assert [(r["attempt"], r["outcome"]) for r in rows(engine)] == [
        (1, "rate_limited"),
        (2, "success"),
    ]
    second = simulator.requests[1].received_at
    assert second >= now + 40, "the retry went out before the later of the two resets"


def test_no_retry_starts_after_the_deadline(runner, engine, simulator):
    simulator.add_rule("105", 503, "", times=None)
    firing = Firing(
        make_job(retry=RetryPolicy(attempts=5, backoff=600.0, max_backoff=600.0)),
        "105",
        SLOT,
        deadline=SLOT + timedelta(seconds=1),
    )
    # A backoff drawn from [0, 600 s] almost surely crosses a deadline 1 s after the slot.
    outcomes = [runner.fire(firing)]
    assert outcomes == ["http_error"]
    assert len(rows(engine)) <= 2


def test_a_firing_already_claimed_elsewhere_sends_nothing(runner, engine, simulator):
    claimed = key("other", scheduled_for=SLOT, instance="other:2")
    assert history.start_attempt(engine, claimed, SLOT) is not None
    assert fire(runner) == "claimed-elsewhere"
    assert simulator.requests == []
    assert len(rows(engine)) == 1


def test_an_overlapping_firing_is_recorded_as_skipped(engine, simulator):
    stop = threading.Event()
    caller = Caller(ApiConfig(base_url=simulator.url, timeout=5.0), TOKEN)
    run = Runner(engine, caller.send, Limiter(Rate(24, 60.0), stop), stop)
    simulator.add_rule("105", 200, "", delay=1.0)
    first = threading.Thread(target=fire, args=(run,))
    first.start()
    while not simulator.requests:
        threading.Event().wait(0.01)
    later = Firing(make_job(), "105", SLOT + timedelta(minutes=15))
    assert run.fire(later) == "skipped"
    first.join()
    skipped = [r for r in rows(engine) if r["outcome"] == "skipped"]
    assert len(skipped) == 1 and "still running" in skipped[0]["error"]
    assert skipped[0]["scheduled_for"] == SLOT + timedelta(minutes=15)
    caller.close()


def test_shutdown_while_queued_records_the_firing_missed_never_sent(engine, simulator, fake_clock):
    # Its call never left, so it is no "interrupted" call that may have reached the API:
    # it is missed, and says so in a way a restart recognises (it may catch the slot up).
    stop = threading.Event()
    caller = Caller(ApiConfig(base_url=simulator.url), TOKEN)
    run = Runner(engine, caller.send, Limiter(Rate(1, 60.0), stop), stop)
    assert fire(run) == "success"  # uses the only call of this window
    stop.set()
    assert run.fire(Firing(make_job(), "105", SLOT + timedelta(minutes=15))) == "missed"
    last = rows(engine)[-1]
    assert last["outcome"] == "missed" and last["error"].startswith("never sent: ")
    assert "shut down while the call waited" in last["error"]
    caller.close()


def test_a_timeout_is_recorded_and_retried(runner, engine, simulator):
    simulator.add_rule("105", 200, "", delay=2.5, times=1)
    assert fire(runner) == "success"
    assert [r["outcome"] for r in rows(engine)] == ["timeout", "success"]
    assert rows(engine)[0]["status_code"] is None


def test_a_call_whose_wait_outlasts_its_deadline_is_missed_not_sent_late(
    engine, simulator, fake_clock
):
    # A 429 without headers pauses the token for 60 s. A test of an `every: 5s` job queued
    # behind it would go out twelve slots late; it must be recorded missed instead.
    stop = threading.Event()
    caller = Caller(ApiConfig(base_url=simulator.url), TOKEN)
    run = Runner(engine, caller.send, Limiter(Rate(24, 60.0), stop), stop)
    simulator.add_rule("105", 429, "", times=None)
    job = make_job(tests=("105", "106"), retry=RetryPolicy(attempts=1))
    slot = fake_clock.now()
    assert run.fire(Firing(job, "105", slot, deadline=slot + timedelta(seconds=5))) == (
        "rate_limited"
    )
    late = Firing(job, "106", slot, deadline=slot + timedelta(seconds=5))
    assert run.fire(late) == "missed"
    assert simulator.counts().get("106") is None  # never sent
    row = rows(engine)[-1]
    assert (row["test_id"], row["outcome"]) == ("106", "missed")
    assert row["error"].startswith("never sent: its deadline")
    caller.close()


def test_started_at_is_when_the_call_left_not_when_it_began_to_wait(engine, simulator, fake_clock):
    stop = threading.Event()
    caller = Caller(ApiConfig(base_url=simulator.url), TOKEN)
    run = Runner(engine, caller.send, Limiter(Rate(24, 60.0), stop), stop)
    simulator.add_rule("105", 429, "", times=1)
    job = make_job(tests=("105", "106"), retry=RetryPolicy(attempts=1))
    slot = fake_clock.now()
    run.fire(Firing(job, "105", slot))  # pauses the token for 60 s
    assert run.fire(Firing(job, "106", slot)) == "success"  # its deadline is an hour away
    row = rows(engine)[-1]
    assert row["test_id"] == "106" and row["error"] is None
    assert row["started_at"] >= slot + timedelta(seconds=60)  # after the pause, not at the slot
    caller.close()
