"""Pacing against the simulator's fixed windows: no 429s, makespan near the ideal."""

from __future__ import annotations

import math
import threading
from datetime import datetime, timedelta, timezone

import pytest

from scheduler import clock, history
from scheduler.client import Caller, CallResult, RateLimitBucket
from scheduler.config import ApiConfig, Job, Rate, Schedule
from scheduler.limiter import RESET_MARGIN, Limiter
from scheduler.runner import Firing, Runner
from scheduler.simulator import Simulator
from tests.conftest import TOKEN

SLOT = datetime(2026, 11, 27, 12, 0, tzinfo=timezone.utc)


def burst(engine, sim: Simulator, budget: Rate, n: int) -> list[str]:  # type: ignore[no-untyped-def]
    """Fire ``n`` tests due at the same moment through one runner; return their outcomes."""
    stop = threading.Event()
    caller = Caller(ApiConfig(base_url=sim.url, timeout=5.0), TOKEN)
    runner = Runner(engine, caller.send, Limiter(budget, stop), stop, concurrency=8)
    job = Job(
        name="burst",
        tests=tuple(str(100 + i) for i in range(n)),
        schedule=Schedule(every=timedelta(hours=1)),
    )
    outcomes: list[str] = []
    threads = [
        threading.Thread(
            target=lambda t=t: outcomes.append(
                runner.fire(Firing(job, t, SLOT, deadline=SLOT + timedelta(hours=1)))
            )
        )
        for t in job.tests
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    caller.close()
    return outcomes


def makespan(sim: Simulator) -> float:
    times = [r.received_at for r in sim.requests]
    return max(times) - min(times)


@pytest.mark.slow
def test_a_burst_fits_the_windows_with_no_429_when_the_budget_matches(engine):
    sim = Simulator(token=TOKEN, instant_limit=5, window=4.0).start()
    try:
        outcomes = burst(engine, sim, Rate(5, 4.0), 15)
    finally:
        sim.stop()
    statuses = [r["status_code"] for r in history.query(engine, limit=None)]
    assert outcomes == ["success"] * 15
    assert statuses.count(429) == 0 and len(sim.requests) == 15
    ideal = (math.ceil(15 / 5) - 1) * 4.0
    assert makespan(sim) <= ideal + 4.0, f"makespan {makespan(sim):.1f}s, ideal {ideal:.0f}s"


@pytest.mark.slow
def test_the_default_budget_learns_the_real_limit_from_the_headers(engine):
    sim = Simulator(token=TOKEN, instant_limit=5, window=4.0).start()
    try:
        outcomes = burst(engine, sim, Rate(24, 60.0), 15)
    finally:
        sim.stop()
    assert outcomes == ["success"] * 15
    rows = history.query(engine, limit=None)
    assert [r["status_code"] for r in rows].count(429) == 0


def result(status: int, reset: float, remaining: int = 0) -> CallResult:
    buckets = (RateLimitBucket("instant-test", 24, remaining, reset),)
    return CallResult(status, "rate_limited" if status == 429 else "success", None, 5, buckets)


def test_a_429_pauses_every_caller_until_the_reset(fake_clock):
    stop = threading.Event()
    limiter = Limiter(Rate(100, 60.0), stop)
    reset = clock.epoch() + 30
    permit = limiter.acquire(SLOT)
    assert permit is not None
    limiter.complete(permit, result(429, reset))
    assert limiter.paused_until() == pytest.approx(reset + RESET_MARGIN)
    before = clock.epoch()
    assert limiter.acquire(SLOT) is not None
    assert clock.epoch() >= reset, "a caller went out during the pause"
    assert clock.epoch() - before < 32


def test_remaining_zero_holds_calls_until_reset(fake_clock):
    stop = threading.Event()
    limiter = Limiter(Rate(100, 60.0), stop)
    reset = clock.epoch() + 20
    permit = limiter.acquire(SLOT)
    assert permit is not None
    limiter.complete(permit, result(200, reset, remaining=0))
    assert limiter.acquire(SLOT) is not None
    assert clock.epoch() >= reset


def test_the_budget_window_is_fixed_and_opens_with_the_first_call(fake_clock):
    stop = threading.Event()
    limiter = Limiter(Rate(3, 10.0), stop)
    start = clock.epoch()
    for _ in range(3):
        permit = limiter.acquire(SLOT)
        assert permit is not None
        limiter.complete(permit, CallResult(200, "success", None, 1, ()))
    assert clock.epoch() == start, "the first three calls of a window must not wait"
    assert limiter.acquire(SLOT) is not None
    assert clock.epoch() >= start + 10


def test_waiters_are_served_in_scheduled_order():
    stop = threading.Event()
    limiter = Limiter(Rate(1, 0.3), stop)
    first = limiter.acquire(SLOT)
    assert first is not None
    limiter.complete(first, CallResult(200, "success", None, 1, ()))
    order: list[int] = []

    def call(minute: int) -> None:
        permit = limiter.acquire(SLOT + timedelta(minutes=minute))
        assert permit is not None
        order.append(minute)
        limiter.complete(permit, CallResult(200, "success", None, 1, ()))

    threads = [threading.Thread(target=call, args=(m,)) for m in (3, 1, 2)]
    for thread in threads:
        thread.start()
        threading.Event().wait(0.02)  # let each enqueue before the next
    for thread in threads:
        thread.join(timeout=10)
    assert order == [1, 2, 3]


def test_stop_releases_waiters():
    stop = threading.Event()
    limiter = Limiter(Rate(1, 3600.0), stop)
    first = limiter.acquire(SLOT)
    assert first is not None
    limiter.complete(first, CallResult(200, "success", None, 1, ()))
    got: list[object] = []
    waiter = threading.Thread(target=lambda: got.append(limiter.acquire(SLOT)))
    waiter.start()
    stop.set()
    limiter.wake()
    waiter.join(timeout=5)
    assert got == [None]
