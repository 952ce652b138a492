"""The HTTP caller: one ``POST /tests/{testId}/run`` per :meth:`Caller.send`, failures as data.

The request is exactly what SPEC section 1 describes (the official SDK's method, path, query,
``Accept`` and bearer auth), with three deliberate differences from the SDK: no hidden retries
(every HTTP attempt is the runner's to record), a timeout always set, and at most 64 KiB of any
response body read.

Transport choices, documented here because operators will ask:

* ``timeout`` bounds the whole attempt. requests gets ``(t, t)``: ``t`` to connect and ``t``
  for each socket read; the body read stops once ``t`` has elapsed since the request started;
  and since a server trickling bytes never trips a per-read timeout, a watchdog
  (:mod:`scheduler.api.deadline`) shuts the socket down ``DEADLINE_MARGIN`` after ``t``. An
  attempt whose status line had not arrived by then is a ``timeout``; a response whose status
  line arrived keeps its status even if its body then stalls.
* ``error`` holds printable text only: control, bidi and other invisible characters are
  written as ``\\xNN``/``\\uNNNN`` escapes, so API text cannot reorder or forge what an operator
  reads (in a terminal, a log line or a ``history`` table).
* ``HTTPS_PROXY``/``NO_PROXY`` and ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE`` work as with curl
  when ``api.proxy`` is null, and an explicit ``api.proxy`` wins over the environment: exactly
  what requests does with ``trust_env`` on. requests would re-read the environment on every
  call (scanning all of ``os.environ`` twice); since every call goes to the same host, the
  session is given the outcome once, for the base URL, and ``trust_env`` is then turned off.
  The environment is therefore read when the caller is built (start-up and reload).
  ``~/.netrc`` can never replace the bearer token, because the token is sent through a
  requests auth object (requests only consults netrc without one).
"""

from __future__ import annotations

import functools
import html
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import quote, urlencode

import requests

from scheduler import USER_AGENT, clock
from scheduler.api.deadline import WATCHDOG, mount_watched
from scheduler.config.model import ApiConfig
from scheduler.logs import printable, secrets_pattern

log = logging.getLogger(__name__)

BODY_CAP = 64 * 1024  # bytes of a response body we read at most; the rest is never downloaded
TEXT_CAP = 200  # characters of a non-JSON body kept in ``error``
ERROR_CAP = 300  # characters of ``error`` at most
DEADLINE_MARGIN = 0.5  # seconds past ``timeout`` before the watchdog cuts an attempt off
PREPARED_CAP = 4096  # prepared requests kept per caller (one per test and aid)
BUCKETS = (
    ("organization", "X-Organization-Rate-Limit"),
    ("instant-test", "X-Instant-Test-Rate-Limit"),
)


@dataclass(frozen=True)
class RateLimitBucket:
    """One server-reported rate-limit bucket; a value is None when absent or unusable."""

    name: str  # "organization" or "instant-test"
    limit: int | None
    remaining: int | None
    reset: float | None  # Unix epoch seconds; kept as sent even when already in the past


@dataclass(frozen=True)
class CallResult:
    """What one HTTP attempt produced, whether or not a response came."""

    status_code: int | None
    outcome: str  # success, http_error, rate_limited, network_error, timeout
    error: str | None
    duration_ms: int
    buckets: tuple[RateLimitBucket, ...] = ()

    @property
    def is_retryable(self) -> bool:
        """True for 5xx answers, network errors and timeouts (429 is the runner's own case)."""
        if self.outcome in ("network_error", "timeout"):
            return True
        return self.status_code is not None and 500 <= self.status_code <= 599


class _BearerAuth(requests.auth.AuthBase):
    """Sets ``Authorization: Bearer``; being an auth object also stops requests reading netrc."""

    def __init__(self, token: str) -> None:
        self._token = token

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self._token}"
        return request

    def __repr__(self) -> str:
        return "_BearerAuth(***)"


def build_session(api: ApiConfig) -> requests.Session:
    """A session pooled for ``api.concurrency`` calls, with no retries of its own."""
    session = requests.Session()
    size = max(1, api.concurrency)
    mount_watched(session, pool_connections=size, pool_maxsize=size, max_retries=0)
    session.verify = api.verify_tls
    if api.proxy:
        session.proxies = {"http": api.proxy, "https": api.proxy}
    session.headers.update({"Accept": "application/json", "User-Agent": USER_AGENT})
    _settle_environment(session, api.base_url)
    return session


def _settle_environment(session: requests.Session, base_url: str) -> None:
    """Apply once what requests would take from the environment per call, then stop it looking.

    requests' own merge is run for the base URL: its NO_PROXY test depends only on the URL's
    host and port, which every run URL shares. The configured proxies go in as per-request
    ones, because requests lets environment proxies override the session's but not those.
    """
    settings = session.merge_environment_settings(base_url, dict(session.proxies), None, None, None)
    session.proxies = dict(settings["proxies"])
    # A CA bundle from the environment replaces verification on, as in requests; unlike
    # requests (psf/requests#3829) it no longer overrides an explicit `verify_tls: false`:
    # what the config file says wins.
    if session.verify is not False:
        session.verify = settings["verify"]
    session.trust_env = False


