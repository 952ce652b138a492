"""Reliability of a real `te-scheduler run` subprocess: pacing, crashes, overlap, hostile answers.

Each test drives the daemon from outside, as an operator would (signals, kill -9, a broken
database), against the in-process simulator, and asserts on what a user can see: history
rows, the requests the API received, the log, the exit code.
"""

from __future__ import annotations

import json
import math
import signal
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import requests

from scheduler import clock, config
from scheduler.api.client import CallResult, RateLimitBucket
from scheduler.api.limiter import Limiter
from scheduler.api.simulator import Simulator
from scheduler.config.model import Rate
from scheduler.daemon import Daemon
from scheduler.errors import DatabaseError
from scheduler.runner import instance_name
from scheduler.store import db, history
from tests.conftest import TOKEN, DaemonProcess, cli_env, key, run_cli, wait_until, write_config

pytestmark = pytest.mark.slow

SECRET = "tok-Zq8x-SECRET-4f1e9a7c0b"  # distinctive, so a leak cannot hide in other text
Sim = Callable[..., Simulator]


# -- helpers shared by the reliability test files -------------------------------------------
def rows(db_url: str) -> list[dict[str, Any]]:
    """Every history row, oldest first."""
    engine = db.make_engine(db_url)
    try:
        return sorted(history.query(engine, limit=None), key=lambda r: r["id"])
    finally:
        engine.dispose()


def rows_so_far(db_url: str) -> list[dict[str, Any]]:
    """``rows`` for polling: empty while the daemon has not created the table yet."""
    try:
        return rows(db_url)
    except DatabaseError:
        return []


def of(found: list[dict[str, Any]], **match: object) -> list[dict[str, Any]]:
    """The rows whose columns equal ``match``."""
    return [r for r in found if all(r[k] == v for k, v in match.items())]


def finished(db_url: str, test_id: str, at_least: int = 1) -> bool:
    """True once ``test_id`` has ``at_least`` rows that are no longer pending."""
    done = [r for r in rows_so_far(db_url) if r["test_id"] == test_id and r["outcome"] != "pending"]
    return len(done) >= at_least


def calls_to(sim: Simulator, test_id: str) -> list[float]:
    """When the simulator received run calls for ``test_id``."""
    path = f"/v7/tests/{test_id}/run"
    return [r.received_at for r in list(sim.requests) if r.path == path]


def slot_in(seconds: float) -> datetime:
    """A whole second at least ``seconds`` from now, to anchor an ``every`` schedule on."""
    return datetime.fromtimestamp(math.ceil(time.time() + seconds), tz=timezone.utc)


IDLE = """\
jobs:
  - name: idle
    tests: [999]
    schedule: {every: 1h}
    enabled: false
"""


def start_idle(start_daemon: Any, cfg: Path, base_url: str, db_url: str) -> DaemonProcess:
    """A daemon up and running with nothing to do, whatever its start-up took."""
    daemon: DaemonProcess = start_daemon(write_config(cfg, IDLE, base_url=base_url, db_url=db_url))
    daemon.wait_for_log("waiting for a reload")
    return daemon


def arm(
    daemon: DaemonProcess, cfg: Path, body: str, base_url: str, db_url: str, api_extra: str = ""
) -> None:
    """Give a running daemon ``body`` by SIGHUP, so a slot due soon is not lost to start-up."""
    write_config(cfg, body, base_url=base_url, db_url=db_url, api_extra=api_extra)
    done = daemon.log.count("Reloaded ")
    daemon.send(signal.SIGHUP)
    wait_until(lambda: daemon.log.count("Reloaded ") > done, what="the reload")


