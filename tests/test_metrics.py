"""/metrics and /healthz over real HTTP, and the database health check on a real SQLite file."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from scheduler import __version__, clock
from scheduler.api.client import CallResult
from scheduler.errors import SchedulerError
from scheduler.metrics import Metrics
from scheduler.store import db
from scheduler.web.health import build_health, database_health
from scheduler.web.server import MetricsServer

SPEC_METRICS = {
    "te_scheduler_attempts": "counter",
    "te_scheduler_http_responses": "counter",
    "te_scheduler_request_duration_seconds": "histogram",
    "te_scheduler_firing_lag_seconds": "histogram",
    "te_scheduler_rate_limit_remaining": "gauge",
    "te_scheduler_next_fire_timestamp_seconds": "gauge",
}

Serve = Callable[..., tuple[Metrics, MetricsServer, str]]


@pytest.fixture
def serve() -> Iterator[Serve]:
    """Start MetricsServers on 127.0.0.1 port 0; all are stopped at teardown."""
    servers: list[MetricsServer] = []

    def start(
        health: Callable[[], tuple[bool, dict[str, str]]] | None = None, **kwargs: Any
    ) -> tuple[Metrics, MetricsServer, str]:
        metrics = Metrics()
        server = MetricsServer(
            metrics, ("127.0.0.1", 0), health or (lambda: (True, {})), **kwargs
        ).start()
        servers.append(server)
        return metrics, server, f"http://127.0.0.1:{server.port}"

    yield start
    for server in servers:
        server.stop()


def scrape(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics as {(name, sorted labels): value}."""
    response = requests.get(f"{base}/metrics", timeout=5)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def attempts(samples: dict[Any, float], job: str, outcome: str) -> float:
    return samples[("te_scheduler_attempts_total", (("job", job), ("outcome", outcome)))]


def test_spec_metric_names_and_types(serve: Serve) -> None:
    _, _, base = serve()
    text = requests.get(f"{base}/metrics", timeout=5).text
    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert {name: families.get(name) for name in SPEC_METRICS} == SPEC_METRICS
    for name in (
        "te_scheduler_attempts_total",
        "te_scheduler_http_responses_total",
        "te_scheduler_request_duration_seconds",
        "te_scheduler_firing_lag_seconds",
        "te_scheduler_rate_limit_remaining",
        "te_scheduler_next_fire_timestamp_seconds",
    ):
        assert f"# TYPE {name.removesuffix('_total')}" in text


def test_counters_and_histograms_have_exact_values(serve: Serve) -> None:
    metrics, _, base = serve()
    metrics.attempt("nightly", "success")
    metrics.attempt("nightly", "success")
    metrics.attempt("nightly", "rate_limited")
    metrics.attempt("hourly", "missed")
    metrics.response(200, 0.04)
    metrics.response(429, 0.2)
    metrics.response(200, 3.0)
    metrics.response(None, 30.0)  # a timeout: no code, but the duration counts
    metrics.lag(0.003)
    metrics.lag(-0.5)  # early by rounding: counts as 0
    metrics.lag(7200.0)
    samples = scrape(base)
    assert attempts(samples, "nightly", "success") == 2
    assert attempts(samples, "nightly", "rate_limited") == 1
    assert attempts(samples, "hourly", "missed") == 1
    codes = {k[1]: v for k, v in samples.items() if k[0] == "te_scheduler_http_responses_total"}
    assert codes == {(("code", "200"),): 2, (("code", "429"),): 1}
    duration = "te_scheduler_request_duration_seconds"
    assert samples[(f"{duration}_count", ())] == 4
    assert samples[(f"{duration}_sum", ())] == pytest.approx(33.24)
    assert samples[(f"{duration}_bucket", (("le", "0.05"),))] == 1
    assert samples[(f"{duration}_bucket", (("le", "5.0"),))] == 3
    assert samples[(f"{duration}_bucket", (("le", "30.0"),))] == 4
    lag = "te_scheduler_firing_lag_seconds"
    assert samples[(f"{lag}_count", ())] == 3
    assert samples[(f"{lag}_sum", ())] == pytest.approx(7200.003)
    assert samples[(f"{lag}_bucket", (("le", "0.001"),))] == 1
    assert samples[(f"{lag}_bucket", (("le", "0.005"),))] == 2
    assert samples[(f"{lag}_bucket", (("le", "3600.0"),))] == 2
    assert samples[(f"{lag}_bucket", (("le", "+Inf"),))] == 3


