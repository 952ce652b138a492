"""Hostile peers at real boundaries: trickling and nested answers, forged text, odd files, signals.

Issue 11 ("Reliability II"): each test here fails on the code before the fix it pins.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest

from scheduler.api.client import Caller, CallResult
from scheduler.config import ApiConfig, load_token
from scheduler.config.model import NotifyConfig
from scheduler.notify import Notifier
from tests.conftest import cli_env, run_cli, write_config

TOKEN = "tok-8f1c2d9e0a"


@pytest.fixture(autouse=True)
def no_env_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loopback calls must not go through a proxy the machine happens to set."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


class TrickleServer:
    """Reads a request head, sends ``head`` at once, then ``drip`` two bytes a second.

    Each byte comes well within the per-read timeout (1 s here): only a bound on the whole
    attempt can end the call.
    """

    def __init__(self, head: bytes = b"", drip: bytes = b"x" * 10_000) -> None:
        self.head, self.drip = head, drip
        self.stop = threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v7"
        threading.Thread(target=self._serve, daemon=True).start()

    def close(self) -> None:
        self.stop.set()
        self.sock.close()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._talk, args=(conn,), daemon=True).start()

    def _talk(self, conn: socket.socket) -> None:
        with conn:
            buffer = b""
            while b"\r\n\r\n" not in buffer:
                data = conn.recv(65536)
                if not data:
                    return
                buffer += data
            try:
                conn.sendall(self.head)
                for byte in self.drip:
                    if self.stop.wait(0.5):
                        return
                    conn.sendall(bytes([byte]))
            except OSError:
                return  # the client hung up: what a bounded client does


@pytest.fixture
def trickle() -> Iterator[type[TrickleServer]]:
    servers: list[TrickleServer] = []

    def make(head: bytes = b"", drip: bytes = b"x" * 10_000) -> TrickleServer:
        servers.append(TrickleServer(head, drip))
        return servers[-1]

    yield make  # type: ignore[misc]
    for server in servers:
        server.close()


def timed_send(url: str, timeout: float = 1.0) -> tuple[CallResult, float]:
    caller = Caller(ApiConfig(base_url=url, timeout=timeout), TOKEN)
    try:
        started = time.monotonic()
        result = caller.send("105", None)
        return result, time.monotonic() - started
    finally:
        caller.close()


# -- 1. api.timeout bounds the whole attempt ---------------------------------------------------


def test_a_status_line_sent_a_byte_a_second_is_a_timeout_within_the_bound(trickle) -> None:
    server = trickle(drip=b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    result, elapsed = timed_send(server.url, timeout=1.0)
    assert (result.status_code, result.outcome) == (None, "timeout")
    assert result.error == "Timeout: no complete answer within 1 s"
    assert result.is_retryable
    assert 1.0 <= elapsed < 2.5  # timeout + the watchdog's 0.5 s margin, and slack


def test_headers_sent_a_byte_at_a_time_are_cut_off_and_the_status_stands(trickle) -> None:
    server = trickle(head=b"HTTP/1.1 503 Slow Down\r\n", drip=b"X-Slow: " + b"y" * 1000)
    result, elapsed = timed_send(server.url, timeout=1.0)
    assert (result.status_code, result.outcome) == (503, "http_error")
    assert elapsed < 2.5


def test_a_201_whose_body_then_trickles_is_a_success_within_the_bound(trickle) -> None:
    server = trickle(head=b"HTTP/1.1 201 Created\r\nContent-Length: 1000000\r\n\r\n")
    result, elapsed = timed_send(server.url, timeout=1.0)
    assert (result.status_code, result.outcome, result.error) == (201, "success", None)
    assert not result.is_retryable
    assert elapsed < 2.5


def test_a_500_whose_body_trickles_keeps_its_status(trickle) -> None:
    head = b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 1000000\r\n\r\nbroken: "
    server = trickle(head=head, drip=b"z" * 100)
    result, elapsed = timed_send(server.url, timeout=1.0)
    assert (result.status_code, result.outcome) == (500, "http_error")
    assert result.error == "HTTP 500 Internal Server Error"
    assert elapsed < 2.5


def test_a_trickled_attempt_is_recorded_as_timeout_by_the_cli(trickle, tmp_path: Path) -> None:
    server = trickle(drip=b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    db_path = tmp_path / "history.db"
    cfg = write_config(
        tmp_path / "jobs.yaml",
        """
        defaults: {retry: {attempts: 1}}
        jobs:
          - {name: slow, tests: [105], schedule: {every: 1h}}
        """,
        base_url=server.url,
        db_url=f"sqlite:///{db_path}",
        api_extra="  timeout: 1s\n  rate_limit: 600/min\n",
    )
    started = time.monotonic()
    result = run_cli("-c", str(cfg), "trigger", "slow", env=cli_env(), timeout=30)
    assert time.monotonic() - started < 15
    assert result.returncode == 1, result.stderr
    with sqlite3.connect(db_path) as conn:
        found = conn.execute("SELECT status_code, outcome, error FROM attempts").fetchall()
    assert found == [(None, "timeout", "Timeout: no complete answer within 1 s")]


# -- 2. a nested JSON error body ---------------------------------------------------------------


def answer(status: str, body: bytes, extra: bytes = b"") -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: application/problem+json\r\n"
        f"Content-Length: {len(body)}\r\n".encode()
        + extra
        + b"\r\n"
        + body
    )


NESTED = b'{"title":' * 3000 + b"1" + b"}" * 3000


@pytest.mark.parametrize(
    ("status", "outcome", "retryable"),
    [("404 Not Found", "http_error", False), ("429 Too Many Requests", "rate_limited", False)],
)
def test_a_nested_json_body_keeps_the_status(
    trickle, status: str, outcome: str, retryable: bool
) -> None:
    server = trickle(
        head=answer(status, NESTED, b"X-Instant-Test-Rate-Limit-Reset: 2000000000\r\n")
    )
    result, _ = timed_send(server.url, timeout=3.0)
    assert (result.status_code, result.outcome) == (int(status[:3]), outcome)
    assert result.is_retryable is retryable
    assert result.error is not None and result.error.startswith('{"title":{"title":')
    assert len(result.error) <= 200 and "\n" not in result.error
    if outcome == "rate_limited":
        assert [b.reset for b in result.buckets] == [2000000000.0]


# -- 5. untrusted text: the error column and the logs ------------------------------------------

HOSTILE = 'x" outcome=success job="other\x00\x1b[31m\u202eevil\r\nINFO forged'


def test_the_error_column_keeps_only_printable_text(trickle) -> None:
    body = json.dumps({"title": HOSTILE}).encode()
    server = trickle(head=answer("400 Bad Request", body))
    result, _ = timed_send(server.url, timeout=3.0)
    assert result.error == 'x" outcome=success job="other\\x00\\x1b[31m\\u202eevil INFO forged'
    assert result.error.isprintable()


# -- 3. the notifier reads at most a few KiB of any answer, within its timeout -----------------


class EndlessAnswer:
    """Answers ``Content-Length: 2147483648`` and streams (200 MB at most, then stalls)."""

    def __init__(self) -> None:
        self.hung_up = threading.Event()
        self.sent = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/ping/uuid"
        threading.Thread(target=self._serve, daemon=True).start()

    def close(self) -> None:
        self.sock.close()

    def _serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn:
            conn.recv(65536)  # the request (a ping is tiny)
            try:
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2147483648\r\n\r\n")
                chunk = b"\0" * 65536
                while self.sent < 200_000_000:  # a cap, so the unfixed code fails gently
                    conn.sendall(chunk)
                    self.sent += len(chunk)
                conn.settimeout(30)
                while conn.recv(65536):
                    pass
            except OSError:
                pass
            self.hung_up.set()


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_a_ping_answered_with_an_endless_body_costs_little_memory_and_time() -> None:
    server = EndlessAnswer()
    notifier = Notifier()
    try:
        before = peak = rss_bytes()
        started = time.monotonic()
        notifier.firing_started("job", "105", NotifyConfig(ping_url=server.url, timeout=2.0))
        while not server.hung_up.wait(0.05) and time.monotonic() - started < 30:
            peak = max(peak, rss_bytes())
        elapsed = time.monotonic() - started
    finally:
        notifier.close()
        server.close()
    assert server.hung_up.is_set()
    assert elapsed < 3.5  # the 2 s timeout, the watchdog's margin, and slack
    assert peak - before < 32 * 1024 * 1024


def test_a_webhook_trickling_its_status_line_is_cut_off_at_the_timeout(
    trickle, caplog: pytest.LogCaptureFixture
) -> None:
    server = trickle(drip=b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    notifier = Notifier()
    cfg = NotifyConfig(webhook=server.url, after=1, timeout=1.0)
    try:
        started = time.monotonic()
        notifier.firing_finished("job", "105", "timeout", None, datetime.now(timezone.utc), cfg)
        while "failed" not in caplog.text and time.monotonic() - started < 30:
            time.sleep(0.05)
        elapsed = time.monotonic() - started
    finally:
        notifier.close()
    assert "Notification to 127.0.0.1" in caplog.text
    assert elapsed < 2.5


FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


def hostile_trigger(trickle, tmp_path: Path, log_format: str) -> list[str]:
    """``trigger`` a job whose test the API answers 400 with HOSTILE as its title."""
    body = json.dumps({"title": HOSTILE}).encode()
    server = trickle(head=answer("400 Bad Request", body))
    cfg = write_config(
        tmp_path / "jobs.yaml",
        """
        defaults: {retry: {attempts: 1}}
        jobs:
          - {name: hostile, tests: [105], schedule: {every: 1h}}
        """,
        base_url=server.url,
        db_url=f"sqlite:///{tmp_path / 'history.db'}",
        api_extra="  timeout: 3s\n  rate_limit: 600/min\n",
    )
    result = run_cli("--log-format", log_format, "-c", str(cfg), "trigger", "hostile")
    assert result.returncode == 1, result.stderr
    return result.stderr.splitlines()


def test_api_text_cannot_forge_or_hide_fields_of_a_text_log_line(trickle, tmp_path: Path) -> None:
    lines = hostile_trigger(trickle, tmp_path, "text")
    attempt = [line for line in lines if "attempt=1" in line]
    assert len(attempt) == 1, lines
    fields = FIELD.findall(attempt[0])
    assert [v for k, v in fields if k == "outcome"] == ["http_error"]
    assert [v for k, v in fields if k == "job"] == ['"hostile"']
    error = [v for k, v in fields if k == "error"]
    assert error == [r'"x\" outcome=success job=\"other\\x00\\x1b[31m\\u202eevil INFO forged"']
    assert not any(line.startswith("INFO forged") for line in lines)
    assert all(line.isprintable() for line in lines)


def test_json_log_lines_carry_api_text_escaped(trickle, tmp_path: Path) -> None:
    lines = hostile_trigger(trickle, tmp_path, "json")
    entries = [json.loads(line) for line in lines if line.startswith("{")]
    attempt = [e for e in entries if e.get("attempt") == 1]
    assert [(e["outcome"], e["job"]) for e in attempt] == [("http_error", "hostile")]
    assert 'error="x" outcome=success job="other\\x00' in attempt[0]["message"]
    assert all(line.isascii() and line.isprintable() for line in lines)


def test_a_format_and_a_secret_survive_the_text_formatter() -> None:
    from scheduler.logs import TextFormatter, _secrets, add_secret

    add_secret("tok-SECRET-0123456789")
    record = logging.LogRecord(
        "x",
        logging.INFO,
        __file__,
        1,
        'job="%s" n=%05d %s%%',
        ('a"b', 7, "tok-SECRET-0123456789"),
        None,
    )
    assert _secrets.filter(record)
    line = TextFormatter().format(record)
    assert line.endswith(r'job="a\"b" n=00007 ***%')


# -- 6. the token file ---------------------------------------------------------------------------


def token_config(tmp_path: Path, token_file: str) -> Path:
    (tmp_path / "jobs.yaml").write_text(
        f"version: 1\napi:\n  base_url: http://127.0.0.1:9/v7\n  token_file: {token_file}\n"
        f"history:\n  url: sqlite:///{tmp_path / 'history.db'}\n"
        "jobs:\n  - {name: j, tests: [105], schedule: {every: 1h}}\n"
    )
    return tmp_path / "jobs.yaml"


def test_a_fifo_as_token_file_is_refused_at_once(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "token")
    started = time.monotonic()
    result = run_cli("-c", str(token_config(tmp_path, "token")), "trigger", "j", timeout=20)
    assert time.monotonic() - started < 15
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        f"te-scheduler: error: the token file {tmp_path / 'token'} is not a regular file "
        "(a FIFO); point api.token_file at a file holding the token"
    )


def test_a_directory_as_token_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "token").mkdir()
    result = run_cli("-c", str(token_config(tmp_path, "token")), "trigger", "j", timeout=20)
    assert result.returncode == 2
    assert "is not a regular file (a directory)" in result.stderr


@pytest.mark.parametrize(
    ("mode", "who"), [(0o644, "group and others"), (0o640, "its group"), (0o604, "others")]
)
def test_a_token_file_others_can_read_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, mode: int, who: str
) -> None:
    path = tmp_path / "token"
    path.write_text("tok-abc-123\n")
    path.chmod(mode)
    assert load_token(ApiConfig(token_file=path)) == "tok-abc-123"
    assert f"The token file {path} is readable by {who}; chmod 600 it" in caplog.text


def test_a_private_token_file_is_read_quietly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "token"
    path.write_text("tok-abc-123\n")
    path.chmod(0o600)
    assert load_token(ApiConfig(token_file=path)) == "tok-abc-123"
    assert caplog.text == ""


# -- 7. history.url in a missing directory ------------------------------------------------------


@pytest.mark.parametrize("command", [["db", "upgrade"], ["trigger", "j"]])
def test_a_database_in_a_missing_directory_is_an_error_not_a_new_directory(
    tmp_path: Path, command: list[str]
) -> None:
    cfg = write_config(
        tmp_path / "jobs.yaml",
        "jobs:\n  - {name: j, tests: [105], schedule: {every: 1h}}\n",
        base_url="http://127.0.0.1:9/v7",
        db_url="sqlite:///data/nope/history.db",  # relative: to the config file's folder
    )
    result = run_cli("-c", str(cfg), *command)
    assert result.returncode == 3, result.stderr
    missing = tmp_path / "data" / "nope"
    assert result.stderr.strip() == (
        f"te-scheduler: error: cannot create the database file {missing / 'history.db'}: "
        f"{missing} does not exist (create the directory, or fix history.url)"
    )
    assert not (tmp_path / "data").exists()


def test_a_database_next_to_the_config_file_is_created_there(tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path / "jobs.yaml",
        "jobs:\n  - {name: j, tests: [105], schedule: {every: 1h}}\n",
        db_url="sqlite:///history.db",
    )
    result = run_cli("-c", str(cfg), "db", "upgrade", cwd=Path("/"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "history.db").stat().st_mode & 0o777 == 0o600


# -- 8. simulate stops on SIGINT even when started with SIGINT ignored ---------------------------


def test_simulate_started_with_sigint_ignored_still_stops_on_sigint(tmp_path: Path) -> None:
    log_path = tmp_path / "simulate.log"
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "scheduler", "simulate", "--port", "0"],
            env=cli_env(),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            # What `te-scheduler simulate &` in a non-interactive shell script does to SIGINT.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
        )
        try:
            deadline = time.monotonic() + 20
            while "Simulated ThousandEyes API at" not in log_path.read_text():
                assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.05)
            proc.send_signal(signal.SIGINT)
            code = proc.wait(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert code == 0, log_path.read_text()
