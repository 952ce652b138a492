"""The status page as JSON (SPEC.md section 8): ``/api/v1/jobs`` and a job's attempts.

The same view model as the HTML (scheduler.web.pages.StatusPages); times are ISO-8601 strings,
UTC unless the key says ``local``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import Engine

from scheduler.config.model import Config
from scheduler.web.app import Environ, Route, StartResponse
from scheduler.web.pages import Limits, StatusPages, answer, path_field, query_of


def status_routes(
    engine: Engine, config: Callable[[], Config], limits: Limits | None = None
) -> list[Route]:
    """Every route of the status page: its HTML pages, static files and this JSON API."""
    pages = StatusPages(engine, config, limits)
    return [*pages.routes(), *routes(pages)]


def routes(pages: StatusPages) -> list[Route]:
    """``/api/v1/jobs`` and ``/api/v1/jobs/{name}/attempts`` over ``pages``' data."""

    def jobs(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        return _json(start_response, lambda: pages.overview(query_of(environ)))

    def attempts(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        def body() -> dict[str, Any]:
            detail = pages.job_detail(path_field(environ, "name"), query_of(environ))
            keys = ("name", "attempts", "before", "limit", "next_before")
            return {key: detail[key] for key in keys}

        return _json(start_response, body)

    return [("/api/v1/jobs", jobs), ("/api/v1/jobs/{name}/attempts", attempts)]


def _json(start_response: StartResponse, body: Callable[[], Any]) -> list[bytes]:
    return answer(start_response, lambda: dumps(body()), "application/json")


def dumps(data: Any) -> str:
    """``data`` as JSON, datetimes as ISO-8601 with their offset."""
    return json.dumps(data, default=_default, ensure_ascii=False) + "\n"


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON")