def test_gauges_set_and_remove(serve: Serve, fake_clock: clock.FakeClock) -> None:
    metrics, _, base = serve()
    at = datetime(2026, 11, 27, 13, 0, tzinfo=timezone.utc)
    schedule: dict[str, datetime | None] = {
        "nightly": at,
        "naive": datetime(2026, 11, 27, 13, 0),
    }  # naive means UTC
    metrics.track_next_fires(lambda: schedule)
    metrics.rate_limits({"instant-test": 23, "organization": 239, "budget": None})
    metrics.attempt("nightly", "success")
    samples = scrape(base)
    nxt = "te_scheduler_next_fire_timestamp_seconds"
    assert samples[(nxt, (("job", "nightly"),))] == at.timestamp()
    assert samples[(nxt, (("job", "naive"),))] == at.timestamp()
    remaining = {k[1]: v for k, v in samples.items() if k[0] == "te_scheduler_rate_limit_remaining"}
    assert remaining == {(("bucket", "instant-test"),): 23, (("bucket", "organization"),): 239}
    last_success = ("te_scheduler_last_success_timestamp_seconds", (("job", "nightly"),))
    assert samples[last_success] == fake_clock.now().timestamp()

    metrics.rate_limit_remaining("organization", None)
    schedule["naive"] = None
    del schedule["nightly"]
    metrics.forget_job("nightly")
    metrics.forget_job("never-seen")  # harmless
    samples = scrape(base)
    assert (nxt, (("job", "nightly"),)) not in samples
    assert (nxt, (("job", "naive"),)) not in samples
    assert last_success not in samples
    assert ("te_scheduler_rate_limit_remaining", (("bucket", "organization"),)) not in samples
    # counters survive a removed job: Prometheus rate() must not see a reset
    assert attempts(samples, "nightly", "success") == 1


def test_next_fires_drop_jobs_that_are_gone(serve: Serve) -> None:
    metrics, _, base = serve()
    at = datetime(2026, 11, 27, 13, 0, tzinfo=timezone.utc)
    current: list[dict[str, datetime | None]] = [{"a": at, "b": at, "c": at}]
    metrics.track_next_fires(lambda: current[0])
    scrape(base)
    current[0] = {"a": at + timedelta(hours=1), "c": None}
    nxt = {
        k[1]: v
        for k, v in scrape(base).items()
        if k[0] == "te_scheduler_next_fire_timestamp_seconds"
    }
    assert nxt == {(("job", "a"),): (at + timedelta(hours=1)).timestamp()}


def test_observe_attempt_matches_the_runner_observer(serve: Serve) -> None:
    metrics, _, base = serve()
    metrics.observe_attempt("web", 1, CallResult(502, "http_error", "Bad Gateway", 120), 0.25)
    metrics.observe_attempt("web", 2, CallResult(None, "timeout", "timed out", 30_000), 9.0)
    samples = scrape(base)
    assert attempts(samples, "web", "http_error") == 1
    assert attempts(samples, "web", "timeout") == 1
    assert samples[("te_scheduler_http_responses_total", (("code", "502"),))] == 1
    assert samples[("te_scheduler_request_duration_seconds_count", ())] == 2
    assert samples[("te_scheduler_request_duration_seconds_sum", ())] == pytest.approx(30.12)
    assert samples[("te_scheduler_firing_lag_seconds_count", ())] == 1  # retries are not lag
    assert samples[("te_scheduler_firing_lag_seconds_sum", ())] == pytest.approx(0.25)


def test_extra_metrics(serve: Serve) -> None:
    metrics, _, base = serve()
    running = [2]
    metrics.track_in_progress(lambda: running[0])
    metrics.config_reload(True)
    metrics.config_reload(False)
    metrics.config_reload(False)
    samples = scrape(base)
    assert samples[("te_scheduler_firings_in_progress", ())] == 2
    assert samples[("te_scheduler_build_info", (("version", __version__),))] == 1
    assert samples[("te_scheduler_config_reloads_total", (("result", "success"),))] == 1
    assert samples[("te_scheduler_config_reloads_total", (("result", "failure"),))] == 2
    running[0] = 0
    assert scrape(base)[("te_scheduler_firings_in_progress", ())] == 0


