"""The waitress server at its socket: slow and idle clients, methods, headers, HEAD, stop."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests

from scheduler.metrics import Metrics
from scheduler.web.app import Router
from scheduler.web.server import MetricsServer

pytestmark = pytest.mark.slow

SLOW_CLIENTS = 300
IDLE_CLIENTS = 50
CHANNEL_TIMEOUT = 3  # seconds; the production default is 30


@pytest.fixture
def server() -> Iterator[MetricsServer]:
    """The real server on 127.0.0.1:0 with a short channel timeout and the default limits."""
    served = MetricsServer(
        Metrics(),
        ("127.0.0.1", 0),
        lambda: (True, {"scheduler": "running"}),
        channel_timeout=CHANNEL_TIMEOUT,
        cleanup_interval=1,
    ).start()
    yield served
    served.stop()


def base(server: MetricsServer) -> str:
    return f"http://127.0.0.1:{server.port}"


def still_open(sock: socket.socket) -> bool:
    """Whether the server has neither closed nor answered ``sock`` (nothing to read, no EOF)."""
    sock.setblocking(False)
    try:
        return not sock.recv(1)  # b"": closed; data: answered (neither should happen yet)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        sock.setblocking(True)


def wait_closed(sock: socket.socket, deadline: float) -> bool:
    """Whether the server closes ``sock`` before ``deadline`` (monotonic seconds)."""
    sock.settimeout(max(0.01, deadline - time.monotonic()))
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except OSError:  # timed out
        return False


def timed_get(url: str, **kwargs: Any) -> tuple[requests.Response, float]:
    started = time.monotonic()
    response = requests.get(url, timeout=5, **kwargs)
    return response, time.monotonic() - started


def test_slow_and_idle_clients_neither_starve_it_nor_stay(
    server: MetricsServer, capfd: pytest.CaptureFixture[str]
) -> None:
    port = server.port
    clients: list[socket.socket] = []
    started = time.monotonic()
    try:
        for _ in range(SLOW_CLIENTS):  # slowloris: a partial request line, then nothing
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x")
            clients.append(sock)
        for _ in range(IDLE_CLIENTS):  # connect and say nothing
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        opened = time.monotonic()
        # Accepting them is prompt: the thread-per-connection server took 53 s for these.
        assert opened - started < 3

        healthz, healthz_took = timed_get(f"{base(server)}/healthz")
        metrics, metrics_took = timed_get(f"{base(server)}/metrics")
        assert (healthz.status_code, healthz.json()) == (
            200,
            {"status": "ok", "scheduler": "running"},
        )
        assert metrics.status_code == 200 and "te_scheduler_build_info" in metrics.text
        assert healthz_took < 2 and metrics_took < 2, (healthz_took, metrics_took)
        # The probes ran while every slow and idle client was still connected.
        assert time.monotonic() - opened < CHANNEL_TIMEOUT
        assert all(still_open(sock) for sock in clients)

        # Half hang up on their own (the old server printed a traceback for each) ...
        for sock in clients[: SLOW_CLIENTS // 2]:
            sock.close()
        # ... the rest are closed by the server once silent for the channel timeout.
        deadline = opened + CHANNEL_TIMEOUT + 3
        rest = clients[SLOW_CLIENTS // 2 :]
        assert sum(wait_closed(sock, deadline) for sock in rest) == len(rest)
        assert time.monotonic() - opened >= CHANNEL_TIMEOUT - 0.5  # not before its time
        assert requests.get(f"{base(server)}/healthz", timeout=5).status_code == 200
    finally:
        for sock in clients:
            sock.close()
    server.stop()
    err = capfd.readouterr().err
    assert "Traceback" not in err and err == ""


def test_methods_paths_and_headers(server: MetricsServer) -> None:
    url = base(server)
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        response = requests.request(method, f"{url}/metrics", data=b"x", timeout=5)
        assert response.status_code == 405, method
        assert response.headers["Allow"] == "GET, HEAD"
    assert requests.post(f"{url}/healthz", timeout=5).status_code == 405
    for path in ("/", "/nope", "/metrics/", "/healthzz", "/jobs/x"):
        assert requests.get(f"{url}{path}", timeout=5).status_code == 404, path
    for path, status in (("/metrics", 200), ("/healthz", 200), ("/nope", 404)):
        response = requests.get(f"{url}{path}", timeout=5)
        assert response.status_code == status
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Cache-Control"] == "no-store"
    assert requests.post(f"{url}/x", timeout=5).headers["X-Content-Type-Options"] == "nosniff"


def test_head_answers_headers_only_and_keeps_the_connection_usable(
    server: MetricsServer,
) -> None:
    url = base(server)
    with requests.Session() as session:  # one keep-alive connection for all four
        got = session.get(f"{url}/healthz", timeout=5)
        head = session.head(f"{url}/healthz", timeout=5)
        assert head.status_code == 200 and head.content == b""
        assert head.headers["Content-Length"] == str(len(got.content))
        assert head.headers["X-Content-Type-Options"] == "nosniff"
        metrics_head = session.head(f"{url}/metrics", timeout=5)
        assert metrics_head.status_code == 200 and metrics_head.content == b""
        assert metrics_head.headers["Content-Type"].startswith("text/plain")
        # A stray body after a HEAD would be read as the start of this answer.
        assert session.get(f"{url}/healthz", timeout=5).json()["status"] == "ok"
        assert session.head(f"{url}/nope", timeout=5).status_code == 404


def test_a_hanging_health_check_runs_once_for_many_probes() -> None:
    calls: list[float] = []
    release = threading.Event()

    def hang() -> tuple[bool, dict[str, str]]:
        calls.append(time.monotonic())
        release.wait(10)
        return True, {}

    server = MetricsServer(Metrics(), ("127.0.0.1", 0), hang, health_timeout=0.5).start()
    try:
        url = f"{base(server)}/healthz"
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda _: requests.get(url, timeout=5), range(6)))
        assert {(a.status_code, a.json()["health"]) for a in answers} == {
            (503, "check took over 0.5s")
        }
        assert len(calls) == 1  # six probes, one stuck thread
        release.set()
        time.sleep(0.05)  # let the released check finish
        assert requests.get(url, timeout=5).status_code == 200
        assert len(calls) == 2  # a finished check is never reused
    finally:
        release.set()
        server.stop()


def test_stop_is_prompt_with_clients_connected(capfd: pytest.CaptureFixture[str]) -> None:
    server = MetricsServer(Metrics(), ("127.0.0.1", 0), lambda: (True, {})).start()
    port = server.port
    clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(20)]
    clients[0].sendall(b"GET /metr")
    try:
        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < 1.5
        assert all(wait_closed(sock, time.monotonic() + 1) for sock in clients)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        for sock in clients:
            sock.close()
    assert capfd.readouterr().err == ""


# -- the router alone, as a WSGI callable ---------------------------------------------------


def call(app: Router, method: str, path: str) -> tuple[str, dict[str, str], bytes]:
    answer: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        answer.update(status=status, headers=dict(headers))
        return lambda data: None

    body = b"".join(app({"REQUEST_METHOD": method, "PATH_INFO": path}, start_response))
    return answer["status"], answer["headers"], body


def echo_fields(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [repr(environ["wsgiorg.routing_args"][1]).encode()]


def test_router_patterns_take_one_segment_per_field() -> None:
    app = Router([("/jobs/{name}", echo_fields), ("/api/v1/jobs/{name}/attempts", echo_fields)])
    assert call(app, "GET", "/jobs/nightly")[2] == b"{'name': 'nightly'}"
    assert call(app, "GET", "/api/v1/jobs/web/attempts")[2] == b"{'name': 'web'}"
    assert call(app, "GET", "/jobs/a/b")[0].startswith("404")
    assert call(app, "GET", "/jobs/")[0].startswith("404")
    status, headers, body = call(app, "HEAD", "/jobs/x")
    assert (status, body, headers["Content-Length"]) == ("200 OK", b"", str(len("{'name': 'x'}")))


def test_a_route_that_raises_is_a_500_in_one_log_line(caplog: pytest.LogCaptureFixture) -> None:
    def broken(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        raise RuntimeError("no database")

    status, headers, body = call(Router([("/", broken)]), "GET", "/")
    assert status == "500 Internal Server Error" and body == b"internal error\n"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert [r.getMessage() for r in caplog.records] == [
        "Serving GET '/' failed: RuntimeError('no database')"
    ]
    assert caplog.records[0].exc_info is None
