"""Where the daemon reports what happened: Prometheus metrics and failure notifications.

:class:`Observers` is the runner's :class:`~scheduler.runner.Hooks`, plus the two events the
runner never sees (slots given up as ``missed``, rows marked ``interrupted``), so every
row of the ``attempts`` table is counted once in ``te_scheduler_attempts_total``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime

from scheduler.api.client import CallResult
from scheduler.config.model import Job
from scheduler.metrics import Metrics
from scheduler.notify import Notifier
from scheduler.outcomes import FiringEnd, NotRun, Outcome
from scheduler.runner import Firing, Hooks

# Outcomes of fire() that wrote no attempt row of their own through attempted().
_ROW_WITHOUT_ATTEMPT = (Outcome.SKIPPED, Outcome.INTERRUPTED, Outcome.MISSED)

RateLimits = Callable[[], Mapping[str, "int | None"]]


class Observers(Hooks):
    """Feeds metrics and the notifier from the runner and the daemon."""

    def __init__(self, metrics: Metrics, notifier: Notifier) -> None:
        self.metrics = metrics
        self.notifier = notifier
        # The limiter's remaining calls per bucket, set once the runner (and its limiter) exist.
        self.read_rate_limits: RateLimits = dict

    def claimed(self, firing: Firing) -> None:
        self.notifier.firing_started(firing.job.name, firing.test_id, firing.job.notify)

    def attempted(self, firing: Firing, attempt: int, result: CallResult, lag: float) -> None:
        self.metrics.observe_attempt(firing.job.name, attempt, result, lag)
        self.metrics.rate_limits(self.read_rate_limits())

    def finished(self, firing: Firing, outcome: FiringEnd, error: str | None) -> None:
        if outcome in _ROW_WITHOUT_ATTEMPT:
            self.metrics.attempt(firing.job.name, outcome)
        if outcome is not NotRun.CLAIMED_ELSEWHERE:  # says nothing about the test's reruns
            self.notifier.firing_finished(
                firing.job.name,
                firing.test_id,
                outcome,
                error,
                firing.scheduled_for,
                firing.job.notify,
            )

    def missed(self, job: Job, test_id: str, first: datetime, error: str) -> None:
        """Slots given up on (downtime or lateness): one ``missed`` row was written."""
        self.metrics.attempt(job.name, Outcome.MISSED)
        self.notifier.firing_finished(job.name, test_id, Outcome.MISSED, error, first, job.notify)
