"""The caller against real loopback servers: the exact request, and every answer as data."""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from scheduler import __version__, clock
from scheduler.api.client import (
    Caller,
    CallResult,
    RateLimitBucket,
    build_session,
    parse_buckets,
    run_url,
)
from scheduler.api.simulator import Simulator
from scheduler.config import ApiConfig

TOKEN = "tok-8f1c2d9e0a"
START = datetime(2026, 1, 1, tzinfo=timezone.utc)  # 1767225600


@pytest.fixture
def fake_clock() -> Iterator[clock.FakeClock]:
    fake = clock.FakeClock(START)
    previous = clock.set_clock(fake)
    yield fake
    clock.set_clock(previous)


@pytest.fixture
def sim() -> Iterator[Simulator]:
    simulator = Simulator(token=TOKEN).start()
    yield simulator
    simulator.stop()


@pytest.fixture(autouse=True)
def no_env_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loopback tests must not use a proxy or CA bundle the CI machine happens to set."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)


def make_caller(base_url: str, token: str = TOKEN, **api: Any) -> Caller:
    api.setdefault("timeout", 5.0)
    return Caller(ApiConfig(base_url=base_url, **api), token)


def send(base_url: str, test_id: str = "105", aid: str | None = None, **api: Any) -> CallResult:
    caller = make_caller(base_url, **api)
    try:
        return caller.send(test_id, aid)
    finally:
        caller.close()


class ScriptedServer:
    """A tiny stdlib server whose handler function writes the raw answer itself."""

    def __init__(self, handle: Any, tls: tuple[str, str] | None = None) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                handle(self, outer)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.release = threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.handle_error = lambda *args: None  # type: ignore[method-assign]
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v7"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


class RawServer:
    """Records the exact bytes of every request head; answers 200 (a CONNECT: 403 and hangs up).

    Plays the API for byte-level checks and an HTTP proxy for the environment's proxy settings.
    """

    OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"

    def __init__(self, answer: bytes = OK) -> None:
        self.answer = answer
        self.heads: list[bytes] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._serve, daemon=True).start()

    def lines(self) -> list[str]:
        """The request lines received, in order."""
        return [head.split(b"\r\n", 1)[0].decode() for head in self.heads]

    def close(self) -> None:
        self.sock.close()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._talk, args=(conn,), daemon=True).start()

    def _talk(self, conn: socket.socket) -> None:
        buffer = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")  # no body: Content-Length 0
                self.heads.append(head)
                if head.startswith(b"CONNECT "):
                    conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                    return
                conn.sendall(self.answer)


@pytest.fixture
def raw() -> Iterator[RawServer]:
    server = RawServer()
    yield server
    server.close()


# -- the request -------------------------------------------------------------------------------

# What thousandeyes-sdk-instant-tests 6.0.0 sends for run_instant_test("105", aid="1234")
# (shared/reference/thousandeyes-api.md, section 1): te-scheduler must send the same.
SDK_REQUEST = {
    "method": "POST",
    "path": "/v7/tests/105/run",
    "query": {"aid": ["1234"]},
    "Accept": "application/json",
    "Authorization": f"Bearer {TOKEN}",
}


def test_request_is_exactly_spec_section_1(sim: Simulator) -> None:
    result = send(sim.url, "105", "1234")
    assert result.outcome == "success"
    [got] = sim.requests
    assert {
        "method": got.method,
        "path": got.path,
        "query": got.query,
        "Accept": got.header("Accept"),
        "Authorization": got.header("Authorization"),
    } == SDK_REQUEST
    assert got.header("User-Agent") == f"te-scheduler/{__version__}"
    assert got.header("Content-Length") == "0"
    assert got.header("Content-Type") is None
    assert got.header("Transfer-Encoding") is None
    assert got.body == b""