@pytest.fixture
def start_with_options(tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    """Like ``start_daemon``, with global options (``--log-level`` ...) before ``run``."""
    started: list[DaemonProcess] = []

    def start(
        options: list[str], cfg: Path, *args: str, env: dict[str, str] | None = None
    ) -> DaemonProcess:
        argv = ["-c", str(cfg), *options, "run", *args]
        started.append(DaemonProcess(argv, tmp_path, env or cli_env()))
        return started[-1]

    yield start
    for daemon in started:
        if daemon.proc.poll() is None:
            daemon.kill()


@pytest.fixture
def make_sim() -> Iterator[Sim]:
    """Simulators with custom limits, all stopped at teardown."""
    started: list[Simulator] = []

    def make(**kwargs: Any) -> Simulator:
        sim = Simulator(**{"token": TOKEN, **kwargs}).start()
        started.append(sim)
        return sim

    yield make
    for sim in started:
        sim.stop()


# -- 1. pacing ---------------------------------------------------------------------------------
BURST = """\
jobs:
  - name: burst
    tests: [{tests}]
    schedule: {{every: 1h, start: "{start}"}}
"""


def start_burst(
    tmp_path: Path, sim: Simulator, start_daemon: Any, name: str
) -> tuple[DaemonProcess, Path, str]:
    """An idle daemon of its own (folder ``name``): the process, its config and database."""
    folder = tmp_path / name
    folder.mkdir()
    db_url = f"sqlite:///{folder / 'history.db'}"
    cfg = folder / "jobs.yaml"
    return start_idle(start_daemon, cfg, sim.url, db_url), cfg, db_url


def burst_done(sim: Simulator, db_url: str) -> bool:
    return len(sim.requests) >= 15 and all(r["outcome"] != "pending" for r in rows_so_far(db_url))


def test_a_burst_of_15_is_paced_into_the_servers_windows_with_no_429(
    tmp_path, start_daemon, make_sim
):
    # Two daemons at once, each with its own simulator (5 calls per 4 s window): one with the
    # budget set to the server's limit, one with the default budget (24/min), which only the
    # server's rate-limit headers can lower.
    matched, default = make_sim(instant_limit=5, window=4.0), make_sim(instant_limit=5, window=4.0)
    first, first_cfg, first_db = start_burst(tmp_path, matched, start_daemon, "matched")
    second, second_cfg, second_db = start_burst(tmp_path, default, start_daemon, "default")
    tests = ", ".join(str(100 + i) for i in range(15))
    body = BURST.format(tests=tests, start=slot_in(1.5).isoformat())  # 15 tests due at once
    arm(first, first_cfg, body, matched.url, first_db, api_extra="  rate_limit: 5/4s\n")
    arm(second, second_cfg, body, default.url, second_db)
    wait_until(
        lambda: burst_done(matched, first_db) and burst_done(default, second_db),
        timeout=40,
        what="15 calls through each daemon",
    )
    assert first.stop() == 0 and second.stop() == 0
    ideal = (math.ceil(15 / 5) - 1) * 4.0
    for label, sim, db_url in (("5/4s", matched, first_db), ("24/min", default, second_db)):
        found = rows(db_url)
        received = [r.received_at for r in sim.requests]
        span = max(received) - min(received)
        too_many = sum(1 for r in found if r["status_code"] == 429)
        print(
            f"\npacing, budget {label}: {too_many} x 429, makespan {span:.2f}s (ideal {ideal:.0f}s)"
        )
        assert too_many == 0, label
        assert [r["outcome"] for r in found] == ["success"] * 15, label  # one row per call
        assert len({r["test_id"] for r in found}) == 15
        # Closer than two window lengths would have drawn 429s; within one window of ideal.
        assert ideal - 0.5 <= span <= ideal + 4.0, f"{label}: makespan {span:.2f}s"


PAIR = """\
jobs:
  - name: pair
    tests: [105, 106]
    schedule: {every: 1s}
"""


def exhaust(sim: Simulator, min_left: float) -> float:
    """Use up the simulator's window from another client; its Reset, at least ``min_left`` away."""
    while True:
        reset = None
        for _ in range(100):
            answer = requests.post(
                f"{sim.url}/tests/999/run", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5
            )
            if answer.status_code == 429:
                reset = float(answer.headers["X-Instant-Test-Rate-Limit-Reset"])
                break
        assert reset is not None, "the simulator never answered 429"
        if reset - time.time() >= min_left:
            return reset
        time.sleep(max(0.0, reset - time.time()) + 0.3)  # a fresh window, then try again


def test_a_429_pauses_every_call_on_the_token_until_the_reset(
    tmp_path, db_url, start_daemon, make_sim
):
    sim = make_sim(instant_limit=20, window=3.0)
    cfg = write_config(
        tmp_path / "jobs.yaml",
        PAIR,
        base_url=sim.url,
        db_url=db_url,
        api_extra="  rate_limit: 20/3s\n",
    )
    daemon = start_daemon(cfg)
    wait_until(lambda: len(calls_to(sim, "105")) >= 2, what="steady firing")
    reset = exhaust(sim, min_left=1.8)  # another client on the same token empties the window
    exhausted = time.time()
    wait_until(lambda: time.time() > reset + 1.2, timeout=10)
    assert daemon.stop() == 0

    ours = [r.received_at for r in sim.requests if "te-scheduler" in (r.header("User-Agent") or "")]
    after = [t for t in ours if t > exhausted]
    first_429 = min(after)
    # The call(s) that met the exhausted window got 429; then nothing left until the Reset.
    assert [t for t in after if first_429 + 0.3 < t < reset] == []
    assert [t for t in after if t >= reset], "calls resumed after the reset"
    limited = [r for r in rows(db_url) if r["status_code"] == 429]
    assert limited and {r["outcome"] for r in limited} == {"rate_limited"}
    assert limited[0]["error"] == "Too Many Requests: Exhausted rate limit for instant tests"


# -- 2. crash-safe history ----------------------------------------------------------------
ONCE = """\
jobs:
  - name: once
    tests: [105]
    schedule: {{at: "{at}"}}
"""


def integrity(path: Path) -> str:
    with sqlite3.connect(path) as conn:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])


