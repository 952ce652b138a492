"""Failure webhooks and healthchecks-style pings against a real local HTTP server; sd_notify."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from scheduler.config.model import NotifyConfig
from scheduler.notify import Notifier, sd_notify, watchdog_seconds

T0 = datetime(2026, 11, 27, 12, 0, tzinfo=timezone.utc)
SECRET = "T000/B000/s3cr3t"


@dataclass
class Hit:
    method: str
    path: str
    query: dict[str, list[str]]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


class Recorder(ThreadingHTTPServer):
    """Records every request; answers 200, or waits ``delay`` seconds first."""

    daemon_threads = True

    def __init__(self, delay: float = 0.0) -> None:
        self.hits: list[Hit] = []
        self.delay = delay
        self.release = threading.Event()
        super().__init__(("127.0.0.1", 0), _RecordingHandler)
        threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True).start()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def paths(self) -> list[str]:
        return [hit.path for hit in self.hits]

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that timed out and hung up is what the slow-server test wants

    def close(self) -> None:
        self.release.set()
        self.shutdown()
        self.server_close()


class _RecordingHandler(BaseHTTPRequestHandler):
    server: Recorder

    def _record(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        parts = urlsplit(self.path)
        hit = Hit(self.command, parts.path, parse_qs(parts.query), self.rfile.read(length))
        if self.server.delay:
            self.server.release.wait(self.server.delay)
        self.server.hits.append(hit)
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"OK")

    do_GET = do_POST = _record

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    server = Recorder()
    yield server
    server.close()


@pytest.fixture
def notifier() -> Iterator[Notifier]:
    n = Notifier(instance="host-a:42")
    yield n
    n.close(1.0)


def cfg_for(server: Recorder) -> NotifyConfig:
    return NotifyConfig(
        webhook=f"{server.base}/hook/{SECRET}",
        after=3,
        ping_url=f"{server.base}/ping/abc",
        timeout=2.0,
    )


def fire(
    n: Notifier,
    cfg: NotifyConfig,
    outcome: str,
    at: datetime,
    error: str | None = None,
    job: str = "dns",
    test: str = "105",
) -> None:
    n.firing_started(job, test, cfg)
    n.firing_finished(job, test, outcome, error, at, cfg)


def test_one_failing_message_after_n_and_one_recovery(
    recorder: Recorder, notifier: Notifier
) -> None:
    cfg = cfg_for(recorder)
    slots = [T0 + timedelta(minutes=15 * i) for i in range(8)]
    fire(notifier, cfg, "http_error", slots[0], "Forbidden: no access")
    notifier.firing_started("dns", "105", cfg)  # slot 1 runs long...
    fire(notifier, cfg, "skipped", slots[2], "previous firing still running")  # ...neutral
    notifier.firing_finished("dns", "105", "timeout", "read timed out", slots[1], cfg)
    fire(notifier, cfg, "missed", slots[3], "1 firing(s) missed")  # third failure: message
    fire(notifier, cfg, "interrupted", slots[4], "stopped")  # fourth: nothing more
    fire(notifier, cfg, "success", slots[5])  # recovery message
    fire(notifier, cfg, "http_error", slots[6], "Bad Gateway")  # a new streak of 1
    fire(notifier, cfg, "success", slots[7])  # below the threshold: no recovery message
    notifier.close(5.0)

    ping, hook = "/ping/abc", f"/hook/{SECRET}"
    assert recorder.paths() == [
        f"{ping}/start",
        f"{ping}/fail",
        f"{ping}/start",
        f"{ping}/fail",  # the skipped firing pinged nothing
        f"{ping}/start",
        f"{ping}/fail",
        hook,
        f"{ping}/start",
        f"{ping}/fail",
        f"{ping}/start",
        ping,
        hook,
        f"{ping}/start",
        f"{ping}/fail",
        f"{ping}/start",
        ping,
    ]
    failing, recovered = (hit.json for hit in recorder.hits if hit.path == hook)
    assert failing == {
        "text": ':rotating_light: te-scheduler: job "dns" test 105 failed 3 firings in a row '
        "since 2026-11-27T12:00:00Z; last: missed: 1 firing(s) missed",
        "event": "failing",
        "job": "dns",
        "test_id": "105",
        "failures": 3,
        "last_outcome": "missed",
        "last_error": "1 firing(s) missed",
        "since": "2026-11-27T12:00:00Z",
        "instance": "host-a:42",
    }
    assert recovered == {
        "text": ':white_check_mark: te-scheduler: job "dns" test 105 recovered at '
        "2026-11-27T13:15:00Z after 4 failed firings (failing since 2026-11-27T12:00:00Z)",
        "event": "recovered",
        "job": "dns",
        "test_id": "105",
        "failures": 4,
        "since": "2026-11-27T12:00:00Z",
        "recovered_at": "2026-11-27T13:15:00Z",
        "instance": "host-a:42",
    }


def test_pings_carry_one_run_id_per_firing_and_the_error(
    recorder: Recorder, notifier: Notifier
) -> None:
    cfg = NotifyConfig(ping_url=f"{recorder.base}/ping/abc?create=1", timeout=2.0)
    fire(notifier, cfg, "success", T0)
    fire(notifier, cfg, "rate_limited", T0, "Too Many Requests")
    notifier.close(5.0)
    start1, ok, start2, fail = recorder.hits
    assert [h.path for h in recorder.hits] == [
        "/ping/abc/start",
        "/ping/abc",
        "/ping/abc/start",
        "/ping/abc/fail",
    ]
    assert all(h.method == "POST" and h.query["create"] == ["1"] for h in recorder.hits)
    rid1, rid2 = start1.query["rid"][0], start2.query["rid"][0]
    assert str(uuid.UUID(rid1)) == rid1 and rid1 != rid2
    assert ok.query["rid"] == [rid1] and fail.query["rid"] == [rid2]
    assert fail.body == b"dns test 105: rate_limited: Too Many Requests"


def test_streaks_are_per_test_and_threshold_follows_config(
    recorder: Recorder, notifier: Notifier
) -> None:
    cfg = NotifyConfig(webhook=f"{recorder.base}/hook", after=1, timeout=2.0)
    fire(notifier, cfg, "http_error", T0, "Not Found", test="105")
    fire(notifier, cfg, "claimed-elsewhere", T0, test="106")  # neutral
    fire(notifier, cfg, "network_error", T0, "refused", test="106")
    notifier.close(5.0)
    assert [(h.json["test_id"], h.json["failures"]) for h in recorder.hits] == [
        ("105", 1),
        ("106", 1),
    ]


def test_no_urls_sends_nothing(recorder: Recorder, notifier: Notifier) -> None:
    for _ in range(5):
        fire(notifier, NotifyConfig(), "http_error", T0, "x")
    notifier.close(5.0)
    assert recorder.hits == []


def test_overlapping_firing_pings_once(recorder: Recorder, notifier: Notifier) -> None:
    cfg = NotifyConfig(ping_url=f"{recorder.base}/p", timeout=2.0)
    notifier.firing_started("dns", "105", cfg)
    notifier.firing_started("dns", "105", cfg)  # the runner will skip this one
    notifier.firing_finished("dns", "105", "skipped", "still running", T0, cfg)
    notifier.firing_finished("dns", "105", "success", None, T0, cfg)
    notifier.close(5.0)
    start, done = recorder.hits
    assert (start.path, done.path) == ("/p/start", "/p")
    assert start.query["rid"] == done.query["rid"]


def test_refused_webhook_is_logged_and_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again below: nothing listens there
    cfg = NotifyConfig(
        webhook=f"http://127.0.0.1:{port}/hook/{SECRET}",
        after=1,
        ping_url=f"http://127.0.0.1:{port}/ping/{SECRET}",
        timeout=1.0,
    )
    notifier = Notifier()
    with caplog.at_level(logging.WARNING, logger="scheduler.notify"):
        started = time.monotonic()
        fire(notifier, cfg, "http_error", T0, "Forbidden")
        assert time.monotonic() - started < 0.1
        notifier.close(5.0)
    failures = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert failures == [f"Notification to 127.0.0.1:{port} failed: ConnectionError"] * 3
    assert SECRET not in caplog.text


def test_slow_webhook_does_not_block_firings(caplog: pytest.LogCaptureFixture) -> None:
    slow = Recorder(delay=3.0)
    notifier = Notifier()
    cfg = NotifyConfig(webhook=f"{slow.base}/hook/{SECRET}", after=1, timeout=0.3)
    try:
        with caplog.at_level(logging.WARNING, logger="scheduler.notify"):
            started = time.monotonic()
            for i in range(3):
                notifier.firing_finished("dns", "105", "http_error", "x", T0, cfg)
                notifier.firing_finished("dns", "105", "success", None, T0, cfg)
            assert time.monotonic() - started < 0.1
            notifier.close(5.0)
    finally:
        slow.close()
    timeouts = [r for r in caplog.records if r.getMessage().endswith("failed: ReadTimeout")]
    assert len(timeouts) == 6  # three failing + three recovered messages, each timed out
    assert SECRET not in caplog.text


def test_calls_after_close_are_ignored(recorder: Recorder) -> None:
    notifier = Notifier()
    notifier.close(1.0)
    fire(notifier, NotifyConfig(webhook=f"{recorder.base}/h", after=1), "http_error", T0, "x")
    notifier.close(1.0)
    assert recorder.hits == []


def test_notify_config_problems() -> None:
    assert NotifyConfig().problems() == []
    assert (
        NotifyConfig(
            webhook="https://hooks.slack.com/services/x",
            ping_url="http://hc:8000/p",
            after=1,
            timeout=0.5,
        ).problems()
        == []
    )
    bad = NotifyConfig(webhook="ftp://x", ping_url="hc-ping.com/abc", after=0, timeout=0)
    assert [key for key, _ in bad.problems()] == ["webhook", "ping_url", "after", "timeout"]
    assert NotifyConfig(after=True).problems()[0][0] == "after"  # type: ignore[arg-type]


# -- sd_notify ----------------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_sd_notify_path_socket(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(path))
        listener.settimeout(5)
        clean_env.setenv("NOTIFY_SOCKET", str(path))
        assert sd_notify("READY=1") is True
        assert sd_notify("STOPPING=1") is True
        assert [listener.recv(1024), listener.recv(1024)] == [b"READY=1", b"STOPPING=1"]


def test_sd_notify_abstract_socket(clean_env: pytest.MonkeyPatch) -> None:
    name = f"te-scheduler-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind("\0" + name)
        listener.settimeout(5)
        clean_env.setenv("NOTIFY_SOCKET", "@" + name)
        assert sd_notify("READY=1\nSTATUS=firing 3 jobs") is True
        assert listener.recv(1024) == b"READY=1\nSTATUS=firing 3 jobs"


def test_sd_notify_outside_systemd(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    assert sd_notify("READY=1") is False
    clean_env.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens.sock"))
    assert sd_notify("READY=1") is False
    clean_env.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert sd_notify("READY=1") is False


def test_watchdog_seconds(clean_env: pytest.MonkeyPatch) -> None:
    assert watchdog_seconds() is None
    clean_env.setenv("WATCHDOG_USEC", "20000000")
    assert watchdog_seconds() == 10.0
    clean_env.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_seconds() == 10.0
    clean_env.setenv("WATCHDOG_PID", "1")
    assert watchdog_seconds() is None