@functools.lru_cache(maxsize=4096)  # a daemon calls the same few URLs over and over
def run_url(base_url: str, test_id: str, aid: str | None) -> str:
    """The run URL for ``test_id``, percent-encoded like the SDK (``quote(id, safe='')``)."""
    url = f"{base_url.rstrip('/')}/tests/{quote(str(test_id), safe='')}/run"
    if aid is not None and aid != "":
        url += "?" + urlencode({"aid": aid})
    return url


class Caller:
    """Sends run calls for one token; :meth:`send` never raises."""

    def __init__(self, api: ApiConfig, token: str, session: requests.Session | None = None) -> None:
        self._api = api
        self._token = token
        self._mask = secrets_pattern({token}) if token else None
        self._auth = _BearerAuth(token)
        self._session = session if session is not None else build_session(api)
        self._timeout = (api.timeout, api.timeout)
        # For a session that still reads the environment (one passed in): requests lets
        # environment proxies override the session's, but not a request's own.
        self._proxies = {"http": api.proxy, "https": api.proxy} if api.proxy else None
        self._prepared: dict[str, requests.PreparedRequest] = {}
        # Reusing a prepared request is only the same as ``session.post`` while the session
        # adds nothing per call: no environment to read and no cookies to send.
        self._reuse = not self._session.trust_env and not self._session.cookies

    def send(self, test_id: str, aid: str | None) -> CallResult:
        """POST the run call for ``test_id`` and describe what happened."""
        started = clock.monotonic()
        try:
            return self._send(run_url(self._api.base_url, test_id, aid), started)
        except Exception as exc:  # the runner's loop must survive anything, by contract
            log.debug("Unexpected error calling test %s", test_id, exc_info=True)
            return self._failure("network_error", exc, started)

    def close(self) -> None:
        """Close the pooled connections."""
        self._session.close()

    def _send(self, url: str, started: float) -> CallResult:
        with WATCHDOG.watch(self._api.timeout + DEADLINE_MARGIN) as deadline:
            try:
                response = self._post(url)
            except requests.Timeout as exc:
                return self._failure("timeout", exc, started)
            except requests.RequestException as exc:
                if deadline.expired:  # the watchdog cut a trickling answer off
                    return self._overran(started)
                return self._failure("network_error", exc, started)
            try:
                body = _read_capped(response, started + self._api.timeout)
            finally:
                response.close()
        return self._result(response, body, started)

    def _overran(self, started: float) -> CallResult:
        error = f"Timeout: no complete answer within {self._api.timeout:g} s"
        return CallResult(None, "timeout", error, _elapsed_ms(started))

    def _post(self, url: str) -> requests.Response:
        """What ``session.post`` sends and returns, with the request prepared once per URL.

        requests rebuilds the same request on every call (merged header dicts, URL parsing,
        the auth hook), about 150 µs of CPU a call; the settings passed to ``send`` are the ones
        ``Session.request`` would merge from this session.
        """
        session = self._session
        if not self._reuse:
            return session.post(
                url,
                data=None,
                auth=self._auth,
                timeout=self._timeout,
                stream=True,
                allow_redirects=False,
                proxies=self._proxies,
            )
        prepared = self._prepared.get(url)
        if prepared is None:
            request = requests.Request("POST", url, auth=self._auth)
            prepared = session.prepare_request(request)
            if len(self._prepared) >= PREPARED_CAP:
                self._prepared.clear()
            self._prepared[url] = prepared
        response = session.send(
            prepared.copy(),
            timeout=self._timeout,
            allow_redirects=False,
            stream=True,
            verify=session.verify,
            cert=session.cert,
            proxies=dict(session.proxies),
        )
        if response.cookies:  # the session's jar now holds them: send them the way requests does
            self._reuse = False
        return response

    def _result(self, response: requests.Response, body: bytes, started: float) -> CallResult:
        code = response.status_code
        outcome = _outcome(code)
        error = None
        if outcome != "success":
            error = self._error_text(response, body)
        buckets = parse_buckets(response.headers)
        return CallResult(code, outcome, error, _elapsed_ms(started), buckets)

    def _error_text(self, response: requests.Response, body: bytes) -> str:
        """The ``error`` of a non-2xx answer; whatever its body holds, the status stands."""
        code = response.status_code
        try:
            # Redact before anything is cut short, so no prefix of the token can survive.
            text = body.decode(response.encoding or "utf-8", errors="replace") if body else ""
            return self._redact(_describe(response, self._redact(text)))
        except Exception:  # a body no reader copes with must not cost the status code
            log.debug("Could not describe the HTTP %s answer's body", code, exc_info=True)
            return _squash(f"HTTP {code} {response.reason or ''}")

    def _failure(self, outcome: str, exc: BaseException, started: float) -> CallResult:
        text = self._redact(f"{type(exc).__name__}: {_exception_reason(exc)}")
        return CallResult(None, outcome, _truncate(text, ERROR_CAP), _elapsed_ms(started))

    def _redact(self, text: str) -> str:
        # The logs' rule: a short (test) token is masked only as a whole word, so it cannot
        # garble the error column the way a plain replace would.
        return self._mask.sub("***", text) if self._mask else text


