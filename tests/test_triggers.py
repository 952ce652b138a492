"""scheduler.timing.triggers against SPEC section 5 "Time": the DST table, cron, every, at, spread.

The DST table follows APScheduler's ``test_dst_change`` (every case checked three ways: no
previous fire, previous == start, and iterating) and cronsim's ``TestDstTransitions``. Times are
compared as ISO strings in the schedule's zone, so the offset (and with it the fold) is checked,
not just the instant. Starts are written as UTC instants and converted to the zone, so a start
in the second pass of a repeated hour carries ``fold=1`` the way real clocks produce it.
"""

from __future__ import annotations

import calendar
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from itertools import islice, takewhile
from zoneinfo import ZoneInfo

import pytest
from apscheduler.triggers.cron import CronTrigger
from cronsim import CronSim
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.config import Job, Schedule
from scheduler.timing.cron import CRON_ALIASES, check_cron
from scheduler.timing.triggers import (
    AtTrigger,
    EveryTrigger,
    SpreadTrigger,
    build_trigger,
    iter_slots,
    spread_offsets,
)

UTC = timezone.utc
FIFTEEN = timedelta(minutes=15)

# Regression guards: each of these cases once failed (see the notes in scheduler/triggers.py):
# cronsim 2.8 jumping whole elapsed minutes/hours across Lord Howe's 30-minute shift; a fixed
# hour with a wildcard minute escaping Debian's fixed-time rules; spread offsets added in wall
# time; aware datetimes of one zone compared by wall clock, ignoring fold.


def _show(moment: datetime, tz: str) -> str:
    """``moment`` as an ISO string in ``tz``, after checking it is a real, canonical time."""
    canonical = moment.astimezone(UTC).astimezone(ZoneInfo(tz))
    if moment.tzinfo is not UTC:
        # A zone-aware result must not be an imaginary wall time (e.g. 02:10+01:00 in a gap).
        assert moment.isoformat() == canonical.isoformat(), "non-canonical local time"
    return canonical.isoformat()


