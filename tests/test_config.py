"""config.load(): every rule of SPEC section 3 and the hard inputs, each located at LINE:COL."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import yaml

from scheduler import config
from scheduler.config import (
    ApiConfig,
    RetryPolicy,
    load,
    load_token,
    parse_duration,
    parse_rate,
    parse_when,
    yamlsource,
)
from scheduler.config import wording as messages
from scheduler.config.model import NotifyConfig, Rate
from scheduler.errors import ConfigError, TokenError

REPO_EXAMPLE = Path(__file__).resolve().parent.parent / "jobs.yaml"
TOKEN = "5d5e2a1c-1234-4bcd-9f00-abcdef012345"
JOB = "jobs:\n  - name: a\n    tests: [1]\n    schedule: {every: 1h}\n"
SPEC_EXAMPLE = """\
version: 1
api:
  base_url: https://api.thousandeyes.com/v7
  token_env: THOUSANDEYES_TOKEN     # or token_file: /run/secrets/te_token
  timeout: 30s                      # per request (connect + read)
  concurrency: 8                    # requests in flight at once
  rate_limit: 24/min                # client-side budget per token
  verify_tls: true
  proxy: null                       # e.g. http://proxy:3128
history:
  url: sqlite:///history.db         # relative paths are relative to this file
  retention: 90d
metrics:
  listen: null                      # e.g. 127.0.0.1:9464 for /metrics and /healthz
defaults:                           # every key here may be overridden per job
  aid: null
  timezone: UTC
  retry: {attempts: 4, backoff: 2s, max_backoff: 5m}
  catch_up: 1h
  spread: 0s
jobs:
  - name: dns-business-hours        # unique; letters, digits, '.', '_', '-'
    tests: [105, 106]               # instant test ids (digits)
    aid: "1234"
    schedule: {cron: "*/15 8-18 * * mon-fri", timezone: Europe/Berlin}
  - name: web-every-6h
    tests: [281]
    schedule: {every: 6h}           # optional start: ISO time to anchor the interval
  - name: change-window
    tests: [300]
    schedule: {at: "2026-12-01T09:00:00+01:00"}
    enabled: false
"""


def write(tmp_path: Path, text: str | bytes, name: str = "jobs.yaml") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def problems(tmp_path: Path, text: str | bytes) -> list[str]:
    """``LINE:COL: path: message`` for each problem (the file name checked and cut off)."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(path)
    lines = [str(p) for p in info.value.problems]
    assert lines and all(line.startswith(f"{path}:") for line in lines), lines
    assert str(info.value) == "\n".join(lines)
    return [line.removeprefix(f"{path}:") for line in lines]


def job(extra: str = "", *, tests: str = "[1]", schedule: str = "{every: 1h}") -> str:
    """One job named ``a`` (lines 1-4), with ``extra`` lines appended from line 5."""
    return f"jobs:\n  - name: a\n    tests: {tests}\n    schedule: {schedule}\n{extra}"


def alias_bomb(levels: int = 9) -> str:
    text = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    for i in range(1, levels):
        prev, name = chr(ord("a") + i - 1), chr(ord("a") + i)
        text += f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]\n"
    return text + JOB


