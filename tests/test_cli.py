"""The command line as a user meets it: real subprocesses, exit codes, stdout and stderr."""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from pathlib import Path

import pytest

from scheduler.logs import JsonFormatter, SecretFilter, TextFormatter
from scheduler.store import db, history
from tests.conftest import TOKEN, cli_env, run_cli, write_config

JOBS = """\
jobs:
  - name: dns
    tests: [105, 106]
    aid: "1234"
    schedule: {cron: "*/15 8-18 * * mon-fri", timezone: Europe/Berlin}
  - name: web
    tests: [281]
    schedule: {every: 6h}
"""
COLUMNS = [
    "id",
    "run_id",
    "job",
    "test_id",
    "aid",
    "trigger",
    "scheduled_for",
    "attempt",
    "started_at",
    "finished_at",
    "status_code",
    "outcome",
    "error",
    "duration_ms",
    "instance",
    "results",
]


@pytest.fixture
def config(tmp_path: Path, simulator, db_url) -> Path:  # type: ignore[no-untyped-def]
    return write_config(tmp_path / "jobs.yaml", JOBS, base_url=simulator.url, db_url=db_url)


def assert_clean(result) -> None:  # type: ignore[no-untyped-def]
    assert "Traceback" not in result.stderr + result.stdout


def test_validate_prints_one_line_per_job(config: Path):
    result = run_cli("-c", str(config), "validate")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["job", "tests", "schedule", "next"]
    assert lines[1].startswith("dns ") and "Europe/Berlin" in lines[1]
    assert lines[2].startswith("web ") and "every 6h" in lines[2]


def test_validate_reports_every_error_with_file_line_and_column(tmp_path: Path):
    bad = tmp_path / "jobs.yaml"
    bad.write_text(
        "version: 1\njobs:\n  - name: x\n    tests: [1]\n"
        "    schedule: {cron: '0 0 31 2 *'}\n    enabeld: true\n"
    )
    result = run_cli("-c", str(bad), "validate")
    assert result.returncode == 2
    assert_clean(result)
    errors = result.stderr.splitlines()
    assert errors[0].startswith(f"{bad}:5:")
    assert "jobs[0].schedule.cron" in errors[0] and "can never fire" in errors[0]
    assert errors[1].startswith(f"{bad}:6:5: jobs[0].enabeld: unknown key")
    assert "did you mean 'enabled'" in errors[1]


def test_a_missing_config_is_exit_2_in_one_line(tmp_path: Path):
    result = run_cli("-c", str(tmp_path / "nope.yaml"), "validate")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert_clean(result)


def test_plan_json_has_the_spec_shape(config: Path):
    result = run_cli(
        "-c",
        str(config),
        "plan",
        "--from",
        "2026-11-30T07:00:00Z",
        "--count",
        "3",
        "--format",
        "json",
    )
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert set(plan) == {"firings", "warnings"}
    assert [set(f) for f in plan["firings"]] == [
        {"job", "test_id", "scheduled_for", "utc", "local"}
    ] * 3
    first = plan["firings"][0]
    assert (first["job"], first["utc"], first["local"]) == (
        "dns",
        "2026-11-30T07:00:00+00:00",
        "2026-11-30T08:00:00+01:00",
    )


def test_plan_table_shows_the_peak_against_the_budget(config: Path):
    result = run_cli(
        "-c",
        str(config),
        "plan",
        "--from",
        "2026-11-30T07:00:00Z",
        "--until",
        "2026-11-30T08:00:00Z",
    )
    assert result.returncode == 0, result.stderr
    assert "peak: 2 call(s) in one min window" in result.stderr  # a note: not in the table
    assert "budget 24/min" in result.stderr
    assert "peak:" not in result.stdout
    assert all(line.split()[0] in ("job", "dns") for line in result.stdout.splitlines())