def _instant(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


@dataclass(frozen=True)
class DstCase:
    tz: str
    spec: str | timedelta  # a cron expression, or the interval of an ``every`` schedule
    start: str  # an instant in UTC; the test converts it to the zone
    expected: tuple[str, ...]  # the next fires, ISO in the zone

    @property
    def schedule(self) -> Schedule:
        if isinstance(self.spec, timedelta):
            return Schedule(timezone=self.tz, every=self.spec)
        return Schedule(timezone=self.tz, cron=self.spec)

    @property
    def local_start(self) -> datetime:
        return datetime.fromisoformat(self.start).astimezone(ZoneInfo(self.tz))


def case(id: str, tz: str, spec: str | timedelta, start: str, *expected: str) -> object:
    return pytest.param(DstCase(tz, spec, start, expected), id=id)


BER, NYC, LHI, SYD, SCL = (
    "Europe/Berlin",
    "America/New_York",
    "Australia/Lord_Howe",
    "Australia/Sydney",
    "America/Santiago",
)

# fmt: off
DST_CASES = [
    # Europe/Berlin, spring 2026-03-29: 02:00+01:00 jumps to 03:00+02:00 (01:00 UTC).
    case("berlin-spring-fixed", BER, "30 2 * * *", "2026-03-27T11:07:00+00:00",
         "2026-03-28T02:30:00+01:00", "2026-03-29T03:00:00+02:00", "2026-03-30T02:30:00+02:00"),
    case("berlin-spring-minute-30", BER, "30 * * * *", "2026-03-28T23:10:00+00:00",
         "2026-03-29T00:30:00+01:00", "2026-03-29T01:30:00+01:00",
         "2026-03-29T03:30:00+02:00", "2026-03-29T04:30:00+02:00"),
    case("berlin-spring-every-20-min", BER, "*/20 * * * *", "2026-03-29T00:30:00+00:00",
         "2026-03-29T01:40:00+01:00", "2026-03-29T03:00:00+02:00", "2026-03-29T03:20:00+02:00"),
    case("berlin-spring-daily", BER, "@daily", "2026-03-27T11:07:00+00:00",
         "2026-03-28T00:00:00+01:00", "2026-03-29T00:00:00+01:00", "2026-03-30T00:00:00+02:00"),
    case("berlin-spring-interval", BER, FIFTEEN, "2026-03-29T00:40:00+00:00",
         "2026-03-29T01:45:00+01:00", "2026-03-29T03:00:00+02:00", "2026-03-29T03:15:00+02:00"),
    case("berlin-spring-fixed-hour-star-minute", BER, "*/20 2 * * *",
         "2026-03-28T11:07:00+00:00",
         "2026-03-29T03:00:00+02:00", "2026-03-30T02:00:00+02:00"),
    # Europe/Berlin, autumn 2026-10-25: 03:00+02:00 falls back to 02:00+01:00 (01:00 UTC).
    case("berlin-autumn-fixed", BER, "30 2 * * *", "2026-10-23T10:07:00+00:00",
         "2026-10-24T02:30:00+02:00", "2026-10-25T02:30:00+02:00", "2026-10-26T02:30:00+01:00"),
    case("berlin-autumn-fixed-from-before-into-repeated", BER, "30 2 * * *",
         "2026-10-24T23:10:00+00:00",
         "2026-10-25T02:30:00+02:00", "2026-10-26T02:30:00+01:00"),
    case("berlin-autumn-fixed-from-first-pass", BER, "30 2 * * *", "2026-10-25T00:10:00+00:00",
         "2026-10-25T02:30:00+02:00", "2026-10-26T02:30:00+01:00"),
    case("berlin-autumn-fixed-from-first-pass-after-slot", BER, "30 2 * * *",
         "2026-10-25T00:40:00+00:00", "2026-10-26T02:30:00+01:00"),
    case("berlin-autumn-fixed-from-second-pass", BER, "30 2 * * *", "2026-10-25T01:10:00+00:00",
         "2026-10-26T02:30:00+01:00", "2026-10-27T02:30:00+01:00"),
    case("berlin-autumn-fixed-from-after", BER, "30 2 * * *", "2026-10-25T02:10:00+00:00",
         "2026-10-26T02:30:00+01:00"),
    case("berlin-autumn-minute-30", BER, "30 * * * *", "2026-10-24T23:10:00+00:00",
         "2026-10-25T01:30:00+02:00", "2026-10-25T02:30:00+02:00",
         "2026-10-25T02:30:00+01:00", "2026-10-25T03:30:00+01:00"),
    case("berlin-autumn-minute-30-from-second-pass", BER, "30 * * * *",
         "2026-10-25T01:10:00+00:00",
         "2026-10-25T02:30:00+01:00", "2026-10-25T03:30:00+01:00"),
    case("berlin-autumn-every-20-min", BER, "*/20 * * * *", "2026-10-25T00:50:00+00:00",
         "2026-10-25T02:00:00+01:00", "2026-10-25T02:20:00+01:00",
         "2026-10-25T02:40:00+01:00", "2026-10-25T03:00:00+01:00"),
    case("berlin-autumn-every-20-min-from-second-pass", BER, "*/20 * * * *",
         "2026-10-25T01:10:00+00:00",
         "2026-10-25T02:20:00+01:00", "2026-10-25T02:40:00+01:00", "2026-10-25T03:00:00+01:00"),
    case("berlin-autumn-every-2-hours", BER, "0 */2 * * *", "2026-10-24T23:10:00+00:00",
         "2026-10-25T02:00:00+02:00", "2026-10-25T02:00:00+01:00", "2026-10-25T04:00:00+01:00"),
    case("berlin-autumn-daily", BER, "@daily", "2026-10-23T10:07:00+00:00",
         "2026-10-24T00:00:00+02:00", "2026-10-25T00:00:00+02:00", "2026-10-26T00:00:00+01:00"),
    case("berlin-autumn-daily-from-second-pass", BER, "@daily", "2026-10-25T01:10:00+00:00",
         "2026-10-26T00:00:00+01:00"),
    case("berlin-autumn-interval", BER, FIFTEEN, "2026-10-25T00:40:00+00:00",
         "2026-10-25T02:45:00+02:00", "2026-10-25T02:00:00+01:00", "2026-10-25T02:15:00+01:00"),
    case("berlin-autumn-interval-from-second-pass", BER, FIFTEEN, "2026-10-25T01:10:00+00:00",
         "2026-10-25T02:15:00+01:00", "2026-10-25T02:30:00+01:00"),
    case("berlin-autumn-fixed-hour-star-minute", BER, "*/20 2 * * *",
         "2026-10-24T23:10:00+00:00",
         "2026-10-25T02:00:00+02:00", "2026-10-25T02:20:00+02:00",
         "2026-10-25T02:40:00+02:00", "2026-10-26T02:00:00+01:00"),
    # America/New_York, spring 2026-03-08: 02:00-05:00 jumps to 03:00-04:00 (07:00 UTC).
    case("newyork-spring-fixed", NYC, "30 2 * * *", "2026-03-06T17:07:00+00:00",
         "2026-03-07T02:30:00-05:00", "2026-03-08T03:00:00-04:00", "2026-03-09T02:30:00-04:00"),
    case("newyork-spring-minute-30", NYC, "30 * * * *", "2026-03-08T05:10:00+00:00",
         "2026-03-08T00:30:00-05:00", "2026-03-08T01:30:00-05:00",
         "2026-03-08T03:30:00-04:00", "2026-03-08T04:30:00-04:00"),
    case("newyork-spring-every-20-min", NYC, "*/20 * * * *", "2026-03-08T06:30:00+00:00",
         "2026-03-08T01:40:00-05:00", "2026-03-08T03:00:00-04:00", "2026-03-08T03:20:00-04:00"),
    case("newyork-spring-daily", NYC, "@daily", "2026-03-06T17:07:00+00:00",
         "2026-03-07T00:00:00-05:00", "2026-03-08T00:00:00-05:00", "2026-03-09T00:00:00-04:00"),
    case("newyork-spring-interval", NYC, FIFTEEN, "2026-03-08T06:40:00+00:00",
         "2026-03-08T01:45:00-05:00", "2026-03-08T03:00:00-04:00", "2026-03-08T03:15:00-04:00"),
    # America/New_York, autumn 2026-11-01: 02:00-04:00 falls back to 01:00-05:00 (06:00 UTC).
    case("newyork-autumn-fixed", NYC, "30 2 * * *", "2026-10-30T16:07:00+00:00",
         "2026-10-31T02:30:00-04:00", "2026-11-01T02:30:00-05:00", "2026-11-02T02:30:00-05:00"),
    case("newyork-autumn-fixed-repeated", NYC, "30 1 * * *", "2026-10-30T16:07:00+00:00",
         "2026-10-31T01:30:00-04:00", "2026-11-01T01:30:00-04:00", "2026-11-02T01:30:00-05:00"),
    case("newyork-autumn-fixed-from-first-pass", NYC, "30 1 * * *", "2026-11-01T05:10:00+00:00",
         "2026-11-01T01:30:00-04:00", "2026-11-02T01:30:00-05:00"),
    case("newyork-autumn-fixed-from-first-pass-after-slot", NYC, "30 1 * * *",
         "2026-11-01T05:40:00+00:00", "2026-11-02T01:30:00-05:00"),
    case("newyork-autumn-fixed-from-second-pass", NYC, "30 1 * * *",
         "2026-11-01T06:10:00+00:00", "2026-11-02T01:30:00-05:00"),
    case("newyork-autumn-minute-30", NYC, "30 * * * *", "2026-11-01T04:10:00+00:00",
         "2026-11-01T00:30:00-04:00", "2026-11-01T01:30:00-04:00",
         "2026-11-01T01:30:00-05:00", "2026-11-01T02:30:00-05:00"),
    case("newyork-autumn-minute-30-from-second-pass", NYC, "30 * * * *",
         "2026-11-01T06:10:00+00:00",
         "2026-11-01T01:30:00-05:00", "2026-11-01T02:30:00-05:00"),
    case("newyork-autumn-every-20-min", NYC, "*/20 * * * *", "2026-11-01T05:50:00+00:00",
         "2026-11-01T01:00:00-05:00", "2026-11-01T01:20:00-05:00",
         "2026-11-01T01:40:00-05:00", "2026-11-01T02:00:00-05:00"),
    case("newyork-autumn-daily", NYC, "@daily", "2026-10-30T16:07:00+00:00",
         "2026-10-31T00:00:00-04:00", "2026-11-01T00:00:00-04:00", "2026-11-02T00:00:00-05:00"),
    case("newyork-autumn-interval", NYC, FIFTEEN, "2026-11-01T05:40:00+00:00",
         "2026-11-01T01:45:00-04:00", "2026-11-01T01:00:00-05:00", "2026-11-01T01:15:00-05:00"),
    # Australia/Lord_Howe, autumn 2026-04-05: 02:00+11:00 falls back 30 minutes to 01:30+10:30.
    case("lordhowe-autumn-fixed", LHI, "30 2 * * *", "2026-04-03T03:07:00+00:00",
         "2026-04-04T02:30:00+11:00", "2026-04-05T02:30:00+10:30", "2026-04-06T02:30:00+10:30"),
    case("lordhowe-autumn-fixed-repeated", LHI, "45 1 * * *", "2026-04-03T03:07:00+00:00",
         "2026-04-04T01:45:00+11:00", "2026-04-05T01:45:00+11:00", "2026-04-06T01:45:00+10:30"),
    case("lordhowe-autumn-fixed-from-first-pass", LHI, "45 1 * * *",
         "2026-04-04T14:40:00+00:00",
         "2026-04-05T01:45:00+11:00", "2026-04-06T01:45:00+10:30"),
    case("lordhowe-autumn-fixed-from-second-pass", LHI, "45 1 * * *",
         "2026-04-04T15:10:00+00:00", "2026-04-06T01:45:00+10:30"),
    case("lordhowe-autumn-minute-30", LHI, "30 * * * *", "2026-04-04T13:10:00+00:00",
         "2026-04-05T00:30:00+11:00", "2026-04-05T01:30:00+11:00",
         "2026-04-05T01:30:00+10:30", "2026-04-05T02:30:00+10:30"),
    case("lordhowe-autumn-every-20-min", LHI, "*/20 * * * *", "2026-04-04T14:05:00+00:00",
         "2026-04-05T01:20:00+11:00", "2026-04-05T01:40:00+11:00",
         "2026-04-05T01:40:00+10:30", "2026-04-05T02:00:00+10:30"),
    case("lordhowe-autumn-every-2-hours", LHI, "0 */2 * * *", "2026-04-04T12:10:00+00:00",
         "2026-04-05T00:00:00+11:00", "2026-04-05T02:00:00+10:30",
         "2026-04-05T04:00:00+10:30"),
    case("lordhowe-autumn-daily", LHI, "@daily", "2026-04-03T03:07:00+00:00",
         "2026-04-04T00:00:00+11:00", "2026-04-05T00:00:00+11:00", "2026-04-06T00:00:00+10:30"),
    case("lordhowe-autumn-interval", LHI, FIFTEEN, "2026-04-04T14:40:00+00:00",
         "2026-04-05T01:45:00+11:00", "2026-04-05T01:30:00+10:30", "2026-04-05T01:45:00+10:30"),
    # Australia/Lord_Howe, spring 2026-10-04: 02:00+10:30 jumps 30 minutes to 02:30+11:00.
    case("lordhowe-spring-fixed", LHI, "30 2 * * *", "2026-10-02T03:07:00+00:00",
         "2026-10-03T02:30:00+10:30", "2026-10-04T02:30:00+11:00", "2026-10-05T02:30:00+11:00"),
    case("lordhowe-spring-fixed-in-gap", LHI, "15 2 * * *", "2026-10-02T03:07:00+00:00",
         "2026-10-03T02:15:00+10:30", "2026-10-04T02:30:00+11:00", "2026-10-05T02:15:00+11:00"),
    case("lordhowe-spring-minute-30", LHI, "30 * * * *", "2026-10-03T13:40:00+00:00",
         "2026-10-04T00:30:00+10:30", "2026-10-04T01:30:00+10:30",
         "2026-10-04T02:30:00+11:00", "2026-10-04T03:30:00+11:00"),
    case("lordhowe-spring-every-20-min", LHI, "*/20 * * * *", "2026-10-03T15:05:00+00:00",
         "2026-10-04T01:40:00+10:30", "2026-10-04T02:40:00+11:00", "2026-10-04T03:00:00+11:00"),
    case("lordhowe-spring-daily", LHI, "@daily", "2026-10-02T03:07:00+00:00",
         "2026-10-03T00:00:00+10:30", "2026-10-04T00:00:00+10:30", "2026-10-05T00:00:00+11:00"),
    case("lordhowe-spring-interval", LHI, FIFTEEN, "2026-10-03T15:10:00+00:00",
         "2026-10-04T01:45:00+10:30", "2026-10-04T02:30:00+11:00", "2026-10-04T02:45:00+11:00"),
    # Australia/Sydney, autumn 2026-04-05: 03:00+11:00 falls back to 02:00+10:00 (16:00 UTC).
    case("sydney-autumn-fixed", SYD, "30 2 * * *", "2026-04-03T12:07:00+00:00",
         "2026-04-04T02:30:00+11:00", "2026-04-05T02:30:00+11:00", "2026-04-06T02:30:00+10:00"),
    case("sydney-autumn-fixed-from-first-pass", SYD, "30 2 * * *", "2026-04-04T15:10:00+00:00",
         "2026-04-05T02:30:00+11:00", "2026-04-06T02:30:00+10:00"),
    case("sydney-autumn-fixed-from-second-pass", SYD, "30 2 * * *",
         "2026-04-04T16:10:00+00:00", "2026-04-06T02:30:00+10:00"),
    case("sydney-autumn-minute-30", SYD, "30 * * * *", "2026-04-04T14:10:00+00:00",
         "2026-04-05T01:30:00+11:00", "2026-04-05T02:30:00+11:00",
         "2026-04-05T02:30:00+10:00", "2026-04-05T03:30:00+10:00"),
    case("sydney-autumn-every-20-min", SYD, "*/20 * * * *", "2026-04-04T15:50:00+00:00",
         "2026-04-05T02:00:00+10:00", "2026-04-05T02:20:00+10:00", "2026-04-05T02:40:00+10:00"),
    case("sydney-autumn-daily", SYD, "@daily", "2026-04-03T12:07:00+00:00",
         "2026-04-04T00:00:00+11:00", "2026-04-05T00:00:00+11:00", "2026-04-06T00:00:00+10:00"),
    case("sydney-autumn-interval", SYD, FIFTEEN, "2026-04-04T15:40:00+00:00",
         "2026-04-05T02:45:00+11:00", "2026-04-05T02:00:00+10:00", "2026-04-05T02:15:00+10:00"),
    # Australia/Sydney, spring 2026-10-04: 02:00+10:00 jumps to 03:00+11:00 (16:00 UTC).
    case("sydney-spring-fixed", SYD, "30 2 * * *", "2026-10-02T12:07:00+00:00",
         "2026-10-03T02:30:00+10:00", "2026-10-04T03:00:00+11:00", "2026-10-05T02:30:00+11:00"),
    case("sydney-spring-minute-30", SYD, "30 * * * *", "2026-10-03T14:10:00+00:00",
         "2026-10-04T00:30:00+10:00", "2026-10-04T01:30:00+10:00",
         "2026-10-04T03:30:00+11:00", "2026-10-04T04:30:00+11:00"),
    case("sydney-spring-every-20-min", SYD, "*/20 * * * *", "2026-10-03T15:30:00+00:00",
         "2026-10-04T01:40:00+10:00", "2026-10-04T03:00:00+11:00", "2026-10-04T03:20:00+11:00"),
    case("sydney-spring-daily", SYD, "@daily", "2026-10-02T12:07:00+00:00",
         "2026-10-03T00:00:00+10:00", "2026-10-04T00:00:00+10:00", "2026-10-05T00:00:00+11:00"),
    case("sydney-spring-interval", SYD, FIFTEEN, "2026-10-03T15:40:00+00:00",
         "2026-10-04T01:45:00+10:00", "2026-10-04T03:00:00+11:00", "2026-10-04T03:15:00+11:00"),
    # America/Santiago changes at midnight: 2026-04-05 00:00-03:00 falls back to 23:00-04:00 on
    # the 4th; 2026-09-06 00:00-04:00 jumps to 01:00-03:00, so that day has no midnight.
    case("santiago-spring-daily-midnight-in-gap", SCL, "@daily", "2026-09-04T16:07:00+00:00",
         "2026-09-05T00:00:00-04:00", "2026-09-06T01:00:00-03:00", "2026-09-07T00:00:00-03:00"),
    case("santiago-autumn-fixed-repeated", SCL, "30 23 * * *", "2026-04-03T16:07:00+00:00",
         "2026-04-03T23:30:00-03:00", "2026-04-04T23:30:00-03:00", "2026-04-05T23:30:00-04:00"),
    case("santiago-autumn-fixed-from-second-pass", SCL, "30 23 * * *",
         "2026-04-05T03:10:00+00:00", "2026-04-05T23:30:00-04:00"),
    case("santiago-autumn-daily-from-second-pass", SCL, "@daily", "2026-04-05T03:10:00+00:00",
         "2026-04-05T00:00:00-04:00", "2026-04-06T00:00:00-04:00"),
]
# fmt: on


@pytest.mark.parametrize("dst", DST_CASES)
def test_dst_change(dst: DstCase) -> None:
    """Next fire with no previous fire, with previous == start, and iterating, per zone day."""
    trigger = build_trigger(dst.schedule)
    start = dst.local_start
    assert _show(start, dst.tz) not in dst.expected  # so "previous == start" means the same
    for begin in (start, start.astimezone(UTC)):  # the zone's rendering and plain UTC agree
        first = trigger.get_next_fire_time(None, begin)
        assert first is not None and _show(first, dst.tz) == dst.expected[0]
        after = trigger.get_next_fire_time(begin, begin)
        assert after is not None and _show(after, dst.tz) == dst.expected[0]

    fires: list[str] = []
    previous: datetime | None = None
    for _ in dst.expected:
        fire = trigger.get_next_fire_time(previous, previous or start)
        assert fire is not None
        fires.append(_show(fire, dst.tz))
        previous = fire
    assert fires == list(dst.expected)

    end = _instant(dst.expected[-1]) + timedelta(seconds=1)
    slots = [_show(slot, dst.tz) for slot in iter_slots(dst.schedule, start, end)]
    assert slots == list(dst.expected)


@pytest.mark.parametrize("dst", [p for p in DST_CASES if not p.marks])  # type: ignore[attr-defined]
def test_a_fire_time_is_its_own_next_fire_time(dst: DstCase) -> None:
    """``now`` is inclusive: asked exactly at a fire time, the trigger answers that time."""
    trigger = build_trigger(dst.schedule)
    for text in dst.expected:
        moment = _instant(text).astimezone(ZoneInfo(dst.tz))
        fire = trigger.get_next_fire_time(None, moment)
        assert fire is not None and _show(fire, dst.tz) == text


# --- the same rules as properties, against a tiny independent oracle ------------------------


def _field(spec: str, low: int, high: int) -> set[int]:
    """Values of one cron field written with numbers, '*', ranges, lists and steps."""
    values: set[int] = set()
    for part in spec.split(","):
        part, _, step = part.partition("/")
        if part == "*":
            first, last = low, high
        elif "-" in part:
            first, last = (int(v) for v in part.split("-"))
        else:
            first, last = int(part), (high if step else int(part))
        values.update(range(first, last + 1, int(step or 1)))
    return values


def _wall_clock_fires(expr: str, tz: ZoneInfo, start: datetime, end: datetime) -> list[str]:
    """Every UTC minute whose local wall time matches minute and hour (elapsed-time rule)."""
    minutes, hours = _field(expr.split()[0], 0, 59), _field(expr.split()[1], 0, 23)
    out, moment = [], start
    while moment < end:
        local = moment.astimezone(tz)
        if local.minute in minutes and local.hour in hours:
            out.append(local.isoformat())
        moment += timedelta(minutes=1)
    return out


def _resolve_wall_time(day: date, at: time, tz: ZoneInfo) -> datetime:
    """A local wall time as an instant: its first pass, or the first instant after a gap."""
    wall = datetime.combine(day, at)
    first = wall.replace(tzinfo=tz, fold=0)
    if first.astimezone(UTC).astimezone(tz).replace(tzinfo=None) == wall:
        return first.astimezone(UTC).astimezone(tz)
    moment = first.astimezone(UTC) - timedelta(hours=3)  # before the gap: walk to its end
    while moment.astimezone(tz).replace(tzinfo=None) < wall:
        moment += timedelta(minutes=1)
    return moment.astimezone(tz)


def _fixed_time_fires(expr: str, tz: ZoneInfo, first: date, last: date) -> list[str]:
    """Debian cron for fixed times: each wall time once per day; gap times after the gap."""
    minutes, hours = _field(expr.split()[0], 0, 59), _field(expr.split()[1], 0, 23)
    out: list[str] = []
    day = first
    while day <= last:
        for hour in sorted(hours):
            for minute in sorted(minutes):
                text = _resolve_wall_time(day, time(hour, minute), tz).isoformat()
                if not out or out[-1] != text:  # several gap times collapse into one fire
                    out.append(text)
        day += timedelta(days=1)
    return out


# fmt: off
CHANGE_DAYS = [
    (BER, "2026-03-29"), (BER, "2026-10-25"), (NYC, "2026-03-08"), (NYC, "2026-11-01"),
    (LHI, "2026-04-05"), (LHI, "2026-10-04"), (SYD, "2026-04-05"), (SYD, "2026-10-04"),
    (SCL, "2026-04-05"), (SCL, "2026-09-06"),
]
WILDCARD_HOUR = ["30 * * * *", "*/20 * * * *", "0 */2 * * *", "*/15 * * * *", "5,35 * * * *"]
FIXED_TIME = ["30 2 * * *", "15 2 * * *", "45 1 * * *", "0,30 2 * * *", "0,15,45 2 * * *",
              "30 23 * * *", "0 0 * * *", "0 1-3 * * *", "59 1 * * *", "0 3 * * *"]
# fmt: on


def _wildcard_params() -> Iterator[object]:
    for tz, day in CHANGE_DAYS:
        for expr in WILDCARD_HOUR:
            yield pytest.param(tz, day, expr, id=f"{tz}-{day}-{expr}")


@pytest.mark.parametrize(("tz", "day", "expr"), list(_wildcard_params()))
def test_wildcard_hour_fires_at_every_matching_wall_time(tz: str, day: str, expr: str) -> None:
    """A wildcard hour follows elapsed time: both passes of a repeated hour, none in a gap."""
    zone, change = ZoneInfo(tz), date.fromisoformat(day)
    start = datetime.combine(change - timedelta(days=1), time(12), tzinfo=zone).astimezone(UTC)
    end = datetime.combine(change + timedelta(days=1), time(12), tzinfo=zone).astimezone(UTC)
    got = [
        slot.astimezone(zone).isoformat()
        for slot in iter_slots(Schedule(timezone=tz, cron=expr), start, end)
    ]
    assert got == _wall_clock_fires(expr, zone, start, end)


@pytest.mark.parametrize(("tz", "day"), CHANGE_DAYS)
@pytest.mark.parametrize("expr", FIXED_TIME)
def test_fixed_time_fires_once_per_wall_time(tz: str, day: str, expr: str) -> None:
    """A fixed time fires once a day: first pass of a repeat, first instant after a gap."""
    zone, change = ZoneInfo(tz), date.fromisoformat(day)
    first, last = change - timedelta(days=1), change + timedelta(days=1)
    start = datetime.combine(first, time(0), tzinfo=zone).astimezone(UTC)
    end = datetime.combine(last + timedelta(days=1), time(0), tzinfo=zone).astimezone(UTC)
    got = [
        slot.astimezone(zone).isoformat()
        for slot in iter_slots(Schedule(timezone=tz, cron=expr), start, end)
    ]
    assert got == _fixed_time_fires(expr, zone, first, last)


def _utc_day(day: str) -> datetime:
    return datetime.combine(date.fromisoformat(day), time(0), tzinfo=UTC)


# Each schedule with a window of ten days around one of its zone's changes.
PROPERTY_CASES = [
    (Schedule(timezone=BER, cron="30 2 * * *"), "2026-10-20"),
    (Schedule(timezone=BER, cron="30 * * * *"), "2026-03-24"),
    (Schedule(timezone=NYC, cron="30 1 * * *"), "2026-10-27"),
    (Schedule(timezone=NYC, cron="*/20 * * * *"), "2026-03-03"),
    (Schedule(timezone=SYD, cron="30 2 * * *"), "2026-09-29"),
    (Schedule(timezone=LHI, cron="45 1 * * *"), "2026-03-31"),
    (Schedule(timezone=LHI, cron="*/20 * * * *"), "2026-09-29"),
    (Schedule(timezone=SCL, cron="@daily"), "2026-09-01"),
    (Schedule(timezone=SCL, cron="30 23 * * *"), "2026-03-31"),
    (Schedule(timezone=BER, every=FIFTEEN), "2026-10-20"),
]
PROPERTY_SLOTS = [
    [
        slot.astimezone(UTC)
        for slot in iter_slots(sched, _utc_day(day), _utc_day(day) + timedelta(days=10))
    ]
    for sched, day in PROPERTY_CASES
]


@settings(max_examples=300, deadline=None)
@given(
    index=st.integers(0, len(PROPERTY_CASES) - 1),
    seconds=st.integers(0, 8 * 86400),
    micros=st.sampled_from([0, 1, 999_999]),
    in_zone=st.booleans(),
)
def test_next_fire_time_is_the_first_slot_at_or_after_now(
    index: int, seconds: int, micros: int, in_zone: bool
) -> None:
    """Asked at any instant (any fold), the trigger agrees with iterating from far before."""
    sched, day = PROPERTY_CASES[index]
    now = _utc_day(day) + timedelta(seconds=seconds, microseconds=micros)
    asked = now.astimezone(ZoneInfo(sched.timezone)) if in_zone else now
    fire = build_trigger(sched).get_next_fire_time(None, asked)
    assert fire is not None
    assert fire.astimezone(UTC) == next(s for s in PROPERTY_SLOTS[index] if s >= now)


# --- APScheduler's own cron trigger, and why it is wrapped ----------------------------------


def test_apscheduler_cron_fires_twice_in_the_repeated_hour_and_ours_once() -> None:
    """APScheduler 3.11 runs ``30 2 * * *`` in both passes of 02:30 on 2026-10-25 Berlin."""
    berlin = ZoneInfo(BER)
    start = datetime(2026, 10, 24, 12, tzinfo=UTC).astimezone(berlin)

    def first_three(trigger: object) -> list[str]:
        out, previous, now = [], None, start
        for _ in range(3):
            fire = trigger.get_next_fire_time(previous, now)  # type: ignore[attr-defined]
            out.append(fire.astimezone(berlin).isoformat())
            previous = now = fire
        return out

    theirs = first_three(CronTrigger.from_crontab("30 2 * * *", timezone=berlin))
    assert theirs == [
        "2026-10-25T02:30:00+02:00",
        "2026-10-25T02:30:00+01:00",
        "2026-10-26T02:30:00+01:00",
    ]
    ours = first_three(build_trigger(Schedule(timezone=BER, cron="30 2 * * *")))
    assert ours == [
        "2026-10-25T02:30:00+02:00",
        "2026-10-26T02:30:00+01:00",
        "2026-10-27T02:30:00+01:00",
    ]


# --- zones without DST: the wrapper adds nothing to and drops nothing from cronsim ----------

YEAR_EXPRESSIONS = [
    "*/15 8-18 * * mon-fri",
    "0 9 L * *",
    "30 6 * * 5L",
    "0 12 * * mon#1",
    "0 0 1 jan,jul *",
    "45 23 * * sun",
    "0 9 1,15 * mon",
    "5 4 * * *",
    "0 0 29 2 *",
    "@weekly",
    "@monthly",
]


@pytest.mark.parametrize("tz", ["UTC", "Asia/Tokyo", "Asia/Kolkata"])
@pytest.mark.parametrize("expr", YEAR_EXPRESSIONS)
def test_a_year_of_fires_matches_cronsim(tz: str, expr: str) -> None:
    zone = ZoneInfo(tz)
    start = datetime(2026, 1, 1, tzinfo=zone)
    end = datetime(2029 if "29 2" in expr else 2027, 1, 1, tzinfo=zone)  # 2028 is a leap year
    direct = CronSim(check_cron(expr), start - timedelta(seconds=1))
    # A year, or the first 400 fires of a dense expression (which would take seconds).
    expected = [t.isoformat() for t in islice(takewhile(lambda t: t < end, direct), 400)]
    slots = iter_slots(Schedule(timezone=tz, cron=expr), start, end)
    got = [s.isoformat() for s in islice(slots, 400)]
    assert got == expected and got


def _days_2026(predicate: object) -> list[date]:
    days = [date(2026, 1, 1) + timedelta(days=i) for i in range(365)]
    return [d for d in days if predicate(d)]  # type: ignore[operator]


@pytest.mark.parametrize(
    ("expr", "at", "days"),
    [
        (
            "0 9 L * *",
            time(9),
            _days_2026(lambda d: d.day == calendar.monthrange(d.year, d.month)[1]),
        ),
        (
            "30 6 * * 5L",
            time(6, 30),  # the last Friday of each month
            _days_2026(lambda d: d.weekday() == 4 and (d + timedelta(days=7)).month != d.month),
        ),
        ("0 12 * * mon#1", time(12), _days_2026(lambda d: d.weekday() == 0 and d.day <= 7)),
        ("0 0 * jan *", time(0), _days_2026(lambda d: d.month == 1)),
        ("0 8 * * mon-fri", time(8), _days_2026(lambda d: d.weekday() < 5)),
        (
            "0 9 1,15 * mon",
            time(9),  # cron ORs day-of-month and day-of-week when both are set
            _days_2026(lambda d: d.day in (1, 15) or d.weekday() == 0),
        ),
    ],
    ids=["last-day", "last-friday", "first-monday", "january", "weekdays", "dom-or-dow"],
)
def test_calendar_forms_fire_on_the_right_days(expr: str, at: time, days: list[date]) -> None:
    """``L``, ``5L``, ``#``, names and day OR-ing against the calendar module, in Asia/Kolkata."""
    zone = ZoneInfo("Asia/Kolkata")
    start, end = datetime(2026, 1, 1, tzinfo=zone), datetime(2027, 1, 1, tzinfo=zone)
    got = [s.isoformat() for s in iter_slots(Schedule(timezone=zone.key, cron=expr), start, end)]
    assert got == [datetime.combine(d, at, tzinfo=zone).isoformat() for d in days]
    assert got[0].endswith("+05:30")


# --- check_cron and aliases ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("0 0 31 2 *", "cron expression '0 0 31 2 *' can never fire"),
        ("0 0 30 2 *", "cron expression '0 0 30 2 *' can never fire"),
        ("0 0 * * * *", "cron needs 5 fields"),
        ("0 0 *", "cron needs 5 fields"),
        ("@bogus", "unknown alias '@bogus'"),
        ("61 * * * *", "invalid cron expression '61 * * * *'"),
        ("* 24 * * *", "invalid cron expression"),
        ("0 0 * 13 *", "invalid cron expression"),
        ("0 0 * * mon-", "invalid cron expression"),
    ],
)
def test_check_cron_rejects(expr: str, message: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        check_cron(expr)


@pytest.mark.parametrize(
    ("alias", "fields", "first"),
    [
        ("@yearly", "0 0 1 1 *", "2027-01-01T00:00:00+00:00"),
        ("@monthly", "0 0 1 * *", "2026-04-01T00:00:00+00:00"),
        ("@weekly", "0 0 * * 0", "2026-03-22T00:00:00+00:00"),  # 2026-03-18 is a Wednesday
        ("@daily", "0 0 * * *", "2026-03-19T00:00:00+00:00"),
        ("@hourly", "0 * * * *", "2026-03-18T13:00:00+00:00"),
    ],
)
def test_aliases(alias: str, fields: str, first: str) -> None:
    assert check_cron(alias) == check_cron(alias.upper()) == fields
    assert alias in CRON_ALIASES
    now = datetime(2026, 3, 18, 12, 30, tzinfo=UTC)
    fire = build_trigger(Schedule(cron=alias)).get_next_fire_time(None, now)
    assert fire is not None and fire.isoformat() == first


def test_hourly_alias_follows_elapsed_time_over_a_gap() -> None:
    start = datetime(2026, 3, 28, 23, 30, tzinfo=UTC)
    end = datetime(2026, 3, 29, 2, 30, tzinfo=UTC)
    slots = iter_slots(Schedule(timezone=BER, cron="@hourly"), start, end)
    assert [_show(s, BER) for s in slots] == [
        "2026-03-29T01:00:00+01:00",
        "2026-03-29T03:00:00+02:00",
        "2026-03-29T04:00:00+02:00",
    ]


# --- every -----------------------------------------------------------------------------------


def test_every_is_aligned_to_the_epoch_without_start() -> None:
    trigger = build_trigger(Schedule(every=FIFTEEN))
    now = datetime(2026, 5, 4, 9, 7, 12, tzinfo=UTC)
    fires = list(islice(iter_slots(Schedule(every=FIFTEEN), now, now + timedelta(hours=1)), 5))
    assert [f.isoformat() for f in fires] == [
        "2026-05-04T09:15:00+00:00",
        "2026-05-04T09:30:00+00:00",
        "2026-05-04T09:45:00+00:00",
        "2026-05-04T10:00:00+00:00",
    ]
    assert trigger.get_next_fire_time(None, fires[0]) == fires[0]  # now is inclusive
    odd = build_trigger(Schedule(every=timedelta(minutes=7)))
    fire = odd.get_next_fire_time(None, now)
    assert fire is not None and fire >= now
    assert (fire - datetime(1970, 1, 1, tzinfo=UTC)) % timedelta(minutes=7) == timedelta(0)
    assert fire - now < timedelta(minutes=7)


def test_every_is_anchored_at_start() -> None:
    start = datetime(2026, 1, 1, 1, 0, 30, tzinfo=UTC)
    sched = Schedule(every=timedelta(hours=6), start=start)
    trigger = build_trigger(sched)
    assert trigger.get_next_fire_time(None, datetime(2025, 12, 1, tzinfo=UTC)) == start
    later = trigger.get_next_fire_time(None, datetime(2026, 1, 1, 2, tzinfo=UTC))
    assert later == datetime(2026, 1, 1, 7, 0, 30, tzinfo=UTC)
    assert trigger.get_next_fire_time(later, later) == datetime(2026, 1, 1, 13, 0, 30, tzinfo=UTC)
    before = datetime(2025, 12, 31, 20, tzinfo=UTC)
    assert list(iter_slots(sched, before, start + timedelta(hours=12))) == [
        start,
        start + timedelta(hours=6),
    ]


def test_every_day_from_a_local_start_keeps_elapsed_time_across_a_change() -> None:
    """Elapsed time: a daily interval anchored at 09:00 Berlin is 10:00 after the spring change."""
    start = datetime(2026, 3, 27, 8, tzinfo=UTC).astimezone(ZoneInfo(BER))
    sched = Schedule(timezone=BER, every=timedelta(days=1), start=start)
    slots = iter_slots(sched, start, start + timedelta(days=3))
    assert [_show(s, BER) for s in slots] == [
        "2026-03-27T09:00:00+01:00",
        "2026-03-28T09:00:00+01:00",
        "2026-03-29T10:00:00+02:00",
    ]


# --- at --------------------------------------------------------------------------------------


def test_at_fires_once() -> None:
    at = datetime(2026, 12, 1, 9, tzinfo=timezone(timedelta(hours=1)))
    trigger = build_trigger(Schedule(at=at))
    before = datetime(2026, 11, 30, tzinfo=UTC)
    assert trigger.get_next_fire_time(None, before) == at
    assert trigger.get_next_fire_time(None, at) == at  # now is inclusive
    assert trigger.get_next_fire_time(at, at) is None  # fired: never again
    assert list(iter_slots(Schedule(at=at), before, before + timedelta(days=30))) == [at]


def test_at_in_the_past_never_fires() -> None:
    at = datetime(2026, 12, 1, 9, tzinfo=timezone(timedelta(hours=1)))
    after = at + timedelta(seconds=1)
    assert build_trigger(Schedule(at=at)).get_next_fire_time(None, after) is None
    assert list(iter_slots(Schedule(at=at), after, after + timedelta(days=365))) == []


def test_at_in_the_second_pass_is_not_past_during_the_first_pass() -> None:
    berlin = ZoneInfo(BER)
    at = datetime(2026, 10, 25, 1, 30, tzinfo=UTC).astimezone(berlin)  # 02:30+01:00, fold=1
    now = datetime(2026, 10, 25, 0, 45, tzinfo=UTC).astimezone(berlin)  # 02:45+02:00
    assert AtTrigger(at).get_next_fire_time(None, now) == at


# --- iter_slots bounds -----------------------------------------------------------------------


def test_iter_slots_is_inclusive_at_start_and_exclusive_at_end() -> None:
    sched = Schedule(every=FIFTEEN)
    start = datetime(2026, 5, 4, 9, tzinfo=UTC)
    assert list(iter_slots(sched, start, start + timedelta(minutes=30))) == [start, start + FIFTEEN]
    assert list(iter_slots(sched, start, start)) == []


def test_iter_slots_end_given_in_the_zone_is_compared_as_an_instant() -> None:
    berlin = ZoneInfo(BER)
    start = datetime(2026, 10, 24, 23, 0, tzinfo=UTC).astimezone(berlin)
    end = datetime(2026, 10, 25, 0, 45, tzinfo=UTC).astimezone(berlin)  # 02:45+02:00, 1st pass
    slots = iter_slots(Schedule(timezone=BER, cron="30 * * * *"), start, end)
    assert [_show(s, BER) for s in slots] == [
        "2026-10-25T01:30:00+02:00",
        "2026-10-25T02:30:00+02:00",
    ]


# --- spread ----------------------------------------------------------------------------------


def _job(tests: tuple[str, ...], spread: timedelta, name: str = "dns-business-hours") -> Job:
    return Job(name=name, tests=tests, schedule=Schedule(every=FIFTEEN), spread=spread)


def test_spread_offsets_are_evenly_spaced() -> None:
    job = _job(("105", "106", "107", "108"), timedelta(minutes=2))
    offsets = spread_offsets(job)
    assert set(offsets) == set(job.tests)
    assert sorted(offsets.values()) == [timedelta(seconds=s) for s in (0, 30, 60, 90)]
    seven = _job(tuple(str(i) for i in range(7)), timedelta(minutes=1))
    for i, offset in enumerate(sorted(spread_offsets(seven).values())):
        # i * W / n, give or take the microsecond rounding of W / n
        assert abs(offset - timedelta(minutes=1) * i / 7) <= timedelta(microseconds=i)
    assert set(spread_offsets(_job(("1", "2"), timedelta(0))).values()) == {timedelta(0)}


def test_spread_order_depends_on_job_and_test_not_on_listing_order() -> None:
    tests = tuple(str(100 + i) for i in range(12))
    forward = spread_offsets(_job(tests, timedelta(minutes=12)))
    assert spread_offsets(_job(tests[::-1], timedelta(minutes=12))) == forward
    assert [forward[t] for t in tests] != sorted(forward.values())  # a hash order, not listing
    other = spread_offsets(_job(tests, timedelta(minutes=12), name="other-job"))
    assert other != forward


def test_spread_offsets_are_the_same_in_a_fresh_interpreter() -> None:
    tests = tuple(str(100 + i) for i in range(10))
    here = spread_offsets(_job(tests, timedelta(minutes=5)))
    assert spread_offsets(_job(tests, timedelta(minutes=5))) == here
    code = (
        "from datetime import timedelta\n"
        "from scheduler.config import Job, Schedule\n"
        "from scheduler.timing.triggers import spread_offsets\n"
        f"job = Job(name='dns-business-hours', tests={tests!r},\n"
        "          schedule=Schedule(every=timedelta(minutes=15)), spread=timedelta(minutes=5))\n"
        "print(sorted((t, o.total_seconds()) for t, o in spread_offsets(job).items()))\n"
    )
    for seed in ("1", "2"):  # a different str-hash seed must not change the order
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            env=env,
            check=True,
            cwd=os.path.dirname(os.path.dirname(__file__)),
        )
        assert out.stdout.strip() == str(sorted((t, o.total_seconds()) for t, o in here.items()))


