"""A simulated ThousandEyes API v7 (SPEC section 1) on loopback, for trying things out and tests.

``POST /v7/tests/{id}/run`` runs a test; ``GET /v7/tests`` and
``GET /v7/test-results/{id}/{endpoint}`` read types and rounds back (SPEC 7; what they answer
is :mod:`scheduler.api.simulated_results`: authenticated like a run call, counted against
the organization bucket only, 429 when it is exhausted). A run call is handled in this order:

1. routing: another path is 404 ``URI Resource Not Found``, another method on the run path 405;
2. a programmed rule for the test id (:meth:`Simulator.add_rule`) answers exactly as programmed:
   it bypasses authentication and the buckets and adds no rate-limit headers;
3. the test id must be digits, else 404; the bearer token must be present (and equal to
   ``token`` when one is set), else 401 ``invalid_token``;
4. the call counts against both fixed-window buckets; when either is already exhausted the
   answer is 429. Windows open with the first call after the previous one expired and read
   the time through :mod:`scheduler.clock`, so a ``FakeClock`` drives them in tests;
5. ``fail_rate`` of the remaining calls get a 500 or 502; the rest get 200 with an empty body.

Answers from steps 4 and 5 carry both ``X-*-Rate-Limit-*`` header sets; 401/404/405 carry none,
since an unauthenticated call cannot be attributed to an organization. ``latency`` (every answer
but a rule's) and a rule's ``delay`` are real sleeps, not clock time: a slow socket is what they
simulate. :meth:`stop` cuts them short.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import random
import re
import signal
import socket
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from scheduler import clock
from scheduler.api.simulated_results import Rounds
from scheduler.errors import UsageError

log = logging.getLogger(__name__)

RUN_PATH = re.compile(r"^/v7/tests/(?P<id>[^/]+)/run/?$")
TESTS_PATH = re.compile(r"^/v7/tests/?$")
RESULTS_PATH = re.compile(r"^/v7/test-results/(?P<id>[0-9]+)/(?P<endpoint>[a-z-]+)/?$")
BODY_CAP = 1024 * 1024  # request bytes read; the real API takes no body at all
HEADER_PREFIXES = {
    "organization": "X-Organization-Rate-Limit",
    "instant-test": "X-Instant-Test-Rate-Limit",
}


@dataclass
class ReceivedRequest:
    """One request as the simulator saw it (``path`` is raw: still percent-encoded)."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    received_at: float  # clock.epoch()

    def header(self, name: str) -> str | None:
        """A header value by case-insensitive name."""
        return next((v for k, v in self.headers.items() if k.lower() == name.lower()), None)


@dataclass
class _Rule:
    status: int
    body: bytes
    headers: dict[str, str]
    delay: float
    times: int | None


@dataclass
class _Answer:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


@dataclass
class _Bucket:
    """A fixed window: opens with the first call after the previous one expired."""

    limit: int
    window: float
    start: float | None = None
    used: int = 0

    def take(self, now: float) -> bool:
        """Count one call at ``now``; False when the window was already exhausted."""
        if self.start is None or now >= self.start + self.window:
            self.start, self.used = now, 0
        allowed = self.used < self.limit
        self.used += 1
        return allowed

    def headers(self, prefix: str) -> dict[str, str]:
        end = math.ceil((self.start or 0.0) + self.window)
        return {
            f"{prefix}-Limit": str(self.limit),
            f"{prefix}-Remaining": str(max(0, self.limit - self.used)),
            f"{prefix}-Reset": str(end),
        }


def _problem(status: int, title: str, detail: str | None = None, instance: str = "/v7") -> _Answer:
    doc: dict[str, Any] = {"type": "about:blank", "title": title, "status": status}
    if detail:
        doc["detail"] = detail
    doc["instance"] = instance
    return _json_answer(status, doc)


