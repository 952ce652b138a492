"""Failure notifications (webhook), healthchecks-style pings, and systemd's ``sd_notify``.

A firing *fails* when its final outcome is anything but ``success``, ``skipped`` or
``claimed-elsewhere``: ``missed`` and ``interrupted`` count (the measurement did not happen),
while a skipped firing (its predecessor still running) and one another instance ran are
neutral: they neither extend nor end a streak. After ``after`` consecutive failed firings of
one (job, test) the webhook gets ONE ``failing`` message; the next success after it gets ONE
``recovered`` message. Streaks live in this process, so with several instances each counts
the firings it ran.

With ``notify.results`` on, the results of each rerun (SPEC 7) keep a second streak per
(job, test), separate from call failures, under the same rules: a follow-up that ends with
any agent not ok is a failed firing, one whose agents are all ok a success, and one that
read no agent (``none``, ``error``, ``unknown-type``) is neutral. Its messages carry
``"streak": "results"``; no ping is sent for results.

Every send happens on one background thread (in order, each bounded by ``timeout``), so a
slow or dead endpoint never delays a firing; a failed send is logged as a warning, never
raised. ``timeout`` bounds the whole send, not each socket read (a watchdog shuts the socket
of an endpoint that trickles its answer), and at most ``READ_CAP`` bytes of any answer are
read: its status is all a send needs. Log lines name only the endpoint's host: webhook and
ping URLs carry secrets.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from scheduler import USER_AGENT
from scheduler.config.model import NotifyConfig

if TYPE_CHECKING:  # requests costs ~100 ms to import; config loading must not pay it
    import requests

log = logging.getLogger(__name__)

NEUTRAL = frozenset({"skipped", "claimed-elsewhere"})
RESULTS = "results"  # the third part of a results streak's key: (job, test, "results")
ERROR_CAP = 300  # characters of ``last_error`` in a message
QUEUE_SIZE = 1000  # sends waiting at most; beyond that new ones are dropped (and logged)
READ_CAP = 4096  # bytes of an answer read at most (to let a small one keep its connection)
DEADLINE_MARGIN = 0.5  # seconds past a send's timeout before the watchdog cuts it off


@dataclass
class _Streak:
    failures: int = 0
    since: datetime | None = None
    notified: bool = False


@dataclass(frozen=True)
class _Send:
    method: str
    url: str
    timeout: float
    json: dict[str, Any] | None = None
    body: str | None = None


class Notifier:
    """Tracks failure streaks per (job, test) and sends webhooks and pings in the background."""

    def __init__(
        self, session: requests.Session | None = None, *, instance: str | None = None
    ) -> None:
        import requests

        from scheduler.api.deadline import mount_watched

        self._session = session or mount_watched(requests.Session())
        self._own_session = session is None
        self._session.headers.setdefault("User-Agent", USER_AGENT)
        self.instance = instance
        self._lock = threading.Lock()
        self._streaks: dict[tuple[str, ...], _Streak] = {}
        self._active: dict[tuple[str, str], list[Any]] = {}  # key -> [run id, depth]
        self._queue: queue.Queue[_Send | None] = queue.Queue(QUEUE_SIZE)
        self._closed = False
        self._worker = threading.Thread(target=self._work, name="notify", daemon=True)
        self._worker.start()

    # -- the daemon's calls ---------------------------------------------------------------
    def firing_started(self, job: str, test_id: str, cfg: NotifyConfig) -> None:
        """Ping ``{ping_url}/start``; nothing when this (job, test) already has a firing open.

        A second firing while one runs is the one the runner will skip, so it pings nothing.
        """
        with self._lock:
            active = self._active.get((job, test_id))
            if active is not None:
                active[1] += 1
                return
            rid = str(uuid.uuid4())
            self._active[(job, test_id)] = [rid, 1]
        if cfg.ping_url:
            self._enqueue(_Send("POST", _ping(cfg.ping_url, "start", rid), cfg.timeout, body=""))

    def firing_finished(
        self,
        job: str,
        test_id: str,
        outcome: str,
        error: str | None,
        when: datetime,
        cfg: NotifyConfig,
    ) -> None:
        """Record a firing's final outcome; ping success or ``/fail``; message on streak edges.

        ``when`` is the firing's ``scheduled_for``; it becomes ``since`` of a new streak.
        """
        key = (job, test_id)
        with self._lock:
            rid = self._close_active(key)
            message = None
            if outcome not in NEUTRAL:
                message = self._advance(key, outcome, error, when, cfg.after)
        if cfg.ping_url and outcome not in NEUTRAL:
            suffix = "" if outcome == "success" else "fail"
            body = f"{job} test {test_id}: {outcome}" + (f": {error[:ERROR_CAP]}" if error else "")
            self._enqueue(_Send("POST", _ping(cfg.ping_url, suffix, rid), cfg.timeout, body=body))
        if message is not None and cfg.webhook:
            self._enqueue(_Send("POST", cfg.webhook, cfg.timeout, json=message))

    def results_finished(
        self,
        job: str,
        test_id: str,
        failed: bool | None,
        error: str | None,
        when: datetime,
        cfg: NotifyConfig,
    ) -> None:
        """Record a follow-up's end in the (job, test, "results") streak when ``cfg.results``.

        ``failed``: True when any agent was not ok, False when all were, None when no agent
        was read (neutral). ``when`` is when the run was sent; ``error`` the first agent's.
        """
        if not cfg.results or failed is None:
            return
        outcome = "results-failed" if failed else "success"
        with self._lock:
            message = self._advance((job, test_id, RESULTS), outcome, error, when, cfg.after)
        if message is not None and cfg.webhook:
            self._enqueue(_Send("POST", cfg.webhook, cfg.timeout, json=message))

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued for up to ``timeout`` seconds, then stop the worker."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            log.warning("Notifications still queued at shutdown were dropped")
        self._worker.join(timeout)
        if self._worker.is_alive():
            log.warning("Gave up waiting for notifications to be sent at shutdown")
        elif self._own_session:
            self._session.close()

    # -- state (caller holds the lock) ------------------------------------------------------
    def _close_active(self, key: tuple[str, str]) -> str | None:
        active = self._active.get(key)
        if active is None:
            return None
        active[1] -= 1
        if active[1] <= 0:
            del self._active[key]
        return str(active[0])

    def _advance(
        self, key: tuple[str, ...], outcome: str, error: str | None, when: datetime, after: int
    ) -> dict[str, Any] | None:
        """Move the streak of ``key``; the message to send when it crosses an edge."""
        streak = self._streaks.setdefault(key, _Streak())
        if outcome == "success":
            del self._streaks[key]
            if streak.notified and streak.since is not None:
                return self._recovered(key, streak, when)
            return None
        streak.failures += 1
        streak.since = streak.since or when
        if streak.notified or streak.failures < after:
            return None
        streak.notified = True
        return self._failing(key, streak, outcome, error)

    # -- messages ---------------------------------------------------------------------------
    def _failing(
        self, key: tuple[str, ...], streak: _Streak, outcome: str, error: str | None
    ) -> dict[str, Any]:
        job, test_id = key[0], key[1]
        assert streak.since is not None
        last_error = (error or "")[:ERROR_CAP] or None
        what = "had agents failing in" if key[2:] == (RESULTS,) else "failed"
        text = (
            f':rotating_light: te-scheduler: job "{job}" test {test_id} {what} '
            f"{streak.failures} firings in a row since {_iso(streak.since)}; "
            f"last: {outcome}" + (f": {last_error}" if last_error else "")
        )
        return self._payload(
            "failing",
            text,
            key,
            failures=streak.failures,
            last_outcome=outcome,
            last_error=last_error,
            since=_iso(streak.since),
        )

    def _recovered(self, key: tuple[str, ...], streak: _Streak, when: datetime) -> dict[str, Any]:
        job, test_id = key[0], key[1]
        assert streak.since is not None
        what = "all agents ok" if key[2:] == (RESULTS,) else "recovered"
        text = (
            f':white_check_mark: te-scheduler: job "{job}" test {test_id} {what} at '
            f"{_iso(when)} after {streak.failures} failed firings "
            f"(failing since {_iso(streak.since)})"
        )
        return self._payload(
            "recovered",
            text,
            key,
            failures=streak.failures,
            since=_iso(streak.since),
            recovered_at=_iso(when),
        )

    def _payload(
        self, event: str, text: str, key: tuple[str, ...], **fields: Any
    ) -> dict[str, Any]:
        payload = {"text": text, "event": event, "job": key[0], "test_id": key[1], **fields}
        if key[2:] == (RESULTS,):  # call-failure messages keep their shape
            payload["streak"] = RESULTS
        if self.instance:
            payload["instance"] = self.instance
        return payload

    # -- the worker -------------------------------------------------------------------------
    def _enqueue(self, send: _Send) -> None:
        if self._closed:
            log.debug("Notifier closed; not sending to %s", _host(send.url))
            return
        try:
            self._queue.put_nowait(send)
        except queue.Full:
            log.warning("Notification queue full; dropped a send to %s", _host(send.url))

    def _work(self) -> None:
        while True:
            send = self._queue.get()
            if send is None:
                return
            self._deliver(send)

    def _deliver(self, send: _Send) -> None:
        import requests

        from scheduler.api.deadline import WATCHDOG

        try:
            with WATCHDOG.watch(send.timeout + DEADLINE_MARGIN):
                response = self._session.request(
                    send.method,
                    send.url,
                    json=send.json,
                    data=None if send.body is None else send.body.encode(),
                    timeout=send.timeout,
                    allow_redirects=False,
                    stream=True,  # the body is never wanted; a huge one must not be read
                )
                _drain(response)
        except requests.RequestException as exc:
            # The exception text repeats the URL and its secret path; the type is enough.
            log.warning("Notification to %s failed: %s", _host(send.url), type(exc).__name__)
            return
        except Exception as exc:  # a notification must never take the worker down
            log.warning("Notification to %s failed: %r", _host(send.url), exc)
            return
        if not 200 <= response.status_code < 300:
            log.warning(
                "Notification to %s answered HTTP %d", _host(send.url), response.status_code
            )


def _drain(response: requests.Response) -> None:
    """Read at most READ_CAP bytes of the answer, then close it; a broken body is ignored."""
    import requests

    try:
        next(response.iter_content(READ_CAP), None)
    except (requests.RequestException, OSError):
        pass  # the status has arrived; the body was only read to free the connection
    finally:
        response.close()


def _ping(base: str, suffix: str, rid: str | None) -> str:
    """``base`` with ``/suffix`` appended to its path and ``rid`` to its query."""
    parts = urlsplit(base)
    path = parts.path.rstrip("/") + (f"/{suffix}" if suffix else "")
    query = parse_qsl(parts.query, keep_blank_values=True)
    if rid:
        query.append(("rid", rid))
    return urlunsplit(parts._replace(path=path or "/", query=urlencode(query)))


def _host(url: str) -> str:
    try:
        return urlsplit(url).netloc.rpartition("@")[2] or "?"
    except ValueError:
        return "?"


def _iso(when: datetime) -> str:
    aware = when if when.tzinfo else when.replace(tzinfo=timezone.utc)
    return aware.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


# -- systemd ------------------------------------------------------------------------------------


def sd_notify(state: str) -> bool:
    """Send ``state`` (``READY=1``, ``STOPPING=1``, ``WATCHDOG=1``) to systemd.

    False when not started by systemd with ``Type=notify`` (no ``NOTIFY_SOCKET``) or when the
    send fails; never raises. Supports path and abstract (``@name``) sockets.
    """
    address = os.environ.get("NOTIFY_SOCKET", "")
    if address.startswith("@"):
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        return False  # unset, or a vsock: address this daemon has no use for
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("sd_notify(%s) failed: %s", state.split("\n")[0], exc)
        return False
    return True


def watchdog_seconds() -> float | None:
    """The interval to send ``WATCHDOG=1`` at (half of ``WatchdogSec=``), or None when off."""
    usec, pid = os.environ.get("WATCHDOG_USEC", ""), os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2_000_000
