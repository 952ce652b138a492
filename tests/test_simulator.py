"""The simulated ThousandEyes API, spoken to with plain requests over loopback."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from scheduler import clock
from scheduler.api.simulator import Simulator
from scheduler.errors import UsageError

T0 = 1795780800  # FAKE_START (tests/conftest.py), where the fake_clock fixture starts, in Unix s
TOKEN = "sim-token"
ORG = "X-Organization-Rate-Limit"
INSTANT = "X-Instant-Test-Rate-Limit"


@pytest.fixture
def make_sim() -> Iterator[Any]:
    started: list[Simulator] = []

    def make(**options: Any) -> Simulator:
        options.setdefault("token", TOKEN)
        simulator = Simulator(**options).start()
        started.append(simulator)
        return simulator

    yield make
    for simulator in started:
        simulator.stop()


def call(
    sim: Simulator,
    test_id: str = "105",
    token: str | None = TOKEN,
    method: str = "POST",
    path: str | None = None,
    **kwargs: Any,
) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    url = sim.url + (path if path is not None else f"/tests/{test_id}/run")
    return requests.request(method, url, headers=headers, timeout=5, **kwargs)


def limits(response: requests.Response, prefix: str) -> tuple[str, str, str]:
    h = response.headers
    return (h[f"{prefix}-Limit"], h[f"{prefix}-Remaining"], h[f"{prefix}-Reset"])


def test_200_is_empty_with_both_header_sets(make_sim: Any, fake_clock: clock.FakeClock) -> None:
    sim = make_sim()
    response = call(sim, params={"aid": "1234"})
    assert response.status_code == 200
    assert response.content == b""
    assert response.headers["Content-Length"] == "0"
    assert limits(response, ORG) == ("240", "239", str(T0 + 60))
    assert limits(response, INSTANT) == ("24", "23", str(T0 + 60))
    [got] = sim.requests
    assert (got.method, got.path, got.query, got.received_at) == (
        "POST",
        "/v7/tests/105/run",
        {"aid": ["1234"]},
        float(T0),
    )
    assert sim.counts() == {"105": 1}


def test_wrong_or_missing_token_is_401(make_sim: Any) -> None:
    sim = make_sim()
    expected = {"error": "invalid_token", "error_description": "Invalid access token"}
    for token in ("wrong", "", None):
        response = call(sim, token=token)
        assert response.status_code == 401
        assert response.json() == expected
        assert response.headers["Content-Type"] == "application/problem+json"
        assert f"{ORG}-Remaining" not in response.headers  # nothing counted, nothing reported


def test_without_a_token_any_bearer_is_accepted_but_one_is_required(make_sim: Any) -> None:
    sim = make_sim(token=None)
    assert call(sim, token="anything").status_code == 200
    assert call(sim, token=None).status_code == 401
    basic = requests.post(
        sim.url + "/tests/105/run", headers={"Authorization": "Basic eDp5"}, timeout=5
    )
    assert basic.status_code == 401


def test_instant_bucket_exhausts_then_window_reopens(
    make_sim: Any, fake_clock: clock.FakeClock
) -> None:
    sim = make_sim(instant_limit=3, window=60)
    remaining = [limits(call(sim), INSTANT)[1] for _ in range(3)]
    assert remaining == ["2", "1", "0"]

    fake_clock.advance(10)
    refused = call(sim)
    assert refused.status_code == 429
    assert refused.headers["Content-Type"] == "application/problem+json"
    assert refused.json() == {
        "type": "about:blank",
        "title": "Too Many Requests",
        "status": 429,
        "detail": "Exhausted rate limit for instant tests",
        "instance": "/v7",
    }
    assert limits(refused, INSTANT) == ("3", "0", str(T0 + 60))
    assert limits(refused, ORG)[0] == "240"
    assert "Retry-After" not in refused.headers  # like the real API

    fake_clock.advance(49.9)  # 59.9 s into the window: still closed
    assert call(sim).status_code == 429
    fake_clock.advance(0.1)  # the window's end: the next call opens a new one
    reopened = call(sim)
    assert reopened.status_code == 200
    assert limits(reopened, INSTANT) == ("3", "2", str(T0 + 120))


def test_organization_bucket_exhausts_too(make_sim: Any, fake_clock: clock.FakeClock) -> None:
    sim = make_sim(org_limit=2, instant_limit=10)
    assert [call(sim).status_code for _ in range(3)] == [200, 200, 429]
    assert limits(call(sim), ORG) == ("2", "0", str(T0 + 60))


def test_window_opens_with_the_first_call_and_reset_rounds_up(
    make_sim: Any, fake_clock: clock.FakeClock
) -> None:
    sim = make_sim(window=30)
    fake_clock.advance(100.25)  # idle time before the first call does not start a window
    response = call(sim)
    assert limits(response, INSTANT)[2] == str(T0 + 131)  # ceil(T0 + 100.25 + 30)


def test_fail_rate_one_gives_500_and_502(make_sim: Any, fake_clock: clock.FakeClock) -> None:
    sim = make_sim(fail_rate=1.0, seed=7, instant_limit=100)
    responses = [call(sim) for _ in range(20)]
    assert {r.status_code for r in responses} == {500, 502}
    for response in responses:
        assert response.json()["status"] == response.status_code
        assert f"{INSTANT}-Remaining" in response.headers
    assert limits(responses[-1], INSTANT)[1] == "80"  # failed calls still count


def test_fail_rate_is_reproducible_with_a_seed(make_sim: Any) -> None:
    first, second = make_sim(fail_rate=0.5, seed=3), make_sim(fail_rate=0.5, seed=3)
    codes = [[call(sim).status_code for _ in range(12)] for sim in (first, second)]
    assert codes[0] == codes[1]
    assert 200 in codes[0] and len(set(codes[0])) > 1


def test_rule_answers_next_calls_then_normal_logic(
    make_sim: Any, fake_clock: clock.FakeClock
) -> None:
    sim = make_sim()
    body = json.dumps({"title": "Forbidden", "detail": "Not an admin"})
    sim.add_rule("105", 403, body, headers={"X-Extra": "yes"}, times=2)
    first, second, third = call(sim), call(sim, token="wrong"), call(sim)
    assert (first.status_code, first.json(), first.headers["X-Extra"]) == (
        403,
        {"title": "Forbidden", "detail": "Not an admin"},
        "yes",
    )
    assert first.headers["Content-Type"] == "application/problem+json"
    assert f"{ORG}-Limit" not in first.headers  # rules add no rate-limit headers
    assert second.status_code == 403  # rules bypass authentication
    assert third.status_code == 200
    assert limits(third, INSTANT)[1] == "23"  # rule answers did not use the buckets
    assert call(sim, test_id="106").status_code == 200  # rules are per test id
    assert sim.counts() == {"105": 3, "106": 1}


def test_rule_forever_and_in_order(make_sim: Any) -> None:
    sim = make_sim()
    sim.add_rule("105", 500, "<h1>boom</h1>", times=1)
    sim.add_rule("105", 502, times=None)
    codes = [call(sim).status_code for _ in range(4)]
    assert codes == [500, 502, 502, 502]


def test_rule_delay_is_real_and_stop_cuts_it_short(make_sim: Any) -> None:
    sim = make_sim()
    sim.add_rule("105", 200, delay=0.3)
    started = time.monotonic()
    assert call(sim).status_code == 200
    assert time.monotonic() - started >= 0.3

    sim.add_rule("105", 200, delay=30)
    outcome: list[object] = []
    worker = threading.Thread(target=lambda: outcome.append(_try_call(sim)))
    worker.start()
    while len(sim.requests) < 2:
        time.sleep(0.01)
    started = time.monotonic()
    sim.stop()
    worker.join(timeout=5)
    assert not worker.is_alive() and time.monotonic() - started < 2


def _try_call(sim: Simulator) -> object:
    try:
        return call(sim).status_code
    except requests.RequestException as exc:
        return exc


def test_latency_delays_answers(make_sim: Any) -> None:
    sim = make_sim(latency=0.2)
    started = time.monotonic()
    assert call(sim).status_code == 200
    assert time.monotonic() - started >= 0.2


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/tests/105"), ("POST", "/tests/105"), ("POST", "/tests/105/run/x"), ("POST", "")],
)
def test_unknown_path_is_404(make_sim: Any, method: str, path: str) -> None:
    response = call(make_sim(), method=method, path=path)
    assert response.status_code == 404
    assert response.headers["Content-Type"] == "application/problem+json"
    assert response.json()["title"] == "URI Resource Not Found"


def test_other_method_on_the_run_path_is_405(make_sim: Any) -> None:
    response = call(make_sim(), method="GET")
    assert response.status_code == 405
    assert response.headers["Allow"] == "POST"


def test_non_digit_test_id_is_404(make_sim: Any) -> None:
    response = call(make_sim(), test_id="abc")
    assert response.status_code == 404
    assert response.json()["detail"] == "No test with id 'abc'"


def test_stop_hangs_up_keep_alive_connections(make_sim: Any) -> None:
    sim = make_sim()
    with requests.Session() as session:
        url, headers = sim.url + "/tests/105/run", {"Authorization": f"Bearer {TOKEN}"}
        assert session.post(url, headers=headers, timeout=5).status_code == 200
        sim.stop()
        with pytest.raises(requests.ConnectionError):
            session.post(url, headers=headers, timeout=5)


def test_serve_forever_returns_on_stop() -> None:
    sim = Simulator(token=None)
    worker = threading.Thread(target=sim.serve_forever)
    worker.start()
    deadline = time.monotonic() + 5
    while sim.port == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert call(sim).status_code == 200
    sim.stop()
    worker.join(timeout=5)
    assert not worker.is_alive()


def test_serve_forever_after_start_waits_for_stop() -> None:
    sim = Simulator(token=None).start()
    worker = threading.Thread(target=sim.serve_forever)
    worker.start()
    assert call(sim).status_code == 200
    assert len(sim.requests) == 1  # one server loop, not two fighting over the socket
    sim.stop()
    worker.join(timeout=5)
    assert not worker.is_alive()
    with pytest.raises(requests.ConnectionError):
        call(sim)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"instant_limit": -1}, "rate limits must be 0 or more"),
        ({"window": 0}, "window must be more than 0"),
        ({"fail_rate": 1.5}, "fail rate must be between 0 and 1"),
        ({"latency": -1}, "latency must be 0 seconds or more"),
    ],
)
def test_bad_settings_are_usage_errors(options: dict[str, Any], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        Simulator(**options)


def test_port_in_use_is_a_usage_error(make_sim: Any) -> None:
    taken = make_sim()
    with pytest.raises(UsageError, match=f"cannot listen on 127.0.0.1:{taken.port}"):
        Simulator(port=taken.port).start()
