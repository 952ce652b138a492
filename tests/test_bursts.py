"""No firing unaccounted for: a burst cut short by SIGTERM or kill -9 still ends with rows.

Each test runs a real daemon against the simulated API, stops it in the middle of a burst,
restarts it on the same SQLite file and, once the restart's catch-up has settled, checks the
accounting contract (te-scheduler issue 11 item 2) over every (job, test, slot) that came due:

* every due firing has a row (its own, or a ``missed`` summary row covering its slot);
* a firing never sent ends ``missed`` with an error saying why, never ``interrupted``;
  ``interrupted`` is only for a call that may have reached the API, so the requests the
  server received are exactly the rows with a status code plus (after kill -9 only) calls
  cut off mid-flight, at most ``api.concurrency`` of them;
* a firing not sent before the stop is run by the restart as ``catch-up``, and no firing's
  call is answered 2xx twice.
"""

from __future__ import annotations

import math
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from scheduler.api.simulator import Simulator
from tests.conftest import TOKEN, DaemonProcess
from tests.test_reliability import arm, rows_so_far, start_idle

pytestmark = pytest.mark.slow

Row = dict[str, Any]
Key = tuple[str, str, datetime]  # job, test_id, slot
CONCURRENCY = 8
# Words a missed row's error uses to say why the firing was not sent.
MISSED_REASONS = ("before the call was sent", "shut down", "stopped", "not running")


@dataclass(frozen=True)
class Stop:
    """How the first daemon is stopped, and how long after the slot."""

    how: str  # "sigterm" or "kill"
    after: float  # seconds after the slot

    @property
    def killed(self) -> bool:
        return self.how == "kill"


@pytest.fixture
def make_server() -> Iterator[Callable[..., Simulator]]:
    """Simulated APIs (they count every run call per test id), stopped at teardown."""
    started: list[Simulator] = []

    def make(**kwargs: Any) -> Simulator:
        sim = Simulator(token=TOKEN, **kwargs).start()
        started.append(sim)
        return sim

    yield make
    for sim in started:
        sim.stop()


# -- the scenarios ----------------------------------------------------------------------------
def test_a_burst_of_one_off_jobs_cut_by_sigterm_is_caught_up_after_a_restart(
    tmp_path: Path, make_server: Callable[..., Simulator], db_url: str, start_daemon: Any
) -> None:
    # 60 one-off jobs due at once against 30 calls per 10 s: half wait for the limiter when
    # SIGTERM comes. The restart waits for the server's window to pass, so its catch-ups go
    # straight through (a 429 there would be legal, but would slow the test down).
    sim = make_server(instant_limit=30, window=10.0, org_limit=10_000)
    cfg = tmp_path / "jobs.yaml"
    api = "  timeout: 3s\n  rate_limit: 30/10s\n"
    first = start_idle(start_daemon, cfg, sim.url, db_url)
    slot = whole_second_in(4)
    jobs = {f"once-{i:02d}": [str(1000 + i)] for i in range(60)}
    arm(first, cfg, one_off_jobs(jobs, slot), sim.url, db_url, api_extra=api)
    assert time.time() < slot.timestamp(), "the reload ended after the slot; machine too slow"
    stopped, sent_before = stop_after_slot(first, sim, slot, Stop("sigterm", 3.0))
    opened = min(r.received_at for r in sim.requests)
    time.sleep(max(0.0, opened + 10.5 - time.time()))
    found = restart_and_settle(start_daemon, cfg, db_url, sim, due(jobs, [slot]), killed=False)
    check_accounting(found, sim, due(jobs, [slot]), sent_before, stopped, killed=False)


