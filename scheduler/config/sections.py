"""The sections of jobs.yaml, checked key by key into :mod:`scheduler.config`'s types.

Every function reads one section from the document's values through the :class:`Checker`,
which reports each problem where it was written and hands back a default so checking goes
on: the user sees every problem at once. ``build_config`` is the entry point.
"""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from cronsim import CronSim

from scheduler.config.addresses import (
    as_base_url,
    as_db_url,
    as_env_name,
    as_listen,
    as_notify_url,
    as_path,
    as_proxy,
    resolve_sqlite,
)
from scheduler.config.checker import Checker
from scheduler.config.model import (
    DEFAULT_TOKEN_ENV,
    RESULT_TYPES,
    ApiConfig,
    Config,
    HistoryConfig,
    Job,
    MetricsConfig,
    NotifyConfig,
    ResultsConfig,
    RetryPolicy,
    Schedule,
)
from scheduler.config.scalars import (
    ZERO,
    Invalid,
    as_bool,
    as_cron,
    as_duration,
    as_id,
    as_int,
    as_name,
    as_optional_id,
    as_rate,
    as_retention,
    as_seconds,
    as_time,
    as_timezone,
    as_version,
)
from scheduler.config.wording import Key, describe
from scheduler.timing.cron import check_cron, format_duration

_TOP_KEYS = ("version", "api", "history", "metrics", "defaults", "jobs")
_API_KEYS = (
    "base_url",
    "token_env",
    "token_file",
    "timeout",
    "concurrency",
    "rate_limit",
    "verify_tls",
    "proxy",
)
_DEFAULT_KEYS = ("aid", "timezone", "retry", "catch_up", "spread", "notify", "results")
_RETRY_KEYS = ("attempts", "backoff", "max_backoff")
_NOTIFY_KEYS = ("webhook", "after", "ping_url", "timeout", "results")
_RESULTS_KEYS = ("fetch", "type", "wait")
_JOB_KEYS = ("name", "tests", "schedule", "enabled", *_DEFAULT_KEYS)
_KINDS = ("cron", "every", "at")
_SCHEDULE_KEYS = (*_KINDS, "timezone", "start")
_SECOND = timedelta(seconds=1)
_TINY = timedelta(microseconds=1)
_GAP_FIRINGS = 100  # firings read for a cron's shortest gap: 4 years of a monthly one


@dataclass(frozen=True)
class _Defaults:
    """The ``defaults:`` section, merged into every job that does not override a key."""

    aid: str | None = None
    timezone: str = "UTC"
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    catch_up: timedelta = timedelta(hours=1)
    spread: timedelta = ZERO
    notify: NotifyConfig = field(default_factory=NotifyConfig)
    results: ResultsConfig = field(default_factory=ResultsConfig)


def build_config(ck: Checker, path: Path, root: Any) -> Config | None:
    """The Config that ``root`` (the document's values) describes; None when it has no shape."""
    if root is None and ck.problems:
        return None
    if not isinstance(root, dict):
        ck.error(
            (),
            f"the top level must be a mapping with keys {', '.join(_TOP_KEYS)}, "
            f"got {describe(root)}",
        )
        return None
    top = ck.mapping((), root, _TOP_KEYS) or {}
    ck.get((), top, "version", as_version, 1)
    base = path.parent
    return Config(
        path=path,
        api=_api(ck, ck.section(top, "api", _API_KEYS), base),
        history=_history(ck, ck.section(top, "history", ("url", "retention")), base),
        metrics=MetricsConfig(
            ck.get(("metrics",), ck.section(top, "metrics", ("listen",)), "listen", as_listen, None)
        ),
        jobs=_jobs(ck, top, _defaults(ck, ck.section(top, "defaults", _DEFAULT_KEYS))),
    )