def test_spread_trigger_shifts_each_slot_by_its_offset() -> None:
    trigger = SpreadTrigger(EveryTrigger(FIFTEEN), timedelta(seconds=40))
    nine = datetime(2026, 5, 4, 9, tzinfo=UTC)
    at = nine + timedelta(seconds=40)
    assert trigger.get_next_fire_time(None, nine - timedelta(seconds=1)) == at
    assert trigger.get_next_fire_time(None, nine + timedelta(seconds=10)) == at  # still ahead
    assert trigger.get_next_fire_time(None, at) == at
    assert trigger.get_next_fire_time(at, at) == at + FIFTEEN
    assert trigger.get_next_fire_time(None, at + timedelta(seconds=1)) == at + FIFTEEN


def test_spread_trigger_adds_elapsed_time_across_the_autumn_change() -> None:
    """``58 2 * * *`` + 5 min is 01:03 UTC (02:03+01:00), not an hour later."""
    inner = build_trigger(Schedule(timezone=BER, cron="58 2 * * *"))
    fire = SpreadTrigger(inner, timedelta(minutes=5)).get_next_fire_time(
        None, datetime(2026, 10, 24, 22, tzinfo=UTC)
    )
    assert fire is not None and fire.astimezone(UTC) == datetime(2026, 10, 25, 1, 3, tzinfo=UTC)


def test_spread_trigger_loses_no_firing_in_the_repeated_hour() -> None:
    trigger = SpreadTrigger(
        build_trigger(Schedule(timezone=BER, cron="59 * * * *")), timedelta(minutes=2)
    )
    fires: list[str] = []
    previous, now = None, datetime(2026, 10, 24, 23, 30, tzinfo=UTC)
    for _ in range(4):
        fire = trigger.get_next_fire_time(previous, now)
        assert fire is not None
        fires.append(_show(fire, BER))
        previous = now = fire
    assert fires == [
        "2026-10-25T02:01:00+02:00",
        "2026-10-25T02:01:00+01:00",
        "2026-10-25T03:01:00+01:00",
        "2026-10-25T04:01:00+01:00",
    ]


def test_spread_trigger_never_returns_a_time_inside_the_spring_gap() -> None:
    inner = build_trigger(Schedule(timezone=BER, cron="30 1 * * *"))
    fire = SpreadTrigger(inner, timedelta(minutes=40)).get_next_fire_time(
        None, datetime(2026, 3, 28, 22, tzinfo=UTC)
    )
    assert fire is not None and _show(fire, BER) == "2026-03-29T03:10:00+02:00"
