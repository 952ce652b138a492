"""Reading results back (SPEC section 7): ``GET /tests`` for types, ``/test-results`` rounds.

:class:`ResultsReader` never raises: every failure is a :class:`Read` with a ``kind`` the
follow-up loop acts on (``permanent`` for 401/403/404, ``limited`` for 429, ``retry`` for
5xx, network errors and bad answers, ``deferred`` when the limiter had no room). Each HTTP
request passes a :class:`Gate` first (the limiter's low-priority path), pages are followed
through ``_links.next`` only on the API's own host and never twice, a body is read up to
:data:`BODY_CAP` within the request timeout, and a whole read ends after
:data:`MAX_PAGES` pages or ``READ_BOUND_FACTOR`` request timeouts.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol
from urllib.parse import parse_qs, quote, urlencode, urlsplit

import requests

from scheduler import clock
from scheduler.api.client import ERROR_CAP, RateLimitBucket, build_session, parse_buckets
from scheduler.config.model import ApiConfig
from scheduler.logs import secrets_pattern

log = logging.getLogger(__name__)

BODY_CAP = 4 * 1024 * 1024  # bytes of one page at most; a bigger answer is a failed read
MAX_PAGES = 50  # pages of one read at most (a round of 100 agents is a few pages)
READ_BOUND_FACTOR = 4  # a whole read (all pages) ends after this many request timeouts
DATA_CAP = 16 * 1024  # characters of one result's JSON kept

# SPEC 7: the type picks the endpoint.
_ENDPOINT_OF = {"agent-to-server": "network", "agent-to-agent": "network", "voice": "rtp-server"}
# When a round is likely: page loads and transactions take longest (reference: no figure).
_FIRST_READ = {"network": 20.0, "page-load": 60.0, "web-transactions": 60.0}
_FIRST_READ_OTHER = 30.0
# The endpoint's main time when a result has neither avgLatency nor responseTime.
_MAIN_TIME = {
    "web-transactions": "transactionTime",
    "api": "apiTransactionTime",
    "dns-server": "resolutionTime",
    "dns-trace": "finalQueryTime",
    "rtp-server": "latency",
    "page-load": "pageLoadTime",
}


def endpoint_of(test_type: str) -> str:
    """The results endpoint of a test type (``agent-to-server`` -> ``network``)."""
    return _ENDPOINT_OF.get(test_type, test_type)


def first_read_after(endpoint: str) -> float:
    """Seconds after the run call before a round is likely to be readable."""
    return _FIRST_READ.get(endpoint, _FIRST_READ_OTHER)


@dataclass(frozen=True)
class ResultRow:
    """One agent's result, in the ``results`` table's terms."""

    round_id: int
    agent_id: str
    agent_name: str | None
    date: datetime | None
    ok: bool
    error: str | None
    loss: float | None
    latency_ms: float | None
    response_code: int | None
    data: str | None
    app_link: str | None


@dataclass(frozen=True)
class Read:
    """What one read produced; ``kind`` is ok, permanent, retry, limited or deferred."""

    kind: str = "ok"
    rows: tuple[ResultRow, ...] = ()
    items: tuple[dict[str, Any], ...] = ()  # GET /tests: the tests
    problem: str | None = None
    note: str | None = None  # ok, but worth a log line (a looping next link)
    codes: tuple[int | None, ...] = field(default_factory=tuple)  # one per request sent


class Gate(Protocol):
    """The limiter's low-priority path, per request."""

    def before(self) -> bool:
        """Wait for room; False when the read should give up for now."""

    def after(self, status: int | None, buckets: tuple[RateLimitBucket, ...]) -> None:
        """Report the answer (its rate-limit headers, a 429)."""


class _Failed(Exception):
    def __init__(self, kind: str, problem: str) -> None:
        super().__init__(problem)
        self.kind, self.problem = kind, problem


