"""The floor: the thirty-line script a user writes instead of te-scheduler.

APScheduler's BackgroundScheduler, a ThreadPoolExecutor of 16 and ``requests.post`` on one
Session. No history, no limits, no retries. Run as a program with a JSON list of jobs
(``[{"test": "105", "every": 900, "start": 1767225600.0}, {"test": "106", "cron": "0 3 * * *"}]``)::

    BENCH_TOKEN=... python -m bench.bare jobs.json http://127.0.0.1:8080/v7
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import requests
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

session = requests.Session()
session.headers["Authorization"] = f"Bearer {os.environ.get('BENCH_TOKEN', '')}"


def run_test(base_url: str, test_id: str) -> int:
    """POST the run call; the status code (the script itself ignores it)."""
    return session.post(f"{base_url}/tests/{test_id}/run", timeout=30).status_code


def build(
    jobs: list[dict[str, Any]],
    base_url: str,
    workers: int = 16,
    call: Callable[[str, str], Any] = run_test,
) -> BackgroundScheduler:
    """A scheduler with one interval job per test (not started)."""
    # misfire_grace_time=None: APScheduler's default (1 s) silently drops a call that waited
    # more than a second for a free worker; the benchmarks would count those as lost.
    scheduler = BackgroundScheduler(
        executors={"default": ThreadPoolExecutor(workers)},
        job_defaults={"misfire_grace_time": None},
        timezone=timezone.utc,
    )
    for job in jobs:
        scheduler.add_job(call, _trigger(job), args=(base_url, job["test"]))
    return scheduler


def _trigger(job: dict[str, Any]) -> BaseTrigger:
    if "cron" in job:
        return CronTrigger.from_crontab(job["cron"], timezone=timezone.utc)
    start = datetime.fromtimestamp(job["start"], timezone.utc)
    return IntervalTrigger(seconds=job["every"], start_date=start, timezone=timezone.utc)


def main() -> None:
    """``python -m bench.bare JOBS.json BASE_URL``: run until killed."""
    with open(sys.argv[1]) as handle:
        jobs = json.load(handle)
    build(jobs, sys.argv[2]).start()
    threading.Event().wait()


if __name__ == "__main__":
    main()
