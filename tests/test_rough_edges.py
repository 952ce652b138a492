"""Issue 11, a new user's rough edges: each as the user meets it, through the real CLI."""

from __future__ import annotations

import csv
import io
import json
import re
import signal
import socket
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from scheduler.api.simulator import Simulator
from tests.conftest import REPO, TOKEN, cli_env, run_cli, wait_until, write_config

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


@pytest.fixture
def config(tmp_path: Path, simulator: Simulator, db_url: str) -> Path:
    return write_config(tmp_path / "jobs.yaml", JOBS, base_url=simulator.url, db_url=db_url)


def no_token_env() -> dict[str, str]:
    env = cli_env()
    del env["TE_TEST_TOKEN"]
    return env


def assert_one_clean_line(stderr: str) -> None:
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert "Traceback" not in stderr and TOKEN not in stderr


# -- 1. validate checks the token; --online asks the API -------------------------------------


def test_validate_without_a_token_is_exit_2_in_one_line(config: Path):
    result = run_cli("-c", str(config), "validate", env=no_token_env())
    assert result.returncode == 2, result.stdout + result.stderr
    assert_one_clean_line(result.stderr)
    assert "no API token" in result.stderr and "TE_TEST_TOKEN" in result.stderr


def test_validate_with_an_unreadable_token_file_is_exit_2(tmp_path: Path, simulator, db_url):
    missing = tmp_path / "no-such-token"
    cfg = write_config(
        tmp_path / "jobs.yaml",
        JOBS,
        base_url=simulator.url,
        db_url=db_url,
        api_extra=f"  token_file: {missing}\n",
    ).read_text()
    (tmp_path / "jobs.yaml").write_text(cfg.replace("  token_env: TE_TEST_TOKEN\n", ""))
    result = run_cli("-c", str(tmp_path / "jobs.yaml"), "validate")
    assert result.returncode == 2, result.stdout + result.stderr
    assert_one_clean_line(result.stderr)
    assert "cannot read the token file" in result.stderr and str(missing) in result.stderr


def test_validate_online_accepts_a_good_token_and_asks_once_per_aid(config: Path, simulator):
    result = run_cli("-c", str(config), "validate", "--online")
    assert result.returncode == 0, result.stderr
    reads = [(r.method, r.path, r.query) for r in simulator.requests]
    assert sorted(reads, key=str) == sorted(
        [("GET", "/v7/tests", {}), ("GET", "/v7/tests", {"aid": ["1234"]})], key=str
    )
    assert all(r.header("Authorization") == f"Bearer {TOKEN}" for r in simulator.requests)
    assert "accepted" in result.stderr and TOKEN not in result.stdout + result.stderr