def _api(ck: Checker, data: dict[str, Any], base: Path) -> ApiConfig:
    p, d = ("api",), ApiConfig()
    token_env = ck.get(p, data, "token_env", as_env_name, None)
    token_file = ck.get(p, data, "token_file", as_path(base), None)
    if token_file is not None and token_env is not None:
        ck.error((*p, "token_file"), "set token_env or token_file, not both", key=True)
    return ApiConfig(
        base_url=ck.get(p, data, "base_url", as_base_url, d.base_url),
        token_env=None if token_file else token_env or DEFAULT_TOKEN_ENV,
        token_file=token_file,
        timeout=ck.get(p, data, "timeout", as_seconds(_TINY, "must be longer than 0s"), d.timeout),
        concurrency=ck.get(p, data, "concurrency", as_int(1, 256), d.concurrency),
        rate_limit=ck.get(p, data, "rate_limit", as_rate, d.rate_limit),
        verify_tls=ck.get(p, data, "verify_tls", as_bool, d.verify_tls),
        proxy=ck.get(p, data, "proxy", as_proxy, d.proxy),
    )


def _history(ck: Checker, data: dict[str, Any], base: Path) -> HistoryConfig:
    p, d = ("history",), HistoryConfig()
    return HistoryConfig(
        url=ck.get(p, data, "url", as_db_url(base), None) or resolve_sqlite(d.url, base),
        retention=ck.get(p, data, "retention", as_retention, d.retention),
    )


def _defaults(ck: Checker, data: dict[str, Any]) -> _Defaults:
    p, d = ("defaults",), _Defaults()
    retry = _retry(ck, (*p, "retry"), data["retry"], d.retry) if "retry" in data else d.retry
    return _Defaults(
        aid=ck.get(p, data, "aid", as_optional_id, d.aid),
        timezone=ck.get(p, data, "timezone", as_timezone, d.timezone),
        retry=retry,
        catch_up=ck.get(p, data, "catch_up", as_duration(), d.catch_up),
        spread=ck.get(p, data, "spread", as_duration(), d.spread),
        notify=_notify(ck, p, data, d.notify),
        results=_results(ck, p, data, d.results),
    )


def _retry(ck: Checker, path: Key, value: Any, base: RetryPolicy) -> RetryPolicy:
    data = ck.mapping(path, value, _RETRY_KEYS)
    if data is None:
        return base
    attempts = ck.get(path, data, "attempts", as_int(1, 20), base.attempts)
    backoff = ck.get(path, data, "backoff", as_seconds(), base.backoff)
    max_backoff = ck.get(path, data, "max_backoff", as_seconds(), base.max_backoff)
    if max_backoff < backoff:
        key = "max_backoff" if "max_backoff" in data else "backoff"
        ck.error(
            (*path, key), f"max_backoff ({max_backoff:g}s) must be at least backoff ({backoff:g}s)"
        )
        max_backoff = backoff
    return RetryPolicy(attempts, backoff, max_backoff)


def _notify(ck: Checker, path: Key, data: dict[str, Any], base: NotifyConfig) -> NotifyConfig:
    """``notify:`` of ``data`` over ``base``, key by key; NotifyConfig's own rules apply too."""
    if "notify" not in data:
        return base
    path = (*path, "notify")
    section = ck.mapping(path, data["notify"], _NOTIFY_KEYS)
    if section is None:
        return base
    converters = {
        "webhook": as_notify_url,
        "ping_url": as_notify_url,
        "after": _as_is,
        "timeout": as_seconds(),
        "results": as_bool,
    }
    fields = {
        key: ck.convert((*path, key), section[key], convert, getattr(base, key))
        for key, convert in converters.items()
        if key in section
    }
    for key, message in replace(base, **fields).problems():
        if key in fields:  # base's values were checked where they were written
            ck.error((*path, key), message)
            fields[key] = getattr(base, key)
    return replace(base, **fields)


