"""The ``plan`` command's core: upcoming calls, and whether they fit the API's rate limits.

Every job in one config shares one token, so the forecast looks at all calls together: the
most calls in any window of the budget's period (a sliding window, exact), and for each burst
that cannot fit, how late its last call starts when the server's fixed windows open at the
burst (SPEC section 1: a window opens with the first request of a batch; bursts queue).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from itertools import islice, pairwise, tee
from typing import Any
from zoneinfo import ZoneInfo

from scheduler.clock import EPOCH, micros
from scheduler.config.model import Config, Job, Rate
from scheduler.errors import UsageError
from scheduler.timing.cron import format_duration
from scheduler.timing.triggers import iter_slots, spread_offsets

UTC = timezone.utc
DEFAULT_INSTANT_LIMIT = Rate(24, 60.0)  # the documented X-Instant-Test-Rate-Limit default
DEFAULT_SPAN = timedelta(hours=24)
_NAMED_JOBS = 10  # job names listed in one warning before "and N more"
# With --count and no --until only the count ends the plan; this merely bounds iteration.
_COUNT_HORIZON = timedelta(days=3660)


@dataclass(frozen=True)
class PlannedCall:
    """One run call: a test of a job, its slot, and when it is sent (slot + spread offset)."""

    job: str
    test_id: str
    scheduled_for: datetime  # the slot, UTC
    at: datetime  # scheduled_for + the test's spread offset, UTC
    timezone: str  # the job's schedule timezone, for the local column

    def to_json(self) -> dict[str, str]:
        """The SPEC's firing object: ``job, test_id, scheduled_for, utc, local``."""
        return {
            "job": self.job,
            "test_id": self.test_id,
            "scheduled_for": self.scheduled_for.astimezone(UTC).isoformat(),
            "utc": self.at.astimezone(UTC).isoformat(),
            "local": self.at.astimezone(ZoneInfo(self.timezone)).isoformat(),
        }


@dataclass(frozen=True)
class Plan:
    """The calls in order of (at, job, test_id), and the forecast's warnings."""

    calls: list[PlannedCall]
    warnings: list[str]

    def to_json(self) -> dict[str, Any]:
        """``{"firings": [...], "warnings": [...]}`` as ``plan --format json`` prints it."""
        return {"firings": [c.to_json() for c in self.calls], "warnings": list(self.warnings)}


def build_plan(
    config: Config,
    start: datetime,
    *,
    until: datetime | None = None,
    count: int | None = None,
    job: str | None = None,
) -> Plan:
    """Calls of enabled jobs (or ``job``) in ``[start, until)`` (24 h) or the first ``count``."""
    begin = _as_utc(start, "--from")
    if until is not None:
        end = _as_utc(until, "--until")
        if end <= begin:
            raise UsageError("--until must be later than --from")
    else:
        end = begin + (DEFAULT_SPAN if count is None else _COUNT_HORIZON)
    if count is not None and count < 0:
        raise UsageError(f"--count must be 0 or more, not {count}")
    jobs, warnings = _select(config, job)
    streams = [stream for j in jobs for stream in _job_streams(j, begin, end)]
    merged: Iterator[PlannedCall] = heapq.merge(*streams, key=_order)
    calls = list(merged if count is None else islice(merged, count))
    warnings += forecast_warnings(calls, config.api.rate_limit)
    return Plan(calls, warnings)


def forecast_warnings(
    calls: Sequence[PlannedCall], budget: Rate, default_limit: Rate = DEFAULT_INSTANT_LIMIT
) -> list[str]:
    """One line per burst pattern that cannot fit ``budget`` (or a lower documented default)."""
    ordered = sorted(calls, key=_order)
    warnings: list[str] = []
    checks = [(budget, "")]
    if budget.count > default_limit.count or _per_second(budget) > _per_second(default_limit):
        warnings.append(
            f"api.rate_limit {format_rate(budget)} is above the documented instant-test default "
            f"of {format_rate(default_limit)}: fine only if the account has a higher limit, "
            "otherwise the API answers 429 and calls wait"
        )
        checks.append((default_limit, " (the documented default)"))
    for limit, note in checks:
        warnings += _burst_warnings(ordered, limit, note)
        warnings += _sustained_warning(ordered, limit, note)
    return warnings