@pytest.mark.parametrize("how", ["sigterm", "kill"])
def test_a_burst_of_200_tests_cut_short_is_accounted_for_after_a_restart(
    tmp_path: Path,
    make_server: Callable[..., Simulator],
    db_url: str,
    start_daemon: Any,
    how: str,
) -> None:
    # 200 tests (20 jobs of 10) due at once, 8 in flight, 0.5 s each: 2 s after the slot
    # most of them have not been sent. The interval is long so only one slot is involved.
    sim = make_server(instant_limit=10_000, org_limit=10_000, window=60.0, latency=0.5)
    cfg = tmp_path / "jobs.yaml"
    api = f"  timeout: 3s\n  concurrency: {CONCURRENCY}\n  rate_limit: 10000/min\n"
    first = start_idle(start_daemon, cfg, sim.url, db_url)
    slot = whole_second_in(6)
    jobs = {f"burst-{j:02d}": [str(2000 + 10 * j + t) for t in range(10)] for j in range(20)}
    arm(first, cfg, every_jobs(jobs, slot, "10m"), sim.url, db_url, api_extra=api)
    assert time.time() < slot.timestamp(), "the reload ended after the slot; machine too slow"
    stop = Stop(how, 2.0)
    stopped, sent_before = stop_after_slot(first, sim, slot, stop)
    assert stopped < (slot + timedelta(minutes=10)).timestamp()  # one slot came due, no more
    keys = due(jobs, [slot])
    found = restart_and_settle(start_daemon, cfg, db_url, sim, keys, killed=stop.killed)
    check_accounting(found, sim, keys, sent_before, stopped, killed=stop.killed)


# -- configs ----------------------------------------------------------------------------------
def whole_second_in(seconds: float) -> datetime:
    """A whole second at least ``seconds`` from now."""
    return datetime.fromtimestamp(math.ceil(time.time() + seconds), tz=timezone.utc)


def one_off_jobs(jobs: dict[str, list[str]], slot: datetime) -> str:
    lines = ["defaults:\n  retry: {attempts: 1}\njobs:\n"]
    for name, tests in jobs.items():
        lines.append(
            f"  - name: {name}\n    tests: [{', '.join(tests)}]\n"
            f'    schedule: {{at: "{slot.isoformat()}"}}\n'
        )
    return "".join(lines)


def every_jobs(jobs: dict[str, list[str]], slot: datetime, every: str) -> str:
    lines = ["defaults:\n  retry: {attempts: 1}\njobs:\n"]
    for name, tests in jobs.items():
        lines.append(
            f"  - name: {name}\n    tests: [{', '.join(tests)}]\n"
            f'    schedule: {{every: {every}, start: "{slot.isoformat()}"}}\n'
        )
    return "".join(lines)


def due(jobs: dict[str, list[str]], slots: list[datetime]) -> set[Key]:
    """Every (job, test, slot) of ``jobs`` for the ``slots`` that came due."""
    return {(job, test, slot) for job, tests in jobs.items() for test in tests for slot in slots}


# -- driving the daemons ----------------------------------------------------------------------
def stop_after_slot(
    daemon: DaemonProcess, sim: Simulator, slot: datetime, stop: Stop
) -> tuple[float, Counter[str]]:
    """Stop ``daemon`` ``stop.after`` seconds after ``slot``; returns when the stop began
    (epoch seconds) and the run calls per test id the server received from it."""
    time.sleep(max(0.0, slot.timestamp() + stop.after - time.time()))
    stopped = time.time()
    if stop.killed:
        daemon.kill()
    else:
        assert daemon.stop(signal.SIGTERM) == 0, daemon.log
    time.sleep(0.5)  # a request already on the wire is read by the server a moment later
    return stopped, received_by(sim, time.time())


def restart_and_settle(
    start_daemon: Any, cfg: Path, db_url: str, sim: Simulator, keys: set[Key], killed: bool
) -> list[Row]:
    """Start a second daemon on the same config and database, let its recovery and catch-up
    finish (every due firing settled, or nothing changing for a while), stop it with SIGTERM
    and return every row."""
    second: DaemonProcess = start_daemon(cfg)
    second.wait_for_log("Scheduled ", timeout=30)  # logged once catch-up has decided
    settle(db_url, sim, lambda found: settled(found, keys, killed))
    assert second.stop(signal.SIGTERM) == 0, second.log
    return [normalised(r) for r in rows_so_far(db_url)]


def settle(
    db_url: str,
    sim: Simulator,
    done: Callable[[list[Row]], bool],
    quiet: float = 5.0,
    timeout: float = 45.0,
) -> None:
    """Wait until ``done``, or no row, outcome or request changed for ``quiet`` seconds with
    nothing pending (then the checks say what is missing), or ``timeout``."""
    deadline = time.monotonic() + timeout
    last: object = None
    since = time.monotonic()
    while time.monotonic() < deadline:
        found = [normalised(r) for r in rows_so_far(db_url)]
        if done(found):
            return
        state = (sorted(Counter(r["outcome"] for r in found).items()), len(sim.requests))
        if state != last:
            last, since = state, time.monotonic()
        elif time.monotonic() - since >= quiet and not any(is_pending(r) for r in found):
            return
        time.sleep(0.2)