def _results(ck: Checker, path: Key, data: dict[str, Any], base: ResultsConfig) -> ResultsConfig:
    """``results:`` of ``data`` over ``base``, key by key (SPEC section 7)."""
    if "results" not in data:
        return base
    path = (*path, "results")
    section = ck.mapping(path, data["results"], _RESULTS_KEYS)
    if section is None:
        return base
    wait = as_duration(_SECOND, "must be at least 1s, like 5m")
    return ResultsConfig(
        fetch=ck.get(path, section, "fetch", as_bool, base.fetch),
        type=ck.get(path, section, "type", _as_result_type, base.type),
        wait=ck.get(path, section, "wait", wait, base.wait),
    )


def _as_result_type(value: Any) -> str:
    """``auto`` or a ThousandEyes test type (the results endpoint follows from it)."""
    allowed = ("auto", *RESULT_TYPES)
    if isinstance(value, str) and value in allowed:
        return value
    close = difflib.get_close_matches(value, allowed, n=1) if isinstance(value, str) else []
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise Invalid(f"{hint}must be one of {', '.join(allowed)}")


def _as_is(value: Any) -> Any:
    """A value NotifyConfig.problems() judges on its own (``after``: a whole number >= 1)."""
    return value


def _jobs(ck: Checker, top: dict[str, Any], defaults: _Defaults) -> tuple[Job, ...]:
    raw = top.get("jobs")
    if not isinstance(raw, list) or not raw:
        shown = "" if raw in (None, []) else f", got {describe(raw)}"
        ck.error(
            ("jobs",), f"at least one job is required (each with name, tests, schedule){shown}"
        )
        return ()
    first_paths: dict[str, Key] = {}  # where each name was first written
    jobs = (_job(ck, ("jobs", i), item, defaults, first_paths) for i, item in enumerate(raw))
    return tuple(job for job in jobs if job is not None)


def _job(
    ck: Checker, path: Key, value: Any, dflt: _Defaults, first_paths: dict[str, Key]
) -> Job | None:
    data = ck.mapping(path, value, _JOB_KEYS)
    if data is None:
        return None
    before = ck.count
    name = _job_name(ck, path, data, first_paths)
    tests = _tests(ck, (*path, "tests"), data)
    tz = ck.get(path, data, "timezone", as_timezone, dflt.timezone)
    schedule = _schedule(ck, (*path, "schedule"), data, tz)
    retry = (
        _retry(ck, (*path, "retry"), data["retry"], dflt.retry) if "retry" in data else (dflt.retry)
    )
    spread = ck.get(path, data, "spread", as_duration(), dflt.spread)
    if schedule is not None and len(tests) > 1 and spread > ZERO:
        _check_spread(ck, path, "spread" in data, schedule, spread)
    job = Job(
        name=name or "",
        tests=tests,
        schedule=schedule or Schedule(),
        aid=ck.get(path, data, "aid", as_optional_id, dflt.aid),
        enabled=ck.get(path, data, "enabled", as_bool, True),
        retry=retry,
        catch_up=ck.get(path, data, "catch_up", as_duration(), dflt.catch_up),
        spread=spread,
        notify=_notify(ck, path, data, dflt.notify),
        results=_results(ck, path, data, dflt.results),
        line=ck.where(path)[0],
    )
    return job if ck.count == before else None


def _job_name(
    ck: Checker, path: Key, data: dict[str, Any], first_paths: dict[str, Key]
) -> str | None:
    if "name" not in data:
        ck.error((*path, "name"), "is required (letters, digits, '.', '_', '-')")
        return None
    name = ck.get(path, data, "name", as_name, None)
    if name is not None and name in first_paths:
        first = ck.where(first_paths[name])[0]
        ck.error((*path, "name"), f"duplicate job name {name!r}; the first is at line {first}")
    elif name is not None:
        first_paths[name] = (*path, "name")
    return name