# Each case: the YAML text and every expected problem as "LINE:COL: path: message".
EXACT = [
    # -- hard inputs
    ("empty", "", ["1:1: the file is empty; it needs at least a jobs: list"]),
    (
        "only-comments",
        "# nothing\n   # here\n",
        ["1:1: the file is empty; it needs at least a jobs: list"],
    ),
    (
        "top-list",
        "- a\n- b\n",
        [
            "1:1: the top level must be a mapping with keys version, api, "
            "history, metrics, defaults, jobs, got a list"
        ],
    ),
    (
        "top-scalar",
        "just text\n",
        [
            "1:1: the top level must be a mapping with keys version, "
            "api, history, metrics, defaults, jobs, got 'just text'"
        ],
    ),
    ("duplicate-key", job("    name: b\n"), ["5:5: jobs[0].name: duplicate key (first at line 2)"]),
    ("duplicate-top-key", JOB + "jobs: []\n", ["5:1: jobs: duplicate key (first at line 1)"]),
    ("int-key", "1: a\n" + JOB, ["1:1: keys must be text, got 1"]),
    ("bool-key", job("    true: x\n"), ["5:5: jobs[0]: keys must be text, got true"]),
    ("null-key", job("    null: x\n"), ["5:5: jobs[0]: keys must be text, got null"]),
    ("list-key", job("    ? [1, 2]\n    : x\n"), ["5:7: jobs[0]: keys must be text, got a list"]),
    (
        "deep-nesting",
        "jobs: " + "{a: " * 150 + "1" + "}" * 150 + "\n",
        ["1:83: nesting is deeper than 20 levels"],
    ),
    (
        "two-documents",
        JOB + "---\n" + JOB,
        ["5:1: only one YAML document is allowed; remove the second '---'"],
    ),
    ("undefined-alias", "jobs: *nope\n", ["1:7: jobs: alias *nope is not defined above"]),
    (
        "recursive-alias",
        "jobs: &a [*a]\n",
        ["1:11: jobs[0]: alias *a refers to a collection that contains it"],
    ),
    (
        "control-char",
        "jobs:\n  - name: a\x07\n",
        ["2:12: control character U+0007 is not allowed; is this a text file?"],
    ),
    (
        "python-tag",
        "jobs: !!python/object/apply:os.system [echo hi]\n",
        ["1:7: jobs: tag '!!python/object/apply:os.system' is not supported here"],
    ),
    (
        "custom-scalar-tag",
        job(schedule="{every: !env X}"),
        ["4:23: jobs[0].schedule.every: tag '!env' is not supported here"],
    ),
    (
        "impossible-date",
        job(schedule="{at: 2026-02-30T09:00:00}"),
        ["4:20: jobs[0].schedule.at: '2026-02-30T09:00:00' is not a valid timestamp"],
    ),
    (
        "bad-merge",
        job("    <<: 5\n"),
        ["5:9: jobs[0]: a merge (<<) takes a mapping or a list of mappings"],
    ),
    # -- top level
    (
        "version",
        "version: 2\n" + JOB,
        ["1:10: version: must be 1 (the only config version so far), got 2"],
    ),
    (
        "version-bool",
        "version: true\n" + JOB,
        ["1:10: version: must be 1 (the only config version so far), got true"],
    ),
    ("top-typo", "jbos: []\n" + JOB, ["1:1: jbos: unknown key; did you mean 'jobs'?"]),
    (
        "top-unknown",
        "colour: red\n" + JOB,
        [
            "1:1: colour: unknown key; allowed keys are "
            "version, api, history, metrics, defaults, jobs"
        ],
    ),
    ("top-token", f"token: {TOKEN}\n" + JOB, [f"1:1: token: {messages.NO_TOKEN}"]),
    (
        "jobs-missing",
        "version: 1\n",
        ["1:1: jobs: at least one job is required (each with name, tests, schedule)"],
    ),
    (
        "jobs-empty",
        "jobs: []\n",
        ["1:7: jobs: at least one job is required (each with name, tests, schedule)"],
    ),
    (
        "jobs-null",
        "jobs:\n",
        ["1:6: jobs: at least one job is required (each with name, tests, schedule)"],
    ),
    (
        "jobs-scalar",
        "jobs: x\n",
        ["1:7: jobs: at least one job is required (each with name, tests, schedule), got 'x'"],
    ),
    (
        "job-scalar",
        "jobs:\n  - x\n",
        [
            "2:5: jobs[0]: must be a mapping with keys name, tests, "
            "schedule, enabled, aid, timezone, retry, catch_up, "
            "spread, notify, results, got 'x'"
        ],
    ),
    # -- api
    (
        "api-list",
        "api: [1]\n" + JOB,
        [
            "1:6: api: must be a mapping with keys base_url, "
            "token_env, token_file, timeout, concurrency, rate_limit, "
            "verify_tls, proxy, got a list"
        ],
    ),
    (
        "http-remote",
        "api:\n  base_url: http://example.com/v7\n" + JOB,
        [
            "2:13: api.base_url: must use https (plain http is only allowed for a loopback host "
            "such as 127.0.0.1 or localhost)"
        ],
    ),
    (
        "ftp-url",
        "api:\n  base_url: ftp://example.com\n" + JOB,
        ["2:13: api.base_url: must be an https:// URL like https://api.thousandeyes.com/v7"],
    ),
    (
        "url-credentials",
        "api:\n  base_url: https://u:p@example.com\n" + JOB,
        ["2:13: api.base_url: must be a plain https:// URL without credentials, query or fragment"],
    ),
    ("inline-token", f"api:\n  token: {TOKEN}\n" + JOB, [f"2:3: api.token: {messages.NO_TOKEN}"]),
    (
        "token-in-token-env",
        f"api:\n  token_env: {TOKEN}\n" + JOB,
        [
            "2:14: api.token_env: must be the name of an environment variable (letters, digits, _), "
            "not the token itself"
        ],
    ),
    (
        "token-env-and-file",
        "api:\n  token_env: TE\n  token_file: te.txt\n" + JOB,
        ["3:3: api.token_file: set token_env or token_file, not both"],
    ),
    (
        "api-typo",
        "api:\n  tokn_env: TE\n" + JOB,
        ["2:3: api.tokn_env: unknown key; did you mean 'token_env'?"],
    ),
    ("timeout-zero", "api:\n  timeout: 0s\n" + JOB, ["2:12: api.timeout: must be longer than 0s"]),
    (
        "timeout-bare",
        "api:\n  timeout: 30\n" + JOB,
        [
            "2:12: api.timeout: must be a duration like 30s, 5m, 2h (units ms s m h d w); "
            "a bare number has no unit"
        ],
    ),
    (
        "concurrency-zero",
        "api:\n  concurrency: 0\n" + JOB,
        ["2:16: api.concurrency: must be a whole number from 1 to 256"],
    ),
    (
        "concurrency-big",
        "api:\n  concurrency: 257\n" + JOB,
        ["2:16: api.concurrency: must be a whole number from 1 to 256"],
    ),
    (
        "concurrency-bool",
        "api:\n  concurrency: true\n" + JOB,
        ["2:16: api.concurrency: must be a whole number from 1 to 256"],
    ),
    (
        "concurrency-text",
        "api:\n  concurrency: '8'\n" + JOB,
        ["2:16: api.concurrency: must be a whole number from 1 to 256"],
    ),
    (
        "rate-period",
        "api:\n  rate_limit: 24/fortnight\n" + JOB,
        [
            "2:15: api.rate_limit: must be a rate <count>/<period> like 24/min or 5/4s "
            "(the period a duration or sec, min, hour)"
        ],
    ),
    (
        "rate-zero",
        "api:\n  rate_limit: 0/min\n" + JOB,
        ["2:15: api.rate_limit: needs a count of at least 1, like 24/min"],
    ),
    (
        "verify-text",
        "api:\n  verify_tls: 'yes'\n" + JOB,
        ["2:15: api.verify_tls: must be true or false"],
    ),
    (
        "proxy-scheme",
        "api:\n  proxy: ftp://proxy:21\n" + JOB,
        [
            "2:10: api.proxy: must be null or a proxy URL like http://proxy:3128 "
            "(schemes http, https, socks4, socks4a, socks5, socks5h)"
        ],
    ),
    # -- history
    (
        "db-backend",
        "history:\n  url: mysql://h/db\n" + JOB,
        [
            "2:8: history.url: must be a database URL like sqlite:///history.db or "
            "postgresql+psycopg://host/db (sqlite or postgresql)"
        ],
    ),
    (
        "db-postgres-alias",
        "history:\n  url: postgres://u:pw@h/db\n" + JOB,
        ["2:8: history.url: must start with postgresql:// (SQLAlchemy does not know postgres://)"],
    ),
    (
        "db-garbage",
        "history:\n  url: not a url\n" + JOB,
        [
            "2:8: history.url: must be a database URL like sqlite:///history.db or "
            "postgresql+psycopg://host/db"
        ],
    ),
    (
        "retention-negative",
        "history:\n  retention: -1d\n" + JOB,
        [
            "2:14: history.retention: must not be negative (a duration like 30s, 5m, 2h; "
            "units ms s m h d w), got '-1d'"
        ],
    ),
    (
        "retention-word",
        "history:\n  retention: forever\n" + JOB,
        [
            "2:14: history.retention: must be a duration like 30s, 5m, 2h (units ms s m h d w), "
            "got 'forever'"
        ],
    ),
    # -- metrics
    (
        "listen-no-port",
        "metrics:\n  listen: localhost\n" + JOB,
        [
            "2:11: metrics.listen: must be null or host:port like 127.0.0.1:9464, [::1]:9464 or "
            ":9464, got 'localhost'"
        ],
    ),
    (
        "listen-port-zero",
        "metrics:\n  listen: ':0'\n" + JOB,
        ["2:11: metrics.listen: port must be from 1 to 65535, got ':0'"],
    ),
    (
        "listen-port-big",
        "metrics:\n  listen: '[::1]:70000'\n" + JOB,
        ["2:11: metrics.listen: port must be from 1 to 65535, got '[::1]:70000'"],
    ),
    (
        "listen-bad-v6",
        "metrics:\n  listen: '[zz]:9464'\n" + JOB,
        [
            "2:11: metrics.listen: must be null or host:port like 127.0.0.1:9464, [::1]:9464 or "
            ":9464, got '[zz]:9464'"
        ],
    ),
    # -- defaults
    (
        "attempts-zero",
        "defaults:\n  retry: {attempts: 0}\n" + JOB,
        ["2:21: defaults.retry.attempts: must be a whole number from 1 to 20, got 0"],
    ),
    (
        "attempts-big",
        "defaults:\n  retry: {attempts: 21}\n" + JOB,
        ["2:21: defaults.retry.attempts: must be a whole number from 1 to 20, got 21"],
    ),
    (
        "attempts-bool",
        "defaults:\n  retry: {attempts: true}\n" + JOB,
        ["2:21: defaults.retry.attempts: must be a whole number from 1 to 20, got true"],
    ),
    (
        "backoff-order",
        "defaults:\n  retry: {backoff: 10m, max_backoff: 5m}\n" + JOB,
        ["2:38: defaults.retry.max_backoff: max_backoff (300s) must be at least backoff (600s)"],
    ),
    (
        "backoff-over-default-max",
        "defaults:\n  retry: {backoff: 10m}\n" + JOB,
        ["2:20: defaults.retry.backoff: max_backoff (300s) must be at least backoff (600s)"],
    ),
    (
        "retry-unknown",
        "defaults:\n  retry: {retries: 3}\n" + JOB,
        [
            "2:11: defaults.retry.retries: unknown key; allowed keys are attempts, backoff, "
            "max_backoff"
        ],
    ),
    (
        "retry-scalar",
        "defaults:\n  retry: 3\n" + JOB,
        ["2:10: defaults.retry: must be a mapping with keys attempts, backoff, max_backoff, got 3"],
    ),
    (
        "timezone-case",
        "defaults:\n  timezone: europe/berlin\n" + JOB,
        [
            "2:13: defaults.timezone: unknown timezone 'europe/berlin'; did you mean "
            "'Europe/Berlin'?"
        ],
    ),
    (
        "timezone-typo",
        "defaults:\n  timezone: Europe/Berln\n" + JOB,
        ["2:13: defaults.timezone: unknown timezone 'Europe/Berln'; did you mean 'Europe/Berlin'?"],
    ),
    (
        "timezone-int",
        "defaults:\n  timezone: 5\n" + JOB,
        ["2:13: defaults.timezone: must be an IANA timezone name like UTC or Europe/Berlin, got 5"],
    ),
    (
        "catch-up-negative",
        "defaults:\n  catch_up: -1h\n" + JOB,
        [
            "2:13: defaults.catch_up: must not be negative (a duration like 30s, 5m, 2h; "
            "units ms s m h d w), got '-1h'"
        ],
    ),
    (
        "spread-bare",
        "defaults:\n  spread: 5\n" + JOB,
        [
            "2:11: defaults.spread: must be a duration like 30s, 5m, 2h (units ms s m h d w); "
            "a bare number has no unit, got 5"
        ],
    ),
    (
        "aid-text",
        "defaults:\n  aid: abc\n" + JOB,
        ["2:8: defaults.aid: must be digits only (an id like 105), got 'abc'"],
    ),
    (
        "defaults-notify-after",
        "defaults:\n  notify: {after: 0}\n" + JOB,
        ["2:19: defaults.notify.after: must be a whole number of failed firings, 1 or more"],
    ),
    (
        "defaults-notify-null",
        "defaults:\n  notify:\n" + JOB,
        [
            "2:10: defaults.notify: must be a mapping with keys webhook, after, ping_url, timeout, results, "
            "got null"
        ],
    ),
    (
        "defaults-unknown",
        "defaults:\n  enabled: false\n" + JOB,
        [
            "2:3: defaults.enabled: unknown key; allowed keys are aid, timezone, retry, catch_up, "
            "spread, notify, results"
        ],
    ),
    # -- jobs
    (
        "name-missing",
        "jobs:\n  - tests: [1]\n    schedule: {every: 1h}\n",
        ["2:5: jobs[0].name: is required (letters, digits, '.', '_', '-')"],
    ),
    (
        "name-space",
        job().replace("name: a", "name: a b"),
        ["2:11: jobs[0].name: must be 1 to 100 letters, digits, '.', '_' or '-', got 'a b'"],
    ),
    (
        "name-int",
        job().replace("name: a", "name: 123"),
        ["2:11: jobs[0].name: must be 1 to 100 letters, digits, '.', '_' or '-', got 123"],
    ),
    (
        "name-long",
        job().replace("name: a", "name: " + "x" * 101),
        [
            "2:11: jobs[0].name: must be 1 to 100 letters, digits, '.', '_' or '-', got '"
            + "x" * 57
            + "...'"
        ],
    ),
    (
        "name-duplicate",
        job() + "  - name: a\n    tests: [2]\n    schedule: {every: 1h}\n",
        ["5:11: jobs[1].name: duplicate job name 'a'; the first is at line 2"],
    ),
    (
        "tests-missing",
        "jobs:\n  - name: a\n    schedule: {every: 1h}\n",
        ["2:5: jobs[0].tests: is required: a non-empty list of instant test ids like [105, 106]"],
    ),
    (
        "tests-empty",
        job(tests="[]"),
        [
            "3:12: jobs[0].tests: must be a non-empty list of instant "
            "test ids like [105, 106], got an empty list"
        ],
    ),
    (
        "tests-scalar",
        job(tests="105"),
        [
            "3:12: jobs[0].tests: must be a non-empty list of "
            "instant test ids like [105, 106], got 105"
        ],
    ),
    (
        "test-bool",
        job(tests="[true]"),
        ["3:13: jobs[0].tests[0]: must be digits only (an id like 105), got true"],
    ),
    (
        "test-path",
        job(tests="['../../x']"),
        ["3:13: jobs[0].tests[0]: must be digits only (an id like 105), got '../../x'"],
    ),
    (
        "test-shell",
        job(tests="['1; rm']"),
        ["3:13: jobs[0].tests[0]: must be digits only (an id like 105), got '1; rm'"],
    ),
    (
        "test-negative",
        job(tests="[-1]"),
        ["3:13: jobs[0].tests[0]: must be digits only (an id like 105), got -1"],
    ),
    (
        "test-underscore",
        job(tests="[1_000]"),
        ["3:13: jobs[0].tests[0]: must be digits only (an id like 105), got '1_000'"],
    ),
    (
        "test-duplicate",
        job(tests="[1, '1']"),
        ["3:16: jobs[0].tests[1]: duplicate test id 1 in this job"],
    ),
    (
        "test-id-long",
        job(tests="[123456789012345678901]"),
        ["3:13: jobs[0].tests[0]: must be an id of at most 20 digits, got a very large number"],
    ),
    (
        "test-id-long-text",
        job(tests="['000000000000000000105']"),
        ["3:13: jobs[0].tests[0]: must be an id of at most 20 digits, got '000000000000000000105'"],
    ),
    (
        "aid-long",
        job("    aid: '123456789012345678901'\n"),
        ["5:10: jobs[0].aid: must be an id of at most 20 digits, got '123456789012345678901'"],
    ),
    (
        "aid-bool",
        job("    aid: true\n"),
        ["5:10: jobs[0].aid: must be digits only (an id like 105), got true"],
    ),
    (
        "schedule-missing",
        "jobs:\n  - name: a\n    tests: [1]\n",
        ["2:5: jobs[0].schedule: is required: a mapping with one of cron, every or at"],
    ),
    (
        "schedule-empty",
        job(schedule="{}"),
        ["4:15: jobs[0].schedule: needs exactly one of cron, every or at"],
    ),
    (
        "schedule-text",
        job(schedule="every 5m"),
        [
            "4:15: jobs[0].schedule: must be a mapping "
            "with keys cron, every, at, timezone, start, "
            "got 'every 5m'"
        ],
    ),
    (
        "schedule-two-kinds",
        job(schedule="{cron: '@daily', every: 1h}"),
        [
            "4:32: jobs[0].schedule.every: has both cron and every; it needs exactly one of cron, "
            "every or at"
        ],
    ),
    (
        "start-with-cron",
        job(schedule="{cron: '@daily', start: '2026-01-01T00:00:00'}"),
        ["4:32: jobs[0].schedule.start: only goes with every (it anchors the interval)"],
    ),
    (
        "every-short",
        job(schedule="{every: 500ms}"),
        ["4:23: jobs[0].schedule.every: must be at least 1s, got '500ms'"],
    ),
    (
        "every-bare",
        job(schedule="{every: 15}"),
        [
            "4:23: jobs[0].schedule.every: must be a duration like 30s, 5m, 2h (units ms s m h d w); "
            "a bare number has no unit, got 15"
        ],
    ),
    (
        "every-sexagesimal",
        job(schedule="{every: 1:30}"),
        [
            "4:23: jobs[0].schedule.every: must be a duration like 30s, 5m, 2h (units ms s m h d w), "
            "got '1:30'"
        ],
    ),
    (
        "at-word",
        job(schedule="{at: tomorrow}"),
        [
            "4:20: jobs[0].schedule.at: must be an ISO-8601 time like 2026-12-01T09:00:00+01:00, "
            "got 'tomorrow'"
        ],
    ),
    (
        "at-1900",
        job(schedule="{at: '1900-01-01T00:00:00'}"),
        [
            "4:20: jobs[0].schedule.at: must be a time between the years 1970 and 9999, "
            "got '1900-01-01T00:00:00'"
        ],
    ),
    (
        "cron-fields",
        job(schedule="{cron: '* * *'}"),
        [
            "4:22: jobs[0].schedule.cron: cron needs 5 fields (minute hour day-of-month month "
            "day-of-week), got 3"
        ],
    ),
    (
        "cron-alias",
        job(schedule="{cron: '@often'}"),
        [
            "4:22: jobs[0].schedule.cron: unknown alias '@often'; use one of @yearly, @annually, "
            "@monthly, @weekly, @daily, @midnight, @hourly"
        ],
    ),
    (
        "cron-int",
        job(schedule="{cron: 5}"),
        [
            "4:22: jobs[0].schedule.cron: must be a cron expression like '*/15 8-18 * * mon-fri' "
            "or @daily, got 5"
        ],
    ),
    (
        "schedule-timezone",
        job(schedule="{every: 1h, timezone: Mars/Olympus}"),
        [
            "4:37: jobs[0].schedule.timezone: unknown timezone 'Mars/Olympus'; use an IANA name "
            "like Europe/Berlin"
        ],
    ),
    (
        "enabled-text",
        job("    enabled: 'yes'\n"),
        ["5:14: jobs[0].enabled: must be true or false, got 'yes'"],
    ),
    (
        "enabled-int",
        job("    enabled: 1\n"),
        ["5:14: jobs[0].enabled: must be true or false, got 1"],
    ),
    (
        "job-typo",
        job("    shedule: x\n"),
        ["5:5: jobs[0].shedule: unknown key; did you mean 'schedule'?"],
    ),
    ("job-token", job(f"    token: {TOKEN}\n"), [f"5:5: jobs[0].token: {messages.NO_TOKEN}"]),
    (
        "job-retry",
        job("    retry: {attempts: 99}\n"),
        ["5:23: jobs[0].retry.attempts: must be a whole number from 1 to 20, got 99"],
    ),
    (
        "notify-http-remote",
        job("    notify: {webhook: 'http://hooks.example.com/T0/B0/x'}\n"),
        [
            "5:23: jobs[0].notify.webhook: must use https (plain http is only allowed for a loopback "
            "host such as 127.0.0.1 or localhost)"
        ],
    ),
    (
        "notify-ftp",
        job("    notify: {ping_url: 'ftp://hc.example.com/x'}\n"),
        [
            "5:24: jobs[0].notify.ping_url: must be null or an https:// URL like "
            "https://hooks.example.com/..."
        ],
    ),
    (
        "notify-bad-port",
        job("    notify: {webhook: 'https://hooks.example.com:99999/x'}\n"),
        [
            "5:23: jobs[0].notify.webhook: must be null or an https:// URL like "
            "https://hooks.example.com/..."
        ],
    ),
    (
        "notify-after-text",
        job("    notify: {after: '3'}\n"),
        ["5:21: jobs[0].notify.after: must be a whole number of failed firings, 1 or more"],
    ),
    (
        "notify-after-bool",
        job("    notify: {after: true}\n"),
        ["5:21: jobs[0].notify.after: must be a whole number of failed firings, 1 or more"],
    ),
    (
        "notify-timeout-zero",
        job("    notify: {timeout: 0s}\n"),
        ["5:23: jobs[0].notify.timeout: must be a duration above 0 like 10s"],
    ),
    (
        "notify-timeout-bare",
        job("    notify: {timeout: 10}\n"),
        [
            "5:23: jobs[0].notify.timeout: must be a duration like 30s, 5m, 2h (units ms s m h d w); "
            "a bare number has no unit"
        ],
    ),
    (
        "notify-typo",
        job("    notify: {webhok: null}\n"),
        ["5:14: jobs[0].notify.webhok: unknown key; did you mean 'webhook'?"],
    ),
    (
        "notify-unknown",
        job("    notify: {email: ops@example.com}\n"),
        [
            "5:14: jobs[0].notify.email: unknown key; allowed keys are webhook, after, ping_url, "
            "timeout, results"
        ],
    ),
    (
        "notify-url-not-mapping",
        job("    notify: https://hooks.example.com/x\n"),
        [
            "5:13: jobs[0].notify: must be a mapping with keys webhook, after, ping_url, timeout, results, "
            "got text"
        ],
    ),
    (
        "notify-list",
        job("    notify: [x]\n"),
        [
            "5:13: jobs[0].notify: must be a mapping with keys webhook, after, ping_url, timeout, results, "
            "got a list"
        ],
    ),
    (
        "job-spread",
        job("    spread: -5s\n"),
        [
            "5:13: jobs[0].spread: must not be negative (a duration like 30s, 5m, 2h; units ms s m h "
            "d w), got '-5s'"
        ],
    ),
    (
        "spread-over-every",
        job("    spread: 61m\n", tests="[1, 2]"),
        [
            "5:13: jobs[0].spread: 61m is longer than the interval (every 1h): a firing's last tests "
            "would start after the next firing; make it at most 1h"
        ],
    ),
    (
        "spread-over-cron",
        job("    spread: 20m\n", tests="[1, 2]", schedule="{cron: '*/15 8-18 * * mon-fri'}"),
        [
            "5:13: jobs[0].spread: 20m is longer than the shortest gap between the cron's firings "
            "(15m): a firing's last tests would start after the next firing; make it at most 15m"
        ],
    ),
    (
        "spread-over-rare-cron-gap",
        job(
            "    spread: 2d\n", tests="[1, 2]", schedule="{cron: '0 0 1,28 * *'}"
        ),  # Feb 28 -> Mar 1
        [
            "5:13: jobs[0].spread: 2d is longer than the shortest gap between the cron's firings "
            "(1d): a firing's last tests would start after the next firing; make it at most 1d"
        ],
    ),
    (
        "defaults-spread-over-every",
        "defaults: {spread: 2h}\n" + job(tests="[1, 2]"),
        [
            "5:23: jobs[0].schedule.every: the interval (every 1h) is shorter than defaults.spread "
            "(2h): a firing's last tests would start after the next firing; set spread on this job, "
            "at most 1h"
        ],
    ),
]


