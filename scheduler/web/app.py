"""One WSGI application for everything te-scheduler serves over HTTP: a small router of routes.

Today it routes ``/metrics`` (prometheus_client's own WSGI app) and ``/healthz``; the status
page (``/``, ``/jobs/{name}``, ``/api/v1/...``) is meant to join as more routes, each a plain
WSGI app, so none of them knows about methods, 404s or the headers every answer carries.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, make_wsgi_app

from scheduler.web.health import HealthCheck

log = logging.getLogger(__name__)

Environ = dict[str, Any]
StartResponse = Callable[..., Callable[[bytes], object]]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]
Route = tuple[str, WSGIApp]  # ("/jobs/{name}", app): a {field} matches one path segment
Answer = tuple[str, list[tuple[str, str]], bytes]  # status, headers, body

METHODS = ("GET", "HEAD")  # read-only: everything else is 405
# On every answer: never let a browser guess a type, never let a cache keep a live value.
HOUSE_HEADERS = (("X-Content-Type-Options", "nosniff"), ("Cache-Control", "no-store"))
_FIELD = re.compile(r"\{([A-Za-z_]\w*)\}")


def build_app(
    registry: CollectorRegistry, health: HealthCheck, routes: Sequence[Route] = ()
) -> Router:
    """The app the daemon serves: ``/metrics`` from ``registry``, ``/healthz``, then ``routes``."""
    return Router(
        [("/metrics", make_wsgi_app(registry)), ("/healthz", health_app(health)), *routes]
    )


def health_app(check: HealthCheck) -> WSGIApp:
    """``/healthz``: the check's JSON body, 200 when healthy and 503 when not."""

    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        ok, body = check()
        start_response(
            "200 OK" if ok else "503 Service Unavailable", [("Content-Type", "application/json")]
        )
        return [json.dumps(body).encode() + b"\n"]

    return app


class Router:
    """A WSGI app that hands each request to the first route whose pattern matches its path.

    No route: 404. A method other than GET or HEAD: 405 with ``Allow``. A route's fields go
    to ``environ["wsgiorg.routing_args"]`` as ``((), {"name": ...})``. A HEAD runs the route
    as a GET and drops the body. Every answer has a ``Content-Length`` and ``HOUSE_HEADERS``;
    a route that raises is logged in one line and answered 500, never a traceback.
    """

    def __init__(self, routes: Sequence[Route]) -> None:
        self.routes = [(_compile(pattern), app) for pattern, app in routes]

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        path, method = environ.get("PATH_INFO") or "/", environ.get("REQUEST_METHOD", "GET")
        status, headers, body = self._respond(environ, path, method)
        start_response(status, _finish(headers, len(body)))
        return [] if method == "HEAD" else [body]

    def _respond(self, environ: Environ, path: str, method: str) -> Answer:
        found = self._find(path)
        if found is None:
            return _plain("404 Not Found", b"not found\n")
        if method not in METHODS:
            return _plain("405 Method Not Allowed", b"read-only\n", ("Allow", ", ".join(METHODS)))
        app, fields = found
        environ["wsgiorg.routing_args"] = ((), fields)
        environ["REQUEST_METHOD"] = "GET"  # a HEAD is a GET whose body nobody reads
        try:
            return _run(app, environ)
        except Exception as exc:  # one bad page must cost neither a traceback nor the server
            log.warning("Serving %s %r failed: %r", method, path, exc)
            return _plain("500 Internal Server Error", b"internal error\n")

    def _find(self, path: str) -> tuple[WSGIApp, dict[str, str]] | None:
        for pattern, app in self.routes:
            match = pattern.fullmatch(path)
            if match:
                return app, match.groupdict()
        return None


def _compile(pattern: str) -> re.Pattern[str]:
    parts = _FIELD.split(pattern)  # literal, field, literal, field, ..., literal
    return re.compile(
        "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>[^/]+)" for i, p in enumerate(parts))
    )


def _run(app: WSGIApp, environ: Environ) -> Answer:
    """Call ``app`` and read its whole answer (our pages are small, and a length is wanted)."""
    answer: list[Any] = []
    chunks: list[bytes] = []

    def start_response(
        status: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Callable[[bytes], object]:
        answer[:] = [status, headers]
        return chunks.append

    result = app(environ, start_response)
    try:
        chunks.extend(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    if not answer:
        raise RuntimeError("the route never called start_response")
    return answer[0], answer[1], b"".join(chunks)


def _finish(headers: list[tuple[str, str]], length: int) -> list[tuple[str, str]]:
    """``headers`` with the house headers and the true ``Content-Length``, each once."""
    names = {name.lower() for name, _ in headers}
    kept = [(n, v) for n, v in headers if n.lower() != "content-length"]
    extra = [(n, v) for n, v in HOUSE_HEADERS if n.lower() not in names]
    return [*kept, *extra, ("Content-Length", str(length))]


def _plain(status: str, body: bytes, *headers: tuple[str, str]) -> Answer:
    return status, [("Content-Type", "text/plain; charset=utf-8"), *headers], body