def _tests(ck: Checker, path: Key, data: dict[str, Any]) -> tuple[str, ...]:
    raw = data.get("tests")
    if not isinstance(raw, list) or not raw:
        want = "a non-empty list of instant test ids like [105, 106]"
        missing = "tests" not in data
        ck.error(
            path, f"is required: {want}" if missing else f"must be {want}, got {describe(raw)}"
        )
        return ()
    tests: dict[str, None] = {}  # ordered, and a lookup is O(1): a list can be a million long
    for i, item in enumerate(raw):
        test = ck.convert((*path, i), item, as_id, None)
        if test is not None and test in tests:
            ck.error((*path, i), f"duplicate test id {test} in this job")
        elif test is not None:
            tests[test] = None
    return tuple(tests)


def _schedule(ck: Checker, path: Key, job: dict[str, Any], tz: str) -> Schedule | None:
    if "schedule" not in job:
        ck.error(path, "is required: a mapping with one of cron, every or at")
        return None
    data = ck.mapping(path, job["schedule"], _SCHEDULE_KEYS)
    if data is None:
        return None
    kinds = [kind for kind in _KINDS if kind in data]
    if len(kinds) != 1:
        kinds.sort(key=lambda kind: ck.where((*path, kind), key=True))  # name the 2nd written
        where = (*path, kinds[1]) if kinds else path
        both = f"has both {kinds[0]} and {kinds[1]}; it " if kinds else ""
        ck.error(where, f"{both}needs exactly one of cron, every or at", key=bool(kinds))
        return None
    tz = ck.get(path, data, "timezone", as_timezone, tz)
    if "start" in data and kinds != ["every"]:
        ck.error((*path, "start"), "only goes with every (it anchors the interval)", key=True)
    if "cron" in data:
        cron = ck.get(path, data, "cron", as_cron, None)
        return Schedule(tz, cron=cron) if cron else None
    if "every" in data:
        every = ck.get(path, data, "every", as_duration(_SECOND, "must be at least 1s"), None)
        start = ck.get(path, data, "start", as_time(tz), None)
        return Schedule(tz, every=every, start=start) if every else None
    at = ck.get(path, data, "at", as_time(tz), None)
    return Schedule(tz, at=at) if at else None


def _check_spread(ck: Checker, path: Key, own: bool, schedule: Schedule, spread: timedelta) -> None:
    """Refuse a spread wider than the gap to the next firing: the firing's last tests would
    start after the next one began. Equal is fine: the tests then share the interval evenly.

    With one test there is nothing to spread (its offset is 0), so the caller skips it.
    """
    if schedule.every:
        gap, what = schedule.every, f"the interval (every {format_duration(schedule.every)})"
    elif schedule.cron:
        gap = _cron_gap(schedule.cron)
        what = f"the shortest gap between the cron's firings ({format_duration(gap)})"
    else:
        return  # ``at`` fires once: no next firing to run into
    if spread <= gap:
        return
    why = "a firing's last tests would start after the next firing"
    if own:
        ck.error(
            (*path, "spread"),
            f"{format_duration(spread)} is longer than {what}: {why}; "
            f"make it at most {format_duration(gap)}",
        )
    else:
        ck.error(
            (*path, "schedule", schedule.kind),
            f"{what} is shorter than defaults.spread ({format_duration(spread)}): {why}; "
            f"set spread on this job, at most {format_duration(gap)}",
        )


@functools.lru_cache(maxsize=1024)  # cron expressions repeat across jobs
def _cron_gap(expr: str) -> timedelta:
    """The shortest gap between consecutive firings of ``expr``, on wall-clock time.

    Read from the first firings (at most ``_GAP_FIRINGS``) of a 28-year span, after which
    the calendar repeats; DST days, where a gap can be an hour shorter, are left out.
    """
    start = datetime(2001, 1, 1)
    end = start.replace(year=start.year + 28)
    times = CronSim(check_cron(expr), start)
    previous, gap = next(times), end - start
    for _ in range(_GAP_FIRINGS):
        moment = next(times)
        if moment >= end:
            break
        gap, previous = min(gap, moment - previous), moment
    return gap
