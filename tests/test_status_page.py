"""The status page in a real headless Chromium against a real daemon (SPEC.md section 8).

A ``te-scheduler run`` subprocess calls the built-in simulator (a stdlib HTTP server); one
job's calls get a 404 whose problem ``title`` is HTML. The browser loads the overview, finds
every job with a next fire and a last outcome, follows a job link to its attempts, checks the
HTML arrives as text (no element, no alert), that page.js counts, that the CSP blocked
nothing, and saves a screenshot of each page under the test's tmp_path.

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/ensure-browser`` installs them):
without them the test skips, and fails when ``CI`` is set.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from scheduler.api.simulator import Simulator
from tests.conftest import DaemonProcess, wait_until, write_config

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
EVIL_TITLE = "<script>alert(1)</script><b>x</b>"
JOBS = """\
metrics:
  listen: 127.0.0.1:{port}
jobs:
  - name: dns-every-2s
    tests: ["101"]
    schedule: {{every: 2s}}
  - name: web-pair
    tests: ["102", "103"]
    schedule: {{every: 3s}}
    spread: 1s
  - name: berlin-minutely
    tests: ["104"]
    schedule: {{cron: "* * * * *", timezone: Europe/Berlin}}
    catch_up: 0s
  - name: broken-test
    tests: ["666"]
    schedule: {{every: 2s}}
    retry: {{attempts: 1}}
"""

pytestmark = pytest.mark.slow


def _require_browser() -> None:
    if CHROMIUM.exists() and CHROMEDRIVER.exists():
        return
    message = f"{CHROMIUM} and {CHROMEDRIVER} are needed (run .ci/ensure-browser as root)"
    if os.environ.get("CI"):
        pytest.fail(message)  # CI must prove the page in a browser, not skip it
    pytest.skip(message)


@pytest.fixture
def browser() -> Iterator[Any]:
    """Headless Chromium through chromedriver, its console log kept."""
    _require_browser()
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("selenium is not installed (pip install -e '.[test]')")
        pytest.skip("selenium is not installed")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1440,1000"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(20)
    yield driver
    driver.quit()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _jobs_seen(db: Path) -> set[str]:
    if not db.exists():
        return set()
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT DISTINCT job FROM attempts WHERE outcome != 'pending'")
        return {job for (job,) in rows}


def test_status_page_in_a_browser(
    tmp_path: Path,
    simulator: Simulator,
    start_daemon: Callable[..., DaemonProcess],
    browser: Any,
) -> None:
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By

    problem = {"type": "about:blank", "title": EVIL_TITLE, "status": 404}
    simulator.add_rule(
        "666",
        404,
        json.dumps(problem),
        {"Content-Type": "application/problem+json"},
        times=None,
    )
    port = _free_port()
    db = tmp_path / "history.db"
    config = write_config(
        tmp_path / "jobs.yaml",
        JOBS.format(port=port),
        base_url=simulator.url,
        db_url=f"sqlite:///{db}",
    )
    daemon = start_daemon(config)
    daemon.wait_for_log("Serving /metrics")
    wanted = {"dns-every-2s", "web-pair", "broken-test"}
    wait_until(lambda: wanted <= _jobs_seen(db), timeout=30, what="every short job to fire")
    base = f"http://127.0.0.1:{port}"

    # The overview: every job has a next fire; the ones that fired have a last outcome.
    browser.get(base + "/")
    rows = browser.find_elements(By.CSS_SELECTOR, "table.jobs tbody tr")
    names = [row.find_element(By.CSS_SELECTOR, "th[scope=row] a").text for row in rows]
    assert names == ["dns-every-2s", "web-pair", "berlin-minutely", "broken-test"]
    by_name = dict(zip(names, rows, strict=True))
    for name, row in by_name.items():
        countdown = row.find_element(By.CSS_SELECTOR, "td.next time.countdown").text
        assert countdown.startswith("in ") or countdown == "now", (name, countdown)
        if name in wanted:
            outcome = row.find_element(By.CSS_SELECTOR, "td.last .badge").text
            assert outcome == ("http_error" if name == "broken-test" else "success"), name
    # The API's HTML is text: shown literally, no <b> made, no script run.
    broken = by_name["broken-test"]
    error = broken.find_element(By.CSS_SELECTOR, "td.last .error")
    assert EVIL_TITLE in error.text
    assert not error.find_elements(By.TAG_NAME, "b")
    assert broken.find_element(By.CSS_SELECTOR, "td.last .code").text == "404"
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text
    # page.js runs (the CSP lets our own script in) and keeps the countdown moving.
    first = by_name["dns-every-2s"].find_element(By.CSS_SELECTOR, "time.countdown")
    before = first.text
    wait_until(lambda: first.text != before, timeout=5, what="the countdown to tick")
    browser.save_screenshot(str(tmp_path / "overview.png"))

    # A narrow window and dark mode: still one readable page.
    browser.set_window_size(420, 900)
    browser.execute_cdp_cmd(
        "Emulation.setEmulatedMedia",
        {"features": [{"name": "prefers-color-scheme", "value": "dark"}]},
    )
    browser.get(base + "/")
    background = browser.execute_script("return getComputedStyle(document.body).backgroundColor")
    assert background == "rgb(13, 17, 23)"  # the dark palette
    browser.save_screenshot(str(tmp_path / "overview-narrow-dark.png"))
    browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})
    browser.set_window_size(1440, 1000)

    # Follow a job link to its attempts.
    browser.get(base + "/")
    browser.find_element(By.LINK_TEXT, "dns-every-2s").click()
    assert browser.current_url == base + "/jobs/dns-every-2s"
    assert browser.find_element(By.TAG_NAME, "h1").text == "dns-every-2s"
    next_rows = browser.find_elements(By.CSS_SELECTOR, "table.next tbody tr")
    assert len(next_rows) == 10
    attempts = browser.find_elements(By.CSS_SELECTOR, "table.attempts tbody tr")
    assert attempts and all("success" in row.text for row in attempts)
    browser.save_screenshot(str(tmp_path / "job.png"))

    browser.get(base + "/jobs/broken-test")
    cells = browser.find_elements(By.CSS_SELECTOR, "table.attempts td.error")
    assert cells and all(EVIL_TITLE in cell.text for cell in cells)
    assert not browser.find_elements(By.CSS_SELECTOR, "table.attempts td.error b")
    browser.save_screenshot(str(tmp_path / "job-broken.png"))

    # Nothing was blocked or failed to load: no CSP report, no 404 for a resource.
    problems = [
        entry["message"]
        for entry in browser.get_log("browser")
        if entry["level"] == "SEVERE" or "Content Security Policy" in entry["message"]
    ]
    assert problems == []
    for name in ("overview.png", "overview-narrow-dark.png", "job.png", "job-broken.png"):
        assert (tmp_path / name).stat().st_size > 10_000, name
    assert daemon.stop() == 0
    assert "Traceback" not in daemon.log
