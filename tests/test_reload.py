"""Reload: SIGHUP and `run --watch` (edits, atomic renames, ConfigMap symlink swaps)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import time
from datetime import timedelta
from itertools import pairwise
from pathlib import Path

import pytest

from tests.conftest import wait_until, write_config
from tests.test_reliability import calls_to, finished, of, rows

pytestmark = pytest.mark.slow

KEEP = """\
jobs:
  - name: keep
    tests: [105]
    schedule: {every: 1s}
"""
EXTRA = """\
  - name: extra
    tests: [106]
    schedule: {every: 1s}
"""
ONLY_EXTRA = "jobs:\n" + EXTRA
BAD = """\
  - name: broken
    tests: [107]
    schedule: {every: banana}
"""


def config_text(tmp_path: Path, body: str, url: str, db_url: str) -> str:
    """The text of a jobs.yaml for ``body`` (written aside, then read back)."""
    return write_config(tmp_path / "draft.yaml", body, base_url=url, db_url=db_url).read_text()


def replace_atomically(path: Path, text: str) -> None:
    """What editors and config management do: write a temp file, rename it over the config."""
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(text)
    os.replace(temp, path)


def reloads(log: str) -> list[str]:
    return re.findall(r"Reloaded .*", log)


def calls_after(sim, test_id: str, moment: float) -> list[float]:  # type: ignore[no-untyped-def]
    return [t for t in calls_to(sim, test_id) if t > moment]


def test_sighup_applies_a_new_config_and_a_bad_one_keeps_the_schedule(
    tmp_path, simulator, db_url, start_daemon
):
    cfg = write_config(tmp_path / "jobs.yaml", KEEP, base_url=simulator.url, db_url=db_url)
    daemon = start_daemon(cfg)
    wait_until(lambda: finished(db_url, "105"), what="a first call")
    cfg.write_text(config_text(tmp_path, KEEP + EXTRA, simulator.url, db_url))
    daemon.send(signal.SIGHUP)
    daemon.wait_for_log("Reloaded")
    wait_until(lambda: calls_to(simulator, "106"), what="the added job")

    text = config_text(tmp_path, KEEP + EXTRA + BAD, simulator.url, db_url)
    line_no = text[: text.index("banana")].count("\n") + 1
    cfg.write_text(text)
    daemon.send(signal.SIGHUP)
    daemon.wait_for_log("rejected")
    rejected = time.time()
    wait_until(
        lambda: (
            calls_after(simulator, "105", rejected + 0.1)
            and calls_after(simulator, "106", rejected + 0.1)
        ),
        what="the old schedule",
    )
    assert daemon.stop() == 0
    log = daemon.log
    assert re.search(
        rf"Reload \(SIGHUP\) rejected, keeping the running schedule: "
        rf"{re.escape(str(cfg))}:{line_no}:\d+: jobs\[2\]\.schedule\.every: ",
        log,
    )
    assert len(reloads(log)) == 1 and not calls_to(simulator, "107")
    assert "Traceback" not in log


def test_watch_reloads_after_an_atomic_rename(tmp_path, simulator, db_url, start_daemon):
    cfg = write_config(tmp_path / "jobs.yaml", KEEP, base_url=simulator.url, db_url=db_url)
    daemon = start_daemon(cfg, "--watch")
    wait_until(lambda: finished(db_url, "105"), what="a first call")
    replace_atomically(cfg, config_text(tmp_path, KEEP + EXTRA, simulator.url, db_url))
    daemon.wait_for_log("Reloaded")
    wait_until(lambda: calls_to(simulator, "106"), what="the added job")
    replace_atomically(cfg, config_text(tmp_path, ONLY_EXTRA, simulator.url, db_url))
    wait_until(lambda: len(reloads(daemon.log)) == 2, what="the second reload")
    removed = time.time()
    wait_until(lambda: calls_after(simulator, "106", removed + 1.5), what="106 going on")
    assert daemon.stop() == 0
    assert "(file change)" in reloads(daemon.log)[0]
    assert calls_after(simulator, "105", removed + 0.5) == []  # the removed job stopped


def publish_configmap(folder: Path, text: str) -> None:
    """Update a mounted ConfigMap as the kubelet does.

    ``jobs.yaml -> ..data/jobs.yaml`` and ``..data -> ..<timestamp>``: write a new timestamped
    folder, point a new ``..data_tmp`` link at it, rename that over ``..data`` (atomic), then
    delete the old folder.
    """
    stamp = folder / f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{time.monotonic_ns()}"
    stamp.mkdir()
    (stamp / "jobs.yaml").write_text(text)
    data = folder / "..data"
    old = os.readlink(data) if data.is_symlink() else None
    os.symlink(stamp.name, folder / "..data_tmp")
    os.replace(folder / "..data_tmp", data)
    if old:
        shutil.rmtree(folder / old)
    if not (folder / "jobs.yaml").is_symlink():
        os.symlink("..data/jobs.yaml", folder / "jobs.yaml")


def test_watch_follows_a_configmap_symlink_swap(tmp_path, simulator, db_url, start_daemon):
    mount = tmp_path / "config"
    mount.mkdir()
    publish_configmap(mount, config_text(tmp_path, KEEP, simulator.url, db_url))
    daemon = start_daemon(mount / "jobs.yaml", "--watch")
    wait_until(lambda: finished(db_url, "105"), what="a first call")
    publish_configmap(mount, config_text(tmp_path, KEEP + EXTRA, simulator.url, db_url))
    daemon.wait_for_log("Reloaded")
    wait_until(lambda: calls_to(simulator, "106"), what="the added job")
    publish_configmap(mount, config_text(tmp_path, ONLY_EXTRA, simulator.url, db_url))
    wait_until(lambda: len(reloads(daemon.log)) == 2, what="the second swap")
    removed = time.time()
    wait_until(lambda: calls_after(simulator, "106", removed + 1.5), what="106 going on")
    assert daemon.stop() == 0
    assert calls_after(simulator, "105", removed + 0.5) == []
    assert "rejected" not in daemon.log  # the old folder vanished under us: never read


def test_unchanged_jobs_keep_their_slots_while_others_come_and_go(
    tmp_path, simulator, db_url, start_daemon
):
    cfg = write_config(tmp_path / "jobs.yaml", KEEP, base_url=simulator.url, db_url=db_url)
    daemon = start_daemon(cfg)
    wait_until(lambda: finished(db_url, "105"), what="a first call")
    slower = EXTRA.replace("every: 1s", "every: 2s")
    retry = KEEP.replace("{every: 1s}", "{every: 1s}\n    retry: {attempts: 2}")
    steps = [
        KEEP + EXTRA,  # add a job
        KEEP + slower,  # change its schedule
        retry + slower,  # change what is not timing
        KEEP,  # remove the other job
    ]
    for number, body in enumerate(steps, 1):
        cfg.write_text(config_text(tmp_path, body, simulator.url, db_url))
        daemon.send(signal.SIGHUP)
        wait_until(lambda n=number: len(reloads(daemon.log)) == n, what=f"reload {number}")
        time.sleep(0.6)
    removed = time.time()
    time.sleep(1.5)
    assert daemon.stop() == 0
    changes = [
        int(re.search(r"(\d+) schedule change", line)[1])  # type: ignore[index]
        for line in reloads(daemon.log)
    ]
    assert changes == [1, 1, 0, 1]  # "keep" was never rescheduled
    slots = sorted(r["scheduled_for"] for r in of(rows(db_url), test_id="105"))
    # One firing per second, none lost or doubled across four reloads.
    assert all(b - a == timedelta(seconds=1) for a, b in pairwise(slots))
    assert len(slots) >= 5
    assert calls_after(simulator, "106", removed + 0.3) == []


def test_a_reload_never_cuts_a_call_in_flight(tmp_path, simulator, db_url, start_daemon):
    cfg = write_config(tmp_path / "jobs.yaml", KEEP, base_url=simulator.url, db_url=db_url)
    daemon = start_daemon(cfg)
    wait_until(lambda: finished(db_url, "105"), what="a first call")
    simulator.add_rule("105", 200, delay=2.5)
    before = len(calls_to(simulator, "105"))
    wait_until(lambda: len(calls_to(simulator, "105")) > before, what="the slow call")
    # Remove the very job whose call is in flight.
    cfg.write_text(config_text(tmp_path, ONLY_EXTRA, simulator.url, db_url))
    daemon.send(signal.SIGHUP)
    daemon.wait_for_log("Reloaded")
    reloaded = time.time()
    wait_until(
        lambda: [r for r in of(rows(db_url), test_id="105") if (r["duration_ms"] or 0) >= 2400],
        what="the slow call's answer",
    )
    assert daemon.stop() == 0
    slow = max(of(rows(db_url), test_id="105"), key=lambda r: r["duration_ms"] or 0)
    assert (slow["outcome"], slow["status_code"]) == ("success", 200)
    assert calls_after(simulator, "105", reloaded + 0.3) == []


def test_a_settings_only_change_applies_from_the_next_firing_without_rescheduling(
    tmp_path, simulator, db_url, start_daemon
):
    cfg = write_config(tmp_path / "jobs.yaml", KEEP, base_url=simulator.url, db_url=db_url)
    daemon = start_daemon(cfg)
    wait_until(lambda: finished(db_url, "105"), what="a first call")
    with_aid = KEEP.replace("{every: 1s}", "{every: 1s}\n    aid: 77")
    assert with_aid != KEEP
    cfg.write_text(config_text(tmp_path, with_aid, simulator.url, db_url))
    daemon.send(signal.SIGHUP)
    daemon.wait_for_log("Reloaded")
    reloaded = time.time()
    wait_until(
        lambda: [
            r
            for r in list(simulator.requests)
            if r.received_at > reloaded + 0.1 and r.query.get("aid") == ["77"]
        ],
        what="a call with the new account group",
    )
    assert daemon.stop() == 0
    [line] = reloads(daemon.log)
    assert "0 schedule change" in line  # the same slots: nothing was rescheduled