def peak_calls(times: Sequence[datetime], period: float) -> tuple[int, datetime | None]:
    """The most calls in any window ``[t, t + period)`` and where the first such window opens."""
    ticks = sorted(_micros(t) for t in times)
    span = _period_micros(period)
    best, best_at, j = 0, None, 0
    for i, tick in enumerate(ticks):
        while j < len(ticks) and ticks[j] - tick < span:
            j += 1
        if j - i > best:
            best, best_at = j - i, EPOCH + timedelta(microseconds=tick)
    return best, best_at


def format_rate(rate: Rate) -> str:
    """``Rate(24, 60.0)`` -> ``24/min``, ``Rate(5, 4.0)`` -> ``5/4s``."""
    units = {1.0: "sec", 60.0: "min", 3600.0: "hour"}
    period = units.get(rate.period) or format_duration(timedelta(seconds=rate.period))
    return f"{rate.count}/{period}"


@dataclass(frozen=True)
class _Burst:
    first: int  # index into the ordered calls
    last: int
    late: int  # microseconds the last queued call starts after it was due

    def jobs(self, calls: Sequence[PlannedCall]) -> tuple[str, ...]:
        return tuple(sorted({c.job for c in calls[self.first : self.last + 1]}))


def _burst_warnings(calls: Sequence[PlannedCall], limit: Rate, note: str) -> list[str]:
    ticks = [_micros(c.at) for c in calls]
    groups: dict[tuple[tuple[str, ...], int], list[_Burst]] = {}
    for burst in _find_bursts(ticks, limit):
        size = burst.last - burst.first + 1
        groups.setdefault((burst.jobs(calls), size), []).append(burst)
    return [_describe(calls, ticks, group, limit, note) for group in groups.values()]


def _find_bursts(ticks: Sequence[int], limit: Rate) -> list[_Burst]:
    """Runs of calls whose sliding windows hold more than the limit (two pointers)."""
    span = _period_micros(limit.period)
    ranges: list[tuple[int, int]] = []
    j = 0
    for i, tick in enumerate(ticks):
        while j < len(ticks) and ticks[j] - tick < span:
            j += 1
        if j - i > limit.count:
            if ranges and i <= ranges[-1][1]:  # overlapping windows: one burst
                ranges[-1] = (ranges[-1][0], j - 1)
            else:
                ranges.append((i, j - 1))
    if not ranges:
        return []
    stops = [first for first, _ in ranges[1:]] + [len(ticks)]
    return [
        _Burst(first, last, _lateness(ticks, first, last, stop, limit.count, span))
        for (first, last), stop in zip(ranges, stops, strict=True)
    ]


def _lateness(ticks: Sequence[int], first: int, last: int, stop: int, count: int, span: int) -> int:
    """How late the last queued call starts, with fixed windows opening at the burst.

    The queue may spill into calls after the burst; it is followed until it drains or the next
    burst begins (which gets its own estimate).
    """
    window, used, ready, worst = ticks[first], 0, ticks[first], 0
    for k in range(first, stop):
        ready = max(ticks[k], ready)
        if ready >= window + span:
            if k > last:
                break  # a fresh window opens on time: the queue has drained
            window, used = ready, 0
        if used == count:  # full: the call waits for the next window
            window, used, ready = window + span, 0, window + span
        used += 1
        worst = max(worst, ready - ticks[k])
    return worst