def _json_answer(status: int, doc: dict[str, Any]) -> _Answer:
    body = json.dumps(doc).encode()
    return _Answer(status, body, {"Content-Type": "application/problem+json"})


class Simulator:
    """The simulated API server; :meth:`start` for a background thread, or :meth:`serve_forever`."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        org_limit: int = 240,
        instant_limit: int = 24,
        window: float = 60.0,
        fail_rate: float = 0.0,
        latency: float = 0.0,
        seed: int | None = None,
        agents: int = 3,
        results_delay: float = 5.0,
    ) -> None:
        _check_settings(org_limit, instant_limit, window, fail_rate, latency)
        if agents < 0 or not results_delay >= 0:
            raise UsageError("simulator agents and results delay must be 0 or more")
        self.rounds = Rounds(agents, results_delay, fail_rate)
        self.host, self.port, self.token = host, port, token
        self.fail_rate, self.latency = fail_rate, latency
        self.requests: list[ReceivedRequest] = []
        self._buckets = {
            "organization": _Bucket(org_limit, window),
            "instant-test": _Bucket(instant_limit, window),
        }
        self._rules: dict[str, list[_Rule]] = {}
        self._counts: Counter[str] = Counter()
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._serving_thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The base URL, like ``http://127.0.0.1:PORT/v7`` (valid once the socket is bound)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v7"

    def start(self) -> Simulator:
        """Serve in a daemon thread and return self."""
        self._bind()
        self._thread = threading.Thread(target=self._serve, name="te-simulator", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until :meth:`stop` or Ctrl-C; after :meth:`start`, just wait.

        On the main thread SIGINT is made to raise KeyboardInterrupt first: a process started
        from a script (``cmd &`` in a non-interactive shell) inherits SIGINT ignored, and
        Ctrl-C or ``kill -INT`` would then never stop it.
        """
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.default_int_handler)
        if self._thread is not None and self._thread.is_alive():
            try:
                while not self._stopping.wait(0.5):
                    pass
            except KeyboardInterrupt:
                self.stop()
            return
        self._bind()
        try:
            self._serve()
        except KeyboardInterrupt:
            log.debug("Simulator interrupted")
        finally:
            self._close()

    def stop(self) -> None:
        """Stop serving, wake sleeping handlers and close the socket; safe from a signal handler."""
        self._stopping.set()
        server = self._server
        if server is None:
            return
        if threading.current_thread() is self._serving_thread:
            # shutdown() waits for the serve loop, which is this very thread: ask from another.
            threading.Thread(target=server.shutdown, daemon=True).start()
            return
        server.shutdown()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self._close()

    def add_rule(
        self,
        test_id: str,
        status: int,
        body: bytes | str = b"",
        headers: dict[str, str] | None = None,
        delay: float = 0.0,
        times: int | None = 1,
    ) -> None:
        """Answer the next ``times`` calls for ``test_id`` (None: all of them) as given."""
        data = body.encode() if isinstance(body, str) else body
        rule = _Rule(status, data, dict(headers or {}), delay, times)
        with self._lock:
            self._rules.setdefault(str(test_id), []).append(rule)

    def counts(self) -> dict[str, int]:
        """Run calls received so far, per test id."""
        with self._lock:
            return dict(self._counts)

    # -- serving -----------------------------------------------------------------------------

    def _bind(self) -> None:
        if self._server is not None:
            return
        server_class = _IPv6Server if ":" in self.host else _Server
        try:
            self._server = server_class((self.host, self.port), _Handler)
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            where = f"{self.host}:{self.port}"
            raise UsageError(f"simulator cannot listen on {where}: {reason}") from exc
        self._server.simulator = self
        self.port = self._server.server_address[1]
        self._stopping.clear()
        log.info("Simulated ThousandEyes API listening on %s", self.url)

    def _serve(self) -> None:
        assert self._server is not None
        self._serving_thread = threading.current_thread()
        self._server.serve_forever(poll_interval=0.05)  # also how fast stop() returns

    def _close(self) -> None:
        with self._lock:
            server, self._server = self._server, None
        if server is not None:
            server.server_close()
            server.drop_connections()  # else pooled keep-alive clients would still be answered

    # -- the API's logic ---------------------------------------------------------------------

    def _answer(self, request: ReceivedRequest) -> _Answer:
        """Record ``request`` and decide its answer (steps 1-5 of the module docstring)."""
        with self._lock:
            self.requests.append(request)
        read = self._read_answer(request)
        if read is not None:
            read.delay = self.latency
            return read
        match = RUN_PATH.match(request.path)
        test_id = unquote(match["id"]) if match else None
        if test_id is not None and request.method == "POST":
            self.rounds.seen(test_id)
            with self._lock:
                self._counts[test_id] += 1
                rule = self._next_rule(test_id)
            if rule is not None:
                return _rule_answer(rule)
        answer = self._decide(request, test_id)
        answer.delay = self.latency
        return answer

    def _decide(self, request: ReceivedRequest, test_id: str | None) -> _Answer:
        if test_id is None:
            return _problem(404, "URI Resource Not Found", instance=request.path)
        if request.method != "POST":
            answer = _problem(405, "Method Not Allowed", f"{request.method} is not supported")
            answer.headers["Allow"] = "POST"
            return answer
        if not test_id.isdigit():
            return _problem(404, "URI Resource Not Found", f"No test with id {test_id!r}")
        if not self._is_authorized(request.header("Authorization")):
            description = "Invalid access token"
            answer = _json_answer(401, {"error": "invalid_token", "error_description": description})
            answer.headers["WWW-Authenticate"] = 'Bearer error="invalid_token"'
            return answer
        answer = self._counted_answer(request.received_at)
        if answer.status == 200:
            self.rounds.accepted(test_id, request.received_at)
        return answer

    def _read_answer(self, request: ReceivedRequest) -> _Answer | None:
        """The answer to a results read (SPEC 7), or None when the path is not one."""
        results = RESULTS_PATH.match(request.path)
        if results is None and not TESTS_PATH.match(request.path):
            return None
        if request.method not in ("GET", "HEAD"):
            answer = _problem(405, "Method Not Allowed", f"{request.method} is not supported")
            answer.headers["Allow"] = "GET"
            return answer
        if not self._is_authorized(request.header("Authorization")):
            answer = _json_answer(401, {"error": "invalid_token", "error_description": "Invalid"})
            answer.headers["WWW-Authenticate"] = 'Bearer error="invalid_token"'
            return answer
        org = self._buckets["organization"]
        with self._lock:
            allowed = org.take(request.received_at)
            headers = org.headers(HEADER_PREFIXES["organization"])
        if not allowed:
            answer = _problem(429, "Too Many Requests", "Exhausted rate limit for the organization")
        elif results is None:
            answer = _json_answer(200, self.rounds.tests(self.url))
        else:
            status, doc = self.rounds.page(
                self.url, results["id"], results["endpoint"], request.query, request.received_at
            )
            answer = _json_answer(status, doc if status == 200 else {"status": status, **doc})
        if answer.status == 200:
            answer.headers["Content-Type"] = "application/hal+json"
        answer.headers.update(headers)
        return answer

    def _next_rule(self, test_id: str) -> _Rule | None:
        rules = self._rules.get(test_id)
        if not rules:
            return None
        rule = rules[0]
        if rule.times is not None:
            rule.times -= 1
            if rule.times <= 0:
                rules.pop(0)
        return rule

    def _is_authorized(self, header: str | None) -> bool:
        scheme, _, token = (header or "").strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return False
        return self.token is None or hmac.compare_digest(token.encode(), self.token.encode())

    def _counted_answer(self, now: float) -> _Answer:
        with self._lock:
            allowed = [bucket.take(now) for bucket in self._buckets.values()]
            headers: dict[str, str] = {}
            for name, bucket in self._buckets.items():
                headers.update(bucket.headers(HEADER_PREFIXES[name]))
            failed = all(allowed) and self._random.random() < self.fail_rate
            failure = self._random.choice((500, 502)) if failed else None
        if not all(allowed):
            exhausted = {name for name, ok in zip(self._buckets, allowed, strict=True) if not ok}
            which = "the organization" if "organization" in exhausted else "instant tests"
            answer = _problem(429, "Too Many Requests", f"Exhausted rate limit for {which}")
        elif failure == 500:
            answer = _problem(500, "Internal Server Error", "Simulated failure")
        elif failure == 502:
            answer = _problem(502, "Bad Gateway", "Simulated failure")
        else:
            answer = _Answer(200)
        answer.headers.update(headers)
        return answer