@pytest.mark.parametrize(
    "args, message",
    [
        (["plan", "--until", "1h", "--count", "3"], "exclusive"),
        (["plan", "--job", "dsn"], "did you mean 'dns'"),
        (["history", "--since", "yesterday"], "--since"),
        (["prune", "--older-than", "ten days"], "--older-than"),
        (["trigger", "nope"], "no job named 'nope'"),
        (["history", "--outcome", "fine"], "fine"),
        (["plan", "--count", "0"], "0"),
    ],
)
def test_bad_usage_is_exit_2_with_one_clear_line(config: Path, args: list[str], message: str):
    result = run_cli("-c", str(config), *args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr
    assert_clean(result)


def test_reading_history_before_any_migration_is_exit_3(config: Path):
    result = run_cli("-c", str(config), "history")
    assert result.returncode == 3
    assert "te-scheduler db upgrade" in result.stderr
    assert_clean(result)


def test_an_unreachable_database_is_exit_3(config: Path):
    result = run_cli("-c", str(config), "--db", "sqlite:////proc/no/such/dir/h.db", "history")
    assert result.returncode == 3, result.stderr
    assert_clean(result)


def test_db_upgrade_current_downgrade(config: Path):
    missing = run_cli("-c", str(config), "db", "current")
    assert missing.returncode == 3 and "no history database at" in missing.stderr
    upgraded = run_cli("-c", str(config), "db", "upgrade")
    assert upgraded.returncode == 0 and upgraded.stdout == ""
    assert "(head)" in run_cli("-c", str(config), "db", "current").stdout
    assert run_cli("-c", str(config), "db", "downgrade", "base").returncode == 0
    assert run_cli("-c", str(config), "db", "current").stdout.startswith("empty")


@pytest.mark.parametrize(
    "args",
    [["downgrade", "nope"], ["downgrade", "9999"], ["downgrade", "x" * 500], ["upgrade", "nope"]],
)
def test_an_unknown_revision_is_bad_usage(config: Path, db_url: str, args: list[str]):
    for migrated in (False, True):  # checked before the database is even opened
        result = run_cli("-c", str(config), "db", *args)
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.splitlines()) == 1 and len(result.stderr) < 200, result.stderr
        assert_clean(result)
        if not migrated:
            assert not Path(db_url.removeprefix("sqlite:///")).exists()
            assert run_cli("-c", str(config), "db", "upgrade").returncode == 0
    assert "(head)" in run_cli("-c", str(config), "db", "current").stdout  # nothing changed
    if args[0] == "downgrade":
        assert "unknown revision" in result.stderr and "known: base, 0001" in result.stderr


def test_downgrade_goes_only_down(config: Path):
    assert run_cli("-c", str(config), "db", "upgrade").returncode == 0
    assert run_cli("-c", str(config), "db", "downgrade", "0001").returncode == 0
    for args in (["0002"], ["head"], ["--", "-2"]):
        result = run_cli("-c", str(config), "db", "downgrade", *args)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.startswith("te-scheduler: error: ") and result.stderr.count("\n") == 1
        assert "the database is at 0001" in result.stderr
    assert run_cli("-c", str(config), "db", "current").stdout.startswith("0001 ")
    assert run_cli("-c", str(config), "db", "downgrade", "--", "-1").returncode == 0
    assert run_cli("-c", str(config), "db", "current").stdout.startswith("empty")


def test_empty_results_still_print_their_header(config: Path):
    assert run_cli("-c", str(config), "db", "upgrade").returncode == 0
    for command, first in (
        (["history"], "started_at"),
        (["stats"], "job"),
        (["status"], "instance"),
    ):
        table = run_cli("-c", str(config), *command)
        assert table.returncode == 0 and table.stderr == "", table.stderr
        (header,) = table.stdout.splitlines()  # the header alone: nothing matched
        assert header.split()[0] == first
        as_json = run_cli("-c", str(config), *command, "--format", "json")
        assert as_json.returncode == 0 and json.loads(as_json.stdout) == []
    as_csv = run_cli("-c", str(config), "history", "--format", "csv")
    assert as_csv.stdout.splitlines() == [",".join(COLUMNS)]


def test_trigger_sends_each_test_once_and_records_manual_rows(config: Path, simulator, db_url):
    result = run_cli("-c", str(config), "trigger", "dns")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert sorted(simulator.counts().items()) == [("105", 1), ("106", 1)]
    engine = db.make_engine(db_url)
    rows = history.query(engine, limit=None)
    assert {(r["test_id"], r["trigger"], r["outcome"], r["status_code"]) for r in rows} == {
        ("105", "manual", "success", 200),
        ("106", "manual", "success", 200),
    }


def test_trigger_exits_1_when_a_test_is_not_accepted(config: Path, simulator):
    simulator.add_rule("106", 404, '{"title": "URI Resource Not Found"}', times=None)
    result = run_cli("-c", str(config), "trigger", "dns")
    assert result.returncode == 1
    assert "test 106: http_error" in result.stderr
    only = run_cli("-c", str(config), "trigger", "dns", "--test", "105")
    assert only.returncode == 0, only.stderr