def _describe(
    calls: Sequence[PlannedCall], ticks: Sequence[int], group: list[_Burst], limit: Rate, note: str
) -> str:
    burst = group[0]
    size = burst.last - burst.first + 1
    within = ticks[burst.last] - ticks[burst.first]
    due = "at once" if within == 0 else f"within {_human(within)}"
    late = max(b.late for b in group)
    windows = math.ceil(size / limit.count)
    spread = windows * limit.period
    if limit.period < 60 < spread:
        spread = math.ceil(spread / 60) * 60.0  # whole minutes read better than 125s
    advice = f"consider spread: {format_duration(timedelta(seconds=spread))}"
    recurs = min((ticks[b.first] - ticks[a.first] for a, b in pairwise(group)), default=0)
    if 0 < recurs < _period_micros(spread):
        advice = f"no spread fits, it recurs every {_human(recurs)}"
    jobs = burst.jobs(calls)
    label = "job " if len(jobs) == 1 else "jobs "
    named = ", ".join(jobs[:_NAMED_JOBS])
    if len(jobs) > _NAMED_JOBS:  # one line an operator can read, not 12,500 names
        named += f" and {len(jobs) - _NAMED_JOBS:,} more"
    text = (
        f"{_minute(calls[burst.first].at)}: {size} calls due {due}, "
        f"limit {format_rate(limit)}{note}: the last starts about {_human(late)} late; "
        f"{advice} ({label}{named}"
    )
    if len(group) > 1:
        text += f"; and {len(group) - 1} more times until {_minute(calls[group[-1].first].at)}"
    return text + ")"


def _sustained_warning(calls: Sequence[PlannedCall], limit: Rate, note: str) -> list[str]:
    """One line when more calls are due on average than the limit allows: no spread helps."""
    if len(calls) <= limit.count:
        return []
    elapsed = (calls[-1].at - calls[0].at).total_seconds()
    if elapsed < 2 * limit.period:
        return []  # one burst, already described
    per_period = len(calls) / (elapsed + limit.period) * limit.period
    if per_period <= limit.count:
        return []
    return [
        f"{_minute(calls[0].at)} to {_minute(calls[-1].at)}: about {per_period:.0f} calls are "
        f"due per {format_rate(limit).split('/', 1)[1]} on average, more than the limit "
        f"{format_rate(limit)}{note}: the queue keeps growing; fire less often or split the "
        "tests across schedules"
    ]


def _select(config: Config, name: str | None) -> tuple[tuple[Job, ...], list[str]]:
    if name is None:
        return config.enabled_jobs, []
    job = config.job(name)
    if job is None:
        known = ", ".join(j.name for j in config.jobs) or "none"
        raise UsageError(f"no job named {name!r} (jobs: {known})")
    if not job.enabled:
        return (), [f"job {name!r} is disabled (enabled: false): it has no upcoming calls"]
    return (job,), []


def _job_streams(job: Job, begin: datetime, end: datetime) -> list[Iterator[PlannedCall]]:
    """One time-ordered stream of calls per test; the job's slots are computed once."""
    offsets = spread_offsets(job)
    widest = max(offsets.values(), default=timedelta(0))
    # A slot shortly before ``begin`` still has calls at or after it once spread is added.
    slots = (s.astimezone(UTC) for s in iter_slots(job.schedule, begin - widest, end))
    copies = tee(slots, len(offsets))
    return [
        _test_calls(job, test, offset, copy, begin, end)
        for (test, offset), copy in zip(offsets.items(), copies, strict=True)
    ]


def _test_calls(
    job: Job,
    test: str,
    offset: timedelta,
    slots: Iterator[datetime],
    begin: datetime,
    end: datetime,
) -> Iterator[PlannedCall]:
    for slot in slots:
        at = slot + offset  # both UTC: local arithmetic would go wrong across a DST change
        if at >= end:
            return
        if at >= begin:
            yield PlannedCall(job.name, test, slot, at, job.schedule.timezone)


def _order(call: PlannedCall) -> tuple[datetime, str, str]:
    return (call.at, call.job, call.test_id)


def _as_utc(moment: datetime, option: str) -> datetime:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise UsageError(f"{option} needs a timezone (e.g. 2026-10-25T02:00Z)")
    return moment.astimezone(UTC)


def _micros(moment: datetime) -> int:
    return micros(moment - EPOCH)


def _period_micros(period: float) -> int:
    return round(period * 1_000_000)


def _per_second(rate: Rate) -> float:
    return rate.count / rate.period


def _minute(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _human(micros: int) -> str:
    """A duration for people: ``45s``, ``1m``, ``1m30s``, ``12m``, ``2h5m``."""
    seconds = math.ceil(micros / 1_000_000)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 600:
        minutes, rest = divmod(seconds, 60)
        return f"{minutes}m{rest}s" if rest else f"{minutes}m"
    minutes = round(seconds / 60)
    return f"{minutes // 60}h{minutes % 60}m" if minutes >= 60 else f"{minutes}m"