def settled(found: list[Row], keys: set[Key], killed: bool) -> bool:
    """The end state the contract promises against a healthy server: every due firing
    answered 2xx once, or (kill -9 only) cut off mid-flight, and nothing pending."""
    if any(is_pending(r) for r in found):
        return False
    by_key = grouped(found)
    for key in keys:
        own = by_key.get(key, [])
        if not any(is_2xx(r) for r in own) and not (
            killed and any(r["outcome"] == "interrupted" for r in own)
        ):
            return False
    return True


# -- the contract -----------------------------------------------------------------------------
def check_accounting(
    found: list[Row],
    sim: Simulator,
    keys: set[Key],
    sent_before: Counter[str],
    stopped: float,
    killed: bool,
) -> None:
    """Assert every invariant of the module docstring; one failure lists all violations.

    ``sent_before``: run calls per test id the server received before the first daemon ended;
    ``stopped``: when it was signalled or killed (epoch seconds).
    """
    problems: list[str] = []
    before = [r for r in found if r["started_at"].timestamp() <= stopped]
    by_key = grouped(found)
    received = sim.counts()
    with_status = Counter(r["test_id"] for r in found if r["status_code"] is not None)
    interrupted = Counter(r["test_id"] for r in found if r["outcome"] == "interrupted")
    summary = (
        f"{len(keys)} due firings; rows by outcome {dict(Counter(r['outcome'] for r in found))}; "
        f"before the stop {dict(Counter(r['outcome'] for r in before))}; "
        f"triggers {dict(Counter(r['trigger'] for r in found))}; "
        f"requests received {sum(received.values())}, rows with a status code "
        f"{sum(with_status.values())}, interrupted {sum(interrupted.values())}"
    )

    # 1. Every due firing has a row.
    unaccounted = [k for k in keys if not covering(found, k)]
    if unaccounted:
        problems.append(
            f"{len(unaccounted)} due firing(s) have no row, e.g. {describe(unaccounted)}"
        )

    # 2. Nothing is left pending once both daemons are done.
    pending = [r for r in found if is_pending(r)]
    if pending:
        problems.append(f"{len(pending)} row(s) left pending")

    # 3. Every request the server received is a row with a status code, or (kill -9) a row
    #    interrupted mid-flight; an interrupted row stands for a call that may have been sent.
    total_received = sum(received.values())
    total_status = sum(with_status.values())
    total_interrupted = sum(interrupted.values())
    if killed:
        if not total_status <= total_received <= total_status + total_interrupted:
            problems.append(
                f"requests received {total_received} not between rows with a status code "
                f"{total_status} and those plus interrupted rows {total_status + total_interrupted}"
            )
        if total_interrupted > CONCURRENCY:
            problems.append(
                f"{total_interrupted} row(s) interrupted, but at most {CONCURRENCY} calls "
                "(api.concurrency) can have been in flight at the kill: the rest were never sent"
            )
    else:
        if total_received != total_status:
            problems.append(
                f"requests received {total_received} != rows with a status code {total_status}"
            )
        if total_interrupted > total_received - total_status:
            problems.append(
                f"{total_interrupted} row(s) interrupted but only "
                f"{total_received - total_status} request(s) received without a status row"
            )
    tests = set(received) | set(with_status) | set(interrupted)
    per_test = [
        t
        for t in sorted(tests)
        if not with_status[t] <= received.get(t, 0) <= with_status[t] + interrupted[t]
    ]
    if per_test:
        sample = ", ".join(
            f"test {t}: received {received.get(t, 0)}, status rows {with_status[t]}, "
            f"interrupted {interrupted[t]}"
            for t in per_test[:3]
        )
        problems.append(f"{len(per_test)} test(s) whose requests and rows disagree, e.g. {sample}")

    # 4. A firing never sent is missed with a reason, not interrupted.
    lies = [r for r in found if r["outcome"] == "interrupted" and "was sent" in (r["error"] or "")]
    if lies:
        problems.append(
            f"{len(lies)} row(s) interrupted with error {lies[0]['error']!r}: a call never "
            "sent must be missed"
        )
    if not killed:
        # SIGTERM: the daemon knows which firings it never sent; each gets its missed row.
        no_missed = [
            k
            for k in keys
            if not sent_before[k[1]]
            and not any(r["outcome"] == "missed" and covers(r, k) for r in found)
        ]
        if no_missed:
            problems.append(
                f"{len(no_missed)} due firing(s) never sent before SIGTERM have no missed row, "
                f"e.g. {describe(no_missed)}"
            )
    vague = [r for r in found if r["outcome"] == "missed" and not says_why(r["error"])]
    if vague:
        problems.append(f"{len(vague)} missed row(s) without a reason, e.g. {vague[0]['error']!r}")

    # 5. A firing not sent before the stop is caught up by the restart; one 2xx per firing.
    #    Whether a call went out before the stop is the server's word, not the rows' (test
    #    ids are unique across the scenarios' jobs, so a test id names its firing). After
    #    kill -9 a row interrupted "may have been sent" is not repeated (check 3 bounds them).
    unsent = [
        key
        for key in keys
        if not sent_before[key[1]]
        and not (killed and any(r["outcome"] == "interrupted" for r in by_key.get(key, [])))
    ]
    not_caught_up = [
        k for k in unsent if not any(r["trigger"] == "catch-up" for r in by_key.get(k, []))
    ]
    if not_caught_up:
        problems.append(
            f"{len(not_caught_up)} due firing(s) not sent before the stop have no catch-up row, "
            f"e.g. {describe(not_caught_up)}"
        )
    twice = [k for k, own in by_key.items() if sum(1 for r in own if is_2xx(r)) > 1]
    if twice:
        problems.append(f"{len(twice)} firing(s) answered 2xx more than once: {describe(twice)}")
    unfinished = [k for k in keys if not settled(by_key.get(k, []), {k}, killed)]
    if unfinished:
        what = "a 2xx or an interrupted row" if killed else "a 2xx row"
        problems.append(
            f"{len(unfinished)} due firing(s) end without {what} against a healthy server, "
            f"e.g. {describe(unfinished)}"
        )
    assert not problems, (
        f"stopped at {datetime.fromtimestamp(stopped, tz=timezone.utc).isoformat()}; "
        + summary
        + "\n- "
        + "\n- ".join(problems)
    )


