"""Prometheus metrics (SPEC section 6); ``scheduler.web`` serves them on ``/metrics``.

Every :class:`Metrics` owns its own ``CollectorRegistry``, so tests and several daemons in one
process never clash. Besides the six SPEC metrics it exports ``te_scheduler_build_info{version}``
(always 1), ``te_scheduler_firings_in_progress`` (read from a callable at scrape time),
``te_scheduler_config_reloads_total{result}`` (``success`` / ``failure``) and
``te_scheduler_last_success_timestamp_seconds{job}`` (for "no success in an hour" alerts).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime, timezone
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from scheduler import __version__, clock

log = logging.getLogger(__name__)

# A request takes from ~10 ms (loopback simulator) to the 30 s default timeout, at most 60 s.
DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Lag is milliseconds when healthy, seconds under pacing, up to an hour for a catch-up.
LAG_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0)
NextFires = Callable[[], Mapping[str, datetime | None]]


class Metrics:
    """The daemon's metrics; every method is thread-safe and never raises for odd values."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._attempts = Counter(
            "te_scheduler_attempts_total",
            "Attempts recorded, by final state of the attempt.",
            ["job", "outcome"],
            registry=r,
        )
        self._responses = Counter(
            "te_scheduler_http_responses_total",
            "HTTP responses from the API, by status code.",
            ["code"],
            registry=r,
        )
        self._duration = Histogram(
            "te_scheduler_request_duration_seconds",
            "Time of each API request, answered or not.",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self._lag = Histogram(
            "te_scheduler_firing_lag_seconds",
            "Call start minus scheduled_for, spread excluded.",
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self._remaining = Gauge(
            "te_scheduler_rate_limit_remaining",
            "Calls left in the current rate-limit window.",
            ["bucket"],
            registry=r,
        )
        self._next_fire = _NextFireCollector()
        r.register(self._next_fire)
        self._last_success = Gauge(
            "te_scheduler_last_success_timestamp_seconds",
            "Unix time of the job's last successful attempt.",
            ["job"],
            registry=r,
        )
        self._reloads = Counter(
            "te_scheduler_config_reloads_total",
            "Config reloads, by result.",
            ["result"],
            registry=r,
        )
        self._clock_jumps = Counter(
            "te_scheduler_clock_step_seconds",
            "Seconds the wall clock jumped against elapsed time, by kind (step or suspend).",
            ["kind", "direction"],
            registry=r,
        )
        self._in_progress = Gauge(
            "te_scheduler_firings_in_progress", "Firings running now.", registry=r
        )
        Gauge(
            "te_scheduler_build_info", "Always 1; the version as a label.", ["version"], registry=r
        ).labels(__version__).set(1)

    def attempt(self, job: str, outcome: str) -> None:
        """Count one history row's final outcome (also ``skipped``, ``missed``, ``interrupted``)."""
        self._attempts.labels(job, outcome).inc()
        if outcome == "success":
            self._last_success.labels(job).set(clock.epoch())

    def response(self, status_code: int | None, duration_seconds: float) -> None:
        """Observe one request's duration; count its status code when a response came.

        ``None`` (timeout, connection error) adds no ``code`` series but the duration is still
        observed: it is time really spent on the request, and hiding it would flatter p99.
        """
        if status_code is not None:
            self._responses.labels(str(status_code)).inc()
        self._duration.observe(max(0.0, duration_seconds))

    def lag(self, seconds: float) -> None:
        """Observe a firing's lag; a negative lag (clock rounding) counts as 0."""
        self._lag.observe(max(0.0, seconds))

    def rate_limit_remaining(self, bucket: str, remaining: int | None) -> None:
        """Set a bucket's remaining calls; None (unknown) removes the series."""
        if remaining is None:
            self._remaining.remove(bucket)
        else:
            self._remaining.labels(bucket).set(remaining)

    def rate_limits(self, snapshot: Mapping[str, int | None]) -> None:
        """Set every bucket of a ``Limiter.snapshot()`` at once."""
        for bucket, remaining in snapshot.items():
            self.rate_limit_remaining(bucket, remaining)

    def track_next_fires(self, source: NextFires) -> None:
        """Read the next-fire gauge from ``source`` at scrape time (e.g. the daemon's schedule);
        a job absent from it, or mapped to None (nothing left to fire), has no series.

        The daemon's schedule changes only when a job fires or the config is reloaded, yet
        copying it into the gauge twice a second kept 16% of a core busy with 10,000 jobs;
        reading it when Prometheus asks costs nothing in between.
        """
        self._next_fire.source = source

    def forget_job(self, job: str) -> None:
        """Drop the per-job gauges of a job removed from the config (counters stay)."""
        self._last_success.remove(job)

    def clock_jump(self, seconds: float, step: bool) -> None:
        """Count one wall-clock jump (``step`` false: a suspension) of ``seconds``."""
        kind, direction = ("step" if step else "suspend"), ("forward" if seconds > 0 else "back")
        self._clock_jumps.labels(kind, direction).inc(abs(seconds))

    def config_reload(self, ok: bool) -> None:
        """Count one reload attempt."""
        self._reloads.labels("success" if ok else "failure").inc()

    def track_in_progress(self, count: Callable[[], int]) -> None:
        """Read the firings-in-progress gauge from ``count`` (e.g. ``Runner.running``)."""
        self._in_progress.set_function(lambda: float(count()))

    def observe_attempt(self, job: str, attempt: int, result: Any, lag: float) -> None:
        """Everything one HTTP attempt tells: outcome, response, duration and (attempt 1) lag.

        ``result`` is a ``client.CallResult`` (``status_code``, ``outcome``, ``duration_ms``);
        the arguments match ``Runner``'s ``observer`` hook. Retries add no lag sample: their
        delay is the backoff, not lateness.
        """
        self.attempt(job, result.outcome)
        self.response(result.status_code, result.duration_ms / 1000)
        if attempt == 1:
            self.lag(lag)


class _NextFireCollector(Collector):
    """``te_scheduler_next_fire_timestamp_seconds{job}``, read from its source per scrape.

    A plain Gauge would need every job's value copied in whenever it might have changed; a
    collector asks only when scraped. The family looks the same as a Gauge's on the wire.
    """

    NAME = "te_scheduler_next_fire_timestamp_seconds"
    HELP = "Unix time of the job's next scheduled call."

    def __init__(self) -> None:
        self.source: NextFires | None = None  # none yet: no series

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(self.NAME, self.HELP, labels=["job"])

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(self.NAME, self.HELP, labels=["job"])
        for job, value in self._read().items():
            family.add_metric([job], value)
        yield family

    def _read(self) -> dict[str, float]:
        source = self.source
        if source is None:
            return {}
        try:
            return {job: _epoch(when) for job, when in source().items() if when is not None}
        except Exception as exc:  # a scrape must still answer with every other metric
            log.warning("Reading the next fire times failed: %r", exc)
            return {}


def _epoch(when: datetime) -> float:
    # Times read back from SQL are naive UTC; everything else in te-scheduler is aware.
    return (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp()