def test_trigger_matches_the_official_sdk_request(config: Path, simulator):
    """Same method, path, query and headers as thousandeyes-sdk-instant-tests (User-Agent aside)."""
    sdk = pytest.importorskip("thousandeyes_sdk.instant_tests")
    core = pytest.importorskip("thousandeyes_sdk.core")
    configuration = core.Configuration(host=simulator.url, access_token=TOKEN)
    with core.ApiClient(configuration) as client:
        sdk.InstantTestsApi(client).run_instant_test("105", aid="1234")
    assert run_cli("-c", str(config), "trigger", "dns", "--test", "105").returncode == 0
    theirs, ours = simulator.requests

    def shape(request):  # type: ignore[no-untyped-def]
        headers = {
            k.lower(): v
            for k, v in request.headers.items()
            if k.lower() in ("authorization", "accept", "content-type")
        }
        length = request.headers.get("Content-Length", "0")
        return request.method, request.path, request.query, headers, request.body, length

    assert shape(ours) == shape(theirs)
    assert ours.headers["User-Agent"].startswith("te-scheduler/")


def test_history_formats(config: Path, simulator):
    assert run_cli("-c", str(config), "trigger", "web").returncode == 0
    as_json = json.loads(run_cli("-c", str(config), "history", "--format", "json").stdout)
    assert len(as_json) == 1 and list(as_json[0]) == COLUMNS
    assert as_json[0]["status_code"] == 200 and as_json[0]["trigger"] == "manual"
    as_csv = list(
        csv.reader(io.StringIO(run_cli("-c", str(config), "history", "--format", "csv").stdout))
    )
    assert as_csv[0] == COLUMNS and len(as_csv) == 2
    table = run_cli("-c", str(config), "history").stdout.splitlines()
    assert table[0].split()[:3] == ["started_at", "job", "test_id"] and len(table) == 2
    empty = run_cli("-c", str(config), "history", "--job", "dns")
    assert empty.returncode == 0 and [line.split() for line in empty.stdout.splitlines()] == [
        table[0].split()
    ]


def test_stats_and_prune(config: Path, simulator):
    assert run_cli("-c", str(config), "trigger", "web").returncode == 0
    stats = json.loads(run_cli("-c", str(config), "stats", "--format", "json").stdout)
    assert [(s["job"], s["test_id"], s["firings"], s["success_rate"]) for s in stats] == [
        ("web", "281", 1, 1.0)
    ]
    dry = run_cli("-c", str(config), "prune", "--older-than", "0s", "--dry-run")
    assert dry.stdout.strip() == "1 row(s) would be deleted"
    assert run_cli("-c", str(config), "prune", "--older-than", "1d").stdout.strip() == (
        "0 row(s) deleted"
    )
    assert run_cli("-c", str(config), "prune", "--older-than", "0s").stdout.strip() == (
        "1 row(s) deleted"
    )


def test_help_teaches_and_never_shows_the_token(config: Path):
    result = run_cli("--help", env=cli_env(THOUSANDEYES_TOKEN=TOKEN))
    assert result.returncode == 0
    assert "Examples:" in result.stdout and "te-scheduler run --simulate" in result.stdout
    for command in (
        "run",
        "validate",
        "plan",
        "trigger",
        "history",
        "stats",
        "db",
        "prune",
        "simulate",
    ):
        sub = run_cli(command, "--help", env=cli_env(THOUSANDEYES_TOKEN=TOKEN))
        assert sub.returncode == 0 and TOKEN not in sub.stdout + sub.stderr


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.startswith("te-scheduler, version ")


def test_read_only_commands_need_only_the_database_and_never_create_it(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'typo' / 'history.db'}"
    for command in (["history"], ["stats"], ["status"], ["db", "current"]):
        result = run_cli("--db", url, *command, cwd=tmp_path)  # no jobs.yaml here at all
        assert result.returncode == 3, (command, result.stderr)
        assert "no history database at" in result.stderr
    assert not (tmp_path / "typo").exists()
    assert run_cli("--db", url, "db", "upgrade", cwd=tmp_path).returncode == 3  # nor its folder
    (tmp_path / "typo").mkdir()
    assert run_cli("--db", url, "db", "upgrade", cwd=tmp_path).returncode == 0
    listed = run_cli("--db", url, "history", "--format", "json", cwd=tmp_path)
    assert listed.returncode == 0 and json.loads(listed.stdout) == []