def test_two_instances_do_not_share_a_registry(serve: Serve) -> None:
    first, _, first_base = serve()
    _, _, second_base = serve()
    first.attempt("x", "success")
    assert ("te_scheduler_attempts_total", (("job", "x"), ("outcome", "success"))) in scrape(
        first_base
    )
    assert not any(k[0] == "te_scheduler_attempts_total" for k in scrape(second_base))


def test_openmetrics_when_the_scraper_asks_for_it(serve: Serve) -> None:
    _, _, base = serve()
    response = requests.get(
        f"{base}/metrics",
        timeout=5,
        headers={"Accept": "application/openmetrics-text; version=1.0.0"},
    )
    assert response.headers["Content-Type"].startswith("application/openmetrics-text")
    assert response.text.endswith("# EOF\n")


def test_healthz_ok_fail_raise_and_404(serve: Serve) -> None:
    _, _, ok_base = serve(lambda: (True, {"scheduler": "running", "database": "ok"}))
    response = requests.get(f"{ok_base}/healthz", timeout=5)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    assert response.json() == {"status": "ok", "scheduler": "running", "database": "ok"}

    _, _, fail_base = serve(lambda: (False, {"scheduler": "stopped", "database": "ok"}))
    response = requests.get(f"{fail_base}/healthz", timeout=5)
    assert response.status_code == 503
    assert response.json() == {"status": "fail", "scheduler": "stopped", "database": "ok"}

    def explode() -> tuple[bool, dict[str, str]]:
        raise RuntimeError("boom")

    _, _, raise_base = serve(explode)
    response = requests.get(f"{raise_base}/healthz", timeout=5)
    assert response.status_code == 503
    assert response.json() == {"status": "fail", "health": "check raised RuntimeError: boom"}
    assert requests.get(f"{raise_base}/healthz", timeout=5).status_code == 503  # still serving

    for path in ("/", "/metricsx", "/healthz/extra"):
        assert requests.get(f"{ok_base}{path}", timeout=5).status_code == 404
    assert requests.get(f"{ok_base}/metrics?name[]=x", timeout=5).status_code == 200


def test_healthz_times_out_a_hanging_check(serve: Serve) -> None:
    release = threading.Event()

    def hang() -> tuple[bool, dict[str, str]]:
        release.wait(5)
        return True, {}

    _, _, base = serve(hang, health_timeout=0.2)
    try:
        response = requests.get(f"{base}/healthz", timeout=5)
    finally:
        release.set()
    assert response.status_code == 503
    assert response.json() == {"status": "fail", "health": "check took over 0.2s"}


def test_server_is_quiet_and_stops(serve: Serve, capfd: pytest.CaptureFixture[str]) -> None:
    _, server, base = serve()
    requests.get(f"{base}/metrics", timeout=5)
    requests.get(f"{base}/nope", timeout=5)
    server.stop()
    server.stop()  # twice is fine
    assert capfd.readouterr().err == ""
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{base}/metrics", timeout=2)


def test_port_in_use_is_a_clear_error(serve: Serve) -> None:
    _, server, _ = serve()
    with pytest.raises(SchedulerError, match=rf"cannot serve metrics on 127.0.0.1:{server.port}"):
        MetricsServer(Metrics(), ("127.0.0.1", server.port), lambda: (True, {})).start()


def test_ipv6_loopback(serve: Serve) -> None:
    metrics = Metrics()
    try:
        server = MetricsServer(metrics, ("::1", 0), lambda: (True, {})).start()
    except SchedulerError:
        pytest.skip("no IPv6 loopback here")
    try:
        assert requests.get(f"http://[::1]:{server.port}/healthz", timeout=5).status_code == 200
    finally:
        server.stop()


# -- database health on a real, migrated SQLite file -------------------------------------------


def corrupt(engine: Any, path: Path) -> None:
    """Overwrite the database file with junk (a method that works as root, unlike chmod)."""
    engine.dispose()  # the last close checkpoints the WAL, so every page is in the file
    assert not path.with_name(path.name + "-wal").exists()
    path.write_bytes(b"this is not a database " * 200)