def test_kill_9_mid_call_leaves_pending_which_the_next_start_interrupts(
    tmp_path, simulator, db_url, start_daemon
):
    simulator.add_rule("105", 200, delay=5)
    cfg = tmp_path / "jobs.yaml"
    daemon = start_idle(start_daemon, cfg, simulator.url, db_url)
    arm(daemon, cfg, ONCE.format(at=slot_in(1).isoformat()), simulator.url, db_url)
    wait_until(lambda: len(simulator.requests) == 1 and rows_so_far(db_url), what="the slow call")
    daemon.kill()
    [row] = rows(db_url)
    assert (row["outcome"], row["finished_at"]) == ("pending", None)
    assert integrity(tmp_path / "history.db") == "ok"

    again = start_daemon(cfg)
    again.wait_for_log("left pending by")
    [row] = rows(db_url)
    assert row["outcome"] == "interrupted" and row["finished_at"] is not None
    assert "not repeated" in row["error"]
    time.sleep(1.0)  # give a wrong catch-up the chance to resend it
    assert again.stop() == 0
    assert len(simulator.requests) == 1  # the call that may have reached the API is not re-sent
    assert len(rows(db_url)) == 1
    assert integrity(tmp_path / "history.db") == "ok"


def test_pending_rows_under_our_own_name_are_orphans_at_start(
    tmp_path, simulator, engine, monkeypatch
):
    # A restarted container is PID 1 on the same host name again: "host:1" then and now.
    monkeypatch.setenv("TE_TEST_TOKEN", TOKEN)
    past = datetime(2020, 1, 1, tzinfo=timezone.utc)
    pending = key("r1", job="once", aid=None, scheduled_for=past, instance=instance_name())
    history.start_attempt(engine, pending, datetime.now(timezone.utc))  # just now: not stale
    cfg = write_config(
        tmp_path / "jobs.yaml", ONCE.format(at=past.isoformat()), base_url=simulator.url
    )
    daemon = Daemon(config.load(cfg), engine)
    daemon.start()
    try:
        [row] = history.query(engine, limit=None)
        assert row["outcome"] == "interrupted"
    finally:
        daemon.shutdown()


PULSE = """\
jobs:
  - name: pulse
    tests: [105]
    schedule: {every: 1s}
"""


def test_a_failing_database_is_logged_loudly_and_the_daemon_keeps_running(
    tmp_path, simulator, db_url, start_daemon
):
    cfg = write_config(tmp_path / "jobs.yaml", PULSE, base_url=simulator.url, db_url=db_url)
    daemon = start_daemon(cfg)
    wait_until(lambda: finished(db_url, "105"), what="a first call")
    simulator.add_rule("105", 200, delay=1.0)
    calls = len(simulator.requests)
    wait_until(lambda: len(simulator.requests) > calls, what="the slow call")
    # The table disappears while the call is in flight: its row cannot be completed.
    path = tmp_path / "history.db"
    with sqlite3.connect(path, timeout=10) as conn:
        conn.execute("ALTER TABLE attempts RENAME TO attempts_away")
    daemon.wait_for_log("failed for good", timeout=20)
    with sqlite3.connect(path, timeout=10) as conn:
        conn.execute("ALTER TABLE attempts_away RENAME TO attempts")
    restored = time.time()
    wait_until(
        lambda: any(
            r["outcome"] == "success" and r["started_at"].timestamp() > restored
            for r in rows_so_far(db_url)
        ),
        what="rows after the database is back",
    )
    assert daemon.proc.poll() is None
    assert daemon.stop() == 0
    log = daemon.log
    assert " ERROR scheduler.runner History write " in log
    # The attempt whose row could not be completed is still on record in the log.
    assert 'job="pulse" test=105 attempt=1 status=200 outcome=success duration_ms=1' in log
    assert "Traceback" not in log
    assert integrity(path) == "ok"