class ResultsReader:
    """Reads results pages for one token; no method raises."""

    def __init__(self, api: ApiConfig, token: str, session: requests.Session | None = None):
        self._api = api
        self._base = api.base_url.rstrip("/")
        self._origin = _origin(self._base)
        self._token = token
        self._mask = secrets_pattern({token}) if token else None
        self._session = session if session is not None else build_session(api)

    def close(self) -> None:
        self._session.close()

    def tests(self, aid: str | None, gate: Gate) -> Read:
        """``GET /tests``: every test the token sees (``items``: testId, type, ...)."""
        url = f"{self._base}/tests" + (f"?{urlencode({'aid': aid})}" if aid else "")
        return self._read(url, "tests", gate)

    def round_rows(
        self,
        test_id: str,
        endpoint: str,
        aid: str | None,
        start: datetime,
        end: datetime,
        gate: Gate,
    ) -> Read:
        """Every result of ``test_id`` between ``start`` and ``end`` (all pages), parsed."""
        query = {"startDate": _iso(start), "endDate": _iso(end)}
        if aid:
            query["aid"] = aid
        url = (
            f"{self._base}/test-results/{quote(str(test_id), safe='')}/"
            f"{quote(endpoint, safe='')}?{urlencode(query)}"
        )
        return self._read(url, "results", gate, test_id=test_id, endpoint=endpoint)

    # -- paging ----------------------------------------------------------------------------
    def _read(
        self,
        url: str,
        key: str,
        gate: Gate,
        test_id: str | None = None,
        endpoint: str = "",
    ) -> Read:
        items: list[dict[str, Any]] = []
        codes: list[int | None] = []
        note = None
        try:
            for page in self._pages(url, gate, codes):
                if not isinstance(page.get(key), list):
                    raise _Failed("retry", f"answer without a {key!r} list")
                if test_id is not None:
                    _check_test(page, test_id)
                items.extend(item for item in page[key] if isinstance(item, dict))
        except _Failed as exc:
            if exc.kind == "loop":
                note = exc.problem
            else:
                return Read(kind=exc.kind, problem=self._redact(exc.problem), codes=tuple(codes))
        except Exception as exc:  # the follow-up loop must survive anything, by contract
            log.debug("Unexpected error reading %s", key, exc_info=True)
            problem = self._redact(f"{type(exc).__name__}: {exc}")[:ERROR_CAP]
            return Read(kind="retry", problem=problem, codes=tuple(codes))
        if key == "results":
            parsed = (parse_row(item, endpoint) for item in items)
            rows = tuple(row for row in parsed if row is not None)
            return Read(rows=rows, note=note, codes=tuple(codes))
        return Read(items=tuple(items), note=note, codes=tuple(codes))

    def _pages(self, url: str, gate: Gate, codes: list[int | None]) -> Iterator[dict[str, Any]]:
        seen: set[str] = set()
        bound = clock.monotonic() + READ_BOUND_FACTOR * self._api.timeout
        next_url: str | None = url
        while next_url is not None:
            if len(seen) >= MAX_PAGES or clock.monotonic() > bound:
                raise _Failed("loop", f"stopped after {len(seen)} pages")
            seen.add(_page_key(next_url))
            if not gate.before():
                raise _Failed("deferred", "no room in the organization bucket yet")
            page = self._get(next_url, gate, codes)
            next_url = self._next(page, seen)
            yield page

    def _next(self, page: dict[str, Any], seen: set[str]) -> str | None:
        links = page.get("_links")
        nxt = links.get("next") if isinstance(links, dict) else None
        href = nxt.get("href") if isinstance(nxt, dict) else nxt
        if not isinstance(href, str) or not href:
            return None
        if _origin(href) != self._origin:
            raise _Failed("retry", "a next link to another host was not followed")
        if _page_key(href) in seen:
            raise _Failed("loop", "the next link repeats an earlier page; stopped paging")
        return href

    def _get(self, url: str, gate: Gate, codes: list[int | None]) -> dict[str, Any]:
        started = clock.monotonic()
        try:
            response = self._session.get(
                url,
                headers={"Authorization": f"Bearer {self._token}"},
                timeout=(self._api.timeout, self._api.timeout),
                stream=True,
                allow_redirects=False,
            )
        except requests.RequestException as exc:
            codes.append(None)
            gate.after(None, ())
            raise _Failed("retry", f"{type(exc).__name__} reading results") from None
        try:
            body, complete = _read_capped(response, started + self._api.timeout)
        finally:
            response.close()
        code = response.status_code
        codes.append(code)
        gate.after(code, parse_buckets(response.headers))
        if code == 429:
            raise _Failed("limited", "HTTP 429: rate limited")
        if not 200 <= code <= 299:
            kind = "retry" if code >= 500 else "permanent"
            raise _Failed(kind, _describe(code, body))
        if not complete:
            raise _Failed("retry", f"answer cut short (over {BODY_CAP} bytes or too slow)")
        try:
            page = json.loads(body)
        except ValueError:
            raise _Failed("retry", "answer is not JSON") from None
        if not isinstance(page, dict):
            raise _Failed("retry", "answer is not a JSON object")
        return page

    def _redact(self, text: str) -> str:
        return self._mask.sub("***", text) if self._mask else text


