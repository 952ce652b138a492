"""Serves the WSGI app on ``metrics.listen`` with waitress: bounded threads, connections, timeouts.

Waitress rather than cheroot: it is pure Python and widely deployed, and its asyncore-style
channels read every request in one loop before a bounded pool of threads runs the app, so an
idle or slow client costs a socket until ``channel_timeout``, never a thread.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry
from waitress import wasyncore
from waitress.server import BaseWSGIServer, create_server

from scheduler.errors import SchedulerError
from scheduler.metrics import Metrics
from scheduler.web.app import Route, build_app
from scheduler.web.health import HEALTH_TIMEOUT, Health, HealthCheck

log = logging.getLogger(__name__)

THREADS = 4  # requests run at once; the rest queue (a scrape takes milliseconds)
# Open connections at most: well above 300 slow or idle clients, well below the usual soft
# limit of 1024 descriptors. Past it waitress stops accepting until some close.
CONNECTION_LIMIT = 500
CHANNEL_TIMEOUT = 30  # seconds a connection may stay silent (Prometheus reconnects at will)
CLEANUP_INTERVAL = 5  # seconds between sweeps for silent connections
STOP_TIMEOUT = 5.0  # seconds stop() waits for the loop and for a request in progress


class MetricsServer:
    """Serves ``/metrics``, ``/healthz`` and ``routes`` (the app of ``scheduler.web.app``)
    on a thread; ``metrics`` None serves an empty ``/metrics`` (``te-scheduler web``)."""

    def __init__(
        self,
        metrics: Metrics | None,
        listen: tuple[str, int],
        health: Health,
        *,
        routes: Sequence[Route] = (),
        health_timeout: float = HEALTH_TIMEOUT,
        threads: int = THREADS,
        connection_limit: int = CONNECTION_LIMIT,
        channel_timeout: int = CHANNEL_TIMEOUT,
        cleanup_interval: int = CLEANUP_INTERVAL,
    ) -> None:
        self.metrics, self.listen, self.health = metrics, listen, health
        self.health_timeout = health_timeout
        self.routes = routes
        self.adjustments: dict[str, Any] = {
            "threads": threads,
            "connection_limit": connection_limit,
            "channel_timeout": channel_timeout,
            "cleanup_interval": cleanup_interval,
            "asyncore_use_poll": True,  # select() fails past descriptor 1023
            "log_socket_errors": False,  # a client that hangs up is not news
            "max_request_header_size": 64 * 1024,
            "max_request_body_size": 64 * 1024,  # nothing here takes a body
            "ident": "te-scheduler",
        }
        self._server: BaseWSGIServer | None = None
        self._port = 0
        self._map: dict[int, Any] = {}  # waitress's socket map, shared by the loop and stop()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (the real one when ``listen`` asked for port 0)."""
        if self._server is None:
            raise RuntimeError("MetricsServer is not started")
        return self._port

    def start(self) -> MetricsServer:
        """Bind and serve; raises SchedulerError when the address cannot be bound."""
        host, port = self.listen
        sock = _bind(host, port)
        self._port = int(sock.getsockname()[1])
        registry = self.metrics.registry if self.metrics else CollectorRegistry()
        app = build_app(registry, HealthCheck(self.health, self.health_timeout), self.routes)
        _quiet_tracebacks()
        try:
            server = create_server(app, map=self._map, sockets=[sock], **self.adjustments)
        except BaseException:
            sock.close()
            raise
        assert isinstance(server, BaseWSGIServer)  # one socket makes one server
        self._server = server
        self._stopping.clear()
        self._thread = threading.Thread(target=self._loop, name="metrics-http", daemon=True)
        self._thread.start()
        log.info("Serving /metrics and /healthz on http://%s:%d", _show_host(host), self.port)
        return self

    def stop(self) -> None:
        """Stop serving, close the listening socket and every connection; safe to call twice."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        server.pull_trigger()  # wake the loop now rather than at its next timeout
        if self._thread is not None:
            self._thread.join(STOP_TIMEOUT)
        server.task_dispatcher.shutdown(timeout=int(STOP_TIMEOUT))

    def _loop(self) -> None:
        # waitress's own run() loops until the map is empty; closing it from stop()'s thread
        # would race the poll, so the loop closes everything itself once told to stop.
        while not self._stopping.is_set():
            wasyncore.loop(timeout=1.0, use_poll=True, map=self._map, count=1)
        wasyncore.close_all(self._map)


def _bind(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port``, or SchedulerError in one line saying why not."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise SchedulerError(
            f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}"
        ) from None
    return sock


class _OneLine(logging.Filter):
    """Folds a record's traceback into its message: waitress logs one line, never a stack."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info:
            record.msg, record.args = f"{record.getMessage()}: {record.exc_info[1]!r}", None
            record.exc_info, record.exc_text = None, None
        return True


_ONE_LINE = _OneLine()


def _quiet_tracebacks() -> None:
    logging.getLogger("waitress").addFilter(_ONE_LINE)  # adding it twice is a no-op


def _show_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host or "0.0.0.0"