# -- 3. overlap ----------------------------------------------------------------------------
def test_a_firing_that_finds_the_previous_one_running_is_skipped(
    tmp_path, simulator, db_url, start_daemon
):
    body = PULSE.replace("[105]", "[105, 106]")
    cfg = write_config(tmp_path / "jobs.yaml", body, base_url=simulator.url, db_url=db_url)
    daemon = start_daemon(cfg)
    # After the first answers: the very first call on a token goes alone, as the limiter's probe.
    wait_until(lambda: finished(db_url, "105") and finished(db_url, "106"), what="first calls")
    simulator.add_rule("105", 200, delay=2.6)
    wait_until(
        lambda: len(of(rows_so_far(db_url), test_id="105", outcome="skipped")) >= 2,
        what="skipped firings",
    )
    wait_until(
        lambda: [
            r
            for r in rows_so_far(db_url)
            if r["test_id"] == "105" and (r["duration_ms"] or 0) >= 2500
        ],
        what="the slow call to finish",
    )
    assert daemon.stop() == 0
    found = rows(db_url)
    slow = max(of(found, test_id="105", outcome="success"), key=lambda r: r["duration_ms"])
    assert slow["duration_ms"] >= 2500
    skipped = of(found, test_id="105", outcome="skipped")
    assert all(
        s["error"].startswith("previous firing (run ")
        and s["error"].endswith("of this test still running")
        for s in skipped
    )
    assert all(s["status_code"] is None for s in skipped)
    assert len([s for s in skipped if s["scheduled_for"] > slow["scheduled_for"]]) >= 2
    # Only one call to 105 while it ran; 106 kept its own pace meanwhile.
    first = min(t for t in calls_to(simulator, "105") if t >= slow["started_at"].timestamp())
    assert [t for t in calls_to(simulator, "105") if first < t < first + 2.5] == []
    assert len([t for t in calls_to(simulator, "106") if first < t < first + 2.5]) >= 2


# -- 7. hardening ------------------------------------------------------------------------
ECHO = """\
jobs:
  - name: echo
    tests: [105, 106, 107, 108]
    schedule: {every: 1s}
    retry: {attempts: 2, backoff: 100ms}
"""


def test_the_token_never_reaches_logs_history_or_help(
    tmp_path, db_url, start_with_options, make_sim
):
    sim = make_sim(token=SECRET)
    sim.add_rule(
        "105",
        401,
        json.dumps({"error": "invalid_token", "error_description": f"token {SECRET} expired"}),
        times=None,
    )
    sim.add_rule(
        "106",
        500,
        json.dumps(
            {"title": "Internal Server Error", "detail": f"got Authorization: Bearer {SECRET}"}
        ),
        times=None,
    )
    sim.add_rule(
        "107",
        502,
        f"<html><body><h1>Bad Gateway</h1>Bearer {SECRET}</body></html>",
        headers={"Content-Type": "text/html", "X-Echo": SECRET},
        times=None,
    )
    cfg = write_config(tmp_path / "jobs.yaml", ECHO, base_url=sim.url, db_url=db_url)
    env = cli_env(TE_TEST_TOKEN=SECRET)
    daemon = start_with_options(["--log-level", "debug", "--log-format", "json"], cfg, env=env)
    retried = ("106", "107")
    wait_until(
        lambda: (
            finished(db_url, "105")
            and finished(db_url, "108")
            and all(
                of(rows_so_far(db_url), test_id=t, attempt=2, outcome="http_error") for t in retried
            )
        ),
        what="answers (and retries) for every test",
    )
    assert daemon.stop() == 0
    assert sim.requests[0].header("Authorization") == f"Bearer {SECRET}"  # it was sent
    assert SECRET not in daemon.log
    found = rows(db_url)
    assert not [r for r in found if any(SECRET in str(v) for v in r.values())]
    # Redacted in place: the reason stays readable.
    assert of(found, test_id="105")[0]["error"] == "invalid_token: token *** expired"
    assert of(found, test_id="106")[0]["error"] == (
        "Internal Server Error: got Authorization: Bearer ***"
    )
    assert of(found, test_id="107")[0]["error"] == "Bad Gateway Bearer ***"
    for args in (("--help",), ("run", "--help"), ("-c", str(cfg), "validate")):
        shown = run_cli(*args, env=env)
        assert SECRET not in shown.stdout + shown.stderr, args