@pytest.fixture(params=["libyaml", "pure-python"])
def parser(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both PyYAML parsers: libyaml when installed, the pure-Python one as the fallback."""
    if request.param == "pure-python":
        monkeypatch.setattr(yamlsource, "_Loader", yaml.SafeLoader)
    elif not yaml.__with_libyaml__:
        pytest.skip("PyYAML without libyaml")
    return str(request.param)


@pytest.mark.parametrize(("text", "expected"), [pytest.param(t, e, id=i) for i, t, e in EXACT])
def test_each_problem_is_located_and_explained(
    tmp_path: Path, parser: str, text: str, expected: list[str]
) -> None:
    assert problems(tmp_path, text) == expected


# Syntax errors: the parser's wording may vary between libyaml and pure PyYAML, the place not.
SYNTAX = [
    ("tab-indent", "jobs:\n\t- name: a\n", "2:1: ", "tabs"),
    (
        "unclosed-bracket",
        "jobs: [1, 2\n",
        "2:1: ",
        "while parsing a flow sequence that starts at line 1, column 7",
    ),
    (
        "unclosed-quote",
        'jobs:\n  - name: "abc\n',
        "3:1: ",
        "while scanning a quoted scalar that starts at line 2, column 11",
    ),
    ("bad-escape", 'jobs:\n  - name: "\\q"\n', "2:", "escape"),
    ("very-deep", "jobs: " + "[" * 5000 + "]" * 5000 + "\n", "1:", "nesting"),
    ("stray-colon", "jobs: a: b\n", "1:", "YAML syntax error"),
]


@pytest.mark.parametrize(
    ("text", "where", "phrase"), [pytest.param(t, w, p, id=i) for i, t, w, p in SYNTAX]
)
def test_syntax_errors_point_at_the_problem(
    tmp_path: Path, parser: str, text: str, where: str, phrase: str
) -> None:
    (line,) = problems(tmp_path, text)
    assert line.startswith(where) and phrase in line, line


def test_every_problem_is_reported_not_just_the_first(tmp_path: Path) -> None:
    text = (
        "version: 2\napi:\n  timeout: 0s\njobs:\n  - name: a b\n    tests: []\n"
        "    schedule: {every: 1h}\n  - tests: [x]\n    schedule: {at: never}\n"
    )
    assert problems(tmp_path, text) == [
        "1:10: version: must be 1 (the only config version so far), got 2",
        "3:12: api.timeout: must be longer than 0s",
        "5:11: jobs[0].name: must be 1 to 100 letters, digits, '.', '_' or '-', got 'a b'",
        "6:12: jobs[0].tests: must be a non-empty list of instant test ids like [105, 106], "
        "got an empty list",
        "8:5: jobs[1].name: is required (letters, digits, '.', '_', '-')",
        "8:13: jobs[1].tests[0]: must be digits only (an id like 105), got 'x'",
        "9:20: jobs[1].schedule.at: must be an ISO-8601 time like 2026-12-01T09:00:00+01:00, "
        "got 'never'",
    ]


def test_problem_names_the_file_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, "version: 3\n" + JOB)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        load("jobs.yaml")
    assert (
        str(info.value) == "jobs.yaml:1:10: version: must be 1 (the only config version so "
        "far), got 3"
    )
    assert info.value.exit_code == 2


# -- files that are not YAML at all ------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path / "nope.yaml")
    (problem,) = info.value.problems
    assert (problem.line, problem.col) == (1, 1)
    assert "cannot read the config file: No such file or directory" in str(problem)


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load(tmp_path)


def test_invalid_utf8_reports_the_byte_position(tmp_path: Path) -> None:
    assert problems(tmp_path, b"jobs:\n  - name: \xff\xfe\n") == [
        "2:11: not UTF-8 text (byte 0xFF); save the file as UTF-8"
    ]


def test_binary_junk(tmp_path: Path) -> None:
    (line,) = problems(tmp_path, bytes(range(256)) * 40)
    assert "not UTF-8" in line or "control character" in line


def test_nul_byte_at_start(tmp_path: Path) -> None:
    assert problems(tmp_path, b"\x00\x01jobs: []") == [
        "1:1: control character U+0000 is not allowed; is this a text file?"
    ]


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    assert load(write(tmp_path, b"\xef\xbb\xbf" + JOB.encode())).jobs[0].name == "a"


@pytest.mark.parametrize("size", [8 * 1024 * 1024 + 1, 20 * 1000 * 1000])
def test_oversized_file_is_refused_before_reading(tmp_path: Path, size: int) -> None:
    path = tmp_path / "jobs.yaml"
    with path.open("wb") as handle:  # sparse: nothing worth reading, only the size counts
        handle.truncate(size)
    started = time.monotonic()
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(info.value) == f"{path}:1:1: file is {size} bytes; the limit is 8 MiB"
    assert time.monotonic() - started < 1


def test_file_at_the_size_limit_is_read(tmp_path: Path) -> None:
    text = JOB + "#" * (8 * 1024 * 1024 - len(JOB) - 1) + "\n"
    assert len(text) == 8 * 1024 * 1024
    assert load(write(tmp_path, text)).jobs[0].name == "a"


# -- aliases cannot blow up -----------------------------------------------------------------------


@pytest.mark.timeout(10)
def test_billion_laughs_is_stopped_quickly(tmp_path: Path) -> None:
    started = time.monotonic()
    (line,) = problems(tmp_path, alias_bomb())
    assert line == (
        "7:16: the document expands to more than 2,000,000 values (through "
        "aliases?); that is far more than a config needs"
    )
    assert time.monotonic() - started < 2


def test_alias_bomb_under_a_known_key_is_stopped(tmp_path: Path) -> None:
    text = alias_bomb().replace(JOB, "").replace("i: &i", "jobs: &i")
    (line,) = problems(tmp_path, text)
    assert f"expands to more than {yamlsource.MAX_NODES:,} values" in line


@pytest.mark.timeout(10)
def test_a_small_file_cannot_reach_the_cap_through_aliases(tmp_path: Path) -> None:
    # 1,000 values a thousand times over (1,000,000 from 7 KB), and the first use of that
    # goes over the cap, which also counts b itself.
    text = (
        "a: &a ["
        + ", ".join(["x"] * 1000)
        + "]\nb: &b ["
        + ", ".join(["*a"] * 1000)
        + "]\njobs: [*b]\n"
    )
    (line,) = problems(tmp_path, text)
    assert line.startswith("3:8: the document expands to more than 2,000,000 values")


def test_message_quoting_an_alias_does_not_expand_it(tmp_path: Path) -> None:
    big = "[" + ", ".join(["x"] * 1000) + "]"
    text = (
        f"defaults:\n  aid: &s '{'y' * 5000}'\n  timezone: &l {big}\n"
        "jobs:\n  - name: *s\n    tests: [1]\n    schedule: {every: *l}\n"
    )
    lines = problems(tmp_path, text)
    assert all(len(line) < 200 for line in lines), lines
    assert lines[0] == (
        f"2:8: defaults.aid: must be digits only (an id like 105), got '{'y' * 57}...'"
    )
    assert lines[1].endswith(
        "defaults.timezone: must be an IANA timezone name like UTC or Europe/Berlin, got a list"
    )
    assert "jobs[0].schedule.every: must be a duration" in lines[-1]


def test_node_cap_counts_written_values_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(yamlsource, "MAX_NODES", 1000)
    (line,) = problems(tmp_path, "jobs: [" + "1, " * 1200 + "1]\n")
    assert line.startswith("1:2999: the document expands to more than 1,000 values")


def test_problem_list_is_capped(tmp_path: Path) -> None:
    lines = problems(tmp_path, job(tests="[" + "x, " * 300 + "x]"))
    assert len(lines) == 101
    assert lines[:2] == [
        "3:13: jobs[0].tests[0]: must be digits only (an id like 105), got 'x'",
        "3:16: jobs[0].tests[1]: must be digits only (an id like 105), got 'x'",
    ]
    assert lines[-1] == "3:310: and 201 more problems not shown"


def test_reading_stops_after_1000_problems(tmp_path: Path) -> None:
    # Each unreadable value costs an exception: 8 MiB of them would take many seconds.
    lines = problems(tmp_path, "x: [" + "!x 1, " * 1500 + "1]\n")
    assert len(lines) == 102
    assert lines[0] == "1:5: x[0]: tag '!x' is not supported here"
    assert lines[-2:] == [
        "1:5999: stopped reading after 1,000 problems; fix the first ones and try again",
        "1:5999: and 900 more problems not shown",
    ]


def test_ten_thousand_jobs_fit_under_the_node_cap(tmp_path: Path) -> None:
    text = "jobs:\n" + "".join(
        f"  - {{name: job-{i}, tests: [{i}, {10**6 + i}], schedule: {{every: 1h}}}}\n"
        for i in range(10_000)
    )
    cfg = load(write(tmp_path, text))
    assert len(cfg.jobs) == 10_000 and cfg.jobs[-1].tests == ("9999", "1009999")
    assert 11 * 100_000 < yamlsource.MAX_NODES  # 11 values a job: 100,000 such jobs fit too


@pytest.mark.slow
def test_a_hundred_thousand_one_test_jobs_load(tmp_path: Path) -> None:
    text = "jobs:\n" + "".join(
        f"  - name: job-{i:06d}\n    tests: [{100_000 + i}]\n    schedule: {{every: 1h}}\n"
        for i in range(100_000)
    )
    assert len(text) < yamlsource.MAX_BYTES
    cfg = load(write(tmp_path, text))
    assert len(cfg.jobs) == 100_000 and cfg.jobs[-1].tests == ("199999",)


@pytest.mark.timeout(30)
def test_a_long_test_list_is_checked_in_linear_time(tmp_path: Path) -> None:
    # Duplicate ids were looked up in a list: 100,000 ids took 5 billion comparisons.
    ids = ", ".join(str(i) for i in range(1, 100_001))
    (only,) = load(write(tmp_path, job(tests=f"[{ids}]"))).jobs
    assert len(only.tests) == 100_000
    column = len(f"    tests: [{ids}, ") + 1
    assert problems(tmp_path, job(tests=f"[{ids}, 7]")) == [
        f"3:{column}: jobs[0].tests[100000]: duplicate test id 7 in this job"
    ]


def test_ids_and_names_fit_the_history_columns(tmp_path: Path) -> None:
    from scheduler.config import scalars as values  # sqlalchemy: only this test needs it
    from scheduler.store import tables

    columns = tables.attempts.c
    assert values.MAX_ID_DIGITS <= columns.test_id.type.length
    assert values.MAX_ID_DIGITS <= columns.aid.type.length
    assert columns.job.type.length >= 100
    longest = job(f"    aid: {'9' * 20}\n", tests=f"[{'9' * 20}, '{'0' * 20}']").replace(
        "name: a", "name: " + "n" * 100
    )
    (only,) = load(write(tmp_path, longest)).jobs
    assert (only.name, only.tests, only.aid) == ("n" * 100, ("9" * 20, "0" * 20), "9" * 20)


def test_importing_config_stays_light() -> None:
    # The CLI imports config at start; requests (scheduler.notify imports it only to send)
    # and sqlalchemy wait until a file is loaded or a database URL checked.
    code = (
        "import sys, scheduler.config; print(sorted({'requests', 'sqlalchemy'} & set(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert out.stdout.strip() == "[]"


def test_aliases_and_merge_keys_share_settings(tmp_path: Path) -> None:
    text = """\
jobs:
  - &base
    name: a
    tests: [1]
    schedule: {every: 1h}
    spread: 10s
  - <<: *base
    name: b
  - <<: [*base, {enabled: false}]
    name: c
    spread: 0s
"""
    jobs = load(write(tmp_path, text)).jobs
    assert [(j.name, j.tests, j.spread, j.enabled) for j in jobs] == [
        ("a", ("1",), timedelta(seconds=10), True),
        ("b", ("1",), timedelta(seconds=10), True),
        ("c", ("1",), timedelta(0), False),
    ]


def test_a_spread_that_fits_the_schedule_is_accepted(tmp_path: Path) -> None:
    text = """\
defaults: {spread: 2h}
jobs:
  - {name: even, tests: [1, 2, 3, 4], schedule: {every: 1h}, spread: 1h}
  - {name: alone, tests: [1], schedule: {every: 15m}}
  - {name: once, tests: [1, 2], schedule: {at: "2026-12-01T09:00:00Z"}}
  - {name: nightly, tests: [1, 2], schedule: {cron: "@daily"}}
  - {name: weekdays, tests: [1, 2], schedule: {cron: "0 9 * * mon-fri"}, spread: 1d}
"""
    jobs = load(write(tmp_path, text)).jobs
    # Equal to the interval: the four tests start 15 minutes apart, all before the next slot.
    assert jobs[0].spread == jobs[0].schedule.every == timedelta(hours=1)
    # One test starts at the slot whatever the spread; a one-off has no next slot to reach.
    assert [job.spread for job in jobs[1:4]] == [timedelta(hours=2)] * 3
    assert jobs[4].spread == timedelta(days=1)


# -- what a good file turns into ------------------------------------------------------------------


def test_spec_example_loads(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, SPEC_EXAMPLE))
    assert cfg.path == tmp_path / "jobs.yaml"
    assert cfg.api == ApiConfig()
    assert cfg.history.url == f"sqlite:///{tmp_path}/history.db"
    assert cfg.history.retention == timedelta(days=90)
    assert cfg.metrics.listen is None
    dns, web, window = cfg.jobs
    assert (dns.name, dns.tests, dns.aid, dns.line) == (
        "dns-business-hours",
        ("105", "106"),
        "1234",
        22,
    )
    assert dns.schedule.cron == "*/15 8-18 * * mon-fri"
    assert dns.schedule.timezone == "Europe/Berlin" and dns.schedule.kind == "cron"
    assert web.schedule.every == timedelta(hours=6) and web.schedule.timezone == "UTC"
    assert window.schedule.at == datetime(2026, 12, 1, 8, tzinfo=timezone.utc)
    assert window.enabled is False
    assert cfg.enabled_jobs == (dns, web)
    assert dns.retry == RetryPolicy(4, 2.0, 300.0)
    assert cfg.job("web-every-6h") is web and cfg.job("nope") is None


@pytest.mark.skipif(not REPO_EXAMPLE.exists(), reason="the repository's jobs.yaml is not there")
def test_repository_example_loads() -> None:
    cfg = load(REPO_EXAMPLE)
    assert cfg.jobs and all(job.tests for job in cfg.jobs)


def test_minimal_file_gets_every_default(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, JOB))
    assert cfg.api == ApiConfig() and cfg.api.token_env == "THOUSANDEYES_TOKEN"
    assert cfg.history.url == f"sqlite:///{tmp_path}/history.db"
    (only,) = cfg.jobs
    assert only == config.Job(
        name="a", tests=("1",), schedule=config.Schedule(every=timedelta(hours=1)), line=2
    )


def test_config_is_frozen_and_has_no_token(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, JOB))
    assert not hasattr(cfg, "token") and not hasattr(cfg.api, "token")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.jobs = ()  # type: ignore[misc]


def test_defaults_merge_into_jobs(tmp_path: Path) -> None:
    text = """\
defaults:
  aid: 77
  timezone: America/New_York
  retry: {attempts: 6, backoff: 1s, max_backoff: 1m}
  catch_up: 0s
  spread: 30s
jobs:
  - name: plain
    tests: [1]
    schedule: {cron: "0 9 * * *"}
  - name: custom
    tests: ["2"]
    aid: null
    timezone: Europe/Berlin
    retry: {attempts: 2}
    catch_up: 2h
    spread: 0
    schedule: {cron: "0 9 * * *"}
  - name: tokyo
    tests: [3]
    timezone: Europe/Berlin
    schedule: {at: "2026-03-01T09:00:00", timezone: Asia/Tokyo}
  - name: anchored
    tests: [4]
    schedule: {every: 1h, start: 2026-03-01 09:30:00}
"""
    plain, custom, tokyo, anchored = load(write(tmp_path, text)).jobs
    assert (plain.aid, plain.schedule.timezone, plain.retry) == (
        "77",
        "America/New_York",
        RetryPolicy(6, 1.0, 60.0),
    )
    assert (plain.catch_up, plain.spread) == (timedelta(0), timedelta(seconds=30))
    assert (custom.aid, custom.schedule.timezone, custom.retry) == (
        None,
        "Europe/Berlin",
        RetryPolicy(2, 1.0, 60.0),
    )
    assert (custom.catch_up, custom.spread) == (timedelta(hours=2), timedelta(0))
    assert tokyo.schedule.timezone == "Asia/Tokyo"
    assert tokyo.schedule.at == datetime(2026, 3, 1, 9, tzinfo=ZoneInfo("Asia/Tokyo"))
    assert anchored.schedule.start == datetime(
        2026, 3, 1, 9, 30, tzinfo=ZoneInfo("America/New_York")
    )


def test_octal_looking_ids_keep_their_digits(tmp_path: Path) -> None:
    # YAML 1.1 would read 0105 as octal 69; an id is kept as written.
    cfg = load(write(tmp_path, job("    aid: 0123\n", tests="[0105, 105]")))
    assert cfg.jobs[0].tests == ("0105", "105") and cfg.jobs[0].aid == "0123"


def test_api_values(tmp_path: Path) -> None:
    text = (
        """\
api:
  base_url: http://127.0.0.1:8080/v7/
  timeout: 1.5s
  concurrency: 256
  rate_limit: 5/4s
  verify_tls: false
  proxy: socks5h://proxy:1080
"""
        + JOB
    )
    api = load(write(tmp_path, text)).api
    assert api == ApiConfig(
        base_url="http://127.0.0.1:8080/v7",
        timeout=1.5,
        concurrency=256,
        rate_limit=Rate(5, 4.0),
        verify_tls=False,
        proxy="socks5h://proxy:1080",
    )


@pytest.mark.parametrize(
    "url",
    [
        "http://localhost:8080/v7",
        "http://[::1]:8080",
        "http://127.1.2.3",
        "https://api.thousandeyes.com/v7",
    ],
)
def test_loopback_may_use_plain_http(tmp_path: Path, url: str) -> None:
    assert load(write(tmp_path, f"api:\n  base_url: {url}\n" + JOB)).api.base_url == url


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        ("'[::1]:9464'", ("::1", 9464)),
        ("':9464'", ("127.0.0.1", 9464)),
        ("0.0.0.0:80", ("0.0.0.0", 80)),
        ("9464", ("127.0.0.1", 9464)),
        ("null", None),
    ],
)
def test_metrics_listen(tmp_path: Path, listen: str, expected: tuple[str, int] | None) -> None:
    cfg = load(write(tmp_path, f"metrics:\n  listen: {listen}\n" + JOB))
    assert cfg.metrics.listen == expected


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sqlite:///history.db", "sqlite:///{dir}/history.db"),
        ("sqlite:///data/h.db?timeout=5", "sqlite:///{dir}/data/h.db?timeout=5"),
        ("sqlite:///../h.db", "sqlite:///{parent}/h.db"),
        ("sqlite:////var/lib/te/h.db", "sqlite:////var/lib/te/h.db"),
        ("sqlite://", "sqlite://"),
        ("'sqlite:///:memory:'", "sqlite:///:memory:"),
        ("sqlite+pysqlite:///h.db", "sqlite+pysqlite:///{dir}/h.db"),
        ("postgresql+psycopg://te@db.example/te", "postgresql+psycopg://te@db.example/te"),
    ],
)
def test_history_url_resolution(tmp_path: Path, url: str, expected: str) -> None:
    folder = tmp_path / "conf"
    folder.mkdir()
    cfg = load(write(folder, f"history:\n  url: {url}\n" + JOB))
    assert cfg.history.url == expected.format(dir=folder, parent=tmp_path)


@pytest.mark.parametrize(
    ("retention", "expected"),
    [
        ("null", None),
        ("0", None),
        ("0s", None),
        ("30d", timedelta(days=30)),
    ],
)
def test_retention(tmp_path: Path, retention: str, expected: timedelta | None) -> None:
    cfg = load(write(tmp_path, f"history:\n  retention: {retention}\n" + JOB))
    assert cfg.history.retention == expected


def test_token_file_is_resolved_against_the_config_folder(tmp_path: Path) -> None:
    folder = tmp_path / "conf"
    folder.mkdir()
    api = load(write(folder, "api:\n  token_file: secrets/te\n" + JOB)).api
    assert api.token_file == folder / "secrets" / "te" and api.token_env is None
    api = load(write(folder, "api:\n  token_file: /run/secrets/te\n" + JOB)).api
    assert api.token_file == Path("/run/secrets/te")


def test_token_env_null_means_the_default(tmp_path: Path) -> None:
    assert (
        load(write(tmp_path, "api:\n  token_env: null\n" + JOB)).api.token_env
        == "THOUSANDEYES_TOKEN"
    )
    assert load(write(tmp_path, "api:\n  token_env: MY_TE\n" + JOB)).api.token_env == "MY_TE"


# -- notify ---------------------------------------------------------------------------------------

SECRET = "xoxb-5d5e2a1c9f00abcdef"
HOOK = f"https://hooks.example.com/services/T0/B0/{SECRET}"


def test_notify_values(tmp_path: Path) -> None:
    text = job(
        f"    notify:\n      webhook: {HOOK}\n      after: 5\n"
        f"      ping_url: http://127.0.0.1:8000/ping/{SECRET}?create=1\n"
        "      timeout: 2500ms\n"
    )
    (only,) = load(write(tmp_path, text)).jobs
    assert only.notify == NotifyConfig(
        webhook=HOOK, after=5, timeout=2.5, ping_url=f"http://127.0.0.1:8000/ping/{SECRET}?create=1"
    )


def test_no_notify_means_the_notify_defaults(tmp_path: Path) -> None:
    (only,) = load(write(tmp_path, JOB)).jobs
    assert only.notify == NotifyConfig() and only.notify.webhook is None


def test_notify_defaults_merge_key_by_key(tmp_path: Path) -> None:
    text = f"""\
defaults:
  notify: {{webhook: "{HOOK}", after: 5, timeout: 3s}}
jobs:
  - {{name: plain, tests: [1], schedule: {{every: 1h}}}}
  - {{name: quiet, tests: [1], schedule: {{every: 1h}}, notify: {{webhook: null}}}}
  - name: own
    tests: [1]
    schedule: {{every: 1h}}
    notify: {{after: 1, ping_url: "https://hc-ping.example.com/{SECRET}"}}
  - {{name: empty, tests: [1], schedule: {{every: 1h}}, notify: {{}}}}
"""
    plain, quiet, own, empty = load(write(tmp_path, text)).jobs
    assert plain.notify == NotifyConfig(webhook=HOOK, after=5, timeout=3.0)
    assert quiet.notify == NotifyConfig(webhook=None, after=5, timeout=3.0)
    assert own.notify == NotifyConfig(
        webhook=HOOK, after=1, timeout=3.0, ping_url=f"https://hc-ping.example.com/{SECRET}"
    )
    assert empty.notify == plain.notify


def test_bad_notify_default_is_reported_once_not_per_job(tmp_path: Path) -> None:
    text = (
        "defaults:\n  notify: {after: -1, timeout: 0s}\n"
        + job()
        + ("  - {name: b, tests: [2], schedule: {every: 1h}, notify: {after: 0}}\n")
    )
    assert problems(tmp_path, text) == [
        "2:19: defaults.notify.after: must be a whole number of failed firings, 1 or more",
        "2:32: defaults.notify.timeout: must be a duration above 0 like 10s",
        "7:66: jobs[1].notify.after: must be a whole number of failed firings, 1 or more",
    ]


@pytest.mark.parametrize(
    "text",
    [
        f"defaults:\n  notify: {{webhook: 'http://hooks.example.com/{SECRET}'}}\n" + JOB,
        job(f"    notify: {{ping_url: 'ftp://hc.example.com/{SECRET}'}}\n"),
        job(f"    notify: {{webhook: 'https://hooks.example.com:99999/{SECRET}'}}\n"),
        job(f"    notify: {{webhook: 'https://{SECRET}@/x'}}\n"),
        job(f"    notify: {{webhook: !!int '{HOOK}'}}\n"),
        job(f"    notify: {{webhook: !!timestamp '{HOOK}'}}\n"),
        job(f"    notify: {{webhook: ['{HOOK}']}}\n"),
        job(f"    notify: {{after: '{HOOK}', timeout: '{HOOK}'}}\n"),
        job(f"    notify: {{web_hook: !!int '{HOOK}'}}\n"),
        job(f"    notify: {{webhook: '{HOOK}', webhook: '{HOOK}'}}\n"),
        job(f"    notify: '{HOOK}'\n"),
        job(f"    notify: '{SECRET}'\n"),
        job(f"    webhook: !!float '{HOOK}'\n"),
        job(f"    ping_url: !!int '{HOOK}'\n"),
    ],
)
def test_notify_urls_are_never_quoted(tmp_path: Path, text: str) -> None:
    lines = problems(tmp_path, text)
    assert not any(SECRET in line or SECRET[:12] in line for line in lines), lines


# -- the token --------------------------------------------------------------------------------


def test_load_token_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_TE", f"  {TOKEN}\n")
    assert load_token(ApiConfig(token_env="MY_TE")) == TOKEN


def test_load_token_env_missing_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("THOUSANDEYES_TOKEN", raising=False)
    with pytest.raises(TokenError, match="set the environment variable THOUSANDEYES_TOKEN"):
        load_token(ApiConfig())
    monkeypatch.setenv("THOUSANDEYES_TOKEN", "  ")
    with pytest.raises(TokenError, match="THOUSANDEYES_TOKEN") as info:
        load_token(ApiConfig())
    assert info.value.exit_code == 2


def test_load_token_from_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("THOUSANDEYES_TOKEN", "from-env-must-not-win")
    secret = tmp_path / "te"
    secret.write_text(TOKEN + "\n")
    cfg = load(write(tmp_path, "api:\n  token_file: te\n" + JOB))
    assert load_token(cfg.api) == TOKEN


@pytest.mark.parametrize(
    ("content", "phrase"),
    [
        (None, "cannot read the token file"),
        ("", "is empty"),
        ("\n\n", "is empty"),
        (f"{TOKEN}\nsecond line", "spaces or non-ASCII"),
    ],
)
def test_load_token_file_problems(tmp_path: Path, content: str | None, phrase: str) -> None:
    secret = tmp_path / "te"
    if content is not None:
        secret.write_text(content)
    with pytest.raises(TokenError) as info:
        load_token(ApiConfig(token_env=None, token_file=secret))
    assert phrase in str(info.value) and str(secret) in str(info.value)
    assert TOKEN not in str(info.value)


def test_token_with_inner_space_is_refused_without_echo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("THOUSANDEYES_TOKEN", f"Bearer {TOKEN}")
    with pytest.raises(TokenError) as info:
        load_token(ApiConfig())
    assert TOKEN not in str(info.value)


@pytest.mark.parametrize(
    "text",
    [
        f"api:\n  token: {TOKEN}\n",
        f"api: {TOKEN}\n",
        f"api: '{TOKEN}'\n",
        f"defaults:\n  token: !!int {TOKEN}\n",
        f"api:\n  tokn: {TOKEN}\n",
        f"api:\n  bearer_token: '{TOKEN}'\n",
        f"api:\n  {TOKEN}: x\n",
        f"api:\n  token_env: {TOKEN}\n",
        f"api:\n  token_env: ['{TOKEN}']\n",
        f"api:\n  base_url: {TOKEN}\n",
        f"api:\n  base_url: https://{TOKEN}@api.example\n",
        f"api:\n  timeout: {TOKEN}\n",
        f"api:\n  proxy: {TOKEN}\n",
        f"api:\n  rate_limit: !!int {TOKEN}\n",
        f"history:\n  url: postgres://te:{TOKEN}@db/te\n",
        f"history:\n  url: {TOKEN}\n",
        f"defaults:\n  token: {TOKEN}\n",
        f"{TOKEN}: 1\n",
    ],
)
def test_token_never_appears_in_errors(tmp_path: Path, text: str) -> None:
    lines = problems(tmp_path, text + JOB)
    assert lines and not any(TOKEN in line or TOKEN[:12] in line for line in lines), lines


# -- parsers ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("15m", timedelta(minutes=15)),
        ("1.5h", timedelta(minutes=90)),
        ("90d", timedelta(days=90)),
        ("250ms", timedelta(milliseconds=250)),
        ("2w", timedelta(weeks=2)),
        ("0s", timedelta(0)),
        ("0", timedelta(0)),
        (" 30s ", timedelta(seconds=30)),
        (".5s", timedelta(milliseconds=500)),
    ],
)
def test_parse_duration(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "5", "5x", "15M", "-5m", "1e3s", "s", "5m3s", "nan s", "9" * 15 + "w", "\u0661\u0665m"],
)
def test_parse_duration_errors_list_the_units(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_duration(text)
    message = str(info.value)
    assert "units ms s m h d w" in message or "too long" in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("24/min", Rate(24, 60.0)),
        ("5/4s", Rate(5, 4.0)),
        ("1/sec", Rate(1, 1.0)),
        ("240/minute", Rate(240, 60.0)),
        ("3/hour", Rate(3, 3600.0)),
        ("10/s", Rate(10, 1.0)),
        ("2/m", Rate(2, 60.0)),
        ("7/h", Rate(7, 3600.0)),
        ("1/250ms", Rate(1, 0.25)),
        ("2 / 1.5m", Rate(2, 90.0)),
        ("100/second", Rate(100, 1.0)),
    ],
)
def test_parse_rate(text: str, expected: Rate) -> None:
    assert parse_rate(text) == expected


@pytest.mark.parametrize(
    ("text", "phrase"),
    [
        ("24", "<count>/<period>"),
        ("24/", "<count>/<period>"),
        ("a/min", "<count>/<period>"),
        ("0/min", "at least 1"),
        ("1/0s", "longer than 0s"),
        ("1/fortnight", "<count>/<period>"),
        ("-1/min", "<count>/<period>"),
    ],
)
def test_parse_rate_errors(text: str, phrase: str) -> None:
    with pytest.raises(ValueError, match=phrase.replace("/", "/")):
        parse_rate(text)


NOW = datetime(2026, 1, 31, 12, 0, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("15m", NOW - timedelta(minutes=15)),
        ("24h", NOW - timedelta(hours=24)),
        ("7d", NOW - timedelta(days=7)),
        ("0s", NOW),
        ("2026-01-01T08:00:00Z", datetime(2026, 1, 1, 8, tzinfo=timezone.utc)),
        ("2026-01-01T08:00:00", datetime(2026, 1, 1, 8, tzinfo=timezone.utc)),
        ("2026-01-01T08:00:00+01:00", datetime(2026, 1, 1, 7, tzinfo=timezone.utc)),
        ("2026-01-01", datetime(2026, 1, 1, tzinfo=timezone.utc)),
    ],
)
def test_parse_when(text: str, expected: datetime) -> None:
    result = parse_when(text, NOW)
    assert result == expected and result.utcoffset() == timedelta(0)


@pytest.mark.parametrize("text", ["yesterday", "", "-5m", "2026-13-01", "99999999w"])
def test_parse_when_errors(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_when(text, NOW)
    assert "ISO-8601" in str(info.value) or "before the year 1" in str(info.value)


def test_config_error_lists_problems_in_file_order(tmp_path: Path) -> None:
    text = job("    enabled: 2\n", tests="[x]").replace("jobs:", "version: 9\njobs:")
    lines = problems(tmp_path, text)
    assert [line.split(":")[0] for line in lines] == ["1", "4", "6"]


def test_environment_is_not_read_while_loading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("THOUSANDEYES_TOKEN", raising=False)
    assert load(write(tmp_path, JOB)).api.token_env == "THOUSANDEYES_TOKEN"
    assert "THOUSANDEYES_TOKEN" not in os.environ
