"""Fuzzing config.load(): any text gives a Config or a ConfigError, never another exception."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from scheduler.config import Config, load, parse_duration, parse_rate, parse_when
from scheduler.config.addresses import is_loopback
from scheduler.errors import ConfigError

FUZZ = settings(
    max_examples=250,
    deadline=1000,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

SEED = """\
version: 1
api: {base_url: "https://api.thousandeyes.com/v7", timeout: 30s, rate_limit: 24/min}
history: {url: "sqlite:///history.db", retention: 90d}
metrics: {listen: "127.0.0.1:9464"}
defaults:
  retry: {attempts: 4, backoff: 2s, max_backoff: 5m}
  timezone: Europe/Berlin
jobs:
  - &base
    name: dns
    tests: [105, "106"]
    schedule: {cron: "*/15 8-18 * * mon-fri", timezone: Europe/Berlin}
  - <<: *base
    name: web
    schedule: {every: 6h, start: "2026-01-01T00:00:00"}
  - name: window
    tests: [300]
    schedule: {at: 2026-12-01T09:00:00+01:00}
    enabled: false
"""

TOKENS = [
    "jobs",
    "name",
    "tests",
    "schedule",
    "every",
    "cron",
    "at",
    "start",
    "timezone",
    "api",
    "defaults",
    "retry",
    "<<",
    "&a",
    "*a",
    "!!str",
    "!!int",
    "!!map",
    "---",
    "...",
    ": ",
    "- ",
    "[",
    "]",
    "{",
    "}",
    ",",
    "'",
    '"',
    "#",
    "|",
    ">",
    "?",
    "\n",
    "  ",
    "\t",
    "%YAML 1.1",
    "0105",
    "1:30",
    "15m",
    "-1",
    "true",
    "null",
    "~",
    "2026-02-30",
    "\\",
    "\x00",
    "\ufeff",
    "\u00e9",
    "\U0001f600",
]
yaml_like_text = st.lists(st.sampled_from(TOKENS) | st.text(max_size=3), max_size=60).map("".join)


def mostly(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``good`` nine times in ten, so that some documents are valid and get checked too."""
    return st.sampled_from(range(10)).flatmap(lambda roll: bad if roll == 9 else good)


DURATIONS = mostly(
    st.sampled_from(["0s", "1s", "15m", "1.5h", "90d", "2w", "250ms"]),
    st.sampled_from(["-5m", "5x", "", "1e3s", "99999999999w", "0"]) | st.integers(-5, 5),
)
TIMES = mostly(
    st.sampled_from(["2026-12-01T09:00:00+01:00", "2026-12-01T09:00:00", "2026-12-01"]),
    st.sampled_from(
        [
            "tomorrow",
            "1900-01-01T00:00:00",
            "9999-12-31T23:59:59-12:00",
            "0001-01-01T00:00:00+14:00",
        ]
    )
    | st.datetimes(
        min_value=datetime(1, 1, 2),
        max_value=datetime(9999, 12, 30),
        timezones=st.sampled_from([None, timezone.utc, timezone(timedelta(hours=14))]),
    ),
)
ZONES = mostly(
    st.sampled_from(["UTC", "Europe/Berlin", "America/New_York", "Etc/GMT+5"]),
    st.sampled_from(["europe/berlin", "Mars/Olympus", "", "../etc", "UTC\0"]),
)
CRONS = mostly(
    st.sampled_from(["*/15 8-18 * * mon-fri", "@daily", "0 9 * * 1#2", "0 0 L * *"]),
    st.sampled_from(["@often", "0 0 31 2 *", "* * *", "61 * * * *", "*/0 * * * *", "x" * 300]),
)
IDS = mostly(
    st.integers(0, 10**9) | st.sampled_from(["105", "0105"]),
    st.integers(-2, 10**22) | st.sampled_from(["../../x", "1; rm", "", "\u0663"]),
)
HTTPS = st.sampled_from(["https://api.thousandeyes.com/v7", "http://127.0.0.1:8080"])
DB_URLS = st.sampled_from(["sqlite:///h.db", "sqlite://", "postgresql+psycopg://u@h/db"])
URLS = (
    HTTPS
    | DB_URLS
    | st.sampled_from(
        ["http://[::1", "http://h:99999", "ftp://x", "postgres://x", "http://proxy:3128", ":"]
    )
)
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=12)
    | DURATIONS
    | TIMES
    | ZONES
    | IDS
    | URLS
)
anything = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8) | st.sampled_from(TOKENS[:12]), inner, max_size=4)
    ),
    max_leaves=12,
)


