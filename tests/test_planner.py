"""scheduler.timing.planner: the calls ``plan`` lists and the rate-limit forecast it warns with."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from scheduler.config import ApiConfig, Config, HistoryConfig, Job, MetricsConfig, Schedule
from scheduler.config.model import Rate
from scheduler.errors import UsageError
from scheduler.timing.planner import (
    PlannedCall,
    build_plan,
    forecast_warnings,
    format_rate,
    peak_calls,
)
from scheduler.timing.triggers import spread_offsets

UTC = timezone.utc
DAY = datetime(2026, 5, 4, tzinfo=UTC)  # a Monday, far from any DST change
NINE = DAY.replace(hour=9)
PER_MIN = Rate(24, 60.0)


def make_job(
    name: str = "nightly",
    tests: int = 30,
    *,
    cron: str | None = "0 9 * * *",
    every: timedelta | None = None,
    tz: str = "UTC",
    spread: timedelta = timedelta(0),
    enabled: bool = True,
) -> Job:
    schedule = Schedule(timezone=tz, cron=None if every else cron, every=every)
    ids = tuple(str(1000 + i) for i in range(tests))
    return Job(name=name, tests=ids, schedule=schedule, spread=spread, enabled=enabled)


def make_config(*jobs: Job, rate: Rate = PER_MIN) -> Config:
    return Config(
        path=Path("jobs.yaml"),
        api=ApiConfig(rate_limit=rate),
        history=HistoryConfig(),
        metrics=MetricsConfig(),
        jobs=jobs,
    )


def calls_at(*offsets: float, job: str = "hand") -> list[PlannedCall]:
    """Hand-made calls ``offsets`` seconds after 09:00 UTC, one test each."""
    return [
        PlannedCall(job, str(i), NINE, NINE + timedelta(seconds=s), "UTC")
        for i, s in enumerate(offsets)
    ]


# --- the forecast ----------------------------------------------------------------------------


def test_thirty_tests_at_once_warn_against_the_default_limit() -> None:
    plan = build_plan(make_config(make_job()), DAY)
    assert len(plan.calls) == 30 and {c.at for c in plan.calls} == {NINE}
    assert plan.warnings == [
        "2026-05-04 09:00 UTC: 30 calls due at once, limit 24/min: the last starts about "
        "1m late; consider spread: 2m (job nightly)"
    ]


def test_the_suggested_spread_fits_and_the_plan_is_stable() -> None:
    config = make_config(make_job(spread=timedelta(minutes=2)))
    plan = build_plan(config, DAY)
    assert plan.warnings == []
    assert sorted(c.at for c in plan.calls) == [NINE + timedelta(seconds=4 * i) for i in range(30)]
    again = build_plan(config, DAY)
    assert again == plan and again.to_json() == plan.to_json()


def test_spread_moves_the_call_but_not_its_slot() -> None:
    job = make_job(tests=3, spread=timedelta(seconds=90))
    plan = build_plan(make_config(job), DAY)
    offsets = spread_offsets(job)
    assert {c.scheduled_for for c in plan.calls} == {NINE}
    assert {c.test_id: c.at - c.scheduled_for for c in plan.calls} == offsets
    assert sorted(offsets.values()) == [timedelta(seconds=s) for s in (0, 30, 60)]
    firing = plan.to_json()["firings"][-1]
    assert firing["scheduled_for"] == "2026-05-04T09:00:00+00:00"
    assert firing["utc"] == "2026-05-04T09:01:00+00:00"


def test_calls_of_a_slot_before_start_are_listed_when_their_spread_puts_them_after() -> None:
    job = make_job(spread=timedelta(minutes=2))  # 30 calls, 4 s apart from 09:00
    start = NINE + timedelta(minutes=1)
    plan = build_plan(make_config(job), start, until=start + timedelta(hours=1))
    assert len(plan.calls) == 15
    assert plan.calls[0].at == NINE + timedelta(minutes=1)
    assert {c.scheduled_for for c in plan.calls} == {NINE}


def test_bursts_of_several_jobs_add_up_and_name_the_jobs() -> None:
    config = make_config(make_job("alpha", 15), make_job("beta", 15))
    [warning] = build_plan(config, DAY).warnings
    assert warning.startswith("2026-05-04 09:00 UTC: 30 calls due at once, limit 24/min")
    assert warning.endswith("(jobs alpha, beta)")


def test_a_burst_of_many_jobs_names_ten_and_counts_the_rest() -> None:
    config = make_config(*(make_job(f"job{n:02}", 1) for n in range(40)))
    [warning] = build_plan(config, DAY).warnings
    assert warning.endswith(
        "(jobs job00, job01, job02, job03, job04, job05, job06, job07, job08, job09 and 30 more)"
    ), warning


def test_repeated_bursts_are_one_warning() -> None:
    config = make_config(make_job("quarterly", cron="*/15 * * * *"))
    plan = build_plan(config, DAY)
    assert len(plan.calls) == 96 * 30
    assert plan.warnings == [
        "2026-05-04 00:00 UTC: 30 calls due at once, limit 24/min: the last starts about "
        "1m late; consider spread: 2m (job quarterly; and 95 more times until 2026-05-04 "
        "23:45 UTC)"
    ]


def test_different_patterns_are_separate_warnings() -> None:
    config = make_config(make_job("small", 25, cron="0 6 * * *"), make_job("big", 50))
    assert build_plan(config, DAY).warnings == [
        "2026-05-04 06:00 UTC: 25 calls due at once, limit 24/min: the last starts about "
        "1m late; consider spread: 2m (job small)",
        "2026-05-04 09:00 UTC: 50 calls due at once, limit 24/min: the last starts about "
        "2m late; consider spread: 3m (job big)",
    ]


def test_a_budget_above_the_default_is_called_out() -> None:
    plan = build_plan(make_config(make_job(), rate=Rate(60, 60.0)), DAY)
    assert plan.warnings == [
        "api.rate_limit 60/min is above the documented instant-test default of 24/min: fine "
        "only if the account has a higher limit, otherwise the API answers 429 and calls wait",
        "2026-05-04 09:00 UTC: 30 calls due at once, limit 24/min (the documented default): "
        "the last starts about 1m late; consider spread: 2m (job nightly)",
    ]


def test_a_budget_below_the_default_is_the_limit_checked() -> None:
    plan = build_plan(make_config(make_job(tests=12), rate=Rate(10, 60.0)), DAY)
    assert plan.warnings == [
        "2026-05-04 09:00 UTC: 12 calls due at once, limit 10/min: the last starts about "
        "1m late; consider spread: 2m (job nightly)"
    ]


def test_a_schedule_that_never_catches_up_says_so() -> None:
    config = make_config(make_job("flood", cron="* * * * *"))
    warnings = build_plan(config, NINE, until=NINE + timedelta(hours=1)).warnings
    assert warnings[0] == (
        "2026-05-04 09:00 UTC: 30 calls due at once, limit 24/min: the last starts about 1m "
        "late; no spread fits, it recurs every 1m (job flood; and 59 more times until "
        "2026-05-04 09:59 UTC)"
    )
    assert warnings[1] == (
        "2026-05-04 09:00 UTC to 2026-05-04 09:59 UTC: about 30 calls are due per min on "
        "average, more than the limit 24/min: the queue keeps growing; fire less often or split "
        "the tests across schedules"
    )


def test_the_peak_window_is_half_open_and_exact() -> None:
    fit = calls_at(*(i * 59 / 23 for i in range(24)))  # 24 calls within 59 s
    assert peak_calls([c.at for c in fit], 60.0) == (24, NINE)
    assert forecast_warnings(fit, PER_MIN) == []
    over = calls_at(*(i * 59 / 24 for i in range(25)))  # 25 calls within 59 s
    assert peak_calls([c.at for c in over], 60.0) == (25, NINE)
    [warning] = forecast_warnings(over, PER_MIN)
    assert warning.startswith("2026-05-04 09:00 UTC: 25 calls due within 59s, limit 24/min")
    edge = calls_at(*(i * 60 / 24 for i in range(25)))  # the 25th lands exactly 60 s later
    assert peak_calls([c.at for c in edge], 60.0) == (24, NINE)
    assert forecast_warnings(edge, PER_MIN) == []
    assert peak_calls([], 60.0) == (0, None)


def test_the_peak_is_found_in_the_middle_of_the_day() -> None:
    times = [NINE + timedelta(minutes=m) for m in range(0, 600, 10)]  # one call every 10 min
    busy = NINE + timedelta(hours=3, seconds=30)
    times += [busy + timedelta(seconds=s) for s in range(5)]
    assert peak_calls(times, 60.0) == (6, NINE + timedelta(hours=3))


def test_lateness_follows_fixed_windows_opened_by_the_burst() -> None:
    # 30 calls one second apart: the first window (09:00:00) takes 24, the rest wait for the
    # second window at 09:01:00; the 25th call (due 09:00:24) is the latest, 36 s.
    [warning] = forecast_warnings(calls_at(*range(30)), PER_MIN)
    assert warning == (
        "2026-05-04 09:00 UTC: 30 calls due within 29s, limit 24/min: the last starts about "
        "36s late; consider spread: 2m (job hand)"
    )


def test_short_periods_are_spelled_out() -> None:
    assert format_rate(Rate(24, 60.0)) == "24/min"
    assert format_rate(Rate(5, 4.0)) == "5/4s"
    assert format_rate(Rate(2, 1.0)) == "2/sec"
    assert format_rate(Rate(900, 3600.0)) == "900/hour"
    [note, warning] = forecast_warnings(calls_at(*[0.0] * 12), Rate(5, 4.0), Rate(24, 60.0))
    assert note.startswith("api.rate_limit 5/4s is above the documented")
    assert warning == (
        "2026-05-04 09:00 UTC: 12 calls due at once, limit 5/4s: the last starts about 8s "
        "late; consider spread: 12s (job hand)"
    )


# --- what the plan lists ---------------------------------------------------------------------


def quarter_hours(tests: int = 2) -> Job:
    return make_job("quarter", tests, every=timedelta(minutes=15))


def test_until_is_exclusive_and_start_inclusive() -> None:
    config = make_config(quarter_hours())
    start = NINE + timedelta(minutes=15)
    plan = build_plan(config, start, until=start + timedelta(minutes=30))
    later = start + timedelta(minutes=15)
    assert [c.at for c in plan.calls] == [start, start, later, later]
    assert [c.test_id for c in plan.calls] == ["1000", "1001", "1000", "1001"]


def test_the_default_span_is_24_hours() -> None:
    plan = build_plan(make_config(quarter_hours()), NINE + timedelta(minutes=7))
    assert len(plan.calls) == 96 * 2
    assert plan.calls[0].at == NINE + timedelta(minutes=15)
    assert plan.calls[-1].at == NINE + timedelta(days=1)


def test_count_takes_the_first_calls_even_beyond_a_day() -> None:
    config = make_config(quarter_hours(tests=1))
    first = build_plan(config, NINE, count=5)
    assert [c.at for c in first.calls] == [NINE + timedelta(minutes=15 * i) for i in range(5)]
    many = build_plan(config, NINE, count=200)
    assert len(many.calls) == 200 and many.calls[-1].at == NINE + timedelta(minutes=15 * 199)
    both = build_plan(config, NINE, count=200, until=NINE + timedelta(hours=1))
    assert len(both.calls) == 4
    assert build_plan(config, NINE, count=0).calls == []


def test_count_stops_at_a_one_off_job() -> None:
    at = NINE + timedelta(hours=2)
    once = Job(name="once", tests=("7",), schedule=Schedule(at=at))
    assert [c.at for c in build_plan(make_config(once), NINE, count=10).calls] == [at]


def test_bad_bounds_are_usage_errors() -> None:
    config = make_config(quarter_hours())
    with pytest.raises(UsageError, match="--until must be later than --from"):
        build_plan(config, NINE, until=NINE)
    with pytest.raises(UsageError, match="--from needs a timezone"):
        build_plan(config, NINE.replace(tzinfo=None))
    with pytest.raises(UsageError, match="--count"):
        build_plan(config, NINE, count=-1)


def test_calls_are_ordered_by_time_job_and_test() -> None:
    config = make_config(make_job("zulu", 2), make_job("alpha", 2), quarter_hours(1))
    calls = build_plan(config, NINE, until=NINE + timedelta(minutes=20)).calls
    assert [(c.at, c.job, c.test_id) for c in calls] == [
        (NINE, "alpha", "1000"),
        (NINE, "alpha", "1001"),
        (NINE, "quarter", "1000"),
        (NINE, "zulu", "1000"),
        (NINE, "zulu", "1001"),
        (NINE + timedelta(minutes=15), "quarter", "1000"),
    ]


def test_job_filter_and_disabled_jobs() -> None:
    config = make_config(
        make_job("alpha", 2),
        make_job("beta", 3),
        make_job("off", 4, enabled=False),
    )
    everything = build_plan(config, DAY)
    assert {c.job for c in everything.calls} == {"alpha", "beta"}
    only_beta = build_plan(config, DAY, job="beta")
    assert [c.job for c in only_beta.calls] == ["beta"] * 3
    off = build_plan(config, DAY, job="off")
    assert off.calls == []
    assert off.warnings == ["job 'off' is disabled (enabled: false): it has no upcoming calls"]
    with pytest.raises(UsageError, match="no job named 'gamma' \\(jobs: alpha, beta, off\\)"):
        build_plan(config, DAY, job="gamma")


def test_json_shape_is_the_spec_one() -> None:
    plan = build_plan(make_config(make_job(tests=25)), DAY)
    data = json.loads(json.dumps(plan.to_json()))
    assert set(data) == {"firings", "warnings"}
    assert len(data["firings"]) == 25 and len(data["warnings"]) == 1
    for firing in data["firings"]:
        assert set(firing) == {"job", "test_id", "scheduled_for", "utc", "local"}
        assert firing["scheduled_for"] == firing["utc"] == firing["local"]
        assert firing["utc"] == "2026-05-04T09:00:00+00:00"
    assert data["firings"][0]["job"] == "nightly" and data["firings"][0]["test_id"] == "1000"


def test_local_time_is_in_the_jobs_zone_across_a_change() -> None:
    job = make_job("berlin", 1, cron="0 9 * * *", tz="Europe/Berlin")
    start = datetime(2026, 3, 28, tzinfo=UTC)
    firings = build_plan(make_config(job), start, until=start + timedelta(days=2)).to_json()
    assert [(f["local"], f["utc"]) for f in firings["firings"]] == [
        ("2026-03-28T09:00:00+01:00", "2026-03-28T08:00:00+00:00"),
        ("2026-03-29T09:00:00+02:00", "2026-03-29T07:00:00+00:00"),
    ]


def test_spread_is_added_in_elapsed_time_across_the_autumn_change() -> None:
    # 02:58+02:00 is 00:58 UTC; five minutes later is 01:03 UTC = 02:03+01:00, not 03:03.
    job = make_job("fold", 2, cron="58 2 * * *", tz="Europe/Berlin", spread=timedelta(minutes=10))
    start = datetime(2026, 10, 24, 22, tzinfo=UTC)
    plan = build_plan(make_config(job), start, until=start + timedelta(hours=6))
    assert [f["local"] for f in plan.to_json()["firings"]] == [
        "2026-10-25T02:58:00+02:00",
        "2026-10-25T02:03:00+01:00",
    ]
    assert {f["scheduled_for"] for f in plan.to_json()["firings"]} == {"2026-10-25T00:58:00+00:00"}