def parse_row(item: dict[str, Any], endpoint: str) -> ResultRow | None:
    """One result object as a row; None when it has no usable roundId or agent."""
    round_id = _number(item.get("roundId"))
    agent = item.get("agent")
    agent_id = agent.get("agentId") if isinstance(agent, dict) else None
    if round_id is None or agent_id in (None, "") or isinstance(agent_id, (dict, list)):
        return None
    assert isinstance(agent, dict)
    error = _error(item)
    loss = _number(item.get("loss"))
    names = ("avgLatency", "responseTime", _MAIN_TIME.get(endpoint, "responseTime"))
    latency = next((_number(item[n]) for n in names if _number(item.get(n)) is not None), None)
    code = _number(item.get("responseCode"))
    name = agent.get("agentName")
    return ResultRow(
        round_id=int(round_id),
        agent_id=str(agent_id)[:32],
        agent_name=str(name)[:200] if name is not None else None,
        date=_date(item.get("date")),
        ok=error is None and (loss is None or loss < 100),
        error=error,
        loss=loss,
        latency_ms=latency,
        response_code=int(code) if code is not None else None,
        data=_data(item),
        app_link=_app_link(item),
    )


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _error(item: dict[str, Any]) -> str | None:
    parts = [str(item[k]).strip() for k in ("errorType", "errorDetails") if item.get(k)]
    text = " ".join(": ".join(parts).split())
    return text[:ERROR_CAP] or None


def _date(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment


def _data(item: dict[str, Any]) -> str:
    text = json.dumps(item, separators=(",", ":"), default=str)
    if len(text) <= DATA_CAP:
        return text
    scalars = {k: v for k, v in item.items() if not isinstance(v, (dict, list))}
    text = json.dumps({**scalars, "_truncated": True}, separators=(",", ":"), default=str)
    return text[:DATA_CAP]


def _app_link(item: dict[str, Any]) -> str | None:
    links = item.get("_links")
    link = links.get("appLink") if isinstance(links, dict) else None
    href = link.get("href") if isinstance(link, dict) else link
    return href[:2000] if isinstance(href, str) else None


def _check_test(page: dict[str, Any], test_id: str) -> None:
    test = page.get("test")
    found = test.get("testId") if isinstance(test, dict) else None
    if found is not None and str(found) != str(test_id):
        raise _Failed("retry", f"answer is for test {str(found)[:32]}, not {test_id}")


def _describe(code: int, body: bytes) -> str:
    """``HTTP 403: Forbidden: detail`` from a problem+json or 401 body, else the code."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    reason = ""
    if isinstance(data, dict):
        for first, second in (("error", "error_description"), ("title", "detail")):
            parts = [str(data[k]).strip() for k in (first, second) if data.get(k)]
            if parts:
                reason = ": ".join(parts)
                break
    text = " ".join(f"HTTP {code}: {reason}".split()) if reason else f"HTTP {code}"
    return text[:ERROR_CAP]


def _read_capped(response: requests.Response, deadline: float) -> tuple[bytes, bool]:
    """The body and whether it was read whole (within BODY_CAP and the deadline)."""
    chunks: list[bytes] = []
    size = 0
    try:
        for chunk in response.iter_content(chunk_size=65536):
            chunks.append(chunk)
            size += len(chunk)
            if size > BODY_CAP or clock.monotonic() >= deadline:
                return b"", False
    except (requests.RequestException, OSError):
        return b"", False
    return b"".join(chunks), True


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return (parts.scheme.lower(), parts.netloc.lower())


def _page_key(url: str) -> str:
    """What makes a page: its path and cursor (the SDK also stops on a repeated cursor)."""
    parts = urlsplit(url)
    cursor = parse_qs(parts.query).get("cursor")
    return f"{parts.path}?{cursor[0] if cursor else parts.query}"