def section(**fields: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A mapping of the real keys, now and then with an unknown key, or something else."""
    known = st.fixed_dictionaries({}, optional=fields)
    extra = mostly(st.just({}), st.dictionaries(st.text(max_size=10), anything, max_size=1))
    mapping = st.tuples(known, extra).map(lambda parts: {**parts[0], **parts[1]})
    return mostly(mapping, anything)


NOTIFY_URLS = mostly(
    st.sampled_from(
        [None, "https://hooks.example.com/T0/B0/x", "http://127.0.0.1:8000/ping/x?create=1"]
    ),
    URLS | st.sampled_from(["http://hooks.example.com/x", "https://:443/x"]),
)
notify = section(
    webhook=NOTIFY_URLS,
    ping_url=NOTIFY_URLS,
    timeout=DURATIONS,
    after=mostly(st.integers(1, 10), st.integers(-1, 0) | anything),
)
retry = section(
    attempts=mostly(st.integers(1, 20), st.integers(-1, 25) | anything),
    backoff=DURATIONS,
    max_backoff=DURATIONS,
)
schedule = mostly(
    st.one_of(
        st.fixed_dictionaries({"cron": CRONS}, optional={"timezone": ZONES}),
        st.fixed_dictionaries({"every": DURATIONS}, optional={"start": TIMES}),
        st.fixed_dictionaries({"at": TIMES}, optional={"timezone": ZONES}),
    ),
    section(cron=CRONS, every=DURATIONS, at=TIMES, timezone=ZONES, start=TIMES),
)
job = mostly(
    st.fixed_dictionaries(
        {
            "name": st.sampled_from(["a", "b", "c.1", "d-2", "e_3"]),
            "tests": st.lists(IDS, min_size=1, max_size=3, unique_by=str),
            "schedule": schedule,
        },
        optional={
            "aid": IDS | st.none(),
            "enabled": mostly(st.booleans(), anything),
            "timezone": ZONES,
            "retry": retry,
            "catch_up": DURATIONS,
            "spread": DURATIONS,
            "notify": notify,
        },
    ),
    section(
        name=st.text(max_size=12),
        tests=st.lists(IDS, max_size=4) | anything,
        schedule=schedule,
        aid=IDS,
        enabled=anything,
    ),
)
jobs = mostly(
    st.lists(
        job,
        min_size=1,
        max_size=4,
        unique_by=lambda item: repr(item.get("name") if isinstance(item, dict) else item),
    ),
    anything,
)
api = section(
    base_url=mostly(HTTPS, URLS),
    token_env=mostly(st.just("TE"), st.sampled_from(["a-b", None])),
    timeout=DURATIONS,
    concurrency=mostly(st.integers(1, 256), anything),
    rate_limit=mostly(st.sampled_from(["24/min", "5/4s"]), st.sampled_from(["0/min", "1/0s", "x"])),
    verify_tls=mostly(st.booleans(), anything),
    proxy=mostly(st.none(), URLS),
)
document = mostly(
    st.fixed_dictionaries(
        {"jobs": jobs},
        optional={
            "version": mostly(st.just(1), st.sampled_from([2, "1", True])),
            "api": mostly(api, section(token_file=URLS, token=st.text())),
            "history": section(url=mostly(DB_URLS, URLS), retention=DURATIONS | st.none()),
            "metrics": section(
                listen=mostly(
                    st.sampled_from(["127.0.0.1:9464", "[::1]:9464"]),
                    st.sampled_from([":0", "x"]) | st.integers(0, 70000),
                )
            ),
            "defaults": section(
                aid=IDS,
                timezone=ZONES,
                retry=retry,
                catch_up=DURATIONS,
                spread=DURATIONS,
                notify=notify,
            ),
        },
    ),
    section(version=st.just(1), jobs=jobs, api=api),
)


def check(path: Path, content: str | bytes) -> Config | None:
    """Load ``content``: a valid Config or a ConfigError, anything else fails the test."""
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8", errors="surrogatepass")
    try:
        cfg = load(path)
    except ConfigError as exc:
        assert exc.problems
        for problem in exc.problems:
            assert problem.line >= 1 and problem.col >= 1
            assert str(problem).startswith(f"{path}:{problem.line}:{problem.col}: ")
            assert len(str(problem)) < 1000
        return None
    assert_valid(cfg)
    return cfg


def assert_valid(cfg: Config) -> None:
    """What every loaded Config promises its readers."""
    assert cfg.jobs
    assert len({job.name for job in cfg.jobs}) == len(cfg.jobs)
    for loaded in cfg.jobs:
        assert loaded.tests and all(test.isdigit() and test.isascii() for test in loaded.tests)
        assert len(set(loaded.tests)) == len(loaded.tests)
        assert loaded.aid is None or (loaded.aid.isdigit() and loaded.aid.isascii())
        kinds = [loaded.schedule.cron, loaded.schedule.every, loaded.schedule.at]
        assert sum(kind is not None for kind in kinds) == 1
        assert loaded.schedule.every is None or loaded.schedule.every >= timedelta(seconds=1)
        for moment in (loaded.schedule.at, loaded.schedule.start):
            assert moment is None or moment.utcoffset() is not None
        assert 1 <= loaded.retry.attempts <= 20
        assert 0 <= loaded.retry.backoff <= loaded.retry.max_backoff
        assert loaded.spread >= timedelta(0) and loaded.catch_up >= timedelta(0)
        if loaded.schedule.every is not None and len(loaded.tests) > 1:
            assert loaded.spread <= loaded.schedule.every  # else a firing runs into the next
        assert loaded.notify.problems() == [] and loaded.notify.timeout > 0
        for url in (loaded.notify.webhook, loaded.notify.ping_url):
            parts = urlsplit(url) if url is not None else None
            assert parts is None or parts.scheme == "https" or is_loopback(parts.hostname or "")
        assert len(loaded.name) <= 100 and all(len(test) <= 32 for test in loaded.tests)
        assert loaded.aid is None or len(loaded.aid) <= 32
    assert cfg.api.timeout > 0 and 1 <= cfg.api.concurrency <= 256
    assert (cfg.api.token_env is None) != (cfg.api.token_file is None)


@FUZZ
@given(text=yaml_like_text)
@example(text=SEED)
@example(text="a: &a [*a]\n")
@example(text="? [1]\n: x\njobs: []\n")
def test_yaml_like_text(tmp_path: Path, text: str) -> None:
    check(tmp_path / "jobs.yaml", text)


@FUZZ
@given(data=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_arbitrary_bytes(tmp_path: Path, data: bytes) -> None:
    check(tmp_path / "jobs.yaml", data)


@FUZZ
@given(doc=document, flow=st.sampled_from([None, True, False]))
def test_structured_documents(tmp_path: Path, doc: Any, flow: bool | None) -> None:
    text = yaml.safe_dump(doc, default_flow_style=flow, sort_keys=False, allow_unicode=True)
    check(tmp_path / "jobs.yaml", text)


@FUZZ
@given(
    edits=st.lists(
        st.tuples(
            st.integers(0, len(SEED)),
            st.integers(0, 3),
            st.sampled_from(TOKENS) | st.text(max_size=2),
        ),
        max_size=6,
    )
)
def test_mutated_example(tmp_path: Path, edits: list[tuple[int, int, str]]) -> None:
    text = SEED
    for position, cut, insert in edits:
        text = text[:position] + insert + text[position + cut :]
    check(tmp_path / "jobs.yaml", text)


def test_seed_is_valid(tmp_path: Path) -> None:
    cfg = check(tmp_path / "jobs.yaml", SEED)
    assert cfg is not None and [job.name for job in cfg.jobs] == ["dns", "web", "window"]


NOW = datetime(2026, 1, 31, 12, tzinfo=timezone.utc)


@settings(max_examples=300, deadline=1000)
@given(text=st.text(max_size=30) | st.sampled_from(["15m", "1/min", "2026-01-01", "1.5h"]))
def test_parsers_raise_only_value_error(text: str) -> None:
    for parse in (parse_duration, parse_rate, lambda value: parse_when(value, NOW)):
        try:
            parse(text)
        except ValueError as exc:
            assert str(exc) and len(str(exc)) < 300


@settings(max_examples=200, deadline=1000)
@given(number=st.integers(0, 10**4), unit=st.sampled_from(["ms", "s", "m", "h", "d", "w"]))
def test_duration_round_trip(number: int, unit: str) -> None:
    seconds = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[unit]
    assert parse_duration(f"{number}{unit}") == timedelta(seconds=number * seconds)
    assert parse_when(f"{number}{unit}", NOW) == NOW - timedelta(seconds=number * seconds)


@pytest.mark.parametrize("count", [1, 24, 10**6])
def test_rate_round_trip(count: int) -> None:
    assert parse_rate(f"{count}/min").count == count