GARBAGE = """\
jobs:
  - name: garbage
    tests: [201, 202, 203, 204, 205, 206, 207]
    schedule: {every: 1s}
    retry: {attempts: 1}
"""
NGINX_502 = (
    "<!DOCTYPE html>\r\n<html><head><title>502 Bad Gateway</title><style>body{margin:0}"
    "</style></head><body><center><h1>502 Bad Gateway</h1></center><hr><center>nginx</center>"
    "</body></html>\r\n"
)


def test_a_stale_reset_does_not_freeze_the_token(fake_clock):
    # Deterministic twin of the garbage test below, where answers may arrive in any order.
    limiter = Limiter(Rate(100, 60.0), threading.Event())
    now = clock.epoch()

    def answer(remaining: int, reset: float) -> CallResult:
        bucket = RateLimitBucket("instant-test", 24, remaining, reset)
        return CallResult(200, "success", None, 5, (bucket,))

    slot = fake_clock.now()
    limiter.complete(limiter.acquire(slot), answer(10, now + 30))  # a fresh window: 10 left
    limiter.complete(limiter.acquire(slot), answer(0, now - 3600))  # "0 left" an hour ago
    before = clock.epoch()
    assert limiter.acquire(slot) is not None
    assert clock.epoch() == before  # granted at once, not after the window's 30 s


def reset_headers(remaining: str, reset: str) -> dict[str, str]:
    prefix = "X-Instant-Test-Rate-Limit"
    return {f"{prefix}-Limit": "24", f"{prefix}-Remaining": remaining, f"{prefix}-Reset": reset}


def test_garbage_answers_become_recorded_outcomes(tmp_path, simulator, db_url, start_daemon):
    past = str(int(time.time()) - 3600)
    simulator.add_rule("201", 502, NGINX_502, headers={"Content-Type": "text/html"}, times=None)
    simulator.add_rule(
        "202",
        500,
        '{"title": "Internal',
        times=None,
        headers={"Content-Type": "application/problem+json"},
    )
    simulator.add_rule("203", 503, b"x" * 5_000_000, times=None)
    simulator.add_rule("204", 200, headers=reset_headers("abc", "abc"), times=None)
    simulator.add_rule("205", 200, headers=reset_headers("0", past), times=None)
    cfg = write_config(tmp_path / "jobs.yaml", GARBAGE, base_url=simulator.url, db_url=db_url)
    daemon = start_daemon(cfg)
    wait_until(
        lambda: all(finished(db_url, str(t)) for t in range(201, 208)),
        what="an answer for every test",
    )
    found = [r for r in rows(db_url) if r["outcome"] not in ("pending", "skipped")]
    assert {r["status_code"] for r in of(found, test_id="201")} == {502}
    assert of(found, test_id="201")[0]["error"] == "502 Bad Gateway 502 Bad Gateway nginx"
    assert of(found, test_id="202")[0]["error"] == '{"title": "Internal'
    big = of(found, test_id="203")[0]
    assert (big["outcome"], big["status_code"]) == ("http_error", 503)
    assert big["error"].startswith("xxxx") and len(big["error"]) <= 300
    for test_id in ("204", "205", "206", "207"):  # unusable headers change nothing
        assert {r["outcome"] for r in of(found, test_id=test_id)} == {"success"}

    # A 429 whose Reset is unusable or already past still pauses the token, then is recorded.
    simulator.add_rule("206", 429, headers=reset_headers("0", "abc"))
    simulator.add_rule("207", 429, headers=reset_headers("0", past))
    wait_until(lambda: len(of(rows_so_far(db_url), status_code=429)) >= 1, what="a 429 recorded")
    time.sleep(1.5)
    assert daemon.proc.poll() is None
    stopping = time.monotonic()
    assert daemon.stop() == 0
    assert time.monotonic() - stopping < 5  # waiters on the paused token give up at once
    found = rows(db_url)
    assert {r["outcome"] for r in of(found, status_code=429)} == {"rate_limited"}
    assert not of(found, outcome="pending")
    assert "Traceback" not in daemon.log