def test_database_health_ok_then_junk_file(engine: Any, tmp_path: Path) -> None:
    assert database_health(engine) == (True, "ok")
    corrupt(engine, tmp_path / "history.db")
    ok, detail = database_health(engine)
    assert not ok
    assert "not a database" in detail


def test_database_health_file_replaced_by_a_directory(engine: Any, tmp_path: Path) -> None:
    assert database_health(engine)[0]
    path = tmp_path / "history.db"
    path.rename(tmp_path / "moved-away.db")  # works as root too, unlike chmod 000
    path.mkdir()
    ok, detail = database_health(engine)
    assert not ok
    assert "unable to open database file" in detail


def test_database_health_not_migrated(tmp_path: Path) -> None:
    engine = db.make_engine(f"sqlite:///{tmp_path / 'empty.db'}")
    try:
        ok, detail = database_health(engine)
    finally:
        engine.dispose()
    assert not ok
    assert "no such table: attempts" in detail


def test_healthz_with_the_daemon_health_callable(serve: Serve, engine: Any, tmp_path: Path) -> None:
    running = threading.Event()
    running.set()
    _, _, base = serve(build_health(running.is_set, engine))
    response = requests.get(f"{base}/healthz", timeout=5)
    assert (response.status_code, response.json()) == (
        200,
        {"status": "ok", "scheduler": "running", "database": "ok"},
    )

    running.clear()
    corrupt(engine, tmp_path / "history.db")
    response = requests.get(f"{base}/healthz", timeout=5)
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "fail"
    assert body["scheduler"] == "stopped"
    assert "not a database" in body["database"]


# -- the next-fire gauge read at scrape time ----------------------------------------------------

NEXT_FIRE = "te_scheduler_next_fire_timestamp_seconds"


def next_fires(base: str) -> dict[str, float]:
    return {dict(k[1])["job"]: v for k, v in scrape(base).items() if k[0] == NEXT_FIRE}


def test_next_fire_gauge_reads_its_source_at_each_scrape(serve: Serve) -> None:
    metrics, _, base = serve()
    at = datetime(2026, 11, 27, 13, 0, tzinfo=timezone.utc)
    schedule: dict[str, datetime | None] = {"a": at, "b": None}
    metrics.track_next_fires(lambda: schedule)
    assert next_fires(base) == {"a": at.timestamp()}
    # Nothing is pushed: the next scrape sees the source as it is then.
    schedule.update(a=at + timedelta(hours=1), b=datetime(2026, 11, 27, 14, 0), c=at)
    assert next_fires(base) == {
        "a": (at + timedelta(hours=1)).timestamp(),
        "b": (at + timedelta(hours=1)).timestamp(),  # naive is UTC
        "c": at.timestamp(),
    }
    del schedule["a"]
    assert set(next_fires(base)) == {"b", "c"}


def test_next_fire_gauge_looks_as_it_did_on_the_wire(serve: Serve) -> None:
    # It used to be a plain Gauge; dashboards and alerts must not notice the change.
    at = datetime(2026, 11, 27, 13, 0, tzinfo=timezone.utc)
    metrics, _, base = serve()
    metrics.track_next_fires(lambda: {"nightly": at, "web": at + timedelta(seconds=0.25)})
    plain = CollectorRegistry()
    gauge = Gauge(NEXT_FIRE, "Unix time of the job's next scheduled call.", ["job"], registry=plain)
    gauge.labels("nightly").set(at.timestamp())
    gauge.labels("web").set(at.timestamp() + 0.25)

    def block(text: str) -> list[str]:
        return [line for line in text.splitlines() if NEXT_FIRE in line]

    served = block(requests.get(f"{base}/metrics", timeout=5).text)
    assert served == block(generate_latest(plain).decode())
    assert served[:2] == [
        f"# HELP {NEXT_FIRE} Unix time of the job's next scheduled call.",
        f"# TYPE {NEXT_FIRE} gauge",
    ]


def test_a_failing_next_fire_source_costs_only_its_own_series(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    metrics, _, base = serve()
    metrics.attempt("web", "success")

    def broken() -> dict[str, datetime | None]:
        raise RuntimeError("scheduler gone")

    metrics.track_next_fires(broken)
    samples = scrape(base)
    assert attempts(samples, "web", "success") == 1
    assert not any(k[0] == NEXT_FIRE for k in samples)
    assert "Reading the next fire times failed: RuntimeError('scheduler gone')" in caplog.text