def received_by(sim: Simulator, moment: float) -> Counter[str]:
    """Run calls per test id the server received up to ``moment`` (epoch seconds)."""
    found = Counter[str]()
    for request in list(sim.requests):
        parts = request.path.split("/")  # /v7/tests/{id}/run
        if request.received_at <= moment and len(parts) == 5 and parts[-1] == "run":
            found[parts[3]] += 1
    return found


# -- row helpers ------------------------------------------------------------------------------
def normalised(row: Row) -> Row:
    """``row`` with its times in UTC (SQLite hands them back naive)."""
    out = dict(row)
    for column in ("scheduled_for", "started_at", "finished_at"):
        value = out.get(column)
        if isinstance(value, datetime) and value.tzinfo is None:
            out[column] = value.replace(tzinfo=timezone.utc)
    return out


def row_key(row: Row) -> Key:
    return (row["job"], row["test_id"], row["scheduled_for"])


def grouped(found: list[Row]) -> dict[Key, list[Row]]:
    by_key: dict[Key, list[Row]] = {}
    for row in found:
        by_key.setdefault(row_key(row), []).append(row)
    return by_key


def covering(found: list[Row], key: Key) -> bool:
    """Whether some row accounts for the firing ``key``."""
    return any(covers(r, key) for r in found)


def covers(row: Row, key: Key) -> bool:
    """``row`` is of the firing itself, or a ``missed`` summary of its test whose range (from
    its ``scheduled_for`` on, written after the slot) includes the slot."""
    job, test, slot = key
    if (row["job"], row["test_id"]) != (job, test):
        return False
    if row["scheduled_for"] == slot:
        return True
    return bool(row["outcome"] == "missed" and row["scheduled_for"] <= slot <= row["started_at"])


def is_pending(row: Row) -> bool:
    return bool(row["outcome"] == "pending")


def is_2xx(row: Row) -> bool:
    return row["status_code"] is not None and 200 <= row["status_code"] < 300


def says_why(error: str | None) -> bool:
    return bool(error) and any(reason in (error or "") for reason in MISSED_REASONS)


def describe(keys: list[Key]) -> str:
    shown = sorted(keys)[:3]
    return ", ".join(f"{job}/{test}@{slot:%H:%M:%S}" for job, test, slot in shown)
