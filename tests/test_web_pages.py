"""The status page over HTTP without a browser: escaping, headers, 400/404/405, JSON shapes,
results when their table exists, and `te-scheduler web` as a process (SPEC.md section 8)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy as sa

from scheduler import clock
from scheduler import config as config_mod
from scheduler.store import history, instances
from scheduler.web import pages
from scheduler.web.api import status_routes
from scheduler.web.server import MetricsServer
from tests.conftest import cli_env, key, wait_until, write_config

EVIL = "<script>alert(1)</script><b>x</b>"
JOBS = """\
jobs:
  - name: dns
    tests: ["105"]
    schedule: {every: 5m}
  - name: berlin
    tests: ["201", "202"]
    schedule: {cron: "30 2 * * *", timezone: Europe/Berlin}
  - name: paused
    tests: ["301"]
    schedule: {every: 1h}
    enabled: false
"""


def _record(engine: sa.Engine, n: int, **changes: Any) -> int:
    """Attempt ``n`` of job dns: a finished row ``n`` minutes ago (outcome etc. in changes)."""
    now = clock.now()
    fields = {"outcome": "success", "status_code": 200, "error": None}
    fields.update(changes)
    row = history.record_attempt(
        engine,
        key(f"run-{n}", scheduled_for=now - timedelta(minutes=n)),
        started_at=now - timedelta(minutes=n),
        duration_ms=12,
        **fields,
    )
    assert row is not None
    return row


@pytest.fixture
def site(tmp_path: Path, engine: sa.Engine) -> Iterator[str]:
    """The status page of a three-job config over a migrated SQLite file, on a real socket."""
    config = config_mod.load(write_config(tmp_path / "jobs.yaml", JOBS, db_url=str(engine.url)))
    server = MetricsServer(
        None,
        ("127.0.0.1", 0),
        lambda: (True, {}),
        routes=status_routes(engine, lambda: config),
    ).start()
    yield f"http://127.0.0.1:{server.port}"
    server.stop()


def test_overview_shows_each_job_with_next_fire_and_last_outcome(site: str, engine: Any) -> None:
    _record(engine, 3, outcome="http_error", status_code=500, error="Internal: boom")
    _record(engine, 1)
    answer = requests.get(site + "/", timeout=5)
    assert answer.status_code == 200
    assert answer.headers["Content-Type"] == "text/html; charset=utf-8"
    html = answer.text
    for name in ("dns", "berlin", "paused"):
        assert f'href="./jobs/{name}"' in html
    assert "*/5" not in html and "every 5m" in html and "30 2 * * *" in html
    assert "Europe/Berlin" in html and "CET" in html  # the local time of the next fire
    assert 'class="badge o-success">success</span> <span class="code">200' in html
    assert "50%" in html  # one of two firings in 24 h succeeded
    assert html.count('class="mark o-') == 2
    assert "disabled" in html


def test_every_value_is_escaped(site: str, engine: Any) -> None:
    _record(engine, 1, outcome="http_error", status_code=404, error=EVIL)
    for path in ("/", "/jobs/dns"):
        html = requests.get(site + path, timeout=5).text
        assert "<script>alert" not in html and "<b>x</b>" not in html, path
        assert "&lt;script&gt;alert(1)&lt;/script&gt;&lt;b&gt;x&lt;/b&gt;" in html, path
    data = requests.get(site + "/api/v1/jobs/dns/attempts", timeout=5).json()
    assert data["attempts"][0]["error"] == EVIL  # JSON carries the text as it is


def test_query_filter_echo_is_escaped(site: str) -> None:
    html = requests.get(site + "/", params={"q": '"><script>x'}, timeout=5).text
    assert "<script>x" not in html
    assert "&#34;&gt;&lt;script&gt;x" in html


@pytest.mark.parametrize(
    "path",
    [
        "/jobs/dns?before=abc",
        "/jobs/dns?before=-1",
        "/jobs/dns?before=0",
        "/jobs/dns?before=99999999999999999999999",
        "/jobs/dns?before=1&before=2",
        "/api/v1/jobs/dns/attempts?limit=0",
        "/api/v1/jobs/dns/attempts?limit=501",
        "/api/v1/jobs/dns/attempts?limit=1e3",
        "/api/v1/jobs/dns/attempts?before=%EF%BC%91",  # a fullwidth digit one
        "/?page=0",
        "/?page=x",
        "/api/v1/jobs?q=" + "a" * 101,
        "/?q=%00",
    ],
)
def test_bad_parameters_are_one_line_400s(site: str, path: str) -> None:
    answer = requests.get(site + path, timeout=5)
    assert answer.status_code == 400, answer.text
    assert answer.text.startswith("bad request: ") and answer.text.count("\n") == 1
    assert "Traceback" not in answer.text
    assert answer.headers["X-Content-Type-Options"] == "nosniff"


def test_only_get_and_head(site: str) -> None:
    for path in ("/", "/jobs/dns", "/api/v1/jobs", "/static/page.js"):
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            answer = requests.request(method, site + path, timeout=5)
            assert answer.status_code == 405, (method, path)
            assert answer.headers["Allow"] == "GET, HEAD"
    head = requests.head(site + "/", timeout=5)
    assert head.status_code == 200 and head.content == b""


def test_unknown_paths_and_jobs_are_404(site: str) -> None:
    for path in ("/nope", "/jobs/", "/jobs/no-such-job", "/static/app.py", "/static/x.css"):
        assert requests.get(site + path, timeout=5).status_code == 404, path


def test_headers_forbid_inline_script_and_external_resources(site: str) -> None:
    for path in ("/", "/jobs/dns", "/api/v1/jobs", "/jobs/dns?before=x"):
        headers = requests.get(site + path, timeout=5).headers
        csp = headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["Cache-Control"] == "no-store"
    html = requests.get(site + "/", timeout=5).text
    assert "http://" not in html and "https://" not in html  # nothing fetched from elsewhere
    assert "<script>" not in html and "style=" not in html  # no inline code at all
    script = requests.get(site + "/static/page.js", timeout=5)
    assert script.headers["Content-Type"].startswith("text/javascript")
    assert "location.reload" in script.text


def test_jobs_api_shape(site: str, engine: Any) -> None:
    _record(engine, 2)
    data = requests.get(site + "/api/v1/jobs", timeout=5).json()
    assert set(data) == {"now", "header", "jobs", "page", "pages", "total", "q"}
    assert set(data["header"]) == {
        "instances_alive",
        "attempts_24h",
        "rate_limited_24h",
        "rate_limits",
    }
    assert data["header"]["attempts_24h"] == 1 and data["header"]["rate_limits"] is None
    dns = data["jobs"][0]
    assert dns["name"] == "dns" and dns["tests"] == ["105"] and dns["schedule"] == "every 5m"
    assert set(dns["next_fire"]) == {"utc", "local", "test_id"}
    assert dns["last"]["outcome"] == "success" and dns["last"]["status_code"] == 200
    assert dns["success_rate_24h"] == 1.0 and dns["success_rate_7d"] == 1.0
    assert dns["results"] is None
    assert [m["outcome"] for m in dns["strip"]] == ["success"]
    assert data["jobs"][2]["next_fire"] is None  # disabled
    only = requests.get(site + "/api/v1/jobs?q=BERL", timeout=5).json()
    assert [j["name"] for j in only["jobs"]] == ["berlin"] and only["total"] == 1


def test_attempts_api_pages_newest_first(site: str, engine: Any) -> None:
    ids = [_record(engine, n) for n in range(5, 0, -1)]  # oldest first: ids ascend with time
    first = requests.get(site + "/api/v1/jobs/dns/attempts?limit=2", timeout=5).json()
    assert [a["id"] for a in first["attempts"]] == [ids[4], ids[3]]
    assert first["next_before"] == ids[3]
    url = f"{site}/api/v1/jobs/dns/attempts?limit=2&before={first['next_before']}"
    second = requests.get(url, timeout=5).json()
    assert [a["id"] for a in second["attempts"]] == [ids[2], ids[1]]
    attempt = second["attempts"][0]
    assert {"id", "job", "test_id", "outcome", "status_code", "error", "agents"} <= set(attempt)
    assert attempt["agents"] == [] and attempt["results_summary"] is None
    html = requests.get(f"{site}/jobs/dns?before={ids[1]}", timeout=5).text
    assert f">{ids[0]}</th>" in html and f">{ids[2]}</th>" not in html


def test_job_page_lists_the_next_ten_firings(site: str) -> None:
    html = requests.get(site + "/jobs/berlin", timeout=5).text
    table = html.split('<table class="next">')[1].split("</table>")[0]
    assert table.count("<tr>") == 11  # the header and ten firings
    assert "CET" in table or "CEST" in table


def test_rate_limits_from_the_shared_table(site: str, engine: Any) -> None:
    now = clock.now()
    instances.publish_limit(
        engine, "k", "organization", 200, now.timestamp() + 60, None, now, "host-a:1"
    )
    html = requests.get(site + "/", timeout=5).text
    assert "organization: 200" in html


def test_results_show_when_their_table_exists(site: str, engine: Any) -> None:
    attempt = _record(engine, 1)
    rows = [
        ("Tokyo", 1, None, 0.0, 40.0, 200, "https://app.thousandeyes.com/view?x=1"),
        ("Paris <b>", 1, None, 0.0, 20.0, 200, "javascript:alert(1)"),
        ("Lima", 0, "Timeout: no answer", 100.0, None, None, None),
    ]
    with engine.begin() as conn:  # the table migration 0003 made
        for agent, row in enumerate(rows):
            conn.exec_driver_sql(
                "INSERT INTO results (attempt_id, job, test_id, endpoint, round_id, agent_id, "
                "agent_name, ok, error, loss, latency_ms, response_code, app_link) "
                "VALUES (?, 'dns', '105', 'network', 1, ?, ?, ?, ?, ?, ?, ?, ?)",
                (attempt, str(agent), *row),
            )
    html = requests.get(site + "/", timeout=5).text
    assert "2/3 ok</span> · 20 ms" in html  # the median of the latencies there are
    job = requests.get(site + "/jobs/dns", timeout=5).text
    assert 'href="https://app.thousandeyes.com/view?x=1"' in job
    assert "javascript:" not in job  # never a link, and not shown as one
    assert "Paris &lt;b&gt;" in job and "Timeout: no answer" in job
    data = requests.get(site + "/api/v1/jobs/dns/attempts", timeout=5).json()
    agents = data["attempts"][0]["agents"]
    assert [a["agent_name"] for a in agents] == ["Lima", "Paris <b>", "Tokyo"]
    assert set(agents[0]) == {
        "agent_name",
        "ok",
        "error",
        "loss",
        "latency_ms",
        "response_code",
        "app_link",
    }


def test_without_results_cells_show_a_dash(site: str, engine: Any) -> None:
    _record(engine, 1)
    html = requests.get(site + "/", timeout=5).text
    assert '<td><span class="none">—</span></td>' in html


def test_relative_times_read_like_people_say_them() -> None:
    now = clock.now()
    cases = {
        timedelta(minutes=4): "in 4m",
        timedelta(seconds=45): "in 45s",
        timedelta(hours=2, minutes=5, seconds=9): "in 2h 5m",
        timedelta(hours=3): "in 3h",
        timedelta(days=3, hours=1): "in 3d 1h",
        -timedelta(minutes=90): "1h 30m ago",
        timedelta(0): "now",
    }
    for delta, words in cases.items():
        assert pages.relative(now + delta, now) == words


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
def test_web_command_serves_without_a_daemon_and_stops_on_sigterm(
    tmp_path: Path, engine: Any
) -> None:
    _record(engine, 1, outcome="http_error", status_code=404, error=EVIL)
    config = write_config(tmp_path / "jobs.yaml", JOBS, db_url=str(engine.url))
    port = _free_port()
    env = {k: v for k, v in cli_env().items() if k != "TE_TEST_TOKEN"}  # no token needed
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "scheduler",
            "-c",
            str(config),
            "web",
            "--listen",
            f"127.0.0.1:{port}",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"

        def answers() -> bool:
            try:
                return requests.get(url + "/healthz", timeout=1).status_code == 200
            except requests.ConnectionError:
                return proc.poll() is not None

        wait_until(answers, what="te-scheduler web to answer")
        html = requests.get(url + "/", timeout=5).text
        assert "&lt;script&gt;" in html and "unknown" in html  # no limiter, no shared row
        assert json.loads(requests.get(url + "/api/v1/jobs", timeout=5).text)["total"] == 3
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    assert "Traceback" not in out and "Status page on http://127.0.0.1:" in out


def test_web_command_refuses_a_bad_listen_address(tmp_path: Path, engine: Any) -> None:
    config = write_config(tmp_path / "jobs.yaml", JOBS, db_url=str(engine.url))
    result = subprocess.run(
        [sys.executable, "-m", "scheduler", "-c", str(config), "web", "--listen", "nowhere"],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("te-scheduler: error: --listen 'nowhere'")
    assert "Traceback" not in result.stderr
