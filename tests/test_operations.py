"""Operating a running daemon: /metrics, /healthz and failure notifications, end to end."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import key, wait_until, write_config

pytestmark = pytest.mark.slow

SPEC_METRICS = {
    "te_scheduler_attempts": "counter",
    "te_scheduler_http_responses": "counter",
    "te_scheduler_request_duration_seconds": "histogram",
    "te_scheduler_firing_lag_seconds": "histogram",
    "te_scheduler_rate_limit_remaining": "gauge",
    "te_scheduler_next_fire_timestamp_seconds": "gauge",
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def scrape(port: int) -> dict[str, Any]:
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    samples: dict[str, Any] = {}
    for family in text_string_to_metric_families(text):
        samples[family.name] = family
    return samples


def value(family: Any, sample_name: str, **labels: str) -> float:
    matches = [
        s.value
        for s in family.samples
        if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert matches, f"no {sample_name}{labels} in {family.samples}"
    return float(sum(matches))


def test_metrics_and_healthz_of_a_running_daemon(tmp_path: Path, simulator, db_url, start_daemon):
    port = free_port()
    config = write_config(
        tmp_path / "jobs.yaml",
        f"""\
metrics:
  listen: 127.0.0.1:{port}
jobs:
  - name: pulse
    tests: [105]
    schedule: {{every: 1s}}
""",
        base_url=simulator.url,
        db_url=db_url,
    )
    daemon = start_daemon(config)

    def successes() -> float:
        attempts = scrape(port).get("te_scheduler_attempts")
        return (
            value(attempts, "te_scheduler_attempts_total", job="pulse", outcome="success")
            if attempts and attempts.samples
            else 0.0
        )

    # The call reaches the server a moment before its attempt is counted: poll the metric.
    daemon.wait_for_log("outcome=success")
    wait_until(lambda: successes() >= 3, what="three successful attempts counted")
    families = scrape(port)
    for name, kind in SPEC_METRICS.items():
        assert families[name].type == kind, name
    attempts = families["te_scheduler_attempts"]
    assert value(attempts, "te_scheduler_attempts_total", job="pulse", outcome="success") >= 3
    responses = families["te_scheduler_http_responses"]
    assert value(responses, "te_scheduler_http_responses_total", code="200") >= 3
    durations = families["te_scheduler_request_duration_seconds"]
    assert value(durations, "te_scheduler_request_duration_seconds_count") >= 3
    assert 0 < value(durations, "te_scheduler_request_duration_seconds_sum") < 3 * 5
    lag = families["te_scheduler_firing_lag_seconds"]
    assert value(lag, "te_scheduler_firing_lag_seconds_count") >= 3
    remaining = families["te_scheduler_rate_limit_remaining"]
    assert 0 <= value(remaining, "te_scheduler_rate_limit_remaining", bucket="instant-test") < 24
    next_fire = value(
        families["te_scheduler_next_fire_timestamp_seconds"],
        "te_scheduler_next_fire_timestamp_seconds",
        job="pulse",
    )
    assert time.time() - 1 <= next_fire <= time.time() + 2

    healthy = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
    assert healthy.status_code == 200 and healthy.json()["status"] == "ok"

    # Make the database unusable: the file's place is taken by a directory.
    database = Path(db_url.removeprefix("sqlite:///"))
    shutil.move(database, tmp_path / "moved.db")
    database.mkdir()
    sick = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=10)
    assert sick.status_code == 503
    body = sick.json()
    assert body["status"] == "fail" and "database" in body
    assert daemon.stop(signal.SIGTERM) == 0


class Webhook(ThreadingHTTPServer):
    """A webhook receiver that keeps every JSON message it is sent."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                with server.lock:
                    server.messages.append(json.loads(self.rfile.read(length) or b"{}"))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hook"


def test_a_webhook_hears_once_of_a_failing_test_and_once_of_its_recovery(
    tmp_path: Path, simulator, db_url, start_daemon
):
    hook = Webhook()
    simulator.add_rule("105", 500, '{"title": "Internal Server Error", "detail": "down"}', times=4)
    config = write_config(
        tmp_path / "jobs.yaml",
        f"""\
jobs:
  - name: pulse
    tests: [105]
    schedule: {{every: 1s}}
    retry: {{attempts: 1}}
    notify: {{webhook: "{hook.url}", after: 3}}
""",
        base_url=simulator.url,
        db_url=db_url,
    )
    daemon = start_daemon(config)
    wait_until(lambda: len(hook.messages) >= 2, timeout=30, what="a failure and a recovery")
    time.sleep(1.5)  # more successes must not send more messages
    assert daemon.stop(signal.SIGTERM) == 0
    hook.shutdown()
    failing, recovered = hook.messages
    assert failing["event"] == "failing" and failing["job"] == "pulse"
    assert failing["test_id"] == "105" and failing["failures"] == 3
    assert failing["last_error"] == "Internal Server Error: down" and "text" in failing
    assert recovered["event"] == "recovered" and recovered["test_id"] == "105"


def test_the_daemon_prunes_past_retention_in_the_background(
    tmp_path: Path, simulator, db_url, start_daemon
):
    from datetime import datetime, timedelta, timezone

    from scheduler.store import db, history

    engine = db.make_engine(db_url)
    db.upgrade(engine)
    old = datetime.now(timezone.utc) - timedelta(days=3)
    for n in range(450):  # more than one batch
        slot = old + timedelta(seconds=n)
        history.record_attempt(
            engine,
            key(f"old-{n}", job="gone", aid=None, scheduled_for=slot, instance="host:1"),
            started_at=old + timedelta(seconds=n),
            outcome="success",
            error=None,
            status_code=200,
        )
    jobs = """\
jobs:
  - name: pulse
    tests: [105]
    schedule: {every: 1s}
"""
    cfg = write_config(tmp_path / "jobs.yaml", jobs, base_url=simulator.url, db_url=db_url)
    cfg.write_text(cfg.read_text().replace("history:\n", "history:\n  retention: 1d\n"))
    daemon = start_daemon(cfg)
    daemon.wait_for_log("Pruned 450 history row(s) older than")
    wait_until(
        lambda: any(
            r["job"] == "pulse" and r["outcome"] == "success" for r in history.query(engine)
        ),
        what="the job firing meanwhile",
    )
    daemon.send(signal.SIGTERM)
    assert daemon.proc.wait(timeout=40) == 0
    assert {r["job"] for r in history.query(engine, limit=0)} == {"pulse"}
    engine.dispose()