def test_usage_errors_are_one_line(config: Path):
    result = run_cli("-c", str(config), "plan", "--count", "lots")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("te-scheduler: error: ")


def test_the_demo_config_is_valid_and_fires_within_seconds():
    demo = Path(__file__).resolve().parent.parent / "contrib" / "demo.yaml"
    result = run_cli("-c", str(demo), "plan", "--count", "1", "--format", "json")
    assert result.returncode == 0, result.stderr
    [first] = json.loads(result.stdout)["firings"]
    assert first["job"] == "demo-heartbeat"


def test_an_alias_bomb_is_one_line_and_quick(tmp_path: Path):
    text = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    for level in range(1, 9):
        prev, name = chr(ord("a") + level - 1), chr(ord("a") + level)
        text += f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]\n"
    bomb = tmp_path / "jobs.yaml"
    bomb.write_text(text + JOBS)
    started = time.monotonic()
    result = run_cli("-c", str(bomb), "validate")
    assert time.monotonic() - started < 10  # a real expansion would never end
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (
        f"{bomb}:7:16: the document expands to more than 2,000,000 values "
        "(through aliases?); that is far more than a config needs\n"
    )


# -- the token in log lines ----------------------------------------------------------------


def logged(
    secrets: list[str], message: str, *args: object, json_format: bool = False, **extra: object
) -> str:
    """What one record becomes after SecretFilter and a formatter, as setup_logging wires them."""
    scrubber = SecretFilter()
    for secret in secrets:
        scrubber.add(secret)
    record = logging.LogRecord(
        "scheduler.runner", logging.WARNING, __file__, 1, message, args, None
    )
    record.__dict__.update(extra)
    assert scrubber.filter(record)
    return (JsonFormatter() if json_format else TextFormatter()).format(record)


def test_a_short_secret_is_masked_only_as_a_whole_token():
    line = logged(["abc"], 'job="%s" error="%s"', "abc-checks", "token abc expired (Bearer abc)")
    assert 'job="abc-checks"' in line  # not "***-checks"
    assert 'error="token *** expired (Bearer ***)"' in line
    assert logged(["abc"], "url=%s", "https://x/?token=abc&aid=1").endswith("token=***&aid=1")
    assert logged(["abc"], "labcd xabc abcx").endswith("labcd xabc abcx")


def test_a_real_token_is_masked_wherever_it_occurs():
    token = "5d5e2a1c-1234-4bcd-9f00-abcdef012345"  # ThousandEyes tokens are UUID-like
    for text in (
        f"Bearer {token}",
        f"x{token}y",
        f"Authorization%3A%20Bearer%20{token}",
        f"'{token}'",
    ):
        line = logged([token, "abc"], "sent %s", text)
        assert token not in line and "***" in line
    # A short secret that is part of the long one does not leave a piece of it behind.
    assert logged([token, "abcdef"], "%s", token).endswith(" ***")


def test_fields_and_tracebacks_are_scrubbed_too():
    token = "5d5e2a1c-1234-4bcd-9f00-abcdef012345"
    try:
        raise ValueError(f"header value 'Bearer {token}' rejected")
    except ValueError:
        import sys

        exc_info = sys.exc_info()
    scrubber = SecretFilter()
    scrubber.add(token)
    for formatter in (TextFormatter(), JsonFormatter()):
        record = logging.LogRecord(
            "scheduler.api.client", logging.DEBUG, __file__, 1, "call failed", None, exc_info
        )
        record.error = f"Bearer {token}"  # a structured field, as extra= adds it
        assert scrubber.filter(record)
        line = formatter.format(record)
        assert token not in line and "ValueError" in line and "Bearer ***" in line


def test_the_daemon_logs_keep_words_that_contain_a_short_token(tmp_path: Path, simulator, db_url):
    cfg = write_config(
        tmp_path / "jobs.yaml",
        """\
        jobs:
          - name: abc-checks
            tests: [105]
            schedule: {every: 1h}
        """,
        base_url=simulator.url,
        db_url=db_url,
    )
    result = run_cli(
        "-c",
        str(cfg),
        "--log-level",
        "debug",
        "trigger",
        "abc-checks",
        env=cli_env(TE_TEST_TOKEN="abc"),
    )  # the simulator answers 401
    assert result.returncode == 1
    assert 'job="abc-checks"' in result.stderr and "***-checks" not in result.stderr