def test_validate_online_with_a_refused_token_is_exit_2(config: Path, simulator):
    env = cli_env(TE_TEST_TOKEN="not-the-right-token")
    result = run_cli("-c", str(config), "validate", "--online", env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert_one_clean_line(result.stderr)
    assert "the token was refused" in result.stderr
    assert "not-the-right-token" not in result.stdout + result.stderr
    offline = run_cli("-c", str(config), "validate", env=env)  # offline: a token is a token
    assert offline.returncode == 0, offline.stderr


def test_validate_online_when_the_api_is_unreachable_is_exit_1(tmp_path: Path, db_url):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cfg = write_config(
        tmp_path / "jobs.yaml", JOBS, base_url=f"http://127.0.0.1:{port}/v7", db_url=db_url
    )
    result = run_cli("-c", str(cfg), "validate", "--online")
    assert result.returncode == 1, result.stdout + result.stderr
    assert_one_clean_line(result.stderr)
    assert f"127.0.0.1:{port}" in result.stderr


# -- 3. plan: notes on stderr, --until as a duration ahead ------------------------------------


def test_plan_until_a_duration_counts_forward(config: Path):
    result = run_cli("-c", str(config), "plan", "--until", "6h", "--format", "json")
    assert result.returncode == 0, result.stderr
    firings = json.loads(result.stdout)["firings"]
    web = [f for f in firings if f["job"] == "web"]
    assert len(web) == 1  # every 6h: exactly one slot in [now, now + 6h)
    now = datetime.now(timezone.utc)
    assert now - timedelta(minutes=1) < datetime.fromisoformat(web[0]["utc"])
    assert datetime.fromisoformat(web[0]["utc"]) < now + timedelta(hours=6, minutes=1)
    anchored = run_cli(
        "-c",
        str(config),
        "plan",
        "--from",
        "2026-11-30T00:00:00Z",
        "--until",
        "13h",
        "--job",
        "web",
    )
    assert anchored.returncode == 0, anchored.stderr
    times = re.findall(r"2026-11-30 (\d\d):00:00Z", anchored.stdout)
    assert times[::2] == ["00", "06", "12"]  # utc then slot on each line
    assert "ISO" in run_cli("plan", "--help").stdout and "forward" in run_cli(
        "plan", "--help"
    ).stdout.replace("\n", " ")


# -- 4. silent surprises: a past `at`, triggering a disabled job, history of a typo ----------


def test_validate_warns_about_an_at_in_the_past(tmp_path: Path, simulator, db_url):
    body = JOBS + (
        "  - name: change-window\n    tests: [300]\n"
        '    schedule: {at: "2020-12-01T09:00:00+01:00"}\n'
        '  - name: later\n    tests: [301]\n    schedule: {at: "2999-12-01T09:00:00Z"}\n'
        "  - name: parked\n    tests: [302]\n    enabled: false\n"
        '    schedule: {at: "2020-12-01T09:00:00Z"}\n'
    )
    cfg = write_config(tmp_path / "jobs.yaml", body, base_url=simulator.url, db_url=db_url)
    result = run_cli("-c", str(cfg), "validate")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "in the past" in line]
    assert len(warnings) == 1, result.stderr
    assert "change-window" in warnings[0] and "2020-12-01" in warnings[0]
    assert warnings[0].startswith("warning: ")


def test_trigger_on_a_disabled_job_says_so_and_still_runs_it(tmp_path, simulator, db_url):
    body = (
        JOBS + "  - name: parked\n    tests: [300]\n    enabled: false\n    schedule: {every: 1h}\n"
    )
    cfg = write_config(tmp_path / "jobs.yaml", body, base_url=simulator.url, db_url=db_url)
    result = run_cli("-c", str(cfg), "trigger", "parked")
    assert result.returncode == 0, result.stderr
    assert simulator.counts() == {"300": 1}
    assert_one_clean_line(result.stderr)
    assert "parked" in result.stderr and "disabled" in result.stderr
    enabled = run_cli("-c", str(cfg), "trigger", "web")
    assert enabled.returncode == 0 and enabled.stderr == ""


def test_history_of_an_unknown_job_says_so(config: Path, simulator):
    assert run_cli("-c", str(config), "trigger", "web").returncode == 0
    typo = run_cli("-c", str(config), "history", "--job", "wbe")
    assert typo.returncode == 0, typo.stderr
    assert len(typo.stdout.splitlines()) == 1  # the header alone
    assert_one_clean_line(typo.stderr)
    assert "no job 'wbe'" in typo.stderr and "did you mean 'web'" in typo.stderr
    known = run_cli("-c", str(config), "history", "--job", "dns")  # in the config, not yet run
    assert known.returncode == 0 and known.stderr == ""
    found = run_cli("-c", str(config), "history", "--job", "web")
    assert found.returncode == 0 and found.stderr == "" and len(found.stdout.splitlines()) == 2


# -- 5. stats: one set of columns, one number format -----------------------------------------


def test_stats_formats_agree(config: Path, simulator):
    simulator.add_rule("106", 404, '{"title": "URI Resource Not Found"}', times=None)
    assert run_cli("-c", str(config), "trigger", "web").returncode == 0
    assert run_cli("-c", str(config), "trigger", "dns").returncode == 1
    assert run_cli("-c", str(config), "trigger", "dns", "--test", "105").returncode == 0
    as_json = json.loads(run_cli("-c", str(config), "stats", "--format", "json").stdout)
    as_csv = list(
        csv.DictReader(io.StringIO(run_cli("-c", str(config), "stats", "--format", "csv").stdout))
    )
    table = run_cli("-c", str(config), "stats").stdout.splitlines()
    header = table[0].split()
    assert list(as_json[0]) == header == list(as_csv[0])
    for name in ("attempts", "successes", "firings", "success_rate", "p50_ms", "last_error"):
        assert name in header
    rate = header.index("success_rate")
    rates = {line.split()[0] + "/" + line.split()[1]: line.split()[rate] for line in table[1:]}
    assert rates == {r["job"] + "/" + r["test_id"]: r["success_rate"] for r in as_csv}
    assert rates["web/281"] == "1" and rates["dns/106"] == "0"