def test_request_bytes_are_the_same_on_every_call(raw: RawServer) -> None:
    # Pinned from the caller as it was before requests were prepared once per URL: the reuse
    # must not change a byte, on the first call or any later one.
    expected = (
        "POST /v7/tests/105/run?aid=1234 HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{raw.port}\r\n"
        f"User-Agent: te-scheduler/{__version__}\r\n"
        "Accept-Encoding: gzip, deflate\r\n"
        "Accept: application/json\r\n"
        "Connection: keep-alive\r\n"
        "Content-Length: 0\r\n"
        f"Authorization: Bearer {TOKEN}"
    ).encode()
    caller = make_caller(raw.url + "/v7")
    try:
        outcomes = [caller.send("105", "1234").outcome for _ in range(3)]
        outcomes.append(caller.send("a b", None).outcome)
    finally:
        caller.close()
    assert outcomes == ["success"] * 4
    assert raw.heads[:3] == [expected] * 3
    assert raw.heads[3] == expected.replace(b"105/run?aid=1234", b"a%20b/run")


def test_cookies_the_server_sets_are_sent_back_as_requests_does() -> None:
    answer = b"HTTP/1.1 200 OK\r\nSet-Cookie: lb=node7; Path=/\r\nContent-Length: 0\r\n\r\n"
    server = RawServer(answer)
    caller = make_caller(server.url + "/v7")
    try:
        for _ in range(3):
            assert caller.send("105", None).outcome == "success"
    finally:
        caller.close()
        server.close()
    cookies = [
        [line for line in head.split(b"\r\n") if line.startswith(b"Cookie:")]
        for head in server.heads
    ]
    assert cookies == [[], [b"Cookie: lb=node7"], [b"Cookie: lb=node7"]]


def test_no_aid_means_no_query(sim: Simulator) -> None:
    send(sim.url, "105", None)
    assert sim.requests[0].query == {}


def test_run_url_percent_encodes_like_the_sdk() -> None:
    assert run_url("https://api.example/v7", "105", None) == "https://api.example/v7/tests/105/run"
    assert run_url("https://api.example/v7/", "105", "1234") == (
        "https://api.example/v7/tests/105/run?aid=1234"
    )
    assert run_url("https://api.example/v7", "a/b c", None) == (
        "https://api.example/v7/tests/a%2Fb%20c/run"
    )
    assert run_url("https://api.example/v7", "?#&", "1 2") == (
        "https://api.example/v7/tests/%3F%23%26/run?aid=1+2"
    )


def test_odd_id_reaches_the_server_as_one_encoded_segment(sim: Simulator) -> None:
    result = send(sim.url, "a/b c")
    assert sim.requests[0].path == "/v7/tests/a%2Fb%20c/run"
    assert (result.status_code, result.outcome) == (404, "http_error")
    assert result.error == "URI Resource Not Found: No test with id 'a/b c'"