def _rule_answer(rule: _Rule) -> _Answer:
    headers = {k: v for k, v in rule.headers.items() if k.lower() != "content-length"}
    if rule.body and not any(k.lower() == "content-type" for k in headers):
        headers["Content-Type"] = _guess_type(rule.body)
    return _Answer(rule.status, rule.body, headers, rule.delay)


def _guess_type(body: bytes) -> str:
    try:
        json.loads(body)
    except ValueError:
        return "text/plain; charset=utf-8"
    return "application/problem+json"


def _check_settings(
    org_limit: int, instant_limit: int, window: float, fail_rate: float, latency: float
) -> None:
    """Reject settings that make no sense, with a one-line message."""
    if org_limit < 0 or instant_limit < 0:
        raise UsageError("simulator rate limits must be 0 or more calls per window")
    if not window > 0:
        raise UsageError("simulator window must be more than 0 seconds")
    if not 0.0 <= fail_rate <= 1.0:
        raise UsageError("simulator fail rate must be between 0 and 1")
    if not latency >= 0:
        raise UsageError("simulator latency must be 0 seconds or more")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    simulator: Simulator

    def server_activate(self) -> None:
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().server_activate()

    def drop_connections(self) -> None:
        """Hang up every open client connection."""
        with self.connections_lock:
            open_now = list(self.connections)
        for conn in open_now:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client hanging up mid-answer is normal here (capped reads, timeouts): no traceback."""
        log.debug("Simulator connection from %s ended with an error", client_address, exc_info=True)


class _IPv6Server(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the real API, so pooling is exercised
    timeout = 30  # idle keep-alive connections end instead of holding a thread forever
    server: _Server

    def setup(self) -> None:
        super().setup()
        with self.server.connections_lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        with self.server.connections_lock:
            self.server.connections.discard(self.connection)
        super().finish()

    def do_POST(self) -> None:
        self._handle()

    do_GET = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = do_POST

    def _handle(self) -> None:
        simulator = self.server.simulator
        request = self._received()
        answer = simulator._answer(request)
        if answer.delay > 0:
            simulator._stopping.wait(answer.delay)
        self._write(answer)
        log.debug("Simulator: %s %s -> %d", request.method, self.path, answer.status)

    def _received(self) -> ReceivedRequest:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(min(max(0, length), BODY_CAP)) if length else b""
        parts = urlsplit(self.path)
        return ReceivedRequest(
            method=self.command,
            path=parts.path,
            query=parse_qs(parts.query, keep_blank_values=True),
            headers=dict(self.headers.items()),
            body=body,
            received_at=clock.epoch(),
        )

    def _write(self, answer: _Answer) -> None:
        self.send_response(answer.status)
        for name, value in answer.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(answer.body)))
        self.end_headers()
        if self.command != "HEAD":
            view = memoryview(answer.body)
            for offset in range(0, len(view), 64 * 1024):
                self.wfile.write(view[offset : offset + 64 * 1024])

    def log_message(self, format: str, *args: Any) -> None:
        """Silence http.server's per-request stderr lines; :meth:`_handle` logs at debug."""