# -- 6. a reload says what changed ------------------------------------------------------------

FIVE = """\
jobs:
  - name: a
    tests: [101]
    schedule: {every: 1h}
  - name: b
    tests: [102, 103]
    schedule: {every: 2h}
  - name: c
    tests: [104]
    schedule: {every: 3h}
  - name: d
    tests: [105]
    schedule: {every: 4h}
  - name: parked
    tests: [106]
    enabled: false
    schedule: {every: 5h}
"""


def test_a_reload_counts_every_job_and_names_the_changed_one(
    tmp_path, simulator, db_url, start_daemon
):
    cfg = write_config(tmp_path / "jobs.yaml", FIVE, base_url=simulator.url, db_url=db_url)
    daemon = start_daemon(cfg)
    daemon.wait_for_log('Scheduled job "d"')
    changed = FIVE.replace("{every: 2h}", "{every: 90m}")
    cfg.write_text(cfg.read_text().replace(FIVE, changed))
    daemon.send(signal.SIGHUP)
    daemon.wait_for_log("Reloaded")
    assert daemon.stop() == 0
    [line] = re.findall(r"Reloaded .*", daemon.log)
    assert "5 job(s)" in line and "4 enabled" in line
    assert "1 schedule change(s): b" in line


def test_a_reload_of_many_changes_names_ten_then_counts(tmp_path, simulator, db_url, start_daemon):
    many = "jobs:\n" + "".join(
        f"  - name: j{n:02}\n    tests: [{100 + n}]\n    schedule: {{every: 1h}}\n"
        for n in range(14)
    )
    cfg = write_config(tmp_path / "jobs.yaml", many, base_url=simulator.url, db_url=db_url)
    daemon = start_daemon(cfg)
    daemon.wait_for_log('Scheduled job "j13"')
    cfg.write_text(cfg.read_text().replace("every: 1h", "every: 2h"))
    daemon.send(signal.SIGHUP)
    wait_until(lambda: "Reloaded" in daemon.log, what="the reload")
    assert daemon.stop() == 0
    [line] = re.findall(r"Reloaded .*", daemon.log)
    assert "14 schedule change(s): j00, j01," in line and "j09 and 4 more" in line


# -- 2. the README: install commands that work, plan's JSON as it is -----------------------


def readme_commands() -> list[str]:
    """The lines of the README's ``sh`` code blocks, comments dropped."""
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)```", text, flags=re.S)
    return [line.split("  #")[0].strip() for block in blocks for line in block.splitlines()]


def test_the_readme_installs_from_a_checkout_or_a_wheel(tmp_path: Path):
    pytest.importorskip("hatchling")  # the build backend, to build offline
    commands = readme_commands()
    assert not [c for c in commands if re.search(r"pip install ['\"]?te-scheduler", c)]
    assert ".venv/bin/pip install ." in commands
    assert ".venv/bin/pip install '.[postgres]'" in commands
    [build] = [c for c in commands if "pip wheel" in c]
    [install] = [c for c in commands if c.startswith("pip install dist/")]
    args = build.split()[build.split().index("wheel") :]
    out = tmp_path / "dist"
    args[args.index("-w") + 1] = str(out)
    built = subprocess.run(
        [sys.executable, "-m", "pip", *args, "--no-build-isolation", "-q"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    pattern = install.split()[-1].removeprefix("dist/")
    assert [p.name for p in out.glob(pattern)], (pattern, list(out.iterdir()))


def test_the_readme_describes_plan_json_as_it_prints(config: Path):
    text = " ".join((REPO / "README.md").read_text().split())
    assert '`plan`: `{"firings": [], "warnings": [...]}`' in text
    assert '`{"job", "test_id", "scheduled_for", "utc", "local"}`' in text
    result = run_cli(
        "-c",
        str(config),
        "plan",
        "--from",
        "2026-11-28T01:00:00Z",
        "--until",
        "1h",
        "--format",
        "json",
    )  # a Saturday night: nothing is due
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"firings": [], "warnings": []}