def test_netrc_cannot_replace_the_bearer_token(
    sim: Simulator, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login someone password secret\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    assert send(sim.url).outcome == "success"
    assert sim.requests[0].header("Authorization") == f"Bearer {TOKEN}"


# -- answers -----------------------------------------------------------------------------------


def test_200_reports_both_buckets(sim: Simulator, fake_clock: clock.FakeClock) -> None:
    result = send(sim.url)
    assert (result.status_code, result.outcome, result.error) == (200, "success", None)
    assert result.buckets == (
        RateLimitBucket("organization", 240, 239, 1767225660.0),
        RateLimitBucket("instant-test", 24, 23, 1767225660.0),
    )
    assert not result.is_retryable
    assert 0 <= result.duration_ms < 5000


def test_401_reads_the_oauth_error_shape(sim: Simulator) -> None:
    result = make_caller(sim.url, token="wrong-token").send("105", None)
    assert (result.status_code, result.outcome) == (401, "http_error")
    assert result.error == "invalid_token: Invalid access token"
    assert not result.is_retryable


@pytest.mark.parametrize(
    ("status", "title", "retryable"),
    [
        (403, "Forbidden", False),
        (404, "Not Found", False),
        (500, "Internal Server Error", True),
        (502, "Bad Gateway", True),
    ],
)
def test_problem_json_becomes_title_and_detail(
    sim: Simulator, status: int, title: str, retryable: bool
) -> None:
    body = {"type": "about:blank", "title": title, "status": status, "detail": "Went  wrong"}
    sim.add_rule("105", status, json.dumps(body))
    result = send(sim.url)
    assert (result.status_code, result.outcome) == (status, "http_error")
    assert result.error == f"{title}: Went wrong"
    assert result.is_retryable is retryable


def test_429_is_rate_limited_with_headers(sim: Simulator) -> None:
    headers = {
        "X-Organization-Rate-Limit-Limit": "240",
        "X-Organization-Rate-Limit-Remaining": "17",
        "X-Organization-Rate-Limit-Reset": "1767225660",
        "X-Instant-Test-Rate-Limit-Limit": "24",
        "X-Instant-Test-Rate-Limit-Remaining": "0",
        "X-Instant-Test-Rate-Limit-Reset": "1767225690",
    }
    body = '{"title": "Too Many Requests", "detail": "Exhausted rate limit for the organization"}'
    sim.add_rule("105", 429, body, headers)
    result = send(sim.url)
    assert (result.status_code, result.outcome) == (429, "rate_limited")
    assert result.error == "Too Many Requests: Exhausted rate limit for the organization"
    assert result.buckets == (
        RateLimitBucket("organization", 240, 17, 1767225660.0),
        RateLimitBucket("instant-test", 24, 0, 1767225690.0),
    )
    assert not result.is_retryable  # the runner waits for Reset instead


def test_html_error_page_is_reduced_to_text(sim: Simulator) -> None:
    page = (
        "<html><head><title>502 Bad Gateway</title><style>body {color: red}</style></head>"
        "<body>\n  <h1>502   Bad Gateway</h1>\n<hr><center>nginx &amp; friends</center>"
        + "<p>filler</p>" * 100
        + "</body></html>"
    )
    sim.add_rule("105", 502, page, {"Content-Type": "text/html"})
    result = send(sim.url)
    assert (result.status_code, result.outcome, result.is_retryable) == (502, "http_error", True)
    assert result.error is not None
    assert result.error.startswith("502 Bad Gateway 502 Bad Gateway nginx & friends filler")
    assert "<" not in result.error and "color" not in result.error
    assert len(result.error) <= 200


def test_invalid_json_is_quoted_as_text(sim: Simulator) -> None:
    sim.add_rule("105", 500, '{"title": "Oops', {"Content-Type": "application/problem+json"})
    result = send(sim.url)
    assert result.error == '{"title": "Oops'


def test_empty_error_body_gives_the_status_line(sim: Simulator) -> None:
    sim.add_rule("105", 503)
    assert send(sim.url).error == "HTTP 503 Service Unavailable"


def test_redirect_is_not_followed(sim: Simulator) -> None:
    sim.add_rule("105", 302, headers={"Location": "http://elsewhere.invalid/v7/tests/105/run"})
    result = send(sim.url)
    assert (result.status_code, result.outcome) == (302, "http_error")
    assert result.error == (
        "HTTP 302 Found: redirect to http://elsewhere.invalid/v7/tests/105/run not followed"
    )
    assert len(sim.requests) == 1


def test_ten_megabyte_body_is_read_capped(sim: Simulator) -> None:
    sim.add_rule("105", 500, b"x" * 10_000_000, {"Content-Type": "text/plain"})
    started = time.monotonic()
    result = send(sim.url)
    assert time.monotonic() - started < 2.0
    assert result.status_code == 500
    assert result.error == "x" * 197 + "..."


def test_body_beyond_the_cap_is_never_waited_for() -> None:
    def huge_then_stall(handler: BaseHTTPRequestHandler, server: ScriptedServer) -> None:
        handler.send_response(500)
        handler.send_header("Content-Length", str(10_000_000))
        handler.end_headers()
        handler.wfile.write(b"y" * 100_000)  # then nothing more until the test ends
        handler.wfile.flush()
        server.release.wait(10)

    server = ScriptedServer(huge_then_stall)
    try:
        started = time.monotonic()
        result = send(server.url, timeout=5.0)
        elapsed = time.monotonic() - started
    finally:
        server.close()
    assert (result.status_code, result.outcome) == (500, "http_error")
    assert elapsed < 2.0  # reading the whole body would stall until the 5 s read timeout


def test_bad_reset_headers_become_none(sim: Simulator) -> None:
    headers = {
        "X-Organization-Rate-Limit-Limit": "abc",
        "X-Organization-Rate-Limit-Remaining": "",
        "X-Organization-Rate-Limit-Reset": "abc",
        "X-Instant-Test-Rate-Limit-Reset": "1000",  # long past: kept, the runner waits 0
    }
    sim.add_rule("105", 200, headers=headers)
    result = send(sim.url)
    assert result.buckets == (
        RateLimitBucket("organization", None, None, None),
        RateLimitBucket("instant-test", None, None, 1000.0),
    )


@pytest.mark.parametrize(
    ("raw", "count", "number"),
    [
        ("1700000000", 1700000000, 1700000000.0),
        ("1700000000.0", None, 1700000000.0),  # a count is plain digits
        (" 1700000000 ", 1700000000, 1700000000.0),
        ("-5", None, None),
        ("", None, None),
        ("abc", None, None),
        ("nan", None, None),
        ("inf", None, None),
        ("1_000", None, None),  # float() and int() would take these four
        ("1e308", None, None),
        ("+5", None, None),
        ("\u0661\u0662", None, None),  # Arabic-Indic digits
        ("1" * 309, None, None),
    ],
)
def test_parse_buckets_is_robust(raw: str, count: int | None, number: float | None) -> None:
    headers = {
        "X-Instant-Test-Rate-Limit-Limit": raw,
        "X-Instant-Test-Rate-Limit-Remaining": raw,
        "X-Instant-Test-Rate-Limit-Reset": raw,
    }
    assert parse_buckets(headers) == (RateLimitBucket("instant-test", count, count, number),)


def test_a_limit_of_zero_is_ignored_but_nothing_remaining_is_kept() -> None:
    headers = {
        "X-Instant-Test-Rate-Limit-Limit": "0",
        "X-Instant-Test-Rate-Limit-Remaining": "0",
        "X-Instant-Test-Rate-Limit-Reset": "1700000000",
    }
    assert parse_buckets(headers) == (RateLimitBucket("instant-test", None, 0, 1700000000.0),)


def test_no_rate_limit_headers_no_buckets() -> None:
    assert parse_buckets({"Content-Length": "0"}) == ()


# -- failures without a response ---------------------------------------------------------------


def test_slow_server_is_a_timeout(sim: Simulator) -> None:
    sim.add_rule("105", 200, delay=3.0)
    result = send(sim.url, timeout=0.3)
    assert (result.status_code, result.outcome, result.buckets) == (None, "timeout", ())
    assert result.error is not None and result.error.startswith("ReadTimeout: ")
    assert 250 <= result.duration_ms < 2000
    assert result.is_retryable


def test_refused_connection_is_a_network_error() -> None:
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        port = placeholder.getsockname()[1]
        result = send(f"http://127.0.0.1:{port}/v7")
    assert (result.status_code, result.outcome) == (None, "network_error")
    assert result.error is not None and result.error.startswith("ConnectionError: ")
    assert "Connection refused" in result.error
    assert result.is_retryable


def test_non_requests_exception_is_data_not_a_crash(sim: Simulator) -> None:
    token = "tok-\u20ac-secret"  # http.client cannot encode it: UnicodeEncodeError, not requests'
    result = make_caller(sim.url, token=token).send("105", None)
    assert (result.status_code, result.outcome) == (None, "network_error")
    assert result.error is not None and result.error.startswith("UnicodeEncodeError: ")
    assert token not in result.error


def test_token_echoed_by_the_server_is_redacted() -> None:
    def echo(handler: BaseHTTPRequestHandler, server: ScriptedServer) -> None:
        said = handler.headers.get("Authorization", "")
        body = json.dumps({"title": "Bad Request", "detail": f"rejected header {said}"}).encode()
        handler.send_response(400)
        handler.send_header("Content-Type", "application/problem+json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    server = ScriptedServer(echo)
    try:
        result = send(server.url)
    finally:
        server.close()
    assert result.error == "Bad Request: rejected header Bearer ***"


def test_a_short_token_is_redacted_as_a_word_only() -> None:
    # A test token like "abc" must not turn "abc-checks" into "***-checks" in the error column.
    def echo(handler: BaseHTTPRequestHandler, server: ScriptedServer) -> None:
        said = handler.headers.get("Authorization", "")
        body = f"test abc-checks rejected {said}".encode()
        handler.send_response(403)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    server = ScriptedServer(echo)
    try:
        result = make_caller(server.url, token="abc").send("105", None)
    finally:
        server.close()
    assert result.error is not None
    assert "abc-checks rejected Bearer ***" in result.error, result.error


# -- the session -------------------------------------------------------------------------------


def test_build_session_pools_without_retries() -> None:
    api = ApiConfig(concurrency=3, verify_tls=False, proxy="http://proxy.invalid:3128")
    session = build_session(api)
    adapter = session.get_adapter("https://api.thousandeyes.com/v7")
    assert adapter.max_retries.total == 0  # type: ignore[attr-defined]
    assert adapter.poolmanager.connection_pool_kw["maxsize"] == 3  # type: ignore[attr-defined]
    assert session.verify is False
    assert session.proxies == {"http": api.proxy, "https": api.proxy}
    assert session.headers["Accept"] == "application/json"
    assert session.headers["User-Agent"] == f"te-scheduler/{__version__}"
    session.close()


def test_server_error_is_not_retried_by_the_transport(sim: Simulator) -> None:
    sim.add_rule("105", 502, times=None)
    assert send(sim.url).status_code == 502
    assert len(sim.requests) == 1


def test_environment_proxy_applies_when_none_configured(
    sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTP_PROXY", sim.url.removesuffix("/v7"))  # the simulator plays proxy
    result = send("http://api.te.invalid/v7")
    assert result.outcome == "success"
    assert sim.requests[0].header("Host") == "api.te.invalid"


def test_configured_proxy_wins_over_the_environment(
    sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # nothing there
    result = send("http://api.te.invalid/v7", proxy=sim.url.removesuffix("/v7"))
    assert result.outcome == "success"
    assert sim.requests[0].header("Host") == "api.te.invalid"


# -- the environment, read once when the caller is built ---------------------------------------


@pytest.mark.parametrize(
    ("no_proxy", "host", "via_proxy"),
    [
        (None, "127.0.0.1", True),
        ("127.0.0.1", "127.0.0.1", False),
        ("example.com, 127.0.0.0/8", "127.0.0.1", False),  # CIDR, spaces: requests' parsing
        ("example.com", "127.0.0.1", True),
        (".localhost", "localhost", False),  # a domain suffix
        ("other.localhost", "localhost", True),
    ],
)
def test_http_proxy_and_no_proxy_from_the_environment(
    sim: Simulator,
    raw: RawServer,
    monkeypatch: pytest.MonkeyPatch,
    no_proxy: str | None,
    host: str,
    via_proxy: bool,
) -> None:
    monkeypatch.setenv("HTTP_PROXY", raw.url)  # raw plays the proxy and answers 200 itself
    if no_proxy is not None:
        monkeypatch.setenv("NO_PROXY", no_proxy)
    base = f"http://{host}:{sim.port}/v7"
    caller = make_caller(base)
    try:
        results = [caller.send("105", "1") for _ in range(2)]
    finally:
        caller.close()
    assert [r.outcome for r in results] == ["success", "success"]
    if via_proxy:
        assert raw.lines() == [f"POST {base}/tests/105/run?aid=1 HTTP/1.1"] * 2
        assert sim.requests == []
    else:
        assert raw.lines() == []
        assert [r.path for r in sim.requests] == ["/v7/tests/105/run"] * 2


def test_lowercase_no_proxy_wins_like_curl(
    sim: Simulator, raw: RawServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("http_proxy", raw.url)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "example.com")  # requests reads the lowercase one first
    assert send(sim.url).outcome == "success"
    assert raw.lines() == [f"POST {sim.url}/tests/105/run HTTP/1.1"]


def test_https_proxy_from_the_environment_is_tunnelled_through(
    raw: RawServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", raw.url)
    result = send("https://api.te.invalid/v7", timeout=2.0)
    assert raw.lines() == ["CONNECT api.te.invalid:443 HTTP/1.0"]  # http.client says 1.0
    assert (result.outcome, result.status_code) == ("network_error", None)
    assert result.error is not None and "403" in result.error


def test_environment_is_read_when_the_caller_is_built(
    sim: Simulator, raw: RawServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTP_PROXY", raw.url)
    caller = make_caller(sim.url)
    monkeypatch.delenv("HTTP_PROXY")  # a reload builds a new caller; a call does not re-read
    try:
        assert caller.send("105", None).outcome == "success"
    finally:
        caller.close()
    assert raw.lines() == [f"POST {sim.url}/tests/105/run HTTP/1.1"]
    assert sim.requests == []


@pytest.fixture(scope="module")
def tls_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A throwaway self-signed certificate for 127.0.0.1 and its key."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    where = tmp_path_factory.mktemp("tls")
    cert, key = str(where / "cert.pem"), str(where / "key.pem")
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            key,
            "-out",
            cert,
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.fixture
def tls_url(tls_pair: tuple[str, str]) -> Iterator[str]:
    """An HTTPS server on loopback answering 200, with the self-signed certificate."""

    def ok(handler: BaseHTTPRequestHandler, server: ScriptedServer) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    server = ScriptedServer(ok, tls=tls_pair)
    yield server.url.replace("http://", "https://")
    server.close()


@pytest.mark.parametrize(
    ("bundles", "outcome"),
    [
        ({}, "network_error"),  # the default trust store does not know the certificate
        ({"REQUESTS_CA_BUNDLE": "cert"}, "success"),
        ({"CURL_CA_BUNDLE": "cert"}, "success"),
        ({"REQUESTS_CA_BUNDLE": "cert", "CURL_CA_BUNDLE": "/nonexistent.pem"}, "success"),
    ],
)
def test_ca_bundle_from_the_environment_is_used_for_verification(
    tls_url: str,
    tls_pair: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
    bundles: dict[str, str],
    outcome: str,
) -> None:
    for name, value in bundles.items():
        monkeypatch.setenv(name, tls_pair[0] if value == "cert" else value)
    result = send(tls_url)
    assert result.outcome == outcome, result.error
    if outcome != "success":
        assert result.error is not None and "CERTIFICATE_VERIFY_FAILED" in result.error


def test_verify_tls_false_wins_over_a_ca_bundle_in_the_environment(
    tls_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # requests lets REQUESTS_CA_BUNDLE switch verification back on (psf/requests#3829); a
    # config that says `verify_tls: false` means it, whatever the environment holds.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/nonexistent.pem")
    result = send(tls_url, verify_tls=False)
    assert result.outcome == "success", result.error
