"""``notify: {results: true}``: runs whose agents fail make a streak of their own (SPEC 7).

Follow-ups read from a real local results server end one after another; their endings reach a
real :class:`Notifier` posting to a real local webhook server. The results streak is keyed
(job, test, "results"), apart from call failures, with the same ``after`` and recovery rules.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from scheduler import clock
from scheduler.api.limiter import Limiter
from scheduler.api.results import ResultsReader
from scheduler.config import load
from scheduler.config.model import ApiConfig, Job, NotifyConfig, Rate, ResultsConfig, Schedule
from scheduler.errors import ConfigError
from scheduler.followup import FollowupReader
from scheduler.notify import Notifier
from tests.test_notify import SECRET, Recorder
from tests.test_results_followup import T0, Answer, Api, accepted_run, result, run_until_done

GAP = timedelta(minutes=10)  # between the runs


@pytest.fixture
def api() -> Iterator[Api]:
    server = Api()
    yield server
    server.server.shutdown()


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    server = Recorder()
    yield server
    server.close()


def reader(engine: sa.Engine, api: Api, notifier: Notifier, notify: NotifyConfig) -> FollowupReader:
    job = Job(name="net", tests=("105",), schedule=Schedule(every=timedelta(minutes=15)))
    job = replace(job, results=ResultsConfig(type="agent-to-server"), notify=notify)
    stop = threading.Event()
    return FollowupReader(
        engine,
        ResultsReader(ApiConfig(base_url=api.url, timeout=5.0), "tok"),
        Limiter(Rate(24, 60.0), stop),
        stop,
        instance="host-a:1",
        jobs=lambda: {"net": job},
        notifier=notifier,
    )


# Per run: which of agents 1-3 fail (None: no round at all, the follow-up ends ``none``).
RUNS: list[set[int] | None] = [{2}, {1, 2}, None, {3}, set(), {1}]


def test_failing_agents_make_a_results_streak_apart_from_call_failures(
    engine: sa.Engine, api: Api, recorder: Recorder, fake_clock: clock.FakeClock
) -> None:
    def answer(path: str, query: dict[str, list[str]]) -> Answer:
        rows = []
        for k, failing in enumerate(RUNS):
            start = int((T0 + k * GAP).timestamp()) + 1
            if failing is None or clock.epoch() < start:
                continue
            for agent in (1, 2, 3):
                bad = {"errorType": "Connect", "errorDetails": "timed out"}
                rows.append(result(start, agent, **(bad if agent in failing else {})))
        return 200, {"results": rows}

    api.answer = answer
    hook = f"{recorder.base}/hook/{SECRET}"
    cfg = NotifyConfig(webhook=hook, after=3, timeout=2.0, results=True)
    notifier = Notifier(instance="host-a:1")
    follow = reader(engine, api, notifier, cfg)
    for k, _ in enumerate(RUNS):
        if clock.now() < T0 + k * GAP:
            fake_clock.advance((T0 + k * GAP - clock.now()).total_seconds())
        attempt_id = accepted_run(engine, clock.now(), slot=k)
        run_until_done(follow, fake_clock, engine, attempt_id)
        if k == 1:  # call failures and successes of the same test touch the other streak only
            for outcome in ("http_error", "success", "http_error"):
                notifier.firing_finished("net", "105", outcome, "Bad Gateway", clock.now(), cfg)
    notifier.close(5.0)

    messages = [hit.json for hit in recorder.hits if hit.path == f"/hook/{SECRET}"]
    assert [(m["event"], m.get("streak")) for m in messages] == [
        ("failing", "results"),  # runs 0, 1 and (past the neutral ``none``) 3
        ("recovered", "results"),  # run 4: all agents ok
    ]
    failing, recovered = messages
    assert failing["failures"] == 3
    assert failing["since"] == "2026-11-27T12:00:00Z"
    assert failing["last_error"] == "2/3 ok, 20 ms; agent 3: Connect: timed out"
    assert "had agents failing in 3 firings in a row" in failing["text"]
    assert recovered["recovered_at"] == "2026-11-27T12:40:00Z"
    assert "all agents ok" in recovered["text"]
    # run 5 (agent 1 failing) starts a new streak of one: below ``after``, no message


def test_results_notifications_are_off_by_default(
    engine: sa.Engine, api: Api, recorder: Recorder, fake_clock: clock.FakeClock
) -> None:
    bad = {"errorType": "Connect", "errorDetails": "timed out"}
    api.answer = lambda p, q: (200, {"results": [result(int(T0.timestamp()) + 1, 1, **bad)]})
    notifier = Notifier()
    cfg = NotifyConfig(webhook=f"{recorder.base}/hook/{SECRET}", after=1, timeout=2.0)
    follow = reader(engine, api, notifier, cfg)
    run_until_done(follow, fake_clock, engine, accepted_run(engine, T0))
    notifier.close(5.0)
    assert recorder.hits == []


def _load(tmp_path: Path, notify: str) -> Any:
    path = tmp_path / "jobs.yaml"
    path.write_text(
        "version: 1\n"
        f"defaults:\n  notify: {notify}\n"
        "jobs:\n  - {name: a, tests: [1], schedule: {every: 15m}}\n"
    )
    return load(path)


def test_the_results_key_is_a_boolean_defaulting_to_false(tmp_path: Path) -> None:
    assert _load(tmp_path, "{after: 2}").jobs[0].notify.results is False
    assert _load(tmp_path, "{results: true}").jobs[0].notify.results is True
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, "{results: sometimes}")
    assert "defaults.notify.results" in str(caught.value)
