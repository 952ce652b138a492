"""The status page (SPEC.md section 8): ``/`` and ``/jobs/{name}`` as HTML, from one view model.

:class:`StatusPages` builds plain dicts (``overview`` and ``job_detail``) from the config and
the store; the HTML routes here and the JSON routes of :mod:`scheduler.web.api` render the same
dicts. The daemon serves them beside ``/metrics``; ``te-scheduler web`` serves them alone.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import fields
from datetime import datetime, timezone
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, quote, urlencode, urlsplit
from zoneinfo import ZoneInfo

from jinja2 import Environment, PackageLoader, select_autoescape
from sqlalchemy import Engine

from scheduler import clock
from scheduler.config.model import Config, Job, Schedule
from scheduler.errors import SchedulerError
from scheduler.store import status
from scheduler.timing.cron import format_duration
from scheduler.timing.planner import build_plan
from scheduler.timing.triggers import build_trigger, spread_offsets
from scheduler.web.app import Environ, Route, StartResponse

UTC = timezone.utc
JOBS_PER_PAGE = 100
ATTEMPTS_PER_PAGE = 50
MAX_LIMIT = 500
NEXT_FIRINGS = 10
MAX_QUERY = 100  # characters of ?q=
REFRESH_SECONDS = 30  # page.js reloads a visible page this often
Limits = Callable[[], Mapping[str, int | None]]
# Scripts only from our own static route (page.js), styles only from page.css: no inline code,
# no external resource of any kind; nothing may frame the page.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
PAGE_HEADERS = (
    ("Content-Security-Policy", CSP),
    ("Referrer-Policy", "no-referrer"),  # a click into the ThousandEyes app leaks no URL
    ("X-Frame-Options", "DENY"),
)
STATIC_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8"}


class BadRequest(Exception):
    """A query parameter out of bounds: answered 400 with this one-line message."""


class NotFound(Exception):
    """No such job: answered 404."""


class StatusPages:
    """The status page's data and routes over one engine and the current config.

    ``config`` is called per request (the daemon's reloads show at once); ``limits`` is the
    daemon's limiter snapshot, or None to read the ``rate_limits`` table instead.
    """

    def __init__(
        self, engine: Engine, config: Callable[[], Config], limits: Limits | None = None
    ) -> None:
        self.engine, self.config, self.limits = engine, config, limits
        self._index: tuple[int, dict[str, Job]] = (0, {})

    def routes(self) -> list[Route]:
        """The HTML routes: ``/``, ``/jobs/{name}`` and ``/static/{file}``."""
        return [
            ("/", self._html(self._overview_page)),
            ("/jobs/{name}", self._html(self._job_page)),
            ("/static/{file}", static_app),
        ]

    # -- the view model ------------------------------------------------------------------
    def overview(self, query: Mapping[str, str]) -> dict[str, Any]:
        """Header and one page of jobs (``page``, ``q``), as both the HTML and JSON show."""
        now = clock.now()
        page = int_param(query, "page", 1, 1, 1_000_000)
        q = text_param(query, "q")
        jobs = [j for j in self.config().jobs if _matches(j, q)]
        pages = max(1, math.ceil(len(jobs) / JOBS_PER_PAGE))
        shown = jobs[(page - 1) * JOBS_PER_PAGE : page * JOBS_PER_PAGE]
        found = status.activity(self.engine, [j.name for j in shown], now)
        last_ids = [a.last.id for a in found.values() if a.last is not None]
        summaries = status.summary_for(self.engine, last_ids)
        rows = [self._job_row(j, found[j.name], summaries, now) for j in shown]
        return {
            "now": now,
            "header": self._header(now),
            "jobs": rows,
            "page": page,
            "pages": pages,
            "total": len(jobs),
            "q": q,
        }

    def job_detail(self, name: str, query: Mapping[str, str]) -> dict[str, Any]:
        """One job: its row, next firings, one page of attempts (``before``, ``limit``)."""
        now = clock.now()
        before = int_param(query, "before", None, 1, 2**63 - 1)
        limit = int_param(query, "limit", ATTEMPTS_PER_PAGE, 1, MAX_LIMIT)
        job = self._job(name)
        rows = status.attempts_page(self.engine, name, before=before, limit=limit)
        if job is None and not rows and not status.known_jobs(self.engine, name):
            raise NotFound(name)
        results = status.results_for(self.engine, [r["id"] for r in rows])
        attempts = [_attempt(r, results.get(r["id"], [])) for r in rows]
        row = None
        if job is not None:
            found = status.activity(self.engine, [name], now)[name]
            last = [found.last.id] if found.last is not None else []
            row = self._job_row(job, found, status.summary_for(self.engine, last), now)
        return {
            "now": now,
            "name": name,
            "job": row,
            "next": self._next_firings(name, now) if job is not None else [],
            "attempts": attempts,
            "before": before,
            "limit": limit,
            "next_before": attempts[-1]["id"] if len(attempts) == limit else None,
        }

    def _header(self, now: datetime) -> dict[str, Any]:
        head = status.header(self.engine, now)
        if self.limits is not None:
            limits: Mapping[str, int | None] | None = dict(sorted(self.limits().items()))
        else:
            limits = status.stored_rate_limits(self.engine, now)
        return {
            "instances_alive": head.instances_alive,
            "attempts_24h": head.attempts_day,
            "rate_limited_24h": head.rate_limited_day,
            "rate_limits": limits,  # None: unknown
        }

    def _job_row(
        self,
        job: Job,
        found: status.JobActivity,
        summaries: Mapping[int, status.ResultSummary],
        now: datetime,
    ) -> dict[str, Any]:
        last = found.last
        summary = summaries.get(last.id) if last is not None else None
        return {
            "name": job.name,
            "tests": list(job.tests),
            "enabled": job.enabled,
            "schedule": schedule_text(job.schedule),
            "timezone": job.schedule.timezone,
            "next_fire": next_fire(job, now) if job.enabled else None,
            "last": _fields(last) if last is not None else None,
            "results": _fields(summary) if summary is not None else None,
            "success_rate_24h": found.rates.day,
            "success_rate_7d": found.rates.week,
            "firings_24h": found.rates.firings_day,
            "firings_7d": found.rates.firings_week,
            "strip": [_fields(m) for m in reversed(found.strip)],  # oldest first, left to right
        }

    def _next_firings(self, name: str, now: datetime) -> list[dict[str, Any]]:
        plan = build_plan(self.config(), now, count=NEXT_FIRINGS, job=name)
        return [
            {
                "test_id": call.test_id,
                "scheduled_for": call.scheduled_for,
                "utc": call.at,
                "local": call.at.astimezone(ZoneInfo(call.timezone)),
            }
            for call in plan.calls
        ]

    def _job(self, name: str) -> Job | None:
        config = self.config()
        if self._index[0] != id(config):
            self._index = (id(config), {j.name: j for j in config.jobs})
        return self._index[1].get(name)

    # -- HTML ------------------------------------------------------------------------------
    def _html(self, page: Callable[[Environ], str]) -> Callable[[Environ, StartResponse], Any]:
        def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
            return answer(start_response, lambda: page(environ), "text/html; charset=utf-8")

        return app

    def _overview_page(self, environ: Environ) -> str:
        data = self.overview(query_of(environ))
        return render("overview.html", data, root="./")

    def _job_page(self, environ: Environ) -> str:
        name = path_field(environ, "name")
        data = self.job_detail(name, query_of(environ))
        return render("job.html", data, root="../")


# -- answers -----------------------------------------------------------------------------------
def answer(
    start_response: StartResponse, body: Callable[[], str], content_type: str
) -> list[bytes]:
    """Run ``body`` and answer it, or 400/404/503 in one plain line; page headers on all."""
    try:
        text, code = body(), "200 OK"
    except BadRequest as exc:
        text, code, content_type = f"bad request: {exc}\n", "400 Bad Request", "text/plain"
    except NotFound as exc:
        text, code, content_type = f"no job named {exc}\n", "404 Not Found", "text/plain"
    except SchedulerError as exc:  # the database is away: say so in one line
        text, code, content_type = f"unavailable: {exc}\n", "503 Service Unavailable", "text/plain"
    if content_type == "text/plain":
        content_type += "; charset=utf-8"
    start_response(code, [("Content-Type", content_type), *PAGE_HEADERS])
    return [text.encode()]


def static_app(environ: Environ, start_response: StartResponse) -> list[bytes]:
    """``/static/page.css`` and ``/static/page.js`` from the package; anything else 404."""
    name = path_field(environ, "file")
    kind = STATIC_TYPES.get(name[name.rfind(".") :]) if "." in name else None
    data = _static(name) if kind else None
    if data is None or kind is None:
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"not found\n"]
    headers = [("Content-Type", kind), ("Cache-Control", "max-age=300"), *PAGE_HEADERS]
    start_response("200 OK", headers)
    return [data]


_STATIC_FILES = ("page.css", "page.js")


@functools.cache
def _static(name: str) -> bytes | None:
    if name not in _STATIC_FILES:
        return None
    return (resources.files("scheduler.web") / "static" / name).read_bytes()


# -- parameters --------------------------------------------------------------------------------
def query_of(environ: Environ) -> dict[str, str]:
    """The query string's parameters, each at most once; garbage is a BadRequest."""
    raw = environ.get("QUERY_STRING") or ""
    if len(raw) > 2000:
        raise BadRequest("query string too long")
    try:
        parsed = parse_qs(raw, keep_blank_values=True, max_num_fields=10, errors="strict")
    except ValueError as exc:
        raise BadRequest(f"unreadable query string ({exc})") from None
    query = {}
    for key, values in parsed.items():
        if len(values) > 1:
            raise BadRequest(f"{key} given more than once")
        query[key] = values[0]
    return query


def int_param(query: Mapping[str, str], key: str, default: Any, low: int, high: int) -> Any:
    """``query[key]`` as a whole number in ``[low, high]``, else BadRequest; absent: ``default``."""
    text = query.get(key)
    if text is None or text == "":
        return default
    if not text.isascii() or not text.isdigit() or len(text) > 19 or not low <= int(text) <= high:
        raise BadRequest(f"{key} must be a whole number from {low} to {high}")
    return int(text)


def text_param(query: Mapping[str, str], key: str) -> str:
    """``query[key]`` stripped, at most MAX_QUERY characters, else BadRequest."""
    text = query.get(key, "").strip()
    if len(text) > MAX_QUERY or any(ord(ch) < 32 for ch in text):
        raise BadRequest(f"{key} must be at most {MAX_QUERY} printable characters")
    return text


def path_field(environ: Environ, name: str) -> str:
    """A ``{name}`` of the route, as the UTF-8 text the client percent-encoded."""
    raw: str = environ["wsgiorg.routing_args"][1][name]
    try:  # PEP 3333: PATH_INFO is bytes decoded as latin-1
        return raw.encode("latin-1").decode("utf-8")
    except UnicodeError:
        raise BadRequest(f"{name} is not UTF-8") from None


def _matches(job: Job, q: str) -> bool:
    if not q:
        return True
    q = q.lower()
    return q in job.name.lower() or any(q in t.lower() for t in job.tests)


# -- time and schedule words -------------------------------------------------------------------
def next_fire(job: Job, now: datetime) -> dict[str, Any] | None:
    """The job's next call (spread included): ``{"utc", "local", "test_id"}``, or None."""
    best: tuple[datetime, str] | None = None
    trigger = build_trigger(job.schedule)
    for test, offset in spread_offsets(job).items():
        slot = trigger.get_next_fire_time(None, now - offset)
        if slot is not None:
            at = slot.astimezone(UTC) + offset
            if best is None or at < best[0]:
                best = (at, test)
    if best is None:
        return None
    at, test = best
    return {"utc": at, "local": at.astimezone(ZoneInfo(job.schedule.timezone)), "test_id": test}


def schedule_text(schedule: Schedule) -> str:
    """The schedule as written in jobs.yaml (``cron``, ``every`` with its start, ``at``)."""
    if schedule.cron:
        return schedule.cron
    if schedule.every:
        start = f" from {schedule.start.isoformat()}" if schedule.start else ""
        return f"every {format_duration(schedule.every)}{start}"
    assert schedule.at is not None
    return f"at {schedule.at.isoformat()}"


def relative(moment: datetime | None, now: datetime) -> str:
    """``in 4m``, ``3h 5m ago``, ``now``: the largest two units (page.js says the same)."""
    if moment is None:
        return "—"
    seconds = round((moment - now).total_seconds())
    if seconds == 0:
        return "now"
    words = _span(abs(seconds))
    return f"in {words}" if seconds > 0 else f"{words} ago"


def _span(seconds: int) -> str:
    parts: list[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size or (unit == "s" and not parts):
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
        if len(parts) == 2 or (parts and unit == "h" and seconds == 0):
            break
    return " ".join(parts[:2]) if parts else "0s"


def _utc_text(moment: datetime | None) -> str:
    return "—" if moment is None else moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _local_text(moment: datetime | None) -> str:
    if moment is None:
        return "—"
    return moment.strftime("%Y-%m-%d %H:%M:%S ") + (moment.tzname() or "")


def _short(moment: datetime | None, now: datetime) -> str:
    """``23:41:24 UTC`` today (in the moment's own zone), ``2026-12-05 00:42 CET`` otherwise."""
    if moment is None:
        return "—"
    zone = moment.tzinfo
    same_day = moment.date() == now.astimezone(zone).date()
    shown = moment.strftime("%H:%M:%S" if same_day else "%Y-%m-%d %H:%M")
    return f"{shown} {moment.tzname() or ''}".strip()


def _iso(moment: datetime | None) -> str:
    return "" if moment is None else moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _percent(rate: float | None) -> str:
    if rate is None:
        return "—"
    return "100%" if rate >= 1 else f"{math.floor(rate * 1000) / 10:g}%"


def _safe_link(url: str | None) -> str | None:
    """Only http(s) links become hrefs: a ``javascript:`` link from the API stays text."""
    if not url:
        return None
    try:
        scheme = urlsplit(url).scheme.lower()
    except ValueError:
        return None
    return url if scheme in ("http", "https") else None


def _page_url(query: Mapping[str, Any]) -> str:
    kept = {k: v for k, v in query.items() if v not in (None, "", 1) or k == "before"}
    kept = {k: v for k, v in kept.items() if v is not None}
    return "?" + urlencode(kept) if kept else "?"


def _fields(item: Any) -> dict[str, Any]:
    """A dataclass's fields as a dict, shallow (``dataclasses.asdict`` deep-copies each value:
    two thirds of an overview's time)."""
    return {f.name: getattr(item, f.name) for f in fields(item)}


def _attempt(row: Mapping[str, Any], results: list[status.AgentResult]) -> dict[str, Any]:
    data = dict(row)
    data.setdefault("results", None)  # the follow-up's state (SPEC section 7), when stored
    data["agents"] = [{k: v for k, v in _fields(r).items() if k != "attempt_id"} for r in results]
    data["results_summary"] = _fields(status.summarize(results)) if results else None
    return data


# -- templates ---------------------------------------------------------------------------------
_env = Environment(
    loader=PackageLoader("scheduler.web", "templates"),
    autoescape=select_autoescape(("html",), default=True, default_for_string=True),
    trim_blocks=True,
    lstrip_blocks=True,
)
_env.filters.update(
    utc=_utc_text,
    local=_local_text,
    iso=_iso,
    short=_short,
    percent=_percent,
    safe_link=_safe_link,
    urlpart=lambda text: quote(str(text), safe=""),
    page_url=_page_url,
)
_env.globals.update(relative=relative, refresh=REFRESH_SECONDS)


def render(template: str, data: Mapping[str, Any], *, root: str) -> str:
    """The template filled with ``data``; every value is escaped (autoescape is on)."""
    return _env.get_template(template).render(data, root=root)


def asset_hash(name: str) -> str:
    """A short hash of a static file, appended to its URL so a new version is fetched."""
    data = _static(name) or b""
    return hashlib.sha256(data).hexdigest()[:12]


_env.globals.update(asset=lambda name: f"static/{name}?v={asset_hash(name)}")