def parse_buckets(headers: Mapping[str, str]) -> tuple[RateLimitBucket, ...]:
    """The rate-limit buckets present in ``headers`` (a case-insensitive mapping)."""
    buckets = []
    for name, prefix in BUCKETS:
        raw = [headers.get(f"{prefix}-{part}") for part in ("Limit", "Remaining", "Reset")]
        if all(value is None for value in raw):
            continue
        limit, remaining = _as_count(raw[0]), _as_count(raw[1])
        # A limit of 0 calls a window would stop every call: not a value to act on.
        buckets.append(RateLimitBucket(name, limit or None, remaining, _parse_number(raw[2])))
    return tuple(buckets)


# Plain ASCII digits only: float() and int() would also take "1_000", "1e9", "+5" or
# non-ASCII digits, none of which a server means as a count or a time.
_COUNT = re.compile(r"[0-9]{1,18}")
_NUMBER = re.compile(r"[0-9]{1,18}(?:\.[0-9]{1,9})?")


def _parse_number(value: str | None) -> float | None:
    """A plain non-negative decimal (``1700000000``, ``1700000000.5``) from a header, or None."""
    if value is None or not _NUMBER.fullmatch(value.strip()):
        return None
    return float(value.strip())


def _as_count(value: str | None) -> int | None:
    """A plain non-negative integer from a header value, else None."""
    if value is None or not _COUNT.fullmatch(value.strip()):
        return None
    return int(value.strip())


def _outcome(code: int) -> str:
    if 200 <= code <= 299:
        return "success"
    return "rate_limited" if code == 429 else "http_error"


def _read_capped(response: requests.Response, deadline: float) -> bytes:
    """Up to BODY_CAP bytes of the body; a stalled or broken body just ends the read."""
    chunks: list[bytes] = []
    size = 0
    try:
        for chunk in response.iter_content(chunk_size=8192):
            chunks.append(chunk)
            size += len(chunk)
            if size >= BODY_CAP or clock.monotonic() >= deadline:
                break
    except (requests.RequestException, OSError) as exc:
        log.debug("Response body read stopped early: %s", type(exc).__name__)
    return b"".join(chunks)[:BODY_CAP]


def _describe(response: requests.Response, text: str) -> str:
    """The short reason for a non-2xx answer, from its body text when it has a usable one."""
    code = response.status_code
    if 300 <= code <= 399:
        location = response.headers.get("Location", "")
        message = f"HTTP {code} {response.reason}: redirect to {location} not followed"
        return _truncate(_squash(message), ERROR_CAP)
    reason = _from_json(text) or _from_text(text)
    return _truncate(reason or _squash(f"HTTP {code} {response.reason or ''}"), ERROR_CAP)


def _from_json(text: str) -> str | None:
    """``error: error_description`` (401 shape) or ``title: detail`` (problem+json)."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: nested thousands deep
        return None
    if not isinstance(data, dict):
        return None
    for first, second in (("error", "error_description"), ("title", "detail")):
        parts = [str(data[key]).strip() for key in (first, second) if data.get(key)]
        if parts:
            return _squash(": ".join(parts))
    return _squash(str(data["message"])) if data.get("message") else None


_DROP_BLOCKS = re.compile(r"<(script|style)\b.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_TAGS = re.compile(r"<[^>]*>")


def _from_text(text: str) -> str:
    """The first characters of a non-JSON body, HTML tags and extra whitespace removed."""
    text = _TAGS.sub(" ", _DROP_BLOCKS.sub(" ", text))
    return _truncate(_squash(html.unescape(text)), TEXT_CAP)


def _exception_reason(exc: BaseException) -> str:
    """The innermost useful message: requests wraps urllib3's MaxRetryError around the cause."""
    reason: object = exc
    for _ in range(4):
        inner = getattr(reason, "reason", None) or (
            reason.args[0] if isinstance(reason, BaseException) and reason.args else None
        )
        if not isinstance(inner, BaseException):
            break
        reason = inner
    return _squash(str(reason)) or type(reason).__name__


def _squash(text: str) -> str:
    """One line of printable text: whitespace runs become one space, the rest is escaped."""
    return printable(" ".join(text.split()))


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def _elapsed_ms(started: float) -> int:
    return max(0, round((clock.monotonic() - started) * 1000))
